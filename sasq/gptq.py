"""GPTQ weight rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), pure NumPy, float64 inside.

The problem, per linear layer y = x W^T with calibration inputs X (N, in): choose codes Q on the
symmetric per-output-channel grid (sasq.grid, scale s per row) minimising ||X W^T - X (Q s)^T||_F^2.
Rows are independent given H = 2/N X^T X (in, in). GPTQ rounds the columns one at a time (in index
order, or by decreasing H_ii with act_order) and spreads each column's rounding error over the
columns not yet rounded, with the optimal-brain-surgeon update

    err = (w_j - q_j s) / [H_F^-1]_jj,   w_F -= err [H_F^-1]_{j,F}   (F: columns not yet rounded)

where H_F^-1 is the inverse restricted to F. Row j of the upper Cholesky factor U of H^-1
(H^-1 = U^T U) is row j of H_F^-1 divided by U_jj, so one factorisation replaces the n downdates:
err = (w_j - q_j s) / U_jj and w_F -= err U_jF. Updates are lazy: a column collects the updates of
the earlier columns of its block of `block_size` when it is rounded (one GEMV), the columns right of
the block get the whole block's errors once (one GEMM).

Conventions (as the reference implementation; chosen so GPTQ codes replace RTN codes one for one):
- scales: absmax(row)/qmax of the original w (1 for an all-zero row) in w's dtype, the rule of
  sasq.transforms.quantize_weight, or given; codes clamp(rint(w/s), -qmax, qmax), half to even.
  The quotient w/s is rounded to w's dtype before rint, as quantize_weight computes it in w's dtype:
  with a diagonal H (no error to spread) the codes equal RTN's bit for bit (float64 -> float32 is an
  innocuous double rounding for a quotient of float32 numbers).
- damping: damp * mean(diag H) added to the diagonal (after the dead-input fix).
- dead inputs (H_ii == 0: the input is always 0): H_ii = 1 and w[:, i] = 0, so their codes are 0.
- act_order: columns are rounded by decreasing H_ii (ties by index); codes come back in the
  original column order. The Hessian's overall scale never changes the codes (damping is relative,
  the update a ratio), so N may count rows or sequences.

Hessians come from the FP model's activations (HessianCollector / collect_hessians); q/k/v share
"attn_in", o_proj "o_in", gate/up "mlp_in", down_proj "down_in", lm_head "head_in". For folded or
rotated models, collect on (and quantize) the transformed model.
"""
from __future__ import annotations

import numbers

import numpy as np

from sasq import grid
from sasq.blas import blas_threads_for
from sasq.model import Observer

# matrix -> the activation site whose Hessian it uses (its input)
MATRIX_SITES = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in",
}
# site -> its consumers in a decoder layer (rounded together: they share H, rows are independent)
SITE_MATRICES = {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",),
                 "mlp_in": ("gate_proj", "up_proj"), "down_in": ("down_proj",)}
HESSIAN_SITES = ("attn_in", "o_in", "mlp_in", "down_in", "head_in")
SYMMETRY_RTOL = 1e-6  # |H - H^T| allowed, relative to max |H| (float32-accumulated inputs)


# --------------------------------------------------------------------------- argument checks

def _check_weight(w) -> np.ndarray:
    if not isinstance(w, np.ndarray) or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"w must be a 2-D float array (out, in), got "
                         f"{getattr(w, 'dtype', type(w).__name__)} {getattr(w, 'shape', '')}")
    if w.size == 0:
        raise ValueError(f"w must not be empty, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("w has NaN or inf")
    return w


def _check_hessian(h, n: int) -> np.ndarray:
    if not isinstance(h, np.ndarray) or not np.issubdtype(h.dtype, np.floating):
        raise ValueError(f"hessian must be a float array, got "
                         f"{getattr(h, 'dtype', type(h).__name__)}")
    if h.shape != (n, n):
        raise ValueError(f"hessian must have shape ({n}, {n}) for w with {n} input columns, "
                         f"got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian has NaN or inf")
    h = h.astype(np.float64)  # a copy: the dead-input fix and damping write into it
    # x^T x from BLAS (syrk) is exactly symmetric: the cheap test first
    if not np.array_equal(h, h.T) and np.max(np.abs(h - h.T)) > SYMMETRY_RTOL * np.max(np.abs(h)):
        raise ValueError("hessian is not symmetric")
    return h


def _check_scales(scales, w: np.ndarray) -> np.ndarray:
    s = np.asarray(scales)
    if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"scales must be a float array, got dtype {s.dtype}")
    if s.shape != (w.shape[0],):
        raise ValueError(f"scales must have shape ({w.shape[0]},) (one per output row), "
                         f"got {s.shape}")
    s = s.astype(w.dtype)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"scales must be finite and > 0 in {w.dtype}")
    return s


