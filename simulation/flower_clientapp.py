"""The ClientApp of Flower's own simulation (`flwr run` of the fedpriv app): a site's, declared simulated.

`fedpriv simulate` declares its virtual nodes simulated in their node config
(`engine.py`). Flower's `flwr run` starts virtual nodes of its own, which
carry only Flower's partition keys, so this ClientApp declares them simulated
before the site's handlers run. A deployed site never runs it: its resident
worker runs `fedpriv.client.app:app` only and refuses a bundle that names any
other ClientApp (`deploy/clientapp_guard.py`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpriv.client.app import register
from fedpriv.common.node_config import SIMULATED


def _declared_simulated(msg: Message, context: Context, call_next) -> Message:
    context.node_config = {**context.node_config, SIMULATED: True}
    return call_next(msg, context)


app = register(ClientApp(mods=[_declared_simulated]))
