"""Thin validated wrappers around the C core `sasq._C` (the NumPy twins are in sasq.reference).

Conventions (DESIGN.md section 2)
- Tensors are float32 (int8 for codes), C-contiguous, at least 1-D and non-empty; they are never
  copied or converted silently: a wrong dtype is a TypeError, a non-contiguous or empty array a
  ValueError, each naming the argument.
- A scale (also a truncation threshold/ceiling) is a Python/NumPy scalar or 0-d array
  (per-tensor) or a 1-D array over the last axis (per-channel); any real dtype is accepted and
  cast to float32. Every value must be finite and > 0 after the cast (ValueError otherwise).
  Arguments that are not real numbers (bool, str, bytes, complex, None) are a TypeError; a
  ragged sequence is a ValueError; both name the argument.
- Symmetric grid q in [-qmax, qmax], qmax = 2**(bits-1) - 1, bits an int in [2, 8] (sasq.grid);
  rounding is half-to-even.
- No result is computed from an overflowed intermediate. Where a scale would make one overflow
  float32, the call is refused with a ValueError naming the scale:
    fake_quant, fake_quant_backward, truncate_quantize: scale * qmax must be finite in float32
      (the ends of the grid, hence every fake-quantized value and the truncation ceiling
      c = scale * qmax, are representable); e.g. scale 1e37 at 8 bits is refused.
    quantize has no such rule: x / scale overflowing to +-inf only saturates the code to
      +-qmax, which is the exact answer (quantize(x, 3e38) gives zeros for |x| < 1.5e38).
    dequantize: scale * 128 must be finite (every int8 code, -128 included).
    linear_int8: c_n = float32(a_scale) * w_scales[n] must be a normal float32 (no overflow to
      inf, no underflow to 0) and 16384 * K * c_n (the largest |a_q @ W.T| times c_n) finite,
      so no output can overflow and 0 * inf (NaN) cannot occur.
- Non-finite x: `fake_quant` and `truncate` propagate NaN (and saturate +-inf to the ends of the
  range); `quantize` and `truncate_quantize` raise ValueError (an int8 code has no NaN).
  `fake_quant_backward` gives NaN as the gradient of a NaN element and a NaN gradient for the
  scale it uses; `truncate_backward` likewise.
- The GIL is released while a kernel runs. Kernels use a pthread pool of `get_num_threads()`
  threads (default: the CPUs this process may use, or env SASQ_NUM_THREADS); elementwise kernels
  split rows into fixed chunks, so every result is bit-identical for any thread count.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import warnings

import numpy as np

from sasq import _C, blas, grid
from sasq import hadamard as hadamard_mod

__all__ = [
    "quantize", "quantize_dynamic", "dequantize", "fake_quant", "fake_quant_backward",
    "truncate", "truncate_backward", "truncate_quantize",
    "hadamard", "hadamard_quantize", "hadamard_fake_quant",
    "fold_quant_weight", "fold_quantize_weight",
    "gemm_int8", "pack_weights", "linear_int8", "PackedWeights",
    "set_num_threads", "get_num_threads", "available_isas", "set_isa", "get_isa", "qmax",
]

PackedWeights = _C.PackedWeights


qmax = grid.qmax  # the one implementation (validated bits), shared with sasq.reference


def _bits(bits) -> int:
    return grid.check_bits(bits, "bits")


def _real(v, name: str) -> float:
    """One real number (not bool, str or bytes) as a float64; huge ints become +-inf."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:  # an int beyond float64: as infinite as the float cast makes 1e400
        return math.inf if v > 0 else -math.inf


