"""The wire format of secure aggregation: one request and one reply shape for its stages.

Keys are agreed once per epoch (the first round, and again when the cohort
changes); every round then costs two exchanges, mask and unmask.

    stage (message type)        aggregator sends                      site answers
    setup (query.secagg_setup)  the round (only to nodes not yet       its name
                                named)
    advertise (query...)        the epoch's SecAggConfig              signed X25519 public keys
    mask (train.secagg_mask)    the model, the round's SecAggConfig,  its masked vector, metrics, ledger entry,
                                every advertisement (first round of   its fresh seed's shares sealed per peer;
                                an epoch only)                        or `REKEY`: it holds no keys of that epoch
    unmask (query...)           survivors, dropped, the seed shares   its shares of the survivors' seeds, its
                                sealed to it by the survivors         pair keys of this round with the dropped

Bytes travel in a ConfigRecord "secagg" keyed by site name (or by
"site/field" for forwarded advertisements, "seed/site" and "pair/site" in an
unmask answer), lists as JSON; the masked vector is a uint64 Array. Decoding
raises `ProtocolError` naming the sender and what is wrong; the cryptographic
checks are the secagg sessions'.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpriv.common.privacy.records import LedgerEntry
from fedpriv.common.wire.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    OK,
    PRIVACY,
    PRIVACY_ENTRY,
    SERVER_ROUND,
    SITE,
    SITE_REASON,
    SITE_STATUS,
    Metrics,
    ProtocolError,
    _entry,
    _record,
    _site,
    _site_record,
    sender,
)

SETUP: Final = "secagg_setup"
ADVERTISE: Final = "secagg_advertise"
MASK: Final = "secagg_mask"
UNMASK: Final = "secagg_unmask"
STAGES: Final = (SETUP, ADVERTISE, MASK, UNMASK)
QUERY_STAGES: Final = (SETUP, ADVERTISE, UNMASK)  # Flower query messages; MASK is a train message

# A site's answer to a mask request of keys it does not hold (its agent restarted, or the keys are of an
# agreement it missed): nothing was computed; the aggregator agrees keys again before the next round.
REKEY: Final = "secagg-rekey"

SECAGG: Final = "secagg"  # the record of a stage's bytes
ROUND_CONFIG: Final = "round-config"  # the SecAggConfig, as JSON
SURVIVORS: Final = "survivors"
DROPPED: Final = "dropped"
MASKED: Final = "masked"  # the reply's ArrayRecord holding the masked vector
VECTOR: Final = "vector"


def message_type(stage: str) -> str:
    """Flower's message type of a stage: masking trains, the others only ask."""
    if stage not in STAGES:
        raise ValueError(f"unknown secure-aggregation stage {stage!r}")
    return f"train.{stage}" if stage == MASK else f"query.{stage}"


def rekey_content(site: str, reason: str) -> RecordDict:
    return RecordDict({SITE: _site_record(site, REKEY, reason)})


def rekey_reason(msg: Message) -> str | None:
    """Why a reply asks for key agreement again, or None for any other reply."""
    if msg.has_error():
        return None
    record = msg.content.config_records.get(SITE)
    if record is None or record.get(SITE_STATUS) != REKEY:
        return None
    return str(record.get(SITE_REASON, ""))


def _bytes_record(values: Mapping[str, bytes]) -> ConfigRecord:
    return ConfigRecord({key: bytes(value) for key, value in values.items()})


def _read_bytes(record: ConfigRecord | None, who: str) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    for key, value in (record or {}).items():
        if not isinstance(value, bytes):
            raise ProtocolError(f"{who}: '{SECAGG}' value {key!r} is a {type(value).__name__}, not bytes")
        values[key] = value
    return values


