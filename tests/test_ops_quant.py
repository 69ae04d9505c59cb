"""quantize / dequantize / fake_quant / fake_quant_backward against their NumPy twins
(sasq.reference), on every elementwise tier, plus ties, clamp edges, extremes, NaN rules, finite
differences and the closed form of the LSQ gradient."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sasq import ops
from sasq import reference as R

ODD = [1, 3, 17, 33, 255, 1023]
ROWS = [1, 2, 3, 17]
ELEMENTWISE_ISAS = [i for i in ("scalar", "avx2") if i in ops.available_isas()]
GRAD_SCALE_RTOL = 1e-5   # double accumulation in C vs NumPy's pairwise float64 sum
FD_RTOL = 1e-6           # float64 central differences of piecewise-linear functions
HYP = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    ops.set_isa("auto")


def make_case(rows, cols, per_channel, seed, magnitude=4.0):
    """x (rows, cols) float32 with exact .5 ties and clamp-edge values mixed in; power-of-two scales
    so that x / s is exact for the ties."""
    rng = np.random.default_rng(seed)
    if per_channel:
        scale = (2.0 ** rng.integers(-8, 2, cols)).astype(np.float32)  # (C,)
    else:
        scale = np.float32(2.0 ** rng.integers(-8, 2))
    s = np.broadcast_to(np.asarray(scale, np.float32), (rows, cols))
    x = (rng.standard_normal((rows, cols)) * magnitude * 16 * s).astype(np.float32)
    pick = rng.random((rows, cols))
    ties = (rng.integers(-130, 130, (rows, cols)) + 0.5).astype(np.float32) * s
    x = np.where(pick < 0.2, ties, x)
    edges = rng.choice(np.array([-127, 127, -7, 7, -1, 1, 0], np.float32), (rows, cols)) * s
    x = np.where((pick >= 0.2) & (pick < 0.3), edges, x)
    return np.ascontiguousarray(x, np.float32), scale


@pytest.mark.parametrize("isa", ELEMENTWISE_ISAS)
@HYP
@given(rows=st.sampled_from(ROWS), cols=st.sampled_from(ODD), per_channel=st.booleans(),
       bits=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_forward_kernels_match_reference(isa, rows, cols, per_channel, bits, seed):
    ops.set_isa(isa)
    x, scale = make_case(rows, cols, per_channel, seed)
    np.testing.assert_array_equal(ops.quantize(x, scale, bits), R.quantize(x, scale, bits))
    np.testing.assert_array_equal(ops.fake_quant(x, scale, bits), R.fake_quant(x, scale, bits))
    q = R.quantize(x, scale, bits)
    np.testing.assert_array_equal(ops.dequantize(q, scale), R.dequantize(q, scale))


@pytest.mark.parametrize("isa", ELEMENTWISE_ISAS)
@HYP
@given(rows=st.sampled_from(ROWS), cols=st.sampled_from(ODD), per_channel=st.booleans(),
       bits=st.integers(2, 8), seed=st.integers(0, 2**31), factor=st.sampled_from([1.0, 0.01]))
def test_backward_matches_reference(isa, rows, cols, per_channel, bits, seed, factor):
    ops.set_isa(isa)
    x, scale = make_case(rows, cols, per_channel, seed)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    gx, gs = ops.fake_quant_backward(x, scale, g, bits, grad_scale_factor=factor)
    rgx, rgs = R.fake_quant_backward(x, scale, g, bits, grad_scale_factor=factor)
    np.testing.assert_array_equal(gx, rgx)
    assert np.shape(gs) == np.shape(scale)
    assert isinstance(gs, float) == (not per_channel)
    tol = GRAD_SCALE_RTOL * (np.abs(g).sum() * R.qmax(bits) * factor + 1e-30)  # scale of the sum
    np.testing.assert_allclose(gs, rgs, rtol=GRAD_SCALE_RTOL, atol=tol)


@pytest.mark.parametrize("isa", ELEMENTWISE_ISAS)
def test_half_to_even_ties(isa):
    ops.set_isa(isa)
    x = np.array([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5], np.float32) * 0.125
    expect = np.array([-4, -2, -2, 0, 0, 2, 2, 4], np.int8)  # banker's rounding
    np.testing.assert_array_equal(ops.quantize(x, 0.125), expect)
    np.testing.assert_array_equal(ops.fake_quant(x, 0.125), expect.astype(np.float32) * 0.125)


@pytest.mark.parametrize("isa", ELEMENTWISE_ISAS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_clamp_edges_and_extremes(isa, bits):
    ops.set_isa(isa)
    qm = R.qmax(bits)
    s = np.float32(0.5)
    x = np.array([qm, qm + 0.49, qm + 0.5, qm + 1, -qm - 0.5, -qm - 3, 3e38, -3e38,
                  1e-45, -1e-45, 0.0, -0.0], np.float32) * s
    q = ops.quantize(x, s, bits)
    np.testing.assert_array_equal(q, [qm, qm, qm, qm, -qm, -qm, qm, -qm, 0, 0, 0, 0])
    np.testing.assert_array_equal(ops.fake_quant(x, s, bits), q.astype(np.float32) * s)
    # huge and tiny scales: x/s overflows to inf (clamps) or underflows to 0
    y = np.array([1.0, -1.0, 0.0], np.float32)
    np.testing.assert_array_equal(ops.quantize(y, 1e-38, bits), [qm, -qm, 0])
    np.testing.assert_array_equal(ops.quantize(y, 3e38, bits), [0, 0, 0])


@pytest.mark.parametrize("isa", ELEMENTWISE_ISAS)
def test_nan_and_inf_rules(isa):
    ops.set_isa(isa)
    x = np.array([0.3, np.nan, -0.7, np.inf, -np.inf], np.float32)
    y = ops.fake_quant(x, 0.1)
    assert np.isnan(y[1]) and not np.isnan(y[[0, 2, 3, 4]]).any()
    np.testing.assert_allclose(y[3:], [12.7, -12.7], rtol=1e-6)  # +-inf saturates
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.quantize(x, 0.1)
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.quantize(x[3:4], 0.1)
    gx, gs = ops.fake_quant_backward(x, 0.1, np.ones_like(x))
    assert np.isnan(gx[1]) and np.isnan(gs)
    np.testing.assert_array_equal(gx[[0, 2, 3, 4]], [1, 1, 0, 0])
    gx, gs = ops.fake_quant_backward(x[None, :], np.full(5, 0.1, np.float32), np.ones((1, 5), np.float32))
    assert np.isnan(gs[1]) and not np.isnan(np.delete(gs, 1)).any()


def test_lsq_closed_form():
    """Hand-computed LSQ gradients for a few values (independent of sasq.reference)."""
    s, bits = 0.1, 8
    x = np.array([0.26, -0.26, 0.35, 50.0, -50.0, 12.7], np.float32)
    g = np.array([1.0, 2.0, -1.0, 0.5, 0.25, 3.0], np.float32)
    gx, gs = ops.fake_quant_backward(x, s, g, bits)
    expect_ds = []
    for xi in x.astype(np.float64):
        u = float(np.float32(xi) / np.float32(s))  # the kernel divides in float32
        expect_ds.append(127.0 if u > 127 else -127.0 if u < -127 else round(u) - u)
    np.testing.assert_array_equal(gx, [1, 2, -1, 0, 0, 3])
    assert gs == pytest.approx(float(np.dot(g.astype(np.float64), expect_ds)), rel=1e-6)
    assert math.isclose(expect_ds[0], 3 - 2.6, rel_tol=1e-5)  # rint(2.6) - 2.6


def test_scale_gradient_matches_finite_differences_where_smooth():
    """Clipped elements: y = +-s*qmax is smooth in s (dy/ds = +-qmax) and flat in x (STE gives 0).
    Inside the range the LSQ gradient is the derivative of the STE surrogate
    y~(s) = s * (rint(u0) - u0) + x (rint held at its value), checked by central differences."""
    rng = np.random.default_rng(3)
    s = 0.05
    x = np.concatenate([rng.uniform(8, 20, 64), -rng.uniform(8, 20, 64)]).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    gx, gs = ops.fake_quant_backward(x, s, g)
    assert not gx.any()
    x64, g64, h = x.astype(np.float64), g.astype(np.float64), 1e-7
    loss = lambda sv: float(np.dot(g64, R.fake_quant(x64, sv)))
    fd = (loss(s + h) - loss(s - h)) / (2 * h)
    assert gs == pytest.approx(fd, rel=FD_RTOL)

    xin = rng.uniform(-5, 5, 257).astype(np.float32)
    gin = rng.standard_normal(xin.shape).astype(np.float32)
    s32 = np.float32(s)
    u0 = (xin / s32).astype(np.float64)
    surrogate = lambda sv: float(np.dot(gin.astype(np.float64), sv * (np.rint(u0) - u0) + xin))
    fd = (surrogate(s + h) - surrogate(s - h)) / (2 * h)
    gx, gs = ops.fake_quant_backward(xin, s, gin)
    np.testing.assert_array_equal(gx, gin)
    assert gs == pytest.approx(fd, rel=1e-5)


def test_scale_gradient_sum_is_accurate_over_millions():
    """4M elements each contributing exactly -0.25: a float32 running sum would drift visibly."""
    n = 1 << 22
    x = np.full((n // 1024, 1024), 0.25 * 0.5, np.float32)  # u = 0.25 -> rint(u) - u = -0.25
    g = np.ones_like(x)
    _, gs = ops.fake_quant_backward(x, 0.5, g)
    assert gs == -0.25 * n
    _, gsc = ops.fake_quant_backward(x, np.full(1024, 0.5, np.float32), g)
    np.testing.assert_array_equal(gsc, np.full(1024, -0.25 * (n // 1024), np.float32))


def test_grad_scale_factor_multiplies():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 33)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    _, g1 = ops.fake_quant_backward(x, 0.02, g)
    lsq = 1.0 / math.sqrt(x.size * 127)
    _, g2 = ops.fake_quant_backward(x, 0.02, g, grad_scale_factor=lsq)
    assert g2 == pytest.approx(g1 * lsq, rel=1e-6)


def test_reference_is_dtype_generic():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 17))
    y = R.fake_quant(x, 0.03, 4)
    assert y.dtype == np.float64
    gx, gs = R.fake_quant_backward(x, np.full(17, 0.03), np.ones_like(x), 4)
    assert gx.dtype == np.float64 and gs.shape == (17,)


@pytest.mark.parametrize("per_channel", [False, True])
def test_results_do_not_depend_on_thread_count(per_channel):
    """Elementwise kernels run in row chunks on the pool; the cut is fixed, so outputs and the
    double sums are bit-identical for any thread count (and still match the twin)."""
    x, scale = make_case(300, 1000, per_channel, seed=9)  # 300k elements: many chunks
    g = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    n0 = ops.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            ops.set_num_threads(threads)
            outs.append((ops.fake_quant(x, scale), ops.quantize(x, scale), *ops.fake_quant_backward(x, scale, g),
                         *ops.truncate_backward(x, 0.5, 1.5, g)))
    finally:
        ops.set_num_threads(n0)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outs[0][0], R.fake_quant(x, scale))
    np.testing.assert_array_equal(outs[0][2], R.fake_quant_backward(x, scale, g)[0])
    x[-1, -1] = np.nan  # a NaN in the last chunk is still found
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize(x, scale)
