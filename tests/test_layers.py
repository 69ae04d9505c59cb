"""Each layer's backward in sasq.layers against central finite differences in float64, and the
blocked attention against a naive reference."""
import numpy as np
import pytest

from sasq import layers as L

FD_EPS = 1e-6  # central-difference step (float64)
FD_RTOL = 1e-6  # max |analytic - numeric| <= FD_RTOL * max(1, max|numeric|)
ATTN_TOL32 = 1e-5  # blocked float32 attention vs naive float64 reference, absolute


def numgrad(f, x, eps=FD_EPS):
    """d sum(f(x) * R) / dx by central differences, R folded into f."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        fp = f(x)
        x[idx] = old - eps
        fm = f(x)
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def assert_grad(analytic, numeric):
    err = np.abs(analytic - numeric).max()
    assert err <= FD_RTOL * max(1.0, np.abs(numeric).max()), f"max abs err {err}"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_linear_backward(rng):
    w = rng.standard_normal((5, 7))
    x = rng.standard_normal((2, 3, 7))
    r = rng.standard_normal((2, 3, 5))
    assert np.allclose(L.linear_forward(x, w), np.einsum("btc,oc->bto", x, w))
    assert_grad(L.linear_backward(r, w), numgrad(lambda x: np.sum(L.linear_forward(x, w) * r), x))


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 17)])
def test_rmsnorm_backward(rng, shape):
    w = 1 + 0.3 * rng.standard_normal(shape[-1])
    x = rng.standard_normal(shape)
    r = rng.standard_normal(shape)
    y, cache = L.rmsnorm_forward(x, w, 1e-5)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * w
    assert np.allclose(y, ref, rtol=1e-12, atol=1e-12)
    dx = L.rmsnorm_backward(r, cache, w)
    assert_grad(dx, numgrad(lambda x: np.sum(L.rmsnorm_forward(x, w, 1e-5)[0] * r), x))


def test_rope_matches_complex_rotation_and_backward(rng):
    B, T, nh, hd = 2, 5, 3, 8
    inv = L.rope_inv_freq(hd, 10000.0, dtype=np.float64)
    cos, sin = L.rope_tables(inv, np.arange(3, 3 + T))
    x = rng.standard_normal((B, T, nh, hd))
    y = L.rope_forward(x, cos, sin)
    # rotate_half layout: pair (i, i + hd/2) rotates by angle pos * inv_freq[i]
    z = (x[..., :hd // 2] + 1j * x[..., hd // 2:]) * np.exp(1j * np.outer(np.arange(3, 3 + T), inv))[:, None]
    assert np.allclose(y, np.concatenate([z.real, z.imag], -1), atol=1e-12)
    r = rng.standard_normal(x.shape)
    assert_grad(L.rope_backward(r, cos, sin),
                numgrad(lambda x: np.sum(L.rope_forward(x, cos, sin) * r), x))


def test_rope_llama3_scaling_against_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    sc = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)
    cfg = HFConfig(hidden_size=256, num_attention_heads=4, rope_theta=500000.0, rope_scaling=sc)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = L.rope_inv_freq(64, 500000.0, sc, np.float32)
    assert np.allclose(ours, ref.numpy(), rtol=1e-6, atol=0)
    assert not np.allclose(ours, L.rope_inv_freq(64, 500000.0, None, np.float32))


@pytest.mark.parametrize("B,KVH,G,Tq,Tk,hd", [(1, 1, 1, 1, 1, 2), (2, 2, 3, 5, 5, 4),
                                             (1, 2, 2, 3, 7, 4)])
def test_attention_backward(rng, B, KVH, G, Tq, Tk, hd):
    q = rng.standard_normal((B, KVH, G, Tq, hd))
    k = rng.standard_normal((B, KVH, Tk, hd))
    v = rng.standard_normal((B, KVH, Tk, hd))
    r = rng.standard_normal(q.shape)
    out, lse = L.attention_forward(q, k, v)
    assert np.allclose(out, L.attention_reference(q, k, v), atol=1e-12)
    dq, dk, dv = L.attention_backward(r, q, k, v, lse)
    f = lambda q, k, v: np.sum(L.attention_forward(q, k, v)[0] * r)
    assert_grad(dq, numgrad(lambda x: f(x, k, v), q))
    assert_grad(dk, numgrad(lambda x: f(q, x, v), k))
    assert_grad(dv, numgrad(lambda x: f(q, k, x), v))


@pytest.mark.parametrize("parallel_macs", [0, 1 << 62])  # KV heads on worker threads or not
def test_attention_blocks_match_reference(rng, monkeypatch, parallel_macs):
    """Small blocks force many query blocks, each skipping keys above the diagonal."""
    monkeypatch.setattr(L, "ATTN_BLOCK_ELEMS", 64)
    monkeypatch.setattr(L, "ATTN_MIN_ROWS", 4)
    monkeypatch.setattr(L, "ATTN_PARALLEL_MACS", parallel_macs)
    q = rng.standard_normal((2, 2, 2, 37, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 37, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 37, 8)).astype(np.float32)
    out, lse = L.attention_forward(q, k, v)
    assert out.dtype == np.float32
    ref = L.attention_reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert np.abs(out - ref).max() <= ATTN_TOL32
    r = rng.standard_normal(q.shape)
    g64 = L.attention_backward(r, *(a.astype(np.float64) for a in (q, k, v, lse)))
    monkeypatch.setattr(L, "ATTN_MIN_ROWS", 1000)  # one block of all rows
    g64_one = L.attention_backward(r, *(a.astype(np.float64) for a in (q, k, v, lse)))
    for a, b in zip(g64, g64_one):
        assert np.allclose(a, b, atol=1e-10)


def test_swiglu_backward(rng):
    gate = 3 * rng.standard_normal((2, 3, 6))
    up = rng.standard_normal((2, 3, 6))
    r = rng.standard_normal(gate.shape)
    h = L.swiglu_forward(gate, up)
    assert np.allclose(h, gate / (1 + np.exp(-gate)) * up)
    dg, du = L.swiglu_backward(r, gate, up)
    assert_grad(dg, numgrad(lambda x: np.sum(L.swiglu_forward(x, up) * r), gate))
    assert_grad(du, numgrad(lambda x: np.sum(L.swiglu_forward(gate, x) * r), up))


def test_swiglu_threaded_rows_equal_serial(rng, monkeypatch):
    gate = rng.standard_normal((3, 7, 5)).astype(np.float32)
    up = rng.standard_normal((3, 7, 5)).astype(np.float32)
    dh = rng.standard_normal((3, 7, 5)).astype(np.float32)
    serial = (L.swiglu_forward(gate, up), *L.swiglu_backward(dh, gate, up))
    monkeypatch.setattr(L, "CHUNK_ELEMS", 8)  # many chunks on the worker threads
    threaded = (L.swiglu_forward(gate, up), *L.swiglu_backward(dh, gate, up))
    for a, b in zip(serial, threaded):
        assert np.array_equal(a, b)


def test_swiglu_extreme_inputs_finite():
    gate = np.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=np.float32)
    up = np.ones_like(gate)
    h = L.swiglu_forward(gate, up)
    dg, du = L.swiglu_backward(np.ones_like(gate), gate, up)
    assert np.all(np.isfinite(h)) and np.all(np.isfinite(dg)) and np.all(np.isfinite(du))
    assert h[0] == 0 and h[-1] == 1e4


def test_cross_entropy(rng):
    logits = 3 * rng.standard_normal((2, 4, 9))
    t = rng.integers(0, 9, (2, 4))
    loss, cache = L.cross_entropy_forward(logits, t)
    z = logits.reshape(-1, 9)
    ref = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(8), t.reshape(-1)])
    assert abs(loss - ref) < 1e-12
    d = L.cross_entropy_backward(cache)
    assert_grad(d, numgrad(lambda x: L.cross_entropy_forward(x, t)[0], logits))
    with pytest.raises(ValueError):
        L.cross_entropy_forward(logits, t[:, :2])
    with pytest.raises(ValueError):
        L.cross_entropy_forward(logits, t + 9)
