"""Where epsilon is computed: recorded mechanisms become dp-accounting events, events become epsilon.

As in Google's dp_accounting, what happened is separate from how it is
accounted. A ledger records *mechanisms* (`records.Mechanism`); `dp_event`
is the one reading of a mechanism as a `DpEvent`, used by the site's budget
check, by the ledger's claims and by `fedpriv audit`. Training steps, noised
evaluation counts, site-level releases and distributed-DP rounds are all
events, so they compose in one accountant:

- `pld` (default): dp-accounting's privacy loss distribution accountant, tight;
- `rdp`: dp-accounting's Renyi accountant on integer orders, an upper bound;
- `prv`: Opacus' PRV accountant, kept for ledgers written with it (it only
  knows Poisson-sampled Gaussian steps).

Composition is commutative, so a history is accounted as a multiset of events
(equal events, wherever they occur, compose as one self-composed event); that
keeps a history of hundreds of releases to a handful of compositions. Results
are memoised: every site of a federation usually shares one plan.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from importlib.metadata import version

import dp_accounting as dpa

from fedpriv.common.privacy.calibrations import Calibrations
from fedpriv.common.privacy.records import Mechanism

ACCOUNTANTS = ("pld", "prv", "rdp")
# Integer Renyi orders: exact in every RDP implementation, so an auditor's
# recomputation reproduces a claim to the last digit.
RDP_ORDERS = tuple(range(2, 256))
# PLD's discretisation: pessimistic by construction, about 0.1% above the exact value.
PLD_INTERVAL = 1e-3

# A history in canonical form: (event, times) pairs, sorted.
History = tuple[tuple[dpa.DpEvent, int], ...]


def poisson_gaussian(noise_multiplier: float, sample_rate: float, steps: int) -> dpa.DpEvent:
    """`steps` DP-SGD steps: Poisson sampling at `sample_rate`, Gaussian noise `noise_multiplier` x C."""
    if steps <= 0:
        return dpa.NoOpDpEvent()
    if noise_multiplier <= 0:
        return dpa.NonPrivateDpEvent()
    event = dpa.GaussianDpEvent(float(noise_multiplier))
    if sample_rate < 1:
        event = dpa.PoissonSampledDpEvent(float(sample_rate), event)
    return event if steps == 1 else dpa.SelfComposedDpEvent(event, int(steps))


def dp_event(mechanism: Mechanism) -> dpa.DpEvent:
    """The one reading of a recorded mechanism as a dp-accounting event."""
    # A distributed release records the accounted sigma of the sum (the audit
    # checks it against how the noise was shared). A "gaussian" release (evaluation counts, a site-level round) is the
    # q = 1 case; old ledgers wrote the site-level release that way.
    rate = 1.0 if mechanism.kind == "gaussian" else mechanism.sample_rate
    return poisson_gaussian(mechanism.noise_multiplier, rate, mechanism.steps)


def history(events: Iterable[dpa.DpEvent]) -> History:
    """Events as a multiset of (event, times): the key every accountant and cache uses."""
    counts: Counter = Counter()
    for event in events:
        _count(event, 1, counts)
    return tuple(sorted(counts.items(), key=lambda item: repr(item[0])))


def _count(event: dpa.DpEvent, times: int, counts: Counter) -> None:
    if isinstance(event, dpa.NoOpDpEvent):
        return
    if isinstance(event, dpa.SelfComposedDpEvent):
        _count(event.event, times * event.count, counts)
    elif isinstance(event, dpa.ComposedDpEvent):
        for inner in event.events:
            _count(inner, times, counts)
    else:
        counts[event] += times


_lock = threading.Lock()
_memo: dict[tuple, Future] = {}
_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpriv-accounting")


def _epsilon(key: History, delta: float, accountant: str) -> float:
    """Memoised; concurrent requests for one history share a single computation."""
    memo_key = (key, delta, accountant)
    with _lock:
        future = _memo.get(memo_key)
        owner = future is None
        if future is None:
            if len(_memo) > 4096:
                _memo.clear()
            future = _memo[memo_key] = Future()
    if owner:
        try:
            future.set_result(_compute(key, delta, accountant))
        except BaseException as error:
            with _lock:
                _memo.pop(memo_key, None)
            future.set_exception(error)
    return future.result()


def _compute(key: History, delta: float, accountant: str) -> float:
    if not key:
        return 0.0
    if any(isinstance(event, dpa.NonPrivateDpEvent) for event, _ in key):
        return math.inf
    if accountant == "prv":
        return _opacus_prv(key, delta)
    if accountant == "pld" and all(_is_subsampled_gaussian(event) for event, _ in key):
        return _pld_of_subsampled_gaussians(key, delta)
    acc = new_accountant(accountant)
    for event, times in key:
        acc.compose(event, times)
    return float(acc.get_epsilon(delta))


# A site's budget check asks, every round, for the epsilon of the same
# Poisson-sampled Gaussian step composed one more time. dp-accounting's
# PLDAccountant builds that step's distribution afresh on each call, which
# was two thirds of the check and a third of a deployed site's CPU in a
# round. `_pld_of_subsampled_gaussians` makes exactly the calls the
# accountant makes for these events (same arguments, same order), with the
# step's distribution kept; the results are the same to the last bit
# (tests/test_budget.py compares them).
def _is_subsampled_gaussian(event: dpa.DpEvent) -> bool:
    return (
        isinstance(event, dpa.PoissonSampledDpEvent)
        and isinstance(event.event, dpa.GaussianDpEvent)
        and event.sampling_probability > 0
        and event.event.noise_multiplier > 0
    )


@lru_cache(maxsize=64)
def _subsampled_gaussian_pld(event: dpa.PoissonSampledDpEvent):
    return dpa.pld.privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=event.event.noise_multiplier,
        value_discretization_interval=PLD_INTERVAL,
        sampling_prob=event.sampling_probability,
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _pld_of_subsampled_gaussians(key: History, delta: float) -> float:
    pld = dpa.pld.privacy_loss_distribution.identity(value_discretization_interval=PLD_INTERVAL)
    for event, times in key:
        pld = pld.compose(_subsampled_gaussian_pld(event).self_compose(times))
    return float(pld.get_epsilon_for_delta(delta))


def new_accountant(accountant: str) -> dpa.PrivacyAccountant:
    """A fresh dp-accounting accountant of the named kind (pld or rdp)."""
    if accountant == "pld":
        return dpa.pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    raise ValueError(f"privacy.accountant: '{accountant}' is not a dp-accounting accountant (use pld or rdp)")


def _opacus_prv(key: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for event, times in key:
        if isinstance(event, dpa.PoissonSampledDpEvent) and isinstance(event.event, dpa.GaussianDpEvent):
            sigma, rate = event.event.noise_multiplier, event.sampling_probability
        elif isinstance(event, dpa.GaussianDpEvent):
            sigma, rate = event.noise_multiplier, 1.0
        else:
            raise ValueError(f"privacy.accountant: prv cannot account {event!r}; use pld")
        for _ in range(times):
            acc.step(noise_multiplier=sigma, sample_rate=rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about numerical ranges on every call
        return float(acc.get_epsilon(delta=delta))


def library(accountant: str) -> tuple[str, str]:
    """(library, version) that computes the named accountant's claims: what a ledger records."""
    name = "opacus" if accountant == "prv" else "dp-accounting"
    return name, version(name)


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant: unknown accountant '{accountant}' (use one of {ACCOUNTANTS})")


