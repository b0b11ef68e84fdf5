"""Empirical epsilon lower bound from one training run (Steinke, Nasr & Jagielski, 2023).

Implements the auditing analysis of T. Steinke, M. Nasr and M. Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023 (arXiv:2305.08846). Setting: m canaries are each included in training
independently with probability 1/2. After training the auditor scores every canary, guesses "included" for the
k+ highest scores and "excluded" for the k- lowest, and abstains on the rest: r = k+ + k- guesses of which v are
correct. The paper proves that if training is (eps, delta)-DP then, with q = e^eps / (1 + e^eps),

    P[V >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i

(for delta = 0 this is stochastic dominance of V by Binomial(r, q); the delta term is the one computed in the
paper's appendix and is why m, not only r, enters). `p_value` evaluates the right-hand side, and
`epsilon_lower_bound` returns the largest eps that this test rejects at level beta = 1 - confidence, so that
"training is not (eps_lb, delta)-DP" holds with confidence at least `confidence`. This is the paper's estimator,
written from its statement with numpy/scipy (no maintained light-weight package provides it: jax-privacy's
`auditing` module has one, but importing it pulls in jax).

The guarantee needs the inclusion coins to be fair and independent of everything but training, and the guesses to
be a function of the trained model (here: of the scores) chosen without looking at which canaries were included.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "DEFAULT_GRID_FRACTIONS",
    "Guesses",
    "best_epsilon_lower_bound",
    "epsilon_lower_bound",
    "guesses_from_scores",
    "p_value",
]

# Fractions of the m canaries guessed on (half "included", half "excluded") by best_epsilon_lower_bound.
DEFAULT_GRID_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

_SCAN_POINTS = 64
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Guesses:
    """Outcome of an audit: how many canaries were guessed on (abstentions excluded) and how many correctly."""

    guesses: int
    correct: int


def _count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool):  # True would silently count as 1 guess
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name}: must be at least {minimum}, got {number}")
    return number


def _probability(name: str, value: float, *, closed_low: bool, closed_high: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number, got {value!r}") from None
    low_ok = number >= 0 if closed_low else number > 0
    high_ok = number <= 1 if closed_high else number < 1
    if not (low_ok and high_ok):
        interval = ("[" if closed_low else "(") + "0, 1" + ("]" if closed_high else ")")
        raise ValueError(f"{name}: must be in {interval}, got {value!r}")
    return number


def _check_counts(m: object, guesses: object, correct: object) -> tuple[int, int, int]:
    m = _count("m", m, minimum=1)
    guesses = _count("guesses", guesses)
    correct = _count("correct", correct)
    if guesses > m:
        raise ValueError(f"guesses: {guesses} exceeds m {m}")
    if correct > guesses:
        raise ValueError(f"correct: {correct} exceeds guesses {guesses}")
    return m, guesses, correct


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    q = special.expit(epsilon)  # accuracy of eps-DP randomized response, the worst case for delta = 0
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return tail
    # window[i - 1] = P[v - i <= B < v]: a sum of positive terms, so no cancellation for large q.
    window = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[at least `correct` of `guesses` guesses are right] if training is (epsilon, delta)-DP."""
    m, guesses, correct = _check_counts(m, guesses, correct)
    if not epsilon >= 0:  # also rejects NaN
        raise ValueError(f"epsilon: must be >= 0, got {epsilon!r}")
    delta = _probability("delta", delta, closed_low=True, closed_high=True)
    return _p_value(m, guesses, correct, float(epsilon), delta)


