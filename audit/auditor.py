"""`fedpriv audit`: verify ledgers, recompute every epsilon, check every cap.

Input is any mix of run directories and ledger files. A run directory holds
the sites' ledgers (simulation), the aggregator's federation ledger, and the
public keys the run was provisioned with (`keys/public-keys.json`), which pin
each ledger to its owner.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.audit.recompute import cumulative_epsilons
from fedpriv.common import signing
from fedpriv.common.ledger import Problem, verify_entry, verify_ledger
from fedpriv.common.records import LedgerEntry, PrivacyRecord, SiteExhausted, SiteReleaseReceipt

TOLERANCE = 0.01  # relative difference between a claim and its recomputation
PUBLIC_KEYS = "public-keys.json"


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

    @property
    def reference(self) -> float:
        return self.pld


@dataclass
class SiteReport:
    site: str
    data_id: str
    accountant: str
    delta: float
    cap: float | None
    signer: str
    releases: list[ReleaseCheck] = field(default_factory=list)

    @property
    def epsilon(self) -> float | None:
        return self.releases[-1].claimed if self.releases else 0.0

    @property
    def remaining(self) -> float | None:
        if self.cap is None or self.epsilon is None:
            return None
        return max(self.cap - self.epsilon, 0.0)

    def lifetime(self) -> list[RunSpend]:
        """The site's budget run by run, in ledger order: what each run spent and what was left after it."""
        runs: list[RunSpend] = []
        before = 0.0
        for release in self.releases:
            if not runs or runs[-1].run_id != release.run_id:
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

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        def number(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        return {
            "ok": self.ok,
            "ledgers": self.ledgers,
            "problems": [{"where": p.where, "message": p.message, "fatal": p.fatal} for p in self.problems],
            "budget-exhausted": self.exhausted,
            "sites": [
                {
                    "site": s.site,
                    "data-id": s.data_id,
                    "accountant": s.accountant,
                    "delta": s.delta,
                    "epsilon-cap": s.cap,
                    "epsilon": number(s.epsilon),
                    "remaining": number(s.remaining),
                    "signer": s.signer,
                    "runs": [
                        {
                            "run-id": r.run_id,
                            "releases": r.releases,
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


def _ledger_files(paths: list[Path]) -> tuple[list[Path], dict[str, str]]:
    files: list[Path] = []
    pins: dict[str, str] = {}
    for path in paths:
        if path.is_dir():
            # A run directory keeps them in ledgers/; any other folder is taken as a folder of ledgers.
            is_run = (path / "metrics.jsonl").exists() or (path / "ledgers").is_dir()
            files += sorted((path / "ledgers").glob("*.jsonl")) if is_run else sorted(path.glob("*.jsonl"))
            for keys in (path / "keys" / PUBLIC_KEYS, path / PUBLIC_KEYS):
                if keys.exists():
                    pins.update(json.loads(keys.read_text(encoding="utf-8")))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such run directory or ledger")
    return files, pins


def audit(paths: list[str | Path], keys: str | Path | None = None, tolerance: float = TOLERANCE) -> AuditReport:
    report = AuditReport()
    files, pins = _ledger_files([Path(p) for p in paths])
    if keys:
        pins.update(json.loads(Path(keys).read_text(encoding="utf-8")))
    if not files:
        report.problems.append(Problem(", ".join(map(str, paths)), "no ledger found"))
        return report

    site_entries: dict[str, LedgerEntry] = {}  # entry hash -> entry of a privacy record
    received: list[tuple[str, LedgerEntry]] = []  # (where, site entry) from federation ledgers
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
        if owner not in pins and entries:
            report.problems.append(
                Problem(
                    path.name,
                    "no pinned public key for this ledger: signatures prove integrity, not authorship",
                    fatal=False,
                )
            )
        for number, entry in enumerate(entries, start=1):
            record = entry.record
            if isinstance(record, SiteReleaseReceipt):
                received.append((f"{path.name} line {number}", record.site_entry))
            elif isinstance(record, SiteExhausted):
                report.exhausted.append({"site": record.site, "round": record.round, "epsilon": record.epsilon})
            elif isinstance(record, PrivacyRecord):
                site_entries[entry.hash] = entry

    # What the aggregator received must be intact, signed by the site, and in the site's own ledger.
    have_site_ledger = {e.record.site for e in site_entries.values() if e.record.party == "site"}
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

    groups: dict[tuple[str, str], list[LedgerEntry]] = defaultdict(list)
    for entry in site_entries.values():
        groups[(entry.record.site, entry.record.data_id)].append(entry)
    for (site, data_id), entries in sorted(groups.items()):
        entries.sort(key=lambda e: (e.seq, e.record.created))
        report.sites.append(_check_site(site, data_id, entries, tolerance, report.problems))
    return report


def _check_site(
    site: str, data_id: str, entries: list[LedgerEntry], tolerance: float, problems: list[Problem]
) -> SiteReport:
    records: list[PrivacyRecord] = [e.record for e in entries]
    first = records[0].accounting
    report = SiteReport(
        site=site,
        data_id=data_id,
        accountant=first.accountant,
        delta=first.delta,
        cap=first.epsilon_cap,
        signer=signing.fingerprint(entries[0].signer),
    )
    mechanisms = [r.mechanism for r in records]
    recomputed = cumulative_epsilons(mechanisms, report.delta)
    unprotected = [r.round for r in records if r.mechanism.noise_multiplier <= 0 and r.mechanism.steps > 0]
    if unprotected:
        problems.append(
            Problem(
                f"{site} ({data_id})",
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
