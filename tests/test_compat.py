"""The internals of Flower and Opacus that fedpriv relies on, checked against the installed versions.

If a pin moves, these fail first, naming what is gone; nothing else in
fedpriv touches those internals (the layout test below keeps it so).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from fedpriv.client import opacus_compat
from fedpriv.common import flower_compat

ROOT = Path(__file__).resolve().parents[1]
# Modules of each library that count as its public API.
PUBLIC = {
    "flwr": {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.serverapp.exception"},
    "opacus": {
        "opacus",
        "opacus.data_loader",
        "opacus.optimizers",  # documented (opacus.ai/api/optimizers): DPOptimizer and its fast-clipping form
        "opacus.utils.batch_memory_manager",
        "opacus.accountants",
        "opacus.accountants.utils",
    },
}
COMPAT = {"flwr": ROOT / "common" / "flower_compat.py", "opacus": ROOT / "client" / "opacus_compat.py"}
SOURCES = ["common", "client", "server", "simulation", "audit", "fedpriv"]


def test_installed_flower_has_every_internal_fedpriv_uses():
    flower_compat.check()


def test_installed_opacus_has_every_internal_fedpriv_uses():
    opacus_compat.check()


def test_a_moved_flower_pin_is_reported_by_name(monkeypatch):
    from flwr.server.superlink.fleet.vce import vce_api

    monkeypatch.setattr(flower_compat, "version", lambda _: "1.42.0")
    monkeypatch.delattr(vce_api, "add_messages_to_queue")
    with pytest.raises(flower_compat.FlowerCompatError) as caught:
        flower_compat.check()
    message = str(caught.value)
    assert "fedpriv needs flwr 1.39.*" in message and "installed: 1.42.0" in message
    assert "link state" in message and "the pinned version" in message


def test_a_moved_opacus_pin_is_reported_by_name(monkeypatch):
    from opacus.optimizers import DPOptimizer

    monkeypatch.setattr(opacus_compat, "version", lambda _: "2.0.0")
    monkeypatch.delattr(DPOptimizer, "attach_step_hook")
    with pytest.raises(opacus_compat.OpacusCompatError, match=r"opacus 1\.6\.\*.*attach_step_hook"):
        opacus_compat.check()


def test_fast_dispatch_fits_the_pinned_flower_and_is_undone():
    # The 100-site overhead depends on it: a Flower upgrade that moves the
    # link state's internals must show here, not as a silent slowdown.
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with flower_compat.fast_dispatch() as installed:
        assert installed
        assert vce_api.add_messages_to_queue is flower_compat.add_messages_to_queue
    assert vce_api.add_messages_to_queue is original


def test_virtual_nodes_get_the_harness_node_config_beside_flowers_and_it_is_undone():
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.run import Run

    run = Run.create_empty(run_id=5)
    with flower_compat.virtual_node_config({"fedpriv-simulated": True}):
        stores = vce_api._register_node_info_stores({11: 0, 12: 1}, run)
    contexts = {node: store.retrieve_context(5) for node, store in stores.items()}
    assert {node: dict(c.node_config) for node, c in contexts.items()} == {
        11: {"partition-id": 0, "num-partitions": 2, "fedpriv-simulated": True},
        12: {"partition-id": 1, "num-partitions": 2, "fedpriv-simulated": True},
    }
    after = vce_api._register_node_info_stores({13: 0}, run)
    assert "fedpriv-simulated" not in after[13].retrieve_context(5).node_config


def test_in_process_workers_run_the_clientapp_on_a_copy_of_its_message_and_are_undone(monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp.client_app import ClientAppException
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):  # as the simulation sets them
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)
    seen = []

    def app(message, context):  # a ClientApp that writes into what it was handed
        message.content["config"]["touched"] = True
        context.state["config"] = ConfigRecord({"calls": len(seen) + 1})
        seen.append(message)
        if len(seen) > 1:
            raise ValueError("the second call fails")
        return "the reply"

    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    backend = flower_compat._in_process_backend()
    backend.build(lambda: app)
    assert backend.num_workers == 1 and backend.is_worker_idle()
    reply, kept = backend.process_message(message, context)
    assert reply == "the reply"
    assert "touched" not in message.content["config"] and seen[0] is not message  # the ServerApp's stays as sent
    assert kept is context and kept.state["config"]["calls"] == 1  # the site's context carries over
    with pytest.raises(ClientAppException, match="the second call fails"):
        backend.process_message(message, context)  # Flower's worker turns it into an error reply
    assert backend.is_worker_idle()

    original = vce_api.run_api
    with flower_compat.in_process_workers():
        assert vce_api.run_api is not original
    assert vce_api.run_api is original


@pytest.mark.parametrize("refusal", ["unknown task", "401"])
def test_a_refused_task_heartbeat_ends_that_tasks_heartbeats_not_the_worker(refusal):
    """Flower's own heartbeat raises SIGINT in its process here: in the resident worker, that stopped it."""
    from types import SimpleNamespace

    import httpx

    calls = []

    class Client:
        def SendTaskHeartbeat(self, request):
            calls.append(request)
            if refusal == "401":
                response = httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1/heartbeat"))
                raise httpx.HTTPStatusError("401 Unauthorized", request=response.request, response=response)
            return SimpleNamespace(success=False)

    errors: list[str] = []
    beat = flower_compat._task_heartbeat(Client(), errors.append)
    assert beat() is True and beat() is True  # no retry, no signal (pytest would stop on a SIGINT)
    assert len(calls) == 1
    assert len(errors) == 1 and "no longer knows this task" in errors[0]


