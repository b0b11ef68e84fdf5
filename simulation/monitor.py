"""Console progress of a running federation, read from its run directory."""

from __future__ import annotations

import threading

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.progress import read_progress
from common.rundir import RunDirectory, read_jsonl


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

    def __enter__(self) -> "Monitor":
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

    def _refresh(self) -> None:
        events = list(read_jsonl(self.run.metrics_path))
        done = [e for e in events if e["kind"] == "round-end"]
        started = [e for e in events if e["kind"] == "round-start"]
        central = [e for e in events if e["kind"] == "central-evaluate"]
        note = f"test accuracy {100 * central[-1]['accuracy']:.2f}%" if central else ""
        self.progress.update(self.round_task, completed=len(done), note=note)
        if not started:
            return
        current = started[-1]["round"]
        trained = sum(1 for e in events if e["kind"] == "site-train" and e["round"] == current)
        steps, _ = read_progress(self.run.path, current)
        self.progress.update(
            self.local_task,
            total=self.sites * self.steps,
            completed=steps,
            note=f"round {current}: {trained}/{self.sites} sites done",
        )
