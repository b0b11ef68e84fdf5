"""`flwr run .` runs the same ServerApp and ClientApp as `fedpriv simulate`."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stop_local_superlink(flwr_home: Path) -> None:
    # `flwr run` leaves a detached local SuperLink; stop the one this test started.
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_flwr_run_dot(tiny_config, tmp_path):
    flwr_home = tmp_path / "flwr-home"
    env = dict(
        os.environ,
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    c = tiny_config
    run_config = " ".join(
        [
            "rounds=1",
            f'run-dir="{c.run_dir}"',
            f'model.name="{c.model.name}"',
            f'data.path="{c.data.path}"',
            f'data.test-path="{c.data.test_path}"',
            f'data.labels="{c.data.labels}"',
            "data.max-length=32",
        ]
    )
    try:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "run", ".", "--stream", "--run-config", run_config],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        _stop_local_superlink(flwr_home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((Path(c.run_dir) / "summary.json").read_text())
    assert summary["rounds-completed"] == 1
    assert len(summary["sites"]) == 2  # Flower's default local federation
    assert all(0 < s["epsilon"] <= 8.0 for s in summary["sites"].values())
    assert (Path(c.run_dir) / "model" / "config.json").exists()
