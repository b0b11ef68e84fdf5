"""A site's hard cap, and agreement of claimed and recomputed epsilon."""

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpriv.audit.auditor import audit
from fedpriv.audit.recompute import cumulative_epsilons
from fedpriv.client.budget import SiteBudget
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.accounting import epsilon, poisson_gaussian
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import Mechanism


def run_site(tmp_path, cap, sigma, rate, steps, rounds, accountant="rdp"):
    """Plays a site through `rounds` rounds of its budget logic, as client/app.py does."""
    budget = SiteBudget(Ledger(tmp_path / "site.jsonl", signing.generate()), "data", cap, 1e-5, accountant)
    trained, refused = [], []
    for rnd in range(1, rounds + 1):
        mechanism = Mechanism(
            noise_multiplier=sigma, sample_rate=rate, steps=steps, max_grad_norm=1.0, dataset_size=100
        )
        if not budget.allows(mechanism):
            refused.append(rnd)
            continue
        budget.record(run_id="r", server_round=rnd, site="s", mechanism=mechanism, update_sha256="0" * 64)
        trained.append(rnd)
    return budget, trained, refused


@given(
    cap=st.floats(0.2, 12.0),
    sigma=st.floats(0.5, 6.0),
    rate=st.floats(0.01, 1.0),
    steps=st.integers(1, 40),
    rounds=st.integers(1, 8),
)
@settings(max_examples=60, deadline=None)
def test_no_site_ever_exceeds_its_cap(tmp_path_factory, cap, sigma, rate, steps, rounds):
    budget, trained, refused = run_site(tmp_path_factory.mktemp("b"), cap, sigma, rate, steps, rounds)
    claimed = [r.accounting.epsilon for r in budget.ledger.records()]
    assert all(e <= cap for e in claimed)
    assert len(trained) + len(refused) == rounds
    # Once the same release no longer fits, it never fits again: the site is skipped, not crashed.
    assert trained == list(range(1, len(trained) + 1))
    if refused:
        planned = Mechanism(noise_multiplier=sigma, sample_rate=rate, steps=steps, max_grad_norm=1, dataset_size=0)
        assert budget.after(planned) > cap


def test_recording_past_the_cap_is_impossible(tmp_path):
    budget = SiteBudget(Ledger(tmp_path / "l.jsonl", signing.generate()), "d", 1.0, 1e-5, "prv")
    mechanism = Mechanism(noise_multiplier=0.7, sample_rate=0.5, steps=50, max_grad_norm=1.0, dataset_size=10)
    with pytest.raises(RuntimeError, match="above the cap 1.0"):
        budget.record(run_id="r", server_round=1, site="s", mechanism=mechanism, update_sha256="0" * 64)
    assert budget.ledger.records() == []


@pytest.mark.parametrize("accountant", ["pld", "prv", "rdp"])
@pytest.mark.parametrize(
    "sigma, rate, steps, rounds", [(3.2, 0.3, 10, 30), (1.1, 0.2, 50, 4), (0.9, 0.05, 100, 3), (5.0, 1.0, 3, 10)]
)
def test_recomputed_epsilon_agrees_within_one_percent(accountant, sigma, rate, steps, rounds):
    mechanism = Mechanism(noise_multiplier=sigma, sample_rate=rate, steps=steps, max_grad_norm=1.0, dataset_size=0)
    history = [poisson_gaussian(sigma, rate, steps)] * rounds
    claimed = [epsilon(history[: i + 1], 1e-5, accountant) for i in range(rounds)]
    recomputed = cumulative_epsilons([mechanism] * rounds, 1e-5)["rdp" if accountant == "rdp" else "pld"]
    for c, r in zip(claimed, recomputed, strict=True):
        assert math.isclose(c, r, rel_tol=0.01), (c, r)


def test_exhausted_site_is_reported_by_the_audit(tmp_path):
    budget, trained, refused = run_site(
        tmp_path / "run", cap=3.0, sigma=2.0, rate=0.3, steps=10, rounds=5, accountant="prv"
    )
    assert trained and refused
    report = audit([budget.ledger.path])
    assert not report.violations and report.verdict == "incomplete"  # a lone ledger: no run to prove it complete
    (site,) = report.sites
    assert len(site.releases) == len(trained) and site.epsilon <= 3.0


