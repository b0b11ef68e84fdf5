"""An audit for people: a console table and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpriv.audit.auditor import AuditReport, Reset


def _eps(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "∞"
    return f"{value:.4f}"


AUTHORITY = (
    "Authoritative: each site's own accountant (acct), the one its cap is checked with; PLD is tight. "
    "RDP is an upper bound and may exceed the cap on a passing run."
)


def console_report(report: AuditReport, console: Console) -> None:
    table = Table(
        title="Privacy audit (epsilon: claimed by the site / recomputed with dp-accounting)", title_justify="left"
    )
    for column in ("site", "runs", "releases", "ε claimed", "ε PLD", "ε RDP", "cap", "left", "acct", "δ"):
        table.add_column(column, justify="left" if column in ("site", "acct") else "right", no_wrap=True)
    for site in report.sites:
        last = site.releases[-1] if site.releases else None
        table.add_row(
            site.site,
            str(len(site.lifetime())),
            str(len(site.releases)),
            _eps(site.epsilon),
            _eps(last.pld if last else 0.0),
            _eps(last.rdp if last else 0.0),
            _eps(site.cap),
            _eps(site.remaining),
            site.accountant,
            f"{site.delta:g}",
        )
    console.print(table)
    console.print(AUTHORITY, style="dim", soft_wrap=True)
    if any(len(site.lifetime()) > 1 for site in report.sites):
        console.print(_lifetime_table(report))
    for site in report.sites:
        for reset in site.resets:
            console.print(f"[yellow]{site.site}: budget reset[/] {_reset_text(reset)}", soft_wrap=True)
    for item in report.exhausted:
        console.print(
            f"[yellow]{item['site']}[/] stopped in round {item['round']}: budget exhausted (epsilon {_eps(item['epsilon'])})"
        )
    ledgers = ", ".join(f"{Path(led['path']).name} ({led['entries']})" for led in report.ledgers)
    console.print(f"Ledgers verified: {ledgers}")
    shown = 25
    for problem in report.problems[:shown]:
        style = "red" if problem.fatal else "yellow"
        console.print(f"[{style}]{'VIOLATION' if problem.fatal else 'note'}:[/] {problem}", soft_wrap=True)
    if len(report.problems) > shown:
        console.print(f"... and {len(report.problems) - shown} more (fedpriv audit --json lists all)")
    completeness = report.completeness
    for evidence in completeness.evidence:
        console.print(f"Matched against: {evidence}", soft_wrap=True, highlight=False)
    for gap in completeness.gaps:
        console.print(f"[yellow]not proven:[/] {gap}", soft_wrap=True)
    if report.verdict == "passed":
        console.print(
            "[bold green]Audit passed[/]: every ledger intact and complete (matched against the run's signed heads, "
            "checkpoints and log), every epsilon reproduced, every cap kept."
        )
    elif report.verdict == "incomplete":
        console.print(
            "[bold yellow]Audit incomplete[/]: no violation found, but these ledgers cannot be proven complete "
            "(a cut tail would look the same); audit them with their run directories."
        )
    else:
        console.print(f"[bold red]Audit failed[/]: {len(report.violations)} violation(s).")


def _reset_text(reset: Reset) -> str:
    return (
        f"at {reset.created} by {reset.operator} (ledger seq {reset.seq}): {reset.releases_before} earlier "
        f"release(s), epsilon {_eps(reset.epsilon_before)}, no longer count. Reason: {reset.reason}"
    )


def _lifetime_table(report: AuditReport) -> Table:
    table = Table(title="Budget over each site's lifetime (its ledger spans all its runs)", title_justify="left")
    for column in ("site", "run", "releases", "ε spent in run", "ε after run", "left after run"):
        table.add_column(column, justify="left" if column in ("site", "run") else "right", no_wrap=True)
    for site in report.sites:
        for run in site.lifetime():
            table.add_row(
                site.site,
                f"{run.run_id} (after reset)" if run.reset else run.run_id,
                str(run.releases),
                _eps(run.spent),
                _eps(run.epsilon_after),
                _eps(run.remaining),
            )
    return table


def epsilon_plot_png(report: AuditReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = 0
    for site in report.sites:
        points = [(r.round, r.claimed) for r in site.releases if r.claimed is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=site.site)
            plotted += 1
        if site.cap:
            ax.axhline(site.cap, color="grey", linewidth=0.5, linestyle="--")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Epsilon spent per site (dashed: caps)")
    ax.grid(alpha=0.3)
    if 0 < plotted <= 20:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def headline(report: AuditReport) -> str:
    """The audit's finding in one sentence (plain text)."""
    files = f"{len(report.ledgers)} ledger file{'s' if len(report.ledgers) != 1 else ''}"
    if not report.sites:
        return f"{files} checked; no site released anything."
    worst = max(report.sites, key=lambda s: math.inf if s.epsilon is None else s.epsilon)
    cap = f" of its cap {_eps(worst.cap)}" if worst.cap else ""
    verdict = {
        "passed": "every signature and hash chain verified, the ledgers proven complete, every epsilon reproduced, "
        "every cap kept",
        "incomplete": "no violation found, but the ledgers could not be proven complete (see Completeness)",
        "failed": f"{len(report.violations)} violation(s), listed under Findings",
    }[report.verdict]
    return (
        f"{len(report.sites)} site(s), {files}: {verdict}. The most any site spent is epsilon "
        f"{_eps(worst.epsilon)} ({worst.site}, delta {worst.delta:g}){cap}."
    )


