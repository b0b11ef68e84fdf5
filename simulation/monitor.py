"""Console progress of a running federation, read from its run directory."""

from __future__ import annotations

import json
import threading

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpriv.client.progress import read_progress
from fedpriv.common.run_events import CentralEvaluate, RoundEnd, RoundStart, SiteBudgetExhausted, SiteTrain, parse
from fedpriv.common.rundir import RunDirectory


class Monitor:
    """Rounds and local-training bars, refreshed from events the run records anyway."""

    def __init__(self, run: RunDirectory, rounds: int, sites: int, steps: int, console: Console | None = None):
        self.run, self.rounds, self.sites, self.steps = run, rounds, sites, steps
        self.progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._offset = 0
        # Counters kept up to date from new lines only: the metrics file grows
        # with sites x rounds and must not be re-read twice a second.
        self._done = 0
        self._round = 0
        self._trained: dict[int, int] = {}
        self._accuracy: float | None = None

    def __enter__(self) -> Monitor:
        self.progress.start()
        self.round_task = self.progress.add_task("Rounds", total=self.rounds, note="preparing sites")
        self.local_task = self.progress.add_task("Local training", total=None, note="")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._refresh()
        self.progress.stop()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def _read_new(self) -> None:
        path = self.run.metrics_path
        if not path.exists():
            return
        with open(path, encoding="utf-8") as handle:
            handle.seek(self._offset)
            for line in handle:
                if not line.endswith("\n"):
                    break
                self._offset += len(line.encode("utf-8"))
                try:
                    event = parse(json.loads(line))
                except (ValueError, ValidationError):
                    continue  # a display: the run's own audit judges its log
                if isinstance(event, RoundEnd):
                    self._done += 1
                elif isinstance(event, RoundStart):
                    self._round = event.round
                elif isinstance(event, SiteTrain | SiteBudgetExhausted):
                    self._trained[event.round] = self._trained.get(event.round, 0) + 1
                elif isinstance(event, CentralEvaluate):
                    self._accuracy = event.accuracy

    def _refresh(self) -> None:
        self._read_new()
        note = f"test accuracy {100 * self._accuracy:.2f}%" if self._accuracy is not None else ""
        self.progress.update(self.round_task, completed=self._done, note=note)
        if not self._round:
            return
        current = self._round
        trained = self._trained.get(current, 0)
        # Per-step progress files: one per site, read only for small federations with several steps a round.
        small = self.sites <= 200 and self.steps > 1
        steps = read_progress(self.run.path, current)[0] if small else trained * self.steps
        self.progress.update(
            self.local_task,
            total=self.sites * self.steps,
            completed=steps,
            note=f"round {current}: {trained}/{self.sites} sites done",
        )
