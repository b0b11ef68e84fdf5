"""Every use of Flower's internals, in one place, for the pinned flwr 1.39.*.

fedpriv uses Flower's public message API (`flwr.app`, `flwr.clientapp`,
`flwr.serverapp`) everywhere else. What is here has no public form in 1.39:

- running a simulation from an app directory with its run config, in process
  (`flwr run` does the same through a background SuperLink that can outlive
  the command; the public `run_simulation` takes no run config);
- a Simulation Engine backend that runs the ClientApps in the simulation's own
  process, instead of Ray actors (see `in_process_workers`);
- the virtual nodes' node config, which the harness extends to declare them
  simulated (see `virtual_node_config`);
- a message dispatcher for the Simulation Engine that is O(messages) rather
  than O(sites x messages) per poll (see `fast_dispatch`);
- the RDP accountant the message-API DP strategies accept
  (`flwr.supercore.privacy_accounting`);
- FedAdam's moments, which a resumed run must restore;
- the SuperNode's error numbers, which appear only in its log;
- the SuperNode's message loop, NodeState and ObjectStore, through which the
  agent's SuperNode hands each message straight to the site's resident
  worker instead of starting a ClientApp process (`_answering_in_place`);
- what a deployed round waits on: the SuperNode's polling sleeps, heartbeat
  interval and retries (it exits when a restarted aggregator no longer knows
  its node id), and the retries of object pulls.

`check()` says, in one message, which of these the installed Flower no longer
has; `tests/test_compat.py` runs it, so moving the pin fails there first.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from queue import Queue
from typing import Any, cast

from fedpriv.common.errors import FedprivError

PINNED = "1.39."
# Both ends of the Simulation Engine poll (Flower's default is 0.1 s each way):
# a secure-aggregation round is several exchanges, so polling would dominate it.
POLL_SECONDS = 0.01
ADAM_MOMENTS = ("m_t", "v_t")


class FlowerCompatError(FedprivError):
    """The installed Flower lacks an internal fedpriv relies on."""


def check() -> None:
    """Raises a `FlowerCompatError` listing every internal the installed Flower lacks."""
    problems: list[str] = []
    if not version("flwr").startswith(PINNED):
        problems.append("the pinned version")

    def probe(what: str, test) -> None:
        try:
            if not test():
                problems.append(what)
        except Exception as error:  # an import or attribute that moved
            problems.append(f"{what} ({type(error).__name__}: {error})")

    def simulation_entry() -> bool:
        from flwr.simulation.run_simulation import _run_simulation

        wanted = {"server_app_attr", "client_app_attr", "app_dir", "run", "server_app_context", "is_app"}
        return wanted <= set(inspect.signature(_run_simulation).parameters)

    def link_state() -> bool:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        names = InMemoryLinkState.__init__.__code__.co_names
        return callable(getattr(vce_api, "add_messages_to_queue", None)) and {"message_ins_store", "lock"} <= set(names)

    def accountant() -> bool:
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, PrivacyConfig  # noqa: F401
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        return callable(getattr(RdpAccountant, "compose", None))

    def adam() -> bool:
        from flwr.serverapp.strategy import FedAdam

        strategy = FedAdam()
        return all(hasattr(strategy, name) for name in ADAM_MOMENTS)

    def grid_poll() -> bool:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid

        return "pull_interval" in inspect.signature(InMemoryGrid.__init__).parameters

    def exit_codes() -> bool:
        from flwr.supercore.error import ApiErrorCode
        from flwr.supercore.exit import ExitCode

        return bool(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED and ExitCode.SUPERNODE_CONNECTION_ERROR)

    def engine_backend() -> bool:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.fleet.vce.backend import Backend

        wanted = {"build", "process_message", "is_worker_idle", "terminate"}
        parameters = list(inspect.signature(vce_api.run_api).parameters)
        return parameters[:2] == ["app_fn", "backend_fn"] and wanted <= Backend.__abstractmethods__

    def virtual_nodes() -> bool:
        from flwr.server.superlink.fleet.vce import vce_api

        code = vce_api._register_node_info_stores.__code__
        made = inspect.signature(vce_api.DeprecatedRunInfoStore).parameters
        return "DeprecatedRunInfoStore" in code.co_names and {"node_id", "node_config"} <= set(made)

    probe("flwr.simulation.run_simulation._run_simulation with app_dir and run", simulation_entry)
    probe("the Simulation Engine's virtual node config (vce_api.DeprecatedRunInfoStore)", virtual_nodes)
    probe("the Simulation Engine's run_api(app_fn, backend_fn, ...) and Backend", engine_backend)
    probe("the Simulation Engine's in-memory link state (message_ins_store, lock)", link_state)
    probe("flwr.supercore.privacy_accounting.RdpAccountant", accountant)
    probe(f"FedAdam's moments {ADAM_MOMENTS}", adam)
    probe("Flower's SuperNode exit and API error codes", exit_codes)
    probe("the simulation grid's pull_interval", grid_poll)

    def answering_in_place() -> bool:
        from flwr.common.constant import Status, SubStatus  # noqa: F401
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto  # noqa: F401
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree  # noqa: F401
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: F401
        from flwr.supernode import start_client_internal as loop
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

        wanted = (
            "get_tasks claim_task activate_task finish_task get_messages record_message_processing_start "
            "record_message_processing_end get_run get_run_series_context set_run_series_context get_fab"
        ).split()
        source = inspect.getsource(loop.start_client_internal)
        return (
            all(callable(getattr(InMemoryNodeState, name, None)) for name in wanted)
            and callable(getattr(loop, "_insert_message", None))
            and "state=state," in source
            and "object_store=store," in source
            and "order_by" in inspect.signature(InMemoryNodeState.get_tasks).parameters
        )

    probe("what the SuperNode answering in place uses (its NodeState, ObjectStore and serde)", answering_in_place)

    def supernode_loop() -> bool:
        from flwr.supernode import start_client_internal as loop

        source = inspect.getsource(loop)
        return (
            loop.time is __import__("time")
            and "time.sleep(3)" in source
            and "time.sleep(0.5)" in source
            and "run_id = _pull_and_store_message(" in source
        )

    def object_pulls() -> bool:
        from flwr.supercore.inflatable import inflatable_utils

        wanted = {"initial_backoff", "backoff_cap", "max_tries_per_object"}
        functions = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
        return all(wanted <= set(f.__kwdefaults__ or {}) for f in functions)

    def heartbeats() -> bool:
        from flwr.client.grpc_rere_client import connection
        from flwr.supercore import heartbeat

        return all(isinstance(m.HEARTBEAT_DEFAULT_INTERVAL, int | float) for m in (connection, heartbeat))

    probe("the SuperNode's heartbeat interval (grpc_rere_client.connection, supercore.heartbeat)", heartbeats)

    def forgotten_node() -> bool:
        from flwr.supercore.retry import retry_invoker
        from flwr.supernode import start_client_internal as loop

        invoker = loop.make_simple_grpc_retry_invoker()
        backoff = inspect.signature(retry_invoker.exponential).parameters
        return (
            callable(invoker.should_giveup)
            and callable(invoker.wait_gen_factory)
            and "max_delay" in backoff
            and "Invalid node ID" in _node_auth_source()
        )

    probe("the retries of Flower's object pulls (inflatable_utils)", object_pulls)
    probe(
        "the SuperNode loop's polling sleeps and _pull_and_store_message (flwr.supernode.start_client_internal)",
        supernode_loop,
    )
    probe(
        "the SuperNode's retry invoker (should_giveup, its backoff) and the SuperLink's 'Invalid node ID'",
        forgotten_node,
    )
    if problems:
        raise FlowerCompatError(
            f"fedpriv needs flwr {PINNED}* (installed: {version('flwr')}); this Flower lacks: " + "; ".join(problems)
        )


# --- Simulation ------------------------------------------------------------------


def run_simulation(
    app_dir: Path,
    *,
    server_app_attr: str,
    client_app_attr: str,
    num_supernodes: int,
    backend_config: dict,
    verbose: bool,
) -> None:
    """What `flwr-simulation` does once it has the app: its run config is the app's, fused."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    flwr_run = Run.create_empty(run_id=run_id)
    flwr_run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    flwr_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(
        run_id=run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, {}),
    )
    with fast_dispatch():
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            server_app_attr=server_app_attr,
            client_app_attr=client_app_attr,
            backend_name="ray",
            backend_config=backend_config,
            app_dir=str(app_dir),
            run=flwr_run,
            server_app_context=context,
            verbose_logging=verbose,
            is_app=True,
        )