def _vec(value, name: str) -> tuple[np.ndarray, bool]:
    """A scale-like argument as a contiguous float32 1-D array, and whether it was a scalar.
    TypeError for anything that is not real numbers (bool, str, bytes, complex, None, objects),
    ValueError naming the argument for a ragged or >1-D shape; values beyond float32 become
    +-inf here and are refused (finite and > 0) by the C checks."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number or array, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested sequences
        raise ValueError(f"{name} must be a scalar or a 1-D sequence of numbers "
                         f"({str(e).splitlines()[0]})") from None
    if arr.dtype == object:  # e.g. Python ints beyond int64, Fractions: convert one by one
        arr = np.array([_real(v, name) for v in arr.reshape(-1)], np.float64).reshape(arr.shape)
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
    """int8 codes clamp(rint(x / scale), -qmax, qmax); ValueError if x has NaN or inf. Any
    finite scale > 0 is accepted (an overflowing x / scale saturates, which is exact)."""
    s, _ = _vec(scale, "scale")
    return _C.quantize(x, s, _bits(bits))


def quantize_dynamic(x: np.ndarray, bits: int = 8, clip: float = 1.0):
    """Per-row (per-token) dynamic quantization: (int8 codes (..., C), float32 scales (...,)) with
    scale = clip * absmax(row) / qmax (1 for an all-zero row), the float32 arithmetic of the
    fake-quant DynamicQuant stage; ValueError if x has NaN or inf."""
    return _C.quantize_dynamic(x, _bits(bits), _real(clip, "clip"))


def dequantize(q: np.ndarray, scale) -> np.ndarray:
    """float32 q * scale; ValueError if scale * 128 overflows float32."""
    s, _ = _vec(scale, "scale")
    return _C.dequantize(q, s)


def fake_quant(x: np.ndarray, scale, bits: int = 8) -> np.ndarray:
    """scale * clamp(rint(x / scale), -qmax, qmax) in float32; NaN propagates, +-inf saturates
    to +-scale * qmax (which must be finite in float32)."""
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
    gsf = _real(grad_scale_factor, "grad_scale_factor")
    gx, gs = _C.fake_quant_backward(x, s, grad_out, _bits(bits), gsf)
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
    Requires threshold < scale * qmax and scale * qmax finite in float32: a scale whose ceiling
    overflows (e.g. 1e37 at 8 bits) is a ValueError naming `scale`, never codes computed from an
    infinite ceiling. ValueError if x has NaN or inf."""
    t, _ = _vec(threshold, "threshold")
    s, _ = _vec(scale, "scale")
    return _C.truncate_quantize(x, t, s, _bits(bits))


# ---------------------------------------------------------------- weights

def _factor(f, name, n):
    if f is None:
        return None
    if not isinstance(f, np.ndarray):
        raise TypeError(f"{name} must be a float32 numpy array or None, got {type(f).__name__}")
    return np.ascontiguousarray(f, dtype=np.float32) if f.dtype != np.float32 else f


def fold_quant_weight(w: np.ndarray, bits: int | None, col=None, row=None) -> np.ndarray:
    """float32 (out, in): w * col[None, :] / row[:, None] (two float32 roundings, in this order;
    either factor may be None), then rounded per output channel: scale = absmax(row)/qmax (1 for a
    zero row), scale * clamp(rint(w'/scale), -qmax, qmax). bits None: the fold alone. Factors must
    be finite and > 0; a non-finite folded weight is a ValueError."""
    return _C.fold_quant_weight(w, _factor(col, "col", None), _factor(row, "row", None),
                                0 if bits is None else _bits(bits), 0)


def fold_quantize_weight(w: np.ndarray, bits: int, col=None, row=None):
    """(codes int8 (out, in), scales float32 (out,)) of fold_quant_weight: fq = codes * scales."""
    return _C.fold_quant_weight(w, _factor(col, "col", None), _factor(row, "row", None),
                                _bits(bits), 1)


def fold_quant_weight_codes(w: np.ndarray, bits: int, col=None, row=None):
    """(fake-quant float32, int8 codes, scales) of fold_quant_weight in one pass."""
    return _C.fold_quant_weight(w, _factor(col, "col", None), _factor(row, "row", None),
                                _bits(bits), 2)


# ---------------------------------------------------------------- Hadamard rotation

