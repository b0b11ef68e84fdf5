"""A site as the ClientApp sees it: where its data, ledger and cap come from.

Only the *source* of the data differs between a deployment and a simulation:
a deployed site names its own file in its node config (`data-path`); a
simulated one is declared so by the harness (`fedpriv-simulated`), gets a
`partition-id` and cuts its share out of the run's dataset with the same
seeded partitioner every worker uses. Which of the two a node is, is decided
once, here, from what its node config declares, never guessed from which keys
are missing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.client.budget import SiteBudget
from fedpriv.client.training import LocalPlan
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import DataError
from fedpriv.common.node_config import (
    DATA_PATH,
    DELTA,
    EPSILON_CAP,
    LEDGER_KEY,
    LEDGER_PATH,
    NUM_PARTITIONS,
    PARTITION_ID,
    SIMULATED,
    SITE_NAME,
)
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.records import Mechanism
from fedpriv.common.privacy.site_policy import SitePolicy
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.site_settings import DataFormat


@dataclass(frozen=True)
class DeployedSource:
    """A real site: its own file, named in its node config."""

    path: Path
    name: str
    format: DataFormat  # its operator's (node config); a key it lacks falls back to the run's settings


@dataclass(frozen=True)
class SimulatedSource:
    """A virtual site: one partition of the run's dataset."""

    partition: int
    partitions: int


def data_source(node: Mapping[str, Any], node_id: int, config: FedprivConfig) -> DeployedSource | SimulatedSource:
    data = config.data
    if DATA_PATH in node:
        return DeployedSource(
            path=Path(str(node[DATA_PATH])).expanduser(),
            name=str(node.get(SITE_NAME, f"node-{node_id}")),
            format=DataFormat.from_settings(node, fallback=data),
        )
    if is_simulated(node):
        if PARTITION_ID not in node:
            raise DataError("node config", f"{SIMULATED} is set but {PARTITION_ID} is not: which share is this site's?")
        return SimulatedSource(int(node[PARTITION_ID]), int(node.get(NUM_PARTITIONS, config.simulation.sites)))
    why = f" ({PARTITION_ID} alone does not make a node a simulated site)" if PARTITION_ID in node else ""
    raise DataError(
        "node config", f'this node names no data: set {DATA_PATH}="/path/to/site.csv" in its node config{why}'
    )


def is_simulated(node: Mapping[str, Any]) -> bool:
    """Declared by the simulation harness, on the virtual nodes it starts (see `node_config.SIMULATED`)."""
    return node.get(SIMULATED) is True


def local_plan(config: FedprivConfig, proximal_mu: float = 0.0) -> LocalPlan:
    """The local training a round's settings ask for (its steps, rate and learning rate: the privacy plan's)."""
    plan = plan_for(config)
    return LocalPlan(
        steps=plan.local_steps,
        sample_rate=plan.sample_rate,
        optimizer=plan.optimizer,
        learning_rate=plan.learning_rate,
        momentum=config.train.momentum,
        weight_decay=config.train.weight_decay,
        max_physical_batch=config.train.max_physical_batch,
        proximal_mu=proximal_mu,
    )


def clear_evaluation_mechanism(rows: int) -> Mechanism:
    """Evaluation metrics sent without noise: a release with no DP at all (infinite epsilon)."""
    return Mechanism(
        kind="gaussian",
        noise_multiplier=0.0,
        sample_rate=1.0,
        steps=1,
        max_grad_norm=math.sqrt(2),
        dataset_size=rows,
        query="evaluation",
    )


def simulation_dir(config: FedprivConfig, run_id: int) -> RunDirectory:
    """Where simulated sites keep ledgers and keys: the run directory, when known."""
    if config.run_dir:
        return RunDirectory(config.run_dir)
    state = Path(os.environ.get("FEDPRIV_STATE_DIR", Path.home() / ".local" / "state" / "fedpriv"))
    return RunDirectory(state / f"flower-run-{run_id}")


def open_budget(
    node: Mapping[str, Any], config: FedprivConfig, run_id: int, name: str, simulated: bool, data_id: str
) -> SiteBudget:
    """The site's ledger and cap: from its node config when deployed, its run when simulated."""
    if LEDGER_PATH in node:
        ledger_path = Path(str(node[LEDGER_PATH])).expanduser()
        if LEDGER_KEY not in node:
            raise signing.SigningKeyError(f"node config names {LEDGER_PATH} but no {LEDGER_KEY} to sign it with")
        key = signing.read_private_key(Path(str(node[LEDGER_KEY])).expanduser())
    else:
        run = simulation_dir(config, run_id)
        ledger_path = run.ledger_path(name)  # both check the name: it becomes paths under the run directory
        key = signing.load_or_create(run.key_path(name))
    if simulated:
        cap = config.simulation.caps().get(name, config.privacy.cap())
        delta = config.privacy.delta
    else:
        # A real site's cap and delta are its operator's: the run's settings come from the aggregator.
        missing = [k for k in (EPSILON_CAP, DELTA) if k not in node]
        if missing:
            raise DataError(
                "node config",
                f"{name}: set {' and '.join(missing)} in its node config (fedpriv agent start does): a deployed "
                "site never takes its cap or delta from the aggregator's run settings",
            )
        cap, delta = node[EPSILON_CAP], node[DELTA]
    return SiteBudget(
        ledger=Ledger(ledger_path, key),
        data_id=data_id,
        cap=_positive(cap, EPSILON_CAP),
        delta=_positive(delta, DELTA),
        accountant=config.privacy.accountant,
    )


def _positive(value: Any, key: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise DataError("node config", f"{key} must be a positive finite number, not {value!r}")
    return number


def site_policy(node: Mapping[str, Any], config: FedprivConfig, simulated: bool, name: str) -> SitePolicy:
    """A real site's policy is its operator's alone (node config); a simulated site's operator is the harness's,
    which can give a site a real site's policy (simulation.site-policies) to see what it would refuse."""
    if simulated:
        return config.simulation.policies().get(name) or SitePolicy.simulated(config.privacy.max_colluding_sites)
    return SitePolicy.from_node_config(node)
