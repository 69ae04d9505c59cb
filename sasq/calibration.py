"""PTQ initialisation of a QuantModel's scales from calibration windows.

Statistics are taken on the FP model's activations (one forward per batch of windows, every site
observed at once) in the domain each of the QuantModel's sites quantizes: raw activations for
per-tensor / per-channel scales (a folded site's scale is stored in the unfolded domain), and
activations divided by the SmoothQuant factors for SmoothQuant plans (a first pass computes those
factors from per-channel absmax). Elements that share one parameter are grouped by
sasq.sites.tie_columns (a channel, a KV channel for the GQA-tied o_in, or the tensor).

Methods, per group, over windows:
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

import hashlib

import numpy as np

from sasq import grid, reference
from sasq.data import as_token_ids, cut_windows
from sasq.model import Observer
from sasq.progress import bar
from sasq.quant import QuantModel
from sasq.sites import RHO_INIT, tie_columns, tie_expand
from sasq.transforms import smoothquant_folds

METHODS = ("absmax_mean", "absmax", "percentile", "mse")
MSE_RATIOS = np.linspace(0.3, 1.0, 29)
MIN_SCALE = 1e-8


def calibration_windows(token_ids, seqlen=None, n_windows=None) -> np.ndarray:
    """(n, seqlen) windows: a 1-D stream cut by seqlen, or (n, L) windows used as they are."""
    ids = as_token_ids(token_ids, "token_ids")
    if ids.ndim == 1 and seqlen is None:
        raise ValueError("calibrate: 1-D token_ids need seqlen")
    if ids.ndim == 2 and seqlen is not None and seqlen != ids.shape[1]:
        raise ValueError(f"calibrate: windows have length {ids.shape[1]}, seqlen={seqlen}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    return cut_windows(ids, seqlen if ids.ndim == 1 else ids.shape[1], n_windows, "calibrate")


class _Statistics(Observer):
    """Per-window statistics of chosen sites: targets (layer, name) -> (key, n_params, divisor,
    sink). The first `sink` rows of a window are left out of the statistic (their own scales)
    and their per-channel absmax is kept in sink_absmax[key] (one (sink, C) array per window)."""

    def __init__(self, targets: dict, fn, head_dim: int):
        self.targets, self.fn, self.head_dim = targets, fn, head_dim
        self.stats: dict[str, list] = {}
        self.sink_absmax: dict[str, list] = {}

    def observe(self, layer, site, x, pos):
        t = self.targets.get((layer, site))
        if t is None:
            return
        key, n_params, div, sink = t
        for b in range(x.shape[0]):  # one statistic per window
            if sink:
                self.sink_absmax.setdefault(key, []).append(np.abs(x[b][:sink]))
            xb = x[b][sink:]
            xb = xb if div is None else xb / div
            self.stats.setdefault(key, []).append(self.fn(tie_columns(xb, n_params, self.head_dim), key))


def _collect(qmodel, windows, targets, fn, batch_size, progress, desc) -> _Statistics:
    obs = _Statistics(targets, fn, qmodel.head_dim)
    for i in bar(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
        qmodel.model.forward(windows[i:i + batch_size], hook=obs, return_hidden=True)
    return obs


def _mse_errors(c, amax, bits):
    """Summed squared fake-quant error (float64) of columns c (M, P) for every MSE ratio."""
    errs = np.empty((len(MSE_RATIOS), c.shape[1]))
    c64 = c.astype(np.float64)
    for j, r in enumerate(MSE_RATIOS):
        s = np.maximum(r * amax / grid.qmax(bits), MIN_SCALE)
        errs[j] = ((reference.fake_quant(c64, s, bits) - c64) ** 2).sum(axis=0)
    return errs


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
    windows = calibration_windows(token_ids, seqlen, n_windows)
    sites = qmodel.site_list()
    group = qmodel.config.n_groups

    # pass 1: SmoothQuant factors from per-channel absmax (max over windows, fold shape)
    sink = qmodel.plan.sink_tokens
    if windows.shape[1] <= sink:
        raise ValueError(f"calibrate: windows of {windows.shape[1]} tokens leave nothing after "
                         f"the {sink} sink positions")
    if qmodel.smooth:
        targets = {(s.layer, s.name): (s.key, len(qmodel.smooth[s.key]), None, sink)
                   for s in sites if s.key in qmodel.smooth}
        stats = _collect(qmodel, windows, targets, lambda c, k: np.abs(c).max(axis=0), batch_size,
                         progress, "smoothquant").stats
        absmax = {k: np.max(v, axis=0) for k, v in stats.items()}
        qmodel.smooth.update(smoothquant_folds(qmodel.model, absmax, qmodel.plan.smoothquant_alpha,
                                               qmodel.dtype))

    # pass 2: scale statistics
    targets, qmaxes, bits = {}, {}, {}
    for s in sites:
        if s.scale_key is None:
            continue
        div = qmodel.smooth.get(s.key)
        if div is not None and len(div) != s.channels:
            div = tie_expand(div, group, qmodel.head_dim)
        targets[(s.layer, s.name)] = (s.key, max(1, s.params[s.scale_key].size), div, sink)
        qmaxes[s.key], bits[s.key] = s.qmax, s.bits
    if targets:
        def stat(c, key):
            a = np.abs(c)
            amax = a.max(axis=0)
            if method in ("absmax_mean", "absmax"):
                return amax
            if method == "percentile":
                return np.percentile(a, percentile, axis=0)
            qm = qmaxes[key]
            if not qm:  # control: no rounding, clip error only -> r* = 1
                return amax, np.zeros((len(MSE_RATIOS), a.shape[1]))
            return amax, _mse_errors(c, amax, bits[key])

        obs = _collect(qmodel, windows, targets, stat, batch_size, progress,
                       f"calibrate ({method})")
        stats = obs.stats
        for s in sites:
            if s.scale_key is None:
                continue
            vals, qm = stats[s.key], qmaxes[s.key]
            if method == "mse":
                amax = np.mean([v[0] for v in vals], axis=0)
                ratio = MSE_RATIOS[np.argmin(np.sum([v[1] for v in vals], axis=0), axis=0)]
                stat_v = np.where(qm > 0, ratio, 1.0) * amax
            elif method == "absmax":
                stat_v = np.max(vals, axis=0)
            else:
                stat_v = np.mean(vals, axis=0)
            shape = s.params[s.scale_key].shape
            s.set_value(s.scale_key, np.maximum(stat_v / (qm if qm else 1), MIN_SCALE).reshape(shape))
            if s.gain_key is not None:
                s.set_value(s.gain_key, np.ones(shape))
            if s.rho_key is not None:
                s.params[s.rho_key][...] = RHO_INIT
        if sink:
            _calibrate_sinks(qmodel, obs.sink_absmax)
    if qmodel.plan.weights == "gptq":
        _gptq(qmodel, windows, batch_size, progress)
    qmodel.sync()
    return qmodel


def _gptq(qmodel, windows, batch_size, progress) -> None:
    """GPTQ weights from Hessians of the FP model's (rotated model's) linear inputs on the
    calibration windows; computed once per set of windows (the scales' method does not matter)."""
    from sasq.gptq import collect_hessians, gptq_model_weights
    key = hashlib.blake2b(np.ascontiguousarray(windows).tobytes(), digest_size=16).hexdigest()
    if getattr(qmodel, "_gptq_key", None) == key:
        return
    hess = collect_hessians(qmodel.model, windows, batch_size=batch_size, progress=progress)
    qmodel.set_gptq_weights(gptq_model_weights(qmodel.model, hess, qmodel.plan.w_bits,
                                               act_order=qmodel.plan.act_order,
                                               w_clip=qmodel.plan.w_clip, progress=progress))
    qmodel._gptq_key = key


def _calibrate_sinks(qmodel, sink_absmax: dict) -> None:
    """Sink scale of position p = max over windows and channels of |x_p| in the domain the
    site's input arrives in (divided by its fold), / qmax: a sink is one consistent massive
    value, so no window's sink may be clipped. Never below the body's grid there (1 on a folded
    grid, the body scale per tensor): a position without a massive value is then rounded as the
    body would round it, and a handful of calibration windows cannot make it clip more."""
    folds = qmodel.folds  # the body scales just set
    for s in qmodel.site_list():
        if s.sink_key is None:
            continue
        a = np.max(sink_absmax[s.key], axis=0)  # (k', C): max over windows
        div = qmodel.arriving_divisor(s, folds)
        if div is not None:
            a = a / div
        floor = 1.0 if s.folded else float(np.max(s.value(s.scale_key)))
        v = np.full(s.sink, floor, dtype=np.float64)
        v[: a.shape[0]] = np.maximum(a.max(axis=1) / s.qmax, floor)
        s.set_value(s.sink_key, v)
