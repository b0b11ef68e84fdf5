"""A site's privacy budget: what its ledger says was spent, and the hard cap.

The site alone decides whether it may release another update: before
training it computes the epsilon it would reach after this round's release,
from its own signed ledger, and refuses if that is above its cap. No setting
of the aggregator can make a site exceed its cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

from fedpriv.common.accounting import Release, epsilon
from fedpriv.common.ledger import Ledger
from fedpriv.common.records import Accounting, LedgerEntry, Mechanism, PrivacyRecord, now


@dataclass
class SiteBudget:
    ledger: Ledger
    data_id: str
    cap: float
    delta: float
    accountant: str

    def releases(self) -> list[Release]:
        """Every release of this data the ledger holds, from any run."""
        return [
            Release(r.mechanism.noise_multiplier, r.mechanism.sample_rate, r.mechanism.steps)
            for r in self.ledger.records()
            if isinstance(r, PrivacyRecord) and r.party == "site" and r.data_id == self.data_id
        ]

    def spent(self) -> float:
        return epsilon(self.releases(), self.delta, self.accountant)

    def after(self, release: Release) -> float:
        return epsilon([*self.releases(), release], self.delta, self.accountant)

    def allows(self, release: Release) -> bool:
        return self.after(release) <= self.cap

    def record(
        self, *, run_id: str, server_round: int, site: str, mechanism: Mechanism, update_sha256: str
    ) -> LedgerEntry:
        """Appends the signed record of a release that is about to leave the site."""
        release = Release(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)
        private = mechanism.noise_multiplier > 0
        spent = self.after(release)
        if private and spent > self.cap:  # never record (or send) past the cap, whatever the caller did
            raise RuntimeError(f"{site}: release would spend epsilon {spent:.4f} above the cap {self.cap}")
        record = PrivacyRecord(
            run_id=run_id,
            round=server_round,
            party="site",
            site=site,
            data_id=self.data_id,
            mechanism=mechanism,
            accounting=Accounting(
                accountant=self.accountant,
                library="opacus",
                library_version=version("opacus"),
                delta=self.delta,
                # A release without noise has no finite epsilon: recorded as null.
                epsilon=spent if private else None,
                epsilon_cap=self.cap if private else None,
            ),
            update_sha256=update_sha256,
            created=now(),
        )
        return self.ledger.append(record)
