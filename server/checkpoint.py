"""Per-round checkpoints of everything the aggregator needs to go on.

One safetensors file per completed round holds the global state, the running
tail average and the strategy's own state (FedAdam's moments), with the round
number in its metadata. Files are written to a temporary name and renamed, so
a crash never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedpriv.common.files import storage

_NAME = re.compile(r"round-(\d{4,})\.safetensors$")


@dataclass
class Checkpoint:
    round: int
    state: dict[str, np.ndarray]
    average: dict[str, np.ndarray] = field(default_factory=dict)
    averaged_rounds: int = 0
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    # Fingerprint of the aggregator's ledger key: the audit checks the aggregator's ledger is signed by it.
    signer: str = ""


def _pack(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": np.ascontiguousarray(v) for k, v in arrays.items()}


def _unpack(prefix: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = prefix + "/"
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


def save(directory: Path, checkpoint: Checkpoint, keep: int = 0) -> Path:
    """Writes the round's checkpoint; keeps the newest `keep` (0: all)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"round-{checkpoint.round:04d}.safetensors"
    tensors = {
        **_pack("state", checkpoint.state),
        **_pack("average", checkpoint.average),
        **_pack("strategy", checkpoint.strategy),
    }
    meta = {"round": str(checkpoint.round), "averaged_rounds": str(checkpoint.averaged_rounds)}
    if checkpoint.signer:
        meta["signer"] = checkpoint.signer
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with storage(path, "round checkpoint"):
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if keep:
        for old in sorted(directory.glob("round-*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def latest(directory: Path) -> Checkpoint | None:
    """The newest readable checkpoint, or None."""
    for path in sorted(directory.glob("round-*.safetensors"), reverse=True):
        if not _NAME.search(path.name):
            continue
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(path)
        except Exception:  # damaged file: fall back to the one before
            continue
        return Checkpoint(
            round=int(meta["round"]),
            state=_unpack("state", tensors),
            average=_unpack("average", tensors),
            averaged_rounds=int(meta.get("averaged_rounds", "0")),
            strategy=_unpack("strategy", tensors),
            signer=meta.get("signer", ""),
        )
    return None
