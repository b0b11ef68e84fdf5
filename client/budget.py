"""A site's privacy budget: what its ledger says was spent, and the hard cap.

The site alone decides whether it may release another update: before
training it computes the epsilon it would reach after this round's release,
from its own signed ledger, and refuses if that is above its cap. No setting
of the aggregator can make a site exceed its cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dp_accounting as dpa

from fedpriv.common.accounting import dp_event, epsilon, library, prefetch
from fedpriv.common.ledger import Ledger
from fedpriv.common.records import Accounting, LedgerEntry, Mechanism, PrivacyRecord, now


@dataclass
class SiteBudget:
    ledger: Ledger
    data_id: str
    cap: float
    delta: float
    accountant: str
    # This data's releases as last read from (or appended to) the ledger, and
    # the ledger file's (size, mtime) then: the file stays the source of
    # truth, read again only when it changed behind our back.
    _releases: list[dpa.DpEvent] | None = field(default=None, init=False, repr=False)
    _seen: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def _stamp(self) -> tuple[int, int]:
        try:
            stat = self.ledger.path.stat()
        except FileNotFoundError:
            return (0, 0)
        return (stat.st_size, stat.st_mtime_ns)

    def releases(self) -> list[dpa.DpEvent]:
        """Every release of this data the ledger holds, from any run, as accounting events."""
        stamp = self._stamp()
        if self._releases is None or stamp != self._seen:
            self._releases = [
                dp_event(r.mechanism)
                for r in self.ledger.records()
                if isinstance(r, PrivacyRecord) and r.party == "site" and r.data_id == self.data_id
            ]
            self._seen = stamp
        return list(self._releases)

    def spent(self) -> float:
        return epsilon(self.releases(), self.delta, self.accountant)

    def after(self, mechanism: Mechanism) -> float:
        """Epsilon spent once `mechanism` is released too."""
        return epsilon([*self.releases(), dp_event(mechanism)], self.delta, self.accountant)

    def allows(self, mechanism: Mechanism) -> bool:
        return self.after(mechanism) <= self.cap

    def prefetch(self, mechanism: Mechanism) -> None:
        """Starts the accounting of the next such release (next round's check) in the background."""
        prefetch([*self.releases(), dp_event(mechanism)], self.delta, self.accountant)

    def record(
        self, *, run_id: str, server_round: int, site: str, mechanism: Mechanism, update_sha256: str
    ) -> LedgerEntry:
        """Appends the signed record of a release that is about to leave the site."""
        release = dp_event(mechanism)
        private = mechanism.noise_multiplier > 0
        spent = self.after(mechanism)
        if private and spent > self.cap:  # never record (or send) past the cap, whatever the caller did
            raise RuntimeError(f"{site}: release would spend epsilon {spent:.4f} above the cap {self.cap}")
        name, library_version = library(self.accountant)
        record = PrivacyRecord(
            run_id=run_id,
            round=server_round,
            party="site",
            site=site,
            data_id=self.data_id,
            mechanism=mechanism,
            accounting=Accounting(
                accountant=self.accountant,
                library=name,
                library_version=library_version,
                delta=self.delta,
                # A release without noise has no finite epsilon: recorded as null.
                epsilon=spent if private else None,
                epsilon_cap=self.cap if private else None,
            ),
            update_sha256=update_sha256,
            created=now(),
        )
        unchanged = self._stamp() == self._seen
        entry = self.ledger.append(record)
        if unchanged and self._releases is not None:  # our own append is all that changed since we read
            self._releases.append(release)
            self._seen = self._stamp()
        else:
            self._releases = None
        return entry
