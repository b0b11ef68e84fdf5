"""(a) Simulation overhead: `fedpriv simulate` / one centralized training loop.

Both train the same examples with the same model (all-MiniLM-L6-v2, LoRA),
the same expected batch size and the same DP-SGD settings, for the same total
number of optimizer steps; the simulation spreads them over 10 or 100 sites.
The ratio compares the training phase (first round start to last round end,
which includes every site's data preparation, messaging, checkpoints and
ledgers); whole-command wall times are reported too. Each repeat runs the
centralized loop and then the simulations back to back, so a ratio compares
runs made minutes apart; the table shows medians over the repeats.

    python bench/overhead.py [--rows 4000] [--batch 16] [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from _simrun import simulate
from _util import median, save, table

from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, load_dataset
from fedpriv.common.model.bundle import build_model, label_name_state
from fedpriv.common.privacy.plan import plan_for

SIGMA, CLIP = 1.0, 1.0


def centralized(config: FedprivConfig, rows: int, batch: int, steps: int) -> dict:
    began = time.perf_counter()
    labels = LabelSet.load(config.data.labels)
    bundle = build_model(config, labels)
    label_name_state(bundle, labels)
    loaded = time.perf_counter()
    data = load_dataset(config.data.path, labels, "text", "category")
    prepared = bundle.prepare(data)
    plan = plan_for(config)
    optimizer, lr = plan.optimizer, plan.learning_rate
    plan = LocalPlan(steps=steps, sample_rate=batch / rows, optimizer=optimizer, learning_rate=lr)
    train_local(bundle, prepared, plan, dp=DpSettings(SIGMA, CLIP, normaliser=batch), seed=0)
    done = time.perf_counter()
    return {"wall-seconds": done - began, "rounds-seconds": done - loaded}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = load_dataset(
            "builtin:banking77/train.csv", LabelSet.load("builtin:banking77/categories.json"), "text", "category"
        )
        path = Path(tmp) / "subset.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "category"])
            names = LabelSet.load("builtin:banking77/categories.json").names
            for i in range(args.rows):
                writer.writerow(
                    [source.texts[i * len(source) // args.rows], names[source.labels[i * len(source) // args.rows]]]
                )
        base = FedprivConfig().replace(
            **{
                "model.mode": args.mode,
                "data.path": str(path),
                "data.test-path": "",
                "data.validation-fraction": 0.0,
                "data.min-rows": 1,
                "privacy.noise-multiplier": SIGMA,
                "privacy.max-grad-norm": CLIP,
                "privacy.target-epsilon": 1000.0,  # the caps must not stop a timing run
                "strategy.fraction-evaluate": 0.0,
                "strategy.tail-average": 0.0,
                "central-eval-every": 0,
                "simulation.partitioner": "iid",
            }
        )
        configs = {}
        for sites in map(int, args.sites.split(",")):
            per_site = args.rows / sites
            rate = args.batch / per_site
            steps_per_round = args.steps // (args.rounds * sites)
            configs[f"{sites} sites"] = base.replace(
                **{
                    "rounds": args.rounds,
                    "simulation.sites": sites,
                    "strategy.min-sites": sites,
                    "train.sample-rate": rate,
                    "train.local-epochs": steps_per_round * rate,
                }
            )
        repeats = []
        for _ in range(args.repeats):
            central = centralized(base, args.rows, args.batch, args.steps)
            runs = {"centralized": central}
            for name, config in configs.items():
                result = simulate(config)
                result["ratio"] = result["rounds-seconds"] / central["rounds-seconds"]
                runs[name] = result
            repeats.append(runs)
        results = {"repeats": repeats}
        rows = []
        for name in ["centralized", *configs]:
            results[name] = {
                "rounds-seconds": median(r[name]["rounds-seconds"] for r in repeats),
                "wall-seconds": median(r[name]["wall-seconds"] for r in repeats),
                "ratio": median(r[name].get("ratio", 1.0) for r in repeats),
                "ratios": [r[name].get("ratio", 1.0) for r in repeats],
            }
            rows.append([name, results[name]["rounds-seconds"], results[name]["wall-seconds"], results[name]["ratio"]])
    table(
        f"Simulation overhead ({args.mode}, DP, {args.rows} examples, batch {args.batch}, {args.steps} steps in all; "
        f"medians of {args.repeats})",
        ["setting", "training s", "whole command s", "training / centralized"],
        rows,
    )
    save("overhead", {"args": vars(args), "results": results}, "python bench/overhead.py")


if __name__ == "__main__":
    main()
