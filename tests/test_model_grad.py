"""Whole-model activation gradients: LlamaModel.backward against central finite differences in
float64 (at the embedding output and at every hook site), against torch autograd, and
recompute=True against the stored-activation path."""
import numpy as np
import pytest

from sasq.model import SITES, ActivationHook, LlamaConfig, random_model

FD_EPS = 1e-6
FD_RTOL = 1e-6  # max |analytic - numeric| <= FD_RTOL * max(1, max|numeric|), float64
TORCH_RTOL = 1e-9  # float64 sasq vs float64 torch autograd, relative to max |grad|

TINY = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-5,
            rope_theta=500.0, max_position_embeddings=64)
B, T = 2, 6


class AddAt(ActivationHook):
    """Test hook: adds `delta` at one (layer, site); identity backward."""

    def __init__(self, layer, site, delta):
        self.key, self.delta = (layer, site), delta

    def forward(self, layer, site, x, pos, keep):
        return (x + self.delta if (layer, site) == self.key else x), None


class Record(ActivationHook):
    """Identity hook recording the gradient at every site, the call order, and that the tape
    hands each site's forward context back to its backward."""

    def __init__(self):
        self.grads, self.fwd, self.bwd = {}, [], []

    def forward(self, layer, site, x, pos, keep):
        self.fwd.append((layer, site))
        return x, ((layer, site) if keep else None)

    def backward(self, layer, site, grad, ctx, grads):
        assert ctx == (layer, site)
        self.bwd.append((layer, site))
        self.grads[(layer, site)] = grad.copy()
        return grad


@pytest.fixture(scope="module", params=["gqa", "mha_tied"])
def setup(request):
    cfg = dict(TINY)
    if request.param == "mha_tied":
        cfg.update(num_key_value_heads=4, head_dim=4, tie_word_embeddings=True)
    model = random_model(LlamaConfig(**cfg), seed=3).astype(np.float64)
    rng = np.random.default_rng(5)
    # distinct tokens: the gradient at embedding row ids[b, t] is d_embed[b, t]
    ids = rng.permutation(cfg["vocab_size"])[:B * T].reshape(B, T)
    r = rng.standard_normal((B, T, cfg["vocab_size"]))  # loss = sum(logits * r)
    return model, ids, r


def site_shape(cfg, site):
    return {"attn_in": cfg.hidden_size, "mlp_in": cfg.hidden_size, "head_in": cfg.hidden_size,
            "o_in": cfg.num_attention_heads * cfg.head_dim,
            "k_cache": cfg.num_key_value_heads * cfg.head_dim,
            "v_cache": cfg.num_key_value_heads * cfg.head_dim,
            "down_in": cfg.intermediate_size}[site]


def assert_close(analytic, numeric, rtol=FD_RTOL):
    err = np.abs(analytic - numeric).max()
    assert err <= rtol * max(1.0, np.abs(numeric).max()), f"max abs err {err}"


def test_grad_wrt_every_site_matches_finite_differences(setup):
    model, ids, r = setup
    cfg = model.config
    rec = Record()
    tape = model.forward_tape(ids, hook=rec)
    model.backward(tape, r)
    nl = cfg.num_hidden_layers
    for layer, site in [(i, s) for i in range(nl) for s in SITES[:-1]] + [(nl, "head_in")]:
        shape = (B, T, site_shape(cfg, site))
        num = np.zeros(shape)
        for idx in np.ndindex(*shape):
            d = np.zeros(shape)
            d[idx] = FD_EPS
            fp = np.sum(model.forward(ids, hook=AddAt(layer, site, d)) * r)
            fm = np.sum(model.forward(ids, hook=AddAt(layer, site, -d)) * r)
            num[idx] = (fp - fm) / (2 * FD_EPS)
        assert_close(rec.grads[(layer, site)], num)


def test_grad_wrt_embedding_output_matches_finite_differences(setup):
    model, ids, r = setup
    # perturb embedding rows only (an untied copy keeps lm_head fixed)
    base = model.copy_with(lm_head=model.lm_head.copy())
    d_embed = base.backward(base.forward_tape(ids), r)  # (B, T, C)
    num = np.zeros_like(d_embed)
    emb = base.embed_tokens.copy()
    for b, t, c in np.ndindex(*num.shape):
        vals = []
        for sgn in (1, -1):
            e = emb.copy()
            e[ids[b, t], c] += sgn * FD_EPS
            vals.append(np.sum(base.copy_with(embed_tokens=e).forward(ids) * r))
        num[b, t, c] = (vals[0] - vals[1]) / (2 * FD_EPS)
    assert_close(d_embed, num)


