"""LLaMA-family causal LM in NumPy: config, weights, forward/backward, KV cache, generation, load.

Computes what transformers' LlamaForCausalLM computes (float32), from HF checkpoints, without
torch. The per-layer math lives in sasq.layers as forward/backward pairs; this file wires them
into decoder layers and calls an optional activation hook at fixed sites (SITES), which is
where quantizers sit:

    per decoder layer i:  "attn_in"  (B, T, C)        RMSNorm output feeding q/k/v
                          "k_cache"  (B, T, KVH*hd)   keys after RoPE
                          "v_cache"  (B, T, KVH*hd)   values
                          "o_in"     (B, T, H*hd)     attention output feeding o_proj
                          "mlp_in"   (B, T, C)        RMSNorm output feeding gate/up
                          "down_in"  (B, T, I)        silu(gate) * up feeding down_proj
    layer = num_hidden_layers: "head_in" (B, T, C)    final RMSNorm output feeding lm_head

The hook protocol is declared once, below (ActivationHook). backward() only ever computes
activation gradients; a hook's parameter gradients go into a dict the caller owns and zeroes.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sasq import layers as L
from sasq.qtensor import linear
from sasq.sampling import generate


def online_hadamard(d, small=None):
    from sasq.rotate import online_hadamard as f
    return f(d, small)


def online_hadamard_backward(g, small=None):
    from sasq.rotate import online_hadamard_backward as f
    return f(g, small)


def head_hadamard(x, transpose=False):
    """R3: x (..., hd) -> x H^T per head (x H with transpose, its backward); sasq.rotate."""
    from sasq.rotate import online_hadamard, online_hadamard_backward
    return (online_hadamard_backward if transpose else online_hadamard)(x)


SITES = ("attn_in", "k_cache", "v_cache", "o_in", "mlp_in", "down_in", "head_in")
LAYER_SITES = SITES[:-1]


# --------------------------------------------------------------------------- config

@dataclass
class LlamaConfig:
    """The subset of a HF LlamaConfig that defines the computation (HF defaults).

    Every field is checked on construction (ValueError naming the field): sizes are positive
    integers, rope_theta/rms_norm_eps finite real numbers, token ids non-negative integers.
    max_position_embeddings is at most MAX_POSITIONS = 2**20: LlamaModel builds its RoPE tables
    for max_position_embeddings positions up front (2**20 positions x head_dim 128 is 512 MiB in
    float32), so a larger claim is refused at load instead of failing at the first forward with
    a MemoryError (a claimed context of 2**28 would need tens of GiB)."""
    MAX_POSITIONS = 1 << 20  # not a field (no annotation)

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", factor, ...}
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or v <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {v!r}")
            setattr(self, name, int(v))

        for name in ("hidden_size", "num_attention_heads"):  # before deriving head_dim from them
            positive_int(name)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            positive_int(name)
        if self.max_position_embeddings > self.MAX_POSITIONS:
            raise ValueError(f"config field max_position_embeddings={self.max_position_embeddings} "
                             f"exceeds {self.MAX_POSITIONS} (the RoPE tables are built for every "
                             f"position up front)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config field num_key_value_heads={self.num_key_value_heads} must "
                             f"divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config field head_dim={self.head_dim} must be even for RoPE")
        self.rms_norm_eps = _config_real("rms_norm_eps", self.rms_norm_eps, lo=0.0)
        self.rope_theta = _config_real("rope_theta", self.rope_theta, lo=0.0, lo_open=True)
        if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
            raise ValueError(f"config field tie_word_embeddings must be true or false, got "
                             f"{self.tie_word_embeddings!r}")
        self.tie_word_embeddings = bool(self.tie_word_embeddings)
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            if v is None:
                continue
            if not ids or not all(isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_))
                                  and i >= 0 for i in ids):
                raise ValueError(f"config field {name} must be a non-negative integer"
                                 f"{' (or a list of them)' if name == 'eos_token_id' else ''} or "
                                 f"null, got {v!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def n_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a HF config.json dict (old rope_theta/rope_scaling or new rope_parameters form).
        Any malformed value (wrong JSON type, non-finite, out of range) is a ValueError naming
        the field."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        arch = d.get("architectures")
        if arch is not None and (not isinstance(arch, (list, tuple)) or list(arch) != ["LlamaForCausalLM"]):
            raise ValueError(f"config field architectures={arch!r} is not supported "
                             "(only LlamaForCausalLM)")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config field model_type={d['model_type']!r} is not supported "
                             "(only llama)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act={act!r} is not supported (only silu)")
        for name in ("attention_bias", "mlp_bias"):
            if d.get(name, False):
                raise ValueError(f"config field {name}=true is not supported (no biases)")
        rope_theta = d.get("rope_theta")
        scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        if params is not None:  # transformers >= 5
            if not isinstance(params, dict):
                raise ValueError(f"config field rope_parameters must be an object, got {params!r}")
            params = dict(params)
            if rope_theta is None:
                rope_theta = params.get("rope_theta")
            if scaling is None:
                scaling = params
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ValueError(f"config field rope_scaling must be an object or null, got "
                                 f"{scaling!r}")
            prf = _config_real("partial_rotary_factor", scaling.get("partial_rotary_factor", 1.0))
            if prf != 1.0:
                raise ValueError("config field partial_rotary_factor != 1 is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_scaling"}
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        return cls(**kw, rope_theta=10000.0 if rope_theta is None else rope_theta,
                   rope_scaling=scaling)

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        """From a config.json; every problem is a one-line ValueError starting with the path."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise ValueError(f"{path}: cannot read config (JSON nests too deeply)") from None
        except (OSError, ValueError) as e:  # JSON, UTF-8 and int-digit-limit errors are ValueErrors
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: cannot read config ({why})") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        """A HF-style config.json dict (LlamaForCausalLM)."""
        d = dataclasses.asdict(self)
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, mlp_bias=False, torch_dtype="float32")
        return d


def _config_real(name, v, lo=None, lo_open=False) -> float:
    """A config number: int or float (not bool, str, list...), finite, >= lo (> lo if lo_open);
    ValueError naming the field otherwise."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"config field {name} must be a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond float64
        f = float("inf")
    if not np.isfinite(f) or (lo is not None and (f <= lo if lo_open else f < lo)):
        bound = "" if lo is None else f" and {'>' if lo_open else '>='} {lo:g}"
        raise ValueError(f"config field {name} must be finite{bound}, got {v!r}")
    return f


