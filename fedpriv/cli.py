"""The `fedpriv` command: one entry point for every role.

Each subcommand imports its role lazily, so `fedpriv --help` stays fast and a
site agent never loads aggregator code.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from fedpriv.common.errors import FedprivError
from fedpriv.deploy.cli import register as register_deploy_commands

app = typer.Typer(
    help="fedpriv: federated, differentially private fine-tuning of text classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
register_deploy_commands(app)
DASHBOARD_PORT = 8765
DashboardOpt = Annotated[
    bool,
    typer.Option(
        "--dashboard",
        help="Serve a live page of the run on http://127.0.0.1 while it goes on (see fedpriv dashboard).",
    ),
]
DashboardPortOpt = Annotated[int, typer.Option(help="Port of --dashboard.", min=1, max=65535)]
# Piped output (CI logs, `| tee`) keeps whole tables instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True)


@app.command()
def simulate(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value (repeatable).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Start from settings shipped with fedpriv: distributed (the default: secure aggregation, "
            "each site adds a share of the DP noise) or local (each site adds all its noise; the default "
            "with --no-dp, a strategy other than fedavg or site-level DP)."
        ),
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    sites: Annotated[int | None, typer.Option(help="Number of simulated sites.")] = None,
    mode: Annotated[str | None, typer.Option(help="Fine-tuning mode: head, lora or full.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per site.")] = None,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Train without differential privacy (baseline).")] = False,
    data: Annotated[
        str | None, typer.Option(help="Dataset to split into sites (.csv, .tsv, .txt, .jsonl, .parquet; .gz/.zst).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Run directory.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for partitioning, sampling and noise.")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Run the sites on an existing Ray cluster: auto, or its head's HOST:PORT; run this command on "
            "a node of the cluster (sets simulation.ray-address, simulation.backend = ray)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue a run that was cut short (killed, crashed) from its last complete round."),
    ] = None,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = DASHBOARD_PORT,
) -> None:
    """Run a federation of simulated sites on this machine (Flower Simulation Engine).

    With no options: the built-in demo, Banking77 split over 10 sites, MiniLM,
    DP-SGD at epsilon 8 per site, distributed over the sites under secure
    aggregation (--preset distributed; --preset local for each site's own
    noise).

    Data files: .csv, .tsv/.tab/.txt (tab-separated), .jsonl/.json (one object
    per line) or .parquet; text files may be compressed (.gz, .zst), e.g.
    train.tsv.gz. A header row and UTF-8 are expected; other delimiters:
    --set data.delimiter=";".

    A run cut short (killed, crashed, machine restarted) continues from its
    last complete round with --resume RUN_DIR; budgets already spent count.
    """
    from fedpriv.cli_settings import simulation_preset
    from fedpriv.common.config import apply_overrides, load_config, user_settings
    from fedpriv.common.errors import FedprivError
    from fedpriv.simulation.harness import resume_config

    if resume:
        given = [config, settings, preset, rounds, sites, mode, epsilon, data, output, seed, ray_address]
        if no_dp or any(v for v in given):
            raise FedprivError("--resume continues a run with its saved settings; give no other settings with it")
        _run_simulation(resume_config(resume), verbose, resume=True, dashboard_port=dashboard_port if dashboard else 0)
        return

    shortcuts = {
        "rounds": rounds,
        "simulation.sites": sites,
        "model.mode": mode,
        "privacy.target-epsilon": epsilon,
        "data.path": data,
        "run-dir": str(output) if output else None,
        "seed": seed,
        "simulation.ray-address": ray_address,
        "simulation.backend": "ray" if ray_address else None,
    }
    overrides = {k: v for k, v in shortcuts.items() if v is not None}
    if no_dp:
        overrides["privacy.enabled"] = False
    if preset is None:
        preset, why = simulation_preset({**user_settings(config, settings or []), **overrides})
        console.print(f"Settings: preset {preset} ({why}; --preset to choose)", highlight=False)
    cfg = apply_overrides(load_config(config, settings or [], preset), overrides)
    _run_simulation(cfg, verbose, dashboard_port=dashboard_port if dashboard else 0)


def _run_simulation(cfg, verbose: bool, resume: bool = False, dashboard_port: int = 0) -> None:
    """Exit 1 when the run's own audit fails, as `fedpriv audit` does; `dashboard_port`: serve the run live."""
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.simulation.harness import AuditFailedError, simulate

    try:
        with contextlib.ExitStack() as stack:
            if dashboard_port:
                from fedpriv.dashboard.server import beside

                cfg = cfg.replace(**{"run-dir": str(RunDirectory.where(cfg.run_dir))})
                stack.enter_context(beside(Path(cfg.run_dir), dashboard_port, console.print))
            simulate(cfg, console=console, verbose=verbose, resume=resume)
    except AuditFailedError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    every_round: Annotated[
        bool, typer.Option("--every-round", help="List the accuracy of every round, not a summary of a long run.")
    ] = False,
) -> None:
    """Print a finished (or running) run's summary again and redraw its plots."""
    from fedpriv.common.rundir import RunDirectory
    from fedpriv.server.report import print_summary, write_plots

    run = RunDirectory(run_dir)
    if not run.metrics_path.exists():
        raise FedprivError(f"{run_dir}: no metrics.jsonl here; is this a fedpriv run directory?")
    write_plots(run)
    print_summary(run, console, every_round)


