"""Where a site's data comes from: its own file when deployed, a partition when simulated."""

import csv

import pytest
from flwr.app import Context, RecordDict

from fedpriv.client.runtime import WorkerRuntime
from fedpriv.common.config import ConfigError
from fedpriv.common.data import DataError, LabelSet
from fedpriv.common.node_config import SIMULATED
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
        site = worker.site(
            context({"partition-id": partition, "num-partitions": 3, SIMULATED: True}, node_id=partition), planned
        )
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


def test_column_values_are_data_not_paths(tiny_config, tmp_path):
    """A value such as ../../x or 'federation' once wrote keys and ledgers outside the run or over the aggregator's."""
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.simulation.harness import provision_simulated_keys

    values = ["../../../escaped-site", "Customer Support", "x;touch y"]
    rows = [(text, label, values[i % 3]) for i, (text, label) in enumerate(easy_rows(36))]
    path = write_csv(tmp_path / "tickets.csv", rows, header=("text", "category", "department"))
    config = tiny_config.replace(
        **{"data.path": str(path), "simulation.partitioner": "column", "simulation.column": "department"}
    )
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    planned, _, names = plan_sites(config, LABEL_SET)
    assert names == ["escaped-site", "customer-support", "x-touch-y"]
    run = RunDirectory.create(planned.run_dir)
    provision_simulated_keys(run, names)
    worker = WorkerRuntime()
    for partition, name in enumerate(names):
        site = worker.site(
            context({"partition-id": partition, "num-partitions": 3, SIMULATED: True}, node_id=partition), planned
        )
        assert site.name == name
        assert site.budget.ledger.path == run.path / "ledgers" / f"{name}.jsonl"
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file() and p not in before}
    assert {"run/keys/escaped-site.key", "run/keys/x-touch-y.key", "run/keys/aggregator.key"} <= written
    assert all(p.startswith("run/") for p in written), written


@pytest.mark.parametrize(
    ("values", "refused"),
    [
        (["federation", "north"], "value 'federation' cannot name a site"),  # the aggregator's ledger
        (["Aggregator", "north"], "value 'Aggregator' cannot name a site"),  # the aggregator's key
        (["!!!", "north"], "value '!!!' cannot name a site"),
        (["North", "north"], "values 'North' and 'north' would both be site 'north'"),
    ],
)
def test_column_values_that_cannot_be_site_names_are_refused_naming_file_and_column(
    tiny_config, tmp_path, values, refused
):
    from fedpriv.common.partition import PartitionError

    rows = [(text, label, values[i % 2]) for i, (text, label) in enumerate(easy_rows(20))]
    path = write_csv(tmp_path / "tickets.csv", rows, header=("text", "category", "department"))
    changes = {"simulation.partitioner": "column", "simulation.column": "department", "strategy.min-sites": 2}
    config = tiny_config.replace(**{"data.path": str(path), **changes})
    with pytest.raises(PartitionError, match="tickets.csv, column 'department'") as caught:
        plan_sites(config, LABEL_SET)
    assert refused in str(caught.value)


def test_every_path_made_from_a_site_name_follows_one_rule(tiny_config, tmp_path):
    from fedpriv.client.progress import ProgressWriter
    from fedpriv.client.site import open_budget
    from fedpriv.common import site_names
    from fedpriv.deploy.kit import KitError, check_site_name

    for bad in ("../x", "federation", "aggregator", "a/b", "", "-a", "A", "x" * 64):
        with pytest.raises(site_names.SiteNameError):
            site_names.check(bad)
        with pytest.raises(site_names.SiteNameError):
            ProgressWriter(tmp_path, bad, 1, 3)
        with pytest.raises(site_names.SiteNameError):
            open_budget({}, tiny_config, 1, bad, True, "data")
        with pytest.raises(KitError, match="use lower-case letters"):  # what provisioning of [[sites]] name uses
            check_site_name(bad)
    assert site_names.check("site-001") == "site-001"
    assert not (tmp_path / "progress").exists()  # refused before any folder is made


def test_a_test_file_that_does_not_fit_is_named_before_anything_is_built(tiny_config, tmp_path):
    # Found only at the first central evaluation, after every training row was embedded.
    other = write_csv(tmp_path / "other-test.csv", easy_rows(9), header=("body", "category"))
    with pytest.raises(DataError, match=r"other-test\.csv, column 'text': missing column"):
        plan_sites(tiny_config.replace(**{"data.test-path": str(other)}), LABEL_SET)
    unknown = write_csv(tmp_path / "unknown-test.csv", [*easy_rows(3), ("a loan", "loans")])
    with pytest.raises(DataError, match=r"unknown-test\.csv, column 'category', row 4: unknown label 'loans'"):
        plan_sites(tiny_config.replace(**{"data.test-path": str(unknown)}), LABEL_SET)


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"simulation.sites": 2, "strategy.min-sites": 3}, "set strategy.min-sites to at most 2"),
        ({"simulation.sites": 2, "strategy.min-sites": 3, "privacy.secure-aggregation": True}, "at most 2"),
    ],
)
def test_fewer_simulated_sites_than_a_round_waits_for_are_refused(tiny_config, changes, refused):
    with pytest.raises(ConfigError, match=r"simulation\.sites: .* strategy\.min-sites") as caught:
        plan_sites(tiny_config.replace(**changes), LABEL_SET)
    assert refused in str(caught.value)


