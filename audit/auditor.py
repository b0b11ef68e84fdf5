"""`fedpriv audit`: verify ledgers, recompute every epsilon, check every cap, prove nothing is missing.

Input is any mix of run directories and ledger files. A run directory holds
the sites' ledgers (simulation), the aggregator's federation ledger, and the
public keys the run was provisioned with (`keys/public-keys.json`), which pin
each ledger to its owner. A site's budget is its ledger: every release in it
composes (whatever version of its data), until an operator's signed reset.
Whether the ledgers are complete is checked against the run's evidence
(`completeness`); the verdict is "passed" only when that is proven.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.audit.completeness import Completeness, SiteView, check_run, is_run_directory, run_evidence
from fedpriv.audit.recompute import cumulative_epsilons
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Problem, verify_entry, verify_ledger
from fedpriv.common.privacy.records import BudgetReset, LedgerEntry, PrivacyRecord, SiteExhausted, SiteReleaseReceipt
from fedpriv.common.rundir import PUBLIC_KEYS, RunDirectory

TOLERANCE = 0.01  # relative difference between a claim and its recomputation
# `fedpriv audit` exit codes: passed, a violation, no violation but completeness not proven.
EXIT_PASSED, EXIT_VIOLATION, EXIT_INCOMPLETE = 0, 1, 3


@dataclass
class ReleaseCheck:
    round: int
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    claimed: float | None
    pld: float
    rdp: float
    kind: str = "update"  # what was released: a model update or evaluation counts
    epoch: int = 0  # budget resets before this release: its epsilon counts from the last one

    @property
    def reference(self) -> float:
        return self.pld


@dataclass
class Reset:
    """An operator's signed budget reset, as the audit shows it."""

    seq: int
    created: str
    reason: str
    operator: str
    releases_before: int
    epsilon_before: float | None


@dataclass
class SiteReport:
    site: str
    data_id: str  # the version of its data last released (content hash)
    accountant: str
    delta: float
    cap: float | None
    signer: str
    releases: list[ReleaseCheck] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)
    data_versions: int = 1

    @property
    def current(self) -> list[ReleaseCheck]:
        """Releases since the last reset: what the site's budget holds now."""
        return [r for r in self.releases if r.epoch == len(self.resets)]

    @property
    def epsilon(self) -> float | None:
        current = self.current
        return current[-1].claimed if current else 0.0

    @property
    def peak(self) -> float:
        """The most this site's ledger ever accounted (claimed or recomputed), whatever was reset since."""
        values = [v for r in self.releases for v in (r.claimed, r.rdp if self.accountant == "rdp" else r.pld)]
        return max((math.inf if v is None else v for v in values), default=0.0)

    @property
    def remaining(self) -> float | None:
        if self.cap is None or self.epsilon is None:
            return None
        return max(self.cap - self.epsilon, 0.0)

    def lifetime(self) -> list[RunSpend]:
        """The site's budget run by run, in ledger order: what each run spent and what was left after it."""
        runs: list[RunSpend] = []
        before, epoch = 0.0, 0
        for release in self.releases:
            if release.epoch != epoch:  # a reset: what follows counts from zero
                before, epoch = 0.0, release.epoch
                runs.append(RunSpend(release.run_id, 0, before, before, self.cap, reset=True))
            elif not runs or runs[-1].run_id != release.run_id:
                runs.append(RunSpend(release.run_id, 0, before, before, self.cap))
            current = runs[-1]
            current.releases += 1
            current.epsilon_after = release.claimed if release.claimed is not None else math.inf
            before = current.epsilon_after
        return runs


@dataclass
class RunSpend:
    run_id: str
    releases: int
    epsilon_before: float
    epsilon_after: float
    cap: float | None
    reset: bool = False  # the first run after a budget reset

    @property
    def spent(self) -> float:
        return self.epsilon_after - self.epsilon_before

    @property
    def remaining(self) -> float | None:
        return None if self.cap is None else max(self.cap - self.epsilon_after, 0.0)


