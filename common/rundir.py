"""The run directory: what a run leaves behind, in one place, append-only.

    config.toml              the resolved configuration of the run
    metrics.jsonl            the run log: one typed event per line (run_events.py)
    checkpoints/             federated state after each round (safetensors)
    ledgers/                 signed privacy ledgers: federation.jsonl (the aggregator's),
                             and one per simulated site (SITE.jsonl)
    keys/                    ledger keys of a simulation (SITE.key, aggregator.key) and
                             public-keys.json, which pins them for the audit
    progress/                a simulated site's current step (SITE.json), for the console
    flower-app/              the Flower app a simulation runs (pyproject.toml and settings)
    nodes.json               Flower node id -> site (a deployed aggregator's registrations)
    model/                   the exported global model (plain transformers)
    plots/                   accuracy and epsilon per round (PNG)
    summary.json             final numbers
    audit.html               the run's own audit (a simulation writes it at the end)
    canary-observations/     a white-box audit run only: what the aggregator saw of the canary
                             inputs' weights each round (round-NNNNN.safetensors)
    run.lock                 held by the process writing the run

The aggregator writes it; sites of a simulation write their ledgers, keys and
progress into it; the simulation harness, the auditor and `fedpriv` commands
read it, so it lives in `common`. Every path in it comes from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedpriv.common import site_names
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import storage, write_atomic
from fedpriv.common.run_events import (
    CentralEvaluate,
    E,
    FederatedEvaluate,
    RoundEnd,
    RunEnd,
    RunEvent,
    RunStart,
    SiteTrain,
    parse,
)

METRICS = "metrics.jsonl"
CONFIG = "config.toml"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
MODEL = "model"
PLOTS = "plots"
LOCK = "run.lock"
NODE_NAMES = "nodes.json"  # Flower node id -> site, written by a deployed aggregator from its registrations
LEDGERS = "ledgers"
KEYS = "keys"
PUBLIC_KEYS = "public-keys.json"
PROGRESS = "progress"
FLOWER_APP = "flower-app"
AUDIT_HTML = "audit.html"
CANARY_OBSERVATIONS = "canary-observations"
FEDERATION_LEDGER = "federation.jsonl"  # the aggregator's ledger
AGGREGATOR = "aggregator"  # the aggregator's key (keys/aggregator.key)


class RunDirectoryError(FedprivError):
    """A run directory cannot be used as asked (in use, already holds a run, already finished)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no inf/nan; absent epsilon means "not private"
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Appends one complete line in one write.

    Not fsynced: these are progress metrics, written thousands of times per
    round in large simulations; a line cut short by a crash is skipped by
    readers. Privacy records go to the ledger, which does fsync.
    """
    line = json.dumps(_jsonable(record), sort_keys=False) + "\n"
    with storage(path, "run's metrics"), open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete lines only: a line cut short by a crash is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # Parsed metrics and the file state they were parsed at: a report asks
        # for events many times, the file is read again only after it grew.
        self._parsed: tuple[tuple[int, int], list[dict[str, Any]]] | None = None

    @staticmethod
    def where(path: str | Path | None) -> Path:
        """Where a run given `path` (empty: runs/<date>-<time>) is written."""
        return Path(path or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).expanduser().resolve()

    @classmethod
    def create(cls, path: str | Path | None) -> RunDirectory:
        run = cls(cls.where(path))
        with storage(run.path, "run directory"):
            run.path.mkdir(parents=True, exist_ok=True)
            (run.path / CHECKPOINTS).mkdir(exist_ok=True)
        return run

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY

    @property
    def ledgers(self) -> Path:
        return self.path / LEDGERS

    @property
    def canary_observations(self) -> Path:
        return self.path / CANARY_OBSERVATIONS

    def ledger_path(self, owner: str) -> Path:
        """A simulated site's ledger (`ledgers/SITE.jsonl`)."""
        return self.ledgers / f"{site_names.check(owner)}.jsonl"

    @property
    def federation_ledger(self) -> Path:
        """The aggregator's ledger: receipts, round heads and site-level releases."""
        return self.ledgers / FEDERATION_LEDGER

    @property
    def keys(self) -> Path:
        return self.path / KEYS

    def key_path(self, owner: str) -> Path:
        """A simulation's ledger key of `owner` (a site, or `aggregator`)."""
        return self.keys / f"{site_names.check(owner) if owner != AGGREGATOR else owner}.key"

    @property
    def public_keys(self) -> Path:
        """The ledger public keys a simulation was provisioned with; the audit pins its ledgers to them."""
        return self.keys / PUBLIC_KEYS

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS

    @property
    def flower_app(self) -> Path:
        return self.path / FLOWER_APP

    @property
    def node_names_path(self) -> Path:
        return self.path / NODE_NAMES

    @property
    def audit_html(self) -> Path:
        return self.path / AUDIT_HTML

    def log(self, event: RunEvent) -> None:
        """Appends one event to the run log, stamped with the time now."""
        append_jsonl(self.metrics_path, {"kind": event.KIND, "time": round(time.time(), 3), **event.fields()})

    def read(self, event_type: type[E]) -> list[E]:
        """The run log's events of one kind, typed; a line whose fields do not fit is an error naming it."""
        found = []
        for line in self.events(event_type.KIND):
            try:
                found.append(parse(line, event_type))
            except ValidationError as error:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
                raise RunDirectoryError(
                    f"{self.metrics_path}: a {event_type.KIND} event does not fit: {problems}"
                ) from None
        return found  # type: ignore[return-value]

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The run log's lines as written, untyped: for the auditor, which trusts no log to fit its types."""
        try:
            stat = self.metrics_path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._parsed is None or self._parsed[0] != stamp:
            self._parsed = (stamp, list(read_jsonl(self.metrics_path)))
        return [e for e in self._parsed[1] if kind is None or e.get("kind") == kind]

    def node_names(self) -> dict[int, str]:
        """Which site each Flower node id is (deployments); names the sites whose replies carry no name."""
        path = self.node_names_path
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
            return {int(node): str(site) for node, site in names.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError, UnicodeDecodeError):
            return {}  # only names in messages depend on it: a damaged file costs names, not the run

    def started(self) -> bool:
        """Whether a run has already begun here (its config or a checkpoint was written)."""
        checkpoints = self.checkpoints
        return self.config_path.exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))

    def finished(self) -> bool:
        return bool(self.read(RunEnd))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Holds the run for this process; a second process is refused, naming the holder.

        An OS lock (flock), so a holder killed with -9 leaves no stale lock.
        Taking it also drops a metrics line a killed holder left half-written,
        so the next event does not fuse with it.
        """
        with storage(self.path / LOCK, "run lock"):
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK, "a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunDirectoryError(
                    f"{self.path}: in use by {holder}; two runs must not write one run directory "
                    "(wait for it to end, or give this run another directory)"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"fedpriv process {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            self._drop_partial_metrics_line()
            yield
        finally:
            handle.close()  # releases the lock

    def _drop_partial_metrics_line(self) -> None:
        path = self.metrics_path
        if not path.exists():
            return
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(path, "r+b") as handle:
                handle.truncate(end)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_atomic(self.summary_path, json.dumps(_jsonable(summary), indent=2))

    def summary(self) -> dict[str, Any] | None:
        path = self.summary_path
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def summarize(run: RunDirectory) -> dict[str, Any]:
    """The run's headline numbers, derived only from its recorded events."""
    central = {e.round: e for e in run.read(CentralEvaluate)}
    federated = {e.round: e for e in run.read(FederatedEvaluate)}
    epsilons: dict[str, dict[int, float | None]] = {}
    examples: dict[str, int] = {}  # absent for a site that never sent its row count (secure aggregation)
    for e in run.read(SiteTrain):
        epsilons.setdefault(e.site, {})[e.round] = e.metrics.get("epsilon")
        if "num-examples" in e.metrics:
            examples[e.site] = e.metrics["num-examples"]
    start = run.read(RunStart)
    end = run.read(RunEnd)
    rounds = sorted({e.round for e in run.read(RoundEnd)})
    last_central = central[max(central)] if central else None
    return {
        "rounds-completed": len(rounds),
        "seconds": end[-1].seconds if end else None,
        "started": start[0].time if start else None,
        "central-accuracy": last_central.accuracy if last_central else None,
        "central-accuracy-by-round": {r: e.accuracy for r, e in sorted(central.items())},
        "federated-accuracy-by-round": {r: e.metrics.get("accuracy") for r, e in sorted(federated.items())},
        "sites": {
            site: {
                "epsilon": by_round[max(by_round)],
                "epsilon-by-round": dict(sorted(by_round.items())),
                "train-examples": examples.get(site),
            }
            for site, by_round in sorted(epsilons.items())
        },
    }
