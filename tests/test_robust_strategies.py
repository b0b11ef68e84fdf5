"""Robust aggregation: one poisoned update among honest ones, through Flower's real strategies."""

import numpy as np
import pytest

from fedpriv.client.budget import SiteBudget
from fedpriv.common.config import ConfigError, FedprivConfig
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.wire import protocol
from fedpriv.common.wire.protocol import TrainReply
from fedpriv.server.strategy import build_strategy
from tests.test_admission import record, reply

HONEST = 5


def replies(tmp_path, poison: float) -> list:
    rng = np.random.default_rng(0)
    out = []
    for i in range(HONEST + 1):
        update = {"w": (1.0 + 0.01 * rng.standard_normal((2, 3))).astype(np.float32), "b": np.zeros(3, np.float32)}
        if i == HONEST:
            update["w"] = np.full((2, 3), poison, np.float32)  # the hostile site
        budget = SiteBudget(Ledger(tmp_path / f"s{i}.jsonl", signing.generate()), f"d{i}", 8.0, 1e-5, "rdp")
        metrics = {protocol.NUM_EXAMPLES: 40, protocol.SITE_WEIGHT: 1, protocol.EPSILON: 0.5}
        out.append(reply(TrainReply.trained(f"site-{i}", update, metrics, record(budget, update)).to_content()))
    return out


def aggregate(name: str, messages) -> np.ndarray:
    config = FedprivConfig().replace(**{"strategy.name": name, "strategy.min-sites": HONEST + 1})
    arrays, _ = build_strategy(config).aggregate_train(1, messages)
    return arrays.to_numpy_ndarrays()[list(arrays.keys()).index("w")]


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum"])
def test_a_robust_strategy_keeps_one_poisoned_update_out(name, tmp_path):
    messages = replies(tmp_path, poison=1e3)
    assert np.abs(aggregate("fedavg", messages) - 1.0).max() > 100  # the plain mean is dragged away
    assert np.abs(aggregate(name, messages) - 1.0).max() < 0.05


def test_robust_strategies_refuse_settings_they_cannot_honour():
    base = FedprivConfig()
    with pytest.raises(ConfigError, match="secure aggregation shows only their sum"):
        base.replace(**{"strategy.name": "fedmedian", "privacy.secure-aggregation": True})
    with pytest.raises(ConfigError, match="site-level DP"):
        base.replace(**{"strategy.name": "krum", "privacy.site-level-noise": 1.0, "strategy.min-sites": 5})
    with pytest.raises(ConfigError, match="krum with 2 needs strategy.min-sites >= 7"):
        base.replace(**{"strategy.name": "krum", "strategy.malicious-sites": 2, "strategy.min-sites": 6})
