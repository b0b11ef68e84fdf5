"""Whether a site's train reply is admitted into the aggregate: every check, in one place.

A reply is decoded by the wire protocol, then its update is admitted only if
the site's signed ledger entry came with it (in a private federation), is
intact and signed by the key it names, describes this very update (by hash),
and was released with DP noise (in a private federation). The verdict says
why not; the round loop only keeps the books.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message

from fedpriv.common.privacy.ledger import verify_entry
from fedpriv.common.privacy.records import LedgerEntry, PrivacyRecord, state_sha256
from fedpriv.common.wire.protocol import EXHAUSTED, REFUSED, ProtocolError, TrainReply, sender
from fedpriv.server.update_checks import ReleaseHistory, RoundContext, metrics_problem, update_problem


@dataclass(frozen=True)
class Admitted:
    """An update fit to aggregate, with the site's entry of its release (None in a non-private run without one)."""

    site: str
    reply: TrainReply
    entry: LedgerEntry | None


@dataclass(frozen=True)
class Exhausted:
    """The site's budget is spent: it did not train."""

    site: str
    reply: TrainReply


@dataclass(frozen=True)
class Refused:
    """The site's own privacy policy forbids what the round asked: it did not train; `reason` is its word."""

    site: str
    reason: str


@dataclass(frozen=True)
class Failed:
    """The site answered with an error instead of an update."""

    site: str
    reason: str


@dataclass(frozen=True)
class Rejected:
    """The site sent an update that must not be aggregated; `reason` says why."""

    site: str
    reason: str


Verdict = Admitted | Exhausted | Refused | Failed | Rejected


def admit(
    msg: Message,
    privacy_required: bool,
    context: RoundContext | None = None,
    history: ReleaseHistory | None = None,
) -> Verdict:
    """The verdict on one train reply; `privacy_required` is the federation's privacy.enabled.

    With the round's `context`, the update's content is checked too (shape,
    type, finiteness, size, counts); with the run's `history`, its record must
    be new, of this run and round, and claim what its mechanism costs.
    """
    site = sender(msg)
    if msg.has_error():
        return Failed(site, msg.error.reason or f"error code {msg.error.code}")
    try:
        reply = TrainReply.from_message(msg)
    except ProtocolError as error:
        return Rejected(site, str(error))
    if reply.status == EXHAUSTED:
        return Exhausted(reply.site, reply)
    if reply.status == REFUSED:
        return Refused(reply.site, reply.reason or "no reason given")
    problem = release_problem(reply, privacy_required)
    if problem is None and context is not None:
        problem = update_problem(reply.update_state(), context) or metrics_problem(reply.metrics, context)
        if problem is None and history is not None and reply.entry is not None:
            problem = history.problem(reply.site, reply.entry, context)
    if problem:
        return Rejected(reply.site, problem)
    if history is not None and reply.entry is not None:
        history.accept(reply.site, reply.entry)
    return Admitted(reply.site, reply, reply.entry)


def release_problem(reply: TrainReply, privacy_required: bool) -> str | None:
    """Why this update must not be aggregated, or None."""
    entry = reply.entry
    if entry is None:
        return "no privacy record came with the update" if privacy_required else None
    reason = verify_entry(entry)
    if reason:
        return f"privacy record rejected: {reason}"
    record = entry.record
    assert isinstance(record, PrivacyRecord)  # the protocol admits no other kind
    if record.update_sha256 != state_sha256(reply.update_state()):
        return "the update differs from the one its privacy record describes"
    if privacy_required and not record.mechanism.noise_multiplier > 0:
        return "update released without DP noise in a private federation"
    return None
