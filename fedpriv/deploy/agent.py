"""The site agent in a real deployment: check the data, then run a Flower SuperNode from the kit.

The data is validated exactly as the ClientApp will read it (same columns,
same label set, same minimum), so a bad export is reported to the site's
operator here, with the file, column and row, before anything connects to
the aggregator.

The SuperNode runs in its own process group; SIGTERM or SIGINT to the agent
is passed on to it, the agent waits for it to stop and exits 0, so `docker
stop`, `systemctl stop` and Kubernetes all shut a site down cleanly. If the
agent dies without a word (`kill -9`), the kernel stops the SuperNode for it
(`processes.die_with_parent`), and the next agent on the same state
directory ends anything still left (`processes.StateLock`). Beside the SuperNode
runs the site's resident worker (`site_worker`), which answers every
message in one long-lived process: the SuperNode hands each message to it
and starts no ClientApp process, and the app bundle the aggregator submits
can carry settings, never code (`clientapp_guard`). If the worker dies, the
agent starts another. The SuperNode runs with quicker polling
(`flower_compat.run_supernode_polling_often`). Its
ledger (the site's privacy budget) lives in the state directory and must be
backed up: it is what keeps the site under its cap across runs.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpriv.common import flower_compat
from fedpriv.common import node_config as keys
from fedpriv.common.data import LabelSet, TextDataset, load_dataset
from fedpriv.common.errors import FedprivError
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import LedgerEntry, PrivacyRecord
from fedpriv.deploy import kit_checks, processes, site_worker
from fedpriv.deploy.kit import CA_CERT, NODE_KEY, SiteKit, load_site_kit, require
from fedpriv.deploy.kit import LEDGER_KEY as KIT_LEDGER_KEY
from fedpriv.deploy.kit import PUBLIC_KEYS as KIT_PUBLIC_KEYS

FLWR_HOME = "flwr-home"
# Flower's `flower-supernode`, polling the SuperLink more often (see `supernode`).
SUPERNODE = (sys.executable, "-m", "fedpriv.deploy.supernode")
DEFAULT_PORT = 9094
GRACE_SECONDS = 30.0
WORKER_DIR = "worker"
RUNTIME_SECRET = "runtime-secret"
ACTIVATION_RETRY_SECONDS = 10.0
# The agent's status when its SuperNode fails. Flower's own codes (305: no connection, ...) are above 255,
# which no process status can carry, so they are named in the agent's last line instead.
EXIT_SUPERNODE_FAILED = 1
# What Flower's "could not connect to the SuperLink" most often means, for the site's operator.
HINT = (
    "the SuperNode could not connect: check the aggregator address and firewall, that this kit's ca.crt "
    "is the federation's CA, and that the aggregator registered this site's node key"
)


class AgentError(FedprivError, RuntimeError):
    """The agent cannot start; the message says why."""


@dataclass
class Agent:
    kit_dir: Path
    kit: SiteKit
    state: Path

    @classmethod
    def from_kit(cls, kit_dir: str | Path, state_dir: str | Path | None = None) -> Agent:
        kit_dir = Path(kit_dir).expanduser().resolve()
        kit = load_site_kit(kit_dir)
        require(kit_dir, KIT_LEDGER_KEY)
        kit_checks.check_secrets(kit_dir, NODE_KEY, KIT_LEDGER_KEY)
        if (kit_dir / KIT_PUBLIC_KEYS).exists():
            kit_checks.check_public_keys(kit_dir / KIT_PUBLIC_KEYS)
        state = Path(state_dir).expanduser().resolve() if state_dir else kit_dir.parent / f"{kit.site}-state"
        return cls(kit_dir, kit, state)

    @property
    def runtime_secret_path(self) -> Path:
        return self.state / FLWR_HOME / RUNTIME_SECRET

    @property
    def ledger_path(self) -> Path:
        # Named after the site: `fedpriv audit` pins a ledger to the key of the owner its file is named for.
        return self.state / "ledgers" / f"{self.kit.site}.jsonl"

    def validate(
        self,
        data: str | Path,
        labels: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
        min_rows: int | None = None,
    ) -> TextDataset:
        """Reads the site's data as training will; raises `DataError` naming file, column and row."""
        d = self.kit.data
        if text_column:
            d = d.model_copy(update={"text_column": text_column})
        if label_column:
            d = d.model_copy(update={"label_column": label_column})
        if min_rows:
            d = d.model_copy(update={"min_rows": min_rows})
        self.kit = self.kit.model_copy(update={"data": d})
        label_set = LabelSet.load(labels or d.labels)
        return load_dataset(
            Path(data).expanduser().resolve(),
            label_set,
            d.text_column,
            d.label_column,
            d.min_rows,
            d.delimiter,
            d.max_chars,
        )

    def node_config(
        self, data: str | Path, allow_non_private: bool = False, declared_rows: int | None = None
    ) -> dict[str, str | float]:
        values: dict[str, str | float] = {
            keys.DATA_PATH: str(Path(data).expanduser().resolve()),
            keys.SITE_NAME: self.kit.site,
            keys.LEDGER_PATH: str(self.ledger_path),
            keys.LEDGER_KEY: str(self.kit_dir / KIT_LEDGER_KEY),
            keys.EPSILON_CAP: float(self.kit.epsilon_cap),
            keys.DELTA: float(self.kit.delta),
            # How the site reads its table: its kit's, whatever a run's settings say.
            **self.kit.data.format_settings(),
        }
        if (self.kit_dir / KIT_PUBLIC_KEYS).exists():
            values[keys.PEER_KEYS] = str(self.kit_dir / KIT_PUBLIC_KEYS)
        # The site's own policy: what it refuses, whatever a run asks.
        values.update(self.kit.policy.to_node_config())
        if allow_non_private:
            values[keys.ALLOW_NON_PRIVATE] = "true"
        if declared_rows or self.kit.declared_rows:
            values[keys.DECLARED_ROWS] = int(declared_rows or self.kit.declared_rows)
        return values

    def supernode_command(
        self,
        node_config: dict[str, str | float],
        port: int = DEFAULT_PORT,
        superlink: str | None = None,
        insecure: bool = False,
        max_retries: int | None = None,
    ) -> list[str]:
        command = [
            *SUPERNODE,
            "--superlink",
            superlink or self.kit.superlink,
            "--port",
            str(port),
            "--node-config",
            format_node_config(node_config),
            # The SuperNode answers each message through the resident worker: no SuperExec, no ClientApp process.
            "--isolation",
            "process",
            # Nobody may take a task from its runtime API (it serves none; this secret is never handed out).
            "--superexec-auth-secret-file",
            str(self.runtime_secret_path),
        ]
        if insecure:
            command.append("--insecure")
        else:
            require(self.kit_dir, CA_CERT, NODE_KEY)
            kit_checks.check_certificate(self.kit_dir / CA_CERT, "the federation's CA certificate")
            kit_checks.check_node_key(self.kit_dir / NODE_KEY)
            command += [
                "--root-certificates",
                str(self.kit_dir / CA_CERT),
                "--auth-supernode-private-key",
                str(self.kit_dir / NODE_KEY),
            ]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        return command

    def run(
        self,
        command: list[str],
        max_retries: int | None = None,
        log: Callable[[str], None] = print,
        retry_seconds: float = ACTIVATION_RETRY_SECONDS,
    ) -> int:
        """Runs the SuperNode until it exits or we are asked to stop; 0 after a requested stop.

        Flower refuses to activate a node key that is not registered yet, and
        also one whose previous session (a crashed agent) has not expired,
        which takes up to two missed 30 s heartbeats. Both are worth waiting
        for, so a refused activation is retried (at most `max_retries` times;
        None: until stopped). A TLS failure is a configuration error and is not.
        """
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        (self.state / FLWR_HOME).mkdir(exist_ok=True)
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        # One agent per state directory (its ledger, its identity); a killed one's leftovers are ended first.
        with processes.StateLock(
            self.state, "agent", f"an agent of {self.kit.site}", self.state / FLWR_HOME, GRACE_SECONDS
        ).acquire(log):
            return self._supervise(command, max_retries, log, retry_seconds)

    def _supervise(
        self, command: list[str], max_retries: int | None, log: Callable[[str], None], retry_seconds: float
    ) -> int:
        self.runtime_secret_path.unlink(missing_ok=True)
        fd = os.open(self.runtime_secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_hex(32))
        env = processes.flower_env(self.state / FLWR_HOME)
        env[site_worker.WORKER_ENV] = str(self.state / WORKER_DIR)
        stop = processes.StopSignals()
        resident = site_worker.Resident(self.state / WORKER_DIR, env, log, self.kit.site).start()
        try:
            # The SuperNode connects while the worker loads the model runtime: a bad kit or address is told
            # in seconds, and a message that comes before the worker is ready waits for it.
            log(f"{self.kit.site}: the site worker loads the model runtime; messages wait for it")
            return self._run_supernode(command, env, stop, max_retries, log, retry_seconds)
        finally:
            resident.stop(GRACE_SECONDS)

    def _run_supernode(
        self,
        command: list[str],
        env: dict[str, str],
        stop: processes.StopSignals,
        max_retries: int | None,
        log: Callable[[str], None],
        retry_seconds: float,
    ) -> int:
        superlink = command[command.index("--superlink") + 1]
        attempt = 0
        while True:
            log(f"{self.kit.site}: connecting to {superlink}")
            # Its own process group: a stop takes the SuperNode and anything it started.
            process = stop.watch(
                subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    bufsize=1,
                    start_new_session=True,
                    preexec_fn=processes.die_with_parent(),  # takes no lock: safe beside our threads
                )
            )
            output = processes.PassThrough(process)
            code = processes.wait(process, stop, GRACE_SECONDS)
            processes.stop_group(process.pid)
            text = output.join()
            failure = read_failure(text) if code else None
            if stop.requested:
                log(f"{self.kit.site}: stopped")
                return 0
            if code == 0:
                return 0
            if code == flower_compat.EXIT_NODE_FORGOTTEN:
                log(f"{self.kit.site}: the aggregator restarted and gave this site a new node id; reconnecting")
                attempt = 0
                continue
            if failure is Failure.ACTIVATION_REFUSED and (max_retries is None or attempt < max_retries):
                attempt += 1
                log(
                    f"{self.kit.site}: the aggregator refused to activate this site's node key; retrying in "
                    f"{retry_seconds:g} s ({failure.diagnosis})"
                )
                if stop.sleep(retry_seconds):
                    log(f"{self.kit.site}: stopped")
                    return 0
                continue
            if failure is Failure.NO_CONNECTION and "--insecure" in command:
                failure = Failure.PLAINTEXT
            flower_code = flower_exit_code(text)
            log(
                f"{self.kit.site}: the SuperNode stopped"
                + (f" with Flower exit code {flower_code}" if flower_code else f" (status {code})")
                + f"; {failure.diagnosis}. The agent exits {EXIT_SUPERNODE_FAILED}"
            )
            return EXIT_SUPERNODE_FAILED


