"""Data-free mode: training, calibration and own-domain evaluation text sampled from the model.

As in LLM-QAT, when no corpus is given the FP32 model writes its own: every window starts at
BOS and continues by temperature sampling, batched, with the model's KV cache (one token per
forward call). The result is a (n_windows, seqlen) array of token ids.

Reproducibility: window i is drawn with its own Generator spawned from SeedSequence(seed), so
the windows depend only on (model, seed, temperature, seqlen) and not on the batch size. Use
one seed for training/calibration windows and a different one for evaluation windows
(`TRAIN_SEED` / `EVAL_SEED`), so that the own-domain check (control b) never scores text the
scales were trained on.
"""
from __future__ import annotations

import numpy as np

from sasq.model import KVCache
from sasq.sampling import sample_rows

TRAIN_SEED = 1234
EVAL_SEED = 98765


def sample_windows(model, n_windows: int, seqlen: int, temperature: float = 1.0, seed: int = 0,
                   batch_size: int = 32, bos_id: int | None = None, progress: bool = True) -> np.ndarray:
    """(n_windows, seqlen) int64 token ids sampled from `model`, each window starting with BOS.

    temperature 0 means greedy (argmax). bos_id defaults to the tokenizer's, then config's.
    """
    if not isinstance(n_windows, (int, np.integer)) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive integer, got {n_windows!r}")
    if not isinstance(seqlen, (int, np.integer)) or seqlen < 1:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    cfg = getattr(model, "config", None)
    max_pos = getattr(cfg, "max_position_embeddings", None)
    # The last token is sampled from position seqlen-2's logits: seqlen - 1 positions are run.
    if max_pos is not None and seqlen - 1 > max_pos:
        raise ValueError(f"seqlen {seqlen} needs {seqlen - 1} positions, more than the model's "
                         f"max_position_embeddings {max_pos}")
    if bos_id is None:
        tok = getattr(model, "tokenizer", None)
        bos_id = getattr(tok, "bos_id", None) if tok is not None else None
        if bos_id is None:
            bos_id = getattr(cfg, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("no BOS id known for this model; pass bos_id=")
    gens = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_windows)]
    out = np.empty((n_windows, seqlen), dtype=np.int64)
    out[:, 0] = bos_id
    bar = None
    if progress:
        from sasq.progress import bar as progress_bar
        bar = progress_bar(total=n_windows * (seqlen - 1), desc="data-free sampling", unit="tok")
    try:
        for b0 in range(0, n_windows, batch_size):
            b1 = min(n_windows, b0 + batch_size)
            _sample_block(model, out[b0:b1], gens[b0:b1], temperature, bar)
    finally:
        if bar is not None:
            bar.close()
    return out


def _sample_block(model, ids, gens, temperature, bar):
    """Fill ids[:, 1:] (B, T) in place, one token per step, with a KV cache."""
    b, t_len = ids.shape
    cache = KVCache(model.config.num_hidden_layers)
    for t in range(1, t_len):
        h = model.forward(ids[:, t - 1:t], cache=cache, return_hidden=True)  # (B, 1, C)
        z = h[:, -1, :] @ model.lm_head.T  # (B, V)
        ids[:, t] = sample_rows(z, temperature, gens)
        if bar is not None:
            bar.update(b)