def test_fedadam_moments_survive_a_round_trip():
    from flwr.serverapp.strategy import FedAdam

    source, target = FedAdam(), FedAdam()
    source.m_t, source.v_t = {"w": torch.ones(2).numpy()}, {"w": torch.zeros(2).numpy()}
    flower_compat.set_adam_moments(target, flower_compat.adam_moments(source))
    assert target.m_t["w"].tolist() == [1.0, 1.0] and target.v_t["w"].tolist() == [0.0, 0.0]


def test_opacus_state_left_on_parameters_is_cleared():
    from opacus import PrivacyEngine

    module = nn.Linear(3, 2)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8).long()))
    hooks, dp_optimizer, criterion, _ = PrivacyEngine().make_private(
        module=module,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        wrap_model=False,
    )
    criterion(module(torch.randn(4, 3)), torch.zeros(4).long()).backward()
    dp_optimizer.step()
    hooks.cleanup()
    assert any(hasattr(p, name) for p in module.parameters() for name in opacus_compat.PER_SAMPLE_STATE)
    opacus_compat.clear_per_sample_state(module)
    assert not any(hasattr(p, name) for p in module.parameters() for name in opacus_compat.PER_SAMPLE_STATE)
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("library", ["flwr", "opacus"])
def test_only_the_compat_module_imports_a_library_internal(library):
    offenders = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == COMPAT[library]:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                    for name in names
                    if name.split(".")[0] == library and name != library and name not in PUBLIC[library]
                ]
    assert not offenders, "\n".join(offenders)


def test_superexec_sleeps_until_the_supernode_stores_a_message(tmp_path, monkeypatch):
    import stat
    import threading
    import time

    wake_path = tmp_path / "task-wake"
    monkeypatch.setenv(flower_compat.TASK_WAKE_ENV, str(wake_path))
    monkeypatch.setattr(flower_compat, "WAKE_FALLBACK", 600.0)  # only a wake can end the sleep in this test
    clock = flower_compat._TaskClock(time, str(wake_path))
    assert stat.S_IMODE(wake_path.stat().st_mode) == 0o600

    calls = []

    def pull_and_store(found):
        calls.append(found)
        return 7 if found else None

    pulled = flower_compat._waking_superexec(pull_and_store, flower_compat.task_wake_sender())
    woke = threading.Event()
    sleeper = threading.Thread(target=lambda: (clock.sleep(0.05), woke.set()), daemon=True)
    sleeper.start()
    assert pulled(False) is None  # nothing stored: no wake
    assert not woke.wait(0.2)
    assert pulled(True) == 7
    assert woke.wait(60)
    assert calls == [False, True]

    # Several wakes before SuperExec asks are taken by one call.
    for _ in range(3):
        pulled(True)
    clock.sleep(0.05)
    clock._wake.setblocking(False)
    with pytest.raises(BlockingIOError):
        clock._wake.recv(64)


class _Clock:
    """`time` for SuperExec's loop: it records the sleeps asked for, and its clock moves only when told."""

    def __init__(self):
        self.now, self.slept = 0.0, []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.slept.append(seconds)


def test_superexec_asks_again_at_its_interval_after_a_task_and_polls_slowly_without_its_socket():
    fake = _Clock()
    clock = flower_compat._TaskClock(fake, None)
    clock.sleep(0.05)
    fake.now = flower_compat.IDLE_AFTER + 1
    clock.sleep(0.05)
    assert fake.slept == [0.05, flower_compat.IDLE_POLL]  # an agent without the socket: Flower's polling, idling


def test_superexec_after_a_task_asks_again_without_waiting_for_a_wake(tmp_path):
    fake = _Clock()
    clock = flower_compat._TaskClock(fake, str(tmp_path / "task-wake"))
    clock.task_launched()
    clock.sleep(0.05)  # another task may be waiting
    assert fake.slept == [0.05]


def test_a_supernode_without_superexecs_socket_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(flower_compat.TASK_WAKE_ENV, str(tmp_path / "nobody-listens"))
    flower_compat.task_wake_sender()()  # SuperExec not started yet: the wake is dropped, SuperExec polls
    monkeypatch.delenv(flower_compat.TASK_WAKE_ENV)
    flower_compat.task_wake_sender()()


def test_superexec_that_cannot_listen_polls_instead(tmp_path):
    fake = _Clock()
    too_long = tmp_path / ("x" * 120) / "task-wake"  # beyond AF_UNIX's path limit
    too_long.parent.mkdir()
    clock = flower_compat._TaskClock(fake, str(too_long))
    clock.sleep(0.05)
    assert fake.slept == [0.05]
