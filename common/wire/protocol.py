"""The wire format between the aggregator and the sites.

Instructions are written by Flower's strategies: FedAvg and its kin send the
global model as the ArrayRecord "arrays" and a ConfigRecord "config" holding
"server-round"; FedProx adds "proximal-mu". The names here must match theirs.

Replies are fedpriv's own. A train reply holds the updated model ("arrays"),
its metrics ("metrics": exactly one MetricRecord, whose keys Flower
aggregates), who answered and how ("site": name and status) and the site's
signed ledger entry for this release ("privacy": the entry as JSON). A site
whose budget is spent, or whose own privacy policy refuses the round, answers
with its status (and the reason) and metrics only. An evaluate reply holds
"metrics" and "site".

`TrainReply` and `EvaluateReply` are the typed form of a reply: sites build
their content with `to_content()`, the aggregator reads them back with
`from_message()`, which raises a `ProtocolError` naming what is wrong.
Whether a decoded train reply may be aggregated is decided elsewhere
(`fedpriv.server.admission`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from pydantic import ValidationError

from fedpriv.common.errors import FedprivError
from fedpriv.common.privacy.records import LedgerEntry, PrivacyRecord

# The records of a message.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
SITE: Final = "site"
PRIVACY: Final = "privacy"

# The instruction's config record, as Flower's strategies fill it.
SERVER_ROUND: Final = "server-round"
PROXIMAL_MU: Final = "proximal-mu"

# The reply's site record, and its statuses.
SITE_NAME: Final = "name"
SITE_STATUS: Final = "status"
SITE_REASON: Final = "reason"  # why nothing was released (withheld replies)
OK: Final = "ok"
EXHAUSTED: Final = "budget-exhausted"
REFUSED: Final = "policy-refused"  # the site's own policy forbids what the round asks
Status = Literal["ok", "budget-exhausted", "policy-refused"]
WITHHELD: Final = (EXHAUSTED, REFUSED)

# The reply's privacy record: the site's ledger entry of this release, as JSON.
PRIVACY_ENTRY: Final = "entry"

# Metric keys. NUM_EXAMPLES weighs FedAvg; SITE_WEIGHT weighs every site the
# same (site-level DP); the federation's EPSILON is the largest of the sites'.
NUM_EXAMPLES: Final = "num-examples"
SITE_WEIGHT: Final = "site-weight"
EPSILON: Final = "epsilon"
EPSILON_CAP: Final = "epsilon-cap"
DELTA: Final = "delta"
NOISE_MULTIPLIER: Final = "noise-multiplier"
SAMPLE_RATE: Final = "sample-rate"
TRAIN_LOSS: Final = "train-loss"
STEPS: Final = "steps"
SECONDS: Final = "seconds"
LOSS: Final = "loss"
ACCURACY: Final = "accuracy"
# A noised evaluation's two released counts (accuracy is their post-processed ratio).
NOISY_CORRECT: Final = "noisy-correct"
NOISY_TOTAL: Final = "noisy-total"

Metrics = Mapping[str, int | float]


class ProtocolError(FedprivError):
    """A message that does not follow fedpriv's wire format; the message says whose and what."""


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A model state (name -> array) as the ArrayRecord that carries it."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def sender(msg: Message) -> str:
    """The name a reply gives for its site, or its node id when it gives none."""
    record = None if msg.has_error() else msg.content.config_records.get(SITE)
    if record is not None and SITE_NAME in record:
        return str(record[SITE_NAME])
    return f"node-{msg.metadata.src_node_id}"


def _record(msg: Message, who: str, name: str, kind: type, what: str, required: bool = True):
    if msg.has_error():
        raise ProtocolError(f"{who}: an error reply ({msg.error.reason}), not content")
    found = msg.content.get(name)
    if found is None:
        if required:
            raise ProtocolError(f"{who}: no '{name}' record ({what})")
        return None
    if not isinstance(found, kind):
        raise ProtocolError(f"{who}: the '{name}' record is a {type(found).__name__}, not a {kind.__name__}")
    return found


@dataclass(frozen=True)
class Instruction:
    """What the aggregator sends a site each round (train or evaluate)."""

    arrays: ArrayRecord
    server_round: int = 0
    proximal_mu: float = 0.0

    @classmethod
    def from_message(cls, msg: Message) -> Instruction:
        who = f"instruction from node {msg.metadata.src_node_id}"
        arrays = _record(msg, who, ARRAYS, ArrayRecord, "the global model")
        config = _record(msg, who, CONFIG, ConfigRecord, "the round's settings", required=False) or {}
        try:
            return cls(
                arrays=arrays,
                server_round=int(config.get(SERVER_ROUND, 0)),
                proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
            )
        except (TypeError, ValueError) as error:
            raise ProtocolError(f"{who}: the '{CONFIG}' record holds a value of the wrong type ({error})") from None

    def state(self) -> dict[str, np.ndarray]:
        """The global model, decoded."""
        return from_record(self.arrays)

    def to_content(self) -> RecordDict:
        config = ConfigRecord({SERVER_ROUND: self.server_round, PROXIMAL_MU: self.proximal_mu})
        return RecordDict({ARRAYS: self.arrays, CONFIG: config})


