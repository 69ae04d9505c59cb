"""Bad inputs to every entry point give the documented exception naming the argument, never a
crash: wrong dtype/type (TypeError), non-contiguous, empty, wrong rank or shape, bad bits, and
zero/negative/NaN/inf scales (ValueError)."""
import numpy as np
import pytest

from sasq import ops

X = np.ones((4, 8), np.float32)
G = np.ones((4, 8), np.float32)
Q = np.ones((4, 8), np.int8)

# name -> callable(x, scale, bits) exercising the x/scale/bits arguments of each float kernel
FLOAT_KERNELS = {
    "quantize": lambda x, s, b: ops.quantize(x, s, b),
    "fake_quant": lambda x, s, b: ops.fake_quant(x, s, b),
    "fake_quant_backward": lambda x, s, b: ops.fake_quant_backward(x, s, np.ones_like(x) if isinstance(x, np.ndarray) else G, b),
    "truncate": lambda x, s, b: ops.truncate(x, s, np.asarray(s) * 100 if _finite(s) else s),
    "truncate_backward": lambda x, s, b: ops.truncate_backward(x, s, np.asarray(s) * 100 if _finite(s) else s, np.ones_like(x) if isinstance(x, np.ndarray) else G),
    "truncate_quantize": lambda x, s, b: ops.truncate_quantize(x, np.asarray(s) * 0.5 if _finite(s) else s, s, b),
}


def _finite(s):
    try:
        return np.all(np.isfinite(np.asarray(s, np.float64)))
    except (TypeError, ValueError):
        return False


@pytest.mark.parametrize("kernel", FLOAT_KERNELS)
@pytest.mark.parametrize("bad,exc,msg", [
    (np.ones((4, 8), np.float64), TypeError, "x must have dtype float32"),
    (np.ones((4, 8), np.int32), TypeError, "x must have dtype float32"),
    ([[1.0, 2.0]], TypeError, "x must be a numpy.ndarray"),
    (np.ones((8, 4), np.float32).T, ValueError, "x must be C-contiguous"),
    (np.ones((4, 16), np.float32)[:, ::2], ValueError, "x must be C-contiguous"),
    (np.ones((0, 8), np.float32), ValueError, "x is empty"),
    (np.ones((), np.float32), ValueError, "at least 1 dimension"),
    (np.ones((4, 8), ">f4"), ValueError, "native byte order"),
])
def test_bad_x(kernel, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        FLOAT_KERNELS[kernel](bad, 0.5, 8)


@pytest.mark.parametrize("kernel", FLOAT_KERNELS)
@pytest.mark.parametrize("scale,exc", [
    (0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (1e300, ValueError),                                 # inf after the float32 cast
    (np.ones(7, np.float32), ValueError),                # wrong length (cols = 8)
    (np.ones((2, 8), np.float32), ValueError),           # wrong rank
    (np.array([0.1] * 7 + [0.0], np.float32), ValueError),
    ("0.1", TypeError),
])
def test_bad_scale(kernel, scale, exc):
    with pytest.raises(exc):
        FLOAT_KERNELS[kernel](X, scale, 8)


@pytest.mark.parametrize("kernel", ["quantize", "fake_quant", "fake_quant_backward", "truncate_quantize"])
@pytest.mark.parametrize("bits,exc", [(0, ValueError), (1, ValueError), (9, ValueError),
                                      (16, ValueError), (8.0, TypeError), (True, TypeError)])
def test_bad_bits(kernel, bits, exc):
    with pytest.raises(exc, match="bits"):
        FLOAT_KERNELS[kernel](X, 0.5, bits)


def test_bad_grad_out_and_threshold_order():
    with pytest.raises(ValueError, match="grad_out"):
        ops.fake_quant_backward(X, 0.5, np.ones((4, 7), np.float32))
    with pytest.raises(TypeError, match="grad_out"):
        ops.fake_quant_backward(X, 0.5, np.ones((4, 8), np.float64))
    with pytest.raises(ValueError, match="grad_scale_factor"):
        ops.fake_quant_backward(X, 0.5, G, grad_scale_factor=float("nan"))
    with pytest.raises(ValueError, match="threshold must be < ceiling"):
        ops.truncate(X, 2.0, 1.0)
    with pytest.raises(ValueError, match="threshold must be < ceiling"):
        ops.truncate(X, np.array([0.5] * 7 + [3.0], np.float32), 2.0)
    with pytest.raises(ValueError, match="threshold"):
        ops.truncate_backward(X, 0.0, 1.0, G)
    with pytest.raises(ValueError, match="threshold"):
        ops.truncate_quantize(X, 1.0, 0.001)  # 1.0 >= 0.001 * 127


def test_dequantize_bad_inputs():
    with pytest.raises(TypeError, match="q must have dtype int8"):
        ops.dequantize(X, 0.5)
    with pytest.raises(ValueError, match="q is empty"):
        ops.dequantize(np.ones((3, 0), np.int8), 0.5)
    with pytest.raises(ValueError, match="scale"):
        ops.dequantize(Q, 0.0)


def test_gemm_bad_inputs():
    a = np.ones((3, 5), np.int8)
    with pytest.raises(TypeError, match="a must have dtype int8"):
        ops.gemm_int8(a.astype(np.int16), a)
    with pytest.raises(TypeError, match="b must have dtype int8"):
        ops.gemm_int8(a, a.astype(np.uint8))
    with pytest.raises(ValueError, match="K"):
        ops.gemm_int8(a, np.ones((3, 6), np.int8))
    with pytest.raises(ValueError, match="b must be 2-D"):
        ops.gemm_int8(a, np.ones((3, 5, 1), np.int8))
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.gemm_int8(np.ones((5, 3), np.int8).T, a)
    with pytest.raises(ValueError, match="empty"):
        ops.gemm_int8(np.ones((0, 5), np.int8), a)
    with pytest.raises(ValueError, match="empty"):
        ops.pack_weights(np.ones((0, 5), np.int8))
    with pytest.raises(ValueError, match="exceeds"):
        ops.pack_weights(np.ones((1, ops._C.MAX_K + 1), np.int8))


def test_linear_int8_bad_inputs():
    w = np.ones((6, 5), np.int8)
    p = ops.pack_weights(w)
    a = np.ones((3, 5), np.int8)
    ws = np.ones(6, np.float32)
    with pytest.raises(TypeError, match="packed"):
        ops.linear_int8(a, w, 1.0, ws)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e300):
        with pytest.raises(ValueError, match="a_scale"):
            ops.linear_int8(a, p, bad, ws)
    with pytest.raises(ValueError, match="w_scales"):
        ops.linear_int8(a, p, 1.0, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="w_scales"):
        ops.linear_int8(a, p, 1.0, np.array([1, 1, 1, 1, 1, 0], np.float32))
    with pytest.raises(ValueError, match="K"):
        ops.linear_int8(np.ones((3, 4), np.int8), p, 1.0, ws)
    with pytest.raises(TypeError, match="a_q must have dtype int8"):
        ops.linear_int8(a.astype(np.float32), p, 1.0, ws)
