"""Split the built-in Banking77 training set into one CSV per site, to try a deployment on one machine.

python deploy/demo_data.py --sites site-a site-b --out data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from fedpriv.common.resources import resolve_path


def split(sites: list[str], out: Path, seed: int = 42, source: str = "builtin:banking77/train.csv") -> list[Path]:
    frame = pd.read_csv(resolve_path(source), dtype=str, keep_default_na=False)
    order = np.random.default_rng(seed).permutation(len(frame))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for site, part in zip(sites, np.array_split(order, len(sites)), strict=True):
        path = out / f"{site}.csv"
        frame.iloc[np.sort(part)].to_csv(path, index=False)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", default=["site-a", "site-b"])
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    for path in split(args.sites, args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
