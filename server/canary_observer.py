"""What a white-box audit reads from the aggregator: what it saw of the canary inputs' weights, each round.

Only in a run of `fedpriv audit --empirical` (`simulation.audit-canaries` > 0).
The auditor plays the aggregator: it sees every round's release, here
restricted to the weights of the canary inputs, which no text touches. Per
round it keeps those weights and the bias as sent (the auditor recomputes each
canary's gradient there), and what came back: the unmasked noisy sum under
distributed noise, or the canary site's own update under local noise, with
the sites whose releases it holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from fedpriv.common.config import FedprivConfig
from fedpriv.common.rundir import RunDirectory

WEIGHT, BIAS = "classifier.weight", "classifier.bias"


class CanaryObserver:
    def __init__(self, run: RunDirectory, config: FedprivConfig, hidden: int):
        self.directory = run.canary_observations
        self.site = config.simulation.audit_canary_site
        self.hidden = hidden
        self.directory.mkdir(exist_ok=True)

    @classmethod
    def for_run(cls, run: RunDirectory, config: FedprivConfig, hidden: int) -> CanaryObserver | None:
        return cls(run, config, hidden) if config.simulation.audit_canaries > 0 else None

    def observe(
        self, rnd: int, sent: Mapping[str, np.ndarray], released: np.ndarray, kind: str, sites: list[str]
    ) -> None:
        """`released`: the classifier weight's part of the sum (kind `sum`) or of the site's update (`update`)."""
        tensors = {
            "sent-weight": np.ascontiguousarray(sent[WEIGHT][:, self.hidden :], dtype=np.float32),
            "sent-bias": np.asarray(sent[BIAS], dtype=np.float32),
            "released": np.ascontiguousarray(released[:, self.hidden :], dtype=np.float32),
        }
        metadata = {"round": str(rnd), "kind": kind, "sites": json.dumps(sorted(sites))}
        path = self.directory / f"round-{rnd:05d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    def observe_update(self, rnd: int, sent: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> None:
        """Local noise: the canary site's update, as the aggregator received it."""
        delta = np.asarray(update[WEIGHT], dtype=np.float64) - np.asarray(sent[WEIGHT], dtype=np.float64)
        self.observe(rnd, sent, delta, "update", [self.site])
