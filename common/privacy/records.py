"""What the ledgers hold: privacy records, the aggregator's receipts, and signed entries.

As in Google's dp_accounting, the *mechanism* is an immutable description of
what happened (a Poisson-sampled Gaussian mechanism composed `steps` times,
with its noise, rate, clipping norm and dataset size), so any accountant can
compute epsilon from it later. The *accounting* part is the claim made at the
time: which accountant, which library version, which delta, what cumulative
epsilon and what cap. `fedpriv audit` recomputes the claim from the
mechanisms alone.

Every record kind a ledger holds is a model here, written and read back as
the same type (`LedgerRecord`), inside a `LedgerEntry`. An entry read from a
file keeps the exact JSON it was written as: its hash and signature cover
those bytes, never a re-dump of the parsed model (which could turn 8 into 8.0).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    model_serializer,
    model_validator,
)

SCHEMA: Final = "fedpriv.privacy-record/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DistributedNoise(_Frozen):
    """How a distributed release's noise was made: each site's share, summed under secure aggregation.

    The accounted noise multiplier is total x C / (C + sqrt(dimension) x
    quantization): the sum's noise relative to the sensitivity left after the
    clipped sum is rounded to the encoding's grid. It holds while at most
    `max_colluding` of the `cohort` sites collude with the aggregator or drop out.
    """

    total_noise_multiplier: float = Field(gt=0, description="sigma of the sum, in units of the clipping norm C.")
    noise_share: float = Field(gt=0, description="Each site's noise std in units of C: sigma / sqrt(n - t).")
    cohort: int = Field(ge=2, description="n: the sites the round began with.")
    max_colluding: int = Field(ge=0, description="t: sites that may collude with the aggregator or drop out.")
    quantization: float = Field(gt=0, description="Grid spacing of the encoding.")
    dimension: int = Field(ge=1, description="Numbers in the vector.")

    def accounted_noise_multiplier(self, max_grad_norm: float) -> float:
        return self.total_noise_multiplier * max_grad_norm / (max_grad_norm + self.dimension**0.5 * self.quantization)


class Mechanism(_Frozen):
    """What one release did to one dataset; `accounting.dp_event` reads it as a dp-accounting event.

    poisson-sampled-gaussian: `steps` DP-SGD steps, each a Poisson sample at
    `sample_rate`, clipped to `max_grad_norm`, noised with `noise_multiplier`
    x `max_grad_norm`. gaussian: `steps` Gaussian releases of a query whose
    sensitivity is `max_grad_norm` (evaluation counts, a site-level round).
    """

    kind: Literal["poisson-sampled-gaussian", "gaussian"] = "poisson-sampled-gaussian"
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    dataset_size: int = Field(ge=0)
    # Absent in local releases (and in every record written before distributed noise existed).
    distributed: DistributedNoise | None = None
    # The public constant the noisy sum was divided by (sample rate x declared rows);
    # absent in records written before it was recorded.
    normaliser: float | None = Field(None, gt=0)
    # What was released, for a reader: a model update, or evaluation counts.
    query: Literal["update", "evaluation"] | None = None

    @model_validator(mode="after")
    def _gaussian_is_unsampled(self):
        if self.kind == "gaussian" and self.sample_rate != 1:
            raise ValueError("a gaussian release has sample_rate 1 (no sampling is claimed)")
        return self

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        data = handler(self)
        for name in ("distributed", "normaliser", "query"):
            if data.get(name) is None:
                data.pop(name, None)  # a record's JSON stays as it was before these existed
        return data


class Accounting(_Frozen):
    accountant: Literal["pld", "prv", "rdp"]
    library: str
    library_version: str
    delta: float
    epsilon: float | None = Field(description="Cumulative epsilon of this data after this release (null: no DP).")
    epsilon_cap: float | None = None


class PrivacyRecord(_Frozen):
    schema_: Literal["fedpriv.privacy-record/1"] = Field(SCHEMA, alias="schema")
    run_id: str
    round: int
    party: Literal["site", "aggregator"]
    site: str = Field(description="The site whose data was released (or 'federation' for site-level DP).")
    # Which version of the site's data was used (a content hash). Informational only: a site's data grows
    # and changes, and every release of the site, whatever the version, composes in its one budget.
    data_id: str = Field(description="The version of the site's data released (content hash); not a budget key.")
    mechanism: Mechanism
    accounting: Accounting
    update_sha256: str
    created: str

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def canonical(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


class SiteReleaseReceipt(_Frozen):
    """The aggregator's receipt of an admitted site update: the site's signed entry, as received."""

    kind: Literal["site-release"] = "site-release"
    round: int
    site: str
    site_entry: LedgerEntry


class SiteExhausted(_Frozen):
    """The aggregator's note that a site refused to train: its budget is spent."""

    kind: Literal["site-exhausted"] = "site-exhausted"
    round: int
    site: str
    epsilon: float | None = Field(None, description="What the site reported it has spent.")


