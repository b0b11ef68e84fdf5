"""The federated state, and the exported model in plain transformers."""

import json

import numpy as np
import pytest
import torch

from fedpriv.client.training import LocalPlan, train_local
from fedpriv.common.data import LabelSet, TextDataset
from fedpriv.common.model.bundle import CENTER, ModelError, build_model, label_name_state
from fedpriv.common.model.finetune_modes import fine_tuning_mode
from tests.helpers import LABELS, easy_rows

LABEL_SET = LabelSet(tuple(LABELS))
TEXTS = ["my card expired", "the atm kept my cash", "wire to a new payee", "why is it not today"]


def trained_bundle(tiny_config, mode):
    bundle = build_model(tiny_config.replace(**{"model.mode": mode}), LABEL_SET)
    label_name_state(bundle, LABEL_SET)
    rows = easy_rows(60)
    data = TextDataset([t for t, _ in rows], np.array([LABELS.index(c) for _, c in rows]), "easy")
    lr = 20.0 if mode == "head" else 1e-2
    train_local(
        bundle,
        bundle.prepare(data),
        LocalPlan(steps=5, sample_rate=0.5, optimizer="sgd" if mode == "head" else "adamw", learning_rate=lr),
        dp=None,
        seed=0,
    )
    return bundle


@torch.no_grad()
def bundle_logits(bundle, texts):
    tok = bundle.tokenizer(texts, padding=True, return_tensors="pt")
    bundle.model.eval()
    return bundle.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).logits


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_export_reloads_in_plain_transformers_with_same_predictions(tiny_config, tmp_path, mode):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    bundle = trained_bundle(tiny_config, mode)
    expected = bundle_logits(bundle, TEXTS)
    directory = bundle.export(tmp_path / "model")

    model = AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert not any("lora" in n for n, _ in model.named_parameters())  # adapters merged

    classify = pipeline("text-classification", model=str(directory), trust_remote_code=True)
    predictions = classify(TEXTS)
    assert [p["label"] for p in predictions] == [LABELS[i] for i in expected.argmax(-1).tolist()]


def test_only_trainable_weights_and_centre_travel(tiny_config):
    head = build_model(tiny_config, LABEL_SET)
    assert head.state_names == ["classifier.weight", "classifier.bias", CENTER]
    lora = build_model(tiny_config.replace(**{"model.mode": "lora"}), LABEL_SET)
    names = lora.state_names
    assert all("lora_" in n or n.startswith("classifier") or n == CENTER for n in names)
    assert any("lora_A" in n for n in names)
    encoder_size = sum(p.numel() for p in lora.model.encoder.parameters())
    sent = sum(v.size for v in lora.get_state().values())
    assert sent < 0.1 * encoder_size


def test_state_round_trip_and_mismatch_is_refused(tiny_config):
    bundle = build_model(tiny_config, LABEL_SET)
    state = {k: np.random.default_rng(0).normal(size=v.shape).astype(v.dtype) for k, v in bundle.get_state().items()}
    bundle.set_state(state)
    assert all(np.array_equal(bundle.get_state()[k], v) for k, v in state.items())
    with pytest.raises(ModelError, match="does not fit this model"):
        bundle.set_state({"classifier.weight": state["classifier.weight"]})
    bad = dict(state, **{"classifier.bias": np.zeros(7, dtype=np.float32)})
    with pytest.raises(ModelError, match="classifier.bias': shape"):
        bundle.set_state(bad)


def test_label_name_initialisation_is_a_zero_shot_classifier(tiny_config):
    bundle = build_model(tiny_config, LABEL_SET)
    state = label_name_state(bundle, LABEL_SET)
    assert np.abs(state["classifier.weight"]).sum() > 0
    # A text that is just a label's name is classified as that label.
    logits = bundle_logits(bundle, LABELS)
    assert logits.argmax(-1).tolist() == [0, 1, 2]


def test_unknown_model_is_a_named_error(tiny_config, tmp_path):
    with pytest.raises(ModelError, match="model.name: cannot load"):
        build_model(tiny_config.replace(**{"model.name": str(tmp_path / "no-model")}), LABEL_SET)


def test_each_mode_is_one_class_chosen_by_name(tiny_config, tmp_path):
    head, lora, full = (fine_tuning_mode(name) for name in ("head", "lora", "full"))
    assert (head.grad_sample_mode, lora.grad_sample_mode, full.grad_sample_mode) == ("ghost", "hooks", "bookkeeping")
    assert not head.rand_on_empty and lora.rand_on_empty and full.rand_on_empty
    with pytest.raises(ModelError, match="model.mode: unknown mode 'prefix'"):
        fine_tuning_mode("prefix")

    bundle = build_model(tiny_config.replace(**{"model.mode": "full"}), LABEL_SET)
    assert bundle.tuning is full and bundle.mode == "full"
    assert not any("pooler" in n for n in bundle.state_names)  # unused by the classifier: frozen
    assert any(n.startswith("encoder.") for n in bundle.state_names)
    data = bundle.prepare(TextDataset(TEXTS, np.array([0, 2, 1, 0]), "t"))
    assert data.features is None and len(data.token_ids) == 4
    assert bundle.evaluate(data)["num-examples"] == 4

    # The exported config is the classifier's own, not fedpriv's run config.
    config = json.loads((build_model(tiny_config, LABEL_SET).export(tmp_path / "m") / "config.json").read_text())
    assert config["model_type"] == "fedpriv-classifier"
    assert config["auto_map"]["AutoConfig"] == "modeling_fedpriv.FedprivClassifierConfig"
