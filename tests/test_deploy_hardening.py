"""The deployment tooling against a careless operator and a hostile aggregator (issue 18, part 4).

Unit tests on the real functions first (kits provisioned in-process, real
keys); then, marked slow, real processes: an agent killed with -9 must take
its Flower processes with it, and one small real federation (TLS, node
authentication) checks what only a real SuperLink can show: a plain-text
agent, a second agent with the same identity, an app bundle carrying code,
and a restart after kill -9 of the agent and of the aggregator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fedpriv.common.flower_app import CLIENT_APP
from fedpriv.deploy import clientapp_guard, processes, site_worker
from fedpriv.deploy.kit import KitError
from tests.helpers import LABELS, easy_rows, fedpriv_here, write_csv
from tests.local_federation import ENV, ROOT, LocalFederation, fedpriv, free_ports, sweep, wait_for

# Its tests share one federation (a module fixture): one pytest-xdist worker runs them all, starting it once.
pytestmark = pytest.mark.xdist_group("test_deploy_hardening")

FEDERATION = f"""
name = "hardening"
[aggregator]
address = "127.0.0.1:9092"
[data]
labels = {json.dumps(LABELS)}
[site-defaults]
declared-rows = 150
[[sites]]
name = "north"
"""


@pytest.fixture
def kits(tmp_path) -> Path:
    from fedpriv.deploy.provision import provision

    (tmp_path / "federation.toml").write_text(FEDERATION, encoding="utf-8")
    provision(tmp_path / "federation.toml", tmp_path / "kits")
    return tmp_path / "kits"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- secrets in kits -------------------------------------------------------------


def test_provisioned_secrets_are_owner_only_and_pass_the_check(kits):
    from fedpriv.deploy.agent import Agent
    from fedpriv.deploy.aggregator import Aggregator

    secrets = sorted(kits.rglob("*.key"))
    assert {p.name for p in secrets} == {"ca.key", "tls.key", "ledger.key", "node.key"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in secrets), [oct(p.stat().st_mode) for p in secrets]
    Agent.from_kit(kits / "sites" / "north")
    Aggregator(kits / "aggregator")


@pytest.mark.parametrize(
    ("kit", "key", "mode", "who"),
    [
        ("sites/north", "node.key", 0o644, "its group and everyone"),
        ("sites/north", "ledger.key", 0o640, "its group"),
        ("aggregator", "tls.key", 0o604, "everyone"),
        ("aggregator", "ledger.key", 0o660, "its group"),
    ],
)
def test_a_kit_key_others_can_read_is_refused_with_the_fix(kits, kit, key, mode, who):
    from fedpriv.deploy.agent import Agent
    from fedpriv.deploy.aggregator import Aggregator

    path = kits / kit / key
    path.chmod(mode)
    with pytest.raises(KitError) as refused:
        Agent.from_kit(kits / kit) if kit.startswith("sites") else Aggregator(kits / kit)
    message = str(refused.value)
    assert f"chmod 600 {path}" in message and f"accessible by {who}" in message and f"{mode:04o}" in message
    path.chmod(0o600)  # the fix the message gives is enough
    Agent.from_kit(kits / kit) if kit.startswith("sites") else Aggregator(kits / kit)


def test_the_cli_refuses_a_readable_key_before_reading_any_data(kits, tmp_path):
    (kits / "sites" / "north" / "node.key").chmod(0o644)
    data = write_csv(tmp_path / "north.csv", easy_rows(30, seed=1))
    result = fedpriv_here(
        "agent", "start", "--kit", kits / "sites" / "north", "--data", data, "--state", tmp_path / "s"
    )
    assert result.returncode == 2
    assert "chmod 600" in result.stdout + result.stderr and "node.key" in result.stdout + result.stderr


# -- files that do not parse are named ---------------------------------------------


def test_a_corrupted_ca_certificate_is_named_before_flower_starts(kits):
    from fedpriv.deploy.agent import Agent

    kit = kits / "sites" / "north"
    (kit / "ca.crt").chmod(0o644)
    (kit / "ca.crt").write_text((kit / "ca.crt").read_text()[:200], encoding="utf-8")  # cut short in a copy
    agent = Agent.from_kit(kit)
    with pytest.raises(KitError, match=r"ca\.crt: not a readable PEM certificate .* the federation's CA"):
        agent.supernode_command(agent.node_config(kit / "kit.toml"))


def test_flowers_state_is_kept_in_memory_unless_the_operator_names_a_database(kits, tmp_path):
    from fedpriv.deploy.aggregator import Aggregator

    aggregator = Aggregator(kits / "aggregator", tmp_path / "state")
    assert "--database" not in aggregator.superlink_command()
    command = aggregator.superlink_command(database=tmp_path / "flower.db")
    assert command[command.index("--database") + 1] == str(tmp_path / "flower.db")


def test_a_supernode_the_restarted_aggregator_no_longer_knows_exits_for_the_agent_to_restart_it():
    import grpc

    from fedpriv.common import flower_compat

    class Refused(grpc.RpcError):
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    class Invoker:
        should_giveup = staticmethod(lambda error: error.code() != grpc.StatusCode.UNAVAILABLE)

    invoker = flower_compat._exit_when_the_node_is_forgotten(Invoker)()
    assert invoker.should_giveup(Refused(grpc.StatusCode.UNAVAILABLE, "down")) is False  # Flower's own choice
    assert invoker.should_giveup(Refused(grpc.StatusCode.INTERNAL, "boom")) is True
    # The SuperLink's refusal of a node id it does not know: the process exits at once, with the agent's code.
    code = """
