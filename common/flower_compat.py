"""Every use of Flower's internals, in one place, for the pinned flwr 1.39.*.

fedpriv uses Flower's public message API (`flwr.app`, `flwr.clientapp`,
`flwr.serverapp`) everywhere else. What is here has no public form in 1.39:

- running a simulation from an app directory with its run config, in process
  (`flwr run` does the same through a background SuperLink that can outlive
  the command; the public `run_simulation` takes no run config);
- a message dispatcher for the Simulation Engine that is O(messages) rather
  than O(sites x messages) per poll (see `fast_dispatch`);
- the RDP accountant the message-API DP strategies accept
  (`flwr.supercore.privacy_accounting`);
- FedAdam's moments, which a resumed run must restore;
- the SuperNode's error numbers, which appear only in its log;
- the ClientApp process's bundle installer, which a site wraps to refuse a
  bundle that carries code (`run_clientapp_checking_bundles`).

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
from typing import Any

from fedpriv.common.errors import FedprivError

PINNED = "1.39."
# Both ends of the Simulation Engine poll (Flower's default is 0.1 s each way):
# a secure-aggregation round is five exchanges, so polling would dominate it.
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

    probe("flwr.simulation.run_simulation._run_simulation with app_dir and run", simulation_entry)
    probe("the Simulation Engine's in-memory link state (message_ins_store, lock)", link_state)
    probe("flwr.supercore.privacy_accounting.RdpAccountant", accountant)
    probe(f"FedAdam's moments {ADAM_MOMENTS}", adam)
    probe("Flower's SuperNode exit and API error codes", exit_codes)
    probe("the simulation grid's pull_interval", grid_poll)

    def bundle_installer() -> bool:
        from flwr.supernode.cli import flwr_clientapp  # noqa: F401
        from flwr.supernode.runtime import run_clientapp

        return callable(getattr(run_clientapp, "install_from_fab", None))

    probe("flwr.supernode.runtime.run_clientapp.install_from_fab", bundle_installer)
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
    """Lets a simulation's ServerApp see replies within POLL_SECONDS (a deployment's grid is left alone)."""
    if type(grid).__name__ == "InMemoryGrid" and hasattr(grid, "pull_interval"):
        grid.pull_interval = POLL_SECONDS


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


# --- The ClientApp process ---------------------------------------------------------


def run_clientapp_checking_bundles(check_bundle: Callable[[bytes], None]) -> None:
    """Runs Flower's `flwr-clientapp`, calling `check_bundle(fab bytes)` before it installs any app bundle.

    Flower's ClientApp process installs the submitted bundle with
    `install_from_fab` (a module global of its runtime); wrapping it is the
    one place a site can look at the bundle before its code could be loaded.
    """
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    install = runtime.install_from_fab

    def checked_install(fab_file, *args, **kwargs):
        check_bundle(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes())
        return install(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_install
    flwr_clientapp()