def test_one_column_value_under_secure_aggregation_is_refused(tiny_config, tmp_path):
    # Secure aggregation with one site waited forever for a second; with a column, the data decides the count.
    rows = [(text, label, "north") for text, label in easy_rows(20)]
    path = write_csv(tmp_path / "tickets.csv", rows, header=("text", "category", "department"))
    changes = {"simulation.partitioner": "column", "simulation.column": "department", "strategy.min-sites": 2}
    config = tiny_config.replace(**{"data.path": str(path), "privacy.secure-aggregation": True, **changes})
    with pytest.raises(ConfigError, match=r"simulation\.sites: secure aggregation needs at least 2 sites"):
        plan_sites(config, LABEL_SET)


def test_a_simulation_whose_sites_all_failed_is_an_error_not_a_finished_run(tmp_path):
    from fedpriv.common.run_events import AllSitesRefused, RoundEnd, SiteError, SiteRefused, TrainAggregate
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.simulation.harness import NobodyTrainedError, check_someone_trained

    failed = RunDirectory(tmp_path / "failed")
    failed.path.mkdir()
    for rnd in (1, 2):
        for site in ("site-000", "site-001"):
            failed.log(SiteError(round=rnd, site=site, reason="RuntimeError: the run's keeper is gone"))
        failed.log(TrainAggregate(round=rnd, sites=0))
        failed.log(RoundEnd(round=rnd, seconds=0.1))
    with pytest.raises(NobodyTrainedError, match=r"4 errors; the first, round 1, site-000: RuntimeError: the run"):
        check_someone_trained(failed)

    # One round with an update is a run that trained; refusals end a run by themselves, with their reasons.
    failed.log(TrainAggregate(round=3, sites=1))
    check_someone_trained(failed)
    refused = RunDirectory(tmp_path / "refused")
    refused.path.mkdir()
    refused.log(SiteRefused(round=1, site="site-000", reason="below its minimum", phase="train"))
    refused.log(AllSitesRefused(round=1, sites=1, exhausted=0))
    check_someone_trained(refused)


@pytest.mark.parametrize(
    ("setting", "value", "refused"),
    [
        ("site-caps", "site-007=2", "simulation.site-caps: no simulated site is called site-007"),
        (
            "site-policies",
            "site-001: modes=head; site-009: modes=lora",
            "site-policies: no simulated site is called site-009",
        ),
    ],
)
def test_per_site_settings_must_name_simulated_sites(tiny_config, setting, value, refused):
    with pytest.raises(ConfigError, match=refused):
        plan_sites(tiny_config.replace(**{f"simulation.{setting}": value}), LABEL_SET)


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("site-001 modes=head", "'site-001 modes=head' is not 'SITE: key=value ...'"),
        ("site-001: colluders=2", "site-001: 'colluders=2' is not key=value with a policy key (allow-non-private,"),
        ("site-001: max-release-epsilon=0", "site-001: max-release-epsilon: Input should be greater than 0"),
        ("site-001: modes=head,adapters", "site-001: modes"),
        ("site-001: allow-non-private=perhaps", "site-001: allow-non-private: expected true or false"),
    ],
)
def test_a_simulated_sites_policy_is_read_as_a_real_sites_and_bad_keys_are_named(tiny_config, value, refused):
    with pytest.raises(ConfigError, match=r"simulation\.site-policies") as caught:
        tiny_config.replace(**{"simulation.site-policies": value})
    assert refused in str(caught.value)


def test_a_simulated_site_named_in_site_policies_keeps_a_real_sites_policy(tiny_config):
    from fedpriv.client.site import site_policy
    from fedpriv.common.privacy.site_policy import SitePolicy

    config = tiny_config.replace(**{"simulation.site-policies": "site-001: min-colluding-sites=2 modes=head"})
    strict = site_policy({}, config, simulated=True, name="site-001")
    assert strict.min_colluding_sites == 2 and strict.modes == ("head",)
    assert strict.max_release_epsilon == SitePolicy().max_release_epsilon  # unnamed keys: a real site's defaults
    assert not strict.allow_non_private
    relaxed = site_policy({}, config, simulated=True, name="site-002")
    assert relaxed == SitePolicy.simulated(config.privacy.max_colluding_sites)
