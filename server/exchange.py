"""Send messages to sites and collect their replies, polling the SuperLink often while replies are due.

Flower 1.39's deployed grid (`send_and_receive`) pulls replies every 3 s:
a secure round is several exchanges, so that sleep alone would be most of a
deployed round. This uses the grid's public push/pull calls and backs off
from `FIRST_POLL` to `LAST_POLL` while it waits, so a quick reply is seen
within tens of milliseconds and a long local training costs five pulls a
second of the SuperLink beside it. The simulation's in-memory grid is
polled every `flower_compat.POLL_SECONDS`.

Once a second it also asks which sites are online: a site killed mid-round
that comes back took the message in its earlier session and will never
answer it. Flower answers for an offline site itself, but with its state in
memory only when something asks about every node (the SQLite state does that
on its own), and without the census the round waited for its timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedpriv.common.flower_compat import POLL_SECONDS

FIRST_POLL = 0.02
LAST_POLL = 0.2
CENSUS_SECONDS = 1.0


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """Pushes `messages`; returns the replies that came before `timeout` seconds (None: wait for all)."""
    messages = list(messages)
    waiting = set(grid.push_messages(messages))
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    in_memory = type(grid).__name__ == "InMemoryGrid"
    first, last = (POLL_SECONDS, POLL_SECONDS) if in_memory else (FIRST_POLL, LAST_POLL)
    pause = first
    next_census = time.monotonic() + CENSUS_SECONDS
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(reply.metadata.reply_to_message_id for reply in got)
        if not waiting:
            break
        if not in_memory and time.monotonic() >= next_census:
            # A site whose node went offline will not answer a message its earlier session took.
            online = set(grid.get_node_ids())
            waiting = {m for m in waiting if destination.get(m, -1) in online}
            next_census = time.monotonic() + CENSUS_SECONDS
            if not waiting:
                break
        if got:
            pause = first  # the others are likely close behind
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        time.sleep(pause if deadline is None else min(pause, deadline - now))
        pause = min(pause * 1.5, last)
    return replies
