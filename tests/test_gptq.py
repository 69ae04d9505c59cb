"""GPTQ weight rounding (sasq.gptq): RTN equivalence for a diagonal Hessian, agreement with a
naive column-by-column OBS implementation, the output-error gain on correlated inputs, edge cases,
argument errors, and the Hessian collector against an independent recording observer."""
import numpy as np
import pytest

from sasq import grid
from sasq.blas import blas_threads_for
from sasq.gptq import (
    SITE_MATRICES,
    HessianCollector,
    _inverse_cholesky,
    collect_hessians,
    gptq_model_weights,
    gptq_quantize,
)
from sasq.model import LlamaConfig, Observer, random_model
from sasq.transforms import quantize_weight

INVERSE_ATOL = 1e-10   # U^T U (H + damp) - I, float64, condition number < 1e4
HESSIAN_RTOL = 1e-12   # collector vs recorded activations, both float64 sums of the same rows
# GPTQ / RTN output error ||X W^T - X Wq^T||_F on correlated X (96 inputs, 1024 rows): measured
# 0.713 at 4 bits and 0.700 at 3 bits for this test's seeds, 0.69-0.73 over seeds 0-9 (act_order:
# 0.66-0.70); the budget keeps a clear margin under 1
GPTQ_ERROR_RATIO_MAX = {4: 0.8, 3: 0.8}

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def one_blas_thread():
    # tiny LAPACK calls on a busy machine: OpenBLAS threads made the oracle's inverses 40x slower
    with blas_threads_for(0):
        yield


# --------------------------------------------------------------------------- the naive oracle

def naive_gptq(w, h, bits, damp=0.01, act_order=False):
    """Column by column OBS: round column j, then spread its error over the columns not yet
    rounded with the inverse of H restricted to them, recomputed from scratch every step (no
    blocking, no Cholesky). Same conventions as sasq.gptq (scales, dead inputs, damping)."""
    qm = grid.qmax(bits)
    w = np.array(w, dtype=np.float64)  # (out, in)
    h = np.array(h, dtype=np.float64)
    amax = np.abs(w).max(axis=1)
    s = np.where(amax > 0, amax / qm, 1.0)  # (out,)
    n = w.shape[1]
    for i in range(n):
        if h[i, i] == 0:
            h[i, i] = 1.0
            w[:, i] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    h = h + damp * np.mean(np.diag(h)) * np.eye(n)
    codes = np.zeros(w.shape, dtype=np.int64)
    for k, j in enumerate(order):
        rest = order[k:]  # j first, then the columns still free
        hinv = np.linalg.inv(h[np.ix_(rest, rest)])
        q = np.clip(np.rint(w[:, j] / s), -qm, qm)
        codes[:, j] = q
        err = (w[:, j] - q * s) / hinv[0, 0]  # (out,)
        w[:, rest] -= np.outer(err, hinv[0])
    return codes


