"""What a worker process keeps between messages: one resident model and the sites it serves.

As in pfl-research, a simulation worker that trains a thousand sites builds
the model once. Each site's prepared data, budget, ledger and signing key are
kept too, keyed by everything that determines them (run, node, model, data
settings, seed, privacy plan), so a later run or a changed setting gets a
fresh site, never a stale one.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
from flwr.app import Context

from fedpriv.client.budget import SiteBudget
from fedpriv.client.site import DeployedSource, data_source, open_budget, site_policy
from fedpriv.client.training import DpSettings
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import DataError, LabelSet, TextDataset, load_configured, load_dataset, split_validation
from fedpriv.common.logs import CLIENT_LOG
from fedpriv.common.model.bundle import ModelBundle, Prepared, build_model
from fedpriv.common.model.canaries import GradientCanaries
from fedpriv.common.model.features import FeatureCache
from fedpriv.common.node_config import AUDIT_CANARIES, AUDIT_FAULT, DECLARED_ROWS, AuditFault, audit_fault
from fedpriv.common.partition import split_for
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.records import DistributedNoise, Mechanism, data_sha256
from fedpriv.common.privacy.site_policy import SitePolicy
from fedpriv.common.resources import resolve_path

log = logging.getLogger(CLIENT_LOG)


@dataclass(eq=False)
class SiteRuntime:
    """One site as this worker serves it, from its first message to its last."""

    name: str
    simulated: bool
    partition: int | None
    train: Prepared
    validation: Prepared
    data_id: str
    # The site's own privacy policy: its operator's (node config) when deployed.
    policy: SitePolicy
    model: ModelBundle = field(repr=False)
    config: FedprivConfig = field(repr=False)
    run_id: int = 0
    node_config: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # Public: the simulation's partition size, or what a deployed site's operator declared.
    declared_rows: int | None = None
    # None, unless the harness broke a simulated run on purpose (audit_fault.py).
    fault: AuditFault = AuditFault()

    @property
    def allows_non_private(self) -> bool:
        return self.policy.allow_non_private

    @cached_property
    def budget(self) -> SiteBudget:
        """Opened at the first train message: one ledger, its key read once."""
        return open_budget(self.node_config, self.config, self.run_id, self.name, self.simulated, self.data_id)

    def normaliser(self) -> float:
        """The public constant this site's noisy gradient sum is divided by (`PrivacyPlan.site_normaliser`)."""
        return plan_for(self.config).site_normaliser(self.public_rows())

    def public_rows(self) -> int:
        if self.declared_rows is None:
            raise DataError(
                "node config",
                f"{self.name} declares no public size: set {DECLARED_ROWS} (fedpriv agent start --declared-rows N); "
                "private updates are normalised by sample rate x this figure, never by the true row count",
            )
        return self.declared_rows

    def update_mechanism(
        self, dp: DpSettings | None, sample_rate: float, steps: int, distributed: DistributedNoise | None = None
    ) -> Mechanism:
        """What releasing a model update made with `dp` (None: no DP) does to this site's data."""
        noise = dp.noise_multiplier if dp else 0.0
        if distributed is not None:
            noise = distributed.accounted_noise_multiplier(self.config.privacy.max_grad_norm)
        return Mechanism(
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=self.config.privacy.max_grad_norm,
            dataset_size=len(self.train),
            distributed=distributed,
            normaliser=dp.normaliser if dp and distributed is None else None,
            query="update",
        )

    def training_seed(self, server_round: int) -> int:
        """Repeatable in simulation; secret at a real site.

        A deployed site's sampling and noise must be unpredictable to everyone
        else, or the aggregator could replay the noise and subtract it.
        """
        if not self.simulated:
            return secrets.randbits(63)
        digest = hashlib.sha256(f"{self.config.seed}|{self.partition}|{server_round}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1


class WorkerRuntime:
    """The state of one worker process: its resident model, the simulation's split, its sites."""

    max_sites = 4096  # prepared sites kept per worker; features are small next to the model

    def __init__(self) -> None:
        self._model_key: tuple | None = None
        self._model: ModelBundle | None = None
        self._split_key: tuple | None = None
        self._split: tuple[TextDataset, list, list[str]] | None = None
        self._sites: OrderedDict[tuple, SiteRuntime] = OrderedDict()

    def resident_model(self, config: FedprivConfig, labels: LabelSet) -> ModelBundle:
        key = (config.model.model_dump_json(), config.data.max_length, labels.names, config.simulation.audit_canaries)
        if key != self._model_key:
            # One resident model per worker; sites prepared for the old one go with it.
            self._model = self._model_key = None
            self._sites.clear()
            self._model = build_model(config, labels, cache=FeatureCache())
            self._model_key = key
        assert self._model is not None
        return self._model

    def site(self, context: Context, config: FedprivConfig) -> SiteRuntime:
        labels = LabelSet.load(config.data.labels)
        model = self.resident_model(config, labels)
        node = dict(context.node_config)
        key = (
            context.run_id,
            context.node_id,
            model.fingerprint,
            model.mode,
            labels.names,
            config.seed,
            config.data.model_dump_json(),
            config.simulation.model_dump_json(),
            config.privacy.model_dump_json(),
            config.run_dir,
            tuple(sorted((k, str(v)) for k, v in node.items())),
        )
        site = self._sites.get(key)
        if site is not None:
            self._sites.move_to_end(key)
            return site
        site = self._build_site(context.run_id, context.node_id, node, config, labels, model)
        self._sites[key] = site
        while len(self._sites) > self.max_sites:
            self._sites.popitem(last=False)
        return site

    def _build_site(
        self, run_id: int, node_id: int, node: dict, config: FedprivConfig, labels: LabelSet, model: ModelBundle
    ) -> SiteRuntime:
        data = config.data
        source = data_source(node, node_id, config)
        if isinstance(source, DeployedSource):
            dataset = load_dataset(
                source.path,
                labels,
                source.format.text_column,
                source.format.label_column,
                source.format.min_rows,
                source.format.delimiter,
                source.format.max_chars,
            )
            name, partition = source.name, None
        else:
            full, parts, names = self._partitioned(config, labels, source.partitions)
            partition = source.partition
            dataset, name = full.subset(parts[partition]), names[partition]
            if len(dataset) < data.min_rows:
                raise DataError(
                    full.source, f"simulated {name} has {len(dataset)} rows, fewer than data.min-rows={data.min_rows}"
                )
        simulated = not isinstance(source, DeployedSource)  # declared by the harness (site.is_simulated)
        train, validation = split_validation(dataset, data.validation_fraction, seed=config.seed + (partition or 0))
        log.info("%s: %d training and %d validation rows", name, len(train), len(validation))
        fault = audit_fault(node.get(AUDIT_FAULT)) if simulated else AuditFault()
        canary_site = simulated and config.simulation.audit_canaries > 0 and name == config.simulation.audit_canary_site
        if fault.at_canary_site and not canary_site:
            fault = AuditFault()
        prepared = model.prepare(train)
        texts = list(train.texts)
        if canary_site:
            prepared, canary_names = _with_canaries(prepared, node, name)
            texts += canary_names
        train_id = data_sha256(texts, prepared.labels.tolist())
        return SiteRuntime(
            name=name,
            simulated=simulated,
            partition=partition,
            train=prepared,
            validation=model.prepare(validation),
            data_id=train_id,
            policy=site_policy(node, config, simulated, name),
            model=model,
            config=config,
            run_id=run_id,
            node_config=node,
            # A simulation's split is its operator's design, public to it.
            declared_rows=len(prepared) if simulated else declared_rows(node),
            fault=fault,
        )

    def _partitioned(self, config: FedprivConfig, labels: LabelSet, sites: int):
        """The simulation's dataset and its split into sites, computed once per worker."""
        data, sim = config.data, config.simulation
        path = resolve_path(data.path)
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        key = (
            str(path),
            stamp,
            data.text_column,
            data.label_column,
            data.delimiter,
            labels.names,
            sim.model_dump_json(),
            sites,
            config.seed,
            data.min_rows,
        )
        if key != self._split_key:
            dataset = load_configured(data, labels, path)
            self._split = (dataset, *split_for(config, dataset, sites))
            self._split_key = key
        return self._split


# The one runtime of this worker process (a simulation worker, or a deployed site's ClientApp process).
WORKER = WorkerRuntime()


def declared_rows(node: Mapping[str, Any]) -> int | None:
    value = node.get(DECLARED_ROWS)
    if value is None:
        return None
    try:
        number = float(str(value))
    except ValueError:
        number = 0.0
    if number <= 0 or not number.is_integer():
        raise DataError("node config", f"{DECLARED_ROWS} must be a positive whole number, not {value!r}")
    return int(number)


def _with_canaries(prepared: Prepared, node: Mapping[str, Any], site: str) -> tuple[Prepared, list[str]]:
    """A simulated site's rows plus the white-box audit's included canaries (`common/model/canaries.py`)."""
    path = node.get(AUDIT_CANARIES)
    if not path:
        raise DataError(site, "simulation.audit-canary-site names this site but the harness gave it no canary file")
    if prepared.features is None:
        raise DataError(site, "white-box canaries need model.mode = head (they are head inputs)")
    canaries = GradientCanaries.load(str(path))
    hidden = prepared.features.shape[1]
    features, labels = canaries.rows(hidden)
    padded = torch.cat([prepared.features, prepared.features.new_zeros((len(prepared), len(canaries)))], dim=1)
    names = [f"fedpriv-canary-{j}" for j in np.flatnonzero(canaries.included)]
    return Prepared(torch.cat([prepared.labels, labels]), features=torch.cat([padded, features])), names
