"""Benchmark the packing algorithms on a long-tailed length distribution.

Lengths are log-normal (mean about --mean_length tokens, sigma --sigma), rounded and clipped to
[1, capacity], like tokenized chat data. Prints, per algorithm, wall time of a full `pack` call
(validation and grouping included), bins against the ceil(total / capacity) lower bound, fill
efficiency and entries per pack, then checks the goals: best_fit_decreasing within 1% of the lower
bound, and every algorithm under 5 s. Exits 1 if a goal is missed.

    python benchmarks/bench_packing.py --n 1000000 --capacity 4096 --seed 0
"""

import argparse
import sys
import time

import numpy as np

from nemo_aligner.data.packing import ALGORITHMS, pack, packing_stats

MAX_SECONDS = 5.0
MAX_BFD_OVER_LOWER_BOUND = 0.01


def long_tailed_lengths(n: int, capacity: int, mean_length: float, sigma: float, seed: int) -> np.ndarray:
    # A log-normal's mean is exp(mu + sigma^2 / 2); solve for mu so the (pre-clip) mean is mean_length.
    mu = np.log(mean_length) - sigma**2 / 2
    raw = np.random.default_rng(seed).lognormal(mu, sigma, n)
    return np.clip(np.rint(raw), 1, capacity).astype(np.int64)


def time_pack(lengths: np.ndarray, capacity: int, algorithm: str, seed: int, repeats: int) -> tuple:
    """Best wall time over `repeats` full `pack` calls, and the bins of the last."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        bins = pack(lengths, capacity, algorithm, seed=seed)
        best = min(best, time.perf_counter() - start)
    return best, bins


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000, help="number of lengths to pack")
    parser.add_argument("--capacity", type=int, default=4096, help="pack size in tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed for the lengths and first_fit_shuffle")
    parser.add_argument("--mean_length", type=float, default=600.0, help="log-normal mean before clipping")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (tail weight)")
    parser.add_argument("--repeats", type=int, default=1, help="timings per algorithm; the best is shown")
    args = parser.parse_args()

    lengths = long_tailed_lengths(args.n, args.capacity, args.mean_length, args.sigma, args.seed)
    print(
        f"n={args.n:,} capacity={args.capacity} seed={args.seed} lengths: mean={lengths.mean():.1f} "
        f"median={np.median(lengths):.0f} p99={np.percentile(lengths, 99):.0f} max={lengths.max()} "
        f"distinct={np.unique(lengths).size}"
    )
    header = (
        f"{'algorithm':<22} {'time (s)':>9} {'bins':>9} {'lower bd':>9} {'over LB':>9} {'effic.':>8} "
        f"{'entries/pack':>10}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for algorithm in ALGORITHMS:
        seconds, bins = time_pack(lengths, args.capacity, algorithm, args.seed, args.repeats)
        stats = packing_stats(lengths, bins, args.capacity)
        results[algorithm] = (seconds, stats)
        print(
            f"{algorithm:<22} {seconds:>9.3f} {stats['num_packs']:>9,} {stats['min_packs']:>9,} "
            f"{stats['packs_over_min']:>8.3%} {stats['efficiency']:>8.4f} "
            f"{stats['avg_entries_per_pack']:>10.2f}"
        )

    print("\nGoals:")
    goals = [
        (
            f"best_fit_decreasing within {MAX_BFD_OVER_LOWER_BOUND:.0%} of the lower bound",
            results["best_fit_decreasing"][1]["packs_over_min"] <= MAX_BFD_OVER_LOWER_BOUND,
        )
    ]
    for name, (seconds, _) in results.items():
        goals.append((f"{name} under {MAX_SECONDS:.0f} s", seconds < MAX_SECONDS))
    for description, met in goals:
        print(f"  [{'PASS' if met else 'FAIL'}] {description}")
    return 0 if all(met for _, met in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
