"""The static int8 engine (sasq.StaticInt8Model) side by side with the same engine on dynamic
per-token activation scales, the NumPy float32 model, transformers float32 and llama.cpp Q8_0, in
one run: prefill tokens/s at seqlen 512 and 2048, decode tokens/s at context 512 (issue 12).

    python benchmarks/bench_engine.py --quick          # small shapes, about a minute
    python benchmarks/bench_engine.py                  # SmolLM2-135M (when cached), stories260K,
                                                       # a random LLaMA hidden 4096 x 2 layers
    python benchmarks/bench_engine.py --json out.json  # also every number as JSON

Sides (all on --threads threads, default 2):
  static    StaticInt8Model.from_pretrained(dir): every linear an INT8 GEMM with scales fixed at
            export (plan W8A8 per-channel folded, 4 sink positions, calibrated on a few windows
            of random token ids: the values of the scales do not change the speed)
  dynamic   the same directory loaded with dynamic=True (per-token scales computed at run time)
  static-nosink (only when named in --sides) the same plan without sink positions: what the
            per-row sink scales cost in prefill
  numpy     the NumPy float32 model (sasq.load / sasq.model.random_model)
  torch     transformers LlamaForCausalLM float32 (torch.set_num_threads)
  llama.cpp llama-cpp-python (llama.cpp built from source by pip: `pip install -e ".[bench]"`)
            on a Q8_0 GGUF of the same weights, made by llama.cpp's own quantizer
            (llama_model_quantize): SmolLM2 from its bundled GGUF (Q4_1 codes requantized), the
            others from a float32 GGUF this script writes from our tensors (q/k rows permuted
            to llama.cpp's order). Q8_0 files are cached under $SASQ_CACHE/bench_engine.

Prefill = one forward over N prompt tokens from an empty cache, logits of the last position
only (every side: llama.cpp's default; logits_to_keep=1 in transformers; return_hidden + the
head on the last row in sasq). llama.cpp gets n_batch = N (one decode call), its default
n_ubatch (512) and flash attention on (what llama.cpp's own tools pick on CPU; --llama-flash-attn
off for the binding's default). Decode = greedy single-token steps after a 512-token context (each side feeds
back its own argmax); the cache is rolled back to the context before every timed run.

OpenMP wait policy: llama.cpp's CPU backend (and torch) run on OpenMP; with the default spinning
barriers on a machine whose cores are shared with other processes, a thread that spins while its
partner is descheduled costs a scheduler tick per barrier: measured here on a loaded 2-core
machine, llama.cpp decoded a 10 MiB model at 260 ms/token by default and 0.7 ms/token with
OMP_WAIT_POLICY=PASSIVE. The script sets PASSIVE before anything loads OpenMP (--omp-wait-policy
active|default for an idle machine, where spinning is the faster choice).

Every timing is the best of --repeats runs, the sides interleaved so that load from other
processes hits them alike; the rate is also given per CPU second (tokens / (process CPU time /
threads): the rate while our threads were on a core; idle-spinning OpenMP/BLAS workers count as
busy, which penalises torch and llama.cpp in that column). Ratios are by wall time, with the
CPU-time ratio in brackets.

The profile section (static engine, per model): Python-level calls per decoded token
(sys.setprofile: Python functions and C builtins called from Python), where one decode step's
time goes (outermost calls of sasq.ops / sasq.layers functions and the KV cache timed; the rest
is Python and NumPy glue), the INT8 GEMM shapes with their share, and GB/s of weights streamed
per decoded token against the measured read bandwidth (a plain read of a 128 MiB packed weight,
sasq.ops._C._stream_read, the same threads). Not a test: nothing here asserts speed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, about a minute")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed runs per entry (best of)")
    p.add_argument("--models", default=None,
                   help="comma list of smollm2,stories260K,random4096,random-quick")
    p.add_argument("--seqlens", type=int, nargs="+", default=None)
    p.add_argument("--ctx", type=int, default=None, help="decode context length")
    p.add_argument("--decode-tokens", type=int, default=None, help="decoded tokens per timed run")
    p.add_argument("--sides", default="static,dynamic,numpy,torch,llama.cpp")
    p.add_argument("--llama-ubatch", type=int, default=512, help="llama.cpp n_ubatch")
    p.add_argument("--llama-flash-attn", choices=["on", "off"], default="on",
                   help="llama.cpp flash attention (llama.cpp's own default 'auto' enables it on "
                        "CPU; llama-cpp-python's default is off; on measured 10-17%% faster "
                        "prefill for SmolLM2 here, same decode)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="passive",
                   help="OMP_WAIT_POLICY for llama.cpp's and torch's OpenMP pools (see the module "
                        "docstring; 'default' leaves the environment alone)")
    p.add_argument("--quant-head", action="store_true",
                   help="export with quant_head=True (an INT8 lm_head, like llama.cpp's Q8_0 "
                        "output matrix) instead of the float32 head")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", default=None, help="write every number to this file")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
# BLAS/OpenMP pools read these when first loaded: the same thread count for every side
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)
if ARGS.omp_wait_policy != "default":  # read by each OpenMP runtime when it loads
    os.environ["OMP_WAIT_POLICY"] = ARGS.omp_wait_policy.upper()

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sasq  # noqa: E402
from sasq import layers as L, ops  # noqa: E402
from sasq.model import KVCache, LlamaConfig, random_model  # noqa: E402

STORIES = ROOT.parent / "shared" / "assets" / "stories260K" / "hf"
BUNDLED_STORIES = ROOT / "sasq" / "assets" / "stories260K"
RANDOM4096 = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=4096, rms_norm_eps=1e-5)
RANDOM_QUICK = dict(vocab_size=4000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                    rms_norm_eps=1e-5)
PLAN = dict(w_bits=8, a_bits=8, granularity="channel", sink_tokens=4)
SIDES = ("static", "dynamic", "numpy", "torch", "llama.cpp", "static-nosink")


def cache_dir() -> Path:
    return Path(os.environ.get("SASQ_CACHE") or Path.home() / ".cache" / "sasq") / "bench_engine"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing

def best_times(fns: dict, repeats: int, warmups: dict | None = None) -> dict:
    """{side: (best wall s, best process-CPU s)}: one warm-up each (warmups[side] when given),
    then `repeats` rounds with the sides interleaved, the order rotated every round (no side
    always runs right after the same neighbour); the minimum is the least disturbed run."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    best = {n: [float("inf"), float("inf")] for n in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each side leads a round
            fn = fns[name]
            time.sleep(0.03)  # let the previous side's spinning worker threads go idle
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            best[name][0] = min(best[name][0], dt)
            best[name][1] = min(best[name][1], dc)
    return {n: tuple(v) for n, v in best.items()}