def correlated(n_rows, d, seed):
    """X (n_rows, d) = Z A: inputs with strongly correlated channels, and H = 2/N X^T X."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_rows, d)) @ rng.standard_normal((d, d))
    return x, 2.0 / n_rows * x.T @ x


def output_error(x, w, codes, scales):
    wq = codes.astype(np.float64) * np.asarray(scales, np.float64)[:, None]
    return np.linalg.norm(x @ w.T.astype(np.float64) - x @ wq.T)


# --------------------------------------------------------------------------- RTN equivalence

@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_hessian_equals_rtn(bits, dtype):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((37, 70)).astype(dtype)
    w[3] = 0  # an all-zero row: scale 1, codes 0
    codes, scales = gptq_quantize(w, np.eye(70), bits, block_size=16)
    ref_codes, ref_scales = quantize_weight(w, bits)
    assert codes.dtype == np.int8 and scales.dtype == dtype
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)


def test_diagonal_hessian_equals_rtn():
    # any diagonal H has no error to spread: RTN codes again (act_order only reorders)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((20, 33)).astype(np.float32)
    h = np.diag(rng.uniform(0.1, 10.0, 33))
    for act_order in (False, True):
        codes, _ = gptq_quantize(w, h, 4, block_size=8, act_order=act_order)
        np.testing.assert_array_equal(codes, quantize_weight(w, 4)[0])


def tie_weights(bits, rows=16, cols=64, seed=0):
    """float32 rows whose quotient w/s is exactly k + 1/2 in float32 but not in float64, so that
    rint of the float64 quotient would round away from RTN's half-to-even result."""
    rng = np.random.default_rng(seed)
    qm = grid.qmax(bits)
    w = np.clip(rng.standard_normal((rows, cols)), -3, 3).astype(np.float32)
    w[:, 0] = np.abs(w[:, 0]) + 4  # the absmax, fixes the row scale
    scale = (w[:, 0] / np.float32(qm)).astype(np.float32)
    n_flips = 0
    for r in range(rows):
        s = scale[r]
        for c in range(1, cols):
            k = rng.integers(-qm, qm)  # k + 1/2 in [-qm + 1/2, qm - 1/2]
            v = np.float32((k + 0.5) * float(s))
            up, down = np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))
            for cand in (v, up, down):
                exact = float(cand) / float(s)
                if cand / s == np.float32(k + 0.5) and np.rint(exact) != np.rint(k + 0.5):
                    w[r, c] = cand
                    n_flips += 1
                    break
    return w, n_flips


def test_diagonal_hessian_equals_rtn_at_float32_ties():
    w, n_flips = tie_weights(4)
    assert n_flips > 20  # the construction found quotients that float64 would round otherwise
    codes, _ = gptq_quantize(w, np.eye(w.shape[1]), 4)
    np.testing.assert_array_equal(codes, quantize_weight(w, 4)[0])


# --------------------------------------------------------------------------- the naive oracle

