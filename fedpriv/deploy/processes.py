"""Running Flower's own commands (SuperLink, SuperNode, `flwr`) as child processes of a fedpriv command.

The aggregator and the site agent both start a Flower process, pass
SIGTERM/SIGINT on to it so that `docker stop`, `systemctl stop` and
Kubernetes shut it down cleanly, wait for it with a grace period, and make
sure nothing it started outlives it. That logic lives here, once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from fedpriv.common.errors import FedprivError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Flower's long-running processes; each one's children watch it (`--parent-pid`) and end with it.
FLOWER_SERVICES = frozenset(
    {"flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp"}
)
# fedpriv's own long-running processes beside them (`python -m <module>`), found the same way.
FEDPRIV_SERVICES = frozenset({"fedpriv.deploy.supernode", "fedpriv.deploy.site_worker"})
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


def _prctl():
    """libc's prctl, resolved here: a child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent():
    """A `preexec_fn`: the child gets SIGTERM when this process dies, however it dies (`kill -9` too).

    Flower's SuperNode and SuperLink stop cleanly on SIGTERM (a SuperNode
    deactivates its node, so a restarted agent is let in at once), and each
    of their own children watches its parent's pid and follows. Without it,
    a killed agent's SuperNode is re-parented to init and goes on training
    and holding the site's identity. Linux only; elsewhere `StateLock` ends
    what a killed agent left behind when it is started again.
    """
    parent = os.getpid()
    prctl = _PRCTL

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class LockedError(FedprivError, RuntimeError):
    """Another live process runs from this state directory; the message names it."""


class StateLock:
    """One service per state directory, and a clean start after one that was killed.

    The lock is an exclusive `flock` on `<state>/<name>.lock`, held by this
    process only (children do not inherit it), so the kernel releases it the
    moment the holder dies, `kill -9` included. Whoever takes it next knows
    the previous holder is gone, and ends any Flower service still running
    with this state directory's FLWR_HOME (a SuperNode that outlived its
    agent) before starting its own.
    """

    def __init__(self, state: Path, name: str, what: str, flwr_home: Path, grace: float = 20.0):
        self.path = state / f"{name}.lock"
        self.what, self.flwr_home, self.grace = what, flwr_home, grace
        self._fd: int | None = None

    def acquire(self, log=print) -> StateLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(self.path).get("pid", "?")
            os.close(fd)
            raise LockedError(
                f"{self.what} is already running from {self.path.parent} (pid {holder}); run one per state "
                f"directory: stop that one first (or give this one its own --state)"
            ) from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        leftovers = flower_processes(self.flwr_home)
        if leftovers:
            log(
                f"ending {len(leftovers)} Flower process(es) left running by a previous {self.what} that was killed "
                f"(pids {', '.join(map(str, leftovers))})"
            )
            end_processes(leftovers, self.grace)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def flower_processes(flwr_home: Path) -> list[int]:
    """Flower services (by command name) running with this FLWR_HOME, found in /proc (Linux; elsewhere none)."""
    proc, home = Path("/proc"), str(flwr_home)
    found: list[int] = []
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:3]
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        names = {os.path.basename(a.decode("utf-8", "replace")) for a in argv}
        if names & (FLOWER_SERVICES | FEDPRIV_SERVICES) and f"FLWR_HOME={home}".encode() in environ:
            found.append(int(entry.name))
    return sorted(found)


def end_processes(pids: list[int], grace: float) -> None:
    """SIGTERM (Flower's clean stop), then SIGKILL to whatever is still there after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead; its parent just has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


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

    def __init__(self, process: subprocess.Popen, keep: int = 200, on_line: Callable[[str], None] | None = None):
        self.tail: deque[str] = deque(maxlen=keep)
        self._on_line = on_line
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def join(self, timeout: float = 5.0) -> str:
        """Waits for the output to end (the child has exited); returns the kept lines."""
        self._thread.join(timeout=timeout)
        return "".join(self.tail)
