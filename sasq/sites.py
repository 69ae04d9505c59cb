"""What happens at one activation site: its description, its parameters and a table of stages.

A site is one place in the model where activations are quantized (sasq.model.SITES). Its input
x (B, T, C) runs through a short table of stages, each a forward/backward pair:

    kind       stages                       parameters (keys "<site>.<name>")
    static     [truncate] -> fake_quant     log_scale | scale, [rho]
    dynamic    dynamic_quant                (none: per-token absmax at run time)
    control    clip | truncate -> gain      log_clip | clip, log_gain | gain, [rho]

Values the stages use, derived from the parameters by Site.sync:
    s     the scale applied to x as it arrives: s_x * mult, where s_x is the site's scale expanded
          to x's channels (GQA tie) and mult a constant from the folds (below); 0-d per tensor
    c     the ceiling: s * qmax (static) or the clip threshold (control)
    t     the truncation threshold sigmoid(rho) * c
    gain  the control's per-channel gain
Folds (DESIGN section 2): a folded per-channel site receives x already divided by its scale (the
producer was divided, the consumer columns multiplied), so it rounds on the unit grid: s = 1,
mult = 1/s_x. v_cache under an o_in fold receives v divided by the o_in scale: mult = 1/f_o.
The scale gradient treats mult as a constant: dL/ds_x = dL/ds * mult. For a folded site this is
exact for the graph in which the weight rounding passes straight through as a frozen
multiplicative residual, Q(W s) ~ (Q(W s0)/s0) s: the total derivative of the folded graph then
equals per-channel LSQ on the unfolded activation (the quantizer A(x, s) = s A(x/s, 1) is
1-homogeneous, so dA/ds at fixed x equals d/ds' A(u, s') at s' = 1 with u = x/s fixed).

Gradients (STE/LSQ, DESIGN section 2) come from the kernels (sasq.ops, or the NumPy twins in
sasq.reference for other dtypes); the chain from stage values to parameters lives in one place,
Site._param_grads: with c = k s (k = qmax static, 1 control) and t = sigmoid(rho) c,
    dL/ds = g_s + k (sigmoid(rho) g_t + g_c),   dL/drho = g_t sigmoid'(rho) c,
then the GQA tie (sum over the tied channels), then the parameter space (log: times s).
Gradients are added into a dict the caller owns; a site never stores them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sasq import grid
from sasq.layers import sigmoid
from sasq.qtensor import QActivation

TRUNC_INIT = 0.9  # truncation starts at t = 0.9 c: identity on the bulk
RHO_INIT = math.log(TRUNC_INIT / (1 - TRUNC_INIT))
RHO_MAX = 9.0     # sync() projects rho into [-9, 9]: 0 < t < c stays strict in float32


def _backend(dtype):
    """float32 -> the C kernels (sasq.ops); any other float dtype -> the NumPy twins."""
    if np.dtype(dtype) == np.float32:
        from sasq import ops
        return ops
    from sasq import reference
    return reference


# --------------------------------------------------------------------------- GQA tie
# With grouped-query attention, the o_in channels of the `group` query heads that share a KV head
# come from one v_proj row: a factor folded into v_proj is one value per KV channel.

def tie_expand(v: np.ndarray, group: int, head_dim: int) -> np.ndarray:
    """(KVH*hd,) per KV channel -> (H*hd,) over the query heads of each KV head."""
    if group == 1:
        return v
    kvh = v.shape[0] // head_dim
    return np.broadcast_to(v.reshape(kvh, 1, head_dim), (kvh, group, head_dim)).reshape(-1)


def tie_reduce(g: np.ndarray, group: int, head_dim: int) -> np.ndarray:
    """(H*hd,) -> (KVH*hd,): the sum over the tied channels (the transpose of tie_expand)."""
    if group == 1:
        return g
    kvh = g.shape[0] // (group * head_dim)
    return g.reshape(kvh, group, head_dim).sum(axis=1).reshape(-1)


def tie_reduce_max(v: np.ndarray, group: int, head_dim: int) -> np.ndarray:
    """(H*hd,) -> (KVH*hd,): the maximum over the tied channels."""
    if group == 1:
        return v
    kvh = v.shape[0] // (group * head_dim)
    return v.reshape(kvh, group, head_dim).max(axis=1).reshape(-1)


def tie_columns(x: np.ndarray, n_params: int, head_dim: int) -> np.ndarray:
    """x (..., C) -> (M, n_params): column j holds every element that shares parameter j
    (n_params = 1 per tensor, C per channel, KVH*hd for the GQA tie of o_in)."""
    channels = x.shape[-1]
    if n_params == 1:
        return x.reshape(-1, 1)
    if n_params == channels:
        return x.reshape(-1, channels)
    # channel (kv, j, d) of query head kv*g + j maps to parameter (kv, d)
    g = channels // n_params
    kvh = n_params // head_dim
    return x.reshape(-1, kvh, g, head_dim).transpose(0, 2, 1, 3).reshape(-1, n_params)


# --------------------------------------------------------------------------- parameter space
# Positive parameters (scales, clips, gains) are stored as logarithms (default: Adam then takes
# relative steps) or as they are; these three functions are the only place that knows.

def param_value(p: np.ndarray, log: bool) -> np.ndarray:
    if not log:
        return p
    with np.errstate(over="ignore"):  # overflow -> inf, reported by sync
        return np.exp(p)


def param_from_value(v: np.ndarray, log: bool) -> np.ndarray:
    return np.log(v) if log else v


def param_grad(g_value: np.ndarray, p: np.ndarray, log: bool) -> np.ndarray:
    """dL/dp from dL/dvalue: times exp(p) = value in log space."""
    return g_value * np.exp(p.astype(g_value.dtype)) if log else g_value


# --------------------------------------------------------------------------- stages
# Each stage reads the site's derived values (site.s, .c, .t, .gain, .bits) and returns, in
# backward, the gradient at its input and the gradients of the values it used.

class Truncate:
    """Soft-knee outlier truncation (sasq.ops.truncate): identity below t, saturating at c."""

    @staticmethod
    def forward(x, site):
        return _backend(x.dtype).truncate(x, site.t, site.c)

    @staticmethod
    def backward(x, g, site):
        gx, gt, gc = _backend(x.dtype).truncate_backward(x, site.t, site.c, g)
        return gx, {"t": np.asarray(gt, dtype=x.dtype), "c": np.asarray(gc, dtype=x.dtype)}


class FakeQuant:
    """s * clamp(rint(x / s), -qmax, qmax); STE for x, LSQ for s."""

    @staticmethod
    def forward(x, site):
        return _backend(x.dtype).fake_quant(x, site.s, site.bits)

    @staticmethod
    def backward(x, g, site):
        gx, gs = _backend(x.dtype).fake_quant_backward(x, site.s, g, site.bits)
        return gx, {"s": np.asarray(gs, dtype=x.dtype)}


class DynamicQuant:
    """Per-token (per-row) absmax fake quant, the scale computed at run time; STE backward
    (rounding passes straight through and nothing is clipped)."""

    @staticmethod
    def forward(x, site):
        # scale = clip * absmax(row) / qmax (QuaRot clips at 0.9 at 4 bits); the kernel's codes
        codes, s = _backend(x.dtype).quantize_dynamic(np.ascontiguousarray(x), site.bits, site.clip)
        return codes.astype(x.dtype) * s[..., None]

    @staticmethod
    def backward(x, g, site):
        return g, {}


class DynamicKV:
    """The dynamic KV cache: per token and KV head (head_dim channels), asymmetric min/max grid
    computed at run time (sasq.kvquant); STE backward."""

    @staticmethod
    def forward(x, site):
        from sasq.kvquant import fake_quant_asym_groups
        return fake_quant_asym_groups(x, site.bits, site.spec.head_dim, site.clip)

    @staticmethod
    def backward(x, g, site):
        return g, {}


class Clip:
    """The control's hard clamp clip(x, -c, c), no rounding."""

    @staticmethod
    def forward(x, site):
        return np.clip(x, -site.c, site.c)

    @staticmethod
    def backward(x, g, site):
        inside = np.abs(x) <= site.c
        gx = np.where(inside, g, 0).astype(x.dtype)
        gc = np.where(inside, 0, g * np.sign(x)).reshape(-1, x.shape[-1]).sum(0)
        return gx, {"c": gc.astype(x.dtype)}


