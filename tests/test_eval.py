"""sasq.eval: the QuaRot/GPTQ perplexity protocol, checked against torch's cross_entropy."""
import json
import math

import numpy as np
import pytest

import sasq.eval as ev
from sasq.data import cut_windows as windows
from sasq.data import tokenize_corpus
from sasq.eval import PerplexityResult, perplexity

torch = pytest.importorskip("torch")
F = torch.nn.functional

NLL_RTOL = 1e-6  # float32 logits, float64 accumulation, against torch's float64 cross_entropy
PPL_RTOL_VS_HF = 1e-4  # sasq forward vs transformers forward (float32 both), whole-ppl level


class FakeModel:
    """Context-dependent toy LM: hidden = running mean of embeddings; logits = hidden @ lm_head.T."""

    def __init__(self, V=97, C=16, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.embed = rng.standard_normal((V, C)).astype(dtype)
        self.lm_head = (3 * rng.standard_normal((V, C))).astype(dtype)
        self.calls = []

    def forward(self, ids, return_hidden=False):
        assert return_hidden
        self.calls.append(ids.shape)
        x = self.embed[ids]  # (B, T, C)
        return np.cumsum(x, axis=1) / np.arange(1, ids.shape[1] + 1)[None, :, None]


def torch_ppl(model, wins):
    """Independent reference: full logits, shifted labels, F.cross_entropy per window."""
    nlls = []
    for w in wins:
        h = model.forward(w[None], return_hidden=True)[0]
        logits = torch.from_numpy(np.asarray(h @ model.lm_head.T, dtype=np.float64))
        nlls.append(F.cross_entropy(logits[:-1], torch.from_numpy(w[1:].astype(np.int64))).item())
    return math.exp(np.mean(nlls)), nlls


def stream(n, V=97, seed=1):
    return np.random.default_rng(seed).integers(0, V, n)


def test_windows_cut_tail_and_keep_order():
    ids = np.arange(23)
    w = windows(ids, 5)
    assert w.shape == (4, 5)
    np.testing.assert_array_equal(w.reshape(-1), ids[:20])
    with pytest.raises(ValueError, match="shorter than one window"):
        windows(np.arange(4), 5)
    with pytest.raises(ValueError, match="length"):
        windows(ids, 0)
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(None, ids, 1, progress=False)


@pytest.mark.parametrize("seqlen, chunk", [(33, ev.CHUNK_ROWS), (300, ev.CHUNK_ROWS), (40, 7)])
def test_perplexity_equals_torch_cross_entropy(monkeypatch, seqlen, chunk):
    monkeypatch.setattr(ev, "CHUNK_ROWS", chunk)  # row chunking must not change the sum
    model, ids = FakeModel(), stream(5 * seqlen + 11)
    res = perplexity(model, ids, seqlen, progress=False)
    ref_ppl, ref_nlls = torch_ppl(model, windows(ids, seqlen))
    assert res.n_windows == 5 and res.n_tokens == len(ids) and res.seqlen == seqlen
    assert res.n_predictions == 5 * (seqlen - 1)
    np.testing.assert_allclose(res.window_nlls, ref_nlls, rtol=NLL_RTOL)
    np.testing.assert_allclose(res.ppl, ref_ppl, rtol=NLL_RTOL)
    np.testing.assert_allclose(res.nll, math.log(ref_ppl), rtol=NLL_RTOL)


def test_batch_size_and_max_windows():
    model, ids = FakeModel(), stream(7 * 20 + 3)
    one = perplexity(model, ids, 20, progress=False)
    model.calls.clear()
    three = perplexity(model, ids, 20, batch_size=3, progress=False)
    assert model.calls == [(3, 20), (3, 20), (1, 20)]
    np.testing.assert_allclose(three.window_nlls, one.window_nlls, rtol=1e-6)
    few = perplexity(model, ids, 20, max_windows=2, progress=False)
    assert few.n_windows == 2 and few.window_nlls == pytest.approx(one.window_nlls[:2], rel=1e-6)
    # ready-made windows give the same result as the stream they came from
    again = perplexity(model, windows(ids, 20), 20, progress=False)
    np.testing.assert_allclose(again.window_nlls, one.window_nlls, rtol=1e-6)


def test_float64_model_is_scored_in_float64():
    model = FakeModel(dtype=np.float64)
    ids = stream(3 * 50)
    res = perplexity(model, ids, 50, progress=False)
    ref_ppl, _ = torch_ppl(model, windows(ids, 50))
    assert res.ppl == pytest.approx(ref_ppl, rel=1e-12)


def torch_fidelity(model, ref, wins):
    """Independent reference: full logits, F.kl_div(log q, log p) per scored position, argmax."""
    kls, agree = [], []
    for w in wins:
        zq = torch.from_numpy(model.forward(w[None], return_hidden=True)[0] @ model.lm_head.T)[:-1]
        zp = torch.from_numpy(ref.forward(w[None], return_hidden=True)[0] @ ref.lm_head.T)[:-1]
        lq, lp = F.log_softmax(zq.double(), -1), F.log_softmax(zp.double(), -1)
        kls.append(F.kl_div(lq, lp, log_target=True, reduction="sum").item() / len(zq))
        agree.append((zq.argmax(-1) == zp.argmax(-1)).double().mean().item())
    return kls, agree


@pytest.mark.parametrize("chunk", [ev.CHUNK_ROWS, 7])
def test_kl_and_top1_against_torch(monkeypatch, tmp_path, chunk):
    monkeypatch.setattr(ev, "CHUNK_ROWS", chunk)
    model, ref, ids = FakeModel(seed=1), FakeModel(seed=0), stream(4 * 30 + 5)
    ref.lm_head = ref.lm_head + 0.3 * model.lm_head  # related but different models
    want_kl, want_top1 = torch_fidelity(model, ref, windows(ids, 30))
    res = perplexity(model, ids, 30, progress=False, reference=ref)
    np.testing.assert_allclose(res.window_kls, want_kl, rtol=1e-5)
    np.testing.assert_allclose(res.window_top1, want_top1, rtol=0, atol=1e-12)
    assert res.kl == pytest.approx(np.mean(want_kl), rel=1e-5) and 0 < res.top1 < 1
    # a precomputed Reference (written to and read back from a file) gives the same numbers
    path = tmp_path / "ref.npz"
    r1 = ev.Reference.compute(ref, ids, 30, progress=False, path=path)
    n_calls = len(ref.calls)
    r2 = ev.Reference.compute(ref, ids, 30, progress=False, path=path)  # read from the file
    assert len(ref.calls) == n_calls
    np.testing.assert_array_equal(r1.hidden, r2.hidden)
    other = ev.Reference.compute(FakeModel(seed=5), ids, 30, progress=False, path=path)
    assert not np.array_equal(other.hidden, r1.hidden)  # another model: not the stale file
    again = perplexity(model, ids, 30, progress=False, reference=r2)
    np.testing.assert_allclose(again.window_kls, res.window_kls, rtol=1e-6)  # float32 storage
    assert again.window_top1 == res.window_top1
    # the model against itself: KL 0, full agreement
    self_ = perplexity(ref, ids, 30, progress=False, reference=r1)
    assert abs(self_.kl) < 1e-6 and self_.top1 == 1.0
    with pytest.raises(ValueError, match="other windows"):
        perplexity(model, ids, 30, max_windows=2, progress=False, reference=r1)


def test_result_to_dict_is_json():
    res = perplexity(FakeModel(), stream(100), 25, progress=False)
    d = json.loads(json.dumps(res.to_dict()))
    assert {"ppl", "nll", "n_windows", "seqlen", "n_tokens", "window_nlls"} <= set(d)
    assert d["ppl"] == res.ppl and len(d["window_nlls"]) == 4
    assert isinstance(res, PerplexityResult) and "4 windows" in str(res)


def test_bad_inputs():
    model = FakeModel(V=10)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        perplexity(model, np.array([1, 2, 10, 3]), 2, progress=False)
    with pytest.raises(ValueError, match="integers"):
        perplexity(model, np.array([1.0, 2.0]), 2, progress=False)
    with pytest.raises(ValueError, match="shorter than one window"):
        perplexity(model, np.array([1, 2]), 3, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, np.arange(8), 4, batch_size=0, progress=False)

    class Long(FakeModel):
        class config:
            max_position_embeddings = 8
    with pytest.raises(ValueError, match="max_position_embeddings 8"):
        perplexity(Long(V=10), np.arange(10) % 10, 9, progress=False)


def test_nan_logits_warn_not_silent():
    model = FakeModel()
    model.lm_head = model.lm_head.copy()
    model.lm_head[5, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = perplexity(model, stream(40), 20, progress=False)
    assert math.isnan(res.ppl)


def test_tokenize_corpus_bos_once(stories_dir):
    from sasq.io.tokenizer import load_tokenizer
    tok = load_tokenizer(stories_dir)
    ids = tokenize_corpus(tok, "One day.\n\nAnother day.")
    assert ids.dtype == np.int64 and ids[0] == tok.bos_id and (ids == tok.bos_id).sum() == 1
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenize_corpus(None, "x")


# ---------------------------------------------------------------- real model (sasq.model)

@pytest.fixture(scope="module")
def stories(stories_dir):
    import sasq
    return sasq.load(stories_dir)


def test_stories_perplexity_matches_torch_on_own_logits(stories, wikitext_test):
    text = wikitext_test.read_text(encoding="utf-8")[:6000]
    ids = tokenize_corpus(stories.tokenizer, text)
    res = perplexity(stories, ids, 128, batch_size=2, progress=False)
    wins = windows(ids, 128)
    logits = stories.forward(wins)  # (n, T, V) full logits from the model's own forward
    ref = [F.cross_entropy(torch.from_numpy(l[:-1]).double(), torch.from_numpy(w[1:])).item()
           for l, w in zip(logits, wins)]
    assert res.n_windows == len(wins) >= 4
    np.testing.assert_allclose(res.window_nlls, ref, rtol=NLL_RTOL * 10)
    assert res.ppl == pytest.approx(math.exp(np.mean(ref)), rel=NLL_RTOL * 10)


def test_stories_perplexity_matches_transformers(stories, stories_dir, wikitext_test):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    text = wikitext_test.read_text(encoding="utf-8")[:6000]
    ids = tokenize_corpus(stories.tokenizer, text)
    res = perplexity(stories, ids, 512, progress=False)
    wins = torch.from_numpy(windows(ids, 512))
    with torch.no_grad():
        out = hf(input_ids=wins, labels=wins)  # HF shifts labels inside: positions 1..T-1
    # HF's loss is a mean over all windows' predictions; windows are equal-length, so it equals ours
    assert res.n_windows == wins.shape[0] >= 2
    assert res.ppl == pytest.approx(math.exp(out.loss.item()), rel=PPL_RTOL_VS_HF)


# ---------------------------------------------------------------- CLI

def test_eval_command_table_and_json(tmp_path, stories, wikitext_test, capsys):
    from sasq.cli import main
    data = tmp_path / "sample.txt"
    data.write_text(wikitext_test.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out = tmp_path / "res.json"
    rc = main(["eval", "--data", str(data), "--seqlen", "64", "--max-windows", "3",
               "--batch-size", "2", "--json", str(out), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["n_windows"] == 3 and d["seqlen"] == 64 and len(d["window_nlls"]) == 3
    ids = tokenize_corpus(stories.tokenizer, data.read_text(encoding="utf-8"))
    direct = perplexity(stories, ids, 64, max_windows=3, progress=False)
    assert d["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert f"{direct.ppl:.4f}" in table and f"{len(ids):,}" in table


def test_eval_command_errors_are_one_line(tmp_path, capsys):
    from sasq.cli import main
    assert main(["eval", "--data", str(tmp_path / "missing.txt"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sasq eval: error:") and "missing.txt" in err and "\n" not in err


def test_cached_reference_is_reused_only_for_the_same_model(tmp_path):
    """The cache file is keyed by the windows and a fingerprint of every weight: a model that
    differs in one decoder matrix (same lm_head) gets its own hidden states."""
    from sasq.eval import Reference
    from sasq.model import LlamaConfig, random_model
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = random_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, 40, 48)
    path = tmp_path / "ref.npz"
    a = Reference.compute(m, ids, 12, progress=False, path=path)
    layers = list(m.layers)
    layers[1] = type(layers[1])(**{**vars(layers[1]), "up_proj": layers[1].up_proj * 1.5})
    m2 = m.copy_with(layers=layers)
    b = Reference.compute(m2, ids, 12, progress=False, path=path)
    np.testing.assert_array_equal(b.hidden, m2.forward(b.windows, return_hidden=True))
    assert np.abs(a.hidden - b.hidden).max() > 1e-3
    c = Reference.compute(m2, ids, 12, progress=False, path=path)  # now cached for m2
    np.testing.assert_array_equal(c.hidden, b.hidden)


def test_fingerprint_sees_a_quant_models_scales():
    """Two QuantModels of one model that differ only in one activation scale differ."""
    import sasq
    from sasq.eval import model_fingerprint
    from sasq.model import LlamaConfig, random_model
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = random_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, 40, 200)
    a = sasq.calibrate(sasq.quantize(m, sasq.QuantPlan(8, 8)), ids, seqlen=20, progress=False)
    b = sasq.calibrate(sasq.quantize(m, sasq.QuantPlan(8, 8)), ids, seqlen=20, progress=False)
    assert np.array_equal(model_fingerprint(a), model_fingerprint(b))
    k = next(iter(b.params))
    b.params[k][...] += 0.5
    b.sync()
    assert not np.array_equal(model_fingerprint(a), model_fingerprint(b))
    assert np.array_equal(model_fingerprint(m), model_fingerprint(m.copy_with()))
