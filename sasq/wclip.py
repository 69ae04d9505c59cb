"""Per-row weight scales searched for the least rounding error (QuaRot's and GPTQ's `w_clip`).

For each output row, the symmetric grid's scale is absmax(row) * r / qmax for the shrink r in
{1, 1 - 1/grid, 1 - 2/grid, ...} (grid * max_shrink candidates, down to 1 - max_shrink) that minimizes
sum |w - s clamp(rint(w / s), -qmax, qmax)|^norm over the row (norm 2.4 as GPTQ's quantizer: a
little more weight on large errors than the MSE). r = 1 (absmax) is a candidate, so the error is
never larger than RTN's. Rounding as sasq.transforms.quantize_weight: the quotient in w's dtype,
half to even. Pure NumPy, float64 error sums; a pure function of w.
"""
from __future__ import annotations

import numpy as np

from sasq import grid

GRID = 100
MAX_SHRINK = 0.8
NORM = 2.4


def search_scales(w: np.ndarray, bits: int, n_grid: int = GRID, max_shrink: float = MAX_SHRINK,
                  norm: float = NORM, rows_per_block: int = 256) -> np.ndarray:
    """w (out, in) float -> scales (out,) in w's dtype (1 for an all-zero row)."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or w.size == 0:
        raise ValueError(f"w must be a non-empty 2-D float array (out, in), got {w.dtype} {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w has NaN or inf entries")
    if not (isinstance(n_grid, int) and n_grid >= 1 and 0 <= max_shrink < 1 and norm > 0):
        raise ValueError(f"need n_grid >= 1, 0 <= max_shrink < 1, norm > 0; got {n_grid}, "
                         f"{max_shrink}, {norm}")
    qm = grid.qmax(bits)
    dt = w.dtype
    amax = np.abs(w).max(axis=1)
    out = np.where(amax > 0, amax / qm, 1).astype(dt)
    steps = max(1, int(n_grid * max_shrink))
    for r0 in range(0, w.shape[0], rows_per_block):
        blk = w[r0:r0 + rows_per_block]
        a = amax[r0:r0 + rows_per_block]
        live = a > 0
        best = np.full(blk.shape[0], np.inf)
        for i in range(steps):
            r = 1.0 - i / n_grid
            s = np.where(live, a * dt.type(r) / dt.type(qm), 1).astype(dt)  # (rows,)
            q = np.clip(np.rint(blk / s[:, None]), -qm, qm)  # quotient in w's dtype
            err = np.sum(np.abs(q.astype(np.float64) * s[:, None] - blk) ** norm, axis=1)
            better = (err < best) & live
            best[better] = err[better]
            out[r0:r0 + rows_per_block][better] = s[better]
    return out


def quantize_rows(w: np.ndarray, scales: np.ndarray, bits: int):
    """(codes (out, in) int8, scales) of w on the given per-row scales (RTN's rounding rule)."""
    qm = grid.qmax(bits)
    codes = np.clip(np.rint(w / scales[:, None]), -qm, qm).astype(np.int8)
    return codes, scales
