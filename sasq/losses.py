"""Training losses and their gradients with respect to the student logits, in row chunks.

Two objectives for scale-only training:
- next-token cross-entropy on data (the paper's objective), and
- distillation: KL(p_fp || p_q) per token to the frozen FP32 teacher (measures quantization
  fidelity instead of domain fit).

Both are computed over row chunks of the flattened (B*T, V) logits so that the softmax
temporaries never exceed (chunk_rows, V). The teacher's logits are never materialised as a
whole: they are computed per chunk from the teacher's final hidden state and its lm_head.

A "logits source" is either an array (..., V) or a pair (hidden (..., C), head (V, C)) whose
rows give logits = hidden @ head.T on demand.

Every loss is the mean over rows (tokens). Forward and backward of each objective sit side by
side; `*_loss_and_grad` does both in one chunked pass (what training uses).
"""
from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_ROWS = 2048


# --------------------------------------------------------------------------- logits sources

class _Rows:
    """Uniform row access to logits given as an array or as (hidden, head)."""

    def __init__(self, src):
        if isinstance(src, tuple):
            hidden, head = src
            hidden = np.asarray(hidden)
            head = np.asarray(head)
            if hidden.shape[-1] != head.shape[1]:
                raise ValueError(f"hidden width {hidden.shape[-1]} does not match head {head.shape}")
            self.lead = hidden.shape[:-1]
            self.flat = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
            self.head = head  # (V, C)
            self.vocab = head.shape[0]
        else:
            logits = np.asarray(src)
            if logits.ndim < 2:
                raise ValueError(f"logits must have a vocabulary axis, got shape {logits.shape}")
            self.lead = logits.shape[:-1]
            self.flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
            self.head = None
            self.vocab = logits.shape[-1]
        self.n = self.flat.shape[0]
        self.dtype = np.result_type(self.flat.dtype, np.float32)

    def rows(self, i0, i1):
        x = self.flat[i0:i1]
        if self.head is None:
            return x.astype(self.dtype, copy=False)
        return (x @ self.head.T).astype(self.dtype, copy=False)  # (n, V)


def _log_softmax(z):
    # (n, V) -> (n, V), stable
    m = z.max(axis=-1, keepdims=True)
    zs = z - m
    return zs - np.log(np.exp(zs).sum(axis=-1, keepdims=True))


def _check_targets(rows: _Rows, targets):
    t = np.asarray(targets)
    if t.shape != rows.lead:
        raise ValueError(f"targets shape {t.shape} does not match logits rows {rows.lead}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must be integers, got {t.dtype}")
    t = t.reshape(-1)
    if t.size and (t.min() < 0 or t.max() >= rows.vocab):
        raise ValueError(f"targets out of range [0, {rows.vocab})")
    return t


# --------------------------------------------------------------------------- cross-entropy

def ce_forward(logits, targets, chunk_rows=DEFAULT_CHUNK_ROWS) -> float:
    """Mean next-token cross-entropy. logits (..., V) or (hidden, head); targets (...) int."""
    src = _Rows(logits)
    t = _check_targets(src, targets)
    total = 0.0
    for i0 in range(0, src.n, chunk_rows):
        i1 = min(src.n, i0 + chunk_rows)
        lp = _log_softmax(src.rows(i0, i1))  # (n, V)
        total -= float(lp[np.arange(i1 - i0), t[i0:i1]].sum(dtype=np.float64))
    return total / max(src.n, 1)


def ce_backward(logits, targets, chunk_rows=DEFAULT_CHUNK_ROWS):
    """d(mean CE)/d logits = (softmax - onehot) / N, shape (..., V)."""
    return ce_loss_and_grad(logits, targets, chunk_rows)[1]


def ce_loss_and_grad(logits, targets, chunk_rows=DEFAULT_CHUNK_ROWS):
    """(mean CE, dlogits) in one chunked pass. logits must be an array (the student's)."""
    src = _Rows(logits)
    if src.head is not None:
        raise ValueError("ce_loss_and_grad needs the logits array (its gradient has that shape)")
    t = _check_targets(src, targets)
    dlogits = np.empty((src.n, src.vocab), dtype=src.dtype)  # (N, V)
    total = 0.0
    inv_n = 1.0 / max(src.n, 1)
    for i0 in range(0, src.n, chunk_rows):
        i1 = min(src.n, i0 + chunk_rows)
        lp = _log_softmax(src.rows(i0, i1))  # (n, V)
        r = np.arange(i1 - i0)
        total -= float(lp[r, t[i0:i1]].sum(dtype=np.float64))
        g = np.exp(lp)
        g[r, t[i0:i1]] -= 1.0
        g *= inv_n
        dlogits[i0:i1] = g
    return total * inv_n, dlogits.reshape(*src.lead, src.vocab)


# --------------------------------------------------------------------------- KL to the teacher

def kl_forward(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS) -> float:
    """Mean over tokens of KL(p_teacher || p_student); each a logits source of equal rows."""
    s, t = _Rows(student), _Rows(teacher)
    if s.lead != t.lead or s.vocab != t.vocab:
        raise ValueError(f"student rows {s.lead}x{s.vocab} != teacher rows {t.lead}x{t.vocab}")
    total = 0.0
    for i0 in range(0, s.n, chunk_rows):
        i1 = min(s.n, i0 + chunk_rows)
        lq = _log_softmax(s.rows(i0, i1))  # (n, V)
        lp = _log_softmax(t.rows(i0, i1))  # (n, V)
        total += float((np.exp(lp) * (lp - lq)).sum(dtype=np.float64))
    return total / max(s.n, 1)


def kl_backward(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS):
    """d(mean KL(p_t || p_q))/d student logits = (p_q - p_t) / N."""
    return kl_loss_and_grad(student, teacher, chunk_rows)[1]


def kl_loss_and_grad(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS):
    """(mean KL, dstudent_logits) in one chunked pass; student must be the logits array."""
    s, t = _Rows(student), _Rows(teacher)
    if s.head is not None:
        raise ValueError("kl_loss_and_grad needs the student's logits array")
    if s.lead != t.lead or s.vocab != t.vocab:
        raise ValueError(f"student rows {s.lead}x{s.vocab} != teacher rows {t.lead}x{t.vocab}")
    dlogits = np.empty((s.n, s.vocab), dtype=s.dtype)  # (N, V)
    total = 0.0
    inv_n = 1.0 / max(s.n, 1)
    for i0 in range(0, s.n, chunk_rows):
        i1 = min(s.n, i0 + chunk_rows)
        lq = _log_softmax(s.rows(i0, i1))  # (n, V)
        lp = _log_softmax(t.rows(i0, i1))  # (n, V)
        p = np.exp(lp)
        total += float((p * (lp - lq)).sum(dtype=np.float64))
        dlogits[i0:i1] = (np.exp(lq) - p) * inv_n
    return total * inv_n, dlogits.reshape(*s.lead, s.vocab)
