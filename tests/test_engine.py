"""sasq.export + sasq.StaticInt8Model: the deployed integer model computes what was trained.

Deployment-exact invariant: a deployable float32 QuantModel runs its linears through the same
INT8 GEMM and the same quantize kernels as the engine (sasq.qtensor), so for trained plans of
every deployable form the engine's logits equal the fake-quant model's to ENGINE_ATOL (the only
freedom is float rounding in code both run identically: 0 in practice) and greedy generations
agree for 100 tokens. The export is checked by a real consumer (transformers + compressed-tensors)
within CT_BUDGET, tampered exports give one-line errors, and no run-time range is computed.
"""
import json
import shutil

import numpy as np
import pytest

import sasq
from sasq import ops
from sasq.model import LlamaConfig, random_model
from sasq.plan import QuantPlan
from sasq.train import train_scales

ENGINE_ATOL = 1e-5  # same kernels, same float operations: the observed difference is 0.0

GQA = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True)

PLANS = {
    "per-tensor": QuantPlan(8, 8),
    "folded": QuantPlan(8, 8, granularity="channel"),
    "sink": QuantPlan(8, 8, granularity="channel", sink_tokens=4),
    "trunc": QuantPlan(8, 6, granularity="channel", truncation=True, sink_tokens=2),
    "w4a8-kv": QuantPlan(4, 8, sink_tokens=2, kv_bits=8),
    "rotated": QuantPlan(8, 8, rotate=True, sink_tokens=4),
    "dynamic": QuantPlan(8, 8, mode="dynamic"),
    # R3 rotates the keys before a static (sink-aware) K cache; QuaRot's dynamic KV form
    "rotated-r3-kv": QuantPlan(8, 8, rotate=True, sink_tokens=2, kv_bits=6, rotate_qk=True),
    # v arrives divided by the o_in fold: the dynamic KV grid rounds what the engine caches
    "folded-kv-dynamic": QuantPlan(8, 8, granularity="channel", kv_bits=4, kv_mode="dynamic"),
    "quarot-wclip": QuantPlan(4, 8, mode="dynamic", rotate=True, weights="gptq", w_clip=True),
    "quarot-kv4": QuantPlan(8, 8, mode="dynamic", rotate=True, kv_bits=4, kv_mode="dynamic",
                            kv_clip=0.95, rotate_qk=True),
}


def _trained(model, plan, ids, steps=4):
    q = sasq.calibrate(sasq.quantize(model, plan), ids[:4, :32], progress=False)
    if q.params and steps:
        train_scales(q, ids.reshape(-1), steps=steps, lr=0.05, seqlen=32, batch=2, objective="kl",
                     progress=False, pool=8)
    return q


@pytest.fixture(scope="module")
def stories(stories_dir):
    return sasq.load(stories_dir)


@pytest.fixture(scope="module")
def gqa():
    m = random_model(GQA, seed=5)
    for lw in m.layers:  # outlier channels, and a massive value on position 0's path
        lw.input_layernorm = lw.input_layernorm.copy()
        lw.input_layernorm[[3, 17]] *= 15
    return m


def _ids(vocab, seed=0, n=12, T=33):
    return np.random.default_rng(seed).integers(0, vocab, (n, T))


@pytest.mark.parametrize("name", sorted(PLANS))
def test_engine_equals_trained_fake_quant_model(stories, tmp_path, name):
    ids = _ids(stories.config.vocab_size)
    q = _trained(stories, PLANS[name], ids)
    out = sasq.export(q, tmp_path / "m")
    e = sasq.StaticInt8Model.from_pretrained(out)
    x = ids[-2:]
    np.testing.assert_allclose(e.forward(x), q.forward(x), atol=ENGINE_ATOL, rtol=0)
    assert e.generate([1, 5, 9], 100) == q.generate([1, 5, 9], 100)
    assert e.tokenizer is not None and e.tokenizer.encode("Once") == stories.tokenizer.encode("Once")


