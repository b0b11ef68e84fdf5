"""The aggregator in a real deployment: a Flower SuperLink run from a kit.

`start` runs `flower-superlink` with TLS, node authentication and no runtime
dependency installation (aggregators are offline too), then registers every
provisioned site's node key. Flower's state (node registry, runs, messages)
is kept in memory unless the operator names a database file: every message
of a round passes through it, and on SQLite the SuperLink was the busiest
process of a deployed round (a secure round took 4.1 s against 1.6 s in
memory, bench/deploy.py). Nothing fedpriv needs lives there: the run
directory holds the run, and `start` registers every site again. `submit` sends the
fedpriv Flower App to it with `flwr run` and streams the run's log.

Everything the aggregator writes goes to a state directory, never into the
kit (a kit may be a read-only mount):

    <state>/superlink.db     Flower's state, only with `--flower-database` (the default keeps it in memory)
    <state>/flwr-home/       FLWR_HOME: the `flwr` connection, installed app bundles
    <state>/runs/<stamp>/    fedpriv run directories (default place)
    <state>/ready.json       written once the SuperLink listens and the sites are registered
                             (the pid of the `aggregator start` that wrote it: a probe for
                             supervisors and tests; a stale one names a process that is gone)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedpriv.common.config import FedprivConfig, apply_overrides, parse_config, parse_overrides
from fedpriv.common.data import LabelSet
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import read_toml, write_atomic
from fedpriv.common.flower_app import write_app_dir
from fedpriv.common.resources import check_model
from fedpriv.common.rundir import CONFIG, NODE_NAMES, RunDirectory
from fedpriv.deploy import kit_checks, processes
from fedpriv.deploy.kit import (
    CA_CERT,
    LEDGER_KEY,
    NODE_KEYS,
    PUBLIC_KEYS,
    TLS_CERT,
    TLS_KEY,
    AggregatorKit,
    KitError,
    load_aggregator_kit,
    require,
    split_address,
)
from fedpriv.deploy.processes import flower_bin, flower_env

FLWR_HOME = "flwr-home"
REGISTERED = "registered-nodes.json"
READY = "ready.json"
# Settings an operator may still change when resuming: they affect waiting, not the privacy plan.
RESUMABLE = {"strategy.min-sites", "strategy.round-timeout", "central-eval-every"}
GRACE_SECONDS = 20.0


class AggregatorError(FedprivError, RuntimeError):
    """The aggregator cannot start or submit; the message says why."""


def connection_name(kit: AggregatorKit) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in kit.federation) or "fedpriv"


def _dial(listen: str) -> str:
    host, port = split_address(listen)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{host}:{port}"


class Aggregator:
    """An aggregator kit together with its state directory."""

    def __init__(self, kit_dir: str | Path, state_dir: str | Path | None = None, insecure: bool = False):
        self.kit_dir = Path(kit_dir).expanduser().resolve()
        self.kit = load_aggregator_kit(self.kit_dir)
        self.state = Path(state_dir).expanduser().resolve() if state_dir else self.kit_dir.parent / "aggregator-state"
        self.insecure = insecure
        if not insecure:
            try:
                require(self.kit_dir, CA_CERT, TLS_CERT, TLS_KEY)
            except KitError as error:
                raise AggregatorError(
                    f"{error}. Refusing to run without TLS: provision the kit again, or pass --insecure "
                    "for a throw-away local test"
                ) from None
            kit_checks.check_secrets(self.kit_dir, TLS_KEY)
            kit_checks.check_certificate(self.kit_dir / CA_CERT, "the federation's CA certificate")
            kit_checks.check_certificate(self.kit_dir / TLS_CERT, "the aggregator's TLS certificate")
        require(self.kit_dir, LEDGER_KEY)
        kit_checks.check_secrets(self.kit_dir, LEDGER_KEY)
        if (self.kit_dir / PUBLIC_KEYS).exists():
            kit_checks.check_public_keys(self.kit_dir / PUBLIC_KEYS)

    @property
    def flwr_home(self) -> Path:
        return self.state / FLWR_HOME

    @property
    def connection(self) -> str:
        return connection_name(self.kit)

    def prepare(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)  # run directories and, if kept on disk, Flower's node registry
        self.flwr_home.mkdir(exist_ok=True)
        table: dict[str, Any] = {"address": _dial(self.kit.aggregator.control_listen)}
        if self.insecure:
            table["insecure"] = True
        else:
            table["root-certificates"] = str(self.kit_dir / CA_CERT)
        config = {"superlink": {"default": self.connection, self.connection: table}}
        write_atomic(self.flwr_home / "config.toml", tomli_w.dumps(config))

    def superlink_command(
        self, fleet_listen: str | None = None, control_listen: str | None = None, database: Path | None = None
    ) -> list[str]:
        """Flower's SuperLink command; `database`: keep Flower's state in that SQLite file, not in memory."""
        host, port = split_address(control_listen or self.kit.aggregator.control_listen)
        command = [
            flower_bin("flower-superlink"),
            "--fleet-api-address",
            fleet_listen or self.kit.aggregator.fleet_listen,
            "--host",
            host,
            "--port",
            str(port),
            *(["--database", str(database)] if database else []),
            "--disable-runtime-dependency-installation",
        ]
        if self.insecure:
            # Node authentication needs TLS (Flower refuses keys over plaintext).
            return command + ["--insecure"]
        return command + [
            "--ssl-ca-certfile",
            str(self.kit_dir / CA_CERT),
            "--ssl-certfile",
            str(self.kit_dir / TLS_CERT),
            "--ssl-keyfile",
            str(self.kit_dir / TLS_KEY),
            "--enable-supernode-auth",
        ]

    # -- node registration ------------------------------------------------

    def node_keys(self) -> dict[str, str]:
        path = self.kit_dir / NODE_KEYS
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def register_nodes(self, log: Callable[[str], None] = print) -> dict[str, str]:
        """Registers every provisioned site's node key (again is harmless); returns site -> node id."""
        self.prepare()
        registered_path = self.state / REGISTERED
        registered = _read_registered(registered_path)
        env = flower_env(self.flwr_home)
        with tempfile.TemporaryDirectory() as tmp:
            for site, public in self.node_keys().items():
                key_file = Path(tmp) / f"{site}.pub"
                key_file.write_text(public + "\n", encoding="utf-8")
                result = subprocess.run(
                    [
                        flower_bin("flwr"),
                        "supernode",
                        "register",
                        str(key_file),
                        self.connection,
                        "--name",
                        site,
                        "--format",
                        "json",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                answer = _json_tail(result.stdout)
                if result.returncode == 0 and answer.get("success"):
                    registered[site] = str(answer.get("node-id"))
                    log(f"registered {site} (node {registered[site]})")
                elif "already in use" in (result.stdout + result.stderr):
                    log(f"{site} already registered" + (f" (node {registered[site]})" if site in registered else ""))
                else:
                    raise AggregatorError(
                        f"could not register {site}: {(result.stdout + result.stderr).strip()[-800:]}"
                    )
        write_atomic(registered_path, json.dumps(registered, indent=2) + "\n")
        return registered

    def registered(self) -> dict[str, str]:
        """site -> Flower node id, as registration recorded them."""
        return _read_registered(self.state / REGISTERED)

    def write_node_names(self, run_dir: Path) -> None:
        """node id -> site for the run's ServerApp: a site that drops sends no name of its own."""
        run_dir.mkdir(parents=True, exist_ok=True)
        names = {node: site for site, node in sorted(self.registered().items())}
        write_atomic(run_dir / NODE_NAMES, json.dumps(names, indent=2) + "\n")

    # -- running the SuperLink --------------------------------------------

    def start(
        self,
        fleet_listen: str | None = None,
        control_listen: str | None = None,
        log: Callable[[str], None] = print,
        ready_timeout: float = 120.0,
        flower_database: Path | None = None,
    ) -> int:
        """Runs the SuperLink until it exits or this process gets SIGTERM/SIGINT; returns its exit code."""
        self.prepare()
        (self.state / READY).unlink(missing_ok=True)  # left by a killed predecessor: not ready yet
        control = control_listen or self.kit.aggregator.control_listen
        if control_listen:
            # `flwr` must dial where the control API really listens.
            self.kit.aggregator.control_listen = control_listen
            self.prepare()
        command = self.superlink_command(fleet_listen, control_listen, flower_database)
        # One aggregator per state directory; what a killed one left running (its SuperLink) is ended first.
        with processes.StateLock(self.state, "aggregator", "an aggregator", self.flwr_home, GRACE_SECONDS).acquire(log):
            log("starting: " + " ".join(command))
            stop = processes.StopSignals()
            process = stop.watch(
                subprocess.Popen(
                    command,
                    env=flower_env(self.flwr_home),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    preexec_fn=processes.die_with_parent(),  # ends with us, even after kill -9
                )
            )
            output = processes.PassThrough(process, on_line=RefusalNotes(self.state / REGISTERED, log))
            try:
                _wait_for_port(_dial(control), process, ready_timeout)
                if not self.insecure and self.node_keys():
                    self.register_nodes(log)
                fleet = fleet_listen or self.kit.aggregator.fleet_listen
                log(f"aggregator ready: sites connect to {self.kit.aggregator.address} (listening on {fleet})")
                ready = {"pid": os.getpid(), "superlink-pid": process.pid, "fleet": fleet, "control": _dial(control)}
                write_atomic(self.state / READY, json.dumps(ready) + "\n")
                code = processes.wait(process, stop, GRACE_SECONDS)
            except BaseException:
                processes.stop(process, GRACE_SECONDS)
                raise
            finally:
                output.join()
        return 0 if stop.requested else code

    # -- submitting runs --------------------------------------------------

    def run_config(
        self,
        config_file: str | Path | None = None,
        overrides: Iterable[str] = (),
        run_dir: str | Path | None = None,
    ) -> FedprivConfig:
        """The kit's run settings, then the operator's file, then --set; the kit's labels and key are kept."""
        tree = json.loads(json.dumps(self.kit.run))
        if config_file:
            user = read_toml(config_file, "config file", AggregatorError)
            _merge(tree, user.get("fedpriv", user))
        config = apply_overrides(parse_config(tree, str(config_file or "aggregator kit")), parse_overrides(overrides))
        return self._finish(config, run_dir)

    def resume_config(self, run_dir: str | Path, overrides: Iterable[str] = ()) -> FedprivConfig:
        """The saved configuration of an interrupted run, for a new submission that continues it."""
        run = RunDirectory(Path(run_dir).expanduser().resolve())
        saved = run.config_path
        if not saved.exists():
            raise AggregatorError(f"{run.path}: no {CONFIG} here; is this a run directory of this aggregator?")
        parsed = parse_overrides(overrides)
        changed = sorted(set(parsed) - RESUMABLE)
        if changed:
            raise AggregatorError(
                f"cannot change {', '.join(changed)} when resuming: the privacy plan was made for the saved settings "
                f"(only {', '.join(sorted(RESUMABLE))} may change)"
            )
        if run.summary() is not None and run.finished():
            raise AggregatorError(f"{run.path}: this run already finished; start a new one")
        tree = read_toml(saved, "saved run config", AggregatorError)
        config = apply_overrides(parse_config(tree, str(saved)), parsed)
        return self._finish(config, run.path)

    def _finish(self, config: FedprivConfig, run_dir: str | Path | None) -> FedprivConfig:
        p = config.privacy
        if p.enabled and p.noise == "distributed" and not p.distributed_batch:
            # In simulation the normaliser is counted from the shared dataset; here the rows are the sites'.
            raise AggregatorError(
                "privacy.distributed-batch: distributed noise in a deployment needs the federation's public "
                "expected batch per step (e.g. train.sample-rate x the sum of the sites' declared-rows); "
                "the aggregator cannot count the sites' rows"
            )
        labels = LabelSet.load(config.data.labels)
        kit_labels = self.kit.run.get("data", {}).get("labels")
        if kit_labels and LabelSet.load(kit_labels) != labels:
            raise AggregatorError(
                "data.labels differs from the federation's label set in the aggregator kit; "
                "sites check their data against the kit's labels, so a run must use the same"
            )
        run_dir = Path(run_dir or config.run_dir or self.state / "runs" / time.strftime("%Y%m%d-%H%M%S"))
        return config.replace(
            **{
                "run-dir": str(run_dir.expanduser().resolve()),
                "aggregator-key": str(self.kit_dir / LEDGER_KEY),
                "data.labels": labels.to_json(),  # inline: sites have no labels file
            }
        )

    def submit(self, config: FedprivConfig, app_dir: str | Path | None = None, stream: bool = True) -> int:
        """`flwr run` of the fedpriv app with this configuration; its log goes to our stdout.

        The app folder is written from this installation (settings only, no
        code); `app_dir` submits another Flower App folder instead.
        """
        check_model(config.model.name)  # the aggregator builds the global model from it: fail before submitting
        self.prepare()
        self.write_node_names(Path(config.run_dir))
        with tempfile.TemporaryDirectory(prefix="fedpriv-run-") as tmp:
            app = Path(app_dir) if app_dir else write_app_dir(Path(tmp) / "app", config)
            settings = Path(tmp) / "run-config.toml"
            settings.write_text(tomli_w.dumps(config.model_dump(by_alias=True)), encoding="utf-8")
            command = [flower_bin("flwr"), "run", str(app), self.connection, "--run-config", str(settings)]
            if stream:
                command.append("--stream")
            stop = processes.StopSignals()
            process = stop.watch(
                subprocess.Popen(command, env=flower_env(self.flwr_home), preexec_fn=processes.die_with_parent())
            )
            code = processes.wait(process, stop, GRACE_SECONDS)
        return 130 if stop.requested else code


def _read_registered(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AggregatorError(f"{path}: not JSON ({error}); delete it and run `fedpriv aggregator register`") from None
    if not isinstance(value, dict):
        raise AggregatorError(f"{path}: expected site -> node id; delete it and run `fedpriv aggregator register`")
    return {str(k): str(v) for k, v in value.items()}


class RefusalNotes:
    """Reads the SuperLink's log for refused node activations and says, by site name, what they mean.

    A site is told only "Failed to activate SuperNode" (Flower code 2004)
    whatever the cause; the SuperLink's own log line tells a key it does not
    know from a node that is already online, and only the aggregator knows
    which site a node id is (`registered-nodes.json`).
    """

    ONLINE = re.compile(r"SuperNode with node ID (\d+) could not be activated")
    UNKNOWN = "No SuperNode found with the given public key"

    def __init__(self, registered: Path, log: Callable[[str], None]):
        self.registered, self.log = registered, log

    def __call__(self, line: str) -> None:
        if (found := self.ONLINE.search(line)) is not None:
            node = found.group(1)
            names = {v: k for k, v in _read_registered(self.registered).items()}
            site = names.get(node, f"node {node}")
            self.log(
                f"refused {site} (node {node}): it is already online. Another agent with its identity (its kit's "
                "node.key) is connected, or it restarted within the 60 s Flower holds a session; one agent per site"
            )
        elif self.UNKNOWN in line:
            self.log("refused a node key that is not registered here: a new site needs `fedpriv aggregator register`")


def _merge(base: dict, extra: Mapping) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _json_tail(text: str) -> dict:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _wait_for_port(address: str, process: subprocess.Popen, timeout: float) -> None:
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AggregatorError(f"the SuperLink exited with code {process.returncode} before it was ready")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AggregatorError(f"the SuperLink did not open {address} within {timeout:.0f} s")
