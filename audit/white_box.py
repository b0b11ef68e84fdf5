"""The white-box empirical audit: gradient canaries scored on every round's release, as the aggregator saw it.

The canaries (`common/model/canaries.py`) live in head inputs that no text
fills, so the weights of canary j receive nothing but canary j's clipped
gradient (when it is sampled) and the noise. The run's aggregator wrote what
it saw of those weights each round (`server/canary_observer.py`): the noisy
sum under distributed noise, the canary site's update under local noise. From
that, the ledgers and the canaries alone, this module derives four tests of
the canary site's claim (epsilon, delta):

1. **Score bound** (Steinke, Nasr & Jagielski 2023, `empirical_bound`). Canary
   j's score is the sum over rounds of the released gradient sum's projection
   on canary j's gradient direction at the weights sent (which the auditor can
   compute: it knows the canary and the weights). An epsilon lower bound at 95%.
2. **Gaussian trade-off estimate.** The scores of included and excluded
   canaries are sums of many independent rounds, so close to Gaussian; their
   separation mu is a Gaussian-DP parameter, whose epsilon at delta is an
   estimate (at 95%, from mu's lower confidence limit) beside the bound. Not
   a proof: it holds as far as the scores are Gaussian.
3. **Noise check.** Orthogonal to each canary's own direction a canary's
   weights hold nothing but noise, so the noise actually added is measured
   over (labels - 1) x canaries x rounds numbers. It is compared with what the
   ledgers record (every share of the sum, or every step of the site), and the
   epsilon the measured noise allows is recomputed by the same accountant.
4. **Clip check.** A canary's gradient is s x d on its weights and d on the
   bias (d = softmax - one-hot label), so clipped to C it moves its weights
   by at most C x s / sqrt(1 + s^2) each time it is sampled; the mean score
   of the included canaries against the excluded ones estimates that move.

Tests 3 and 4 decide at 1e-6 (one-sided), the score bound at 95%: a run is
refuted when the bound exceeds the claim, when the release holds less noise
than the ledgers record or than the claim needs, or when canaries move it by
more than the clip norm.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from scipy import optimize, special, stats

from fedpriv.audit.empirical_bound import best_epsilon_lower_bound
from fedpriv.common.config import FedprivConfig, parse_config, read_toml
from fedpriv.common.errors import FedprivError
from fedpriv.common.model.canaries import GradientCanaries
from fedpriv.common.privacy.accounting import dp_event, epsilon
from fedpriv.common.privacy.ledger import verify_ledger
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.records import Mechanism, PrivacyRecord
from fedpriv.common.rundir import RunDirectory

BOUND_CONFIDENCE = 0.95
# The score bound guesses on these shares of the canaries (half "included", half "excluded"), fixed before
# any score is seen: fewer, better-placed tests than the black-box grid lose less to the Bonferroni correction
# (simulated at this audit's separation: 2.6 against 2.4 on average for 1000 canaries).
GUESS_FRACTIONS = (0.05, 0.1, 0.2)
CHECK_LEVEL = 1e-6  # one-sided error of the noise and clip checks
_Z_CHECK = float(stats.norm.isf(CHECK_LEVEL))
_Z_95 = float(stats.norm.isf(1 - BOUND_CONFIDENCE))


class WhiteBoxError(FedprivError, ValueError):
    pass


@dataclass(frozen=True)
class Observation:
    round: int
    kind: str  # "sum" (distributed noise) or "update" (the canary site's update, local noise)
    sites: list[str]
    sent_weight: np.ndarray  # labels x canaries: the canary inputs' weights as sent
    sent_bias: np.ndarray
    released: np.ndarray  # labels x canaries


def read_observations(run: RunDirectory) -> list[Observation]:
    folder = run.canary_observations
    paths = sorted(folder.glob("round-*.safetensors")) if folder.is_dir() else []
    if not paths:
        raise WhiteBoxError(f"{folder}: no canary observations; was this run made by fedpriv audit --empirical?")
    out = []
    for path in paths:
        try:
            with safe_open(str(path), framework="numpy") as handle:
                meta = handle.metadata() or {}
                out.append(
                    Observation(
                        round=int(meta["round"]),
                        kind=meta["kind"],
                        sites=list(json.loads(meta["sites"])),
                        sent_weight=handle.get_tensor("sent-weight").astype(np.float64),
                        sent_bias=handle.get_tensor("sent-bias").astype(np.float64),
                        released=handle.get_tensor("released").astype(np.float64),
                    )
                )
        except Exception as error:
            raise WhiteBoxError(f"{path}: not a canary observation ({error})") from None
    return out


def _mechanisms(run: RunDirectory, site: str) -> list[tuple[int, Mechanism]]:
    """(round, mechanism) of every release in a site's verified ledger, in order."""
    entries, problems = verify_ledger(run.ledger_path(site))
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise WhiteBoxError(f"{run.ledger_path(site)}: {fatal[0].where}: {fatal[0].message}")
    return [(e.record.round, e.record.mechanism) for e in entries if isinstance(e.record, PrivacyRecord)]