@pytest.mark.parametrize("name", ["folded", "sink", "trunc", "w4a8-kv", "rotated-r3-kv",
                                  "quarot-kv4", "folded-kv-dynamic"])
def test_engine_equals_fake_quant_on_random_gqa(gqa, tmp_path, name):
    ids = _ids(GQA.vocab_size, seed=1)
    q = _trained(gqa, PLANS[name], ids)
    e = sasq.StaticInt8Model.from_pretrained(sasq.export(q, tmp_path / "g"))
    np.testing.assert_allclose(e.forward(ids[-3:]), q.forward(ids[-3:]), atol=ENGINE_ATOL, rtol=0)
    assert e.generate([2, 7], 100) == q.generate([2, 7], 100)


def test_decode_uses_sink_scales_and_no_runtime_range(stories, tmp_path, monkeypatch):
    """Static plans never compute a range at run time: the dynamic kernel is never called, in
    prefill or decode; decode positions < sink_tokens use their own scales (decode == prefill)."""
    q = _trained(stories, PLANS["sink"], _ids(stories.config.vocab_size), steps=0)
    e = sasq.StaticInt8Model.from_pretrained(sasq.export(q, tmp_path / "s"))

    def boom(*a, **k):
        raise AssertionError("a static engine computed a dynamic range")

    monkeypatch.setattr(ops, "quantize_dynamic", boom)
    toks = e.generate([1], 12)  # positions 1..3 decode on the sink scales
    full = e.forward(np.array([[1] + toks[:-1]]))[0]
    assert list(np.argmax(full, -1)) == toks
    monkeypatch.undo()
    d = sasq.StaticInt8Model.from_pretrained(tmp_path / "s", dynamic=True)
    assert d.dynamic and d.generate([1], 5)  # the baseline engine does compute ranges


