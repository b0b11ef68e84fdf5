"""Epsilon recomputed from recorded mechanisms alone, with Google's dp-accounting.

Each record's mechanism is read as an event by the same `accounting.dp_event`
the site used, then accounted afresh: the privacy loss distribution (PLD)
accountant checks PLD and PRV claims, the RDP accountant (same integer
orders) checks RDP claims, and both are reported for every release. The
claim itself plays no part in the recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpriv.common.privacy.accounting import cumulative, dp_event
from fedpriv.common.privacy.records import Mechanism

KINDS = ("pld", "rdp")


def cumulative_epsilons(mechanisms: Sequence[Mechanism], delta: float) -> dict[str, list[float]]:
    """Epsilon after each release of one dataset, by PLD and by RDP."""
    events = [dp_event(m) for m in mechanisms]
    return {kind: cumulative(events, float(delta), kind) for kind in KINDS}
