"""LLaMA building blocks as forward/backward pairs (llm.c style), pure NumPy, dtype-generic.

Every function computes in the dtype of its inputs (float32 for inference, float64 for the
finite-difference tests). Forward functions return what the paired backward needs ("cache");
backward functions return activation gradients only: no weight gradient is ever computed.

Shape letters: B batch, T tokens, C hidden, H query heads, KVH key/value heads, G = H // KVH
query heads per KV head, hd head dim, I intermediate, V vocab.
"""
from __future__ import annotations

import concurrent.futures
import math
import os

import numpy as np

from sasq.blas import blas_threads_for, matmul, num_threads

# Elements of one attention score block (B*H*Tq_block*Tk) at most: far below the full
# (B, H, T, T) matrix. Blocks are also at most ~T/8 rows so that skipping the keys above the
# diagonal saves ~40 % of the work.
ATTN_BLOCK_ELEMS = 1 << 20
ATTN_MIN_ROWS = 16
# Attention with fewer multiply-adds than this runs on the calling thread (decode steps).
ATTN_PARALLEL_MACS = 1 << 22


# --------------------------------------------------------------------------- linear

def linear_forward(x, w):
    """y = x @ w.T with w in HF orientation (out, in). x (..., in) -> (..., out)."""
    lead = x.shape[:-1]
    y = matmul(x.reshape(-1, x.shape[-1]), w.T)  # (N, out)
    return y.reshape(*lead, w.shape[0])


def linear_backward(dy, w):
    """dx = dy @ w. dy (..., out) -> (..., in). No weight gradient."""
    lead = dy.shape[:-1]
    dx = matmul(dy.reshape(-1, dy.shape[-1]), w)  # (N, in)
    return dx.reshape(*lead, w.shape[1])


# --------------------------------------------------------------------------- RMSNorm

def rmsnorm_forward(x, weight, eps):
    """y = weight * x / sqrt(mean(x^2) + eps). x (..., C) -> y (..., C), cache (x, rstd (...,))."""
    c = x.shape[-1]
    ms = np.einsum("...c,...c->...", x, x) / c  # (...,)
    rstd = 1.0 / np.sqrt(ms + x.dtype.type(eps))  # (...,)
    y = x * rstd[..., None]
    y *= weight
    return y, (x, rstd)


def rmsnorm_backward(dy, cache, weight):
    """dx = r*g - x * r^3 * mean(g*x), with g = dy*weight, r = rstd."""
    x, rstd = cache
    c = x.shape[-1]
    g = dy * weight  # (..., C)
    dot = np.einsum("...c,...c->...", g, x) / c  # (...,)
    dx = g
    dx *= rstd[..., None]
    dx -= x * (rstd ** 3 * dot)[..., None]
    return dx


# --------------------------------------------------------------------------- RoPE

def rope_inv_freq(head_dim, theta, scaling=None, dtype=np.float32):
    """Inverse frequencies (hd/2,) as HF computes them; scaling: None or a "llama3" dict."""
    dt = np.dtype(dtype)
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(dt) / dt.type(head_dim)
    inv = (dt.type(1.0) / (dt.type(theta) ** exps)).astype(dt)  # (hd/2,)
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(dt)


def rope_tables(inv_freq, positions):
    """cos, sin (T, hd/2) for integer positions (T,), in inv_freq's dtype."""
    ang = np.outer(np.asarray(positions).astype(inv_freq.dtype), inv_freq)  # (T, hd/2)
    return np.cos(ang), np.sin(ang)


def rope_forward(x, cos, sin):
    """Rotary embedding in HF's rotate_half layout: the pairs are (x[i], x[i + hd/2]).

    x (B, T, nh, hd), cos/sin (T, hd/2) -> (B, T, nh, hd). The rotation needs no cache.
    """
    h = x.shape[-1] // 2
    c = cos[:, None, :]  # (T, 1, hd/2)
    s = sin[:, None, :]
    x1, x2 = x[..., :h], x[..., h:]
    y = np.empty_like(x)
    np.multiply(x1, c, out=y[..., :h])
    y[..., :h] -= x2 * s
    np.multiply(x2, c, out=y[..., h:])
    y[..., h:] += x1 * s
    return y


