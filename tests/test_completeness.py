"""An audit that cutting a ledger's tail cannot fool: each way of hiding releases found by the hostile probe.

One tiny real simulation (2 sites, 2 rounds) is run once; each case tampers
with a copy of its run directory as an attacker with write access would, and
the audit must fail (or, with no run evidence at all, refuse to pass).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tomli_w

from fedpriv.audit.auditor import audit
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import GENESIS, entry_hash
from fedpriv.common.privacy.records import canonical_json
from tests.helpers import LABELS, easy_rows, fedpriv_here, write_csv

# Its tests share one federation (a module fixture): one pytest-xdist worker runs them all, starting it once.
pytestmark = pytest.mark.xdist_group("test_completeness")

ROOT = Path(__file__).resolve().parents[1]
SITE = "site-001"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    from fedpriv.common.config import FedprivConfig

    base = tmp_path_factory.mktemp("complete")
    labels = base / "labels.json"
    labels.write_text(json.dumps(LABELS), encoding="utf-8")
    config = FedprivConfig().replace(
        **{
            "model.name": tiny_model_dir,
            "data.path": str(write_csv(base / "train.csv", easy_rows(200, seed=1))),
            "data.test-path": str(write_csv(base / "test.csv", easy_rows(60, seed=2))),
            "data.labels": str(labels),
            "data.max-length": 32,
            "run-dir": str(base / "run"),
            "rounds": 2,
            "simulation.sites": 2,
            "simulation.partitioner": "iid",
            "strategy.min-sites": 2,
            "simulation.cpus-per-site": 1,
            "simulation.backend": "in-process",
            "privacy.target-epsilon": 8.0,
        }
    )
    path = base / "fedpriv.toml"
    path.write_text(tomli_w.dumps(config.model_dump(by_alias=True)))
    result = fedpriv_here("simulate", "--config", path, "--preset", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base / "run"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run for one case to tamper with."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def ledger(run: Path, owner: str) -> Path:
    return run / "ledgers" / f"{owner}.jsonl"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def violations(report) -> list[str]:
    return [str(p) for p in report.violations]


def cut_last_line(path: Path) -> str:
    text = lines(path)
    path.write_text("".join(text[:-1]))
    return text[-1]


def cut_midway(path: Path) -> None:
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


@pytest.mark.slow
def test_the_untouched_run_passes_and_says_what_proved_it_complete(finished_run):
    report = audit([finished_run])
    assert report.verdict == "passed", [str(p) for p in report.problems]
    assert report.completeness.proven and any("the run ended" in e for e in report.completeness.evidence)


@pytest.mark.slow
def test_cutting_a_sites_last_release_and_its_receipt_is_a_violation(run):
    removed = json.loads(cut_last_line(ledger(run, SITE)))
    federation = ledger(run, "federation")
    text = lines(federation)
    # The receipt of the removed release, and everything after it: the ledger's tail is cut there.
    at = next(i for i, line in enumerate(text) if removed["hash"] in line and '"site-release"' in line)
    federation.write_text("".join(text[:at]))
    report = audit([run])
    assert report.verdict == "failed"
    found = violations(report)
    assert any("last signed ledger head is for round 1" in m and "round 2 is done" in m for m in found), found
    assert any(f"run log shows {SITE} reached epsilon" in m for m in found), found


@pytest.mark.slow
def test_truncating_the_last_line_of_both_ledgers_midway_is_a_violation_not_a_note(run):
    cut_midway(ledger(run, SITE))
    cut_midway(ledger(run, "federation"))
    found = violations(audit([run]))
    assert any("entries were cut from the ledger's tail" in m for m in found), found


@pytest.mark.slow
def test_deleting_the_aggregators_ledger_and_a_sites_last_line_is_a_violation(run):
    ledger(run, "federation").unlink()
    cut_last_line(ledger(run, SITE))
    found = violations(audit([run]))
    assert any("federation.jsonl is missing" in m for m in found), found
    assert any(f"run log shows {SITE} reached epsilon" in m for m in found), found


@pytest.mark.slow
@pytest.mark.parametrize("how", ["delete", "empty"])
def test_a_deleted_or_emptied_site_ledger_is_a_violation(run, how):
    path = ledger(run, SITE)
    path.unlink() if how == "delete" else path.write_bytes(b"")
    found = violations(audit([run]))
    assert any(SITE in m and "ledger is missing or empty" in m for m in found) or any(
        f"{SITE}'s ledger ends before" in m for m in found
    ), found


@pytest.mark.slow
def test_a_deleted_aggregator_ledger_is_a_violation(run):
    ledger(run, "federation").unlink()
    found = violations(audit([run]))
    assert any("federation.jsonl is missing" in m for m in found), found


def resign(path: Path, key, site_keys: dict) -> None:
    """Rewrites a whole ledger under `key`, as an attacker holding new keys would, receipts included."""
    prev, out = GENESIS, []
    for line in lines(path):
        entry = json.loads(line)
        record = entry["record"]
        if record.get("kind") == "site-release":
            inner = record["site_entry"]
            inner["signer"] = signing.public_b64(site_keys[record["site"]])
            inner["signature"] = signing.sign(site_keys[record["site"]], inner["hash"].encode())
        entry["prev"], entry["hash"] = prev, entry_hash(entry["seq"], prev, record)
        entry["signer"], entry["signature"] = signing.public_b64(key), signing.sign(key, entry["hash"].encode())
        prev = entry["hash"]
        out.append(canonical_json(entry) + b"\n")
    path.write_bytes(b"".join(out))


@pytest.mark.slow
def test_removing_the_keys_and_resigning_every_ledger_is_a_violation(run):
    owners = [p.stem for p in (run / "ledgers").glob("*.jsonl")]
    new = {owner: signing.generate() for owner in owners}
    sites = {o: k for o, k in new.items() if o != "federation"}
    for owner in owners:
        resign(ledger(run, owner), new[owner], sites)
    keys = run / "keys" / "public-keys.json"
    keys.unlink()
    found = violations(audit([run]))
    assert any("no pinned public key" in m for m in found), found
    assert any("was re-signed" in m for m in found), found  # the checkpoints and run log name the old key
    # Nor does a fresh public-keys.json for the new keys help: the run started with another one.
    keys.write_text(
        json.dumps({("aggregator" if o == "federation" else o): signing.public_b64(k) for o, k in new.items()})
    )
    found = violations(audit([run]))
    assert any("the keys were replaced" in m for m in found) and any("was re-signed" in m for m in found), found


@pytest.mark.slow
def test_a_lone_ledger_cut_short_or_empty_never_passes(finished_run, tmp_path):
    keys = finished_run / "keys" / "public-keys.json"
    first = tmp_path / f"{SITE}.jsonl"
    first.write_text(lines(ledger(finished_run, SITE))[0])
    result = fedpriv_here("audit", first, "--keys", keys)
    assert result.returncode == 3 and "Audit passed" not in result.stdout, result.stdout
    assert "cannot be proven complete" in result.stdout
    empty = tmp_path / "empty" / f"{SITE}.jsonl"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    report = audit([empty], keys=keys)
    assert report.verdict == "incomplete" and not report.ok
