"""QuantPlan: what to quantize and how (bits, granularity, static/dynamic, sites, KV cache,
truncation, SmoothQuant, the adapted-FP32 control, parameter space). A plan is a frozen value;
every row of a results table is one plan (the catalogue of methods is sasq.methods).

Sites ("where the quantizers sit", DESIGN section 2): per decoder layer attn_in, o_in, mlp_in,
down_in (inputs of the linear layers; q/k/v share attn_in, gate/up share mlp_in), the KV cache
(k_cache, v_cache, switched on by kv_bits) and optionally head_in (lm_head's input, quant_head).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

LINEAR_SITES = ("attn_in", "o_in", "mlp_in", "down_in")
KV_SITES = ("k_cache", "v_cache")
HEAD_SITE = "head_in"
MAX_SINK = 64


def _ratio(name: str, c) -> None:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < float(c) <= 1.0:
        raise ValueError(f"QuantPlan.{name} must be in (0, 1], got {c!r}")


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
    sink-aware             sink_tokens=k: positions 0..k-1 get their own static scales
    QuaRot-style           QuantPlan(4, 4, mode="dynamic", rotate=True, weights="gptq",
                                     dynamic_clip=0.9)  (rotation: sasq.rotate; GPTQ: sasq.gptq)
      + its KV cache       kv_bits=4, kv_mode="dynamic" (per token and head, asymmetric),
                           rotate_qk=True (R3)
    SASQ on a rotated model  QuantPlan(4, 4, rotate=True, sink_tokens=4) + calibrate + train
    """
    w_bits: int | None = 8
    a_bits: int | None = 8
    granularity: str = "tensor"        # "tensor" | "channel" ("token" = dynamic per-token)
    fold: bool = True                  # per-channel folded into weights (deployable)
    mode: str = "static"               # "static" | "dynamic"
    sites: tuple = LINEAR_SITES
    kv_bits: int | None = None         # KV-cache quantization (kv_mode says how)
    kv_mode: str = "static"            # "static" per tensor / per channel (granularity), sink-aware
    #                                    | "dynamic": per token and KV head, asymmetric (QuaRot's)
    kv_clip: float = 1.0               # dynamic KV: clip ratio of the per-head min/max range
    quant_head: bool = False           # quantize lm_head's input (and weights)
    truncation: bool = False
    smoothquant_alpha: float | None = None
    adapt_control: bool = False
    sink_tokens: int = 0               # first k positions get their own static scales (sinks)
    lsq_grad_scale: bool = False       # multiply scale grads by 1/sqrt(N*qmax) (LSQ)
    param_space: str = "log"           # "log" | "linear"
    rotate: bool = False               # QuaRot-style Hadamard rotation first (sasq.rotate)
    rotate_seed: int | None = 0        # R1's random signs (None: plain Hadamard)
    rotate_qk: bool = False            # R3: online per-head Hadamard on queries/keys (K cache)
    weights: str = "rtn"               # "rtn" round-to-nearest | "gptq" (calibration Hessians)
    dynamic_clip: float = 1.0          # dynamic per-token scale = clip * absmax / qmax
    w_clip: bool = False               # weight scales searched per row (sasq.wclip; QuaRot's)
    act_order: bool = False            # GPTQ rounds columns by decreasing Hessian diagonal

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
        if self.weights not in ("rtn", "gptq"):
            raise ValueError(f"QuantPlan.weights must be 'rtn' or 'gptq', got {self.weights!r}")
        # weights fixed once (GPTQ from calibration Hessians, searched scales): a per-channel
        # fold or SmoothQuant would change them with every scale
        for what, on in (("weights='gptq'", self.weights == "gptq"), ("w_clip", self.w_clip)):
            if on and self.w_bits is None:
                raise ValueError(f"{what} rounds the weights: it needs w_bits")
            if on and (self.folded or self.smoothquant_alpha is not None):
                raise ValueError(f"{what} fixes the weights once; a per-channel fold or SmoothQuant "
                                 "changes them (use a per-tensor, dynamic or weight-only plan)")
        if self.act_order and self.weights != "gptq":
            raise ValueError("act_order is GPTQ's column order: it needs weights='gptq'")
        _ratio("dynamic_clip", self.dynamic_clip)
        if self.dynamic_clip != 1.0 and self.mode != "dynamic":
            raise ValueError("dynamic_clip is the clip ratio of dynamic per-token scales")
        if self.kv_mode not in ("static", "dynamic"):
            raise ValueError(f"QuantPlan.kv_mode must be 'static' or 'dynamic', got {self.kv_mode!r}")
        if self.kv_mode == "dynamic" and not self.kv_bits:
            raise ValueError("kv_mode='dynamic' quantizes the KV cache: it needs kv_bits")
        _ratio("kv_clip", self.kv_clip)
        if self.kv_clip != 1.0 and self.kv_mode != "dynamic":
            raise ValueError("kv_clip is the clip ratio of the dynamic KV cache (kv_mode='dynamic')")
        if self.rotate_qk and not (self.rotate and self.kv_bits):
            raise ValueError("rotate_qk (R3) rotates keys for a quantized K cache: it needs "
                             "rotate=True and kv_bits")
        k = self.sink_tokens
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= MAX_SINK:
            raise ValueError(f"QuantPlan.sink_tokens must be an int in [0, {MAX_SINK}], got {k!r}")
        object.__setattr__(self, "sink_tokens", int(k))
        static_sites = ((self.mode == "static" and self.quantizes_activations)
                        or (self.kv_bits and self.kv_mode == "static"))
        if k and not static_sites:
            raise ValueError("sink_tokens gives the first positions their own *static* scales; "
                             "this plan has no static site (dynamic or no activations, no static "
                             "KV cache)")
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
            s = (f"adapted FP32 ({gran}{' +trunc' if self.truncation else ''}"
                 f"{f' +sink{self.sink_tokens}' if self.sink_tokens else ''})")
            return s if self.w_bits is None else f"W{self.w_bits} {s}"
        if self.w_bits is None and self.a_bits is None and self.kv_bits is None:
            return "FP32" + (" rotated" if self.rotate else "")
        bits = f"W{self.w_bits or 16}A{self.a_bits or 16}"
        if self.rotate:
            bits += " rotated"
        if self.weights == "gptq":
            bits += " GPTQ"
        if self.act_order:
            bits += " act-order"
        if self.w_clip:
            bits += " wclip"
        if self.kv_bits:
            bits += f"KV{self.kv_bits}"
            if self.kv_mode == "dynamic":
                bits += " (per-head asym" + (f" clip {self.kv_clip:g}" if self.kv_clip != 1 else "") + ")"
            if self.rotate_qk:
                bits += " R3"
        if self.a_bits is None:
            if self.kv_bits:
                if self.kv_mode == "dynamic":
                    return f"{bits} dynamic KV only"
                kvg = "per-channel" if self.granularity == "channel" else "per-tensor"
                return f"{bits} static {kvg} KV only"
            return bits + " weight-only"
        if self.mode == "dynamic":
            how = "dynamic per-token" + (f" clip {self.dynamic_clip:g}" if self.dynamic_clip != 1 else "")
        elif self.granularity == "channel":
            how = "static per-channel " + ("(folded)" if self.fold else "(fake per-channel)")
        else:
            how = "static per-tensor"
        if self.smoothquant_alpha is not None:
            how = f"SmoothQuant a={self.smoothquant_alpha:g} " + how
        if self.truncation:
            how += " +trunc"
        if self.sink_tokens:
            how += f" +sink{self.sink_tokens}"
        return f"{bits} {how}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = list(self.sites)
        return d
