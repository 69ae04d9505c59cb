"""QuantModel: a frozen LlamaModel + a QuantPlan + trainable activation-quantization parameters.

    qm = sasq.quantize(model, QuantPlan(8, 8, granularity="channel"))
    sasq.calibrate(qm, calib_ids, seqlen=512)        # PTQ init of the scales
    logits = qm.forward(ids)                          # the fake-quant model, same signature
    tape = qm.forward_tape(ids); qm.backward(tape, dlogits)   # qm.grads += dL/dparams

Pieces: one sasq.sites.Site per quantized activation site (its parameters are views in
`params`), the plan's per-channel folds and SmoothQuant factors (`smooth`), and `deploy`: the
model with those folds applied and its weights rounded per output channel *after* the fold
(sasq.transforms.fake_quant_model), so the fake-quant graph computes what the deployed integer
model computes. `sync()` re-derives everything from the parameters; a weight matrix is rounded
again only when a factor it depends on changed.

Parameters (`params`, model dtype): "<site>.log_scale" (param_space="log", default) or
"<site>.scale"; "<site>.rho" (truncation: t = sigmoid(rho) c); the control's "<site>.log_clip" /
"<site>.log_gain". Site keys: "layers.{i}.{attn_in|o_in|mlp_in|down_in|k_cache|v_cache}" and
"head_in". Scales live in the unfolded domain (the fake quantizer is s * clamp(rint(x / s))).
"""
from __future__ import annotations

import dataclasses
import weakref

import numpy as np

from sasq.model import ActivationHook
from sasq.plan import HEAD_SITE, KV_SITES, LINEAR_SITES, QuantPlan
from sasq.sites import DYNAMIC_KINDS, Site, SiteSpec, tie_expand
from sasq.rotate import rotated
from sasq.transforms import WEIGHT_NAMES, fake_quant_model, quantized_weights


class QuantHook(ActivationHook):
    """The activation hook of a QuantModel: dispatches each site to its Site."""

    def __init__(self, sites: dict):
        self.sites = sites  # (layer, name) -> Site

    def forward(self, layer, site, x, pos, keep):
        s = self.sites.get((layer, site))
        return (x, None) if s is None else s.forward(x, pos, keep)

    def backward(self, layer, site, grad, ctx, grads):
        s = self.sites.get((layer, site))
        return grad if s is None else s.backward(ctx, grad, grads)


def build_sites(model, plan: QuantPlan, dtype) -> dict:
    """(layer, name) -> Site for every quantized site of `plan` on `model`."""
    cfg = model.config
    n, hd = cfg.num_hidden_layers, cfg.head_dim
    channels = {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size, "head_in": cfg.hidden_size,
                "o_in": cfg.num_attention_heads * hd, "down_in": cfg.intermediate_size,
                "k_cache": cfg.num_key_value_heads * hd, "v_cache": cfg.num_key_value_heads * hd}
    specs = []
    if plan.quantizes_activations:
        specs += [(i, s, "act") for i in range(n) for s in plan.sites]
        if plan.quant_head:
            specs.append((n, HEAD_SITE, "act"))
    if plan.kv_bits:
        specs += [(i, s, "kv") for i in range(n) for s in KV_SITES]
    per_ch = plan.granularity == "channel"
    sites = {}
    for i, name, role in specs:
        if role == "kv":
            kind = "dynamic_kv" if plan.kv_mode == "dynamic" else "static"
            bits, folded = plan.kv_bits, False
        elif plan.adapt_control:
            kind, bits, folded = "control", None, False
        elif plan.mode == "dynamic":
            kind, bits, folded = "dynamic", plan.a_bits, False
        else:
            kind, bits, folded = "static", plan.a_bits, plan.folded
        tie = cfg.n_groups if (name == "o_in" and folded) else 1
        spec = SiteSpec(key=HEAD_SITE if name == HEAD_SITE else f"layers.{i}.{name}", layer=i,
                        name=name, channels=channels[name], head_dim=hd, tie=tie)
        sites[(i, name)] = Site(spec, kind, bits, per_channel=per_ch and kind not in DYNAMIC_KINDS,
                                folded=folded, truncation=plan.truncation and role == "act",
                                log=plan.param_space == "log", lsq=plan.lsq_grad_scale, dtype=dtype,
                                sink=plan.sink_tokens,
                                clip=plan.kv_clip if kind == "dynamic_kv" else plan.dynamic_clip)
    return sites


