"""`fedpriv provision`, `fedpriv aggregator` and `fedpriv agent`: running fedpriv across real sites.

Like the rest of the CLI, each command imports what it runs only when it
runs: a site's agent never loads aggregator code and the other way round.
Commands just raise: `fedpriv.cli.main()` prints any `FedprivError` and exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

provision_app = typer.Typer(
    help="Make the federation's CA, certificates and keys, and one kit per party.",
    invoke_without_command=True,
)
aggregator_app = typer.Typer(help="Run the aggregator (a Flower SuperLink) from its kit.", no_args_is_help=True)
agent_app = typer.Typer(help="Run a site agent (a Flower SuperNode) from its kit.", no_args_is_help=True)

FederationOpt = Annotated[
    Path, typer.Option("--federation", "-f", help="The federation file (TOML; see deploy/federation.example.toml).")
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Where the kits go (default: kits/ beside the federation file).")
]
AggKitOpt = Annotated[Path, typer.Option("--kit", help="The aggregator's kit folder.")]
AggStateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="Where the aggregator keeps its state (default: aggregator-state/ beside the kit)."),
]


def _follow(run, idle: float) -> None:
    """Waits for the run's end, as long as its run directory keeps being written within `idle` seconds."""
    import time

    from fedpriv.common.run_events import RoundEnd

    seen, last, shown = None, time.monotonic(), None
    while not run.finished() and time.monotonic() - last < idle:
        stamp = run.metrics_path.stat().st_mtime_ns if run.metrics_path.exists() else None
        if stamp != seen:
            seen, last = stamp, time.monotonic()
            done = [e.round for e in run.read(RoundEnd)]
            if done and done[-1] != shown:
                shown = done[-1]
                _log(f"round {shown} done")
        time.sleep(1.0)


def _log(message: str) -> None:
    console.print(f"[bold]fedpriv:[/] {message}")


def _warn_insecure(who: str) -> None:
    err.print(
        Panel(
            f"[bold]{who} is running WITHOUT TLS and without node authentication.[/]\n"
            "Model updates cross the network in plain text and anyone who can reach the port can join.\n"
            "Use this only for a throw-away test on one machine.",
            title="[bold red]INSECURE[/]",
            border_style="red",
        )
    )


def _out(federation: Path, out: Path | None) -> Path:
    return out or federation.resolve().parent / "kits"


def _print_report(report, out: Path) -> None:
    for path in report.created:
        console.print(f"[green]created[/] {path}")
    for path in report.updated:
        console.print(f"[yellow]updated[/] {path}")
    if report.kept:
        console.print(f"kept {len(report.kept)} existing key/certificate file(s) unchanged (never overwritten)")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(
        f"\nKits in {out}: give [bold]sites/NAME/[/] to each site, keep [bold]aggregator/[/] on the aggregator, "
        f"and keep [bold]ca/ca.key[/] offline."
    )


# -- provision ------------------------------------------------------------


@provision_app.callback()
def provision(
    ctx: typer.Context,
    federation: FederationOpt = Path("federation.toml"),
    out: OutOpt = None,
) -> None:
    """From a federation file: a CA, the aggregator's TLS certificate, node and ledger keys, one kit per party.

    Running it again only adds what is missing; existing keys are never replaced.
    """
    if ctx.invoked_subcommand is not None:
        return
    from fedpriv.deploy.provision import provision as run_provision

    report = run_provision(federation, _out(federation, out))
    _print_report(report, _out(federation, out))


@provision_app.command("add-site")
def provision_add_site(
    name: Annotated[str, typer.Argument(help="The new site's name (lower-case letters, digits, '-').")],
    federation: FederationOpt = Path("federation.toml"),
    out: OutOpt = None,
    epsilon_cap: Annotated[
        float | None, typer.Option(help="The site's epsilon cap (default: the federation's).")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="The site's delta (default: the federation's).")] = None,
    declared_rows: Annotated[
        int | None, typer.Option(help="The site's public size (default: the federation's), see agent start.")
    ] = None,
) -> None:
    """Add a site to the federation file and make its kit; then run `fedpriv aggregator register`."""
    from fedpriv.deploy.provision import add_site

    report = add_site(federation, _out(federation, out), name, epsilon_cap, delta, declared_rows)
    _print_report(report, _out(federation, out))
    console.print(
        f"Next: give sites/{name}/ to the site; if the aggregator runs elsewhere, copy public-keys.json and "
        "node-keys.json from aggregator/ into its kit; then run `fedpriv aggregator register --kit KIT` there."
    )