def test_budget_keeps_its_releases_and_rereads_only_a_ledger_changed_behind_its_back(tmp_path, monkeypatch):
    reads = []
    entries = Ledger.entries
    monkeypatch.setattr(Ledger, "entries", lambda self: reads.append(1) or entries(self))
    path, key = tmp_path / "site.jsonl", signing.generate()
    budget = SiteBudget(Ledger(path, key), "data", 50.0, 1e-5, "rdp")
    mechanism = Mechanism(noise_multiplier=1.5, sample_rate=0.2, steps=10, max_grad_norm=1.0, dataset_size=100)
    release = poisson_gaussian(1.5, 0.2, 10)

    assert budget.spent() == 0.0 and len(reads) == 1
    entry = budget.record(run_id="r", server_round=1, site="s", mechanism=mechanism, update_sha256="0" * 64)
    assert budget.releases() == [release]
    assert budget.spent() == pytest.approx(entry.record.accounting.epsilon)
    assert budget.spent() == pytest.approx(epsilon([release], 1e-5, "rdp"))
    assert len(reads) == 1  # its own append needs no re-read

    # Another writer (a second process of the same site) appends to the same ledger.
    other = SiteBudget(Ledger(path, key), "data", 50.0, 1e-5, "rdp")
    other.record(run_id="r2", server_round=1, site="s", mechanism=mechanism, update_sha256="1" * 64)
    reads.clear()
    assert budget.releases() == [release, release] and len(reads) == 1
    assert budget.spent() == pytest.approx(epsilon([release] * 2, 1e-5, "rdp")) and len(reads) == 1
    # Releases of another version of the site's data in the same ledger count too: one budget per site.
    SiteBudget(Ledger(path, key), "other-data", 50.0, 1e-5, "rdp").record(
        run_id="r3", server_round=1, site="s", mechanism=mechanism, update_sha256="2" * 64
    )
    assert budget.releases() == [release] * 3
    entry = budget.record(run_id="r", server_round=2, site="s", mechanism=mechanism, update_sha256="3" * 64)
    assert entry.seq == 3 and len(budget.releases()) == 4
    assert len(Ledger(path).records()) == 4


def test_the_audit_shows_a_deployed_sites_budget_run_by_run(tmp_path):
    from rich.console import Console

    from fedpriv.audit.render import console_report, html_report

    budget = SiteBudget(Ledger(tmp_path / "branch.jsonl", signing.generate()), "data", 6.0, 1e-5, "pld")
    mechanism = Mechanism(noise_multiplier=1.5, sample_rate=0.2, steps=5, max_grad_norm=1.0, dataset_size=100)
    for run_id, rounds in (("2026-q3", 3), ("2026-q4", 2)):
        for rnd in range(1, rounds + 1):
            budget.record(run_id=run_id, server_round=rnd, site="branch", mechanism=mechanism, update_sha256="0" * 64)
    report = audit([tmp_path / "branch.jsonl"])
    assert not report.violations and report.verdict == "incomplete"
    (site,) = report.sites
    first, second = site.lifetime()
    assert (first.run_id, first.releases, second.run_id, second.releases) == ("2026-q3", 3, "2026-q4", 2)
    assert first.epsilon_before == 0 and second.epsilon_before == first.epsilon_after
    assert second.epsilon_after == pytest.approx(site.epsilon)
    assert 0 < first.spent and second.remaining == pytest.approx(6.0 - site.epsilon)
    assert [r["run-id"] for r in report.to_json()["sites"][0]["runs"]] == ["2026-q3", "2026-q4"]

    console = Console(record=True, width=160)
    console_report(report, console)
    text = console.export_text()
    assert "lifetime" in text and "2026-q3" in text and "2026-q4" in text
    page = html_report(report)
    assert "Budget over each site's lifetime" in page and page.count("<td>2026-q") == 2


def test_ledgers_written_before_the_event_vocabulary_still_audit():
    """Written by fedpriv at commit 838104d (Opacus PRV and RDP claims, no normaliser or query fields)."""
    folder = Path(__file__).parent / "data" / "ledgers-838104d"
    report = audit([folder])
    assert not report.problems  # keys pinned, every claim reproduced
    # A folder of ledgers cannot show where they should end: no violation, but never "passed".
    assert report.verdict == "incomplete" and report.completeness.gaps
    by_site = {s.site: s for s in report.sites}
    assert set(by_site) == {"branch-prv", "branch-rdp"}
    for name, site in by_site.items():
        assert site.accountant == name.removeprefix("branch-")
        assert len(site.releases) == 6 and [r.run_id for r in site.lifetime()] == ["run-q3", "run-q4"]
        last = site.releases[-1]
        assert last.claimed == pytest.approx(last.pld if site.accountant == "prv" else last.rdp, rel=0.01)
    # the same history costs what dp-accounting's PLD says under the new vocabulary
    event = poisson_gaussian(1.3, 0.2, 5)
    assert by_site["branch-prv"].releases[-1].pld == pytest.approx(epsilon([event] * 6, 1e-5, "pld"), rel=1e-6)


