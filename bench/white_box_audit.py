"""The white-box empirical audit on the default demo's settings and on the local preset: honest runs over
several seeds, and each deliberate fault, every one through `fedpriv audit --empirical` as a user runs it.

    .venv/bin/python bench/white_box_audit.py                       # both presets, 10 honest seeds each
    .venv/bin/python bench/white_box_audit.py --presets distributed --seeds 3

Targets (issue: an empirical audit that sees every round): every fault refuted (exit 1), no honest run
refuted, the honest default demo's score bound at least 2, one audit within 15 minutes on a 2-core machine.
Each audit's run directory (hundreds of MB: every round's canary observations and checkpoint) is deleted
once its numbers are read; bench/results/white_box_audit.json keeps them, written after every audit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import RESULTS, save, table

FEDPRIV = str(Path(sys.executable).with_name("fedpriv"))
# (fault, target epsilon): the four faults; the noise faults at the claims they name.
FAULTS = [("noise/3", 1.0), ("noise/2", 4.0), ("skip-clipping", 8.0), ("skip-noise", 8.0)]


def audit(preset: str, seed: int, epsilon: float, fault: str | None) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="fedpriv-wb-"))
    command = [FEDPRIV, "audit", "--empirical", "--preset", preset, "--seed", str(seed), "--json"]
    command += ["--set", f"privacy.target-epsilon={epsilon}", "-o", str(folder / "audit")]
    if fault:
        command += ["--fault", fault]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - started
    try:
        if done.returncode not in (0, 1):
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"preset": preset, "seed": seed, "fault": fault, "exit": done.returncode, "wall-s": round(wall, 1), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="distributed,local")
    parser.add_argument("--seeds", type=int, default=10, help="honest runs per preset (seeds 0..N-1)")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--faults", default="", help="only these faults (comma-separated; default: all four)")
    parser.add_argument("--add", action="store_true", help="keep the runs already in the results file")
    args = parser.parse_args()
    runs: list[dict] = []
    if args.add and (RESULTS / "white_box_audit.json").exists():
        runs = json.loads((RESULTS / "white_box_audit.json").read_text())["runs"]
    command = "python bench/white_box_audit.py " + " ".join(sys.argv[1:])
    for preset in args.presets.split(","):
        cases = [(seed, 8.0, None) for seed in range(args.seeds)]
        if not args.no_faults:
            chosen = set(filter(None, args.faults.split(",")))
            cases += [
                (100 + i, epsilon, fault) for i, (fault, epsilon) in enumerate(FAULTS) if not chosen or fault in chosen
            ]
        for seed, epsilon, fault in cases:
            run = audit(preset, seed, epsilon, fault)
            runs.append(run)
            print(
                f"{preset} seed {seed} {fault or 'honest'}: exit {run['exit']}, bound {run['lower_bound']:.3f} "
                f"of {run['claimed']:.3f}, noise {run['noise_ratio']:.4f}, move {run['move_per_sampling']:.3f}/"
                f"{run['move_limit']:.3f}, {run['wall-s']:.0f} s",
                flush=True,
            )
            save("white_box_audit", {"runs": runs, "summary": summary(runs)}, command)
    rows = [
        [
            r["preset"],
            r["fault"] or "honest",
            r["seed"],
            r["claimed"],
            r["lower_bound"],
            r["gdp_epsilon"],
            r["noise_ratio"],
            r["implied_epsilon"],
            r["move_per_sampling"],
            r["move_limit"],
            "REFUTED" if r["exit"] == 1 else "consistent",
            r["wall-s"],
        ]
        for r in runs
    ]
    columns = ["preset", "run", "seed", "claim", "bound", "GDP est.", "noise", "implied", "move", "limit", "verdict"]
    table("White-box audit", [*columns, "wall s"], rows)
    print(json.dumps(summary(runs), indent=2))


def summary(runs: list[dict]) -> dict:
    out = {}
    for preset in sorted({r["preset"] for r in runs}):
        honest = [r for r in runs if r["preset"] == preset and not r["fault"]]
        faults = [r for r in runs if r["preset"] == preset and r["fault"]]
        out[preset] = {
            "honest-runs": len(honest),
            "honest-refuted": sum(r["exit"] == 1 for r in honest),
            "honest-bound-min": min((r["lower_bound"] for r in honest), default=None),
            "honest-bound-max": max((r["lower_bound"] for r in honest), default=None),
            "faults-refuted": f"{sum(r['exit'] == 1 for r in faults)} of {len(faults)}",
            "wall-s-max": max((r["wall-s"] for r in runs if r["preset"] == preset), default=None),
        }
    return out


if __name__ == "__main__":
    main()
