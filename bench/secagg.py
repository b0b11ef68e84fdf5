"""Secure aggregation against plain aggregation: time, CPU, bytes and message exchanges of a round.

Runs the real protocol (fedpriv.common.wire.secagg: X25519, HKDF, ChaCha20 masks,
Shamir shares, ChaCha20-Poly1305) for every site and the aggregator in one
process, side by side with a plain float32 sum of the same vectors, for the
head (~30k numbers) and LoRA (~100k) at 10 and 50 sites, with and without one
site dropping out before masking. Keys are agreed once (an epoch) and then
serve round after round: the cost of the agreement and of a steady round are
reported apart, with the exchanges each takes (the stages the aggregator
sends: a first round also names the nodes, `setup`). Transport (Flower
messages, TLS) is not included: it is the same for both apart from the
bytes reported.

    python bench/secagg.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _util import median, save, table
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.common.privacy import signing
from fedpriv.common.wire.secagg import AggregatorSession, SecAggConfig, SiteSession, default_threshold

SIZES = {"head": 30_000, "lora": 100_000}
SITES = (10, 50)
SCALE, BOUND = 2.0**20, 2**40


def _bytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_bytes(v) + len(k) for k, v in value.items())
    if isinstance(value, tuple):  # a masked vector and its sealed seed shares; revealed shares and keys
        return sum(_bytes(v) for v in value)
    return len(value)


FIRST_ROUND = ("setup", "advertise", "mask", "unmask")  # setup only names nodes the aggregator has not met


def secure_round(length: int, n: int, drop: bool, rng: np.random.Generator) -> dict:
    """Key agreement, then a steady round (the second of the epoch); each stage an exchange with the sites."""
    names = tuple(f"site-{i:02d}" for i in range(n))
    config = SecAggConfig(
        run_id="bench",
        round=1,
        sites=names,
        threshold=default_threshold(n, 1),
        max_colluding=1,
        length=length,
        scale=SCALE,
        bound=BOUND,
    )
    identities = {s: Ed25519PrivateKey.generate() for s in names}
    pinned = {s: signing.public_b64(k) for s, k in identities.items()}
    vectors = {s: rng.normal(scale=0.01, size=length) for s in names}
    sites = {s: SiteSession(config, s, identities[s], pinned) for s in names}
    site_cpu = dict.fromkeys(names, 0.0)
    sent = dict.fromkeys(names, 0)
    aggregator_cpu = 0.0
    stages: list[str] = []  # the exchanges of the round measured

    def at_site(name, call, *args):
        start = time.process_time()
        result = call(*args)
        site_cpu[name] += time.process_time() - start
        sent[name] += _bytes(result)
        return result

    def at_aggregator(call, *args):
        nonlocal aggregator_cpu
        start = time.process_time()
        result = call(*args)
        aggregator_cpu += time.process_time() - start
        return result

    agreement = time.perf_counter()
    aggregator = AggregatorSession(config)
    broadcast = aggregator.collect_advertisements({s: sites[s].advertise() for s in names})
    for s in broadcast:  # with the first round's mask request
        sites[s].accept_peers(broadcast)
    first = [vectors[s] for s in names]
    round_1 = {s: sites[s].mask(config, vectors[s]) for s in names}
    survivors, dropped, routed = aggregator.collect_masked(
        config, {s: m for s, (m, _) in round_1.items()}, {s: x for s, (_, x) in round_1.items()}
    )
    answers = {s: sites[s].unmask(config, survivors, dropped, routed[s]) for s in survivors}
    total = aggregator.collect_unmask({s: a for s, (a, _) in answers.items()}, {s: k for s, (_, k) in answers.items()})
    agreement = time.perf_counter() - agreement
    assert np.max(np.abs(total - np.sum(first, axis=0))) <= config.fixed_point.quantization_error(n) + 1e-9

    steady = config.for_round(2)
    wall = time.perf_counter()
    lost = names[-1] if drop else None
    stages.append("mask")
    out = {s: at_site(s, sites[s].mask, steady, vectors[s]) for s in aggregator.group if s != lost}
    survivors, dropped, routed = at_aggregator(
        aggregator.collect_masked, steady, {s: m for s, (m, _) in out.items()}, {s: x for s, (_, x) in out.items()}
    )
    stages.append("unmask")
    answers = {s: at_site(s, sites[s].unmask, steady, survivors, dropped, routed[s]) for s in survivors}
    total = at_aggregator(
        aggregator.collect_unmask, {s: a for s, (a, _) in answers.items()}, {s: k for s, (_, k) in answers.items()}
    )
    wall = time.perf_counter() - wall
    expected = np.sum([vectors[s] for s in survivors], axis=0)
    assert np.max(np.abs(total - expected)) <= config.fixed_point.quantization_error(len(survivors)) + 1e-9
    return {
        "agreement-and-first-round-s": agreement,
        "first-round-exchanges": len(FIRST_ROUND),
        "wall-s": wall,
        "exchanges": len(stages),
        "site-cpu-s": median(site_cpu[s] for s in survivors),
        "aggregator-cpu-s": aggregator_cpu,
        "bytes-per-site": median(sent[s] for s in survivors),
    }


def plain_round(length: int, n: int, rng: np.random.Generator) -> dict:
    vectors = [rng.normal(scale=0.01, size=length).astype(np.float32) for _ in range(n)]
    start = time.process_time()
    np.sum(vectors, axis=0)
    return {"aggregator-cpu-s": time.process_time() - start, "bytes-per-site": vectors[0].nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows, results = [], {}
    for mode, length in SIZES.items():
        for n in SITES:
            plain = plain_round(length, n, rng)
            for drop in (False, True):
                runs = [secure_round(length, n, drop, rng) for _ in range(args.repeats)]
                secure = {key: median(r[key] for r in runs) for key in runs[0]}
                label = f"{mode} x{n}" + (" (1 dropped)" if drop else "")
                results[label] = {"secure": secure, "plain": plain}
                rows.append(
                    [
                        label,
                        f"{secure['first-round-exchanges']:.0f}, then {secure['exchanges']:.0f}",
                        secure["agreement-and-first-round-s"],
                        secure["wall-s"],
                        secure["site-cpu-s"],
                        secure["aggregator-cpu-s"],
                        plain["aggregator-cpu-s"],
                        secure["bytes-per-site"],
                        plain["bytes-per-site"],
                        secure["bytes-per-site"] / plain["bytes-per-site"],
                    ]
                )
    table(
        f"Secure vs plain aggregation, all parties in one process (median of {args.repeats}); "
        "a steady round is the second of an epoch",
        [
            "vector x sites",
            "exchanges a round",
            "first round s",
            "steady round s",
            "site CPU s",
            "aggregator CPU s",
            "plain aggregator CPU s",
            "secure bytes/site",
            "plain bytes/site",
            "bytes ratio",
        ],
        rows,
    )
    save("secagg", {"repeats": args.repeats, "results": results}, "python bench/secagg.py")


if __name__ == "__main__":
    main()
