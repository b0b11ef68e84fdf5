"""Hostile or broken updates: each is refused with a reason naming what is wrong (issue: hostile inputs)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpriv.client.budget import SiteBudget
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger
from fedpriv.common.privacy.records import LedgerEntry, Mechanism, state_sha256
from fedpriv.common.wire import protocol
from fedpriv.server.update_checks import ReleaseHistory, RoundContext, metrics_problem, update_problem

SITE = "site-000"
SENT = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def context(round_: int = 1) -> RoundContext:
    return RoundContext(run_id="run", round=round_, sent=SENT, max_update_norm=1e5, max_examples=10**7)


def honest() -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), 0.1, dtype=np.float32), "b": np.full(3, -0.1, dtype=np.float32)}


def test_an_honest_update_passes():
    assert update_problem(honest(), context()) is None
    assert metrics_problem({protocol.NUM_EXAMPLES: 40, protocol.SITE_WEIGHT: 1}, context()) is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda u: u["w"].__setitem__((0, 0), np.nan), "array w: holds NaN or infinite values"),
        (lambda u: u["b"].__setitem__(1, np.inf), "array b: holds NaN or infinite values"),
        (lambda u: u.update(w=np.zeros((3, 2), dtype=np.float32)), "array w: shape (3, 2), the model's is (2, 3)"),
        (lambda u: u.update(b=np.zeros(3, dtype=np.float64)), "array b: dtype float64, the model's is float32"),
        (lambda u: u.pop("b"), "the update's arrays differ from the model's: missing b"),
        (lambda u: u.update(extra=np.zeros(1, dtype=np.float32)), "unexpected extra"),
        (lambda u: u.update(w=np.full((2, 3), 1e12, dtype=np.float32)), "exceeds strategy.max-update-norm"),
    ],
)
def test_a_broken_update_is_refused_with_its_reason(change, reason):
    update = honest()
    change(update)
    problem = update_problem(update, context())
    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({protocol.NUM_EXAMPLES: 10**15}, "outside [0, 10000000]"),
        ({protocol.NUM_EXAMPLES: -3}, "outside"),
        ({protocol.NUM_EXAMPLES: 2.5}, "not a whole number"),
        ({protocol.NUM_EXAMPLES: float("nan")}, "not a whole number"),
        ({protocol.SITE_WEIGHT: 1e9}, "must be 0 or 1"),
    ],
)
def test_an_absurd_count_or_weight_is_refused(metrics, reason):
    assert reason in (metrics_problem(metrics, context()) or "")


@pytest.fixture
def budget(tmp_path):
    return SiteBudget(Ledger(tmp_path / f"{SITE}.jsonl", signing.generate()), "data-0", 50.0, 1e-5, "rdp")


def release(budget, round_: int, sigma: float = 1.0, run_id: str = "run") -> LedgerEntry:
    mechanism = Mechanism(noise_multiplier=sigma, sample_rate=0.2, steps=5, max_grad_norm=1.0, dataset_size=40)
    return budget.record(
        run_id=run_id, server_round=round_, site=SITE, mechanism=mechanism, update_sha256=state_sha256(honest())
    )


def test_records_in_order_pass_and_a_replay_is_refused(budget):
    history = ReleaseHistory()
    first = release(budget, 1)
    assert history.problem(SITE, first, context(1)) is None
    history.accept(SITE, first)
    second = release(budget, 2)
    assert history.problem(SITE, second, context(2)) is None
    history.accept(SITE, second)
    assert "already received: a replay" in history.problem(SITE, first, context(3))
    assert "not this run's round 3: a replay" in history.problem(SITE, release(budget, 2), context(3))
    assert "not this run's round" in history.problem(SITE, release(budget, 3, run_id="other"), context(3))
    assert "names site 'site-000', but 'site-001' sent it" in history.problem(
        "site-001", release(budget, 3), context(3)
    )


def test_a_record_claiming_less_epsilon_than_its_mechanism_is_refused(budget):
    entry = release(budget, 1, sigma=0.8)
    claimed = entry.record.accounting.epsilon
    lowered = entry.record.model_copy(
        update={"accounting": entry.record.accounting.model_copy(update={"epsilon": claimed / 2})}
    )
    forged = entry.model_copy(update={"record": lowered})
    problem = ReleaseHistory().problem(SITE, forged, context(1))
    assert problem is not None and "below the" in problem and "its own mechanism spends" in problem