# Flower 1.39's Simulation Engine runs every ClientApp in a Ray actor: a
# cluster to start, and in each actor torch, transformers and fedpriv to import
# again, before the first round (about 20 s for a tiny model on 2 cores, more
# than a hundred rounds of it). `in_process_workers` gives the engine a backend
# that runs the ClientApp in the simulation's own process instead: one resident
# model, as in pfl-research, with what the ClientApp is handed copied as Ray's
# transport would (a ClientApp can then change its message without the
# ServerApp seeing it; array payloads are immutable bytes, shared, not copied).


def _in_process_backend() -> Any:
    import copy

    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend import Backend

    class InProcessBackend(Backend):
        def __init__(self) -> None:
            self._app_fn: Callable[[], Any] | None = None
            self._busy = threading.Lock()

        def build(self, app_fn: Callable[[], Any]) -> None:
            self._app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1  # the ClientApp keeps one resident model per process

        def is_worker_idle(self) -> bool:
            return not self._busy.locked()

        def terminate(self) -> None:
            pass

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            assert self._app_fn is not None, "build() first"
            with self._busy:
                try:
                    app = self._app_fn()
                    reply = app(message=copy.deepcopy(message), context=context)
                except LoadClientAppError:
                    raise
                except Exception as error:
                    raise ClientAppException(str(error)) from error
                return reply, context

    return InProcessBackend()