# --------------------------------------------------------------------------- models

def load_case(name: str):
    """(label, float LlamaModel, HF directory or None, bundled GGUF or None)."""
    if name == "smollm2":
        from assets import smollm2_available, smollm2_paths
        if not smollm2_available():
            return None
        gguf_path, hf = smollm2_paths()
        return "SmolLM2-135M", sasq.load(hf), hf, gguf_path
    if name == "stories260K":
        d = STORIES if (STORIES / "config.json").is_file() else BUNDLED_STORIES
        return "stories260K", sasq.load(d), d, None
    if name in ("random4096", "random-quick"):
        cfg = LlamaConfig(**(RANDOM4096 if name == "random4096" else RANDOM_QUICK))
        return ("random-4096x2L" if name == "random4096" else "random-quick",
                random_model(cfg, seed=0, std=0.02), None, None)
    raise SystemExit(f"unknown model {name!r}")


def export_engine(model, out: Path, seed=0, **plan):
    """Export `model` under plan PLAN (| plan) calibrated on two windows of random token ids."""
    rng = np.random.default_rng(seed)
    windows = rng.integers(3, model.config.vocab_size, (2, 64))
    qm = sasq.quantize(model, sasq.QuantPlan(**{**PLAN, **plan}))
    sasq.calibrate(qm, windows, progress=False)
    sasq.export(qm, out)
    del qm
    gc.collect()
    return out


def hf_model(model, hf_dir):
    import torch
    from transformers import LlamaForCausalLM
    if hf_dir is not None:
        return LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    from bench_forward import hf_from_sasq
    return hf_from_sasq(model)


# --------------------------------------------------------------------------- llama.cpp

