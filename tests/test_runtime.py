"""A worker's site runtime: built once per site, fresh when a setting changes, its ledger not re-read."""

import time

import pytest
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedpriv.client import app as client_app
from fedpriv.client.runtime import WorkerRuntime
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.wire.protocol import to_record

SIMULATED = {"partition-id": 1, "num-partitions": 3, "fedpriv-simulated": True}


def context(config, node_config=SIMULATED, run_id=1, node_id=7) -> Context:
    return Context(
        run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=config.to_run_config()
    )


def train_message(state, server_round: int) -> Message:
    """A train instruction as the aggregator's grid delivers it (metadata given: no grid here)."""
    content = RecordDict({"arrays": to_record(state), "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(
        run_id=1,
        message_id=f"m{server_round}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


@pytest.fixture
def private_config(tiny_config):
    return tiny_config.replace(
        **{
            "privacy.noise-multiplier": 2.0,
            "privacy.accountant": "rdp",
            "train.local-epochs": 1.0,
            "train.sample-rate": 0.5,
        }
    )


@pytest.fixture
def ledger_reads(monkeypatch):
    reads = []
    entries = Ledger.entries

    def counted(self):
        reads.append(self.path)
        return entries(self)

    monkeypatch.setattr(Ledger, "entries", counted)
    return reads


def test_same_run_and_node_is_one_site_and_its_ledger_is_read_once(private_config, monkeypatch, ledger_reads):
    worker = WorkerRuntime()
    monkeypatch.setattr(client_app, "WORKER", worker)
    ctx = context(private_config)
    site = worker.site(ctx, private_config)
    assert worker.site(context(private_config), private_config) is site  # a new Context, the same site
    state = site.model.get_state()

    spent = []
    for server_round in (1, 2, 3):
        before = len(ledger_reads)
        reply = client_app.train(train_message(state, server_round), ctx)
        assert reply.content["site"]["status"] == "ok"
        spent.append(reply.content["metrics"]["epsilon"])
        assert len(ledger_reads) - before <= 1  # at most one full read per train message
    assert len(ledger_reads) == 1  # in fact only the first message read it
    assert worker.site(ctx, private_config) is site and site.budget is site.budget
    assert spent == sorted(spent) and spent[0] > 0
    # The cached view agrees with the file.
    assert len(site.budget.ledger.records()) == 3
    assert site.budget.spent() == pytest.approx(spent[-1])


def test_changed_data_setting_gives_a_fresh_site(private_config):
    worker = WorkerRuntime()
    site = worker.site(context(private_config), private_config)
    changed = private_config.replace(**{"data.validation-fraction": 0.5})
    fresh = worker.site(context(changed), changed)
    assert fresh is not site
    assert len(fresh.validation) > len(site.validation)
    assert len(fresh.train) + len(fresh.validation) == len(site.train) + len(site.validation)
    assert fresh.data_id != site.data_id
    assert worker.site(context(changed), changed) is fresh  # the same settings again: still kept
    reseeded = private_config.replace(**{"seed": private_config.seed + 1})
    other = worker.site(context(reseeded), reseeded)
    assert other is not site and other.data_id != site.data_id
    shorter = private_config.replace(**{"data.max-length": 8})
    assert worker.site(context(shorter), shorter) is not site


def test_simulated_or_deployed_is_decided_once(private_config, tmp_path):
    worker = WorkerRuntime()
    simulated = worker.site(context(private_config), private_config)
    assert simulated.simulated and simulated.allows_non_private
    assert simulated.training_seed(3) == simulated.training_seed(3)  # repeatable in simulation
    data = tmp_path / "mine.csv"
    data.write_text("text,category\n" + "".join(f"my card {i},card\n" for i in range(30)), encoding="utf-8")
    deployed = worker.site(context(private_config, {"data-path": str(data)}, node_id=8), private_config)
    assert not deployed.simulated and not deployed.allows_non_private
    assert deployed.training_seed(3) != deployed.training_seed(3)  # secret at a real site
    assert deployed.name == "node-8"


def test_a_deployed_site_is_normalised_and_weighed_by_its_declared_size_never_its_row_count(tiny_config, tmp_path):
    from fedpriv.common.data import DataError
    from tests.helpers import easy_rows, write_csv

    worker = WorkerRuntime()
    normalisers = []
    for rows in (60, 61):  # neighbouring datasets under add/remove
        data = write_csv(tmp_path / f"site-{rows}.csv", easy_rows(rows, seed=3))
        node = {"data-path": str(data), "site-name": "north", "declared-rows": 1000}
        site = worker.site(context(tiny_config, node), tiny_config)
        normalisers.append((site.normaliser(), site.public_rows()))
    assert normalisers == [(500.0, 1000), (500.0, 1000)]  # sample rate 0.5 x declared rows

    undeclared = worker.site(context(tiny_config, {"data-path": str(data), "site-name": "north"}), tiny_config)
    with pytest.raises(DataError, match="declared-rows"):
        undeclared.normaliser()
    with pytest.raises(DataError, match="declared-rows must be a positive whole number"):
        worker.site(context(tiny_config, {"data-path": str(data), "declared-rows": "many"}), tiny_config)
