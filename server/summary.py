"""What the aggregator writes next to the metrics when a run starts and ends."""

from __future__ import annotations

import tomli_w

from fedpriv.common.config import FedprivConfig
from fedpriv.common.files import write_atomic
from fedpriv.common.rundir import RunDirectory, summarize


def write_run_config(run: RunDirectory, config: FedprivConfig) -> None:
    path = run.config_path
    if not path.exists():  # a resumed run keeps the config it started with
        write_atomic(path, tomli_w.dumps(config.model_dump(by_alias=True)))


def write_summary(run: RunDirectory) -> dict:
    summary = summarize(run)
    run.write_summary(summary)
    return summary
