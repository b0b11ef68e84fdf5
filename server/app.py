"""The fedpriv ServerApp: the same app in simulation and in a real deployment."""

from __future__ import annotations

import contextlib
import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.common import flower_compat
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet
from fedpriv.common.logs import SERVER_LOG
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.run_events import LedgerKey, RunEnd, RunFailed, RunStart
from fedpriv.common.rundir import AGGREGATOR, RunDirectory
from fedpriv.server.federation import Federation
from fedpriv.server.global_model import GlobalModel
from fedpriv.server.ledger_heads import ledger_keys
from fedpriv.server.strategy import build_strategy
from fedpriv.server.summary import write_run_config, write_summary

log = logging.getLogger(SERVER_LOG)


def aggregator_key(config: FedprivConfig, run: RunDirectory):
    """The aggregator's ledger-signing key: its kit's, or one made for this run."""
    if config.aggregator_key:
        return signing.read_private_key(config.aggregator_key)
    return signing.load_or_create(run.key_path(AGGREGATOR))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = FedprivConfig.from_run_config(context.run_config)
    flower_compat.quicken(grid)
    run = RunDirectory.create(config.run_dir)
    write_run_config(run, config)
    labels = LabelSet.load(config.data.labels)
    started = time.time()
    run.log(RunStart(run_id=context.run_id, rounds=config.rounds, labels=len(labels)))
    try:
        key = aggregator_key(config, run)
        # The fingerprint of the key that signs the aggregator's ledger: the audit checks the ledger against it.
        run.log(LedgerKey(**ledger_keys(run, key)))
        model = GlobalModel(config, labels)
        ledger = Ledger(run.federation_ledger, key)
        federation = Federation(config, grid, build_strategy(config), model, run, ledger, run_id=str(context.run_id))
        final_state = federation.run_rounds()
        exported = model.export(final_state, run.model_dir)
    except Exception as error:
        # Whoever started the run (the simulation, an operator) reads why it stopped here.
        with contextlib.suppress(Exception):  # the disk may be what failed
            run.log(RunFailed(error=str(error), type=type(error).__name__))
        raise
    run.log(RunEnd(seconds=round(time.time() - started, 3), model=str(exported)))
    write_summary(run)
    log.info("run finished: %s", run.path)
