"""The signed, hash-chained ledger and what `fedpriv audit` makes of tampering."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpriv.audit.auditor import audit
from fedpriv.client.budget import SiteBudget
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import GENESIS, Ledger, LedgerError, entry_hash, verify_ledger
from fedpriv.common.privacy.records import (
    Mechanism,
    PrivacyRecord,
    SiteExhausted,
    SiteReleaseReceipt,
    canonical_json,
)
from fedpriv.common.run_events import LedgerKey, RoundEnd, SiteTrain
from fedpriv.common.rundir import RunDirectory
from fedpriv.server.ledger_heads import ReleaseHeads, ledger_keys
from tests.helpers import fedpriv_here

ROOT = Path(__file__).resolve().parents[1]


def make_run(tmp_path, sites=("site-000", "site-001"), rounds=3, accountant="prv", cap=8.0):
    """A run directory with real signed ledgers, as a simulation leaves it.

    The sites' budgets record each round's release, the aggregator's receipts
    and signed round heads go through the server's own `ReleaseHeads`, and the
    run log says which rounds are done and which key signs the aggregator's ledger.
    """
    keys, public = tmp_path / "keys", {}
    budgets = {}
    for site in [*sites, "aggregator"]:
        public[site] = signing.public_b64(signing.load_or_create(keys / f"{site}.key"))
    (keys / "public-keys.json").write_text(json.dumps(public))
    run = RunDirectory(tmp_path)
    run.log(LedgerKey(**ledger_keys(run, signing.read_private_key(keys / "aggregator.key"))))
    heads = ReleaseHeads(
        Ledger(tmp_path / "ledgers" / "federation.jsonl", signing.read_private_key(keys / "aggregator.key"))
    )
    for site in sites:
        key = signing.read_private_key(keys / f"{site}.key")
        budgets[site] = SiteBudget(
            Ledger(tmp_path / "ledgers" / f"{site}.jsonl", key), f"data-{site}", cap, 1e-5, accountant
        )
    for rnd in range(1, rounds + 1):
        for site, budget in budgets.items():
            mechanism = Mechanism(noise_multiplier=2.0, sample_rate=0.3, steps=10, max_grad_norm=0.5, dataset_size=100)
            entry = budget.record(
                run_id="run-1", server_round=rnd, site=site, mechanism=mechanism, update_sha256=f"{rnd:064x}"
            )
            heads.receipt(rnd, site, entry)
            run.log(SiteTrain(round=rnd, site=site, epsilon=entry.record.accounting.epsilon))
        heads.close_round("run-1", rnd)
        run.log(RoundEnd(round=rnd, seconds=None))
    return tmp_path


def lines(path):
    return path.read_text().splitlines(keepends=True)


def test_intact_run_passes(tmp_path):
    report = audit([make_run(tmp_path)])
    assert report.ok, [str(p) for p in report.problems]
    assert [s.site for s in report.sites] == ["site-000", "site-001"]
    site = report.sites[0]
    assert len(site.releases) == 3 and site.remaining == pytest.approx(8.0 - site.epsilon)
    assert all(abs(r.pld - r.claimed) < 0.01 * r.claimed for r in site.releases)


def test_edited_value_is_named(tmp_path):
    run = make_run(tmp_path)
    ledger = run / "ledgers" / "site-001.jsonl"
    text = lines(ledger)
    entry = json.loads(text[1])
    entry["record"]["accounting"]["epsilon"] = 1.0  # under-report round 2
    text[1] = json.dumps(entry) + "\n"
    ledger.write_text("".join(text))
    report = audit([run])
    assert not report.ok
    messages = [str(p) for p in report.problems]
    assert any("site-001.jsonl line 2" in m and "round 2" in m and "hash mismatch" in m for m in messages), messages


def test_deleted_line_is_named(tmp_path):
    run = make_run(tmp_path)
    ledger = run / "ledgers" / "site-000.jsonl"
    text = lines(ledger)
    ledger.write_text(text[0] + text[2])
    messages = [str(p) for p in audit([run]).problems]
    assert any("site-000.jsonl line 2" in m and "removed" in m for m in messages), messages


def test_reordered_lines_are_named(tmp_path):
    run = make_run(tmp_path)
    ledger = run / "ledgers" / "site-000.jsonl"
    text = lines(ledger)
    ledger.write_text(text[1] + text[0] + text[2])
    messages = [str(p) for p in audit([run]).problems]
    assert any("site-000.jsonl line 1" in m and ("reordered" in m) for m in messages), messages


def test_swapped_signature_is_named(tmp_path):
    run = make_run(tmp_path)
    ledger = run / "ledgers" / "site-000.jsonl"
    text = [json.loads(line) for line in lines(ledger)]
    text[2]["signature"], text[1]["signature"] = text[1]["signature"], text[2]["signature"]
    ledger.write_text("".join(json.dumps(e) + "\n" for e in text))
    messages = [str(p) for p in audit([run]).problems]
    assert any("site-000.jsonl line 2" in m and "bad signature" in m for m in messages), messages


def test_resigned_by_another_key_is_caught_by_the_pinned_key(tmp_path):
    # An attacker rewrites the whole ledger consistently with their own key:
    # the chain verifies, but the provisioned public key does not match.
    run = make_run(tmp_path)
    forged = Ledger(tmp_path / "forged.jsonl", signing.generate())
    for entry in Ledger(run / "ledgers" / "site-000.jsonl").entries():
        record = entry.record
        accounting = record.accounting.model_copy(update={"epsilon": record.accounting.epsilon / 2})
        forged.append(record.model_copy(update={"accounting": accounting}))
    (run / "ledgers" / "site-000.jsonl").write_bytes(forged.path.read_bytes())
    forged.path.unlink()
    messages = [str(p) for p in audit([run]).problems if p.fatal]
    assert any("site-000.jsonl line 1" in m and "not by the ledger's key" in m for m in messages), messages


def test_interrupted_write_still_verifies_and_next_append_continues(tmp_path):
    key = signing.generate()
    ledger = Ledger(tmp_path / "l.jsonl", key)
    for i in range(2):
        ledger.append(SiteExhausted(round=i, site="s", epsilon=1.0))
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"seq":2,"prev":"abc","rec')  # power cut mid-write
    entries, problems = verify_ledger(ledger.path)
    assert len(entries) == 2 and all(not p.fatal for p in problems)
    ledger.append(SiteExhausted(round=2, site="s", epsilon=2.0))
    entries, problems = verify_ledger(ledger.path)
    assert [e.seq for e in entries] == [0, 1, 2] and not problems


def test_cap_violation_and_wrong_claim_are_flagged(tmp_path):
    run = make_run(tmp_path, sites=("site-000",), cap=100.0)
    key = signing.read_private_key(run / "keys" / "site-000.key")
    ledger = Ledger(run / "ledgers" / "site-000.jsonl", key)
    last = ledger.records()[-1]
    # A correctly signed but false record: claims less than the mechanism spent, above a tiny cap.
    accounting = last.accounting.model_copy(update={"epsilon": last.accounting.epsilon * 0.5, "epsilon_cap": 1.0})
    ledger.append(last.model_copy(update={"round": 4, "accounting": accounting}))
    messages = [str(p) for p in audit([run]).problems if p.fatal]
    assert any("site-000 round 4" in m and "recomputed" in m for m in messages), messages
    assert any("site-000 round 4" in m and "exceeds the site's cap 1.0" in m for m in messages), messages


def test_keys_are_never_overwritten(tmp_path):
    path = signing.write_private_key(signing.generate(), tmp_path / "k.key")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(signing.SigningKeyError, match="refusing to overwrite"):
        signing.write_private_key(signing.generate(), path)


def test_audit_command_exit_codes_json_and_html(tmp_path):
    run = make_run(tmp_path)
    ok = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "audit", str(run), "--json", "--html", str(tmp_path / "a.html")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] and {s["site"] for s in data["sites"]} == {"site-000", "site-001"}
    assert "data:image/png;base64," in (tmp_path / "a.html").read_text()
    ledger = run / "ledgers" / "site-000.jsonl"
    ledger.write_text(ledger.read_text().replace('"steps":10', '"steps":1', 1))
    bad = fedpriv_here("audit", run)  # the same command in this process: the exit code above came from a real one
    assert bad.returncode == 1
    assert "site-000.jsonl line 1" in bad.stdout and "Audit failed" in bad.stdout


def test_entries_read_back_typed_and_verify_over_the_bytes_written(tmp_path):
    """Floats once written as integers (8, not 8.0) keep verifying, in a site ledger and in a receipt."""
    run = make_run(tmp_path, sites=("site-000",), rounds=2)
    site_ledger = run / "ledgers" / "site-000.jsonl"
    key = signing.read_private_key(run / "keys" / "site-000.key")
    rewritten = Ledger(tmp_path / "rewritten.jsonl", key)
    prev = GENESIS
    for line in lines(site_ledger):
        written = json.loads(line)
        written["record"]["accounting"]["epsilon_cap"] = 8  # as an older writer might have put it
        written["prev"] = prev
        written["hash"] = entry_hash(written["seq"], written["prev"], written["record"])
        written["signature"] = signing.sign(key, written["hash"].encode())
        prev = written["hash"]
        with open(rewritten.path, "ab") as handle:
            handle.write(canonical_json(written) + b"\n")
    assert b'"epsilon_cap":8,' in rewritten.path.read_bytes()
    rewritten.path.replace(site_ledger)

    entries = Ledger(site_ledger).entries()
    assert all(isinstance(e.record, PrivacyRecord) and e.record.accounting.epsilon_cap == 8.0 for e in entries)
    assert verify_ledger(site_ledger)[1] == []

    # The aggregator's receipt carries the site's entry exactly as received.
    (run / "ledgers" / "federation.jsonl").unlink()  # received again, as rewritten
    federation = Ledger(run / "ledgers" / "federation.jsonl", signing.read_private_key(run / "keys" / "aggregator.key"))
    heads = ReleaseHeads(federation)
    for rnd, entry in enumerate(entries, start=1):
        heads.receipt(rnd, "site-000", entry)
        heads.close_round("run-1", rnd)
    federation.append(SiteExhausted(round=3, site="site-000", epsilon=7.5))
    receipt, _, _, _, exhausted = Ledger(federation.path).records()
    assert isinstance(receipt, SiteReleaseReceipt) and isinstance(exhausted, SiteExhausted)
    assert canonical_json(receipt.site_entry.written) == canonical_json(entries[0].written)
    assert b'"epsilon_cap":8,' in federation.path.read_bytes()
    report = audit([run])
    assert report.ok, [str(p) for p in report.problems]
    assert report.exhausted == [{"site": "site-000", "round": 3, "epsilon": 7.5}]


def test_unreadable_entry_is_named_not_a_crash(tmp_path):
    run = make_run(tmp_path, sites=("site-000",), rounds=2)
    ledger = run / "ledgers" / "site-000.jsonl"
    ledger.write_text(ledger.read_text().replace('"steps":10', '"steps":"ten"', 1))
    with pytest.raises(LedgerError, match="site-000.jsonl line 1: not a ledger entry .*steps"):
        Ledger(ledger).entries()
    messages = [str(p) for p in audit([run]).problems if p.fatal]
    assert any("site-000.jsonl line 1" in m and "hash mismatch" in m for m in messages), messages
    assert any("site-000.jsonl line 1" in m and "not a ledger entry" in m for m in messages), messages
