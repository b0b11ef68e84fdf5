"""Handing the ServerApp's messages to the simulation workers in O(messages).

Flower 1.39's Simulation Engine moves messages from its in-memory link state
to the worker queue by asking, every 0.1 s, every virtual node in turn for
its next message; each ask re-validates every stored message. With n sites
that is n x n checks ten times a second, under the lock the workers need to
store their replies: at 100 sites it keeps a whole core busy and is most of
the simulation's overhead (bench/overhead.py).

This dispatcher looks once per poll for undelivered messages and asks only
their destination nodes, through Flower's own `get_message_ins`, so expiry
and federation checks and the delivered mark stay Flower's. It reads two
attributes of the in-memory link state (its message store and lock), which
is why flwr stays pinned to 1.39.*; if they are absent it falls back to
Flower's own loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from queue import Queue
from typing import Any

POLL_SECONDS = 0.1


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
    """Installs the dispatcher for one simulation; yields whether it could."""
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
