"""What a finished run shows a person: a summary table and two plots.

Every number comes from the run directory's recorded events, so the same
table can be printed again later (`fedpriv report RUN_DIR`).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpriv.common.rundir import RunDirectory, summarize


def _fmt_eps(value) -> str:
    return "∞ (no DP)" if value is None else f"{value:.3f}"


def summary_tables(run: RunDirectory) -> list[Table]:
    summary = summarize(run)
    rounds = Table(title="Accuracy per round", title_justify="left")
    rounds.add_column("round", justify="right")
    rounds.add_column("central (test)", justify="right")
    rounds.add_column("federated (site validation)", justify="right")
    central = summary["central-accuracy-by-round"]
    federated = summary["federated-accuracy-by-round"]
    for rnd in sorted(set(central) | set(federated)):
        c, f = central.get(rnd), federated.get(rnd)
        rounds.add_row(str(rnd), "-" if c is None else f"{100 * c:.2f}%", "-" if f is None else f"{100 * f:.2f}%")
    sites = Table(title="Privacy per site", title_justify="left")
    sites.add_column("site")
    sites.add_column("training rows", justify="right")
    sites.add_column("epsilon spent", justify="right")
    delta = next((e.get("delta") for e in run.events("site-train") if e.get("delta")), None)
    for name, info in summary["sites"].items():
        sites.add_row(name, str(info["train-examples"]), _fmt_eps(info["epsilon"]))
    if delta:
        sites.caption = f"(epsilon, delta={delta:g})-DP for each site's records; accountant: see config.toml"
    return [rounds, sites]


def print_summary(run: RunDirectory, console: Console | None = None) -> None:
    console = console or Console()
    for table in summary_tables(run):
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
