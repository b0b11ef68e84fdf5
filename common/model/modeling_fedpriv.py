"""A text classifier: any Hugging Face encoder, mean pooling, a linear head.

This file is self-contained (torch and transformers only) because it is copied
next to every exported model: `AutoModelForSequenceClassification.from_pretrained(
dir, trust_remote_code=True)` then loads and predicts with plain transformers.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import SequenceClassifierOutput


class FedprivClassifierConfig(PreTrainedConfig):
    model_type = "fedpriv-classifier"
    sub_configs_defaults = {"encoder": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder: PreTrainedConfig | dict | None = None
    feature_scale: float = 4.0
    # Head inputs that no text ever fills: a white-box privacy audit's canaries live there (0 otherwise).
    canary_inputs: int = 0


class FeatureNorm(nn.Module):
    """Normalise, centre, normalise again and scale a sentence embedding.

    The centre is fixed (not trained): fedpriv sets it from public information
    (the label names) so it costs no privacy. Features of one fixed length
    bound every example's gradient on the head, which keeps DP clipping gentle.
    """

    def __init__(self, hidden_size: int, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("center", torch.zeros(hidden_size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        centred = unit - self.center
        return self.scale * centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def head_input(norm: FeatureNorm, features: torch.Tensor, hidden: int, canary_inputs: int) -> torch.Tensor:
    """What the classifier reads: the normalised sentence embedding, then the canary inputs.

    A white-box audit (`canary_inputs` > 0) gives the head inputs of its own: zero for every text, and for
    canary j a row that is zero in the embedding's place and `s` at input j. Real data then leaves no gradient
    in a canary's weights and a canary none in the data's, so the auditor can score each canary alone.
    """
    if not canary_inputs:
        return norm(features)
    if features.shape[-1] == hidden:
        return torch.cat([norm(features), features.new_zeros((*features.shape[:-1], canary_inputs))], dim=-1)
    pooled, extra = features[..., :hidden], features[..., hidden:]
    text = (extra == 0).all(dim=-1, keepdim=True)
    return torch.cat([norm(pooled) * text, extra], dim=-1)


class FedprivForSequenceClassification(PreTrainedModel):
    config_class = FedprivClassifierConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: FedprivClassifierConfig):
        super().__init__(config)
        encoder = cast(PreTrainedConfig, config.encoder)  # sub_configs_defaults made it a config
        self.encoder = AutoModel.from_config(encoder)
        hidden = encoder.hidden_size
        self.norm = FeatureNorm(hidden, config.feature_scale)
        self.classifier = nn.Linear(hidden + config.canary_inputs, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        classifier = getattr(self, "classifier", None)
        if classifier is not None and module is classifier:
            nn.init.zeros_(classifier.weight)
            nn.init.zeros_(classifier.bias)

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def embed(self, input_ids, attention_mask, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """The pooled sentence embedding (before `norm`)."""
        if token_type_ids is None and getattr(self.encoder.config, "type_vocab_size", None):
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        ).last_hidden_state
        return self.mean_pool(hidden, attention_mask)

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = cast(PreTrainedConfig, self.config.encoder).hidden_size
        return self.classifier(head_input(self.norm, pooled, hidden, self.config.canary_inputs))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.head(self.embed(input_ids, attention_mask, token_type_ids, position_ids))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


FedprivClassifierConfig.register_for_auto_class()
FedprivForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
