"""A deployed site's own policy decides its privacy: every round type releases through one checked path.

The ClientApp's real train and evaluate functions are driven with messages
as the grid delivers them, at a site configured like a deployed one (its own
file, ledger, key and policy in its node config).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpriv.client import app as client_app
from fedpriv.client.runtime import WorkerRuntime
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.site_policy import PolicyError, SitePolicy
from fedpriv.common.wire.protocol import EXHAUSTED, OK, REFUSED, withheld
from tests.helpers import easy_rows, write_csv
from tests.test_runtime import context, train_message


@pytest.fixture
def deployed(tiny_config, tmp_path, monkeypatch):
    """A site's node config as its agent writes it, and a fresh worker for each test."""
    worker = WorkerRuntime()
    monkeypatch.setattr(client_app, "WORKER", worker)
    key = tmp_path / "ledger.key"
    signing.write_private_key(signing.generate(), key)
    node = {
        "data-path": str(write_csv(tmp_path / "site.csv", easy_rows(80, seed=4))),
        "site-name": "branch-1",
        "ledger-path": str(tmp_path / "ledger.jsonl"),
        "ledger-key": str(key),
        "epsilon-cap": 100.0,
        "delta": 1e-5,
        "declared-rows": 100,
        **SitePolicy().to_node_config(),
    }
    private = tiny_config.replace(
        **{"rounds": 50, "train.local-epochs": 1.0, "train.sample-rate": 0.2, "privacy.accountant": "pld"}
    )
    return node, private, worker


def _state(worker, node, config):
    return worker.site(context(config, node), config).model.get_state()


def _train(node, config, worker, server_round=1):
    return client_app.train(train_message(_state(worker, node, config), server_round), context(config, node))


def _releases(node) -> int:
    return len(Ledger(node["ledger-path"]).records())


def test_the_policy_travels_in_the_node_config_and_names_a_bad_key():
    policy = SitePolicy(min_noise_multiplier=0.8, modes=("head",), allow_non_private=True)
    node = policy.to_node_config()
    assert node["policy-modes"] == "head" and node["allow-non-private"] == "true"
    assert SitePolicy.from_node_config(node) == policy
    assert SitePolicy.from_node_config({}) == SitePolicy()  # an old agent's node config: the strict defaults
    for key, value, message in [
        ("policy-min-noise-multiplier", "inf", "policy-min-noise-multiplier: Value error, must be a finite number"),
        ("policy-max-release-epsilon", 0, "policy-max-release-epsilon: Input should be greater than 0"),
        ("policy-modes", "head,everything", "policy-modes"),
        ("allow-non-private", "yes", "allow-non-private: expected true or false"),
    ]:
        with pytest.raises(PolicyError, match=message):
            SitePolicy.from_node_config({key: value})


def test_a_round_within_the_policy_trains_and_records(deployed):
    node, config, worker = deployed
    reply = _train(node, config, worker)
    assert withheld(reply) is None and reply.content["site"]["status"] == OK
    assert _releases(node) == 1


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"privacy.enabled": False}, "training without DP and its policy allows no non-private release"),
        ({"privacy.noise-multiplier": 0.1}, "noise multiplier 0.1 is below its minimum 0.5"),
        ({"train.sample-rate": 1.0, "privacy.noise-multiplier": 0.6}, "(pld), above its per-release maximum 4"),
        ({"train.sample-rate": 1.0, "privacy.target-epsilon": 50.0, "rounds": 2}, "below its minimum 0.5"),
        ({"model.mode": "lora"}, None),  # accepted by the default policy: a control for the next case
    ],
)
def test_a_plain_round_that_would_weaken_the_policy_is_refused_before_training(deployed, changes, reason):
    node, config, worker = deployed
    reply = _train(node, config.replace(**changes), worker)
    if reason is None:
        assert withheld(reply) is None
        return
    status, said = withheld(reply)
    assert status == REFUSED and reason in said and said.startswith("branch-1 refuses")
    assert _releases(node) == 0  # never trained, nothing recorded


def test_modes_outside_the_policy_are_refused(deployed):
    node, config, worker = deployed
    node = {**node, **SitePolicy(modes=("head",)).to_node_config()}
    status, said = withheld(_train(node, config.replace(**{"model.mode": "full"}), worker))
    assert status == REFUSED and "model.mode full is not one it accepts (head)" in said


def test_allow_non_private_is_the_operators_word(deployed):
    node, config, worker = deployed
    node = {**node, "allow-non-private": "true"}
    reply = _train(node, config.replace(**{"privacy.enabled": False}), worker)
    assert withheld(reply) is None
    (record,) = Ledger(node["ledger-path"]).records()
    assert record.mechanism.noise_multiplier == 0 and record.accounting.epsilon is None  # recorded as no DP


def test_a_deployed_sites_cap_and_delta_are_its_own(deployed):
    from fedpriv.common.data import DataError

    node, config, worker = deployed
    generous = config.replace(**{"privacy.epsilon-cap": 1000.0, "privacy.delta": 0.5})
    for key in ("epsilon-cap", "delta"):
        partial = {k: v for k, v in node.items() if k != key}
        with pytest.raises(DataError, match=f"set {key} in its node config"):
            _train(partial, generous, worker)
    with pytest.raises(DataError, match="epsilon-cap must be a positive finite number, not 'inf'"):
        _train({**node, "epsilon-cap": "inf"}, config, worker)
    assert _releases(node) == 0


def test_the_budget_is_checked_after_the_policy(deployed):
    node, config, worker = deployed
    node = {**node, "epsilon-cap": 0.01}
    status, said = withheld(_train(node, config, worker))
    assert status == EXHAUSTED and "budget exhausted" in said
    assert _releases(node) == 0


def test_evaluation_releases_through_the_same_path(deployed):
    from tests.test_runtime import train_message as message

    node, config, worker = deployed
    state = _state(worker, node, config)

    def evaluate(cfg, node=node):
        msg = message(state, 3)
        msg.metadata.message_type = "evaluate"
        return client_app.evaluate(msg, context(cfg, node))

    status, said = withheld(evaluate(config.replace(**{"privacy.evaluation": "clear"})))
    assert status == REFUSED and "evaluation metrics without DP" in said
    status, said = withheld(evaluate(config))  # evaluation=off: this run planned none
    assert status == REFUSED and "planned no evaluation" in said
    assert _releases(node) == 0

    noised = config.replace(**{"privacy.evaluation": "noised"})
    reply = evaluate(noised)
    assert withheld(reply) is None and math.isfinite(reply.content["metrics"]["epsilon"])
    (record,) = Ledger(node["ledger-path"]).records()
    assert record.mechanism.query == "evaluation" and record.mechanism.noise_multiplier > 0

    # In the clear, with its operator's consent: recorded as a release without DP.
    reply = evaluate(config.replace(**{"privacy.evaluation": "clear"}), {**node, "allow-non-private": "true"})
    assert withheld(reply) is None
    last = Ledger(node["ledger-path"]).records()[-1]
    assert last.mechanism.query == "evaluation" and last.accounting.epsilon is None
    assert np.isclose(reply.content["metrics"]["num-examples"], last.mechanism.dataset_size)
