"""Dequantization of ggml tensor types to float32, vectorized NumPy over whole blocks.

Block layouts (ggml-common.h; all little-endian, d/m/dmin are float16):
    Q4_0  32 elems, 18 B: d, qs[16]          x[j] = d*((qs[j]&15)-8), x[j+16] = d*((qs[j]>>4)-8)
    Q4_1  32 elems, 20 B: d, m, qs[16]       x = d*q + m (same nibble order, no offset)
    Q5_0  32 elems, 22 B: d, qh u32, qs[16]  5th bit of x[j] is bit j of qh; q - 16
    Q5_1  32 elems, 24 B: d, m, qh, qs[16]   x = d*q + m
    Q8_0  32 elems, 34 B: d, qs[32] int8     x = d*q
    Q2_K 256 elems, 84 B: scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin
    Q3_K 256 elems, 110 B: hmask[32], qs[64] (low 2 bits), scales[12] (16 x 6-bit, minus 32), d
    Q4_K 256 elems, 144 B: d, dmin, scales[12] (8 x (6-bit scale, 6-bit min)), qs[128]
    Q5_K 256 elems, 176 B: d, dmin, scales[12], qh[32], qs[128]
    Q6_K 256 elems, 210 B: ql[128], qh[64], scales[16] int8, d
The scalar per-block references in tests/test_gguf.py are written from the same description.
"""
from __future__ import annotations

import math

import numpy as np

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30

TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0",
              Q5_1: "Q5_1", Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}

# ggml_type -> (elements per block, bytes per block)
TYPE_SIZES = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20),
              Q5_0: (32, 22), Q5_1: (32, 24), Q8_0: (32, 34), Q2_K: (256, 84), Q3_K: (256, 110),
              Q4_K: (256, 144), Q5_K: (256, 176),
              Q6_K: (256, 210)}

# Sizes of types we list but cannot decode, so the reader can still bounds-check their data.
KNOWN_UNSUPPORTED_SIZES = {9: (32, 36), 15: (256, 292),
                           24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8)}
KNOWN_UNSUPPORTED_NAMES = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16",
                           26: "I32", 27: "I64", 28: "F64"}


def _f16(blocks, start):
    """(n, 1) float32 from the float16 at byte `start` of each block row."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
    """(n, 16) packed bytes -> (n, 32) values: low nibbles are elements 0..15, high are 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits32(qh_bytes):
    """(n, 4) bytes of a little-endian u32 -> (n, 32) bit j of the word, as uint8 0/1."""
    return np.unpackbits(qh_bytes, axis=1, bitorder="little")


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]).astype(np.float32) - 8.0)


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).astype(np.float32) + _f16(b, 2)


def _q5_0(b):
    q = _nibbles(b[:, 6:22]) | (_high_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.astype(np.float32) - 16.0)


