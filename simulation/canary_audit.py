"""`fedpriv audit --empirical`: test a simulated federation's privacy claim with canaries, in one run.

The one-run audit of Steinke, Nasr & Jagielski (2023): m canaries (strings of
random words, each with a random label) are made, and a fair coin per canary
decides whether it joins one site's training data. The federation then trains
exactly as configured. Every canary is scored on the released model: how much
more likely it finds the canary's label than the auditor's reference model
does (the same federation trained without canaries and without noise, with
its own randomness, so it predicts how training moves a canary that was not
included without knowing anything of the audited run's coins or noise). The
highest scores are guessed "included", the lowest "excluded"; from the number
of right guesses `empirical_bound` derives an epsilon that the run provably
does not satisfy (at 95% confidence). An honest run keeps this lower bound
below the epsilon its ledger claims; a bound above the claim proves the claim
false, whatever the ledger says.

A lower bound, not an estimate: a small one does not show that the claim is
tight, and the method cannot certify more than about ln(m) (all m guesses
right), so a claim of epsilon 8 can only be caught broken with a smaller
claim or very many canaries. Everything needed to recompute the bound (the
canaries, the coins' seed, the scores, the run) is written to the output.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from fedpriv.audit.auditor import audit
from fedpriv.audit.empirical_bound import best_epsilon_lower_bound
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, load_configured, read_column
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import write_atomic
from fedpriv.common.node_config import audit_fault
from fedpriv.common.partition import split_for
from fedpriv.simulation.harness import simulate

CANARY_WORDS = 8
CONFIDENCE = 0.95
SITE_COLUMN = "fedpriv-audit-site"
NOISE_FREE = "noise/1e9"  # the reference model: clipped training without noise


class EmpiricalAuditError(FedprivError, ValueError):
    pass


@dataclass(frozen=True)
class Canaries:
    texts: list[str]
    labels: np.ndarray  # label ids
    included: np.ndarray  # bool: the coin flips
    seed: int

    def __len__(self) -> int:
        return len(self.texts)


def vocabulary(texts: list[str]) -> list[str]:
    """The data's own words (letters only, 3+ long): canaries look like text to the tokenizer, not like noise."""
    return sorted({w for t in texts for w in re.findall(r"[a-z]{3,}", t.lower())})


def make_canaries(words: list[str], num_labels: int, m: int, seed: int) -> Canaries:
    if m < 2:
        raise EmpiricalAuditError("--canaries: need at least 2 canaries")
    if len(words) < CANARY_WORDS:
        raise EmpiricalAuditError(f"data.path: too few distinct words ({len(words)}) to make canaries")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < m:
        text = " ".join(words[i] for i in rng.choice(len(words), CANARY_WORDS, replace=False))
        if text not in seen:
            seen.add(text)
            texts.append(text)
    labels = rng.integers(0, num_labels, size=m)
    included = rng.random(m) < 0.5
    return Canaries(texts, labels, included, seed)


def audit_dataset(
    config: FedprivConfig, labels: LabelSet, canaries: Canaries, site: int
) -> tuple[pd.DataFrame, str, int]:
    """The run's rows, each tagged with its simulated site, plus the included canaries at `site`.

    Returns the table, the canary site's name and the number of sites.
    """
    data = config.data
    dataset = load_configured(data, labels)
    sites = config.simulation.sites
    if config.simulation.partitioner == "column":
        sites = len(set(read_column(data.path, config.simulation.column, data.delimiter)))
    parts, names = split_for(config.replace(**{"simulation.sites": sites}), dataset, sites)
    if not 0 <= site < len(names):
        raise EmpiricalAuditError(f"--site: {site} is not a site index (0..{len(names) - 1})")
    owner = np.empty(len(dataset), dtype=object)
    for name, rows in zip(names, parts, strict=True):
        owner[rows] = name
    kept = np.flatnonzero(pd.notna(owner))  # rows no site got stay out, as in the run
    frame = pd.DataFrame(
        {
            data.text_column: [dataset.texts[i] for i in kept],
            data.label_column: [labels.names[dataset.labels[i]] for i in kept],
            SITE_COLUMN: owner[kept],
        }
    )
    chosen = np.flatnonzero(canaries.included)
    extra = pd.DataFrame(
        {
            data.text_column: [canaries.texts[i] for i in chosen],
            data.label_column: [labels.names[canaries.labels[i]] for i in chosen],
            SITE_COLUMN: names[site],
        }
    )
    return pd.concat([frame, extra], ignore_index=True), names[site], len(names)


