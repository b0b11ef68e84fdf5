"""A site's privacy budget: what its ledger says was spent, and the hard cap.

The site alone decides whether it may release another update: before
training it computes the epsilon it would reach after this round's release,
from its own signed ledger, and refuses if that is above its cap. No setting
of the aggregator can make a site exceed its cap.

The budget belongs to the site, i.e. to its ledger, not to a version of its
data: every release the ledger holds composes, whatever data file it was made
from (`data_id` only records which version was used). A site's data grows
and changes, and neighbouring datasets are exactly what DP protects, so a
changed file never brings a fresh budget. Only an explicit reset by the
site's operator does (`reset`, a signed `BudgetReset` record with a reason,
shown by the audit); releases before the last reset no longer count.
"""

from __future__ import annotations

import getpass
import math
import socket
from dataclasses import dataclass, field

import dp_accounting as dpa

from fedpriv.common.errors import FedprivError
from fedpriv.common.privacy.accounting import dp_event, epsilon, library, prefetch
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import Accounting, BudgetReset, LedgerEntry, Mechanism, PrivacyRecord, now


class BudgetResetError(FedprivError):
    """A budget reset that must not be written (no reason given)."""


@dataclass
class SiteBudget:
    ledger: Ledger
    data_id: str  # the version of the data now released, recorded in each release; never a budget key
    cap: float
    delta: float
    accountant: str
    # The site's releases since its last reset, as last read from (or appended to) the ledger, and
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
        """Every release of the site since its last reset, from any run and any version of its data."""
        stamp = self._stamp()
        if self._releases is None or stamp != self._seen:
            self._releases = []
            for r in self.ledger.records():
                if isinstance(r, BudgetReset):
                    self._releases = []
                elif isinstance(r, PrivacyRecord) and r.party == "site":
                    self._releases.append(dp_event(r.mechanism))
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

    def reset(self, *, site: str, reason: str, operator: str | None = None) -> LedgerEntry:
        """The operator's explicit reset: appends a signed record, with its reason, after which releases count afresh."""
        reason = reason.strip()
        if not reason:
            raise BudgetResetError(
                f"{site}: a budget reset needs a reason (--reason); it is recorded in the ledger and shown by the audit"
            )
        releases = self.releases()
        spent = self.spent() if releases else 0.0
        entry = self.ledger.append(
            BudgetReset(
                site=site,
                reason=reason,
                operator=operator or f"{getpass.getuser()}@{socket.gethostname()}",
                releases_before=len(releases),
                epsilon_before=spent if math.isfinite(spent) else None,
                created=now(),
            )
        )
        self._releases, self._seen = None, None
        return entry
