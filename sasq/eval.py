"""Perplexity and fidelity with the QuaRot / GPTQ protocol (DESIGN.md section 3).

The text is tokenized once as one stream (BOS once, at the start, when the tokenizer adds BOS),
cut into n = len // seqlen non-overlapping windows (tail dropped, no BOS per window). Each window
is scored like those scripts do: logits[:, :-1] against ids[:, 1:], i.e. seqlen - 1 next-token
predictions; the window's NLL is their mean, the reported NLL the mean over windows, and
ppl = exp(nll). The logits of a window are never materialised whole: rows of the final hidden
state go through lm_head CHUNK_ROWS at a time, with the log-sum-exp accumulated in float64.

Fidelity (with a `reference`, normally the FP32 model): on the same scored positions, the mean
per-token KL(reference || model) and the top-1 agreement (the fraction of positions where both
models' argmax agree). Perplexity alone can move either way under a perturbation (a model can
fit the evaluation domain); KL and agreement measure how close the quantized model stays.
A Reference holds the reference's final hidden states for the windows, computed once (and
optionally stored in a file), so every quantized model is compared without rerunning FP32.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sasq import losses
from sasq.atomic import atomic_write
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
    kl: float | None = None  # mean per-token KL(reference || model); None without a reference
    top1: float | None = None  # fraction of positions whose argmax agrees with the reference
    window_kls: list = field(default_factory=list)
    window_top1: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (floats and ints only)."""
        d = asdict(self)
        for k in ("window_nlls", "window_kls", "window_top1"):
            d[k] = [float(x) for x in getattr(self, k)]
        return d

    def __str__(self):
        s = (f"ppl {self.ppl:.4f} (nll {self.nll:.6f}) over {self.n_windows} windows x "
             f"{self.seqlen} tokens of a {self.n_tokens}-token stream")
        if self.kl is not None:
            s += f"; KL to reference {self.kl:.5f}, top-1 agreement {self.top1:.4f}"
        return s


def window_scores(hidden, lm_head, ids, ref_hidden=None, ref_head=None):
    """(nll, kl, top1) of one window from its final normed hidden state; kl and top1 are None
    without a reference. hidden (T, C), lm_head (V, C), ids (T,): position t predicts ids[t+1],
    T - 1 scored positions, in row chunks."""
    T = hidden.shape[0]
    nll = kl = agree = 0.0
    for r0 in range(0, T - 1, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, T - 1)
        z = hidden[r0:r1] @ lm_head.T  # (r, V) in the model's dtype
        nll += float(losses.nll_rows(z, ids[r0 + 1:r1 + 1]).sum())
        if ref_hidden is not None:
            zp = ref_hidden[r0:r1] @ ref_head.T  # (r, V)
            kl += float(losses.kl_rows(z, zp).sum())
            agree += float(np.count_nonzero(z.argmax(axis=1) == zp.argmax(axis=1)))
    n = T - 1
    if ref_hidden is None:
        return nll / n, None, None
    return nll / n, kl / n, agree / n


