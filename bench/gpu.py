"""(f) GPU throughput: training examples per second against the matmul-bound floor.

Measures a DP and a plain training step of all-MiniLM-L6-v2 (LoRA and full)
at a large batch, and the device's own dense matmul rate; the floor is the
time the step's matrix multiplications alone would take at that rate: per
example and token, 2 FLOPs per (non-embedding) weight forward, 2 more for the
input gradients backward, and 2 more for the weight gradients when every
weight trains (6 for full fine-tuning, 4 for LoRA).
Meant for a machine with a GPU (the `device` tool); it also runs on a CPU.

    python bench/gpu.py [--batch 256] [--tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from _util import median, save, table

from fedpriv.client.training import DpSettings, LocalPlan, train_local
from fedpriv.common.config import FedprivConfig
from fedpriv.common.data import LabelSet, TextDataset
from fedpriv.common.model.bundle import build_model, default_device


def matmul_flops(device: torch.device, dtype=torch.float32, n: int = 4096, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_flops(device, n=4096 if device.type == "cuda" else 1024)
    config = FedprivConfig()
    labels = LabelSet.load(config.data.labels)
    text = " ".join(["card"] * (args.tokens - 2))
    n = args.batch * 8
    data = TextDataset([text] * n, torch.zeros(n, dtype=torch.long).numpy(), "synthetic")
    rows, results = [], {}
    for mode in ("lora", "full"):
        bundle = build_model(config.replace(**{"model.mode": mode}), labels, device=device)
        prepared = bundle.prepare(data)
        embeddings = {id(p) for p in bundle.model.encoder.get_input_embeddings().parameters()}
        embeddings |= {
            id(p) for n, p in bundle.model.named_parameters() if "position_embeddings" in n or "token_type" in n
        }
        weights = sum(p.numel() for p in bundle.model.parameters() if id(p) not in embeddings)
        flops = (6 if mode == "full" else 4) * weights * args.tokens
        floor = flops / peak  # seconds per example if only the matmuls ran
        for kind, dp in (("plain", None), ("dp", DpSettings(1.0, 1.0, normaliser=args.batch))):
            plan = LocalPlan(
                steps=args.steps,
                sample_rate=args.batch / n,
                optimizer="adamw",
                learning_rate=1e-4,
                max_physical_batch=args.batch * 2,
            )
            times = []
            for _ in range(3):
                began = time.perf_counter()
                train_local(bundle, prepared, plan, dp=dp, seed=0)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - began) / (args.steps * args.batch))
            per_example = median(times[1:])
            results[f"{mode}-{kind}"] = {"examples-per-second": 1 / per_example, "floor-examples-per-second": 1 / floor}
            rows.append([f"{mode} {kind}", 1 / per_example, 1 / floor, floor / per_example])
    table(
        f"Training throughput on {device} (batch {args.batch}, {args.tokens} tokens; matmul {peak / 1e12:.1f} TFLOP/s)",
        ["step", "examples/s", "matmul floor examples/s", "fraction of floor"],
        rows,
    )
    save(
        "gpu",
        {"device": str(device), "matmul-flops": peak, "args": vars(args), "results": results},
        "python bench/gpu.py",
    )


if __name__ == "__main__":
    main()
