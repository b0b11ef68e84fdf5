"""What the dashboard shows, folded from a run directory's recorded events and nothing else.

`RunView` follows `metrics.jsonl` from where it last read (a run of many
sites writes hundreds of thousands of lines; each refresh reads only the new
ones) and keeps, per round and per site, the latest state the log holds.
`snapshot()` is the page's whole state as JSON; its `version` changes exactly
when something shown changed, so the page is sent a new state only then.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from fedpriv.common.config import ConfigError, FedprivConfig, parse_config
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import read_toml
from fedpriv.common.privacy.wording import privacy_in_words
from fedpriv.common.run_events import (
    AllBudgetsExhausted,
    AllSitesRefused,
    CentralEvaluate,
    FederatedEvaluate,
    Resumed,
    RoundEnd,
    RoundStart,
    RunEnd,
    RunEvent,
    RunFailed,
    RunStart,
    SecureKeys,
    SecureRoundAbandoned,
    SecureStage,
    SiteBudgetExhausted,
    SiteError,
    SiteRefused,
    SiteRejected,
    SiteTrain,
    TrainAggregate,
    parse,
)
from fedpriv.common.rundir import CONFIG, RunDirectory
from fedpriv.common.wire.secure_protocol import MASK

if TYPE_CHECKING:
    from fedpriv.audit.auditor import AuditReport

RUNS = "runs"  # a deployed aggregator's state folder keeps its runs here

CHARTED_SITES = 10  # sites whose epsilon the page draws (the table lists every site)
SHOWN_ROUNDS = 12  # the latest rounds in the page's table (the charts show every round)


class DashboardError(FedprivError):
    """The dashboard cannot serve what it was given."""


def open_view(path: Path) -> RunView:
    """The view of a run directory, or of an aggregator's state folder (its newest run, followed as new ones start)."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise DashboardError(f"{path}: not a run directory or an aggregator's state folder")
    if (path / RUNS).is_dir() and not RunDirectory(path).metrics_path.exists():
        return RunView(newest_run(path) or path / RUNS, state=path)
    # A run directory, or one that a simulation or a submission is about to write.
    return RunView(path)


def newest_run(state: Path) -> Path | None:
    try:
        candidates = [RunDirectory(p) for p in (state / RUNS).iterdir() if p.is_dir()]
        written = [
            (run.metrics_path.stat().st_mtime_ns, run.path.name, run.path)
            for run in candidates
            if run.metrics_path.exists()
        ]
    except OSError:
        return None
    return max(written)[2] if written else None


@dataclass
class SiteView:
    name: str
    round: int = 0
    state: str = "waiting"  # trained, refused, exhausted, dropped, rejected
    reason: str = ""
    epsilon: float | None = None
    cap: float | None = None
    noise_multiplier: float | None = None
    epsilon_by_round: list[tuple[int, float]] = field(default_factory=list)

    def seen(self, rnd: int, state: str, reason: str = "") -> None:
        # Within a round the worst news stays: a site refused at one secure stage and dropped at the next
        # is shown refused.
        order = ("waiting", "trained", "dropped", "rejected", "exhausted", "refused")
        if rnd > self.round or order.index(state) >= order.index(self.state):
            self.round, self.state, self.reason = rnd, state, reason


@dataclass
class RoundView:
    round: int
    started: float | None = None
    seconds: float | None = None
    trained: int = 0
    refused: int = 0
    exhausted: int = 0
    dropped: int = 0
    rejected: int = 0
    aggregated: int | None = None
    secure: bool = False
    cohort: int | None = None
    secure_dropped: int | None = None
    threshold: int | None = None
    keys: str = ""
    abandoned: str = ""
    note: str = ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


