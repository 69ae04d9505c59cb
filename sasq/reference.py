"""NumPy twins of the C kernels in sasq.ops: the test oracle, and a fallback that works in any
float dtype (float64 for gradient checks). Same conventions and NaN rules as sasq.ops; no
argument checking beyond what the semantics need.

Shapes: x (..., C); a scale/threshold/ceiling is a scalar or (C,).
"""
from __future__ import annotations

import numpy as np

from sasq import grid
from sasq import hadamard as hadamard_mod

Z_CAP = 30.0  # truncation: tanh(30) == 1 in double; keeps +-inf finite in the gradients
LINEAR_MAX_ACC = 128 * 128  # |a_q @ W.T| <= LINEAR_MAX_ACC * K

qmax = grid.qmax  # the one implementation (validated bits), shared with sasq.ops


def _check_top(scale, top, dtype, name="scale"):
    """The overflow rule of sasq.ops: scale * top finite in x's dtype (top = qmax of the grid,
    or 128 for dequantizing any int8 code); ValueError naming the scale otherwise."""
    dt = np.dtype(dtype)
    with np.errstate(over="ignore"):
        ok = np.all(np.isfinite(_p(scale, dt) * dt.type(top)))
    if not ok:
        raise ValueError(f"{name} * {top} overflows {dt.name}")


def _p(value, dtype) -> np.ndarray:
    return np.asarray(value, dtype=dtype)


def _reduce_to(grad64: np.ndarray, param) -> np.ndarray | float:
    """Sum a float64 per-element gradient (..., C) down to the parameter's shape."""
    if np.ndim(param) == 0:
        return float(grad64.sum())
    return grad64.reshape(-1, grad64.shape[-1]).sum(axis=0)


# ---------------------------------------------------------------- quantization

def quantize(x, scale, bits=8):  # (..., C) -> int8 (..., C)
    if not np.all(np.isfinite(x)):
        raise ValueError("quantize: x contains NaN or inf")
    qm = qmax(bits)  # no overflow rule: x / s = inf only saturates the code, which is exact
    return np.clip(np.rint(x / _p(scale, x.dtype)), -qm, qm).astype(np.int8)


def quantize_dynamic(x, bits=8, clip=1.0):  # (..., C) -> (int8 (..., C), scales (...,))
    if not np.all(np.isfinite(x)):
        raise ValueError("quantize_dynamic: x contains NaN or inf")
    qm = qmax(bits)
    a = np.abs(x).max(axis=-1)
    s = (a if clip == 1 else a * x.dtype.type(clip)) / x.dtype.type(qm)
    s = np.where(s > 0, s, 1).astype(x.dtype)
    return np.clip(np.rint(x / s[..., None]), -qm, qm).astype(np.int8), s


def dequantize(q, scale, dtype=np.float32):
    _check_top(scale, 128, dtype)
    return q.astype(dtype) * _p(scale, dtype)


def fake_quant(x, scale, bits=8):
    s = _p(scale, x.dtype)
    qm = qmax(bits)
    _check_top(scale, qm, x.dtype)
    return s * np.clip(np.rint(x / s), -qm, qm)  # np.clip keeps NaN


def fake_quant_backward(x, scale, grad_out, bits=8, grad_scale_factor=1.0):
    """STE for x, LSQ gradient for the scale (see sasq.ops.fake_quant_backward)."""
    s = _p(scale, x.dtype)
    qm = qmax(bits)
    _check_top(scale, qm, x.dtype)
    u = x / s
    inside = np.abs(u) <= qm
    grad_x = np.where(inside, grad_out, 0).astype(x.dtype)
    grad_x[np.isnan(u)] = np.nan
    ds = np.where(u > qm, qm, np.where(u < -qm, -qm, np.rint(u) - u)).astype(x.dtype)
    gs = _reduce_to(grad_out.astype(np.float64) * ds.astype(np.float64), scale)
    if np.ndim(scale) == 0:
        return grad_x, float(x.dtype.type(gs * grad_scale_factor))
    return grad_x, (gs * grad_scale_factor).astype(x.dtype)


