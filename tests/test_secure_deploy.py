"""Real sites (TLS, node authentication) under secure aggregation, each deciding its own privacy.

Three agents run with the default site policy (no release without DP,
collusion bound t >= 1, noise multiplier >= 0.5, epsilon per release <= 4),
one federation for the module's tests (starting it costs more than a run).

- A hostile aggregator asks for what that policy forbids, twice through a
  hostile ServerApp (`tests/hostile_server.py`) that forges what it likes,
  and once through fedpriv's own ServerApp with hostile settings. Every such
  round is refused before anything is computed, with the reason in the reply
  (and, for fedpriv's ServerApp, in the run's events); only the masked vector
  of the one honest-looking round is ever recorded.
- An honest secure run loses an agent mid-round (killed after sharing its
  keys, before its masked update): the round completes from the others'
  shares, and the run audits clean.
"""

from __future__ import annotations

import json

import pytest

from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import PrivacyRecord
from fedpriv.common.rundir import RunDirectory
from fedpriv.common.wire.secure_protocol import MASK
from tests.local_federation import ROOT, LocalFederation, finish, running, wait_event

SITES = ("site-a", "site-b", "site-c")
REFUSED = "policy-refused"
# One worker runs the module's tests, in file order, on one federation.
pytestmark = pytest.mark.xdist_group("test_secure_deploy")


@pytest.fixture(scope="module")
def fed(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("secure-deploy")
    (root / "hostile").mkdir()  # where tests/hostile_server.py reads its plan and writes what the sites answered
    environment = {"FEDPRIV_HOSTILE_DIR": str(root / "hostile")}
    with running(root, tiny_model_dir, SITES, aggregator_env=environment, min_sites=3, policy={}) as federation:
        yield federation


def _records(fed: LocalFederation, site: str) -> list[PrivacyRecord]:
    path = fed.ledger(site)
    return [r for r in Ledger(path).records() if isinstance(r, PrivacyRecord)] if path.exists() else []


def _releases(fed: LocalFederation, site: str) -> int:
    return len(_records(fed, site))


def _new_releases(fed: LocalFederation, before: list[int]) -> list[int]:
    return [_releases(fed, site) - n for site, n in zip(SITES, before, strict=True)]


def _assert_refused(answers: dict, because: str) -> None:
    assert sorted(answers) == list(SITES), answers
    for site, answer in answers.items():
        assert answer["status"] == REFUSED, (site, answer)
        assert because in answer["reason"], (site, answer)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a bound on a hang: its time grows with the machine's load
def test_sites_refuse_a_hostile_aggregator(fed, tmp_path):
    hostile = fed.root / "hostile"
    released = [_releases(fed, s) for s in SITES]  # what this federation's earlier runs recorded

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
    assert _new_releases(fed, released) == [1, 1, 1]

    # A sample rate of 1: one release costs a huge epsilon, under secure aggregation and in a plain round.
    found = attack(["secure-advertise", "plain-train"], "train.sample-rate=1", "privacy.noise-multiplier=0.6", *secure)
    for answers in (found["secure-advertise"], found["plain-train"]):
        _assert_refused(answers, "above its per-release maximum 4")
    assert _new_releases(fed, released) == [1, 1, 1]  # nothing refused was ever recorded

    # fedpriv's own ServerApp asking for training without DP: each refusal is logged and the run ends.
    # (A noise multiplier below a site's minimum is refused on the same path: tests/test_site_policy.py.)
    run_dir = tmp_path / "run-fedpriv"
    hostile_run = fed.submit(
        "--run-dir", run_dir, "--set", "privacy.enabled=false", "--set", "strategy.round-timeout=600"
    )
    code, out, err = finish(hostile_run)
    assert code == 0, out[-3000:] + err[-3000:]
    run = RunDirectory(run_dir)
    refusals = run.events("site-refused")
    assert sorted(e["site"] for e in refusals) == list(SITES)
    assert all("without DP and its policy allows no non-private release" in e["reason"] for e in refusals)
    assert [e["round"] for e in run.events("all-sites-refused")] == [1]
    assert not run.events("site-train")
    assert _new_releases(fed, released) == [1, 1, 1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a bound on a hang: its time grows with the machine's load
def test_two_secure_rounds_with_an_agent_killed_mid_round_complete_and_audit(fed, tmp_path):
    # Last in this module: site-c stays down afterwards.
    run_dir = tmp_path / "run-secure"
    process = fed.submit(
        "--run-dir",
        run_dir,
        "--set",
        "privacy.secure-aggregation=true",
        # Generous: the masking stage ends as soon as Flower reports the killed site unavailable
        # (two missed heartbeats), and the others may train slowly on a loaded machine.
        "--set",
        "strategy.round-timeout=300",
        "--set",
        "strategy.min-sites=2",  # the round goes on without the site killed in it
        # Within the sites' default policy: no release alone can cost more than the whole run's target.
        "--set",
        "privacy.target-epsilon=3.5",
    )
    # The aggregator records whom it asked to mask: site-c has shared its keys and is about to train.
    mask = wait_event(run_dir, "secure-stage", lambda e: e["round"] == 1 and e["stage"] == MASK, process)
    assert mask["sites"] == ["site-a", "site-b", "site-c"]
    fed.kill("site-c")  # mid-round: after sharing its keys, before its masked update
    code, out, err = finish(process)
    assert code == 0, out[-3000:] + err[-3000:]
    run = RunDirectory(run_dir)
    aggregates = {e["round"]: e for e in run.events("train-aggregate")}
    assert sorted(aggregates) == [1, 2] and all(e["secure"] for e in aggregates.values())
    assert aggregates[1]["sites"] == 2 and aggregates[1]["dropped"] == 1  # recovered from the others' shares
    assert aggregates[2]["sites"] == 2
    # The ledgers of the sites that released in this run (site-c's may hold only a hostile run's release,
    # whose run directory alone proves where it ends).
    (start,) = run.events("run-start")
    released = tuple(s for s in SITES if any(r.run_id == str(start["run_id"]) for r in _records(fed, s)))
    assert {"site-a", "site-b"} <= set(released)
    result = fed.audit(run_dir, sites=released)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads(result.stdout)["ok"]
