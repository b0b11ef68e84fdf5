"""Test data and small builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]

LABELS = ["card", "transfer", "cash"]
WORDS = {
    "card": ["card", "visa", "plastic", "pin", "contactless", "expired"],
    "transfer": ["transfer", "sent", "recipient", "iban", "wire", "payee"],
    "cash": ["cash", "atm", "withdrawal", "machine", "notes", "withdraw"],
}
FILLER = ["my", "the", "please", "why", "is", "a", "help", "still", "not", "today"]


def easy_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Texts whose label is told by its keywords: easy, but only if the model learns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(WORDS[label], 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "category")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fedpriv_here(*args, env: dict[str, str] | None = None) -> SimpleNamespace:
    """`fedpriv ARGS` through the CLI's own entry point (`fedpriv.cli:main`), in this process.

    A subprocess would spend seconds importing what this test process has already imported. What the
    command does to the environment, the working folder and the standard streams is undone afterwards.
    Commands whose subject is processes (agents, aggregators, signals) are started as processes instead.
    Returns what `subprocess.run` would: `returncode`, `stdout`, `stderr`."""
    from fedpriv.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.ExitStack() as undo:
        undo.enter_context(mock.patch.object(sys, "argv", ["fedpriv", *map(str, args)]))
        undo.enter_context(mock.patch.dict(os.environ, {"COLUMNS": "200", **(env or {})}))
        undo.enter_context(contextlib.chdir(ROOT))
        undo.enter_context(contextlib.redirect_stdout(out))
        undo.enter_context(contextlib.redirect_stderr(err))
        try:
            main()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
