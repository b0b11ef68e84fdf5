"""Privacy records: what was released, kept apart from how it was accounted.

As in Google's dp_accounting, the *mechanism* is an immutable description of
what happened (a Poisson-sampled Gaussian mechanism composed `steps` times,
with its noise, rate, clipping norm and dataset size), so any accountant can
compute epsilon from it later. The *accounting* part is the claim made at the
time: which accountant, which library version, which delta, what cumulative
epsilon and what cap. `fedpriv audit` recomputes the claim from the
mechanisms alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SCHEMA = "fedpriv.privacy-record/1"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Mechanism(_Frozen):
    kind: Literal["poisson-sampled-gaussian"] = "poisson-sampled-gaussian"
    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    dataset_size: int = Field(ge=0)


class Accounting(_Frozen):
    accountant: Literal["prv", "rdp"]
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
    data_id: str = Field(description="Identifies the protected data; releases of one data_id compose.")
    mechanism: Mechanism
    accounting: Accounting
    update_sha256: str
    created: str

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def canonical(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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
    for text, label in zip(texts, labels):
        digest.update(canonical_json([text, int(label)]))
    return "sha256:" + digest.hexdigest()[:32]
