"""Logger names of the roles.

They live under Flower's own logger on purpose: inside the apps, Flower's
handlers are what reaches the operator (`flwr run --stream`, `flwr log`, the
SuperNode's console), and `fedpriv simulate` quietens both with one setting.
"""

SERVER_LOG = "flwr.fedpriv.server"
CLIENT_LOG = "flwr.fedpriv.client"
DATA_LOG = "flwr.fedpriv.data"