class Gain:
    """The control's per-channel gain."""

    @staticmethod
    def forward(x, site):
        return (x * site.gain).astype(x.dtype)

    @staticmethod
    def backward(x, g, site):
        return g * site.gain, {"gain": (g * x).reshape(-1, x.shape[-1]).sum(0).astype(x.dtype)}


DYNAMIC_KINDS = ("dynamic", "dynamic_kv")  # scales computed at run time: no parameters, STE


def stage_table(kind: str, truncation: bool) -> tuple:
    if kind == "static":
        return (Truncate, FakeQuant) if truncation else (FakeQuant,)
    if kind == "dynamic":
        return (DynamicQuant,)
    if kind == "dynamic_kv":
        return (DynamicKV,)
    if kind == "control":
        return (Truncate if truncation else Clip, Gain)
    raise ValueError(f"unknown site kind {kind!r}")


# --------------------------------------------------------------------------- the site

@dataclass(frozen=True)
class SiteSpec:
    """Where a site is and what its input looks like."""
    key: str          # "layers.3.attn_in" or "head_in"
    layer: int        # num_hidden_layers for head_in
    name: str         # one of sasq.model.SITES
    channels: int     # size of x's last axis
    head_dim: int
    tie: int = 1      # query heads per KV head sharing one parameter (o_in folded with GQA)


