"""Running Flower's own commands (SuperLink, SuperNode, `flwr`) as child processes of a fedpriv command.

The aggregator and the site agent both start a Flower process, pass
SIGTERM/SIGINT on to it so that `docker stop`, `systemctl stop` and
Kubernetes shut it down cleanly, wait for it with a grace period, and make
sure nothing it started outlives it. That logic lives here, once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def flower_bin(name: str) -> str:
    """One of Flower's commands from this environment first: a venv need not be activated."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower command: its own FLWR_HOME, no telemetry, this environment's commands first."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    # The SuperLink and SuperNode start flower-superexec, flwr-serverapp and flwr-clientapp by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class StopSignals:
    """SIGTERM/SIGINT to this process: remembered, and passed on as SIGTERM to the child it watches.

    The child shuts down on its own; we wait for it (see `wait`). Installing
    replaces Python's default SIGINT handling (KeyboardInterrupt) for the
    rest of the process, which is what a long-running service wants.
    """

    def __init__(self) -> None:
        self.requested = False
        self._child: subprocess.Popen | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._forward)

    def _forward(self, _signum, _frame) -> None:
        self.requested = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def watch(self, child: subprocess.Popen) -> subprocess.Popen:
        """The child a stop is passed on to from now on."""
        self._child = child
        if self.requested and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # asked to stop while it was starting
        return child

    def sleep(self, seconds: float) -> bool:
        """Waits `seconds` unless asked to stop first; returns whether we were asked."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.requested:
            time.sleep(0.2)
        return self.requested


def wait(process: subprocess.Popen, stop: StopSignals, grace: float) -> int:
    """The child's exit code; a child that ignores a passed-on stop for `grace` seconds is killed."""
    deadline = None
    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if stop.requested and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                process.kill()


def stop(process: subprocess.Popen, grace: float) -> None:
    """Ends one child: SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_group(pgid: int, grace: float = 10.0) -> None:
    """Ends a whole process group (a child started with `start_new_session`, and all it started): TERM, then KILL."""
    deadline = time.monotonic() + grace
    try:
        os.killpg(pgid, signal.SIGTERM)
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone


class PassThrough:
    """Copies a child's output to our stdout unchanged, line by line, and keeps its last lines."""

    def __init__(self, process: subprocess.Popen, keep: int = 200):
        self.tail: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line)

    def join(self, timeout: float = 5.0) -> str:
        """Waits for the output to end (the child has exited); returns the kept lines."""
        self._thread.join(timeout=timeout)
        return "".join(self.tail)
