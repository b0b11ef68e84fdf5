"""Shared fixtures: a tiny random BERT built in code and an easy text task."""

from __future__ import annotations

import os
import tempfile

# Before anything imports Flower or Ray: no telemetry, and a private feature cache.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("FEDPRIV_CACHE_DIR", tempfile.mkdtemp(prefix="fedpriv-test-cache-"))

import json

import pytest

from tests.helpers import LABELS, easy_rows, write_csv

# xdist hands each worker whole groups in this order (--no-loadscope-reorder), the longest first, measured:
# a run that ends with one worker on a minutes-long federation while the other idles wastes a core.
LONGEST_FIRST = (
    "test_deploy.py",
    "test_secure_deploy.py",
    "test_load.py",
    "test_cluster.py",
    "test_deploy_hardening.py",
    "test_simulate.py",
    "test_completeness.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its own order


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved like a hub model."""
    from fedpriv.common.resources import tiny_model_dir as build

    return str(build())


@pytest.fixture
def easy_task(tmp_path) -> dict[str, str]:
    train = write_csv(tmp_path / "train.csv", easy_rows(300, seed=1))
    test = write_csv(tmp_path / "test.csv", easy_rows(90, seed=2))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS), encoding="utf-8")
    return {"train": str(train), "test": str(test), "labels": str(labels)}


@pytest.fixture
def tiny_config(tiny_model_dir, easy_task, tmp_path):
    from fedpriv.common.config import FedprivConfig

    return FedprivConfig().replace(
        **{
            "model.name": tiny_model_dir,
            "data.path": easy_task["train"],
            "data.test-path": easy_task["test"],
            "data.labels": easy_task["labels"],
            "data.max-length": 32,
            "run-dir": str(tmp_path / "run"),
            "rounds": 2,
            "simulation.sites": 3,
            "simulation.partitioner": "iid",
            "strategy.min-sites": 3,
            "simulation.cpus-per-site": 1,
            # No Ray start-up (seconds of imports per worker) for runs of a few rounds of a tiny model.
            "simulation.backend": "in-process",
        }
    )
