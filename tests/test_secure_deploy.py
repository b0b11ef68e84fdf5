"""Secure aggregation in a real deployment: an aggregator and three agents on 127.0.0.1, over TLS."""

from __future__ import annotations

import json

import pytest

from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.secure_protocol import MASK
from tests.local_federation import finish, running, wait_event


@pytest.mark.slow
@pytest.mark.timeout(1800)  # nine ClientApp starts per site: took 750 s on 2 cores at load 13
def test_two_secure_rounds_with_an_agent_killed_mid_round_complete_and_audit(tiny_model_dir, tmp_path):
    with running(tmp_path, tiny_model_dir, sites=("site-a", "site-b", "site-c"), rounds=2, min_sites=2) as fed:
        run_dir = tmp_path / "run-secure"
        process = fed.submit(
            "--run-dir",
            run_dir,
            "--set",
            "privacy.secure-aggregation=true",
            # Generous: the masking stage ends as soon as Flower reports the killed site unavailable
            # (two missed heartbeats), and the others may train slowly on a loaded machine.
            "--set",
            "strategy.round-timeout=300",
            "--set",
            "privacy.target-epsilon=50",
        )
        # The aggregator records whom it asked to mask: site-c has shared its keys and is about to train.
        mask = wait_event(run_dir, "secure-stage", lambda e: e["round"] == 1 and e["stage"] == MASK, process)
        assert mask["sites"] == ["site-a", "site-b", "site-c"]
        fed.kill("site-c")  # mid-round: after sharing its keys, before its masked update
        code, out, err = finish(process)
        assert code == 0, out[-3000:] + err[-3000:]
        run = RunDirectory(run_dir)
        aggregates = {e["round"]: e for e in run.events("train-aggregate")}
        assert sorted(aggregates) == [1, 2] and all(e["secure"] for e in aggregates.values())
        assert aggregates[1]["sites"] == 2 and aggregates[1]["dropped"] == 1  # recovered from the others' shares
        assert aggregates[2]["sites"] == 2
        result = fed.audit(run_dir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.loads(result.stdout)["ok"]
