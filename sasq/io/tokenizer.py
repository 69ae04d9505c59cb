"""Tokenizers of HF checkpoints: tokenizer.json through `tokenizers`, tokenizer.model through
`sentencepiece`, with BOS/EOS and add_bos_token taken from tokenizer_config.json / config.json.

Encoding never lets the backend add special tokens; BOS is prepended here, once, when asked
(`add_bos`), so the rule is the same for both backends. A tokenizer.model is encoded exactly as
sentencepiece encodes it (the tokenizer the Llama models were trained with). transformers 5 runs
such a model through a converted `tokenizers` pipeline that agrees with it on ordinary text but
drops the extra "▁" piece that sentencepiece emits for text starting with a space.
"""
from __future__ import annotations

import json
from pathlib import Path


def _token_text(tok):
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nests too deeply)") from None
    except ValueError as e:  # UTF-8, JSON syntax, a number beyond the int digit limit
        raise ValueError(f"{path}: not valid JSON ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


class Tokenizer:
    """text <-> token ids. Build with load_tokenizer(dir), from_tokenizers or from_sentencepiece."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_id: int | None, add_bos: bool):
        if kind not in ("tokenizers", "sentencepiece"):
            raise ValueError(f"unknown tokenizer backend kind {kind!r}")
        self._backend, self.kind = backend, kind
        self.vocab_size = (backend.get_vocab_size(with_added_tokens=True) if kind == "tokenizers"
                           else backend.get_piece_size())
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id)):
            if i is not None and not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"{name} {i} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_id = None if eos_id is None else int(eos_id)
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no BOS token")
        self.add_bos = bool(add_bos)

    @classmethod
    def from_tokenizers(cls, tok, bos_id=None, eos_id=None, add_bos=False) -> "Tokenizer":
        return cls(tok, "tokenizers", bos_id, eos_id, add_bos)

    @classmethod
    def from_sentencepiece(cls, sp, bos_id=None, eos_id=None, add_bos=True) -> "Tokenizer":
        """sp: a SentencePieceProcessor or the path of a tokenizer.model; ids default to the model's."""
        import sentencepiece as spm
        if not isinstance(sp, spm.SentencePieceProcessor):
            path = str(sp)
            sp = spm.SentencePieceProcessor()
            try:
                sp.Load(path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        bos_id = sp.bos_id() if bos_id is None and sp.bos_id() >= 0 else bos_id
        eos_id = sp.eos_id() if eos_id is None and sp.eos_id() >= 0 else eos_id
        return cls(sp, "sentencepiece", bos_id, eos_id, add_bos and bos_id is not None)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "tokenizers":
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)
        # sentencepiece maps unknown pieces to unk; only accept an exact hit
        return i if self._backend.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        if self.kind == "tokenizers":
            return self._backend.id_to_token(int(i))
        return self._backend.id_to_piece(int(i))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; BOS prepended once when add_bos (None = this tokenizer's default)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        if self.kind == "tokenizers":
            ids = self._backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self._backend.encode(text)
        return ([self.bos_id] if add_bos else []) + list(ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._backend.decode(ids)  # sentencepiece always drops control tokens

    def save_hf(self, out_dir) -> Path:
        """Write tokenizer.json (or tokenizer.model) + tokenizer_config.json that load_tokenizer
        (and transformers) read back."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "tokenizers":
            self._backend.save(str(out / "tokenizer.json"))
            cls_name = "PreTrainedTokenizerFast"
        else:
            (out / "tokenizer.model").write_bytes(self._backend.serialized_model_proto())
            cls_name = "LlamaTokenizer"
        cfg = {"tokenizer_class": cls_name, "add_bos_token": self.add_bos, "add_eos_token": False}
        if self.bos_id is not None:
            cfg["bos_token"] = self.id_to_token(self.bos_id)
        if self.eos_id is not None:
            cfg["eos_token"] = self.id_to_token(self.eos_id)
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return out

    def __repr__(self):
        return (f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


def _special_id(name, tok_cfg, cfg, lookup, path):
    """Id of bos/eos: tokenizer_config's token string first, then config.json's *_token_id."""
    text = _token_text(tok_cfg.get(f"{name}_token"))
    if text is not None:
        i = lookup(text)
        if i is None:
            raise ValueError(f"{path}: {name}_token {text!r} is not in the vocabulary")
        return i
    i = cfg.get(f"{name}_token_id")
    if isinstance(i, list):  # e.g. Llama 3.1 lists several EOS ids; the first is the primary
        i = i[0] if i else None
    if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
        raise ValueError(f"{path.parent / 'config.json'}: {name}_token_id must be an integer, got {i!r:.60}")
    return i


def load_tokenizer(model_dir) -> Tokenizer | None:
    """The tokenizer of an HF directory, or None when it has neither tokenizer.json nor .model."""
    d = Path(model_dir)
    tok_cfg = _read_json(d / "tokenizer_config.json")
    cfg = _read_json(d / "config.json")
    cfg_path = d / "tokenizer_config.json"
    if not isinstance(tok_cfg.get("add_bos_token", False), bool):
        raise ValueError(f"{cfg_path}: add_bos_token must be true or false, got "
                         f"{tok_cfg['add_bos_token']!r:.60}")
    if (d / "tokenizer.json").is_file():
        import tokenizers
        path = d / "tokenizer.json"
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception on malformed files
            raise ValueError(f"{path}: cannot be read by tokenizers ({str(e).splitlines()[0]})") from None
        tmp = Tokenizer(backend, "tokenizers", None, None, False)
        bos = _special_id("bos", tok_cfg, cfg, tmp.token_to_id, cfg_path)
        eos = _special_id("eos", tok_cfg, cfg, tmp.token_to_id, cfg_path)
        if "add_bos_token" in tok_cfg:
            add_bos = bool(tok_cfg["add_bos_token"])
        else:
            # No explicit flag (e.g. Llama 3): BOS is added iff the post-processor adds it.
            first = backend.encode("", add_special_tokens=True).ids[:1]
            add_bos = bos is not None and first == [bos]
        return Tokenizer(backend, "tokenizers", bos, eos, add_bos)
    if (d / "tokenizer.model").is_file():
        tmp = Tokenizer.from_sentencepiece(d / "tokenizer.model", add_bos=False)
        bos = _special_id("bos", tok_cfg, cfg, tmp.token_to_id, cfg_path)
        eos = _special_id("eos", tok_cfg, cfg, tmp.token_to_id, cfg_path)
        bos = tmp.bos_id if bos is None else bos
        eos = tmp.eos_id if eos is None else eos
        # transformers' LlamaTokenizer adds BOS unless told otherwise
        add_bos = bool(tok_cfg.get("add_bos_token", True)) and bos is not None
        return Tokenizer(tmp._backend, "sentencepiece", bos, eos, add_bos)
    return None
