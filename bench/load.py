"""(h) Load: one aggregator and 8 site agents on 127.0.0.1 (tiny model, TLS, node auth) over 20 rounds,
two agents killed (-9) and restarted at random rounds. Reports round time and the aggregator's
memory (SuperLink and its ServerApp, whole process tree) after every round: it must stay flat.

    python bench/load.py [--sites 8] [--rounds 20] [--kills 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _util import save, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' local federation

from fedpriv.common.resources import tiny_model_dir
from tests.local_federation import run_under_load


def main() -> None:
    parser = argparse.ArgumentParser(description="Deployed federation under agent crashes.")
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedpriv-load-") as tmp:
        result = run_under_load(
            Path(tmp), str(tiny_model_dir()), sites=args.sites, rounds=args.rounds, kills=args.kills, seed=args.seed
        )
    if result["returncode"] != 0:
        sys.exit(f"the run failed:\n{result['output']}")
    seconds = [result["round-s"][r] for r in sorted(result["round-s"])]
    rss = [value for _, value in result["aggregator-rss"]]
    mib = [r / 2**20 for r in rss]
    half = len(mib) // 2
    rows = [
        [r, result["round-s"][r], len(result["trained"].get(r, [])), f"{m:.0f}"]
        for r, m in zip(sorted(result["round-s"]), mib, strict=False)
    ]
    table("Round time, sites aggregated and aggregator memory", ["round", "seconds", "sites", "aggregator MiB"], rows)
    summary = {
        "rounds": len(seconds),
        "round-s-median": statistics.median(seconds),
        "round-s-max": max(seconds),
        "aggregator-mib-first-half-median": statistics.median(mib[:half]) if half else None,
        "aggregator-mib-second-half-median": statistics.median(mib[half:]) if half else None,
        "memory-ratio-second-to-first-half": (statistics.median(mib[half:]) / statistics.median(mib[:half]))
        if half
        else None,
        "kills": result["events"],
        "audit-passed": result["audit-returncode"] == 0,
        "left-behind": result["left-behind"],
        "wall-s": result["wall-s"],
    }
    for key, value in summary.items():
        print(f"{key}: {value}")
    save(
        "load",
        {**vars(args), "summary": summary, "round-s": result["round-s"], "aggregator-rss": result["aggregator-rss"]},
        "python bench/load.py",
    )


if __name__ == "__main__":
    main()
