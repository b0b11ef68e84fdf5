"""Collecting replies from a deployed grid: a site whose node goes offline is not waited for."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from fedpriv.server import exchange as exchange_module
from fedpriv.server.exchange import exchange


class DeployedGrid:
    """The calls `exchange` makes of Flower's deployed grid; node 2 goes offline and never answers."""

    def __init__(self) -> None:
        self.online = {1, 2}
        self.pulls = 0

    def push_messages(self, messages):
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls == 2:
            self.online.discard(2)  # killed mid-round; Flower has not yet answered for it
        if self.pulls == 1:
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m0"))]
        return []

    def get_node_ids(self):
        return set(self.online)


def test_a_message_whose_site_went_offline_is_not_waited_for(monkeypatch):
    monkeypatch.setattr(exchange_module, "CENSUS_SECONDS", 0.0)
    grid = DeployedGrid()
    # What `exchange` reads of a Flower message (a real one needs a running Flower task to be built).
    messages = [SimpleNamespace(metadata=SimpleNamespace(message_id=f"m{n - 1}", dst_node_id=n)) for n in (1, 2)]
    done = threading.Event()
    replies: list = []

    def run() -> None:
        replies.extend(exchange(grid, messages, timeout=600))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), "exchange waited for a site that went offline"
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
