"""QuaRot-style rotation of a LlamaModel: a pure transform to a model computing the same function
whose activations have no outlier channels.

    rotated = sasq.rotate.rotate_model(model)            # same forward signature, same logits

Steps (Ashkboos et al. 2024, QuaRot), with row-vector activations and y = x W^T:
1. Fold every RMSNorm gain into the linears that read it (q/k/v, gate/up, lm_head columns); the
   norms keep only their normalization (gain 1), which commutes with an orthogonal transform.
   lm_head gets the final norm's gain, so tied embeddings are untied (said so in the result's
   `rotation` record).
2. R1, on the residual stream: x -> x Q with Q = D H^T (H the orthonormal Hadamard of the hidden
   size, D = diag(random signs) when seeded, else I). Readers of the stream (q/k/v, gate/up,
   lm_head, and embed_tokens which writes it) get W -> W Q; writers (o_proj, down_proj) get
   W -> Q^T W. RMSNorm of a rotated vector is the rotated RMSNorm (gain 1), so nothing else moves.
3. R2, per attention head on values: v_h -> v_h H_hd^T for every KV head (v_proj rows), and the
   attention output of every query head the same way (o_proj columns). Attention mixes positions,
   not channels, so the rotation passes through it.
4. R4, online before down_proj: the model applies d -> d H_I^T to the SwiGLU output at run time
   (LlamaModel.online_down, the C kernel sasq.ops.hadamard) and down_proj gets W -> W H_I^T, so
   down_in sees rotated activations; the engine fuses it with the quantizer. Where the
   intermediate size has no Hadamard construction (stories260K's 172 = 43 x 4), H_I is
   kron(S, H_4) / sqrt(I) with S a seeded random orthogonal 43 x 43 scaled to S S^T = 43 I
   (sasq.hadamard.orthogonal_factor): the same kernel, every output still mixes every input.
5. R3 (optional, online_qk): queries and keys after RoPE get q -> q H_hd^T, k -> k H_hd^T per head
   at run time (LlamaModel.online_qk). q k^T is unchanged; a quantized K cache ("k_cache" site,
   static or dynamic) then rounds rotated keys, whose outlier channels are spread over the head.
Hadamard sizes that are not powers of two use Kronecker products (sasq.hadamard: 576 = 36 x 16,
1536 = 12 x 128, 11008 = 344 x 32, ...). The weights are rotated in float64 and rounded once.
"""
from __future__ import annotations

import numpy as np

from sasq import hadamard as had
from sasq.transforms import fold_norms

__all__ = ["rotate_model", "hadamard_rows", "online_hadamard", "online_hadamard_backward"]

R4_SEED = 0  # the orthogonal R4 factor's seed when R1 is the plain (unseeded) Hadamard
# Bumped when rotate_model computes something else for the same arguments (2: an orthogonal R4
# where no Hadamard of the intermediate size exists); results and checkpoints record it.
ROTATION_VERSION = 2


