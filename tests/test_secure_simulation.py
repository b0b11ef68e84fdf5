"""Secure aggregation and distributed DP in a real Flower simulation (tiny model, three sites)."""

from __future__ import annotations

import pytest

from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import PrivacyRecord
from fedpriv.common.rundir import RunDirectory, summarize
from fedpriv.common.wire.secure_protocol import ADVERTISE, MASK, SETUP, UNMASK


def _run(config):
    import os

    from rich.console import Console

    from fedpriv.simulation.harness import simulate

    return simulate(config, console=Console(file=open(os.devnull, "w")))


@pytest.mark.slow
def test_secure_aggregation_with_local_noise_learns_and_the_aggregator_sees_only_sums(tiny_config):
    config = tiny_config.replace(**{"privacy.secure-aggregation": True, "rounds": 3, "privacy.target-epsilon": 30.0})
    run = RunDirectory(_run(config).path)
    summary = summarize(run)
    assert summary["rounds-completed"] == 3 and summary["central-accuracy"] > 0.6
    aggregates = run.events("train-aggregate")
    assert [e["secure"] for e in aggregates] == [True] * 3 and all(e["sites"] == 3 for e in aggregates)
    # Keys agreed in round 1; rounds 2 and 3 are two exchanges each.
    stages = [(e["round"], e["stage"]) for e in run.events("secure-stage")]
    assert stages == [
        (1, SETUP),
        (1, ADVERTISE),
        (1, MASK),
        (1, UNMASK),
        (2, MASK),
        (2, UNMASK),
        (3, MASK),
        (3, UNMASK),
    ]
    # Each site's ledger names the hash of the masked vector it sent; the aggregator's receipts hold the same.
    receipts = [
        r
        for r in Ledger(run.path / "ledgers" / "federation.jsonl").records()
        if getattr(r, "kind", "") == "site-release"
    ]
    assert len(receipts) == 9


@pytest.mark.slow
def test_distributed_dp_records_its_noise_share_audits_and_learns(tiny_config):
    from fedpriv.audit.auditor import audit

    config = tiny_config.replace(
        **{
            "privacy.secure-aggregation": True,
            "privacy.noise": "distributed",
            "privacy.target-epsilon": 8.0,
            "rounds": 6,
            "train.sample-rate": 0.5,
            "train.learning-rate": 2.0,
        }
    )
    run = RunDirectory(_run(config).path)
    summary = summarize(run)
    assert summary["rounds-completed"] == 6
    assert summary["central-accuracy"] > 0.5, summary["central-accuracy"]  # chance is 1/3
    records = [r for r in Ledger(run.path / "ledgers" / "site-000.jsonl").records() if isinstance(r, PrivacyRecord)]
    shared = records[-1].mechanism.distributed
    assert shared is not None and shared.cohort == 3 and shared.max_colluding == 1
    assert records[-1].mechanism.steps == 1
    assert shared.noise_share == pytest.approx(shared.total_noise_multiplier / 2**0.5)
    assert records[-1].accounting.epsilon <= 8.0
    assert audit([run.path]).ok


@pytest.mark.slow
def test_a_site_whose_budget_is_spent_leaves_at_the_mask_stage_and_the_next_keys_leave_it_out(tiny_config):
    from fedpriv.common.privacy.accounting import epsilon, poisson_gaussian
    from fedpriv.common.privacy.plan import plan_for

    config = tiny_config.replace(
        **{
            "privacy.secure-aggregation": True,
            "rounds": 3,
            "privacy.target-epsilon": 30.0,
            "simulation.sites": 4,
            "strategy.min-sites": 4,
        }
    )
    plan = plan_for(config)  # the local plan's noise
    step = poisson_gaussian(plan.noise_multiplier, plan.sample_rate, plan.local_steps)
    one_round = epsilon([step], config.privacy.delta, config.privacy.accountant)
    # site-003 can afford one round. Round 2 runs on round 1's keys: its budget check refuses at the mask
    # stage, before anything is computed, while the others mask with it; it counts as dropped and its masks
    # are removed with the pair keys of round 2 the others reveal. Round 3 agrees keys again, and site-003
    # refuses at once: the keys are agreed again among the other three, under the threshold for three, and
    # nothing of site-003 needs recovering.
    config = config.replace(**{"simulation.site-caps": f"site-003={one_round * 1.01:.6f}"})
    run = RunDirectory(_run(config).path)
    aggregates = {e["round"]: e for e in run.events("train-aggregate")}
    assert aggregates[1]["sites"] == 4 and aggregates[1]["dropped"] == 0
    assert aggregates[2]["sites"] == 3 and aggregates[2]["dropped"] == 1
    assert aggregates[3]["sites"] == 3 and aggregates[3]["dropped"] == 0
    assert [(e["round"], e["site"]) for e in run.events("site-budget-exhausted")] == [(2, "site-003"), (3, "site-003")]
    stages = [(e["round"], e["stage"]) for e in run.events("secure-stage")]
    assert [s for r, s in stages if r == 2] == [MASK, UNMASK]  # steady state: two exchanges
    assert [s for r, s in stages if r == 3] == [ADVERTISE, ADVERTISE, MASK, UNMASK]
    keys = [(e["sites"], e["threshold"]) for e in run.events("secure-keys") if e["round"] == 3]
    assert keys == [(4, 3), (3, 2)]
    assert summarize(run)["rounds-completed"] == 3 and summarize(run)["central-accuracy"] > 0.6
