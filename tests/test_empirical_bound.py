"""The one-run empirical epsilon lower bound (Steinke, Nasr & Jagielski 2023) in fedpriv.audit.empirical_bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from fedpriv.audit.empirical_bound import (
    Guesses,
    best_epsilon_lower_bound,
    epsilon_lower_bound,
    guesses_from_scores,
    p_value,
)

BETA = 0.05


def _binomial_bound(r: int, v: int, beta: float = BETA) -> float:
    """delta = 0 reference: solve P[Binomial(r, e^eps / (1 + e^eps)) >= v] = beta directly."""
    return optimize.brentq(lambda eps: stats.binom.sf(v - 1, r, special.expit(eps)) - beta, 0.0, 50.0, xtol=1e-12)


def _randomized_response(m: int, epsilon: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canaries included with probability 1/2; the score reports inclusion, flipped w.p. 1/(1+e^eps): eps-DP."""
    included = rng.random(m) < 0.5
    flipped = rng.random(m) < 1.0 / (1.0 + math.exp(epsilon))
    return np.where(included ^ flipped, 1.0, -1.0), included


# --- delta = 0: the bound is the binomial test ----------------------------------------------------------------


@pytest.mark.parametrize("r", [5, 10, 100, 1000])
def test_all_correct_pure_dp_matches_closed_form(r):
    # q^r = beta  =>  eps = log(q / (1 - q)) with q = beta^(1/r); positive once 2^-r < beta, i.e. r >= 5
    expected = -math.log(BETA ** (-1.0 / r) - 1.0)
    assert epsilon_lower_bound(10 * r, r, r) == pytest.approx(expected, abs=1e-7)
    assert epsilon_lower_bound(10 * r, r, r) == pytest.approx(_binomial_bound(r, r), abs=1e-7)


@pytest.mark.parametrize(("r", "v"), [(10, 9), (100, 80), (1000, 600), (5000, 4400)])
def test_pure_dp_matches_binomial_tail(r, v):
    eps = epsilon_lower_bound(r, r, v)
    assert eps == pytest.approx(_binomial_bound(r, v), abs=1e-7)
    assert eps <= _binomial_bound(r, v) + 1e-9  # rounded down, never up


def test_pure_dp_ignores_m_and_p_value_is_the_binomial_tail():
    assert epsilon_lower_bound(100, 100, 90) == epsilon_lower_bound(10**6, 100, 90)
    assert p_value(500, 100, 70, 0.8) == pytest.approx(stats.binom.sf(69, 100, special.expit(0.8)), rel=1e-12)


# --- delta > 0 ---------------------------------------------------------------------------------------------------


# Exact figures from the paper are not reproduced here: its maximum-achievable-bound results are plotted, and no
# table of exact values could be found in the sources available offline. Instead these values were computed once
# with an independent maintained implementation of the same test, DeepMind's jax-privacy 2.0.0
# (`jax_privacy.auditing._epsilon_one_run(0, m, r, v, 0.05, delta)`), which needs jax and so is not a dependency.
@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        (100, 100, 100, 1e-5, 3.490216),
        (1000, 100, 100, 1e-5, 3.465376),
        (1000, 600, 600, 1e-5, 5.270400),
        (1000, 1000, 1000, 1e-5, 5.782283),
        (10_000, 1000, 1000, 1e-5, 5.529350),
        (100_000, 1000, 1000, 1e-5, 3.488995),
        (1_000_000, 1000, 1000, 1e-5, 0.569411),
        (1000, 500, 400, 1e-5, 1.197969),
        (10_000, 10_000, 8808, 1e-5, 1.948457),
    ],
)
def test_matches_independent_implementation(m, r, v, delta, expected):
    assert epsilon_lower_bound(m, r, v, delta) == pytest.approx(expected, abs=2e-6)


def test_delta_term_grows_with_m_as_in_the_paper():
    # The paper's (eps, delta) analysis pays 2 m delta, so more canaries cap the achievable bound for fixed guesses.
    bounds = [epsilon_lower_bound(m, 1000, 1000, 1e-5) for m in (1000, 10_000, 100_000, 1_000_000)]
    assert bounds == sorted(bounds, reverse=True)
    assert bounds[0] < epsilon_lower_bound(1000, 1000, 1000, 0.0)


