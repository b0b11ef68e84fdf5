"""Local DP training with the real Opacus on a real (tiny) transformer."""

import numpy as np
import pytest
import torch

from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.data import LabelSet, TextDataset
from fedpriv.common.model.bundle import build_model, label_name_state
from fedpriv.common.privacy.accounting import RDP_ORDERS, calibrate_noise, epsilon, poisson_gaussian
from tests.helpers import LABELS, easy_rows

LABEL_SET = LabelSet(tuple(LABELS))


def dataset(n, seed=0):
    rows = easy_rows(n, seed)
    return TextDataset([t for t, _ in rows], np.array([LABELS.index(c) for _, c in rows]), "easy")


def bundle_for(tiny_config, mode):
    bundle = build_model(tiny_config.replace(**{"model.mode": mode}), LABEL_SET)
    label_name_state(bundle, LABEL_SET)
    return bundle


def per_example_clipped_sum(bundle, prepared, clip):
    """Sum over examples of each example's own gradient, clipped to `clip`, computed one by one."""
    module = bundle.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(prepared)):
        if prepared.features is not None:
            batch = (prepared.features[i : i + 1], prepared.labels[i : i + 1])
        else:
            batch = bundle.collate_fn()([(prepared.token_ids[i], int(prepared.labels[i]))])
        loss = torch.nn.functional.cross_entropy(bundle.logits(module, batch), bundle.targets(batch))
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return total


