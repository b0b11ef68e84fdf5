"""Live progress of local training, shared through the run directory.

A simulated site writes one small JSON file with its current step; the
`fedpriv simulate` console reads them. Files are replaced atomically and
written at most twice a second, so this costs nothing measurable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedpriv.common import site_names
from fedpriv.common.files import write_atomic
from fedpriv.common.rundir import RunDirectory


class ProgressWriter:
    def __init__(self, run_dir: str | Path, site: str, server_round: int, steps: int, every: float = 0.5):
        self.path = RunDirectory(run_dir).progress / f"{site_names.check(site)}.json"
        self.round, self.steps, self.every = server_round, steps, every
        self._last = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if step < self.steps and now - self._last < self.every:
            return
        self._last = now
        write_atomic(self.path, json.dumps({"round": self.round, "step": step, "steps": self.steps}))


def read_progress(run_dir: str | Path, server_round: int) -> tuple[int, int]:
    """(steps done, steps planned) of the sites that have started this round."""
    done = planned = 0
    for path in RunDirectory(run_dir).progress.glob("*.json"):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if entry.get("round") == server_round:
            done += int(entry["step"])
            planned += int(entry["steps"])
    return done, planned
