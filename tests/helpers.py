"""Test data and small builders shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

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
