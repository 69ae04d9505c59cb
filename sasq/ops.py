"""Thin validated wrappers around the C core `sasq._C` (the NumPy twins are in sasq.reference).

Conventions (DESIGN.md section 2)
- Tensors are float32 (int8 for codes), C-contiguous, at least 1-D and non-empty; they are never
  copied or converted silently: a wrong dtype is a TypeError, a non-contiguous or empty array a
  ValueError, each naming the argument.
- A scale (also a truncation threshold/ceiling) is a Python/NumPy scalar or 0-d array
  (per-tensor) or a 1-D array over the last axis (per-channel); any real dtype is accepted and
  cast to float32. Every value must be finite and > 0 after the cast (ValueError otherwise).
- Symmetric grid q in [-qmax, qmax], qmax = 2**(bits-1) - 1, bits in [2, 8]; rounding is
  half-to-even.
- Non-finite x: `fake_quant` and `truncate` propagate NaN (and saturate +-inf to the ends of the
  range); `quantize` and `truncate_quantize` raise ValueError (an int8 code has no NaN).
  `fake_quant_backward` gives NaN as the gradient of a NaN element and a NaN gradient for the
  scale it uses; `truncate_backward` likewise.
- The GIL is released while a kernel runs. Kernels use a pthread pool of `get_num_threads()`
  threads (default: the CPUs this process may use, or env SASQ_NUM_THREADS); elementwise kernels
  split rows into fixed chunks, so every result is bit-identical for any thread count.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from sasq import _C, blas

__all__ = [
    "quantize", "dequantize", "fake_quant", "fake_quant_backward",
    "truncate", "truncate_backward", "truncate_quantize",
    "gemm_int8", "pack_weights", "linear_int8", "PackedWeights",
    "set_num_threads", "get_num_threads", "available_isas", "set_isa", "get_isa", "qmax",
]

PackedWeights = _C.PackedWeights


def qmax(bits: int) -> int:
    """Largest code of the symmetric `bits`-bit grid: 2**(bits-1) - 1 (127 for INT8)."""
    return (1 << (int(bits) - 1)) - 1


def _bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    return int(bits)


def _vec(value, name: str) -> tuple[np.ndarray, bool]:
    """A scale-like argument as a contiguous float32 1-D array, and whether it was a scalar."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real number or array, got dtype {arr.dtype}")
    if arr.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D over the last axis, got shape {arr.shape}")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf and is rejected in C
        vec = np.ascontiguousarray(arr.reshape(-1), dtype=np.float32)
    return vec, arr.ndim == 0


def _grad_like(grad: np.ndarray, was_scalar: bool):
    return float(grad[0]) if was_scalar else grad


# ---------------------------------------------------------------- quantization

def quantize(x: np.ndarray, scale, bits: int = 8) -> np.ndarray:
    """int8 codes clamp(rint(x / scale), -qmax, qmax); ValueError if x has NaN or inf."""
    s, _ = _vec(scale, "scale")
    return _C.quantize(x, s, _bits(bits))


def dequantize(q: np.ndarray, scale) -> np.ndarray:
    """float32 q * scale."""
    s, _ = _vec(scale, "scale")
    return _C.dequantize(q, s)


def fake_quant(x: np.ndarray, scale, bits: int = 8) -> np.ndarray:
    """scale * clamp(rint(x / scale), -qmax, qmax) in float32; NaN propagates, +-inf saturates."""
    s, _ = _vec(scale, "scale")
    return _C.fake_quant(x, s, _bits(bits))


def fake_quant_backward(x: np.ndarray, scale, grad_out: np.ndarray, bits: int = 8,
                        grad_scale_factor: float = 1.0):
    """Backward of fake_quant: (grad_x, grad_scale).

    grad_x: straight-through inside the range (|x/s| <= qmax), 0 outside, NaN where x is NaN.
    grad_scale (LSQ form, u = x/s): sum of grad_out * (rint(u) - u) inside, * (+-qmax) where
    clipped, over the elements sharing each scale, accumulated in double; then multiplied by
    `grad_scale_factor` (pass LSQ's 1/sqrt(N*qmax) here to use its gradient scaling). Shape of
    `scale`: a float for a scalar scale, a (C,) float32 array for a per-channel one.
    """
    s, scalar = _vec(scale, "scale")
    gx, gs = _C.fake_quant_backward(x, s, grad_out, _bits(bits), float(grad_scale_factor))
    return gx, _grad_like(gs, scalar)


# ---------------------------------------------------------------- truncation

