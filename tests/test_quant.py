"""QuantPlan validation, fake-quant forward semantics, per-channel folding, truncation,
SmoothQuant, dynamic per-token, KV cache, state dicts (sasq.quant)."""
import math

import numpy as np
import pytest

from sasq import sites as sites_mod
from sasq.calibration import calibrate
from sasq.model import LlamaConfig, random_model
from sasq.plan import QuantPlan
from sasq.quant import quantize
from sasq.transforms import fake_quant_weight, quantize_weight, smoothing_factors

FOLD_ATOL = 1e-9          # folded vs unfolded per-channel, float64, float weights
EXACT_FOLD_ATOL = 1e-10   # a fold without quantization is an identity
BACKEND_ATOL = 1e-5       # C kernels vs NumPy twin on the float32 path (a rint tie may flip)
CACHE_ATOL = 1e-4         # KV-cache decode vs full forward, float32

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True)


def outlier_model(dtype=np.float64, seed=0):
    m = random_model(CFG, seed=seed, dtype=np.float32).astype(dtype)
    rng = np.random.default_rng(seed)
    for lw in m.layers:       # outlier channels, as in real LLMs (copy: never mutate in place)
        for name in ("input_layernorm", "post_attention_layernorm"):
            g = getattr(lw, name).copy()
            g[rng.choice(len(g), 2, replace=False)] *= 8.0
            setattr(lw, name, g)
    return m


@pytest.fixture(scope="module")
def model():
    return outlier_model()


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 12))


def snapshot(m):
    return [{k: v.copy() for k, v in vars(lw).items()} for lw in m.layers], m.embed_tokens.copy()


# --------------------------------------------------------------------------- plan

@pytest.mark.parametrize("kwargs", [
    dict(w_bits=9), dict(a_bits=1), dict(kv_bits=0), dict(w_bits=True), dict(a_bits=8.0),
    dict(granularity="row"), dict(mode="lazy"), dict(mode="dynamic", granularity="channel"),
    dict(granularity="token"), dict(sites=("attn_in", "qkv")), dict(sites=("k_cache",)),
    dict(sites=("head_in",)), dict(sites=("o_in", "o_in")), dict(sites=()),
    dict(adapt_control=True), dict(a_bits=None, adapt_control=True, mode="dynamic"),
    dict(smoothquant_alpha=1.5), dict(smoothquant_alpha=0.5, granularity="channel"),
    dict(a_bits=None, smoothquant_alpha=0.5), dict(truncation=True, mode="dynamic"),
    dict(a_bits=None, truncation=True), dict(param_space="sqrt"),
    dict(kv_mode="dynamic"), dict(kv_bits=4, kv_mode="per-head"), dict(kv_bits=4, kv_clip=0.9),
    dict(kv_bits=4, kv_mode="dynamic", kv_clip=0.0), dict(kv_bits=4, kv_mode="dynamic", kv_clip=True),
    dict(rotate_qk=True, kv_bits=8), dict(rotate_qk=True, rotate=True),
    dict(mode="dynamic", kv_bits=4, kv_mode="dynamic", sink_tokens=2),
    dict(act_order=True), dict(w_clip=True, w_bits=None),
])
def test_bad_plans_raise(kwargs):
    with pytest.raises(ValueError):
        QuantPlan(**kwargs)


def test_labels_distinguish_the_baselines():
    plans = [QuantPlan(None, None), QuantPlan(8, 8), QuantPlan(8, 8, granularity="channel"),
             QuantPlan(8, 8, granularity="channel", fold=False), QuantPlan(8, 8, mode="dynamic"),
             QuantPlan(8, 8, smoothquant_alpha=0.5), QuantPlan(8, 8, smoothquant_alpha=0.5, mode="dynamic"),
             QuantPlan(8, 8, truncation=True), QuantPlan(None, None, adapt_control=True),
             QuantPlan(None, None, adapt_control=True, granularity="channel"), QuantPlan(4, 8),
             QuantPlan(4, 4, mode="dynamic", kv_bits=4), QuantPlan(4, 4, mode="dynamic", kv_bits=4,
                                                                  kv_mode="dynamic"),
             QuantPlan(4, 4, mode="dynamic", rotate=True, kv_bits=4, kv_mode="dynamic",
                       rotate_qk=True)]
    labels = [p.label for p in plans]
    assert len(set(labels)) == len(labels), labels
    assert plans[0].label == "FP32"


