"""`fedpriv simulate` on an existing Ray cluster (`simulation.ray-address`).

The driver (this process) runs on a node of the cluster, as `flwr run` does:
it attaches to the cluster, checks that every node can run the sites, and
keeps the run directory. Sites run in Ray actors placed by Ray's resources
(`simulation.cpus-per-site`, `simulation.gpus-per-site`) on any node.

Only the driver writes the run directory. A site's files there (its ledger,
its key, the federation's public keys, its progress) reach the node that runs
it through `RunFiles`, an actor pinned to the driver's node: before each
message the site gets its own files (`cluster_clientapp.py` keeps them in a
node-local folder), after it the actor takes back what the site wrote. A
ledger only grows: the actor appends what the site added to the driver's copy
and refuses anything that does not extend it. Nothing has to be shared
between nodes but the model and the data, at the same paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

from fedpriv import __version__
from fedpriv.common import files, site_names
from fedpriv.common.config import FedprivConfig
from fedpriv.common.environment import QUIET
from fedpriv.common.errors import FedprivError
from fedpriv.common.rundir import RunDirectory

NAMESPACE = "fedpriv"  # of the drivers' named actors


def run_files_name(run_dir: str) -> str:
    """The name of a run's `RunFiles` actor (one per run: several runs may share a cluster)."""
    return f"fedpriv-run-files-{hashlib.sha256(run_dir.encode()).hexdigest()[:16]}"


class ClusterError(FedprivError, RuntimeError):
    """The Ray cluster cannot be reached, or a node of it cannot run the sites; the message names it."""


def connect(address: str, verbose: bool) -> None:
    """Attaches this process to the cluster at `address` (auto, or the head's HOST:PORT) as its driver."""
    import ray

    if address != "auto":
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as error:
            raise ClusterError(
                f"simulation.ray-address: no Ray cluster answers at {address} ({error.strerror or error}); "
                "start its head with `ray start --head`, or correct the address"
            ) from None
    try:
        ray.init(
            address=address,
            logging_level="DEBUG" if verbose else "ERROR",
            log_to_driver=verbose,
            namespace=NAMESPACE,
            # The cluster's workers get the process settings this driver runs with (no telemetry, offline hub).
            runtime_env={"env_vars": dict(QUIET)},
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"simulation.ray-address: cannot attach to the Ray cluster at {address}: {error}") from None


def attach(config: FedprivConfig, verbose: bool = False) -> None:
    """Connects to the cluster of `simulation.ray-address` and checks its nodes, once per process."""
    import ray

    if not ray.is_initialized():
        connect(config.simulation.ray_address, verbose)
        check_nodes(config)


def check_nodes(config: FedprivConfig) -> list[dict]:
    """Every live node must import this fedpriv and load the data, labels and model; returns what each reported."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needs = {"data.path": config.data.path, "data.labels": config.data.labels, "model.name": config.model.name}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # Named by address and id: nodes of one machine share an address.
    pending = {
        f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})": ray.remote(num_cpus=0)(_node_report)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        .remote(needs)
        for node in nodes
    }
    reports = []
    for where, pending_report in pending.items():
        try:
            report = ray.get(pending_report, timeout=300)
        except Exception as error:  # a node without fedpriv cannot even unpickle the check
            lines = str(error).strip().splitlines()
            raise ClusterError(
                f"the Ray node at {where} cannot run fedpriv's sites ({type(error).__name__}: "
                f"{lines[-1] if lines else ''}); install fedpriv {__version__} in the Python environment its "
                "`ray start` runs"
            ) from None
        if report["version"] != __version__:
            raise ClusterError(
                f"the Ray node at {where} runs fedpriv {report['version']}, this driver {__version__}: install "
                "the same fedpriv on every node"
            )
        if report["problems"]:
            raise ClusterError(
                f"the Ray node at {where} cannot load what the sites need: {'; '.join(report['problems'])}. "
                "Every node needs the data and the model at the paths the settings name"
            )
        reports.append({"node": where, **report})
    return reports


def clean_nodes(address: str, run_dir: str) -> None:
    """Removes, on every node, the folders where the run's sites kept their copies (they hold the sites' keys)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():  # Flower's backend disconnects when the simulation ends
        connect(address, verbose=False)
    try:
        removals = [
            ray.remote(num_cpus=0)(_remove_node_folders)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(run_dir)
            for node in ray.nodes()
            if node.get("Alive")
        ]
        for removal in removals:
            # Best effort: a node that cannot run fedpriv ran no site and made no folder; the run's own
            # error, if any, is the one to see.
            with contextlib.suppress(Exception):
                ray.get(removal, timeout=300)
    finally:
        ray.shutdown()


