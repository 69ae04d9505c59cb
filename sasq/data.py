"""Token data for calibration, training and evaluation: the one place that reads text, makes a
token stream, cuts windows, samples batches and checks lengths against the model.

Streams and windows
- A token stream is 1-D int64: a whole text tokenized once (BOS once at the start iff the
  tokenizer adds BOS), the QuaRot/GPTQ evaluation protocol (DESIGN section 3).
- Windows are (n, length): from a stream, n = len // length non-overlapping windows with the tail
  dropped; from ready-made (n, L) windows with L >= length, their first `length` tokens.
- Training batches are random (batch, length) slices: from a stream at any offset, from (n, L)
  windows a random row and offset; drawn with the caller's np.random.Generator (reproducible).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def read_text(path) -> str:
    """A UTF-8 text file; FileNotFoundError / ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenize_corpus(tokenizer, text: str) -> np.ndarray:
    """The whole text as one int64 stream; BOS once at the start iff the tokenizer adds BOS."""
    if tokenizer is None:
        raise ValueError("no tokenizer: the model directory has no tokenizer.json/tokenizer.model")
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def as_token_ids(ids, name: str = "token_ids") -> np.ndarray:
    """ids as int64, 1-D (a stream) or 2-D (windows); ValueError naming `name` otherwise."""
    a = np.asarray(ids)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be a 1-D token stream or 2-D (n, L) windows, got shape {a.shape}")
    return a.astype(np.int64, copy=False)


def cut_windows(ids, length: int, n_max: int | None = None, name: str = "token_ids") -> np.ndarray:
    """(n, length) windows of a 1-D stream (non-overlapping, tail dropped) or the first `length`
    tokens of each row of (n, L) windows; at most n_max of them (the first ones)."""
    ids = as_token_ids(ids, name)
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise ValueError(f"window length must be a positive integer, got {length!r}")
    length = int(length)
    if ids.ndim == 1:
        n = len(ids) // length
        if n == 0:
            raise ValueError(f"{name}: a stream of {len(ids)} tokens is shorter than one window "
                             f"of {length}")
        w = ids[: n * length].reshape(n, length)
    else:
        if ids.shape[1] < length:
            raise ValueError(f"{name}: windows have {ids.shape[1]} tokens, fewer than {length}")
        if ids.shape[0] == 0:
            raise ValueError(f"{name}: no windows")
        w = ids[:, :length]
    if n_max is not None:
        if isinstance(n_max, bool) or int(n_max) != n_max or n_max < 1:
            raise ValueError(f"the number of windows must be >= 1, got {n_max!r}")
        w = w[:int(n_max)]
    return w


def sample_batch(rng: np.random.Generator, ids: np.ndarray, batch: int, length: int) -> np.ndarray:
    """(batch, length) random windows: from a 1-D stream (any offset) or from rows of (n, L)."""
    if ids.ndim == 1:
        hi = ids.shape[0] - length
        if hi < 0:
            raise ValueError(f"train_ids has {ids.shape[0]} tokens, fewer than seqlen+1 = {length}")
        start = rng.integers(0, hi + 1, size=batch)
        return ids[start[:, None] + np.arange(length)]
    n, width = ids.shape
    if width < length:
        raise ValueError(f"train_ids windows have {width} tokens, fewer than seqlen+1 = {length}")
    row = rng.integers(0, n, size=batch)
    off = rng.integers(0, width - length + 1, size=batch)
    return ids[row[:, None], off[:, None] + np.arange(length)]


def check_seqlen(model, seqlen, what: str = "seqlen", positions: int | None = None) -> int:
    """seqlen as an int >= 2 that fits the model's max_position_embeddings (`positions` = the
    positions actually run, when they differ from seqlen)."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, (int, np.integer)) or seqlen < 2:
        raise ValueError(f"{what} must be an integer >= 2, got {seqlen!r}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    need = seqlen if positions is None else positions
    if max_pos is not None and need > max_pos:
        raise ValueError(f"{what} {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    return int(seqlen)


def split_stream(ids: np.ndarray, val_fraction: float, min_len: int):
    """(train, val or None): the last val_fraction of a stream is held out (None when it is
    shorter than min_len tokens)."""
    n_val = int(len(ids) * val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
    return train, (val if n_val > min_len else None)