def rope_backward(dy, cos, sin):
    """The transpose of a rotation is the rotation by -angle."""
    return rope_forward(dy, cos, -sin)


# --------------------------------------------------------------------------- attention

def _block_rows(b, h, tq, tk):
    fit = ATTN_BLOCK_ELEMS // max(1, b * h * tk)
    return min(tq, max(ATTN_MIN_ROWS, min(fit, -(-tq // 8))))


def _causal_bias(n, dtype):
    """(n, n) additive mask: 0 on and below the diagonal, -inf above."""
    return np.triu(np.full((n, n), -np.inf, dtype=dtype), 1)


def attention_forward(q, k, v):
    """Causal softmax attention with grouped-query heads, in blocks of query rows.

    q (B, KVH, G, Tq, hd) after RoPE; k, v (B, KVH, Tk, hd), Tk >= Tq: the queries are the last
    Tq positions (KV cache). Query row i may see keys j <= (Tk - Tq) + i.
    Returns out (B, KVH, G, Tq, hd) and lse (B, KVH, G, Tq), the log-sum-exp of each score row,
    from which backward recomputes the probabilities block by block (no (T, T) matrix is kept).
    Blocks skip the keys above the diagonal entirely.
    """
    out = np.empty_like(q)
    lse = np.empty(q.shape[:4], dtype=q.dtype)
    _over_kv_heads(_attention_forward_part, (q, k, v, out, lse), q.size * k.shape[2])
    return out, lse


def _attention_forward_part(q, k, v, out, lse):
    """attention_forward for a slice of KV heads, writing into out and lse."""
    b, kvh, g, tq, hd = q.shape
    tk = k.shape[2]
    off = tk - tq
    scale = q.dtype.type(1.0 / math.sqrt(hd))
    blk = _block_rows(b, kvh * g, tq, tk)
    for s in range(0, tq, blk):
        e = min(s + blk, tq)
        n, kend = e - s, off + e
        qb = np.multiply(q[:, :, :, s:e], scale).reshape(b, kvh, g * n, hd)  # (B, KVH, G*n, hd)
        sc = np.matmul(qb, k[:, :, :kend].swapaxes(-1, -2))  # (B, KVH, G*n, kend)
        sc5 = sc.reshape(b, kvh, g, n, kend)
        sc5[..., off + s:kend] += _causal_bias(n, q.dtype)
        m = sc.max(axis=-1, keepdims=True)  # (B, KVH, G*n, 1)
        sc -= m
        np.exp(sc, out=sc)
        l = sc.sum(axis=-1, keepdims=True)  # (B, KVH, G*n, 1)
        ob = np.matmul(sc, v[:, :, :kend])  # (B, KVH, G*n, hd)
        ob /= l
        out[:, :, :, s:e] = ob.reshape(b, kvh, g, n, hd)
        lse[:, :, :, s:e] = (m + np.log(l)).reshape(b, kvh, g, n)


def attention_backward(dout, q, k, v, lse):
    """Gradients of attention_forward (flash-attention style recomputation of P per block).

    dout, q (B, KVH, G, Tq, hd); k, v (B, KVH, Tk, hd); lse (B, KVH, G, Tq).
    Returns dq (B, KVH, G, Tq, hd), dk, dv (B, KVH, Tk, hd). Each block holds whole rows of P,
    so rowsum(P * dP) comes from the block itself and the forward output need not be kept.
    """
    dq = np.empty_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    _over_kv_heads(_attention_backward_part, (dout, q, k, v, lse, dq, dk, dv),
                   2 * q.size * k.shape[2])
    return dq, dk, dv


def _attention_backward_part(dout, q, k, v, lse, dq, dk, dv):
    """attention_backward for a slice of KV heads, writing dq and accumulating dk, dv."""
    b, kvh, g, tq, hd = q.shape
    tk = k.shape[2]
    off = tk - tq
    scale = q.dtype.type(1.0 / math.sqrt(hd))
    blk = _block_rows(b, kvh * g, tq, tk)
    for s in range(0, tq, blk):
        e = min(s + blk, tq)
        n, kend = e - s, off + e
        qb = np.multiply(q[:, :, :, s:e], scale).reshape(b, kvh, g * n, hd)  # (B, KVH, G*n, hd)
        dob = np.ascontiguousarray(dout[:, :, :, s:e]).reshape(b, kvh, g * n, hd)
        p = np.matmul(qb, k[:, :, :kend].swapaxes(-1, -2))  # (B, KVH, G*n, kend)
        p5 = p.reshape(b, kvh, g, n, kend)
        p5[..., off + s:kend] += _causal_bias(n, q.dtype)
        p5 -= lse[:, :, :, s:e, None]
        np.exp(p, out=p)  # probabilities
        dv[:, :, :kend] += np.matmul(p.swapaxes(-1, -2), dob)  # (B, KVH, kend, hd)
        dp = np.matmul(dob, v[:, :, :kend].swapaxes(-1, -2))  # (B, KVH, G*n, kend)
        dp -= np.einsum("...k,...k->...", p, dp)[..., None]  # dP - rowsum(P * dP)
        dp *= p  # dS
        dq[:, :, :, s:e] = (np.matmul(dp, k[:, :, :kend]) * scale).reshape(b, kvh, g, n, hd)
        dk[:, :, :kend] += np.matmul(dp.swapaxes(-1, -2), qb)  # S = qb k^T: scale is in qb


def _over_kv_heads(part, arrays, macs):
    """Run part(*arrays) with the (B, KVH) pairs split across worker threads.

    Attention is many mid-sized GEMMs plus softmax passes: one BLAS thread per GEMM and one
    Python thread per group of KV heads (NumPy releases the GIL in both) keeps the cores busy
    without OpenBLAS's per-GEMM thread hand-offs, which made it 4x slower on a busy machine.
    Outputs are freshly allocated, so merging (B, KVH) into one axis gives views of them.
    """
    bk = arrays[0].shape[0] * arrays[0].shape[1]
    flat = [a.reshape((1, bk) + a.shape[2:]) for a in arrays]
    with blas_threads_for(0) as n:
        n = min(n, bk) if macs >= ATTN_PARALLEL_MACS else 1
        if n <= 1:
            part(*flat)
            return
        cuts = np.linspace(0, bk, n + 1).astype(int)
        futures = [_pool(n).submit(part, *[a[:, i:j] for a in flat])
                   for i, j in zip(cuts[:-1], cuts[1:])]
        for f in futures:
            f.result()


_POOL = None
_POOL_PID = None


def _pool(n):
    """The shared worker threads (re-created in a forked child, where they do not exist)."""
    global _POOL, _POOL_PID
    if _POOL is None or _POOL._max_workers < n or _POOL_PID != os.getpid():
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=n,
                                                      thread_name_prefix="sasq-worker")
        _POOL_PID = os.getpid()
    return _POOL


def attention_reference(q, k, v):
    """Naive (B, KVH, G, Tq, Tk) attention: the readable reference for tests."""
    hd = q.shape[-1]
    tq, tk = q.shape[3], k.shape[2]
    sc = np.einsum("bkgtd,bksd->bkgts", q, k) / math.sqrt(hd)
    allowed = np.arange(tk)[None, :] <= (tk - tq + np.arange(tq))[:, None]
    sc = np.where(allowed, sc, -np.inf)
    sc = sc - sc.max(-1, keepdims=True)
    p = np.exp(sc)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgts,bksd->bkgtd", p, v).astype(q.dtype)


# --------------------------------------------------------------------------- SwiGLU

def sigmoid(a):
    """1 / (1 + exp(-a)) in a's dtype, overflow-free (exp(-a) = inf gives 0); the one sigmoid of
    the package (SwiGLU and the truncation threshold)."""
    with np.errstate(over="ignore"):
        a = np.asarray(a)
        s = np.negative(a, out=np.empty_like(a))  # an array even for 0-d input; in place after
        np.exp(s, out=s)
    s += 1
    np.reciprocal(s, out=s)
    return s


def swiglu_forward(gate, up):
    """h = silu(gate) * up. gate, up (..., I) -> h (..., I); backward needs gate and up."""
    h = np.empty_like(gate)
    _over_rows(_swiglu_forward_part, (gate, up), (h,))
    return h


def _swiglu_forward_part(gate, up, h):
    h[...] = sigmoid(gate)
    h *= gate
    h *= up


def swiglu_backward(dh, gate, up):
    """dgate = dh * up * sig * (1 + gate * (1 - sig)), dup = dh * silu(gate)."""
    dgate, dup = np.empty_like(gate), np.empty_like(up)
    _over_rows(_swiglu_backward_part, (dh, gate, up), (dgate, dup))
    return dgate, dup


def _swiglu_backward_part(dh, gate, up, dgate, dup):
    sig = sigmoid(gate)
    silu = gate * sig
    np.multiply(dh, silu, out=dup)
    # d silu / d gate = sig + silu * (1 - sig)
    dsilu = 1 - sig
    dsilu *= silu
    dsilu += sig
    np.multiply(dh, up, out=dgate)
    dgate *= dsilu


# Elementwise work runs in row chunks of about this many elements: bounded temporaries that
# stay in cache; with more than one chunk, the chunks are shared among the worker threads.
CHUNK_ELEMS = 1 << 18


def _over_rows(part, inputs, outputs):
    """part(*inputs, *outputs) over row chunks of the flattened (N, last) arrays (NumPy's
    ufuncs release the GIL, so the worker threads run chunks in parallel)."""
    flat = [a.reshape(-1, a.shape[-1]) for a in (*inputs, *outputs)]
    rows, width = flat[0].shape
    step = max(1, CHUNK_ELEMS // max(1, width))
    chunks = [(i, min(i + step, rows)) for i in range(0, rows, step)]
    n = min(num_threads(), len(chunks))

    def run(sub):
        for i, j in sub:
            part(*[a[i:j] for a in flat])

    if n <= 1:
        run(chunks)
        return
    futures = [_pool(n).submit(run, chunks[w::n]) for w in range(n)]
    for f in futures:
        f.result()


# --------------------------------------------------------------------------- cross-entropy

def cross_entropy_forward(logits, targets):
    """Mean next-token cross-entropy. logits (..., V), targets (...) int -> (loss, cache)."""
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape[:-1]}")
    z = logits.reshape(-1, logits.shape[-1])  # (N, V)
    t = targets.reshape(-1).astype(np.int64)  # (N,)
    if t.size and (t.min() < 0 or t.max() >= z.shape[1]):
        raise ValueError(f"targets must lie in [0, {z.shape[1]})")
    m = z.max(axis=1)  # (N,)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))  # (N,)
    nll = lse - z[np.arange(z.shape[0]), t]
    loss = float(np.mean(nll, dtype=np.float64))
    return loss, (logits, t, lse)


def cross_entropy_backward(cache):
    """dloss/dlogits = (softmax(logits) - onehot(targets)) / N, shape of logits."""
    logits, t, lse = cache
    z = logits.reshape(-1, logits.shape[-1])
    n = z.shape[0]
    d = np.exp(z - lse[:, None])  # (N, V)
    d[np.arange(n), t] -= 1
    d /= n
    return d.reshape(logits.shape)
