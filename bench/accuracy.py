"""(e) Accuracy on Banking77: centralized vs federated, with and without DP.

Every run is `fedpriv simulate` on the shipped Banking77 with MiniLM, from
the base settings (the local preset) or the distributed preset (the default
of `fedpriv simulate`), changing one thing at a time:

    centralized, non-private     one site holding all the data, DP off
    federated, non-private       10 sites, Dirichlet(0.5), DP off (and with
                                 settings that suit no DP)
    federated, DP epsilon 8      local noise: each site adds all of it
    federated, DP epsilon 3      the same at epsilon 3 per site, with the default
                                 and with a halved learning rate
    central DP epsilon 8, 3      one site holding all the data, the distributed runs' steps,
                                 rate, learning rate and epsilon
    distributed DP epsilon 8, 3  the default demo: secure aggregation, each site adds a share
                                 of the noise

    python bench/accuracy.py [--seed 42] [--only "NAME;NAME"]
"""

from __future__ import annotations

import argparse
import json

from _simrun import simulate
from _util import RESULTS, save, table

from fedpriv.common.config import FedprivConfig

DISTRIBUTED = {"privacy.secure-aggregation": True, "privacy.noise": "distributed", "rounds": 240}
# Central DP-SGD as the distributed runs do it: 240 steps at rate 0.5, their learning rate (40).
CENTRAL = {"simulation.sites": 1, "simulation.partitioner": "iid", "rounds": 240, "train.local-epochs": 0.5}

RUNS = {
    "centralized, non-private": {"simulation.sites": 1, "simulation.partitioner": "iid", "privacy.enabled": False},
    "federated, non-private": {"privacy.enabled": False},
    # The defaults are tuned for DP; without noise, fewer and larger steps do better.
    "federated, non-private, 30 rounds at rate 0.3": {"privacy.enabled": False, "rounds": 30, "train.sample-rate": 0.3},
    "federated, DP eps=8": {},
    "federated, DP eps=3": {"privacy.target-epsilon": 3.0},
    # More noise per step wants smaller steps: at epsilon 3 half the default rate does ~3.5 points better.
    "federated, DP eps=3, learning rate 10": {"privacy.target-epsilon": 3.0, "train.learning-rate": 10.0},
    # Central DP: one site holding all the data, one step per round as the distributed runs take.
    "central DP eps=8 (one site, all data)": {**CENTRAL, "train.learning-rate": 40.0},
    "central DP eps=3 (one site, all data)": {**CENTRAL, "train.learning-rate": 40.0, "privacy.target-epsilon": 3.0},
    # Distributed DP under secure aggregation (the distributed preset): one noisy step of the pooled data
    # per round, so as many rounds as the local runs take steps (40 rounds x 6 steps), the same sample
    # rate; the aggregator's learning rate is 40 (the mode's default under distributed noise).
    "federated, distributed DP eps=8": {**DISTRIBUTED},
    "federated, distributed DP eps=3": {**DISTRIBUTED, "privacy.target-epsilon": 3.0},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    wanted = [n.strip() for n in args.only.split(";") if n.strip()]
    unknown = set(wanted) - set(RUNS)
    if unknown:
        parser.error(f"--only: unknown runs {sorted(unknown)}; known: {list(RUNS)}")
    chosen = [n for n in RUNS if not wanted or n in wanted]
    results, rows = {}, []
    for name in chosen:
        config = FedprivConfig().replace(seed=args.seed, **RUNS[name])
        if config.simulation.sites == 1:
            config = config.replace(**{"strategy.min-sites": 1})
        result = simulate(config)
        results[name] = result
        rows.append([name, 100 * result["central-accuracy"], result["wall-seconds"]])
    table("Banking77 test accuracy (MiniLM, defaults)", ["run", "accuracy %", "wall s"], rows)
    if wanted:  # a partial run adds to the earlier results of the same seed instead of replacing them
        earlier = RESULTS / "accuracy.json"
        if earlier.exists():
            saved = json.loads(earlier.read_text())
            if saved.get("seed") == args.seed:
                results = {**saved.get("results", {}), **results}
    save("accuracy", {"seed": args.seed, "results": results}, "python bench/accuracy.py")


if __name__ == "__main__":
    main()
