"""A federation of real processes on 127.0.0.1: provisioned kits, an aggregator, site agents.

Shared by the deployment tests and the load test (and `bench/load.py`):
everything runs as an operator would run it, through the `fedpriv` command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from tests.helpers import LABELS, easy_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-a", "site-b")  # the default federation
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200")
# The sites' own policy in most tests: runs of a few rounds at a large epsilon must not be refused.
PERMISSIVE = {"max-release-epsilon": 1000.0, "min-noise-multiplier": 0.01}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def fedpriv(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=ENV,
    )


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


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
    ):
        self.root = root
        self.sites = sites
        self.fleet, self.control, *agent_ports = free_ports(2 + len(sites) + 6)
        self.ports = dict(zip(sites, agent_ports, strict=False))  # the rest are spare
        self.spare_ports = agent_ports[len(sites) :]
        self.processes: dict[str, subprocess.Popen] = {}
        (root / "federation.toml").write_text(
            f"""
name = "deploy-test"
[aggregator]
address = "127.0.0.1:{self.fleet}"
hosts = ["localhost"]
fleet-listen = "127.0.0.1:{self.fleet}"
control-listen = "127.0.0.1:{self.control}"
[data]
labels = {json.dumps(LABELS)}
[site-defaults]
epsilon-cap = 1000.0
declared-rows = 150
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
"""
            + "".join(f'[[sites]]\nname = "{s}"\n' for s in sites),
            encoding="utf-8",
        )
        result = fedpriv("provision", "-f", root / "federation.toml")
        assert result.returncode == 0, result.stdout + result.stderr
        self.kits = root / "kits"
        self.state = root / "aggregator-state"
        self.data = {s: write_csv(root / f"{s}.csv", easy_rows(150, seed=10 + i)) for i, s in enumerate(sites)}
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
            assert process.poll() is None, self.log_text("aggregator", since)[-3000:]
            return "aggregator ready" in self.log_text("aggregator", since)

        wait_for(ready, 120, "the aggregator")

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

    def wait_online(self, sites=None, timeout: float = 150) -> None:
        sites = self.sites if sites is None else sites
        wait_for(lambda: set(sites) <= self.online(), timeout, f"{', '.join(sites)} to be online", interval=2)

    def ledger(self, site: str) -> Path:
        return self.root / f"{site}-state" / "ledgers" / f"{site}.jsonl"

    def submit(self, *args, **extra_env: str) -> subprocess.Popen:
        return subprocess.Popen(
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(ENV, **extra_env),
            start_new_session=True,
        )

    def audit(self, run_dir: Path) -> subprocess.CompletedProcess:
        return fedpriv(
            "audit",
            run_dir,
            *(self.ledger(s) for s in self.sites if self.ledger(s).exists()),  # a site that never released has none
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


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"run did not finish in {timeout:.0f} s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return process.returncode, out, err


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
    import random

    import psutil

    from fedpriv.common.rundir import RunDirectory

    names = tuple(f"site-{i}" for i in range(1, sites + 1))
    fed = LocalFederation(root, model_dir, sites=names, rounds=rounds, min_sites=max(2, sites - kills))
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
        fed.wait_online(timeout=300)
        started = time.monotonic()
        process = fed.submit("--run-dir", run_dir, "--set", "strategy.round-timeout=120")
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
        out, err = process.communicate()
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