def _check_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def default_scales(w: np.ndarray, bits: int) -> np.ndarray:
    """absmax(row)/qmax (1 for an all-zero row), (out,) in w's dtype: the RTN scale rule."""
    amax = np.abs(w).max(axis=1)
    return np.where(amax > 0, amax / grid.qmax(bits), 1).astype(w.dtype)


# --------------------------------------------------------------------------- one matrix

def _tril_inverse(low: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (GEMMs, n^3/3 multiply-adds;
    NumPy has no trtri and a general inverse costs 5x as much at n = 1536)."""
    n = low.shape[0]
    if n <= 64:  # LU with pivoting can leave rounding noise above the diagonal
        return np.tril(np.linalg.inv(low))
    k = n // 2
    a_inv, c_inv = _tril_inverse(low[:k, :k]), _tril_inverse(low[k:, k:])
    out = np.zeros_like(low)
    out[:k, :k], out[k:, k:] = a_inv, c_inv
    # [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]
    out[k:, :k] = -(c_inv @ (low[k:, :k] @ a_inv))
    return out


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper U with U^T U = (h + damp mean(diag h) I)^-1 (the upper Cholesky factor of the damped
    inverse); h (n, n) float64 is damped in place.

    Without forming the inverse: with J the order reversal, J h J = L L^T gives h = R R^T for the
    upper R = J L J, so h^-1 = R^-T R^-1 = U^T U with U = R^-1 = J L^-1 J upper with a positive
    diagonal, which is the (unique) Cholesky factor the reference gets from chol(chol_inv(h))."""
    n = h.shape[0]
    h[np.diag_indices(n)] += damp * np.mean(np.diag(h))
    try:
        low = np.linalg.cholesky(h[::-1, ::-1])           # J h J = L L^T
        u = np.ascontiguousarray(_tril_inverse(low)[::-1, ::-1])  # J L^-1 J, upper
    except np.linalg.LinAlgError:
        raise ValueError(f"hessian is not positive definite even after damping "
                         f"(damp={damp:g} x mean diag); raise damp or use more calibration "
                         f"data") from None
    if not np.all(np.isfinite(u)) or np.any(np.diag(u) <= 0):
        raise ValueError(f"hessian is not positive definite even after damping (damp={damp:g}); "
                         f"its inverse lost precision")
    return u


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, scales=None):
    """GPTQ-round w (out, in) given the input Hessian (in, in): (codes (out, in) int8, scales
    (out,) in w's dtype) with w ~ codes * scales[:, None]. Conventions: module docstring."""
    w = _check_weight(w)
    out_dim, n = w.shape
    h = _check_hessian(hessian, n)
    qm = grid.qmax(bits)
    block_size = _check_int(block_size, "block_size", 1)
    if (isinstance(damp, bool) or not isinstance(damp, numbers.Real)
            or not (np.isfinite(damp) and damp >= 0)):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    scale = default_scales(w, bits) if scales is None else _check_scales(scales, w)  # (out,)
    s64 = scale.astype(np.float64)

    # columns as rows: the per-column steps below read contiguous (out,) vectors
    wt = w.T.astype(np.float64)  # (in, out), a copy
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else None
    if perm is not None:
        wt = wt[perm]
        h = h[np.ix_(perm, perm)]
    with blas_threads_for(n ** 3 // 3):  # the Cholesky's multiply-adds: small ones on 1 thread
        u = _inverse_cholesky(h, float(damp))  # (in, in) upper

    codes = np.empty((n, out_dim), dtype=np.int8)  # (in, out), transposed at the end
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        blk = wt[b0:b1]             # (B, out): the block as updated by the earlier blocks
        err = np.empty_like(blk)    # (B, out) scaled errors of the block's columns
        ub = u[b0:b1, b0:b1]        # (B, B) upper
        # small GEMVs: one BLAS thread (threads spinning on a busy machine cost 100x, sasq.blas)
        with blas_threads_for(0):
            for j in range(b1 - b0):
                # the updates from the block's earlier columns, pulled when the column is
                # rounded (one GEMV; the same sum as the reference's rank-1 pushes, 3x faster)
                col = blk[j] - ub[:j, j] @ err[:j]  # (out,)
                # quotient in w's dtype, as RTN computes it (module docstring)
                q = np.rint((col / s64).astype(w.dtype, copy=False))
                np.clip(q, -qm, qm, out=q)
                codes[b0 + j] = q
                e = col - q * s64
                e /= ub[j, j]
                err[j] = e
        if b1 < n:  # lazy batch: the columns right of the block get the whole block's errors once
            wt[b1:] -= u[b0:b1, b1:].T @ err
    if perm is not None:
        codes = codes[np.argsort(perm)]
    return np.ascontiguousarray(codes.T), scale


# --------------------------------------------------------------------------- Hessians

class HessianCollector(Observer):
    """Accumulates sum x^T x (float64) and the row count N at chosen (layer, site) keys of the FP
    model's forward; hessians() gives H = 2/N sum x^T x per key. Changes no activation."""

    def __init__(self, keys):
        self.keys = frozenset(keys)
        for layer, site in self.keys:
            if site not in HESSIAN_SITES:
                raise ValueError(f"site {site!r} is not the input of a linear layer; "
                                 f"choose from {HESSIAN_SITES}")
        self.sums: dict = {}  # (layer, site) -> (C, C) float64
        self.rows: dict = {}  # (layer, site) -> N

    def observe(self, layer, site, x, pos):
        key = (layer, site)
        if key not in self.keys:
            return
        x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)  # (B*T, C)
        xtx = x2.T @ x2  # (C, C)
        if key in self.sums:
            self.sums[key] += xtx
        else:
            self.sums[key] = xtx
        self.rows[key] = self.rows.get(key, 0) + x2.shape[0]

    def hessian(self, key, inplace: bool = False) -> np.ndarray:
        """2/N sum x^T x for one key (inplace: scale the stored sum and hand it over)."""
        if key not in self.sums:
            raise KeyError(f"no activations were observed at {key}")
        s = self.sums.pop(key) if inplace else self.sums[key].copy()
        s *= 2.0 / self.rows[key]
        return s

    def hessians(self) -> dict:
        return {k: self.hessian(k) for k in sorted(self.sums)}


