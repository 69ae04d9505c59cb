"""sasq.kvquant: the dynamic asymmetric per-(token, head) KV grid against a loop written here in
float64, plus the properties that define it (0 exact, at most 2^bits levels per group, error at
most half a step inside the range, groups independent, NaN confined to its group)."""
import numpy as np
import pytest

from sasq.kvquant import fake_quant_asym_groups

F32_REL = 1e-4  # float32 s (q - z) vs the float64 loop, relative to the step (255 levels x 6e-8)


def loop_reference(x, bits, group, clip):
    """float64, one group at a time; returns (values, step per group)."""
    n = 2 ** bits - 1
    flat = x.astype(np.float64).reshape(-1, group)
    y, steps = np.empty_like(flat), np.empty(len(flat))
    for r, v in enumerate(flat):
        lo, hi = clip * min(v.min(), 0.0), clip * max(v.max(), 0.0)
        s = (hi - lo) / n if hi > lo else 1.0
        z = np.rint(-lo / s)
        y[r] = (np.clip(np.rint(v / s) + z, 0, n) - z) * s
        steps[r] = s
    return y.reshape(x.shape), steps


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9])
@pytest.mark.parametrize("shape,group", [((3, 7, 64), 64), ((2, 5, 128), 64), ((11, 24), 8)])
def test_matches_loop_reference(bits, clip, shape, group):
    rng = np.random.default_rng(bits * 100 + group)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 5, shape[:-1] + (1,)) + 0.3).astype(np.float32)
    y = fake_quant_asym_groups(x, bits, group, clip)
    want, steps = loop_reference(x, bits, group, clip)
    step = np.repeat(steps, group).reshape(x.shape)
    # a float32 quotient may round a tie the other way: at most one step, and rarely
    diff = np.abs(y - want)
    assert np.all(diff <= step * (1 + F32_REL))
    assert np.mean(diff > step * F32_REL) < 0.01
    assert y.dtype == np.float32 and y.shape == x.shape


def test_grid_properties():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4, 32)).astype(np.float32)
    x[0, 0, 5] = 0.0
    x[1] = np.abs(x[1])  # one-signed groups still hold 0 exactly
    y = fake_quant_asym_groups(x, 4, 32)
    assert y[0, 0, 5] == 0.0
    for g in y.reshape(-1, 32):
        assert len(np.unique(g)) <= 16
    _, steps = loop_reference(x, 4, 32, 1.0)
    err = np.abs(y - x).reshape(-1, 32).max(1)
    assert np.all(err <= steps / 2 * (1 + 1e-5) + 1e-7)
    # groups are independent: a huge value in one head leaves the other heads' grids alone
    x2 = x.copy()
    x2[2, 1, 0] = 1e4
    y2 = fake_quant_asym_groups(x2, 4, 32)
    mask = np.ones(x.shape[:-1], bool)
    mask[2, 1] = False
    np.testing.assert_array_equal(y2[mask], y[mask])
    zero = fake_quant_asym_groups(np.zeros((2, 8), np.float32), 3, 8)
    np.testing.assert_array_equal(zero, 0)


def test_nan_stays_in_its_group():
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    x[0, 3] = np.nan
    y = fake_quant_asym_groups(x, 4, 8)
    assert np.all(np.isnan(y[0, :8])) and np.all(np.isfinite(y[0, 8:])) and np.all(np.isfinite(y[1]))


@pytest.mark.parametrize("kw,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=True), "bits"),
    (dict(group=5), "multiple"), (dict(group=0), "multiple"), (dict(group=8.0), "int"),
    (dict(clip=0.0), "clip"),
    (dict(clip=1.5), "clip")])
def test_bad_arguments(kw, match):
    args = dict(bits=4, group=8, clip=1.0) | kw
    with pytest.raises(ValueError, match=match):
        fake_quant_asym_groups(np.zeros((2, 16), np.float32), **args)
    with pytest.raises(ValueError, match="float"):
        fake_quant_asym_groups(np.zeros((2, 16), np.int32), 4, 8)
