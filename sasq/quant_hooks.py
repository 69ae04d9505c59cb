"""Site quantizers: the activation hook that sasq.quant plugs into LlamaModel.forward/backward.

One `SiteState` per quantized site (layer, site). The hook implements the model's protocol
`forward(layer, site, x) -> x'` / `backward(layer, site, grad) -> grad_x`, keeps the site input of
its own forward for the backward, and accumulates parameter gradients into `QuantModel.grads`.

Kinds of site:
- "static": x -> fake_quant(x, s_vec) (optionally truncate(x, t, c) first, c = s_vec*qmax,
  t = sigmoid(rho)*c). s_vec = s (per tensor), s (per channel, "fake per-channel"), s expanded over
  the query heads of a KV head (o_in with GQA), 1 (per-channel *folded*: the producer already
  divided x by s), or s_v / s_o (v_cache when o_in is folded: v arrives divided by s_o).
- "dynamic": per-token absmax/qmax scale computed at run time, no parameters, STE (identity) grad.
- "control": the "adapted FP32" control: y = gain * clamp(x, -c, c) (or truncate), no rounding.

Gradients (STE/LSQ, DESIGN section 2, computed by sasq.ops / sasq.reference): with u = x/s_vec,
inside (|u| <= qmax) d y/d x = 1 and d y/d s = rint(u) - u; beyond the range d y/d x = 0 and
d y/d s = qmin or qmax; summed over the elements that share a scale. Truncation adds the chain
through c = s_vec*qmax and t = sigmoid(rho)*c (sasq.ops.truncate_backward). Every site writes s_vec = s_exp * mult with `mult` treated as a constant:
  dL/ds_exp = dL/ds_vec * mult.
For a folded site mult = 1/s. This is exact for the function the folded graph computes when the
weight rounding is passed straight through as a frozen *multiplicative* residual,
Q(W s) ~ (Q(W s0)/s0) * s: then the total derivative of the folded graph (producer divides by s,
consumer columns multiply by s) equals per-channel LSQ on the unfolded activation with the
activation gradient g_a = g'/s. (Proof: the quantizer A(x, s) = s * A(x/s, 1) is 1-homogeneous, so
d A/ds at fixed x equals d/ds' A(u, s') at s' = 1 with u = x/s fixed.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# --------------------------------------------------------------------------- kernel backend

def _backend(dtype):
    """float32 -> the C kernels (sasq.ops); any other float dtype -> the NumPy twins."""
    if np.dtype(dtype) == np.float32:
        try:
            from . import ops
            return ops
        except ImportError:  # C extension not built: the twin gives the same numbers
            pass
    from . import reference
    return reference


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))  # overflow-free


# --------------------------------------------------------------------------- site state

@dataclass
class SiteState:
    """Everything one site needs; arrays are refreshed by QuantModel.sync()."""
    key: str                      # "layers.3.attn_in"
    layer: int
    site: str
    kind: str                     # "static" | "dynamic" | "control"
    bits: int | None              # None for the control
    channels: int                 # size of x's last axis
    scale_key: str | None = None  # params key of the scale (or clip for the control)
    log_space: bool = True
    rho_key: str | None = None    # truncation parameter
    gain_key: str | None = None   # control gain
    group: int = 1                # GQA: query heads per KV head (o_in), expand over it
    head_dim: int = 0
    folded: bool = False
    # derived by sync (all (channels,) arrays in the model dtype)
    s_exp: np.ndarray | None = None   # scale expanded to x's channels
    mult: np.ndarray | None = None    # constant factor: s_vec = s_exp * mult
    s_vec: np.ndarray | None = None
    sig: np.ndarray | None = None     # sigmoid(rho) expanded
    gain: np.ndarray | None = None    # control gain expanded

    @property
    def qmax(self) -> int:
        return qmax_of(self.bits) if self.bits else 0

    # param shape <-> x channels (GQA tie of o_in: one scale per KV channel)
    def expand(self, p: np.ndarray) -> np.ndarray:
        if p.ndim == 0:
            return np.full(self.channels, p, dtype=p.dtype)
        if self.group == 1:
            return p
        kvh = p.shape[0] // self.head_dim
        return np.broadcast_to(p.reshape(kvh, 1, self.head_dim),
                               (kvh, self.group, self.head_dim)).reshape(-1)

    def reduce(self, g: np.ndarray, shape) -> np.ndarray:
        if len(shape) == 0:
            return np.asarray(g.sum())
        if self.group == 1:
            return g
        kvh = shape[0] // self.head_dim
        return g.reshape(kvh, self.group, self.head_dim).sum(axis=1).reshape(-1)


# --------------------------------------------------------------------------- the hook

class SiteHook:
    """Activation hook implementing sasq.model's protocol for a QuantModel."""

    def __init__(self, qmodel):
        self.q = qmodel                         # for params / grads / plan
        self.sites: dict[tuple[int, str], SiteState] = {}
        self.saved: dict[tuple[int, str], np.ndarray] = {}
        self.record = False                     # keep site inputs for backward (training only)
        self.record_from = 0                    # ... of layers >= record_from (recompute: head only)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, layer: int, site: str, x):
        st = self.sites.get((layer, site))
        if st is None:
            return x
        if self.record and layer >= self.record_from:
            self.saved[(layer, site)] = x
        if st.kind == "dynamic":
            return dynamic_forward(x, st.bits)
        x = np.ascontiguousarray(x)
        if st.kind == "control":
            return control_forward(x, st)
        ops = _backend(x.dtype)
        y = x
        if st.rho_key is not None:
            c = st.s_vec * st.qmax
            y = ops.truncate(x, st.sig * c, c)
        if st.folded and st.rho_key is None:
            return ops.fake_quant(y, 1.0, st.bits)  # deployed form: one per-tensor scale of 1
        return ops.fake_quant(y, st.s_vec, st.bits)

    # ---- backward ----------------------------------------------------------------------
    def backward(self, layer: int, site: str, grad):
        st = self.sites.get((layer, site))
        if st is None:
            return grad
        x = self.saved.pop((layer, site), None)
        if x is None:
            raise RuntimeError(f"site {st.key}: backward without a recorded forward "
                               "(use QuantModel.forward_tape, not forward)")
        if st.kind == "dynamic":
            return grad  # STE: rounding passes straight through, nothing is clipped
        x = np.ascontiguousarray(x)
        grad = np.ascontiguousarray(grad, dtype=x.dtype)
        if st.kind == "control":
            return control_backward(x, grad, st, self.q)
        return static_backward(x, grad, st, self.q)


