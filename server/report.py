"""What a finished run shows a person: a summary table and two plots.

Every number comes from the run directory's recorded events, so the same
table can be printed again later (`fedpriv report RUN_DIR`).
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpriv.common.run_events import SiteTrain
from fedpriv.common.rundir import RunDirectory, summarize


def _fmt_eps(value) -> str:
    return "∞ (no DP)" if value is None else f"{value:.3f}"


# Rounds the accuracy table shows in full; a longer run (240 for the default demo) is summarised.
SHOWN_ROUNDS = 12


def shown_rounds(rounds: list[int], best: int | None, limit: int = SHOWN_ROUNDS) -> tuple[list[int], int]:
    """The rounds a compact table shows: the first three, every k-th, the best and the last; and k."""
    if len(rounds) <= limit:
        return rounds, 1
    wanted = len(rounds) / (limit - 5)
    magnitude = 10 ** math.floor(math.log10(wanted))
    every = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= wanted)
    picked = {*rounds[:3], rounds[-1], *(r for r in rounds if r % every == 0)}
    if best is not None:
        picked.add(best)
    return sorted(picked), every


def summary_tables(run: RunDirectory, every_round: bool = False) -> list[Table]:
    summary = summarize(run)
    rounds = Table(title="Accuracy per round", title_justify="left")
    rounds.add_column("round", justify="right")
    rounds.add_column("central (test)", justify="right")
    rounds.add_column("federated (site validation)", justify="right")
    central = summary["central-accuracy-by-round"]
    federated = summary["federated-accuracy-by-round"]
    recorded = sorted(set(central) | set(federated))
    best = max(central, key=lambda r: (central[r], -r)) if central else None
    shown, every = (recorded, 1) if every_round else shown_rounds(recorded, best)
    for rnd in shown:
        c, f = central.get(rnd), federated.get(rnd)
        label = f"{rnd} (best)" if rnd == best and len(central) > 1 else str(rnd)
        rounds.add_row(label, "-" if c is None else f"{100 * c:.2f}%", "-" if f is None else f"{100 * f:.2f}%")
    if len(shown) < len(recorded):
        rounds.caption = (
            f"{len(shown)} of {len(recorded)} rounds: the first three, one every {every}, the best and the last; "
            f"every round: {run.plots / 'accuracy.png'} or fedpriv report --every-round"
        )
    sites = Table(title="Privacy per site", title_justify="left")
    sites.add_column("site")
    sites.add_column("training rows", justify="right")
    sites.add_column("epsilon spent", justify="right")
    delta = next((e.metrics["delta"] for e in run.read(SiteTrain) if e.metrics.get("delta")), None)
    undisclosed = False
    for name, info in summary["sites"].items():
        rows = info["train-examples"]
        undisclosed |= rows is None
        sites.add_row(name, "not sent" if rows is None else str(rows), _fmt_eps(info["epsilon"]))
    notes = []
    if delta:
        notes.append(f"(epsilon, delta={delta:g})-DP for each site's records; accountant: see config.toml")
    if undisclosed:
        notes.append("under secure aggregation a site does not send its row count")
    sites.caption = "\n".join(notes) or None
    return [rounds, sites]


def print_summary(run: RunDirectory, console: Console | None = None, every_round: bool = False) -> None:
    console = console or Console()
    for table in summary_tables(run, every_round):
        console.print(table)
    summary = summarize(run)
    acc = summary["central-accuracy"]
    if acc is not None:
        console.print(f"[bold]Final test accuracy: {100 * acc:.2f}%[/]  ({summary['rounds-completed']} rounds)")
    console.print(f"Run directory: {run.path}")


def write_plots(run: RunDirectory) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(run)
    run.plots.mkdir(exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    central = summary["central-accuracy-by-round"]
    federated = summary["federated-accuracy-by-round"]
    if central:
        ax.plot(list(map(int, central)), [100 * v for v in central.values()], marker="o", label="central (test set)")
    if federated:
        ax.plot(
            list(map(int, federated)),
            [100 * (v or 0) for v in federated.values()],
            marker=".",
            label="federated (site validation)",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy per round")
    ax.grid(alpha=0.3)
    if central or federated:
        ax.legend()
    fig.tight_layout()
    paths.append(run.plots / "accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for site, info in summary["sites"].items():
        points = [(int(r), e) for r, e in info["epsilon-by-round"].items() if e is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=site)
            plotted = True
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.set_title("Privacy spent per site" if plotted else "Privacy spent per site (DP off)")
    ax.grid(alpha=0.3)
    if plotted and len(summary["sites"]) <= 20:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    paths.append(run.plots / "epsilon.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
