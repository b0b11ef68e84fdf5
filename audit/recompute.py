"""Epsilon recomputed from recorded mechanisms with Google's dp-accounting.

Independent of the library that made the claim (Opacus): the privacy loss
distribution (PLD) accountant checks PRV claims, the RDP accountant (same
integer orders) checks RDP claims, and both are reported for every release.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import dp_accounting as dpa

from fedpriv.common.accounting import RDP_ORDERS

Step = tuple[float, float, int]  # noise multiplier, sample rate, steps


def _event(sigma: float, rate: float, steps: int) -> dpa.DpEvent:
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(sigma)), steps)


@lru_cache(maxsize=1024)
def _cumulative(history: tuple[Step, ...], delta: float, kind: str) -> tuple[float, ...]:
    if kind == "pld":
        accountant = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
    else:
        accountant = dpa.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    out, unbounded = [], False
    for sigma, rate, steps in history:
        if sigma <= 0:
            unbounded = True  # a release without noise has no finite epsilon, now or later
        elif steps > 0:
            accountant.compose(_event(sigma, rate, steps))
        out.append(float("inf") if unbounded else float(accountant.get_epsilon(delta)))
    return tuple(out)


def cumulative_epsilons(history: Sequence[Step], delta: float) -> dict[str, list[float]]:
    """Epsilon after each release of one dataset, by PLD and by RDP."""
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return {kind: list(_cumulative(key, float(delta), kind)) for kind in ("pld", "rdp")}
