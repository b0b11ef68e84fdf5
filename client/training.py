"""Local training at a site: DP-SGD with Opacus, or plain SGD for a baseline.

`private_training` is the one call that turns a module, optimizer and dataset
into their DP counterparts (Poisson sampling, per-example clipping, Gaussian
noise), in the spirit of Opacus' `make_private`, but with the exact sample
rate of the federation's plan and hooks that are removed again afterwards, so
the worker's resident model stays a plain model between calls.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpriv.client import opacus_compat
from fedpriv.common.model.bundle import ModelBundle, Prepared

# Opacus' hooks on a frozen encoder trigger this PyTorch notice on every step.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    max_grad_norm: float
    # What the noisy gradient sum is divided by: a public constant (sample
    # rate x declared rows), never derived from the private dataset's size.
    normaliser: float


@dataclass(frozen=True)
class LocalPlan:
    steps: int
    sample_rate: float
    optimizer: str
    learning_rate: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_physical_batch: int = 64
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class LocalResult:
    loss: float
    steps: int
    examples_seen: int


def make_optimizer(params, plan: LocalPlan) -> torch.optim.Optimizer:
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.learning_rate, momentum=plan.momentum, weight_decay=plan.weight_decay)
    if plan.optimizer == "adam":
        return torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.learning_rate, weight_decay=plan.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer '{plan.optimizer}'")


@contextlib.contextmanager
def private_training(
    bundle: ModelBundle,
    dataset: torch.utils.data.Dataset,
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    *,
    sample_rate: float,
    dp: DpSettings,
    max_physical_batch: int,
    generator: torch.Generator,
) -> Iterator[tuple[Iterator, torch.optim.Optimizer, Callable]]:
    """Yields (batches, DP optimizer, loss function); removes the per-example hooks on exit.

    The noisy gradient sum is divided by `dp.normaliser` (1 leaves the sum itself).
    """
    from opacus.data_loader import DPDataLoader
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    tuning = bundle.tuning
    loader = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=bundle.collate_fn(),
        generator=generator,
        rand_on_empty=tuning.rand_on_empty,
    )
    wrap = _bookkeeping if tuning.grad_sample_mode == "bookkeeping" else _opacus_hooks
    with wrap(module, optimizer, loader, dp, generator, tuning.grad_sample_mode) as (
        dp_optimizer,
        criterion,
        dp_loader,
    ):
        if not tuning.physical_batching:
            yield iter(_cycle(dp_loader)), dp_optimizer, criterion
        else:
            with BatchMemoryManager(
                data_loader=dp_loader, max_physical_batch_size=max_physical_batch, optimizer=dp_optimizer
            ) as physical:
                yield iter(_cycle(physical)), dp_optimizer, criterion


@contextlib.contextmanager
def _opacus_hooks(module: nn.Module, optimizer, loader, dp: DpSettings, generator: torch.Generator, mode: str):
    """Opacus' per-example machinery (hooks or ghost clipping), attached for one call and removed after."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # We pass our own generator; Opacus warns that it is not its secure RNG.
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="prv")
    prepared = engine.make_private(
        module=module,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=False,  # `loader` already samples with the plan's exact rate
        grad_sample_mode=mode,
        noise_generator=generator,
        wrap_model=False,
    )
    if mode == "ghost":
        hooks, dp_optimizer, criterion, dp_loader = prepared
    else:
        hooks, dp_optimizer, dp_loader = prepared
        criterion = nn.CrossEntropyLoss()
    # Opacus would divide by int(sample rate x len(dataset)): the private size.
    dp_optimizer.expected_batch_size = dp.normaliser
    try:
        yield dp_optimizer, criterion, dp_loader
    finally:
        hooks.cleanup()
        opacus_compat.clear_per_sample_state(module)


