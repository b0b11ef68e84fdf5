"""The aggregator's signed heads: per round, what every site has released to it so far.

A ledger's chain shows that nothing *inside* it was changed, not that its
tail is still there. So at the end of every round, after the round's
receipts and before its checkpoint, the aggregator appends a `LedgerHead`
naming, for each site whose releases changed since the last head, how many
it has received in all, the hash of the last one (which the site's own
ledger must hold) and the highest epsilon the site reported. The heads read
in order give every site's latest; a thousand-site run writes only the
sites of the round, not the whole roster every round. `fedpriv audit` matches the checkpoints
and run log against these heads and the heads against every site ledger.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import LedgerEntry, LedgerHead, SiteHead, SiteReleaseReceipt, now
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.protocol import EPSILON


class ReleaseHeads:
    """Receipts as the aggregator appends them, and the head record written from them."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.sites: dict[str, SiteHead] = {}
        self._changed: set[str] = set()  # sites whose head moved since the last one written
        # Read once: a resumed run continues the counts of the ledger it appends to.
        for record in ledger.records() if ledger.path.exists() else []:
            if isinstance(record, SiteReleaseReceipt):
                self._received(record.site, record.site_entry)
            elif isinstance(record, LedgerHead):
                for site, head in record.sites.items():
                    self.reported(site, head.epsilon)
        self._changed.clear()  # all of the above is already under a head (or will be, in the next one)

    def _received(self, site: str, entry: LedgerEntry) -> None:
        known = self.sites.get(site)
        self.sites[site] = SiteHead(
            releases=(known.releases if known else 0) + 1,
            head=entry.hash,
            epsilon=_highest(known.epsilon if known else None, _claim(entry)),
        )
        self._changed.add(site)

    def receipt(self, server_round: int, site: str, entry: LedgerEntry) -> None:
        """Appends the receipt of a site's release (its signed entry as received)."""
        self.ledger.append(SiteReleaseReceipt(round=server_round, site=site, site_entry=entry))
        self._received(site, entry)

    def reported(self, site: str, epsilon: Any) -> None:
        """A site's epsilon as it reported it (a reply's metrics), kept if it is the highest yet."""
        known = self.sites.get(site)
        if known is not None and _highest(known.epsilon, epsilon) != known.epsilon:
            self.sites[site] = known.model_copy(update={"epsilon": _highest(known.epsilon, epsilon)})
            self._changed.add(site)

    def reported_in(self, site: str, metrics: Mapping[str, Any]) -> None:
        self.reported(site, metrics.get(EPSILON))

    def close_round(self, run_id: str, server_round: int) -> None:
        """Appends the signed head of this round: for each site whose releases moved, its count and last entry."""
        changed = {site: self.sites[site] for site in sorted(self._changed)}
        self.ledger.append(LedgerHead(run_id=run_id, round=server_round, sites=changed, created=now()))
        self._changed.clear()


def _claim(entry: LedgerEntry) -> float | None:
    accounting = getattr(entry.record, "accounting", None)
    return accounting.epsilon if accounting is not None else None


def _highest(a: Any, b: Any) -> float | None:
    values = [float(x) for x in (a, b) if isinstance(x, (int, float)) and math.isfinite(float(x))]
    return max(values) if values else None


def ledger_keys(run: RunDirectory, key) -> dict[str, str]:
    """What the run log records of the keys: the aggregator's fingerprint, and the run's public keys file."""
    named = {"signer": signing.fingerprint(signing.public_b64(key))}
    public = run.public_keys  # a simulation provisions it in the run directory
    if public.exists():
        named["public-keys-sha256"] = hashlib.sha256(public.read_bytes()).hexdigest()
    return named