class Site:
    """One quantizer: a SiteSpec, its parameters (views shared with QuantModel.params), the
    values derived from them by sync(), and its stage table."""

    def __init__(self, spec: SiteSpec, kind: str, bits: int | None, per_channel: bool,
                 folded: bool, truncation: bool, log: bool, lsq: bool, dtype, sink: int = 0,
                 clip: float = 1.0):
        self.spec, self.kind, self.bits, self.clip = spec, kind, bits, clip
        self.per_channel, self.folded, self.truncation = per_channel, folded, truncation
        self.log, self.lsq, self.dtype = log, lsq, np.dtype(dtype)
        self.sink = sink if kind not in DYNAMIC_KINDS else 0
        self.emit_codes = False  # set by QuantModel: return int8 codes for an INT8 GEMM
        self.stages = stage_table(kind, truncation)
        self.params: dict[str, np.ndarray] = {}
        pre = "log_" if log else ""
        shape = (spec.channels // spec.tie,) if per_channel else ()
        one = 0.0 if log else 1.0
        self.scale_key = self.rho_key = self.gain_key = self.sink_key = None
        if kind == "static":
            self.scale_key = f"{spec.key}.{pre}scale"
            if self.sink:
                self.sink_key = f"{spec.key}.{pre}sink_scale"
                self.params[self.sink_key] = np.full((self.sink,), one, self.dtype)
        elif kind == "control":
            self.scale_key = f"{spec.key}.{pre}clip"
            self.gain_key = f"{spec.key}.{pre}gain"
            self.params[self.gain_key] = np.full(shape, one, self.dtype)
        if self.scale_key is not None:
            self.params[self.scale_key] = np.full(shape, one, self.dtype)
        if truncation:
            self.rho_key = f"{spec.key}.rho"
            self.params[self.rho_key] = np.full(shape, RHO_INIT, self.dtype)
        # derived by sync
        self.s = self.c = self.t = self.gain = self.sig = self.mult = self.s_sink = None

    # ---- description
    key = property(lambda self: self.spec.key)
    layer = property(lambda self: self.spec.layer)
    name = property(lambda self: self.spec.name)
    channels = property(lambda self: self.spec.channels)

    @property
    def qmax(self) -> int:
        return grid.qmax(self.bits) if self.bits else 0

    def expand(self, p: np.ndarray) -> np.ndarray:
        """A parameter-shaped array -> x's channels (0-d stays 0-d)."""
        return p if p.ndim == 0 else tie_expand(p, self.spec.tie, self.spec.head_dim)

    def reduce(self, g: np.ndarray, shape) -> np.ndarray:
        """A gradient over x's channels (or 0-d) -> the parameter's shape."""
        if len(shape) == 0:
            return np.asarray(g.sum())
        return tie_reduce(g, self.spec.tie, self.spec.head_dim)

    def value(self, key: str) -> np.ndarray:
        """A parameter in its linear domain (scale, clip, gain; rho is returned as is)."""
        p = self.params[key]
        return p if key == self.rho_key else param_value(p, self.log)

    def set_value(self, key: str, value) -> None:
        """Set a scale/clip/gain parameter from its linear value (log space handled here)."""
        p = self.params[key]
        v = np.broadcast_to(np.asarray(value, dtype=self.dtype), p.shape)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{key}: values must be finite and > 0")
        p[...] = param_from_value(v, self.log)

    @property
    def applied_scale(self):
        """The static scale applied to x as it arrives (None for dynamic/control sites): a
        0-d array per tensor, 1.0 for a folded site (its scale lives in the weights), a
        (channels,) array when a fold of another site divides x by a per-channel factor."""
        if self.kind != "static":
            return None
        return np.asarray(1.0, self.dtype) if self.folded else np.array(self.s)

    # ---- derived values
    def sync(self, divisor: np.ndarray | None = None) -> None:
        """Derive s, c, t, gain from the parameters. `divisor` (channels,): x arrives divided
        by it (v_cache under an o_in fold); a folded site's own scale is handled here."""
        if self.kind in DYNAMIC_KINDS:
            return
        for k, p in self.params.items():
            if not np.all(np.isfinite(p)):
                raise ValueError(f"param {k} has non-finite values")
            if k == self.rho_key:
                np.clip(p, -RHO_MAX, RHO_MAX, out=p)
            elif not self.log and np.any(p <= 0):
                raise ValueError(f"param {k} must be > 0 (linear-space scale)")
        for key in (self.scale_key, self.sink_key):
            v = self.value(key) if key else None
            if v is not None and (not np.all(np.isfinite(v)) or np.any(v <= 0)):
                raise ValueError(f"param {key} gives a scale that is not finite and > 0 "
                                 f"(range {np.min(v):.3g}..{np.max(v):.3g})")
        v = self.value(self.scale_key)
        if self.sink_key:
            self.s_sink = self.value(self.sink_key).astype(self.dtype)
        s_x = self.expand(v).astype(self.dtype)
        self.sig = (self.expand(sigmoid(self.params[self.rho_key])).astype(self.dtype)
                    if self.truncation else None)
        if self.kind == "control":
            self.mult = None
            self.c = s_x
            self.gain = self.expand(self.value(self.gain_key)).astype(self.dtype)
        else:
            if self.folded:
                self.mult = 1.0 / s_x
                self.s = np.ones(self.channels, self.dtype)
            elif divisor is not None:
                self.mult = 1.0 / divisor
                self.s = (s_x * self.mult).astype(self.dtype)
            else:
                self.mult = None
                self.s = s_x
            self.c = self.s * self.qmax
        self.t = self.sig * self.c if self.truncation else None

    # ---- forward / backward
    # Sink rows: positions p < sink of every sequence (x holds positions pos..pos+T-1). A static
    # site rounds them with their own per-tensor scale s_sink[p] in the domain x arrives in (for
    # a folded site: relative to the folded grid), without truncation; the control passes them
    # through. The stage table runs on all rows and the sink rows are then overwritten, which
    # costs k rows of work instead of a copy of the whole activation.
    def _n_sink(self, pos: int, T: int) -> int:
        return max(0, min(self.sink - pos, T))

    def forward(self, x: np.ndarray, pos: int, keep: bool):
        """x (B, T, C) at positions pos.. -> (y, ctx): ctx (the input, pos) when keep."""
        if self.kind != "dynamic":
            x = np.ascontiguousarray(x)
        if self.emit_codes:
            return self._forward_codes(x, pos), ((x, pos) if keep else None)
        y = x
        for stage in self.stages:
            y = stage.forward(y, self)
        n_s = self._n_sink(pos, x.shape[1])
        if n_s:
            y = y if y is not x else y.copy()
            for j in range(n_s):
                xj = np.ascontiguousarray(x[:, j])  # (B, C)
                y[:, j] = (xj if self.kind == "control" else
                           _backend(x.dtype).fake_quant(xj, self.s_sink[pos + j], self.bits))
        return y, ((x, pos) if keep else None)

    def _forward_codes(self, x, pos):
        """The same values as the stage table, computed as int8 codes first (the deployed
        engine's kernels: quantize / truncate_quantize / quantize_dynamic), returned as a
        QActivation that the next linear runs through the INT8 GEMM."""
        from sasq import ops
        if self.kind == "dynamic":
            codes, s = ops.quantize_dynamic(np.ascontiguousarray(x), self.bits, self.clip)
            return QActivation.wrap(codes.astype(x.dtype) * s[..., None], codes, s.reshape(-1))
        s = float(self.applied_scale)
        if self.truncation:
            codes = ops.truncate_quantize(x, self.t, s, self.bits)
        else:
            codes = ops.quantize(x, s, self.bits)
        y = codes.astype(x.dtype) * x.dtype.type(s)
        n_s = self._n_sink(pos, x.shape[1])
        if not n_s:
            return QActivation.wrap(y, codes, s)
        rows = np.full(x.shape[:-1], s, np.float32)  # (B, T)
        for j in range(n_s):
            sj = self.s_sink[pos + j]
            codes[:, j] = ops.quantize(np.ascontiguousarray(x[:, j]), sj, self.bits)
            y[:, j] = codes[:, j].astype(x.dtype) * sj
            rows[:, j] = sj
        return QActivation.wrap(y, codes, rows.reshape(-1))

    def backward(self, ctx, g: np.ndarray, grads: dict) -> np.ndarray:
        """g at the output -> g at the input; parameter gradients are added into grads.
        May overwrite g (the model never reuses a gradient it handed to a hook)."""
        if ctx is None:
            raise RuntimeError(f"site {self.key}: backward without a recorded forward "
                               "(use QuantModel.forward_tape, not forward)")
        x, pos = ctx
        if self.kind in DYNAMIC_KINDS:
            return g
        g = np.ascontiguousarray(g, dtype=x.dtype)
        n_s = self._n_sink(pos, x.shape[1])
        g_sink = None
        if n_s:
            g_sink = g[:, :n_s].copy()
            g[:, :n_s] = 0  # the body stages see no gradient from the sink rows
        inputs = [x]  # the input of every stage, recomputed
        for stage in self.stages[:-1]:
            inputs.append(stage.forward(inputs[-1], self))
        vg: dict = {}
        for stage, xin in zip(reversed(self.stages), reversed(inputs)):
            g, d = stage.backward(xin, g, self)
            vg.update(d)
        if n_s:
            g = self._sink_backward(x, g, g_sink, pos, n_s, vg, grads)
        self._param_grads(vg, x, grads)
        return g

    def _sink_backward(self, x, g, g_sink, pos, n_s, vg, grads):
        """STE/LSQ through the sink rows. Folded site: the sink row is s_x * s_sink * round(x /
        (s_x * s_sink)) in the unfolded domain, so the body scale also gets the LSQ term of
        these rows (times s_sink); it is added to the stage gradient "s" before the chain."""
        if self.kind == "control":
            g[:, :n_s] = g_sink
            return g
        ops = _backend(x.dtype)
        gp = np.zeros(self.sink, dtype=np.float64)
        for j in range(n_s):
            xj = np.ascontiguousarray(x[:, j])
            s_j = self.s_sink[pos + j]
            gx, gs_c = ops.fake_quant_backward(xj, np.full(xj.shape[-1], s_j, x.dtype),
                                               np.ascontiguousarray(g_sink[:, j]), self.bits)
            gs_c = np.asarray(gs_c, dtype=x.dtype)  # (C,) per-channel LSQ partials
            g[:, j] = gx
            gp[pos + j] += float(gs_c.sum(dtype=np.float64))
            if self.folded:
                vg["s"] = vg["s"] + gs_c * s_j
        p = self.params[self.sink_key]
        gv = param_grad(gp.astype(x.dtype), p, self.log)
        grads.setdefault(self.sink_key, np.zeros_like(p))
        grads[self.sink_key] += gv.astype(grads[self.sink_key].dtype)
        return g

    def _param_grads(self, vg: dict, x: np.ndarray, grads: dict) -> None:
        """The chain from stage values (s, c, t, gain) to parameters (module docstring)."""
        k = self.qmax if self.kind == "static" else 1
        g_s = vg.get("s", 0)
        if "t" in vg:  # t = sig * c
            g_s = g_s + k * (self.sig * vg["t"] + vg["c"])
            self._add(grads, self.rho_key, vg["t"] * self.sig * (1.0 - self.sig) * self.c, x, 0)
        elif "c" in vg:
            g_s = g_s + k * vg["c"]
        if self.mult is not None:
            g_s = g_s * self.mult
        self._add(grads, self.scale_key, g_s, x, self.qmax, positive=True)
        if self.gain_key is not None:
            self._add(grads, self.gain_key, vg["gain"], x, 0, positive=True)

    def _add(self, grads, key, g_x, x, qm, positive=False) -> None:
        """Reduce a gradient over x's channels to the parameter, through the parameter space,
        with LSQ's optional gradient scale 1/sqrt(N*qmax) (scales only: qm = 0 otherwise; N =
        elements sharing one parameter in this batch), and add it into grads[key]."""
        p = self.params[key]
        g = self.reduce(g_x, p.shape)
        if positive:
            g = param_grad(g, p, self.log)
        if self.lsq and qm:
            g = g / math.sqrt(x.size / max(1, p.size) * qm)
        if key not in grads:
            grads[key] = np.zeros_like(p)
        grads[key] += np.asarray(g, dtype=grads[key].dtype)

    def __repr__(self):
        return f"Site({self.key}, {self.kind}, bits={self.bits}, params={sorted(self.params)})"
