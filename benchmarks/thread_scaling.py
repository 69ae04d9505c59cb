"""Thread scaling of linear_int8 per shape, and what the per-shape thread policy picks.

For each shape, GOP/s with the policy switched off at 1, 2, 4, ... --max-threads threads (every
call uses exactly that many), then with the policy on at --max-threads (it may use fewer). The
last columns compare the policy's rate with the best fixed count: near 1.0 means the policy finds
the right number of threads; well below 1.0 means it leaves speed behind.

    python benchmarks/thread_scaling.py --max-threads 16   # a 16-core machine, ~2 minutes
"""
import argparse
import sys
import time

import numpy as np

from sasq import ops

SHAPES = [  # (M, K, N): decode and prefill products of SmolLM2-135M and of a 4096-hidden model
    (1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (1, 4096, 4096), (1, 4096, 11008),
    (16, 576, 1536), (64, 576, 1536), (256, 576, 1536), (256, 1536, 576), (512, 576, 3072),
    (256, 4096, 4096), (2048, 4096, 4096)]


def best_time(fn, min_time: float) -> float:
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < min_time or reps < 3) and reps < 200:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-threads", type=int, default=ops.get_num_threads())
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of timed runs per entry")
    args = p.parse_args(argv)
    counts = [t for t in (1, 2, 4, 8, 16, 32, 64) if t < args.max_threads] + [args.max_threads]
    print(f"linear_int8 thread scaling, ISA {ops.get_isa()}; GOP/s = 2*M*N*K / best time")
    hdr = (f"{'M':>5} {'K':>5} {'N':>6} | " + " ".join(f"{f't={t}':>7}" for t in counts)
           + f" | {'policy':>7} {'threads':>7} {'/best':>6}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    worst = 1.0
    for m, k, n in SHAPES:
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        w_scales = rng.uniform(0.5e-3, 2e-3, n).astype(np.float32)
        packed = ops.pack_weights(w)
        a = rng.integers(-127, 128, (m, k), dtype=np.int8)
        run = lambda: ops.linear_int8(a, packed, 0.02, w_scales)
        gops = lambda sec: 2.0 * m * n * k / sec * 1e-9
        rates = []
        ops._C._gemm_policy(False)
        try:
            for t in counts:
                ops.set_num_threads(t)
                rates.append(gops(best_time(run, args.min_time)))
        finally:
            ops._C._gemm_policy(True)
        ops.set_num_threads(args.max_threads)
        pol = gops(best_time(run, args.min_time))
        worst = min(worst, pol / max(rates))
        print(f"{m:>5} {k:>5} {n:>6} | " + " ".join(f"{r:7.0f}" for r in rates)
              + f" | {pol:7.0f} {ops._C._gemm_threads(m, n, k):>7} {pol / max(rates):6.2f}", flush=True)
    print(f"worst policy / best fixed count: {worst:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