import grpc
from fedpriv.common import flower_compat
class Refused(grpc.RpcError):
    def code(self): return grpc.StatusCode.UNAUTHENTICATED
    def details(self): return "Invalid node ID"
class Invoker:
    should_giveup = None
flower_compat._exit_when_the_node_is_forgotten(Invoker)().should_giveup(Refused())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == flower_compat.EXIT_NODE_FORGOTTEN, result.stderr
    assert "no longer knows this node id" in result.stderr


def test_a_supernode_tries_an_aggregator_that_is_down_again_within_seconds():
    from flwr.supernode import start_client_internal as loop

    from fedpriv.common import flower_compat

    def backoff(invoker) -> list[float]:
        waits = invoker.wait_gen_factory()
        return [next(waits) for _ in range(12)]  # before jitter

    assert max(backoff(loop.make_simple_grpc_retry_invoker())) == 20  # Flower's own: a restarted aggregator waits
    capped = backoff(flower_compat._exit_when_the_node_is_forgotten(loop.make_simple_grpc_retry_invoker)())
    assert capped[0] == 1 and max(capped) == flower_compat.RECONNECT_MAX_SECONDS == 4


def test_a_corrupted_aggregator_certificate_is_named(kits):
    from fedpriv.deploy.aggregator import Aggregator

    (kits / "aggregator" / "tls.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    with pytest.raises(KitError, match=r"tls\.crt: not a readable PEM certificate"):
        Aggregator(kits / "aggregator")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"north": "abc"', "not JSON"),
        ('["north"]', "expected a JSON object"),
        ('{"north": "bm90IGEga2V5"}', "entry 'north' is not an Ed25519 public key"),
    ],
)
def test_a_bad_public_keys_file_is_named(kits, content, says):
    from fedpriv.deploy.agent import Agent
    from fedpriv.deploy.aggregator import Aggregator

    for kit, load in ((kits / "sites" / "north", Agent.from_kit), (kits / "aggregator", Aggregator)):
        (kit / "public-keys.json").write_text(content, encoding="utf-8")
        with pytest.raises(KitError) as refused:
            load(kit)
        assert str(kit / "public-keys.json") in str(refused.value) and says in str(refused.value)


# -- what the agent says when its SuperNode fails -------------------------------------


