"""The site's resident worker: one long-lived process that answers every message of the site's SuperNode.

Flower 1.39's SuperNode starts a fresh `flwr-clientapp` process for every
message, and fedpriv's ClientApp needs torch, transformers and the site's
model, features and budget: seconds of imports and loading per message,
several messages a secure round. The agent instead runs this worker beside
the SuperNode, and its SuperNode (`fedpriv.deploy.supernode`) starts no
ClientApp process: for each message it pulls, it checks the run's app
bundle and hands the message and the run's context to this worker
(`WorkerChannel`) over a Unix socket in the worker folder, which only the
agent's user can enter (0700), with a secret the worker writes anew at each
start. The worker runs fedpriv's ClientApp in this process (its model and
prepared data stay resident between messages, `client.runtime.WORKER`) and
sends back the reply and the context; the SuperNode stores them as
Flower's ClientApp process would have, and pushes the reply.

Nothing that must survive the worker lives only in it: the ledger is
written before a release leaves, and the secure-aggregation session is in
Flower's per-node context, which the SuperNode keeps. If the worker dies,
the agent starts another; a message that comes while none listens, or
whose worker dies while answering it, is answered at once with an error
naming why. The worker listens before it loads the runtime, and the agent
starts the SuperNode beside it: an agent with a bad kit or address fails in
seconds, not after the imports, and a message that comes while the worker
loads waits in the socket's queue.

The folder holds:

    socket     the Unix socket (0600)
    secret     this start's secret (0600); a connection without it is closed
    ready.json {"pid", "started"}: written once the ClientApp is imported and connections are answered
    stats.json what this worker has answered: messages, failed, bytes received and sent (as serialised
               protobuf), busy seconds
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
WORKER_ENV = "FEDPRIV_SITE_WORKER"  # the worker folder, for the agent's SuperNode
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
        self.app = load_client_app()

    def serve(self, stop: threading.Event) -> None:
        server = self.server
        server.settimeout(0.5)
        write_atomic(self.folder / READY, json.dumps({"pid": os.getpid(), "started": time.time()}) + "\n")
        print(f"fedpriv site worker: ready (pid {os.getpid()})", flush=True)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer_and_close, args=(conn,), daemon=True).start()
        server.close()

    def _answer_and_close(self, conn: socket.socket) -> None:
        with conn:
            self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        from fedpriv.common import flower_compat

        conn.settimeout(10.0)  # the SuperNode writes its request at once
        stream = conn.makefile("rwb")
        try:
            header = json.loads(stream.readline(MAX_REQUEST))
            if not hmac.compare_digest(str(header.get("secret", "")), self.secret):
                raise ValueError("wrong secret")
            message_data, context_data = (_read_exactly(stream, int(header[k])) for k in ("message", "context"))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"fedpriv site worker: refused a connection ({error})", file=sys.stderr, flush=True)
            return
        conn.settimeout(None)
        started = time.monotonic()
        message = flower_compat.message_from_wire(message_data)
        context = flower_compat.context_from_wire(context_data)
        assert self.app is not None, "serve() before load()"
        try:
            with self.app_lock:  # one resident model: one message at a time
                reply = self.app(message=message, context=context)
        except Exception as error:  # the reply Flower's ClientApp process would send; the worker carries on
            reason = f"{type(error)}:<'{error}'>"
            print(f"fedpriv site worker: {reason}", file=sys.stderr, flush=True)
            reply = flower_compat.error_reply(message, reason)
        reply_data, context_data = flower_compat.message_to_wire(reply), flower_compat.context_to_wire(context)
        self._count(len(message_data), len(reply_data), reply.has_error(), time.monotonic() - started)
        with contextlib.suppress(OSError):  # a SuperNode that went away needs no answer
            stream.write(json.dumps({"message": len(reply_data), "context": len(context_data)}).encode() + b"\n")
            stream.write(reply_data)
            stream.write(context_data)
            stream.flush()

    def _count(self, received: int, sent: int, failed: bool, seconds: float) -> None:
        with self.stats_lock:
            stats = self.stats
            stats["messages"] += 1
            stats["failed"] += int(failed)
            stats["bytes-received"] += received
            stats["bytes-sent"] += sent
            stats["busy-seconds"] = round(stats["busy-seconds"] + seconds, 3)
            with contextlib.suppress(Exception):  # counters for the operator; never a reason to fail a message
                write_atomic(self.folder / STATS, json.dumps(stats) + "\n")


def _read_exactly(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"the connection ended after {len(data)} of {size} bytes")
    return data


class WorkerChannel:
    """The SuperNode's side: hands each message to the resident worker and returns its reply (`flower_compat.Answer`).

    The app bundle is checked here (`clientapp_guard.check_fab`), before the
    message goes anywhere. Whatever goes wrong (no worker listening, a worker
    that dies mid-message) becomes an error reply naming why, at once: the
    round carries on without this site, and the agent restarts the worker.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._checked: dict[bytes, str] = {}  # bundle -> "" (fedpriv's) or why it was refused

    def __call__(self, message: Any, context: Any, bundle: bytes) -> tuple[Any, Any]:
        from fedpriv.common import flower_compat
        from fedpriv.deploy.clientapp_guard import WorkerUnavailable

        refused = self._refusal(bundle)
        if refused:
            return flower_compat.error_reply(message, refused), None
        try:
            secret = (self.folder / SECRET).read_text(encoding="utf-8").strip()
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(self.folder / SOCKET))
        except OSError as error:
            why = f"the site worker is not running ({error.strerror or error}); its agent restarts it"
            return self._unavailable(message, WorkerUnavailable(why)), None
        message_data, context_data = flower_compat.message_to_wire(message), flower_compat.context_to_wire(context)
        with conn:
            stream = conn.makefile("rwb")
            try:
                header = {"secret": secret, "message": len(message_data), "context": len(context_data)}
                stream.write(json.dumps(header).encode() + b"\n")
                stream.write(message_data)
                stream.write(context_data)
                stream.flush()
                answer = json.loads(stream.readline(MAX_REQUEST))
                reply_data, context_data = (_read_exactly(stream, int(answer[k])) for k in ("message", "context"))
            except (OSError, ValueError, KeyError, TypeError):
                why = "the site worker stopped while it answered this message; its agent restarts it"
                return self._unavailable(message, WorkerUnavailable(why)), None
        return flower_compat.message_from_wire(reply_data), flower_compat.context_from_wire(context_data)

    def _refusal(self, bundle: bytes) -> str:
        from fedpriv.deploy.clientapp_guard import ForeignAppError, check_fab

        if bundle not in self._checked:
            try:
                check_fab(bundle)
                self._checked[bundle] = ""
            except ForeignAppError as error:
                print(f"fedpriv: {error}", file=sys.stderr, flush=True)  # the site's log; the reply carries it too
                self._checked[bundle] = f"{type(error)}:<'{error}'>"
        return self._checked[bundle]

    @staticmethod
    def _unavailable(message: Any, error: Exception) -> Any:
        from fedpriv.common import flower_compat

        print(f"fedpriv: refused a message: {error}", file=sys.stderr, flush=True)
        return flower_compat.error_reply(message, f"{type(error)}:<'{error}'>")


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