def _check_rope_scaling(s):
    """None for plain RoPE, else a normalised llama3 dict; anything else is a ValueError."""
    if s is None:
        return None
    if not isinstance(s, dict):
        raise ValueError(f"config field rope_scaling must be a dict or null, got {s!r}")
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"config field rope_scaling type {kind!r} is not supported "
                         "(only 'default' and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in s]
    if missing:
        raise ValueError(f"config field rope_scaling (llama3) lacks {', '.join(missing)}")
    # every one divides something in layers.rope_inv_freq: finite and > 0
    out = {"rope_type": "llama3",
           **{k: _config_real(f"rope_scaling.{k}", s[k], lo=0.0, lo_open=True) for k in keys}}
    ctx = out["original_max_position_embeddings"]
    if ctx != int(ctx):
        raise ValueError(f"config field rope_scaling.original_max_position_embeddings must be "
                         f"an integer, got {s['original_max_position_embeddings']!r}")
    out["original_max_position_embeddings"] = int(ctx)
    if out["high_freq_factor"] == out["low_freq_factor"]:
        raise ValueError("config field rope_scaling: high_freq_factor must differ from "
                         "low_freq_factor")
    return out


# --------------------------------------------------------------------------- weights

@dataclass
class LayerWeights:
    """One decoder layer, HF orientation (out, in): y = x @ W.T."""
    q_proj: np.ndarray  # (H*hd, C)
    k_proj: np.ndarray  # (KVH*hd, C)
    v_proj: np.ndarray  # (KVH*hd, C)
    o_proj: np.ndarray  # (C, H*hd)
    gate_proj: np.ndarray  # (I, C)
    up_proj: np.ndarray  # (I, C)
    down_proj: np.ndarray  # (C, I)
    input_layernorm: np.ndarray  # (C,)
    post_attention_layernorm: np.ndarray  # (C,)

    def astype(self, dtype) -> "LayerWeights":
        return LayerWeights(**{f.name: np.asarray(getattr(self, f.name), dtype=dtype)
                               for f in dataclasses.fields(self)})