def test_plans_that_are_not_integer_models_are_refused(stories, tmp_path):
    for plan in (QuantPlan(None, 8), QuantPlan(8, None), QuantPlan(8, 8, granularity="channel", fold=False),
                 QuantPlan(None, None, adapt_control=True)):
        q = sasq.quantize(stories, plan)
        with pytest.raises(ValueError, match="cannot export"):
            sasq.export(q, tmp_path / "x")
    q = sasq.quantize(stories, QuantPlan(8, 8))
    with pytest.raises(RuntimeError, match="calibrate"):
        sasq.export(q, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_is_atomic_and_refuses_overwrite(stories, tmp_path, monkeypatch):
    q = _trained(stories, PLANS["per-tensor"], _ids(stories.config.vocab_size), steps=0)
    out = sasq.export(q, tmp_path / "m")
    with pytest.raises(FileExistsError):
        sasq.export(q, out)
    import sasq.exporter as X

    def crash(*a, **k):
        raise KeyboardInterrupt("crash while writing")

    monkeypatch.setattr(X, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        sasq.export(q, tmp_path / "n")
    monkeypatch.undo()
    assert not (tmp_path / "n").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left
    sasq.StaticInt8Model.from_pretrained(out)  # the old export is intact


def _tamper(src, dst, edit_config=None, edit_engine=None, tensors=None):
    shutil.copytree(src, dst)
    if edit_config:
        c = json.loads((dst / "config.json").read_text())
        edit_config(c)
        (dst / "config.json").write_text(json.dumps(c))
    if edit_engine:
        e = json.loads((dst / "sasq_engine.json").read_text())
        edit_engine(e)
        (dst / "sasq_engine.json").write_text(json.dumps(e))
    if tensors:
        from sasq.io.safetensors import load_safetensors, save_safetensors
        t = {k: np.array(v) for k, v in load_safetensors(dst / "model.safetensors").items()}
        tensors(t)
        save_safetensors(dst / "model.safetensors", t)
    return dst


def test_tampered_exports_give_one_line_errors(stories, tmp_path):
    q = _trained(stories, PLANS["sink"], _ids(stories.config.vocab_size), steps=0)
    src = sasq.export(q, tmp_path / "ok")
    k = "model.layers.0.self_attn.q_proj"
    cases = {
        "no quantization_config": (dict(edit_config=lambda c: c.pop("quantization_config")),
                                   "quantization_config"),
        "unknown method": (dict(edit_config=lambda c: c["quantization_config"].update(quant_method="gptq")),
                           "quantization_config"),
        "unknown format": (dict(edit_config=lambda c: c["quantization_config"].update(format="pack-quantized")),
                           "format"),
        "missing scale": (dict(tensors=lambda t: t.pop(k + ".weight_scale")), "weight_scale"),
        "NaN scale": (dict(tensors=lambda t: t[k + ".weight_scale"].__setitem__(0, np.nan)), "NaN"),
        "wrong shape": (dict(tensors=lambda t: t.__setitem__(k + ".weight_scale", t[k + ".weight_scale"][:3])),
                        "shape"),
        "float weight": (dict(tensors=lambda t: t.__setitem__(k + ".weight", t[k + ".weight"].astype(np.float32))),
                         "dtype"),
        "NaN sink scale": (dict(edit_engine=lambda e: e["sites"]["layers.0.attn_in"].update(scale=float("nan"))),
                           "scale"),
        "bad bits": (dict(edit_engine=lambda e: e["sites"]["layers.1.o_in"].update(bits=9)), "bits"),
        "missing site": (dict(edit_engine=lambda e: e["sites"].pop("layers.1.mlp_in")), "mlp_in"),
        "bad format": (dict(edit_engine=lambda e: e.update(format=7)), "format"),
    }
    for i, (what, (kw, match)) in enumerate(cases.items()):
        d = _tamper(src, tmp_path / f"t{i}", **kw)
        with pytest.raises(ValueError, match=match) as err:
            sasq.StaticInt8Model.from_pretrained(d)
        assert str(d) in str(err.value) and "\n" not in str(err.value), (what, str(err.value))
    with pytest.raises(ValueError, match="StaticInt8Model"):
        sasq.load(src)  # an export is not a float checkpoint: say what to use


def test_orthogonal_r4_factor_is_exported_and_checked(stories, tmp_path):
    """stories260K's 172 has no Hadamard: the rotated export carries R4's (43, 43) factor; a
    missing or non-orthogonal one is refused in one line."""
    from sasq.io.safetensors import load_safetensors, save_safetensors
    q = _trained(stories, PLANS["rotated"], _ids(stories.config.vocab_size), steps=0)
    src = sasq.export(q, tmp_path / "ok")
    assert json.loads((src / "sasq_engine.json").read_text())["online_down_small"] == "online_down.small"
    ext = {k: np.array(v) for k, v in load_safetensors(src / "sasq_extensions.safetensors").items()}
    np.testing.assert_array_equal(ext["online_down.small"], q.model.online_down_small.astype(np.float32))
    for i, (edit, match) in enumerate([(lambda t: t.pop("online_down.small"), "online_down_small"),
                                       (lambda t: t["online_down.small"].__setitem__((0, 0), 3.0),
                                        "orthogonal")]):
        d = _tamper(src, tmp_path / f"t{i}")
        t = {k: np.array(v) for k, v in load_safetensors(d / "sasq_extensions.safetensors").items()}
        edit(t)
        save_safetensors(d / "sasq_extensions.safetensors", t)
        with pytest.raises(ValueError, match=match) as err:
            sasq.StaticInt8Model.from_pretrained(d)
        assert str(d) in str(err.value) and "\n" not in str(err.value)


def test_format_1_exports_still_load(stories, tmp_path):
    from sasq import engine, exporter
    assert exporter.FORMAT_VERSION == engine.FORMAT_VERSION
    q = _trained(stories, PLANS["sink"], _ids(stories.config.vocab_size), steps=0)
    src = sasq.export(q, tmp_path / "ok")
    d = _tamper(src, tmp_path / "v1", edit_engine=lambda e: (e.update(format=1), e.pop("online_qk"),
                                                            e.pop("online_down_small")))
    x = _ids(stories.config.vocab_size)[-1:]
    np.testing.assert_array_equal(sasq.StaticInt8Model.from_pretrained(d).forward(x), q.forward(x))


def test_tampered_dynamic_kv_sites_give_one_line_errors(stories, tmp_path):
    q = _trained(stories, PLANS["quarot-kv4"], _ids(stories.config.vocab_size), steps=0)
    src = sasq.export(q, tmp_path / "ok")
    kc = "layers.0.k_cache"
    cases = {
        "group is not head_dim": (lambda e: e["sites"][kc].update(group=3), "group"),
        "clip out of range": (lambda e: e["sites"][kc].update(clip=1.5), "clip"),
        "clip not a number": (lambda e: e["sites"][kc].update(clip="x"), "clip"),
        "dynamic_kv on a linear": (lambda e: e["sites"]["layers.0.o_in"].update(kind="dynamic_kv",
                                                                                group=8), "KV site"),
        "float group": (lambda e: e["sites"][kc].update(group=float(e["sites"][kc]["group"])), "group"),
        "per-token KV": (lambda e: e["sites"][kc].update(kind="dynamic"), "KV cache"),
        "string flag": (lambda e: e.update(online_qk="false"), "online_qk"),
        "future format": (lambda e: e.update(format=3), "format"),
    }
    for i, (what, (edit, match)) in enumerate(cases.items()):
        d = _tamper(src, tmp_path / f"t{i}", edit_engine=edit)
        with pytest.raises(ValueError, match=match) as err:
            sasq.StaticInt8Model.from_pretrained(d)
        assert str(d) in str(err.value) and "\n" not in str(err.value), (what, str(err.value))


def test_compressed_tensors_consumer_agrees(stories, tmp_path):
    """transformers + compressed-tensors load a W8A8 static per-tensor/folded export and compute
    its logits. They are the same quantized function computed another way: CT fake-quantizes each
    Linear input with input_scale on [-128, 127] (ours [-127, 127]: an input below -127.5 steps is
    -128 there and -127 here, one step on those elements) and multiplies float weights in float
    (ours: exact int8 products), so an element near a rounding boundary can round the other way,
    and the next layers carry the difference. CT_BUDGET, on these windows: the mean |logit
    difference| stays below 40 % of the mean change quantization itself makes (measured 36 % /
    6 %), the argmax agrees on >= 90 % of positions (92 % / 96 %), and the largest difference is
    below 5 % of the largest logit (2.0 % / 1.9 %)."""
    pytest.importorskip("compressed_tensors")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = _ids(stories.config.vocab_size, seed=3)
    for name in ("per-tensor", "folded"):
        q = _trained(stories, PLANS[name], ids, steps=2)
        out = sasq.export(q, tmp_path / name)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        x = ids[-2:]
        with torch.no_grad():
            ref = hf(torch.from_numpy(x)).logits.numpy()
        ours = sasq.StaticInt8Model.from_pretrained(out).forward(x)
        fp = stories.forward(x)
        quant_effect = np.abs(ours - fp).mean()
        assert quant_effect > 1e-3  # it does quantize
        assert np.abs(ref - ours).mean() < 0.4 * quant_effect, name
        assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.9, name
        assert np.abs(ref - ours).max() < 0.05 * np.abs(ours).max(), name


def test_other_consumers_refuse_plans_that_need_the_extensions(stories, tmp_path):
    """A sink-aware export is not a compressed-tensors model: transformers must refuse it (it would
    otherwise read int8 codes as float weights after a mere warning)."""
    transformers = pytest.importorskip("transformers")
    q = _trained(stories, PLANS["sink"], _ids(stories.config.vocab_size), steps=0)
    out = sasq.export(q, tmp_path / "s")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "sasq"
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    sasq.StaticInt8Model.from_pretrained(out)  # ours reads it
