"""Scale-only training cost: sasq (NumPy + C kernels) vs a PyTorch autograd implementation.

Both train the same thing: a W8A8 static per-channel *folded* plan (SASQ's deployable form) at
the four linear inputs of every decoder layer; weights frozen (requires_grad=False in torch),
fake quantization with the straight-through estimator, only the per-channel log-scales
trainable, Adam, next-token cross-entropy, batch 1. Per step torch does what sasq's
QuantModel.sync does: fold s into the consumer weight columns and re-quantize those weights per
output channel (the rounding passed straight through), and divide the activation by s.

Each implementation runs in its own subprocess (so peak memory is its own): seconds per step
(median of the timed steps after one warm-up step) and peak resident memory (ru_maxrss), plus
the resident memory before training (model loaded) so the training overhead is visible.
Printed side by side with the ratio sasq / torch, in one run, with the same thread count.

    python benchmarks/bench_train.py            # stories260K (seqlen 256) + random LLaMA
                                                # (hidden 2048, 2 layers, seqlen 512)
    python benchmarks/bench_train.py --quick    # small shapes, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "assets" / "stories260K" / "hf"
SMOLLM2 = Path.home() / ".cache" / "sasq" / "smollm2" / "hf"
# TinyLlama-1.1B shapes with 2 layers.
REALISTIC = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
QUICK = dict(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
BITS = 8
LR = 3e-2


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _load_case(case: dict):
    """-> (config dict, tensors in HF names as numpy float32, token ids (T+1,))."""
    import numpy as np
    sys.path.insert(0, str(ROOT))
    from sasq.model import LlamaConfig, random_model
    rng = np.random.default_rng(0)
    if case["model"] in ("stories260K", "smollm2"):
        from sasq.io import load_checkpoint_dir
        d = STORIES if case["model"] == "stories260K" else SMOLLM2
        cfg = json.loads((d / "config.json").read_text())
        tensors = dict(load_checkpoint_dir(d))
    else:
        cfg = dict(case["config"])
        m = random_model(LlamaConfig.from_dict(cfg), seed=0)
        tensors = {"model.embed_tokens.weight": m.embed_tokens, "model.norm.weight": m.norm,
                   "lm_head.weight": m.lm_head}
        for i, lw in enumerate(m.layers):
            for f in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[f"model.layers.{i}.self_attn.{f}.weight"] = getattr(lw, f)
            for f in ("gate_proj", "up_proj", "down_proj"):
                tensors[f"model.layers.{i}.mlp.{f}.weight"] = getattr(lw, f)
            tensors[f"model.layers.{i}.input_layernorm.weight"] = lw.input_layernorm
            tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = lw.post_attention_layernorm
    ids = rng.integers(3, cfg["vocab_size"], size=(case["steps"] + 2, case.get("batch", 1),
                                                   case["seqlen"] + 1))
    return cfg, tensors, ids


# --------------------------------------------------------------------------- sasq

def run_sasq(case: dict) -> dict:
    import numpy as np
    sys.path.insert(0, str(ROOT))
    import sasq
    from sasq.model import LlamaModel
    from sasq.train import train_scales
    sasq.set_num_threads(case["threads"])
    cfg, tensors, ids = _load_case(case)
    model = LlamaModel.from_config_and_tensors(cfg, tensors)
    q = sasq.quantize(model, sasq.QuantPlan(w_bits=BITS, a_bits=BITS, granularity="channel", fold=True,
                                            sink_tokens=case.get("sink", 0)))
    sasq.calibrate(q, ids[0, :1, :-1], progress=False)
    rss0 = _current_rss_mb()
    obj, b = case.get("objective", "ce"), case.get("batch", 1)
    # one call: 2 warm-up steps, then the timed ones; batches cycle over 2 fixed batches, so with
    # KL both sides compute each window's FP32 teacher once (sasq's TeacherPool; torch caches too)
    windows = ids[:2].reshape(-1, case["seqlen"] + 1)
    times, t0 = [], [time.perf_counter()]

    def tick(step, info):
        now = time.perf_counter()
        times.append(now - t0[0])
        t0[0] = now

    train_scales(q, windows, steps=2 + case["steps"], lr=LR, seqlen=case["seqlen"], batch=b,
                 warmup=0, schedule="constant", progress=False, recompute=case["recompute"],
                 objective=obj, pool=len(windows), callback=tick)
    times = times[2:]
    return {"step_s": float(np.median(times)), "rss_model_mb": rss0, "peak_rss_mb": _rss_mb(),
            "n_params": int(sum(p.size for p in q.params.values()))}


# --------------------------------------------------------------------------- torch reference

def run_torch(case: dict) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    cfg, tensors, ids = _load_case(case)
    T = torch.from_numpy
    C, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KVH = cfg.get("num_key_value_heads", H)
    hd = cfg.get("head_dim") or C // H
    L = cfg["num_hidden_layers"]
    eps = cfg.get("rms_norm_eps", 1e-5)
    theta = cfg.get("rope_theta", 10000.0)
    qmax = 2 ** (BITS - 1) - 1
    def g(n):
        a = np.ascontiguousarray(tensors[n], dtype=np.float32)
        return T(a if a.flags.writeable else a.copy())  # memmaps are read-only
    emb = g("model.embed_tokens.weight")
    head = g("lm_head.weight") if "lm_head.weight" in tensors else emb
    norm = g("model.norm.weight")
    layers = []
    for i in range(L):
        p = f"model.layers.{i}."
        layers.append({k: g(p + n) for k, n in (
            ("q", "self_attn.q_proj.weight"), ("k", "self_attn.k_proj.weight"),
            ("v", "self_attn.v_proj.weight"), ("o", "self_attn.o_proj.weight"),
            ("gate", "mlp.gate_proj.weight"), ("up", "mlp.up_proj.weight"),
            ("down", "mlp.down_proj.weight"), ("ln1", "input_layernorm.weight"),
            ("ln2", "post_attention_layernorm.weight"))})
    for lw in layers:
        for t in lw.values():
            t.requires_grad_(False)  # frozen weights

    class RoundSTE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.round(x)

        @staticmethod
        def backward(ctx, gr):
            return gr

    def fq_act(u):  # u = x / s: integer grid with STE inside, zero gradient when clipped
        return torch.clamp(RoundSTE.apply(u), -qmax, qmax)

    def fq_weight(w):  # per output channel absmax/qmax, round-to-nearest, STE
        sw = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
        return torch.clamp(RoundSTE.apply(w / sw), -qmax, qmax) * sw

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    Tn = case["seqlen"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.outer(torch.arange(Tn, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # (B, h, T, hd), HF rotate_half
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    quant = [True]

    def qlinear(x, s, *ws):  # folded per-channel: x / s on the grid, weight columns * s
        if not quant[0]:
            return [x @ w.T for w in ws]
        xq = fq_act(x / s)
        return [xq @ fq_weight(w * s).T for w in ws]

    def fp_forward(ids):  # the FP32 teacher: the same graph, no quantizers
        quant[0] = False
        try:
            return forward(ids, [{k: torch.zeros_like(v) for k, v in d.items()} for d in log_s])
        finally:
            quant[0] = True

    def forward(ids, log_s, record=None):
        B, Tq = ids.shape
        x = emb[ids]
        for i, lw in enumerate(layers):
            s = {k: torch.exp(v) for k, v in log_s[i].items()}
            h = rms(x, lw["ln1"])
            if record is not None:
                record[(i, "attn_in")] = h.abs().amax(dim=(0, 1))
            q, k, v = qlinear(h, s["attn_in"], lw["q"], lw["k"], lw["v"])
            q = rope(q.view(B, Tq, H, hd).transpose(1, 2))
            k = rope(k.view(B, Tq, KVH, hd).transpose(1, 2))
            v = v.view(B, Tq, KVH, hd).transpose(1, 2)
            k = k.repeat_interleave(H // KVH, dim=1)
            v = v.repeat_interleave(H // KVH, dim=1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            a = a.transpose(1, 2).reshape(B, Tq, H * hd)
            if record is not None:
                record[(i, "o_in")] = a.abs().amax(dim=(0, 1)).view(KVH, H // KVH, hd).amax(1).reshape(-1)
            # o_in scales tied per KV channel (GQA), expanded over the query heads
            s_o = s["o_in"].view(KVH, 1, hd).expand(KVH, H // KVH, hd).reshape(-1)
            (o,) = qlinear(a, s_o, lw["o"])
            x = x + o
            h = rms(x, lw["ln2"])
            if record is not None:
                record[(i, "mlp_in")] = h.abs().amax(dim=(0, 1))
            gate, up = qlinear(h, s["mlp_in"], lw["gate"], lw["up"])
            d = torch.nn.functional.silu(gate) * up
            if record is not None:
                record[(i, "down_in")] = d.abs().amax(dim=(0, 1))
            (dn,) = qlinear(d, s["down_in"], lw["down"])
            x = x + dn
        return rms(x, norm) @ head.T

    ids_t = torch.from_numpy(ids.astype(np.int64))
    # PTQ init as in sasq.calibrate: absmax / qmax of one window
    init = [{k: torch.zeros(n) for k, n in (("attn_in", C), ("o_in", KVH * hd),
                                             ("mlp_in", C), ("down_in", cfg["intermediate_size"]))}
            for _ in range(L)]
    rec: dict = {}
    with torch.no_grad():
        forward(ids_t[0, :1, :-1], init, record=rec)
    log_s = [{k: torch.log(rec[(i, k)].clamp_min(1e-8) / qmax).requires_grad_(True) for k in init[i]}
             for i in range(L)]
    opt = torch.optim.Adam([p for d in log_s for p in d.values()], lr=LR)
    rss0 = _current_rss_mb()

    F = torch.nn.functional
    teacher = {}

    def step(j):
        w = ids_t[j % 2]  # (B, T+1)
        opt.zero_grad(set_to_none=True)
        logits = forward(w[:, :-1], log_s)
        if case.get("objective", "ce") == "kl":
            if j % 2 not in teacher:  # the FP32 teacher once per batch (cached, as sasq does)
                with torch.no_grad():
                    teacher[j % 2] = F.log_softmax(fp_forward(w[:, :-1]), -1)
            lq = F.log_softmax(logits, -1)
            loss = F.kl_div(lq.reshape(-1, lq.shape[-1]), teacher[j % 2].reshape(-1, lq.shape[-1]),
                            log_target=True, reduction="batchmean")
        else:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())

    step(0), step(1)  # warm-up (and the teacher of both batches)
    times = []
    for s in range(case["steps"]):
        t0 = time.perf_counter()
        step(s)
        times.append(time.perf_counter() - t0)
    return {"step_s": float(np.median(times)), "rss_model_mb": rss0, "peak_rss_mb": _rss_mb(),
            "n_params": int(sum(p.numel() for d in log_s for p in d.values()))}


# --------------------------------------------------------------------------- driver

def _child(impl: str, case: dict) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SASQ_NUM_THREADS"):
        env[var] = str(case["threads"])
    cmd = [sys.executable, __file__, "--child", impl, json.dumps(case)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5; quick 3)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for both (default 1: on a shared, oversubscribed CPU torch's OpenMP "
                         "threads spin and its step time explodes)")
    ap.add_argument("--recompute", action="store_true", help="sasq: recompute activations per layer")
    ap.add_argument("--smollm2", action="store_true",
                    help="also SmolLM2-135M, KL objective, batch 2 x 512 (the fidelity issue's case)")
    ap.add_argument("--only-smollm2", action="store_true", help="only the SmolLM2 case")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        impl, case = a.child[0], json.loads(a.child[1])
        res = run_sasq(case) if impl == "sasq" else run_torch(case)
        print(json.dumps(res))
        return 0
    steps = a.steps or (3 if a.quick else 5)
    cases = []
    if STORIES.exists():
        cases.append({"name": "stories260K", "model": "stories260K", "seqlen": 64 if a.quick else 256})
    else:
        print(f"(stories260K not found at {STORIES}; skipped)", file=sys.stderr)
    cases.append({"name": "random LLaMA " + ("(quick shapes)" if a.quick else "h2048 L2"),
                  "model": "random", "config": QUICK if a.quick else REALISTIC,
                  "seqlen": 128 if a.quick else 512})
    if a.smollm2:
        if not (SMOLLM2 / "config.json").exists():
            print(f"(SmolLM2 not cached at {SMOLLM2}; run benchmarks/assets.py smollm2)", file=sys.stderr)
        else:  # issue 10: a KL step of 2 x 512 tokens
            cases.append({"name": "SmolLM2-135M KL 2x512", "model": "smollm2", "seqlen": 512,
                          "batch": 2, "objective": "kl"})
    if a.only_smollm2:
        a.smollm2 = True
        cases = []
        if (SMOLLM2 / "config.json").exists():
            cases.append({"name": "SmolLM2-135M KL 2x512", "model": "smollm2", "seqlen": 512,
                          "batch": 2, "objective": "kl"})
    rows = []
    print(f"scale-only training step, W{BITS}A{BITS} static per-channel folded, batch 1 (SmolLM2: 2), "
          f"{a.threads} threads, median of {steps} steps")
    hdr = (f"{'case':<24} {'seqlen':>6} {'sasq s/step':>12} {'torch s/step':>13} {'ratio':>6} "
           f"{'sasq peak MB':>13} {'torch peak MB':>14} {'ratio':>6}")
    print(hdr)
    for c in cases:
        case = {**c, "steps": steps, "threads": a.threads, "recompute": a.recompute}
        s = _child("sasq", case)
        t = _child("torch", case)
        r = {"case": c["name"], "seqlen": c["seqlen"], "sasq": s, "torch": t,
             "time_ratio": s["step_s"] / t["step_s"], "peak_ratio": s["peak_rss_mb"] / t["peak_rss_mb"]}
        rows.append(r)
        print(f"{c['name']:<24} {c['seqlen']:>6} {s['step_s']:>12.4f} {t['step_s']:>13.4f} "
              f"{r['time_ratio']:>6.2f} {s['peak_rss_mb']:>13.0f} {t['peak_rss_mb']:>14.0f} "
              f"{r['peak_ratio']:>6.2f}")
        print(f"{'':<24} {'':>6} (resident after model load: sasq {s['rss_model_mb']:.0f} MB, "
              f"torch {t['rss_model_mb']:.0f} MB; trainable params {s['n_params']} / {t['n_params']})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
