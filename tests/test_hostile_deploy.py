"""A hostile aggregator against real sites (TLS, node authentication): each site decides its own privacy.

Three agents run with the default site policy (no release without DP,
collusion bound t >= 1, noise multiplier >= 0.5, epsilon per release <= 4).
The aggregator asks for what that policy forbids, once through a hostile
ServerApp (`tests/hostile_server.py`) that forges what it likes, and once
through fedpriv's own ServerApp with hostile settings. Every such round is
refused before anything is computed, with the reason in the reply (and, for
fedpriv's ServerApp, in the run's events); only the masked vector of the one
honest-looking round is ever recorded.
"""

from __future__ import annotations

import json

import pytest

from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import PrivacyRecord
from fedpriv.common.rundir import RunDirectory
from tests.local_federation import ROOT, LocalFederation, finish, sweep

SITES = ("site-a", "site-b", "site-c")
REFUSED = "policy-refused"


def _releases(fed: LocalFederation, site: str) -> int:
    path = fed.ledger(site)
    if not path.exists():
        return 0
    return sum(isinstance(r, PrivacyRecord) for r in Ledger(path).records())


def _assert_refused(answers: dict, because: str) -> None:
    assert sorted(answers) == list(SITES), answers
    for site, answer in answers.items():
        assert answer["status"] == REFUSED, (site, answer)
        assert because in answer["reason"], (site, answer)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every message starts a fresh ClientApp process at each site: minutes on a loaded machine
def test_sites_refuse_a_hostile_aggregator(tiny_model_dir, tmp_path):
    fed = LocalFederation(tmp_path, tiny_model_dir, sites=SITES, rounds=2, min_sites=3, policy={})
    hostile = tmp_path / "hostile"
    hostile.mkdir()

    def attack(plan: list[str], *settings: str) -> dict:
        (hostile / "plan.json").write_text(json.dumps(plan))
        before = set(hostile.glob("result-*.json"))
        args = ["--run-dir", tmp_path / f"run-{len(before)}"]
        for setting in settings:
            args += ["--set", setting]
        code, out, err = finish(fed.submit(*args, server_app=ROOT / "tests" / "hostile_server.py"))
        assert code == 0, out[-3000:] + err[-3000:]
        (result,) = set(hostile.glob("result-*.json")) - before
        return json.loads(result.read_text())

    try:
        fed.start_aggregator(FEDPRIV_HOSTILE_DIR=str(hostile))
        for site in SITES:
            fed.start_agent(site)
        fed.wait_online()
        secure = ["privacy.secure-aggregation=true", "privacy.noise=distributed", "privacy.distributed-batch=200"]

        # Settings within every site's policy; what the hostile ServerApp forges is in its messages.
        found = attack(["no-collusion", "ghost-cohort", "lying-dropout"], "rounds=100", *secure)
        assert found["sites"] == list(SITES)
        _assert_refused(found["no-collusion"], "assumes at most 0 colluding site(s), fewer than its own bound 1")
        _assert_refused(found["ghost-cohort"], "outside the federation's roster: ghost-1, ghost-2")
        dropout = found["lying-dropout"]
        # The control: an honest-looking round is taken part in, masked and recorded ...
        assert all(dropout[f"mask/{s}"]["status"] == "ok" for s in SITES), dropout
        _assert_refused({s: dropout[s] for s in SITES}, "more than t = 1 dropped")  # ... but never unmasked
        assert [_releases(fed, s) for s in SITES] == [1, 1, 1]

        # Training without DP, under secure aggregation and in a plain round.
        found = attack(["secure-advertise", "plain-train"], "privacy.enabled=false", "privacy.secure-aggregation=true")
        for answers in (found["secure-advertise"], found["plain-train"]):
            _assert_refused(answers, "without DP and its policy allows no non-private release")

        # A sample rate of 1: one round costs a huge epsilon (a tiny noise multiplier: fedpriv's own ServerApp, below).
        found = attack(["secure-advertise"], "train.sample-rate=1", "privacy.noise-multiplier=0.6", *secure)
        _assert_refused(found["secure-advertise"], "above its per-release maximum 4")
        assert [_releases(fed, s) for s in SITES] == [1, 1, 1]  # nothing refused was ever recorded

        # fedpriv's own ServerApp with a hostile setting: it logs each refusal and ends the run.
        run_dir = tmp_path / "run-fedpriv"
        hostile_run = fed.submit(
            "--run-dir", run_dir, "--set", "privacy.noise-multiplier=0.01", "--set", "strategy.round-timeout=600"
        )
        code, out, err = finish(hostile_run)
        assert code == 0, out[-3000:] + err[-3000:]
        run = RunDirectory(run_dir)
        refusals = run.events("site-refused")
        assert sorted(e["site"] for e in refusals) == list(SITES)
        assert all("below its minimum 0.5" in e["reason"] for e in refusals)
        assert [e["round"] for e in run.events("all-sites-refused")] == [1]
        assert not run.events("site-train")
        assert [_releases(fed, s) for s in SITES] == [1, 1, 1]
    finally:
        fed.stop_all()
        sweep(tmp_path)