# ---------------------------------------------------------------- truncation

def _knee(x, t, c):
    """float64 (a, z, sign) of the soft knee; z only meaningful where a > t."""
    x64 = x.astype(np.float64)
    a = np.abs(x64)
    with np.errstate(invalid="ignore"):
        z = np.minimum((a - t) / (c - t), Z_CAP)  # np.minimum keeps NaN
    return x64, a, z


def truncate(x, threshold, ceiling):
    """|x| <= t: x; else sign(x) * (t + (c - t) tanh((|x| - t) / (c - t))). Computed in float64,
    rounded once to x.dtype (as the C kernel does)."""
    t = _p(_p(threshold, x.dtype), np.float64)  # parameters live in x's precision
    c = _p(_p(ceiling, x.dtype), np.float64)
    x64, a, z = _knee(x, t, c)
    y = np.where(a <= t, x64, np.sign(x64) * (t + (c - t) * np.tanh(z)))
    return y.astype(x.dtype)


def truncate_backward(x, threshold, ceiling, grad_out):
    t = _p(_p(threshold, x.dtype), np.float64)  # parameters live in x's precision
    c = _p(_p(ceiling, x.dtype), np.float64)
    x64, a, z = _knee(x, t, c)
    g = grad_out.astype(np.float64)
    outside = ~(a <= t)  # NaN counts as outside, so NaN propagates
    z = np.where(outside, z, 0.0)  # z of the elements inside the knee is never used
    th, s2 = np.tanh(z), 1.0 / np.cosh(z) ** 2
    e = np.exp(-2.0 * z)
    om = 2.0 * e / (1.0 + e)  # 1 - tanh z, without cancelling where tanh z rounds to 1
    sg = np.where(x64 < 0, -1.0, 1.0)
    sg = np.where(np.isnan(x64), np.nan, sg)
    grad_x = np.where(outside, g * s2, g)
    gt = np.where(outside, g * sg * (om + (z - 1.0) * s2), 0.0)
    gc = np.where(outside, g * sg * (th - z * s2), 0.0)
    gt_r, gc_r = _reduce_to(gt, threshold), _reduce_to(gc, ceiling)
    cast = lambda v: float(x.dtype.type(v)) if np.ndim(v) == 0 else v.astype(x.dtype)
    return grad_x.astype(x.dtype), cast(gt_r), cast(gc_r)


def truncate_quantize(x, threshold, scale, bits=8):
    if not np.all(np.isfinite(x)):
        raise ValueError("truncate_quantize: x contains NaN or inf")
    qm = qmax(bits)
    _check_top(scale, qm, x.dtype)  # an infinite ceiling would give t + inf * 0 = NaN codes
    s = _p(scale, x.dtype)
    c = s * x.dtype.type(qm)  # the ceiling in x's precision, as the kernel forms it
    y = truncate(x, threshold, c)
    return np.clip(np.rint(y / s), -qm, qm).astype(np.int8)


# ---------------------------------------------------------------- weights

def _fold(w, col, row):
    if col is not None:
        w = w * np.asarray(col, w.dtype)[None, :]
    if row is not None:
        w = w / np.asarray(row, w.dtype)[:, None]
    return w


def _rtn(w, bits):  # -> (codes as floats, scales (out, 1)), in w's dtype
    qm = qmax(bits)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / qm, 1).astype(w.dtype)[:, None]
    q = np.divide(w, scale)
    np.rint(q, out=q)
    np.clip(q, -qm, qm, out=q)
    return q, scale


def fold_quant_weight(w, bits, col=None, row=None):
    """Twin of sasq.ops.fold_quant_weight, in w's dtype (any float)."""
    w = _fold(w, col, row)
    if bits is None:
        return w
    if not np.all(np.isfinite(w)):
        raise ValueError("fold_quant_weight: w (after the fold) has NaN or inf")
    q, scale = _rtn(w, bits)
    q *= scale
    return q