@dataclass(frozen=True)
class StageRequest:
    """What the aggregator sends in one stage; `arrays` only with the mask stage."""

    stage: str
    server_round: int
    round_config: str = ""
    data: Mapping[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    arrays: ArrayRecord | None = None

    def to_content(self) -> RecordDict:
        config = ConfigRecord(
            {
                SERVER_ROUND: self.server_round,
                ROUND_CONFIG: self.round_config,
                SURVIVORS: json.dumps(list(self.survivors)),
                DROPPED: json.dumps(list(self.dropped)),
            }
        )
        content = RecordDict({CONFIG: config, SECAGG: _bytes_record(self.data)})
        if self.arrays is not None:
            content[ARRAYS] = self.arrays
        return content

    @classmethod
    def from_message(cls, msg: Message) -> StageRequest:
        who = f"secure-aggregation request from node {msg.metadata.src_node_id}"
        stage = msg.metadata.message_type.partition(".")[2]
        if stage not in STAGES:
            raise ProtocolError(f"{who}: unknown stage in message type {msg.metadata.message_type!r}")
        config = _record(msg, who, CONFIG, ConfigRecord, "the round")
        try:
            survivors = tuple(json.loads(str(config.get(SURVIVORS, "[]"))))
            dropped = tuple(json.loads(str(config.get(DROPPED, "[]"))))
            server_round = int(config[SERVER_ROUND])
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"{who}: the '{CONFIG}' record is malformed ({error})") from None
        if not all(isinstance(s, str) for s in (*survivors, *dropped)):
            raise ProtocolError(f"{who}: survivors and dropped must be lists of site names")
        arrays = _record(msg, who, ARRAYS, ArrayRecord, "the global model", required=stage == MASK)
        return cls(
            stage=stage,
            server_round=server_round,
            round_config=str(config.get(ROUND_CONFIG, "")),
            data=_read_bytes(_record(msg, who, SECAGG, ConfigRecord, "the stage's data", required=False), who),
            survivors=survivors,
            dropped=dropped,
            arrays=arrays,
        )


@dataclass(frozen=True)
class StageReply:
    """A site's answer in one stage; `masked`, `metrics` and `entry` only with the mask stage."""

    site: str
    data: Mapping[str, bytes] = field(default_factory=dict)
    masked: np.ndarray | None = None
    metrics: Metrics = field(default_factory=dict)
    entry: LedgerEntry | None = None

    def to_content(self) -> RecordDict:
        content = RecordDict({SITE: _site_record(self.site, OK), SECAGG: _bytes_record(self.data)})
        if self.masked is not None:
            content[MASKED] = ArrayRecord({VECTOR: Array(np.ascontiguousarray(self.masked, dtype=np.uint64))})
            content[METRICS] = MetricRecord(dict(self.metrics))
        if self.entry is not None:
            content[PRIVACY] = ConfigRecord({PRIVACY_ENTRY: json.dumps(self.entry.written)})
        return content

    @classmethod
    def from_message(cls, msg: Message, stage: str) -> StageReply:
        who = f"secure-aggregation reply from {sender(msg)}"
        site, _ = _site(msg, who)
        data = _read_bytes(_record(msg, who, SECAGG, ConfigRecord, "the stage's data", required=False), who)
        if stage != MASK:
            return cls(site=site, data=data)
        arrays = _record(msg, who, MASKED, ArrayRecord, "the masked vector")
        if VECTOR not in arrays:
            raise ProtocolError(f"{who}: the '{MASKED}' record has no '{VECTOR}'")
        vector = arrays[VECTOR].numpy()
        if vector.dtype != np.uint64 or vector.ndim != 1:
            raise ProtocolError(f"{who}: the masked vector must be 1-D uint64, got {vector.dtype} {vector.shape}")
        metrics = dict(_record(msg, who, METRICS, MetricRecord, "the site's metrics"))
        return cls(site=site, data=data, masked=vector, metrics=metrics, entry=_entry(msg, who))


def masked_sha256(masked: np.ndarray) -> str:
    """What a site's ledger entry names for a masked release: the hash of the very vector sent."""
    return hashlib.sha256(np.ascontiguousarray(masked, dtype=np.uint64).tobytes()).hexdigest()


_SEED, _PAIR = "seed/", "pair/"


def unmask_to_data(seed_shares: Mapping[str, bytes], pair_keys: Mapping[str, bytes]) -> dict[str, bytes]:
    return {**{_SEED + s: v for s, v in seed_shares.items()}, **{_PAIR + s: v for s, v in pair_keys.items()}}


def unmask_from_data(data: Mapping[str, bytes], who: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(owner -> seed share, dropped -> pair key) from an unmask answer."""
    seed_shares, pair_keys = {}, {}
    for key, value in data.items():
        if key.startswith(_SEED):
            seed_shares[key.removeprefix(_SEED)] = value
        elif key.startswith(_PAIR):
            pair_keys[key.removeprefix(_PAIR)] = value
        else:
            raise ProtocolError(
                f"{who}: unmask answer has an entry {key!r} that is neither a seed share nor a pair key"
            )
    return seed_shares, pair_keys


def advertisements_to_data(advertisements: Mapping[str, Mapping[str, bytes]]) -> dict[str, bytes]:
    return {f"{site}/{key}": value for site, ad in advertisements.items() for key, value in ad.items()}


def advertisements_from_data(data: Mapping[str, bytes]) -> dict[str, dict[str, bytes]]:
    advertisements: dict[str, dict[str, bytes]] = {}
    for key, value in data.items():
        site, _, name = key.rpartition("/")
        advertisements.setdefault(site, {})[name] = value
    return advertisements
