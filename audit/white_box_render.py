"""The white-box audit for people: its findings in words, and the canary scores against the claim's trade-off."""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from fedpriv.audit.white_box import (
    BOUND_CONFIDENCE,
    CHECK_LEVEL,
    WhiteBoxResult,
    claim_tradeoff,
    gdp_tradeoff,
    tradeoff_points,
)


def verdict(result: WhiteBoxResult) -> str:
    return "REFUTED" if result.refuted else "consistent"


def lines(r: WhiteBoxResult) -> list[str]:
    """The findings, one sentence each, as the console and the report show them."""
    released = "each round's released sum" if r.kind == "sum" else f"{r.site}'s update each round"
    return [
        f"{r.canaries} gradient canaries, {r.included} included by coin at {r.site}; scored on {released} "
        f"({r.rounds} rounds)",
        f"claim: epsilon {r.claimed:.3f} at delta {r.delta:g} ({r.site}'s verified ledger)",
        f"score bound (Steinke et al.): epsilon >= {r.lower_bound:.3f} at {BOUND_CONFIDENCE:.0%} confidence "
        f"({r.correct} of {r.guesses} guesses right)",
        f"Gaussian trade-off estimate: mu = {r.mu:.3f} (>= {r.mu_low:.3f} at {BOUND_CONFIDENCE:.0%}), "
        f"epsilon >= {r.gdp_epsilon:.3f} at delta {r.delta:g} if the scores are Gaussian (an estimate)",
        f"noise check: the release holds {r.noise_ratio:.4f} +/- {r.noise_ratio_se:.4f} of the noise variance "
        f"the ledgers record (the claim needs {r.needed_ratio:.3f}; {r.noise_numbers:,} numbers); the noise "
        f"measured allows epsilon {r.implied_epsilon:.3f}",
        f"clip check: a sampled canary moves the release by {r.move_per_sampling:.3f} +/- {r.move_se:.3f} "
        f"(clipping at {r.clip_norm:g} allows {r.move_limit:.3f})",
    ]


def tradeoff_png(result: WhiteBoxResult, scores: np.ndarray, included: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = np.asarray(tradeoff_points(scores, included, points=200))
    floor = 1.0 / max(int((~included).sum()), 1)  # the smallest rate the canaries can show
    alpha = np.geomspace(floor / 10, 1, 400)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    claim = claim_tradeoff(result.claimed, result.delta, alpha)
    ax.plot(alpha, claim, color="#080", label=f"the claim's limit (epsilon {result.claimed:.2f})")
    ax.plot(
        alpha, gdp_tradeoff(result.mu, alpha), color="#36c", linestyle="--", label=f"Gaussian fit, mu {result.mu:.2f}"
    )
    ax.plot(alpha, 1 - alpha, color="grey", linewidth=0.6, label="guessing")
    shown = (points[:, 0] > 0) & (points[:, 1] > 0)
    ax.scatter(points[shown, 0], points[shown, 1], s=10, color="#b00", label="canary scores (thresholds)", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate (excluded canary called included)")
    ax.set_ylabel("false negative rate (included canary called excluded)")
    ax.set_title("Canary scores against the claim's trade-off")
    ax.set_xlim(floor / 10, 1)
    ax.set_ylim(floor / 10, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def white_box_html(result: WhiteBoxResult, scores: np.ndarray, included: np.ndarray) -> str:
    status = verdict(result)
    findings = "".join(f"<li>{html.escape(line)}</li>" for line in lines(result))
    problems = "".join(f"<li class='bad'>{html.escape(p)}</li>" for p in result.problems) or "<li>none</li>"
    plot = base64.b64encode(tradeoff_png(result, scores, included)).decode()
    fault = f"<p class='bad'>This run was broken on purpose: {html.escape(result.fault)}.</p>" if result.fault else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedpriv white-box audit: {status}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}.bad{{color:#b00}}
h1 span{{color:{"#b00" if result.refuted else "#080"}}}</style></head>
<body><h1>White-box privacy audit of {html.escape(result.site)}: <span>{status}</span></h1>{fault}
<p><b>What was tested.</b> Canaries were put where no real record reaches: head inputs that text never fills.
Each was included by a fair coin and then trained like any record (sampled, clipped, noised, summed). The
auditor saw what the aggregator sees every round and scored each canary by how far the releases moved
along its gradient. The coins stay secret until scoring. A privacy claim of (epsilon, delta) limits how well
any score can tell included canaries from excluded ones: every point must stay above the green curve (both
axes are logarithmic; a rate of zero cannot be drawn).</p>
<ul>{findings}</ul>
<h2>Findings against the claim</h2><ul>{problems}</ul>
<img alt="canary scores against the claim's trade-off curve" src="data:image/png;base64,{plot}">
<p><b>What this proves and what it does not.</b> A score bound above the claim, noise below the record or a
canary moving the release by more than the clip norm proves the claim false (at {BOUND_CONFIDENCE:.0%} for the
bound, at {1 - CHECK_LEVEL:.4%} for the checks). A bound below the claim does not prove the claim true: it
shows only that these canaries found no more. The noise check measures the noise actually added, which is
what the ledgers' epsilon rests on; the clip check covers the canary site only.</p>
</body></html>"""
