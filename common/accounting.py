"""How DP-SGD releases are accounted: epsilon from a history, noise from a target.

A *release* is what one site did in one round: `steps` steps of Poisson
sampling at `sample_rate` with Gaussian noise `noise_multiplier` (times the
clipping norm). What happened is recorded as data; this module only turns it
into epsilon, with Opacus' accountants (PRV by default, RDP selectable).
Results are cached because PRV takes about half a second per evaluation and
every site of a federation usually shares one plan.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

ACCOUNTANTS = ("prv", "rdp")
# Integer Renyi orders: exact in every RDP implementation, so an auditor's
# recomputation (dp-accounting) reproduces a claim to the last digit.
RDP_ORDERS = tuple(range(2, 256))


@dataclass(frozen=True)
class Release:
    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _merge(releases: Iterable[Release]) -> tuple[tuple[float, float, int], ...]:
    # Opacus composes a history of (sigma, q, steps); equal neighbours merge.
    merged: list[list] = []
    for r in releases:
        if r.steps <= 0:
            continue
        if merged and merged[-1][0] == r.noise_multiplier and merged[-1][1] == r.sample_rate:
            merged[-1][2] += r.steps
        else:
            merged.append([r.noise_multiplier, r.sample_rate, r.steps])
    return tuple(tuple(m) for m in merged)


_lock = threading.Lock()
_memo: dict[tuple, Future] = {}
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpriv-accounting")


def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Memoised; concurrent requests for one history share a single computation."""
    key = (history, delta, accountant)
    with _lock:
        future = _memo.get(key)
        owner = future is None
        if owner:
            if len(_memo) > 4096:
                _memo.clear()
            future = _memo[key] = Future()
    if owner:
        try:
            future.set_result(_compute_epsilon(history, delta, accountant))
        except BaseException as error:
            with _lock:
                _memo.pop(key, None)
            future.set_exception(error)
    return future.result()


def _compute_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    # One public step per DP-SGD step; Opacus merges equal consecutive steps,
    # so its history ends up as `history`.
    for sigma, rate, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about alpha ranges on every call
        if accountant == "rdp":
            return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))
        return float(acc.get_epsilon(delta=delta))


def epsilon(releases: Iterable[Release], delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by a sequence of releases of one site's data."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant: unknown accountant '{accountant}' (use one of {ACCOUNTANTS})")
    return _epsilon(_merge(releases), float(delta), accountant)


def prefetch(releases: Iterable[Release], delta: float, accountant: str = "prv") -> None:
    """Starts computing an epsilon that will be asked for soon (e.g. next round's check)."""
    key = (_merge(releases), float(delta), accountant)
    with _lock:
        if key in _memo:
            return
    _background.submit(_epsilon, *key)


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier whose `steps` releases stay within the target."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    # Opacus' search stops within tolerance *below* the target; step up until
    # our own accountant agrees so the plan never overshoots.
    while epsilon([Release(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        sigma *= 1.01
    return float(sigma)


def steps_per_round(local_epochs: float, sample_rate: float) -> int:
    return max(1, round(local_epochs / sample_rate))
