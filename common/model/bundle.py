"""Building the classifier for a fine-tuning mode, and moving its federated state.

Only the *federated state* travels between a site and the aggregator: the
trainable weights (classifier, LoRA adapters, or everything in `full` mode)
plus the fixed feature centre. The frozen base never leaves the machine.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, TextDataset
from fedpriv.common.model.batching import PadCollator, encode, length_batches
from fedpriv.common.model.features import FeatureCache, model_fingerprint
from fedpriv.common.model.finetune_modes import FineTuningMode, ModelError, Prepared, fine_tuning_mode
from fedpriv.common.model.modeling_fedpriv import FedprivClassifierConfig, FedprivForSequenceClassification
from fedpriv.common.resources import resolve_model

__all__ = ["CENTER", "ModelBundle", "ModelError", "Prepared", "build_model", "default_device", "label_name_state"]

CENTER = "norm.center"


def default_device() -> torch.device:
    wanted = os.environ.get("FEDPRIV_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ModelBundle:
    """The resident model of a worker: built once, its federated state swapped per call."""

    model: FedprivForSequenceClassification
    tokenizer: Any  # a transformers tokenizer
    tuning: FineTuningMode
    max_length: int
    fingerprint: str
    device: torch.device
    cache: FeatureCache | None = None
    _names: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.tuning.name

    # -- federated state ------------------------------------------------

    @property
    def state_names(self) -> list[str]:
        if not self._names:
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]
            self._names = names + [CENTER]
        return self._names

    @property
    def trainable_names(self) -> list[str]:
        """The state entries training changes, in a fixed order: the layout of a securely aggregated vector."""
        return [n for n in self.state_names if n != CENTER]

    @property
    def trainable_size(self) -> int:
        """Numbers in the securely aggregated vector."""
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n in self.trainable_names)

    def get_state(self) -> dict[str, np.ndarray]:
        tensors = dict(self.model.named_parameters())
        tensors[CENTER] = self.model.norm.center
        return {n: tensors[n].detach().cpu().numpy().copy() for n in self.state_names}

    def set_state(self, state: Mapping[str, np.ndarray]) -> None:
        expected = set(self.state_names)
        if set(state) != expected:
            missing = sorted(expected - set(state))[:3]
            extra = sorted(set(state) - expected)[:3]
            raise ModelError(
                f"federated state does not fit this model (mode={self.mode}): missing {missing}, unexpected {extra}"
            )
        tensors = dict(self.model.named_parameters())
        tensors[CENTER] = self.model.norm.center
        with torch.no_grad():
            for name in self.state_names:
                value = torch.as_tensor(np.asarray(state[name]))
                if value.shape != tensors[name].shape:
                    raise ModelError(
                        f"federated state '{name}': shape {tuple(value.shape)}, model has {tuple(tensors[name].shape)}"
                    )
                tensors[name].copy_(value)

    # -- data ---------------------------------------------------------------

    def prepare(self, data: TextDataset) -> Prepared:
        labels = torch.as_tensor(data.labels, dtype=torch.long)
        return self.tuning.prepare(self, labels, encode(self.tokenizer, data.texts, self.max_length))

    @torch.no_grad()
    def embed(self, token_ids: list[list[int]], batch_size: int = 128) -> torch.Tensor:
        """Pooled embeddings of the frozen encoder (before the feature norm)."""
        encoder_mode = self.model.training
        self.model.eval()
        collate = PadCollator(self.tokenizer.pad_token_id or 0)
        out = torch.zeros((len(token_ids), self.model.config.encoder.hidden_size))
        for rows in length_batches(token_ids, batch_size):
            batch = collate([(token_ids[i], 0) for i in rows])
            pooled = self.model.embed(
                batch["input_ids"].to(self.device),
                batch["attention_mask"].to(self.device),
                batch["token_type_ids"].to(self.device),
                batch["position_ids"].to(self.device),
            )
            out[rows] = pooled.float().cpu()
        self.model.train(encoder_mode)
        return out

    def trainable_module(self) -> nn.Module:
        """What DP-SGD wraps: the head alone in `head` mode, else the whole model."""
        return self.tuning.trainable_module(self.model)

    def logits(self, module: nn.Module, batch) -> torch.Tensor:
        return self.tuning.logits(module, batch, self.device)

    def targets(self, batch) -> torch.Tensor:
        return self.tuning.targets(batch)

    def collate_fn(self):
        return self.tuning.collate_fn(self.tokenizer)

    @torch.no_grad()
    def evaluate(self, prepared: Prepared, batch_size: int = 256) -> dict[str, float]:
        """Loss and accuracy of the current weights on a prepared dataset."""
        if len(prepared) == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "num-examples": 0}
        was_training = self.model.training
        self.model.eval()
        module = self.trainable_module()
        total_loss, correct = 0.0, 0
        for batch in self.tuning.eval_batches(prepared, self.tokenizer, batch_size):
            logits = self.logits(module, batch)
            target = self.targets(batch).to(self.device)
            total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
        self.model.train(was_training)
        return {"loss": total_loss / len(prepared), "accuracy": correct / len(prepared), "num-examples": len(prepared)}

    # -- export ---------------------------------------------------------------

    def export(self, directory: str | Path) -> Path:
        """A plain transformers model dir: base + merged adapters + head + label map."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        self.tuning.exportable(self.model).save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory


