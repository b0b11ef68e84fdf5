"""`fedpriv simulate` end to end, on the real Flower Simulation Engine (Ray)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from common.rundir import RunDirectory, summarize
from tests.conftest import easy_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]


def fedpriv(*args, cwd=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
    )


def write_config(tmp_path, config, **changes) -> Path:
    path = tmp_path / "fedpriv.toml"
    path.write_text(tomli_w.dumps(config.replace(**changes).model_dump(by_alias=True)))
    return path


@pytest.mark.slow
def test_simulate_three_sites_learns_and_reports_epsilon_per_site(tiny_config, tmp_path):
    path = write_config(tmp_path, tiny_config, **{"privacy.target-epsilon": 8.0})
    result = fedpriv("simulate", "--config", str(path), "--rounds", "2")
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
    assert sorted(p.name for p in run.checkpoints.glob("*.safetensors")) == ["round-0001.safetensors", "round-0002.safetensors"]
    assert (run.plots / "accuracy.png").stat().st_size > 1000 and (run.plots / "epsilon.png").exists()
    kinds = {e["kind"] for e in run.events()}
    assert {"site-train", "site-evaluate", "federated-evaluate", "central-evaluate", "round-end"} <= kinds
    config_written = (run.path / "config.toml").read_text()
    assert "target-epsilon = 8.0" in config_written

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run.model_dir, trust_remote_code=True)
    assert model.config.num_labels == 3

    # `fedpriv report` reprints the same table from what was recorded.
    again = fedpriv("report", str(run.path))
    assert again.returncode == 0 and f"{100 * summary['central-accuracy']:.2f}%" in again.stdout


def test_bad_site_data_stops_before_any_training(tiny_config, tmp_path):
    bad = write_csv(tmp_path / "bad.csv", easy_rows(20) + [("lost my loan", "loans")])
    path = write_config(tmp_path, tiny_config, **{"data.path": str(bad)})
    result = fedpriv("simulate", "--config", str(path))
    assert result.returncode == 2
    assert "bad.csv, column 'category', row 21: unknown label 'loans'" in result.stderr


def test_bad_setting_is_named_on_the_command_line(tmp_path):
    result = fedpriv("simulate", "--set", "privacy.delta=2", "-o", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "privacy.delta" in result.stderr