def label_log_probs(model_dir: Path, texts: list[str], label_ids: np.ndarray, max_length: int) -> np.ndarray:
    """log p(label | text) under a released model directory, loaded as anyone would load it (plain transformers)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, trust_remote_code=True, local_files_only=True
    ).eval()
    out = np.empty(len(texts))
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            chunk = slice(start, start + 64)
            batch = tokenizer(texts[chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            log_p = model(**batch).logits.float().log_softmax(-1)
            ids = torch.as_tensor(label_ids[chunk])
            out[chunk] = log_p[torch.arange(len(ids)), ids].numpy()
    return out


@dataclass(frozen=True)
class EmpiricalResult:
    site: str
    canaries: int
    included: int
    guesses: int
    correct: int
    lower_bound: float
    claimed: float
    delta: float
    confidence: float
    fault: str | None
    seed: int
    run_dir: Path

    @property
    def refuted(self) -> bool:
        """The run is shown not to give the privacy its ledger claims."""
        return self.lower_bound > self.claimed

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "canaries": self.canaries,
            "included": self.included,
            "guesses": self.guesses,
            "correct": self.correct,
            "epsilon-lower-bound": self.lower_bound,
            "epsilon-claimed": self.claimed,
            "delta": self.delta,
            "confidence": self.confidence,
            "refuted": self.refuted,
            "fault": self.fault,
            "seed": self.seed,
            "run-dir": str(self.run_dir),
        }


def _claimed_epsilon(run_dir: Path, site: str) -> tuple[float, float]:
    report = audit([run_dir])
    if not report.ok:
        problems = "; ".join(p.message for p in report.problems if p.fatal)
        raise EmpiricalAuditError(f"{run_dir}: the run's ledgers do not verify ({problems})")
    for entry in report.sites:
        if entry.site == site:
            if entry.epsilon is None:
                raise EmpiricalAuditError(f"{site}: its ledger claims no finite epsilon; nothing to test")
            return float(entry.epsilon), entry.delta
    raise EmpiricalAuditError(f"{run_dir}: no ledger of {site}, the canary site; did it ever train?")


def checked_output(output: Path, fault: str | None, error: type[Exception]) -> Path:
    """An empirical audit's --fault and --output, checked before anything is written: the folder, resolved."""
    try:
        audit_fault(fault)
    except ValueError as problem:
        raise error(f"--fault: {problem}") from None
    output = Path(output).expanduser().resolve()
    if output.exists() and any(output.iterdir()):
        raise error(f"--output: {output} is not empty; an audit never writes over an earlier one")
    return output


def empirical_audit(
    config: FedprivConfig,
    output: Path,
    *,
    canaries: int = 1000,
    site: int = 0,
    fault: str | None = None,
    seed: int | None = None,
    console: Console | None = None,
) -> EmpiricalResult:
    """Runs the federation of `config` with canaries at simulated site `site`; returns the one-run audit."""
    console = console or Console()
    if not config.privacy.enabled:
        raise EmpiricalAuditError("privacy.enabled: the run claims no epsilon; there is nothing to audit")
    output = checked_output(output, fault, EmpiricalAuditError)
    output.mkdir(parents=True, exist_ok=True)
    seed = secrets.randbits(63) if seed is None else seed
    labels = LabelSet.load(config.data.labels)
    data = config.data
    source = load_configured(data, labels)
    made = make_canaries(vocabulary(source.texts), len(labels), canaries, seed)
    table, site_name, sites = audit_dataset(config, labels, made, site)
    write_atomic(output / "data.csv", table.to_csv(index=False))
    # The auditor's shadow: the same rows without any canary, trained the same way but without noise and with
    # other sampling. Scoring against it cancels how the federation moves every canary (inclusion aside); its
    # randomness is independent of the audited run's, so the bound stays valid.
    write_atomic(output / "reference.csv", table.iloc[: len(table) - int(made.included.sum())].to_csv(index=False))
    settings = {
        "data.delimiter": "",
        "simulation.partitioner": "column",
        "simulation.column": SITE_COLUMN,
        "simulation.sites": sites,
    }
    run_config = config.replace(**settings, **{"data.path": str(output / "data.csv"), "run-dir": str(output / "run")})
    reference_config = config.replace(
        **settings,
        **{
            "data.path": str(output / "reference.csv"),
            "run-dir": str(output / "reference"),
            "seed": config.seed + 1,
        },
    )
    console.print(
        f"Empirical audit: {len(made)} canaries, {int(made.included.sum())} of them (by coin) in {site_name}'s data"
        + (f"; [red]deliberate fault {fault}[/]" if fault else "")
    )
    # Each run prints its own summary ("Final test accuracy" ...): a rule says whose it is.
    console.rule("The audited run (with canaries)")
    run = simulate(run_config, console=console, audit_fault=fault)
    console.rule("The auditor's reference run (no canaries, no noise, other sampling)")
    reference = simulate(reference_config, console=console, audit_fault=NOISE_FREE)
    before = label_log_probs(reference.model_dir, made.texts, made.labels, data.max_length)
    after = label_log_probs(run.model_dir, made.texts, made.labels, data.max_length)
    scores = after - before
    write_atomic(
        output / "canaries.csv",
        pd.DataFrame(
            {
                "text": made.texts,
                "label": [labels.names[i] for i in made.labels],
                "included": made.included,
                "score": scores,
            }
        ).to_csv(index=False),
    )
    result = _judge(run.path, site_name, scores, made.included, fault, seed)
    write_atomic(output / "empirical-audit.json", json.dumps(result.to_json(), indent=2))
    return result


def _judge(
    run_dir: Path, site: str, scores: np.ndarray, included: np.ndarray, fault: str | None, seed: int
) -> EmpiricalResult:
    """The bound from the scores, beside the claim the site's verified ledger makes."""
    claimed, delta = _claimed_epsilon(run_dir, site)
    bound, guesses = best_epsilon_lower_bound(scores.tolist(), included.tolist(), delta, CONFIDENCE)
    return EmpiricalResult(
        site=site,
        canaries=len(scores),
        included=int(np.sum(included)),
        guesses=guesses.guesses,
        correct=guesses.correct,
        lower_bound=bound,
        claimed=claimed,
        delta=delta,
        confidence=CONFIDENCE,
        fault=fault,
        seed=seed,
        run_dir=run_dir,
    )


def recompute(output: Path) -> EmpiricalResult:
    """The bound again from what an audit wrote (canaries.csv and the run's ledgers)."""
    output = Path(output)
    saved = json.loads((output / "empirical-audit.json").read_text(encoding="utf-8"))
    table = pd.read_csv(output / "canaries.csv")
    return _judge(
        output / "run",
        saved["site"],
        table["score"].to_numpy(),
        table["included"].to_numpy(dtype=bool),
        saved["fault"],
        int(saved["seed"]),
    )
