"""A ServerApp other than fedpriv's, for `LocalFederation.submit(server_app=...)`: it only lists the sites online.

Flower loads it from the run's bundle in the deployed aggregator's ServerApp process; it reads the fedpriv run
config like the real one and ends the run as the real one does (a `run-end` event, which `fedpriv aggregator run`
waits for). A hostile ServerApp for a test starts from here.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.common.config import FedprivConfig
from fedpriv.common.run_events import RunEnd, RunStart
from fedpriv.common.rundir import RunDirectory, append_jsonl

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FedprivConfig.from_run_config(context.run_config)
    run = RunDirectory.create(config.run_dir)
    run.log(RunStart(run_id=context.run_id, rounds=0, labels=0))
    # Not one of fedpriv's events: written as a raw line, which readers of other kinds skip.
    append_jsonl(run.metrics_path, {"kind": "census", "nodes": sorted(str(node) for node in grid.get_node_ids())})
    run.log(RunEnd(seconds=0.0, model=""))
