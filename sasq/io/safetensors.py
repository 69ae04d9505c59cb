"""safetensors checkpoints without torch: a validating numpy.memmap reader and an atomic writer.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 N, then an
N-byte JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data buffer; offsets are relative to the buffer's start. The tensors must tile the buffer
exactly (no overlap, no gap, nothing after the last one), as the reference reader requires.

Every problem with a file is a one-line ValueError that names the file and, where there is one,
the tensor: JSON that nests too deeply or holds a 5,000-digit number included, and shapes whose
element count (exact, in Python ints) does not match the bytes or cannot be a NumPy array.
F32/F64 and the integer dtypes come back as read-only memory maps (no copy); F16 and BF16 are
converted to float32 (BF16 via uint16 << 16) when loaded. With check_finite=True (what
`sasq.load` uses) a NaN or inf in a float tensor is a ValueError naming the file, the tensor and
the first bad element, read in bounded chunks.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from sasq.atomic import atomic_write

# safetensors dtype name -> numpy dtype of the bytes on disk (little-endian)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# numpy dtype -> safetensors name, for the writer (no BF16: numpy has no such type)
_NAMES = {
    np.dtype("f8"): "F64",
    np.dtype("f4"): "F32",
    np.dtype("f2"): "F16",
    np.dtype("i8"): "I64",
    np.dtype("i4"): "I32",
    np.dtype("i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("u8"): "U64",
    np.dtype("u4"): "U32",
    np.dtype("u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
MAX_NDIM = 32  # a tensor's rank; NumPy's own limit is 64, real checkpoints use at most 4
_FINITE_CHUNK = 1 << 22  # elements per np.isfinite pass: bounds the temporary to 4 MB
_INDEX = "model.safetensors.index.json"


class MissingTensorError(ValueError, KeyError):
    """A tensor that a checkpoint does not hold; both a ValueError and a KeyError."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TensorDict(dict):
    """name -> array; a missing name raises MissingTensorError naming the source file(s)."""

    def __init__(self, *args, source: str = "", metadata: dict | None = None, **kw):
        super().__init__(*args, **kw)
        self.source = source
        self.metadata = dict(metadata or {})

    def __missing__(self, name):
        some = ", ".join(sorted(self)[:3])
        raise MissingTensorError(
            f"{self.source}: no tensor named {name!r} ({len(self)} tensors, e.g. {some})")


def _fail(path, msg, name=None):
    where = f"{path}: tensor {name!r}: " if name is not None else f"{path}: "
    raise ValueError(where + msg)


def read_header(path) -> tuple[dict, dict, int]:
    """Parse and validate a header. Returns (entries, metadata, data_start) where entries maps
    name -> (dtype name, shape tuple, begin, end) with absolute-in-buffer offsets."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            _fail(path, f"truncated: {size} bytes, fewer than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            _fail(path, f"header length {n} exceeds the {_MAX_HEADER}-byte limit (not a safetensors file?)")
        if 8 + n > size:
            _fail(path, f"truncated: header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    header = _parse_json(raw, path, "header")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _fail(path, "__metadata__ must map strings to strings")

    data_len = size - 8 - n
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            _fail(path, "entry must be an object with dtype, shape and data_offsets", name)
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            _fail(path, f"unknown dtype {dtype!r} (supported: {', '.join(_DTYPES)})", name)
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            _fail(path, f"shape {shape!r} is not a list of non-negative integers", name)
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            _fail(path, f"data_offsets {offs!r} must be [begin, end] with 0 <= begin <= end", name)
        begin, end = offs
        if len(shape) > MAX_NDIM:
            _fail(path, f"shape has {len(shape)} dimensions (at most {MAX_NDIM})", name)
        itemsize = _DTYPES[dtype].itemsize
        # exact Python ints: np.prod in int64 overflowed for [2**64] and wrapped [2**32, 2**32] to 0
        if math.prod(max(d, 1) for d in shape) * itemsize >= 2 ** 63:
            _fail(path, f"shape {shape} is too large for an array", name)
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            _fail(path, f"shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                        f"[{begin}, {end}] hold {end - begin}", name)
        if end > data_len:
            _fail(path, f"data_offsets [{begin}, {end}] run past the end of the {data_len}-byte data "
                        f"buffer (file truncated?)", name)
        entries[name] = (dtype, tuple(shape), begin, end)

    # The tensors must tile [0, data_len) exactly.
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            _fail(path, f"data_offsets [{begin}, {end}] overlap tensor {prev!r} (ends at {pos})", name)
        if begin > pos:
            _fail(path, f"data_offsets [{begin}, {end}] leave a gap of {begin - pos} bytes "
                        f"after {'the header' if prev is None else repr(prev)}", name)
        pos, prev = end, name
    if pos != data_len:
        _fail(path, f"data buffer has {data_len} bytes but the tensors cover only {pos} "
                    f"(header offsets do not cover the file)")
    return entries, metadata, 8 + n


def _parse_json(raw: bytes, path, what: str):
    """JSON from bytes; every failure (bad UTF-8, bad JSON, a number beyond Python's digit limit,
    nesting deeper than the recursion limit) is a one-line ValueError naming the file."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        _fail(path, f"{what} JSON nests too deeply")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        _fail(path, f"{what} is not valid UTF-8 JSON ({e.__class__.__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})")