@pytest.mark.parametrize("block_size", [1, 5, 16, 29, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_obs(block_size, act_order):
    _, h = correlated(300, 29, seed=2)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((11, 29))
    for bits in (3, 4):
        codes, scales = gptq_quantize(w, h, bits, block_size=block_size, act_order=act_order)
        np.testing.assert_array_equal(codes, naive_gptq(w, h, bits, act_order=act_order))
        np.testing.assert_array_equal(scales, quantize_weight(w, bits)[1])


@pytest.mark.parametrize("n", [1, 3, 64, 65, 130, 301])
def test_inverse_cholesky_is_upper_factor_of_damped_inverse(n):
    _, h = correlated(2 * n + 5, n, seed=n)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(n)
    u = _inverse_cholesky(h.copy(), 0.01)
    assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(n), atol=INVERSE_ATOL)


def test_matches_naive_obs_wide():
    # wider than one block and than the triangular inverse's base case
    _, h = correlated(400, 150, seed=9)
    w = np.random.default_rng(10).standard_normal((7, 150))
    for block_size in (64, 128):
        codes, _ = gptq_quantize(w, h, 4, block_size=block_size, act_order=True)
        np.testing.assert_array_equal(codes, naive_gptq(w, h, 4, act_order=True))


def test_act_order_changes_codes_and_keeps_column_order():
    # a Hessian whose diagonal is far from sorted: act_order must round in another order, and the
    # codes must still match the oracle column for column (a missing un-permute would not)
    x, _ = correlated(400, 24, seed=4)
    x *= np.random.default_rng(5).uniform(0.1, 10.0, 24)
    h = 2.0 / len(x) * x.T @ x
    w = np.random.default_rng(6).standard_normal((9, 24))
    plain, _ = gptq_quantize(w, h, 3, block_size=7)
    ordered, _ = gptq_quantize(w, h, 3, block_size=7, act_order=True)
    assert np.any(plain != ordered)
    np.testing.assert_array_equal(ordered, naive_gptq(w, h, 3, act_order=True))


def test_given_scales():
    _, h = correlated(200, 20, seed=7)
    w = np.random.default_rng(8).standard_normal((6, 20))
    scales = np.abs(w).max(axis=1) / 7 * 0.8  # clipping scales: some codes saturate
    codes, out_scales = gptq_quantize(w, h, 4, scales=scales)
    np.testing.assert_array_equal(out_scales, scales)
    assert np.abs(codes).max() == 7
    plain, _ = gptq_quantize(w, h, 4)
    assert np.any(codes != plain)


# --------------------------------------------------------------------------- quality

@pytest.mark.parametrize("bits", [4, 3])
def test_lower_output_error_than_rtn(bits):
    x, h = correlated(1024, 96, seed=0)
    w = np.random.default_rng(10).standard_normal((64, 96)).astype(np.float32)
    codes, scales = gptq_quantize(w, h, bits)
    ref_codes, ref_scales = quantize_weight(w, bits)
    ratio = output_error(x, w, codes, scales) / output_error(x, w, ref_codes, ref_scales)
    assert ratio < GPTQ_ERROR_RATIO_MAX[bits], ratio


# --------------------------------------------------------------------------- edge cases

def test_dead_inputs():
    x, _ = correlated(300, 18, seed=11)
    dead = [0, 7, 17]
    x[:, dead] = 0  # inputs that are always zero: diag H == 0
    h = 2.0 / len(x) * x.T @ x
    w = np.random.default_rng(12).standard_normal((8, 18)) * 3
    codes, scales = gptq_quantize(w, h, 4, block_size=5)
    assert np.all(codes[:, dead] == 0)
    np.testing.assert_array_equal(codes, naive_gptq(w, h, 4))
    np.testing.assert_array_equal(scales, quantize_weight(w, 4)[1])  # scales from the original w
    # H_ii = 1 makes the rest positive definite on its own: no damping needed
    np.testing.assert_array_equal(gptq_quantize(w, h, 4, damp=0.0)[0],
                                  naive_gptq(w, h, 4, damp=0.0))


def test_tiny_singular_hessian_needs_damping():
    v = np.array([[1.0, 2.0, -1.0]])
    h = 1e-20 * v.T @ v  # rank 1, tiny entries
    w = np.array([[0.3, -0.2, 0.9], [1.0, 0.5, -0.25]])
    codes, _ = gptq_quantize(w, h, 4)
    np.testing.assert_array_equal(codes, naive_gptq(w, h, 4))
    with pytest.raises(ValueError, match="not positive definite even after damping"):
        gptq_quantize(w, h, 4, damp=0.0)


def test_does_not_write_into_arguments():
    _, h = correlated(100, 12, seed=13)
    h[:, 3] = h[3, :] = 0
    w = np.random.default_rng(14).standard_normal((5, 12))
    w0, h0 = w.copy(), h.copy()
    gptq_quantize(w, h, 4, act_order=True)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(h, h0)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"w": np.ones(4)}, ValueError, "w must be a 2-D float array"),
    ({"w": np.ones((2, 4), dtype=np.int32)}, ValueError, "w must be a 2-D float array"),
    ({"w": np.array([[1.0, np.nan, 0, 0]])}, ValueError, "w has NaN"),
    ({"hessian": np.eye(3)}, ValueError, r"hessian must have shape \(4, 4\)"),
    ({"hessian": np.eye(4, dtype=np.int64)}, ValueError, "hessian must be a float array"),
    ({"hessian": np.diag([1.0, np.inf, 1, 1])}, ValueError, "hessian has NaN or inf"),
    ({"hessian": np.eye(4) + np.triu(np.ones((4, 4)), 1)}, ValueError, "not symmetric"),
    ({"hessian": -np.eye(4)}, ValueError, "not positive definite even after damping"),
    ({"bits": 1}, ValueError, "bits"),
    ({"bits": 4.0}, TypeError, "bits"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"block_size": 2.5}, ValueError, "block_size"),
    ({"damp": -0.1}, ValueError, "damp"),
    ({"damp": float("nan")}, ValueError, "damp"),
    ({"scales": np.ones(3)}, ValueError, r"scales must have shape \(2,\)"),
    ({"scales": np.array([1.0, 0.0])}, ValueError, "scales must be finite and > 0"),
    ({"scales": np.array([1.0, np.nan])}, ValueError, "scales must be finite and > 0"),
])
def test_argument_errors(kwargs, exc, match):
    args = {"w": np.ones((2, 4)), "hessian": np.eye(4), "bits": 4}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        gptq_quantize(**args)