class BudgetReset(_Frozen):
    """A site operator's explicit, signed reset of the site's budget: releases before it no longer count.

    Written only by `fedpriv agent reset-budget`, with a reason, into the site's own ledger and signed with
    its ledger key; the audit shows it beside the epsilon spent before it. A changed data file never resets.
    """

    kind: Literal["budget-reset"] = "budget-reset"
    site: str
    reason: str = Field(min_length=1)
    operator: str = Field(description="Who reset it (user@host, as the command saw it).")
    releases_before: int = Field(ge=0, description="Releases that counted until this reset.")
    epsilon_before: float | None = Field(description="Epsilon they had spent (null: a release without DP).")
    created: str


class SiteHead(_Frozen):
    """What the aggregator has received from one site so far, in one ledger-head record."""

    releases: int = Field(ge=0, description="Release receipts for this site in the aggregator's ledger so far.")
    head: str = Field(description="Entry hash of the last site entry received: the site's ledger must hold it.")
    epsilon: float | None = Field(None, description="The highest epsilon the site reported (any release).")


class LedgerHead(_Frozen):
    """The aggregator's signed statement, at the end of each round, of what sites released to it so far.

    `sites` names those whose releases changed since the previous head; read in order, the heads give
    every site's latest.

    Written after the round's receipts and before its checkpoint: a round the checkpoints or the run log
    show as done must have one, and every site ledger must reach the head it names. Cutting the tail of
    any ledger therefore contradicts a signed record that is itself in the chain.
    """

    kind: Literal["ledger-head"] = "ledger-head"
    run_id: str
    round: int
    sites: dict[str, SiteHead]
    created: str


def _record_kind(value: Any) -> str | None:
    # Privacy records carry a schema, not a kind (they predate the receipts).
    kind = value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)
    if kind is not None:
        return kind
    party = value.get("party") if isinstance(value, Mapping) else getattr(value, "party", None)
    return "privacy" if party is not None else None


LedgerRecord = Annotated[
    Annotated[PrivacyRecord, Tag("privacy")]
    | Annotated[SiteReleaseReceipt, Tag("site-release")]
    | Annotated[SiteExhausted, Tag("site-exhausted")]
    | Annotated[BudgetReset, Tag("budget-reset")]
    | Annotated[LedgerHead, Tag("ledger-head")],
    Discriminator(_record_kind),
]


class LedgerEntry(_Frozen):
    """One signed link of a ledger's chain: `hash` covers seq, prev and record; `signature` signs `hash`."""

    seq: int
    prev: str
    record: LedgerRecord
    hash: str
    signer: str
    signature: str
    _written: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_written_form(cls, data: Any, handler):
        entry = handler(data)
        if isinstance(data, Mapping) and isinstance(data.get("record"), Mapping):
            entry._written = copy.deepcopy(dict(data))
        return entry

    @model_serializer(mode="wrap")
    def _as_written(self, handler):
        # Dumped (into a receipt, onto the wire) exactly as it was signed.
        return copy.deepcopy(self._written) if self._written is not None else handler(self)

    @property
    def written(self) -> dict[str, Any]:
        """The entry as it was written: what its hash and signature cover."""
        return self.model_dump(by_alias=True, mode="json")


SiteReleaseReceipt.model_rebuild()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def canonical_json(value) -> bytes:
    """The one byte string hashed and signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def state_sha256(state: Mapping[str, np.ndarray]) -> str:
    """A content hash of a model update: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name])
        digest.update(canonical_json([name, str(array.dtype), list(array.shape)]))
        digest.update(array.tobytes())
    return digest.hexdigest()


def data_sha256(texts, labels) -> str:
    """Identifies a site's training data by content (never by file name)."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        digest.update(canonical_json([text, int(label)]))
    return "sha256:" + digest.hexdigest()[:32]