@contextlib.contextmanager
def in_process_workers() -> Iterator[None]:
    """While open, the Simulation Engine runs ClientApps in this process (see above), not in Ray actors."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.run_api

    def run_api(app_fn: Callable, backend_fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return original(app_fn, _in_process_backend, *args, **kwargs)

    vce_api.run_api = run_api
    try:
        yield
    finally:
        vce_api.run_api = original


@contextlib.contextmanager
def virtual_node_config(extra: dict[str, Any]) -> Iterator[None]:
    """While open, every virtual node the Simulation Engine makes has `extra` in its node config too.

    Flower gives a virtual node only its partition keys, which a deployed node
    may carry as well; the harness declares its nodes simulated through this.
    """
    from flwr.server.superlink.fleet.vce import vce_api as engine

    vce_api: Any = engine  # its store class is replaced by a function making the same objects
    original = vce_api.DeprecatedRunInfoStore

    def store(node_id: int, node_config: dict[str, Any]) -> Any:
        return original(node_id=node_id, node_config={**node_config, **extra})

    vce_api.DeprecatedRunInfoStore = store
    try:
        yield
    finally:
        vce_api.DeprecatedRunInfoStore = original


# Flower 1.39's Simulation Engine moves messages from its in-memory link state
# to the worker queue by asking, every 0.1 s, every virtual node in turn for
# its next message; each ask re-validates every stored message. With n sites
# that is n x n checks ten times a second, under the lock the workers need to
# store their replies: at 100 sites it keeps a whole core busy and is most of
# the simulation's overhead (bench/overhead.py). This dispatcher looks once
# per poll for undelivered messages and asks only their destination nodes,
# through Flower's own `get_message_ins`, so expiry and federation checks and
# the delivered mark stay Flower's.


def _pending_destinations(state: Any, nodes: set[int]) -> list[int]:
    with state.lock:
        return sorted(
            {
                message.metadata.dst_node_id
                for message in state.message_ins_store.values()
                if message.metadata.delivered_at == "" and message.metadata.dst_node_id in nodes
            }
        )


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for node_id in _pending_destinations(state, nodes):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(POLL_SECONDS)


@contextlib.contextmanager
def fast_dispatch() -> Iterator[bool]:
    """Installs the dispatcher for one simulation; yields whether it could (else Flower's own loop runs)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    probe = InMemoryLinkState.__init__.__code__.co_names
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None or "message_ins_store" not in probe or "lock" not in probe:
        yield False
        return
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


def quicken(grid: Any) -> None:
    """A ServerApp's waits, shortened: the simulation grid's poll, and (deployed) its pulls of message objects."""
    if type(grid).__name__ == "InMemoryGrid" and hasattr(grid, "pull_interval"):
        grid.pull_interval = POLL_SECONDS
    quicken_object_pulls()


# A message travels as a head and its objects (arrays, records), pushed after
# the head. Whoever pulls it early finds objects not there yet and, in Flower
# 1.39, waits 1 s, then 2, 4 ... up to 10 s before asking again: a second or
# more per exchange in each direction, most of a deployed round. Retrying from
# FIRST_RETRY up to LAST_RETRY (Flower's 500 tries still bound a pull that
# will never succeed, to minutes) sees them as soon as they land.
FIRST_RETRY, LAST_RETRY = 0.02, 1.0


def quicken_object_pulls() -> None:
    """Shortens this process's retries when pulling a message's objects (see FIRST_RETRY)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = function.__kwdefaults__ or {}
        function.__kwdefaults__ = defaults
        defaults.update(initial_backoff=FIRST_RETRY, backoff_cap=LAST_RETRY)


# --- Site-level DP accounting ----------------------------------------------------


def rdp_accountant(*, delta: float, population: int, max_epsilon: float | None, orders: Sequence[float]) -> Any:
    """Flower's RDP accountant for a fixed cohort (no sampling amplification), add/remove-one."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        ),
        orders=tuple(float(o) for o in orders),
    )


