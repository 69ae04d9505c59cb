"""sasq.io.tokenizer: the same ids as transformers / sentencepiece, and BOS handling."""
import json
import shutil

import numpy as np
import pytest

from sasq.io.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

N_SAMPLES = 25


@pytest.fixture(scope="module")
def wiki_text(wikitext_test):
    return wikitext_test.read_text(encoding="utf-8")


def samples(text, n=N_SAMPLES, seed=0, lstrip=False):
    """Random slices of WikiText (50..3000 chars); lstrip=True starts each at a non-space."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i = int(rng.integers(0, len(text) - 3000))
        j = i + int(rng.integers(50, 3000))
        s = text[i:j]
        out.append(s.lstrip(" ") if lstrip else s)
    return out


@pytest.fixture(scope="module")
def hf_tok(stories_dir):
    return transformers.AutoTokenizer.from_pretrained(str(stories_dir))


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory, hf_tok):
    """stories260K's tokenizer converted by transformers and saved as tokenizer.json."""
    d = tmp_path_factory.mktemp("tokjson")
    hf_tok.save_pretrained(str(d))
    assert (d / "tokenizer.json").is_file()
    return d


def test_sentencepiece_model_is_loaded_with_its_config(stories_dir):
    tok = load_tokenizer(stories_dir)
    assert tok.kind == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 512, True)


def test_sentencepiece_ids_match_transformers_on_wikitext(stories_dir, hf_tok, wiki_text):
    tok = load_tokenizer(stories_dir)
    for s in samples(wiki_text, lstrip=True):
        assert tok.encode(s) == hf_tok(s)["input_ids"], s[:60]


def test_whole_wikitext_stream_matches_transformers(stories_dir, hf_tok, wiki_text):
    ours = load_tokenizer(stories_dir).encode(wiki_text)
    assert ours == hf_tok(wiki_text)["input_ids"]
    assert ours[0] == 1 and ours.count(1) == 1  # BOS once, for the whole stream


def test_sentencepiece_ids_match_sentencepiece_including_leading_space(stories_dir, wiki_text):
    # transformers 5's converted pipeline drops sentencepiece's extra "▁" before a leading space;
    # the model was trained on sentencepiece's ids, so those are the reference here.
    sp = spm.SentencePieceProcessor(model_file=str(stories_dir / "tokenizer.model"))
    tok = load_tokenizer(stories_dir)
    for s in samples(wiki_text, seed=1) + [" hello", "  two spaces", "\n\nx", "é ü 中文 🙂", ""]:
        assert tok.encode(s, add_bos=False) == sp.encode(s), s[:60]


def test_tokenizer_json_matches_transformers(json_dir, wiki_text):
    tok = load_tokenizer(json_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(json_dir))
    assert tok.kind == "tokenizers"
    # the saved config has no add_bos_token: BOS comes from the post-processor, and we detect it
    assert "add_bos_token" not in json.loads((json_dir / "tokenizer_config.json").read_text())
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2
    for s in samples(wiki_text, seed=2) + [" hello", "  two spaces", "é 🙂", ""]:
        assert tok.encode(s) == hf(s)["input_ids"], s[:60]
        assert tok.encode(s, add_bos=False) == hf(s, add_special_tokens=False)["input_ids"]


def test_bos_handling(stories_dir):
    tok = load_tokenizer(stories_dir)
    body = tok.encode("Once upon a time", add_bos=False)
    assert body and body[0] != tok.bos_id
    assert tok.encode("Once upon a time") == [tok.bos_id] + body
    assert tok.encode("Once upon a time", add_bos=True) == [tok.bos_id] + body
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


def test_add_bos_token_false_is_honoured(tmp_path, stories_dir):
    shutil.copy(stories_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    assert not tok.add_bos and tok.bos_id == 1
    assert tok.encode("a b")[0] != 1


def test_config_json_ids_used_without_tokenizer_config(tmp_path, hf_tok):
    # a tokenizers pipeline without post-processor; ids only from config.json
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 2]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (2, 1, False)
    assert tok.encode("hi", add_bos=True)[0] == 2


def test_bad_special_token_and_missing_bos(tmp_path, stories_dir):
    shutil.copy(stories_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ValueError, match="'<nope>'"):
        load_tokenizer(tmp_path)
    bare = Tokenizer.from_tokenizers(tokenizers.Tokenizer(tokenizers.models.BPE()), None, None, False)
    with pytest.raises(ValueError, match="no BOS"):
        bare.encode("x", add_bos=True)


def test_no_tokenizer_files_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_trained_tokenizers_bpe_save_hf_round_trip(tmp_path, wiki_text):
    """A tokenizer built with `tokenizers` itself, wrapped, saved, reloaded by us and transformers."""
    from tokenizers import models, pre_tokenizers, trainers, decoders
    bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([wiki_text[:200_000]], trainer=trainer)
    tok = Tokenizer.from_tokenizers(bpe, bos_id=1, eos_id=2, add_bos=True)
    out = tok.save_hf(tmp_path / "saved")
    back = load_tokenizer(out)
    assert (back.bos_id, back.eos_id, back.add_bos, back.vocab_size) == (1, 2, True, tok.vocab_size)
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for s in samples(wiki_text, n=8, seed=3):
        ids = tok.encode(s)
        assert ids[0] == 1 and back.encode(s) == ids
        assert hf(s, add_special_tokens=False)["input_ids"] == ids[1:]
        assert back.decode(ids) == s


def test_sentencepiece_save_hf_round_trip(tmp_path, stories_dir, wiki_text):
    tok = load_tokenizer(stories_dir)
    back = load_tokenizer(tok.save_hf(tmp_path))
    assert (back.kind, back.bos_id, back.eos_id, back.add_bos) == ("sentencepiece", 1, 2, True)
    for s in samples(wiki_text, n=5, seed=4):
        assert back.encode(s) == tok.encode(s)