_WCLIP_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def clipped_rtn_weights(model, bits: int) -> dict:
    """(layer, matrix) -> (codes, scales): RTN per row on scales searched for the least rounding
    error (sasq.wclip), every linear of every decoder layer. Cached per model object and bits
    (the search costs about a minute on SmolLM2-135M; a run's cells share one rotated model),
    valid while the model holds the same weight arrays."""
    from sasq.wclip import quantize_rows, search_scales
    arrays = tuple(getattr(lw, n) for lw in model.layers for n in WEIGHT_NAMES)
    per_model = _WCLIP_CACHE.setdefault(model, {})
    hit = per_model.get(bits)
    if hit is not None and len(hit[0]) == len(arrays) and all(a is b for a, b in zip(hit[0], arrays)):
        return dict(hit[1])
    out = {(i, n): quantize_rows(getattr(lw, n), search_scales(getattr(lw, n), bits), bits)
           for i, lw in enumerate(model.layers) for n in WEIGHT_NAMES}
    for codes, scales in out.values():  # shared by every QuantModel of this model: read-only
        codes.flags.writeable = scales.flags.writeable = False
    per_model[bits] = (arrays, out)
    return dict(out)


class QuantModel:
    """Fake-quant view of a frozen LlamaModel (see the module docstring)."""

    def __init__(self, model, plan: QuantPlan):
        if not isinstance(plan, QuantPlan):
            raise TypeError(f"plan must be a QuantPlan, got {type(plan).__name__}")
        if plan.rotate:
            model = rotated(model, plan.rotate_seed, plan.rotate_qk)
        self.model = model
        self.plan = plan
        self.dtype = np.dtype(model.dtype)
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sites = build_sites(model, plan, self.dtype)
        self.hook = QuantHook(self.sites)
        self.params: dict[str, np.ndarray] = {k: v for s in self.sites.values()
                                              for k, v in s.params.items()}
        self.smooth: dict[str, np.ndarray] = {}  # SmoothQuant fold factors, by site key
        if plan.smoothquant_alpha is not None:
            for s in self.sites.values():
                if s.name not in KV_SITES:
                    n = s.channels // cfg.n_groups if s.name == "o_in" else s.channels
                    self.smooth[s.key] = np.ones(n, self.dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        # (layer, matrix) -> (codes, scales) fixed once: GPTQ's (set by calibrate) or, with
        # w_clip and RTN, round-to-nearest on searched scales (data-free, now)
        self.gptq: dict | None = None
        if plan.w_clip and plan.weights == "rtn":
            self.gptq = clipped_rtn_weights(model, plan.w_bits)
        # A deployable float32 plan runs its linears through the INT8 GEMM (sasq.qtensor): the
        # forward is then the deployed engine's, number for number; the backward stays float.
        from sasq.exporter import deployable_problem
        self.int8 = self.dtype == np.float32 and deployable_problem(plan) is None
        for s in self.sites.values():
            s.emit_codes = self.int8 and s.name in LINEAR_SITES
        self.initialized = not self.needs_calibration
        self._memo: dict = {}
        self._sync()

    # ---- sites & params -----------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return bool(self.params) or bool(self.smooth) or self.plan.weights == "gptq"

    def set_gptq_weights(self, codes: dict) -> None:
        """Weights rounded by GPTQ ((layer, matrix) -> (codes int8, scales)), used instead of RTN."""
        want = {(i, n) for i in range(self.n_layers) for n in WEIGHT_NAMES}
        if set(codes) != want:
            raise ValueError(f"GPTQ weights must cover every linear of every layer; missing "
                             f"{sorted(want - set(codes))[:3]}")
        self.gptq = codes
        self._memo.clear()
        self._sync()

    def log_param_keys(self) -> set[str]:
        """Params stored as logarithms (value = exp(param))."""
        return {k for s in self.sites.values() if s.log
                for k in s.params if k != s.rho_key}

    def site_list(self) -> list[Site]:
        return list(self.sites.values())

    def site_of(self, key: str) -> Site:
        """The Site owning a parameter key ("layers.3.attn_in.log_scale") or a site key."""
        for s in self.sites.values():
            if key == s.key or key in s.params:
                return s
        raise KeyError(f"no site for {key!r}")

    def set_site_value(self, key: str, value) -> None:
        """Set a scale/clip/gain param from its *linear* value (log space handled by the site)."""
        self.site_of(key).set_value(key, value)

    # ---- sync: params -> derived values and folded/quantized weights ---------------------
    def sync(self) -> None:
        """Call after changing params: re-derives site values and re-folds/re-quantizes the
        weights whose factors changed."""
        self._sync()
        self.initialized = True

    @property
    def folds(self) -> dict[str, np.ndarray]:
        """Site key -> factor folded into producer/consumer weights (transforms module doc)."""
        f = {s.key: s.value(s.scale_key).astype(self.dtype)
             for s in self.sites.values() if s.folded}
        f.update(self.smooth)
        return f

    def arriving_divisor(self, site: Site, folds: dict | None = None):
        """The per-channel factor (x's channels) that site's input arrives divided by, relative
        to the FP model's activation, or None: its own scale (folded site), the o_in fold
        (v_cache), its SmoothQuant factor."""
        folds = self.folds if folds is None else folds
        if site.folded:
            return site.expand(site.value(site.scale_key)).astype(self.dtype)
        if site.name == "v_cache":
            return folds.get(f"layers.{site.layer}.o_in")
        f = self.smooth.get(site.key)
        if f is None:
            return None
        return tie_expand(f, self.config.n_groups, self.head_dim) if len(f) != site.channels else f

    def _sync(self) -> None:
        for s in self.sites.values():  # validates the parameters before any fold uses them
            s.sync()
        folds = self.folds
        for s in self.sites.values():
            if s.name == "v_cache" and f"layers.{s.layer}.o_in" in folds:
                s.sync(folds[f"layers.{s.layer}.o_in"])  # v arrives divided: scale s_v / f_o
        self.deploy = fake_quant_model(self.model, folds, self.plan.w_bits, self.plan.quant_head,
                                       memo=self._memo, fixed=self.gptq, int8=self.int8)

    def quantized_weights(self) -> dict:
        """(layer, matrix) -> (int8 codes (out, in), float32 scales (out,)) of the deployed
        linears: the GPTQ codes, or RTN of each matrix after its folds; codes * scales equals the
        fake-quant weight bit for bit (the same kernel, sasq.transforms)."""
        if self.plan.w_bits is None:
            raise ValueError(f"{self.plan.label}: weights are not quantized")
        if self.gptq is not None:
            return dict(self.gptq)
        return quantized_weights(self.model, self.folds, self.plan.w_bits)

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
        return self.deploy.forward(ids, hook=self.hook, cache=cache, return_hidden=return_hidden)

    __call__ = forward

    def forward_tape(self, ids, recompute=False, compute_logits=True):
        self._check_ready()
        return self.deploy.forward_tape(ids, hook=self.hook, recompute=recompute,
                                        compute_logits=compute_logits)

    def backward(self, tape, dlogits=None, *, dhidden=None):
        """Activation backward through the fake-quant model (dlogits (B, T, V), or dhidden at the
        head_in output); adds the parameter gradients into self.grads. Returns d_embed."""
        return self.deploy.backward(tape, dlogits, dhidden=dhidden, grads=self.grads)

    def generate(self, prompt_ids, max_new_tokens, temperature=0.0, seed=None, hook=None,
                 top_k=None, eos_id=None):
        if hook is not None:
            raise ValueError("QuantModel.generate uses its own quantizer hook; pass hook=None")
        self._check_ready()
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
        return {s.key: np.array(s.value(s.scale_key)) for s in self.sites.values()
                if s.scale_key is not None}

    def deployed_scales(self) -> dict[str, np.ndarray]:
        """Per static site: the scale the deployed model applies to the site input as it arrives
        in `deploy` (Site.applied_scale): 0-d for per-tensor and folded sites (1.0: the scale
        lives in the weights), (channels,) for fake per-channel sites (not an integer GEMM) and
        for v_cache under an o_in fold (s_v / f_o)."""
        return {s.key: s.applied_scale for s in self.sites.values() if s.kind == "static"}

    def sink_scales(self) -> dict[str, np.ndarray]:
        """Per static site with sink rows: (sink_tokens,) per-tensor scales of positions 0..k-1,
        in the domain the site's input arrives in (as deployed_scales)."""
        return {s.key: np.array(s.s_sink) for s in self.sites.values() if s.sink_key}

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
        return f"QuantModel({self.plan.label}, {len(self.sites)} sites, {n} params)"


def quantize(model, plan: QuantPlan | None = None, **kwargs) -> QuantModel:
    """Fake-quant model for `plan` (or QuantPlan(**kwargs)). Static plans need sasq.calibrate."""
    if plan is None:
        plan = QuantPlan(**kwargs)
    elif kwargs:
        plan = dataclasses.replace(plan, **kwargs)
    return QuantModel(model, plan)