def node_folders(run_dir: str) -> Path:
    """On a node, the parent of the folders (one per worker process) where `run_dir`'s sites keep their copies."""
    digest = hashlib.sha256(run_dir.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedpriv-cluster-{os.getuid()}" / digest


def _remove_node_folders(run_dir: str) -> None:
    shutil.rmtree(node_folders(run_dir), ignore_errors=True)


def _node_report(needs: dict[str, str]) -> dict:
    """Runs on a node: its fedpriv's version, and what of `needs` (setting -> value) it cannot load."""
    import fedpriv
    from fedpriv.common.resources import ModelSourceError, check_model, resolve_path

    problems = []
    for setting, value in needs.items():
        if setting == "model.name":
            try:
                check_model(value)
            except ModelSourceError as error:
                problems.append(str(error))
        elif value and not resolve_path(value).is_file():
            problems.append(f"{setting}: no file {resolve_path(value)}")
    return {"version": fedpriv.__version__, "problems": problems}


def start_run_files(run_dir: str, names: list[str]):
    """The actor through which sites on any node read and write their files of `run_dir`, on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    placed = NodeAffinitySchedulingStrategy(here, soft=False)
    actor = (
        ray.remote(num_cpus=0, max_concurrency=1)(RunFiles)
        .options(name=run_files_name(run_dir), namespace=NAMESPACE, scheduling_strategy=placed)
        .remote(run_dir, names)
    )
    ray.get(actor.__ray_ready__.remote(), timeout=300)  # started (or its error raised here)
    return actor


class RunFiles:
    """A run directory's site files, served from the driver's node (one call at a time)."""

    def __init__(self, run_dir: str, names: list[str]):
        self.run = RunDirectory(run_dir)
        self.names = list(names)

    def _owned(self, name: str) -> tuple[Path, Path]:
        """(ledger, progress): the only files a site writes in the run directory."""
        return self.run.ledger_path(name), self.run.progress / f"{site_names.check(name)}.json"

    def site_files(self, partition_id: int) -> tuple[str, dict[str, bytes]]:
        """The site of a partition, and its files as the driver has them now (relative paths)."""
        name = self.names[partition_id]
        shown = {}
        for path in (self.run.key_path(name), self.run.public_keys, self.run.ledger_path(name)):
            if path.exists():
                shown[str(path.relative_to(self.run.path))] = path.read_bytes()
        return name, shown

    def store(self, name: str, written: dict[str, bytes]) -> None:
        """Takes what site `name` wrote: its ledger grows by what it appended, its progress is replaced."""
        ledger, progress = self._owned(name)
        for relative, data in written.items():
            path = self.run.path / relative
            if path == progress:
                path.parent.mkdir(parents=True, exist_ok=True)
                files.write_atomic(path, data)
            elif path == ledger:
                before = path.read_bytes() if path.exists() else b""
                if not data.startswith(before):
                    raise ClusterError(f"{name}'s ledger from its node does not extend the driver's copy; not taken")
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                with os.fdopen(fd, "ab") as handle:
                    handle.write(data[len(before) :])
                    handle.flush()
                    os.fsync(handle.fileno())
            else:
                raise ClusterError(f"{name} wrote {relative} in the run directory: a site writes only its ledger")
