"""sasq.io: safetensors round trips against the reference package, and every documented error."""
import json
import os

import numpy as np
import pytest

from sasq import io

safetensors_numpy = pytest.importorskip("safetensors.numpy")
torch = pytest.importorskip("torch")


def forge(path, header: dict, data: bytes, header_len=None):
    """Write a safetensors file byte by byte, optionally lying about the header length."""
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


def good_pair(tmp_path):
    """Two F32 tensors a (2,) and b (3,) tiling a 20-byte buffer."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}}
    data = np.arange(5, dtype="<f4").tobytes()
    return header, data


def test_forged_good_file_loads(tmp_path):
    header, data = good_pair(tmp_path)
    t = io.load_safetensors(forge(tmp_path / "ok.safetensors", header, data))
    np.testing.assert_array_equal(t["a"], [0, 1])
    np.testing.assert_array_equal(t["b"], [2, 3, 4])


def test_reads_reference_writer_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    ref = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal((4,)),
        "f16": rng.standard_normal((2, 3)).astype(np.float16),
        "i8": rng.integers(-127, 128, (7,), dtype=np.int8),
        "i32": rng.integers(-2**31, 2**31 - 1, (2, 2), dtype=np.int32),
        "i64": rng.integers(-2**40, 2**40, (3,), dtype=np.int64),
        "u8": rng.integers(0, 256, (5,), dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float32),
    }
    path = tmp_path / "ref.safetensors"
    safetensors_numpy.save_file(ref, str(path), metadata={"k": "v"})
    got = io.load_safetensors(path)
    assert set(got) == set(ref) and got.metadata == {"k": "v"}
    for name, want in ref.items():
        expect_dtype = np.float32 if want.dtype == np.float16 else want.dtype
        assert got[name].dtype == expect_dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want.astype(expect_dtype), err_msg=name)


def test_bf16_is_widened_exactly(tmp_path):
    from safetensors.torch import save_file
    x = torch.randn(17, 3).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save_file({"x": x}, str(path))
    got = io.load_safetensors(path)["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.float().numpy())  # bf16 -> f32 is exact


def test_f32_is_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"w": np.ones((4, 4), np.float32)}, str(path))
    w = io.load_safetensors(path)["w"]
    base = w
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not w.flags.writeable  # read-only: an in-place write can never reach the file


def test_writer_round_trips_through_reference_reader(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "w": rng.standard_normal((8, 3)).astype(np.float32),
        "h": rng.standard_normal((5,)).astype(np.float16),
        "q": rng.integers(-127, 128, (4, 4), dtype=np.int8),
        "i": np.arange(6, dtype=np.int32).reshape(2, 3),
        "l": np.arange(3, dtype=np.int64),
        "u": np.arange(9, dtype=np.uint8),
        "noncontig": rng.standard_normal((6, 4)).astype(np.float32)[:, ::2],
        "bigendian": np.arange(4, dtype=">f4"),
    }
    path = tmp_path / "out.safetensors"
    io.save_safetensors(path, tensors, metadata={"format": "np"})
    ref = safetensors_numpy.load_file(str(path))
    assert set(ref) == set(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(ref[name], want, err_msg=name)
        assert ref[name].dtype == want.dtype.newbyteorder("="), name
    from safetensors import safe_open
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "np"}
    # and back through our own reader
    ours = io.load_safetensors(path)
    for name, want in tensors.items():
        np.testing.assert_array_equal(ours[name], want.astype(np.float32) if want.dtype == np.float16 else want)


def test_writer_is_atomic_on_failure(tmp_path):
    path = tmp_path / "keep.safetensors"
    io.save_safetensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'bad'"):
        io.save_safetensors(path, {"a": np.zeros(3, np.float32), "bad": np.array(["x"])})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]  # no temp file left behind


def test_writer_rejects_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        io.save_safetensors(tmp_path / "x.safetensors", {"a": np.ones(1, np.float32)}, {"n": 1})


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("case, tensor, needle", [
    ("truncated_data", "b", "run past the end"),
    ("short_file", None, "fewer than the 8-byte header length"),
    ("header_len_too_big", None, "runs past the end"),
    ("header_len_too_small", None, "not valid UTF-8 JSON"),
    ("overlap", "b", "overlap tensor 'a'"),
    ("gap", "b", "gap of 4 bytes after 'a'"),
    ("not_covering", None, "cover only 20"),
    ("out_of_bounds", "b", "run past the end"),
    ("unknown_dtype", "a", "unknown dtype 'F8_E9M9'"),
    ("shape_mismatch", "b", "shape [2, 2] of F32 needs 16 bytes"),
    ("negative_shape", "a", "non-negative"),
    ("reversed_offsets", "b", "begin <= end"),
    ("not_object", None, "not a JSON object"),
    ("bad_metadata", None, "__metadata__"),
])
def test_corrupt_files_give_one_line_errors(tmp_path, case, tensor, needle):
    header, data = good_pair(tmp_path)
    path = tmp_path / f"{case}.safetensors"
    if case == "truncated_data":
        forge(path, header, data[:-3])
    elif case == "short_file":
        path.write_bytes(b"\x10\x00\x00")
    elif case == "header_len_too_big":
        forge(path, header, data, header_len=10_000)
    elif case == "header_len_too_small":
        forge(path, header, data, header_len=len(json.dumps(header)) - 5)
    elif case == "overlap":
        header["b"]["data_offsets"] = [4, 16]
        forge(path, header, data)
    elif case == "gap":
        header["b"]["data_offsets"] = [12, 24]
        forge(path, header, data + b"\0" * 4)
    elif case == "not_covering":
        forge(path, header, data + b"\0" * 8)
    elif case == "out_of_bounds":
        header["b"]["data_offsets"] = [8, 20 + 400]
        header["b"]["shape"] = [103]
        forge(path, header, data)
    elif case == "unknown_dtype":
        header["a"]["dtype"] = "F8_E9M9"
        forge(path, header, data)
    elif case == "shape_mismatch":
        header["b"]["shape"] = [2, 2]
        forge(path, header, data)
    elif case == "negative_shape":
        header["a"]["shape"] = [-2]
        forge(path, header, data)
    elif case == "reversed_offsets":
        header["b"]["data_offsets"] = [20, 8]
        forge(path, header, data)
    elif case == "not_object":
        forge(path, [1, 2], b"")
    elif case == "bad_metadata":
        header["__metadata__"] = {"n": 3}
        forge(path, header, data)
    with pytest.raises(ValueError) as exc:
        io.load_safetensors(path)
    msg = one_line(exc)
    assert str(path) in msg
    assert needle in msg
    if tensor is not None:
        assert f"tensor {tensor!r}" in msg


def test_missing_tensor_names_file_and_tensor(tmp_path):
    header, data = good_pair(tmp_path)
    path = forge(tmp_path / "m.safetensors", header, data)
    t = io.load_safetensors(path)
    with pytest.raises(ValueError) as exc:  # also a KeyError, for dict-style callers
        t["model.norm.weight"]
    msg = one_line(exc)
    assert str(path) in msg and "'model.norm.weight'" in msg
    assert isinstance(exc.value, KeyError)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        io.load_safetensors(tmp_path / "nothere.safetensors")


def write_shards(tmp_path, tensors, split):
    weight_map = {}
    for i, names in enumerate(split):
        shard = f"model-{i + 1:05d}-of-{len(split):05d}.safetensors"
        safetensors_numpy.save_file({n: tensors[n] for n in names}, str(tmp_path / shard))
        weight_map.update({n: shard for n in names})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint(tmp_path):
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.standard_normal((i + 1, 2)).astype(np.float32) for i in range(5)}
    write_shards(tmp_path, tensors, [["t0", "t1"], ["t2", "t3", "t4"]])
    got = io.load_checkpoint_dir(tmp_path)
    assert set(got) == set(tensors)
    for n in tensors:
        np.testing.assert_array_equal(got[n], tensors[n])


def test_sharded_index_naming_a_missing_tensor(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {n: rng.standard_normal(3).astype(np.float32) for n in ("a", "b")}
    weight_map = write_shards(tmp_path, tensors, [["a"], ["b"]])
    weight_map["ghost"] = weight_map["b"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as exc:
        io.load_checkpoint_dir(tmp_path)
    msg = one_line(exc)
    assert "'ghost'" in msg and weight_map["b"] in msg


def test_sharded_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError) as exc:
        io.load_checkpoint_dir(tmp_path)
    msg = one_line(exc)
    assert "'w'" in msg and "model-00001-of-00002.safetensors" in msg


def test_dir_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        io.load_checkpoint_dir(tmp_path)


def test_bundled_model_matches_shared_copy(stories_dir):
    ours = io.load_checkpoint_dir(io.default_model_dir())
    ref = safetensors_numpy.load_file(str(stories_dir / "model.safetensors"))
    assert set(ours) == set(ref)
    for n in ref:
        np.testing.assert_array_equal(ours[n], ref[n])
    assert (io.default_model_dir() / "LICENSE").read_text().count("MIT") >= 1