def truncate(x: np.ndarray, threshold, ceiling) -> np.ndarray:
    """Adaptive outlier truncation ("soft knee"), per-tensor or per-channel, 0 < t < c:

        |x| <= t:  y = x
        |x| >  t:  y = sign(x) * (t + (c - t) * tanh((|x| - t) / (c - t)))

    Why this form: it is the identity on the bulk of the distribution (no change below the
    threshold), monotone and continuously differentiable (slope 1 at the knee, decaying to 0), and
    it approaches the ceiling but never exceeds it (far outliers may round to c in float32), so
    with c = scale * qmax the quantizer's clamp never bites: outliers are compressed into the last
    codes in order instead of being cut off.
    Both t and c receive gradients (see truncate_backward), so training can move the knee and the
    range. NaN propagates; +-inf maps to +-c.
    """
    t, _ = _vec(threshold, "threshold")
    c, _ = _vec(ceiling, "ceiling")
    return _C.truncate(x, t, c)


def truncate_backward(x: np.ndarray, threshold, ceiling, grad_out: np.ndarray):
    """(grad_x, grad_threshold, grad_ceiling) of `truncate`. With z = (|x| - t) / (c - t), outside
    the knee: dy/dx = sech^2 z, dy/dt = sign(x) (1 - tanh z + (z - 1) sech^2 z),
    dy/dc = sign(x) (tanh z - z sech^2 z); inside: dy/dx = 1 and no threshold/ceiling gradient.
    The parameter gradients are summed (in double) over the elements sharing each value and have
    the parameter's shape (a float for a scalar). NaN in x gives NaN gradients."""
    t, t_scalar = _vec(threshold, "threshold")
    c, c_scalar = _vec(ceiling, "ceiling")
    gx, gt, gc = _C.truncate_backward(x, t, c, grad_out)
    return gx, _grad_like(gt, t_scalar), _grad_like(gc, c_scalar)


def truncate_quantize(x: np.ndarray, threshold, scale, bits: int = 8) -> np.ndarray:
    """Fused inference path: int8 clamp(rint(truncate(x; t, c = scale * qmax) / scale)).
    Requires threshold < scale * qmax; ValueError if x has NaN or inf."""
    t, _ = _vec(threshold, "threshold")
    s, _ = _vec(scale, "scale")
    return _C.truncate_quantize(x, t, s, _bits(bits))


# ---------------------------------------------------------------- INT8 GEMM

def gemm_int8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int32 a @ b.T for int8 a (..., K) and weights b (N, K); K <= sasq._C.MAX_K."""
    return _C.gemm_int8(a, b)


def pack_weights(w_int8: np.ndarray) -> PackedWeights:
    """Pack int8 weights (N, K) once (VNNI panel layout + 128 * row sums) for linear_int8."""
    return _C.pack_weights(w_int8)


def gemm_packed(a: np.ndarray, packed: PackedWeights) -> np.ndarray:
    """Exact int32 a @ W.T with pre-packed weights."""
    return _C.gemm_packed(a, packed)


def linear_int8(a_q: np.ndarray, packed: PackedWeights, a_scale: float, w_scales) -> np.ndarray:
    """float32 (..., N) = float32(a_q @ W.T) * (float32(a_scale) * w_scales[n]), the scale product
    taken in float32 and applied in the GEMM's store."""
    if not isinstance(packed, PackedWeights):
        raise TypeError(f"packed must be a PackedWeights from pack_weights, got {type(packed).__name__}")
    ws, _ = _vec(w_scales, "w_scales")
    return _C.linear_int8(a_q, packed, float(a_scale), ws)


# ---------------------------------------------------------------- threads and ISA

def set_num_threads(n: int) -> None:
    """Threads of sasq as a whole (1..256): the C kernels' pool and numpy's BLAS, which the
    NumPy model's own worker threads follow."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    _C.set_num_threads(int(n))
    blas.set_num_threads(int(n))


def get_num_threads() -> int:
    return _C.get_num_threads()


def available_isas() -> list[str]:
    """Tiers this CPU can run, best first (a subset of 'avx512vnni', 'avx2', 'scalar')."""
    return _C.available_isas()


def set_isa(name: str) -> None:
    """Force a tier ('avx512vnni', 'avx2', 'scalar') or go back to the best one ('auto')."""
    if not isinstance(name, str):
        raise TypeError(f"isa must be a str, got {type(name).__name__}")
    _C.set_isa(name)


def get_isa() -> str:
    return _C.get_isa()


def _default_threads() -> int:
    env = os.environ.get("SASQ_NUM_THREADS")
    if env:
        try:
            n = int(env)
            if 1 <= n <= 256:
                return n
        except ValueError:
            pass
        warnings.warn(f"ignoring SASQ_NUM_THREADS={env!r} (want an int in [1, 256])", stacklevel=2)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(256, n))


_C.set_num_threads(_default_threads())