@app.command()
def audit(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Run directories and/or ledger files (not with --empirical).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the audit as JSON.")] = False,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write an HTML report here.")] = None,
    keys: Annotated[Path | None, typer.Option(help="JSON map of owner -> Ed25519 public key (base64) to pin.")] = None,
    tolerance: Annotated[
        float, typer.Option(help="Allowed relative gap between claimed and recomputed epsilon.")
    ] = 0.01,
    empirical: Annotated[
        bool,
        typer.Option(
            "--empirical",
            help="Instead: run the federation with canaries and test its epsilon claim (one-run audit).",
            rich_help_panel="Empirical audit",
        ),
    ] = False,
    black_box: Annotated[
        bool,
        typer.Option(
            "--black-box",
            help="With --empirical: text canaries scored on the final model only (any mode; far weaker than the "
            "default white-box audit, which scores gradient canaries on every round's release, head mode).",
            rich_help_panel="Empirical audit",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config of the run.", rich_help_panel="Empirical audit")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a setting: section.key=value.", rich_help_panel="Empirical audit"),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Start from a preset: distributed or local (default: as fedpriv simulate chooses).",
            rich_help_panel="Empirical audit",
        ),
    ] = None,
    canaries: Annotated[
        int | None,
        typer.Option(
            help="Canaries, each included by a fair coin (default: 2000 white-box, 1000 black-box).",
            rich_help_panel="Empirical audit",
        ),
    ] = None,
    site: Annotated[
        int, typer.Option(help="Index of the simulated site given the canaries.", rich_help_panel="Empirical audit")
    ] = 0,
    fault: Annotated[
        str | None,
        typer.Option(
            help="Deliberately break the run to see the audit catch it, while the ledgers claim the planned "
            "release: noise/N (every site's noise divided by N), skip-clipping or skip-noise (the canary site "
            "does not clip / adds no noise).",
            rich_help_panel="Empirical audit",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Empty folder for the audit's files.", rich_help_panel="Empirical audit"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of canaries and coins (default: random).", rich_help_panel="Empirical audit"),
    ] = None,
) -> None:
    """Verify privacy ledgers, prove them complete and recompute every epsilon.

    Exit 0: passed; 1: a violation; 3: no violation, but the ledgers cannot be
    proven complete (a lone ledger, no run directory or no signed heads).

    With --empirical: run the configured simulation with canaries in one
    site's data and test the site's epsilon claim. White-box (default): the
    canaries are gradient canaries on head inputs no text fills, scored on
    every round's release as the aggregator saw it; the report gives an
    epsilon lower bound (Steinke, Nasr & Jagielski 2023), a Gaussian
    trade-off estimate, the noise actually added and a clipping check.
    Exit 1 when any of them refutes the claim.
    """
    import json

    if empirical:
        if paths:
            raise FedprivError("--empirical runs its own federation; give no run directories or ledgers with it")
        _empirical(config, settings or [], preset, canaries, site, fault, output, seed, json_out, black_box)
        return
    if black_box:
        raise FedprivError("--black-box is a kind of --empirical audit; give --empirical with it")
    if not paths:
        raise FedprivError("audit: give run directories and/or ledger files (or --empirical)")

    from fedpriv.audit.auditor import audit as run_audit
    from fedpriv.audit.render import console_report, html_report

    try:
        report = run_audit([*paths], keys=keys, tolerance=tolerance)
    except (FileNotFoundError, ValueError) as error:  # a path or key file that is not there or not JSON
        raise FedprivError(str(error)) from None
    if json_out:
        print(json.dumps(report.to_json(), indent=2))
    else:
        console_report(report, console)
    if html_out:
        html_out.write_text(html_report(report), encoding="utf-8")
        if not json_out:
            console.print(f"HTML report: {html_out}")
    raise typer.Exit(report.exit_code)


def _empirical(
    config: Path | None,
    settings: list[str],
    preset: str | None,
    canaries: int | None,
    site: int,
    fault: str | None,
    output: Path | None,
    seed: int | None,
    json_out: bool,
    black_box: bool = False,
) -> None:
    import json
    import time

    from fedpriv.cli_settings import simulation_preset
    from fedpriv.common.config import load_config, user_settings

    out = err if json_out else console
    if preset is None:
        preset, why = simulation_preset(user_settings(config, settings))
        out.print(f"Settings: preset {preset} ({why}; --preset to choose)", highlight=False)
    cfg = load_config(config, settings, preset)
    output = output or Path("runs") / f"empirical-{time.strftime('%Y%m%d-%H%M%S')}"
    if not black_box:
        _white_box(cfg, output, canaries or 2000, site, fault, seed, json_out)
        return
    from fedpriv.simulation.canary_audit import empirical_audit

    result = empirical_audit(
        cfg, output, canaries=canaries or 1000, site=site, fault=fault, seed=seed, console=err if json_out else console
    )
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        verdict = (
            "[bold red]REFUTED: the run leaks more than its ledger claims[/]"
            if result.refuted
            else "[green]consistent: no evidence against the claim[/]"
        )
        console.print(
            f"Empirical audit of {result.site}: {result.correct} of {result.guesses} guesses right "
            f"({result.canaries} canaries, {result.included} included)\n"
            f"  epsilon lower bound {result.lower_bound:.3f} ({result.confidence:.0%} confidence) "
            f"vs claimed {result.claimed:.3f} (delta {result.delta:g}): {verdict}\n"
            f"  files: {output}"
        )
    raise typer.Exit(1 if result.refuted else 0)


