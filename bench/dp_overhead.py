"""(b) DP overhead: time per optimizer step with DP / without, per fine-tuning mode.

Same model (all-MiniLM-L6-v2), same Banking77 examples, same expected batch,
same per-batch padding; the only difference is Opacus (Poisson sampling,
per-example clipping, noise). Runs alternate DP and non-DP and report medians.

    python bench/dp_overhead.py [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from _util import median, save, table

from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, load_dataset
from fedpriv.common.model.bundle import build_model, label_name_state

STEPS = {"head": 200, "lora": 12, "full": 8}
OPTIMIZERS = {"head": ("sgd", 20.0), "lora": ("adamw", 2e-3), "full": ("adamw", 5e-5)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--modes", default="head,lora,full")
    args = parser.parse_args()

    config = FedprivConfig()
    labels = LabelSet.load(config.data.labels)
    data = load_dataset(config.data.path, labels, "text", "category")
    data = data.subset(list(range(args.rows)))
    rows, results = [], {}
    for mode in args.modes.split(","):
        bundle = build_model(config.replace(**{"model.mode": mode}), labels)
        label_name_state(bundle, labels)
        prepared = bundle.prepare(data)
        start = bundle.get_state()
        optimizer, lr = OPTIMIZERS[mode]
        plan = LocalPlan(
            steps=STEPS[mode],
            sample_rate=args.batch / len(prepared),
            optimizer=optimizer,
            learning_rate=lr,
            max_physical_batch=4 * args.batch,
        )
        times: dict[str, list[float]] = {"dp": [], "plain": []}
        for repeat in range(args.repeats + 1):  # the first pair warms caches and is dropped
            for kind in ("plain", "dp"):
                bundle.set_state(start)
                dp = DpSettings(1.0, 1.0, normaliser=args.batch) if kind == "dp" else None
                began = time.perf_counter()
                train_local(bundle, prepared, plan, dp=dp, seed=repeat)
                if repeat:
                    times[kind].append((time.perf_counter() - began) / plan.steps)
        plain, private = median(times["plain"]), median(times["dp"])
        results[mode] = {
            "step-seconds": plain,
            "dp-step-seconds": private,
            "ratio": private / plain,
            "steps": plan.steps,
            "repeats": args.repeats,
        }
        rows.append([mode, plain, private, private / plain])
    table(f"DP overhead (batch {args.batch}, MiniLM, Banking77)", ["mode", "step s", "DP step s", "DP / plain"], rows)
    save("dp_overhead", {"batch": args.batch, "results": results}, "python bench/dp_overhead.py")


if __name__ == "__main__":
    main()