def test_recompute_gives_same_gradients_and_hook_calls(setup):
    model, ids, r = setup
    rec_a, rec_b = Record(), Record()
    ga = model.backward(model.forward_tape(ids, hook=rec_a), r)
    gb = model.backward(model.forward_tape(ids, hook=rec_b, recompute=True), r)
    assert np.array_equal(ga, gb)
    for key in rec_a.grads:
        assert np.array_equal(rec_a.grads[key], rec_b.grads[key])
    assert rec_a.bwd == rec_b.bwd
    assert rec_a.bwd == list(reversed(rec_a.fwd))  # backward visits sites in reverse order
    assert len(rec_b.fwd) == 2 * len(rec_a.fwd) - 1  # every layer site again, head_in once


def test_backward_with_dhidden_equals_dlogits(setup):
    model, ids, r = setup
    tape = model.forward_tape(ids, compute_logits=False)
    assert tape.logits is None
    g1 = model.backward(tape, dhidden=r @ model.lm_head)
    g2 = model.backward(model.forward_tape(ids), r)
    assert np.allclose(g1, g2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        model.backward(tape)


def test_tape_logits_equal_forward(setup):
    model, ids, _ = setup
    assert np.array_equal(model.forward_tape(ids).logits, model.forward(ids))
    assert np.array_equal(model.forward_tape(ids, recompute=True).logits, model.forward(ids))


def test_against_torch_autograd(setup):
    """The same model in torch (float64, eager ops written here), gradient wrt the embedding
    output and wrt each site through torch autograd."""
    torch = pytest.importorskip("torch")
    model, ids, r = setup
    cfg = model.config
    H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda x: torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    norm = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w
    acts = {}

    def tap(layer, site, x):
        x.retain_grad()
        acts[(layer, site)] = x
        return x

    x0 = tt(model.embed_tokens[ids]).requires_grad_(True)
    x = x0
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i, w in enumerate(model.layers):
        w = {k: tt(getattr(w, k)) for k in w.__dataclass_fields__}
        h = tap(i, "attn_in", norm(x, w["input_layernorm"]) * 1.0)
        q = (h @ w["q_proj"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ w["k_proj"].T).view(B, T, KVH, hd).transpose(1, 2)
        v = tap(i, "v_cache", (h @ w["v_proj"].T) * 1.0)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        k = tap(i, "k_cache", k.transpose(1, 2).reshape(B, T, KVH * hd) * 1.0)
        k = k.view(B, T, KVH, hd).transpose(1, 2).repeat_interleave(H // KVH, 1)
        v = v.view(B, T, KVH, hd).transpose(1, 2).repeat_interleave(H // KVH, 1)
        s = (q @ k.transpose(-1, -2)) / hd ** 0.5
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        o = tap(i, "o_in", (p @ v).transpose(1, 2).reshape(B, T, H * hd) * 1.0)
        x = x + o @ w["o_proj"].T
        h2 = tap(i, "mlp_in", norm(x, w["post_attention_layernorm"]) * 1.0)
        d = tap(i, "down_in", torch.nn.functional.silu(h2 @ w["gate_proj"].T) * (h2 @ w["up_proj"].T))
        x = x + d @ w["down_proj"].T
    hf = tap(cfg.num_hidden_layers, "head_in", norm(x, tt(model.norm)) * 1.0)
    logits = hf @ tt(model.lm_head).T
    assert np.allclose(logits.detach().numpy(), model.forward(ids), rtol=1e-10, atol=1e-10)
    (logits * tt(r)).sum().backward()

    rec = Record()
    d_embed = model.backward(model.forward_tape(ids, hook=rec), r)
    ref = x0.grad.numpy()
    assert_close(d_embed, ref, TORCH_RTOL)
    for key, a in acts.items():
        assert_close(rec.grads[key], a.grad.numpy(), TORCH_RTOL)


def test_float32_gradient_close_to_float64(setup):
    """The float32 path (what training runs) stays near the float64 gradient."""
    model, ids, r = setup
    g64 = model.backward(model.forward_tape(ids), r)
    m32 = model.astype(np.float32)
    g32 = m32.backward(m32.forward_tape(ids), r.astype(np.float32))
    assert g32.dtype == np.float32
    assert np.abs(g32 - g64).max() <= 1e-4 * np.abs(g64).max()
