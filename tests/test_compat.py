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


def _supernode_with_a_message(content, monkeypatch):
    """A SuperNode's real NodeState and ObjectStore holding one pulled message and its task, as Flower leaves them."""
    import hashlib

    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import Status
    from flwr.supercore.constant import TaskType
    from flwr.supercore.fab import Fab
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.start_client_internal import _insert_message

    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    state.set_node_id(7)
    run = Run.create_empty(run_id=11)
    run.fab_hash, run.series_id = hashlib.sha256(b"the bundle").hexdigest(), 5
    state.store_run(run)
    state.store_fab(Fab(run.fab_hash, b"the bundle", {}))
    state.set_run_series_context(5, Context(11, 7, {}, RecordDict(), {}, series_id=5))
    for name, value in (("_task_id", 1), ("_run_id", 11), ("_node_id", 1)):  # the aggregator's ServerApp, run 11
        monkeypatch.setattr(TaskIdentity, name, value)
    message = Message(content, dst_node_id=7, message_type="train")
    _insert_message(message, state, store)
    task = state.create_task(task_type=TaskType.CLIENT_APP, run_id=11, fab_hash=run.fab_hash)
    assert state.get_tasks(task_ids=[task])[0].status.status == Status.PENDING
    return state, store, task, message


def test_the_supernode_answers_a_stored_message_in_place_and_finishes_its_task(monkeypatch):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.common.constant import Status, SubStatus

    sent = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(6.0))}), "config": ConfigRecord({"round": 3})})
    state, store, task, message = _supernode_with_a_message(sent, monkeypatch)
    seen = {}

    def answer(msg, context, bundle):
        # What the worker receives crosses a socket: the round trip through the wire format is part of the path.
        msg = flower_compat.message_from_wire(flower_compat.message_to_wire(msg))
        context = flower_compat.context_from_wire(flower_compat.context_to_wire(context))
        seen.update(bundle=bundle, round=msg.content["config"]["round"], w=msg.content["arrays"]["w"].numpy())
        context.state["seen"] = ConfigRecord({"messages": 1})
        return Message(RecordDict({"config": ConfigRecord({"ok": True})}), reply_to=msg), context

    flower_compat._answer_stored_message(state, store, 11, answer)
    assert seen["bundle"] == b"the bundle" and seen["round"] == 3
    assert seen["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    (reply,) = state.get_messages(is_reply=True)
    assert reply.metadata.reply_to_message_id == message.metadata.message_id
    assert store.get_object_tree(reply.metadata.message_id) is not None  # its objects are there to push
    assert state.get_run_series_context(5).state["seen"]["messages"] == 1  # the context as the worker left it
    (finished,) = state.get_tasks(task_ids=[task])
    assert (finished.status.status, finished.status.sub_status) == (Status.FINISHED, SubStatus.COMPLETED)
    assert store.get(message.metadata.message_id) is None  # the message itself is gone, as once confirmed


def test_an_answer_that_fails_becomes_an_error_reply_and_the_context_stays(monkeypatch):
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.constant import Status, SubStatus

    state, store, task, _ = _supernode_with_a_message(RecordDict({"config": ConfigRecord({"round": 1})}), monkeypatch)

    def answer(msg, context, bundle):
        raise ConnectionResetError("the worker went away")

    flower_compat._answer_stored_message(state, store, 11, answer)
    (reply,) = state.get_messages(is_reply=True)
    assert reply.has_error() and "the worker went away" in reply.error.reason
    assert "seen" not in state.get_run_series_context(5).state
    (finished,) = state.get_tasks(task_ids=[task])
    assert (finished.status.status, finished.status.sub_status) == (Status.FINISHED, SubStatus.FAILED)


def test_the_supernode_asks_sooner_after_a_message_and_backs_off_while_none_comes():
    class Clock:
        def __init__(self):
            self.now, self.slept = 0.0, []

        def monotonic(self):
            return self.now

        def sleep(self, seconds):
            self.slept.append(seconds)

    fake = Clock()
    clock = flower_compat._PollingClock(fake)
    for _ in range(3):
        clock.sleep(3)  # Flower's loop found no message
    clock.message_came()
    clock.sleep(3)
    fake.now = flower_compat.IDLE_AFTER + 1
    clock.sleep(3)
    first = flower_compat.FIRST_POLL
    assert fake.slept == pytest.approx([first, first * 1.5, first * 2.25, first, flower_compat.IDLE_POLL])