def _q5_1(b):
    q = _nibbles(b[:, 8:24]) | (_high_bits32(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].view(np.int8).astype(np.float32)


def _crumbs(qs):
    """(n, 64) bytes of 2-bit values -> (n, 2, 4, 32): [half h, shift j, lane l] = (qs[32h+l] >> 2j) & 3,
    the value of element 128h + 32j + l in Q2_K/Q3_K."""
    q = qs.reshape(len(qs), 2, 1, 32)
    return (q >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3


def _q2_k(b):
    n = len(b)
    sc = b[:, 0:16].reshape(n, 2, 4, 2)                     # [half, shift, lane-group of 16]
    d, dmin = _f16(b, 80)[:, :, None, None], _f16(b, 82)[:, :, None, None]
    q = _crumbs(b[:, 16:80]).reshape(n, 2, 4, 2, 16).astype(np.float32)
    y = (d * (sc & 0x0F))[..., None] * q - (dmin * (sc >> 4))[..., None]
    return y.reshape(n, 256)


def _q3_k_scales(sc):
    """(n, 12) packed -> (n, 16) signed scales: low 4 bits of scale i from sc[i % 8] (nibble i // 8),
    top 2 bits from sc[8 + i % 4] (bits 2*(i // 4)); stored with a +32 offset."""
    i = np.arange(16)
    lo = (sc[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    hi = (sc[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    return (lo | (hi << 4)).astype(np.float32) - 32.0


def _q3_k(b):
    n = len(b)
    hm = b[:, 0:32]                                         # bit 4h+j of hm[l]: high bit of element 128h+32j+l
    hbit = (hm[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1   # (n, 8, 32)
    q = _crumbs(b[:, 32:96]).astype(np.float32) - 4.0 * (1 - hbit.reshape(n, 2, 4, 32))
    s = _q3_k_scales(b[:, 96:108]).reshape(n, 2, 4, 2)
    d = _f16(b, 108)[:, :, None, None]
    y = q.reshape(n, 2, 4, 2, 16) * (d * s)[..., None]
    return y.reshape(n, 256)


def _k_scales_mins(sc):
    """(n, 12) packed K-quant scales -> (n, 8) scales and (n, 8) mins, 6 bits each.

    Sub-blocks 0..3: scale = sc[j] & 63, min = sc[j+4] & 63. Sub-blocks 4..7: the low 4 bits come
    from sc[j+4] (low nibble: scale, high nibble: min), the top 2 bits from sc[j-4] / sc[j] >> 6.
    """
    lo_s, lo_m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    s = np.concatenate([lo_s & 63, (hi & 0x0F) | ((lo_s >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return s.astype(np.float32), m.astype(np.float32)


def _q4_k(b):
    n = len(b)
    d, dmin = _f16(b, 0), _f16(b, 2)
    s, m = _k_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)                     # 4 chunks of 64 elements
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # sub-block 2c: low, 2c+1: high
    y = (d * s)[:, :, None] * q.astype(np.float32) - (dmin * m)[:, :, None]
    return y.reshape(n, 256)


def _q5_k(b):
    n = len(b)
    d, dmin = _f16(b, 0), _f16(b, 2)
    s, m = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]                                        # (n, 32): bit k of qh[l] -> sub-block k
    qs = b[:, 48:176].reshape(n, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    hbits = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    q = q | (hbits << 4)
    y = (d * s)[:, :, None] * q.astype(np.float32) - (dmin * m)[:, :, None]
    return y.reshape(n, 256)


def _q6_k(b):
    n = len(b)
    ql = b[:, 0:128].reshape(n, 2, 64)                      # two halves of 128 elements
    qh = b[:, 128:192].reshape(n, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
    d = _f16(b, 208)
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4],
                  axis=2)                                   # (n, 2, 4, 32): quarter k of each half
    hi = np.stack([(qh >> (2 * k)) & 3 for k in range(4)], axis=2)
    q = (lo | (hi << 4)).astype(np.float32) - 32.0          # (n, 2, 4, 32)
    # 16-element groups: quarter k, lanes 0..15 use scale 2k, lanes 16..31 scale 2k+1
    scale = sc.reshape(n, 2, 4, 2)                          # (half, quarter, lane-group)
    y = q.reshape(n, 2, 4, 2, 16) * (d[:, :, None, None] * scale)[..., None]
    return y.reshape(n, 256)


_BLOCK_FNS = {Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0,
              Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}

CHUNK_BLOCKS = 1 << 16  # bounds the temporaries of one step to a few tens of MB


def dequantize(raw: np.ndarray, ggml_type: int, shape) -> np.ndarray:
    """Raw tensor bytes (uint8, exactly the tensor's size) -> float32 array of `shape`; a size
    that does not match is a ValueError (shape products in exact Python ints)."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    size = TYPE_SIZES.get(ggml_type)
    if size is not None:
        block_elems, block_bytes = size
        if any(d < 0 for d in shape) or n % block_elems or raw.size != n // block_elems * block_bytes:
            raise ValueError(f"{raw.size} bytes of ggml type {TYPE_NAMES[ggml_type]} cannot hold shape {shape}")
    if ggml_type == F32:
        return raw.view("<f4").astype(np.float32).reshape(shape)
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if ggml_type == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    fn = _BLOCK_FNS.get(ggml_type)
    if fn is None:
        name = KNOWN_UNSUPPORTED_NAMES.get(ggml_type, str(ggml_type))
        raise ValueError(f"ggml type {name} cannot be dequantized (supported: "
                         f"{', '.join(TYPE_NAMES.values())})")
    block_elems, block_bytes = TYPE_SIZES[ggml_type]
    blocks = np.ascontiguousarray(raw).reshape(-1, block_bytes)
    out = np.empty((len(blocks), block_elems), dtype=np.float32)
    for i in range(0, len(blocks), CHUNK_BLOCKS):
        out[i:i + CHUNK_BLOCKS] = fn(np.asarray(blocks[i:i + CHUNK_BLOCKS]))
    assert out.size == n
    return out.reshape(shape)
