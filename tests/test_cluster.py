"""`fedpriv simulate` on an existing Ray cluster: a head and a worker node, each its own `ray start`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import tomli_w

from fedpriv.common.rundir import RunDirectory, summarize
from fedpriv.simulation.cluster import node_folders
from tests.helpers import ROOT, fedpriv_here
from tests.local_federation import free_ports

RAY = str(Path(sys.executable).parent / "ray")
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}


def _ray_processes(temp_dir: str):
    """This cluster's processes: Ray passes its temp folder to every process it starts, on both nodes."""
    import psutil

    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                yield process


def start_node(ray: list[str], *args) -> None:
    """`ray start ARGS` with its own agent ports (nodes of one machine must not share them)."""
    names = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
    ports = free_ports(4)
    flags = [x for pair in zip((*names, "--runtime-env-agent-port"), ports, strict=True) for x in pair]
    command = [*ray, "start", *map(str, args), "--num-cpus", "1", "--disable-usage-stats", *map(str, flags)]
    started = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]


@pytest.fixture
def cluster():
    """A two-node Ray cluster on this machine, one CPU per node; every node stopped afterwards.

    Never `ray stop`: it stops every Ray on the machine, other tests' simulations included.
    A short private temp folder: Ray's socket paths must fit in 107 bytes, and `ray.init()` elsewhere
    only finds clusters recorded in its own temp folder.
    """
    temp_dir = tempfile.mkdtemp(prefix="fpc-")
    gcs, client = free_ports(2)
    try:
        head = ["--head", "--port", gcs, "--temp-dir", temp_dir, "--include-dashboard", "false"]
        start_node([RAY], *head, "--ray-client-server-port", client)
        start_node([RAY], "--address", f"127.0.0.1:{gcs}")
        yield f"127.0.0.1:{gcs}", temp_dir
    finally:
        for process in _ray_processes(temp_dir):
            with contextlib.suppress(Exception):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def write(folder: Path, config) -> Path:
    path = folder / f"{Path(config.run_dir).name}.toml"
    path.write_text(tomli_w.dumps(config.model_dump(by_alias=True)))
    return path


def _raylets(temp_dir: str) -> set[int]:
    return {p.pid for p in _ray_processes(temp_dir) if p.name() == "raylet"}


def _site_workers(temp_dir: str) -> dict[int, int]:
    """pid -> its raylet (its node), of every process running a Flower ClientApp actor of this cluster."""
    import psutil

    raylets, found = _raylets(temp_dir), {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "ClientAppActor" in " ".join(process.info["cmdline"] or []) and process.info["ppid"] in raylets:
                found[process.pid] = process.info["ppid"]
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_simulation_runs_on_a_two_node_cluster_with_sites_on_both_and_the_files_on_the_driver(
    cluster, tiny_config, tmp_path
):
    address, temp_dir = cluster
    assert len(_raylets(temp_dir)) == 2, "the head and the worker node each run a raylet"
    config = tiny_config.replace(**{"simulation.backend": "ray", "simulation.cpus-per-site": 1.0})
    command = [sys.executable, "-m", "fedpriv.cli", "simulate", "--config", write(tmp_path, config)]
    command += ["--ray-address", address]
    with open(tmp_path / "out", "wb") as out:
        process = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    placed: dict[int, int] = {}
    try:
        # One CPU per node and one per site: Ray can only fit the two workers one on each node. Seen until the
        # run ends (the workers live as long as the simulation), so this waits on the run, not on a clock.
        while process.poll() is None:
            placed |= _site_workers(temp_dir)
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    output = (tmp_path / "out").read_text()
    assert process.returncode == 0, output[-4000:]
    assert set(placed.values()) == _raylets(temp_dir), placed

    run = RunDirectory(config.run_dir)
    summary = summarize(run)
    assert summary["rounds-completed"] == 2 and set(summary["sites"]) == {"site-000", "site-001", "site-002"}
    assert "Audit passed" in output
    for name in summary["sites"]:  # each site's ledger reached the driver whole, whichever node trained it
        assert len(run.ledger_path(name).read_text().splitlines()) == 2
    # The folders where the nodes kept their sites' copies (keys included) are gone with the run.
    assert not node_folders(str(run.path)).exists()

    # A third node whose Python has every library but not fedpriv: named before anything is written.
    bare = tmp_path / "python-without-fedpriv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True, timeout=300)
    libraries = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "ray").is_dir())
    (next(bare.glob("lib/python3*/site-packages")) / "libraries.pth").write_text(f"{libraries}\n")
    start_node([str(bare / "bin" / "python"), "-m", "ray.scripts.scripts"], "--address", address)
    command[command.index("--config") + 1] = write(tmp_path, config.replace(**{"run-dir": str(tmp_path / "run-2")}))
    refused = subprocess.run(list(map(str, command)), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "cannot run fedpriv's sites" in refused.stderr and "No module named 'fedpriv" in refused.stderr
    assert "install fedpriv" in refused.stderr and not (tmp_path / "run-2").exists()


def test_a_cluster_that_cannot_be_reached_is_named_before_anything_is_written(tmp_path):
    (port,) = free_ports(1)
    result = fedpriv_here("simulate", "--ray-address", f"127.0.0.1:{port}", "-o", tmp_path / "run")
    assert result.returncode == 2
    assert f"simulation.ray-address: no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert not (tmp_path / "run").exists()
    client = fedpriv_here("simulate", "--ray-address", "ray://head:10001", "-o", tmp_path / "run")
    assert client.returncode == 2 and "not a Ray Client ray:// address" in client.stderr
    both = fedpriv_here(
        "simulate", "--set", "simulation.backend=in-process", "--set", "simulation.ray-address=auto", "-o", tmp_path
    )
    assert both.returncode == 2 and "simulation.ray-address runs the sites on a Ray cluster" in both.stderr
