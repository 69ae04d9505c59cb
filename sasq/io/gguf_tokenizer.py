"""A `tokenizers` Tokenizer rebuilt from GGUF tokenizer metadata (byte-level BPE, "gpt2" model).

GGUF stores the vocabulary (`tokenizer.ggml.tokens`, already in the byte-to-unicode alphabet), the
merges ("a b" strings) and the token types (1 normal, 3 control, 4 user-defined, ...). The text
splitting regex is not stored, only its name (`tokenizer.ggml.pre`), so the names we know map to the
pre-tokenizer that llama.cpp applies for them (llama-vocab.cpp).
"""
from __future__ import annotations

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

CONTROL, USER_DEFINED = 3, 4

# GPT-2's split: the default of pre_tokenizers.ByteLevel(use_regex=True)
_GPT2 = "gpt2"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split):
    """ByteLevel after an optional regex split; `split=None` -> GPT-2's own regex."""
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) -> how we rebuild their split
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r")
_GPT2_ONLY = ("gpt-2", "gpt2", "default", "phi-2", "jina-es", "jina-de", "olmo", "jais", "mpt")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")
KNOWN_PRE = _DIGITS_THEN_GPT2 + _GPT2_ONLY + _LLAMA3


def _pre_tokenizer(pre: str):
    # llama.cpp: SMOLLM/STARCODER/REFACT/... split every digit alone ("\p{N}"), then GPT-2's regex;
    # that is Digits(individual_digits=True) followed by ByteLevel's own regex, as SmolLM2's
    # tokenizer.json spells it.
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _GPT2_ONLY:
        return _byte_level(None)
    if pre in _LLAMA3:
        return _byte_level(pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"))
    raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(KNOWN_PRE)})")


def build_bpe_tokenizer(meta: dict, source="GGUF") -> Tokenizer:
    """tokenizers.Tokenizer for a `tokenizer.ggml.model == "gpt2"` vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, str) or model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model {model!r:.60} is not supported (only 'gpt2' byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if (not isinstance(tokens, list) or not tokens or not isinstance(merges, list)
            or not all(isinstance(t, str) for t in tokens) or not all(isinstance(m, str) for m in merges)):
        raise ValueError(f"{source}: tokenizer.ggml.tokens/merges missing or not string arrays")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise ValueError(f"{source}: malformed merge {m!r}")
        pairs.append((a, b))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{source}: tokenizer.ggml.merges: {why}") from None
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise ValueError(f"{source}: tokenizer.ggml.pre should be a string, got {pre!r:.60}")
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        if not (isinstance(types, np.ndarray) and types.dtype.kind in "iu"):
            raise ValueError(f"{source}: tokenizer.ggml.token_type should be an integer array")
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        special = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if int(ty) == CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if int(ty) == USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
    return tok


def special_ids(meta: dict, n_vocab: int, source="GGUF"):
    """(bos_id, eos_id, add_bos) from metadata; llama.cpp's default for BPE is no BOS unless asked."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    for name, v in (("bos", bos), ("eos", eos)):
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id should be an integer, got {v!r:.60}")
        if not 0 <= int(v) < n_vocab:
            raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id {v} outside the vocabulary of {n_vocab}")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, (bool, np.bool_)):
        raise ValueError(f"{source}: tokenizer.ggml.add_bos_token should be a bool, got {add_bos!r:.60}")
    add_bos = bool(add_bos)
    return (None if bos is None else int(bos)), (None if eos is None else int(eos)), add_bos