def test_flowers_exit_code_is_named_and_a_plaintext_agent_is_told_why():
    from fedpriv.deploy.agent import Failure, flower_exit_code

    output = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    assert flower_exit_code(output) == 305
    assert flower_exit_code("Traceback ...\n") is None
    assert "--insecure" in Failure.PLAINTEXT.diagnosis
    # Flower says only 2004 to the site; the truth includes an identity that is already online.
    assert "already online" in Failure.ACTIVATION_REFUSED.diagnosis
    assert "another agent" in Failure.ACTIVATION_REFUSED.diagnosis


def test_the_aggregator_names_a_refused_site_from_its_registrations(tmp_path):
    from fedpriv.deploy.aggregator import RefusalNotes

    (tmp_path / "registered-nodes.json").write_text(json.dumps({"north": "4242", "south": "77"}))
    said: list[str] = []
    notes = RefusalNotes(tmp_path / "registered-nodes.json", said.append)
    # The SuperLink's log lines for a refused activation, as Flower 1.39 writes them.
    notes(
        "ERROR :     ApiError:2004 Attempted to register SuperNode with public key: b'...', exception: "
        "SuperNode with node ID 4242 could not be activated.\n"
    )
    notes("ERROR :     ApiError:2004 ... exception: No SuperNode found with the given public key.\n")
    notes("INFO :      [Fleet.ActivateNode] Activated node_id=77\n")
    assert len(said) == 2
    assert said[0].startswith("refused north (node 4242): it is already online") and "Another agent" in said[0]
    assert "not registered here" in said[1]


def test_a_site_that_drops_is_logged_by_its_name_not_its_node_id(tmp_path):
    """A dropped site's error reply carries only a node id; the aggregator's registrations name it."""
    from flwr.app import Error, Message

    from fedpriv.common.config import FedprivConfig
    from fedpriv.common.rundir import NODE_NAMES, RunDirectory
    from fedpriv.server.admission import ReleaseHistory
    from fedpriv.server.federation import Federation
    from tests.test_admission import NODE, instruction

    run = RunDirectory.create(tmp_path / "run")
    (run.path / NODE_NAMES).write_text(json.dumps({str(NODE): "north"}))
    federation = Federation.__new__(Federation)  # only what recording a round's replies uses
    federation.config, federation.run, federation.history = FedprivConfig(), run, ReleaseHistory()
    federation.node_names = run.node_names()
    dropped = Message(Error(code=0, reason="message TTL expired: the node did not reply"), reply_to=instruction())
    assert federation._record_train(1, [dropped]) == ([], 0, 0)
    [event] = run.events("site-error")
    assert event["site"] == "north" and "TTL" in event["reason"]


def test_the_aggregator_writes_node_names_into_the_run_directory(kits, tmp_path):
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.deploy.aggregator import Aggregator

    aggregator = Aggregator(kits / "aggregator", tmp_path / "state")
    aggregator.state.mkdir()
    (aggregator.state / "registered-nodes.json").write_text(json.dumps({"north": "4242"}))
    aggregator.write_node_names(tmp_path / "run")
    assert RunDirectory(tmp_path / "run").node_names() == {4242: "north"}


# -- the app bundle carries settings, never code ---------------------------------------


def _fab(tmp_path: Path, files: dict[str, str]) -> bytes:
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({name: text.encode() for name, text in files.items()})[0]


def _pyproject(clientapp: str, exclude: bool = True) -> str:
    import tomli_w

    from fedpriv.common.flower_app import app_project

    project = app_project()
    project["tool"]["flwr"]["app"]["components"]["clientapp"] = clientapp
    if not exclude:
        del project["tool"]["flwr"]["app"]["fab-exclude"]
    return tomli_w.dumps(project)


