"""Next-token choice from logits, the one implementation (generation and data-free sampling).

temperature 0 is greedy (argmax). Otherwise p = softmax(z / temperature) in float64 (optionally
restricted to the top_k logits) and each row draws u = rng.random() * sum(p) from its own
Generator, taking the first index whose cumulative probability exceeds u (inverse CDF), so a
row's draw depends only on its own generator, never on the batch it sits in.
"""
from __future__ import annotations

import numpy as np


def softmax_rows(z) -> np.ndarray:
    """(B, V) -> (B, V) float64 probabilities."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def sample_rows(logits, temperature: float, rngs, top_k: int | None = None) -> np.ndarray:
    """logits (B, V), one np.random.Generator per row -> (B,) int64 token ids."""
    z = np.atleast_2d(logits)
    if temperature == 0:
        return z.argmax(axis=-1).astype(np.int64)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)
        z = np.where(z >= kth, z, -np.inf)
    cdf = np.cumsum(softmax_rows(z), axis=-1)  # (B, V)
    out = np.empty(z.shape[0], dtype=np.int64)
    for r, g in enumerate(rngs):
        u = g.random() * cdf[r, -1]
        out[r] = min(int(np.searchsorted(cdf[r], u, side="right")), cdf.shape[1] - 1)
    return out


def generate(step, logits_of, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             seed=None, top_k: int | None = None, eos_id: int | None = None) -> list[int]:
    """The decode loop shared by LlamaModel and the integer engine: step(ids (1, T)) runs the
    next positions through the model's KV cache and returns the final normed hidden (1, T, C);
    logits_of(h (1, C)) -> (1, V). Returns only the new tokens (stops after eos_id if given)."""
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise ValueError("generate needs a non-empty prompt (e.g. [bos_id])")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be >= 1")
    rng = np.random.default_rng(seed)
    out: list[int] = []
    if max_new_tokens == 0:
        return out
    h = step(prompt[None])
    while True:
        tok = int(sample_rows(logits_of(h[:, -1]), temperature, [rng], top_k)[0])
        out.append(tok)
        if len(out) >= max_new_tokens or (eos_id is not None and tok == eos_id):
            return out
        h = step(np.array([[tok]]))
