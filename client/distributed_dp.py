"""A site's share of one step of distributed DP-SGD: its clipped gradient sum, on a grid, plus its share of the noise.

The site takes a Poisson sample of its data at the plan's rate, clips every
example's gradient at the global model to norm C (Opacus' per-sample
machinery), sums them, rounds the sum to the grid of spacing `gamma` (the
secure-aggregation encoding), and adds Gaussian noise of standard deviation
sigma x C / sqrt(n - t) rounded to the same grid. The sum over the sites that
remain carries at least the noise sigma x C of central DP-SGD over the pooled
data, provided at most t sites collude with the aggregator or drop out.

Rounding the data-dependent sum first moves a neighbour's sum by at most
C + sqrt(d) x gamma (the sensitivity that is accounted); the noise rounded to
a grid of spacing gamma, with sigma x C / gamma in the hundreds of thousands,
is the discrete Gaussian of the DDGauss analysis up to a total variation far
below any delta. Nothing is divided by the site's private row count: the
aggregator divides the sum by a public constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedpriv.client.training import DpSettings, StepCounter, private_training
from fedpriv.common.model.bundle import ModelBundle, Prepared


@dataclass(frozen=True)
class NoiseShare:
    noise_multiplier: float  # sigma of the whole sum, in units of C
    max_grad_norm: float  # C
    cohort: int  # n
    max_colluding: int  # t
    gamma: float  # grid spacing of the encoding

    @property
    def share_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm / math.sqrt(self.cohort - self.max_colluding)

    def sensitivity(self, length: int) -> float:
        return self.max_grad_norm + math.sqrt(length) * self.gamma

    def effective_noise_multiplier(self, length: int) -> float:
        """The noise of the sum relative to the sensitivity that rounding leaves: what is accounted."""
        return self.noise_multiplier * self.max_grad_norm / self.sensitivity(length)


def clipped_gradient_sum(
    bundle: ModelBundle,
    prepared: Prepared,
    *,
    sample_rate: float,
    max_grad_norm: float,
    seed: int,
    max_physical_batch: int,
) -> tuple[np.ndarray, int]:
    """(sum of per-example clipped gradients at the bundle's current weights, flattened in `trainable_names` order;
    examples sampled). The sample count stays at the site."""
    module = bundle.trainable_module()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    optimizer = torch.optim.SGD(params, lr=0.0)  # the step is taken at the aggregator
    names = {id(p): n for n, p in bundle.model.named_parameters()}
    grads: dict[str, np.ndarray] = {}
    sampled = 0
    with private_training(
        bundle,
        prepared.dataset(),
        optimizer,
        module,
        sample_rate=sample_rate,
        dp=DpSettings(noise_multiplier=0.0, max_grad_norm=max_grad_norm, normaliser=1.0),
        max_physical_batch=max_physical_batch,
        generator=generator,
    ) as (batches, dp_optimizer, criterion):
        counter = StepCounter.attach(dp_optimizer)
        while not counter.steps:
            batch = next(batches)
            targets = bundle.targets(batch)
            sampled += len(targets)
            loss = criterion(bundle.logits(module, batch), targets.to(bundle.device))
            loss.backward()
            dp_optimizer.step()
            if counter.steps:
                grads = {names[id(p)]: p.grad.detach().cpu().numpy().astype(np.float64) for p in params}
            dp_optimizer.zero_grad()
    vector = np.concatenate([grads[n].ravel() for n in bundle.trainable_names]) if grads else np.zeros(0)
    return vector, sampled


def noisy_share(vector: np.ndarray, share: NoiseShare, rng: np.random.Generator) -> np.ndarray:
    """The clipped sum on the grid plus this site's share of the noise on the grid (values are multiples of gamma)."""
    on_grid = np.rint(vector / share.gamma)
    noise = np.rint(rng.normal(0.0, share.share_std / share.gamma, size=vector.shape))
    return (on_grid + noise) * share.gamma
