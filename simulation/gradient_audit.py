"""`fedpriv audit --empirical`: the white-box audit of a simulated federation, in one run.

m gradient canaries (`common/model/canaries.py`) go to one simulated site,
each by a fair coin; the federation then runs exactly as configured, except
that the head has m more inputs (which no text fills) and the aggregator
writes what it saw of their weights each round (`server/canary_observer.py`).
`audit/white_box.py` scores the canaries and tests the site's claim. The
canaries, the coins, the run and its ledgers are all in the output folder, so
`recompute` gives the same numbers from the files alone.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import pandas as pd
from rich.console import Console
from scipy import optimize

from fedpriv.audit.white_box import WhiteBoxError, WhiteBoxResult, analyse, check_auditable, claims_by_site
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, load_configured
from fedpriv.common.files import write_atomic
from fedpriv.common.model.canaries import GradientCanaries
from fedpriv.common.partition import split_for
from fedpriv.common.privacy.plan import plan_for
from fedpriv.simulation.canary_audit import checked_output
from fedpriv.simulation.harness import plan_sites, simulate

CANARIES = "canaries.safetensors"
RESULT = "white-box-audit.json"
SCORES = "scores.csv"
REPORT = "white-box-audit.html"
DRIFT = 2.0  # logits
MIN_SCALE, MAX_SCALE = 0.5, 8.0


def white_box_audit(
    config: FedprivConfig,
    output: Path,
    *,
    canaries: int = 2000,
    site: int = 0,
    fault: str | None = None,
    seed: int | None = None,
    console: Console | None = None,
) -> WhiteBoxResult:
    """Runs the federation of `config` with gradient canaries at simulated site `site`; returns the audit."""
    console = console or Console()
    check_auditable(config)
    output = checked_output(output, fault, WhiteBoxError)
    labels = LabelSet.load(config.data.labels)
    config, _, names = plan_sites(config, labels)
    if not 0 <= site < len(names):
        raise WhiteBoxError(f"--site: {site} is not a site index (0..{len(names) - 1})")
    output.mkdir(parents=True, exist_ok=True)
    seed = secrets.randbits(63) if seed is None else seed
    parts, _ = split_for(config, load_configured(config.data, labels), len(names))
    rows = sum(map(len, parts)) * (1 - config.data.validation_fraction)
    site_rows = len(parts[site]) * (1 - config.data.validation_fraction) + canaries / 2
    made = GradientCanaries.draw(canaries, len(labels), seed, scale=canary_scale(config, rows, site_rows))
    made.save(output / CANARIES)
    name = names[site]
    run_config = config.replace(
        **{
            "simulation.audit-canaries": len(made),
            "simulation.audit-canary-site": name,
            "run-dir": str(output / "run"),
            # The observations hold what the audit reads; every round's checkpoint (the head grows by the
            # canaries' weights) would double the folder's hundreds of MB for nothing.
            "keep-checkpoints": config.keep_checkpoints or 3,
        }
    )
    console.print(
        f"White-box audit: {len(made)} gradient canaries, {int(made.included.sum())} of them (by coin) in "
        f"{name}'s data" + (f"; [red]deliberate fault {fault}[/]" if fault else "")
    )
    run = simulate(run_config, console=console, audit_fault=fault, audit_canaries=output / CANARIES)
    return _judge(output, run.path, made, name, fault, seed)


def canary_scale(config: FedprivConfig, rows: float, site_rows: float) -> float:
    """The input scale s at which an included canary's own steps move its logit by about DRIFT over the run.

    Larger s gives the canary a larger share of its clipped gradient (the bias takes 1 / (1 + s^2)) but
    makes it learned sooner, and a learned canary's gradient fades. Only the audit's power depends on s,
    never its validity.
    """
    plan = plan_for(config)
    normaliser = (
        plan.federation_normaliser(lambda: int(rows)) if plan.distributed else plan.site_normaliser(int(site_rows))
    )
    samplings = plan.sample_rate * plan.steps_per_round * config.rounds
    rate = plan.learning_rate / normaliser * samplings * config.privacy.max_grad_norm

    def drift(s: float) -> float:
        return s * s / math.sqrt(1 + s * s) * rate - DRIFT

    if drift(MAX_SCALE) <= 0:
        return MAX_SCALE
    if drift(MIN_SCALE) >= 0:
        return MIN_SCALE
    return float(optimize.brentq(drift, MIN_SCALE, MAX_SCALE))


def _judge(
    output: Path, run_dir: Path, made: GradientCanaries, site: str, fault: str | None, seed: int | None
) -> WhiteBoxResult:
    claims = claims_by_site(run_dir)
    if site not in claims:
        raise WhiteBoxError(f"{run_dir}: {site}, the canary site, claims no finite epsilon; did it ever train?")
    claimed, delta = claims[site]
    result, scores = analyse(run_dir, made, site, claimed, delta, fault=fault, seed=seed)
    write_atomic(output / SCORES, pd.DataFrame({"included": made.included, "score": scores}).to_csv(index=False))
    write_atomic(output / RESULT, json.dumps(result.to_json(), indent=2))
    from fedpriv.audit.white_box_render import white_box_html

    write_atomic(output / REPORT, white_box_html(result, scores, made.included))
    return result


def recompute(output: Path) -> WhiteBoxResult:
    """The audit again from what it wrote (the canaries, the run, its ledgers and observations)."""
    output = Path(output)
    saved = json.loads((output / RESULT).read_text(encoding="utf-8"))
    made = GradientCanaries.load(output / CANARIES)
    claims = claims_by_site(output / "run")
    claimed, delta = claims[saved["site"]]
    result, _ = analyse(output / "run", made, saved["site"], claimed, delta, fault=saved["fault"], seed=saved["seed"])
    return result
