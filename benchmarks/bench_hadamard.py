"""ns/row and GB/s of sasq.ops.hadamard (and the fused hadamard_quantize) side by side with the
explicit NumPy float32 matmul x @ M^T by the dense n x n matrix (BLAS), same rows and threads, in
one run; the ratio is numpy time / sasq time.

    python benchmarks/bench_hadamard.py                # n in {576, 1536, 4096, 11008}, rows 1 and 256
    python benchmarks/bench_hadamard.py --quick        # n in {576, 1536}
    python benchmarks/bench_hadamard.py --threads 2

GB/s counts the bytes the transform must move: read x and write y, 8 bytes per element (5 for
the int8 output of the fused kernel). Times are the best of several runs (least disturbed on a
shared machine). Not a test: nothing here asserts speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="n in {576, 1536} only")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 256])
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed runs per entry")
    return p.parse_args(argv)


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # read at numpy import
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sasq import hadamard as H  # noqa: E402
from sasq import ops  # noqa: E402

SIZES = [576, 1536] if ARGS.quick else [576, 1536, 4096, 11008]


def best_time(fn, min_time: float, max_reps: int = 200) -> float:
    fn()  # warm-up (page faults, pool start)
    best, spent, reps = float("inf"), 0.0, 0
    while (spent < min_time or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


def main() -> None:
    ops.set_num_threads(ARGS.threads)
    print(f"threads={ARGS.threads} isa={ops.get_isa()} numpy={np.__version__}")
    print(f"{'n':>6} {'m*2^k':>9} {'rows':>5} | {'sasq ns/row':>11} {'GB/s':>6} | "
          f"{'fused q ns/row':>14} | {'numpy ns/row':>12} {'GB/s':>6} | {'numpy/sasq':>10}")
    for n in SIZES:
        m, k = H.hadamard_factors(n)
        dense_t = np.ascontiguousarray(H.hadamard_matrix(n, dtype=np.float32).T)  # (n, n): x @ M^T
        for rows in ARGS.rows:
            x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
            y = np.empty_like(x)
            yn = np.empty_like(x)
            t_s = best_time(lambda: ops.hadamard(x, out=y), ARGS.min_time)
            t_q = best_time(lambda: ops.hadamard_quantize(x, 0.05), ARGS.min_time)
            t_n = best_time(lambda: np.matmul(x, dense_t, out=yn), ARGS.min_time, max_reps=20)
            err = float(np.abs(y - yn).max())
            assert err < 1e-3, f"sasq and numpy disagree at n = {n}: {err}"
            gb = 8.0 * rows * n / 1e9
            print(f"{n:>6} {f'{m}*2^{k}':>9} {rows:>5} | {t_s / rows * 1e9:>11.0f} {gb / t_s:>6.2f} | "
                  f"{t_q / rows * 1e9:>14.0f} | {t_n / rows * 1e9:>12.0f} {gb / t_n:>6.2f} | "
                  f"{t_n / t_s:>10.1f}")
        dense_t = None  # free the n x n matrix before the next one is built


if __name__ == "__main__":
    main()
