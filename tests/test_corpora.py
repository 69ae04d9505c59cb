"""Corpora by name: data directories, the datasets cache (faked), the v1 fallback, the errors."""
import gzip
import json
import sys
import types

import pytest

from sasq import corpora


@pytest.fixture
def data(tmp_path, monkeypatch):
    """An isolated data directory as the only place searched."""
    monkeypatch.setattr(corpora, "data_dirs", lambda: [tmp_path])
    monkeypatch.setitem(sys.modules, "datasets", None)  # "not installed"
    return tmp_path


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def test_name_resolves_to_the_documented_file(data):
    p = _write(data, "wikitext-2/raw-v1/test.joined.txt", "\n\n = A = \n\n b")
    c = corpora.resolve("wikitext2:test")
    assert (c.name, c.text, c.source, c.label, c.key) == (
        "wikitext2:test", "\n\n = A = \n\n b", str(p), "wikitext2:test", "wikitext2:test")
    assert c.sha256 == corpora.text_sha256("\n\n = A = \n\n b")
    _write(data, "ptb/valid.joined.txt", "a b c")
    assert corpora.resolve("PTB:validation").name == "ptb:valid"  # aliases, any case


def test_raw_split_missing_falls_back_to_v1_under_its_own_name(data):
    _write(data, "wikitext-2/tokens-v1/valid.txt", " = <unk> = ")
    c = corpora.resolve("wikitext2:valid")
    assert c.name == "wikitext2-v1:valid" and c.label == "wikitext2-v1:valid"


def test_not_found_says_where_it_looked_and_what_to_install(data, monkeypatch):
    monkeypatch.delenv("SASQ_DATA", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        corpora.resolve("wikitext2:test")
    msg = str(e.value)
    for want in ("'wikitext2:test' not found", "wikitext-2/raw-v1/test.joined.txt", str(data),
                 "'datasets' package is not installed", "pip install datasets", "SASQ_DATA"):
        assert want in msg, msg
    with pytest.raises(ValueError, match="no split 'dev'"):
        corpora.resolve("wikitext2:dev")
    with pytest.raises(FileNotFoundError, match="text file not found"):
        corpora.resolve(str(data / "nope.txt"))


def test_datasets_cache_is_used_with_the_quarot_join(data, monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None, data_files=None):
        calls.append((path, config, split, data_files))
        if path == "allenai/c4":
            return _Rows({"text": ["d1", "d2", "d3"]})
        return {"text": ["", " = T = ", " x"]} if path == "wikitext" else {"sentence": ["a", "b"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = corpora.resolve("wikitext2:test")
    assert c.text == "\n\n = T = \n\n x" and calls[-1] == ("wikitext", "wikitext-2-raw-v1", "test", None)
    assert "load_dataset('wikitext'" in c.source
    assert corpora.resolve("ptb:valid").text == "a b"
    assert calls[-1][2] == "validation"
    monkeypatch.setattr(corpora, "C4_VALID_DOCS", 2)
    assert corpora.resolve("c4:validation").text == "d1 d2"


class _Rows(dict):
    def __getitem__(self, k):  # ds[:n] -> {"text": [...first n]}
        if isinstance(k, slice):
            return {f: v[k] for f, v in self.items()}
        return dict.__getitem__(self, k)


def test_c4_shard_file(data, monkeypatch):
    p = data / "c4" / "c4-validation.00000-of-00008.json.gz"
    p.parent.mkdir(parents=True)
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for t in ("one", "two", "three"):
            f.write(json.dumps({"text": t, "url": "u"}) + "\n")
    monkeypatch.setattr(corpora, "C4_VALID_DOCS", 2)
    assert corpora.resolve("c4:valid").text == "one two"
    (data / "c4" / "c4-validation.00000-of-00008.json.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a C4 JSON-lines shard"):
        corpora.resolve("c4:validation")


def test_sasq_data_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SASQ_DATA", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert corpora.data_dirs()[:2] == [tmp_path / "a", tmp_path / "b"]
    _write(tmp_path / "b", "wikitext-2/raw-v1/test.joined.txt", "x y")
    assert corpora.resolve("wikitext2:test").source == str(tmp_path / "b" / "wikitext-2/raw-v1/test.joined.txt")


def test_a_plain_path_is_named_by_its_content(wikitext_test):
    c = corpora.resolve(str(wikitext_test))
    assert c.name == "wikitext2:test" and c.label == "test.joined.txt (wikitext2:test)"
    assert c.key == "test.joined.txt"