def test_p_value_with_delta_adds_the_delta_term():
    m, r, v, eps, delta = 1000, 100, 95, 2.0, 1e-4
    q = special.expit(eps)
    tail = stats.binom.sf(v - 1, r, q)
    window = [stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - 1 - i, r, q) for i in range(1, v + 1)]
    expected = tail + 2 * m * delta * max(w / i for i, w in enumerate(window, start=1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert p_value(m, r, v, eps, 1.0) == 1.0


# --- monotonicity and no-evidence cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_more_correct_guesses_give_larger_bound(delta):
    bounds = [epsilon_lower_bound(2000, 1000, v, delta) for v in range(500, 1001, 50)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > bounds[len(bounds) // 2] > 0


def test_larger_delta_or_confidence_gives_smaller_bound():
    by_delta = [epsilon_lower_bound(5000, 1000, 900, d) for d in (0.0, 1e-7, 1e-5, 1e-4, 1e-3)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:], strict=False))
    by_confidence = [epsilon_lower_bound(5000, 1000, 900, 1e-5, c) for c in (0.9, 0.95, 0.99, 0.999)]
    assert all(a > b for a, b in zip(by_confidence, by_confidence[1:], strict=False))


@pytest.mark.parametrize(("guesses", "correct"), [(1000, 500), (1000, 510), (1000, 300), (10, 5), (0, 0), (1, 1)])
def test_random_guessing_is_no_evidence(guesses, correct):
    assert epsilon_lower_bound(1000, guesses, correct, 1e-5) == 0.0


def test_barely_better_than_chance_gives_small_bound():
    assert 0.0 < epsilon_lower_bound(10_000, 10_000, 5200) < 0.1


# --- simulation: an eps = 2 randomized-response mechanism -----------------------------------------------------------


def test_randomized_response_bound_is_valid_and_powerful():
    scores, included = _randomized_response(10_000, 2.0, np.random.default_rng(2023))
    eps, outcome = best_epsilon_lower_bound(scores, included, delta=1e-5)
    assert 1.0 < eps < 2.0
    assert outcome.guesses in {100, 200, 500, 1000, 2000, 5000, 10_000}  # the default grid
    assert outcome.correct / outcome.guesses == pytest.approx(special.expit(2.0), abs=0.03)


def test_randomized_response_coverage():
    # Each guess is right with probability exactly e^2 / (1 + e^2), the worst case of the theorem, so a 95 % bound
    # may exceed the true eps in at most ~5 % of runs (Binomial(400, 0.05) stays below 32 w.p. > 0.999).
    rng = np.random.default_rng(7)
    exceed = 0
    for _ in range(400):
        scores, included = _randomized_response(500, 2.0, rng)
        outcome = guesses_from_scores(scores, included, 250, 250)
        exceed += epsilon_lower_bound(500, outcome.guesses, outcome.correct) >= 2.0
    assert exceed < 32


# --- guesses and the grid -------------------------------------------------------------------------------------------


def test_guesses_from_scores_counts_both_sides():
    scores = [0.9, 0.1, 0.8, 0.2, 0.5, 0.7]
    included = [True, False, False, True, True, True]
    # top 2: 0.9 (in, right), 0.8 (out, wrong); bottom 2: 0.1 (out, right), 0.2 (in, wrong)
    assert guesses_from_scores(scores, included, 2, 2) == Guesses(guesses=4, correct=2)
    assert guesses_from_scores(scores, included, 0, 0) == Guesses(guesses=0, correct=0)
    assert guesses_from_scores(scores, np.array(included, dtype=int), 6, 0) == Guesses(guesses=6, correct=4)


def test_ties_are_broken_by_position():
    scores = [1.0, 1.0, 1.0, 1.0]
    assert guesses_from_scores(scores, [False, False, False, True], 1, 0) == Guesses(1, 1)  # last ranks highest
    assert guesses_from_scores(scores, [True, False, False, False], 0, 1) == Guesses(1, 0)  # first ranks lowest


def test_grid_applies_bonferroni_correction():
    scores, included = _randomized_response(2000, 1.0, np.random.default_rng(5))
    ks = [(50, 50), (200, 200), (1000, 1000)]
    eps, outcome = best_epsilon_lower_bound(scores, included, 1e-5, ks=ks)
    corrected = []
    for k_plus, k_minus in ks:
        g = guesses_from_scores(scores, included, k_plus, k_minus)
        corrected.append((epsilon_lower_bound(2000, g.guesses, g.correct, 1e-5, 1 - BETA / len(ks)), g))
    assert (eps, outcome) == max(corrected, key=lambda pair: pair[0])
    single, _ = best_epsilon_lower_bound(scores, included, 1e-5, ks=[(1000, 1000)])
    g = guesses_from_scores(scores, included, 1000, 1000)
    assert single == epsilon_lower_bound(2000, g.guesses, g.correct, 1e-5)
    assert eps <= single  # the correction costs something when the full split is the best one
    assert best_epsilon_lower_bound(scores, included, 1e-5, ks=ks + [(50, 50)]) == (eps, outcome)


def test_no_signal_gives_zero_on_the_default_grid():
    rng = np.random.default_rng(11)
    eps, _ = best_epsilon_lower_bound(rng.normal(size=3000), rng.random(3000) < 0.5, delta=1e-5)
    assert eps == 0.0


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((100, 10, 12), r"correct: 12 exceeds guesses 10"),
        ((100, 101, 50), r"guesses: 101 exceeds m 100"),
        ((0, 0, 0), r"^m: "),
        ((100, -1, 0), r"^guesses: "),
        ((100, 10, 2.5), r"^correct: "),
        ((100, True, 1), r"^guesses: "),
        ((100, 10, 5, -0.1), r"^delta: "),
        ((100, 10, 5, float("nan")), r"^delta: "),
        ((100, 10, 5, 0.0, 1.0), r"^confidence: "),
        ((100, 10, 5, 0.0, 0.0), r"^confidence: "),
    ],
)
def test_epsilon_lower_bound_validation(args, message):
    with pytest.raises(ValueError, match=message):
        epsilon_lower_bound(*args)