class Failure(enum.Enum):
    """Why a SuperNode stopped with an error, as far as its exit message tells."""

    # Flower gives the site one code (2004) for both cases; only the aggregator's log tells them apart.
    ACTIVATION_REFUSED = (
        "the aggregator refused this site's node key (Flower code 2004): its identity is already online there "
        "(another agent runs with this kit's node.key, or this site's previous agent has not been gone for the "
        "60 s Flower holds a session), or the key is not registered (then the aggregator's operator runs "
        "`fedpriv aggregator register`); the aggregator's log says which"
    )
    TLS_UNTRUSTED = (
        "the aggregator's TLS certificate is not signed by the CA in this kit (ca.crt): wrong kit or wrong address"
    )
    NO_CONNECTION = HINT
    PLAINTEXT = (
        "this agent runs without TLS (--insecure) and the aggregator did not answer in plain text: an aggregator "
        "started with TLS drops plain-text connections, which Flower reports as no connection (UNAVAILABLE); "
        "drop --insecure"
    )
    OTHER = "see Flower's message above"

    @property
    def diagnosis(self) -> str:
        return self.value


def read_failure(output: str) -> Failure:
    """Reads why the SuperNode failed from the output it ended with.

    This has to read text: Flower's SuperNode exits with status 1 for every
    error (`flwr_exit`), and its `ExitCode` (305: no connection) and the
    SuperLink's `ApiErrorCode` (2004: node activation refused) appear only in
    the message it logs before exiting ("Exit Code: 305", "[code: 2004]"). An
    untrusted certificate has no Flower code at all: gRPC passes on
    BoringSSL's reason, CERTIFICATE_VERIFY_FAILED. Flower's numbers come from
    its constants (`flower_compat`), so a renumbering fails its check, not silently.
    """
    activation_refused, no_connection = flower_compat.supernode_error_marks()
    if activation_refused in output:
        return Failure.ACTIVATION_REFUSED
    if "CERTIFICATE_VERIFY_FAILED" in output:
        return Failure.TLS_UNTRUSTED
    if no_connection in output:
        return Failure.NO_CONNECTION
    return Failure.OTHER


