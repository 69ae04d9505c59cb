"""sasq.wclip: searched per-row weight scales against a brute-force loop written here, never a
larger rounding error than absmax RTN, and wired into plans (RTN now, GPTQ at calibration)."""
import numpy as np
import pytest

import sasq
from sasq.plan import QuantPlan
from sasq.wclip import GRID, MAX_SHRINK, NORM, quantize_rows, search_scales


def brute_force(w, bits):
    qm = 2 ** (bits - 1) - 1
    out = []
    for row in w.astype(np.float64):
        a = np.abs(row).max()
        if a == 0:
            out.append(1.0)
            continue
        errs = []
        for i in range(int(GRID * MAX_SHRINK)):
            s = np.float32(np.float32(a) * np.float32(1 - i / GRID) / np.float32(qm))
            q = np.clip(np.rint((row.astype(np.float32) / s)), -qm, qm)
            errs.append((np.sum(np.abs(q * np.float64(s) - row) ** NORM), s))
        out.append(min(errs, key=lambda e: e[0])[1])
    return np.array(out, np.float32)


def rtn_error(w, s, bits):
    codes, _ = quantize_rows(w, s, bits)
    return np.sum(np.abs(codes.astype(np.float64) * s[:, None] - w) ** NORM, axis=1)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_matches_brute_force_and_never_loses_to_absmax(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_t(3, (40, 96)) * rng.uniform(0.01, 2, (40, 1))).astype(np.float32)
    w[5] = 0.0
    s = search_scales(w, bits)
    np.testing.assert_allclose(s, brute_force(w, bits), rtol=1e-6)
    assert s[5] == 1.0
    absmax = np.where(np.abs(w).max(1) > 0, np.abs(w).max(1) / (2 ** (bits - 1) - 1), 1).astype(np.float32)
    e_clip, e_abs = rtn_error(w, s, bits), rtn_error(w, absmax, bits)
    assert np.all(e_clip <= e_abs * (1 + 1e-12))
    if bits <= 4:  # heavy tails: clipping must pay off on most rows at low bits
        assert np.mean(e_clip < e_abs) > 0.5


def test_bad_input():
    for w in (np.zeros((3,)), np.zeros((2, 3), np.int32), np.full((2, 3), np.nan, np.float32)):
        with pytest.raises(ValueError):
            search_scales(w, 4)
    with pytest.raises(ValueError):
        search_scales(np.ones((2, 3), np.float32), 4, max_shrink=1.0)


def test_plans_use_searched_scales(stories_dir):
    m = sasq.load(stories_dir)
    with pytest.raises(ValueError, match="w_bits"):
        QuantPlan(None, 8, w_clip=True)
    with pytest.raises(ValueError, match="fold"):
        QuantPlan(4, 8, granularity="channel", w_clip=True)
    q = sasq.quantize(m, QuantPlan(4, None, w_clip=True))
    codes, scales = q.quantized_weights()[(1, "up_proj")]
    np.testing.assert_array_equal(scales, search_scales(m.layers[1].up_proj, 4))
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, (4, 48))
    g = sasq.calibrate(sasq.quantize(m, QuantPlan(4, 8, mode="dynamic", weights="gptq", w_clip=True)),
                       ids, 48, progress=False)
    _, gs = g.quantized_weights()[(0, "down_proj")]
    np.testing.assert_array_equal(gs, search_scales(g.model.layers[0].down_proj, 4))


def test_clipped_weights_cached_per_model_and_arrays(stories_dir):
    from sasq.quant import clipped_rtn_weights
    m = sasq.load(stories_dir)
    a = clipped_rtn_weights(m, 4)
    assert clipped_rtn_weights(m, 4)[(0, "q_proj")][0] is a[(0, "q_proj")][0]  # the cached codes
    lw = m.layers[0]
    other = m.copy_with(layers=[type(lw)(**{**vars(lw), "q_proj": lw.q_proj * 2})] + m.layers[1:])
    b = clipped_rtn_weights(other, 4)  # new arrays: searched again
    np.testing.assert_allclose(b[(0, "q_proj")][1], 2 * a[(0, "q_proj")][1], rtol=1e-6)
    c3 = clipped_rtn_weights(m, 3)[(0, "q_proj")]  # another bit width: its own search
    np.testing.assert_array_equal(c3[1], search_scales(m.layers[0].q_proj, 3))
    assert not a[(0, "q_proj")][0].flags.writeable  # shared by every QuantModel: read-only


def test_act_order_reaches_gptq(stories_dir, monkeypatch):
    """QuantPlan(act_order=True) is passed to GPTQ (its codes differ from index order's)."""
    import sasq.gptq as G
    seen = []
    real = G.gptq_quantize

    def spy(*a, **k):
        seen.append(a[5] if len(a) > 5 else k.get("act_order"))
        return real(*a, **k)

    monkeypatch.setattr(G, "gptq_quantize", spy)
    m = sasq.load(stories_dir)
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, (4, 48))
    q = sasq.calibrate(sasq.quantize(m, QuantPlan(4, None, weights="gptq", act_order=True)), ids, 48,
                       progress=False)
    assert seen and all(seen)
    p = sasq.calibrate(sasq.quantize(m, QuantPlan(4, None, weights="gptq")), ids, 48, progress=False)
    assert not any(seen[len(seen) // 2:])
    a, b = q.quantized_weights()[(0, "down_proj")][0], p.quantized_weights()[(0, "down_proj")][0]
    assert np.any(a != b)