@provision_app.command("rotate-tls")
def provision_rotate_tls(federation: FederationOpt = Path("federation.toml"), out: OutOpt = None) -> None:
    """Issue a new TLS key and certificate for the aggregator (same CA: sites change nothing)."""
    from fedpriv.deploy.provision import rotate_tls

    report = rotate_tls(federation, _out(federation, out))
    _print_report(report, _out(federation, out))
    console.print("Restart the aggregator to use the new certificate.")


# -- aggregator -------------------------------------------------------------


def _aggregator(kit: Path, state: Path | None, insecure: bool):
    from fedpriv.deploy.aggregator import Aggregator

    return Aggregator(kit, state, insecure=insecure)


@aggregator_app.command("start")
def aggregator_start(
    kit: AggKitOpt,
    state: AggStateOpt = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Run without TLS and node authentication (local tests only).")
    ] = False,
    fleet_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for the Fleet API (sites), default from the kit.")
    ] = None,
    control_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for the control API (operator), default from the kit.")
    ] = None,
    flower_database: Annotated[
        Path | None,
        typer.Option(
            help="Keep Flower's own state (node registry, its run list) in this SQLite file instead of memory. "
            "Slower rounds; fedpriv needs none of it: runs live in their run directories, sites are registered "
            "again at every start."
        ),
    ] = None,
) -> None:
    """Run the SuperLink (TLS, node authentication) and register the provisioned sites."""
    if insecure:
        _warn_insecure("The aggregator")
    aggregator = _aggregator(kit, state, insecure)
    database = flower_database.expanduser().resolve() if flower_database else None
    raise typer.Exit(aggregator.start(fleet_listen, control_listen, log=_log, flower_database=database))


@aggregator_app.command("register")
def aggregator_register(kit: AggKitOpt, state: AggStateOpt = None) -> None:
    """Register every site in the kit's node-keys.json with the running aggregator (after add-site)."""
    _aggregator(kit, state, False).register_nodes(log=console.print)


