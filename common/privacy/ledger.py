"""A tamper-evident, append-only ledger of privacy records (JSON Lines).

Each line is one entry: its sequence number, the hash of the entry before it,
the record, the entry's own SHA-256 and the writer's Ed25519 signature of that
hash. Changing, deleting, reordering or re-signing any entry breaks the chain
or a signature. Entries are only ever appended (flushed and fsynced); a crash
mid-write leaves an incomplete last line, which readers ignore and the next
append removes, so the ledger always verifies up to its last complete entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from fedpriv.common.errors import FedprivError
from fedpriv.common.files import StorageError, storage
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.records import (
    BudgetReset,
    LedgerEntry,
    LedgerHead,
    LedgerRecord,
    PrivacyRecord,
    SiteExhausted,
    SiteReleaseReceipt,
    canonical_json,
)

GENESIS = "0" * 64


class LedgerError(FedprivError):
    """A ledger line that is not an entry fedpriv can read."""


def read_entry(data: Any) -> LedgerEntry:
    """A written entry (parsed JSON) as its typed model; raises pydantic's ValidationError."""
    return LedgerEntry.model_validate(data)


def _summary(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in error.errors(include_url=False)[:3]
    )


def entry_hash(seq: int, prev: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"seq": seq, "prev": prev, "record": record})).hexdigest()


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """The complete lines, and the byte length they cover."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        return data[:end].decode("utf-8").splitlines(), end
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise LedgerError(f"{path} line {line}: not UTF-8 text (byte {error.start})") from None


class Ledger:
    def __init__(self, path: str | Path, key: Ed25519PrivateKey | None = None):
        self.path = Path(path)
        self.key = key
        # (file size, last seq, last hash) after our own last append: a
        # long-lived writer (the aggregator) need not re-read the whole file.
        self._tail: tuple[int, int, str] | None = None

    def entries(self) -> list[LedgerEntry]:
        lines, _ = _complete_lines(self.path)
        entries = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(read_entry(json.loads(line)))
            except json.JSONDecodeError as error:
                raise LedgerError(f"{self.path} line {number}: not JSON ({error})") from None
            except ValidationError as error:
                raise LedgerError(f"{self.path} line {number}: not a ledger entry ({_summary(error)})") from None
        return entries

    def records(self) -> list[LedgerRecord]:
        return [entry.record for entry in self.entries()]

    def append(
        self, record: PrivacyRecord | SiteReleaseReceipt | SiteExhausted | BudgetReset | LedgerHead
    ) -> LedgerEntry:
        if self.key is None:
            raise ValueError(f"{self.path}: opened without a signing key; cannot append")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        if self._tail is not None and self._tail[0] == size:
            seq, prev = self._tail[1] + 1, self._tail[2]
        else:
            lines, complete = _complete_lines(self.path)
            if size != complete:
                # An entry cut short by a crash was never a record: drop the fragment.
                with open(self.path, "r+b") as handle:
                    handle.truncate(complete)
            last = json.loads(lines[-1]) if lines else None
            seq = last["seq"] + 1 if last else 0
            prev = last["hash"] if last else GENESIS
        written = json.loads(canonical_json(record.model_dump(by_alias=True, mode="json")))
        digest = entry_hash(seq, prev, written)
        entry = {
            "seq": seq,
            "prev": prev,
            "record": written,
            "hash": digest,
            "signer": signing.public_b64(self.key),
            "signature": signing.sign(self.key, digest.encode()),
        }
        typed = read_entry(entry)  # before writing: a record that cannot be read back is never written
        before = self.path.stat().st_size if self.path.exists() else 0
        try:
            with storage(self.path, "privacy ledger entry"):
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                with os.fdopen(fd, "ab") as handle:
                    handle.write(canonical_json(entry) + b"\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                    self._tail = (handle.tell(), seq, digest)
        except StorageError:
            # An entry that did not reach the disk whole was never a record (and its update never leaves).
            self._tail = None
            with contextlib.suppress(OSError), open(self.path, "r+b") as handle:
                handle.truncate(before)
            raise
        return typed


@dataclass(frozen=True)
class Problem:
    where: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def verify_entry(entry: LedgerEntry | Mapping[str, Any]) -> str | None:
    """Why a single signed entry is not intact, or None.

    Checked over the entry exactly as written, never over a re-dump of its model.
    """
    if isinstance(entry, LedgerEntry):
        entry = entry.written
    try:
        digest = entry_hash(entry["seq"], entry["prev"], entry["record"])
    except (KeyError, TypeError, ValueError) as error:
        return f"malformed entry ({error})"
    if digest != entry.get("hash"):
        return "hash mismatch: the entry was changed after it was written"
    if not signing.verify(str(entry.get("signer", "")), digest.encode(), str(entry.get("signature", ""))):
        return "bad signature: not signed by the key it names"
    return None


def verify_ledger(path: str | Path, pinned_key: str | None = None) -> tuple[list[LedgerEntry], list[Problem]]:
    """Checks the whole chain; returns the readable entries and every problem, each naming its line."""
    path = Path(path)
    problems: list[Problem] = []
    entries: list[LedgerEntry] = []
    try:
        lines, complete = _complete_lines(path)
        size = path.stat().st_size
    except (OSError, LedgerError) as error:
        return [], [Problem(str(path), f"cannot read ledger: {error}")]
    if size != complete:
        problems.append(
            Problem(f"{path.name} end", "incomplete last entry ignored (a write was interrupted)", fatal=False)
        )
    prev, signer = GENESIS, pinned_key
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            problems.append(Problem(f"{path.name} line {number}", "not JSON"))
            continue
        where = f"{path.name} line {number}"
        record = entry.get("record") if isinstance(entry, dict) else None
        if isinstance(record, dict) and "round" in record:
            where += f" (seq {entry.get('seq')}, round {record['round']}, {record.get('site', '?')})"
        reason = verify_entry(entry) if isinstance(entry, dict) else "not an object"
        if reason:
            problems.append(Problem(where, reason))
        if isinstance(entry, dict):
            if entry.get("seq") != number - 1:
                problems.append(
                    Problem(
                        where,
                        f"sequence number {entry.get('seq')} where {number - 1} belongs: entries were removed or reordered",
                    )
                )
            if entry.get("prev") != prev:
                problems.append(
                    Problem(where, "does not follow the entry before it: entries were removed, inserted or reordered")
                )
            if signer is None:
                signer = entry.get("signer")
            elif entry.get("signer") != signer:
                problems.append(
                    Problem(
                        where,
                        f"signed by {signing.fingerprint(entry.get('signer', '') or 'AA==')}, not by the ledger's key {signing.fingerprint(signer)}",
                    )
                )
            prev = entry.get("hash", "")
            try:
                entries.append(read_entry(entry))
            except ValidationError as error:
                problems.append(Problem(where, f"not a ledger entry fedpriv can read ({_summary(error)})"))
    return entries, problems