_ONE = np.ones((1, 1), np.float32)
# The default S is built only up to this order (11008 needs 344): the m-part costs m products per
# element, and Paley's Jacobsthal matrix q * q memory, so a stray last axis like 4 * 100003 is
# refused instead of building a 100004 x 100004 matrix. A larger `small` may still be passed.
MAX_DEFAULT_ORDER = 2048


@functools.lru_cache(maxsize=64)
def _default_small(n: int) -> np.ndarray:
    """S of the smallest m for a last axis of n (cached per n: a decode step pays no lookup)."""
    try:
        m, _ = hadamard_mod.hadamard_factors(n)
    except ValueError as e:
        raise ValueError(f"x: its last axis has no Hadamard transform here ({e})") from None
    if m > MAX_DEFAULT_ORDER:
        raise ValueError(f"x: its last axis n = {n} = {m} * 2^k needs a Hadamard matrix of order "
                         f"{m} > {MAX_DEFAULT_ORDER} (MAX_DEFAULT_ORDER); pass small= to use one")
    s = hadamard_mod.small_hadamard(m).astype(np.float32)  # +-1: exact in float32
    s.flags.writeable = False
    return s


def _small(x, small) -> np.ndarray:
    """The (m, m) float32 factor: `small` cast like a scale (any real dtype; +-1 int8 from
    sasq.hadamard is exact), or by default the smallest construction for x's last axis."""
    if small is None:
        if not (isinstance(x, np.ndarray) and x.ndim >= 1 and x.shape[-1] > 0):
            return _ONE  # x itself is wrong: the C checks name it
        return _default_small(int(x.shape[-1]))
    if isinstance(small, (str, bytes, bool, np.bool_)):
        raise TypeError(f"small must be a real (m, m) array, got {type(small).__name__}")
    try:
        arr = np.asarray(small)
    except (ValueError, TypeError) as e:
        raise ValueError(f"small must be a real (m, m) array ({str(e).splitlines()[0]})") from None
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"small must be a real (m, m) array, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused by the C checks
        return np.ascontiguousarray(arr, dtype=np.float32)


