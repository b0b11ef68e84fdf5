"""The house rules of the layout, checked on the source: who may import whom, and what importing does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {
    "common": ROOT / "common",
    "client": ROOT / "client",
    "server": ROOT / "server",
    "simulation": ROOT / "simulation",
    "audit": ROOT / "audit",
    "deploy": ROOT / "fedpriv" / "deploy",
    "dashboard": ROOT / "fedpriv" / "dashboard",
}


def _imports(folder: Path) -> dict[str, set[str]]:
    """module file -> every fedpriv module it imports (at any depth of the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = {n for n in names if n == "fedpriv" or n.startswith("fedpriv.")}
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ROOMS:
        return parts[1]
    return "cli" if module.startswith("fedpriv") else None


@pytest.mark.parametrize(
    "room, forbidden",
    [
        ("common", {"client", "server", "simulation", "audit", "deploy", "cli"}),
        ("client", {"server", "simulation", "audit", "deploy", "cli"}),
        ("server", {"client", "simulation", "audit", "deploy", "cli"}),
        ("audit", {"client", "server", "simulation", "deploy", "cli"}),
        ("simulation", {"deploy", "cli"}),
        ("deploy", {"simulation"}),
        # Operator tooling that reads run directories: what the roles share and the auditor, never a role.
        ("dashboard", {"client", "server", "simulation", "deploy", "cli"}),
    ],
)
def test_rooms_import_only_what_the_layout_allows(room, forbidden):
    offenders = [
        f"{path} imports {module}"
        for path, modules in _imports(ROOMS[room]).items()
        for module in modules
        if _room(module) in forbidden and module != "fedpriv"  # the root holds only __version__
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "part, forbidden",
    [
        # What the roles share, by concern: privacy records and accounting know no model and no wire format;
        # the model knows no privacy record; the wire carries privacy records, never the model's internals.
        ("privacy", {"model", "wire"}),
        ("model", {"privacy", "wire"}),
        ("wire", {"model"}),
    ],
)
def test_common_keeps_its_concerns_apart(part, forbidden):
    offenders = [
        f"{path} imports {module}"
        for path, modules in _imports(ROOMS["common"] / part).items()
        for module in modules
        if module.startswith("fedpriv.common.") and module.split(".")[2] in forbidden
    ]
    assert not offenders, "\n".join(offenders)


def test_common_holds_only_what_several_roles_use():
    """A module of `common` that one role alone imports belongs in that role (Opacus' compat, the progress
    files and the run report moved out for this); one no role imports is a helper of `common` itself."""
    users: dict[str, set[str]] = {}
    for room in ("client", "server", "simulation", "audit", "deploy"):
        for modules in _imports(ROOMS[room]).values():
            for module in modules:
                users.setdefault(module, set()).add(room)
    for modules in _imports(ROOT / "fedpriv").values():  # the CLI (fedpriv/*.py; deploy counted above)
        for module in modules:
            users.setdefault(module, set()).add("cli")
    alone = []
    for path in sorted(ROOMS["common"].rglob("*.py")):
        dotted = "fedpriv.common." + ".".join(path.relative_to(ROOMS["common"]).with_suffix("").parts)
        dotted = dotted.removesuffix(".__init__")
        if "secagg" in path.parts:  # one protocol: its site half and its aggregator half stay together
            dotted = "fedpriv.common.wire.secagg"
        rooms = set().union(*(r for m, r in users.items() if m == dotted or m.startswith(dotted + ".")))
        if len(rooms) == 1:
            alone.append(f"{path.relative_to(ROOT)}: only {rooms.pop()} imports it")
    assert not alone, "\n".join(alone)


def test_importing_fedpriv_changes_no_environment_variable():
    modules = [
        "fedpriv",
        *(
            f"fedpriv.{name}." + ".".join(path.relative_to(folder).with_suffix("").parts)
            for name, folder in ROOMS.items()
            for path in folder.rglob("*.py")
            if path.stem not in ("__init__", "__main__")
        ),
        "fedpriv.cli",
    ]
    code = (
        "import importlib, json, os, sys\n"
        # Libraries may set their own variables on import (grpc, torch); only fedpriv's count.
        "import torch, flwr.app, flwr.serverapp, flwr.clientapp, opacus, transformers, peft, dp_accounting\n"
        "before = dict(os.environ)\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "changed = {k: v for k, v in os.environ.items() if before.get(k) != v}\n"
        "print(json.dumps(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_", "HF_", "TRANSFORMERS_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


def test_a_users_own_common_and_server_do_not_shadow_fedpriv(tmp_path):
    # A working directory with its own `common.py` and `server/` package, as users have.
    (tmp_path / "common.py").write_text("raise SystemExit('the user\\'s common.py was imported')\n")
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("raise SystemExit('the user\\'s server was imported')\n")
    code = "import fedpriv.server.app, fedpriv.client.app, fedpriv.common.config; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


def test_a_run_report_parses_the_metrics_file_once(tmp_path, monkeypatch):
    from fedpriv.common import rundir
    from fedpriv.common.run_events import CentralEvaluate, Resumed, RoundEnd, RunEnd, RunStart, SiteTrain

    run = rundir.RunDirectory.create(tmp_path / "run")
    run.log(RunStart(run_id="1", rounds=2, labels=3))
    for rnd in (1, 2):
        run.log(SiteTrain(round=rnd, site="site-000", epsilon=rnd / 2, delta=1e-5, **{"num-examples": 10}))
        run.log(CentralEvaluate(round=rnd, accuracy=0.5 + rnd / 10, loss=1.0))
        run.log(RoundEnd(round=rnd, seconds=0.1))
    run.log(RunEnd(seconds=1.0))
    parses = []
    original = rundir.read_jsonl
    monkeypatch.setattr(rundir, "read_jsonl", lambda path: parses.append(path) or original(path))
    summary = rundir.summarize(run)
    run.events("site-train")
    assert summary["rounds-completed"] == 2 and summary["sites"]["site-000"]["epsilon"] == 1.0
    assert len(parses) == 1
    run.log(Resumed(round=2))  # the file grew: read again
    assert run.events("resumed") and len(parses) == 2


def _sources(*rooms: str) -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(encoding="utf-8"))
        for room in rooms
        for path in sorted(ROOMS[room].rglob("*.py"))
    }


