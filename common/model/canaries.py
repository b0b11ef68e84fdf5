"""White-box audit canaries: rows that live in head inputs no text fills.

`fedpriv audit --empirical` makes m canaries. Canary j is a row whose head
input is `scale` at canary input j and zero elsewhere (`modeling_fedpriv.head_input`),
with a random label; a fair coin decides whether it joins the canary site's
training rows. From there it is an example like any other: Poisson-sampled,
its gradient clipped, summed and noised by the site's one release path. Only
the auditor knows the coins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from fedpriv.common.errors import FedprivError

# The default input scale; the audit sets it from the run's learning rate (`gradient_audit.canary_scale`).
CANARY_SCALE = 4.0


class CanaryError(FedprivError, ValueError):
    pass


@dataclass(frozen=True)
class GradientCanaries:
    labels: np.ndarray  # label id of canary j
    included: np.ndarray  # bool: canary j is in the canary site's data
    scale: float = CANARY_SCALE

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def draw(cls, m: int, num_labels: int, seed: int, scale: float = CANARY_SCALE) -> GradientCanaries:
        if m < 2:
            raise CanaryError("--canaries: need at least 2 canaries")
        rng = np.random.default_rng(seed)
        return cls(labels=rng.integers(0, num_labels, size=m), included=rng.random(m) < 0.5, scale=scale)

    def save(self, path: Path) -> None:
        tensors: dict[str, np.ndarray] = {
            "labels": self.labels.astype(np.int64),
            "included": self.included.astype(np.uint8),
            "scale": np.asarray([self.scale], dtype=np.float64),
        }
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | Path) -> GradientCanaries:
        try:
            tensors = load_file(str(path))
            labels, included, scale = tensors["labels"], tensors["included"].astype(bool), float(tensors["scale"][0])
        except Exception as error:
            raise CanaryError(f"{path}: not a canary file ({error})") from None
        if labels.shape != included.shape or labels.ndim != 1:
            raise CanaryError(f"{path}: labels and included differ in shape")
        return cls(labels=labels, included=included, scale=scale)

    def rows(self, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of the included canaries, as a head-mode site holds its rows."""
        chosen = np.flatnonzero(self.included)
        features = torch.zeros((len(chosen), hidden + len(self)))
        features[torch.arange(len(chosen)), hidden + torch.as_tensor(chosen)] = self.scale
        return features, torch.as_tensor(self.labels[chosen], dtype=torch.long)
