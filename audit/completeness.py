"""Whether the audited ledgers are *all* of what happened, not just intact.

A hash chain proves nothing about its own tail: cut the last lines and what
is left still verifies. Completeness is therefore proven against evidence
that the releases happened:

- the run directory's checkpoints and run log (rounds done, the run's end,
  the fingerprint of the aggregator's ledger key, what each site reported);
- the aggregator's signed `ledger-head` records, one per round, written
  before the round's checkpoint, naming for each site the last entry it
  received and the highest epsilon it reported;
- each site's own ledger, which must reach that head.

Missing evidence where the rest of the run shows there must be some is a
violation. An audit with no run evidence at all (a lone ledger, a folder of
ledgers) cannot prove completeness and says so: it never passes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.common.privacy.ledger import Problem
from fedpriv.common.privacy.records import LedgerEntry, LedgerHead, SiteReleaseReceipt
from fedpriv.common.run_events import LedgerKey, RoundEnd, RunEnd, SiteBudgetExhausted, SiteEvaluate, SiteTrain
from fedpriv.common.rundir import CHECKPOINTS, FEDERATION_LEDGER, METRICS, RunDirectory

# The audit reads the run log as raw lines, never trusting it to fit its types: it may have been tampered with.
FEDERATION = FEDERATION_LEDGER
# Events in which a site reports the epsilon it has spent.
REPORTING = (SiteTrain.KIND, SiteEvaluate.KIND, SiteBudgetExhausted.KIND)
_CHECKPOINT = re.compile(r"round-(\d{4,})\.safetensors$")


@dataclass
class RunEvidence:
    """What a run directory shows happened, beside its ledgers."""

    path: Path
    rounds: set[int] = field(default_factory=set)  # rounds a checkpoint or the run log shows as done
    ended: bool = False
    signers: dict[str, str] = field(default_factory=dict)  # key fingerprint -> where it is named
    keys_sha256: str | None = None  # the public-keys file the run was started with (simulation)
    reported: dict[str, tuple[float, str]] = field(default_factory=dict)  # site -> (highest epsilon, where)
    heads_expected: bool = False  # written by an aggregator that signs ledger heads

    @property
    def shows_anything(self) -> bool:
        return bool(self.rounds) or self.ended

    @property
    def federation(self) -> Path:
        return RunDirectory(self.path).federation_ledger

    @property
    def simulated(self) -> bool:
        """Sites' ledgers live in the run directory (a simulation), so a missing one was removed from it."""
        run = RunDirectory(self.path)
        return run.keys.is_dir() or any(p.name != FEDERATION for p in run.ledgers.glob("*.jsonl"))


def is_run_directory(path: Path) -> bool:
    run = RunDirectory(path)
    return run.metrics_path.exists() or run.ledgers.is_dir() or run.checkpoints.is_dir()


def run_evidence(path: Path) -> RunEvidence:
    run = RunDirectory(path)
    evidence = RunEvidence(path)
    for checkpoint in sorted(run.checkpoints.glob("round-*.safetensors")):
        match = _CHECKPOINT.search(checkpoint.name)
        if match:
            evidence.rounds.add(int(match.group(1)))
            signer = _checkpoint_signer(checkpoint)
            if signer:
                evidence.signers.setdefault(signer, f"{CHECKPOINTS}/{checkpoint.name}")
    evidence.rounds |= {e["round"] for e in run.events(RoundEnd.KIND) if isinstance(e.get("round"), int)}
    model = run.model_dir
    evidence.ended = bool(run.events(RunEnd.KIND)) or (model.is_dir() and any(model.iterdir()))
    for event in run.events(LedgerKey.KIND):
        evidence.heads_expected = True
        if event.get("signer"):
            evidence.signers.setdefault(str(event["signer"]), f"{METRICS} (ledger-key)")
        if event.get("public-keys-sha256"):
            evidence.keys_sha256 = str(event["public-keys-sha256"])
    for event in run.events():
        if event.get("kind") in REPORTING and isinstance(event.get("epsilon"), (int, float)):
            site, value = str(event.get("site")), float(event["epsilon"])
            if value > evidence.reported.get(site, (-1.0, ""))[0]:
                evidence.reported[site] = (value, f"{METRICS} ({event['kind']}, round {event.get('round')})")
    return evidence


def _checkpoint_signer(path: Path) -> str:
    """The signer a checkpoint names (its safetensors header), read without loading its tensors."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(size, 1 << 24)))
        return str(header.get("__metadata__", {}).get("signer", ""))
    except (OSError, ValueError):
        return ""


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class SiteView:
    """What the audit holds of one site: its own ledger's entry hashes and its highest epsilon."""

    hashes: set[str] = field(default_factory=set)
    has_ledger: bool = False
    peak: float = 0.0


