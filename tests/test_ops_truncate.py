"""Adaptive truncation (soft knee): C kernels vs NumPy twin, the function's promised properties,
gradients vs finite differences, and the fused truncate+quantize."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sasq import ops
from sasq import reference as R

ODD = [1, 3, 17, 33, 255, 1023]
ROWS = [1, 2, 3, 17]
Y_RTOL = 1e-6        # C tanh (libm) vs NumPy tanh in float64, then one float32 rounding
GX_RTOL = 1e-6
PARAM_GRAD_RTOL = 1e-5  # double sums in a different order
FD_RTOL = 1e-6       # float64 central differences of a smooth function
HYP = settings(max_examples=25, deadline=None)


def make_case(rows, cols, t_channel, c_channel, seed):
    rng = np.random.default_rng(seed)
    t = np.float32(rng.uniform(0.5, 2.0, cols if t_channel else None))
    c = np.float32(np.max(t) * rng.uniform(1.1, 4.0, cols if c_channel else None))
    x = rng.standard_normal((rows, cols)) * np.where(rng.random((rows, cols)) < 0.1, 20.0, 1.0)
    return x.astype(np.float32), t, c


@HYP
@given(rows=st.sampled_from(ROWS), cols=st.sampled_from(ODD), t_channel=st.booleans(),
       c_channel=st.booleans(), seed=st.integers(0, 2**31))
def test_truncate_matches_reference(rows, cols, t_channel, c_channel, seed):
    x, t, c = make_case(rows, cols, t_channel, c_channel, seed)
    np.testing.assert_allclose(ops.truncate(x, t, c), R.truncate(x, t, c), rtol=Y_RTOL, atol=0)
    g = np.random.default_rng(seed + 1).standard_normal(x.shape).astype(np.float32)
    gx, gt, gc = ops.truncate_backward(x, t, c, g)
    rgx, rgt, rgc = R.truncate_backward(x, t, c, g)
    np.testing.assert_allclose(gx, rgx, rtol=GX_RTOL, atol=1e-30)
    scale_of_sum = np.abs(g).sum() * 2 + 1e-30
    for got, ref, param in ((gt, rgt, t), (gc, rgc, c)):
        assert np.shape(got) == np.shape(param)
        np.testing.assert_allclose(got, ref, rtol=PARAM_GRAD_RTOL, atol=PARAM_GRAD_RTOL * scale_of_sum * 1e-3)


def test_properties_identity_monotone_bounded_c1():
    t, c = np.float32(1.0), np.float32(3.0)
    x = np.linspace(-50, 50, 200001, dtype=np.float32)
    y = ops.truncate(x, t, c)
    bulk = np.abs(x) <= t
    np.testing.assert_array_equal(y[bulk], x[bulk])            # identity on the bulk
    assert np.all(np.diff(y) >= 0)                             # monotone
    assert np.all(np.abs(y) <= c)                              # never beyond the ceiling
    assert np.all(np.abs(y[np.abs(x) < 4]) < c)                # and strictly inside near the knee
    np.testing.assert_array_equal(np.sign(y), np.sign(x))      # odd
    # C1 at the knee: slope -> 1 from outside
    gx, _, _ = ops.truncate_backward(np.array([1.0001, 1.5, 3.0, 30.0], np.float32), t, c,
                                     np.ones(4, np.float32))
    assert gx[0] == pytest.approx(1.0, abs=1e-3)
    assert np.all(np.diff(gx) < 0) and gx[-1] < 1e-6


def test_infinities_and_nan():
    x = np.array([np.inf, -np.inf, np.nan, 0.5], np.float32)
    y = ops.truncate(x, 1.0, 2.0)
    np.testing.assert_array_equal(y[[0, 1, 3]], [2.0, -2.0, 0.5])
    assert np.isnan(y[2])
    gx, gt, gc = ops.truncate_backward(x, 1.0, 2.0, np.ones(4, np.float32))
    assert np.isnan(gx[2]) and np.isnan(gt) and np.isnan(gc)
    assert np.all(np.isfinite(gx[[0, 1, 3]]))
    gx, gt, gc = ops.truncate_backward(x[[0, 1, 3]], 1.0, 2.0, np.ones(3, np.float32))
    assert np.isfinite(gt) and np.isfinite(gc)


@pytest.mark.parametrize("which", ["x", "t", "c"])
def test_reference_gradients_match_finite_differences(which):
    """The closed-form gradients of the twin (float64) against central differences."""
    rng = np.random.default_rng(11)
    x = np.concatenate([rng.uniform(1.05, 8, 40), -rng.uniform(1.05, 8, 40), rng.uniform(-0.9, 0.9, 20)])
    x = x.reshape(4, 25)
    t = rng.uniform(0.95, 1.0, 25)   # per-channel threshold (float64)
    c = 3.0                          # per-tensor ceiling
    g = rng.standard_normal(x.shape)
    gx, gt, gc = R.truncate_backward(x, t, c, g)
    h = 1e-6
    loss = lambda xv, tv, cv: float(np.sum(g * R.truncate(xv, tv, cv)))
    if which == "x":
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[idx] = h
            fd[idx] = (loss(x + e, t, c) - loss(x - e, t, c)) / (2 * h)
        np.testing.assert_allclose(gx, fd, rtol=FD_RTOL, atol=1e-8)
    elif which == "t":
        fd = np.array([(loss(x, t + h * (np.arange(25) == j), c) - loss(x, t - h * (np.arange(25) == j), c))
                       / (2 * h) for j in range(25)])
        np.testing.assert_allclose(gt, fd, rtol=FD_RTOL, atol=1e-8)
    else:
        fd = (loss(x, t, c + h) - loss(x, t, c - h)) / (2 * h)
        assert gc == pytest.approx(fd, rel=FD_RTOL)


@HYP
@given(rows=st.sampled_from(ROWS), cols=st.sampled_from(ODD), per_channel=st.booleans(),
       bits=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_truncate_quantize_matches_reference(rows, cols, per_channel, bits, seed):
    rng = np.random.default_rng(seed)
    qm = R.qmax(bits)
    scale = np.float32(rng.uniform(0.01, 0.1, cols if per_channel else None))
    t = np.float32(scale * qm * rng.uniform(0.3, 0.9))
    x = (rng.standard_normal((rows, cols)) * qm * 0.05 * np.where(rng.random((rows, cols)) < 0.1, 30, 1))
    x = x.astype(np.float32)
    q = ops.truncate_quantize(x, t, scale, bits)
    rq = R.truncate_quantize(x, t, scale, bits)
    # the tanh branch may differ by an ulp between libm and NumPy: only a value sitting on a .5
    # tie can then round differently
    u = R.truncate(x, t, np.asarray(scale) * np.float32(qm)).astype(np.float64) / np.asarray(scale)
    near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < 1e-5
    diff = q.astype(int) - rq.astype(int)
    assert np.all(np.abs(diff) <= 1) and np.all(near_tie[diff != 0])
    assert np.abs(q).max() <= qm


def test_truncate_quantize_keeps_outliers_ordered():
    """A hard clamp maps every moderate outlier beyond s*qmax to qmax; the knee keeps them
    distinct and ordered (only far outliers reach the last code)."""
    s, t = np.float32(0.01), np.float32(1.0)  # ceiling 1.27
    x = np.array([0.5, 1.0, 1.2, 1.35, 1.5, 1.7], np.float32)
    q = ops.truncate_quantize(x, t, s)
    hard = ops.quantize(x, s)
    np.testing.assert_array_equal(q[:2], hard[:2])  # identity below the threshold
    assert np.all(np.diff(q.astype(int)) > 0)
    assert (hard == 127).sum() == 3
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.truncate_quantize(np.array([np.nan], np.float32), t, s)
    with pytest.raises(ValueError, match="threshold"):
        ops.truncate_quantize(x, 1.27, s)  # threshold must stay below s * qmax


def test_float64_twin_is_dtype_generic():
    x = np.linspace(-5, 5, 11)
    assert R.truncate(x, 1.0, 2.0).dtype == np.float64
    gx, gt, gc = R.truncate_backward(x, np.full(11, 1.0), 2.0, np.ones(11))
    assert gx.dtype == np.float64 and gt.shape == (11,) and isinstance(gc, float)