def compose_gaussian(accountant: Any, noise_multiplier: float, cohort: int, count: int) -> None:
    """Composes `count` Gaussian releases over a cohort of `cohort` (all sampled) into Flower's accountant."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant.compose(GaussianPrivacyEvent(noise_multiplier, cohort, cohort), count=count)


# --- Strategy state --------------------------------------------------------------


def adam_moments(strategy: Any) -> dict[str, dict]:
    """FedAdam's first and second moments by name (empty for other strategies or before round 1)."""
    return {name: dict(getattr(strategy, name, None) or {}) for name in ADAM_MOMENTS}


def set_adam_moments(strategy: Any, moments: dict[str, dict]) -> None:
    for name in ADAM_MOMENTS:
        if moments.get(name):
            setattr(strategy, name, moments[name])


# --- SuperNode errors ------------------------------------------------------------


def supernode_error_marks() -> tuple[str, str]:
    """(activation refused, no connection) as the SuperNode logs them: "[code: 2004]", "Exit Code: 305".

    Flower's SuperNode exits with status 1 for every error; these numbers
    appear only in the message it logs before exiting. They come from Flower's
    constants, so a renumbering shows up in `check()`, not as a silent change.
    """
    from flwr.supercore.error import ApiErrorCode
    from flwr.supercore.exit import ExitCode

    return (
        f"[code: {int(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED)}]",
        f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}",
    )


# --- The SuperNode answering through the resident worker ----------------------------

# Flower 1.39's SuperNode stores each message it pulls and waits for a
# ClientApp process to take it through the runtime API: SuperExec asks for
# the task, starts `flwr-clientapp`, which asks for the task's input, the
# message's head and each of its objects, pushes the reply's head and each
# of its objects, then the task's output (about twenty HTTP calls a message,
# each parsed by the SuperNode's uvicorn and FastAPI; a steady deployed
# round spent more CPU there than in training). The agent's SuperNode instead
# hands the stored message, with its run's context and app bundle, straight
# to a callable (`answer`, the resident worker's socket) and stores what
# comes back as the ClientApp's reply and the run's new context. Flower's
# loop then pushes the reply as it would have. The task Flower created for
# the message is finished here, so no ClientApp process is ever started.
Answer = Callable[[Any, Any, bytes], tuple[Any, Any]]


