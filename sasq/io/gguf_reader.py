"""GGUF container reader: header, metadata, tensor infos, data offsets (no dequantization here).

Layout (little-endian), versions 2 and 3:
    magic b"GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type: u32, value)
    n_tensors x (name: string, n_dims: u32, dims: u64[n_dims], ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32) | tensor data (each offset relative to here, aligned)
A string is a u64 byte length + UTF-8 bytes; an array is elem_type u32 + count u64 + elements.
dims are listed innermost first (ne[0] = row length), so the NumPy shape is the reverse.

Every size, count and offset read from the file is checked against the file's length before it is
used, so a lying or truncated file gives a one-line ValueError naming the file (and tensor), never a
MemoryError or a silently short array. Arrays of arrays nest at most MAX_ARRAY_DEPTH levels (no
RecursionError), and general.alignment must be a UINT32 (as llama.cpp and the `gguf` package
require; a BOOL true would otherwise read as alignment 1).

Why our own reader and not the `gguf` package's GGUFReader (llama.cpp's, 0.19.0), measured on
SmolLM2-135M-Instruct Q4_1 (98 MB, 272 tensors, 49,152-token vocabulary), best of 3 on 2 busy
cores: header + metadata + tensor table 0.10 s here vs 2.08 s there (it builds one NumPy array
per string of the vocabulary); dequantizing every tensor 0.57 s (gguf_dequant.py) vs 0.68 s
(gguf.quants), bit-identical; sasq.load of the file 0.81 s end to end. And it validates less: on
forged files it raises RecursionError (3,000 nested arrays), IndexError (a tensor or kv count of
2**40), KeyError (a duplicate key), or NumPy's reshape/dtype ValueErrors for truncated files,
lying array counts and offsets past the end, none naming the file. gguf.quants stays the test
oracle for the dequantizer (tests/test_gguf.py) and the package's reader checks ours on SmolLM2.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays: real files use 1 level; Python recursion stays shallow

# metadata value types -> (struct format, byte size) for the fixed-size scalars
_SCALAR = {
    0: ("<B", 1),   # UINT8
    1: ("<b", 1),   # INT8
    2: ("<H", 2),   # UINT16
    3: ("<h", 2),   # INT16
    4: ("<I", 4),   # UINT32
    5: ("<i", 4),   # INT32
    6: ("<f", 4),   # FLOAT32
    7: ("<?", 1),   # BOOL
    10: ("<Q", 8),  # UINT64
    11: ("<q", 8),  # INT64
    12: ("<d", 8),  # FLOAT64
}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_UINT32 = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple          # NumPy order (outermost first), i.e. the GGUF dims reversed
    ggml_type: int
    offset: int           # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict        # key -> Python value (arrays of numbers as np.ndarray, of strings as list)
    tensors: dict         # name -> TensorInfo, in file order
    alignment: int
    data_start: int
    mm: np.ndarray        # the whole file, uint8 memmap

    def tensor_bytes(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return self.mm[t.offset:t.offset + t.nbytes]


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; errors name the file."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what):
        raise ValueError(f"{self.path}: malformed GGUF: {what}")

    def need(self, n, what):
        if n < 0 or self.pos + n > self.size:
            self.fail(f"{what} needs {n} bytes at offset {self.pos} but the file has {self.size} "
                      f"(truncated or lying size)")

    def scalar(self, vtype, what):
        fmt, n = _SCALAR[vtype]
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what):
        return self.scalar(4, what)

    def u64(self, what):
        return self.scalar(10, what)

    def string(self, what):
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype, what, depth=0):
        if vtype in _SCALAR:
            return self.scalar(vtype, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
            etype = self.u32(f"element type of {what}")
            count = self.u64(f"element count of {what}")
            if etype in _SCALAR:
                n = _SCALAR[etype][1]
                self.need(count * n, f"{count} elements of {what}")
                arr = np.frombuffer(self.buf, dtype=_NP_SCALAR[etype], count=count, offset=self.pos).copy()
                self.pos += count * n
                return arr.astype(bool) if etype == 7 else arr
            if etype == _STRING:
                # each string takes at least its 8-byte length: reject absurd counts before looping
                self.need(count * 8, f"{count} strings of {what}")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if etype == _ARRAY:
                self.need(count * 12, f"{count} sub-arrays of {what}")
                return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(count)]
            self.fail(f"{what} has unknown array element type {etype}")
        self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path, type_sizes) -> GGUFFile:
    """Parse a GGUF file's header and tensor table; tensor data stays on a memmap.

    type_sizes: ggml_type -> (block_elems, block_bytes) of the types the caller can decode; a tensor
    of any other type is still listed (its nbytes computed if the size is known) but the caller must
    refuse to decode it. Unknown types raise here, since their byte size cannot be checked.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: malformed GGUF: file is {size} bytes, shorter than a GGUF header")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    magic = bytes(mm[:4])
    if magic != GGUF_MAGIC:
        cur.fail(f"bad magic {magic!r} (expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        cur.fail(f"unsupported version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # every kv takes >= 8 (key length) + 4 (type) + 1 bytes, every tensor info >= 8 + 4 + 4 + 8
    if n_kv * 13 > size or n_tensors * 24 > size:
        cur.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, "
                 f"more than a {size}-byte file can hold")

    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata {key!r}")
        if key in metadata:
            cur.fail(f"duplicate metadata key {key!r}")
        if key == "general.alignment" and vtype != _UINT32:
            cur.fail(f"general.alignment has value type {vtype}, not UINT32 ({_UINT32})")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dims (1..{MAX_DIMS} allowed)")
        dims = [cur.u64(f"dim {d} of tensor {name!r}") for d in range(n_dims)]
        gtype = cur.u32(f"type of tensor {name!r}")
        offset = cur.u64(f"offset of tensor {name!r}")
        infos.append((name, dims, gtype, offset))

    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, gtype, offset in infos:
        def bad(msg, name=name):
            raise ValueError(f"{path}: malformed GGUF: tensor {name!r}: {msg}")
        if name in tensors:
            bad("duplicate tensor name")
        if gtype not in type_sizes:
            bad(f"unknown or unsupported ggml type {gtype}")
        if any(d == 0 for d in dims) or any(d > size * 256 for d in dims):
            bad(f"implausible dims {dims}")
        block_elems, block_bytes = type_sizes[gtype]
        if dims[0] % block_elems:
            bad(f"row length {dims[0]} is not a multiple of the block size {block_elems} of type {gtype}")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block_elems * block_bytes
        if offset % alignment:
            bad(f"data offset {offset} is not a multiple of the alignment {alignment}")
        start = data_start + offset
        if start + nbytes > size:
            bad(f"data [{start}, {start + nbytes}) runs past the end of the {size}-byte file "
                f"(truncated or lying offset/size)")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), gtype, start, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{path}: malformed GGUF: tensor {n1!r} overlaps the data of tensor {n0!r}")
    return GGUFFile(path, version, metadata, tensors, alignment, data_start, mm)