def html_report(report: AuditReport) -> str:
    status = {"passed": "passed", "incomplete": "NOT PROVEN COMPLETE", "failed": "FAILED"}[report.verdict]
    completeness = "".join(
        [f"<li>matched against: {html.escape(e)}</li>" for e in report.completeness.evidence]
        + [f"<li class='note'>not proven: {html.escape(g)}</li>" for g in report.completeness.gaps]
    )
    resets = "".join(
        f"<li>{html.escape(s.site)}: {html.escape(_reset_text(r))}</li>" for s in report.sites for r in s.resets
    )
    rows = "".join(
        f"<tr><td>{html.escape(s.site)}</td><td>{len(s.releases)}</td><td>{_eps(s.epsilon)}</td>"
        f"<td>{_eps(s.releases[-1].pld if s.releases else 0)}</td><td>{_eps(s.releases[-1].rdp if s.releases else 0)}</td>"
        f"<td>{_eps(s.cap)}</td><td>{_eps(s.remaining)}</td><td>{s.accountant}</td><td>{s.delta:g}</td>"
        f"<td><code>{html.escape(s.signer)}</code></td></tr>"
        for s in report.sites
    )
    problems = (
        "".join(f"<li class='{'bad' if p.fatal else 'note'}'>{html.escape(str(p))}</li>" for p in report.problems)
        or "<li>none</li>"
    )
    releases = "".join(
        f"<tr><td>{html.escape(s.site)}</td><td>{r.round}</td><td>{html.escape(r.kind)}</td>"
        f"<td>{r.noise_multiplier:.4f}</td><td>{r.sample_rate:g}</td>"
        f"<td>{r.steps}</td><td>{_eps(r.claimed)}</td><td>{_eps(r.pld)}</td><td>{_eps(r.rdp)}</td></tr>"
        for s in report.sites
        for r in s.releases
    )
    lifetime = "".join(
        f"<tr><td>{html.escape(s.site)}</td><td>{html.escape(r.run_id)}</td><td>{r.releases}</td>"
        f"<td>{_eps(r.spent)}</td><td>{_eps(r.epsilon_after)}</td><td>{_eps(r.remaining)}</td></tr>"
        for s in report.sites
        for r in s.lifetime()
    )
    plot = base64.b64encode(epsilon_plot_png(report)).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fedpriv privacy audit: {status}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
.bad{{color:#b00}}.note{{color:#a60}}h1 span{{color:{"#080" if report.ok else "#b00"}}}</style></head>
<body><h1>Privacy audit <span>{status}</span></h1>
<p><b>In short:</b> {html.escape(headline(report))}</p>
<p><b>How to read it.</b> <i>Epsilon</i> bounds how much everything a site released (model updates, noised
evaluation counts) can reveal about any one record of its data: smaller is more private, and it adds up over
releases. <i>Delta</i> is the small probability with which that bound may fail. The <i>cap</i> is the most
epsilon the site's own agent allows over its data's lifetime; it refuses to train past it, whatever the
aggregator asks. <i>Remaining</i> is what is left of the cap.</p>
<p>Every ledger's hash chain and Ed25519 signatures were verified; every epsilon was recomputed
from the recorded mechanisms with Google's dp-accounting (PLD and RDP) and compared with the claim.</p>
<p>{html.escape(AUTHORITY)} "Remaining" is the cap minus the epsilon spent over every release of the site's
data in these ledgers: a deployed site's ledger spans all its runs.</p>
<h2>Sites</h2><table><tr><th>site</th><th>releases</th><th>epsilon (claimed)</th><th>PLD</th><th>RDP</th>
<th>cap</th><th>remaining</th><th>accountant</th><th>delta</th><th>signer</th></tr>{rows}</table>
<h2>Budget over each site's lifetime</h2>
<p>Run by run, in the order of the site's ledger: what each run spent of the site's data and what was left of
its cap afterwards. A deployed site keeps one ledger across all runs, so this is its whole history.</p>
<table><tr><th>site</th><th>run</th><th>releases</th><th>epsilon spent in run</th><th>epsilon after run</th>
<th>remaining after run</th></tr>{lifetime}</table>
<h2>Budget resets</h2>
<p>A site's budget covers every release of its data, whatever version of the data it was made from; only its
operator can reset it, with a signed, recorded reason (<code>fedpriv agent reset-budget</code>).</p>
<ul>{resets or "<li>none</li>"}</ul>
<h2>Completeness</h2>
<p>A ledger's chain cannot show that its tail is still there; the ledgers are matched against what shows the
releases happened: the aggregator's signed head of every round, its checkpoints and run log.</p>
<ul>{completeness or "<li>no run evidence</li>"}</ul>
<h2>Epsilon per round</h2><img alt="epsilon per site and round" src="data:image/png;base64,{plot}">
<h2>Findings</h2><ul>{problems}</ul>
<h2>Every release</h2><table><tr><th>site</th><th>round</th><th>release</th><th>noise</th><th>sample rate</th><th>steps</th>
<th>epsilon claimed</th><th>PLD</th><th>RDP</th></tr>{releases}</table>
</body></html>"""