def test_fedpriv_bundles_pass_and_bundles_with_code_or_another_clientapp_are_refused(tmp_path):
    from fedpriv.common.flower_app import CLIENT_APP

    clientapp_guard.check_fab(_fab(tmp_path, {"pyproject.toml": _pyproject(CLIENT_APP)}))
    with pytest.raises(clientapp_guard.ForeignAppError, match=r"carries files \(evil\.py\)"):
        clientapp_guard.check_fab(
            _fab(tmp_path, {"pyproject.toml": _pyproject("evil:app", exclude=False), "evil.py": "app = None\n"})
        )
    # Code that shadows the installed fedpriv, under fedpriv's own component name.
    with pytest.raises(clientapp_guard.ForeignAppError, match=r"fedpriv/client/app\.py"):
        clientapp_guard.check_fab(
            _fab(
                tmp_path,
                {"pyproject.toml": _pyproject(CLIENT_APP, exclude=False), "fedpriv/client/app.py": "app = None\n"},
            )
        )
    with pytest.raises(clientapp_guard.ForeignAppError, match=r"names the ClientApp 'os:system'"):
        clientapp_guard.check_fab(_fab(tmp_path, {"pyproject.toml": _pyproject("os:system")}))


@pytest.fixture
def messages(monkeypatch):
    """Messages can be made here as the aggregator's ServerApp makes them (run 11)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 11), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def worker_at(tmp_path, messages):
    """A real SiteWorker serving in a thread, with a stand-in ClientApp; yields (its folder, the messages it got)."""
    import threading

    from flwr.app import ConfigRecord, Message, RecordDict

    got: list = []

    def app(message, context):
        got.append(message)
        if message.content["config"]["fail"]:
            raise RuntimeError("no such round")
        context.state["answered"] = ConfigRecord({"n": len(got)})
        return Message(RecordDict({"config": ConfigRecord({"echo": message.content["config"]["x"]})}), reply_to=message)

    worker = site_worker.SiteWorker(tmp_path / "worker")
    worker.listen()
    worker.app = app
    stop = threading.Event()
    thread = threading.Thread(target=worker.serve, args=(stop,), daemon=True)
    thread.start()
    yield worker.folder, got
    stop.set()
    thread.join(10)


def _message(x: int, fail: bool = False):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    message = Message(RecordDict({"config": ConfigRecord({"x": x, "fail": fail})}), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperNode stores it
    return message, Context(11, 7, {}, RecordDict(), {})


def test_the_supernode_hands_a_message_to_the_worker_and_gets_its_reply_and_context(tmp_path, worker_at):
    folder, got = worker_at
    channel = site_worker.WorkerChannel(folder)
    bundle = _fab(tmp_path, {"pyproject.toml": _pyproject(CLIENT_APP)})
    message, context = _message(42)
    reply, new_context = channel(message, context, bundle)
    assert not reply.has_error() and reply.content["config"]["echo"] == 42
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert new_context.state["answered"]["n"] == 1
    # The ClientApp raised: the worker answers with Flower's error reply and keeps serving.
    reply, _ = channel(*_message(1, fail=True), bundle)
    assert reply.has_error() and "no such round" in reply.error.reason
    reply, _ = channel(*_message(2), bundle)
    assert reply.content["config"]["echo"] == 2
    stats = json.loads((folder / site_worker.STATS).read_text())
    assert (stats["messages"], stats["failed"]) == (3, 1) and stats["bytes-received"] > 0


def test_a_foreign_bundle_never_reaches_the_worker_and_a_wrong_secret_is_refused(tmp_path, worker_at):
    import socket

    folder, got = worker_at
    evil = _fab(tmp_path, {"pyproject.toml": _pyproject(CLIENT_APP, exclude=False), "evil.py": "import os"})
    reply, context = site_worker.WorkerChannel(folder)(*_message(1), evil)
    assert reply.has_error() and "carries files (evil.py)" in reply.error.reason and context is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(folder / site_worker.SOCKET))
        conn.sendall(b'{"secret": "guess", "message": 0, "context": 0}\n')
        assert conn.recv(64) == b""  # closed without an answer
    assert got == []


def test_a_message_while_no_worker_listens_is_refused_at_once_naming_why(tmp_path, messages):
    folder = tmp_path / "worker"
    site_worker.prepare(folder)
    bundle = _fab(tmp_path, {"pyproject.toml": _pyproject(CLIENT_APP)})
    reply, context = site_worker.WorkerChannel(folder)(*_message(1), bundle)
    assert reply.has_error() and "the site worker is not running" in reply.error.reason and context is None


# -- one agent per state directory; a killed one's leftovers are ended -----------------


def test_a_second_agent_on_the_same_state_is_refused_and_names_the_first(tmp_path):
    home = tmp_path / "flwr-home"
    first = processes.StateLock(tmp_path, "agent", "an agent of north", home).acquire()
    try:
        with pytest.raises(processes.LockedError, match=rf"already running from {tmp_path} \(pid {os.getpid()}\)"):
            processes.StateLock(tmp_path, "agent", "an agent of north", home).acquire()
    finally:
        first.release()
    processes.StateLock(tmp_path, "agent", "an agent of north", home).acquire().release()  # free again


def test_taking_over_a_state_ends_the_flower_processes_a_killed_agent_left(tmp_path):
    home = tmp_path / "flwr-home"
    fake = tmp_path / "bin" / "flower-supernode"  # a SuperNode that outlived its agent
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport time\nprint('up', flush=True)\ntime.sleep(600)\n")
    fake.chmod(0o755)
    unrelated = subprocess.Popen([fake], env=dict(ENV, FLWR_HOME=str(tmp_path / "other")), stdout=subprocess.PIPE)
    leftover = subprocess.Popen([fake], env=dict(ENV, FLWR_HOME=str(home)), stdout=subprocess.PIPE)
    try:
        assert leftover.stdout.readline() and unrelated.stdout.readline()
        assert processes.flower_processes(home) == [leftover.pid]
        said: list[str] = []
        processes.StateLock(tmp_path, "agent", "an agent of north", home, grace=10).acquire(said.append).release()
        assert leftover.wait(10) == -signal.SIGTERM
        assert unrelated.poll() is None  # another state directory's Flower is not ours to end
        assert f"pids {leftover.pid}" in said[0]
    finally:
        for process in (leftover, unrelated):
            process.kill()
            process.wait()


@pytest.mark.slow
def test_kill_9_of_an_agent_takes_its_supernode_and_worker_with_it(kits, tmp_path):
    """No aggregator needed: the agent starts its worker and SuperNode at once; the SuperNode keeps retrying."""
    data = write_csv(tmp_path / "north.csv", easy_rows(30, seed=1))
    [closed] = free_ports(1)

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "fedpriv.cli", "agent", "start", "--kit", kits / "sites" / "north"]
            + ["--data", data, "--state", tmp_path / "state", "--port", str(free_ports(1)[0])]
            + ["--superlink", f"127.0.0.1:{closed}"],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def flower(agent: subprocess.Popen) -> list[psutil.Process]:
        try:
            family = psutil.Process(agent.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        names = {}
        for p in family:
            # The restarted agent's SuperNode cannot connect and is restarted: a member may end (or be a
            # zombie not yet reaped) between the listing and this read.
            with contextlib.suppress(psutil.Error):
                names[p.pid] = " ".join(p.cmdline())
        found = [p for p in family if "fedpriv.deploy.supernode" in names.get(p.pid, "")]
        found += [p for p in family if "fedpriv.deploy.site_worker" in names.get(p.pid, "")]
        return found if len(found) == 2 else []

    agent = start()
    try:
        supernode, worker = wait_for(lambda: flower(agent), 300, "the SuperNode and worker")
        agent.kill()  # kill -9: no handler runs
        agent.wait(10)
        left = {"SuperNode": supernode, "site worker": worker}
        wait_for(
            lambda: all(_gone(p.pid) for p in left.values()),
            what="the SuperNode and site worker to end",
            explain=lambda: "still running: " + ", ".join(n for n, p in left.items() if not _gone(p.pid)),
        )

        again = start()  # the restart is not locked out: it runs its own SuperNode
        try:
            wait_for(lambda: flower(again), 300, "the restarted agent's SuperNode")
        finally:
            again.send_signal(signal.SIGTERM)
            assert again.wait(60) == 0
    finally:
        agent.kill()
        sweep(tmp_path)


# -- a real federation: what only a real SuperLink shows ------------------------------


HOSTILE_SERVER = """
import json
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=120)
    reasons = [reply.error.reason if reply.has_error() else "content" for reply in replies]
    Path({out!r}).write_text(json.dumps(reasons))
