"""Running the fedpriv Flower app on Flower's Simulation Engine (Ray), in-process.

This does what `flwr run` does for a local simulation — fuse the app's config
with the overrides, start the ServerApp and the virtual SuperNodes — without a
background SuperLink that outlives the command. The app sees its settings as
an ordinary Flower run config, exactly as in a deployment.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedpriv.common.config import FedprivConfig
from fedpriv.common.flower_app import CLIENT_APP, SERVER_APP
from fedpriv.simulation.dispatch import fast_dispatch


def run(config: FedprivConfig, app_dir: Path, verbose: bool = False) -> None:
    # Private API on purpose: flwr is pinned to 1.39.*, and this is the call
    # `flwr-simulation` itself makes once it has fetched the app.
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from fedpriv.common.environment import apply_quiet_defaults

    apply_quiet_defaults()  # Ray and Flower read these when they start
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    flwr_run = Run.create_empty(run_id=run_id)
    flwr_run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    flwr_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, {}),
    )
    sim = config.simulation
    # A private Ray temp dir: a stale cluster file from a killed run can hang Ray.
    ray_dir = tempfile.mkdtemp(prefix="fpray-")
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_site, "num_gpus": sim.gpus_per_site},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "DEBUG" if verbose else "ERROR",
            "log_to_driver": verbose,
            "_temp_dir": ray_dir,
            "include_dashboard": False,
        },
    }
    try:
        with fast_dispatch():
            _run_simulation(
                num_supernodes=sim.sites,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                server_app_attr=SERVER_APP,
                client_app_attr=CLIENT_APP,
                backend_name="ray",
                backend_config=backend_config,
                app_dir=str(app_dir),
                run=flwr_run,
                server_app_context=context,
                verbose_logging=verbose,
                is_app=True,
            )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
