"""The dashboard's web server: one read-only page over a run directory, updated live by server-sent events.

FastAPI and uvicorn (Flower's own web stack, already installed) serve it. A
refresher thread reads what the run appended; each open page holds one event
stream and is sent the whole state whenever it changed. Nothing here writes
to the run directory. On 127.0.0.1 it needs nothing else; on any other
address every request must carry the dashboard's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from fedpriv.dashboard.view import DashboardError, RunView, open_view

TOKEN_ENV = "FEDPRIV_DASHBOARD_TOKEN"
REFRESH_SECONDS = 0.5
PING_SECONDS = 15.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def page_html() -> str:
    return resources.files("fedpriv.dashboard").joinpath("page.html").read_text(encoding="utf-8")


class Dashboard:
    """Serves `view` on host:port; `start()` in a thread beside a run, `serve()` in the foreground."""

    def __init__(self, view: RunView, host: str = "127.0.0.1", port: int = 8765, token: str | None = None):
        if not is_loopback(host) and not token:
            raise DashboardError(
                f"--host {host}: a dashboard reachable from other machines needs a token "
                f"(set {TOKEN_ENV}, or let `fedpriv dashboard` make one)"
            )
        self.view, self.host, self.port, self.token = view, host, port, token
        self.closing = threading.Event()  # the run is over: send each page the last state, then end its stream
        self._streams = 0
        self._streams_lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh_loop, name="dashboard-refresh", daemon=True)
        self._server = None
        self._thread: threading.Thread | None = None
        self.app = self._build_app()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    # -- the state -------------------------------------------------------------------

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(REFRESH_SECONDS)

    def refresh(self) -> None:
        self.view.refresh()
        self.view.make_audit()

    # -- the web app -------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fedpriv dashboard", docs_url=None, redoc_url=None, openapi_url=None)
        dashboard = self

        @app.middleware("http")
        async def require_token(request: Request, call_next):
            if dashboard.token:
                given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix(
                    "Bearer "
                )
                if not secrets.compare_digest(given.encode(), dashboard.token.encode()):
                    return JSONResponse({"error": "this dashboard needs its token (?token=...)"}, status_code=401)
            return await call_next(request)

        @app.get("/", response_class=HTMLResponse)
        def page() -> str:
            return page_html()

        @app.get("/api/state")
        def state() -> dict:
            return dashboard.view.snapshot()

        @app.get("/audit", response_class=HTMLResponse)
        def audit_report() -> str:
            saved = dashboard.view.run.audit_html
            if saved.is_file():
                return saved.read_text(encoding="utf-8")
            report = dashboard.view.audit
            if report is None:
                raise HTTPException(404, "the audit is made once the run has ended")
            from fedpriv.audit.render import html_report

            return html_report(report)

        @app.get("/api/events")
        async def events(request: Request) -> StreamingResponse:
            return StreamingResponse(dashboard._stream(request), media_type="text/event-stream")

        return app

    async def _stream(self, request):
        with self._streams_lock:
            self._streams += 1
        try:
            sent, pinged = -1, time.monotonic()
            while True:
                closing = self.closing.is_set()
                version = self.view.version
                if version != sent:
                    snapshot = await asyncio.to_thread(self.view.snapshot)
                    sent = snapshot["version"]
                    yield f"data: {json.dumps(snapshot)}\n\n"
                elif closing:
                    yield "event: end\ndata: {}\n\n"
                    return
                elif time.monotonic() - pinged > PING_SECONDS:
                    pinged = time.monotonic()
                    yield ": ping\n\n"  # keeps proxies from closing a quiet stream
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)
        finally:
            with self._streams_lock:
                self._streams -= 1

    # -- running -----------------------------------------------------------------------

    def _uvicorn(self):
        import uvicorn

        config = uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning", timeout_graceful_shutdown=2, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        return self._server

    def start(self) -> str:
        """Serves in a thread; returns once it accepts connections (or raises why it cannot)."""
        server = self._uvicorn()
        self._refresher.start()
        self._thread = threading.Thread(target=self._run_quietly, args=(server,), name="dashboard", daemon=True)
        self._thread.start()
        while not server.started:
            if not self._thread.is_alive():
                raise DashboardError(f"the dashboard cannot listen on {self.host}:{self.port} (in use?)")
            time.sleep(0.05)
        return self.url

    @staticmethod
    def _run_quietly(server) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind: start() says why
            server.run()

    def serve(self) -> None:
        """Serves in the foreground until interrupted."""
        server = self._uvicorn()
        self._refresher.start()
        try:
            self._run_quietly(server)
        finally:
            self._stop.set()
        if not server.started:
            raise DashboardError(f"the dashboard cannot listen on {self.host}:{self.port} (in use?)")

    def close(self, drain: float = 5.0) -> None:
        """Sends every open page the final state (within `drain` seconds), then stops serving."""
        self.refresh()
        self.closing.set()
        deadline = time.monotonic() + drain
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def new_token() -> str:
    return secrets.token_urlsafe(24)


@contextlib.contextmanager
def beside(path: Path, port: int, say) -> Iterator[Dashboard]:
    """A dashboard on 127.0.0.1 for the run written at `path` while the block runs (`--dashboard`)."""
    dashboard = Dashboard(open_view(path), port=port)
    say(f"Dashboard: {dashboard.start()} (live while the run goes on; afterwards: fedpriv dashboard {path})")
    try:
        yield dashboard
    finally:
        dashboard.close()
