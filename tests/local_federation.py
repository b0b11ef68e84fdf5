"""A federation of real processes on 127.0.0.1: provisioned kits, an aggregator, site agents.

Shared by the deployment tests and the load test (and `bench/load.py`):
everything runs as an operator would run it, through the `fedpriv` command.

Waiting. CI runs on loaded 2-core machines, where a step takes anywhere from
one to many seconds, so nothing here waits on log text or guesses a duration:
it waits on what the product records (run-directory events, the aggregator's
`ready.json`, Flower's own list of online nodes) or on process state (a site's
ClientApp process is running). `WAIT` only bounds a hang; it never paces a test.

Reusing one federation. Starting an aggregator and its agents costs a minute
on CI; tests that can share one take it from a module-scoped fixture:

    @pytest.fixture(scope="module")
    def fed(tiny_model_dir, tmp_path_factory):
        with running(tmp_path_factory.mktemp("mine"), tiny_model_dir, sites=("site-a", "site-b")) as federation:
            yield federation

Each test then submits its own run (`fed.submit("--run-dir", ..., "--set", ...)`,
`finish(...)`) and leaves every site online for the next (`fed.wait_online()`
after restarting one it killed). `fed.submit(..., server_app=PATH)` runs
another ServerApp (a Python file defining `app = ServerApp(...)`, not named
test_*.py, which Flower leaves out of bundles) against the same real agents,
e.g. a hostile aggregator; the sites keep their own fedpriv ClientApp. It
should end by logging `run-end` in its run directory, as
tests/server_apps/census.py does: `fedpriv aggregator run` waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import tomli_w

from tests.helpers import LABELS, easy_rows, fedpriv_here, write_csv

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-a", "site-b")  # the default federation
# The repository on the import path: a test's own ServerApp (`submit(server_app=...)`) is imported from it.
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200", PYTHONPATH=str(ROOT))
# The sites' own policy in most tests: runs of a few rounds at a large epsilon must not be refused.
PERMISSIVE = {"max-release-epsilon": 1000.0, "min-noise-multiplier": 0.01}
# Bounds a hang, never paces a test: every wait ends as soon as its event is there.
WAIT = 600.0


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free now, drawn below the kernel's ephemeral range (32768 up).

    A port the kernel hands out for binding to port 0 comes from the same range as the source ports
    of outgoing connections, of which a busy machine (many gRPC clients) opens hundreds: one of them
    can take it before the SuperLink binds it. Below that range only servers bind.
    """
    draw = random.Random()  # seeded by the OS: parallel test processes draw different ports
    ports: list[int] = []
    while len(ports) < n:
        port = draw.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def fedpriv(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )


def wait_for(
    condition, timeout: float = WAIT, what: str = "a condition", interval: float = 0.5, alive=None, explain=None
):
    """Polls `condition` until it holds; fails at once if `alive` (a process) has exited meanwhile.

    `explain` (a callable) adds what it returns to the failure: the state the wait ended in.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: never happened; the process it depended on exited ({alive.returncode})")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"; {explain()}" if explain else ""))


@dataclass
class Submission:
    """A run submitted with `fedpriv aggregator run`; its output goes to files (a pipe nobody reads would fill)."""

    process: subprocess.Popen
    out: Path
    err: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        return self.process.poll()

    def output(self) -> tuple[str, str]:
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


def wait_event(
    run_dir: Path, kind: str, match: Callable[[dict], Any] = bool, run: Submission | None = None, timeout: float = WAIT
) -> dict:
    """The first event of `kind` in the run directory that `match`es, once the aggregator has logged it."""
    from fedpriv.common.rundir import RunDirectory

    directory = RunDirectory(run_dir)

    def found():
        return next((e for e in directory.events(kind) if match(e)), None)

    return wait_for(found, timeout, f"a {kind} event in {run_dir}", interval=0.2, alive=run)


class LocalFederation:
    """Provisioned kits, data, and the processes of one aggregator and its sites."""

    def __init__(
        self,
        root: Path,
        model_dir: str,
        sites: tuple[str, ...] = SITES,
        rounds: int = 2,
        min_sites: int = 2,
        policy: dict | None = None,
        labels: list[str] | None = None,
        data: dict[str, Path] | None = None,
        declared_rows: int = 150,
        run_settings: str = "",
    ):
        """`labels`, `data` (a CSV per site) and `run_settings` (TOML under [run]) replace the tests' tiny task."""
        self.root = root
        self.sites = sites
        self.fleet, self.control, *agent_ports = free_ports(2 + len(sites) + 6)
        self.ports = dict(zip(sites, agent_ports, strict=False))  # the rest are spare
        self.spare_ports = agent_ports[len(sites) :]
        self.processes: dict[str, subprocess.Popen] = {}
        self._submissions = 0  # numbers the output files of each run submitted
        (root / "federation.toml").write_text(
            f"""
name = "deploy-test"
[aggregator]
address = "127.0.0.1:{self.fleet}"
hosts = ["localhost"]
fleet-listen = "127.0.0.1:{self.fleet}"
control-listen = "127.0.0.1:{self.control}"
[data]
labels = {json.dumps(labels or LABELS)}
[site-defaults]
epsilon-cap = 1000.0
declared-rows = {declared_rows}
[site-defaults.policy]
{tomli_w.dumps(PERMISSIVE if policy is None else policy)}
[run]
rounds = {rounds}
[run.model]
name = "{model_dir}"
[run.data]
max-length = 32
[run.strategy]
min-sites = {min_sites}
fraction-evaluate = 0.0
round-timeout = 120.0
{run_settings}
"""
            + "".join(f'[[sites]]\nname = "{s}"\n' for s in sites),
            encoding="utf-8",
        )
        result = fedpriv_here("provision", "-f", root / "federation.toml")
        assert result.returncode == 0, result.stdout + result.stderr
        self.kits = root / "kits"
        self.state = root / "aggregator-state"
        self.data = data or {s: write_csv(root / f"{s}.csv", easy_rows(150, seed=10 + i)) for i, s in enumerate(sites)}
        self.test = write_csv(root / "test.csv", easy_rows(90, seed=2))

    # -- processes ---------------------------------------------------------

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log_text(self, name: str, since: int = 0) -> str:
        path = self.log(name)
        return path.read_bytes()[since:].decode("utf-8", "replace") if path.exists() else ""

    def log_size(self, name: str) -> int:
        return self.log(name).stat().st_size if self.log(name).exists() else 0

    def _spawn(self, name: str, *args, env: dict[str, str] = ENV) -> subprocess.Popen:
        with open(self.log(name), "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fedpriv.cli", *map(str, args)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def start_aggregator(self, **extra_env: str) -> None:
        since = self.log_size("aggregator")
        process = self._spawn(
            "aggregator",
            "aggregator",
            "start",
            "--kit",
            self.kits / "aggregator",
            "--state",
            self.state,
            # gRPC logs refused TLS handshakes at INFO; without this, whether
            # they reach stderr depends on whether absl logging was set up yet.
            env=dict(ENV, GRPC_VERBOSITY="INFO", **extra_env),
        )

        def ready():
            # ready.json names the `aggregator start` that wrote it: one left by a killed predecessor does not count.
            assert process.poll() is None, self.log_text("aggregator", since)[-3000:]
            path = self.state / "ready.json"
            return path.exists() and json.loads(path.read_text() or "{}").get("pid") == process.pid

        wait_for(ready, WAIT, "the aggregator to be ready", interval=0.2)

    def start_agent(self, site: str) -> None:
        self._spawn(
            site,
            "agent",
            "start",
            "--kit",
            self.kits / "sites" / site,
            "--data",
            self.data[site],
            "--state",
            self.root / f"{site}-state",
            "--port",
            self.ports[site],
        )

    def _find(self, name: str, matches):
        """The first process started by `name` (an agent, "aggregator") for which `matches(command, process)`."""
        import psutil

        try:
            family = psutil.Process(self.processes[name].pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for member in family:
            try:
                if matches(" ".join(member.cmdline()), member):
                    return member
            except psutil.Error:
                continue
        return None

    def message_at_worker(self, site: str) -> bool:
        """Whether the site's SuperNode has handed a message to its worker that is not answered yet.

        The SuperNode opens one connection to the worker's socket per message and closes it with the answer;
        the kernel lists each connection under the socket's path (/proc/net/unix) beside the listening one,
        even while the worker has not accepted it. To catch a site mid-message, freeze its worker first
        (`worker(site, suspend=True)`): the message then waits for it, however fast the machine.
        """
        path = str(self.root / f"{site}-state" / "worker" / "socket")
        with open("/proc/net/unix", encoding="utf-8") as table:
            entries = [line.split() for line in table if line.rstrip().endswith(" " + path)]
        return any(entry[5] != "01" for entry in entries)  # 01: the listening socket; 02/03: a connection

    def process_named(self, name: str, mark: str):
        """The first process started by `name` whose command line has `mark` (psutil)."""
        found = self._find(name, lambda command, _: mark in command)
        if found is None:
            raise AssertionError(f"no process with {mark!r} under {name}")
        return found

    def worker(self, site: str, suspend: bool = False):
        """The site's resident worker process (psutil), or None; with `suspend`, it is stopped (SIGSTOP)."""
        found = self._find(site, lambda command, _: "fedpriv.deploy.site_worker" in command)
        if found is not None and suspend:
            found.suspend()
        return found

    def kill(self, name: str) -> None:
        """SIGKILL to the process and everything it started: the crash of a machine, not a shutdown."""
        process = self.processes.pop(name)
        _kill_tree(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                pass
            _kill_tree(process.pid, signal.SIGKILL)  # whatever is left
        self.processes.clear()

    # -- the aggregator's view ---------------------------------------------

    def online(self) -> set[str]:
        home = self.state / "flwr-home"
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "list", "deploy-test", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(ENV, FLWR_HOME=str(home)),
        )
        text = result.stdout
        nodes = json.loads(text[text.find("{") :]).get("nodes", []) if "{" in text else []
        names = {v: k for k, v in json.loads((self.state / "registered-nodes.json").read_text()).items()}
        return {names.get(str(n["node-id"]), str(n["node-id"])) for n in nodes if n["status"] == "online"}

    def wait_online(self, sites=None, timeout: float = WAIT) -> None:
        sites = self.sites if sites is None else sites
        wait_for(lambda: set(sites) <= self.online(), timeout, f"{', '.join(sites)} to be online", interval=2)

    def ledger(self, site: str) -> Path:
        return self.root / f"{site}-state" / "ledgers" / f"{site}.jsonl"

    def submit(self, *args, server_app: str | Path | None = None, **extra_env: str) -> Submission:
        """`fedpriv aggregator run` with these arguments; `server_app` runs the ServerApp of that Python file."""
        if server_app is not None:
            args = ("--app", self.server_app_dir(Path(server_app)), *args)
        self._submissions += 1
        out, err = (self.root / f"submit-{self._submissions}.{end}" for end in ("out", "err"))
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedpriv.cli",
                    "aggregator",
                    "run",
                    "--kit",
                    str(self.kits / "aggregator"),
                    "--state",
                    str(self.state),
                    *map(str, args),
                ],
                stdout=stdout,
                stderr=stderr,
                cwd=ROOT,
                env=dict(ENV, **extra_env),
                start_new_session=True,
            )
        return Submission(process, out, err)

    def server_app_dir(self, module: Path) -> Path:
        """A settings-only Flower App folder whose ServerApp is `module`'s `app`, a file of this repository.

        The bundle carries no code (the sites refuse one that does): the aggregator's processes import the
        module from the repository (PYTHONPATH in ENV). The sites' ClientApp stays fedpriv's; the run config is
        fedpriv's, so the module can read it with `FedprivConfig`.
        """
        import tomli_w

        from fedpriv.common.flower_app import app_project

        dotted = ".".join(module.resolve().relative_to(ROOT).with_suffix("").parts)
        folder = self.root / f"app-{module.stem}"
        folder.mkdir(exist_ok=True)
        project = app_project()
        project["tool"]["flwr"]["app"]["components"]["serverapp"] = f"{dotted}:app"
        (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
        return folder

    def audit(self, run_dir: Path, sites: tuple[str, ...] | None = None) -> SimpleNamespace:
        """Audits `run_dir` with the ledgers of `sites` (default: every site with one; one that never released has none)."""
        return fedpriv_here(
            "audit",
            run_dir,
            *(self.ledger(s) for s in sites or self.sites if self.ledger(s).exists()),
            "--keys",
            self.kits / "aggregator" / "public-keys.json",
            "--json",
        )


def _kill_tree(pid: int, sig: int) -> None:
    """Signals a process, its process group and every descendant (the SuperNode has its own group)."""
    import psutil

    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            os.killpg(member.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def finish(run: Submission, timeout: float = WAIT) -> tuple[int, str, str]:
    """Waits for a submitted run to end: (exit code, stdout, stderr)."""
    try:
        run.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.process.wait()
        out, err = run.output()
        raise AssertionError(f"run did not finish in {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return (run.process.returncode, *run.output())


@contextlib.contextmanager
def running(
    root: Path, model_dir: str, sites: tuple[str, ...] = SITES, aggregator_env: dict[str, str] | None = None, **options
) -> Iterator[LocalFederation]:
    """A provisioned federation with its aggregator and every site online; everything stopped afterwards."""
    federation = LocalFederation(root, model_dir, sites=sites, **options)
    try:
        federation.start_aggregator(**(aggregator_env or {}))
        for site in sites:
            federation.start_agent(site)
        federation.wait_online()
        yield federation
    finally:
        federation.stop_all()
        sweep(federation.root)


def sweep(root: Path) -> None:
    """Kills whatever Flower process of this federation outlived its parent (e.g. after a crash test)."""
    import psutil

    for process in psutil.process_iter(["pid"]):
        try:
            home = process.environ().get("FLWR_HOME", "")
        except (psutil.Error, OSError):
            continue
        if home.startswith(str(root)):
            try:
                process.kill()
            except psutil.Error:
                pass


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in family:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_under_load(
    root: Path, model_dir: str, *, sites: int = 8, rounds: int = 20, kills: int = 2, seed: int = 0
) -> dict:
    """A deployed federation whose agents are killed (-9) and restarted at random rounds, observed from outside.

    Returns per-round times, the aggregator's memory after each round, who
    trained in each round, when agents were killed and restarted, the audit's
    verdict, and the processes of this federation still alive at the end.
    """
    import psutil

    from fedpriv.common.rundir import RunDirectory

    names = tuple(f"site-{i}" for i in range(1, sites + 1))
    fed = LocalFederation(root, model_dir, sites=names, rounds=rounds, min_sites=max(1, sites - kills))
    rng = random.Random(seed)
    victims = rng.sample(names, kills)
    kill_at = {victim: rng.randint(2, max(2, rounds - 3)) for victim in victims}
    events: list[dict] = []
    memory: list[tuple[int, int]] = []
    run_dir = root / "run-load"
    try:
        fed.start_aggregator()
        for site in names:
            fed.start_agent(site)
        fed.wait_online()
        started = time.monotonic()
        # A killed agent ends its round when Flower reports it unavailable (two missed heartbeats), and is
        # restarted only after that, so the timeout is a bound on a hang, not a pace.
        process = fed.submit("--run-dir", run_dir, "--set", f"strategy.round-timeout={WAIT:.0f}")
        run = RunDirectory(run_dir)
        seen = 0
        while process.poll() is None:
            ended = [e["round"] for e in run.events("round-end")]
            for rnd in ended[seen:]:
                memory.append((rnd, _tree_rss(fed.processes["aggregator"].pid)))
                for victim, at in kill_at.items():
                    if rnd == at:
                        fed.kill(victim)
                        events.append({"round": rnd, "site": victim, "event": "killed"})
                    elif rnd == at + 1:
                        fed.start_agent(victim)  # back after a round; Flower lets it in once its old session expires
                        events.append({"round": rnd, "site": victim, "event": "restarted"})
            seen = len(ended)
            time.sleep(0.5)
        _, out, err = finish(process)
        wall = time.monotonic() - started
        audit = fed.audit(run_dir)
        trained: dict[int, list[str]] = {}
        for event in run.events("site-train"):
            trained.setdefault(event["round"], []).append(event["site"])
        result = {
            "returncode": process.returncode,
            "output": (out + err)[-3000:],
            "wall-s": wall,
            "round-s": {e["round"]: e["seconds"] for e in run.events("round-end")},
            "aggregator-rss": memory,
            "trained": {r: sorted(s) for r, s in sorted(trained.items())},
            "events": events,
            "audit-returncode": audit.returncode,
            "audit": audit.stdout[-2000:],
        }
    finally:
        fed.stop_all()
    time.sleep(1)
    left = []
    for member in psutil.process_iter(["pid", "cmdline"]):
        try:
            home = member.environ().get("FLWR_HOME", "")
            cmd = " ".join(member.info["cmdline"] or [])
        except (psutil.Error, OSError):
            continue
        if home.startswith(str(root)) or str(root) in cmd:
            left.append(cmd[:200])
    sweep(root)
    result["left-behind"] = left
    return result
