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
HIDDEN_CHUNK_ROWS = 128  # (hidden, head) students: rows of logits formed at a time


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


def logsumexp_rows(z) -> np.ndarray:
    """(n, V) -> (n,) float64 log-sum-exp per row: exp in z's dtype, sums in float64."""
    m = z.max(axis=-1)  # (n,)
    return np.log(np.exp(z - m[:, None]).sum(axis=-1, dtype=np.float64)) + m


def nll_rows(z, targets) -> np.ndarray:
    """(n, V) logits, (n,) targets -> (n,) float64 next-token negative log-likelihoods."""
    return logsumexp_rows(z) - z[np.arange(z.shape[0]), targets]


def kl_rows(zq, zp) -> np.ndarray:
    """(n,) float64 KL(p || q) per row of student logits zq and teacher logits zp (n, V):
    sum_v p_v (zp_v - zq_v) + lse(zq) - lse(zp)  (uses sum p = 1)."""
    lse_p = logsumexp_rows(zp)
    p = np.exp(zp - lse_p[:, None].astype(zp.dtype))  # (n, V) teacher probabilities
    cross = (p * (zp - zq)).sum(axis=-1, dtype=np.float64)
    return cross + logsumexp_rows(zq) - lse_p


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
        total += float(nll_rows(src.rows(i0, i1), t[i0:i1]).sum())
    return total / max(src.n, 1)


def ce_backward(logits, targets, chunk_rows=DEFAULT_CHUNK_ROWS):
    """d(mean CE)/d logits = (softmax - onehot) / N, shape (..., V)."""
    return ce_loss_and_grad(logits, targets, chunk_rows)[1]


def _grad_target(src: _Rows, chunk_rows: int):
    """Where the gradient goes: dlogits (N, V) for a logits array; for (hidden, head) a chunk
    buffer for dlogits and dhidden (N, C) = dlogits @ head, row chunk by row chunk."""
    if src.head is None:
        return np.empty((src.n, src.vocab), dtype=src.dtype), None, chunk_rows
    rows = min(chunk_rows, HIDDEN_CHUNK_ROWS)  # keep the (rows, V) temporaries cache-sized
    return (np.empty((rows, src.vocab), dtype=src.dtype),
            np.empty((src.n, src.flat.shape[1]), dtype=src.dtype), rows)


def _finish(src, dlogits, dhidden):
    if dhidden is None:
        return dlogits.reshape(*src.lead, src.vocab)
    return dhidden.reshape(*src.lead, dhidden.shape[1])


def ce_loss_and_grad(logits, targets, chunk_rows=DEFAULT_CHUNK_ROWS):
    """(mean CE, gradient) in one chunked pass. logits: the student's logits array -> dlogits;
    or (hidden, head) -> d hidden (..., C): the logits are then formed chunk by chunk and the
    (N, V) gradient never exists whole.

    One exp per element: the gradient buffer holds exp(z - max) and is scaled in place into
    (softmax - onehot) / N; the loss uses log-sum-exp per row."""
    src = _Rows(logits)
    t = _check_targets(src, targets)
    buf, dhidden, chunk_rows = _grad_target(src, chunk_rows)
    total = 0.0
    inv_n = 1.0 / max(src.n, 1)
    for i0 in range(0, src.n, chunk_rows):
        i1 = min(src.n, i0 + chunk_rows)
        z = src.rows(i0, i1)  # (n, V)
        r = np.arange(i1 - i0)
        m = z.max(axis=-1, keepdims=True)  # (n, 1)
        e = buf[i0:i1] if dhidden is None else buf[:i1 - i0]
        np.subtract(z, m, out=e)
        zt = e[r, t[i0:i1]].astype(np.float64)  # z_target - max, before exp
        np.exp(e, out=e)
        ssum = e.sum(axis=-1, keepdims=True)  # (n, 1)
        total -= float((zt - np.log(ssum[:, 0].astype(np.float64))).sum())
        e *= (inv_n / ssum).astype(e.dtype)
        e[r, t[i0:i1]] -= e.dtype.type(inv_n)
        if dhidden is not None:
            np.matmul(e, src.head, out=dhidden[i0:i1])  # (n, C)
    return total * inv_n, _finish(src, buf, dhidden)


# --------------------------------------------------------------------------- KL to the teacher

def kl_forward(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS) -> float:
    """Mean over tokens of KL(p_teacher || p_student); each a logits source of equal rows."""
    s, t = _Rows(student), _Rows(teacher)
    if s.lead != t.lead or s.vocab != t.vocab:
        raise ValueError(f"student rows {s.lead}x{s.vocab} != teacher rows {t.lead}x{t.vocab}")
    total = 0.0
    for i0 in range(0, s.n, chunk_rows):
        i1 = min(s.n, i0 + chunk_rows)
        total += float(kl_rows(s.rows(i0, i1), t.rows(i0, i1)).sum())
    return total / max(s.n, 1)


def kl_backward(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS):
    """d(mean KL(p_t || p_q))/d student logits = (p_q - p_t) / N."""
    return kl_loss_and_grad(student, teacher, chunk_rows)[1]


def kl_loss_and_grad(student, teacher, chunk_rows=DEFAULT_CHUNK_ROWS):
    """(mean KL, gradient) in one chunked pass: student logits array -> dlogits; student
    (hidden, head) -> d hidden (..., C), as ce_loss_and_grad.

    Per row, with lse = log-sum-exp: KL = sum_v p_v (zt_v - zq_v) + lse_q - lse_t (sum p = 1),
    so neither log-probability array is formed; one exp per element for each model."""
    s, t = _Rows(student), _Rows(teacher)
    if s.lead != t.lead or s.vocab != t.vocab:
        raise ValueError(f"student rows {s.lead}x{s.vocab} != teacher rows {t.lead}x{t.vocab}")
    buf, dhidden, chunk_rows = _grad_target(s, chunk_rows)
    total = 0.0
    inv_n = 1.0 / max(s.n, 1)
    for i0 in range(0, s.n, chunk_rows):
        i1 = min(s.n, i0 + chunk_rows)
        zq = s.rows(i0, i1)  # (n, V)
        zt = t.rows(i0, i1)  # (n, V)
        mt = zt.max(axis=-1, keepdims=True)
        p = np.exp(zt - mt)  # (n, V) unnormalised teacher probabilities
        st = p.sum(axis=-1, keepdims=True)
        p /= st
        mq = zq.max(axis=-1, keepdims=True)
        eq = buf[i0:i1] if dhidden is None else buf[:i1 - i0]
        np.subtract(zq, mq, out=eq)
        np.exp(eq, out=eq)
        sq = eq.sum(axis=-1, keepdims=True)
        d = np.subtract(zt, zq, out=zt) if t.head is not None else zt - zq  # (n, V), own buffer
        cross = np.einsum("nv,nv->n", p, d).astype(np.float64)  # sum_v p (zt - zq)
        lse_q = mq[:, 0].astype(np.float64) + np.log(sq[:, 0].astype(np.float64))
        lse_t = mt[:, 0].astype(np.float64) + np.log(st[:, 0].astype(np.float64))
        total += float((cross + lse_q - lse_t).sum())
        eq /= sq
        eq -= p
        eq *= eq.dtype.type(inv_n)
        if dhidden is not None:
            np.matmul(eq, s.head, out=dhidden[i0:i1])  # (n, C)
    return total * inv_n, _finish(s, buf, dhidden)
