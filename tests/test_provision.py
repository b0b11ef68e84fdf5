"""`fedpriv provision` and the checks the aggregator and agent make before anything connects."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedpriv.common import files
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.site_policy import SitePolicy
from fedpriv.deploy import pki
from tests.helpers import LABELS, easy_rows, fedpriv_here, write_csv
from tests.local_federation import free_ports

ROOT = Path(__file__).resolve().parents[1]

FEDERATION = """
name = "test-fed"

[aggregator]
address = "agg.example.org:{port}"
hosts = ["10.1.2.3", "fed.example.org", "AGG.example.org"]
control-listen = "127.0.0.1:{control}"

[data]
labels = {labels}

[site-defaults]
epsilon-cap = 6.0
delta = 1e-6

[run]
rounds = 3

[[sites]]
name = "north"

[[sites]]
name = "south"
epsilon-cap = 2.5
declared-rows = 400
"""


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def federation_file(tmp_path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(FEDERATION.format(port=9092, control=free_port(), labels=json.dumps(LABELS)), encoding="utf-8")
    return path


@pytest.fixture
def kits(federation_file) -> Path:
    result = fedpriv_here("provision", "-f", federation_file)
    assert result.returncode == 0, result.stdout + result.stderr
    return federation_file.parent / "kits"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_private_keys_are_owner_only_and_kits_are_flat(kits):
    secrets = [
        kits / "ca" / "ca.key",
        kits / "aggregator" / "tls.key",
        kits / "aggregator" / "ledger.key",
        *[kits / "sites" / s / n for s in ("north", "south") for n in ("node.key", "ledger.key")],
    ]
    for path in secrets:
        assert _mode(path) == 0o600, path
    # The CA key never travels in a kit; kits are flat so each can become one Kubernetes Secret.
    for kit in [kits / "aggregator", kits / "sites" / "north", kits / "sites" / "south"]:
        assert all(p.is_file() for p in kit.iterdir())
        assert not (kit / "ca.key").exists()
    assert sorted(p.name for p in (kits / "aggregator").iterdir()) == [
        "ca.crt",
        "kit.toml",
        "ledger.key",
        "node-keys.json",
        "public-keys.json",
        "tls.crt",
        "tls.key",
    ]
    assert sorted(p.name for p in (kits / "sites" / "north").iterdir()) == [
        "ca.crt",
        "kit.toml",
        "ledger.key",
        "node.key",
        "node.pub",
        "public-keys.json",
    ]


def test_tls_certificate_names_every_host_and_is_signed_by_the_federation_ca(kits):
    ca = pki.load_cert(kits / "ca" / "ca.crt")
    cert = pki.load_cert(kits / "aggregator" / "tls.crt")
    dns, ips = pki.cert_hosts(cert)
    assert sorted(dns) == ["agg.example.org", "fed.example.org", "localhost"]
    assert sorted(ips) == ["10.1.2.3", "127.0.0.1"]
    assert pki.signed_by(cert, ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # The kits carry the same CA certificate the TLS certificate chains to.
    for kit in ("aggregator", "sites/north", "sites/south"):
        assert (kits / kit / "ca.crt").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
    key = pki.load_key(kits / "aggregator" / "tls.key")
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_node_keys_are_p384_in_openssh_format_and_listed_for_registration(kits):
    node_keys = json.loads((kits / "aggregator" / "node-keys.json").read_text())
    assert sorted(node_keys) == ["north", "south"]
    for site in ("north", "south"):
        kit = kits / "sites" / site
        public_text = (kit / "node.pub").read_text().strip()
        assert public_text.startswith("ecdsa-sha2-nistp384 ")
        assert node_keys[site] == public_text
        private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = pki.node_public_key(public_text)
        assert public.public_numbers() == private.public_key().public_numbers()
        # What `flwr supernode register` accepts (Flower's own check).
        from flwr.cli.supernode.register import try_load_public_key

        assert try_load_public_key(kit / "node.pub")


def test_public_keys_json_is_what_the_auditor_pins(kits):
    keys = json.loads((kits / "aggregator" / "public-keys.json").read_text())
    assert sorted(keys) == ["aggregator", "north", "south"]
    assert keys["aggregator"] == signing.public_b64(signing.read_private_key(kits / "aggregator" / "ledger.key"))
    for site in ("north", "south"):
        assert keys[site] == signing.public_b64(signing.read_private_key(kits / "sites" / site / "ledger.key"))


def test_kit_configs_name_the_aggregator_site_budget_and_labels(kits, federation_file):
    from fedpriv.deploy.kit import load_aggregator_kit, load_site_kit

    north, south = load_site_kit(kits / "sites" / "north"), load_site_kit(kits / "sites" / "south")
    assert north.site == "north" and north.superlink == "agg.example.org:9092"
    assert (north.epsilon_cap, north.delta) == (6.0, 1e-6)
    assert south.epsilon_cap == 2.5  # its own cap wins over the federation's default
    assert json.loads(north.data.labels) == LABELS
    aggregator = load_aggregator_kit(kits / "aggregator")
    assert aggregator.aggregator.fleet_listen == "0.0.0.0:9092"
    assert aggregator.run["rounds"] == 3 and json.loads(aggregator.run["data"]["labels"]) == LABELS
    assert aggregator.run["data"]["test-path"] == ""  # no built-in test set for a federation's own labels


def test_running_again_never_replaces_a_secret(kits, federation_file):
    before = _snapshot(kits)
    again = fedpriv_here("provision", "-f", federation_file)
    assert again.returncode == 0, again.stderr
    assert "kept" in again.stdout and "created" not in again.stdout
    assert _snapshot(kits) == before
    with pytest.raises(files.SecretExistsError, match="refusing to overwrite"):
        files.write_secret(kits / "sites" / "north" / "node.key", b"x")
    assert (kits / "sites" / "north" / "node.key").read_bytes() == before["sites/north/node.key"]


def test_a_key_that_changed_behind_provisionings_back_is_refused(kits, federation_file):
    ledger_key = kits / "sites" / "north" / "ledger.key"
    ledger_key.unlink()
    signing.write_private_key(signing.generate(), ledger_key)
    result = fedpriv_here("provision", "-f", federation_file)
    assert result.returncode == 2
    assert "north: its ledger key" in result.stderr and "must not change silently" in result.stderr


def test_add_site_is_one_command_and_leaves_the_others_alone(kits, federation_file):
    before = _snapshot(kits)
    result = fedpriv_here("provision", "add-site", "east", "-f", federation_file, "--epsilon-cap", "3")
    assert result.returncode == 0, result.stderr
    after = _snapshot(kits)

    def unchanged(snapshot):  # every kit's roster of peers' keys gains the new site; nothing else changes
        return {k: v for k, v in snapshot.items() if not k.startswith("aggregator/") and "public-keys" not in k}

    assert {k: v for k, v in unchanged(after).items() if k in before} == unchanged(before)
    assert sorted(json.loads(after["sites/north/public-keys.json"])) == ["aggregator", "east", "north", "south"]
    for name in ("tls.key", "tls.crt", "ledger.key"):
        assert after[f"aggregator/{name}"] == before[f"aggregator/{name}"]
    assert sorted(json.loads(after["aggregator/public-keys.json"])) == ["aggregator", "east", "north", "south"]
    assert "east" in json.loads(after["aggregator/node-keys.json"])
    assert _mode(kits / "sites" / "east" / "node.key") == 0o600
    assert 'name = "east"' in federation_file.read_text() and "# " not in federation_file.read_text().split("east")[-1]
    twice = fedpriv_here("provision", "add-site", "east", "-f", federation_file)
    assert twice.returncode == 2 and "already in" in twice.stderr
    bad = fedpriv_here("provision", "add-site", "East Side", "-f", federation_file)
    assert bad.returncode == 2 and "lower-case" in bad.stderr


def test_a_handed_over_site_is_not_issued_new_keys(kits, federation_file):
    keys = (kits / "aggregator" / "public-keys.json").read_text()
    import shutil

    shutil.rmtree(kits / "sites" / "south")  # the kit went to the site; nothing of it stays here
    result = fedpriv_here("provision", "-f", federation_file)
    assert result.returncode == 0, result.stderr
    assert not (kits / "sites" / "south").exists()
    assert "south: kit not here" in result.stdout
    assert (kits / "aggregator" / "public-keys.json").read_text() == keys


def test_rotate_tls_keeps_the_ca_and_retires_the_old_pair(kits, federation_file):
    old = (kits / "aggregator" / "tls.crt").read_bytes()
    ca = (kits / "ca" / "ca.crt").read_bytes()
    result = fedpriv_here("provision", "rotate-tls", "-f", federation_file)
    assert result.returncode == 0, result.stderr
    new = pki.load_cert(kits / "aggregator" / "tls.crt")
    assert new.public_bytes(serialization.Encoding.PEM) != old
    assert pki.signed_by(new, pki.load_cert(kits / "ca" / "ca.crt")) and (kits / "ca" / "ca.crt").read_bytes() == ca
    assert len(list((kits / "retired").glob("tls.key.*"))) == 1
    assert _mode(kits / "aggregator" / "tls.key") == 0o600


def test_rotation_without_the_ca_key_leaves_the_old_pair_in_place(kits, federation_file, tmp_path):
    before = _snapshot(kits / "aggregator")
    (kits / "ca" / "ca.key").rename(tmp_path / "offline-ca.key")  # where it should live
    result = fedpriv_here("provision", "rotate-tls", "-f", federation_file)
    assert result.returncode == 2 and "ca.key not found" in result.stderr
    assert _snapshot(kits / "aggregator") == before


def test_bad_federation_file_is_named(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(
        'name = "x"\n[aggregator]\naddress = "a:1"\n[data]\nlabels = ["a"]\n[[sites]]\nname = "s"\n[[sites]]\nname = "s"\n'
    )
    result = fedpriv_here("provision", "-f", path)
    assert result.returncode == 2 and "site listed twice: s" in result.stderr


@pytest.mark.parametrize("name", ["federation", "aggregator", "../escaped", "x;touch y"])
def test_a_site_name_that_would_be_a_path_or_the_aggregators_file_is_refused(tmp_path, name):
    # The same rule as the simulation's site names (fedpriv.common.site_names): 'federation' is the
    # aggregator's ledger, 'aggregator' its key, and a name is never a path.
    from fedpriv.deploy.provision import ProvisionError, load_federation

    path = tmp_path / "federation.toml"
    path.write_text(f'name = "x"\n[aggregator]\naddress = "a:1"\n[data]\nlabels = ["a"]\n[[sites]]\nname = "{name}"\n')
    with pytest.raises(ProvisionError, match="sites.0.name") as caught:
        load_federation(path)
    assert f"site name '{name}'" in str(caught.value) and "'federation'" in str(caught.value)


# -- checks before anything connects ------------------------------------------------


def test_aggregator_refuses_to_start_without_tls(kits, tmp_path):
    import shutil

    kit = tmp_path / "no-tls"
    shutil.copytree(kits / "aggregator", kit)
    (kit / "tls.crt").unlink()
    result = fedpriv_here("aggregator", "start", "--kit", kit, "--state", tmp_path / "state")
    assert result.returncode == 2
    assert "Refusing to run without TLS" in result.stderr and "tls.crt" in result.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.slow  # runs a SuperLink
def test_insecure_aggregator_warns_loudly_and_stops_cleanly_on_sigterm(kits, tmp_path):
    log = tmp_path / "aggregator.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedpriv.cli",
                "aggregator",
                "start",
                "--kit",
                str(kits / "aggregator"),
                "--state",
                str(tmp_path / "state"),
                "--insecure",
                "--fleet-listen",
                f"127.0.0.1:{free_port()}",
                "--control-listen",
                f"127.0.0.1:{free_port()}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0", COLUMNS="200"),
        )
    try:
        ready = tmp_path / "state" / "ready.json"  # the aggregator's own readiness record
        deadline = time.monotonic() + 600  # bounds a hang only
        while not ready.exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert json.loads(ready.read_text())["pid"] == process.pid
        text = log.read_text()
        assert "INSECURE" in text and "WITHOUT TLS" in text
        assert "--insecure" in text and "--enable-supernode-auth" not in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_agent_with_bad_data_exits_with_the_named_error_before_connecting(kits, tmp_path):
    bad = write_csv(tmp_path / "site.csv", easy_rows(30) + [("lost my loan", "loans")])
    result = fedpriv_here(
        "agent", "start", "--kit", kits / "sites" / "north", "--data", bad, "--state", tmp_path / "state"
    )
    assert result.returncode == 2
    assert "site.csv, column 'category', row 31: unknown label 'loans'" in result.stderr
    assert "connecting" not in result.stdout and "SuperNode" not in result.stdout + result.stderr
    few = write_csv(tmp_path / "few.csv", easy_rows(4))
    result = fedpriv_here("agent", "start", "--kit", kits / "sites" / "north", "--data", few)
    assert result.returncode == 2 and "too few rows: 4" in result.stderr


def test_agent_without_a_declared_size_refuses_to_join(kits, tmp_path):
    data = write_csv(tmp_path / "site.csv", easy_rows(30))
    result = fedpriv_here(
        "agent", "start", "--kit", kits / "sites" / "north", "--data", data, "--state", tmp_path / "s"
    )
    assert result.returncode == 2
    assert "north declares no public size: pass --declared-rows N" in result.stderr
    assert "SuperNode" not in result.stdout + result.stderr


def test_agent_columns_and_labels_can_be_given_as_options(kits, tmp_path):
    rows = [(text, label) for text, label in easy_rows(30)]
    data = write_csv(tmp_path / "site.csv", rows, header=("body", "queue"))
    result = fedpriv_here("agent", "check", "--kit", kits / "sites" / "north", "--data", data)
    assert result.returncode == 2 and "column 'text': missing column (found: body, queue)" in result.stderr
    from fedpriv.deploy.agent import Agent

    agent = Agent.from_kit(kits / "sites" / "north", tmp_path / "state")
    assert len(agent.validate(data, text_column="body", label_column="queue")) == 30
    config = agent.node_config(data)
    assert config["text-column"] == "body" and config["label-column"] == "queue"


def test_node_config_reaches_flower_unchanged(kits, tmp_path):
    from flwr.common.config import parse_config_args

    from fedpriv.deploy.agent import Agent, format_node_config

    agent = Agent.from_kit(kits / "sites" / "south", tmp_path / "my state")
    data = write_csv(tmp_path / "it's data.csv", easy_rows(30))
    config = agent.node_config(data, allow_non_private=False)
    parsed = parse_config_args([format_node_config(config)])
    assert parsed == config
    assert parsed["ledger-path"].endswith("/ledgers/south.jsonl")  # named for its owner: audit pins it
    assert parsed["epsilon-cap"] == 2.5 and parsed["site-name"] == "south"
    assert parsed["declared-rows"] == 400  # from the federation file, through the kit
    assert agent.node_config(data, declared_rows=900)["declared-rows"] == 900  # the operator's option wins
    assert parsed["allow-non-private"] == "false"  # the site's policy travels whole, its defaults spelled out
    assert "fedpriv-simulated" not in parsed and "audit-fault" not in parsed  # the simulation harness's keys only
    assert SitePolicy.from_node_config(parsed) == SitePolicy()
    assert agent.node_config(data, allow_non_private=True)["allow-non-private"] == "true"


def test_a_sites_policy_comes_from_the_federation_file(tmp_path):
    from fedpriv.deploy.kit import load_site_kit
    from fedpriv.deploy.provision import ProvisionError, provision

    federation = tmp_path / "federation.toml"
    base = (
        'name = "f"\n[aggregator]\naddress = "127.0.0.1:9092"\n[data]\nlabels = ["a", "b"]\n'
        "[site-defaults.policy]\nmin-noise-multiplier = 0.8\n"
    )
    federation.write_text(base + '[[sites]]\nname = "north"\npolicy = {modes = ["head"]}\n[[sites]]\nname = "south"\n')
    provision(federation, tmp_path / "kits")
    north, south = (load_site_kit(tmp_path / "kits" / "sites" / s).policy for s in ("north", "south"))
    assert north == SitePolicy(min_noise_multiplier=0.8, modes=("head",))
    assert south == SitePolicy(min_noise_multiplier=0.8)
    federation.write_text(base + '[[sites]]\nname = "north"\npolicy = {max-release-epsilon = -1}\n')
    with pytest.raises(ProvisionError, match="sites.north.policy.max-release-epsilon: Input should be greater than 0"):
        provision(federation, tmp_path / "kits2")


def test_run_settings_keep_the_federations_labels_and_key(kits, tmp_path):
    from fedpriv.deploy.aggregator import Aggregator, AggregatorError

    aggregator = Aggregator(kits / "aggregator", tmp_path / "state")
    user = tmp_path / "run.toml"
    user.write_text('rounds = 5\n[strategy]\nname = "fedadam"\n')
    config = aggregator.run_config(user, ["train.sample-rate=0.2"], run_dir=tmp_path / "run")
    assert config.rounds == 5 and config.strategy.name == "fedadam" and config.train.sample_rate == 0.2
    assert json.loads(config.data.labels) == LABELS and config.data.test_path == ""
    assert config.aggregator_key == str((kits / "aggregator" / "ledger.key").resolve())
    assert Path(config.run_dir).is_absolute()
    with pytest.raises(AggregatorError, match="label set"):
        aggregator.run_config(None, ['data.labels=\'["a", "b"]\''])
    distributed = ["privacy.secure-aggregation=true", 'privacy.noise="distributed"']
    with pytest.raises(AggregatorError, match="privacy.distributed-batch: distributed noise in a deployment"):
        aggregator.run_config(None, distributed)
    assert (
        aggregator.run_config(None, [*distributed, "privacy.distributed-batch=2000"]).privacy.distributed_batch == 2000
    )

    # Resuming keeps the saved plan; only waiting-related settings may change.
    run = tmp_path / "run"
    run.mkdir()
    import tomli_w

    (run / "config.toml").write_text(tomli_w.dumps(config.model_dump(by_alias=True)))
    resumed = aggregator.resume_config(run, ["strategy.min-sites=1"])
    assert resumed.rounds == 5 and resumed.strategy.min_sites == 1 and resumed.run_dir == str(run.resolve())
    with pytest.raises(AggregatorError, match="cannot change rounds"):
        aggregator.resume_config(run, ["rounds=9"])


def test_a_budget_reset_needs_a_reason_is_signed_with_the_sites_key_and_shown_by_the_audit(kits):
    from fedpriv.client.budget import SiteBudget
    from fedpriv.common.privacy.ledger import Ledger
    from fedpriv.common.privacy.records import BudgetReset, Mechanism

    kit = kits / "sites" / "north"
    ledger = Ledger(
        kits / "sites" / "north-state" / "ledgers" / "north.jsonl", signing.read_private_key(kit / "ledger.key")
    )
    budget = SiteBudget(ledger, "sha256:v1", 6.0, 1e-6, "pld")
    mechanism = Mechanism(noise_multiplier=1.5, sample_rate=0.2, steps=10, max_grad_norm=1.0, dataset_size=100)
    for rnd in (1, 2):
        budget.record(run_id="q3", server_round=rnd, site="north", mechanism=mechanism, update_sha256="0" * 64)
    written = ledger.path.read_bytes()

    refused = fedpriv_here("agent", "reset-budget", "--kit", kit)
    assert refused.returncode == 2 and "--reason" in refused.stderr, refused.stdout + refused.stderr
    assert ledger.path.read_bytes() == written  # nothing appended

    done = fedpriv_here("agent", "reset-budget", "--kit", kit, "--reason", "q3 tickets purged (retention policy)")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 earlier release(s)" in done.stdout
    last = ledger.entries()[-1]
    assert isinstance(last.record, BudgetReset) and last.record.reason == "q3 tickets purged (retention policy)"
    assert last.signer == signing.public_b64(signing.read_private_key(kit / "ledger.key"))
    assert budget.spent() == 0.0

    shown = fedpriv_here("audit", ledger.path, "--keys", kits / "aggregator" / "public-keys.json", "--json")
    report = json.loads(shown.stdout)
    # A lone ledger: no violation, the reset shown, but not "passed" (nothing proves it complete).
    assert shown.returncode == 3 and report["verdict"] == "incomplete" and not report["ok"]
    (site,) = report["sites"]
    assert site["resets"][0]["reason"].startswith("q3 tickets") and site["resets"][0]["releases-before"] == 2