@dataclass
class Completeness:
    proven: bool = False
    evidence: list[str] = field(default_factory=list)  # what the ledgers were matched against
    gaps: list[str] = field(default_factory=list)  # why completeness is not proven (not violations)

    def to_json(self) -> dict[str, Any]:
        return {"proven": self.proven, "evidence": self.evidence, "gaps": self.gaps}


def check_run(
    evidence: RunEvidence,
    entries: list[LedgerEntry],
    signer: str | None,
    sites: dict[str, SiteView],
    tolerance: float,
    problems: list[Problem],
    result: Completeness,
) -> set[str]:
    """Matches one run directory's evidence against the ledgers; returns the sites its heads cover."""
    where = str(evidence.path)
    if not evidence.shows_anything:
        result.gaps.append(f"{where}: no checkpoint, finished round or run end recorded: nothing to match against")
        return set()
    done = max(evidence.rounds, default=0)
    shown = f"{'the run ended' if evidence.ended else 'no end recorded'}, last round done {done}"
    result.evidence.append(f"{where}: {shown} (checkpoints, run log)")
    _check_reported(evidence, sites, tolerance, problems)
    if not evidence.federation.exists():
        problems.append(
            Problem(where, f"{FEDERATION} is missing, but the run shows {shown}: the aggregator's receipts are gone")
        )
        return set()
    _check_signers(evidence, signer, problems)
    heads = [(n, e) for n, e in enumerate(entries, start=1) if isinstance(e.record, LedgerHead)]
    receipts = {e.record.site_entry.hash: e.record.round for e in entries if isinstance(e.record, SiteReleaseReceipt)}
    if not heads:
        if evidence.heads_expected:
            problems.append(
                Problem(
                    FEDERATION,
                    f"holds no signed ledger head, but the run shows {shown}: the ledger's tail was cut",
                )
            )
        else:
            result.gaps.append(
                f"{where}: written before ledger heads were signed; its ledgers' tails cannot be checked"
            )
        return set()
    last_line, last = heads[-1]
    latest: dict[str, tuple[int, LedgerHead]] = {}  # each site's latest head: heads name only what moved
    for number, entry in heads:
        head = entry.record
        assert isinstance(head, LedgerHead)  # `heads` holds the ledger's head entries only
        for site in head.sites:
            latest[site] = (number, head)
    if last.record.round < done:
        problems.append(
            Problem(
                f"{FEDERATION} end",
                f"the last signed ledger head is for round {last.record.round} (line {last_line}), but round {done} "
                "is done (checkpoints, run log): entries were cut from the ledger's tail",
            )
        )
    for site, (line, record) in sorted(latest.items()):
        head = record.sites[site]
        view = sites.get(site)
        label = f"{site} (head of {FEDERATION} line {line}, round {record.round})"
        if view is None or not view.has_ledger:
            if evidence.simulated:
                problems.append(
                    Problem(label, f"received {head.releases} release(s) from {site}, whose ledger is missing or empty")
                )
            else:
                result.gaps.append(f"{site}: its ledger was not given; {head.releases} release(s) known from receipts")
            continue
        if head.head not in view.hashes:
            problems.append(
                Problem(
                    label,
                    f"{site}'s ledger ends before its release of round {receipts.get(head.head, '?')} that the "
                    f"aggregator received ({head.releases} release(s) in all): entries were cut from its tail",
                )
            )
        if head.epsilon is not None and view.peak < head.epsilon * (1 - tolerance):
            problems.append(
                Problem(
                    label,
                    f"{site} reported epsilon {head.epsilon:.4f} but its ledgers account for {view.peak:.4f}",
                )
            )
    return set(latest)


def _check_reported(
    evidence: RunEvidence, sites: dict[str, SiteView], tolerance: float, problems: list[Problem]
) -> None:
    """Every epsilon a site reported in the run log must be accounted for by its ledgers."""
    for site, (value, seen) in sorted(evidence.reported.items()):
        view = sites.get(site)
        peak = view.peak if view else 0.0
        if value > 0 and peak < value * (1 - tolerance):
            problems.append(
                Problem(
                    f"{site} ({seen})",
                    f"the run log shows {site} reached epsilon {value:.4f}, but its ledgers account for {peak:.4f}",
                )
            )


def _check_signers(evidence: RunEvidence, signer: str | None, problems: list[Problem]) -> None:
    """The aggregator's ledger must be signed by the key its checkpoints and run log name."""
    for named, seen in sorted(evidence.signers.items()):
        if signer is not None and named != signer:
            problems.append(
                Problem(
                    FEDERATION,
                    f"signed by {signer}, but {seen} names the aggregator's key {named}: the ledger was re-signed",
                )
            )
    keys = RunDirectory(evidence.path).public_keys
    if evidence.keys_sha256 and keys.exists() and file_sha256(keys) != evidence.keys_sha256:
        problems.append(
            Problem(str(keys), "differs from the public keys the run started with (run log): the keys were replaced")
        )
