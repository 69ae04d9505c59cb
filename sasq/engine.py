"""StaticInt8Model: a truly static integer LLaMA, prefill and decode.

    m = sasq.StaticInt8Model.from_pretrained("exported_dir")     # written by sasq.export
    logits = m.forward(ids)                                       # (B, T, V), like LlamaModel
    new_tokens = m.generate(prompt_ids, 100)

Every linear runs as an INT8 GEMM (sasq.ops.linear_int8 on weights packed once at load): its
input is rounded to int8 codes with a scale fixed before deployment, the product is exact in
int32, and the store multiplies by (activation scale x weight scale). No absmax or any other
data-dependent range is computed at run time, in prefill or in decode (`dynamic=True` swaps in
per-token scales computed at run time, the baseline this engine is compared with).

The layer loop is written out (llama2.c's runq.c is the model): every quantization point is a
visible line. Static scales per site come from the export: one per-tensor scale in the domain the
input arrives in (1 for a folded per-channel site: its factors live in the norms and producer
rows), own scales for the first `sink` positions of every sequence (positions are counted by the
KV cache, so decode uses them too), an optional truncation threshold fused into the quantizer,
and an online Hadamard before down_proj for rotated models (fused with the quantizer when no sink
row is in the call). RMSNorm, RoPE, attention and SwiGLU run in float32 (sasq.layers); a quantized KV
cache holds the float32 values of its static grid (codes x scale). This module imports ops, layers,
io and the sampler, never the training code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sasq import _C, grid, layers as L, ops
from sasq.blas import blas_threads_for
from sasq.io.safetensors import load_safetensors
from sasq.kvquant import fake_quant_asym_groups
from sasq.model import KVCache, LlamaConfig
from sasq.sampling import generate

ENGINE_FILE = "sasq_engine.json"
EXT_FILE = "sasq_extensions.safetensors"
FORMAT_VERSION = 2   # 2 added online_qk (R3), online_down_small (orthogonal R4), dynamic_kv
READABLE_FORMATS = (1, 2)
_LINEARS = {"qkv": ("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            "o": ("o_in", ("self_attn.o_proj",)),
            "gate_up": ("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
            "down": ("down_in", ("mlp.down_proj",))}


# --------------------------------------------------------------------------- one quantizer

@dataclass
class Quantizer:
    """A site's run-time quantization: x (..., T, C) at positions pos.. -> (int8 codes, scale:
    a float, or one float32 per row when sink rows or dynamic scales are involved)."""
    bits: int
    kind: str = "static"                 # "static" | "dynamic"
    scale: float | np.ndarray = 1.0      # per-tensor (or per KV channel for v_cache)
    sink: np.ndarray | None = None       # (k,) per-position scales
    threshold: np.ndarray | None = None  # truncation t (applied domain), ceiling = scale * qmax
    clip: float = 1.0                    # dynamic: clip ratio
    hadamard: bool = False               # online Hadamard before quantizing (rotated down_in)
    group: int = 0                       # "dynamic_kv": channels per asymmetric group (head_dim)
    small: np.ndarray | None = None      # the Hadamard's (m, m) factor when not the default one

    def __post_init__(self):
        # validated once at load (from_pretrained): the per-token path calls the C entry points
        # directly, without the wrappers' argument conversion (decode is bound by call counts)
        self._s = np.atleast_1d(np.asarray(self.scale, np.float32))

    def __call__(self, x: np.ndarray, pos: int):
        T = x.shape[-2]
        if self.hadamard:
            if self.kind == "static" and self.threshold is None and self._n_sink(pos, T) == 0:
                return ops.hadamard_quantize(x, self.scale, self.bits, small=self.small), self.scale
            x = ops.hadamard(x, small=self.small)
        if self.kind == "dynamic":
            codes, s = ops.quantize_dynamic(x, self.bits, self.clip)  # per token, at run time
            return codes, s.reshape(-1)
        if self.threshold is not None:
            codes = ops.truncate_quantize(x, self.threshold, self.scale, self.bits)
        else:
            codes = _C.quantize(np.ascontiguousarray(x), self._s, self.bits)
        n = self._n_sink(pos, T)
        if n == 0:
            return codes, self.scale
        rows = np.full(x.shape[:-1], self.scale, np.float32)  # (..., T)
        for j in range(n):  # sink positions: their own static scale, no truncation
            xj = np.ascontiguousarray(x[..., j, :])
            codes[..., j, :] = ops.quantize(xj, self.sink[pos + j], self.bits)
            rows[..., j] = self.sink[pos + j]
        return codes, rows.reshape(-1)

    def _n_sink(self, pos, T):
        return 0 if self.sink is None else max(0, min(len(self.sink) - pos, T))

    def fake(self, x: np.ndarray, pos: int) -> np.ndarray:
        """The values on the grid, float32 (the KV cache keeps these): scale * codes, the scale
        per tensor or per KV channel, sink positions on their own scale; or, "dynamic_kv", per
        token and head on its own asymmetric grid (sasq.kvquant)."""
        if self.kind == "dynamic_kv":
            return fake_quant_asym_groups(x, self.bits, self.group, self.clip)
        y = ops.fake_quant(np.ascontiguousarray(x), self.scale, self.bits)
        for j in range(self._n_sink(pos, x.shape[-2])):
            y[..., j, :] = ops.fake_quant(np.ascontiguousarray(x[..., j, :]), self.sink[pos + j],
                                          self.bits)
        return y


@dataclass
class Linear:
    """A packed int8 weight (one GEMM for q/k/v and for gate/up: they share the input scale)."""
    packed: object
    scales: np.ndarray   # (N,) float32
    splits: tuple        # output sizes of the fused matrices

    def __post_init__(self):
        ends = np.cumsum(self.splits)
        self._cuts = [(int(a), int(b)) for a, b in zip(np.r_[0, ends[:-1]], ends)]

    def __call__(self, codes, a_scale):
        if isinstance(a_scale, float):
            y = _C.linear_int8(codes, self.packed, a_scale, self.scales)
        else:  # one scale per row (sink positions, per-token scales)
            y = _C.linear_int8_rows(codes, self.packed, np.ascontiguousarray(a_scale, np.float32),
                                    self.scales)
        if len(self._cuts) == 1:
            return (y,)
        return tuple(y[..., a:b] for a, b in self._cuts)


# --------------------------------------------------------------------------- the model

class StaticInt8Model:
    """An exported sasq model run with integer GEMMs (see the module docstring)."""

    def __init__(self, config: LlamaConfig, embed, norms, final_norm, linears, quantizers,
                 lm_head, tokenizer=None, online_down=False, kv=None, label="", dynamic=False,
                 online_qk=False):
        self.config = config
        self.embed_tokens = embed          # (V, C) float32
        self.norms = norms                 # per layer (ln1, ln2)
        self.norm = final_norm
        self.linears = linears             # per layer {"qkv", "o", "gate_up", "down"}: Linear
        self.quant = quantizers            # per layer {site: Quantizer}, plus "head_in" maybe
        self.lm_head = lm_head             # float32 (V, C), or a Linear when quantized
        self.tokenizer = tokenizer
        self.online_down = online_down
        self.online_qk = online_qk             # R3: per-head Hadamard on q and k after RoPE
        self.kv = kv or {}                 # per layer {"k_cache", "v_cache"}: Quantizer
        self.label = label
        self.dynamic = dynamic
        self._rope = {}

    # ---- loading
    @classmethod
    def from_pretrained(cls, path, dynamic: bool = False, dynamic_clip: float = 1.0):
        """Load an exported directory; packs every weight once. dynamic=True replaces every
        static activation scale by per-token scales computed at run time (the baseline)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (not an exported model directory)")
        try:
            cfg_d = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}/config.json: unreadable ({e})") from None
        qc = cfg_d.get("quantization_config") if isinstance(cfg_d, dict) else None
        if not isinstance(qc, dict) or qc.get("quant_method") not in ("compressed-tensors", "sasq"):
            raise ValueError(f"{path}: config.json has no compressed-tensors/sasq "
                             "quantization_config (a float model? use sasq.load)")
        if qc.get("format") != "int-quantized":
            raise ValueError(f"{path}: quantization_config format {qc.get('format')!r} is not "
                             "supported (int-quantized)")
        if cfg_d.get("model_type") == "sasq_static_llama":  # a plan that needs the extensions
            cfg_d = {**cfg_d, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
        try:
            config = LlamaConfig.from_dict(cfg_d)
        except ValueError as e:
            raise ValueError(f"{path}/config.json: {e}") from None
        eng = _read_engine(path, qc, config)
        t = load_safetensors(path / "model.safetensors")
        ext = load_safetensors(path / EXT_FILE) if (path / EXT_FILE).is_file() else {}
        get = _getter(path, t)
        n, C, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
        embed = get("model.embed_tokens.weight", np.float32, (V, C))
        norms, linears, quant, kvq = [], [], [], []
        small = None  # R4's orthogonal factor (an intermediate size without a Hadamard)
        if eng.get("online_down_small") is not None:
            small = ext.get(eng["online_down_small"]) if isinstance(eng["online_down_small"], str) else None
            if small is None or small.ndim != 2 or small.shape[0] != small.shape[1] \
                    or config.intermediate_size % small.shape[0] or not np.all(np.isfinite(small)):
                raise ValueError(f"{path}: online_down_small must name a finite square tensor of "
                                 f"{EXT_FILE} whose order divides {config.intermediate_size}")
            m = small.shape[0]
            p2 = config.intermediate_size // m
            if p2 & (p2 - 1) or not eng.get("online_down"):
                raise ValueError(f"{path}: online_down_small ({m} x {m}) needs online_down and "
                                 f"intermediate size / {m} a power of two")
            if not np.allclose(small @ small.T, m * np.eye(m), atol=1e-4 * m):
                raise ValueError(f"{path}: online_down_small is not orthogonal (S S^T != m I)")
            small = np.ascontiguousarray(small, np.float32)
        elif eng.get("online_down"):
            from sasq.rotate import constructible
            if not constructible(config.intermediate_size):
                raise ValueError(f"{path}: online_down without online_down_small, and the "
                                 f"intermediate size {config.intermediate_size} has no Hadamard")
        for i in range(n):
            pre = f"model.layers.{i}."
            norms.append((get(pre + "input_layernorm.weight", np.float32, (C,)),
                          get(pre + "post_attention_layernorm.weight", np.float32, (C,))))
            lin, qs = {}, {}
            for fused, (site, mods) in _LINEARS.items():
                codes, scales, splits = [], [], []
                for m in mods:
                    w = get(pre + m + ".weight", np.int8, None)
                    s = get(pre + m + ".weight_scale", np.float32, (w.shape[0], 1)).reshape(-1)
                    if w.ndim != 2:
                        raise ValueError(f"{path}: {pre + m}.weight must be 2-D int8, got {w.shape}")
                    codes.append(w)
                    scales.append(s)
                    splits.append(w.shape[0])
                w = np.ascontiguousarray(np.concatenate(codes)) if len(codes) > 1 else codes[0]
                lin[fused] = Linear(ops.pack_weights(np.ascontiguousarray(w)),
                                    np.ascontiguousarray(np.concatenate(scales)), tuple(splits))
                qs[site] = _quantizer(path, eng, ext, f"layers.{i}.{site}", dynamic, dynamic_clip)
            qs["down_in"].hadamard = bool(eng.get("online_down"))
            qs["down_in"].small = small
            linears.append(lin)
            quant.append(qs)
            kvq.append({s: _quantizer(path, eng, ext, f"layers.{i}.{s}", False, 1.0, config.head_dim)
                        for s in ("k_cache", "v_cache") if f"layers.{i}.{s}" in eng["sites"]})
        final = get("model.norm.weight", np.float32, (C,))
        head = t.get("lm_head.weight")
        if head is None:
            raise ValueError(f"{path}: missing tensor lm_head.weight")
        if head.dtype == np.int8:
            s = get("lm_head.weight_scale", np.float32, (V, 1)).reshape(-1)
            lm_head = Linear(ops.pack_weights(np.ascontiguousarray(head)), s, (V,))
            quant.append({"head_in": _quantizer(path, eng, ext, "head_in", dynamic, dynamic_clip)})
        else:
            lm_head = get("lm_head.weight", np.float32, (V, C))
        tok = None
        try:
            from sasq.io.tokenizer import load_tokenizer
            tok = load_tokenizer(path)
        except (ValueError, OSError):
            tok = None
        return cls(config, embed, norms, final, linears, quant, lm_head, tok,
                   online_down=bool(eng.get("online_down")), kv=kvq, label=eng.get("label", ""),
                   online_qk=bool(eng.get("online_qk")),
                   dynamic=dynamic)

    def __repr__(self):
        c = self.config
        return (f"StaticInt8Model({self.label or 'int8'}, layers={c.num_hidden_layers}, "
                f"hidden={c.hidden_size}, {'dynamic' if self.dynamic else 'static'} activations)")

    # ---- helpers
    def _rope_tables(self, start, T):
        tab = self._rope.get("t")
        if tab is None or tab[0].shape[0] < start + T:
            c = self.config
            # grown by doubling like LlamaModel's tables: decoding past max_position_embeddings
            # must not rebuild the table every token
            nmax = max(2 * (start + T) if tab is not None else start + T, c.max_position_embeddings)
            inv = L.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, np.float32)
            tab = L.rope_tables(inv, np.arange(nmax))
            self._rope["t"] = tab
        return tab[0][start:start + T], tab[1][start:start + T]

    # ---- forward
    def forward(self, ids, cache: KVCache | None = None, return_hidden: bool = False):
        """ids (B, T) -> logits (B, T, V) (or the final normed hidden (B, T, C)); with a cache,
        ids are the next T positions."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] == 0:
            raise ValueError(f"ids must be an integer array (B, T), got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        c = self.config
        B, T = ids.shape
        pos = cache.length if cache is not None else 0
        cos, sin = self._rope_tables(pos, T)
        H, KVH, G, hd = c.num_attention_heads, c.num_key_value_heads, c.n_groups, c.head_dim
        eps = c.rms_norm_eps
        x = self.embed_tokens[ids]  # (B, T, C)
        for i in range(c.num_hidden_layers):
            lin, q_, kvq = self.linears[i], self.quant[i], self.kv[i]
            ln1, ln2 = self.norms[i]
            # attention
            h, _ = L.rmsnorm_forward(x, ln1, eps)                     # (B, T, C) float
            a, sa = q_["attn_in"](h, pos)                               # int8 codes, static scale
            q, k, v = lin["qkv"](a, sa)                                 # INT8 GEMM, fused q/k/v
            q = L.rope_forward(q.reshape(B, T, H, hd), cos, sin)
            k = L.rope_forward(k.reshape(B, T, KVH, hd), cos, sin)
            if self.online_qk:                                          # R3 (q.k unchanged)
                q, k = ops.hadamard(q, out=q), ops.hadamard(k, out=k)
            k = k.reshape(B, T, KVH * hd)
            if "k_cache" in kvq:                                        # KV cache on its grid
                k = kvq["k_cache"].fake(k, pos)
                v = kvq["v_cache"].fake(v, pos)
            qh = np.ascontiguousarray(q.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4))
            kh = np.ascontiguousarray(k.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3))
            vh = np.ascontiguousarray(v.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3))
            if cache is not None:
                kh, vh = cache.append(i, kh, vh)
            att, _ = L.attention_forward(qh, kh, vh)                    # float attention
            o = np.ascontiguousarray(att.transpose(0, 3, 1, 2, 4)).reshape(B, T, H * hd)
            a, sa = q_["o_in"](o, pos)
            (y,) = lin["o"](a, sa)                                      # INT8 GEMM
            x = x + y
            # MLP
            h, _ = L.rmsnorm_forward(x, ln2, eps)
            a, sa = q_["mlp_in"](h, pos)
            gate, up = lin["gate_up"](a, sa)                            # INT8 GEMM, fused gate/up
            d = L.swiglu_forward(gate, up)                              # (B, T, I) float
            a, sa = q_["down_in"](d, pos)                               # [Hadamard] [truncate] quantize
            (y,) = lin["down"](a, sa)                                   # INT8 GEMM
            x += y
        if cache is not None:
            cache.length += T
        h, _ = L.rmsnorm_forward(x, self.norm, eps)
        if return_hidden:
            return h
        return self.logits(h, pos)

    __call__ = forward

    def logits(self, h, pos=0):
        """(..., C) final normed hidden -> (..., V) logits (float lm_head, or INT8 when exported
        with lm_head quantized)."""
        if isinstance(self.lm_head, np.ndarray):
            return L.linear_forward(h, self.lm_head)
        a, sa = self.quant[-1]["head_in"](h, pos)
        return self.lm_head(a, sa)[0]

    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, seed=None,
                 top_k=None, eos_id=None) -> list[int]:
        """Continue prompt_ids (1-D) by max_new_tokens tokens with a KV cache (greedy at
        temperature 0); returns the new tokens."""
        cache = KVCache(self.config.num_hidden_layers)

        def step(ids):
            if ids.shape[1] > 1:  # prefill: BLAS may thread the float parts
                return self.forward(ids, cache=cache, return_hidden=True)
            # decode: every float product is small; an idle OpenBLAS pool spinning beside the int8
            # kernels' own threads slowed the next GEMM (6.7 instead of 3.9 ms at 4096 x 22016)
            with blas_threads_for(0):
                return self.forward(ids, cache=cache, return_hidden=True)

        return generate(step, lambda h: self.logits(h, cache.length - 1), prompt_ids,
                        max_new_tokens, temperature, seed, top_k, eos_id)


# --------------------------------------------------------------------------- reading an export

def _getter(path, tensors):
    def get(name, dtype, shape):
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name}")
        a = tensors[name]
        if a.dtype != np.dtype(dtype):
            raise ValueError(f"{path}: tensor {name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        if shape is not None and a.shape != tuple(shape):
            raise ValueError(f"{path}: tensor {name} has shape {a.shape}, expected {tuple(shape)}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: tensor {name} has NaN or inf")
        return np.ascontiguousarray(a)
    return get


def _read_engine(path, qc, config) -> dict:
    """sasq_engine.json, or the per-tensor static plan a plain compressed-tensors directory holds."""
    f = path / ENGINE_FILE
    if f.is_file():
        try:
            eng = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: unreadable ({e})") from None
        if not isinstance(eng, dict) or eng.get("format") not in READABLE_FORMATS:
            raise ValueError(f"{f}: not a sasq engine description of format "
                             f"{' or '.join(map(str, READABLE_FORMATS))}")
        if not isinstance(eng.get("sites"), dict):
            raise ValueError(f"{f}: no 'sites' object")
        for flag in ("online_down", "online_qk"):
            if not isinstance(eng.get(flag, False), bool):
                raise ValueError(f"{f}: {flag} must be true or false, got {eng.get(flag)!r}")
        return eng
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}: quant_method 'sasq' needs {ENGINE_FILE}, which is missing")
    groups = qc.get("config_groups") or {}
    g = next(iter(groups.values()), {}) if isinstance(groups, dict) else {}
    acts = g.get("input_activations") or {}
    if acts.get("dynamic") or acts.get("strategy") != "tensor" or not acts.get("symmetric", False):
        raise ValueError(f"{path}: only static symmetric per-tensor input activations are supported")
    bits = int(acts.get("num_bits", 8))
    sites = {f"layers.{i}.{s}": {"kind": "static", "bits": bits, "scale": "input_scale"}
             for i in range(config.num_hidden_layers) for s in ("attn_in", "o_in", "mlp_in", "down_in")}
    return {"format": FORMAT_VERSION, "sites": sites, "online_down": False, "label": "compressed-tensors"}


_SITE_MODULE = {"attn_in": "self_attn.q_proj", "o_in": "self_attn.o_proj", "mlp_in": "mlp.gate_proj",
                "down_in": "mlp.down_proj"}


def _clip(path, key, c) -> float:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < float(c) <= 1.0:
        raise ValueError(f"{path}: site {key} has clip {c!r} (a number in (0, 1])")
    return float(c)


def _quantizer(path, eng, ext, key, dynamic, clip, head_dim=0) -> Quantizer:
    d = eng["sites"].get(key)
    if d is None:
        raise ValueError(f"{path}: {ENGINE_FILE} has no site {key}")
    try:
        bits = grid.check_bits(d.get("bits"), f"{key} bits")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    kv_site = key.split(".")[-1] in ("k_cache", "v_cache")
    if d.get("kind") == "dynamic" and kv_site:
        raise ValueError(f"{path}: site {key}: a KV cache is static or dynamic_kv, not dynamic")
    if d.get("kind") == "dynamic" or dynamic:
        return Quantizer(bits, "dynamic", clip=_clip(path, key, d.get("clip", clip)))
    if d.get("kind") == "dynamic_kv":
        group = d.get("group")
        if not kv_site or type(group) is not int or group != head_dim:
            raise ValueError(f"{path}: site {key}: a dynamic KV quantizer needs a KV site and group "
                             f"= head_dim {head_dim} (got {group!r})")
        return Quantizer(bits, "dynamic_kv", clip=_clip(path, key, d.get("clip", 1.0)), group=group)
    if d.get("kind") != "static":
        raise ValueError(f"{path}: site {key} has kind {d.get('kind')!r} "
                         "(static, dynamic or dynamic_kv)")

    def arr(name, what):
        if name is None:
            return None
        a = ext.get(name)
        if a is None:
            raise ValueError(f"{path}: {EXT_FILE} lacks {name} ({what} of {key})")
        a = np.ascontiguousarray(a, np.float32)
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{path}: {name} must be finite and > 0")
        return a

    s = d.get("scale")
    if s == "input_scale":  # a plain compressed-tensors directory: the tensor beside the weight
        layer, site = key.split(".")[1], key.split(".")[2]
        t = load_safetensors(path / "model.safetensors")
        name = f"model.layers.{layer}.{_SITE_MODULE[site]}.input_scale"
        if name not in t:
            raise ValueError(f"{path}: missing tensor {name}")
        s = float(np.asarray(t[name]).reshape(-1)[0])
    elif isinstance(s, str):
        s = arr(s, "scale")
    if s is None or not np.all(np.isfinite(s)) or np.any(np.asarray(s) <= 0):
        raise ValueError(f"{path}: site {key} has no finite scale > 0 (got {s!r})")
    if np.ndim(s) == 0:
        s = float(s)
    return Quantizer(bits, "static", scale=s, sink=arr(d.get("sink"), "sink scales"),
                     threshold=arr(d.get("threshold"), "truncation thresholds"))
