"""The aggregator's own copy of the model: initial state, central evaluation, export."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, load_configured
from fedpriv.common.logs import SERVER_LOG
from fedpriv.common.model.bundle import ModelBundle, Prepared, build_model, initial_state
from fedpriv.common.model.features import FeatureCache

log = logging.getLogger(SERVER_LOG)


class GlobalModel:
    def __init__(self, config: FedprivConfig, labels: LabelSet):
        self.config = config
        self.labels = labels
        self.bundle: ModelBundle = build_model(config, labels, cache=FeatureCache())
        self.test: Prepared | None = None
        if config.data.test_path:
            data = load_configured(config.data, labels, config.data.test_path)
            self.test = self.bundle.prepare(data)
            log.info("central test set: %d rows from %s", len(data), data.source)

    def training_rows(self) -> int:
        """Rows the sites train on, counted from the simulation's dataset (public there; a deployment sets
        privacy.distributed-batch instead, since its sites' sizes are theirs)."""
        data = self.config.data
        rows = len(load_configured(data, self.labels))
        return round(rows * (1 - data.validation_fraction))

    def initial_state(self) -> dict[str, np.ndarray]:
        return initial_state(self.bundle, self.labels, self.config.model.head_init)

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float] | None:
        if self.test is None:
            return None
        self.bundle.set_state(state)
        return self.bundle.evaluate(self.test)

    def export(self, state: dict[str, np.ndarray], directory: Path) -> Path:
        self.bundle.set_state(state)
        return self.bundle.export(directory)