@aggregator_app.command("run")
def aggregator_run(
    kit: AggKitOpt,
    state: AggStateOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with run settings.")] = None,
    settings: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a setting: section.key=value.")
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run directory (default: STATE/runs/<date>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = None,
    app_dir: Annotated[
        Path | None, typer.Option("--app", help="The fedpriv Flower App folder (default: this installation's).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="The aggregator was started with --insecure.")] = False,
    dashboard: Annotated[
        bool,
        typer.Option(
            "--dashboard", help="Serve a live page of the run on http://127.0.0.1 while it goes on (fedpriv dashboard)."
        ),
    ] = False,
    dashboard_port: Annotated[int, typer.Option(help="Port of --dashboard.", min=1, max=65535)] = 8765,
) -> None:
    """Submit a fedpriv run to the running aggregator and stream its progress."""
    import contextlib

    from fedpriv.common.rundir import RunDirectory
    from fedpriv.deploy.aggregator import AggregatorError
    from fedpriv.server.report import print_summary

    aggregator = _aggregator(kit, state, insecure)
    if resume:
        if config or run_dir:
            raise AggregatorError("--resume takes the run's saved settings and directory; drop --config/--run-dir")
        cfg = aggregator.resume_config(resume, settings or [])
    else:
        cfg = aggregator.run_config(config, settings or [], run_dir)
    _log(f"run directory {cfg.run_dir}")
    with contextlib.ExitStack() as stack:
        if dashboard:
            from fedpriv.dashboard.server import beside

            stack.enter_context(beside(Path(cfg.run_dir), dashboard_port, _log))
        code = aggregator.submit(cfg, app_dir)
        run = RunDirectory(cfg.run_dir)
        if code == 0 and not run.finished():
            # Flower's log stream can end while the run goes on (seen under load):
            # the run directory says when it is really over.
            _log("the log stream ended before the run did; following its run directory")
            _follow(run, idle=cfg.strategy.round_timeout + 120)
    if code == 0 and run.finished():
        print_summary(run, console)
        raise typer.Exit(0)
    err.print(
        f"[bold red]the run did not finish[/] (flwr exited with {code}). Its checkpoints are in {run.checkpoints}; "
        f"continue it with: fedpriv aggregator run --kit {kit} --resume {run.path}"
    )
    raise typer.Exit(1)


# -- agent --------------------------------------------------------------------


@agent_app.command("start")
def agent_start(
    kit: Annotated[Path, typer.Option("--kit", help="This site's kit folder.")],
    data: Annotated[
        Path, typer.Option("--data", help="The site's data (.csv, .tsv, .txt, .jsonl, .parquet; .gz/.zst).")
    ],
    state: Annotated[
        Path | None, typer.Option("--state", help="Where the site keeps its ledger and Flower state.")
    ] = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's app API (unique per agent on one host).")
    ] = 9094,
    superlink: Annotated[
        str | None, typer.Option(help="Aggregator Fleet address HOST:PORT (default: the kit's).")
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="Label set (file or inline JSON list), default: the kit's.")
    ] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column, default: the kit's.")] = None,
    label_column: Annotated[str | None, typer.Option(help="Label column, default: the kit's.")] = None,
    min_rows: Annotated[int | None, typer.Option(help="Fewest usable rows, default: the kit's.")] = None,
    max_retries: Annotated[
        int | None,
        typer.Option(help="Give up after this many failed connection or activation attempts (default: keep trying)."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Connect without TLS (only to an --insecure test aggregator).")
    ] = False,
    allow_non_private: Annotated[
        bool, typer.Option("--allow-non-private", help="Let this site train without DP if a run asks.")
    ] = False,
    declared_rows: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="FEDPRIV_DECLARED_ROWS",
            help="The site's public size, a round figure it may publish (default: the kit's). DP updates are "
            "divided by sample rate x this and it weighs the site in FedAvg; the true row count never leaves.",
        ),
    ] = None,
) -> None:
    """Check the site's data, then join the federation (Flower SuperNode); stops cleanly on SIGTERM."""
    from fedpriv.deploy.agent import Agent
    from fedpriv.deploy.kit import KitError

    agent = Agent.from_kit(kit, state)
    dataset = agent.validate(data, labels, text_column, label_column, min_rows)
    _log(
        f"{agent.kit.site}: {len(dataset)} rows in {data} checked against "
        f"{len(set(dataset.labels.tolist()))} of the federation's labels"
    )
    policy = agent.kit.policy
    _log(
        f"{agent.kit.site}: privacy policy: non-private releases {'allowed' if allow_non_private or policy.allow_non_private else 'refused'}, "
        f"collusion bound t >= {policy.min_colluding_sites}, noise multiplier >= {policy.min_noise_multiplier:g}, "
        f"epsilon per release <= {policy.max_release_epsilon:g}, modes {','.join(policy.modes)}, "
        f"noise {','.join(policy.noise_modes)}; lifetime cap epsilon {agent.kit.epsilon_cap:g} at delta {agent.kit.delta:g}"
    )
    declared = declared_rows or agent.kit.declared_rows
    if declared is None:
        raise KitError(
            f"{agent.kit.site} declares no public size: pass --declared-rows N (a round figure near its "
            f"{len(dataset)} rows that it may publish), or set declared-rows for it in the federation file. "
            "Private updates are divided by sample rate x this figure; dividing by the true count would leak it."
        )
    command = agent.supernode_command(
        agent.node_config(data, allow_non_private, declared),
        port=port,
        superlink=superlink,
        insecure=insecure,
        max_retries=max_retries,
    )
    if insecure:
        _warn_insecure(f"Site {agent.kit.site}")
    raise typer.Exit(agent.run(command, max_retries=max_retries, log=_log))


@agent_app.command("check")
def agent_check(
    kit: Annotated[Path, typer.Option("--kit", help="This site's kit folder.")],
    data: Annotated[
        Path, typer.Option("--data", help="The site's data (.csv, .tsv, .txt, .jsonl, .parquet; .gz/.zst).")
    ],
) -> None:
    """Only check the site's data against the federation's label set and columns."""
    from fedpriv.deploy.agent import Agent

    dataset = Agent.from_kit(kit).validate(data)
    console.print(f"{data}: {len(dataset)} rows, all labels known to the federation")


@agent_app.command("reset-budget")
def agent_reset_budget(
    kit: Annotated[Path, typer.Option("--kit", help="This site's kit folder (its ledger key signs the reset).")],
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (recorded in the ledger and shown by every audit).")
    ] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Where the site keeps its ledger.")] = None,
) -> None:
    """Reset this site's privacy budget: append a signed, reasoned reset record to its ledger.

    Releases before it no longer count towards the cap. Only do this when the
    data they were made from is gone for good (e.g. the people in it are no
    longer in the data); a changed or grown data file never resets a budget.
    """
    from fedpriv.common.privacy.records import BudgetReset
    from fedpriv.deploy.agent import reset_budget

    entry, spent = reset_budget(kit, state, reason)
    record = entry.record
    assert isinstance(record, BudgetReset)
    _log(
        f"{record.site}: budget reset (ledger seq {entry.seq}); {record.releases_before} earlier release(s), "
        f"epsilon {spent}, no longer count. Reason recorded: {record.reason}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(provision_app, name="provision")
    app.add_typer(aggregator_app, name="aggregator")
    app.add_typer(agent_app, name="agent")
