"""Per-example clipping in one backward pass: book-keeping (Bu, Wang, Zha & Karypis, ICML 2023).

Opacus' ghost clipping runs backward twice: once for every example's gradient
norm, then again on the loss re-weighted by the clipping factors, for the
clipped sum. But each layer's clipped sum is a re-weighted weight gradient,
which the activations and output gradients of the first pass already
determine. So this keeps them (the "book") and forms the clipped sum directly:
one backward pass that computes no weight gradients (the weights are frozen
while it runs), then one matmul per layer. For each layer the norm is taken
the cheaper way (Bu et al. 2022, mixed ghost clipping): from T x T Gram
matrices of the activations and output gradients when the per-example
gradient is larger than that, from the per-example gradient itself otherwise.

Layers with trainable weights must be `nn.Linear`, `nn.Embedding` or
`nn.LayerNorm` (every weight of a BERT-style encoder and fedpriv's head),
each used once per forward pass, with batch-sized inputs (explicit
`position_ids` and `token_type_ids`). Anything else is refused by name,
never clipped wrongly. The result goes where Opacus' fast-gradient-clipping
optimizer expects it, in `p.grad`; that optimizer adds the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)
# Opacus' clipping factor: min(1, C / (norm + 1e-6)).
_STABILITY = 1e-6


class BookKeepingError(TypeError):
    """The module has a trainable weight that book-keeping cannot clip per example."""


@dataclass
class _Entry:
    layer: nn.Module
    name: str
    trainable: frozenset[str]  # the layer's own trainable weights, e.g. {"weight", "bias"}
    inputs: torch.Tensor
    output_grad: torch.Tensor | None = None
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)


class BookKeeping:
    """Hooks on a module that turn one backward pass into the sum of per-example clipped gradients."""

    def __init__(self, module: nn.Module, max_grad_norm: float):
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._names: dict[nn.Module, str] = {}
        self._trainable: dict[nn.Module, frozenset[str]] = {}
        for name, layer in module.named_modules():
            own = frozenset(n for n, p in layer.named_parameters(recurse=False) if p.requires_grad)
            if not own:
                continue
            _check_supported(name or type(module).__name__, layer)
            self._names[layer], self._trainable[layer] = name, own
        self._entries: list[_Entry] = []
        self._seen: set[nn.Module] = set()
        self._handles = [module.register_forward_pre_hook(self._begin)]
        self._handles += [layer.register_forward_hook(self._record, with_kwargs=True) for layer in self._names]

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> BookKeepingLoss:
        return BookKeepingLoss(self, F.cross_entropy(logits, targets, reduction="none"))

    def remove(self) -> None:
        """Removes the hooks and gives the weights back their gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._entries, self._seen = [], set()
        for p in self.params:
            p.requires_grad_(True)

    # -- forward -------------------------------------------------------------

    def _begin(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        self._entries, self._seen = [], set()
        # Frozen while the graph is built, so backward computes activation gradients only.
        for p in self.params:
            p.requires_grad_(False)

    def _record(self, layer: nn.Module, args, kwargs, output: torch.Tensor):
        if not torch.is_grad_enabled():
            return None
        name = self._names[layer]
        if layer in self._seen:
            raise BookKeepingError(f"book-keeping clipping: {name} is used twice in one forward pass")
        self._seen.add(layer)
        if not output.requires_grad:  # the first layers: their outputs become the graph's leaves
            output = output.detach().requires_grad_(True)
        entry = _Entry(layer, name, self._trainable[layer], (args[0] if args else next(iter(kwargs.values()))).detach())
        self._entries.append(entry)

        def keep(grad: torch.Tensor) -> None:
            entry.output_grad = grad.detach()

        output.register_hook(keep)
        return output

    # -- backward ------------------------------------------------------------

    def backward(self, losses: torch.Tensor) -> None:
        """One backward pass; leaves the clipped per-example gradient sum in each weight's `.grad`."""
        try:
            if losses.numel():
                losses.sum().backward()
            batch = losses.shape[0]
            squared = torch.zeros(batch, device=losses.device, dtype=torch.float32)
            for entry in self._entries:
                if entry.output_grad is None:  # did not reach the loss
                    continue
                squared += _squared_norms(entry, batch)
            factors = (self.max_grad_norm / (squared.sqrt() + _STABILITY)).clamp(max=1.0)
            for p in self.params:
                p.requires_grad_(True)
                p.grad = torch.zeros_like(p)
            for entry in self._entries:
                if entry.output_grad is not None:
                    _add_clipped_sum(entry, factors)
        finally:
            self._entries, self._seen = [], set()
            for p in self.params:
                p.requires_grad_(True)


class BookKeepingLoss:
    """What the training loop calls `.backward()` and `.detach()` on, as with a loss tensor."""

    def __init__(self, engine: BookKeeping, losses: torch.Tensor):
        self.engine, self.losses = engine, losses

    def backward(self) -> None:
        self.engine.backward(self.losses)

    def detach(self) -> torch.Tensor:
        return self.losses.detach().mean()


def _check_supported(name: str, layer: nn.Module) -> None:
    if not isinstance(layer, SUPPORTED):
        raise BookKeepingError(
            f"book-keeping clipping: {name} ({type(layer).__name__}) has trainable weights; "
            "it clips nn.Linear, nn.Embedding and nn.LayerNorm only"
        )
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse):
        raise BookKeepingError(
            f"book-keeping clipping: {name} is an nn.Embedding with max_norm, scale_grad_by_freq or sparse"
        )


