"""Flower message-API strategies, configured from the run config."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from fedpriv.common import flower_compat
from fedpriv.common.config import FedprivConfig
from fedpriv.common.wire.protocol import ARRAYS, CONFIG, EPSILON, NUM_EXAMPLES, SITE_WEIGHT


def aggregate_site_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted means of the sites' metrics; the largest epsilon; total examples.

    Flower's default would average epsilons, which means nothing: a
    federation's privacy is that of its worst-off site.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    weights = np.array([_number(m[weight_key]) for m in metrics])
    out: dict[str, int | float | list[int] | list[float]] = {weight_key: int(weights.sum())}
    keys = set().union(*(m.keys() for m in metrics)) - {weight_key, SITE_WEIGHT}
    for key in sorted(keys):
        values = np.array([_number(m[key]) if key in m else math.nan for m in metrics])
        if key == EPSILON:
            out[key] = float(np.max(values))
        elif weights.sum() > 0 and np.isfinite(values).all():
            out[key] = float(np.average(values, weights=weights))
    return MetricRecord(out)


def _number(value: int | float | list[int] | list[float]) -> float:
    if isinstance(value, list):
        raise TypeError(f"a site's metric is a list ({value!r}), not a number")
    return float(value)


def build_strategy(config: FedprivConfig) -> Strategy:
    strategy = _base_strategy(config)
    if config.privacy.site_level_noise > 0:
        from fedpriv.server import site_level_dp

        strategy = site_level_dp.wrap(strategy, config)
    return strategy


def _base_strategy(config: FedprivConfig) -> Strategy:
    s = config.strategy
    # Site-level DP bounds each *site's* influence: every site weighs the same.
    weight = SITE_WEIGHT if config.privacy.site_level_noise > 0 else NUM_EXAMPLES
    common: dict[str, Any] = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_sites,
        min_evaluate_nodes=s.min_sites if s.fraction_evaluate > 0 else 0,
        min_available_nodes=s.min_sites,
        weighted_by_key=weight,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
        train_metrics_aggr_fn=aggregate_site_metrics,
        evaluate_metrics_aggr_fn=aggregate_site_metrics,
    )
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if s.name == "fedadam":
        return FedAdam(eta=s.server_learning_rate, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau, **common)
    if s.name == "fedmedian":
        return FedMedian(**common)
    if s.name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=s.trim_fraction, **common)
    if s.name == "krum":
        return Krum(num_malicious_nodes=s.malicious_sites, **common)
    raise ValueError(f"strategy.name: unknown strategy '{s.name}'")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The parts of a strategy that must survive a restart (FedAdam's moments)."""
    return {
        f"{name}/{key}": np.asarray(value)
        for name, values in flower_compat.adam_moments(strategy).items()
        for key, value in values.items()
    }


def restore_strategy(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    moments: dict[str, dict] = {}
    for key, value in state.items():
        name, _, param = key.partition("/")
        moments.setdefault(name, {})[param] = value
    flower_compat.set_adam_moments(strategy, moments)