def test_p_value_validation():
    with pytest.raises(ValueError, match=r"^epsilon: "):
        p_value(10, 5, 5, -1.0)
    with pytest.raises(ValueError, match=r"^delta: "):
        p_value(10, 5, 5, 1.0, 2.0)


@pytest.mark.parametrize(
    ("scores", "included", "k_plus", "k_minus", "message"),
    [
        ([1.0, 2.0], [True], 1, 0, r"^included: "),
        ([1.0, 2.0], [True, 2], 1, 0, r"^included: "),
        ([1.0, float("nan")], [True, False], 1, 0, r"^scores: "),
        ([[1.0, 2.0]], [[True, False]], 1, 0, r"^scores: "),
        ([], [], 0, 0, r"^scores: "),
        ([1.0, 2.0], [True, False], -1, 0, r"^k_plus: "),
        ([1.0, 2.0], [True, False], 2, 1, r"^k_minus: k_plus \+ k_minus = 3 exceeds the number of canaries 2"),
    ],
)
def test_guesses_from_scores_validation(scores, included, k_plus, k_minus, message):
    with pytest.raises(ValueError, match=message):
        guesses_from_scores(scores, included, k_plus, k_minus)


def test_best_bound_validation():
    scores, included = [0.3, 0.1, 0.2], [True, False, True]
    with pytest.raises(ValueError, match=r"^ks: must contain"):
        best_epsilon_lower_bound(scores, included, 0.0, ks=[])
    with pytest.raises(ValueError, match=r"^ks: each entry"):
        best_epsilon_lower_bound(scores, included, 0.0, ks=[(1, 1, 1)])
    with pytest.raises(ValueError, match=r"^k_minus: "):
        best_epsilon_lower_bound(scores, included, 0.0, ks=[(2, 2)])
    with pytest.raises(ValueError, match=r"^delta: "):
        best_epsilon_lower_bound(scores, included, -1e-5)