def _flag(v, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def hadamard(x: np.ndarray, small=None, transpose: bool = False, out: np.ndarray | None = None
             ) -> np.ndarray:
    """Orthonormal Hadamard rotation over the last axis: y = x M^T, M = kron(S, H_p) / sqrt(n).

    n = x.shape[-1] = m * p, p = 2^k; element i = a * p + b (a < m, b < p), so
    M[a p + b, a' p + b'] = S[a, a'] H_p[b, b'] / sqrt(n) with H_p Sylvester (symmetric) and S
    the (m, m) `small` matrix: by default sasq.hadamard.small_hadamard(m) for the smallest m of
    sasq.hadamard.hadamard_factors(n) (m = 1 for a power of two); sasq.hadamard.hadamard_matrix(n)
    is the same M, dense. A given `small` may be any real (m, m) array (cast to float32) with
    n = m * 2^k; M is orthonormal when S S^T = m I.

    transpose=True applies M instead of M^T: y = x M. Paley I factors are not symmetric, so this is
    the inverse, hadamard(hadamard(x), transpose=True) == x up to rounding, and the backward:
    forward y = hadamard(x) (y = x M^T) has dx = dy M = hadamard(dy, transpose=True); forward
    y = hadamard(x, transpose=True) has dx = hadamard(dy).

    float32 throughout: fast Walsh-Hadamard butterflies for the 2^k part, a dense m-term sum for
    the m part, one multiply by float32(1 / sqrt(n)); bit-identical on every ISA tier and thread
    count. out: None (a new array), x itself (in place) or a separate float32 array of x's shape.
    NaN/inf in a row spread over that row."""
    s = _small(x, small)
    return _C.hadamard(x, s, _flag(transpose, "transpose"), out)


def hadamard_quantize(x: np.ndarray, scale, bits: int = 8, *, small=None,
                      transpose: bool = False) -> np.ndarray:
    """Fused inference path: int8 quantize(hadamard(x, small, transpose), scale, bits), bit for
    bit, without a float intermediate array (x is not modified). scale per tensor, or per channel
    of the rotated axis; quantize's rules: ValueError if a rotated value is NaN or inf, any
    finite scale > 0 accepted."""
    s = _small(x, small)
    sc, _ = _vec(scale, "scale")
    return _C.hadamard_quantize(x, s, sc, _bits(bits), _flag(transpose, "transpose"))


def hadamard_fake_quant(x: np.ndarray, scale, bits: int = 8, *, small=None,
                        transpose: bool = False) -> np.ndarray:
    """fake_quant(hadamard(x, small, transpose), scale, bits) bit for bit, fused (float32);
    fake_quant's rules (NaN propagates, scale * qmax must be finite). For training, the STE
    backward is fake_quant_backward on hadamard(x), then hadamard(.., transpose=not transpose)."""
    s = _small(x, small)
    sc, _ = _vec(scale, "scale")
    return _C.hadamard_fake_quant(x, s, sc, _bits(bits), _flag(transpose, "transpose"))


# ---------------------------------------------------------------- INT8 GEMM

def gemm_int8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact int32 a @ b.T for int8 a (..., K) and weights b (N, K); K <= sasq._C.MAX_K."""
    return _C.gemm_int8(a, b)


def pack_weights(w_int8: np.ndarray) -> PackedWeights:
    """Pack int8 weights (N, K) once (VNNI panel layout + 128 * row sums) for linear_int8."""
    return _C.pack_weights(w_int8)


def gemm_packed(a: np.ndarray, packed: PackedWeights) -> np.ndarray:
    """Exact int32 a @ W.T with pre-packed weights."""
    _check_packed(packed)
    return _C.gemm_packed(a, packed)


def _check_packed(packed):
    if not isinstance(packed, PackedWeights):
        raise TypeError(f"packed must be a PackedWeights from pack_weights, got {type(packed).__name__}")


def linear_int8(a_q: np.ndarray, packed: PackedWeights, a_scale: float, w_scales) -> np.ndarray:
    """float32 (..., N) = float32(a_q @ W.T) * (float32(a_scale) * w_scales[n]), the scale product
    taken in float32 and applied in the GEMM's store.

    a_scale: one real number (a Python/NumPy scalar or 0-d array; bool, str and bytes are a
    TypeError), finite and > 0 in float32. w_scales: (N,) finite and > 0. The combined scale
    c_n = float32(a_scale) * w_scales[n] must be a normal float32 and 16384 * K * c_n finite;
    otherwise ValueError naming a_scale and w_scales (the output could overflow, or be 0 * inf).

    a_scale may also be 1-D with one value per row of a_q (M = a_q.size // K): per-row static
    scales (sink positions) or per-token dynamic ones; then y = (acc * w_scales[n]) * a_scale[row]
    (two float32 roundings) and every product must pass the same rule."""
    _check_packed(packed)
    a, scalar = _vec(a_scale, "a_scale")
    ws, _ = _vec(w_scales, "w_scales")
    if not scalar:  # one scale per row of a_q: (float(acc) * w_scales[n]) * a_scale[row]
        return _C.linear_int8_rows(a_q, packed, a, ws)
    return _C.linear_int8(a_q, packed, float(a[0]), ws)


# ---------------------------------------------------------------- threads and ISA

def set_num_threads(n: int) -> None:
    """Threads of sasq as a whole (1..256): the C kernels' pool and numpy's BLAS, which the
    NumPy model's own worker threads follow."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 1 <= n <= 256:  # checked here: the C int would overflow for 2**40
        raise ValueError(f"n must be in [1, 256], got {n}")
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
    if name not in ("auto", "avx512vnni", "avx2", "scalar"):  # before C: it refuses "\0" oddly
        raise ValueError(f"isa must be 'auto', 'avx512vnni', 'avx2' or 'scalar', got {name!r}")
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