_LAYER_TENSORS = {
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
}


def _layer_shapes(c: LlamaConfig) -> dict:
    C, I, hd = c.hidden_size, c.intermediate_size, c.head_dim
    H, KVH = c.num_attention_heads, c.num_key_value_heads
    return {"q_proj": (H * hd, C), "k_proj": (KVH * hd, C), "v_proj": (KVH * hd, C),
            "o_proj": (C, H * hd), "gate_proj": (I, C), "up_proj": (I, C), "down_proj": (C, I),
            "input_layernorm": (C,), "post_attention_layernorm": (C,)}


# --------------------------------------------------------------------------- hook protocol

class ActivationHook(abc.ABC):
    """What LlamaModel calls at every activation site (SITES) when a hook is given.

    forward(layer, site, x, pos, keep) -> (x', ctx)
        x (B, T, C) holds positions pos .. pos+T-1 of every sequence (pos > 0 when a KV cache
        is extended); x' has the same shape and dtype. With keep=True the model keeps `ctx` on
        its tape and hands it back to backward; with keep=False ctx is dropped (return None).
    backward(layer, site, grad, ctx, grads) -> grad_x
        grad at x' -> grad at x. Parameter gradients are *added* into `grads` (a dict owned and
        zeroed by the caller, keyed by the hook's parameter names); nothing is stored on the hook.
    """

    @abc.abstractmethod
    def forward(self, layer: int, site: str, x: np.ndarray, pos: int, keep: bool):
        ...

    def backward(self, layer: int, site: str, grad: np.ndarray, ctx, grads: dict):
        return grad


class Observer(ActivationHook):
    """A hook that looks and never changes anything: override observe(layer, site, x, pos)."""

    def observe(self, layer: int, site: str, x: np.ndarray, pos: int) -> None:
        pass

    def forward(self, layer, site, x, pos, keep):
        self.observe(layer, site, x, pos)
        return x, None


def _check_hook(hook):
    if hook is not None and not isinstance(hook, ActivationHook):
        raise TypeError(f"hook must be a sasq.model.ActivationHook, got {type(hook).__name__}")
    return hook


# --------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys (after RoPE and the "k_cache" hook) and values per layer, (B, KVH, capacity, hd),
    grown by doubling. `length` positions are filled; forward(ids, cache=...) appends."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k, v):
        """k, v (B, KVH, Tn, hd) for positions length..length+Tn -> full views (B, KVH, Tk, hd)."""
        t0, tn = self.length, k.shape[2]
        buf = self.k[layer]
        if buf is None or buf.shape[2] < t0 + tn or buf.shape[:2] != k.shape[:2] \
                or buf.dtype != k.dtype:
            if buf is not None and (buf.shape[:2] != k.shape[:2] or buf.dtype != k.dtype):
                raise ValueError("KVCache: batch/heads/dtype differ from the cached ones")
            cap = max(16, 2 * (t0 + tn))
            nk = np.empty(k.shape[:2] + (cap,) + k.shape[3:], dtype=k.dtype)
            nv = np.empty_like(nk)
            if buf is not None:
                nk[:, :, :t0] = self.k[layer][:, :, :t0]
                nv[:, :, :t0] = self.v[layer][:, :, :t0]
            self.k[layer], self.v[layer] = nk, nv
        self.k[layer][:, :, t0:t0 + tn] = k
        self.v[layer][:, :, t0:t0 + tn] = v
        return self.k[layer][:, :, :t0 + tn], self.v[layer][:, :, :t0 + tn]

    def reset(self):
        self.length = 0


# --------------------------------------------------------------------------- tape

@dataclass
class Tape:
    """What backward needs from forward_tape. logits (B, T, V); hidden (B, T, C) is the
    "head_in" activation after the hook (logits = hidden @ lm_head.T). The tape owns the hook's
    per-site contexts (in each layer's dict under "hook", and head_ctx). backward consumes the
    tape layer by layer (peak memory falls as it goes), so it runs once per tape."""
    logits: np.ndarray | None
    hidden: np.ndarray
    layers: list  # per layer: a cache dict, or the layer input (B, T, C) when recompute
    final: tuple  # RMSNorm cache of the final norm
    hook: object
    recompute: bool
    T: int = 0
    head_ctx: object = None


