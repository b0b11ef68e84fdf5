"""Secure aggregation in a real deployment: an aggregator and three agents on 127.0.0.1, over TLS."""

from __future__ import annotations

import json

import pytest

from fedpriv.common.rundir import RunDirectory
from tests.local_federation import LocalFederation, finish, sweep, wait_for


@pytest.mark.slow
def test_two_secure_rounds_with_an_agent_killed_mid_round_complete_and_audit(tiny_model_dir, tmp_path):
    sites = ("site-a", "site-b", "site-c")
    fed = LocalFederation(tmp_path, tiny_model_dir, sites=sites, rounds=2, min_sites=2)
    try:
        fed.start_aggregator()
        for site in sites:
            fed.start_agent(site)
        fed.wait_online(timeout=300)
        run_dir = tmp_path / "run-secure"
        process = fed.submit(
            "--run-dir",
            run_dir,
            "--set",
            "privacy.secure-aggregation=true",
            "--set",
            "strategy.round-timeout=45",
            "--set",
            "privacy.target-epsilon=50",
        )
        wait_for(
            lambda: "Receiving: train.secagg_mask message" in fed.log_text("site-c"), 240, "site-c to be asked to mask"
        )
        fed.kill("site-c")  # mid-round: after sharing its keys, while it trains
        code, out, err = finish(process, 600)
        assert code == 0, out[-3000:] + err[-3000:]
        run = RunDirectory(run_dir)
        aggregates = {e["round"]: e for e in run.events("train-aggregate")}
        assert sorted(aggregates) == [1, 2] and all(e["secure"] for e in aggregates.values())
        assert aggregates[1]["sites"] == 2 and aggregates[1]["dropped"] == 1  # recovered from the others' shares
        assert aggregates[2]["sites"] == 2
        result = fed.audit(run_dir)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.loads(result.stdout)["ok"]
    finally:
        fed.stop_all()
        sweep(tmp_path)
