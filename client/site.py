"""A site as the ClientApp sees it: its data, the resident model, its privacy plan.

Only the *source* of the data differs between a deployment and a simulation:
a deployed site names its own file in its node config (`data-path`); a
simulated one gets a `partition-id` and cuts its share out of the run's
dataset with the same seeded partitioner every worker uses.

Everything expensive is kept per worker process (one resident model,
tokenised data per site), as pfl-research does: a simulation worker that
trains a thousand sites builds the model once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from fedpriv.client.budget import SiteBudget
from fedpriv.common import signing
from fedpriv.common.accounting import calibrate_noise, steps_per_round
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import DataError, LabelSet, TextDataset, load_dataset, split_validation
from fedpriv.common.features import FeatureCache
from fedpriv.common.ledger import Ledger
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.model import ModelBundle, Prepared, build_model
from fedpriv.common.node_config import (
    ALLOW_NON_PRIVATE,
    DATA_PATH,
    DELTA,
    EPSILON_CAP,
    LABEL_COLUMN,
    LEDGER_KEY,
    LEDGER_PATH,
    NUM_PARTITIONS,
    PARTITION_ID,
    SITE_NAME,
    TEXT_COLUMN,
)
from fedpriv.common.partition import split_for
from fedpriv.common.records import data_sha256
from fedpriv.common.resources import resolve_path

log = logging.getLogger(CLIENT_LOG)



@dataclass
class SiteData:
    name: str
    simulated: bool
    partition: int | None
    train: Prepared
    validation: Prepared
    data_id: str


_bundles: OrderedDict[tuple, ModelBundle] = OrderedDict()
_sources: OrderedDict[tuple, tuple[TextDataset, list, list[str]]] = OrderedDict()
_sites: OrderedDict[tuple, SiteData] = OrderedDict()
_MAX_SITES = 4096  # prepared sites kept per worker; features are small next to the model


def resident_model(config: FedprivConfig, labels: LabelSet) -> ModelBundle:
    key = (config.model.model_dump_json(), config.data.max_length, labels.names)
    bundle = _bundles.get(key)
    if bundle is None:
        _bundles.clear()  # one resident model per worker
        bundle = build_model(config, labels, cache=FeatureCache())
        _bundles[key] = bundle
    return bundle


def _partitioned_source(config: FedprivConfig, labels: LabelSet, sites: int):
    """The simulation's dataset and its split into sites, computed once per worker."""
    data, sim = config.data, config.simulation
    path = resolve_path(data.path)
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    key = (str(path), stamp, data.text_column, data.label_column, labels.names, sim.model_dump_json(), sites, config.seed, data.min_rows)
    if key not in _sources:
        dataset = load_dataset(path, labels, data.text_column, data.label_column, min_rows=1)
        parts, names = split_for(config, dataset, sites)
        _sources.clear()
        _sources[key] = (dataset, parts, names)
    return _sources[key]


def site_data(context: Context, config: FedprivConfig, labels: LabelSet, bundle: ModelBundle) -> SiteData:
    key = (context.run_id, context.node_id, bundle.fingerprint, bundle.mode)
    cached = _sites.get(key)
    if cached is not None:
        _sites.move_to_end(key)
        return cached
    node = context.node_config
    data = config.data
    if DATA_PATH in node:
        path = Path(str(node[DATA_PATH])).expanduser()
        text_column = str(node.get(TEXT_COLUMN, data.text_column))
        label_column = str(node.get(LABEL_COLUMN, data.label_column))
        dataset = load_dataset(path, labels, text_column, label_column, min_rows=data.min_rows)
        name = str(node.get(SITE_NAME, f"node-{context.node_id}"))
        simulated, partition = False, None
    elif PARTITION_ID in node:
        partition = int(node[PARTITION_ID])
        sites = int(node.get(NUM_PARTITIONS, config.simulation.sites))
        source, parts, names = _partitioned_source(config, labels, sites)
        dataset = source.subset(parts[partition])
        name, simulated = names[partition], True
        if len(dataset) < data.min_rows:
            raise DataError(source.source, f"simulated {name} has {len(dataset)} rows, fewer than data.min-rows={data.min_rows}")
    else:
        raise DataError("node config", f"this node names no data: set {DATA_PATH}=\"/path/to/site.csv\" in its node config")
    train, validation = split_validation(dataset, data.validation_fraction, seed=config.seed + (partition or 0))
    site = SiteData(
        name, simulated, partition, bundle.prepare(train), bundle.prepare(validation), data_sha256(train.texts, train.labels)
    )
    _sites[key] = site
    while len(_sites) > _MAX_SITES:
        _sites.popitem(last=False)
    log.info("%s: %d training and %d validation rows", name, len(train), len(validation))
    return site


def training_seed(config: FedprivConfig, site: SiteData, server_round: int) -> int:
    """Repeatable in simulation; secret at a real site.

    A deployed site's sampling and noise must be unpredictable to everyone
    else, or the aggregator could replay the noise and subtract it.
    """
    if not site.simulated:
        return secrets.randbits(63)
    digest = hashlib.sha256(f"{config.seed}|{site.partition}|{server_round}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def noise_multiplier(config: FedprivConfig) -> float:
    """The plan's noise: given, or just enough for the target epsilon after all rounds."""
    p = config.privacy
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    steps = steps_per_round(config.train.local_epochs, config.train.sample_rate) * config.rounds
    return calibrate_noise(p.target_epsilon, p.delta, config.train.sample_rate, steps, p.accountant)


def simulation_dir(config: FedprivConfig, context: Context) -> Path:
    """Where simulated sites keep ledgers and keys: the run directory, when known."""
    if config.run_dir:
        return Path(config.run_dir)
    state = Path(os.environ.get("FEDPRIV_STATE_DIR", Path.home() / ".local" / "state" / "fedpriv"))
    return state / f"flower-run-{context.run_id}"


def site_budget(context: Context, config: FedprivConfig, site: SiteData) -> SiteBudget:
    """The site's ledger and cap: from its node config when deployed, its run when simulated."""
    node = context.node_config
    if LEDGER_PATH in node:
        ledger_path = Path(str(node[LEDGER_PATH])).expanduser()
        if LEDGER_KEY not in node:
            raise signing.SigningKeyError(f"node config names {LEDGER_PATH} but no {LEDGER_KEY} to sign it with")
        key = signing.read_private_key(Path(str(node[LEDGER_KEY])).expanduser())
    else:
        base = simulation_dir(config, context)
        ledger_path = base / "ledgers" / f"{site.name}.jsonl"
        key = signing.load_or_create(base / "keys" / f"{site.name}.key")
    default_cap = config.simulation.caps().get(site.name, config.privacy.cap()) if site.simulated else config.privacy.cap()
    return SiteBudget(
        ledger=Ledger(ledger_path, key),
        data_id=site.data_id,
        cap=float(node.get(EPSILON_CAP, default_cap)),
        delta=float(node.get(DELTA, config.privacy.delta)),
        accountant=config.privacy.accountant,
    )


def allows_non_private(context: Context, site: SiteData) -> bool:
    """A real site trains without DP only if its own operator said so."""
    return site.simulated or str(context.node_config.get(ALLOW_NON_PRIVATE, "false")).lower() == "true"
