"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights.

Per input channel j of a linear site: f_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), the maximum of
|W| taken over every consumer of the site (q/k/v share attn_in, gate/up share mlp_in). The producer
divides by f and the consumer columns are multiplied by f (the same fold as sasq.quant's
per-channel scales: RMSNorm gain, rows of up_proj / v_proj), then the smoothed activation is
quantized per tensor (static) or per token (dynamic). With GQA, o_in's factors are tied per KV
channel (they fold into v_proj rows). We smooth all four linear sites (the original LLaMA recipe
smooths only attn_in and mlp_in; the other two folds are exact as well).
"""
from __future__ import annotations

import numpy as np

MIN_FACTOR = 1e-5


def smoothing_factors(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
    """f = act^alpha / w^(1-alpha); channels with a zero statistic keep f = 1."""
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(weight_absmax, dtype=np.float64)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax {a.shape} and weight_absmax {w.shape} differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    f = np.ones_like(a)
    f[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.maximum(f, MIN_FACTOR)


def consumer_column_absmax(qmodel, layer: int, site: str) -> np.ndarray:
    """max |W[:, j]| over the FP consumer weights of a site, in the site's fold shape."""
    m = qmodel.model
    if site == "head_in":
        return np.abs(m.lm_head).max(axis=0)
    lw = m.layers[layer]
    names = {"attn_in": ("q_proj", "k_proj", "v_proj"), "mlp_in": ("gate_proj", "up_proj"),
             "down_in": ("down_proj",), "o_in": ("o_proj",)}[site]
    w = np.max([np.abs(getattr(lw, n)).max(axis=0) for n in names], axis=0)
    if site == "o_in":
        w = tie_kv(w, qmodel.n_heads, qmodel.n_kv, qmodel.head_dim)
    return w


def tie_kv(v: np.ndarray, n_heads: int, n_kv: int, hd: int) -> np.ndarray:
    """(H*hd,) -> (KVH*hd,) max over the query heads that share a KV head."""
    g = n_heads // n_kv
    return v.reshape(n_kv, g, hd).max(axis=1).reshape(-1)


def apply_smoothing(qmodel, act_absmax: dict[str, np.ndarray], alpha: float | None = None) -> None:
    """Set qmodel.smooth from per-channel activation absmax (site key -> fold-shape vector)."""
    alpha = qmodel.plan.smoothquant_alpha if alpha is None else alpha
    if alpha is None:
        raise ValueError("apply_smoothing: the plan has no smoothquant_alpha")
    for key, f in qmodel.smooth.items():
        if key not in act_absmax:
            raise ValueError(f"apply_smoothing: no activation statistics for {key}")
        st = next(s for s in qmodel.hook.sites.values() if s.key == key)
        w = consumer_column_absmax(qmodel, st.layer, st.site)
        f[...] = smoothing_factors(act_absmax[key], w, alpha).astype(f.dtype)
