"""Logits of sasq.load(...).forward against transformers' LlamaForCausalLM (torch CPU float32), on
the real stories260K and on small random models built and saved by transformers; unsupported
configs are clear ValueErrors."""
import json
import shutil

import numpy as np
import pytest

import sasq
from sasq.model import LlamaConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGIT_RTOL = 1e-4  # max |sasq - HF| <= LOGIT_RTOL * max |HF logit|

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128)
CASES = {
    "gqa_untied": dict(),
    "mha_tied": dict(num_key_value_heads=8, tie_word_embeddings=True),
    "head_dim_ne": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "theta_5e5_llama3": dict(rope_theta=500000.0, rope_scaling=LLAMA3),
    "theta_1e3_gqa4": dict(rope_theta=1000.0, num_key_value_heads=4),
}


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    assert err <= LOGIT_RTOL * np.abs(ref).max(), f"max abs diff {err} vs max|logit| {np.abs(ref).max()}"


def make_hf(path, seed=0, **overrides):
    """A random LlamaForCausalLM with O(1) activations, saved as safetensors in path."""
    cfg = transformers.LlamaConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def test_stories260k_logits(stories_dir):
    model = sasq.load(stories_dir)
    assert model.tokenizer is not None and model.config.num_key_value_heads == 4
    assert model.lm_head is model.embed_tokens
    hf = transformers.LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 37), (1, 512)]:
        ids = rng.integers(0, model.config.vocab_size, shape)
        assert_logits_close(model.forward(ids), hf_logits(hf, ids))


def test_stories260k_text_logits(stories_dir):
    model = sasq.load(stories_dir)
    ids = np.array([model.tokenizer.encode("Once upon a time, there was a little girl.")])
    hf = transformers.LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    assert_logits_close(model.forward(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_models_match_transformers(tmp_path, case):
    hf = make_hf(tmp_path, **CASES[case])
    model = sasq.load(tmp_path)
    c = model.config
    assert (c.num_key_value_heads, c.head_dim) == (hf.config.num_key_value_heads,
                                                    hf.config.head_dim)
    assert (model.lm_head is model.embed_tokens) == bool(CASES[case].get("tie_word_embeddings"))
    if "rope_scaling" in CASES[case]:
        assert c.rope_scaling["rope_type"] == "llama3"
    ids = np.random.default_rng(1).integers(0, c.vocab_size, (3, 57))  # batch > 1, T > 16
    assert_logits_close(model.forward(ids), hf_logits(hf, ids))
    # return_hidden gives the normed hidden state: logits = hidden @ lm_head.T
    h = model.forward(ids, return_hidden=True)
    assert h.shape == (3, 57, c.hidden_size)
    assert np.allclose(h @ model.lm_head.T, model.forward(ids), rtol=1e-5, atol=1e-5)


def test_llama3_scaling_changes_logits(tmp_path):
    """Guards the llama3 case against passing by accident: ignoring the scaling is detectable."""
    make_hf(tmp_path, rope_theta=500000.0, rope_scaling=LLAMA3)
    model = sasq.load(tmp_path)
    plain = model.copy_with(config=LlamaConfig(**{**model.config.__dict__, "rope_scaling": None}))
    ids = np.random.default_rng(2).integers(0, 101, (1, 64))
    a, b = model.forward(ids), plain.forward(ids)
    assert np.abs(a - b).max() > 100 * LOGIT_RTOL * np.abs(a).max()


def test_config_from_old_and_new_style_dicts():
    old = LlamaConfig.from_dict({**BASE, "rope_theta": 5e5, "rope_scaling": {**LLAMA3}})
    new = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert old == new and old.rope_theta == 5e5 and old.head_dim == 8
    legacy = LlamaConfig.from_dict({**BASE, "rope_scaling": {**LLAMA3, "type": "llama3"}})
    assert legacy.rope_scaling["factor"] == 8.0
    plain = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 1e4,
                                                               "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.num_key_value_heads == 2
    assert LlamaConfig.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize("patch,field", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures"),
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"head_dim": 7}, "head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_unsupported_config_is_value_error(tmp_path, stories_dir, patch, field):
    shutil.copytree(stories_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(patch)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=field):
        sasq.load(tmp_path / "m")


def test_bad_tensors_are_value_errors(stories_dir):
    from sasq.io import load_checkpoint_dir
    cfg = LlamaConfig.from_json(stories_dir / "config.json")
    tensors = dict(load_checkpoint_dir(stories_dir))
    name = "model.layers.3.mlp.up_proj.weight"
    with pytest.raises(ValueError, match=name):
        sasq.LlamaModel.from_config_and_tensors(cfg, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=name):
        sasq.LlamaModel.from_config_and_tensors(cfg, {**tensors, name: tensors[name][:, :5]})
    untied = LlamaConfig(**{**cfg.__dict__, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="lm_head.weight"):
        sasq.LlamaModel.from_config_and_tensors(untied, tensors)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        sasq.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        sasq.load(tmp_path)


def test_bad_ids_are_value_errors(stories_dir):
    model = sasq.load(stories_dir)
    for ids in [np.array([[0, 512]]), np.array([[-1]]), np.zeros((1, 0), int), np.ones((1, 2)) * 0.5]:
        with pytest.raises(ValueError):
            model.forward(ids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_as_float32(tmp_path, dtype):
    """A bf16/f16 checkpoint: sasq upcasts to float32 like transformers loading it in float32."""
    hf = make_hf(tmp_path / "f32")
    hf.to(getattr(torch, dtype)).save_pretrained(tmp_path / "half", safe_serialization=True)
    model = sasq.load(tmp_path / "half")
    assert model.dtype == np.float32
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "half", dtype=torch.float32)
    ids = np.random.default_rng(3).integers(0, 101, (2, 19))
    assert_logits_close(model.forward(ids), hf_logits(ref.eval(), ids))


def test_sharded_checkpoint(tmp_path):
    hf = make_hf(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = sasq.load(tmp_path / "sharded")
    ids = np.random.default_rng(4).integers(0, 101, (1, 23))
    assert_logits_close(model.forward(ids), hf_logits(hf, ids))


def test_long_context_llama3(tmp_path):
    """Positions up to 1500 (RoPE angles in float32 far from the origin), several blocks of
    query rows in the blocked attention."""
    sc = {**LLAMA3, "original_max_position_embeddings": 256}
    hf = make_hf(tmp_path, rope_theta=500000.0, rope_scaling=sc, max_position_embeddings=2048)
    model = sasq.load(tmp_path)
    ids = np.random.default_rng(5).integers(0, 101, (1, 1500))
    assert_logits_close(model.forward(ids), hf_logits(hf, ids))