def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def write_f32_gguf(model, path: Path):
    """A float32 llama GGUF of a sasq LlamaModel (q/k rows in llama.cpp's interleaved order, a
    placeholder SentencePiece vocabulary: the benchmark feeds token ids)."""
    import gguf
    from sasq.io.gguf import permute_qk
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("sasq-bench")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    V = c.vocab_size
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    toks += [f"\u2581t{i}" for i in range(V - len(toks))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (V - 259))
    if V < 259:
        raise ValueError("placeholder vocabulary needs vocab_size >= 259")
    w.add_tokenizer_model("llama")
    w.add_token_list(toks[:V])
    w.add_token_scores([-float(i) for i in range(V)])
    w.add_token_types([int(t) for t in types[:V]])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    f32 = lambda a: np.ascontiguousarray(a, np.float32)
    w.add_tensor("token_embd.weight", f32(model.embed_tokens))
    w.add_tensor("output_norm.weight", f32(model.norm))
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", f32(model.lm_head))
    for i, lw in enumerate(model.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", f32(lw.input_layernorm))
        w.add_tensor(p + "attn_q.weight", f32(permute_qk(lw.q_proj, c.num_attention_heads)))
        w.add_tensor(p + "attn_k.weight", f32(permute_qk(lw.k_proj, c.num_key_value_heads)))
        w.add_tensor(p + "attn_v.weight", f32(lw.v_proj))
        w.add_tensor(p + "attn_output.weight", f32(lw.o_proj))
        w.add_tensor(p + "ffn_norm.weight", f32(lw.post_attention_layernorm))
        w.add_tensor(p + "ffn_gate.weight", f32(lw.gate_proj))
        w.add_tensor(p + "ffn_up.weight", f32(lw.up_proj))
        w.add_tensor(p + "ffn_down.weight", f32(lw.down_proj))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize_q8_0(llama_cpp, src: Path, dst: Path, threads: int):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    part = dst.with_name(dst.name + ".part")
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(),
                                            llama_cpp.byref(params))
    if rc != 0 or not part.is_file():
        raise RuntimeError(f"llama_model_quantize({src} -> Q8_0) failed with {rc}")
    os.replace(part, dst)