def test_only_the_run_directory_knows_its_layout():
    """A path into a run directory comes from `RunDirectory`; a name of its layout joined by hand is refused."""
    from fedpriv.common import rundir

    names = {
        getattr(rundir, n)
        for n in dir(rundir)
        if n.isupper() and isinstance(getattr(rundir, n), str) and n not in ("AGGREGATOR",)
    }
    names |= {"aggregator.key"}
    assert {"ledgers", "keys", "progress", "flower-app", "public-keys.json", "metrics.jsonl"} <= names
    offenders = []
    # The deploy tooling keeps its own state folders (an agent's, an aggregator's), which are no run directory.
    for path, tree in _sources("common", "client", "server", "simulation", "audit", "dashboard").items():
        if path == "common/rundir.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                for side in (node.left, node.right):
                    if isinstance(side, ast.Constant) and side.value in names:
                        offenders.append(f"{path}:{node.lineno} joins {side.value!r}")
                    if isinstance(side, ast.JoinedStr) and any(
                        isinstance(v, ast.Constant) and str(v.value).startswith(".jsonl") for v in side.values
                    ):
                        offenders.append(f"{path}:{node.lineno} names a ledger file by hand")
    assert not offenders, "\n".join(offenders)


def test_the_run_log_is_written_in_typed_events_of_one_module():
    """`RunDirectory.log` takes a `run_events` record: a kind spelled as a string, or a kind nobody declared, fails."""
    from fedpriv.common import run_events

    offenders = []
    for path, tree in _sources("common", "client", "server", "simulation", "audit", "deploy").items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = ast.unparse(node.func.value)
            if node.func.attr in ("log", "log_event") and target in ("run", "self.run", "self") and node.args:
                first = node.args[0]
                if path.startswith("fedpriv/deploy"):
                    continue  # the deploy tools' `self.log` prints operator messages
                if not (isinstance(first, ast.Call) and ast.unparse(first.func) in run_events.KINDS_BY_NAME):
                    offenders.append(f"{path}:{node.lineno} logs {ast.unparse(first)}")
            if node.func.attr == "events" and node.args and isinstance(node.args[0], ast.Constant):
                offenders.append(f"{path}:{node.lineno} reads events of a kind spelled {node.args[0].value!r}")
    assert not offenders, "\n".join(offenders)
    assert len(run_events.KINDS) == len(run_events.KINDS_BY_NAME) >= 24  # every kind declared once


def test_the_wheel_lists_every_package_of_every_room():
    """setuptools installs only the packages pyproject.toml names: a new sub-package left out is missing from
    the wheel (the editable install of the tests would not notice)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for root_name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if root_name == "fedpriv" and parts and f"fedpriv.{parts[0]}" in setup["package-dir"]:
                continue  # a room mapped on its own
            found.add(".".join((root_name, *parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