def _white_box(
    cfg, output: Path, canaries: int, site: int, fault: str | None, seed: int | None, json_out: bool
) -> None:
    import json

    from fedpriv.audit.white_box_render import lines, verdict
    from fedpriv.simulation.gradient_audit import REPORT, white_box_audit

    result = white_box_audit(
        cfg, output, canaries=canaries, site=site, fault=fault, seed=seed, console=err if json_out else console
    )
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
    else:
        console.rule(f"White-box audit of {result.site}")
        for line in lines(result):
            console.print(f"  {line}", highlight=False)
        for problem in result.problems:
            console.print(f"  [bold red]{problem}[/]", highlight=False)
        colour = "bold red" if result.refuted else "green"
        words = "the run leaks more than its ledger claims" if result.refuted else "no evidence against the claim"
        console.print(f"[{colour}]{verdict(result)}: {words}[/]  report: {output / REPORT}")
    raise typer.Exit(1 if result.refuted else 0)


@app.command()
def dashboard(
    path: Annotated[
        Path,
        typer.Argument(
            help="A run directory (running or finished), or an aggregator's state folder (its newest run, "
            "followed as new ones start)."
        ),
    ],
    port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = DASHBOARD_PORT,
    host: Annotated[
        str,
        typer.Option(
            help="Address to serve on. Anything but loopback (127.0.0.1, ::1, localhost) needs a token: "
            "$FEDPRIV_DASHBOARD_TOKEN, or one made and printed now."
        ),
    ] = "127.0.0.1",
) -> None:
    """A live, read-only web page of a run: rounds, accuracy, each site's state and budget, secure aggregation,
    the audit, and the settings that decide privacy. Built from the run directory's records only."""
    import os

    from fedpriv.dashboard.server import TOKEN_ENV, Dashboard, is_loopback, new_token
    from fedpriv.dashboard.view import open_view

    token = None if is_loopback(host) else os.environ.get(TOKEN_ENV) or new_token()
    served = Dashboard(open_view(path), host=host, port=port, token=token)
    console.print(f"fedpriv dashboard of {served.view.state or served.view.path}: {served.url}  (Ctrl-C stops it)")
    if token and not os.environ.get(TOKEN_ENV):
        console.print(f"Made a token for this address; set {TOKEN_ENV} to choose one.", highlight=False)
    served.serve()


@app.command("app")
def flower_app(
    directory: Annotated[Path, typer.Argument(help="Folder to write the Flower App into (created if missing).")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config file for the app's defaults.")
    ] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")
    ] = None,
) -> None:
    """Write the fedpriv Flower App (a pyproject.toml, no code) for `flwr run DIR`.

    The app names the ServerApp and ClientApp of this installed fedpriv; every
    party that runs it uses its own installation, so the bundle carries settings only.
    """
    from fedpriv.common.config import load_config
    from fedpriv.common.flower_app import SIMULATION_CLIENT_APP, write_app_dir

    # For `flwr run` of a local simulation: its virtual nodes are declared simulated (a deployed
    # federation's aggregator writes its own app, naming the site's ClientApp).
    written = write_app_dir(directory, load_config(config, settings or []), SIMULATION_CLIENT_APP)
    console.print(f"Flower App written to {written}; run it with: flwr run {written} --stream")


@config_app.command("show")
def config_show(
    config: Annotated[Path | None, typer.Argument(help="TOML config file (default: built-in defaults).")] = None,
    settings: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
    preset: Annotated[
        str | None, typer.Option(help="Start from a preset (distributed, local), as `fedpriv simulate` does.")
    ] = None,
) -> None:
    """Every setting with its value and meaning."""
    from rich.table import Table

    from fedpriv.cli_settings import settings_table
    from fedpriv.common.config import load_config

    cfg = load_config(config, settings or [], preset)
    table = Table("setting", "value", "meaning")
    for key, value, description in settings_table(cfg):
        table.add_row(key, repr(value), description)
    console.print(table)


def main() -> None:
    from fedpriv.common.environment import apply_quiet_defaults

    apply_quiet_defaults()  # before Flower, Ray or transformers are imported
    try:
        code = app(standalone_mode=False)  # errors come back here instead of exiting
    except FedprivError as error:
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    except OSError as error:  # a file or folder the OS refused (permissions, read-only, missing): it is named
        err.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    except (KeyboardInterrupt, click.exceptions.Abort):
        err.print("interrupted")
        sys.exit(130)
    except click.exceptions.ClickException as error:  # usage errors: typer's own message and exit code
        error.show()
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