def _tokens(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if x.shape[0] != batch:
        raise BookKeepingError(
            f"book-keeping clipping: {name} saw a batch of {x.shape[0]} rows, not {batch}; pass batch-sized "
            "inputs (e.g. explicit position_ids and token_type_ids)"
        )
    return x.reshape(batch, -1, x.shape[-1]) if x.dim() > 1 else x.reshape(batch, 1, 1)


def _squared_norms(entry: _Entry, batch: int) -> torch.Tensor:
    layer, g = entry.layer, entry.output_grad
    assert g is not None
    if isinstance(layer, nn.Linear):
        a = _tokens(entry.inputs, batch, entry.name).float()
        g = _tokens(g, batch, entry.name).float()
        entry.inputs, entry.output_grad = a, g
        total = torch.zeros(batch, device=g.device)
        if "weight" in entry.trainable:
            tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            if tokens == 1:
                total += a.square().sum((1, 2)) * g.square().sum((1, 2))
            elif tokens * tokens <= d_in * d_out:  # ghost norm: never builds the per-example gradient
                total += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
            else:
                per_example = torch.bmm(g.transpose(1, 2), a)
                entry.per_example["weight"] = per_example
                total += per_example.square().sum((1, 2))
        if "bias" in entry.trainable:
            bias = g.sum(1)
            entry.per_example["bias"] = bias
            total += bias.square().sum(1)
        return total
    if isinstance(layer, nn.Embedding):
        ids = entry.inputs
        if ids.shape[0] != batch:
            _tokens(ids, batch, entry.name)
        ids = ids.reshape(batch, -1)
        g = g.reshape(batch, ids.shape[1], -1).float()
        if layer.padding_idx is not None:  # the padding row gets no gradient
            g = g * (ids != layer.padding_idx).unsqueeze(-1)
        entry.inputs, entry.output_grad = ids, g
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    # nn.LayerNorm: per-example gradients are as small as the weight itself.
    x = entry.inputs.float()
    normalised = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
    width = math.prod(layer.normalized_shape)
    g = g.float().reshape(batch, -1, width)
    total = torch.zeros(batch, device=g.device)
    if "weight" in entry.trainable:
        weight = (g * normalised.reshape(batch, -1, width)).sum(1)
        entry.per_example["weight"] = weight
        total += weight.square().sum(1)
    if "bias" in entry.trainable:
        bias = g.sum(1)
        entry.per_example["bias"] = bias
        total += bias.square().sum(1)
    return total


def _add_clipped_sum(entry: _Entry, factors: torch.Tensor) -> None:
    layer, done = entry.layer, entry.per_example
    for name, per_example in done.items():
        param = getattr(layer, name)
        summed = torch.einsum("b,b...->...", factors, per_example)
        param.grad += summed.reshape(param.shape).to(param.dtype)
    if isinstance(layer, nn.Linear) and "weight" in entry.trainable and "weight" not in done:
        a, g = entry.inputs, entry.output_grad
        assert a is not None and g is not None  # recorded by the hooks in this step
        weighted = g * factors.view(-1, 1, 1)
        summed = weighted.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        layer.weight.grad += summed.to(layer.weight.dtype)
    elif isinstance(layer, nn.Embedding) and "weight" in entry.trainable:
        ids, g = entry.inputs, entry.output_grad
        assert ids is not None and g is not None  # recorded by the hooks in this step
        weighted = (g * factors.view(-1, 1, 1)).reshape(-1, g.shape[-1])
        layer.weight.grad.index_add_(0, ids.reshape(-1), weighted.to(layer.weight.dtype))