# --------------------------------------------------------------------------- model

class LlamaModel:
    """Frozen LLaMA weights plus forward, backward and generation."""

    def __init__(self, config: LlamaConfig, embed_tokens, layers, norm, lm_head, tokenizer=None,
                 online_down: bool = False, online_qk: bool = False, online_down_small=None):
        self.config = config
        self.embed_tokens = embed_tokens  # (V, C)
        self.layers: list[LayerWeights] = list(layers)
        self.norm = norm  # (C,)
        self.lm_head = lm_head  # (V, C); the same array as embed_tokens when tied
        self.tokenizer = tokenizer
        # A rotated model (sasq.rotate) applies an orthonormal Hadamard to the SwiGLU output before
        # the "down_in" site (its transpose is fused into down_proj): part of its function.
        self.online_down = online_down
        self.online_down_small = online_down_small  # (m, m) factor when I has no Hadamard
        # R3 (sasq.rotate, rotate_qk): queries and keys after RoPE rotated per head by the same
        # orthonormal Hadamard; q.k is unchanged, the "k_cache" site sees rotated keys.
        self.online_qk = online_qk
        self.int8_weights = None  # (layer, matrix) -> (PackedWeights, scales): see _linear
        self._rope = {}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_config_and_tensors(cls, config, tensors: dict, tokenizer=None) -> "LlamaModel":
        """From HF tensor names (model.layers.{i}.self_attn.q_proj.weight, ...)."""
        if not isinstance(config, LlamaConfig):
            config = LlamaConfig.from_dict(config)
        c = config

        def get(name, shape):
            if name not in tensors:
                raise ValueError(f"missing tensor {name}")
            t = np.asarray(tensors[name])
            if t.shape != tuple(shape):
                raise ValueError(f"tensor {name} has shape {t.shape}, config needs {tuple(shape)}")
            if not np.issubdtype(t.dtype, np.floating):
                raise ValueError(f"tensor {name} has dtype {t.dtype}, expected a float type")
            return np.asarray(t, dtype=np.float32)

        V, C = c.vocab_size, c.hidden_size
        embed = get("model.embed_tokens.weight", (V, C))
        shapes = _layer_shapes(c)
        layers = []
        for i in range(c.num_hidden_layers):
            layers.append(LayerWeights(**{
                f: get(f"model.layers.{i}.{n}", shapes[f]) for f, n in _LAYER_TENSORS.items()}))
        norm = get("model.norm.weight", (C,))
        if c.tie_word_embeddings:
            lm_head = embed  # HF ties even when a copy of lm_head.weight was saved
        else:
            lm_head = get("lm_head.weight", (V, C))
        return cls(c, embed, layers, norm, lm_head, tokenizer)

    @property
    def dtype(self):
        return self.embed_tokens.dtype

    def astype(self, dtype) -> "LlamaModel":
        """A new model with every weight in dtype (e.g. float64 for gradient tests)."""
        embed = np.asarray(self.embed_tokens, dtype=dtype)
        lm_head = embed if self.lm_head is self.embed_tokens else np.asarray(self.lm_head, dtype)
        return LlamaModel(self.config, embed, [lw.astype(dtype) for lw in self.layers],
                          np.asarray(self.norm, dtype=dtype), lm_head, self.tokenizer,
                          self.online_down, self.online_qk, self.online_down_small)

    def copy_with(self, **fields) -> "LlamaModel":
        """Shallow copy with some attributes replaced (config, embed_tokens, layers, norm,
        lm_head, tokenizer, online_down, online_qk, online_down_small)."""
        allowed = {"config", "embed_tokens", "layers", "norm", "lm_head", "tokenizer", "online_down",
                   "online_qk", "online_down_small"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"copy_with: unknown fields {sorted(bad)}")
        m = copy.copy(self)
        m._rope = {} if "config" in fields else dict(self._rope)
        for k, v in fields.items():
            setattr(m, k, list(v) if k == "layers" else v)
        return m

    def __repr__(self):
        c = self.config
        return (f"LlamaModel(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_attention_heads}/{c.num_key_value_heads}, vocab={c.vocab_size}, "
                f"dtype={self.dtype})")

    # ---------------------------------------------------------------- helpers

    def _rope_tables(self, start: int, t: int):
        """cos, sin (t, hd/2) for positions start..start+t, cached per dtype, grown by doubling."""
        dt = np.dtype(self.dtype)
        tab = self._rope.get(dt)
        if tab is None or tab[0].shape[0] < start + t:
            c = self.config
            n = max(start + t, 2 * (tab[0].shape[0] if tab else 0), c.max_position_embeddings)
            inv = L.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, dt)
            tab = L.rope_tables(inv, np.arange(n))
            self._rope[dt] = tab
        return tab[0][start:start + t], tab[1][start:start + t]

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array (B, T), got {ids.dtype} {ids.shape}")
        if ids.shape[1] == 0:
            raise ValueError("ids must hold at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    # ---------------------------------------------------------------- one decoder layer

    def _linear(self, i, name, x, w):
        """x @ w.T, through the INT8 GEMM when this model has packed int8 weights (a static
        deployable QuantModel's deploy; sasq.qtensor) and x carries its codes."""
        packed = self.int8_weights.get((i, name)) if self.int8_weights else None
        return linear(x, w, packed) if packed is not None else L.linear_forward(np.asarray(x), w)

    def _layer_forward(self, i, x, cos, sin, hook, cache=None, keep=False, pos=0):
        """x (B, T, C) at positions pos.. -> (B, T, C); returns (x_out, saved dict or None)."""
        c, w = self.config, self.layers[i]
        B, T, C = x.shape
        H, KVH, G, hd = c.num_attention_heads, c.num_key_value_heads, c.n_groups, c.head_dim
        ctx = {}  # the hook's per-site contexts (kept only when keep)

        def at(site, a):
            if hook is None:
                return a
            a, ctx[site] = hook.forward(i, site, a, pos, keep)
            return a

        # attention block
        h, n1 = L.rmsnorm_forward(x, w.input_layernorm, c.rms_norm_eps)  # (B, T, C)
        h = at("attn_in", h)
        q = self._linear(i, "q_proj", h, w.q_proj).reshape(B, T, H, hd)
        k = self._linear(i, "k_proj", h, w.k_proj).reshape(B, T, KVH, hd)
        v = self._linear(i, "v_proj", h, w.v_proj)  # (B, T, KVH*hd)
        del h
        q = L.rope_forward(q, cos, sin)  # (B, T, H, hd)
        k = L.rope_forward(k, cos, sin)  # (B, T, KVH, hd)
        if self.online_qk:
            q, k = head_hadamard(q), head_hadamard(k)  # R3: q.k unchanged
        k = at("k_cache", k.reshape(B, T, KVH * hd))
        v = at("v_cache", v)
        qh = np.ascontiguousarray(q.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4))
        kh = np.ascontiguousarray(k.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3))  # (B,KVH,T,hd)
        vh = np.ascontiguousarray(v.reshape(B, T, KVH, hd).transpose(0, 2, 1, 3))
        del q, k, v
        if cache is not None:
            kh, vh = cache.append(i, kh, vh)  # (B, KVH, Tk, hd)
        att, lse = L.attention_forward(qh, kh, vh)  # (B, KVH, G, T, hd), (B, KVH, G, T)
        o = np.ascontiguousarray(att.transpose(0, 3, 1, 2, 4)).reshape(B, T, H * hd)
        del att
        o = at("o_in", o)
        x_mid = x + self._linear(i, "o_proj", o, w.o_proj)  # (B, T, C)
        del o

        # MLP block
        h2, n2 = L.rmsnorm_forward(x_mid, w.post_attention_layernorm, c.rms_norm_eps)
        h2 = at("mlp_in", h2)
        gate = self._linear(i, "gate_proj", h2, w.gate_proj)  # (B, T, I)
        up = self._linear(i, "up_proj", h2, w.up_proj)  # (B, T, I)
        del h2
        d = L.swiglu_forward(gate, up)  # (B, T, I)
        if not keep:
            del gate, up
        if self.online_down:
            d = online_hadamard(d, self.online_down_small)  # d H^T (sasq.rotate); down_proj holds W H^T
        d = at("down_in", d)
        x_out = self._linear(i, "down_proj", d, w.down_proj)
        del d
        x_out += x_mid
        if not keep:
            return x_out, None
        saved = dict(n1=n1, qh=qh, kh=kh, vh=vh, lse=lse, n2=n2, gate=gate, up=up, hook=ctx)
        return x_out, saved

    def _layer_backward(self, i, dx, s, cos, sin, hook, grads):
        """dx (B, T, C) at the layer output -> dx at the layer input, using saved dict s."""
        c, w = self.config, self.layers[i]
        B, T, C = dx.shape
        H, KVH, G, hd = c.num_attention_heads, c.num_key_value_heads, c.n_groups, c.head_dim

        def at(site, g):
            return g if hook is None else hook.backward(i, site, g, s["hook"].get(site), grads)

        # MLP block (residual: dx flows to x_mid unchanged, plus the branch)
        dd = L.linear_backward(dx, w.down_proj)  # (B, T, I)
        dd = at("down_in", dd)
        if self.online_down:
            dd = online_hadamard_backward(dd, self.online_down_small)
        dgate, dup = L.swiglu_backward(dd, s["gate"], s["up"])
        del dd
        dh2 = L.linear_backward(dgate, w.gate_proj)  # (B, T, C)
        dh2 += L.linear_backward(dup, w.up_proj)
        del dgate, dup
        dh2 = at("mlp_in", dh2)
        dx_mid = dx + L.rmsnorm_backward(dh2, s["n2"], w.post_attention_layernorm)

        # attention block
        do = L.linear_backward(dx_mid, w.o_proj)  # (B, T, H*hd)
        do = at("o_in", do)
        do_h = np.ascontiguousarray(do.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4))
        dqh, dkh, dvh = L.attention_backward(do_h, s["qh"], s["kh"], s["vh"], s["lse"])
        del do_h
        dq = np.ascontiguousarray(dqh.transpose(0, 3, 1, 2, 4)).reshape(B, T, H, hd)
        dk = np.ascontiguousarray(dkh.transpose(0, 2, 1, 3)).reshape(B, T, KVH * hd)
        dv = np.ascontiguousarray(dvh.transpose(0, 2, 1, 3)).reshape(B, T, KVH * hd)
        dv = at("v_cache", dv)
        dk = at("k_cache", dk)
        if self.online_qk:
            dq = head_hadamard(dq, transpose=True)
            dk = head_hadamard(dk.reshape(B, T, KVH, hd), transpose=True).reshape(B, T, KVH * hd)
        dq = L.rope_backward(dq, cos, sin).reshape(B, T, H * hd)
        dk = L.rope_backward(dk.reshape(B, T, KVH, hd), cos, sin).reshape(B, T, KVH * hd)
        dh = L.linear_backward(dq, w.q_proj)  # (B, T, C)
        dh += L.linear_backward(dk, w.k_proj)
        dh += L.linear_backward(dv, w.v_proj)
        dh = at("attn_in", dh)
        dx_mid += L.rmsnorm_backward(dh, s["n1"], w.input_layernorm)
        return dx_mid

    # ---------------------------------------------------------------- forward

    def forward(self, ids, hook=None, cache: KVCache | None = None, return_hidden=False):
        """ids (B, T) -> logits (B, T, V), or the final normed hidden (B, T, C) after the
        "head_in" hook when return_hidden. With a cache, ids are the next T positions."""
        ids = self._check_ids(ids)
        hook = _check_hook(hook)
        B, T = ids.shape
        start = cache.length if cache is not None else 0
        cos, sin = self._rope_tables(start, T)
        x = self.embed_tokens[ids]  # (B, T, C)
        for i in range(self.config.num_hidden_layers):
            x, _ = self._layer_forward(i, x, cos, sin, hook, cache, pos=start)
        if cache is not None:
            cache.length += T
        h, _ = L.rmsnorm_forward(x, self.norm, self.config.rms_norm_eps)  # (B, T, C)
        if hook is not None:
            h, _ = hook.forward(self.config.num_hidden_layers, "head_in", h, start, False)
        if return_hidden:
            return h
        return L.linear_forward(h, self.lm_head)  # (B, T, V)

    __call__ = forward

    def forward_tape(self, ids, hook=None, recompute=False, compute_logits=True) -> Tape:
        """Forward that keeps what backward needs. recompute=True keeps only each decoder
        layer's input and re-runs the layer (hook included) just before its backward.
        compute_logits=False leaves tape.logits None (callers chunk hidden @ lm_head.T)."""
        ids = self._check_ids(ids)
        hook = _check_hook(hook)
        B, T = ids.shape
        cos, sin = self._rope_tables(0, T)
        x = self.embed_tokens[ids]  # (B, T, C)
        saved = []
        for i in range(self.config.num_hidden_layers):
            x_in = x
            x, s = self._layer_forward(i, x, cos, sin, hook, keep=not recompute)
            saved.append(x_in if recompute else s)
        h, fcache = L.rmsnorm_forward(x, self.norm, self.config.rms_norm_eps)
        head_ctx = None
        if hook is not None:
            h, head_ctx = hook.forward(self.config.num_hidden_layers, "head_in", h, 0, True)
        logits = L.linear_forward(h, self.lm_head) if compute_logits else None
        return Tape(logits=logits, hidden=h, layers=saved, final=fcache, hook=hook,
                    recompute=recompute, T=T, head_ctx=head_ctx)

    def backward(self, tape: Tape, dlogits=None, *, dhidden=None, grads=None):
        """dlogits (B, T, V) -> d_embed (B, T, C), the gradient at the embedding output.

        Alternatively dhidden (B, T, C): the gradient at the "head_in" hook output (for callers
        that computed the loss from tape.hidden in chunks). Activation gradients only; the
        hook's parameter gradients are added into `grads` (the caller's dict)."""
        if (dlogits is None) == (dhidden is None):
            raise ValueError("backward needs exactly one of dlogits and dhidden")
        hook, nl = tape.hook, self.config.num_hidden_layers
        if dhidden is None:
            if dlogits.shape[:-1] != tape.hidden.shape[:-1]:
                raise ValueError(f"dlogits shape {dlogits.shape} does not match the tape")
            dhidden = L.linear_backward(dlogits.astype(self.dtype, copy=False), self.lm_head)
        if tape.layers and tape.layers[-1] is None:
            raise RuntimeError("this tape was already used by backward (it frees as it goes)")
        grads = {} if grads is None else grads
        if hook is not None:
            dhidden = hook.backward(nl, "head_in", dhidden, tape.head_ctx, grads)
        dx = L.rmsnorm_backward(dhidden, tape.final, self.norm)  # (B, T, C)
        cos, sin = self._rope_tables(0, tape.T)
        for i in reversed(range(nl)):
            s = tape.layers[i]
            tape.layers[i] = None  # the contexts are consumed: backward runs once per tape
            if tape.recompute:
                _, s = self._layer_forward(i, s, cos, sin, hook, keep=True)
            dx = self._layer_backward(i, dx, s, cos, sin, hook, grads)
            del s
        return dx

    # ---------------------------------------------------------------- generation

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=None, hook=None,
                 top_k=None, eos_id=None) -> list[int]:
        """Continue prompt_ids (1-D) by max_new_tokens tokens with a KV cache; returns only the
        new tokens. temperature 0: greedy (argmax); > 0: sampling from softmax(logits / t),
        optionally among the top_k, reproducible with seed. Stops early after eos_id if given."""
        cache = KVCache(self.config.num_hidden_layers)
        return generate(lambda ids: self.forward(ids, hook=hook, cache=cache, return_hidden=True),
                        lambda h: h @ self.lm_head.T, prompt_ids, max_new_tokens, temperature,
                        seed, top_k, eos_id)


def random_model(config, seed=0, std=None, dtype=np.float32) -> LlamaModel:
    """A randomly initialised model (tests, benchmarks): weights ~ N(0, std^2) with std
    1/sqrt(fan_in) by default, norm gains ~ 1 + N(0, 0.1^2)."""
    if not isinstance(config, LlamaConfig):
        config = LlamaConfig.from_dict(config)
    rng = np.random.default_rng(seed)

    def w(shape):
        s = std if std is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * s).astype(dtype)

    def gain(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(dtype)

    shapes = _layer_shapes(config)
    layers = [LayerWeights(**{f: gain(sh[0]) if len(sh) == 1 else w(sh)
                               for f, sh in shapes.items()})
              for _ in range(config.num_hidden_layers)]
    V, C = config.vocab_size, config.hidden_size
    embed = w((V, C))
    lm_head = embed if config.tie_word_embeddings else w((V, C))
    return LlamaModel(config, embed, layers, gain(C), lm_head)