"""

EVIL_CLIENT = """
from pathlib import Path

from flwr.clientapp import ClientApp

Path({marker!r}).write_text("the aggregator's code ran at the site")
app = ClientApp()
"""


@pytest.fixture(scope="module")
def fed(tiny_model_dir, tmp_path_factory):
    federation = LocalFederation(tmp_path_factory.mktemp("hardening"), tiny_model_dir, sites=("site-a",), min_sites=1)
    try:
        federation.start_aggregator()
        federation.start_agent("site-a")
        federation.wait_online()
        yield federation
    finally:
        federation.stop_all()
        sweep(federation.root)


def _attempt(fed: LocalFederation, state: Path, *extra) -> subprocess.CompletedProcess:
    return fedpriv(
        "agent",
        "start",
        "--kit",
        fed.kits / "sites" / "site-a",
        "--data",
        fed.data["site-a"],
        "--state",
        state,
        "--port",
        fed.spare_ports.pop(),
        "--max-retries",
        "0",
        *extra,
        timeout=180,
    )


@pytest.mark.slow
def test_plaintext_and_duplicate_agents_are_told_the_truth(fed, tmp_path):
    plaintext = _attempt(fed, tmp_path / "plain", "--insecure")
    assert plaintext.returncode == 1  # what the deploy guide says
    assert "Flower exit code 305" in plaintext.stdout and "drop --insecure" in plaintext.stdout

    # The same state directory as the running agent: refused at once, naming it.
    same = _attempt(fed, fed.root / "site-a-state")
    assert same.returncode == 2 and "already running from" in same.stdout + same.stderr

    # Another copy of the kit elsewhere: Flower says 2004 to it; the aggregator says who and why.
    since = fed.log_size("aggregator")
    twin = _attempt(fed, tmp_path / "twin")
    assert twin.returncode == 1 and "already online" in twin.stdout
    wait_for(
        lambda: "refused site-a (node " in fed.log_text("aggregator", since),
        60,
        "the aggregator to name the refused site",
    )
    assert "it is already online" in fed.log_text("aggregator", since)
    assert fed.online() == {"site-a"}  # the first agent is untouched


@pytest.mark.slow
def test_a_hostile_aggregators_app_bundle_does_not_run_its_code_at_the_site(fed, tmp_path):
    marker, out = tmp_path / "ran-at-site", tmp_path / "replies.json"
    app = tmp_path / "hostile-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        _pyproject("evil_client:app", exclude=False).replace('"fedpriv.server.app:app"', '"hostile_server:app"'),
        encoding="utf-8",
    )
    (app / "hostile_server.py").write_text(HOSTILE_SERVER.format(out=str(out)), encoding="utf-8")
    (app / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker)), encoding="utf-8")
    since = fed.log_size("site-a")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", str(app), "deploy-test", "--stream"],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(ENV, FLWR_HOME=str(fed.state / "flwr-home")),
    )
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    [reason] = json.loads(out.read_text())
    assert "refused the aggregator's app bundle: it carries files" in reason
    assert not marker.exists()
    assert "refused the aggregator's app bundle" in fed.log_text("site-a", since)


@pytest.mark.slow
def test_after_kill_9_the_agent_and_the_aggregator_restart_and_get_back_in(fed):
    for name in ("site-a", "aggregator"):
        process = fed.processes.pop(name)
        family = psutil.Process(process.pid).children(recursive=True)
        assert family, f"{name} runs Flower"
        os.kill(process.pid, signal.SIGKILL)  # the fedpriv process only: its children must follow by themselves
        process.wait(10)
        wait_for(lambda family=family: all(_gone(p.pid) for p in family), 60, f"the Flower processes of {name}")
    fed.start_aggregator()  # the same ports and database: nothing of the old one holds them
    fed.start_agent("site-a")
    fed.wait_online(timeout=120)