def hadamard_rows(x: np.ndarray, transpose: bool = False, signs: np.ndarray | None = None,
                  head: int | None = None, small: np.ndarray | None = None) -> np.ndarray:
    """float64 y = (x * signs) M^T (x M with transpose) over the last axis, M the orthonormal
    Hadamard of that size (sasq.hadamard layout), or kron(small, H_{2^k}) / sqrt(n) with a given
    (m, m) `small` (small small^T = m I; sasq.hadamard.orthogonal_factor); with `head`, per block
    of `head` channels. Fast: butterflies for the 2^k part, a small matmul for the m part."""
    y = np.array(x, dtype=np.float64)
    if signs is not None:
        y *= signs
    n = head or y.shape[-1]
    lead = y.shape
    if small is None:
        m, k = had.hadamard_factors(n)
    else:
        m = small.shape[0]
        k = (n // m).bit_length() - 1
        if n % m or (1 << k) != n // m:
            raise ValueError(f"a ({m}, {m}) factor does not make a transform of size {n} = m * 2^k")
    p = 1 << k
    z = y.reshape(-1, m, p)  # (rows, m, p): element a * p + b
    h = 1
    while h < p:  # butterflies: natural-order Sylvester (symmetric)
        v = z.reshape(-1, m, p // (2 * h), 2, h)
        a, b = v[:, :, :, 0, :].copy(), v[:, :, :, 1, :]
        v[:, :, :, 0, :] += b
        v[:, :, :, 1, :] = a - b
        h *= 2
    if m > 1:
        s = (had.small_hadamard(m) if small is None else small).astype(np.float64)
        z = np.einsum("ij,rjb->rib", s.T if transpose else s, z)
    return (z / np.sqrt(n)).reshape(lead)


def _cols(w, fn):
    """Apply a row transform to the columns of w: (fn(w^T))^T."""
    return np.ascontiguousarray(fn(np.ascontiguousarray(w.T)).T)


def rotate_model(model, seed: int | None = None, online_down="auto", heads: bool = True,
                 online_qk: bool = False):
    """The rotated model (see module docstring): R1 (randomized Hadamard with `seed`), R2 per head
    (heads=True) and the online R4 before down_proj (online_down: True, False, or "auto" = when
    a Hadamard of the intermediate size can be built; stories260K's 172 = 4 x 43 cannot) and,
    with online_qk, R3: queries and keys rotated per head after RoPE (run time; q.k unchanged, so
    only a quantized K cache sees it). Pure:
    `model` is never written; the result's `rotation` dict records what was done."""
    if getattr(model, "online_down", False) or getattr(model, "online_qk", False):
        raise ValueError("model is already rotated (online_down or online_qk is set)")
    cfg = model.config
    I = cfg.intermediate_size
    if online_down == "auto":
        online_down = constructible(I) or orthogonal_constructible(I)
    small = None  # R4's (m, m) factor when no Hadamard of the intermediate size exists
    if online_down and not constructible(I):
        if not orthogonal_constructible(I):
            raise ValueError(f"no Hadamard or orthogonal Kronecker factor of the intermediate size "
                             f"{I} (R4) can be built (sasq.hadamard)")
        small = had.orthogonal_factor(I, R4_SEED if seed is None else seed)
    for n, what in ((cfg.hidden_size, "hidden size (R1)"), (cfg.head_dim, "head_dim (R2)"),
                    (cfg.head_dim if online_qk else 1, "head_dim (R3)")):
        if (what.endswith("(R2)") and not heads) or constructible(n):
            continue
        raise ValueError(f"no Hadamard of the {what} {n} can be built (sasq.hadamard)")
    dt = model.dtype
    m = fold_norms(model, np.float64)  # rotate in float64, round once at the end
    signs = None if seed is None else had.random_signs(cfg.hidden_size, seed).astype(np.float64)
    hd = cfg.head_dim

    def read(w):  # W Q = (W D) H^T: readers of the residual stream
        return hadamard_rows(w, signs=signs)

    def write(w):  # Q^T W = H D W: writers into the residual stream (column transform)
        return _cols(w, lambda a: hadamard_rows(a, signs=signs))

    layers = []
    for lw in m.layers:
        new = {}
        for name in ("q_proj", "k_proj", "gate_proj", "up_proj"):
            new[name] = read(getattr(lw, name))
        v = read(lw.v_proj)
        o = write(lw.o_proj)
        if heads:
            # rows of each KV head's block of v_proj: W_vh -> H W_vh; o_proj columns of every
            # query head: W_oh -> W_oh H^T
            v = _cols(v, lambda a: hadamard_rows(a, head=hd))
            o = hadamard_rows(o, head=hd)
        new["v_proj"], new["o_proj"] = v, o
        d = write(lw.down_proj)
        new["down_proj"] = hadamard_rows(d, small=small) if online_down else d  # W H_I^T
        new = {k: np.ascontiguousarray(a, dtype=dt) for k, a in new.items()}
        layers.append(type(lw)(**new, input_layernorm=lw.input_layernorm.astype(dt),
                               post_attention_layernorm=lw.post_attention_layernorm.astype(dt)))
    out = m.copy_with(layers=layers, norm=m.norm.astype(dt),
                      embed_tokens=np.ascontiguousarray(read(m.embed_tokens), dtype=dt),
                      lm_head=np.ascontiguousarray(read(m.lm_head), dtype=dt),
                      online_down=bool(online_down), online_qk=bool(online_qk),
                      online_down_small=small)
    out.rotation = {"r1": "randomized Hadamard" if seed is not None else "Hadamard", "seed": seed,
                    "r2_per_head": heads, "r4_online_down": bool(online_down),
                    "r4": (None if not online_down else "Hadamard" if small is None else
                           f"random orthogonal {small.shape[0]} (x) Hadamard {I // small.shape[0]}"),
                    "r3_online_qk": bool(online_qk),
                    "untied": bool(cfg.tie_word_embeddings)}
    return out


def rotated(model, seed, online_qk: bool = False):
    """model rotated with R1 seed `seed` (and R3 when online_qk), or model itself when it already
    is, the same way."""
    rot = getattr(model, "rotation", None)
    if rot is None:
        return rotate_model(model, seed=seed, online_qk=online_qk)
    if rot.get("seed") != seed:
        raise ValueError(f"model was rotated with seed {rot.get('seed')}, the plan asks for {seed}")
    if bool(rot.get("r3_online_qk")) != bool(online_qk):
        raise ValueError(f"model was rotated {'with' if rot.get('r3_online_qk') else 'without'} "
                         f"R3 (online_qk), the plan asks {'for' if online_qk else 'against'} it")
    return model


def constructible(n: int) -> bool:
    try:
        had.hadamard_factors(n)
        return True
    except ValueError:
        return False


def orthogonal_constructible(n: int) -> bool:
    try:
        had.orthogonal_factor(n, 0)
        return True
    except ValueError:
        return False


def online_hadamard(d: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
    """The run-time R4: d (..., I) -> d H_I^T (C kernel for float32, float64 twin otherwise);
    `small`: the model's orthogonal factor when I has no Hadamard (LlamaModel.online_down_small)."""
    if d.dtype == np.float32:
        from sasq import ops
        return ops.hadamard(np.ascontiguousarray(d), small=small)
    return hadamard_rows(d, small=small).astype(d.dtype)


def online_hadamard_backward(g: np.ndarray, small: np.ndarray | None = None) -> np.ndarray:
    """Gradient of online_hadamard: g H_I (the transpose; Paley I factors are not symmetric)."""
    if g.dtype == np.float32:
        from sasq import ops
        return ops.hadamard(np.ascontiguousarray(g), small=small, transpose=True)
    return hadamard_rows(g, small=small, transpose=True).astype(g.dtype)