# --------------------------------------------------------------------------- Hessians of a model

class Recorder(Observer):
    """Keeps a copy of every activation it sees."""

    def __init__(self):
        self.seen = {}

    def observe(self, layer, site, x, pos):
        self.seen.setdefault((layer, site), []).append(np.array(x, dtype=np.float64))


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=0).astype(np.float64)


@pytest.fixture(scope="module")
def windows():
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (5, 9))


def test_collect_hessians_matches_recorded_activations(model, windows):
    sites = ("attn_in", "o_in", "mlp_in", "down_in", "head_in")
    hs = collect_hessians(model, windows, sites=sites, batch_size=2, progress=False)
    rec = Recorder()
    model.forward(windows, hook=rec, return_hidden=True)
    nl = CFG.num_hidden_layers
    expect_keys = {(i, s) for i in range(nl) for s in sites[:4]} | {(nl, "head_in")}
    assert set(hs) == expect_keys
    for key, h in hs.items():
        rows = np.concatenate([a.reshape(-1, a.shape[-1]) for a in rec.seen[key]])  # (N, C)
        assert rows.shape[0] == windows.size
        expect = 2.0 / rows.shape[0] * np.einsum("ni,nj->ij", rows, rows)
        np.testing.assert_allclose(h, expect, rtol=HESSIAN_RTOL, atol=0)


def test_hessian_collector_counts_rows_over_calls():
    obs = HessianCollector([(0, "attn_in")])
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((1, 5, 4))
    obs.forward(0, "attn_in", a, 0, False)
    obs.forward(0, "attn_in", b, 0, False)
    obs.forward(1, "attn_in", b, 0, False)  # not a chosen key
    rows = np.concatenate([a.reshape(-1, 4), b.reshape(-1, 4)])
    np.testing.assert_allclose(obs.hessians()[(0, "attn_in")], 2.0 / 11 * rows.T @ rows,
                               rtol=HESSIAN_RTOL)
    with pytest.raises(ValueError, match="k_cache"):
        HessianCollector([(0, "k_cache")])


def test_collect_hessians_errors(model):
    with pytest.raises(ValueError, match="windows"):
        collect_hessians(model, np.zeros((2, 3)), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        collect_hessians(model, np.zeros((2, 3), dtype=np.int64), batch_size=0, progress=False)


def test_gptq_model_weights(model, windows):
    hs = collect_hessians(model, windows, progress=False)
    before = [{k: v.copy() for k, v in vars(lw).items()} for lw in model.layers]
    out = gptq_model_weights(model, hs, 4, block_size=5, act_order=True, progress=False)
    names = [n for ns in SITE_MATRICES.values() for n in ns]
    assert set(out) == {(i, n) for i in range(CFG.num_hidden_layers) for n in names}
    for i, lw in enumerate(model.layers):
        for site, ns in SITE_MATRICES.items():
            for n in ns:  # stacked consumers give what each matrix gives alone with its site's H
                w = getattr(lw, n)
                codes, scales = out[(i, n)]
                ref_codes, ref_scales = gptq_quantize(w, hs[(i, site)], 4, block_size=5,
                                                      act_order=True)
                assert codes.shape == w.shape and codes.dtype == np.int8
                np.testing.assert_array_equal(codes, ref_codes)
                np.testing.assert_array_equal(scales, ref_scales)
        for k, v in vars(lw).items():
            np.testing.assert_array_equal(v, before[i][k])  # pure
    del hs[(1, "down_in")]
    with pytest.raises(ValueError, match="layer 1.*down_in"):
        gptq_model_weights(model, hs, 4, progress=False)
