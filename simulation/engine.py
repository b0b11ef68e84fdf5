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

from fedpriv.common import flower_compat
from fedpriv.common.config import FedprivConfig
from fedpriv.common.flower_app import CLIENT_APP, SERVER_APP


def run(config: FedprivConfig, app_dir: Path, verbose: bool = False) -> None:
    from fedpriv.common.environment import apply_quiet_defaults

    flower_compat.check()
    apply_quiet_defaults()  # Ray and Flower read these when they start
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
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
        flower_compat.run_simulation(
            app_dir,
            server_app_attr=SERVER_APP,
            client_app_attr=CLIENT_APP,
            num_supernodes=sim.sites,
            backend_config=backend_config,
            verbose=verbose,
        )
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