def fold_quant_weight_codes(w, bits, col=None, row=None):
    codes, scale = fold_quantize_weight(w, bits, col, row)
    return codes.astype(w.dtype) * scale[:, None], codes, scale


def fold_quantize_weight(w, bits, col=None, row=None):
    w = _fold(w, col, row)
    if not np.all(np.isfinite(w)):
        raise ValueError("fold_quant_weight: w (after the fold) has NaN or inf")
    q, scale = _rtn(w, bits)
    return q.astype(np.int8), scale[:, 0]


# ---------------------------------------------------------------- Hadamard rotation

def hadamard_dense(n, small=None):
    """M = kron(S, H_p) / sqrt(n) (n, n) float64, the matrix sasq.ops.hadamard applies (as x M^T);
    S = small, or the default construction of sasq.hadamard for n."""
    if small is None:
        return hadamard_mod.hadamard_matrix(n)
    s = np.asarray(small, np.float64)
    p = n // s.shape[0]
    assert s.shape[0] * p == n and p & (p - 1) == 0, "n must be m * 2^k"
    return np.kron(s, hadamard_mod.sylvester(p.bit_length() - 1).astype(np.float64)) / np.sqrt(n)


def hadamard(x, small=None, transpose=False):  # (..., n) -> (..., n)
    """The explicit product y = x M^T (x M when transpose) with the dense M of hadamard_dense,
    in float64, rounded once to x.dtype (float32 small like the kernel's: pass the same S)."""
    m = hadamard_dense(x.shape[-1], small)
    y = x.astype(np.float64) @ (m if transpose else m.T)
    return y.astype(x.dtype)


def hadamard_quantize(x, scale, bits=8, small=None, transpose=False):
    return quantize(hadamard(x, small, transpose), scale, bits)


def hadamard_fake_quant(x, scale, bits=8, small=None, transpose=False):
    return fake_quant(hadamard(x, small, transpose), scale, bits)


# ---------------------------------------------------------------- INT8 GEMM

def gemm_int8(a, b):  # (..., K) int8, (N, K) int8 -> (..., N) int32, exact
    c = a.astype(np.int64) @ b.astype(np.int64).T
    assert np.abs(c).max(initial=0) < 2**31
    return c.astype(np.int32)


def pack_weights(w_int8):
    """The packed form is a layout detail of the C kernel; the twin keeps the plain matrix."""
    return np.asarray(w_int8)


def linear_int8(a_q, packed, a_scale, w_scales):
    """The combined scale must be a normal float32 with LINEAR_MAX_ACC * K * comb finite (the
    rule of sasq.ops.linear_int8): no output overflows, none is 0 * inf. A 1-D a_scale holds one
    scale per row: (acc * w_scales) * a_scale[row]."""
    if np.ndim(a_scale) == 1:
        ws = np.asarray(w_scales, dtype=np.float32)
        rows = np.asarray(a_scale, dtype=np.float32)
        for extreme in (rows.min() * ws.min(), rows.max() * ws.max()):
            linear_int8(np.zeros((1, np.shape(packed)[-1]), np.int8), packed, extreme, ws[:1] * 0 + 1)
        acc = gemm_int8(a_q, packed).astype(np.float32)  # (..., N)
        y = (acc * ws).reshape(-1, ws.size)
        y *= rows[:, None]
        return y.reshape(acc.shape)
    with np.errstate(over="ignore", under="ignore"):
        comb = np.float32(a_scale) * np.asarray(w_scales, dtype=np.float32)
    k = np.shape(packed)[-1]
    f32 = np.finfo(np.float32)
    if not np.all((comb >= f32.tiny) & (comb.astype(np.float64) * LINEAR_MAX_ACC * k <= float(f32.max))):
        raise ValueError("a_scale * w_scales: the combined float32 scale overflows, underflows "
                         "or lets the output overflow")
    return gemm_int8(a_q, packed).astype(np.float32) * comb
