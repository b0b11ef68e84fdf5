"""`fedpriv simulate` end to end, on the real Flower Simulation Engine (Ray)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from fedpriv.common.rundir import RunDirectory, summarize
from fedpriv.simulation.harness import simulate
from tests.helpers import easy_rows, fedpriv_here, write_csv

ROOT = Path(__file__).resolve().parents[1]


def _record_round(line: str) -> int:
    """The round of a ledger line; 0 for a line the kill cut short (the ledger's reader skips it too)."""
    try:
        return json.loads(line)["record"]["round"]
    except (json.JSONDecodeError, KeyError):
        return 0


def write_config(tmp_path, config, **changes) -> Path:
    path = tmp_path / "fedpriv.toml"
    path.write_text(tomli_w.dumps(config.replace(**changes).model_dump(by_alias=True)))
    return path


@pytest.mark.slow
def test_simulate_three_sites_learns_and_reports_epsilon_per_site(tiny_config, tmp_path):
    changes = {"privacy.target-epsilon": 8.0, "privacy.evaluation": "noised", "privacy.evaluation-noise": 3.0}
    path = write_config(tmp_path, tiny_config, **changes)
    result = fedpriv_here("simulate", "--config", str(path), "--rounds", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run = RunDirectory(tiny_config.run_dir)
    summary = summarize(run)
    assert summary["rounds-completed"] == 2
    assert summary["central-accuracy"] > 0.6  # chance is 1/3
    assert set(summary["sites"]) == {"site-000", "site-001", "site-002"}
    for site in summary["sites"].values():
        assert 0 < site["epsilon"] <= 8.0
        assert set(site["epsilon-by-round"]) == {1, 2}
    assert "Final test accuracy" in result.stdout and "site-002" in result.stdout

    # What a run leaves behind.
    assert (run.path / "config.toml").exists() and (run.path / "summary.json").exists()
    assert sorted(p.name for p in run.checkpoints.glob("*.safetensors")) == [
        "round-0001.safetensors",
        "round-0002.safetensors",
    ]
    assert (run.plots / "accuracy.png").stat().st_size > 1000 and (run.plots / "epsilon.png").exists()
    kinds = {e["kind"] for e in run.events()}
    assert {"site-train", "site-evaluate", "federated-evaluate", "central-evaluate", "round-end"} <= kinds
    # Noised evaluation: only two noisy counts leave a site, each release is in its ledger and its budget.
    evaluations = list(run.events("site-evaluate"))
    assert len(evaluations) == 6 and all("loss" not in e and "noisy-correct" in e for e in evaluations)
    from fedpriv.common.privacy.ledger import Ledger

    for name in summary["sites"]:
        records = Ledger(run.path / "ledgers" / f"{name}.jsonl").records()
        queries = [(r.round, r.mechanism.kind, r.mechanism.query) for r in records]
        assert queries == [
            (1, "poisson-sampled-gaussian", "update"),
            (1, "gaussian", "evaluation"),
            (2, "poisson-sampled-gaussian", "update"),
            (2, "gaussian", "evaluation"),
        ]
        assert records[-1].accounting.epsilon <= 8.0 and records[-1].accounting.accountant == "pld"
    config_written = (run.path / "config.toml").read_text()
    assert "target-epsilon = 8.0" in config_written

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir, trust_remote_code=True)
    assert model.config.num_labels == 3

    # Every epsilon printed can be reproduced from the signed ledgers.
    assert "Audit passed" in result.stdout
    assert (run.path / "ledgers" / "federation.jsonl").exists() and (run.path / "audit.html").exists()

    # `fedpriv report` reprints the same table from what was recorded.
    again = fedpriv_here("report", str(run.path))
    assert again.returncode == 0 and f"{100 * summary['central-accuracy']:.2f}%" in again.stdout


def test_bad_site_data_stops_before_any_training(tiny_config, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", easy_rows(20) + [("lost my loan", "loans")])
    path = write_config(tmp_path, tiny_config, **{"data.path": str(bad)})
    result = fedpriv_here("simulate", "--config", str(path))
    assert result.returncode == 2
    assert "bad.csv, column 'category', row 21: unknown label 'loans'" in result.stderr


def test_bad_setting_is_named_on_the_command_line(tmp_path):
    result = fedpriv_here("simulate", "--set", "privacy.delta=2", "-o", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "privacy.delta" in result.stderr


def test_an_unloadable_model_is_named_before_anything_is_built_or_written(tmp_path):
    run = tmp_path / "run"
    result = fedpriv_here("simulate", "--set", "model.name=no/such-model", "-o", str(run))
    assert result.returncode == 2, result.stderr
    assert "model.name: 'no/such-model' is neither a local directory nor in the offline Hugging Face cache" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and not run.exists()
    # The settings it would have run with: the default starting point, and the one without DP.
    assert "Settings: preset distributed (the default; --preset to choose)" in result.stdout
    no_dp = fedpriv_here("simulate", "--no-dp", "--set", "model.name=no/such-model", "-o", str(run))
    assert no_dp.returncode == 2 and "Settings: preset local (DP is off (privacy.enabled = False)" in no_dp.stdout
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = fedpriv_here("simulate", "--set", f"model.name={empty}", "-o", str(run))
    assert result.returncode == 2 and "without a config.json" in result.stderr


@pytest.mark.slow
def test_sites_stop_at_their_caps_and_the_run_ends_when_all_are_spent(tiny_config, tmp_path):
    from fedpriv.common.privacy.accounting import epsilon, poisson_gaussian
    from fedpriv.common.privacy.plan import plan_for

    config = tiny_config.replace(**{"rounds": 4})
    plan = plan_for(config)
    step = poisson_gaussian(plan.noise_multiplier, plan.sample_rate, plan.local_steps)
    after = [epsilon([step] * n, config.privacy.delta, config.privacy.accountant) for n in (1, 2)]
    # site-000 can afford one round, the others two; nobody can afford a third.
    caps = f"site-000={after[0] * 1.01:.6f},site-001={after[1] * 1.01:.6f},site-002={after[1] * 1.01:.6f}"
    path = write_config(tmp_path, config, **{"simulation.site-caps": caps})
    result = fedpriv_here("simulate", "--config", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run = RunDirectory(config.run_dir)
    trained = {(e["site"], e["round"]) for e in run.events("site-train")}
    assert trained == {("site-000", 1), ("site-001", 1), ("site-002", 1), ("site-001", 2), ("site-002", 2)}
    exhausted = {(e["site"], e["round"]) for e in run.events("site-budget-exhausted")}
    assert ("site-000", 2) in exhausted and {("site-000", 3), ("site-001", 3), ("site-002", 3)} <= exhausted
    assert [e["round"] for e in run.events("all-budgets-exhausted")] == [3]
    assert (run.model_dir / "config.json").exists()  # ended cleanly, model exported
    # A private run evaluates centrally only: no site sends metrics in the clear (privacy.evaluation = off).
    assert not list(run.events("site-evaluate")) and not list(run.events("federated-evaluate"))

    from fedpriv.audit.auditor import audit

    report = audit([run.path])
    assert report.ok, [str(p) for p in report.problems]
    by_site = {s.site: s for s in report.sites}
    assert len(by_site["site-000"].releases) == 1 and len(by_site["site-001"].releases) == 2
    assert all(s.epsilon <= s.cap for s in report.sites)
    assert {"site-000", "site-001", "site-002"} == {e["site"] for e in report.exhausted}
    assert "budget exhausted" in result.stdout and "Audit passed" in result.stdout


@pytest.mark.slow
def test_site_level_dp_is_recorded_and_audited(tiny_config, tmp_path):
    path = write_config(
        tmp_path,
        tiny_config,
        **{"privacy.site-level-noise": 0.3, "privacy.site-level-clip": 10.0, "strategy.min-sites": 3},
    )
    result = fedpriv_here("simulate", "--config", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunDirectory(tiny_config.run_dir)
    releases = run.events("site-level-release")
    assert [e["round"] for e in releases] == [1, 2]
    assert releases[1]["epsilon"] > releases[0]["epsilon"] > 0

    from fedpriv.audit.auditor import audit

    report = audit([run.path])
    assert report.ok, [str(p) for p in report.problems]
    federation = next(s for s in report.sites if s.site == "federation")
    assert [r.round for r in federation.releases] == [1, 2]
    assert federation.epsilon == pytest.approx(releases[1]["epsilon"])
    assert federation.releases[-1].rdp == pytest.approx(federation.epsilon, rel=1e-6)


@pytest.mark.slow
def test_a_killed_simulation_audits_clean_refuses_a_second_writer_and_resumes(tiny_config, tmp_path):
    import signal
    import time

    config = tiny_config.replace(**{"rounds": 12})  # enough rounds to be cut short mid-run
    path = write_config(tmp_path, config)
    run = RunDirectory(config.run_dir)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedpriv.cli", "simulate", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: Ray's workers die with it
    )
    try:
        deadline = time.time() + 300
        while not (run.checkpoints / "round-0002.safetensors").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no round-2 checkpoint within 300 s"
            time.sleep(0.2)
        # Frozen mid-run (SIGSTOP keeps its lock and its rounds from racing on); a second run into the
        # same directory while the first holds it is refused, nothing interleaved.
        os.killpg(process.pid, signal.SIGSTOP)
        assert not run.finished(), "the run ended before it could be stopped"
        second = fedpriv_here("simulate", "--config", str(path))
        assert second.returncode == 2 and "in use by fedpriv process" in second.stderr, second.stderr
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    audit = fedpriv_here("audit", str(run.path))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    fresh = fedpriv_here("simulate", "--config", str(path))
    assert fresh.returncode == 2 and f"fedpriv simulate --resume {run.path}" in fresh.stderr
    assert fedpriv_here("simulate", "--resume", str(run.path), "--rounds", "9").returncode == 2

    # A round the sites trained in before the kill but that was never checkpointed is trained again, and
    # both releases count: when every site paid such a round, their caps end the run that many rounds early.
    kept = int(sorted(p.stem for p in run.checkpoints.glob("*.safetensors"))[-1].split("-")[1])
    paid_twice = min(
        sum(1 for line in ledger.read_text().splitlines() if _record_round(line) > kept)
        for ledger in sorted(run.path.glob("ledgers/site-*.jsonl"))
    )
    resumed = fedpriv_here("simulate", "--resume", str(run.path))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Audit passed" in resumed.stdout
    assert run.events("resumed") and run.events("run-end")
    assert summarize(run)["rounds-completed"] == 12 - paid_twice
    last = f"round-{12 - paid_twice:04d}.safetensors"
    assert sorted(p.name for p in run.checkpoints.glob("*.safetensors"))[-1] == last
    if paid_twice:
        assert {e["round"] for e in run.events("site-budget-exhausted")} == {13 - paid_twice}
    again = fedpriv_here("simulate", "--resume", str(run.path))
    assert again.returncode == 2 and "already finished" in again.stderr


@pytest.mark.slow
def test_sigterm_stops_the_simulation_and_every_process_it_started(tiny_config, tmp_path):
    """SIGTERM once left the command waiting on its ServerApp thread and Ray's workers training for minutes.

    Run on the Ray backend, the default (the in-process one starts no process to leave behind).
    """
    import signal
    import time

    import psutil

    changes = {"rounds": 500, "train.local-epochs": 20.0, "simulation.backend": "ray"}
    path = write_config(tmp_path, tiny_config, **changes)
    process = subprocess.Popen(
        [sys.executable, "-m", "fedpriv.cli", "simulate", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, for the clean-up below only
    )
    progress = Path(tiny_config.run_dir) / "progress"
    try:
        deadline = time.time() + 300
        while not (progress.is_dir() and any(progress.iterdir())):  # a site is training: Ray's workers are busy
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no site started training within 300 s"
            time.sleep(0.2)
        started = psutil.Process(process.pid).children(recursive=True)

        def described(p: psutil.Process) -> str:
            with contextlib.suppress(psutil.Error):
                return f"{p.name()} {' '.join(p.cmdline())}"
            return ""

        def dead(p: psutil.Process) -> bool:
            try:
                return p.status() == psutil.STATUS_ZOMBIE  # killed; only init's reaping is left
            except psutil.NoSuchProcess:
                return True

        assert any("ClientAppActor" in described(p) for p in started), [described(p) for p in started]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
        assert "terminated; its workers were stopped with it" in process.stderr.read().decode()
        deadline = time.time() + 60
        while not all(dead(p) for p in started):  # killed before the command exited: this takes no time
            assert time.time() < deadline, [described(p) for p in started if not dead(p)]
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_run_whose_own_audit_fails_ends_in_an_error_and_exit_1(tmp_path, monkeypatch):
    """`fedpriv simulate` exited 0 after printing its own failed audit."""
    from rich.console import Console
    from typer.testing import CliRunner

    from fedpriv.cli import app
    from fedpriv.simulation import harness
    from tests.test_ledger import make_run

    run = make_run(tmp_path / "run")
    ledger = run / "ledgers" / "site-001.jsonl"
    entries = ledger.read_text().splitlines(keepends=True)
    edited = json.loads(entries[1])
    edited["record"]["accounting"]["epsilon"] = 0.01  # an under-reported release
    ledger.write_text("".join([entries[0], json.dumps(edited) + "\n", *entries[2:]]))
    console = Console(record=True, width=200)
    with pytest.raises(harness.AuditFailedError, match="the run finished but its audit failed"):
        harness.finish(RunDirectory(run), console)
    assert "site-001.jsonl line 2" in console.export_text() and (run / "audit.html").exists()

    def audit_fails(config, **_):
        raise harness.AuditFailedError(f"{config.run_dir}: the run finished but its audit failed")

    monkeypatch.setattr(harness, "simulate", audit_fails)
    result = CliRunner().invoke(app, ["simulate", "--no-dp", "-o", str(run)])
    assert result.exit_code == 1 and "audit failed" in result.output


@pytest.mark.slow
def test_a_round_that_asks_only_refusing_sites_does_not_end_the_run(tiny_config):
    # Each round asks one of the two sites (fraction-train 0.5); site-001's own policy refuses every round.
    # A round that asked only site-001 gets no update, yet site-000 trains when asked: the run goes on.
    # (It used to end at the first such round, with all-sites-refused: P = 1 - 2^-8 for these rounds.)
    rounds = 8
    config = tiny_config.replace(
        **{
            "rounds": rounds,
            "simulation.sites": 2,
            "strategy.min-sites": 1,
            "strategy.fraction-train": 0.5,
            "simulation.site-policies": "site-001: min-noise-multiplier=100",
        }
    )
    simulate(config, console=Console(file=io.StringIO()))
    run = RunDirectory(config.run_dir)
    assert summarize(run)["rounds-completed"] == rounds and not run.events("all-sites-refused")
    assert {e["site"] for e in run.events("site-train")} == {"site-000"}
    refusals = run.events("site-refused")
    assert refusals and all("below its minimum 100" in e["reason"] for e in refusals)
    # Once every connected site has refused, the run ends: at the round by which both had been asked.
    everyone = config.replace(
        **{"run-dir": config.run_dir + "-all", "simulation.site-policies": "site-000: modes=lora; site-001: modes=lora"}
    )
    simulate(everyone, console=Console(file=io.StringIO()))
    ended = RunDirectory(everyone.run_dir)
    assert not ended.events("site-train")
    first = {}
    for e in ended.events("site-refused"):
        first.setdefault(e["site"], e["round"])
    ends = [e["round"] for e in ended.events("all-sites-refused")]
    if len(first) == 2:
        assert ends == [max(first.values())] and summarize(ended)["rounds-completed"] == max(first.values()) - 1
    else:  # one site asked in every round (P = 2^-7): the other may still train, so it never ended
        assert not ends and summarize(ended)["rounds-completed"] == rounds
