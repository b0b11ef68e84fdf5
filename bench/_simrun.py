"""Running `fedpriv simulate` as a subprocess and watching its whole process tree."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import tomli_w

ROOT = Path(__file__).resolve().parents[1]


def simulate(config, *, sample_every: float = 0.1) -> dict:
    """Runs one simulation; returns wall time, training-phase time, peak RSS of all its processes."""
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        path = Path(tmp) / "config.toml"
        path.write_text(tomli_w.dumps(config.replace(**{"run-dir": str(run_dir)}).model_dump(by_alias=True)))
        began = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "fedpriv.cli", "simulate", "--config", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak = [0]

        def watch() -> None:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                try:
                    procs = [root, *root.children(recursive=True)]
                    total = 0
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                        except psutil.Error:
                            pass
                    peak[0] = max(peak[0], total)
                except psutil.Error:
                    pass
                time.sleep(sample_every)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        output, _ = process.communicate()
        wall = time.perf_counter() - began
        watcher.join()
        if process.returncode != 0:
            raise RuntimeError(f"simulate failed:\n{output[-3000:]}")
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        starts = [e["time"] for e in events if e["kind"] == "round-start"]
        ends = [e["time"] for e in events if e["kind"] == "round-end"]
        summary = json.loads((run_dir / "summary.json").read_text())
        return {
            "wall-seconds": wall,
            "rounds-seconds": ends[-1] - starts[0],
            "peak-rss-bytes": peak[0],
            "central-accuracy": summary.get("central-accuracy"),
        }