def _pure_dp_bound(r: int, v: int, beta: float) -> float:
    # With delta = 0 the p-value is a binomial tail, increasing in eps, so the rejected set is an interval [0, x).
    def excess(eps: float) -> float:
        return float(stats.binom.sf(v - 1, r, special.expit(eps))) - beta

    if excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:  # terminates: the tail tends to 1 as eps grows (expit rounds to 1.0 by eps ~ 37)
        high *= 2
    return float(optimize.brentq(excess, 0.0, high, xtol=_TOLERANCE, rtol=4 * np.finfo(float).eps))


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest eps such that (eps, delta)-DP is rejected at `confidence` after `correct` of `guesses` right guesses.

    `m` is the number of canaries that were randomly included or excluded (abstentions included); it matters only
    when delta > 0. Returns 0.0 when the outcome is no evidence against (0, delta)-DP, e.g. random guessing.
    The value is rounded down, so the bound stays valid.
    """
    m, guesses, correct = _check_counts(m, guesses, correct)
    delta = _probability("delta", delta, closed_low=True, closed_high=True)
    beta = 1.0 - _probability("confidence", confidence, closed_low=False, closed_high=False)
    if guesses == 0:
        return 0.0
    # The delta term only adds to the p-value, so the pure-DP bound caps the answer and brackets the search.
    cap = _pure_dp_bound(guesses, correct, beta)
    if delta == 0 or cap == 0:
        return cap

    def rejected(eps: float) -> bool:
        return _p_value(m, guesses, correct, eps, delta) < beta

    # The delta term makes the p-value non-monotone in eps, so look for the *largest* rejected eps rather than the
    # first crossing. Reporting sup{eps : p(eps) < beta} is still valid: if training is (eps*, delta)-DP it is also
    # (eps, delta)-DP for every eps >= eps*, so overshooting eps* needs V >= v' for some v' whose p-value at such an
    # eps is below beta, an event of probability below beta. Missing a narrow dip between grid points only makes
    # the answer smaller, i.e. more conservative.
    grid = np.linspace(0.0, cap, _SCAN_POINTS + 1)
    flags = [rejected(float(eps)) for eps in grid[:-1]]  # at `cap` itself p >= the pure-DP p-value = beta
    if not any(flags):
        return 0.0
    last = max(i for i, flag in enumerate(flags) if flag)
    low, high = float(grid[last]), float(grid[last + 1])
    while high - low > _TOLERANCE * max(1.0, high):
        middle = 0.5 * (low + high)
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def _scores_and_labels(scores: object, included: object) -> tuple[np.ndarray, np.ndarray]:
    try:
        values = np.asarray(scores, dtype=float)
    except (TypeError, ValueError):
        raise ValueError("scores: must be numbers") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores: must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores: must all be finite (NaN or inf cannot be ranked)")
    labels = np.asarray(included)
    if labels.shape != values.shape:
        raise ValueError(f"included: shape {labels.shape} does not match scores shape {values.shape}")
    if labels.dtype != bool:
        if labels.dtype.kind not in "iuf" or not np.all((labels == 0) | (labels == 1)):
            raise ValueError("included: must be booleans (or 0/1)")
        labels = labels.astype(bool)
    return values, labels


def _check_split(k_plus: object, k_minus: object, m: int) -> tuple[int, int]:
    k_plus = _count("k_plus", k_plus)
    k_minus = _count("k_minus", k_minus)
    if k_plus + k_minus > m:
        raise ValueError(f"k_minus: k_plus + k_minus = {k_plus + k_minus} exceeds the number of canaries {m}")
    return k_plus, k_minus


def _guess(order: np.ndarray, labels: np.ndarray, k_plus: int, k_minus: int) -> Guesses:
    top = order[order.size - k_plus :]
    bottom = order[:k_minus]
    correct = int(np.count_nonzero(labels[top]) + np.count_nonzero(~labels[bottom]))
    return Guesses(guesses=k_plus + k_minus, correct=correct)


def guesses_from_scores(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int) -> Guesses:
    """Guess "included" for the `k_plus` highest scores and "excluded" for the `k_minus` lowest; count hits.

    Higher score means more likely included. Equal scores are ranked by position (a later canary ranks higher),
    so the result is deterministic; shuffle canaries beforehand if their order could carry information.
    """
    values, labels = _scores_and_labels(scores, included)
    k_plus, k_minus = _check_split(k_plus, k_minus, values.size)
    return _guess(np.argsort(values, kind="stable"), labels, k_plus, k_minus)


def _default_grid(m: int) -> list[tuple[int, int]]:
    grid: list[tuple[int, int]] = []
    for fraction in DEFAULT_GRID_FRACTIONS:
        r = max(1, round(fraction * m))
        pair = ((r + 1) // 2, r // 2)
        if pair not in grid:
            grid.append(pair)
    return grid


def best_epsilon_lower_bound(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    ks: Sequence[tuple[int, int]] | None = None,
) -> tuple[float, Guesses]:
    """Best bound over a fixed grid of (k_plus, k_minus) choices, corrected so it stays valid at `confidence`.

    Picking the number of guesses after seeing the outcome inflates confidence (the paper reports the best
    choice, but that number is optimistic). Here each of the n grid points is tested at level (1 - confidence) / n
    (Bonferroni), so the maximum is a valid bound at `confidence` overall, provided the grid is fixed before the
    scores are seen. Default grid: guess on 1, 2, 5, 10, 20, 50 and 100 % of the canaries, split evenly between
    "included" and "excluded". Returns the bound and the guesses that achieved it (the first best on ties).
    """
    values, labels = _scores_and_labels(scores, included)
    delta = _probability("delta", delta, closed_low=True, closed_high=True)
    beta = 1.0 - _probability("confidence", confidence, closed_low=False, closed_high=False)
    m = values.size
    if ks is None:
        grid = _default_grid(m)
    else:
        grid = []
        for pair in ks:
            try:
                k_plus, k_minus = pair
            except (TypeError, ValueError):
                raise ValueError(f"ks: each entry must be a (k_plus, k_minus) pair, got {pair!r}") from None
            checked = _check_split(k_plus, k_minus, m)
            if checked not in grid:  # a repeated pair is one test, not two
                grid.append(checked)
        if not grid:
            raise ValueError("ks: must contain at least one (k_plus, k_minus) pair")
    per_test_confidence = 1.0 - beta / len(grid)
    order = np.argsort(values, kind="stable")
    best: tuple[float, Guesses] | None = None
    for k_plus, k_minus in grid:
        outcome = _guess(order, labels, k_plus, k_minus)
        eps = epsilon_lower_bound(m, outcome.guesses, outcome.correct, delta, per_test_confidence)
        if best is None or eps > best[0]:
            best = (eps, outcome)
    assert best is not None
    return best