def test_a_changed_data_file_shares_the_sites_budget(tmp_path):
    """One character of one row changed: a neighbouring dataset, so the same budget (not a fresh one)."""
    path, key = tmp_path / "branch.jsonl", signing.generate()
    mechanism = Mechanism(noise_multiplier=1.5, sample_rate=0.2, steps=10, max_grad_norm=1.0, dataset_size=100)
    before = SiteBudget(Ledger(path, key), "sha256:version-1", 6.0, 1e-5, "pld")
    for rnd in (1, 2):
        before.record(run_id="r", server_round=rnd, site="branch", mechanism=mechanism, update_sha256="0" * 64)
    after = SiteBudget(Ledger(path, key), "sha256:version-2", 6.0, 1e-5, "pld")
    assert before.spent() > 0 and after.spent() == pytest.approx(before.spent())
    entry = after.record(run_id="r", server_round=3, site="branch", mechanism=mechanism, update_sha256="1" * 64)
    assert entry.record.accounting.epsilon == pytest.approx(epsilon([poisson_gaussian(1.5, 0.2, 10)] * 3, 1e-5, "pld"))
    report = audit([path])
    assert not report.violations  # the claims compose over both versions
    (site,) = report.sites
    assert site.data_versions == 2 and len(site.releases) == 3


def test_a_reset_is_an_explicit_signed_recorded_act_that_the_audit_shows(tmp_path):
    from rich.console import Console

    from fedpriv.audit.render import console_report, html_report
    from fedpriv.client.budget import BudgetResetError
    from fedpriv.common.privacy.records import BudgetReset

    budget = SiteBudget(Ledger(tmp_path / "branch.jsonl", signing.generate()), "d", 6.0, 1e-5, "pld")
    mechanism = Mechanism(noise_multiplier=1.5, sample_rate=0.2, steps=10, max_grad_norm=1.0, dataset_size=100)
    for rnd in (1, 2):
        budget.record(run_id="q3", server_round=rnd, site="branch", mechanism=mechanism, update_sha256="0" * 64)
    spent = budget.spent()
    for reason in ("", "   "):
        with pytest.raises(BudgetResetError, match="reason"):
            budget.reset(site="branch", reason=reason)
    assert len(budget.ledger.records()) == 2 and budget.spent() == spent  # nothing written
    entry = budget.reset(site="branch", reason="2026-q3 tickets deleted under the retention policy", operator="ops@h")
    assert isinstance(entry.record, BudgetReset) and entry.record.epsilon_before == pytest.approx(spent)
    assert budget.spent() == 0.0
    budget.record(run_id="q4", server_round=1, site="branch", mechanism=mechanism, update_sha256="1" * 64)
    assert budget.spent() == pytest.approx(epsilon([poisson_gaussian(1.5, 0.2, 10)], 1e-5, "pld"))

    report = audit([budget.ledger.path])
    assert not report.violations, [str(p) for p in report.problems]
    (site,) = report.sites
    assert site.epsilon == pytest.approx(budget.spent()) and site.peak == pytest.approx(spent, rel=0.01)
    assert [r.reset for r in site.lifetime()] == [False, True]
    (shown,) = report.to_json()["sites"][0]["resets"]
    assert shown["reason"].startswith("2026-q3 tickets") and shown["operator"] == "ops@h"
    console = Console(record=True, width=200)
    console_report(report, console)
    text = console.export_text()
    assert "budget reset" in text and "retention policy" in text
    assert "Budget resets" in html_report(report) and "retention policy" in html_report(report)


@pytest.mark.parametrize(
    "releases",
    [
        {(4.73, 0.5): 1},
        {(4.73, 0.5): 240},  # the default demo's whole run
        {(1.1, 0.02): 60, (4.73, 0.5): 17},  # two plans in one history
    ],
)
def test_the_kept_step_distribution_gives_the_accountants_epsilon_to_the_last_bit(releases):
    """Ledgers written before keep their numbers: the budget check's shortcut is dp-accounting's own arithmetic."""
    from fedpriv.common.privacy import accounting

    events = [poisson_gaussian(sigma, rate, 1) for (sigma, rate), times in releases.items() for _ in range(times)]
    key = accounting.history(events)
    reference = accounting.new_accountant("pld")
    for event, times in key:
        reference.compose(event, times)
    for _ in range(2):  # built, then kept
        assert accounting._pld_of_subsampled_gaussians(key, 1e-5) == reference.get_epsilon(1e-5)
    assert accounting._compute(key, 1e-5, "pld") == reference.get_epsilon(1e-5)