def epsilon(events: Iterable[dpa.DpEvent], delta: float, accountant: str = "pld") -> float:
    """Epsilon spent by a sequence of releases of one site's data."""
    _check(accountant)
    return _epsilon(history(events), float(delta), accountant)


def prefetch(events: Iterable[dpa.DpEvent], delta: float, accountant: str = "pld") -> None:
    """Starts computing an epsilon that will be asked for soon (e.g. next round's check)."""
    _check(accountant)
    key = (history(events), float(delta), accountant)
    with _lock:
        if key in _memo:
            return
    _background.submit(_epsilon, *key)


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    fixed: tuple[dpa.DpEvent, ...] = (),
) -> float:
    """Smallest noise multiplier whose `steps` DP-SGD steps, with the `fixed` releases, stay within the target."""
    _check(accountant)
    fixed_spent = epsilon(fixed, delta, accountant)
    if fixed_spent >= target_epsilon:
        raise ValueError(
            f"privacy.target-epsilon: {target_epsilon:g} leaves nothing for training after the planned "
            f"evaluation releases (they alone spend {fixed_spent:.3g})"
        )

    def spent(sigma: float) -> float:
        return epsilon([poisson_gaussian(sigma, sample_rate, steps), *fixed], delta, accountant)

    def search() -> float:
        if accountant == "prv":
            sigma = _opacus_noise(target_epsilon, delta, sample_rate, steps, fixed)
        else:
            sigma = _dp_accounting_noise(accountant, target_epsilon, delta, sample_rate, steps, fixed)
        # Both searches stop within a tolerance; step up until our own accountant
        # agrees, so the plan never overshoots.
        while spent(sigma) > target_epsilon:
            sigma *= 1.01
        return float(sigma)

    inputs = {
        "target-epsilon": target_epsilon,
        "delta": delta,
        "sample-rate": sample_rate,
        "steps": steps,
        "accountant": accountant,
        "fixed": [repr(event) for event in fixed],
        "library": library(accountant),
        "pld-interval": PLD_INTERVAL,
        "rdp-orders": [RDP_ORDERS[0], RDP_ORDERS[-1], len(RDP_ORDERS)],
    }
    # A kept answer is used only once this accountant agrees that it meets the target.
    return Calibrations().find(inputs, lambda sigma: spent(sigma) <= target_epsilon, search)


def _dp_accounting_noise(
    accountant: str, target: float, delta: float, sample_rate: float, steps: int, fixed: tuple
) -> float:
    def event(sigma: float) -> dpa.DpEvent:
        return dpa.ComposedDpEvent([poisson_gaussian(sigma, sample_rate, steps), *fixed])

    # RDP is cheap at any noise and never below PLD, so its answer brackets
    # PLD's from above; PLD at tiny noise would need gigabytes.
    upper = dpa.calibrate_dp_mechanism(
        lambda: new_accountant("rdp"), event, target, delta, dpa.LowerEndpointAndGuess(1e-2, 1.0), tol=1e-4
    )
    if accountant == "rdp":
        return upper
    return dpa.calibrate_dp_mechanism(
        lambda: new_accountant(accountant),
        event,
        target,
        delta,
        dpa.ExplicitBracketInterval(upper / 2, upper),
        tol=1e-3,
    )


def _opacus_noise(target: float, delta: float, sample_rate: float, steps: int, fixed: tuple) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    if fixed:
        raise ValueError("privacy.accountant: prv cannot plan for evaluation releases; use pld")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_noise_multiplier(
            target_epsilon=target,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="prv",
            epsilon_tolerance=0.01,
        )


def steps_per_round(local_epochs: float, sample_rate: float) -> int:
    return max(1, round(local_epochs / sample_rate))


def cumulative(events: Sequence[dpa.DpEvent], delta: float, accountant: str) -> list[float]:
    """Epsilon after each release of a sequence (an audit's column)."""
    return [epsilon(events[: i + 1], delta, accountant) for i in range(len(events))]
