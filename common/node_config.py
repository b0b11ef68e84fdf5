"""The keys of a site's Flower node config: what its operator (or the simulation) tells the ClientApp.

The site agent writes them (`--node-config`), the simulation engine sets the
partition keys, and the ClientApp reads them. A deployed site's own values
(its cap, its delta, its ledger) win over anything a run config says, which
is why they travel here and not in the run config the aggregator sends.
"""

DATA_PATH = "data-path"
SITE_NAME = "site-name"
TEXT_COLUMN = "text-column"
LABEL_COLUMN = "label-column"
DELIMITER = "delimiter"
LEDGER_PATH = "ledger-path"
LEDGER_KEY = "ledger-key"
EPSILON_CAP = "epsilon-cap"
DELTA = "delta"
ALLOW_NON_PRIVATE = "allow-non-private"
# The site's public size: DP updates are divided by sample rate x this, and it
# weighs the site in FedAvg; the true row count never leaves the site.
DECLARED_ROWS = "declared-rows"
# The federation's identity public keys (JSON: site -> Ed25519 key), pinned for secure aggregation.
PEER_KEYS = "peer-keys"
# Set by Flower's Simulation Engine for each virtual node.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