def q8_0_gguf(llama_cpp, key: str, model, bundled: Path | None, threads: int) -> tuple[Path, str]:
    """(cached Q8_0 GGUF, how it was made)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    c = model.config
    stamp = f"{key}-{c.hidden_size}x{c.num_hidden_layers}-v{c.vocab_size}"
    dst = d / f"{stamp}.Q8_0.gguf"
    how = (f"llama.cpp quantizer, {bundled.name} requantized to Q8_0" if bundled is not None
           else "llama.cpp quantizer from an F32 GGUF written from our tensors")
    if dst.is_file():
        return dst, how
    t0 = time.perf_counter()
    if bundled is not None:
        llama_quantize_q8_0(llama_cpp, bundled, dst, threads)
    else:
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = Path(tmp) / "f32.gguf"
            write_f32_gguf(model, src)
            llama_quantize_q8_0(llama_cpp, src, dst, threads)
    log(f"  wrote {dst} ({dst.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return dst, how


def gguf_streamed_bytes(path: Path) -> int:
    """Bytes of the weights one decode step reads: every tensor, token_embd only when it is the
    (tied) output matrix."""
    import gguf
    r = gguf.GGUFReader(str(path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(names.values())
    if "output.weight" in names:
        total -= names.get("token_embd.weight", 0)
    return total


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp logs to fd 2 from C; silence it (errors are raised as exceptions anyway)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class LlamaCppSide:
    def __init__(self, llama_cpp, path: Path, n_ctx: int, n_batch: int, n_ubatch: int,
                 threads: int, flash_attn: bool):
        self.lc = llama_cpp
        with quiet_stderr():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch,
                                       n_ubatch=min(n_ubatch, n_batch), n_threads=threads,
                                       n_threads_batch=threads, logits_all=False,
                                       flash_attn=flash_attn, verbose=False)

    def prefill(self, ids):
        toks = [int(t) for t in ids]

        def run():
            self.llm.reset()
            self.llm.eval(toks)
            self.lc.llama_synchronize(self.llm.ctx)  # the last row's logits are ready
        return run

    def decoder(self, ctx_ids):
        llm = self.llm
        llm.reset()
        llm.eval([int(t) for t in ctx_ids])
        n0, nv = llm.n_tokens, llm.n_vocab()
        # eval() keeps no logits without logits_all (0.3.x): read the last row from the context
        last = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))
        first = int(np.argmax(last()))

        def run(n):
            llm.n_tokens = n0  # eval() drops the KV cells from n_tokens on
            tok = first
            for _ in range(n):
                llm.eval([tok])
                tok = int(np.argmax(last()))
        return run

    def c_side(self, fn, reps: int) -> tuple[float, float, int]:
        """Best of `reps` runs of fn: (wall s, seconds inside llama_decode by llama.cpp's own
        timers in that same run, tokens it counted), prompt and single-token evals together."""
        lc, ctx = self.lc, self.llm.ctx
        best = (float("inf"), 0.0, 0)
        for _ in range(reps):
            lc.llama_perf_context_reset(ctx)
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            d = lc.llama_perf_context(ctx)
            if wall < best[0]:
                best = (wall, (d.t_p_eval_ms + d.t_eval_ms) / 1e3,
                        (d.n_p_eval if d.t_p_eval_ms > 0 else 0) + (d.n_eval if d.t_eval_ms > 0 else 0))
        return best


# --------------------------------------------------------------------------- sasq and torch sides

def sasq_prefill(m, ids, float_head=None):
    x = ids[None]

    def run():
        h = m.forward(x, return_hidden=True)
        if float_head is not None:
            L.linear_forward(h[:, -1], float_head)
        else:
            m.logits(h[:, -1], x.shape[1] - 1)
    return run


def sasq_decoder(m, ctx_ids, float_head=None):
    """m: StaticInt8Model (float_head None) or LlamaModel (its lm_head)."""
    cache = KVCache(m.config.num_hidden_layers)
    head = ((lambda h, pos: L.linear_forward(h, float_head)) if float_head is not None
            else m.logits)
    h = m.forward(ctx_ids[None], cache=cache, return_hidden=True)
    n0 = cache.length
    first = int(head(h[:, -1], n0 - 1).argmax())

    def step(tok):
        h = m.forward(np.array([[tok]]), cache=cache, return_hidden=True)
        return int(head(h[:, -1], cache.length - 1)[0].argmax())

    def run(n):
        cache.length = n0  # the buffers keep their capacity: no reallocation while decoding
        tok = first
        for _ in range(n):
            tok = step(tok)
    run.step = lambda: step(first)
    run.reset = lambda: setattr(cache, "length", n0)
    return run


def torch_prefill(hf, ids):
    import torch
    tid = torch.from_numpy(np.ascontiguousarray(ids[None]))

    def run():
        with torch.inference_mode():
            hf(tid, use_cache=False, logits_to_keep=1)
    return run


def torch_decoder(hf, ctx_ids):
    import inspect

    import torch
    # transformers 5.x renamed past_key_values to cache (the old name warns)
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = hf(torch.from_numpy(np.ascontiguousarray(ctx_ids[None])), use_cache=True,
                 logits_to_keep=1)
    pkv = out["cache"] if "cache" in out else out["past_key_values"]
    n0 = len(ctx_ids)
    first = int(out.logits[0, -1].argmax())

    def run(n):
        extra = pkv.get_seq_length() - n0
        if extra > 0:
            pkv.crop(-extra)  # negative: tokens to remove (transformers 4.4x and 5.x alike)
        tok = first
        with torch.inference_mode():
            for _ in range(n):
                o = hf(torch.tensor([[tok]]), use_cache=True, logits_to_keep=1, **{kw: pkv})
                tok = int(o.logits[0, -1].argmax())
    return run


# --------------------------------------------------------------------------- profile

_OPS_FUNCS = ("linear_int8", "quantize", "quantize_dynamic", "truncate_quantize",
              "hadamard_quantize", "hadamard", "fake_quant")
_LAYER_FUNCS = ("rmsnorm_forward", "rope_forward", "attention_forward", "swiglu_forward",
                "linear_forward")


@contextlib.contextmanager
def instrumented(acc: dict, gemms: dict):
    """Time the outermost calls of sasq.ops / sasq.layers functions and KVCache.append into
    acc[name] = [seconds, calls]; INT8 GEMMs also by (M, K, N) into gemms."""
    depth = [0]
    saved = []

    def wrap(owner, name, label):
        f = getattr(owner, name)
        saved.append((owner, name, f))

        def timed(*a, **k):
            if depth[0]:
                return f(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                depth[0] -= 1
                e = acc.setdefault(label, [0.0, 0])
                e[0] += dt
                e[1] += 1
                if name == "linear_int8":
                    codes, packed = a[0], a[1]
                    key = (codes.size // packed.k, packed.k, packed.n)
                    g = gemms.setdefault(key, [0.0, 0, packed.nbytes])
                    g[0] += dt
                    g[1] += 1
        setattr(owner, name, timed)

    for n in _OPS_FUNCS:
        if hasattr(ops, n):
            wrap(ops, n, f"ops.{n}")
    for n in _LAYER_FUNCS:
        wrap(L, n, f"layers.{n}")
    wrap(KVCache, "append", "KVCache.append")
    try:
        yield
    finally:
        for owner, name, f in reversed(saved):
            setattr(owner, name, f)


def count_calls(fn) -> tuple[int, int]:
    """(Python function calls, C functions called from Python) during fn()."""
    n = {"call": 0, "c_call": 0}

    def prof(frame, event, arg):
        if event in n:
            n[event] += 1
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n["call"] - 1, n["c_call"]  # less fn itself


def engine_weight_bytes(e) -> dict:
    lin = sum(l.packed.nbytes for layer in e.linears for l in layer.values())
    head = e.lm_head.nbytes if isinstance(e.lm_head, np.ndarray) else e.lm_head.packed.nbytes
    return {"int8_linears": lin, "lm_head": head,
            "lm_head_dtype": "float32" if isinstance(e.lm_head, np.ndarray) else "int8",
            "embed_row": e.embed_tokens.shape[1] * 4, "total": lin + head + e.embed_tokens.shape[1] * 4}


def read_bandwidth(threads: int, reps: int = 8) -> float:
    """GB/s of a plain threaded read of a 128 MiB packed weight (larger than any cache)."""
    w = np.random.default_rng(0).integers(-127, 128, (8192, 16384), dtype=np.int8)
    p = ops.pack_weights(w)
    del w
    ops._C._stream_read(p)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        ops._C._stream_read(p)
        best = min(best, time.perf_counter() - t0)
    return p.nbytes / best * 1e-9


def profile_engine(e, ctx_ids, prompt_ids, n_decode: int, threads: int) -> dict:
    dec = sasq_decoder(e, ctx_ids)
    dec(2)  # warm
    dec.reset()
    py_calls, c_calls = count_calls(dec.step)
    res = {"calls_per_token": {"python": py_calls, "c_from_python": c_calls}}
    for phase, fn, ntok in (("decode", lambda: dec(n_decode), n_decode),
                            ("prefill", sasq_prefill(e, prompt_ids), len(prompt_ids))):
        acc, gemms = {}, {}
        fn()  # warm
        with instrumented(acc, gemms):
            t0 = time.perf_counter()
            fn()
            total = time.perf_counter() - t0
        res[phase] = {"seconds": total, "tokens": ntok,
                      "parts": {k: {"s": v[0], "calls": v[1]} for k, v in acc.items()},
                      "other_s": total - sum(v[0] for v in acc.values()),
                      "gemms": [{"M": m, "K": k, "N": n, "s": v[0], "calls": v[1], "bytes": v[2]}
                                for (m, k, n), v in gemms.items()]}
    import cProfile
    import pstats
    pr = cProfile.Profile()
    dec.reset()
    pr.enable()
    dec(n_decode)
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(((v[2], v[3], v[1], f"{Path(k[0]).name}:{k[1]}({k[2]})")
                   for k, v in st.stats.items()), reverse=True)[:12]
    res["cprofile_decode_top"] = [{"tottime": t, "cumtime": c, "ncalls": n, "func": f}
                                  for t, c, n, f in rows]
    return res


# --------------------------------------------------------------------------- one model

def run_case(key, args, llama_cpp, repeats, seqlens, ctx, n_decode, sides, peak):
    case = load_case(key)
    if case is None:
        log(f"{key}: not cached (python benchmarks/assets.py smollm2), skipped")
        return None
    label, model, hf_dir, bundled = case
    c = model.config
    log(f"{label}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}")
    out = {"model": label, "config": c.to_dict(), "prefill": [], "decode": None, "notes": []}
    rng = np.random.default_rng(1)
    V = c.vocab_size
    prompts = {T: rng.integers(3, V, T) for T in seqlens}
    ctx_ids = rng.integers(3, V, ctx)
    warm_ids = rng.integers(3, V, 64)
    nosink = None
    with tempfile.TemporaryDirectory(prefix="sasq-bench-engine-") as tmp:
        t0 = time.perf_counter()
        d = export_engine(model, Path(tmp) / "int8", quant_head=args.quant_head)
        static = sasq.StaticInt8Model.from_pretrained(d)
        dynamic = sasq.StaticInt8Model.from_pretrained(d, dynamic=True)
        if "static-nosink" in sides:
            nosink = sasq.StaticInt8Model.from_pretrained(
                export_engine(model, Path(tmp) / "int8-nosink", sink_tokens=0,
                              quant_head=args.quant_head))
        out["export_s"] = time.perf_counter() - t0
        log(f"  exported and loaded int8 engines in {out['export_s']:.0f} s")
    wb = engine_weight_bytes(static)
    out["engine_weight_bytes"] = wb
    lin_ops = 2 * sum(l.packed.k * l.packed.n for layer in static.linears for l in layer.values())
    out["linear_gop_per_token"] = lin_ops * 1e-9
    if peak:
        out["int8_limit_tok_s"] = peak / (lin_ops * 1e-9)
    hf = hf_model(model, hf_dir) if "torch" in sides else None
    lcpp, lc_how = None, None
    if "llama.cpp" in sides and llama_cpp is not None:
        path, lc_how = q8_0_gguf(llama_cpp, key, model, bundled, args.threads)
        n_ctx = max(max(seqlens), ctx + n_decode + 8)
        lcpp = LlamaCppSide(llama_cpp, path, n_ctx, max(seqlens), args.llama_ubatch, args.threads,
                            args.llama_flash_attn == "on")
        out["llama_cpp"] = {"gguf": str(path), "made_by": lc_how,
                            "streamed_bytes_per_token": gguf_streamed_bytes(path)}

    head = model.lm_head

    def sides_for(prefill_ids):
        fns = {}
        if "static" in sides:
            fns["static"] = sasq_prefill(static, prefill_ids)
        if "dynamic" in sides:
            fns["dynamic"] = sasq_prefill(dynamic, prefill_ids)
        if "numpy" in sides:
            fns["numpy"] = sasq_prefill(model, prefill_ids, head)
        if hf is not None:
            fns["torch"] = torch_prefill(hf, prefill_ids)
        if lcpp is not None:
            fns["llama.cpp"] = lcpp.prefill(prefill_ids)
        if nosink is not None:
            fns["static-nosink"] = sasq_prefill(nosink, prefill_ids)
        return fns

    warm = sides_for(warm_ids)
    for T in seqlens:
        log(f"  prefill {T} ...")
        r = best_times(sides_for(prompts[T]), repeats, warmups=warm)
        row = {"seqlen": T, "wall": {s: T / v[0] for s, v in r.items()},
               "cpu": {s: T / (v[1] / args.threads) for s, v in r.items()}}
        if lcpp is not None:
            w, c_s, _ = lcpp.c_side(lcpp.prefill(prompts[T]), repeats)
            row["llama_cpp_c_side"] = {"wall_tok_s": T / w, "c_tok_s": T / c_s if c_s else None}
        out["prefill"].append(row)
        warm = {}  # warmed up once per model

    log(f"  decode at context {ctx} ...")
    decs, dec_warm = {}, {}
    if "static" in sides:
        decs["static"] = sasq_decoder(static, ctx_ids)
    if "dynamic" in sides:
        decs["dynamic"] = sasq_decoder(dynamic, ctx_ids)
    if "numpy" in sides:
        decs["numpy"] = sasq_decoder(model, ctx_ids, head)
    if hf is not None:
        decs["torch"] = torch_decoder(hf, ctx_ids)
    if lcpp is not None:
        decs["llama.cpp"] = lcpp.decoder(ctx_ids)
    if nosink is not None:
        decs["static-nosink"] = sasq_decoder(nosink, ctx_ids)
    fns = {s: (lambda d=d: d(n_decode)) for s, d in decs.items()}
    dec_warm = {s: (lambda d=d: d(2)) for s, d in decs.items()}
    r = best_times(fns, repeats, warmups=dec_warm)
    out["decode"] = {"ctx": ctx, "tokens": n_decode,
                     "wall": {s: n_decode / v[0] for s, v in r.items()},
                     "cpu": {s: n_decode / (v[1] / args.threads) for s, v in r.items()}}
    if lcpp is not None:
        w, c_s, _ = lcpp.c_side(lambda: decs["llama.cpp"](n_decode), repeats)
        out["decode"]["llama_cpp_c_side"] = {"wall_tok_s": n_decode / w,
                                             "c_tok_s": n_decode / c_s if c_s else None}
    if not args.no_profile and "static" in sides:
        log("  profile ...")
        out["profile"] = profile_engine(static, ctx_ids, prompts[min(seqlens)], n_decode,
                                        args.threads)
    return out  # the models go with this frame (main collects before the next one)


# --------------------------------------------------------------------------- report

def fmt_rate(d, s):
    return f"{d['wall'][s]:7.1f}|{d['cpu'][s]:<7.1f}" if s in d["wall"] else f"{'-':>7}|{'':<7}"


def ratio(d, a, b):
    if a not in d["wall"] or b not in d["wall"]:
        return "   -       "
    return f"{d['wall'][a] / d['wall'][b]:5.2f}({d['cpu'][a] / d['cpu'][b]:.2f})"


def report(results, meta, sides):
    print(f"\nsasq engine benchmark: {meta['threads']} threads, OMP_WAIT_POLICY "
          f"{meta['omp_wait_policy']}, ISA {meta['isa']}, numpy "
          f"{meta['numpy']}, torch {meta['torch']}, llama-cpp-python {meta['llama_cpp']}; load "
          f"average {meta['loadavg_start']:.1f} -> {meta['loadavg_end']:.1f} on "
          f"{meta['cpus']} CPUs")
    if meta.get("peak_gops"):
        print(f"measured int8 peak: {meta['peak_gops']:.0f} GOP/s wall; read bandwidth "
              f"(128 MiB packed weight, {meta['threads']} threads): {meta['read_gbs']:.1f} GB/s")
    print("tokens/s, wall|per-CPU-time (tokens / (CPU s / threads)); ratios by wall (by CPU time)")
    hdr = (f"{'model':<15} {'phase':<13} | " + " ".join(f"{s:>15}" for s in sides)
           + f" | {'st/dyn':>11} {'st/numpy':>11} {'st/torch':>11} {'st/llama':>11}")
    print(hdr)
    print("-" * len(hdr))
    for res in results:
        for d, ph in [(r, f"prefill {r['seqlen']}") for r in res["prefill"]] + \
                     [(res["decode"], f"decode @{res['decode']['ctx']}")]:
            print(f"{res['model']:<15} {ph:<13} | " + " ".join(fmt_rate(d, s) for s in sides)
                  + f" | {ratio(d, 'static', 'dynamic')} {ratio(d, 'static', 'numpy')} "
                  f"{ratio(d, 'static', 'torch')} {ratio(d, 'static', 'llama.cpp')}")
    print(f"\nllama.cpp (n_batch = prompt length, n_ubatch {meta['llama_ubatch']}, flash attention "
          f"{meta['llama_flash_attn']}): time inside llama_decode (its own perf counters) vs our "
          "wall timing around the Python binding")
    for res in results:
        if "llama_cpp" not in res:
            continue
        print(f"  {res['model']}: {res['llama_cpp']['made_by']}")
        for d, ph in [(r, f"prefill {r['seqlen']}") for r in res["prefill"]] + \
                     [(res["decode"], "decode")]:
            cs = d.get("llama_cpp_c_side") or {}
            c, w = cs.get("c_tok_s"), cs.get("wall_tok_s")
            if c and w:
                print(f"    {ph:<13} inside llama_decode {c:8.1f} tok/s, through the binding "
                      f"{w:8.1f} tok/s in the same runs (binding + Python: "
                      f"{100 * (1 - w / c):4.1f}% of the wall time)")

    print("\ntargets (issue 12)")
    for res in results:
        m = res["model"]
        for r in res["prefill"]:
            w = r["wall"]
            if "static" in w and "dynamic" in w:
                print(f"  {m:<15} prefill {r['seqlen']:>5}: static/dynamic {w['static'] / w['dynamic']:.2f}"
                      f" (want >= 1.15)")
            if res["config"]["hidden_size"] == 4096 and "numpy" in w and "static" in w:
                print(f"  {m:<15} prefill {r['seqlen']:>5}: int8/NumPy fp32 "
                      f"{w['static'] / w['numpy']:.2f} (want >= 2.5)")
            if m.startswith("SmolLM2") and "llama.cpp" in w and "static" in w:
                print(f"  {m:<15} prefill {r['seqlen']:>5}: static/llama.cpp Q8_0 "
                      f"{w['static'] / w['llama.cpp']:.2f} (want >= 1.5)")
        d = res["decode"]["wall"]
        if "llama.cpp" in d and "static" in d:
            print(f"  {m:<15} decode  @{res['decode']['ctx']}: static/llama.cpp Q8_0 "
                  f"{d['static'] / d['llama.cpp']:.2f} (want >= 0.7)")
        if "int8_limit_tok_s" in res and res["prefill"] and "static" in res["prefill"][-1]["wall"]:
            r = res["prefill"][-1]
            print(f"  {m:<15} prefill {r['seqlen']:>5}: {r['wall']['static']:.0f} tok/s = "
                  f"{100 * r['wall']['static'] / res['int8_limit_tok_s']:.0f}% of the int8 "
                  f"arithmetic limit ({res['int8_limit_tok_s']:.0f} tok/s = peak / "
                  f"{res['linear_gop_per_token']:.3g} GOP per token in the linears)")

    print("\nweights streamed per decoded token")
    for res in results:
        d = res["decode"]["wall"]
        wb = res["engine_weight_bytes"]
        if "static" in d:
            gbs = wb["total"] * d["static"] * 1e-9
            print(f"  {res['model']:<15} static: {wb['total'] / 2**20:7.1f} MiB/token (int8 "
                  f"linears {wb['int8_linears'] / 2**20:.1f}, {wb['lm_head_dtype']} lm_head "
                  f"{wb['lm_head'] / 2**20:.1f}) x {d['static']:.1f} tok/s = {gbs:5.2f} GB/s"
                  + (f" = {100 * gbs / meta['read_gbs']:.0f}% of the measured read bandwidth"
                     if meta.get("read_gbs") else ""))
        if "llama_cpp" in res and "llama.cpp" in d:
            b = res["llama_cpp"]["streamed_bytes_per_token"]
            gbs = b * d["llama.cpp"] * 1e-9
            print(f"  {res['model']:<15} llama.cpp Q8_0: {b / 2**20:7.1f} MiB/token x "
                  f"{d['llama.cpp']:.1f} tok/s = {gbs:5.2f} GB/s"
                  + (f" = {100 * gbs / meta['read_gbs']:.0f}%" if meta.get("read_gbs") else ""))

    for res in results:
        p = res.get("profile")
        if not p:
            continue
        cpt = p["calls_per_token"]
        print(f"\nprofile: {res['model']} static engine (one timed run each, instrumented)")
        print(f"  Python-level calls per decoded token: {cpt['python']} Python functions, "
              f"{cpt['c_from_python']} C functions called from Python")
        for phase in ("decode", "prefill"):
            q = p[phase]
            per = q["seconds"] / q["tokens"]
            print(f"  {phase} ({q['tokens']} tokens, {1e3 * per:.3f} ms/token): where the time goes")
            parts = sorted(q["parts"].items(), key=lambda kv: -kv[1]["s"])
            for k, v in parts:
                print(f"    {k:<24} {100 * v['s'] / q['seconds']:5.1f}%  {v['calls'] / q['tokens'] if phase == 'decode' else v['calls']:>7.1f} "
                      f"calls{'/token' if phase == 'decode' else ''}")
            print(f"    {'other (Python, NumPy glue)':<24} {100 * q['other_s'] / q['seconds']:5.1f}%")
            gem = sorted(q["gemms"], key=lambda g: -g["s"])
            for g in gem:
                gops = 2 * g["M"] * g["K"] * g["N"] * g["calls"] / g["s"] * 1e-9
                extra = (f", {g['bytes'] * g['calls'] / g['s'] * 1e-9:5.1f} GB/s of weights"
                         if g["M"] == 1 else "")
                print(f"    GEMM M={g['M']:<5} K={g['K']:<6} N={g['N']:<6} {g['calls']:>4} calls "
                      f"{100 * g['s'] / q['seconds']:5.1f}% of the time, "
                      f"{1e6 * g['s'] / g['calls']:8.1f} us/call, {gops:6.1f} GOP/s{extra}")
        print("  cProfile, decode, by own time (top 12):")
        for r in p["cprofile_decode_top"]:
            print(f"    {1e3 * r['tottime']:8.1f} ms own {1e3 * r['cumtime']:8.1f} ms cum "
                  f"{r['ncalls']:>7} calls  {r['func']}")


def main() -> int:
    args = ARGS
    quick = args.quick
    repeats = args.repeats or (1 if quick else 3)
    seqlens = args.seqlens or ([128] if quick else [512, 2048])
    ctx = args.ctx or (128 if quick else 512)
    n_decode = args.decode_tokens or (8 if quick else 32)
    models = (args.models.split(",") if args.models
              else (["stories260K", "random-quick"] if quick
                    else ["smollm2", "stories260K", "random4096"]))
    sides = [s for s in args.sides.split(",") if s]
    bad = set(sides) - set(SIDES)
    if bad:
        raise SystemExit(f"unknown sides {sorted(bad)} (choose from {SIDES})")
    sasq.set_num_threads(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    llama_cpp = llama_cpp_module() if "llama.cpp" in sides else None
    if "llama.cpp" in sides and llama_cpp is None:
        log("llama-cpp-python is not installed (pip install -e \".[bench]\" builds it): "
            "llama.cpp column skipped")
        sides = [s for s in sides if s != "llama.cpp"]
    meta = {"threads": args.threads, "isa": ops.get_isa(), "numpy": np.__version__,
            "torch": torch.__version__,
            "llama_cpp": getattr(llama_cpp, "__version__", None) if llama_cpp else None,
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "quick": quick,
            "repeats": repeats, "plan": {**PLAN, "quant_head": args.quant_head}, "llama_ubatch": args.llama_ubatch,
            "llama_flash_attn": args.llama_flash_attn,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    peak = None
    if "vnni" in ops.get_isa():
        peak = max(ops._C._peak_int8_gops(args.threads, 0.15)[0] for _ in range(3))
        meta["peak_gops"] = peak
    meta["read_gbs"] = read_bandwidth(args.threads)
    results = []
    t_start = time.perf_counter()
    for key in models:
        res = run_case(key, args, llama_cpp, repeats, seqlens, ctx, n_decode, sides, peak)
        gc.collect()
        if res is not None:
            results.append(res)
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["seconds"] = time.perf_counter() - t_start
    report(results, meta, sides)
    print(f"\n(total {meta['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                              default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
