"""`fedpriv simulate`: check everything up front, run the federation, report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from fedpriv.audit.auditor import audit
from fedpriv.audit.render import console_report, html_report
from fedpriv.common import site_names
from fedpriv.common.config import ConfigError, FedprivConfig, parse_config
from fedpriv.common.data import LabelSet, load_configured, read_column
from fedpriv.common.errors import FedprivError
from fedpriv.common.files import read_toml, write_atomic
from fedpriv.common.flower_app import write_app_dir
from fedpriv.common.partition import label_histogram, split_for
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.plan import plan_for
from fedpriv.common.privacy.wording import privacy_in_words
from fedpriv.common.resources import check_model
from fedpriv.common.run_events import RoundEnd, RunFailed, SiteError, TrainAggregate
from fedpriv.common.rundir import AGGREGATOR, CONFIG, RunDirectory, RunDirectoryError
from fedpriv.server.report import print_summary, write_plots
from fedpriv.simulation import engine
from fedpriv.simulation.monitor import Monitor


class NobodyTrainedError(FedprivError):
    """Every round ended without one site's update: each site's ClientApp failed."""


def check_someone_trained(run: RunDirectory) -> None:
    """A simulation in which every site failed every round trained nothing: an error, not a finished run.

    A deployment keeps going through a site's failure (it may be back next
    round); in a simulation the sites are the harness's own, so their failing
    in every round is a bug or a bad setting, and the model it leaves is the
    untrained one.
    """
    if any(event.sites > 0 for event in run.read(TrainAggregate)):
        return
    errors = run.read(SiteError)
    if not errors:
        return  # refused or exhausted: the run log says why, and the run ended as it should
    first = errors[0]
    raise NobodyTrainedError(
        f"no site trained in any round: every site's ClientApp failed ({len(errors)} errors; the first, "
        f"round {first.round}, {first.site}: {first.reason}). The model in {run.path} is the untrained one"
    )


class AuditFailedError(FedprivError):
    """The run finished but its own audit found a violation (shown above the message)."""


def check_sites(config: FedprivConfig) -> None:
    """A round waits until strategy.min-sites sites are connected: with fewer simulated, it would wait forever."""
    sites, wanted = config.simulation.sites, config.strategy.min_sites
    if sites >= wanted:
        return
    fix = (
        "secure aggregation needs at least 2 sites (--preset local runs one)"
        if config.privacy.secure_aggregation and sites < 2
        else f"set strategy.min-sites to at most {sites}"
    )
    raise ConfigError(
        f"simulation.sites: {sites} simulated site{'s' if sites != 1 else ''}, but a round waits for "
        f"strategy.min-sites = {wanted} and would never start; {fix}"
    )


def plan_sites(config: FedprivConfig, labels: LabelSet) -> tuple[FedprivConfig, Table, list[str]]:
    """Validates every data file and shows how the dataset is split into sites, before any worker starts."""
    data, sim = config.data, config.simulation
    dataset = load_configured(data, labels)
    if data.test_path:
        # Read in full now: a column or label it lacks would otherwise surface after round 1's training.
        load_configured(data, labels, data.test_path)
    sites = len(set(read_column(data.path, sim.column, data.delimiter))) if sim.partitioner == "column" else sim.sites
    if sites != sim.sites:
        config = config.replace(**{"simulation.sites": sites})
    check_sites(config)
    parts, names = split_for(config, dataset, sites)
    for setting, named in (("site-caps", sim.caps()), ("site-policies", sim.policies())):
        strangers = sorted(set(named) - set(names))
        if strangers:
            raise ConfigError(
                f"simulation.{setting}: no simulated site is called {', '.join(strangers)} "
                f"(the sites are {names[0]} ... {names[-1]})"
            )
    histogram = label_histogram(dataset.labels, parts, len(labels))
    table = Table(title=f"{len(parts)} sites from {dataset.source} ({sim.partitioner})", title_justify="left")
    for column in ("site", "rows", "labels present", "largest label share"):
        table.add_column(column, justify="left" if column == "site" else "right")
    shown = range(len(parts)) if len(parts) <= 12 else [*range(6), *range(len(parts) - 3, len(parts))]
    for i in shown:
        counts = histogram[i]
        share = counts.max() / max(counts.sum(), 1)
        table.add_row(names[i], str(len(parts[i])), f"{np.count_nonzero(counts)}/{len(labels)}", f"{100 * share:.0f}%")
    if len(parts) > len(shown):
        table.caption = f"... {len(parts) - len(shown)} more sites"
    return config, table, names


def provision_simulated_keys(run: RunDirectory, names: list[str]) -> None:
    """Ledger keys for every simulated site and the aggregator, made before the run.

    As in a deployment, the public keys are fixed up front (keys/public-keys.json)
    so the audit can tell each ledger's owner, not just its integrity.
    """
    public = {}
    for owner in [*map(site_names.check, names), AGGREGATOR]:
        public[owner] = signing.public_b64(signing.load_or_create(run.key_path(owner)))
    write_atomic(run.public_keys, json.dumps(public, indent=2))


def simulate(
    config: FedprivConfig,
    console: Console | None = None,
    verbose: bool = False,
    resume: bool = False,
    audit_fault: str | None = None,
    audit_canaries: Path | None = None,
) -> RunDirectory:
    """Runs a simulated federation in `config.run_dir`; `resume` continues one cut short there.

    For `fedpriv audit --empirical`: `audit_fault` (`node_config.audit_fault`) breaks the run on purpose
    while the ledgers claim the planned release; `audit_canaries` is the canary file that the site named by
    `simulation.audit-canary-site` adds to its rows.
    """
    console = console or Console()
    check_model(config.model.name)  # before any site is built or anything is written
    if config.simulation.ray_address:
        from fedpriv.simulation import cluster

        cluster.attach(config, verbose)  # every node can run the sites, or nothing is written
    run = RunDirectory.create(config.run_dir)
    with run.lock():
        if run.started() and not resume:
            raise RunDirectoryError(
                f"{run.path} already holds a run; continue it with: fedpriv simulate --resume {run.path} "
                "(or give this run another --output)"
            )
        if resume and run.finished():
            raise RunDirectoryError(f"{run.path}: this run already finished; start a new one")
        return _simulate(run, config, console, verbose, audit_fault, audit_canaries)


def _stopped(run: RunDirectory, console: Console, reason: str | None = None) -> None:
    """The aggregator ended before the run did: show that what was written verifies, then say why."""
    failures = run.read(RunFailed)
    if reason is None:
        reason = failures[-1].error if failures else "the aggregator stopped without saying why (run with --verbose)"
    rounds = [e.round for e in run.read(RoundEnd)]
    report = audit([run.path])
    console_report(report, console)
    raise RunDirectoryError(
        f"the run stopped after round {max(rounds, default=0)}: {reason}. "
        f"Once fixed, continue it with: fedpriv simulate --resume {run.path}"
    )


def resume_config(run_dir: Path) -> FedprivConfig:
    """The saved settings of a run cut short, to continue it with the same privacy plan."""
    saved = RunDirectory(Path(run_dir).expanduser().resolve()).config_path
    if not saved.exists():
        raise RunDirectoryError(f"{saved.parent}: no {CONFIG} here; is this a fedpriv run directory?")
    return parse_config(read_toml(saved, "saved run config", RunDirectoryError), str(saved)).replace(
        **{"run-dir": str(saved.parent)}
    )


def _simulate(
    run: RunDirectory,
    config: FedprivConfig,
    console: Console,
    verbose: bool,
    audit_fault: str | None = None,
    audit_canaries: Path | None = None,
) -> RunDirectory:
    config = config.replace(**{"run-dir": str(run.path)})
    labels = LabelSet.load(config.data.labels)
    config, sites_table, site_names = plan_sites(config, labels)
    console.print(sites_table)
    for sentence in privacy_in_words(config):
        console.print(sentence if config.privacy.enabled else f"[yellow]{sentence}[/]", highlight=False)
    console.print(
        f"{config.rounds} rounds of {config.strategy.name}, mode {config.model.mode}, "
        f"model {config.model.name}; run directory {run.path}"
    )
    provision_simulated_keys(run, site_names)
    app_dir = write_app_dir(run.flower_app, config)
    # Distributed noise: each round is one step of DP-SGD over the pooled data.
    steps = plan_for(config).steps_per_round
    started = time.time()
    try:
        with Monitor(run, config.rounds, config.simulation.sites, steps, console=console):
            engine.run(
                config,
                app_dir,
                verbose=verbose,
                audit_fault=audit_fault,
                audit_canaries=audit_canaries,
                site_names=site_names,
            )
    except FedprivError as error:  # the ServerApp runs in this process: its error arrives here
        _stopped(run, console, str(error))
    if not run.finished():
        _stopped(run, console)
    console.print(f"Simulation finished in {time.time() - started:.0f} s")
    finish(run, console)
    check_someone_trained(run)
    return run


def finish(run: RunDirectory, console: Console) -> None:
    """Plots, summary and the run's own audit; a failed audit is an error, not a line in a report."""
    write_plots(run)
    print_summary(run, console)
    report = audit([run.path])
    console_report(report, console)
    run.audit_html.write_text(html_report(report), encoding="utf-8")
    if not report.ok:
        raise AuditFailedError(
            f"{run.path}: the run finished but its audit failed (see above and {run.audit_html}); "
            "do not rely on its privacy numbers"
        )
