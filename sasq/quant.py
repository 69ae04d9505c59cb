"""QuantPlan and quantize(): a fake-quant LlamaModel whose only trainable parameters are the
activation quantization scales (and truncation thresholds).

QuantModel = the frozen FP model + one quantizer per activation site (sasq.quant_hooks) + replaced
weights (dataclasses.replace on LayerWeights; the FP model's arrays are never written).

Weights: round-to-nearest, symmetric, one scale per output channel (absmax/qmax), applied AFTER any
per-channel fold, so that the fake-quant graph computes what the deployed integer model computes.

Per-channel activation scales (DESIGN section 2):
- fold=True ("folded", deployable): the producer divides by s (RMSNorm gain for attn_in / mlp_in /
  head_in, rows of up_proj for down_in, rows of v_proj for o_in) and the consumer weight columns are
  multiplied by s before weight quantization; the site then rounds x/s on the integer grid with one
  per-tensor scale of 1. With GQA the o_in channels of the query heads sharing a KV head come from
  one v_proj row, so their scales are tied: o_in has one scale per KV channel (KVH*head_dim).
  Scale gradient: STE through the weight rounding as a frozen multiplicative residual,
  Q(W s) ~ (Q(W s0)/s0) * s, which makes it identical to per-channel LSQ on the activation
  (see sasq/quant_hooks.py for the derivation).
- fold=False ("fake per-channel", not deployable as an integer GEMM): x -> s*clamp(rint(x/s)).
SmoothQuant (smoothquant_alpha) folds per-channel smoothing factors the same way, then quantizes
per tensor (static, calibrated) or per token (dynamic).

Parameters (`QuantModel.params`, model dtype, float32 for a float32 model):
  "<site>.log_scale" (param_space="log", default) or "<site>.scale" ("linear");
  "<site>.rho" (truncation: t = sigmoid(rho) * c, c = s*qmax; projected into [-RHO_MAX, RHO_MAX]);
  control: "<site>.log_clip"/"<site>.clip" (c) and "<site>.log_gain"/"<site>.gain".
Site keys: "layers.{i}.{attn_in|o_in|mlp_in|down_in|k_cache|v_cache}" and "head_in".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .quant_hooks import SiteHook, SiteState, qmax_of, sigmoid

LINEAR_SITES = ("attn_in", "o_in", "mlp_in", "down_in")
KV_SITES = ("k_cache", "v_cache")
HEAD_SITE = "head_in"
TRUNC_INIT = 0.9      # truncation starts at t = 0.9 c: identity on the bulk
RHO_MAX = 9.0         # sync() projects rho into [-9, 9]: 0 < t < c stays strict in float32
WEIGHT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class QuantPlan:
    """What to quantize and how. Every baseline of the results table is one plan away:

    FP32                   QuantPlan(w_bits=None, a_bits=None)
    static per-tensor      QuantPlan(w_bits=8, a_bits=8)                     (+ calibrate)
    static per-channel     QuantPlan(8, 8, granularity="channel")            (folded, + calibrate)
    dynamic per-token      QuantPlan(8, 8, mode="dynamic")
    SmoothQuant            QuantPlan(8, 8, smoothquant_alpha=0.5[, mode="dynamic"]) (+ calibrate)
    SASQ                   any static plan + calibrate + train_scales; truncation=True for SASQ+trunc
    adapted FP32 control   QuantPlan(w_bits=None, a_bits=None, adapt_control=True, granularity=...)
    """
    w_bits: int | None = 8
    a_bits: int | None = 8
    granularity: str = "tensor"        # "tensor" | "channel" ("token" = dynamic per-token)
    fold: bool = True                  # per-channel folded into weights (deployable)
    mode: str = "static"               # "static" | "dynamic"
    sites: tuple = LINEAR_SITES
    kv_bits: int | None = None         # static KV-cache quantization (per tensor / per channel)
    quant_head: bool = False           # quantize lm_head's input (and weights)
    truncation: bool = False
    smoothquant_alpha: float | None = None
    adapt_control: bool = False
    lsq_grad_scale: bool = False       # multiply scale grads by 1/sqrt(N*qmax) (LSQ)
    param_space: str = "log"           # "log" | "linear"

    def __post_init__(self):
        def bits_ok(name, v):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                                  or not 2 <= v <= 8):
                raise ValueError(f"QuantPlan.{name} must be None or an int in [2, 8], got {v!r}")
        bits_ok("w_bits", self.w_bits)
        bits_ok("a_bits", self.a_bits)
        bits_ok("kv_bits", self.kv_bits)
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"QuantPlan.mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.granularity not in ("tensor", "channel", "token"):
            raise ValueError("QuantPlan.granularity must be 'tensor', 'channel' or 'token', "
                             f"got {self.granularity!r}")
        if self.mode == "dynamic":
            if self.granularity == "channel":
                raise ValueError("mode='dynamic' computes one scale per token at run time; "
                                 "granularity='channel' needs mode='static'")
            object.__setattr__(self, "granularity", "token")
        elif self.granularity == "token":
            raise ValueError("granularity='token' (per-token scales) needs mode='dynamic'")
        if self.param_space not in ("log", "linear"):
            raise ValueError(f"QuantPlan.param_space must be 'log' or 'linear', got {self.param_space!r}")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        for s in sites:
            if s in KV_SITES:
                raise ValueError(f"site {s!r}: KV-cache quantization is switched on with kv_bits")
            if s == HEAD_SITE:
                raise ValueError("site 'head_in': use quant_head=True")
            if s not in LINEAR_SITES:
                raise ValueError(f"unknown site {s!r}; sites are {LINEAR_SITES}")
        if len(set(sites)) != len(sites):
            raise ValueError(f"QuantPlan.sites has duplicates: {sites}")
        object.__setattr__(self, "sites", sites)
        if (self.a_bits is not None or self.adapt_control) and not sites and not self.quant_head:
            raise ValueError("activation quantization asked for but QuantPlan.sites is empty")
        if self.adapt_control:
            if self.a_bits is not None:
                raise ValueError("adapt_control=True is the adapted-FP32 control (no activation "
                                 "rounding): leave a_bits=None")
            if self.mode != "static" or self.smoothquant_alpha is not None:
                raise ValueError("adapt_control=True needs mode='static' and no SmoothQuant")
        if self.smoothquant_alpha is not None:
            a = self.smoothquant_alpha
            if not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"QuantPlan.smoothquant_alpha must be in [0, 1], got {a!r}")
            if self.a_bits is None:
                raise ValueError("SmoothQuant needs a_bits")
            if self.granularity == "channel":
                raise ValueError("SmoothQuant quantizes per tensor (static) or per token (dynamic); "
                                 "granularity='channel' is already per-channel")
        if self.truncation:
            if self.mode != "static" or (self.a_bits is None and not self.adapt_control):
                raise ValueError("truncation needs static activation quantization (a_bits) "
                                 "or adapt_control=True")

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits is not None or self.adapt_control

    @property
    def folded(self) -> bool:
        return (self.granularity == "channel" and self.fold and self.a_bits is not None
                and not self.adapt_control)

    @property
    def label(self) -> str:
        """Short name for results tables, e.g. 'W8A8 static per-channel (folded) +trunc'."""
        if self.adapt_control:
            gran = "per-channel" if self.granularity == "channel" else "per-tensor"
            s = f"adapted FP32 ({gran}{' +trunc' if self.truncation else ''})"
            return s if self.w_bits is None else f"W{self.w_bits} {s}"
        if self.w_bits is None and self.a_bits is None and self.kv_bits is None:
            return "FP32"
        bits = f"W{self.w_bits or 16}A{self.a_bits or 16}"
        if self.kv_bits:
            bits += f"KV{self.kv_bits}"
        if self.a_bits is None:
            if self.kv_bits:
                kvg = "per-channel" if self.granularity == "channel" else "per-tensor"
                return f"{bits} static {kvg} KV only"
            return bits + " weight-only"
        if self.mode == "dynamic":
            how = "dynamic per-token"
        elif self.granularity == "channel":
            how = "static per-channel " + ("(folded)" if self.fold else "(fake per-channel)")
        else:
            how = "static per-tensor"
        if self.smoothquant_alpha is not None:
            how = f"SmoothQuant a={self.smoothquant_alpha:g} " + how
        if self.truncation:
            how += " +trunc"
        return f"{bits} {how}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = list(self.sites)
        return d


# --------------------------------------------------------------------------- weights

def quantize_weight(w: np.ndarray, bits: int):
    """Per-output-channel symmetric RTN: returns (q (out, in) int, scales (out,)) with
    w ~ q * scales[:, None]; scale = absmax(row)/qmax (1 for an all-zero row)."""
    qm = qmax_of(bits)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / qm, 1).astype(w.dtype)
    q = np.clip(np.rint(w / scale[:, None]), -qm, qm)
    return q.astype(np.int8 if bits <= 8 else np.int16), scale


def fake_quant_weight(w: np.ndarray, bits: int | None) -> np.ndarray:
    """Q(w) = scale * clamp(rint(w / scale)) per output row; same numbers as quantize_weight."""
    if bits is None:
        return w
    qm = qmax_of(bits)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / qm, 1).astype(w.dtype)[:, None]
    out = np.divide(w, scale)          # in place from here on: big matrices, every sync
    np.rint(out, out=out)
    np.clip(out, -qm, qm, out=out)
    out *= scale
    return out


def _expand_kv(v: np.ndarray, n_heads: int, n_kv: int, hd: int) -> np.ndarray:
    """(KVH*hd,) per-KV-channel vector -> (H*hd,) over the query heads of each KV head."""
    g = n_heads // n_kv
    return np.broadcast_to(v.reshape(n_kv, 1, hd), (n_kv, g, hd)).reshape(-1)


# --------------------------------------------------------------------------- the model

class QuantModel:
    """Fake-quant view of a frozen LlamaModel (see module docstring)."""

    def __init__(self, model, plan: QuantPlan):
        if not isinstance(plan, QuantPlan):
            raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
        self.model = model
        self.plan = plan
        self.dtype = np.dtype(getattr(model, "dtype", model.embed_tokens.dtype))
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hook = SiteHook(self)
        self.params: dict[str, np.ndarray] = {}
        self.smooth: dict[str, np.ndarray] = {}   # SmoothQuant factors, by site key (fold shape)
        self._build_sites()
        self._log_keys = self.log_param_keys()
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.initialized = not self.needs_calibration
        self._wcache: dict = {}
        self._sync()

    # ---- sites & params -----------------------------------------------------------------
    def _channels(self, site: str) -> int:
        cfg = self.model.config
        return {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size, "head_in": cfg.hidden_size,
                "o_in": self.n_heads * self.head_dim, "down_in": cfg.intermediate_size,
                "k_cache": self.n_kv * self.head_dim, "v_cache": self.n_kv * self.head_dim}[site]

    def _build_sites(self):
        plan, dt = self.plan, self.dtype
        log = plan.param_space == "log"
        pre = "log_" if log else ""
        act_sites = [(i, s) for i in range(self.n_layers) for s in plan.sites]
        if plan.quant_head:
            act_sites.append((self.n_layers, HEAD_SITE))
        if not plan.quantizes_activations:
            act_sites = []
        specs = [(i, s, "act") for i, s in act_sites]
        if plan.kv_bits:
            specs += [(i, s, "kv") for i in range(self.n_layers) for s in KV_SITES]
        for i, site, role in specs:
            key = HEAD_SITE if site == HEAD_SITE else f"layers.{i}.{site}"
            C = self._channels(site)
            if role == "kv":
                kind, bits, per_ch, folded = "static", plan.kv_bits, plan.granularity == "channel", False
            elif plan.adapt_control:
                kind, bits, per_ch, folded = "control", None, plan.granularity == "channel", False
            elif plan.mode == "dynamic":
                kind, bits, per_ch, folded = "dynamic", plan.a_bits, False, False
            else:
                kind, bits, per_ch, folded = "static", plan.a_bits, plan.granularity == "channel", plan.folded
            group = 1
            if site == "o_in" and folded:
                group = self.n_heads // self.n_kv        # GQA tie: one scale per KV channel
            pshape = (C // group,) if per_ch else ()
            st = SiteState(key=key, layer=i, site=site, kind=kind, bits=bits, channels=C,
                           log_space=log, group=group, head_dim=self.head_dim, folded=folded)
            if kind == "static":
                st.scale_key = f"{key}.{pre}scale"
                self.params[st.scale_key] = np.full(pshape, 0.0 if log else 1.0, dt)
            elif kind == "control":
                st.scale_key = f"{key}.{pre}clip"
                st.gain_key = f"{key}.{pre}gain"
                self.params[st.scale_key] = np.full(pshape, 0.0 if log else 1.0, dt)
                self.params[st.gain_key] = np.full(pshape, 0.0 if log else 1.0, dt)
            if plan.truncation and role == "act":
                st.rho_key = f"{key}.rho"
                self.params[st.rho_key] = np.full(pshape, math.log(TRUNC_INIT / (1 - TRUNC_INIT)), dt)
            self.hook.sites[(i, site)] = st
            if plan.smoothquant_alpha is not None and role == "act":
                n = C // (self.n_heads // self.n_kv) if site == "o_in" else C
                self.smooth[key] = np.ones(n, dt)

    @property
    def needs_calibration(self) -> bool:
        return bool(self.params) or bool(self.smooth)

    def log_param_keys(self) -> set[str]:
        """Params stored as logarithms (s = exp(p))."""
        return {k for k in self.params if k.rsplit(".", 1)[1].startswith("log_")}

    def site_states(self):
        return list(self.hook.sites.values())

    def _value(self, key: str) -> np.ndarray:
        p = self.params[key]
        if key not in self._log_keys:
            return p
        with np.errstate(over="ignore"):     # overflow -> inf, reported by _sync
            return np.exp(p)

    def set_site_value(self, key: str, value) -> None:
        """Set a scale/clip/gain param from its *linear* value (handles log space)."""
        p = self.params[key]
        v = np.broadcast_to(np.asarray(value, dtype=self.dtype), p.shape)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{key}: values must be finite and > 0")
        p[...] = np.log(v) if key in self._log_keys else v


    # ---- sync: params -> derived scales and folded/quantized weights ---------------------
    def sync(self) -> None:
        """Call after changing params: re-derives site scales and re-folds/re-quantizes weights."""
        self._sync()
        self.initialized = True

    def _sync(self) -> None:
        for k, p in self.params.items():
            if not np.all(np.isfinite(p)):
                raise ValueError(f"param {k} has non-finite values")
            if k not in self._log_keys and not k.endswith(".rho") and np.any(p <= 0):
                raise ValueError(f"param {k} must be > 0 (linear-space scale)")
            if k.endswith(".rho"):
                np.clip(p, -RHO_MAX, RHO_MAX, out=p)
        folds: dict[str, np.ndarray] = {}   # site key -> divisor of x (fold shape)
        for st in self.hook.sites.values():
            if st.kind == "dynamic":
                continue
            p = self._value(st.scale_key)
            if not np.all(np.isfinite(p)) or np.any(p <= 0):
                raise ValueError(f"param {st.scale_key} gives a scale that is not finite and > 0 "
                                 f"(range {np.min(p):.3g}..{np.max(p):.3g})")
            st.s_exp = st.expand(p).astype(self.dtype)
            if st.folded:
                folds[st.key] = p.astype(self.dtype)
                st.mult = 1.0 / st.s_exp
            else:
                st.mult = np.ones(st.channels, self.dtype)
            st.s_vec = (st.s_exp * st.mult).astype(self.dtype)
            if st.folded:
                st.s_vec = np.ones(st.channels, self.dtype)
            st.sig = (st.expand(sigmoid(self.params[st.rho_key])).astype(self.dtype)
                      if st.rho_key else None)
            st.gain = (st.expand(self._value(st.gain_key)).astype(self.dtype)
                       if st.gain_key else None)
        for key, f in self.smooth.items():
            folds[key] = f
        # v arrives divided by the o_in fold: v_cache's effective scale is s_v / f_o (exact).
        for st in self.hook.sites.values():
            if st.site == "v_cache" and f"layers.{st.layer}.o_in" in folds:
                st.mult = 1.0 / folds[f"layers.{st.layer}.o_in"]
                st.s_vec = (st.s_exp * st.mult).astype(self.dtype)
        self.folds = folds
        self.deploy = self._fold_weights(folds)

    def _fold_weights(self, folds):
        m, plan = self.model, self.plan
        wb = plan.w_bits
        layers = []
        for i, lw in enumerate(m.layers):
            fa = folds.get(f"layers.{i}.attn_in")
            fo = folds.get(f"layers.{i}.o_in")
            fm = folds.get(f"layers.{i}.mlp_in")
            fd = folds.get(f"layers.{i}.down_in")
            sig = tuple(None if f is None else f.tobytes() for f in (fa, fo, fm, fd))
            hit = self._wcache.get(i)
            if hit is not None and hit[0] == sig:
                layers.append(hit[1])
                continue
            w = {n: getattr(lw, n) for n in WEIGHT_NAMES}
            ln1, ln2 = lw.input_layernorm, lw.post_attention_layernorm
            if fa is not None:
                ln1 = ln1 / fa
                for n in ("q_proj", "k_proj", "v_proj"):
                    w[n] = w[n] * fa[None, :]
            if fo is not None:
                w["v_proj"] = w["v_proj"] / fo[:, None]
                w["o_proj"] = w["o_proj"] * _expand_kv(fo, self.n_heads, self.n_kv, self.head_dim)[None, :]
            if fm is not None:
                ln2 = ln2 / fm
                for n in ("gate_proj", "up_proj"):
                    w[n] = w[n] * fm[None, :]
            if fd is not None:
                w["up_proj"] = w["up_proj"] / fd[:, None]
                w["down_proj"] = w["down_proj"] * fd[None, :]
            w = {n: np.ascontiguousarray(fake_quant_weight(a, wb), dtype=self.dtype)
                 for n, a in w.items()}
            new = dataclasses.replace(lw, input_layernorm=np.asarray(ln1, self.dtype),
                                      post_attention_layernorm=np.asarray(ln2, self.dtype), **w)
            self._wcache[i] = (sig, new)
            layers.append(new)
        fields = {"layers": layers}
        fh = folds.get(HEAD_SITE)
        if fh is not None or (plan.quant_head and wb is not None):
            key = ("head", None if fh is None else fh.tobytes())
            hit = self._wcache.get("head")
            if hit is not None and hit[0] == key:
                fields.update(hit[1])
            else:
                norm, head = m.norm, m.lm_head
                if fh is not None:
                    norm = norm / fh
                    head = head * fh[None, :]
                if plan.quant_head:
                    head = fake_quant_weight(head, wb)
                hf = {"norm": np.asarray(norm, self.dtype),
                      "lm_head": np.ascontiguousarray(head, dtype=self.dtype)}
                self._wcache["head"] = (key, hf)
                fields.update(hf)
        return m.copy_with(**fields)

    # ---- LlamaModel-like interface ------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def lm_head(self):
        return self.deploy.lm_head

    @property
    def embed_tokens(self):
        return self.deploy.embed_tokens

    def _check_ready(self):
        if not self.initialized:
            raise RuntimeError(f"QuantModel ({self.plan.label}) is not calibrated: call "
                               "sasq.calibrate(qmodel, token_ids) first, or set qmodel.params / "
                               "load_state_dict and call qmodel.sync()")

    def forward(self, ids, hook=None, cache=None, return_hidden=False):
        if hook is not None:
            raise ValueError("QuantModel.forward uses its own quantizer hook; pass hook=None")
        self._check_ready()
        self.hook.record = False
        return self.deploy.forward(ids, hook=self.hook, cache=cache, return_hidden=return_hidden)

    __call__ = forward

    def forward_tape(self, ids, recompute=False, compute_logits=True):
        self._check_ready()
        self.hook.saved.clear()
        self.hook.record = True
        # recompute=True re-runs each decoder layer (and its hook) before its backward: keep
        # only the head_in input now
        self.hook.record_from = self.n_layers if recompute else 0
        try:
            return self.deploy.forward_tape(ids, hook=self.hook, recompute=recompute,
                                            compute_logits=compute_logits)
        finally:
            self.hook.record = False
            self.hook.record_from = 0

    def backward(self, tape, dlogits=None, *, dhidden=None):
        """Activation backward through the fake-quant model (dlogits (B, T, V), or dhidden at the
        head_in output); accumulates into self.grads. Returns d_embed (B, T, C)."""
        self.hook.record = True   # recompute=True re-runs forward inside backward
        try:
            return self.deploy.backward(tape, dlogits, dhidden=dhidden)
        finally:
            self.hook.record = False
            self.hook.saved.clear()

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=None, hook=None,
                 top_k=None, eos_id=None):
        if hook is not None:
            raise ValueError("QuantModel.generate uses its own quantizer hook; pass hook=None")
        self._check_ready()
        self.hook.record = False
        return self.deploy.generate(prompt_ids, max_new_tokens, temperature=temperature,
                                    seed=seed, hook=self.hook, top_k=top_k, eos_id=eos_id)

    # ---- params bookkeeping -------------------------------------------------------------
    def zero_grad(self) -> None:
        for g in self.grads.values():
            g[...] = 0

    def scales(self) -> dict[str, np.ndarray]:
        """Activation scales s (clip thresholds c for the control) by site key, in the unfolded
        domain: the fake quantizer is s*clamp(rint(x/s)). For folded sites the deployed GEMM sees
        a per-tensor scale of 1 and s is folded into the weights (see `folds`)."""
        out = {}
        for st in self.hook.sites.values():
            if st.scale_key is not None:
                out[st.key] = np.array(self._value(st.scale_key))
        return out

    def deployed_scales(self) -> dict[str, np.ndarray]:
        """Per static site: the scale the deployed integer model applies to the site input as it
        arrives in `deploy` (the folded model): a scalar s for per-tensor sites, 1.0 for folded
        per-channel sites (s lives in `deploy`'s weights and norms), a (channels,) vector for fake
        per-channel sites (not an integer GEMM) and KV sites (v_cache: s_v / o_in fold)."""
        out = {}
        for st in self.hook.sites.values():
            if st.kind != "static":
                continue
            v = st.s_vec
            out[st.key] = np.asarray(v[0] if np.all(v == v[0]) and (
                st.folded or self.params[st.scale_key].ndim == 0) else v.copy())
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {k: v.copy() for k, v in self.params.items()}
        d.update({f"smooth.{k}": v.copy() for k, v in self.smooth.items()})
        return d

    def load_state_dict(self, d: dict) -> None:
        want = set(self.params) | {f"smooth.{k}" for k in self.smooth}
        extra, missing = set(d) - want, want - set(d)
        if extra or missing:
            raise ValueError(f"state dict mismatch for {self.plan.label}: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
        for k in want:
            dst = self.params[k] if k in self.params else self.smooth[k[len("smooth."):]]
            v = np.asarray(d[k])
            if v.shape != dst.shape:
                raise ValueError(f"state dict {k}: shape {v.shape}, expected {dst.shape}")
            dst[...] = v
        self.sync()

    def __repr__(self):
        n = sum(p.size for p in self.params.values())
        return f"QuantModel({self.plan.label}, {len(self.hook.sites)} sites, {n} params)"


def quantize(model, plan: QuantPlan | None = None, **kwargs) -> QuantModel:
    """Fake-quant model for `plan` (or QuantPlan(**kwargs)). Static plans need sasq.calibrate."""
    if plan is None:
        plan = QuantPlan(**kwargs)
    elif kwargs:
        plan = dataclasses.replace(plan, **kwargs)
    return QuantModel(model, plan)
