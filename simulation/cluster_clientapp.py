"""The ClientApp `fedpriv simulate` runs on a Ray cluster: a simulated site whose run files stay on the driver.

The site's handlers are the same. Around each message, this app fetches the
site's files from the driver's `RunFiles` actor into a folder on this node,
points the site at that folder instead of the run directory, and afterwards
hands back what the site wrote (its ledger entries, before its reply leaves).
See `cluster.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client.app import register
from fedpriv.common.node_config import PARTITION_ID
from fedpriv.simulation.cluster import NAMESPACE, node_folders, run_files_name

RUN_DIR = "run-dir"  # the run config key of FedprivConfig.run_dir


def _node_folder(run_dir: str) -> Path:
    """This worker's own copy of what its sites see of `run_dir` (owner-only: it holds their keys)."""
    folder = node_folders(run_dir) / str(os.getpid())
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _run_files_on_the_driver(msg: Message, context: Context, call_next) -> Message:
    import ray

    run_dir = str(context.run_config[RUN_DIR])
    files = ray.get_actor(run_files_name(run_dir), namespace=NAMESPACE)
    name, shown = ray.get(files.site_files.remote(int(context.node_config[PARTITION_ID])))
    folder = _node_folder(run_dir)
    # The driver's copy wins: another worker may have served this site since this one last did.
    ledger = next((relative for relative in shown if relative.endswith(f"{name}.jsonl")), None)
    for relative, data in shown.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(data)
        path.chmod(0o600)
    if ledger is None:  # none on the driver yet: nor here
        for stale in folder.glob(f"*/{name}.jsonl"):
            stale.unlink()
    before = _contents(folder)
    original = context.run_config
    context.run_config = {**original, RUN_DIR: str(folder)}
    try:
        return call_next(msg, context)
    finally:
        context.run_config = original
        written = {relative: data for relative, data in _contents(folder).items() if before.get(relative) != data}
        if written:
            ray.get(files.store.remote(name, written))


app = register(ClientApp(mods=[_run_files_on_the_driver]))
