"""External results: the documented format (JSON/CSV), the protocol check naming the differing
field, merging next to our rows (first-n windows), KL/top-1 from a logits file, and the dump
script against our own perplexity."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sasq.external import check_protocol, fidelity, make_protocol, tokens_sha256
from sasq.results import load, merge, render_markdown

STREAM = np.arange(1, 41, dtype=np.int64)  # 40 tokens -> 5 windows of 8
TEXT_SHA = "ab" * 32


def _ours(n_windows=3):
    proto = make_protocol(corpus="wikitext2:test", tokens_sha256=tokens_sha256(STREAM),
                          text_sha256=TEXT_SHA, seqlen=8, n_windows=n_windows, bos="once")
    meta = {"model_name": "m", "trained_on": "x", "seqlen": 8, "bits": ["W8A8"],
            "evals": ["wikitext2:test"], "identity": {"steps": 1},
            "fp32": {"wikitext2:test": {"ppl": 10.0, "n_windows": n_windows}},
            "protocols": {"wikitext2:test": proto}}
    row = {"method": "sasq", "label": "SASQ", "bits": "W8A8", "objective": "kl", "granularity": "channel",
           "form": "folded", "mode": "static", "weights": "RTN per-channel W8", "trained_on": "x",
           "eval": "wikitext2:test", "ppl": 11.0, "delta": 0.1, "kl": 0.01, "top1": 0.9, "n_windows": n_windows}
    return {"version": 1, "meta": meta, "rows": [row]}


def _external(tmp_path, **over):
    nlls = [2.0, 2.2, 2.4, 2.6, 2.8]
    doc = {"format": "sasq.external/1", "method": "QuaRot", "bits": "W4A4",
           "weights": "GPTQ per-channel W4", "mode": "dynamic per-token A4, rotated",
           "model": "some/llama", "fp32_ppl": 9.9,
           "protocol": {"corpus": "wikitext2:test", "tokens_sha256": tokens_sha256(STREAM),
                        "seqlen": 8, "n_windows": 5, "bos": "once"},
           "window_nlls": nlls, "ppl": math.exp(np.mean(nlls))}
    for k, v in over.items():
        if k in doc["protocol"]:
            doc["protocol"][k] = v
        elif v is None:
            doc.pop(k)
        else:
            doc[k] = v
    p = tmp_path / "quarot.json"
    p.write_text(json.dumps(doc))
    return p


def test_merge_puts_the_external_row_on_our_first_n_windows(tmp_path):
    ours = _ours(n_windows=3)
    ext = load(_external(tmp_path))
    assert ext["external"] and ext["rows"][0]["label"] == "QuaRot (external)"
    merged = merge(ours, ext)
    assert ours["rows"][-1]["method"] == "sasq"  # the input is not modified
    r = merged["rows"][-1]
    assert r["eval"] == "wikitext2:test" and r["n_windows"] == 3
    assert r["ppl"] == pytest.approx(math.exp(2.2)) and r["delta"] == pytest.approx(math.exp(2.2) / 10 - 1)
    assert r["protocol"]["seqlen"] == 8 and "W4A4" in merged["meta"]["bits"]
    md = render_markdown(merged)
    line = next(l for l in md.splitlines() if l.startswith("| QuaRot (external) | W4A4"))
    assert "GPTQ per-channel W4" in line and f"{math.exp(2.2):.2f}" in line
    note = next(l for l in md.splitlines() if l.startswith("- external **QuaRot (external) W4A4**"))
    for want in ("quarot.json", "model some/llama", "seqlen 8", "first 3 of its 5 windows", "BOS once",
                 "its own FP32 PPL 9.90"):
        assert want in note, note
    assert "| QuaRot (external) | - | external: quarot.json |" in md  # the compact pivot
    assert merge(merged, ext)["rows"] == merged["rows"]  # merging again replaces, not duplicates


@pytest.mark.parametrize("field, value, message", [
    ("seqlen", 16, "seqlen differs (ours 8, quarot.json 16)"),
    ("bos", "none", "bos differs (ours once, quarot.json none)"),
    ("tokens_sha256", "cd" * 32, "tokens_sha256 differs"),
])
def test_mismatched_protocols_are_refused_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ValueError, match="matches no evaluation set") as e:
        merge(_ours(), _external(tmp_path, **{field: value}))
    assert message in str(e.value)


def test_a_single_perplexity_needs_the_same_window_count(tmp_path):
    single = _external(tmp_path, window_nlls=None, ppl=7.5)
    with pytest.raises(ValueError, match=r"n_windows differs \(ours 3, quarot.json 5\).*per-window NLLs"):
        merge(_ours(3), single)
    r = merge(_ours(5), single)["rows"][-1]
    assert r["ppl"] == pytest.approx(7.5) and r["window_nlls"] is None


def test_check_protocol_explains_a_tokenizer_difference():
    a = make_protocol(tokens_sha256="aa" * 32, text_sha256=TEXT_SHA, seqlen=8, n_windows=2, bos="once")
    b = dict(a, tokens_sha256="bb" * 32)
    with pytest.raises(ValueError, match="the tokenization differs"):
        check_protocol(a, b)
    c = make_protocol(text_sha256=TEXT_SHA, seqlen=8, n_windows=2, bos="once")
    assert check_protocol(a, c) == ""  # the text hash decides when one side lacks token hashes
    d = make_protocol(tokens_sha256="aa" * 32, seqlen=8, n_windows=2, bos="once")
    with pytest.raises(ValueError, match="no common corpus hash"):
        check_protocol(c, d)


def test_results_without_a_protocol_say_how_to_record_it(tmp_path):
    ours = _ours()
    del ours["meta"]["protocols"]
    with pytest.raises(ValueError, match="rerun the same `sasq run` command"):
        merge(ours, _external(tmp_path))


def test_csv_per_window_and_single_ppl(tmp_path):
    head = (f"# method: QuaRot\n# bits: W4A8\n# corpus: wikitext2:test\n# tokens_sha256: "
            f"{tokens_sha256(STREAM)}\n# seqlen: 8\n# bos: once\n")
    p = tmp_path / "q.csv"
    p.write_text(head + "# n_windows: 3\nwindow,nll\n0,1.0\n1,2.0\n2,3.0\n")
    r = load(p)["rows"][0]
    assert r["bits"] == "W4A8" and r["ppl"] == pytest.approx(math.exp(2.0)) and r["window_nlls"] == [1, 2, 3]
    assert merge(_ours(3), p)["rows"][-1]["ppl"] == pytest.approx(math.exp(2.0))
    p.write_text(head + "# n_windows: 3\nppl\n6.5\n")
    assert load(p)["rows"][0]["ppl"] == pytest.approx(6.5)
    p.write_text(head + "# n_windows: 2\nwindow,nll\n1,1.0\n0,2.0\n")
    with pytest.raises(ValueError, match="window column must count"):
        load(p)


@pytest.mark.parametrize("over, message", [
    ({"method": None}, "'method'"),
    ({"ppl": 99.0}, "is not exp\\(mean window_nlls\\)"),
    ({"n_windows": 4}, "5 window_nlls but protocol n_windows is 4"),
    ({"bos": "sometimes"}, "bos must be one of"),
    ({"tokens_sha256": "xyz"}, "64 hex digits"),
    ({"format": "other/2"}, "is not 'sasq.external/1'"),
    ({"window_nlls": [1.0, float("nan"), 1, 1, 1]}, "must be finite"),
])
def test_bad_external_files_are_one_line_errors(tmp_path, over, message):
    p = _external(tmp_path, **over)
    with pytest.raises(ValueError, match=message) as e:
        load(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_fidelity_from_a_logits_file(tmp_path):
    from sasq.eval import Reference
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 11, (2, 6))
    hidden = rng.standard_normal((2, 6, 4)).astype(np.float32)
    head = rng.standard_normal((11, 4)).astype(np.float32)
    ref = Reference(wins, hidden, head)
    logits = hidden @ head.T  # (2, 6, 11): the reference itself
    np.save(tmp_path / "same.npy", np.concatenate([logits, logits[:1]]))  # more windows is fine
    kl, top1 = fidelity(tmp_path / "same.npy", ref)
    assert abs(kl) < 1e-6 and top1 == 1.0
    np.save(tmp_path / "other.npy", logits[:, :, ::-1].copy())
    kl2, top2 = fidelity(tmp_path / "other.npy", ref)
    assert kl2 > 0.1 and top2 < 1.0
    np.save(tmp_path / "short.npy", logits[:, :5])
    with pytest.raises(ValueError, match="expected"):
        fidelity(tmp_path / "short.npy", ref)


def test_dump_script_agrees_with_our_perplexity(tmp_path, stories_dir, wikitext_test):
    """benchmarks/external_nll.py (QuaRot's evaluator in transformers) on stories260K: the same
    tokens as ours (hash) and the same perplexity, then merged next to a sasq eval result."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import importlib.util
    import sasq
    from sasq.data import tokenize_corpus
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("external_nll", root / "benchmarks" / "external_nll.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = wikitext_test.read_text(encoding="utf-8")[:6000]
    data = tmp_path / "sample.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "hf.json"
    assert mod.main(["--model", str(stories_dir), "--corpus", str(data), "--seqlen", "64",
                     "--max-windows", "4", "--out", str(out)]) == 0
    ext = load(out)["rows"][0]
    model = sasq.load(stories_dir)
    ids = tokenize_corpus(model.tokenizer, text)
    assert ext["protocol"]["tokens_sha256"] == tokens_sha256(ids)
    ours = sasq.perplexity(model, ids, 64, max_windows=4, progress=False)
    assert ext["ppl"] == pytest.approx(ours.ppl, rel=1e-4)
    assert np.allclose(ext["window_nlls"], ours.window_nlls, rtol=1e-4)