def message_to_wire(message: Any) -> bytes:
    """A whole message (head and content) as one protobuf string."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(message).SerializeToString()


def message_from_wire(data: bytes) -> Any:
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    return message_from_proto(_parsed(ProtoMessage, data))


def context_to_wire(context: Any) -> bytes:
    from flwr.common.serde import context_to_proto

    return context_to_proto(context).SerializeToString()


def context_from_wire(data: bytes) -> Any:
    from flwr.common.serde import context_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext

    return context_from_proto(_parsed(ProtoContext, data))


def _parsed(proto_type: Any, data: bytes) -> Any:
    proto = proto_type()
    proto.ParseFromString(data)
    return proto


def error_reply(message: Any, reason: str) -> Any:
    """The reply Flower's ClientApp process sends when the ClientApp raised: an error that names why."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def _answer_stored_message(state: Any, store: Any, run_id: int, answer: Answer) -> None:
    """Answers the message `_pull_and_store_message` just stored for `run_id`, as its ClientApp task would."""
    from flwr.app import Message
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supernode.start_client_internal import _insert_message

    tasks = state.get_tasks(run_ids=[run_id], statuses=[Status.PENDING], order_by="pending_at")
    messages = state.get_messages(run_ids=[run_id], is_reply=False, limit=1)
    if not tasks or not messages:  # Flower stored an error reply instead (an unverifiable bundle)
        return
    task, message = tasks[0], messages[0]
    message_id = message.metadata.message_id
    state.record_message_processing_start(message_id=message_id)
    tree = store.get_object_tree(message_id)
    contents = {node.object_id: store.get(node.object_id) for node in iterate_object_tree(tree)}
    message = cast(Message, inflate_object_from_contents(message_id, contents))
    message.metadata.__dict__["_message_id"] = message_id  # a deflated message does not carry its own id
    store.delete(message_id)
    run = state.get_run(run_id)
    context, fab = state.get_run_series_context(run.series_id), state.get_fab(run.fab_hash)
    try:
        reply, new_context = answer(message, context, fab.content if fab else b"")
    except Exception as error:  # the answer's own failure still becomes a reply, never a stuck round
        reply, new_context = error_reply(message, f"{type(error).__name__}: {error}"), None
    state.record_message_processing_end(message_id=message_id)
    _insert_message(reply, state, store)
    if new_context is not None:
        state.set_run_series_context(run.series_id, new_context)
    failed = isinstance(reply, Message) and reply.has_error()
    # The task was never handed out: claim, start and finish it at once, so no token can expire under it.
    state.claim_task(task.task_id)
    state.activate_task(task.task_id)
    state.finish_task(
        task.task_id,
        sub_status=SubStatus.FAILED if failed else SubStatus.COMPLETED,
        details=reply.error.reason if failed else "",
    )


def _answering_in_place(pull_and_store: Callable[..., Any], answer: Answer) -> Callable[..., Any]:
    """The SuperNode's `_pull_and_store_message`, answering each stored message through `answer`."""

    def pulled_and_answered(*args: Any, **kwargs: Any) -> Any:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            _answer_stored_message(kwargs["state"], kwargs["object_store"], run_id, answer)
        return run_id

    return pulled_and_answered


# --- The SuperNode's polling -------------------------------------------------------

# Flower 1.39's SuperNode asks the SuperLink for a message every 3 s when it
# had none, and checks for its ClientApp's reply every 0.5 s. A secure round
# is several exchanges, so those sleeps alone were seconds a round. The
# polling SuperNode waits FIRST_POLL after a message, backing off to LAST_POLL
# while the aggregator is busy. A site that has had no message for IDLE_AFTER
# (no run, or a long pause) polls every IDLE_POLL: five TLS calls a second
# from every idle site cost its host CPU and the aggregator too, and the
# first message of a run can wait a second.
FIRST_POLL, LAST_POLL, IDLE_POLL, IDLE_AFTER = 0.02, 0.2, 1.0, 15.0


