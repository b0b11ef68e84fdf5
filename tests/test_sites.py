"""Where a site's data comes from: its own file when deployed, a partition when simulated."""

import csv

import pytest
from flwr.app import Context, RecordDict

from fedpriv.client.runtime import WorkerRuntime
from fedpriv.common.data import DataError, LabelSet
from fedpriv.simulation.harness import plan_sites
from tests.helpers import LABELS, easy_rows, write_csv

LABEL_SET = LabelSet(tuple(LABELS))


def context(node_config, node_id=7) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture
def departments(tmp_path):
    path = tmp_path / "tickets.csv"
    rows = easy_rows(60)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category", "department"])
        for i, (text, label) in enumerate(rows):
            writer.writerow([text, label, ["north", "south", "east"][i % 3] if i < 45 else "south"])
    return path


def test_column_partition_makes_one_site_per_value(tiny_config, departments):
    config = tiny_config.replace(
        **{
            "data.path": str(departments),
            "simulation.partitioner": "column",
            "simulation.column": "department",
            "data.min-rows": 5,
        }
    )
    planned, _, names = plan_sites(config, LABEL_SET)
    assert planned.simulation.sites == 3 and names == ["east", "north", "south"]
    worker = WorkerRuntime()
    sizes = {}
    for partition, name in enumerate(names):
        site = worker.site(context({"partition-id": partition, "num-partitions": 3}, node_id=partition), planned)
        assert site.name == name and site.simulated
        sizes[name] = len(site.train) + len(site.validation)
    assert sizes == {"east": 15, "north": 15, "south": 30}


def test_deployed_site_reads_its_own_file_and_columns(tiny_config, tmp_path):
    path = write_csv(tmp_path / "mine.csv", easy_rows(30), header=("body", "queue"))
    node = {"data-path": str(path), "site-name": "branch-7", "text-column": "body", "label-column": "queue"}
    site = WorkerRuntime().site(context(node), tiny_config)
    assert site.name == "branch-7" and not site.simulated
    assert len(site.train) == 27 and len(site.validation) == 3


def test_node_without_data_is_a_named_error(tiny_config):
    with pytest.raises(DataError, match='set data-path="/path/to/site.csv"'):
        WorkerRuntime().site(context({}, node_id=99), tiny_config)


def test_site_without_validation_part(tiny_config, tmp_path):
    path = write_csv(tmp_path / "mine.csv", easy_rows(12))
    config = tiny_config.replace(**{"data.validation-fraction": 0.0})
    worker = WorkerRuntime()
    for mode in ("head", "lora"):
        site = worker.site(context({"data-path": str(path)}), config.replace(**{"model.mode": mode}))
        assert site.model.mode == mode
        assert len(site.train) == 12 and len(site.validation) == 0
        assert site.model.evaluate(site.validation)["num-examples"] == 0
