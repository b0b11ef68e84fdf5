"""The run log's events (`metrics.jsonl`): one typed record per kind, as the aggregator writes them.

The aggregator writes them (`RunDirectory.log`); the simulation's monitor,
the deploy CLI, summaries and reports read them (`RunDirectory.read`). A line
on disk is `{"kind": ..., "time": ..., <fields>}` with the fields' hyphenated
names; a field left unset is not written, so old run logs read back the same.
Events that carry a site's or a strategy's metrics keep them as extra fields
(`metrics`): which metrics there are is the protocol's business, not the
log's.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def _hyphenated(name: str) -> str:
    return name.replace("_", "-")


class RunEvent(BaseModel):
    """What happened, once; `time` is set when it is written."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=_hyphenated, validate_by_name=True, validate_by_alias=True
    )
    KIND: ClassVar[str]

    time: float | None = None

    def fields(self) -> dict[str, Any]:
        """The line's fields as written (time and kind aside)."""
        return self.model_dump(by_alias=True, exclude_unset=True, exclude={"time"})


class WithMetrics(RunEvent):
    """An event carrying metrics named by the wire protocol (e.g. `num-examples`, `epsilon`)."""

    model_config = ConfigDict(extra="allow")

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunStart(RunEvent):
    KIND = "run-start"
    run_id: int = Field(alias="run_id")
    rounds: int
    labels: int | None = None


class LedgerKey(RunEvent):
    """The fingerprint of the aggregator's ledger key, and the hash of the run's public keys file (if any)."""

    KIND = "ledger-key"
    signer: str
    public_keys_sha256: str | None = None


class RunFailed(RunEvent):
    KIND = "run-failed"
    error: str
    type: str


class RunEnd(RunEvent):
    KIND = "run-end"
    seconds: float
    model: str = ""


class Resumed(RunEvent):
    KIND = "resumed"
    round: int


class RoundStart(RunEvent):
    KIND = "round-start"
    round: int
    rounds: int
    # The model sent out: ties a resumed round to the checkpoint it continued from.
    global_sha256: str


class RoundEnd(RunEvent):
    KIND = "round-end"
    round: int
    seconds: float | None
    recovered: bool = False  # its end was not logged before a stop; the checkpoint shows it complete


class TrainAggregate(WithMetrics):
    KIND = "train-aggregate"
    round: int
    sites: int
    dropped: int | None = None
    secure: bool = False


class SiteLevelRelease(RunEvent):
    KIND = "site-level-release"
    round: int
    epsilon: float | None
    delta: float


class SiteLevelBudgetExhausted(RunEvent):
    KIND = "site-level-budget-exhausted"
    round: int
    reason: str


class AllSitesRefused(RunEvent):
    KIND = "all-sites-refused"
    round: int
    sites: int
    exhausted: int


class AllBudgetsExhausted(RunEvent):
    KIND = "all-budgets-exhausted"
    round: int
    sites: int


class SiteTrain(WithMetrics):
    KIND = "site-train"
    round: int
    site: str


class SiteBudgetExhausted(WithMetrics):
    KIND = "site-budget-exhausted"
    round: int
    site: str


class SiteError(RunEvent):
    KIND = "site-error"
    round: int
    site: str
    reason: str
    phase: str | None = None  # train (unset), evaluate, or a secure stage


class SiteRefused(RunEvent):
    """The site's policy refused the round: the reason is the site's own."""

    KIND = "site-refused"
    round: int
    site: str
    reason: str
    phase: str


class SiteRejected(RunEvent):
    """The aggregator refused the site's reply."""

    KIND = "site-rejected"
    round: int
    site: str
    reason: str


class SiteEvaluate(WithMetrics):
    KIND = "site-evaluate"
    round: int
    site: str
    status: str


class FederatedEvaluate(WithMetrics):
    KIND = "federated-evaluate"
    round: int


class CentralEvaluate(WithMetrics):
    KIND = "central-evaluate"
    round: int
    accuracy: float


class SecureStage(RunEvent):
    """Who was asked a secure stage, before waiting for them."""

    KIND = "secure-stage"
    round: int
    stage: str
    sites: list[str]


class SiteRekey(RunEvent):
    KIND = "site-rekey"
    round: int
    site: str
    reason: str
    phase: str


class SecureKeys(RunEvent):
    """Keys are agreed (again) this round, and why."""

    KIND = "secure-keys"
    round: int
    reason: str
    sites: int | None = None  # the cohort the keys are agreed among
    threshold: int | None = None  # shares needed to unmask: the round survives sites - threshold dropouts


class SecureRoundAbandoned(RunEvent):
    KIND = "secure-round-abandoned"
    round: int
    reason: str


def _kinds(base: type[RunEvent]) -> dict[str, type[RunEvent]]:
    found: dict[str, type[RunEvent]] = {}
    for cls in base.__subclasses__():
        if "KIND" in cls.__dict__:
            found[cls.KIND] = cls
        found.update(_kinds(cls))
    return found


KINDS: dict[str, type[RunEvent]] = _kinds(RunEvent)
KINDS_BY_NAME: dict[str, type[RunEvent]] = {cls.__name__: cls for cls in KINDS.values()}

E = TypeVar("E", bound=RunEvent)


def parse(line: dict[str, Any], as_type: type[E] | None = None) -> E | RunEvent | None:
    """The typed event of one parsed line; None for a kind this version does not know.

    Raises pydantic's ValidationError for a known kind whose fields are wrong.
    """
    fields = dict(line)
    kind = fields.pop("kind", None)
    cls = as_type or KINDS.get(str(kind))
    if cls is None or cls.KIND != kind:
        return None
    return cls.model_validate(fields)
