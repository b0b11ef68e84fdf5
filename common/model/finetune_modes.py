"""The fine-tuning modes: what trains, on what form of the data, and how DP-SGD wraps it.

`head` trains the classifier on cached features of the frozen encoder;
`lora` trains LoRA adapters and the classifier on token ids; `full` trains
every weight the classifier uses. Each mode is one class; `fine_tuning_mode`
picks it once by name and the model bundle delegates to it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedpriv.common.config import ModelConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common.model.batching import PadCollator, TokenDataset, encode, length_batches
from fedpriv.common.model.modeling_fedpriv import head_input

if TYPE_CHECKING:
    from fedpriv.common.model.bundle import ModelBundle
    from fedpriv.common.model.modeling_fedpriv import FedprivForSequenceClassification


class ModelError(FedprivError, RuntimeError):
    pass


@dataclass
class Prepared:
    """A dataset in the form the model trains on: pooled embeddings (head) or token ids."""

    labels: torch.Tensor
    features: torch.Tensor | None = None
    token_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> torch.utils.data.Dataset:
        if self.features is not None:
            return FeatureDataset(self.features, self.labels)
        assert self.token_ids is not None  # prepared as features or as tokens
        return TokenDataset(self.token_ids, self.labels)


class FeatureDataset(torch.utils.data.Dataset):
    """Cached embeddings fetched a whole batch at a time (one index op, not a stack of rows)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.features[i], self.labels[i]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.features[index], self.labels[index]


def _batched(batch):
    return batch  # FeatureDataset.__getitems__ already returns the stacked batch


class Head(nn.Module):
    """The trainable end of the model in `head` mode: features -> logits."""

    def __init__(self, model: FedprivForSequenceClassification):
        super().__init__()
        self.norm, self.classifier = model.norm, model.classifier
        self.hidden = model.config.encoder.hidden_size
        self.canary_inputs = model.config.canary_inputs

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(head_input(self.norm, pooled, self.hidden, self.canary_inputs))


class FineTuningMode:
    """What the modes share: token-id data through the whole model."""

    name: ClassVar[str]
    # Opacus' per-example gradient method: ghost clipping computes the norms
    # without materialising per-example gradients (a 77x384 head at batch 450
    # would be 13M numbers a step).
    grad_sample_mode: ClassVar[str] = "ghost"
    # An empty Poisson batch would crash a transformer; Opacus then feeds one
    # random, data-independent example instead (privacy unaffected).
    rand_on_empty: ClassVar[bool] = True
    # Logical batches are split into physical ones that fit in memory.
    physical_batching: ClassVar[bool] = True

    def configure(self, model: FedprivForSequenceClassification, config: ModelConfig, tokenizer, device) -> None:
        """Decides which weights train, once, when the resident model is built."""

    def prepare(self, bundle: ModelBundle, labels: torch.Tensor, token_ids: list[list[int]]) -> Prepared:
        return Prepared(labels, token_ids=token_ids)

    def trainable_module(self, model: FedprivForSequenceClassification) -> nn.Module:
        """What DP-SGD wraps."""
        return model

    def logits(self, module: nn.Module, batch, device: torch.device) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return module(**inputs).logits

    def targets(self, batch) -> torch.Tensor:
        return batch["labels"]

    def collate_fn(self, tokenizer):
        return PadCollator(tokenizer.pad_token_id or 0)

    def eval_batches(self, prepared: Prepared, tokenizer, batch_size: int):
        collate = self.collate_fn(tokenizer)
        token_ids = prepared.token_ids
        assert token_ids is not None  # this mode prepares tokens
        for rows in length_batches(token_ids, batch_size // 4 or 1):
            yield collate([(token_ids[i], int(prepared.labels[i])) for i in rows])

    def exportable(self, model: FedprivForSequenceClassification) -> FedprivForSequenceClassification:
        """The model as plain transformers loads it."""
        return model


class HeadMode(FineTuningMode):
    name = "head"
    rand_on_empty = False  # the head takes an empty batch of features
    physical_batching = False  # features are small: a logical batch fits at once

    def configure(self, model, config, tokenizer, device) -> None:
        model.encoder.requires_grad_(False)

    def prepare(self, bundle, labels, token_ids) -> Prepared:
        # The encoder never changes in this mode: its features are computed once (and cached on disk).
        features = bundle.cache.get(bundle.fingerprint, token_ids) if bundle.cache else None
        if features is None:
            features = bundle.embed(token_ids)
            if bundle.cache:
                bundle.cache.put(bundle.fingerprint, token_ids, features)
        return Prepared(labels, features=features)

    def trainable_module(self, model) -> nn.Module:
        return Head(model)

    def logits(self, module, batch, device) -> torch.Tensor:
        features, _ = batch
        return module(features.to(device))

    def targets(self, batch) -> torch.Tensor:
        return batch[1]

    def collate_fn(self, tokenizer):
        return _batched

    def eval_batches(self, prepared, tokenizer, batch_size):
        for i in range(0, len(prepared), batch_size):
            yield prepared.features[i : i + batch_size], prepared.labels[i : i + batch_size]


class LoraMode(FineTuningMode):
    name = "lora"
    grad_sample_mode = "hooks"  # per-example gradients of the adapters are small anyway

    def configure(self, model, config, tokenizer, device) -> None:
        from peft import LoraConfig, get_peft_model

        model.encoder.requires_grad_(False)
        targets = [t.strip() for t in config.lora_targets.split(",") if t.strip()]
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
        )
        try:
            model.encoder = get_peft_model(model.encoder, lora)
        except ValueError as error:
            raise ModelError(f"model.lora-targets: {error}") from None

    def exportable(self, model):
        merged = copy.deepcopy(model)
        merged.encoder = merged.encoder.merge_and_unload()
        return merged


class FullMode(FineTuningMode):
    name = "full"
    # One backward pass per step (client/bookkeeping.py) instead of ghost clipping's two.
    grad_sample_mode = "bookkeeping"

    def configure(self, model, config, tokenizer, device) -> None:
        """Freeze weights the classifier never uses (e.g. BERT's pooler).

        They would travel for nothing, and DP clipping needs a gradient for
        every trainable weight.
        """
        ids = torch.as_tensor([encode(tokenizer, ["probe"], 8)[0]], device=device)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids).logits.sum().backward()
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.requires_grad_(False)
        model.zero_grad(set_to_none=True)


MODES: dict[str, FineTuningMode] = {mode.name: mode() for mode in (HeadMode, LoraMode, FullMode)}


def fine_tuning_mode(name: str) -> FineTuningMode:
    try:
        return MODES[name]
    except KeyError:
        raise ModelError(f"model.mode: unknown mode '{name}' (one of {', '.join(MODES)})") from None
