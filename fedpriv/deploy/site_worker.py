"""The site's resident worker: one long-lived process that answers every message of the site's SuperNode.

Flower 1.39's SuperNode starts a fresh `flwr-clientapp` process for every
message, and fedpriv's ClientApp needs torch, transformers and the site's
model, features and budget: seconds of imports and loading per message,
five messages a secure round. The agent instead runs this worker beside the
SuperNode. The `flwr-clientapp` the SuperNode starts is a forwarder
(`clientapp_guard.write_launcher`): a few lines of the standard library
that hand their command line (the runtime API address and the task's
token) to this worker over a Unix socket in the worker folder, which only
the agent's user can enter (0700), with a secret the worker writes anew at
each start. The worker then does what Flower's ClientApp process would
(`flower_compat.run_clientapp_task`): it pulls the message, checks the app
bundle, runs fedpriv's ClientApp in this process (its model and prepared
data stay resident between messages, `client.runtime.WORKER`), and pushes
the reply. The forwarder exits with the status Flower's process would have.

Nothing that must survive the worker lives only in it: the ledger is
written before a release leaves, and the secure-aggregation session is in
Flower's per-node context, which the SuperNode keeps. If the worker dies,
the agent starts another; a message that comes while none listens is
answered at once with an error naming why (the forwarder falls back to the
guarded Flower process, which refuses the task). The worker listens before
it loads the runtime, and the agent starts the SuperNode beside it: an agent
with a bad kit or address fails in seconds, not after the imports, and a
message that comes while the worker loads waits in the socket's queue.

The folder holds:

    socket     the Unix socket (0600)
    secret     this start's secret (0600); a connection without it is closed
    ready.json {"pid", "started"}: written once the ClientApp is imported and connections are answered
    stats.json what this worker has answered: messages, failed, bytes received and sent, busy seconds
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import importlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpriv.common.files import write_atomic
from fedpriv.common.flower_app import CLIENT_APP

SOCKET, SECRET, READY, STATS = "socket", "secret", "ready.json", "stats.json"
MAX_REQUEST = 1 << 16  # a command line, never more


def prepare(folder: Path) -> None:
    """The worker folder, private to this user; what a previous start left is cleared."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for name in (READY, SOCKET, SECRET, STATS):
        (folder / name).unlink(missing_ok=True)


def load_client_app():
    module, _, attribute = CLIENT_APP.partition(":")
    return getattr(importlib.import_module(module), attribute)


class SiteWorker:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.secret = secrets.token_hex(32)
        self.app: Callable[..., Any] | None = None
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Each message is answered in its own thread, as Flower runs each in its own process: a task stuck
        # pulling a message that will never come (its run was stopped) must not hold up the next one. The
        # ClientApp itself runs one message at a time (one resident model).
        self.app_lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.stats: dict[str, float] = {"pid": os.getpid(), "messages": 0, "failed": 0, "busy-seconds": 0.0}
        self.stats.update({"bytes-received": 0, "bytes-sent": 0})

    def listen(self) -> None:
        """The secret, then the socket: forwarders connect from now on, and wait until `serve` answers."""
        prepare(self.folder)
        secret = self.folder / SECRET
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(self.secret)
        old = os.umask(0o177)
        try:
            self.server.bind(str(self.folder / SOCKET))
        finally:
            os.umask(old)
        self.server.listen(16)

    def load(self) -> None:
        """fedpriv's ClientApp, with torch and transformers: the seconds a worker's start costs."""
        from fedpriv.common.flower_compat import quicken_object_pulls

        quicken_object_pulls()
        self.app = load_client_app()

    def serve(self, stop: threading.Event) -> None:
        from fedpriv.deploy.clientapp_guard import ForeignAppError, check_fab

        server = self.server
        server.settimeout(0.5)
        write_atomic(self.folder / READY, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
        print(f"fedpriv site worker: ready (pid {os.getpid()})", flush=True)

        def check(content: bytes) -> None:
            try:
                check_fab(content)
            except ForeignAppError as error:
                print(f"fedpriv: {error}", file=sys.stderr, flush=True)
                raise

        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer_and_close, args=(conn, check), daemon=True).start()
        server.close()

    def _answer_and_close(self, conn: socket.socket, check) -> None:
        with conn:
            self._answer(conn, check)

    def _run_app(self, message, context):
        assert self.app is not None, "serve() before load()"
        with self.app_lock:
            return self.app(message=message, context=context)

    def _answer(self, conn: socket.socket, check) -> None:
        from fedpriv.common.flower_compat import TaskOutcome, run_clientapp_task

        conn.settimeout(10.0)  # the forwarder writes its one line at once
        try:
            request = json.loads(_read_line(conn))
            if not hmac.compare_digest(str(request.get("secret", "")), self.secret):
                raise ValueError("wrong secret")
            argv = _absolute_paths([str(a) for a in request["argv"]], str(request.get("cwd") or "."))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"fedpriv site worker: refused a connection ({error})", file=sys.stderr, flush=True)
            return
        conn.settimeout(None)
        started = time.monotonic()
        try:
            outcome = run_clientapp_task(
                argv,
                self._run_app,
                check,
                on_error=lambda reason: print(f"fedpriv site worker: {reason}", file=sys.stderr, flush=True),
            )
        except (Exception, SystemExit) as error:  # a bad command line (argparse exits): that task fails, not us
            print(f"fedpriv site worker: could not run the task ({error!r})", file=sys.stderr, flush=True)
            outcome = TaskOutcome(code=1)
        self._count(outcome, time.monotonic() - started)
        with contextlib.suppress(OSError):  # a forwarder that went away needs no answer
            conn.sendall(json.dumps({"exit": outcome.code}).encode() + b"\n")

    def _count(self, outcome, seconds: float) -> None:
        with self.stats_lock:
            stats = self.stats
            stats["messages"] += 1
            stats["failed"] += int(outcome.code != 0)
            stats["bytes-received"] += outcome.received
            stats["bytes-sent"] += outcome.sent
            stats["busy-seconds"] = round(stats["busy-seconds"] + seconds, 3)
            with contextlib.suppress(Exception):  # counters for the operator; never a reason to fail a message
                write_atomic(self.folder / STATS, json.dumps(stats) + "\n")


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data