# --------------------------------------------------------------------------- static site

def static_backward(x, g, st: SiteState, q):
    """LSQ/STE backward of y = fake_quant(truncate(x, t, c), s_vec); accumulates into q.grads."""
    ops = _backend(x.dtype)
    qm = st.qmax
    y = x
    if st.rho_key is not None:
        c = st.s_vec * qm
        t = st.sig * c
        y = ops.truncate(x, t, c)
    gy, gs = ops.fake_quant_backward(y, st.s_vec, g, st.bits)      # gs: (channels,)
    gs = np.asarray(gs, dtype=x.dtype)
    if st.rho_key is not None:
        gx, gt, gc = ops.truncate_backward(x, t, c, gy)
        gt = np.asarray(gt, dtype=x.dtype)
        gc = np.asarray(gc, dtype=x.dtype)
        gs = gs + qm * (st.sig * gt + gc)                          # via c = s*qmax, t = sig*c
        grho = gt * st.sig * (1.0 - st.sig) * c                    # d t/d rho = sig' * c
        _accumulate(q, st.rho_key, st.reduce(grho, q.params[st.rho_key].shape), x, st, 0)
    else:
        gx = gy
    gsx = gs * st.mult                                             # d/ds_exp (see module doc)
    p = q.params[st.scale_key]
    gp = st.reduce(gsx, p.shape)
    if st.log_space:
        gp = gp * np.exp(p.astype(x.dtype))                        # s = exp(p)
    _accumulate(q, st.scale_key, gp, x, st, qm)
    return gx


def _accumulate(q, key, g, x, st, qm):
    """Add g into q.grads[key], with LSQ's optional gradient scale 1/sqrt(N*qmax) (scales only:
    qm = 0 for rho and the control's params). N = elements sharing one parameter in this batch."""
    if q.plan.lsq_grad_scale and qm:
        n_share = x.size / max(1, q.params[key].size)
        g = g / math.sqrt(n_share * qm)
    q.grads[key] += np.asarray(g, dtype=q.grads[key].dtype)


# --------------------------------------------------------------------------- dynamic site

def dynamic_forward(x, bits):
    """Per-token (per-row) absmax fake quant: s = absmax(row)/qmax computed at run time."""
    qm = qmax_of(bits)
    s = np.abs(x).max(axis=-1, keepdims=True) / qm                 # (B, T, 1)
    s = np.where(s > 0, s, 1).astype(x.dtype)
    return (np.clip(np.rint(x / s), -qm, qm) * s).astype(x.dtype)


# --------------------------------------------------------------------------- control site

def control_forward(x, st: SiteState):
    """Adapted-FP32 control: gain * clamp(x, -c, c) (or the smooth truncation), no rounding."""
    c = st.s_vec
    if st.rho_key is not None:
        y = _backend(x.dtype).truncate(x, st.sig * c, c)
    else:
        y = np.clip(x, -c, c)
    return (y * st.gain).astype(x.dtype)


def control_backward(x, g, st: SiteState, q):
    c = st.s_vec
    gy = g * st.gain
    if st.rho_key is not None:
        ops = _backend(x.dtype)
        t = st.sig * c
        y = ops.truncate(x, t, c)
        gx, gt, gc = ops.truncate_backward(x, t, c, gy)
        gt = np.asarray(gt, dtype=x.dtype)
        gcl = np.asarray(gc, dtype=x.dtype) + st.sig * gt
        grho = gt * st.sig * (1.0 - st.sig) * c
        _accumulate(q, st.rho_key, st.reduce(grho, q.params[st.rho_key].shape), x, st, 0)
    else:
        y = np.clip(x, -c, c)
        inside = np.abs(x) <= c
        gx = np.where(inside, gy, 0).astype(x.dtype)
        gcl = np.where(inside, 0, gy * np.sign(x)).reshape(-1, x.shape[-1]).sum(0)
    ggain = (g * y).reshape(-1, x.shape[-1]).sum(0)
    for key, gv in ((st.scale_key, gcl), (st.gain_key, ggain)):
        p = q.params[key]
        gp = st.reduce(gv.astype(x.dtype), p.shape)
        if st.log_space:
            gp = gp * np.exp(p.astype(x.dtype))
        _accumulate(q, key, gp, x, st, 0)
    return gx