def _releases(run: RunDirectory, sites: set[str]) -> dict[str, dict[int, Mechanism]]:
    """Each site's update mechanisms by round."""
    return {site: {rnd: m for rnd, m in _mechanisms(run, site) if m.query != "evaluation"} for site in sorted(sites)}


@dataclass(frozen=True)
class RoundNoise:
    recorded: float  # variance per number of the observed gradient sum that the ledgers record
    needed: float  # variance the claim needs (the accounted noise)
    samplings: float  # expected times an included canary is sampled (0 if the canary site is not in it)
    scale: float  # observed number -> gradient-sum units


def _round_noise(
    obs: Observation, releases: dict[str, dict[int, Mechanism]], site: str, learning_rate: float
) -> RoundNoise:
    own = releases[site].get(obs.round)
    if obs.kind == "sum":
        recorded = 0.0
        for name in obs.sites:
            mechanism = releases.get(name, {}).get(obs.round)
            if mechanism is None or mechanism.distributed is None:
                raise WhiteBoxError(f"round {obs.round}: {name}'s ledger records no distributed release")
            recorded += (mechanism.distributed.noise_share * mechanism.max_grad_norm) ** 2
        if own is None or own.distributed is None:
            raise WhiteBoxError(f"round {obs.round}: {site}'s ledger records no distributed release")
        needed = (own.noise_multiplier * own.max_grad_norm) ** 2
        samplings = own.sample_rate * own.steps if site in obs.sites else 0.0
        return RoundNoise(recorded, needed, samplings, 1.0)
    if own is None:
        raise WhiteBoxError(f"round {obs.round}: {site}'s ledger records no release of the update observed")
    if not own.normaliser:
        raise WhiteBoxError(f"round {obs.round}: {site}'s release records no normaliser")
    variance = own.steps * (own.noise_multiplier * own.max_grad_norm) ** 2
    # Plain SGD: the update is -lr x (the steps' noisy clipped sums) / normaliser.
    return RoundNoise(variance, variance, own.sample_rate * own.steps, -own.normaliser / learning_rate)


def _directions(obs: Observation, canaries: GradientCanaries) -> np.ndarray:
    """Unit directions (labels x canaries) of each canary's gradient on its weights at the weights sent."""
    logits = canaries.scale * obs.sent_weight + obs.sent_bias[:, None]
    p = special.softmax(logits, axis=0)
    p[canaries.labels, np.arange(len(canaries))] -= 1.0
    return p / np.linalg.norm(p, axis=0, keepdims=True).clip(min=1e-12)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at delta of mu-Gaussian DP (Dong, Roth & Su 2019): the tight conversion."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf

    def gap(eps: float) -> float:
        return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)) - delta

    if gap(0.0) <= 0:
        return 0.0
    high = 1.0
    while gap(high) > 0:
        high *= 2
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-9))


@dataclass
class WhiteBoxResult:
    site: str
    canaries: int
    included: int
    rounds: int
    kind: str
    claimed: float
    delta: float
    clip_norm: float
    # 1. the score bound
    lower_bound: float
    guesses: int
    correct: int
    # 2. the Gaussian trade-off estimate
    mu: float
    mu_low: float
    gdp_epsilon: float
    # 3. the noise check
    noise_ratio: float  # measured / recorded variance
    noise_ratio_se: float
    noise_numbers: int
    needed_ratio: float  # what the claim needs / recorded
    implied_epsilon: float  # from the most noise consistent with the measurement
    # 4. the clip check
    move_per_sampling: float
    move_se: float
    move_limit: float  # the most a clipped canary can move its own direction: C x s / sqrt(1 + s^2)
    fault: str | None = None
    seed: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def refuted(self) -> bool:
        return bool(self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "refuted": self.refuted,
            "bound-confidence": BOUND_CONFIDENCE,
            "check-level": CHECK_LEVEL,
        }


