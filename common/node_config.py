"""The keys of a site's Flower node config: what its operator (or the simulation) tells the ClientApp.

The site agent writes them (`--node-config`), the simulation engine sets the
partition keys, and the ClientApp reads them. A deployed site's own values
(its cap, its delta, its ledger) win over anything a run config says, which
is why they travel here and not in the run config the aggregator sends.
"""

from dataclasses import dataclass

DATA_PATH = "data-path"
SITE_NAME = "site-name"
TEXT_COLUMN = "text-column"
LABEL_COLUMN = "label-column"
DELIMITER = "delimiter"
MIN_ROWS = "min-rows"
MAX_CHARS = "max-chars"
# (The five above are the site's table format, `site_settings.DataFormat`, under its kebab-case names.)
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
# Set by Flower's Simulation Engine for each virtual node. They do not make a
# node a simulated site: Flower's own deployment examples set them too.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
# Set only by fedpriv's simulation harness, on every virtual node it starts:
# this node is a simulated site (it cuts its data from the run's dataset, and
# the harness's operator is its operator). Never inferred.
SIMULATED = "fedpriv-simulated"
# A deliberately broken run (`fedpriv audit --empirical --fault ...`), set by
# the harness beside SIMULATED, to show that the audit catches a false claim:
# `noise/N`: every site adds its noise / N while its ledger claims the planned
# noise; `skip-clipping` / `skip-noise`: the canary site (AUDIT_CANARY_SITE)
# does not clip / adds no noise while recording both. A node that is not
# simulated ignores it.
AUDIT_FAULT = "audit-fault"
# The white-box audit's canary file; the simulated site named by
# `simulation.audit-canary-site` adds the included canaries to its rows.
AUDIT_CANARIES = "audit-canaries"
FAULTS = ("noise/N", "skip-clipping", "skip-noise")


@dataclass(frozen=True)
class AuditFault:
    noise_divisor: float = 1.0  # every site
    skip_clipping: bool = False  # the canary site
    skip_noise: bool = False  # the canary site

    @property
    def at_canary_site(self) -> bool:
        return self.skip_clipping or self.skip_noise


def audit_fault(value: object) -> AuditFault:
    """The fault an AUDIT_FAULT value asks for; no fault when empty."""
    text = str(value or "").strip()
    if not text:
        return AuditFault()
    if text == "skip-clipping":
        return AuditFault(skip_clipping=True)
    if text == "skip-noise":
        return AuditFault(skip_noise=True)
    kind, _, number = text.partition("/")
    try:
        divisor = float(number)
    except ValueError:
        divisor = 0.0
    if kind != "noise" or not divisor >= 1.0:
        raise ValueError(
            f"{AUDIT_FAULT}={text!r}: expected noise/N with N >= 1 (e.g. noise/10), skip-clipping or skip-noise"
        )
    return AuditFault(noise_divisor=divisor)
