"""What a hostile or broken site can send, and why the aggregator refuses it.

`admission` decides whether a reply is well formed and its release properly
signed; these checks decide whether its content is fit to aggregate at all:
the update must be the model the aggregator sent, in shape and type, finite
and of sane size; its example count must be an honest-looking count; and its
privacy record must belong to this run and round, claim no less epsilon than
its own mechanism costs, and never be replayed. Each check returns the reason
for refusal, naming what is wrong, or None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedpriv.common.privacy.accounting import dp_event, epsilon
from fedpriv.common.privacy.records import LedgerEntry, PrivacyRecord
from fedpriv.common.wire.protocol import NUM_EXAMPLES, SITE_WEIGHT, Metrics

# A recomputed epsilon may differ from the site's by float noise, never by more.
EPSILON_SLACK = 1e-6


@dataclass(frozen=True)
class RoundContext:
    """What the aggregator knows when a round's replies come back."""

    run_id: str
    round: int
    sent: Mapping[str, np.ndarray]  # the global state each site trained from
    max_update_norm: float
    max_examples: int


def update_problem(update: Mapping[str, np.ndarray], context: RoundContext) -> str | None:
    """Why these arrays are not an update of the model that was sent, or None."""
    missing = sorted(set(context.sent) - set(update))
    extra = sorted(set(update) - set(context.sent))
    if missing or extra:
        parts = [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
        ]
        return "the update's arrays differ from the model's: " + "; ".join(p for p in parts if p)
    squared = 0.0
    for name, sent in context.sent.items():
        value = np.asarray(update[name])
        if value.shape != sent.shape:
            return f"array {name}: shape {value.shape}, the model's is {sent.shape}"
        if value.dtype != sent.dtype:
            return f"array {name}: dtype {value.dtype}, the model's is {sent.dtype}"
        if not np.all(np.isfinite(value)):
            return f"array {name}: holds NaN or infinite values"
        squared += float(np.sum((value.astype(np.float64) - sent.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if not norm <= context.max_update_norm:
        return f"update norm {norm:.3g} exceeds strategy.max-update-norm {context.max_update_norm:g}"
    return None


def metrics_problem(metrics: Metrics, context: RoundContext) -> str | None:
    """Why the reply's weights cannot be trusted to weigh the aggregate, or None."""
    examples = metrics.get(NUM_EXAMPLES)
    if examples is not None:
        if not isinstance(examples, int | float) or not math.isfinite(examples) or examples != int(examples):
            return f"{NUM_EXAMPLES} {examples!r} is not a whole number"
        if not 0 <= examples <= context.max_examples:
            return f"{NUM_EXAMPLES} {examples:g} is outside [0, {context.max_examples}] (strategy.max-site-examples)"
    weight = metrics.get(SITE_WEIGHT)
    if weight is not None and weight not in (0, 1):
        return f"{SITE_WEIGHT} {weight!r} must be 0 or 1"
    return None


@dataclass
class ReleaseHistory:
    """The releases each site has sent in this run: a record is accepted once, and claims only grow."""

    last_seq: dict[str, int] = field(default_factory=dict)
    last_claim: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def problem(self, site: str, entry: LedgerEntry, context: RoundContext) -> str | None:
        record = entry.record
        assert isinstance(record, PrivacyRecord)
        if entry.hash in self.seen:
            return f"privacy record seq {entry.seq} was already received: a replay"
        if record.run_id != context.run_id or record.round != context.round:
            return (
                f"privacy record is for run {record.run_id} round {record.round}, "
                f"not this run's round {context.round}: a replay"
            )
        if record.site != site:
            return f"privacy record names site {record.site!r}, but {site!r} sent it"
        if site in self.last_seq and entry.seq <= self.last_seq[site]:
            return f"privacy record seq {entry.seq} is not after this site's last ({self.last_seq[site]}): a replay"
        claimed = record.accounting.epsilon
        if claimed is not None:
            m, a = record.mechanism, record.accounting
            floor = epsilon([dp_event(m)], a.delta, a.accountant)
            if claimed < floor * (1 - EPSILON_SLACK):
                return f"privacy record claims epsilon {claimed:.4g}, below the {floor:.4g} its own mechanism spends"
            previous = self.last_claim.get(site)
            if previous is not None and claimed < previous * (1 - EPSILON_SLACK):
                return f"privacy record claims epsilon {claimed:.4g}, below the {previous:.4g} this site claimed before"
        return None

    def accept(self, site: str, entry: LedgerEntry) -> None:
        self.seen.add(entry.hash)
        self.last_seq[site] = entry.seq
        claimed = entry.record.accounting.epsilon if isinstance(entry.record, PrivacyRecord) else None
        if claimed is not None:
            self.last_claim[site] = claimed
