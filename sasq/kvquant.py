"""Dynamic asymmetric KV-cache rounding per token and head (QuaRot's KV form), NumPy.

Each group of `group` consecutive channels of a row (one KV head of one token) gets its own grid,
computed at run time from the group's range, widened to hold 0 so that 0 is exact:

    lo = clip * min(0, min x),  hi = clip * max(0, max x),  s = (hi - lo) / (2^bits - 1)
    z = rint(-lo / s),  q = clamp(rint(x / s) + z, 0, 2^bits - 1),  y = s (q - z)

(s = 1 for an all-zero group). Unsigned codes q and one (s, z) per group are what a cache would
store; the model and the engine keep y. float32 in, float32 arithmetic; NaN propagates to its row's
group. The gradient is the straight-through estimator (nothing trained sits on this grid).
"""
from __future__ import annotations

import numpy as np


def fake_quant_asym_groups(x: np.ndarray, bits: int, group: int, clip: float = 1.0) -> np.ndarray:
    """x (..., C) -> y (..., C) on the per-group asymmetric grid above (C a multiple of group)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x must be a float array, got {x.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)):
        raise ValueError(f"group must be an int, got {group!r}")
    if x.ndim == 0 or group < 1 or x.shape[-1] % group:
        raise ValueError(f"the last axis ({x.shape[-1:] or 'none'}) must be a multiple of the "
                         f"group size {group}")
    if not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip!r}")
    dt = x.dtype.type
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)          # (..., C/g, g)
    lo = np.minimum(g.min(axis=-1, keepdims=True), 0) * dt(clip)
    hi = np.maximum(g.max(axis=-1, keepdims=True), 0) * dt(clip)
    qmax = dt(2 ** int(bits) - 1)
    s = (hi - lo) / qmax
    s = np.where(s == 0, dt(1), s).astype(x.dtype)  # an all-zero group; a NaN range stays NaN
    z = np.rint(-lo / s)
    q = np.clip(np.rint(g / s) + z, 0, qmax)
    return ((q - z) * s).astype(x.dtype).reshape(x.shape)