def analyse(
    run_dir: Path,
    canaries: GradientCanaries,
    site: str,
    claimed: float,
    delta: float,
    *,
    fault: str | None = None,
    seed: int | None = None,
) -> tuple[WhiteBoxResult, np.ndarray]:
    """The four tests from what the run recorded; returns the result and the canaries' scores."""
    run = RunDirectory(run_dir)
    config = parse_config(read_toml(run.config_path, "run config", WhiteBoxError), str(run.config_path))
    plan = plan_for(config)
    observations = read_observations(run)
    releases = _releases(run, {site, *(s for o in observations for s in o.sites)})
    k = len(canaries)
    scores = np.zeros(k)
    residual, numbers = 0.0, 0
    samplings = 0.0
    needed_over_recorded: list[float] = []
    for obs in observations:
        if obs.released.shape != (len(obs.sent_bias), k):
            raise WhiteBoxError(f"round {obs.round}: observed {obs.released.shape}, expected {k} canary inputs")
        noise = _round_noise(obs, releases, site, plan.learning_rate)
        gradient = obs.released * noise.scale
        u = _directions(obs, canaries)
        projection = np.einsum("lk,lk->k", gradient, u)
        scores += projection
        residual += (float(np.sum(gradient**2)) - float(np.sum(projection**2))) / noise.recorded
        numbers += (gradient.shape[0] - 1) * k
        samplings += noise.samplings
        needed_over_recorded.append(noise.needed / noise.recorded)
    included = canaries.included
    grid = [(round(f * k / 2), round(f * k / 2)) for f in GUESS_FRACTIONS]
    bound, guesses = best_epsilon_lower_bound(scores.tolist(), included.tolist(), delta, BOUND_CONFIDENCE, ks=grid)
    inc, exc = scores[included], scores[~included]
    diff = float(inc.mean() - exc.mean())
    se = float(math.sqrt(inc.var(ddof=1) / len(inc) + exc.var(ddof=1) / len(exc)))
    spread = float(exc.std(ddof=1))
    if spread > 0:
        mu, mu_low = diff / spread, max(0.0, (diff - _Z_95 * se) / spread)
    else:  # no noise at all on the excluded canaries: any move of an included one gives it away
        mu = mu_low = math.inf if diff > 0 else 0.0
    ratio = residual / numbers
    ratio_se = math.sqrt(2.0 / numbers)
    needed = max(needed_over_recorded)
    # The most noise the measurement allows, as a share of what the claim accounted: the epsilon it implies.
    most = (ratio + _Z_CHECK * ratio_se) / np.asarray(needed_over_recorded)
    implied = _implied_epsilon(_mechanisms(run, site), observations, most, delta, config)
    move = diff / samplings if samplings else 0.0
    move_se = se / samplings if samplings else 0.0
    clip = config.privacy.max_grad_norm
    result = WhiteBoxResult(
        site=site,
        canaries=k,
        included=int(included.sum()),
        rounds=len(observations),
        kind=observations[0].kind,
        claimed=claimed,
        delta=delta,
        clip_norm=clip,
        lower_bound=bound,
        guesses=guesses.guesses,
        correct=guesses.correct,
        mu=mu,
        mu_low=mu_low,
        gdp_epsilon=gdp_epsilon(mu_low, delta),
        noise_ratio=ratio,
        noise_ratio_se=ratio_se,
        noise_numbers=numbers,
        needed_ratio=needed,
        implied_epsilon=implied,
        move_per_sampling=move,
        move_se=move_se,
        move_limit=clip * canaries.scale / math.sqrt(1 + canaries.scale**2),
        fault=fault,
        seed=seed,
    )
    result.problems = _problems(result)
    return result, scores


def _implied_epsilon(
    own: list[tuple[int, Mechanism]], observations: Sequence[Observation], most: np.ndarray, delta: float, config
) -> float:
    """The canary site's epsilon with each observed update's noise at the most the measurement allows."""
    by_round = dict(zip((o.round for o in observations), most, strict=True))
    events = []
    for rnd, mechanism in own:
        factor = math.sqrt(max(by_round.get(rnd, 1.0), 0.0)) if mechanism.query != "evaluation" else 1.0
        events.append(dp_event(mechanism.model_copy(update={"noise_multiplier": mechanism.noise_multiplier * factor})))
    return epsilon(events, delta, config.privacy.accountant)


