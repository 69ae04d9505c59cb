"""GGUF import: block dequantization, container parsing, malformed files, name/q-k mapping, convert.

References: a per-block scalar dequantizer written here from the ggml block layouts (independent of
the vectorized NumPy in sasq/gguf_dequant.py), the `gguf` package's own dequantizer and writer, and
transformers' GGUF checkpoint loader for the q/k row order.
"""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from sasq.io import gguf_dequant as gd
from sasq.io.gguf import convert_gguf, hf_name, load_gguf_tensors, permute_qk, unpermute_qk
from sasq.io.gguf_reader import read_gguf

DEQUANT_RTOL = 1e-6   # float32 evaluation order may differ from the float64 scalar reference
DEQUANT_ATOL = 1e-6
LOGIT_ATOL = 1e-4     # sasq vs transformers, float32, tiny model

BLOCK_TYPES = [gd.Q4_0, gd.Q4_1, gd.Q5_0, gd.Q5_1, gd.Q8_0, gd.Q2_K, gd.Q3_K, gd.Q4_K, gd.Q5_K, gd.Q6_K]


# ---------------------------------------------------------------- scalar per-block references
def _h(b, off):
    return float(np.frombuffer(bytes(b[off:off + 2]), dtype="<f2")[0])


def ref_block(b, t):
    """One block's values, element by element, straight from the ggml layout description."""
    b = [int(v) for v in b]
    y = [0.0] * gd.TYPE_SIZES[t][0]
    if t in (gd.Q4_0, gd.Q4_1, gd.Q5_0, gd.Q5_1):
        d = _h(b, 0)
        m = _h(b, 2) if t in (gd.Q4_1, gd.Q5_1) else 0.0
        qh_at = {gd.Q5_0: 2, gd.Q5_1: 4}.get(t)
        qs_at = {gd.Q4_0: 2, gd.Q4_1: 4, gd.Q5_0: 6, gd.Q5_1: 8}[t]
        qh = struct.unpack_from("<I", bytes(b), qh_at)[0] if qh_at is not None else 0
        for j in range(16):
            lo, hi = b[qs_at + j] & 15, b[qs_at + j] >> 4
            if qh_at is not None:
                lo |= ((qh >> j) & 1) << 4
                hi |= ((qh >> (j + 16)) & 1) << 4
            off = {gd.Q4_0: -8, gd.Q5_0: -16}.get(t, 0)
            y[j], y[j + 16] = d * (lo + off) + m, d * (hi + off) + m
    elif t == gd.Q8_0:
        d = _h(b, 0)
        for j in range(32):
            y[j] = d * (b[2 + j] - 256 if b[2 + j] > 127 else b[2 + j])
    elif t == gd.Q2_K:
        sc, qs, d, dmin = b[0:16], b[16:80], _h(b, 80), _h(b, 82)
        for h in range(2):                      # halves of 128: 32 bytes of qs, 4 shifts of 2 bits
            for j in range(4):
                for l in range(32):
                    s = sc[8 * h + 2 * j + l // 16]
                    y[128 * h + 32 * j + l] = d * (s & 15) * ((qs[32 * h + l] >> (2 * j)) & 3) - dmin * (s >> 4)
    elif t == gd.Q3_K:
        hm, qs, sc, d = b[0:32], b[32:96], b[96:108], _h(b, 108)
        a = list(struct.unpack("<3I", bytes(sc)))  # ggml's aux-word unpacking of the 16 6-bit scales
        k1, k2, tmp = 0x03030303, 0x0F0F0F0F, a[2]
        words = [(a[0] & k2) | (((tmp >> 0) & k1) << 4), (a[1] & k2) | (((tmp >> 2) & k1) << 4),
                 ((a[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4), ((a[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4)]
        scales = [v - 32 for v in struct.unpack("<16B", struct.pack("<4I", *words))]
        for h in range(2):
            for j in range(4):
                m = 1 << (4 * h + j)
                for l in range(32):
                    q = ((qs[32 * h + l] >> (2 * j)) & 3) - (0 if hm[l] & m else 4)
                    y[128 * h + 32 * j + l] = d * scales[8 * h + 2 * j + l // 16] * q
    elif t in (gd.Q4_K, gd.Q5_K):
        d, dmin, sc = _h(b, 0), _h(b, 2), b[4:16]

        def scale_min(j):
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        qh = b[16:48] if t == gd.Q5_K else None
        qs = b[48:176] if t == gd.Q5_K else b[16:144]
        for c in range(4):                      # 64 elements per chunk, two sub-blocks of 32
            for half in range(2):
                s, mn = scale_min(2 * c + half)
                for l in range(32):
                    q = (qs[32 * c + l] >> (4 * half)) & 15
                    if qh is not None:
                        q += 16 * ((qh[l] >> (2 * c + half)) & 1)
                    y[64 * c + 32 * half + l] = d * s * q - dmin * mn
    elif t == gd.Q6_K:
        ql, qh, d = b[0:128], b[128:192], _h(b, 208)
        sc = [v - 256 if v > 127 else v for v in b[192:208]]
        for n in range(2):
            for l in range(32):
                g = l // 16
                q1 = ((ql[64 * n + l] & 15) | (((qh[32 * n + l] >> 0) & 3) << 4)) - 32
                q2 = ((ql[64 * n + l + 32] & 15) | (((qh[32 * n + l] >> 2) & 3) << 4)) - 32
                q3 = ((ql[64 * n + l] >> 4) | (((qh[32 * n + l] >> 4) & 3) << 4)) - 32
                q4 = ((ql[64 * n + l + 32] >> 4) | (((qh[32 * n + l] >> 6) & 3) << 4)) - 32
                base, s = 128 * n, sc[8 * n:]
                y[base + l] = d * s[g + 0] * q1
                y[base + l + 32] = d * s[g + 2] * q2
                y[base + l + 64] = d * s[g + 4] * q3
                y[base + l + 96] = d * s[g + 6] * q4
    return y


def random_blocks(t, n, seed=0):
    """n random blocks of type t with finite float16 scale fields (random bits elsewhere)."""
    rng = np.random.default_rng(seed + 100 * t)
    _, nb = gd.TYPE_SIZES[t]
    raw = rng.integers(0, 256, size=(n, nb), dtype=np.uint8)
    f16_at = {gd.Q4_0: [0], gd.Q4_1: [0, 2], gd.Q5_0: [0], gd.Q5_1: [0, 2], gd.Q8_0: [0],
              gd.Q2_K: [80, 82], gd.Q3_K: [108], gd.Q4_K: [0, 2], gd.Q5_K: [0, 2], gd.Q6_K: [208]}[t]
    for off in f16_at:
        vals = rng.uniform(-2, 2, size=n).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n, 2)
    return raw


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: gd.TYPE_NAMES[t])
def test_dequant_matches_scalar_reference(t):
    blocks = random_blocks(t, 7)
    ne, _ = gd.TYPE_SIZES[t]
    got = gd.dequantize(blocks.reshape(-1), t, (7, ne))
    want = np.array([ref_block(b, t) for b in blocks])
    np.testing.assert_allclose(got, want, rtol=DEQUANT_RTOL, atol=DEQUANT_ATOL)
    assert got.dtype == np.float32


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: gd.TYPE_NAMES[t])
def test_dequant_matches_gguf_package(t):
    gguf = pytest.importorskip("gguf")
    blocks = random_blocks(t, 33, seed=1)   # odd count, several rows
    ne, _ = gd.TYPE_SIZES[t]
    want = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(t)).reshape(33, ne)
    got = gd.dequantize(blocks.reshape(-1), t, (33, ne))
    np.testing.assert_allclose(got, want, rtol=DEQUANT_RTOL, atol=DEQUANT_ATOL)


def test_dequant_chunking_is_seamless(monkeypatch):
    blocks = random_blocks(gd.Q4_1, 10, seed=2)
    full = gd.dequantize(blocks.reshape(-1), gd.Q4_1, (10, 32))
    monkeypatch.setattr(gd, "CHUNK_BLOCKS", 3)
    np.testing.assert_array_equal(gd.dequantize(blocks.reshape(-1), gd.Q4_1, (10, 32)), full)


def test_float_types():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(gd.dequantize(x.view(np.uint8).reshape(-1), gd.F32, (3, 5)), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(gd.dequantize(h.view(np.uint8).reshape(-1), gd.F16, (3, 5)),
                                  h.astype(np.float32))
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)           # truncated bfloat16
    want = (bf.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(gd.dequantize(bf.view(np.uint8).reshape(-1), gd.BF16, (3, 5)), want)


def test_unsupported_type_is_named():
    with pytest.raises(ValueError, match="Q8_K"):
        gd.dequantize(np.zeros(292, np.uint8), 15, (1, 256))


# ---------------------------------------------------------------- a GGUF writer with lies on demand
_VT = {"u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9, "u64": 10}


def _s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _val(kind, v):
    if kind == "str":
        return _s(v)
    if kind == "u32":
        return struct.pack("<I", v)
    if kind == "i32":
        return struct.pack("<i", v)
    if kind == "u64":
        return struct.pack("<Q", v)
    if kind == "f32":
        return struct.pack("<f", v)
    if kind == "bool":
        return struct.pack("<?", v)
    if kind == "arr_str":
        return struct.pack("<IQ", 8, len(v)) + b"".join(_s(x) for x in v)
    if kind == "arr_i32":
        return struct.pack("<IQ", 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise AssertionError(kind)


def gguf_bytes(kv, tensors, version=3, alignment=32, n_tensors=None, n_kv=None, magic=b"GGUF",
               offsets=None, dims=None):
    """GGUF bytes. kv: [(key, kind, value)]; tensors: [(name, ggml_type, np shape, raw bytes)].
    offsets/dims/n_tensors/n_kv override what the header says (to forge lying files)."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kv) if n_kv is None else n_kv)
    for key, kind, v in kv:
        vt = _VT["arr"] if kind.startswith("arr") else _VT[kind]
        head += _s(key) + struct.pack("<I", vt) + _val(kind, v)
    data, offs = b"", []
    for name, t, shape, raw in tensors:
        data += b"\0" * (-len(data) % alignment)
        offs.append(len(data))
        data += raw
    for i, (name, t, shape, raw) in enumerate(tensors):
        ds = list(reversed(shape)) if dims is None or dims[i] is None else dims[i]
        off = offs[i] if offsets is None or offsets[i] is None else offsets[i]
        head += _s(name) + struct.pack("<I", len(ds)) + struct.pack(f"<{len(ds)}Q", *ds) \
            + struct.pack("<IQ", t, off)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def _write(tmp_path, data, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


SIZES = {**gd.TYPE_SIZES, **gd.KNOWN_UNSUPPORTED_SIZES}


def test_reader_parses_metadata_and_tensors(tmp_path):
    q = random_blocks(gd.Q8_0, 4).reshape(-1).tobytes()
    kv = [("general.architecture", "str", "llama"), ("a.u32", "u32", 7), ("a.f32", "f32", 0.5),
          ("a.flag", "bool", True), ("a.list", "arr_str", ["x", "yz", ""]), ("a.ints", "arr_i32", [1, -2])]
    p = _write(tmp_path, gguf_bytes(kv, [("w", gd.F32, (2, 3), _f32(np.arange(6))), ("q", gd.Q8_0, (2, 64), q)]))
    f = read_gguf(p, SIZES)
    assert f.metadata["a.u32"] == 7 and f.metadata["a.f32"] == 0.5 and f.metadata["a.flag"] is True
    assert f.metadata["a.list"] == ["x", "yz", ""] and list(f.metadata["a.ints"]) == [1, -2]
    assert f.tensors["w"].shape == (2, 3) and f.tensors["q"].shape == (2, 64)
    np.testing.assert_array_equal(gd.dequantize(f.tensor_bytes("w"), gd.F32, (2, 3)), np.arange(6).reshape(2, 3))
    assert f.tensor_bytes("q").tobytes() == q


def test_reader_agrees_with_gguf_writer(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(4)
    p = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint32("some.count", 3)
    w.add_array("some.names", ["a", "b"])
    arrays = {"f32": rng.standard_normal((3, 32)).astype(np.float32),
              "f16": rng.standard_normal((2, 64)).astype(np.float16)}
    for k, a in arrays.items():
        w.add_tensor(k, a)
    q4 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("q41", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(p, SIZES)
    r = gguf.GGUFReader(str(p))
    assert f.metadata["some.count"] == 3 and f.metadata["some.names"] == ["a", "b"]
    for t in r.tensors:
        info = f.tensors[t.name]
        got = gd.dequantize(f.tensor_bytes(t.name), info.ggml_type, info.shape)
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        np.testing.assert_array_equal(got, want.reshape(info.shape))


# ---------------------------------------------------------------- malformed files: one-line errors
def _valid_parts():
    kv = [("general.architecture", "str", "llama"), ("x.list", "arr_str", ["a", "b"])]
    tensors = [("w", gd.F32, (2, 32), _f32(np.ones((2, 32)))),
               ("q", gd.Q4_1, (1, 64), random_blocks(gd.Q4_1, 2).tobytes())]
    return kv, tensors


def _check_error(tmp_path, data, match):
    p = _write(tmp_path, data, "bad.gguf")
    with pytest.raises(ValueError, match=match) as e:
        read_gguf(p, SIZES)
    msg = str(e.value)
    assert "bad.gguf" in msg and "\n" not in msg


def test_valid_forgery_baseline(tmp_path):
    kv, tensors = _valid_parts()
    f = read_gguf(_write(tmp_path, gguf_bytes(kv, tensors)), SIZES)
    assert set(f.tensors) == {"w", "q"}


@pytest.mark.parametrize("case, match", [
    ("magic", "bad magic"),
    ("version1", "unsupported version 1"),
    ("version9", "unsupported version 9"),
    ("huge_kv", "more than"),
    ("huge_tensors", "more than"),
    ("truncated_header", "truncated"),
    ("truncated_data", "past the end"),
    ("offset_past_end", "past the end"),
    ("misaligned", "alignment"),
    ("unknown_type", "unknown or unsupported ggml type 99"),
    ("bad_block", "multiple of the block size"),
    ("n_dims0", "dims"),
    ("n_dims5", "dims"),
    ("zero_dim", "implausible dims"),
    ("duplicate", "duplicate tensor"),
    ("lying_string", "truncated or lying"),
    ("lying_array", "truncated or lying"),
    ("overlap", "overlaps"),
])
def test_malformed(tmp_path, case, match):
    kv, tensors = _valid_parts()
    good = gguf_bytes(kv, tensors)
    data = {
        "magic": lambda: gguf_bytes(kv, tensors, magic=b"GGML"),
        "version1": lambda: gguf_bytes(kv, tensors, version=1),
        "version9": lambda: gguf_bytes(kv, tensors, version=9),
        "huge_kv": lambda: gguf_bytes(kv, tensors, n_kv=2 ** 60),
        "huge_tensors": lambda: gguf_bytes(kv, tensors, n_tensors=2 ** 40),
        "truncated_header": lambda: good[:60],
        "truncated_data": lambda: good[:-5],
        "offset_past_end": lambda: gguf_bytes(kv, tensors, offsets=[None, 1 << 20]),
        "misaligned": lambda: gguf_bytes(kv, tensors, offsets=[None, 264]),
        "unknown_type": lambda: gguf_bytes(kv, [("w", 99, (2, 32), _f32(np.ones((2, 32))))]),
        "bad_block": lambda: gguf_bytes(kv, tensors, dims=[None, [48, 1]]),
        "n_dims0": lambda: gguf_bytes(kv, tensors, dims=[[], None]),
        "n_dims5": lambda: gguf_bytes(kv, tensors, dims=[[32, 2, 1, 1, 1], None]),
        "zero_dim": lambda: gguf_bytes(kv, tensors, dims=[[32, 0], None]),
        "duplicate": lambda: gguf_bytes(kv, [tensors[0], tensors[0]]),
        "lying_string": lambda: good.replace(struct.pack("<Q", 20) + b"general.architecture",
                                             struct.pack("<Q", 2 ** 50) + b"general.architecture"),
        "overlap": lambda: gguf_bytes(kv, tensors, offsets=[None, 0]),
        "lying_array": lambda: good.replace(struct.pack("<IQ", 8, 2), struct.pack("<IQ", 8, 2 ** 55)),
    }[case]()
    assert data != good
    _check_error(tmp_path, data, match)


def test_missing_file_and_short_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf", SIZES)
    _check_error(tmp_path, b"GGUF\3\0\0\0", "shorter than a GGUF header")


# ---------------------------------------------------------------- a tiny LLaMA in GGUF form
CFG = dict(vocab=40, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)  # head_dim 8: permute != its inverse
TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
         ["Ġ", "Ġa", "ab", "abc", "Ġab", "ba", "cd", "Ġc", "dc", "Ġb", "Ġd"]
MERGES = ["Ġ a", "a b", "ab c", "Ġ ab", "b a", "c d", "Ġ c", "d c", "Ġ b", "Ġ d"]


def hf_tiny_weights(seed=5, tied=True):
    rng = np.random.default_rng(seed)
    C, I, V, H, KV = CFG["hidden"], CFG["inter"], CFG["vocab"], CFG["heads"], CFG["kv_heads"]
    hd = C // H
    w = {"model.embed_tokens.weight": rng.standard_normal((V, C)), "model.norm.weight": 1 + 0.1 * rng.standard_normal(C)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((V, C))
    for i in range(CFG["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(C)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(C)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((H * hd, C)) / 4
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV * hd, C)) / 4
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV * hd, C)) / 4
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((C, H * hd)) / 4
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((I, C)) / 4
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((I, C)) / 4
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((C, I)) / 4
    return {k: v.astype(np.float32) for k, v in w.items()}


_TO_GGUF = {v: k for k, v in [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"),
                              ("output", "lm_head")]}


def gguf_name(hf):
    if hf.startswith("model.layers."):
        i, rest = hf[len("model.layers."):].split(".", 1)
        inv = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
        return f"blk.{i}.{inv[rest[:-len('.weight')]]}.weight"
    return _TO_GGUF[hf[:-len(".weight")]] + ".weight"


def tiny_gguf(path, weights, kv_extra=(), quant=None, arch="llama"):
    """Write weights (HF names/order) as llama.cpp would: GGUF names, q/k rows permuted."""
    H, KV = CFG["heads"], CFG["kv_heads"]
    tensors = []
    for hf, a in weights.items():
        if hf.endswith("q_proj.weight"):
            a = permute_qk(a, H)
        elif hf.endswith("k_proj.weight"):
            a = permute_qk(a, KV)
        if quant is not None and a.ndim == 2 and a.shape[1] % 32 == 0:
            t, raw = quant(a)
        else:
            t, raw = gd.F32, _f32(a)
        tensors.append((gguf_name(hf), t, a.shape, raw))
    kv = [("general.architecture", "str", arch), ("llama.block_count", "u32", CFG["layers"]),
          ("llama.context_length", "u32", 64), ("llama.embedding_length", "u32", CFG["hidden"]),
          ("llama.feed_forward_length", "u32", CFG["inter"]), ("llama.attention.head_count", "u32", CFG["heads"]),
          ("llama.attention.head_count_kv", "u32", CFG["kv_heads"]), ("llama.rope.freq_base", "f32", 10000.0),
          ("llama.attention.layer_norm_rms_epsilon", "f32", 1e-5), ("llama.vocab_size", "u32", CFG["vocab"]),
          ("tokenizer.ggml.model", "str", "gpt2"), ("tokenizer.ggml.pre", "str", "smollm"),
          ("tokenizer.ggml.tokens", "arr_str", TOKENS),
          ("tokenizer.ggml.token_type", "arr_i32", [3, 3, 3] + [1] * (len(TOKENS) - 3)),
          ("tokenizer.ggml.merges", "arr_str", MERGES), ("tokenizer.ggml.bos_token_id", "u32", 1),
          ("tokenizer.ggml.eos_token_id", "u32", 2), ("tokenizer.ggml.add_bos_token", "bool", True),
          *kv_extra]
    path.write_bytes(gguf_bytes(kv, tensors))
    return path


def test_tiny_model_weights_and_config(tmp_path):
    w = hf_tiny_weights()
    cfg, tensors, meta = load_gguf_tensors(tiny_gguf(tmp_path / "t.gguf", w))
    assert set(tensors) == set(w)
    for k in w:
        np.testing.assert_array_equal(tensors[k], w[k], err_msg=k)
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 8
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["bos_token_id"] == 1


def test_qk_permutation_matches_transformers(tmp_path):
    """transformers' GGUF loader un-permutes q/k on its own; our tensors must equal its tensors."""
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    tg = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers import LlamaConfig, LlamaForCausalLM
    w = hf_tiny_weights(seed=6, tied=False)
    p = tiny_gguf(tmp_path / "t.gguf", w)
    cfg, tensors, _ = load_gguf_tensors(p)
    hfc = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    out = tg.load_gguf_checkpoint(str(p), return_tensors=True, model_to_load=LlamaForCausalLM(hfc))
    theirs = {k: np.asarray(v) for k, v in out["tensors"].items()}
    assert set(theirs) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(tensors[k], theirs[k], err_msg=k)


def test_unpermute_inverts_permute():
    a = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(a, 6), 6), a)
    assert not np.array_equal(permute_qk(a, 6), a)


def test_quantized_tiny_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = hf_tiny_weights(seed=7)
    qt = gguf.GGMLQuantizationType.Q4_1

    def quant(a):
        return gd.Q4_1, gguf.quants.quantize(a, qt).tobytes()
    cfg, tensors, _ = load_gguf_tensors(tiny_gguf(tmp_path / "q.gguf", w, quant=quant))
    for k, a in w.items():
        if a.ndim == 2 and a.shape[1] % 32 == 0:
            step = (a.max(1) - a.min(1))[:, None] / 15   # Q4_1 error is at most half a step per block
            assert np.all(np.abs(tensors[k] - a) <= step / 2 + 1e-3), k
        else:
            np.testing.assert_array_equal(tensors[k], a)


def test_model_errors(tmp_path):
    w = hf_tiny_weights()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf_tensors(tiny_gguf(tmp_path / "a.gguf", w, arch="gpt2"))
    w2 = dict(w)
    del w2["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_gguf_tensors(tiny_gguf(tmp_path / "m.gguf", w2))
    w3 = dict(w)
    w3["model.layers.0.mlp.up_proj.weight"] = w3["model.layers.0.mlp.up_proj.weight"][:, :8]
    with pytest.raises(ValueError, match="shape"):
        load_gguf_tensors(tiny_gguf(tmp_path / "s.gguf", w3))
    with pytest.raises(ValueError, match="no LLaMA"):
        hf_name("blk.0.attn_qkv.weight")
    p = tiny_gguf(tmp_path / "r.gguf", w, kv_extra=[("llama.rope.dimension_count", "u32", 2)])
    with pytest.raises(ValueError, match="partial RoPE"):
        load_gguf_tensors(p)


def test_tokenizer_from_metadata(tmp_path):
    pytest.importorskip("tokenizers")
    from sasq.io.gguf import load_gguf
    _, _, tok = load_gguf(tiny_gguf(tmp_path / "t.gguf", hf_tiny_weights()))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    ids = tok.encode("abc ab cd", add_bos=False)
    # merges apply by rank: "Ġ a" (0) beats "a b" (1) in " ab"; "c d" (5) beats "Ġ c" (6) in " cd"
    assert [TOKENS[i] for i in ids] == ["abc", "Ġa", "b", "Ġ", "cd"]
    assert tok.encode("ab")[0] == 1
    assert tok.decode(ids) == "abc ab cd"
    assert tok.encode("a</s>", add_bos=False) == [TOKENS.index("a"), 2]   # control tokens stay whole


def test_convert_and_load_agree(tmp_path):
    """convert-gguf's directory: sasq.load(dir) == sasq.load(gguf), and transformers agrees."""
    import sasq
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    p = tiny_gguf(tmp_path / "t.gguf", hf_tiny_weights(seed=8))
    out = tmp_path / "hf"
    rc = subprocess.run([sys.executable, "-m", "sasq", "convert-gguf", str(p), str(out), "-q"],
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    ids = np.array([[3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 4]])
    a, b = sasq.load(p), sasq.load(out)
    la, lb = a.forward(ids), b.forward(ids)
    np.testing.assert_array_equal(la, lb)
    assert b.tokenizer is not None and b.tokenizer.encode("abc ab") == a.tokenizer.encode("abc ab")
    ref = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        lt = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(la, lt, atol=LOGIT_ATOL, rtol=0)
    tt = transformers.AutoTokenizer.from_pretrained(out)
    assert tt("abc ab cd", add_special_tokens=False)["input_ids"] == a.tokenizer.encode("abc ab cd", add_bos=False)
    assert tt("abc ab cd")["input_ids"] == a.tokenizer.encode("abc ab cd") == b.tokenizer.encode("abc ab cd")
    assert a.tokenizer.encode("abc")[:2] == [1, TOKENS.index("abc")]     # add_bos from the metadata


def test_sentencepiece_vocab_loads_without_tokenizer(tmp_path):
    from sasq.io.gguf import load_gguf
    p = tiny_gguf(tmp_path / "t.gguf", hf_tiny_weights(), kv_extra=[])
    data = p.read_bytes().replace(_s("tokenizer.ggml.model") + struct.pack("<I", 8) + _s("gpt2"),
                                  _s("tokenizer.ggml.model") + struct.pack("<I", 8) + _s("llam"))
    p.write_bytes(data)
    with pytest.warns(RuntimeWarning, match="'llam' is not supported"):
        cfg, tensors, tok = load_gguf(p)
    assert tok is None and len(tensors) == 2 + 9 * CFG["layers"]  # tied: no lm_head


def test_unknown_pre_tokenizer_loads_without_tokenizer(tmp_path):
    from sasq.io.gguf import load_gguf
    p = tiny_gguf(tmp_path / "t.gguf", hf_tiny_weights())
    p.write_bytes(p.read_bytes().replace(_s("smollm"), _s("qwen99")))
    with pytest.warns(RuntimeWarning, match="'qwen99' is not supported"):
        assert load_gguf(p)[2] is None


def test_convert_cli_bad_file(tmp_path):
    p = _write(tmp_path, b"NOTAGGUF" + b"\0" * 40, "junk.gguf")
    r = subprocess.run([sys.executable, "-m", "sasq", "convert-gguf", str(p), str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "junk.gguf" in lines[0] and "bad magic" in lines[0]


def test_fuzzed_files_fail_cleanly(tmp_path):
    """Random byte corruption or truncation: the reader either parses or raises ValueError."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    kv, tensors = _valid_parts()
    good = gguf_bytes(kv, tensors)
    p = tmp_path / "fuzz.gguf"

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(cut=st.integers(8, len(good)),
                      flips=st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=4))
    def check(cut, flips):
        data = bytearray(good)
        for i, v in flips:
            data[i] = v
        p.write_bytes(bytes(data[:cut]))
        try:
            f = read_gguf(p, SIZES)
            for name, t in f.tensors.items():
                if t.ggml_type in gd.TYPE_NAMES:
                    gd.dequantize(f.tensor_bytes(name), t.ggml_type, t.shape)
        except ValueError as e:
            assert "fuzz.gguf" in str(e) or "ggml type" in str(e)
    check()


@pytest.mark.smollm2
def test_reader_agrees_with_gguf_package_on_smollm2():
    """Our reader on a real llama.cpp file (SmolLM2-135M Q4_1, cached by benchmarks/assets.py)
    against the `gguf` package's GGUFReader: every metadata value, every tensor's type, shape
    and data offset, and the dequantized values of one tensor of each type (see the measurement
    in sasq/io/gguf_reader.py for why we keep our own reader)."""
    gguf = pytest.importorskip("gguf")
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "sasq_bench_assets", Path(__file__).resolve().parents[1] / "benchmarks" / "assets.py")
    assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets)
    path, _ = assets.smollm2_paths()
    if not assets.smollm2_available():
        pytest.skip(f"SmolLM2 not cached at {path.parent}; run `python benchmarks/assets.py smollm2`")
    ours = read_gguf(path, SIZES)
    theirs = gguf.GGUFReader(str(path))
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
    assert keys == list(ours.metadata)
    for k in keys:
        want, got = theirs.fields[k].contents(), ours.metadata[k]
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), k
        else:
            assert got == want, k
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    seen = set()
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type) and info.offset == t.data_offset
        assert info.shape == tuple(reversed(t.shape.tolist())) and info.nbytes == t.n_bytes
        if info.ggml_type not in seen:
            seen.add(info.ggml_type)
            got = gd.dequantize(ours.tensor_bytes(t.name), info.ggml_type, info.shape)
            np.testing.assert_array_equal(got, gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape))
    assert seen == {gd.F32, gd.Q4_1, gd.Q8_0}
