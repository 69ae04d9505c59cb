"""Training checkpoints (sasq.optim): every tampered or damaged file is refused with one ValueError
naming the file, before the model is touched; a good one resumes."""
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sasq.model import LlamaConfig, random_model
from sasq.optim import load_checkpoint
from sasq.plan import QuantPlan
from sasq.quant import quantize
from sasq.calibration import calibrate
from sasq.train import train_scales

CFG = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
COMMON = dict(steps=4, lr=0.03, seqlen=8, batch=2, checkpoint_every=2, progress=False)


def _qmodel():
    m = random_model(CFG, seed=0)
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, 400)
    return calibrate(quantize(m, QuantPlan(8, 8, granularity="channel")), ids, seqlen=8,
                     progress=False), ids


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    q, ids = _qmodel()
    path = tmp_path_factory.mktemp("ck") / "c.npz"
    train_scales(q, ids, checkpoint=path, stop_at=2, **COMMON)
    return path, ids


def _rewrite(src, dst, edit):
    """Copy an npz, letting edit(name, array_or_state) return a replacement (None drops it)."""
    with np.load(src) as z:
        items = {n: z[n] for n in z.files}
    state = json.loads(bytes(items.pop("__state__")).decode())
    state = edit("__state__", state)
    out = {"__state__": np.frombuffer(json.dumps(state).encode(), np.uint8)}
    for n, a in items.items():
        r = edit(n, a)
        if r is not None:
            out[n] = r
    np.savez(dst, **out)


def _refused(path, ids, match):
    q, _ = _qmodel()
    before = {k: v.copy() for k, v in q.params.items()}
    with pytest.raises(ValueError, match=match) as e:
        train_scales(q, ids, checkpoint=path, resume=True, **COMMON)
    assert str(path) in str(e.value)
    for k in before:  # nothing was loaded into the model
        np.testing.assert_array_equal(q.params[k], before[k])


def _first(name, prefix):
    return name.startswith(prefix)


TAMPER = {
    "wrong shape": (lambda n, a: a.reshape(1, -1) if _first(n, "var:") and a.ndim == 1 else a, "shape"),
    "float64": (lambda n, a: a.astype(np.float64) if _first(n, "m:") else a, "dtype"),
    "int32": (lambda n, a: a.astype(np.int32) if _first(n, "var:") else a, "dtype"),
    "missing key": (lambda n, a: None if n.startswith("v:layers.0.") else a, "missing"),
    "unknown key": (lambda n, a: {**a, "x": 1} if n == "__state__" else a, None),
    "nan": (lambda n, a: a * np.nan if _first(n, "var:") else a, "non-finite"),
    "negative moment": (lambda n, a: -np.abs(a) - 1 if _first(n, "v:") else a, "negative"),
    "negative step": (lambda n, a: {**a, "step": -3} if n == "__state__" else a, "step"),
    "no rng": (lambda n, a: {k: v for k, v in a.items() if k != "rng"} if n == "__state__" else a,
               "random generator"),
    "bad rng": (lambda n, a: {**a, "rng": {"bit_generator": "MT19937"}} if n == "__state__" else a,
                "random generator"),
    "history": (lambda n, a: {**a, "history": 3} if n == "__state__" else a, "history"),
    "version": (lambda n, a: {**a, "version": 1} if n == "__state__" else a, "version"),
}


@pytest.mark.parametrize("what", sorted(TAMPER))
def test_tampered_checkpoints_are_refused(good, tmp_path, what):
    path, ids = good
    edit, match = TAMPER[what]
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, edit)
    if match is None:  # an extra state field is harmless: it resumes
        q, _ = _qmodel()
        train_scales(q, ids, checkpoint=bad, resume=True, **COMMON)
        return
    _refused(bad, ids, match)


def test_renamed_keys_are_refused_not_matched_by_order(good, tmp_path):
    """Arrays are stored by parameter name: a swapped pair of names is a mismatch, never a silent
    load into the wrong parameter."""
    path, ids = good
    bad = tmp_path / "swap.npz"
    _rewrite(path, bad, lambda n, a: a if n == "__state__" else a)
    with np.load(bad) as z:
        items = {n: z[n] for n in z.files}
    k = sorted(n for n in items if n.startswith("var:"))
    items[k[0].replace("var:", "var:x")] = items.pop(k[0])
    np.savez(bad, **items)
    _refused(bad, ids, "missing")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0), flip=st.integers(0, 10**9))
def test_damaged_files_raise_value_error_naming_the_file(good, tmp_path, cut, flip):
    path, ids = good
    raw = bytearray(path.read_bytes())
    if flip % 2:
        i = flip % len(raw)
        raw[i] ^= 0xFF
    else:
        raw = raw[: int(len(raw) * cut)]
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(bytes(raw))
    q, _ = _qmodel()
    expect = {k: (v.shape, v.dtype) for k, v in q.params.items()}
    try:
        load_checkpoint(bad, expect)
    except ValueError as e:
        assert str(bad) in str(e)
    # a byte flip inside stored data may leave a valid file: then it must load as a checkpoint


def test_good_checkpoint_resumes(good, tmp_path):
    path, ids = good
    q, _ = _qmodel()
    r = train_scales(q, ids, checkpoint=path, resume=True, **COMMON)
    assert r.resumed_from == 2 and r.steps == 4
    with zipfile.ZipFile(path) as z:
        assert any(n.startswith("var:layers.0.attn_in") for n in z.namelist())
