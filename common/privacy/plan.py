"""A run's privacy plan: what its settings mean for noise, steps, normalisers and learning rate, in one place.

Sites (plain and secure rounds, evaluations), the aggregator (its step under
distributed noise), the simulation harness and the benchmarks all read these
numbers from one `PrivacyPlan`, built once from the settings, so a site and
the aggregator can never disagree on what sigma, normaliser or step count the
settings imply. A site still checks every release against its own policy and
budget: the plan says what the settings ask for, not what the site allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fedpriv.common.config import FedprivConfig
from fedpriv.common.privacy.accounting import calibrate_noise, dp_event, steps_per_round
from fedpriv.common.privacy.records import Mechanism

# Secure aggregation's fixed-point encoding: a grid of 2^-20, values up to 2^20 in size.
ENCODING_SCALE = 2.0**20
ENCODING_BOUND = 2**40
# A noised evaluation releases two counts (correct, total); one row moves each by at most 1.
EVALUATION_SENSITIVITY = math.sqrt(2)

# The tuned optimizer and learning rate of each fine-tuning mode ('auto' / 0 in the settings; bench/README.md):
# plain SGD suits the DP linear head on normalised features; adapters and full fine-tuning need Adam's
# per-weight scale.
_MODE_OPTIMIZERS = {"head": ("sgd", 20.0), "lora": ("adamw", 2e-3), "full": ("adamw", 5e-5)}
# Distributed noise: the aggregator steps along the federation's average over a batch ten times a
# site's, so each step is less noisy and takes a larger rate (Banking77: 91.3% at 40 vs 89.7% at 20).
_DISTRIBUTED_RATES = {"head": 40.0}
_PLANS_KEPT = 64


@dataclass(frozen=True)
class PrivacyPlan:
    """What the settings ask of every site and of the aggregator; see `plan_for`."""

    enabled: bool
    distributed: bool  # secure aggregation with distributed noise: a round is one DP-SGD step over the pooled data
    rounds: int
    sample_rate: float
    local_steps: int  # DP-SGD steps a site takes in a round with local noise
    max_grad_norm: float
    delta: float
    accountant: str
    target_epsilon: float
    given_noise_multiplier: float  # 0: calibrated to the target
    evaluation_noise: float  # std of the noise on each count of a noised evaluation
    evaluation_rounds: tuple[int, ...]  # rounds with a federated evaluation
    noised_evaluations: bool
    distributed_batch: float  # the federation's public expected batch (0: sample rate x the public dataset)
    optimizer: str
    learning_rate: float

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps one round releases at a site: one under distributed noise."""
        return 1 if self.distributed else self.local_steps

    @property
    def planned_evaluations(self) -> tuple:
        """The evaluation releases a private run plans, as accounting events (none unless noised)."""
        if not (self.enabled and self.noised_evaluations):
            return ()
        event = dp_event(self.evaluation_mechanism(0))
        return tuple(event for _ in self.evaluation_rounds)

    @cached_property
    def noise_multiplier(self) -> float:
        """Local noise: given, or just enough for the target epsilon after every round and planned evaluation."""
        if self.given_noise_multiplier > 0:
            return self.given_noise_multiplier
        return calibrate_noise(
            self.target_epsilon,
            self.delta,
            self.sample_rate,
            self.local_steps * self.rounds,
            self.accountant,
            self.planned_evaluations,
        )

    def distributed_noise_multiplier(self, length: int) -> float:
        """Sigma of the sum under distributed noise, for an update of `length` numbers.

        Given, or just enough that the accounted sigma meets the target after
        one step a round and the planned evaluations; the encoding's grid adds
        up to sqrt(length)/scale to the sensitivity, so sigma grows with it.
        """
        if self.given_noise_multiplier > 0:
            return self.given_noise_multiplier
        sigma = calibrate_noise(
            self.target_epsilon, self.delta, self.sample_rate, self.rounds, self.accountant, self.planned_evaluations
        )
        return sigma * (self.max_grad_norm + math.sqrt(length) / ENCODING_SCALE) / self.max_grad_norm

    def site_normaliser(self, declared_rows: int) -> float:
        """What a site divides its noisy gradient sum by: sample rate x its declared (public) rows.

        Opacus would divide by sample rate x the true row count, which differs
        between neighbouring datasets and so leaks (opacus#571, #819).
        """
        return self.sample_rate * declared_rows

    def federation_normaliser(self, public_rows: Callable[[], int]) -> float:
        """What the aggregator divides the noisy sum by under distributed noise: the federation's public batch.

        `privacy.distributed-batch` when set (a deployment: its sites' sizes are theirs), else sample rate x
        the simulation's public row count, which `public_rows` counts only then.
        """
        return self.distributed_batch if self.distributed_batch > 0 else self.sample_rate * public_rows()

    def evaluation_mechanism(self, rows: int) -> Mechanism:
        """One noised evaluation: a Gaussian mechanism of multiplier std / sqrt(2) on the two counts."""
        return Mechanism(
            kind="gaussian",
            noise_multiplier=self.evaluation_noise / EVALUATION_SENSITIVITY,
            sample_rate=1.0,
            steps=1,
            max_grad_norm=EVALUATION_SENSITIVITY,
            dataset_size=rows,
            query="evaluation",
        )


def plan_for(config: FedprivConfig) -> PrivacyPlan:
    """The plan of these settings; built once per distinct settings (calibration takes a second or so)."""
    key = config.model_dump_json()
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _build(config)
        while len(_plans) > _PLANS_KEPT:
            _plans.pop(next(iter(_plans)))
    return plan


_plans: dict[str, PrivacyPlan] = {}


def _build(config: FedprivConfig) -> PrivacyPlan:
    p, t = config.privacy, config.train
    return PrivacyPlan(
        enabled=p.enabled,
        distributed=p.enabled and p.noise == "distributed",
        rounds=config.rounds,
        sample_rate=t.sample_rate,
        local_steps=steps_per_round(t.local_epochs, t.sample_rate),
        max_grad_norm=p.max_grad_norm,
        delta=p.delta,
        accountant=p.accountant,
        target_epsilon=p.target_epsilon,
        given_noise_multiplier=p.noise_multiplier,
        evaluation_noise=p.evaluation_noise,
        evaluation_rounds=tuple(config.federated_evaluation_rounds()),
        noised_evaluations=p.evaluation == "noised",
        distributed_batch=p.distributed_batch,
        **_optimizer(config),
    )


def _optimizer(config: FedprivConfig) -> dict[str, Any]:
    name, rate = _MODE_OPTIMIZERS[config.model.mode]
    if config.privacy.enabled and config.privacy.noise == "distributed":
        rate = _DISTRIBUTED_RATES.get(config.model.mode, rate)
    if config.train.optimizer != "auto":
        name = config.train.optimizer
    return {"optimizer": name, "learning_rate": config.train.learning_rate or rate}