class _PollingClock:
    """`time` as the SuperNode's loop sees it, with its sleeps shortened (everything else is `time`'s)."""

    def __init__(self, clock: Any) -> None:
        self._clock, self._pause = clock, FIRST_POLL
        self._last_message = clock.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)

    def message_came(self) -> None:
        """A message was answered: the next one comes soon."""
        self._pause, self._last_message = FIRST_POLL, self._clock.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:  # no message came: back off
            idle = self._clock.monotonic() - self._last_message > IDLE_AFTER
            self._clock.sleep(IDLE_POLL if idle else self._pause)
            self._pause = min(self._pause * 1.5, LAST_POLL)
        else:  # waiting on a reply's objects
            self.message_came()
            self._clock.sleep(min(seconds, FIRST_POLL))


# The interval the SuperNode promises its heartbeats at (Flower's: 30 s); the
# SuperLink counts a node offline after two missed ones. A site killed
# mid-round held the round for a minute, and a restarted one was refused for
# as long (its old session looked alive). At 12 s both take about 24 s; a
# heartbeat is sent every ~5.6 s, so 18 s of delay on a loaded machine is
# tolerated.
HEARTBEAT_SECONDS = 12


# A SuperLink that restarted without its node registry (the aggregator keeps
# Flower's state in memory) assigns every site a new node id at registration.
# Flower's SuperNode keeps the id it activated with; every call is then
# refused with UNAUTHENTICATED "Invalid node ID" and the SuperNode hangs in
# its own shutdown. Exiting with this code lets the agent start a new one,
# which activates under the new id.
EXIT_NODE_FORGOTTEN = 75


# Flower's SuperNode waits up to 20 s (with full jitter) between attempts to
# reach a SuperLink that is down. Restarting the aggregator (an upgrade, a
# crash, `--resume`) then left sites out for up to 20 s after it was back.
# Capped at 4 s, a site is back within about 4 s; with jitter, even a few
# hundred sites spread their attempts over those seconds.
RECONNECT_MAX_SECONDS = 4


def _node_auth_source() -> str:
    from flwr.server.superlink.fleet.grpc_rere import node_auth_server_interceptor

    return inspect.getsource(node_auth_server_interceptor)


def _exit_when_the_node_is_forgotten(make_invoker: Callable[[], Any]) -> Callable[[], Any]:
    """The SuperNode's retries: exit on a forgotten node id, and back off at most `RECONNECT_MAX_SECONDS`."""
    from flwr.supercore.retry.retry_invoker import exponential

    def make() -> Any:
        invoker = make_invoker()
        give_up = invoker.should_giveup

        def should_giveup(error: Exception) -> bool:
            details = getattr(error, "details", None)
            if callable(details) and "Invalid node ID" in str(details()):
                import os
                import sys

                print(
                    "fedpriv: the aggregator no longer knows this node id (it restarted)", file=sys.stderr, flush=True
                )
                os._exit(EXIT_NODE_FORGOTTEN)  # Flower's own shutdown path would hang (see above)
            return bool(give_up(error)) if give_up else True

        invoker.should_giveup = should_giveup
        invoker.wait_gen_factory = lambda: exponential(max_delay=RECONNECT_MAX_SECONDS)
        return invoker

    return make


def run_supernode_polling_often(answer: Answer) -> None:
    """Runs Flower's `flower-supernode` (its command line is this process's), answering through `answer`.

    Each message is answered in this process by `answer` (see
    `_answering_in_place`); run it with `--isolation process`, so that Flower
    starts no SuperExec. It polls the SuperLink more often, promises
    heartbeats every `HEARTBEAT_SECONDS`, and exits with `EXIT_NODE_FORGOTTEN`
    when the aggregator no longer knows its node id, so that the agent starts
    it again.
    """
    import time

    from flwr.client.grpc_rere_client import connection
    from flwr.supercore import heartbeat
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    clock = _PollingClock(time)
    loop.time = clock  # type: ignore[assignment]
    answered = _answering_in_place(loop._pull_and_store_message, answer)

    def pulled(*args: Any, **kwargs: Any) -> Any:
        run_id = answered(*args, **kwargs)
        if run_id is not None:
            clock.message_came()
        return run_id

    loop._pull_and_store_message = pulled
    connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS
    loop.make_simple_grpc_retry_invoker = _exit_when_the_node_is_forgotten(loop.make_simple_grpc_retry_invoker)
    quicken_object_pulls()
    flower_supernode()
