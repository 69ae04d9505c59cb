"""sasq.ops.fold_quant_weight / fold_quantize_weight (csrc/weights.c): the fold of per-channel
factors into a weight matrix and its per-output-channel RTN, bit-identical to the NumPy twin on
every ISA tier and thread count (the fake-quant model and the export depend on it)."""
import numpy as np
import pytest

from sasq import ops
from sasq import reference as R

SHAPES = [(1, 1), (3, 17), (33, 5), (64, 576), (129, 33)]


@pytest.fixture(params=ops.available_isas())
def isa(request):
    ops.set_isa(request.param)
    yield request.param
    ops.set_isa("auto")


def _case(shape, seed, zero_row=False):
    rng = np.random.default_rng(seed)
    n, k = shape
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 30, (n, 1))).astype(np.float32)
    if zero_row:
        w[n // 2] = 0
    col = rng.uniform(0.05, 20, k).astype(np.float32)
    row = rng.uniform(0.05, 20, n).astype(np.float32)
    return w, col, row


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [None, 2, 4, 6, 8])
def test_matches_twin_bit_for_bit(isa, shape, bits):
    w, col, row = _case(shape, sum(shape), zero_row=True)
    for c, r in ((None, None), (col, None), (None, row), (col, row)):
        got = ops.fold_quant_weight(w, bits, c, r)
        np.testing.assert_array_equal(got, R.fold_quant_weight(w, bits, c, r))
        if bits is None:
            continue
        codes, scales = ops.fold_quantize_weight(w, bits, c, r)
        rc, rs = R.fold_quantize_weight(w, bits, c, r)
        np.testing.assert_array_equal(codes, rc)
        np.testing.assert_array_equal(scales, rs)
        qm = 2 ** (bits - 1) - 1
        assert codes.dtype == np.int8 and np.abs(codes).max() <= qm
        # the fake-quant weight is exactly what the codes and scales give (export == training)
        np.testing.assert_array_equal(codes.astype(np.float32) * scales[:, None], got)
        # every row reaches the end of the grid (absmax scale), zero rows have scale 1
        nz = np.abs(w).max(axis=1) > 0
        assert np.all(np.abs(codes[nz]).max(axis=1) == qm) and np.all(scales[~nz] == 1)


def test_thread_count_does_not_change_results():
    w, col, row = _case((301, 257), 1)
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(1)
        a = ops.fold_quant_weight(w, 4, col, row)
        ops.set_num_threads(3)
        b = ops.fold_quant_weight(w, 4, col, row)
    finally:
        ops.set_num_threads(n0)
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_are_named():
    w, col, row = _case((4, 6), 2)
    with pytest.raises(TypeError, match="w"):
        ops.fold_quant_weight(w.astype(np.float64), 8)
    with pytest.raises(ValueError, match="2 dimension"):
        ops.fold_quant_weight(w[0], 8)
    with pytest.raises(ValueError, match="col"):
        ops.fold_quant_weight(w, 8, col[:3])
    with pytest.raises(ValueError, match="row"):
        ops.fold_quant_weight(w, 8, None, -row)
    with pytest.raises(ValueError, match="bits"):
        ops.fold_quantize_weight(w, 9)
    bad = w.copy()
    bad[1, 2] = np.inf
    for fn in (ops.fold_quant_weight, R.fold_quant_weight):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(bad, 8)
    with pytest.raises(ValueError, match="NaN or inf"):  # an overflowing fold is caught too
        ops.fold_quant_weight(np.full((2, 2), 3e38, np.float32), 8, np.full(2, 10, np.float32))
