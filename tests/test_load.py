"""Load: a deployed federation of 6 agents on 127.0.0.1 whose agents are killed and restarted at random rounds.

Six, not the benchmark's eight (bench/load.py, 20 rounds): on CI's two cores every agent starts a fresh
process each round, and six keep this test to about three minutes."""

from __future__ import annotations

import pytest

from tests.local_federation import run_under_load


@pytest.mark.slow
def test_six_agents_two_killed_and_restarted_every_round_completes_nothing_left_behind(tiny_model_dir, tmp_path):
    result = run_under_load(tmp_path, tiny_model_dir, sites=6, rounds=4, kills=2, seed=3)
    assert result["returncode"] == 0, result["output"]
    assert sorted(result["round-s"]) == [1, 2, 3, 4]
    killed = {e["site"]: e["round"] for e in result["events"] if e["event"] == "killed"}
    assert len(killed) == 2
    for rnd, sites in result["trained"].items():
        # Every round aggregates the sites present: all but those killed before it and not yet back.
        assert len(sites) >= 4, (rnd, sites)
    assert len(result["trained"][1]) == 6
    assert result["audit-returncode"] == 0, result["audit"]
    assert result["left-behind"] == []