def test_quantize_rejects_non_plan(model):
    with pytest.raises(TypeError):
        quantize(model, {"w_bits": 8})


# --------------------------------------------------------------------------- weights

def test_weight_quant_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 33)) * rng.uniform(0.1, 10, (7, 1))
    w[3] = 0
    for bits in (4, 8):
        q, s = quantize_weight(w, bits)
        qm = 2 ** (bits - 1) - 1
        assert q.dtype == np.int8 and np.abs(q).max() <= qm
        np.testing.assert_allclose(s[[0, 1, 2, 4, 5, 6]], np.abs(w).max(1)[[0, 1, 2, 4, 5, 6]] / qm)
        assert s[3] == 1 and not q[3].any()
        err = np.abs(fake_quant_weight(w, bits) - w)
        assert np.all(err <= s[:, None] / 2 * (1 + 1e-12))


def test_fp_plan_is_the_fp_model(model, ids):
    q = quantize(model, QuantPlan(None, None))
    assert q.params == {} and q.initialized
    np.testing.assert_array_equal(q.forward(ids), model.forward(ids))


def test_original_model_is_never_mutated(model, ids):
    layers0, emb0 = snapshot(model)
    head0, norm0 = model.lm_head.copy(), model.norm.copy()
    q = quantize(model, QuantPlan(4, 4, granularity="channel", truncation=True, kv_bits=8,
                                  quant_head=True))
    calibrate(q, ids, progress=False)
    for p in q.params.values():
        p += 0.1
    q.sync()
    tape = q.forward_tape(ids)
    q.backward(tape, np.ones_like(tape.logits))
    for lw, d in zip(model.layers, layers0):
        for k, v in d.items():
            np.testing.assert_array_equal(getattr(lw, k), v)
    np.testing.assert_array_equal(model.embed_tokens, emb0)
    np.testing.assert_array_equal(model.lm_head, head0)
    np.testing.assert_array_equal(model.norm, norm0)
    assert q.deploy.lm_head is not model.embed_tokens   # head folded into an untied copy


