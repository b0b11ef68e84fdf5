"""A disk that fills up: the write that fails is named, nothing partial is kept, what was written still verifies."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedpriv.common.files import StorageError, write_atomic
from fedpriv.common.privacy import signing
from fedpriv.common.privacy.ledger import Ledger, verify_ledger
from fedpriv.common.privacy.records import SiteExhausted
from fedpriv.server import checkpoint

FULL = OSError(errno.ENOSPC, "No space left on device")


def _full(*args, **kwargs):
    raise FULL


def test_a_replaced_file_keeps_its_old_content_when_the_disk_is_full(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "summary.json", "old")
    monkeypatch.setattr(os, "replace", _full)
    with pytest.raises(StorageError, match=r"summary\.json: cannot write the summary: the disk is full \(ENOSPC\)"):
        write_atomic(path, "new", what="summary")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _exhausted(round_: int) -> SiteExhausted:
    return SiteExhausted(round=round_, site="s", epsilon=1.0)


def test_a_ledger_entry_that_does_not_reach_the_disk_is_not_a_record(tmp_path, monkeypatch):
    key = signing.load_or_create(tmp_path / "k.key")
    ledger = Ledger(tmp_path / "l.jsonl", key)
    ledger.append(_exhausted(1))
    size = ledger.path.stat().st_size
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _full)
        with pytest.raises(StorageError, match=r"l\.jsonl: cannot write the privacy ledger entry: the disk is full"):
            ledger.append(_exhausted(2))
    assert ledger.path.stat().st_size == size
    entries, problems = verify_ledger(ledger.path)
    assert len(entries) == 1 and not problems
    assert ledger.append(_exhausted(2)).seq == 1  # the chain goes on where it stood
    assert not verify_ledger(ledger.path)[1]


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path, monkeypatch):
    state = {"w": np.ones(3, dtype=np.float32)}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(round=1, state=state))
    monkeypatch.setattr(checkpoint, "save_file", _full)
    with pytest.raises(StorageError, match=r"round-0002\.safetensors: cannot write the round checkpoint"):
        checkpoint.save(tmp_path, checkpoint.Checkpoint(round=2, state=state))
    assert [p.name for p in tmp_path.iterdir()] == ["round-0001.safetensors"]
    assert checkpoint.latest(tmp_path).round == 1


@pytest.mark.slow
def test_a_simulation_whose_disk_fills_stops_clearly_audits_clean_and_resumes(tiny_config, monkeypatch):
    from rich.console import Console

    from fedpriv.audit.auditor import audit
    from fedpriv.common.rundir import RunDirectory, RunDirectoryError
    from fedpriv.simulation.harness import resume_config, simulate

    real_save = checkpoint.save_file

    def fills_at_round_3(tensors, path, metadata=None):
        if "round-0003" in str(path):
            raise FULL
        return real_save(tensors, path, metadata=metadata)

    config = tiny_config.replace(rounds=4)
    console = Console(file=open(os.devnull, "w"))
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", fills_at_round_3)
        with pytest.raises(RunDirectoryError) as stopped:
            simulate(config, console=console)
    message = str(stopped.value)
    assert "the run stopped after round 2" in message
    assert "round-0003.safetensors: cannot write the round checkpoint: the disk is full (ENOSPC)" in message
    assert f"fedpriv simulate --resume {config.run_dir}" in message
    assert audit([config.run_dir]).ok

    run = simulate(resume_config(config.run_dir), console=console, resume=True)
    assert RunDirectory(run.path).finished() and audit([run.path]).ok


@pytest.fixture
def mount(tmp_path):
    """A small tmpfs of our own (root in a container may mount one); `read_only()` remounts it read-only."""
    import subprocess

    path = tmp_path / "mnt"
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def read_only() -> Path:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        return path

    try:
        yield SimpleNamespace(path=path, read_only=read_only)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_ledger_on_a_file_system_gone_read_only_refuses_clearly_and_still_verifies(mount):
    ledger = Ledger(mount.path / "site.jsonl", signing.generate())
    ledger.append(_exhausted(1))
    before = ledger.path.read_bytes()
    mount.read_only()
    with pytest.raises(
        StorageError, match=r"site\.jsonl: cannot write the privacy ledger entry: .*read-only \(EROFS\)"
    ):
        ledger.append(_exhausted(2))
    assert ledger.path.read_bytes() == before
    entries, problems = verify_ledger(ledger.path)
    assert len(entries) == 1 and not problems


def test_a_simulation_into_a_read_only_folder_is_refused_by_name_without_a_traceback(mount):
    from tests.helpers import fedpriv_here

    folder = mount.read_only()
    result = fedpriv_here(
        "simulate", "--set", "model.name=builtin:tiny-random-bert", "--rounds", "1", "--output", folder / "run"
    )
    assert result.returncode == 2
    assert f"{folder / 'run'}: cannot write the run directory: the file system is read-only (EROFS)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
