"""Prefill throughput: sasq (NumPy) vs transformers (torch float32 CPU), side by side in one run.

Both use the same number of threads (numpy's BLAS via threadpoolctl when available / the
OPENBLAS_NUM_THREADS env, torch.set_num_threads). Prints tokens/s and the ratio sasq/torch.

    python benchmarks/bench_forward.py            # stories260K + random LLaMA at 512 and 2048
    python benchmarks/bench_forward.py --quick    # small shapes, a few seconds
    python benchmarks/bench_forward.py --backward # also the activation-gradient step + memory
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _threads_from_argv(default=2) -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


# numpy's BLAS reads its thread count when numpy is first imported
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(_threads_from_argv()))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STORIES = ROOT.parent / "shared" / "assets" / "stories260K" / "hf"
REALISTIC = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)
QUICK = dict(vocab_size=4000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
             rms_norm_eps=1e-5)


def set_threads(n: int):
    import torch
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
    except ImportError:
        pass  # OPENBLAS_NUM_THREADS was set above, before numpy was imported


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function, runs interleaved so that load from other processes
    hits both sides alike; the minimum is the least disturbed run."""
    for fn in fns:
        fn()  # warm-up (allocations, rope tables, torch kernels)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def hf_from_sasq(model):
    """Save a sasq model's weights as a HF checkpoint and load it with transformers."""
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    cfg = HFConfig(**{k: v for k, v in model.config.to_dict().items()
                      if k not in ("architectures", "torch_dtype")})
    hf = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed_tokens, "model.norm.weight": model.norm,
          "lm_head.weight": model.lm_head}
    from sasq.model import _LAYER_TENSORS
    for i, lw in enumerate(model.layers):
        for f, n in _LAYER_TENSORS.items():
            sd[f"model.layers.{i}.{n}"] = getattr(lw, f)
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
    return hf


def bench(name, model, hf, seqlen, repeats, batch=1):
    import torch
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seqlen))
    tid = torch.from_numpy(ids)

    def run_sasq():
        model.forward(ids)

    def run_torch():
        with torch.inference_mode():
            hf(tid, use_cache=False)

    ts, tt = best_times([run_sasq, run_torch], repeats)
    n = batch * seqlen
    return dict(model=name, seqlen=seqlen, sasq=n / ts, torch=n / tt, ratio=tt / ts)


def _mmap_big_allocations():
    """glibc serves allocations >= 64 KiB with mmap and returns them on free, so resident
    memory follows live arrays (numpy's and torch's alike) instead of a grown heap."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_extra_mb(fn) -> float:
    """Peak resident memory above the level before fn(), sampled every millisecond."""
    import gc
    import threading
    gc.collect()
    base = _rss_mb()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return peak[0] - base


def bench_backward(name, model, hf, seqlen, repeats, batch=1):
    """Activation-gradient step (forward keeping what backward needs + backward to the
    embedding output, frozen weights) vs torch autograd on the same weights."""
    import torch
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seqlen))
    tid = torch.from_numpy(ids)
    for p in hf.parameters():
        p.requires_grad_(False)

    def run_sasq(recompute=False):
        tape = model.forward_tape(ids, recompute=recompute)
        model.backward(tape, tape.logits)  # loss = sum(logits^2) / 2

    def run_torch():
        e = hf.model.embed_tokens(tid).requires_grad_(True)
        logits = hf(inputs_embeds=e, use_cache=False).logits
        logits.backward(logits.detach())

    ts, tr, tt = best_times([run_sasq, lambda: run_sasq(True), run_torch], repeats)
    mem = [peak_extra_mb(f) for f in (run_sasq, lambda: run_sasq(True), run_torch)]
    return dict(model=name, seqlen=seqlen, sasq=ts, recompute=tr, torch=tt, mem=mem)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seqlens", type=int, nargs="+", default=None)
    ap.add_argument("--backward", action="store_true",
                    help="also time forward_tape + backward vs torch autograd, with peak memory")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    _mmap_big_allocations()
    import torch
    from transformers import LlamaForCausalLM
    import sasq
    from sasq.model import LlamaConfig, random_model

    rows, brows = [], []
    if STORIES.is_dir():
        m = sasq.load(STORIES)
        hf = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
        for T in ([256] if args.quick else [512]):
            rows.append(bench("stories260K", m, hf, T, args.repeats * 3))
            if args.backward:
                brows.append(bench_backward("stories260K", m, hf, T, args.repeats * 3))
    cfg = LlamaConfig(**(QUICK if args.quick else REALISTIC))
    m = random_model(cfg, seed=0, std=0.02)
    hf = hf_from_sasq(m)
    label = "random-quick" if args.quick else "random-2048x4L"
    for T in args.seqlens or ([256, 512] if args.quick else [512, 2048]):
        rows.append(bench(label, m, hf, T, args.repeats))
    if args.backward:
        T = 256 if args.quick else 512
        brows.append(bench_backward(label, m, hf, T, args.repeats))

    print(f"\nprefill tokens/s, float32, {args.threads} threads "
          f"(numpy {np.__version__}, torch {torch.__version__})")
    print(f"{'model':<16} {'seqlen':>6} {'sasq tok/s':>11} {'torch tok/s':>12} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<16} {r['seqlen']:>6} {r['sasq']:>11.0f} {r['torch']:>12.0f} "
              f"{r['ratio']:>6.2f}")
    if brows:
        print("\nactivation-gradient step (forward_tape + backward, frozen weights) vs torch "
              "autograd: seconds, and peak memory above the pre-step level (MiB)")
        print(f"{'model':<16} {'seqlen':>6} {'sasq s':>7} {'recomp s':>8} {'torch s':>7} "
              f"{'t/s':>5} {'sasq MiB':>8} {'recomp MiB':>10} {'torch MiB':>9}")
        for r in brows:
            print(f"{r['model']:<16} {r['seqlen']:>6} {r['sasq']:>7.3f} {r['recompute']:>8.3f} "
                  f"{r['torch']:>7.3f} {r['torch'] / r['sasq']:>5.2f} {r['mem'][0]:>8.0f} "
                  f"{r['mem'][1]:>10.0f} {r['mem'][2]:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
