"""Perplexity with the QuaRot / GPTQ protocol (DESIGN.md section 3).

The text is tokenized once as one stream (BOS once, at the start, when the tokenizer adds BOS),
cut into n = len // seqlen non-overlapping windows (tail dropped, no BOS per window). Each window
is scored like those scripts do: logits[:, :-1] against ids[:, 1:], i.e. seqlen - 1 next-token
predictions; the window's NLL is their mean, the reported NLL the mean over windows, and
ppl = exp(nll). The logits of a window are never materialised whole: rows of the final hidden
state go through lm_head CHUNK_ROWS at a time, with the log-sum-exp accumulated in float64.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from sasq.data import as_token_ids, check_seqlen, cut_windows

CHUNK_ROWS = 256  # rows of (rows, V) logits alive at once: 256 x 32k x 4 B = 32 MiB


@dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean next-token negative log-likelihood (nats) over all scored positions
    n_windows: int
    seqlen: int
    n_tokens: int  # length of the token stream the windows were cut from
    n_predictions: int  # n_windows * (seqlen - 1) scored positions
    window_nlls: list = field(default_factory=list)  # mean NLL of each window

    def to_dict(self) -> dict:
        """Plain JSON-able dict (floats and ints only)."""
        d = asdict(self)
        d["window_nlls"] = [float(x) for x in self.window_nlls]
        return d

    def __str__(self):
        return (f"ppl {self.ppl:.4f} (nll {self.nll:.6f}) over {self.n_windows} windows x "
                f"{self.seqlen} tokens of a {self.n_tokens}-token stream")


def window_nll(hidden, lm_head, ids) -> float:
    """Mean next-token NLL of one window from its final normed hidden state.

    hidden (T, C), lm_head (V, C), ids (T,): position t predicts ids[t + 1]; T - 1 predictions.
    """
    T = hidden.shape[0]
    total = 0.0
    for r0 in range(0, T - 1, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, T - 1)
        logits = hidden[r0:r1] @ lm_head.T  # (r, V) in the model's dtype
        target = ids[r0 + 1:r1 + 1]  # (r,)
        m = logits.max(axis=1)  # (r,)
        lse = np.log(np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)) + m  # (r,) float64
        total += float((lse - logits[np.arange(r1 - r0), target]).sum(dtype=np.float64))
    return total / (T - 1)


def perplexity(model, token_ids, seqlen: int, batch_size: int = 1, max_windows: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` (anything with .forward(ids, return_hidden=True) -> (B, T, C) and
    .lm_head (V, C)) on a 1-D token stream, or on ready-made (n, seqlen) windows."""
    token_ids = as_token_ids(token_ids, "token ids")
    seqlen = check_seqlen(model, seqlen)
    if token_ids.ndim == 2 and token_ids.shape[1] != seqlen:
        raise ValueError(f"windows have length {token_ids.shape[1]} but seqlen is {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    wins = cut_windows(token_ids, seqlen, max_windows, "token ids")
    n_tokens = int(token_ids.size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lm_head = model.lm_head
    V = lm_head.shape[0]
    lo, hi = int(wins.min()), int(wins.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary (size {V})")

    from tqdm.auto import tqdm
    nlls = []
    bar = tqdm(total=len(wins), disable=not progress, desc="perplexity", unit="win", leave=False)
    try:
        for b0 in range(0, len(wins), batch_size):
            batch = np.ascontiguousarray(wins[b0:b0 + batch_size], dtype=np.int64)  # (B, T)
            hidden = model.forward(batch, return_hidden=True)  # (B, T, C)
            if hidden.shape[:2] != batch.shape or hidden.shape[2] != lm_head.shape[1]:
                raise ValueError(f"forward(return_hidden=True) returned shape {hidden.shape}, "
                                 f"expected {batch.shape + (lm_head.shape[1],)}")
            for b in range(len(batch)):
                nlls.append(window_nll(hidden[b], lm_head, batch[b]))
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{math.exp(min(np.mean(nlls), 700)):.3f}")
    finally:
        bar.close()

    nll = float(np.mean(nlls))
    if not math.isfinite(nll):
        bad = [i for i, x in enumerate(nlls) if not math.isfinite(x)]
        warnings.warn(f"non-finite NLL in {len(bad)} of {len(nlls)} windows (first: {bad[:5]}); "
                      f"the model produced inf/nan logits", RuntimeWarning, stacklevel=2)
    ppl = math.inf if nll > 709 else math.exp(nll)  # nan stays nan
    return PerplexityResult(ppl=ppl, nll=nll, n_windows=len(wins), seqlen=int(seqlen),
                            n_tokens=n_tokens, n_predictions=len(wins) * (int(seqlen) - 1),
                            window_nlls=nlls)
