"""A real deployment on 127.0.0.1: one aggregator and two site agents, over TLS with node authentication.

One provisioned federation is shared by the slow tests (a Flower deployment
starts a process per message, so every round costs tens of seconds); they
run in file order and each leaves both sites connected for the next.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.common import files
from fedpriv.common.privacy.records import state_sha256
from fedpriv.common.rundir import RunDirectory
from fedpriv.deploy import pki
from tests.helpers import fedpriv_here
from tests.local_federation import (
    ROOT,
    SITES,
    LocalFederation,
    fedpriv,
    finish,
    free_ports,
    running,
    wait_for,
)

# Its tests share one federation (a module fixture): one pytest-xdist worker runs them all, starting it once.
pytestmark = pytest.mark.xdist_group("test_deploy")


@pytest.fixture(scope="module")
def fed(tiny_model_dir, tmp_path_factory):
    with running(tmp_path_factory.mktemp("deploy"), tiny_model_dir) as federation:
        yield federation


def releases(run_dir: Path) -> list[tuple[str, int]]:
    lines = (run_dir / "ledgers" / "federation.jsonl").read_text().splitlines()
    records = [json.loads(line)["record"] for line in lines]
    return sorted((r["site"], r["round"]) for r in records if r.get("kind") == "site-release")


def check_audit(fed: LocalFederation, run_dir: Path) -> dict:
    result = fed.audit(run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["ok"] and all(ledger["pinned"] for ledger in report["ledgers"])
    return report


# -- what operators deploy with: checked without a container engine or a cluster --------

DEPLOY = ROOT / "deploy"


def parse_cli(argv: list[str]) -> tuple[str, dict]:
    """Parses a fedpriv command line as the real CLI would (options, types, required ones), running nothing."""
    import click
    import typer

    from fedpriv.cli import app

    command, args, name = typer.main.get_command(app), list(argv), "fedpriv"
    while isinstance(command, click.Group) and args and args[0] in command.commands:
        name, command, args = args[0], command.commands[args[0]], args[1:]
    context = command.make_context(name, args)
    return name, context.params


def dockerfile(role: str) -> dict:
    """ENTRYPOINT, CMD, and per build stage (in order) the sources of each COPY, flags first."""
    entry: dict = {"stages": []}
    for line in (DEPLOY / "docker" / f"{role}.Dockerfile").read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "FROM":
            entry["stages"].append({"from": rest, "COPY": []})
        elif word in ("ENTRYPOINT", "CMD"):
            entry[word] = json.loads(rest)
        elif word == "COPY":
            entry["stages"][-1]["COPY"].append(rest.split()[:-1])
    return entry


_TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def render_helm(template: str, values: dict, release: str = "fp") -> str:
    """The Go-template subset the chart uses (values, if/else/end, quote, whitespace trims); anything else fails."""
    context = {"Values": values, "Release": {"Name": release}, "Chart": {"AppVersion": "0.1.0"}}

    def value(expr: str):
        expr, *pipes = [p.strip() for p in expr.split("|")]
        assert expr.startswith("."), f"unsupported template expression: {expr}"
        node = context
        for part in expr[1:].split("."):
            node = node[part]
        for pipe in pipes:
            assert pipe == "quote", f"unsupported pipe: {pipe}"
            node = json.dumps(str(node))
        return node

    out, stack, pos, trim = [], [], 0, False
    for match in _TOKEN.finditer(template):
        text = template[pos : match.start()]
        if trim:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        active = all(stack)
        if active:
            out.append(text)
        expr = match.group(2)
        if expr.startswith("if "):
            stack.append(active and bool(value(expr[3:])))
        elif expr == "else":
            stack[-1] = all(stack[:-1]) and not stack[-1]
        elif expr == "end":
            stack.pop()
        elif active:
            rendered = value(expr)
            out.append("true" if rendered is True else "false" if rendered is False else str(rendered))
        trim, pos = bool(match.group(3)), match.end()
    assert not stack, "unbalanced if/end"
    text = template[pos:]
    out.append(text.lstrip() if trim else text)
    return "".join(out)


def helm_manifests(values: dict) -> list[dict]:
    import yaml

    docs = []
    for path in sorted((DEPLOY / "helm" / "fedpriv" / "templates").glob("*.yaml")):
        rendered = render_helm(path.read_text(), values)
        assert "{{" not in rendered, path
        docs += [d for d in yaml.safe_load_all(rendered) if d]
    return docs


def test_helm_chart_renders_the_aggregator_and_a_site_agent():
    import copy

    import yaml

    chart = yaml.safe_load((DEPLOY / "helm" / "fedpriv" / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "fedpriv"
    values = yaml.safe_load((DEPLOY / "helm" / "fedpriv" / "values.yaml").read_text())

    default = {(d["kind"], d["metadata"]["name"]) for d in helm_manifests(values)}
    assert default == {
        ("Service", "fp-aggregator"),
        ("PersistentVolumeClaim", "fp-aggregator-state"),
        ("Deployment", "fp-aggregator"),
    }

    both = copy.deepcopy(values)
    both["agent"].update(enabled=True, superlink="agg.example.org:9092", storageClass="fast")
    docs = {d["kind"]: d for d in helm_manifests(both) if d["kind"] in ("Deployment", "StatefulSet")}
    for kind, role, secret in (
        ("Deployment", "aggregator", "fedpriv-aggregator-kit"),
        ("StatefulSet", "agent", "fedpriv-site-a-kit"),
    ):
        pod = docs[kind]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert parse_cli(dockerfile(role)["ENTRYPOINT"][1:] + container["args"])[0] == "start"
        kit = next(v for v in pod["volumes"] if v["name"] == "kit")
        assert kit["secret"]["secretName"] == secret
        assert {"name": "kit", "mountPath": "/kit", "readOnly": True} in container["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    agent = docs["StatefulSet"]
    assert agent["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    assert docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]["args"][-2:] == [
        "--superlink",
        "agg.example.org:9092",
    ]
    assert docs["Deployment"]["spec"]["strategy"]["type"] == "Recreate"


def test_dockerfiles_install_the_built_package_and_start_the_right_role():
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    for role in ("aggregator", "agent"):
        entry = dockerfile(role)
        build, *_, image = entry["stages"]
        # The build stage gets every package folder and builds the wheel from them ...
        assert build["from"].endswith(" AS build")
        copied = {source.rstrip("/") for sources in build["COPY"] for source in sources}
        assert folders <= copied and {"pyproject.toml", "README.md"} <= copied
        # ... and the image takes only what that stage built: no source tree, no app folder to find.
        assert image["COPY"] and all(sources[0] == "--from=build" for sources in image["COPY"])
        assert "FEDPRIV_APP_DIR" not in (DEPLOY / "docker" / f"{role}.Dockerfile").read_text()
        name, params = parse_cli(entry["ENTRYPOINT"][1:] + entry["CMD"])
        assert name == "start" and str(params["kit"]) == "/kit" and str(params["state"]) == "/state"
        assert (DEPLOY / "docker" / f"{role}.Dockerfile.dockerignore").exists()


def test_compose_file_runs_an_aggregator_and_two_sites_from_their_kits(tmp_path):
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"aggregator", "site-a", "site-b"}
    assert services["aggregator"]["ports"] == ["127.0.0.1:9092:9092"]
    for name, service in services.items():
        role = "aggregator" if name == "aggregator" else "agent"
        assert parse_cli(dockerfile(role)["ENTRYPOINT"][1:] + service["command"])[0] == "start"
        kit = "./kits/aggregator" if role == "aggregator" else f"./kits/sites/{name}"
        assert f"{kit}:/kit:ro" in service["volumes"]
        assert service["user"].startswith("${FEDPRIV_UID")
    # Its federation file provisions kits whose certificate names the service the sites dial.
    shutil.copy(DEPLOY / "compose" / "federation.toml", tmp_path / "federation.toml")
    result = fedpriv_here("provision", "-f", tmp_path / "federation.toml")
    assert result.returncode == 0, result.stderr
    dns, _ = pki.cert_hosts(pki.load_cert(tmp_path / "kits" / "aggregator" / "tls.crt"))
    assert "aggregator" in dns

    # And the demo data it mounts passes the sites' own checks.
    sys.path.insert(0, str(DEPLOY))
    try:
        from demo_data import split
    finally:
        sys.path.remove(str(DEPLOY))
    from fedpriv.deploy.agent import Agent

    for path in split(["site-a", "site-b"], tmp_path / "data"):
        agent = Agent.from_kit(tmp_path / "kits" / "sites" / path.stem, tmp_path / "state")
        assert len(agent.validate(path)) > 4000


def test_systemd_units_run_real_commands_and_stop_gently():
    import configparser
    import shlex

    for unit in ("fedpriv-aggregator.service", "fedpriv-agent@.service"):
        # systemd allows a key more than once (Environment=); the last one is enough here.
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(DEPLOY / "systemd" / unit)
        service = parser["Service"]
        # systemd fills ${VAR} from the unit's EnvironmentFile; the unit's comment shows what goes there.
        argv = [
            re.sub(r"\$\{(\w+)\}", lambda m: "9094" if m.group(1).endswith("PORT") else "/srv/x", a)
            for a in shlex.split(service["ExecStart"])
        ]
        assert argv[0].endswith("/fedpriv")
        assert parse_cli(argv[1:])[0] == "start"
        assert service["KillMode"] == "mixed" and service["User"] == "fedpriv"
        assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_example_federation_file_provisions(tmp_path):
    shutil.copy(DEPLOY / "federation.example.toml", tmp_path / "federation.toml")
    result = fedpriv_here("provision", "-f", tmp_path / "federation.toml")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "kits" / "sites").iterdir()) == ["branch-north", "branch-south"]


def test_operator_guide_commands_are_real_commands():
    import shlex

    guide = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", guide, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().rstrip("&").strip()
            if line.startswith("fedpriv "):
                commands.append(line)
    assert len(commands) >= 8
    for line in commands:
        argv = [re.sub(r"\$\{?\w+\}?|\$\(.*?\)", "9094", a) for a in shlex.split(line)[1:]]
        if "--help" in argv or argv[:1] in (["audit"], ["report"], ["simulate"]):
            continue
        parse_cli(argv)


def test_supernode_failures_are_told_apart_by_flowers_codes():
    from fedpriv.deploy.agent import Failure, read_failure

    # The ends of a SuperNode's output in Flower 1.39 (it exits with status 1 for every error).
    connection = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n"
    refused = (
        connection
        + "[code: 2004] Failed to activate SuperNode.\nThe SuperNode could not establish a connection to the SuperLink.\n"
    )
    untrusted = connection + (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9092: Ssl handshake failed "
        "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED\n"
    )
    unreachable = connection + "failed to connect to all addresses; last error: UNAVAILABLE: Connection refused\n"
    assert read_failure(refused) is Failure.ACTIVATION_REFUSED  # the only one worth retrying
    assert read_failure(untrusted) is Failure.TLS_UNTRUSTED
    assert read_failure(unreachable) is Failure.NO_CONNECTION
    assert (
        read_failure("ERROR :     Exit Code: 302\nNode authentication requires elliptic curve private key.\n")
        is Failure.OTHER
    )
    assert "fedpriv aggregator register" in Failure.ACTIVATION_REFUSED.diagnosis
    assert "not signed by the CA in this kit" in Failure.TLS_UNTRUSTED.diagnosis


@pytest.mark.slow
def test_plaintext_foreign_ca_and_unregistered_keys_are_refused_and_logged(fed, tmp_path):
    site_kit = fed.kits / "sites" / "site-a"
    port = iter(fed.spare_ports)

    def attempt(kit: Path, *extra) -> subprocess.CompletedProcess:
        return fedpriv(
            "agent",
            "start",
            "--kit",
            kit,
            "--data",
            fed.data["site-a"],
            "--state",
            tmp_path / f"state-{kit.name}",
            "--port",
            next(port),
            "--max-retries",
            "0",
            *extra,
            timeout=180,
        )

    since = fed.log_size("aggregator")
    plaintext = attempt(site_kit, "--insecure")
    assert plaintext.returncode != 0
    assert "INSECURE" in plaintext.stderr and "UNAVAILABLE" in plaintext.stdout
    # Runs first, against a SuperLink that has not run an app yet: gRPC writes
    # its handshake notices (INFO) to stderr reliably only then. On a loaded
    # machine the agent (no retries) may also give up before its first bytes
    # reach the SuperLink, which then has nothing to log: try again.
    for _ in range(2):
        try:
            wait_for(lambda: "Handshake failed" in fed.log_text("aggregator", since), 60, "the handshake log")
            break
        except AssertionError:
            assert attempt(site_kit, "--insecure").returncode != 0
    wait_for(lambda: "Handshake failed" in fed.log_text("aggregator", since), 60, "the SuperLink to log the handshake")

    other_ca = tmp_path / "other-ca"
    shutil.copytree(site_kit, other_ca)
    (other_ca / "ca.crt").unlink()
    pki.write_cert(other_ca / "ca.crt", pki.new_ca("someone-else")[1])
    foreign = attempt(other_ca)
    assert foreign.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in foreign.stdout and "not signed by the CA in this kit" in foreign.stdout

    unregistered = tmp_path / "unregistered"
    shutil.copytree(site_kit, unregistered)
    (unregistered / "node.key").unlink()
    files.write_secret(unregistered / "node.key", pki.NodeKey.generate().private_openssh)
    since = fed.log_size("aggregator")
    stranger = attempt(unregistered)
    assert stranger.returncode != 0
    assert "[code: 2004]" in stranger.stdout and "refused this site's node key" in stranger.stdout
    assert "ApiError:2004" in fed.log_text("aggregator", since)

    assert fed.online() == set(SITES)  # nobody else got in


@pytest.mark.slow
def test_full_run_over_tls_with_node_authentication(fed):
    log = fed.log_text("aggregator")
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in log
    assert "registered site-a" in log and "registered site-b" in log

    run_dir = fed.root / "run-full"
    (port,) = free_ports(1)
    process = fed.submit(
        "--run-dir", run_dir, "--set", f"data.test-path={fed.test}", "--dashboard", "--dashboard-port", str(port)
    )
    code, out, err = finish(process)
    assert code == 0, out[-3000:] + err[-3000:]
    assert "Final test accuracy" in out
    assert f"Dashboard: http://127.0.0.1:{port}/" in out  # served while the run went on (tests/test_dashboard.py)

    run = RunDirectory(run_dir)
    summary = run.summary()
    assert summary["rounds-completed"] == 2 and set(summary["sites"]) == set(SITES)
    assert summary["central-accuracy"] is not None
    assert (run_dir / "model" / "config.json").exists()
    assert releases(run_dir) == [("site-a", 1), ("site-a", 2), ("site-b", 1), ("site-b", 2)]
    for site in SITES:
        assert fed.ledger(site).exists()
    report = check_audit(fed, run_dir)
    assert {s["site"] for s in report["sites"]} == set(SITES)
    # What the dashboard shows of a deployed run: the sites by name, and whose settings decide.
    from fedpriv.dashboard.view import RunView

    view = RunView(run_dir)
    view.refresh()
    state = view.snapshot()
    assert state["deployed"] and state["status"] == "finished" and state["rounds-done"] == 2
    assert [s["name"] for s in state["sites"]] == sorted(SITES) and all(s["state"] == "trained" for s in state["sites"])
    assert any("each site's own policy and budget decide" in p for p in state["privacy"])


@pytest.mark.slow
def test_another_server_app_runs_against_the_same_agents(fed):
    # What a test of a hostile aggregator builds on: its own ServerApp, shipped in the run's bundle.
    run_dir = fed.root / "run-census"
    code, out, err = finish(fed.submit("--run-dir", run_dir, server_app=ROOT / "tests" / "server_apps" / "census.py"))
    assert code == 0, out[-3000:] + err[-3000:]
    registered = json.loads((fed.state / "registered-nodes.json").read_text())
    (census,) = RunDirectory(run_dir).events("census")
    assert census["nodes"] == sorted(registered[site] for site in SITES)


@pytest.mark.slow
def test_agent_killed_mid_round_the_round_completes_and_the_site_rejoins(fed):
    fed.wait_online()
    run_dir = fed.root / "run-kill"
    # Frozen while idle, site-b's worker cannot answer round 1 before the test kills the whole site.
    assert fed.worker("site-b", suspend=True) is not None
    process = fed.submit("--run-dir", run_dir, "--set", "strategy.round-timeout=180")
    wait_for(lambda: fed.message_at_worker("site-b"), what="site-b's round-1 message", interval=0.1, alive=process)
    fed.kill("site-b")  # mid-round (Flower then reports it unavailable)
    # Straight back. Flower holds its old session for two missed heartbeats: the agent is refused and retries
    # while the hold lasts, or (restarting slower than that, under load) gets in at once. Either way it
    # trains in round 2, which is what the run records show; its log is no event to wait on.
    fed.start_agent("site-b")

    code, out, err = finish(process)
    assert code == 0, out[-3000:] + err[-3000:]
    run = RunDirectory(run_dir)
    trained = {(e["site"], e["round"]) for e in run.events("site-train")}
    assert trained == {("site-a", 1), ("site-a", 2), ("site-b", 2)}
    aggregated = {e["round"]: e["sites"] for e in run.events("train-aggregate")}
    assert aggregated == {1: 1, 2: 2}
    assert (run_dir / "model" / "config.json").exists()
    check_audit(fed, run_dir)


def test_no_other_process_can_take_a_task_from_a_sites_supernode(fed):
    """Flower still serves the SuperNode's runtime API; asking it for tasks needs the agent's secret."""
    import httpx

    fed.wait_online()
    url = f"http://127.0.0.1:{fed.ports['site-a']}/v1/runtime/pull-pending-tasks"
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    response = httpx.post(url, content=b"", headers=headers, timeout=30)
    assert response.status_code == httpx.codes.UNAUTHORIZED, response.text


@pytest.mark.slow
def test_a_site_worker_killed_mid_message_is_restarted_and_the_run_completes(fed):
    fed.wait_online()
    run_dir = fed.root / "run-worker-kill"
    worker = fed.worker("site-b", suspend=True)  # frozen while idle: site-b's first message waits on it
    assert worker is not None
    process = fed.submit("--run-dir", run_dir, "--set", "strategy.round-timeout=180")
    wait_for(lambda: fed.message_at_worker("site-b"), what="site-b's first message", interval=0.1, alive=process)
    # The aggregator waits (frozen) until site-b has a new worker, so round 2 finds one; round 1 does not.
    server_app = fed.process_named("aggregator", "flwr-serverapp")
    server_app.suspend()
    worker.kill()  # mid-message: the SuperNode has handed it over and waits for the answer
    ready = fed.root / "site-b-state" / "worker" / "ready.json"

    def restarted() -> bool:
        try:
            return json.loads(ready.read_text())["pid"] != worker.pid
        except (OSError, ValueError, KeyError):
            return False

    try:
        wait_for(restarted, what="site-b's agent to start a new worker", alive=process)
    finally:
        server_app.resume()
    code, out, err = finish(process)
    assert code == 0, out[-3000:] + err[-3000:]
    run = RunDirectory(run_dir)
    failed = [e for e in run.events("site-error") if e["site"] == "site-b"]
    # The message it was handed fails at once, saying why; no other does.
    assert [e["round"] for e in failed] == [1], failed
    reason = failed[0]["reason"]
    assert "site worker stopped while it answered this message" in reason or "site worker is not running" in reason
    trained = {(e["site"], e["round"]) for e in run.events("site-train")}
    assert trained == {("site-a", 1), ("site-a", 2), ("site-b", 2)}  # the new worker answered round 2
    assert releases(run_dir).count(("site-b", 2)) == 1
    check_audit(fed, run_dir)  # every ledger intact and complete


@pytest.mark.slow
def test_aggregator_killed_after_round_1_resumes_at_round_2_with_the_same_weights(fed, tmp_path):
    from fedpriv.server import checkpoint

    fed.wait_online()
    run_dir = fed.root / "run-resume"
    first = fed.submit("--run-dir", run_dir)
    saved = run_dir / "checkpoints" / "round-0001.safetensors"
    wait_for(saved.exists, what="the round-1 checkpoint", interval=0.2, alive=first)
    fed.kill("aggregator")  # SuperLink, SuperExec and ServerApp at once
    code, out, err = finish(first)
    assert code == 1 and "--resume" in err
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy(saved, kept / saved.name)
    ledger_before = (run_dir / "ledgers" / "federation.jsonl").read_text()
    assert releases(run_dir) == [("site-a", 1), ("site-b", 1)]

    fed.start_aggregator()
    fed.wait_online()  # each agent's SuperNode starts again under the node id the new SuperLink gave it
    resumed = fed.submit("--resume", run_dir)
    code, out, err = finish(resumed)
    assert code == 0, out[-3000:] + err[-3000:]

    run = RunDirectory(run_dir)
    events = run.events()
    kinds = [e["kind"] for e in events]
    assert [e["round"] for e in run.events("resumed")] == [1]
    after = kinds.index("resumed")
    restart = next(e for e in events[after:] if e["kind"] == "round-start")
    assert restart["round"] == 2
    state = checkpoint.latest(kept).state
    assert restart["global-sha256"] == state_sha256(state)  # round 2 started from round 1's weights
    assert saved.read_bytes() == (kept / saved.name).read_bytes()  # and round 1 was not redone
    assert sorted(e["round"] for e in run.events("round-end")) == [1, 2]
    assert "round-start" not in [e["kind"] for e in events[after:] if e.get("round") == 1]

    # The federation ledger went on from where it stopped: nothing lost, nothing counted twice.
    assert (run_dir / "ledgers" / "federation.jsonl").read_text().startswith(ledger_before)
    assert releases(run_dir) == [("site-a", 1), ("site-a", 2), ("site-b", 1), ("site-b", 2)]
    assert (run_dir / "model" / "config.json").exists()
    check_audit(fed, run_dir)


@pytest.mark.slow
def test_agents_stop_cleanly_on_sigterm(fed):
    import psutil

    for site in SITES:
        process = fed.processes.pop(site)
        since = fed.log_size(site)
        started = psutil.Process(process.pid).children(recursive=True)  # SuperNode and site worker
        assert started, "the agent runs a SuperNode"
        process.send_signal(signal.SIGTERM)  # to the agent only, as `docker stop` or systemd (KillMode=mixed) do
        assert process.wait(60) == 0
        assert f"{site}: stopped" in fed.log_text(site, since)
        assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
