"""Noise calibrations kept on disk, so that a process does not search again for what this machine found before.

Finding the smallest noise multiplier for a target epsilon is a search of
tens of accountant evaluations: seconds on a laptop core. Every process that
plans a run did it again: each `fedpriv simulate`, each site worker started
or restarted by its agent, each new run a resident worker joins.

An entry is only a candidate. `accounting.calibrate_noise` uses it after its
own accountant has checked that the candidate meets the target, so an entry
that was damaged, edited or written by another version of a library can
never weaken a release: it is searched again and replaced. Entries are keyed
by everything the search depends on (its inputs, the accountants' settings,
the libraries' versions).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

from fedpriv.common.files import cache_dir, write_atomic

# Bumped whenever the search itself changes (tolerances, brackets): its old answers are then not reused.
SEARCH_VERSION = 1


class Calibrations:
    """One JSON file per search, named by the hash of what the search depends on."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else cache_dir() / "noise-calibrations"

    def path(self, inputs: dict) -> Path:
        key = json.dumps({"search": SEARCH_VERSION, **inputs}, sort_keys=True, default=repr)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def candidate(self, inputs: dict) -> float | None:
        """A noise multiplier found before for exactly these inputs, unchecked; None if there is none."""
        try:
            sigma = json.loads(self.path(inputs).read_text(encoding="utf-8"))["noise-multiplier"]
        except (OSError, ValueError, TypeError, KeyError):  # missing or damaged: searched again
            return None
        return float(sigma) if isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0 else None

    def keep(self, inputs: dict, sigma: float) -> None:
        """Writes what a search found; a cache that cannot be written (read-only, full) is no error."""
        entry = {"noise-multiplier": sigma, "inputs": inputs, "search": SEARCH_VERSION}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path(inputs), json.dumps(entry, default=repr, indent=1), "noise calibration")
        except OSError:
            pass

    def find(self, inputs: dict, meets_target: Callable[[float], bool], search: Callable[[], float]) -> float:
        """The kept noise multiplier if it `meets_target`, else the `search`'s answer, kept for next time."""
        sigma = self.candidate(inputs)
        if sigma is not None and meets_target(sigma):
            return sigma
        sigma = search()
        self.keep(inputs, sigma)
        return sigma
