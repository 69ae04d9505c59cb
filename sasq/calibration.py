"""PTQ initialisation of a QuantModel's scales from calibration windows.

Statistics are taken on the FP model's activations (one forward per batch of windows), in the
domain each quantizer sees: raw activations for per-tensor / per-channel scales (the scale of a
folded site is stored in the unfolded domain), activations divided by the SmoothQuant factors for
SmoothQuant plans (a first pass computes those factors from per-channel absmax).

Methods, per element group sharing one scale (a channel, a KV channel for tied o_in, or the tensor):
- "absmax_mean": s = mean over windows of (per-window absmax) / qmax  (the SASQ paper's init)
- "absmax":      s = max over windows of absmax / qmax  (classic static absmax: never clips the
                 calibration data; per channel the mean of few windows clips sparse channels hard)
- "percentile":  s = mean over windows of (per-window `percentile` of |x|) / qmax
- "mse":         s = r* x mean absmax / qmax, r* in a grid over [0.3, 1] minimising the summed
                 fake-quantization squared error (each window quantized with r x its own absmax).
The adapted-FP32 control takes the clip threshold c = the same statistic (no /qmax; with no rounding
the MSE-optimal clip is the absmax). Truncation parameters restart at t = TRUNC_INIT * c, control
gains at 1.
"""
# Not named calibrate.py: importing a submodule sets the package attribute of the same name,
# which would shadow the public function sasq.calibrate.
from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from .quant import TRUNC_INIT, QuantModel
from .quant_hooks import qmax_of
from .smoothquant import apply_smoothing

METHODS = ("absmax_mean", "absmax", "percentile", "mse")
MSE_RATIOS = np.linspace(0.3, 1.0, 29)
MIN_SCALE = 1e-8


def _as_windows(token_ids, seqlen, n_windows) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        if seqlen is None:
            raise ValueError("calibrate: 1-D token_ids need seqlen")
        n = len(ids) // seqlen
        if n == 0:
            raise ValueError(f"calibrate: {len(ids)} tokens are fewer than one window of {seqlen}")
        ids = ids[: n * seqlen].reshape(n, seqlen)
    elif ids.ndim == 2:
        if seqlen is not None and seqlen != ids.shape[1]:
            raise ValueError(f"calibrate: windows have length {ids.shape[1]}, seqlen={seqlen}")
    else:
        raise ValueError(f"token_ids must be 1-D or (n, seqlen), got shape {ids.shape}")
    if n_windows is not None:
        if n_windows < 1:
            raise ValueError(f"n_windows must be >= 1, got {n_windows}")
        ids = ids[:n_windows]
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError("calibrate: no calibration windows")
    return ids


def _columns(x: np.ndarray, n_params: int, channels: int, head_dim: int) -> np.ndarray:
    """(T, C) window -> (M, P): each column holds the elements that share one parameter."""
    if n_params == 1:
        return x.reshape(-1, 1)
    if n_params == channels:
        return x.reshape(-1, channels)
    # GQA tie of o_in: channels (H*hd, head-major) onto params (KVH*hd); query head h uses KV
    # head h // g, so channel (kv, j, d) with j < g maps to param (kv, d)
    g = channels // n_params
    kvh = n_params // head_dim
    return x.reshape(-1, kvh, g, head_dim).transpose(0, 2, 1, 3).reshape(-1, n_params)


class _Collector:
    """Hook that records per-window statistics and returns x unchanged."""

    def __init__(self, targets, fn, head_dim):
        self.head_dim = head_dim
        self.targets = targets       # (layer, site) -> (key, n_params, channels, divisor|None)
        self.fn = fn
        self.stats: dict[str, list] = {}

    def forward(self, layer, site, x):
        t = self.targets.get((layer, site))
        if t is not None:
            key, n_params, channels, div = t
            for b in range(x.shape[0]):
                xb = x[b] if div is None else x[b] / div
                self.stats.setdefault(key, []).append(self.fn(_columns(xb, n_params, channels, self.head_dim), key))
        return x

    def backward(self, layer, site, grad):  # pragma: no cover - calibration never backprops
        return grad


