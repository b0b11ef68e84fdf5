"""The white-box empirical audit: canary inputs, what the aggregator records, the four tests, real runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedpriv.audit import white_box
from fedpriv.common.data import LabelSet
from fedpriv.common.model.bundle import build_model, label_name_state
from fedpriv.common.model.canaries import GradientCanaries
from fedpriv.common.model.features import FeatureCache
from fedpriv.simulation import gradient_audit

DISTRIBUTED = {
    "privacy.secure-aggregation": True,
    "privacy.noise": "distributed",
    "train.sample-rate": 0.5,
    "train.learning-rate": 2.0,
}


def _per_example_grads(head, features, labels):
    grads = []
    for x, y in zip(features, labels, strict=True):
        head.zero_grad()
        torch.nn.functional.cross_entropy(head(x[None]), y[None]).backward()
        grads.append(head.classifier.weight.grad.clone())
    return grads


def test_canary_inputs_take_nothing_from_text_and_give_nothing_to_it(tiny_config, tmp_path):
    labels = LabelSet.load(tiny_config.data.labels)
    plain = build_model(tiny_config, labels, cache=FeatureCache(tmp_path))
    audited = build_model(tiny_config.replace(**{"simulation.audit-canaries": 5}), labels, cache=FeatureCache(tmp_path))
    hidden = plain.model.config.encoder.hidden_size
    state = label_name_state(plain, labels)
    audit_state = label_name_state(audited, labels)
    assert audit_state["classifier.weight"].shape == (len(labels), hidden + 5)
    assert np.array_equal(audit_state["classifier.weight"][:, :hidden], state["classifier.weight"])
    assert not audit_state["classifier.weight"][:, hidden:].any()
    with torch.no_grad():
        audited.model.classifier.weight[:, hidden:] = torch.randn(len(labels), 5)  # canary weights that trained
    text = torch.randn(4, hidden)
    canaries = GradientCanaries(labels=np.array([0, 1, 2, 0, 1]), included=np.array([True, True, False, True, False]))
    rows, canary_labels = canaries.rows(hidden)
    assert rows.shape == (3, hidden + 5) and rows[:, :hidden].abs().sum() == 0
    assert rows[torch.arange(3), hidden + torch.tensor([0, 1, 3])].eq(canaries.scale).all()
    head = audited.trainable_module()
    # Text predicts as without canary inputs, given as the embedding alone or padded with zeros.
    expected = plain.trainable_module()(text)
    assert torch.allclose(head(text), expected, atol=1e-6)
    assert torch.allclose(head(torch.cat([text, torch.zeros(4, 5)], 1)), expected, atol=1e-6)
    # A text row's gradient is zero on every canary weight; a canary's is zero on every text weight and on
    # every other canary's.
    for grad in _per_example_grads(head, torch.cat([text, torch.zeros(4, 5)], 1), torch.tensor([0, 1, 2, 0])):
        assert grad[:, hidden:].abs().sum() == 0 and grad[:, :hidden].abs().sum() > 0
    for grad, j in zip(_per_example_grads(head, rows, canary_labels), (0, 1, 3), strict=True):
        assert grad[:, :hidden].abs().sum() == 0
        others = [i for i in range(5) if i != j]
        assert grad[:, hidden + j].abs().sum() > 0 and grad[:, [hidden + i for i in others]].abs().sum() == 0


def test_the_canary_file_round_trips_and_a_bad_one_is_named(tmp_path):
    made = GradientCanaries.draw(300, 7, seed=3, scale=1.5)
    made.save(tmp_path / "c.safetensors")
    again = GradientCanaries.load(tmp_path / "c.safetensors")
    assert np.array_equal(again.labels, made.labels) and np.array_equal(again.included, made.included)
    assert again.scale == 1.5 and 0.4 < made.included.mean() < 0.6
    (tmp_path / "bad.safetensors").write_text("no")
    with pytest.raises(white_box.FedprivError, match="bad.safetensors"):
        GradientCanaries.load(tmp_path / "bad.safetensors")


def test_the_gaussian_conversion_and_the_trade_off_curves():
    # mu-GDP at the epsilon it gives: delta(epsilon) equals the delta asked for.
    for mu in (0.5, 1.0, 3.0):
        eps = white_box.gdp_epsilon(mu, 1e-5)
        from scipy.stats import norm

        delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert delta == pytest.approx(1e-5, rel=1e-4)
    assert white_box.gdp_epsilon(0.0, 1e-5) == 0.0
    alpha = np.linspace(0, 1, 11)
    curve = white_box.claim_tradeoff(1.0, 0.0, alpha)
    assert curve[0] == 1.0 and curve[-1] == 0.0 and np.all(np.diff(curve) <= 0)
    assert np.all(white_box.claim_tradeoff(0.0, 0.0, alpha) == pytest.approx(1 - alpha))
    # Perfectly separated scores reach the corner the claim forbids.
    scores = np.array([0.0] * 50 + [10.0] * 50)
    included = np.array([False] * 50 + [True] * 50)
    assert (0.0, 0.0) in white_box.tradeoff_points(scores, included)


def test_the_audit_refuses_what_it_cannot_test(tiny_config, tmp_path):
    with pytest.raises(white_box.WhiteBoxError, match="model.mode"):
        gradient_audit.white_box_audit(tiny_config.replace(**{"model.mode": "lora"}), tmp_path / "a")
    with pytest.raises(white_box.WhiteBoxError, match="privacy.enabled"):
        gradient_audit.white_box_audit(tiny_config.replace(**{"privacy.enabled": False}), tmp_path / "a")
    with pytest.raises(white_box.WhiteBoxError, match="momentum"):
        gradient_audit.white_box_audit(tiny_config.replace(**{"train.momentum": 0.9}), tmp_path / "a")
    with pytest.raises(white_box.WhiteBoxError, match="--fault"):
        gradient_audit.white_box_audit(tiny_config, tmp_path / "a", fault="skip-everything")
    with pytest.raises(white_box.WhiteBoxError, match="--site"):
        gradient_audit.white_box_audit(tiny_config, tmp_path / "a", site=3)
    assert not (tmp_path / "a").exists()


def _config_file(config, path):
    import tomli_w

    path.write_text(tomli_w.dumps(config.model_dump(by_alias=True)), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_an_honest_distributed_run_passes_and_every_number_is_recomputed_from_its_files(tiny_config, tmp_path):
    from fedpriv.cli import app

    config = tiny_config.replace(**{**DISTRIBUTED, "rounds": 12})
    out = tmp_path / "audit"
    result = CliRunner().invoke(
        app,
        ["audit", "--empirical", "-c", _config_file(config, tmp_path / "run.toml"), "--canaries", "300", "--seed", "5"]
        + ["-o", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / gradient_audit.RESULT).read_text())
    assert saved["refuted"] is False and saved["kind"] == "sum" and saved["rounds"] == 12
    assert saved["claimed"] == pytest.approx(8.0, rel=0.01)
    assert 0 <= saved["lower_bound"] < saved["claimed"]
    # The noise in the canary weights is what the three shares add up to, the claim needs 2 of them.
    assert abs(saved["noise_ratio"] - 1) < 5 * saved["noise_ratio_se"]
    assert saved["needed_ratio"] == pytest.approx(2 / 3, rel=1e-3)
    assert saved["implied_epsilon"] < saved["claimed"]
    # A clipped canary moves the sum by its limit each time it is sampled.
    assert abs(saved["move_per_sampling"] - saved["move_limit"]) < 5 * saved["move_se"]
    assert len(list((out / "run" / "canary-observations").glob("round-*.safetensors"))) == 12
    assert "canary scores against the claim" in (out / gradient_audit.REPORT).read_text()
    again = gradient_audit.recompute(out)
    assert again.to_json() == {**saved, "fault": None, "seed": 5}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("noise", "fault", "epsilon", "finding"),
    [
        ("distributed", "noise/3", 1.0, "noise check"),
        ("distributed", "skip-noise", 8.0, "a site added less noise than it recorded"),
        ("local", "skip-clipping", 8.0, "clip check"),
        ("local", "skip-noise", 8.0, "a site added less noise than it recorded"),
    ],
)
def test_a_broken_run_is_refuted_by_the_test_that_sees_its_fault(tiny_config, tmp_path, noise, fault, epsilon, finding):
    config = tiny_config.replace(**{"rounds": 10, "privacy.target-epsilon": epsilon})
    if noise == "distributed":
        config = config.replace(**DISTRIBUTED)
    result = gradient_audit.white_box_audit(config, tmp_path / "audit", canaries=300, seed=2, fault=fault)
    assert result.refuted and any(finding in p for p in result.problems), result.problems
    assert result.claimed == pytest.approx(epsilon, rel=0.01)  # the ledger claims the planned release
