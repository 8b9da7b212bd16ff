"""Benchmark of secure aggregation on a large vector: mask and unmask cost against a numpy add.

Run as ``python benchmarks/bench_secagg.py`` (``--quick`` for a smaller vector).
For each cohort size it runs one full window in process: key set-up, every
client masks a float32 vector, the aggregator adds each masked vector into its
one accumulator as it arrives, one client drops after masking, and the
survivors unmask. It prints times as ratios to a plain numpy uint32 add of a
vector of the same length (the memory-bandwidth floor), measured in the same
run, and the aggregator's peak extra memory (tracemalloc) next to one vector's size.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.secagg import (
    Aggregator,
    MaskGenerator,
    Participant,
    SecAggConfig,
    encode,
)

GRAPH_SEED = b"bench-graph-seed"


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def traced(action: Callable[[], object]) -> int:
    """Peak bytes ``action`` allocates beyond what was live before it (tracemalloc)."""
    tracemalloc.start()
    action()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@dataclass
class Row:
    parties: int
    degree: int
    client_ms: float
    encode_ms: float
    per_mask_ms: float
    collect_ms: float
    unmask_ms: float
    masks_removed: int
    consistency_ms: float
    peak_extra_mib: float


def run_window(parties: int, dim: int, base: np.ndarray, config: SecAggConfig) -> Row:
    cohort = list(range(parties))
    identities = {p: Ed25519PrivateKey.generate() for p in cohort}
    public = {p: key.public_key() for p, key in identities.items()}
    clients = {
        p: Participant(
            party_id=p,
            window=1,
            cohort=cohort,
            identity=identities[p],
            peer_identities=public,
            config=config,
            graph_seed=GRAPH_SEED,
        )
        for p in cohort
    }
    # Two aggregators see the same messages: `aggregator` is timed, `twin` runs under
    # tracemalloc (which slows Python's big-int Shamir arithmetic) to measure memory.
    aggregator, twin = (
        Aggregator(
            window=1,
            cohort=cohort,
            dim=dim,
            config=config,
            graph_seed=GRAPH_SEED,
            peer_identities=public,
        )
        for _ in range(2)
    )
    ads = {p: client.advertise() for p, client in clients.items()}
    for agg in (aggregator, twin):
        for p, ad in ads.items():
            agg.add_advertisement(p, ad)
        agg.close_advertisements()
    bundles = {p: client.share_keys(ads) for p, client in clients.items()}
    for agg in (aggregator, twin):
        for p, bundle in bundles.items():
            agg.add_shares(p, bundle)
        routed = agg.route_shares()
    for p, shares in routed.items():
        clients[p].receive_shares(shares)

    rng = np.random.default_rng(0)
    encode_s = median_seconds(lambda: encode(base, 1.0, config, rng), 5)
    dropped = cohort[-1]
    client_s: list[float] = []
    collect_s = 0.0
    peak_extra = 0
    for p, client in clients.items():
        start = time.perf_counter()
        masked = client.mask(base, 1.0, rng)
        client_s.append(time.perf_counter() - start)
        if p == dropped:
            continue
        start = time.perf_counter()
        aggregator.add_masked(p, masked)
        collect_s += time.perf_counter() - start
        peak_extra = max(peak_extra, traced(functools.partial(twin.add_masked, p, masked)))

    start = time.perf_counter()
    survivors = aggregator.fix_survivors()
    signatures = {p: clients[p].sign_survivors(survivors) for p in survivors}
    for p, signature in signatures.items():
        aggregator.add_survivor_signature(p, signature)
    released = {p: clients[p].unmask(survivors, signatures) for p in survivors}
    consistency_s = time.perf_counter() - start
    twin.fix_survivors()  # outside the timing: the twin only measures memory
    for p, signature in signatures.items():
        twin.add_survivor_signature(p, signature)
    for agg in (aggregator, twin):
        for p, unmasking in released.items():
            agg.add_unmasking_shares(p, unmasking)
    start = time.perf_counter()
    result = aggregator.finalize()
    unmask_s = time.perf_counter() - start
    peak_extra = max(peak_extra, traced(twin.finalize))
    expected = (parties - 1) * np.clip(base.astype(np.float64), -config.clip, config.clip)
    error = float(np.max(np.abs(result.weighted_sum - expected)))
    assert error < result.quantization_bound, f"aggregate off by {error}"

    degree = len(aggregator.graph.of(0))
    survivors_count = len(result.contributors)
    masks_per_client = degree + 1
    mean_client = statistics.mean(client_s)
    mean_encode = encode_s
    return Row(
        parties=parties,
        degree=degree,
        client_ms=1e3 * mean_client,
        encode_ms=1e3 * mean_encode,
        per_mask_ms=1e3 * max(mean_client - mean_encode, 0.0) / masks_per_client,
        collect_ms=1e3 * collect_s,
        unmask_ms=1e3 * unmask_s,
        masks_removed=survivors_count + len(aggregator.graph.of(dropped)),
        consistency_ms=1e3 * consistency_s,
        peak_extra_mib=peak_extra / 2**20,
    )


def floor_and_mask_ms(dim: int) -> tuple[float, float]:
    """Median numpy uint32 add of two d+1 vectors, and median single ChaCha20 mask, in ms."""
    accumulator = np.zeros(dim + 1, dtype=np.uint32)
    vector = np.random.default_rng(2).integers(0, 2**32, size=dim + 1, dtype=np.uint32)
    add_s = median_seconds(lambda: np.add(accumulator, vector, out=accumulator), 21)
    generator = MaskGenerator()
    key = bytes(range(32))
    mask_s = median_seconds(lambda: generator.apply(accumulator, key, sign=1), 11)
    return 1e3 * add_s, 1e3 * mask_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2**18 coordinates instead of 2**22")
    parser.add_argument("--dim", type=int, default=None, help="coordinates per vector")
    parser.add_argument("--parties", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    dim = args.dim or (1 << 18 if args.quick else 1 << 22)
    config = SecAggConfig()
    base = np.random.default_rng(1).normal(scale=0.1, size=dim).astype(np.float32)

    print(f"secure aggregation, d = {dim} float32 coordinates (+1 weight coordinate)")
    print("one party drops after masking in every window (its pairwise masks are regenerated);")
    print("ratios divide by a numpy uint32 add of one vector measured just before each row")
    header = (
        f"{'n':>3} {'k':>3} | {'add ms':>6} {'1 mask':>6} {'x add':>5} | "
        f"{'client ms':>9} {'encode':>6} {'per-mask':>8} {'x add':>5} | "
        f"{'collect ms':>10} {'x adds':>6} {'unmask ms':>9} {'masks':>5} {'x add/mask':>10} "
        f"{'ms/party':>8} | {'peak MiB':>8} | {'sign+shares ms':>14}"
    )
    run_window(4, dim, base, config)  # warm-up: first-use costs of numpy, OpenSSL and malloc
    print(header)
    print("-" * len(header))
    for parties in args.parties:
        add_ms, mask_ms = floor_and_mask_ms(dim)
        row = run_window(parties, dim, base, config)
        survivors = parties - 1
        total = row.collect_ms + row.unmask_ms
        print(
            f"{row.parties:>3} {row.degree:>3} | {add_ms:>6.2f} {mask_ms:>6.2f} "
            f"{mask_ms / add_ms:>5.2f} | {row.client_ms:>9.1f} {row.encode_ms:>6.1f} "
            f"{row.per_mask_ms:>8.2f} {row.per_mask_ms / add_ms:>5.2f} | "
            f"{row.collect_ms:>10.1f} {row.collect_ms / (survivors * add_ms):>6.2f} "
            f"{row.unmask_ms:>9.1f} {row.masks_removed:>5} "
            f"{row.unmask_ms / (row.masks_removed * add_ms):>10.2f} "
            f"{total / parties:>8.1f} | {row.peak_extra_mib:>8.1f} | {row.consistency_ms:>14.1f}"
        )
    print(
        f"one vector is {(dim + 1) * 4 / 2**20:.1f} MiB as uint32; peak MiB is the aggregator's "
        f"largest extra allocation (the float64 result is {dim * 8 / 2**20:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
