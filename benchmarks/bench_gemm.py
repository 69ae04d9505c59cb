"""GOP/s of sasq.ops.linear_int8 side by side with NumPy float32 matmul and torch's int8 quantized
linear (fbgemm, prepacked weight), on the same shapes and thread count in one run; plus the
measured int8 peak of this machine (a tight vpdpbusd loop) and, for M = 1, the time to stream the
packed weights once (a plain read of the same bytes with the same threads).

    python benchmarks/bench_gemm.py --quick      # a small subset, < 1 minute
    python benchmarks/bench_gemm.py              # M in {1,16,256,2048} x 4 LLaMA (K, N) shapes

Times are the best of several runs (least disturbed by other processes on a shared machine). On
a shared, oversubscribed machine wall time mostly measures how much CPU the scheduler gave us, so
each rate is also shown per CPU second: ops / (process CPU time / threads), i.e. the rate while the
threads were actually on a core (idle-spinning BLAS/OpenMP workers count as busy). The "cpu%"
column is the share of `threads` cores the process got during the sasq runs.
Not a test: nothing here asserts speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small subset of shapes, < 1 minute")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per entry")
    p.add_argument("--no-torch", action="store_true", help="skip the torch fbgemm column")
    return p.parse_args(argv)


ARGS = parse_args()
# BLAS pools read these at import: pin NumPy's (and torch's) threads to the same count.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

from sasq import ops  # noqa: E402

FULL_M = [1, 16, 256, 2048]
FULL_KN = [(4096, 4096), (4096, 11008), (11008, 4096), (576, 1536)]
QUICK_M = [1, 256]
QUICK_KN = [(576, 1536), (4096, 4096)]


def best_time(fn, min_time: float, max_reps: int = 50) -> tuple[float, float]:
    """(best wall seconds, best process-CPU seconds) over repeated calls after one warm-up."""
    time.sleep(0.05)  # let the previous library's spinning worker threads go idle
    t0 = time.perf_counter()
    fn()  # warm-up (page faults, pool start, caches)
    long_call = time.perf_counter() - t0 > 1.0
    best, best_cpu, spent, reps = float("inf"), float("inf"), 0.0, 0
    while (spent < min_time or reps < (2 if long_call else 3)) and reps < max_reps:
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        best, best_cpu, spent, reps = min(best, dt), min(best_cpu, dc), spent + dt, reps + 1
    return best, best_cpu


def torch_int8_linear(threads):
    """A callable factory for torch's static int8 linear (quint8 x qint8 -> fbgemm), or None."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None, "torch has no fbgemm engine"
    import warnings

    warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated.*")
    torch.backends.quantized.engine = "fbgemm"
    torch.set_num_threads(threads)

    def make(w_int8, w_scales, a_int8, a_scale):
        n = w_int8.shape[0]
        qw = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(w_int8), torch.from_numpy(w_scales.astype(np.float64)),
            torch.zeros(n, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None)
        qa = torch._make_per_tensor_quantized_tensor(
            torch.from_numpy((a_int8.astype(np.int16) + 128).astype(np.uint8)), a_scale, 128)
        out_scale = float(a_scale * w_scales.max() * 127 * 8)
        return lambda: torch.ops.quantized.linear(qa, packed, out_scale, 128)

    return make, f"torch {torch.__version__} fbgemm"