def test_uncalibrated_static_model_refuses_to_run(model, ids):
    q = quantize(model, QuantPlan(8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        q.forward(ids)
    q.sync()                       # params set by hand count as initialised
    q.forward(ids)
    quantize(model, QuantPlan(8, 8, mode="dynamic")).forward(ids)   # nothing to calibrate


def test_sync_rejects_bad_params(model, ids):
    q = calibrate(quantize(model, QuantPlan(8, 8, param_space="linear")), ids, progress=False)
    k = next(iter(q.params))
    q.params[k][...] = -1.0
    with pytest.raises(ValueError, match=k):
        q.sync()
    q2 = calibrate(quantize(model, QuantPlan(8, 8)), ids, progress=False)
    q2.params[k.replace(".scale", ".log_scale")][...] = np.nan
    with pytest.raises(ValueError):
        q2.sync()
    q2.params[k.replace(".scale", ".log_scale")][...] = 1e4       # exp overflows
    with pytest.raises(ValueError, match="finite"):
        q2.sync()


# --------------------------------------------------------------------------- folding

def _unfolded_twin(model, plan, q_folded):
    """fold=False twin with the folded model's scales (o_in expanded over the GQA group)."""
    import dataclasses
    qu = quantize(model, dataclasses.replace(plan, fold=False))
    for st in q_folded.site_list():
        if st.scale_key is None:
            continue
        s = q_folded.params[st.scale_key]
        qu.params[st.scale_key][...] = st.expand(s)
        if st.rho_key:
            qu.params[st.rho_key][...] = st.expand(q_folded.params[st.rho_key])
    qu.sync()
    return qu


@pytest.mark.parametrize("trunc", [False, True])
@pytest.mark.parametrize("kv", [None, 6])
def test_folded_equals_fake_per_channel_with_float_weights(model, ids, trunc, kv):
    plan = QuantPlan(None, 4, granularity="channel", truncation=trunc, kv_bits=kv, quant_head=True)
    qf = calibrate(quantize(model, plan), ids, progress=False)
    rng = np.random.default_rng(0)
    for k, p in qf.params.items():
        p += rng.uniform(-0.3, 0.3, p.shape)
    qf.sync()
    qu = _unfolded_twin(model, plan, qf)
    assert qf.params["layers.0.o_in.log_scale"].shape == (CFG.num_key_value_heads * CFG.head_dim,)
    assert qu.params["layers.0.o_in.log_scale"].shape == (CFG.num_attention_heads * CFG.head_dim,)
    lf, lu = qf.forward(ids), qu.forward(ids)
    np.testing.assert_allclose(lf, lu, atol=FOLD_ATOL, rtol=0)
    assert np.abs(lf - model.forward(ids)).max() > 1e-3      # quantization did something


def test_fold_without_quantization_is_exact(model, ids):
    """The folded weights alone (no hook) compute the FP function."""
    q = calibrate(quantize(model, QuantPlan(None, 8, granularity="channel", quant_head=True)),
                  ids, progress=False)
    assert q.folds and all(np.any(f != 1) for f in q.folds.values())
    np.testing.assert_allclose(q.deploy.forward(ids), model.forward(ids), atol=EXACT_FOLD_ATOL)


def test_folded_weights_quantized_after_fold(model, ids):
    q = calibrate(quantize(model, QuantPlan(4, 8, granularity="channel")), ids, progress=False)
    lw, lw0 = q.deploy.layers[0], model.layers[0]
    fa = q.folds["layers.0.attn_in"]
    np.testing.assert_allclose(lw.q_proj, fake_quant_weight(lw0.q_proj * fa[None, :], 4))
    np.testing.assert_allclose(lw.input_layernorm, lw0.input_layernorm / fa)
    for row in lw.q_proj:         # per output channel: at most 2*qmax+1 distinct levels
        assert len(np.unique(row)) <= 15


def test_sync_refolds_and_caches(model, ids):
    q = calibrate(quantize(model, QuantPlan(8, 8, granularity="channel")), ids, progress=False)
    w0 = q.deploy.layers[1].down_proj
    q.sync()
    assert q.deploy.layers[1].down_proj is w0                      # nothing changed: cached
    q.params["layers.1.down_in.log_scale"][0] += 0.5
    q.sync()
    assert not np.array_equal(q.deploy.layers[1].down_proj, w0)   # re-folded and re-quantized
    qt = calibrate(quantize(model, QuantPlan(8, 8)), ids, progress=False)
    w1 = qt.deploy.layers[0].q_proj
    qt.params["layers.0.attn_in.log_scale"][...] += 0.5
    qt.sync()
    assert qt.deploy.layers[0].q_proj is w1                        # per-tensor: no fold


# --------------------------------------------------------------------------- site semantics

def test_static_per_tensor_site_is_fake_quant(model, ids):
    q = calibrate(quantize(model, QuantPlan(None, 8)), ids, progress=False)
    st = q.sites[(0, "mlp_in")]
    s = float(np.exp(q.params["layers.0.mlp_in.log_scale"]))
    x = np.random.default_rng(0).standard_normal((2, 5, CFG.hidden_size)) * s * 100
    y = q.hook.forward(0, "mlp_in", x, 0, False)[0]
    np.testing.assert_allclose(y, np.clip(np.rint(x / s), -127, 127) * s, rtol=1e-12)
    assert st.kind == "static"


def test_dynamic_per_token(model, ids):
    q = quantize(model, QuantPlan(None, 4, mode="dynamic"))
    assert q.params == {}
    x = np.random.default_rng(0).standard_normal((2, 5, CFG.hidden_size))
    x[0, 1] = 0.0
    y = q.hook.forward(0, "attn_in", x, 0, False)[0]
    s = np.abs(x).max(-1, keepdims=True) / 7
    np.testing.assert_array_equal(np.abs(y).max(-1), np.abs(x).max(-1))   # row absmax exact
    assert np.all(np.abs(y - x) <= np.where(s > 0, s, 1) / 2 + 1e-12)
    assert not y[0, 1].any()
    # per row: the grid of row r is s_r * integers
    k = y / np.where(s > 0, s, 1)
    np.testing.assert_allclose(k, np.rint(k), atol=1e-9)


def test_truncation_site_sanity(model, ids):
    q = calibrate(quantize(model, QuantPlan(None, 8, truncation=True)), ids, progress=False)
    s = float(np.exp(q.params["layers.0.down_in.log_scale"]))
    x = np.ascontiguousarray(np.linspace(-3, 3, 240).reshape(1, 10, 24) * 127 * s)
    y = q.hook.forward(0, "down_in", x, 0, False)[0]
    assert np.all(np.diff(y.reshape(-1)) >= 0)                       # monotone
    assert np.abs(y).max() <= 127 * s * (1 + 1e-12)                   # saturates at the range
    inner = np.abs(x) <= 0.9 * 127 * s - s                            # identity on the bulk
    np.testing.assert_allclose(y[inner], np.clip(np.rint(x / s), -127, 127)[inner] * s)
    # trained threshold changes the knee
    q.params["layers.0.down_in.rho"][...] = 3.0
    q.sync()
    y2 = q.hook.forward(0, "down_in", x, 0, False)[0]
    assert not np.array_equal(y, y2)
    q.params["layers.0.down_in.rho"][...] = 40.0      # sigmoid == 1 in float: projected
    q.sync()
    assert q.params["layers.0.down_in.rho"] == 9.0
    q.hook.forward(0, "down_in", x.astype(np.float32).astype(np.float64), 0, False)


def test_control_is_identity_with_open_clip(model, ids):
    q = quantize(model, QuantPlan(None, None, adapt_control=True, granularity="channel"))
    for k in q.params:
        if "clip" in k:
            q.params[k][...] = math.log(1e6)
    q.sync()
    np.testing.assert_allclose(q.forward(ids), model.forward(ids), atol=1e-10)
    assert any("gain" in k for k in q.params) and q.params["layers.0.o_in.log_clip"].shape == (16,)


def test_log_and_linear_param_space_agree(model, ids):
    ql = calibrate(quantize(model, QuantPlan(8, 6, granularity="channel")), ids, progress=False)
    qn = calibrate(quantize(model, QuantPlan(8, 6, granularity="channel", param_space="linear")),
                   ids, progress=False)
    assert ql.log_param_keys() and not qn.log_param_keys()
    np.testing.assert_allclose(ql.forward(ids), qn.forward(ids), atol=1e-9)
    R = np.random.default_rng(0).standard_normal((3, 12, CFG.vocab_size))
    for q in (ql, qn):
        q.zero_grad()
        q.backward(q.forward_tape(ids), R)
    for k in ql.params:
        kl = k.replace("log_scale", "scale")
        np.testing.assert_allclose(ql.grads[k], qn.grads[kl] * np.exp(ql.params[k]), rtol=1e-7,
                                   atol=1e-12)


def test_lsq_grad_scale(model, ids):
    import dataclasses
    plan = QuantPlan(8, 8, granularity="channel", kv_bits=8, truncation=True)
    q0 = calibrate(quantize(model, plan), ids, progress=False)
    q1 = quantize(model, dataclasses.replace(plan, lsq_grad_scale=True))
    q1.load_state_dict(q0.state_dict())
    R = np.random.default_rng(0).standard_normal((3, 12, CFG.vocab_size))
    for q in (q0, q1):
        q.zero_grad()
        q.backward(q.forward_tape(ids), R)
    for k, p in q0.params.items():
        if k.endswith(".rho"):         # LSQ's factor is for step sizes only
            np.testing.assert_allclose(q1.grads[k], q0.grads[k], rtol=1e-12)
            continue
        n = ids.size * q0.site_of(k).channels / p.size
        np.testing.assert_allclose(q1.grads[k], q0.grads[k] / math.sqrt(n * 127), rtol=1e-10)


def test_grads_accumulate_and_zero(model, ids):
    q = calibrate(quantize(model, QuantPlan(8, 8)), ids, progress=False)
    R = np.ones((3, 12, CFG.vocab_size))
    q.zero_grad()
    q.backward(q.forward_tape(ids), R)
    g1 = {k: v.copy() for k, v in q.grads.items()}
    q.backward(q.forward_tape(ids), R)
    for k in g1:
        np.testing.assert_allclose(q.grads[k], 2 * g1[k])
    q.zero_grad()
    assert all(not v.any() for v in q.grads.values())
    with pytest.raises(RuntimeError, match="forward_tape"):
        q.hook.backward(0, "attn_in", np.zeros((3, 12, CFG.hidden_size)), None, {})


def test_recompute_gives_same_grads(model, ids):
    q = calibrate(quantize(model, QuantPlan(6, 6, granularity="channel", truncation=True)), ids,
                  progress=False)
    R = np.random.default_rng(0).standard_normal((3, 12, CFG.vocab_size))
    out = []
    for rec in (False, True):
        q.zero_grad()
        d = q.backward(q.forward_tape(ids, recompute=rec), R)
        out.append((d, {k: v.copy() for k, v in q.grads.items()}))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-12, atol=1e-14)
    for k in q.params:
        np.testing.assert_allclose(out[0][1][k], out[1][1][k], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- SmoothQuant

def test_smoothing_factors():
    a, w = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0])
    np.testing.assert_allclose(smoothing_factors(a, w, 0.5), [2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(smoothing_factors(a, w, 1.0), [4.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        smoothing_factors(a, w[:3], 0.5)


def test_smoothquant_forward(model, ids):
    fp = model.forward(ids)
    err = {}
    for name, plan in {"tensor": QuantPlan(None, 8),
                       "smooth": QuantPlan(None, 8, smoothquant_alpha=0.5),
                       "smooth_dyn": QuantPlan(None, 8, smoothquant_alpha=0.5, mode="dynamic")}.items():
        q = calibrate(quantize(model, plan), ids, progress=False)
        err[name] = np.abs(q.forward(ids) - fp).mean()
        if name != "tensor":
            assert set(q.smooth) == {f"layers.{i}.{s}" for i in range(2)
                                     for s in ("attn_in", "o_in", "mlp_in", "down_in")}
            # the smoothing fold alone is exact
            np.testing.assert_allclose(q.deploy.forward(ids), fp, atol=EXACT_FOLD_ATOL)
            # outlier channels get the largest factors at attn_in
            f = q.smooth["layers.0.attn_in"]
            big = np.argsort(np.abs(model.layers[0].input_layernorm))[-2:]
            assert set(np.argsort(f)[-2:]) == set(big)
    assert err["smooth"] < err["tensor"], err


# --------------------------------------------------------------------------- KV cache, backends

@pytest.mark.parametrize("plan", [QuantPlan(8, 8, kv_bits=8, granularity="channel"),
                                  QuantPlan(8, 8, mode="dynamic", kv_bits=4),
                                  QuantPlan(8, 6, kv_bits=6, granularity="channel", sink_tokens=5),
                                  QuantPlan(8, 6, truncation=True, sink_tokens=4),
                                  QuantPlan(8, 6, kv_bits=4, kv_mode="dynamic", sink_tokens=2)],
                         ids=lambda p: p.label)
def test_generate_with_cache_matches_full_forward(plan, ids):
    """Decode positions < sink_tokens use the sink scales, exactly as a full forward does."""
    m = outlier_model(np.float32)
    q = calibrate(quantize(m, plan), ids, progress=False)
    prompt = [1, 5, 9]
    toks = q.generate(prompt, 5)
    full = q.forward(np.array([prompt + toks[:-1]]))[0]
    np.testing.assert_array_equal(np.argmax(full[len(prompt) - 1:], -1), toks)
    static_kv = plan.kv_bits and plan.kv_mode == "static"
    assert ("layers.0.k_cache.log_scale" in q.params) == bool(static_kv)


def test_float32_c_kernels_match_numpy_twin(ids, monkeypatch):
    pytest.importorskip("sasq._C", reason="C extension not built")
    m = outlier_model(np.float32)
    plan = QuantPlan(4, 6, granularity="channel", truncation=True, kv_bits=8)
    q = calibrate(quantize(m, plan), ids, progress=False)
    R = np.random.default_rng(0).standard_normal((3, 12, CFG.vocab_size)).astype(np.float32)

    def run():
        q.zero_grad()
        tape = q.forward_tape(ids)
        d = q.backward(tape, R)
        return tape.logits, d, {k: v.copy() for k, v in q.grads.items()}

    a = run()
    from sasq import reference
    monkeypatch.setattr(sites_mod, "_backend", lambda dtype: reference)
    b = run()
    np.testing.assert_allclose(a[0], b[0], atol=BACKEND_ATOL)
    np.testing.assert_allclose(a[1], b[1], atol=BACKEND_ATOL * np.abs(b[1]).max())
    for k in a[2]:
        np.testing.assert_allclose(a[2][k], b[2][k], rtol=1e-3, atol=1e-3 * np.abs(b[2][k]).max())


def test_state_dict_roundtrip(model, ids):
    plan = QuantPlan(8, 8, smoothquant_alpha=0.5, truncation=True)
    q = calibrate(quantize(model, plan), ids, progress=False)
    d = q.state_dict()
    assert any(k.startswith("smooth.") for k in d)
    q2 = quantize(model, plan)
    q2.load_state_dict(d)
    np.testing.assert_array_equal(q2.forward(ids), q.forward(ids))
    bad = dict(d)
    bad.pop(next(iter(q.params)))
    with pytest.raises(ValueError, match="missing"):
        q2.load_state_dict(bad)
    bad = dict(d, extra=np.zeros(1))
    with pytest.raises(ValueError, match="unexpected"):
        q2.load_state_dict(bad)
    k = "layers.0.attn_in.log_scale"
    with pytest.raises(ValueError, match="shape"):
        q2.load_state_dict(dict(d, **{k: np.zeros(3)}))
    assert set(q.scales()) == {st.key for st in q.site_list()}


def test_deployed_scales(model, ids):
    q = calibrate(quantize(model, QuantPlan(8, 8, granularity="channel", kv_bits=8)), ids,
                  progress=False)
    d = q.deployed_scales()
    assert float(d["layers.0.attn_in"]) == 1.0 and d["layers.0.attn_in"].ndim == 0
    f = q.folds["layers.1.o_in"]
    np.testing.assert_allclose(d["layers.1.v_cache"], q.scales()["layers.1.v_cache"] / f)
    qt = calibrate(quantize(model, QuantPlan(8, 8)), ids, progress=False)
    np.testing.assert_allclose(qt.deployed_scales()["layers.0.o_in"], qt.scales()["layers.0.o_in"])


def test_sink_rows_use_their_own_scale(model, ids):
    q = calibrate(quantize(model, QuantPlan(None, 8, sink_tokens=2)), ids, progress=False)
    s, ss = q.sites[(0, "mlp_in")].s, q.sites[(0, "mlp_in")].s_sink
    assert ss.shape == (2,) and q.sink_scales()["layers.0.mlp_in"].shape == (2,)
    x = np.random.default_rng(0).standard_normal((2, 5, CFG.hidden_size)) * 3
    for pos in (0, 1, 3):
        y = q.hook.forward(0, "mlp_in", x, pos, False)[0]
        for j in range(5):
            sc = ss[pos + j] if pos + j < 2 else s
            np.testing.assert_allclose(y[:, j], np.clip(np.rint(x[:, j] / sc), -127, 127) * sc,
                                       rtol=1e-12, err_msg=f"pos {pos} row {j}")
    with pytest.raises(ValueError, match="sink_tokens"):
        QuantPlan(8, 8, mode="dynamic", sink_tokens=2)
    with pytest.raises(ValueError, match="sink_tokens"):
        QuantPlan(8, 8, sink_tokens=-1)


# --------------------------------------------------------------------------- rotation, GPTQ

def test_quantized_weights_are_the_deployed_weights(model, ids):
    """Integers for export/engine: codes * scales equals the fake-quant weight bit for bit."""
    m32 = outlier_model(np.float32)
    q = calibrate(quantize(m32, QuantPlan(4, 8, granularity="channel")), ids, progress=False)
    qw = q.quantized_weights()
    for (i, name), (codes, scales) in qw.items():
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 7
        np.testing.assert_array_equal(codes.astype(np.float32) * scales[:, None],
                                      getattr(q.deploy.layers[i], name), err_msg=f"{i} {name}")
    with pytest.raises(ValueError, match="not quantized"):
        quantize(m32, QuantPlan(None, 8)).quantized_weights()


def test_gptq_plan_uses_calibration_hessians(ids):
    m = outlier_model(np.float32)
    with pytest.raises(ValueError, match="gptq"):
        QuantPlan(4, 8, granularity="channel", weights="gptq")
    rng = np.random.default_rng(5)
    calib = rng.integers(0, CFG.vocab_size, (6, 12))
    rtn = calibrate(quantize(m, QuantPlan(4, None)), calib, progress=False)
    g = quantize(m, QuantPlan(4, None, weights="gptq"))
    with pytest.raises(RuntimeError, match="calibrate"):
        g.forward(ids)
    calibrate(g, calib, progress=False)
    assert g.gptq is not None and g.plan.label == "W4A16 GPTQ weight-only"
    for (i, name), (codes, scales) in g.quantized_weights().items():
        np.testing.assert_array_equal(codes.astype(np.float32) * scales[:, None],
                                      getattr(g.deploy.layers[i], name))
    fp = m.forward(calib)
    err = lambda q: float(np.mean((q.forward(calib) - fp) ** 2))  # noqa: E731
    assert err(g) < err(rtn), (err(g), err(rtn))  # on its own calibration windows


def test_rotated_plans(ids):
    m = outlier_model(np.float64)
    q = calibrate(quantize(m, QuantPlan(None, 4, rotate=True)), ids, progress=False)
    assert q.model.rotation["seed"] == 0 and q.plan.label.startswith("W16A4 rotated")
    fp = m.forward(ids)
    np.testing.assert_allclose(q.model.forward(ids), fp, atol=1e-10)  # same FP function
    plain = calibrate(quantize(m, QuantPlan(None, 4)), ids, progress=False)
    err = lambda qq: float(np.abs(qq.forward(ids) - fp).mean())  # noqa: E731
    assert err(q) < err(plain), (err(q), err(plain))  # rotation removes the outlier channels
    again = quantize(q.model, QuantPlan(None, 4, rotate=True))  # an already rotated model is reused
    assert again.model is q.model
    with pytest.raises(ValueError, match="seed"):
        quantize(q.model, QuantPlan(None, 4, rotate=True, rotate_seed=1))


def test_dynamic_clip_ratio(model):
    q = quantize(model, QuantPlan(None, 4, mode="dynamic", dynamic_clip=0.9))
    x = np.random.default_rng(0).standard_normal((1, 3, CFG.hidden_size))
    y = q.hook.forward(0, "attn_in", x, 0, False)[0]
    s = 0.9 * np.abs(x).max(-1, keepdims=True) / 7
    np.testing.assert_allclose(y, np.clip(np.rint(x / s), -7, 7) * s, rtol=1e-12)
    with pytest.raises(ValueError, match="dynamic_clip"):
        QuantPlan(8, 8, dynamic_clip=0.9)