def collect_hessians(model, windows, sites=("attn_in", "o_in", "mlp_in", "down_in"),
                     batch_size: int = 1, progress: bool = True) -> dict:
    """{(layer, site): H (C, C) float64} from the FP model's forward over token windows (n, T)
    (a 1-D array is one window); head_in is keyed by layer num_hidden_layers. Float64 H for
    every layer at once: SmolLM2-135M's four sites take about 0.8 GB."""
    from sasq.progress import bar

    wins = np.asarray(windows)
    if wins.ndim == 1:
        wins = wins[None]
    if wins.ndim != 2 or wins.shape[0] == 0 or not np.issubdtype(wins.dtype, np.integer):
        raise ValueError(f"windows must be integer token ids (n, T), got {wins.dtype} {wins.shape}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    sites = tuple(sites)
    if not sites:
        raise ValueError("sites must name at least one site")
    nl = model.config.num_hidden_layers
    keys = [(nl, s) if s == "head_in" else (i, s) for s in dict.fromkeys(sites)
            for i in (range(1) if s == "head_in" else range(nl))]
    obs = HessianCollector(keys)
    for b0 in bar(range(0, wins.shape[0], batch_size), desc="hessians", disable=not progress):
        model.forward(wins[b0:b0 + batch_size], hook=obs, return_hidden=True)
    return {k: obs.hessian(k, inplace=True) for k in sorted(keys)}


# --------------------------------------------------------------------------- a model

def gptq_model_weights(model, hessians: dict, bits: int, block_size: int = 128,
                       damp: float = 0.01, act_order: bool = False, w_clip: bool = False,
                       progress: bool = True) -> dict:
    """{(layer, matrix): (codes, scales)} for the seven linear weights of every decoder layer,
    from hessians[(layer, site)] (MATRIX_SITES). The consumers of one site are rounded as one
    stacked matrix (the same H, and GPTQ treats rows independently); w_clip: each row's scale
    searched first (sasq.wclip), else absmax. Never writes into model."""
    from sasq.progress import bar

    grid.check_bits(bits)
    nl = model.config.num_hidden_layers
    out = {}
    with bar(total=nl * len(SITE_MATRICES), desc=f"gptq w{bits}", disable=not progress) as pbar:
        for i, lw in enumerate(model.layers):
            for site, names in SITE_MATRICES.items():
                h = hessians.get((i, site))
                if h is None:
                    raise ValueError(f"hessians has no entry for (layer {i}, {site!r})")
                mats = [getattr(lw, name) for name in names]
                stacked = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=0)
                try:
                    sc = None
                    if w_clip:
                        from sasq.wclip import search_scales
                        sc = search_scales(stacked, bits)
                    codes, scales = gptq_quantize(stacked, h, bits, block_size, damp, act_order,
                                                  scales=sc)
                except ValueError as e:
                    raise ValueError(f"layer {i} {'/'.join(names)}: {e}") from None
                r0 = 0
                for name, m in zip(names, mats):
                    r1 = r0 + m.shape[0]
                    out[(i, name)] = (codes[r0:r1].copy(), scales[r0:r1].copy())
                    r0 = r1
                pbar.update()
    return out