def _absolute_paths(argv: list[str], cwd: str) -> list[str]:
    """The forwarder's command line with its file arguments made absolute (the worker does not share its cwd)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--root-certificates", "--token-file") and not os.path.isabs(out[i + 1]):
            out[i + 1] = os.path.join(cwd, out[i + 1])
    return out


class Resident:
    """The agent's side: starts the worker, restarts it when it dies, stops it with the agent.

    A worker that dies within `QUICK_DEATH` seconds of its start (it cannot
    import the ClientApp, say) is restarted after a growing pause, so a
    broken install does not spin.
    """

    QUICK_DEATH = 30.0

    def __init__(self, folder: Path, env: dict[str, str], log: Callable[[str], None], site: str) -> None:
        from fedpriv.deploy import processes

        self.folder, self.env, self.log, self.site = folder, env, log, site
        self._processes = processes
        self._stop = threading.Event()
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.starts = 0
        self._thread = threading.Thread(target=self._keep_running, name="site-worker", daemon=True)

    def start(self) -> Resident:
        prepare(self.folder)
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpriv.deploy.site_worker", str(self.folder)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # a Ctrl-C at the agent's terminal reaches the agent, which stops it
            preexec_fn=self._processes.die_with_parent(),
        )

    def _keep_running(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self._process = process = self._spawn()
            self.starts += 1
            self.log(f"{self.site}: site worker started (pid {process.pid})")
            self._processes.PassThrough(process)
            started = time.monotonic()
            code = process.wait()
            (self.folder / READY).unlink(missing_ok=True)
            if self._stop.is_set():
                return
            self.log(f"{self.site}: the site worker exited (status {code}); starting another")
            if time.monotonic() - started < self.QUICK_DEATH:
                self._stop.wait(pause)
                pause = min(pause * 2, 30.0)
            else:
                pause = 1.0

    def stop(self, grace: float) -> None:
        with self._lock:
            self._stop.set()
            process = self._process
        if process is not None:
            self._processes.stop(process, grace)
        self._thread.join(timeout=grace)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedpriv.deploy.site_worker")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    # The agent stops its worker with SIGTERM, and a Ctrl-C at its terminal reaches the agent only (the worker
    # has a session of its own). A SIGINT here comes from library code that expects to be its own process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = SiteWorker(args.folder.resolve())
    worker.listen()
    worker.load()  # SIGTERM's default action ends it at once while it loads
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker.serve(stop)


if __name__ == "__main__":
    main()