def build_model(
    config: FedprivConfig,
    labels: LabelSet,
    *,
    device: torch.device | None = None,
    cache: FeatureCache | None = None,
) -> ModelBundle:
    from transformers import AutoModel, AutoTokenizer

    tuning = fine_tuning_mode(config.model.mode)
    source = resolve_model(config.model.name)
    try:
        # Never the network: a site is offline, and a model must not change under a run.
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        base = AutoModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"model.name: cannot load '{config.model.name}' ({source}): {error}") from None
    device = device or default_device()
    hf_config = FedprivClassifierConfig(
        encoder=base.config.to_dict(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels.names)),
        label2id=labels.index,
        feature_scale=config.model.feature_scale,
        canary_inputs=config.simulation.audit_canaries,
    )
    model = FedprivForSequenceClassification(hf_config)
    model.encoder = base
    model.to(device)  # before peft: adapters created off-device corrupt DP updates (opacus#820)
    tuning.configure(model, config.model, tokenizer, device)
    # Dropout would make cached features and per-round evaluation inconsistent;
    # DP noise already regularises.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    return ModelBundle(
        model=model,
        tokenizer=tokenizer,
        tuning=tuning,
        max_length=config.data.max_length,
        fingerprint=model_fingerprint(source, config.data.max_length),
        device=device,
        cache=cache,
    )


@torch.no_grad()
def label_name_state(bundle: ModelBundle, labels: LabelSet) -> dict[str, np.ndarray]:
    """Initial state from public information only: the label names.

    The centre is the mean embedding of the names and each class starts at its
    name's normalised embedding, a zero-shot classifier that DP training refines.
    """
    names = [name.replace("_", " ").replace("-", " ") for name in labels.names]
    pooled = bundle.embed(encode(bundle.tokenizer, names, bundle.max_length))
    unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    center = unit.mean(dim=0)
    bundle.model.norm.center.copy_(center)
    # Rows are the names' features: logits start as scale^2 x cosine similarity.
    weight = bundle.model.classifier.weight
    weight.zero_()  # a white-box audit's canary inputs (if any) start at zero
    weight[:, : pooled.shape[1]].copy_(bundle.model.norm(pooled))
    bundle.model.classifier.bias.zero_()
    return bundle.get_state()


def initial_state(bundle: ModelBundle, labels: LabelSet, head_init: str) -> dict[str, np.ndarray]:
    """A run's starting weights, from public information only (label names), never site data."""
    state = label_name_state(bundle, labels)
    if head_init == "zeros":
        state["classifier.weight"] = np.zeros_like(state["classifier.weight"])
    return state
