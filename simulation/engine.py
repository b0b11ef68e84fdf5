"""Running the fedpriv Flower app on Flower's Simulation Engine, in this process.

This does what `flwr run` does for a local simulation — fuse the app's config
with the overrides, start the ServerApp and the virtual SuperNodes — without a
background SuperLink that outlives the command. The app sees its settings as
an ordinary Flower run config, exactly as in a deployment. The sites' ClientApps
run in this process too (`simulation.backend = "in-process"`, see
`flower_compat.in_process_workers`) or in Ray actors (`"ray"`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from fedpriv.common import flower_compat
from fedpriv.common import node_config as node_keys
from fedpriv.common.config import FedprivConfig
from fedpriv.common.flower_app import CLIENT_APP, CLUSTER_CLIENT_APP, SERVER_APP


def run(
    config: FedprivConfig,
    app_dir: Path,
    verbose: bool = False,
    audit_fault: str | None = None,
    site_names: list[str] | None = None,
    audit_canaries: Path | None = None,
) -> None:
    """Runs the federation; every virtual node is declared a simulated site, `audit_fault` breaks them on purpose.

    On a Ray cluster (`simulation.ray-address`) the sites are `site_names`, in partition order."""
    from fedpriv.common.environment import apply_quiet_defaults

    node_config: dict = {node_keys.SIMULATED: True}
    if audit_fault:
        node_keys.audit_fault(audit_fault)  # a bad value fails here, before anything runs
        node_config[node_keys.AUDIT_FAULT] = audit_fault
    if audit_canaries is not None:
        node_config[node_keys.AUDIT_CANARIES] = str(audit_canaries)
    flower_compat.check()
    apply_quiet_defaults()  # Ray and Flower read these when they start
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    sim = config.simulation
    ray_dir = None
    workers: contextlib.AbstractContextManager = flower_compat.in_process_workers()
    backend_config: dict = {}
    client_app = CLIENT_APP
    if sim.ray_address:
        from fedpriv.simulation import cluster

        if not site_names:
            raise cluster.ClusterError("a run on a Ray cluster needs its site names (harness.simulate gives them)")
        cluster.attach(config, verbose)  # Flower's backend then uses this connection
        # Held for the whole run: a named actor goes when its last handle does.
        run_files = cluster.start_run_files(config.run_dir, site_names)
        client_app = CLUSTER_CLIENT_APP
        workers = contextlib.nullcontext()
        backend_config = {"client_resources": {"num_cpus": sim.cpus_per_site, "num_gpus": sim.gpus_per_site}}
    elif sim.backend == "ray":
        # A private Ray temp dir: a stale cluster file from a killed run can hang Ray.
        ray_dir = tempfile.mkdtemp(prefix="fpray-")
        workers = contextlib.nullcontext()
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
        with _workers_stop_with_us(ray_dir), workers, flower_compat.virtual_node_config(node_config):
            flower_compat.run_simulation(
                app_dir,
                server_app_attr=SERVER_APP,
                client_app_attr=client_app,
                num_supernodes=sim.sites,
                backend_config=backend_config,
                verbose=verbose,
            )
    finally:
        if ray_dir:
            shutil.rmtree(ray_dir, ignore_errors=True)
        if sim.ray_address:
            del run_files
            cluster.clean_nodes(sim.ray_address, config.run_dir)


# SIGTERM to `fedpriv simulate` must stop its Ray workers too. Ray's own SIGTERM
# handlers (set by ray.init, replacing any before them) exit through Python's
# shutdown, which waits for the ServerApp thread (up to a round timeout) while
# the workers train on. A run directory survives a kill at any point (that is
# what --resume is for), so SIGTERM stops the simulation as kill -9 would, and
# every process it started with it. Python writes each signal to the wakeup fd
# whichever Python handler is installed, so Ray replacing ours does not matter.


@contextlib.contextmanager
def _workers_stop_with_us(ray_dir: str | None) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; whoever runs us there owns them
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, _: _terminate(signum, ray_dir))
    threading.Thread(target=_watch, args=(read_fd, ray_dir), daemon=True, name="fedpriv-sigterm").start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous_handler)
        os.close(write_fd)  # the watcher reads the end of the pipe and stops


def _watch(read_fd: int, ray_dir: str | None) -> None:
    with open(read_fd, "rb", buffering=0) as pipe:
        while signals := pipe.read(16):
            if signal.SIGTERM in signals:
                _terminate(signal.SIGTERM, ray_dir)


def _terminate(signum: int, ray_dir: str | None) -> None:
    for pid in descendants(os.getpid()):  # parents first: Ray's raylet starts no worker once it is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if ray_dir:
        shutil.rmtree(ray_dir, ignore_errors=True)
    sys.stderr.write(
        "fedpriv simulate: terminated; its workers were stopped with it "
        "(continue the run with: fedpriv simulate --resume RUN_DIR)\n"
    )
    sys.stderr.flush()
    os._exit(128 + signum)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children (Linux /proc; none elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # "pid (name) state ppid ...": the name may hold spaces and parentheses.
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found