# full, 5: a logical batch of 12 split into physical batches of 5, 5 and 2, accumulated before the step.
@pytest.mark.parametrize(("mode", "physical"), [("head", 64), ("lora", 64), ("full", 64), ("full", 5)])
def test_per_example_clipping_holds(tiny_config, mode, physical):
    # With zero noise and q=1, one DP step must move the weights by exactly the
    # mean of the per-example gradients, each clipped to the norm: Opacus' hooks
    # against gradients computed one example at a time.
    bundle = bundle_for(tiny_config, mode)
    prepared = bundle.prepare(dataset(12))
    clip = 0.05
    module = bundle.trainable_module()
    params = [p for p in module.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    expected = per_example_clipped_sum(bundle, prepared, clip)
    plan = LocalPlan(steps=1, sample_rate=1.0, optimizer="sgd", learning_rate=1.0, max_physical_batch=physical)
    train_local(bundle, prepared, plan, dp=DpSettings(0.0, clip, normaliser=len(prepared)), seed=0)
    for b, p, e in zip(before, params, expected, strict=True):
        torch.testing.assert_close(b - p.detach(), e / len(prepared), atol=1e-6, rtol=1e-4)


def test_neighbouring_datasets_are_normalised_by_the_same_public_constant(tiny_config):
    # opacus#571/#819: Opacus divides the noisy sum by int(q x len(dataset)),
    # which differs between neighbours. With q=1 and no noise, the step is
    # exactly the clipped sum over the declared constant for both of them.
    clip, declared = 0.05, 20
    for rows in (12, 13):  # neighbours under add/remove
        bundle = bundle_for(tiny_config, "head")
        prepared = bundle.prepare(dataset(rows))
        params = [p for p in bundle.trainable_module().parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        expected = per_example_clipped_sum(bundle, prepared, clip)
        plan = LocalPlan(steps=1, sample_rate=1.0, optimizer="sgd", learning_rate=1.0)
        train_local(bundle, prepared, plan, dp=DpSettings(0.0, clip, normaliser=declared), seed=0)
        for b, p, e in zip(before, params, expected, strict=True):
            torch.testing.assert_close(b - p.detach(), e / declared, atol=1e-6, rtol=1e-4)


def test_dp_lora_update_is_nonzero_and_lowers_the_loss(tiny_config):
    # opacus#820: DP + PEFT LoRA can silently leave adapters untouched or corrupt them.
    bundle = bundle_for(tiny_config, "lora")
    prepared = bundle.prepare(dataset(240))
    state0 = bundle.get_state()
    loss0 = bundle.evaluate(prepared)["loss"]
    plan = LocalPlan(steps=40, sample_rate=0.25, optimizer="adamw", learning_rate=2e-2)
    result = train_local(bundle, prepared, plan, dp=DpSettings(0.8, 1.0, normaliser=60), seed=1)
    state1 = bundle.get_state()
    lora_b = [n for n in state0 if "lora_B" in n]
    assert lora_b, "no LoRA adapters were made trainable"
    assert all(np.abs(state1[n]).max() > 0 for n in lora_b), "LoRA B stayed zero: adapters never updated"
    assert all(np.isfinite(v).all() for v in state1.values())
    after = bundle.evaluate(prepared)
    assert result.steps == 40
    assert after["loss"] < 0.7 * loss0
    assert after["accuracy"] > 0.6  # chance is 1/3


def test_full_fine_tuning_with_bookkeeping_clipping_learns(tiny_config):
    bundle = bundle_for(tiny_config, "full")
    assert not any("pooler" in n for n in bundle.state_names)  # unused weights stay home
    prepared = bundle.prepare(dataset(120))
    loss0 = bundle.evaluate(prepared)["loss"]
    plan = LocalPlan(steps=15, sample_rate=0.3, optimizer="adamw", learning_rate=5e-3, max_physical_batch=16)
    result = train_local(bundle, prepared, plan, dp=DpSettings(0.5, 1.0, normaliser=36), seed=2)
    assert result.steps == 15
    assert bundle.evaluate(prepared)["loss"] < loss0


def test_full_fine_tuning_adds_the_planned_noise(tiny_config):
    # Book-keeping computes the clipped sum; Opacus' optimizer must still add N(0, (sigma C)^2) to every weight.
    sigma, clip, normaliser = 2.0, 0.5, 10.0
    steps = {}
    for noise in (0.0, sigma):
        bundle = bundle_for(tiny_config, "full")
        prepared = bundle.prepare(dataset(12))
        before = bundle.get_state()
        plan = LocalPlan(steps=1, sample_rate=1.0, optimizer="sgd", learning_rate=1.0)
        train_local(bundle, prepared, plan, dp=DpSettings(noise, clip, normaliser=normaliser), seed=0)
        after = bundle.get_state()
        steps[noise] = np.concatenate([(before[n] - after[n]).ravel() for n in bundle.trainable_names])
    noise = steps[sigma] - steps[0.0]
    assert len(noise) > 100_000
    assert abs(noise.std() / (sigma * clip / normaliser) - 1) < 0.01 and abs(noise.mean()) < 1e-3


def test_non_private_baseline_trains(tiny_config):
    bundle = bundle_for(tiny_config, "head")
    prepared = bundle.prepare(dataset(90))
    plan = LocalPlan(steps=60, sample_rate=0.3, optimizer="sgd", learning_rate=20.0)
    train_local(bundle, prepared, plan, dp=None, seed=0)
    assert bundle.evaluate(prepared)["accuracy"] > 0.9
    assert bundle.evaluate(bundle.prepare(dataset(90, seed=5)))["accuracy"] > 0.8  # and it generalises


def test_fedprox_pulls_towards_the_global_model(tiny_config):
    prepared = None
    distances = []
    for mu in (0.0, 0.05):
        bundle = bundle_for(tiny_config, "head")
        prepared = prepared or bundle.prepare(dataset(90))
        anchor = bundle.get_state()
        plan = LocalPlan(steps=20, sample_rate=0.3, optimizer="sgd", learning_rate=20.0, proximal_mu=mu)
        train_local(bundle, prepared, plan, dp=None, seed=0, anchor=anchor)
        after = bundle.get_state()
        distances.append(sum(float(np.sum((after[k] - anchor[k]) ** 2)) for k in anchor))
    assert distances[1] < 0.5 * distances[0]


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_agrees_with_opacus_accountant(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    reference = PRVAccountant() if accountant == "prv" else RDPAccountant()
    releases = [(1.1, 0.3, 10)] * 4 + [(2.0, 0.2, 5)]
    for sigma, rate, steps in releases:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=rate)
    kwargs = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
    ours = epsilon([poisson_gaussian(*r) for r in releases], 1e-5, accountant)
    assert ours == pytest.approx(reference.get_epsilon(delta=1e-5, **kwargs), rel=1e-3)


def test_pld_agrees_with_opacus_prv_within_one_percent():
    releases = [poisson_gaussian(1.1, 0.3, 10)] * 4 + [poisson_gaussian(2.0, 0.2, 5)]
    assert epsilon(releases, 1e-5, "pld") == pytest.approx(epsilon(releases, 1e-5, "prv"), rel=1e-2)


@pytest.mark.parametrize("accountant", ["pld", "prv", "rdp"])
def test_calibrated_noise_meets_the_target_without_overshooting(accountant):
    sigma = calibrate_noise(8.0, 1e-5, 0.3, 100, accountant)
    spent = epsilon([poisson_gaussian(sigma, 0.3, 100)], 1e-5, accountant)
    assert 7.8 < spent <= 8.0
    assert epsilon([poisson_gaussian(sigma, 0.3, 10)] * 10, 1e-5, accountant) == pytest.approx(spent)


def test_calibration_leaves_room_for_planned_evaluation_releases():
    evaluations = (poisson_gaussian(20.0, 1.0, 4),)
    alone = calibrate_noise(8.0, 1e-5, 0.3, 100)
    sigma = calibrate_noise(8.0, 1e-5, 0.3, 100, "pld", evaluations)
    assert sigma > alone
    assert 7.8 < epsilon([poisson_gaussian(sigma, 0.3, 100), *evaluations], 1e-5) <= 8.0
    with pytest.raises(ValueError, match="privacy.target-epsilon"):
        calibrate_noise(0.5, 1e-5, 0.3, 100, "pld", (poisson_gaussian(1.0, 1.0, 4),))