def main() -> int:
    threads = ARGS.threads
    ops.set_num_threads(threads)
    quick = ARGS.quick
    min_time = ARGS.min_time if ARGS.min_time is not None else (0.15 if quick else 0.4)
    ms, kns = (QUICK_M, QUICK_KN) if quick else (FULL_M, FULL_KN)
    make_torch, torch_note = (None, "skipped") if ARGS.no_torch else torch_int8_linear(threads)

    peaks = [ops._C._peak_int8_gops(threads, 0.15) for _ in range(3)]
    peak, peak_cpu = max(p[0] for p in peaks), max(p[1] for p in peaks)  # best of, like the timings
    print(f"sasq linear_int8, ISA {ops.get_isa()}, {threads} threads; numpy {np.__version__}; "
          f"{torch_note}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if peak > 0:
        print(f"measured int8 peak (vpdpbusd loop, {threads} threads): {peak:.0f} GOP/s wall, "
              f"{peak_cpu:.0f} GOP/s per CPU time")
    else:
        print("measured int8 peak: n/a (no AVX-512 VNNI)")
        peak = peak_cpu = float("nan")
    print("GOP/s = 2*M*N*K / best time (wall | per CPU time).  x_np, x_torch: sasq / NumPy fp32, "
          "sasq / torch int8 (by CPU time); %peak: sasq / int8 peak (wall | CPU);\n"
          "t/stream (M=1): sasq wall time / wall time to read the packed weights once")
    hdr = (f"{'M':>5} {'K':>6} {'N':>6} | {'sasq':>13} {'numpy':>11} {'torch':>11} | "
           f"{'x_np':>6} {'x_torch':>7} {'%peak':>9} {'cpu%':>4} | {'t/stream':>8} {'GB/s':>5}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    rows = []
    for k, n in kns:
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        w_scales = rng.uniform(0.5e-3, 2e-3, n).astype(np.float32)
        packed = ops.pack_weights(w)
        w32 = w.astype(np.float32) * w_scales[:, None]                # (N, K)
        for m in ms:
            a = rng.integers(-127, 128, (m, k), dtype=np.int8)
            x32 = a.astype(np.float32) * 0.02                          # (M, K)
            ops_count = 2.0 * m * n * k
            run_sasq = lambda: ops.linear_int8(a, packed, 0.02, w_scales)
            t_s, c_s = best_time(run_sasq, min_time)
            if m == 1:  # interleave with the streaming reference: both see the same machine load
                t_stream = float("inf")
                for _ in range(4):
                    t_stream = min(t_stream, best_time(lambda: ops._C._stream_read(packed), min_time / 4)[0])
                    t_s = min(t_s, best_time(run_sasq, min_time / 4)[0])
            t_np, c_np = best_time(lambda: x32 @ w32.T, min_time)
            t_t = c_t = float("nan")
            if make_torch is not None:
                t_t, c_t = best_time(make_torch(w, w_scales, a, 0.02), min_time)
            rate = lambda sec, per_cpu=False: ops_count / (sec / threads if per_cpu else sec) * 1e-9
            g_s, g_np, g_t = rate(t_s), rate(t_np), rate(t_t)
            gc_s, gc_np, gc_t = rate(c_s, True), rate(c_np, True), rate(c_t, True)
            stream = (f"{t_s / t_stream:8.2f} {packed.nbytes / t_stream * 1e-9:5.1f}" if m == 1
                      else f"{'':8} {'':5}")
            line = (f"{m:>5} {k:>6} {n:>6} | {g_s:6.0f}|{gc_s:<6.0f} {g_np:5.0f}|{gc_np:<5.0f} "
                    f"{g_t:5.0f}|{gc_t:<5.0f} | {gc_s / gc_np:6.2f} {gc_s / gc_t:7.2f} "
                    f"{100 * g_s / peak:3.0f}|{100 * gc_s / peak_cpu:<3.0f}% {100 * c_s / (t_s * threads):3.0f}% | {stream}")
            print(line, flush=True)
            rows.append((m, k, n, g_s, gc_s, g_np, gc_np, t_s / t_stream))
        del w32
    for m, k, n, g_s, gc_s, g_np, gc_np, rs in rows:
        if (m, k, n) == (2048, 4096, 4096):
            print(f"target M=2048 K=N=4096: {g_s / g_np:.2f}x NumPy fp32 by wall time, {gc_s / gc_np:.2f}x "
                  f"by CPU time (want >= 3); {100 * g_s / peak:.0f}% of peak by wall time, "
                  f"{100 * gc_s / peak_cpu:.0f}% by CPU time (want >= 60)")
        if m == 1 and (k, n) == (4096, 4096):
            print(f"target M=1 K=N=4096: {rs:.2f}x the weight streaming time (want <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