def _run(qmodel, windows, collector, batch_size, progress, desc):
    n = windows.shape[0]
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        qmodel.model.forward(windows[i:i + batch_size], hook=collector, return_hidden=True)


def calibrate(qmodel: QuantModel, token_ids, seqlen=None, n_windows=None, method="absmax_mean",
              percentile=99.99, progress=True, batch_size=1) -> QuantModel:
    """Initialise qmodel's scales (and SmoothQuant factors) in place; returns qmodel."""
    if not isinstance(qmodel, QuantModel):
        raise TypeError(f"calibrate needs a QuantModel, got {type(qmodel).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = _as_windows(token_ids, seqlen, n_windows)
    sites = qmodel.site_states()

    # pass 1: SmoothQuant factors from per-channel absmax (max over windows, fold shape)
    if qmodel.smooth:
        tg = {(st.layer, st.site): (st.key, len(qmodel.smooth[st.key]), st.channels, None)
              for st in sites if st.key in qmodel.smooth}
        col = _Collector(tg, lambda c, k: np.abs(c).max(axis=0), qmodel.head_dim)
        _run(qmodel, windows, col, batch_size, progress, "smoothquant")
        apply_smoothing(qmodel, {k: np.max(v, axis=0) for k, v in col.stats.items()})

    # pass 2: scale statistics
    targets, qmaxes = {}, {}
    for st in sites:
        if st.scale_key is None:
            continue
        n_params = max(1, qmodel.params[st.scale_key].size)
        div = None
        if st.key in qmodel.smooth:
            div = _expand(qmodel, st, qmodel.smooth[st.key])
        targets[(st.layer, st.site)] = (st.key, n_params, st.channels, div)
        qmaxes[st.key] = qmax_of(st.bits) if st.bits else 0
    if targets:
        def stat(c, key):
            a = np.abs(c)
            amax = a.max(axis=0)
            if method in ("absmax_mean", "absmax"):
                return amax
            if method == "percentile":
                return np.percentile(a, percentile, axis=0)
            qm = qmaxes[key]
            if not qm:              # control: no rounding, clip error only -> r* = 1
                return amax, np.zeros((len(MSE_RATIOS), a.shape[1]))
            errs = np.empty((len(MSE_RATIOS), a.shape[1]))
            for j, r in enumerate(MSE_RATIOS):
                s = np.maximum(r * amax / qm, MIN_SCALE)
                errs[j] = ((np.clip(np.rint(c / s), -qm, qm) * s - c) ** 2).sum(axis=0)
            return amax, errs

        col = _Collector(targets, stat, qmodel.head_dim)
        _run(qmodel, windows, col, batch_size, progress, f"calibrate ({method})")
        for st in sites:
            if st.scale_key is None:
                continue
            vals = col.stats[st.key]
            qm = qmaxes[st.key]
            if method == "mse":
                amax = np.mean([v[0] for v in vals], axis=0)
                ratio = MSE_RATIOS[np.argmin(np.sum([v[1] for v in vals], axis=0), axis=0)]
                ratio = np.where(qm > 0, ratio, 1.0)
                stat_v = ratio * amax
            elif method == "absmax":
                stat_v = np.max(vals, axis=0)
            else:
                stat_v = np.mean(vals, axis=0)
            s = np.maximum(stat_v / (qm if qm else 1), MIN_SCALE)
            shape = qmodel.params[st.scale_key].shape
            qmodel.set_site_value(st.scale_key, s.reshape(shape))
            if st.gain_key is not None:
                qmodel.set_site_value(st.gain_key, np.ones(shape))
            if st.rho_key is not None:
                qmodel.params[st.rho_key][...] = math.log(TRUNC_INIT / (1 - TRUNC_INIT))
    qmodel.sync()
    return qmodel


def _expand(qmodel, st, f):
    """Fold-shape smoothing factors -> x's channels (o_in: over the query heads of a KV head)."""
    if len(f) == st.channels:
        return f
    g = st.channels // len(f)
    hd = qmodel.head_dim
    kvh = len(f) // hd
    return np.broadcast_to(f.reshape(kvh, 1, hd), (kvh, g, hd)).reshape(-1)
