"""Shared by the benchmarks: machine facts, medians, a table, a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from fedpriv.common.environment import apply_quiet_defaults

apply_quiet_defaults()  # before Flower/Ray load

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch-threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median(values) -> float:
    return float(statistics.median(values))


def save(name: str, payload: dict, command: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for row in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=120).print(t)