def _site(msg: Message, who: str) -> tuple[str, Status]:
    record = _record(msg, who, SITE, ConfigRecord, "the site's name and status")
    for key in (SITE_NAME, SITE_STATUS):
        if not isinstance(record.get(key), str):
            raise ProtocolError(f"{who}: the '{SITE}' record has no '{key}' text")
    status = record[SITE_STATUS]
    if status not in (OK, *WITHHELD):
        raise ProtocolError(f"{who}: unknown status '{status}' (expected one of {', '.join((OK, *WITHHELD))})")
    return record[SITE_NAME], cast(Status, status)


def _site_record(name: str, status: str, reason: str = "") -> ConfigRecord:
    record = ConfigRecord({SITE_NAME: name, SITE_STATUS: status})
    if reason:
        record[SITE_REASON] = reason
    return record


def withheld_content(site: str, status: str, reason: str, metrics: Metrics) -> RecordDict:
    """A reply of any kind (train, evaluate, a secure stage) saying that the site released nothing, and why."""
    if status not in WITHHELD:
        raise ValueError(f"{status!r} is not a withheld status")
    return RecordDict({METRICS: MetricRecord(dict(metrics)), SITE: _site_record(site, status, reason)})


def withheld(msg: Message) -> tuple[str, str] | None:
    """(status, reason) when a reply says its site released nothing; None for any other reply."""
    if msg.has_error():
        return None
    record = msg.content.config_records.get(SITE)
    if record is None or record.get(SITE_STATUS) not in WITHHELD:
        return None
    return str(record[SITE_STATUS]), str(record.get(SITE_REASON, ""))


@dataclass(frozen=True)
class TrainReply:
    """A site's answer to a train instruction: its update and the signed record of its release."""

    site: str
    status: Status
    metrics: Metrics
    update: ArrayRecord | None = None
    entry: LedgerEntry | None = None
    reason: str = ""

    @classmethod
    def trained(cls, site: str, update: Mapping[str, np.ndarray], metrics: Metrics, entry: LedgerEntry) -> TrainReply:
        return cls(site=site, status=OK, metrics=metrics, update=to_record(update), entry=entry)

    @classmethod
    def exhausted(cls, site: str, metrics: Metrics) -> TrainReply:
        return cls(site=site, status=EXHAUSTED, metrics=metrics)

    def to_content(self) -> RecordDict:
        content = RecordDict(
            {METRICS: MetricRecord(dict(self.metrics)), SITE: _site_record(self.site, self.status, self.reason)}
        )
        if self.update is not None:
            content[ARRAYS] = self.update
        if self.entry is not None:
            content[PRIVACY] = ConfigRecord({PRIVACY_ENTRY: json.dumps(self.entry.written)})
        return content

    @classmethod
    def from_message(cls, msg: Message) -> TrainReply:
        who = f"train reply from {sender(msg)}"
        site, status = _site(msg, who)
        metrics = dict(_record(msg, who, METRICS, MetricRecord, "the site's metrics"))
        if status in WITHHELD:
            return cls(site=site, status=status, metrics=metrics, reason=str(msg.content[SITE].get(SITE_REASON, "")))
        update = _record(msg, who, ARRAYS, ArrayRecord, "the site's update")
        return cls(site=site, status=status, metrics=metrics, update=update, entry=_entry(msg, who))

    def update_state(self) -> dict[str, np.ndarray]:
        if self.update is None:
            raise ValueError(f"{self.site}: a reply with status '{self.status}' carries no update")
        return from_record(self.update)


def _entry(msg: Message, who: str) -> LedgerEntry | None:
    record = _record(msg, who, PRIVACY, ConfigRecord, "the site's signed ledger entry", required=False)
    if record is None or PRIVACY_ENTRY not in record:
        return None
    try:
        written = json.loads(str(record[PRIVACY_ENTRY]))
    except json.JSONDecodeError:
        raise ProtocolError(f"{who}: the privacy record is not JSON") from None
    try:
        entry = LedgerEntry.model_validate(written)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "entry"
        raise ProtocolError(f"{who}: the privacy record is malformed ({where}: {first['msg']})") from None
    if not isinstance(entry.record, PrivacyRecord):
        raise ProtocolError(f"{who}: the privacy record holds a '{entry.record.kind}' record, not a release")
    return entry


@dataclass(frozen=True)
class EvaluateReply:
    """A site's answer to an evaluate instruction: metrics of the global model on its validation data."""

    site: str
    metrics: Metrics
    status: Status = OK
    reason: str = ""

    def to_content(self) -> RecordDict:
        return RecordDict(
            {METRICS: MetricRecord(dict(self.metrics)), SITE: _site_record(self.site, self.status, self.reason)}
        )

    @classmethod
    def from_message(cls, msg: Message) -> EvaluateReply:
        who = f"evaluate reply from {sender(msg)}"
        site, status = _site(msg, who)
        metrics = _record(msg, who, METRICS, MetricRecord, "the site's metrics")
        return cls(site=site, metrics=dict(metrics), status=status, reason=str(msg.content[SITE].get(SITE_REASON, "")))