def model_fingerprint(model) -> np.ndarray:
    """(16,) uint8 blake2b of everything a model computes with: every array reachable through its
    public attributes (lists, dicts and nested objects such as layers, a QuantModel's scales and
    its float model included) and its config. A cached reference is reused only for the model it
    was computed with (~1 s per GB; a change anywhere only costs a recomputation)."""
    h = hashlib.blake2b(digest_size=16)
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "to_dict"):
        h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    seen = set()

    def feed(name, v, attribute=True):
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            h.update(f"{name}:{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            if attribute:  # flags (online_down); scalars inside containers are bookkeeping
                h.update(f"{name}={v!r}".encode())
        elif isinstance(v, (list, tuple)):
            for k, x in enumerate(v):
                feed(f"{name}.{k}", x, False)
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                feed(f"{name}[{k}]", v[k], False)
        elif hasattr(v, "__dict__") and id(v) not in seen:  # layers, a wrapped model, sites
            seen.add(id(v))
            for k, x in sorted(vars(v).items()):
                if k not in ("tokenizer", "config", "source_dir") and not k.startswith("_"):
                    feed(f"{name}.{k}", x)

    feed("", model)
    return np.frombuffer(h.digest(), np.uint8)


class Reference:
    """A reference model's final hidden states on fixed windows: windows (n, T), hidden (n, T, C),
    lm_head (V, C). Compute once with Reference.compute; perplexity(..., reference=ref) then
    reports KL(ref || model) and top-1 agreement on exactly these windows."""

    def __init__(self, windows: np.ndarray, hidden: np.ndarray, lm_head: np.ndarray):
        if hidden.shape[:2] != windows.shape or hidden.shape[2] != lm_head.shape[1]:
            raise ValueError(f"reference hidden {hidden.shape} does not match windows "
                             f"{windows.shape} and lm_head {lm_head.shape}")
        self.windows, self.hidden, self.lm_head = windows, hidden, lm_head

    @classmethod
    def compute(cls, model, token_ids, seqlen: int, max_windows: int | None = None,
                batch_size: int = 1, progress: bool = True, path=None) -> "Reference":
        """The reference on the windows perplexity() would cut. With `path` (.npz), a file
        holding the same windows and computed by the same model (model_fingerprint) is read instead, and a computed
        one is written atomically."""
        wins = _windows(model, token_ids, seqlen, max_windows)
        model_id = model_fingerprint(model)
        if path is not None and Path(path).is_file():
            try:
                with np.load(path) as z:
                    w, h, hid = z["windows"], z["hidden"], z["model_id"]
                if np.array_equal(w, wins) and np.array_equal(hid, model_id) \
                        and h.shape == wins.shape + (model.lm_head.shape[1],):
                    return cls(wins, h, model.lm_head)
            except Exception:  # unreadable or stale: recompute
                pass
        from sasq.progress import bar
        hidden = np.empty(wins.shape + (model.lm_head.shape[1],), dtype=model.lm_head.dtype)
        for b0 in bar(range(0, len(wins), batch_size), desc="reference", disable=not progress):
            hidden[b0:b0 + batch_size] = model.forward(wins[b0:b0 + batch_size], return_hidden=True)
        if path is not None:
            with atomic_write(Path(path), "wb") as f:
                np.savez(f, windows=wins, hidden=hidden, model_id=model_id)
        return cls(wins, hidden, model.lm_head)


def _windows(model, token_ids, seqlen, max_windows):
    token_ids = as_token_ids(token_ids, "token ids")
    seqlen = check_seqlen(model, seqlen)
    if token_ids.ndim == 2 and token_ids.shape[1] != seqlen:
        raise ValueError(f"windows have length {token_ids.shape[1]} but seqlen is {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    return np.ascontiguousarray(cut_windows(token_ids, seqlen, max_windows, "token ids"))


def perplexity(model, token_ids, seqlen: int, batch_size: int = 1, max_windows: int | None = None,
               progress: bool = True, reference=None) -> PerplexityResult:
    """Perplexity of `model` (anything with .forward(ids, return_hidden=True) -> (B, T, C) and
    .lm_head (V, C)) on a 1-D token stream, or on ready-made (n, seqlen) windows.

    reference: a Reference for these windows, or a model (run here, batch by batch): adds the
    mean per-token KL(reference || model) and the top-1 agreement to the result."""
    wins = _windows(model, token_ids, seqlen, max_windows)
    n_tokens = int(np.asarray(token_ids).size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lm_head = model.lm_head
    V = lm_head.shape[0]
    lo, hi = int(wins.min()), int(wins.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary (size {V})")
    if isinstance(reference, Reference):
        if not np.array_equal(reference.windows, wins):
            raise ValueError("the reference was computed on other windows (token ids, seqlen or "
                             "max_windows differ)")
        if reference.lm_head.shape != lm_head.shape:
            raise ValueError(f"reference lm_head {reference.lm_head.shape} != model's {lm_head.shape}")

    from sasq.progress import bar as progress_bar
    nlls, kls, top1 = [], [], []
    bar = progress_bar(total=len(wins), disable=not progress, desc="perplexity", unit="win")
    try:
        for b0 in range(0, len(wins), batch_size):
            batch = wins[b0:b0 + batch_size]  # (B, T)
            hidden = model.forward(batch, return_hidden=True)  # (B, T, C)
            if hidden.shape[:2] != batch.shape or hidden.shape[2] != lm_head.shape[1]:
                raise ValueError(f"forward(return_hidden=True) returned shape {hidden.shape}, "
                                 f"expected {batch.shape + (lm_head.shape[1],)}")
            ref_h = ref_head = None
            if isinstance(reference, Reference):
                ref_h, ref_head = reference.hidden[b0:b0 + batch_size], reference.lm_head
            elif reference is not None:
                ref_h, ref_head = reference.forward(batch, return_hidden=True), reference.lm_head
            for b in range(len(batch)):
                n, k, a = window_scores(hidden[b], lm_head, batch[b],
                                        None if ref_h is None else ref_h[b], ref_head)
                nlls.append(n)
                if k is not None:
                    kls.append(k)
                    top1.append(a)
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
                            window_nlls=nlls, kl=float(np.mean(kls)) if kls else None,
                            top1=float(np.mean(top1)) if top1 else None, window_kls=kls,
                            window_top1=top1)