@contextlib.contextmanager
def _bookkeeping(module: nn.Module, optimizer, loader, dp: DpSettings, generator: torch.Generator, mode: str):
    """Book-keeping clipping: the clipped sum from one backward pass; Opacus' optimizer adds the noise."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    from fedpriv.client.bookkeeping import BookKeeping

    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=dp.normaliser,  # public; see DpSettings
        loss_reduction="mean",
        generator=generator,
    )
    engine = BookKeeping(module, dp.max_grad_norm)
    try:
        yield dp_optimizer, engine.criterion, loader
    finally:
        engine.remove()
        opacus_compat.clear_per_sample_state(module)


class StepCounter:
    """Counts the DP optimizer's real steps: with physical batching most `step()` calls only accumulate.

    Chained onto the optimizer's public step hook, which Opacus calls only
    when a logical batch is complete and noised (its accountant hooks there too).
    """

    def __init__(self, previous: Callable | None) -> None:
        self.steps = 0
        self._previous = previous

    @classmethod
    def attach(cls, optimizer) -> StepCounter:
        counter = cls(optimizer.step_hook)
        optimizer.attach_step_hook(counter)
        return counter

    def __call__(self, optimizer) -> None:
        if self._previous is not None:
            self._previous(optimizer)
        self.steps += 1


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


def train_local(
    bundle: ModelBundle,
    prepared: Prepared,
    plan: LocalPlan,
    *,
    dp: DpSettings | None,
    seed: int,
    anchor: Mapping[str, np.ndarray] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> LocalResult:
    """Runs `plan.steps` optimizer steps on the bundle's resident model, in place."""
    module = bundle.trainable_module()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, plan)
    generator = torch.Generator().manual_seed(seed)
    dataset = prepared.dataset()
    anchors = _anchors(module, anchor) if plan.proximal_mu > 0 and anchor is not None else []

    losses: list[float] = []
    steps = 0
    if dp is not None:
        with private_training(
            bundle,
            dataset,
            optimizer,
            module,
            sample_rate=plan.sample_rate,
            dp=dp,
            max_physical_batch=plan.max_physical_batch,
            generator=generator,
        ) as (batches, dp_optimizer, criterion):
            counter = StepCounter.attach(dp_optimizer)
            while steps < plan.steps:
                batch = next(batches)
                logits = bundle.logits(module, batch)
                loss = criterion(logits, bundle.targets(batch).to(bundle.device))
                loss.backward()
                taken = counter.steps
                dp_optimizer.step()
                stepped = counter.steps > taken
                dp_optimizer.zero_grad()
                if len(bundle.targets(batch)):
                    losses.append(float(loss.detach()))
                if stepped:
                    steps += 1
                    _proximal_step(anchors, plan)
                    if on_step:
                        on_step(steps)
    else:
        batch_size = max(1, round(plan.sample_rate * len(dataset)))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=bundle.collate_fn()
        )
        batches = iter(_cycle(loader))
        while steps < plan.steps:
            batch = next(batches)
            loss = nn.functional.cross_entropy(bundle.logits(module, batch), bundle.targets(batch).to(bundle.device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            steps += 1
            _proximal_step(anchors, plan)
            if on_step:
                on_step(steps)
    mean_loss = float(np.mean(losses)) if losses else math.nan
    return LocalResult(loss=mean_loss, steps=steps, examples_seen=len(dataset))


def _anchors(module: nn.Module, anchor: Mapping[str, np.ndarray]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, global value) pairs for FedProx; the module's names are the model's."""
    return [
        (p, torch.as_tensor(anchor[name], device=p.device))
        for name, p in module.named_parameters()
        if p.requires_grad and name in anchor
    ]


@torch.no_grad()
def _proximal_step(anchors: list[tuple[nn.Parameter, torch.Tensor]], plan: LocalPlan) -> None:
    # FedProx's pull towards the global model, applied after the private step:
    # it touches no data, so it is post-processing and costs no privacy.
    for p, global_value in anchors:
        p.sub_(plan.learning_rate * plan.proximal_mu * (p - global_value))