def flower_exit_code(output: str) -> int | None:
    """The code Flower logged before exiting ("Exit Code: 305"); its process status is 1 whatever the code."""
    found = re.findall(r"Exit Code: (\d+)", output)
    return int(found[-1]) if found else None


def format_node_config(values: dict[str, str | float]) -> str:
    """Flower's `--node-config`: space-separated key=value, strings quoted (no escapes are read)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            text = str(value)
            quote = "'" if "'" not in text else '"'  # literal strings first: no backslash escapes
            if quote in text or "\n" in text or (quote == '"' and "\\" in text):
                raise AgentError(f"node config {key}: {text!r} cannot be quoted for Flower (contains both quote marks)")
            parts.append(f"{key}={quote}{text}{quote}")
    return " ".join(parts)


def reset_budget(kit_dir: str | Path, state_dir: str | Path | None, reason: str | None) -> tuple[LedgerEntry, str]:
    """The operator's explicit budget reset, signed with the site's ledger key; (its entry, epsilon before it)."""
    from fedpriv.client.budget import BudgetResetError, SiteBudget

    if not (reason or "").strip():
        raise BudgetResetError(
            "reset-budget needs --reason: a reset is recorded in the site's ledger with its reason and shown by "
            "every audit; it is never a side effect of a changed data file"
        )
    agent = Agent.from_kit(kit_dir, state_dir)
    ledger = Ledger(agent.ledger_path, signing.read_private_key(agent.kit_dir / KIT_LEDGER_KEY))
    if not ledger.path.exists():
        raise AgentError(f"{ledger.path}: no ledger here, nothing was spent (is --state the agent's state folder?)")
    releases = [r for r in ledger.records() if isinstance(r, PrivacyRecord) and r.party == "site"]
    # Accounted as the site last accounted itself.
    accounting = releases[-1].accounting if releases else None
    delta = accounting.delta if accounting else float(agent.kit.delta)
    budget = SiteBudget(ledger, "", float(agent.kit.epsilon_cap), delta, accounting.accountant if accounting else "pld")
    spent = budget.spent()
    entry = budget.reset(site=agent.kit.site, reason=str(reason))
    return entry, f"{spent:.4f}"
