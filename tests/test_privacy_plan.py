"""The privacy plan: one set of numbers from the settings, read alike by sites and the aggregator."""

from __future__ import annotations

import math

import pytest

from fedpriv.common.config import FedprivConfig
from fedpriv.common.privacy.accounting import epsilon, poisson_gaussian
from fedpriv.common.privacy.plan import ENCODING_SCALE, plan_for

# RDP: the same plan, calibrated in milliseconds rather than PLD's seconds.
FAST = {"privacy.accountant": "rdp"}
DISTRIBUTED = {"privacy.secure-aggregation": True, "privacy.noise": "distributed", "rounds": 20, **FAST}


def test_one_plan_per_settings_and_a_new_one_when_they_change():
    config = FedprivConfig().replace(rounds=20, **FAST)
    assert plan_for(config) is plan_for(FedprivConfig().replace(rounds=20, **FAST))
    assert (
        plan_for(config.replace(**{"privacy.target-epsilon": 4.0})).noise_multiplier > plan_for(config).noise_multiplier
    )


def test_local_noise_meets_the_target_after_every_round_and_planned_evaluation():
    config = FedprivConfig().replace(
        **{"rounds": 20, "privacy.evaluation": "noised", "strategy.evaluate-every": 5, "privacy.target-epsilon": 3.0},
        **FAST,
    )
    plan = plan_for(config)
    assert len(plan.planned_evaluations) == 4 and plan.steps_per_round == plan.local_steps > 1
    spent = epsilon(
        [poisson_gaussian(plan.noise_multiplier, plan.sample_rate, plan.local_steps * plan.rounds)]
        + list(plan.planned_evaluations),
        plan.delta,
        plan.accountant,
    )
    assert spent == pytest.approx(3.0, abs=0.02) and spent <= 3.0 + 1e-3


def test_distributed_noise_is_one_step_a_round_and_its_evaluations_are_planned_too():
    base = FedprivConfig().replace(**DISTRIBUTED)
    plan = plan_for(base)
    assert plan.distributed and plan.steps_per_round == 1
    length = 10_000
    sigma = plan.distributed_noise_multiplier(length)
    # The encoding's grid adds sqrt(length)/scale to the sensitivity: sigma grows with it, and only so much.
    grid = (plan.max_grad_norm + math.sqrt(length) / ENCODING_SCALE) / plan.max_grad_norm
    accounted = sigma / grid
    spent = epsilon([poisson_gaussian(accounted, plan.sample_rate, plan.rounds)], plan.delta, plan.accountant)
    assert spent == pytest.approx(plan.target_epsilon, abs=0.02)

    noised = plan_for(base.replace(**{"privacy.evaluation": "noised", "strategy.evaluate-every": 5}))
    assert len(noised.planned_evaluations) == 4
    # the evaluations' share of the budget leaves less for training: more noise on the sum
    assert noised.distributed_noise_multiplier(length) > sigma
    accounted = noised.distributed_noise_multiplier(length) / grid
    events = [poisson_gaussian(accounted, plan.sample_rate, plan.rounds), *noised.planned_evaluations]
    assert epsilon(events, plan.delta, plan.accountant) == pytest.approx(plan.target_epsilon, abs=0.02)


def test_the_normalisers_are_public_numbers_of_the_plan():
    plan = plan_for(FedprivConfig().replace(**DISTRIBUTED))
    assert plan.site_normaliser(1000) == plan.sample_rate * 1000  # declared rows, never the true count
    counted = []
    assert plan.federation_normaliser(lambda: counted.append(1) or 400) == plan.sample_rate * 400
    given = plan_for(FedprivConfig().replace(**DISTRIBUTED, **{"privacy.distributed-batch": 123.0}))
    assert given.federation_normaliser(lambda: counted.append(1) or 400) == 123.0
    assert counted == [1]  # a deployment that names its batch never counts rows it does not have


def test_only_the_plan_calibrates_noise():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    callers = sorted(
        str(p.relative_to(root))
        for room in ("client", "server", "common", "simulation", "fedpriv")
        for p in (root / room).rglob("*.py")
        if "calibrate_noise(" in p.read_text(encoding="utf-8")
    )
    assert callers == ["common/privacy/accounting.py", "common/privacy/plan.py"]