@dataclass
class AuditReport:
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    exhausted: list[dict[str, Any]] = field(default_factory=list)
    completeness: Completeness = field(default_factory=Completeness)

    @property
    def violations(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def verdict(self) -> str:
        """passed: no violation and the ledgers proven complete; incomplete: no violation found, but not proven."""
        if self.violations:
            return "failed"
        return "passed" if self.completeness.proven else "incomplete"

    @property
    def ok(self) -> bool:
        return self.verdict == "passed"

    @property
    def exit_code(self) -> int:
        return {"passed": EXIT_PASSED, "failed": EXIT_VIOLATION, "incomplete": EXIT_INCOMPLETE}[self.verdict]

    def to_json(self) -> dict[str, Any]:
        def number(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "completeness": self.completeness.to_json(),
            "ledgers": self.ledgers,
            "problems": [{"where": p.where, "message": p.message, "fatal": p.fatal} for p in self.problems],
            "budget-exhausted": self.exhausted,
            "sites": [
                {
                    "site": s.site,
                    "data-id": s.data_id,
                    "data-versions": s.data_versions,
                    "accountant": s.accountant,
                    "delta": s.delta,
                    "epsilon-cap": s.cap,
                    "epsilon": number(s.epsilon),
                    "remaining": number(s.remaining),
                    "signer": s.signer,
                    "resets": [
                        {
                            "seq": r.seq,
                            "created": r.created,
                            "reason": r.reason,
                            "operator": r.operator,
                            "releases-before": r.releases_before,
                            "epsilon-before": number(r.epsilon_before),
                        }
                        for r in s.resets
                    ],
                    "runs": [
                        {
                            "run-id": r.run_id,
                            "releases": r.releases,
                            "after-reset": r.reset,
                            "epsilon-spent": number(r.spent),
                            "epsilon-after": number(r.epsilon_after),
                            "remaining": number(r.remaining),
                        }
                        for r in s.lifetime()
                    ],
                    "releases": [
                        {
                            "round": r.round,
                            "run-id": r.run_id,
                            "noise-multiplier": r.noise_multiplier,
                            "sample-rate": r.sample_rate,
                            "steps": r.steps,
                            "epsilon-claimed": number(r.claimed),
                            "epsilon-pld": number(r.pld),
                            "epsilon-rdp": number(r.rdp),
                        }
                        for r in s.releases
                    ],
                }
                for s in self.sites
            ],
        }


def _inputs(paths: list[Path]) -> tuple[list[Path], dict[str, str], list[Path], set[Path]]:
    """Ledger files, pinned keys, run directories, and the ledgers that lie in a run directory."""
    files: list[Path] = []
    pins: dict[str, str] = {}
    runs: list[Path] = []
    in_runs: set[Path] = set()
    for path in paths:
        if path.is_dir():
            # A run directory keeps them in ledgers/; any other folder is taken as a folder of ledgers.
            if is_run_directory(path):
                found = sorted(RunDirectory(path).ledgers.glob("*.jsonl"))
                runs.append(path)
                in_runs.update(found)
            else:
                found = sorted(path.glob("*.jsonl"))
            files += found
            for keys in (RunDirectory(path).public_keys, path / PUBLIC_KEYS):
                if keys.exists():
                    pins.update(json.loads(keys.read_text(encoding="utf-8")))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such run directory or ledger")
    return files, pins, runs, in_runs


def audit(paths: list[str | Path], keys: str | Path | None = None, tolerance: float = TOLERANCE) -> AuditReport:
    report = AuditReport()
    files, pins, runs, in_runs = _inputs([Path(p) for p in paths])
    if keys:
        pins.update(json.loads(Path(keys).read_text(encoding="utf-8")))
    if not files and not runs:
        report.problems.append(Problem(", ".join(map(str, paths)), "no ledger found"))
        return report

    site_entries: dict[str, LedgerEntry] = {}  # entry hash -> entry of a privacy record or a budget reset
    received: list[tuple[str, LedgerEntry]] = []  # (where, site entry) from federation ledgers
    federation: dict[Path, tuple[list[LedgerEntry], str | None]] = {}  # aggregator ledgers: entries, signer
    views: dict[str, SiteView] = defaultdict(SiteView)
    for path in files:
        owner = path.stem if path.stem != "federation" else "aggregator"
        entries, problems = verify_ledger(path, pins.get(owner))
        report.problems += problems
        signer = entries[0].signer if entries else None
        report.ledgers.append(
            {
                "path": str(path),
                "entries": len(entries),
                "signer": signing.fingerprint(signer) if signer else None,
                "pinned": owner in pins,
            }
        )
        if owner not in pins and (entries or path in in_runs):
            # In a run directory the keys are part of the evidence: without them anyone could re-sign it all.
            report.problems.append(
                Problem(
                    path.name,
                    "no pinned public key for this ledger (the run's keys/public-keys.json is missing and no --keys "
                    "was given): its signatures prove integrity, not authorship"
                    if path in in_runs
                    else "no pinned public key for this ledger: signatures prove integrity, not authorship",
                    fatal=path in in_runs,
                )
            )
        if owner == "aggregator":
            federation[path] = (entries, signing.fingerprint(signer) if signer else None)
        else:
            views[owner].has_ledger = True
        for number, entry in enumerate(entries, start=1):
            record = entry.record
            if owner != "aggregator":
                views[owner].hashes.add(entry.hash)
            if isinstance(record, SiteReleaseReceipt):
                received.append((f"{path.name} line {number}", record.site_entry))
            elif isinstance(record, SiteExhausted):
                report.exhausted.append({"site": record.site, "round": record.round, "epsilon": record.epsilon})
            elif isinstance(record, BudgetReset):
                if owner == "aggregator":
                    report.problems.append(
                        Problem(
                            f"{path.name} line {number}",
                            f"a budget reset of {record.site} in the aggregator's ledger: only the site can reset it",
                        )
                    )
                else:
                    site_entries[entry.hash] = entry
            elif isinstance(record, PrivacyRecord):
                site_entries[entry.hash] = entry

    # What the aggregator received must be intact, signed by the site, and in the site's own ledger.
    have_site_ledger = {e.record.site for e in site_entries.values() if _is_site_entry(e)}
    for where, entry in received:
        record = entry.record
        site = record.site
        reason = verify_entry(entry)
        if reason:
            report.problems.append(Problem(f"{where} ({site})", f"received site record: {reason}"))
            continue
        if not isinstance(record, PrivacyRecord):
            report.problems.append(
                Problem(f"{where} ({site})", f"received site record is a '{record.kind}' record, not a release")
            )
            continue
        if site in pins and entry.signer != pins[site]:
            report.problems.append(
                Problem(f"{where} ({site})", "received site record signed by a key not provisioned for this site")
            )
        if entry.hash not in site_entries:
            if site in have_site_ledger:
                report.problems.append(
                    Problem(
                        f"{where} ({site})",
                        f"record of round {record.round} is missing from {site}'s own ledger: entries were removed",
                    )
                )
            else:
                site_entries[entry.hash] = entry

    # One budget per site: every release of it composes, whatever version of its data it used.
    groups: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in site_entries.values():
        groups[entry.record.site].append(entry)
    for site, entries in sorted(groups.items()):
        entries.sort(key=lambda e: (e.seq, e.record.created))
        checked = _check_site(site, entries, tolerance, report.problems)
        if checked is not None:
            report.sites.append(checked)
            views[site].peak = checked.peak
    _completeness(report, runs, federation, views, tolerance)
    return report


def _is_site_entry(entry: LedgerEntry) -> bool:
    return isinstance(entry.record, PrivacyRecord) and entry.record.party == "site"


def _completeness(
    report: AuditReport,
    runs: list[Path],
    federation: dict[Path, tuple[list[LedgerEntry], str | None]],
    views: dict[str, SiteView],
    tolerance: float,
) -> None:
    result = report.completeness
    covered: set[str] = set()
    for run in runs:
        evidence = run_evidence(run)
        entries, signer = federation.get(evidence.federation, ([], None))
        covered |= check_run(evidence, entries, signer, views, tolerance, report.problems, result)
    if not runs:
        result.gaps.append(
            "no run directory: nothing shows how many releases these ledgers should hold, so a ledger cut "
            "short (or emptied) would look the same; audit it with the run directories it took part in"
        )
    for site, view in sorted(views.items()):
        if view.has_ledger and site not in covered and runs and view.hashes:
            result.gaps.append(
                f"{site}: its ledger is named in no signed ledger head, so where it should end is unknown"
            )
    result.proven = not result.gaps and bool(runs)


def _check_site(site: str, entries: list[LedgerEntry], tolerance: float, problems: list[Problem]) -> SiteReport | None:
    """Recomputes one site's releases, in ledger order, composing each with those since the last reset."""
    releases = [e for e in entries if isinstance(e.record, PrivacyRecord)]
    if not releases:
        return None
    records: list[PrivacyRecord] = [e.record for e in releases]
    last = records[-1].accounting
    report = SiteReport(
        site=site,
        data_id=records[-1].data_id,
        accountant=last.accountant,
        delta=records[0].accounting.delta,
        cap=last.epsilon_cap,
        signer=signing.fingerprint(releases[0].signer),
        data_versions=len({r.data_id for r in records}),
    )
    # The epochs resets divide the ledger into: each is accounted on its own.
    epochs: list[list[PrivacyRecord]] = [[]]
    for entry in entries:
        record = entry.record
        if isinstance(record, BudgetReset):
            report.resets.append(
                Reset(
                    entry.seq,
                    record.created,
                    record.reason,
                    record.operator,
                    record.releases_before,
                    record.epsilon_before,
                )
            )
            epochs.append([])
        elif isinstance(record, PrivacyRecord):
            epochs[-1].append(record)
    recomputed: dict[str, list[float]] = {"pld": [], "rdp": []}
    for epoch in epochs:
        for kind, values in cumulative_epsilons([r.mechanism for r in epoch], report.delta).items():
            recomputed[kind] += values
    epoch_of = [i for i, epoch in enumerate(epochs) for _ in epoch]
    mechanisms = [r.mechanism for r in records]
    unprotected = [r.round for r in records if r.mechanism.noise_multiplier <= 0 and r.mechanism.steps > 0]
    if unprotected:
        problems.append(
            Problem(
                site,
                f"{len(unprotected)} release(s) without DP noise (rounds {_ranges(unprotected)}): no privacy guarantee for this data",
            )
        )
    for i, record in enumerate(records):
        accounting = record.accounting
        where = f"{site} round {record.round} (run {record.run_id})"
        check = ReleaseCheck(
            round=record.round,
            run_id=record.run_id,
            noise_multiplier=mechanisms[i].noise_multiplier,
            sample_rate=mechanisms[i].sample_rate,
            steps=mechanisms[i].steps,
            kind=mechanisms[i].query or "update",
            claimed=accounting.epsilon,
            pld=recomputed["pld"][i],
            rdp=recomputed["rdp"][i],
            epoch=epoch_of[i],
        )
        report.releases.append(check)
        if accounting.delta != report.delta:
            problems.append(
                Problem(
                    where,
                    f"delta changed from {report.delta} to {accounting.delta}; releases of one dataset must share delta",
                )
            )
        if mechanisms[i].noise_multiplier <= 0:
            continue  # reported once per site above
        shared = record.mechanism.distributed
        if shared is not None:
            # A distributed release: the accounted sigma must follow from how its noise was shared.
            expected = shared.accounted_noise_multiplier(record.mechanism.max_grad_norm)
            per_site = shared.total_noise_multiplier / math.sqrt(shared.cohort - shared.max_colluding)
            if not math.isclose(expected, mechanisms[i].noise_multiplier, rel_tol=1e-9) or not math.isclose(
                per_site, shared.noise_share, rel_tol=1e-9
            ):
                problems.append(
                    Problem(
                        where,
                        f"distributed noise (share {shared.noise_share:g} of {shared.cohort} sites, t={shared.max_colluding}) "
                        f"does not give the accounted noise multiplier {mechanisms[i].noise_multiplier:g} (expected {expected:g})",
                    )
                )
        reference = check.rdp if accounting.accountant == "rdp" else check.pld
        claimed = accounting.epsilon
        if claimed is None or not math.isfinite(reference):
            problems.append(Problem(where, f"claimed epsilon {claimed} cannot be checked"))
            continue
        if abs(reference - claimed) > tolerance * max(abs(claimed), 1e-9):
            problems.append(
                Problem(
                    where,
                    f"claimed epsilon {claimed:.4f} but recomputed {reference:.4f} ({accounting.accountant == 'rdp' and 'RDP' or 'PLD'}), off by more than {100 * tolerance:g}%",
                )
            )
        cap = accounting.epsilon_cap
        if cap is not None and (claimed > cap or reference > cap * (1 + tolerance)):
            problems.append(Problem(where, f"epsilon {max(claimed, reference):.4f} exceeds the site's cap {cap}"))
    return report


def _ranges(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