class RunView:
    def __init__(self, path: Path, state: Path | None = None):
        self.path, self.state = Path(path), state
        self._lock = threading.Lock()
        self._audit_lock = threading.Lock()
        self._made: dict[str, Any] | None = None  # the state of the current version, once made
        self._audit: AuditReport | None = None
        self._audit_for: Path | None = None
        self._reset(self.path)

    def _reset(self, path: Path) -> None:
        self.path = path
        self.run = RunDirectory(path)
        self.offset = 0
        self.skipped = 0
        # Versions only grow, across runs too: a page or a cached state never mistakes one run for another.
        self.version = getattr(self, "version", -1) + 1
        self._made = None
        self.run_id: int | None = None
        self.planned: int | None = None
        self.started: float | None = None
        self.ended: RunEnd | None = None
        self.failed: RunFailed | None = None
        self.current = 0
        self.resumed: list[int] = []
        self.central: dict[int, float] = {}
        self.federated: dict[int, float | None] = {}
        self.rounds: dict[int, RoundView] = {}
        self.sites: dict[str, SiteView] = {}
        self.threshold: int | None = None
        self.config: FedprivConfig | None = None
        self.config_error = ""
        self.last_event: float | None = None

    # -- reading ---------------------------------------------------------------

    def refresh(self) -> bool:
        """Reads what was appended since the last call; whether anything shown changed."""
        with self._lock:
            if self.state is not None:
                newest = newest_run(self.state)
                if newest is not None and newest != self.path:
                    self._reset(newest)
                    self.version += 1
            changed = self._read_config()
            metrics = self.run.metrics_path
            try:
                size = metrics.stat().st_size
            except FileNotFoundError:
                return changed
            if size < self.offset:  # a new run in the same place, or a half line dropped by its next writer
                self._reset(self.path)
                changed = True
            if size == self.offset:
                if changed:
                    self.version += 1
                return changed
            with open(metrics, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(size - self.offset)
            end = data.rfind(b"\n") + 1  # a line still being written is read next time
            for line in data[:end].splitlines():
                self._fold_line(line)
            self.offset += end
            if end or changed:
                self.version += 1
            return bool(end) or changed

    def _read_config(self) -> bool:
        if self.config is not None or self.config_error or not self.run.config_path.exists():
            return False
        try:
            self.config = parse_config(read_toml(self.run.config_path, "run config", ConfigError), CONFIG)
        except (ConfigError, FedprivError) as error:
            self.config_error = str(error)
        return True

    def _fold_line(self, raw: bytes) -> None:
        try:
            event = parse(json.loads(raw))
        except (ValueError, ValidationError, UnicodeDecodeError):
            self.skipped += 1  # a display: the audit judges the log
            return
        if event is not None:
            self.last_event = event.time
            self._fold(event)

    def _round(self, rnd: int) -> RoundView:
        if rnd not in self.rounds:
            self.rounds[rnd] = RoundView(rnd)
        return self.rounds[rnd]

    def _site(self, name: str) -> SiteView:
        if name not in self.sites:
            self.sites[name] = SiteView(name)
        return self.sites[name]

    def _fold(self, event: RunEvent) -> None:
        if isinstance(event, RunStart):
            self.run_id, self.planned = event.run_id, event.rounds
            self.started = self.started or event.time
        elif isinstance(event, RoundStart):
            self.current, self.planned = event.round, event.rounds
            # A resumed run starts its cut-short round again: the round shows the attempt that counts.
            self.rounds[event.round] = RoundView(event.round, started=event.time)
        elif isinstance(event, RoundEnd):
            self._round(event.round).seconds = event.seconds
        elif isinstance(event, Resumed):
            self.resumed.append(event.round)
        elif isinstance(event, RunEnd):
            self.ended = event
        elif isinstance(event, RunFailed):
            self.failed = event
        elif isinstance(event, CentralEvaluate):
            self.central[event.round] = event.accuracy
        elif isinstance(event, FederatedEvaluate):
            self.federated[event.round] = _number(event.metrics.get("accuracy"))
        elif isinstance(event, SiteTrain):
            self._trained(event)
        elif isinstance(event, SiteBudgetExhausted):
            site = self._site(event.site)
            site.seen(event.round, "exhausted", "its epsilon budget is spent")
            site.cap = _number(event.metrics.get("epsilon-cap")) or site.cap
            self._round(event.round).exhausted += 1
        elif isinstance(event, SiteRefused):
            self._site(event.site).seen(event.round, "refused", f"{event.reason} (at {event.phase})")
            self._round(event.round).refused += 1
        elif isinstance(event, SiteRejected):
            self._site(event.site).seen(event.round, "rejected", event.reason)
            self._round(event.round).rejected += 1
        elif isinstance(event, SiteError):
            phase = f" (at {event.phase})" if event.phase else ""
            self._site(event.site).seen(event.round, "dropped", f"{event.reason}{phase}")
            self._round(event.round).dropped += 1
        elif isinstance(event, TrainAggregate):
            view = self._round(event.round)
            view.aggregated, view.secure = event.sites, event.secure
            if event.secure:
                view.secure_dropped = event.dropped or 0
        elif isinstance(event, SecureKeys):
            view = self._round(event.round)
            view.keys = event.reason
            if event.threshold is not None:
                self.threshold = event.threshold
        elif isinstance(event, SecureStage):
            view = self._round(event.round)
            view.secure = True
            view.threshold = self.threshold
            if event.stage == MASK:
                view.cohort = len(event.sites)
        elif isinstance(event, SecureRoundAbandoned):
            self._round(event.round).abandoned = event.reason
        elif isinstance(event, AllSitesRefused):
            self._round(event.round).note = "every connected site has refused or spent its budget: the run ends"
        elif isinstance(event, AllBudgetsExhausted):
            self._round(event.round).note = "every site's budget is spent: the run ends"

    def _trained(self, event: SiteTrain) -> None:
        site = self._site(event.site)
        site.seen(event.round, "trained")
        metrics = event.metrics
        epsilon = _number(metrics.get("epsilon"))
        if epsilon is not None:
            site.epsilon = epsilon
            site.epsilon_by_round.append((event.round, epsilon))
        site.cap = _number(metrics.get("epsilon-cap")) or site.cap
        site.noise_multiplier = _number(metrics.get("noise-multiplier"))
        self._round(event.round).trained += 1

    # -- the page's state ---------------------------------------------------------

    def status(self) -> str:
        if self.ended is not None:
            return "finished"
        if self.failed is not None:
            return "failed"
        if self.run_id is None:
            return "waiting"
        return "running"

    @property
    def audit(self) -> AuditReport | None:
        return self._audit if self._audit_for == self.path else None

    def make_audit(self) -> None:
        """Audits the run once it has ended (its ledgers are complete then); the page shows the verdict.

        One audit at a time: a caller that finds one under way waits for it instead of making another.
        """
        with self._audit_lock:
            with self._lock:
                path, due = self.path, self.ended is not None and self._audit_for != self.path
            if not due:
                return
            from fedpriv.audit.auditor import audit

            report = audit([path])  # seconds on a long run: outside the view's lock, the page goes on being served
            with self._lock:
                if self.path == path:
                    self._audit, self._audit_for = report, path
                    self.version += 1

    def snapshot(self) -> dict[str, Any]:
        """The page's state; made once per version, however many pages ask for it."""
        with self._lock:
            if self._made is None or self._made["version"] != self.version:
                self._made = self._snapshot()
            return self._made

    def _snapshot(self) -> dict[str, Any]:
        done = sorted(r for r, v in self.rounds.items() if v.seconds is not None)
        timed = [s for r in done if (s := self.rounds[r].seconds)]
        config = self.config
        # A simulation writes its Flower app into the run; a deployed aggregator runs an installed one.
        deployed = config is not None and not self.run.flower_app.exists()
        privacy = privacy_in_words(config, deployed=deployed) if config is not None else []
        if self.config_error:
            privacy = [f"The run's settings cannot be read: {self.config_error}"]
        return {
            "version": self.version,
            "path": str(self.path),
            "state-folder": str(self.state) if self.state else None,
            "status": self.status(),
            "error": self.failed.error if self.failed else "",
            "run-id": str(self.run_id) if self.run_id is not None else None,
            "deployed": deployed,
            "rounds-planned": self.planned,
            "rounds-done": len(done),
            "current-round": self.current,
            "resumed-at": self.resumed,
            "started": self.started,
            "last-event": self.last_event,
            "ended": self.ended.time if self.ended else None,
            "seconds": self.ended.seconds if self.ended else None,
            "seconds-per-round": [[r, self.rounds[r].seconds] for r in done],
            "mean-round-seconds": sum(timed) / len(timed) if timed else None,
            "central-accuracy": sorted(self.central.items()),
            "federated-accuracy": sorted(self.federated.items()),
            "sites": [
                _site_json(site, charted=i < CHARTED_SITES)
                for i, site in enumerate(sorted(self.sites.values(), key=lambda s: s.name))
            ],
            "rounds": [_round_json(self.rounds[r]) for r in sorted(self.rounds, reverse=True)[:SHOWN_ROUNDS]],
            "secure": self.threshold is not None or any(v.secure for v in self.rounds.values()),
            "privacy": privacy,
            "audit": self._audit_state(),
            "skipped-lines": self.skipped,
        }

    def _audit_state(self) -> dict[str, Any]:
        if self.ended is None:
            return {"verdict": "pending", "detail": "the audit is made once the run has ended"}
        report = self.audit
        if report is None:
            return {"verdict": "auditing", "detail": "checking the signed ledgers"}
        from fedpriv.audit.render import headline

        return {
            "verdict": report.verdict,
            "detail": headline(report),
            "problems": [str(p) for p in report.violations][:20],
            "gaps": list(report.completeness.gaps)[:20],
        }


def _site_json(site: SiteView, charted: bool) -> dict[str, Any]:
    return {
        "name": site.name,
        "round": site.round,
        "state": site.state,
        "reason": site.reason,
        "epsilon": site.epsilon,
        "cap": site.cap,
        "noise-multiplier": site.noise_multiplier,
        # A thousand sites over hundreds of rounds would make every update megabytes: only charted ones.
        "epsilon-by-round": site.epsilon_by_round if charted else [],
    }


def _round_json(view: RoundView) -> dict[str, Any]:
    return {
        "round": view.round,
        "seconds": view.seconds,
        "trained": view.trained,
        "refused": view.refused,
        "exhausted": view.exhausted,
        "dropped": view.dropped,
        "rejected": view.rejected,
        "aggregated": view.aggregated,
        "secure": view.secure,
        "cohort": view.cohort,
        "secure-dropped": view.secure_dropped,
        "threshold": view.threshold,
        "keys": view.keys,
        "abandoned": view.abandoned,
        "note": view.note,
    }