def check_finite_tensor(a: np.ndarray, path, name) -> None:
    """ValueError naming the file, tensor and first element if a float array holds NaN or inf.
    Reads the array once in chunks of _FINITE_CHUNK elements (a memory map is paged in)."""
    if a.dtype.kind != "f":
        return
    flat = a.reshape(-1)
    for i in range(0, flat.size, _FINITE_CHUNK):
        ok = np.isfinite(flat[i:i + _FINITE_CHUNK])
        if not ok.all():
            j = i + int(np.argmin(ok))
            where = np.unravel_index(j, a.shape) if a.ndim else ()
            _fail(path, f"non-finite value {flat[j]} at index {tuple(int(k) for k in where)} "
                        f"(NaN/inf weights would make every output NaN)", name)


def load_safetensors(path, check_finite: bool = False) -> TensorDict:
    """All tensors of one file: memory maps where the dtype allows, float32 for F16/BF16.
    check_finite: refuse a float tensor holding NaN or inf (reads every float tensor once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    entries, metadata, start = read_header(path)
    out = TensorDict(source=str(path), metadata=metadata)
    total = path.stat().st_size - start
    # One read-only map of the whole data buffer; each tensor is a view into it.
    # (A plain ndarray view, not the np.memmap subclass; the view keeps the map alive.)
    buf = (np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(total,)).view(np.ndarray)
           if total else None)
    for name, (dtype, shape, begin, end) in entries.items():
        disk = _DTYPES[dtype]
        a = buf[begin:end].view(disk).reshape(shape) if end > begin else np.zeros(shape, disk)
        if dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F16":
            a = a.astype(np.float32)
        if check_finite:
            check_finite_tensor(a, path, name)
        out[name] = a
    return out


def load_checkpoint_dir(directory, check_finite: bool = False) -> TensorDict:
    """model.safetensors, or the shards named by model.safetensors.index.json, of an HF directory.
    check_finite: as in load_safetensors (a NaN/inf weight names its shard and tensor)."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / _INDEX
    if single.is_file():
        return load_safetensors(single, check_finite)
    if index.is_file():
        return _load_sharded(index, check_finite)
    others = sorted(directory.glob("*.safetensors"))
    if len(others) == 1:
        return load_safetensors(others[0], check_finite)
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or {_INDEX}"
        + (f" ({len(others)} other .safetensors files, ambiguous)" if others else ""))


def _load_sharded(index: Path, check_finite: bool = False) -> TensorDict:
    doc = _parse_json(index.read_bytes(), index, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: not a valid index (needs a 'weight_map' object mapping tensor "
                         f"names to shard file names)")
    out = TensorDict(source=str(index))
    shards = {}
    for name, shard in weight_map.items():
        shard_path = index.parent / shard
        if shard not in shards:
            if not shard_path.is_file():
                raise ValueError(f"{index}: tensor {name!r}: shard file {shard_path} does not exist")
            shards[shard] = load_safetensors(shard_path, check_finite)
            out.metadata.update(shards[shard].metadata)
        if name not in shards[shard]:
            raise ValueError(f"{shard_path}: tensor {name!r}: listed in {index.name} but missing")
        out[name] = shards[shard][name]
    return out


def _as_saveable(name, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.newbyteorder("=") not in _NAMES and a.dtype not in _NAMES:
        raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent")
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors atomically: a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings")
    arrays, header, pos = [], {}, 0
    for name in sorted(tensors):
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        a = _as_saveable(name, tensors[name])
        header[name] = {"dtype": _NAMES[a.dtype.newbyteorder("=")], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        arrays.append(a)
        pos += a.nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with atomic_write(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