def _problems(r: WhiteBoxResult) -> list[str]:
    problems = []
    if r.lower_bound > r.claimed:
        problems.append(
            f"score bound: epsilon >= {r.lower_bound:.3f} at {BOUND_CONFIDENCE:.0%} confidence, above the claim "
            f"{r.claimed:.3f}"
        )
    z = (r.noise_ratio - 1.0) / r.noise_ratio_se
    if z < -_Z_CHECK:
        problems.append(
            f"noise check: the release holds {r.noise_ratio:.4f} of the noise variance the ledgers record "
            f"(+/- {r.noise_ratio_se:.4f}; z = {z:.1f}): a site added less noise than it recorded"
        )
    if r.implied_epsilon > r.claimed * (1 + 1e-6):
        problems.append(
            f"noise check: the noise measured in the release allows epsilon {r.implied_epsilon:.3f} at most "
            f"generously, above the claim {r.claimed:.3f}"
        )
    if r.move_per_sampling - _Z_CHECK * r.move_se > r.move_limit:
        problems.append(
            f"clip check: a sampled canary moves the release by {r.move_per_sampling:.3f} (+/- {r.move_se:.3f}), "
            f"more than clipping at {r.clip_norm:g} allows ({r.move_limit:.3f}): gradients were not clipped as "
            "recorded"
        )
    return problems


def tradeoff_points(scores: np.ndarray, included: np.ndarray, points: int = 60) -> list[tuple[float, float]]:
    """(false positive rate, false negative rate) of 'included if score >= threshold', over thresholds."""
    inc, exc = np.sort(scores[included]), np.sort(scores[~included])
    out = []
    for threshold in np.quantile(scores, np.linspace(0, 1, points)):
        alpha = float(np.mean(exc >= threshold))
        beta = float(np.mean(inc < threshold))
        out.append((alpha, beta))
    return out


def claim_tradeoff(epsilon_: float, delta: float, alpha: np.ndarray) -> np.ndarray:
    """The lowest false negative rate (epsilon, delta)-DP allows at false positive rate alpha."""
    e = math.exp(min(epsilon_, 700.0))
    return np.maximum.reduce([np.zeros_like(alpha), 1 - delta - e * alpha, (1 - delta - alpha) / e])


def gdp_tradeoff(mu: float, alpha: np.ndarray) -> np.ndarray:
    return stats.norm.cdf(stats.norm.isf(np.clip(alpha, 1e-12, 1 - 1e-12)) - mu)


def claims_by_site(run_dir: Path) -> dict[str, tuple[float, float]]:
    """Each site's claimed (epsilon, delta), from the run's verified ledgers (the ledger audit must pass)."""
    from fedpriv.audit.auditor import audit

    report = audit([run_dir])
    if not report.ok:
        problems = "; ".join(p.message for p in report.problems if p.fatal)
        raise WhiteBoxError(f"{run_dir}: the run's ledgers do not verify ({problems})")
    out: dict[str, tuple[float, float]] = defaultdict(lambda: (math.nan, math.nan))
    for entry in report.sites:
        if entry.epsilon is not None:
            out[entry.site] = (float(entry.epsilon), entry.delta)
    return dict(out)


def check_auditable(config: FedprivConfig) -> None:
    """What the white-box audit needs of a run's settings, each refusal naming its setting."""
    if not config.privacy.enabled:
        raise WhiteBoxError("privacy.enabled: the run claims no epsilon; there is nothing to audit")
    if config.model.mode != "head":
        raise WhiteBoxError(
            f"model.mode: the white-box audit puts its canaries on the head's inputs (mode head), not {config.model.mode}"
        )
    if config.simulation.ray_address:
        raise WhiteBoxError("simulation.ray-address: the white-box audit runs its sites on this machine")
    if config.privacy.noise == "local":
        plan = plan_for(config)
        train = config.train
        if plan.optimizer != "sgd" or train.momentum or train.weight_decay:
            raise WhiteBoxError(
                "train.optimizer/momentum/weight-decay: under local noise the audit reads a site's update as "
                "its noisy gradient sums times the learning rate, which needs plain SGD"
            )
        if config.strategy.name == "fedprox":
            raise WhiteBoxError("strategy.name: fedprox adds a proximal term to a site's update; audit with fedavg")
