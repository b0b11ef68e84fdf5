"""The one way anything derived from a site's data leaves it.

Every round type (a plain training round, a secure round with local or
distributed noise, a noised or clear evaluation) releases through `release`:

1. the round's settings, as the aggregator proposed them, are turned into a
   planned release (`Proposal`);
2. the plan is checked against the site's own policy (`refusal`): a round
   that would weaken it is refused, with the reason in the site's log and in
   its reply, before anything is computed;
3. the site's budget must allow the planned release;
4. the release is computed, checked again as made, and recorded (signed,
   fsynced) in the site's ledger;
5. only then does the caller send it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fedpriv.client.runtime import SiteRuntime
from fedpriv.common.errors import FedprivError
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.privacy.accounting import dp_event, epsilon
from fedpriv.common.privacy.records import LedgerEntry, Mechanism, PrivacyRecord
from fedpriv.common.wire.protocol import EPSILON, EPSILON_CAP, EXHAUSTED, NUM_EXAMPLES, REFUSED, SITE_WEIGHT

log = logging.getLogger(CLIENT_LOG)


class PolicyRefusal(FedprivError):
    """A release the site's policy forbids, found only once it was made (never sent)."""


@dataclass(frozen=True)
class Proposal:
    """One release as a round's settings plan it; `planned` is None for a release without DP."""

    query: Literal["update", "evaluation"]
    planned: Mechanism | None
    mode: str = ""  # the fine-tuning mode of an update
    noise: Literal["local", "distributed"] | None = None  # under secure aggregation
    max_colluding: int | None = None  # t of a secure round
    cohort: tuple[str, ...] = ()  # the sites a secure round names
    roster: frozenset[str] | None = None  # the federation's sites, as provisioned to this one


@dataclass(frozen=True)
class Made:
    """A computed release: what leaves, the mechanism that made it, and the digest its record signs."""

    payload: Any
    mechanism: Mechanism
    digest: str
    metrics: dict[str, float | int] = field(default_factory=dict)


@dataclass(frozen=True)
class Released:
    payload: Any
    entry: LedgerEntry
    metrics: dict[str, float | int]

    @property
    def epsilon(self) -> float:
        record = self.entry.record
        assert isinstance(record, PrivacyRecord)  # a site records its releases as PrivacyRecords
        spent = record.accounting.epsilon
        return math.inf if spent is None else spent


@dataclass(frozen=True)
class Withheld:
    """Nothing left the site: its budget is spent (EXHAUSTED) or its policy refused the round (REFUSED)."""

    status: str
    reason: str
    metrics: dict[str, float | int]


def refusal(site: SiteRuntime, proposal: Proposal) -> str | None:
    """Why the site's policy forbids this release, or None."""
    policy = site.policy
    reasons = []
    planned = proposal.planned
    if planned is None or planned.noise_multiplier <= 0:
        if not policy.allow_non_private:
            what = "training" if proposal.query == "update" else "evaluation metrics"
            reasons.append(
                f"the round asks for {what} without DP and its policy allows no non-private release "
                "(its operator can set allow-non-private=true)"
            )
    elif planned.noise_multiplier < policy.min_noise_multiplier:
        # Refused on the noise alone: no accounting of a release this weak (PLD of tiny noise takes minutes).
        reasons.append(
            f"noise multiplier {planned.noise_multiplier:.4g} is below its minimum {policy.min_noise_multiplier:g}"
        )
    elif math.isfinite(policy.max_release_epsilon):
        alone, accountant = release_epsilon(site, planned)
        if alone > policy.max_release_epsilon:
            reasons.append(
                f"this one release would cost epsilon {alone:.4g} ({accountant}), above its per-release maximum "
                f"{policy.max_release_epsilon:g}"
            )
    if proposal.query == "update" and proposal.mode and proposal.mode not in policy.modes:
        reasons.append(f"model.mode {proposal.mode} is not one it accepts ({', '.join(policy.modes)})")
    if proposal.noise is not None and proposal.noise not in policy.noise_modes:
        reasons.append(f"privacy.noise {proposal.noise} is not one it accepts ({', '.join(policy.noise_modes)})")
    if proposal.max_colluding is not None and proposal.max_colluding < policy.min_colluding_sites:
        reasons.append(
            f"the round assumes at most {proposal.max_colluding} colluding site(s), fewer than its own bound "
            f"{policy.min_colluding_sites} (a smaller bound means a smaller noise share and weaker masking)"
        )
    if proposal.roster is not None:
        strangers = sorted(set(proposal.cohort) - proposal.roster)
        if strangers:
            reasons.append(f"the round's cohort names sites outside the federation's roster: {', '.join(strangers)}")
    return "; ".join(reasons) or None


# Below this noise multiplier a release is judged by RDP: an upper bound, computed at once for any noise.
FAST_ACCOUNTING_BELOW = 0.3


def release_epsilon(site: SiteRuntime, mechanism: Mechanism) -> tuple[float, str]:
    """Epsilon of this release alone at the site's delta, and the accountant that computed it."""
    budget = site.budget
    accountant = budget.accountant if mechanism.noise_multiplier >= FAST_ACCOUNTING_BELOW else "rdp"
    return epsilon([dp_event(mechanism)], budget.delta, accountant), accountant


def check(site: SiteRuntime, proposal: Proposal, server_round: int) -> Withheld | None:
    """The checks made before anything is computed: the site's policy, then its budget."""
    reason = refusal(site, proposal)
    if reason:
        log.warning("%s round %d: refused: %s", site.name, server_round, reason)
        return Withheld(REFUSED, f"{site.name} refuses: {reason}", {NUM_EXAMPLES: 0, SITE_WEIGHT: 0})
    planned = proposal.planned
    if planned is not None and planned.noise_multiplier > 0:
        budget = site.budget
        if not budget.allows(planned):
            spent = budget.spent()
            log.warning(
                "%s round %d: budget exhausted (spent %.4f, this %s would reach %.4f > cap %.4f); not releasing",
                site.name,
                server_round,
                spent,
                proposal.query,
                budget.after(planned),
                budget.cap,
            )
            metrics = {NUM_EXAMPLES: 0, SITE_WEIGHT: 0, EPSILON: spent, EPSILON_CAP: budget.cap}
            return Withheld(EXHAUSTED, f"{site.name}: budget exhausted", metrics)
    return None


def release(
    site: SiteRuntime, proposal: Proposal, compute: Callable[[], Made], *, run_id: str, server_round: int
) -> Released | Withheld:
    """Checks, computes, records; the caller sends the payload of a `Released` and nothing else."""
    withheld = check(site, proposal, server_round)
    if withheld is not None:
        return withheld
    made = compute()
    # What was made, not only what was planned, must pass (steps taken can differ from the plan).
    reason = refusal(site, dataclasses.replace(proposal, planned=made.mechanism))
    if reason:
        raise PolicyRefusal(f"{site.name} round {server_round}: the release as made breaks its policy: {reason}")
    entry = site.budget.record(
        run_id=run_id,
        server_round=server_round,
        site=site.name,
        mechanism=made.mechanism,
        update_sha256=made.digest,
    )
    return Released(made.payload, entry, made.metrics)
