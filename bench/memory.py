"""(d) Memory: peak RSS of a 1000-site simulation / a 10-site one (small model).

The same dataset (Banking77) and model (the tiny random encoder) in both; only
the number of simulated sites differs, so the ratio shows what each extra
site costs the harness. RSS is summed over the whole process tree (driver,
Ray, workers) and sampled every 0.1 s.

    python bench/memory.py [--rounds 2]
"""

from __future__ import annotations

import argparse

from _simrun import simulate
from _util import save, table

from fedpriv.common.config import FedprivConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", default="10,1000")
    args = parser.parse_args()
    results, rows = {}, []
    for sites in map(int, args.sites.split(",")):
        config = FedprivConfig().replace(
            **{
                "model.name": "builtin:tiny-random-bert",
                "rounds": args.rounds,
                "simulation.sites": sites,
                "simulation.partitioner": "iid",
                "data.min-rows": 1,
                "strategy.min-sites": sites,
            }
        )
        results[sites] = simulate(config)
        rows.append([sites, results[sites]["peak-rss-bytes"] / 2**20, results[sites]["wall-seconds"]])
    small, large = (int(s) for s in args.sites.split(","))
    ratio = results[large]["peak-rss-bytes"] / results[small]["peak-rss-bytes"]
    rows.append([f"{large} / {small}", ratio, results[large]["wall-seconds"] / results[small]["wall-seconds"]])
    table("Peak RSS of the simulation's process tree", ["sites", "peak RSS MiB", "wall s"], rows)
    save("memory", {"rounds": args.rounds, "results": results, "ratio": ratio}, "python bench/memory.py")


if __name__ == "__main__":
    main()
