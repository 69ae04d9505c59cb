"""INT8 GEMM: every compiled tier, forced, bit-exact against an int64 NumPy matmul; the fused
linear_int8 store; threads, packed reuse, concurrency, fork and the env setting."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sasq import ops
from sasq import reference as R

ISAS = ops.available_isas()
HYP = settings(max_examples=20, deadline=None)
# K values around the SIMD group sizes (4 bytes per dword, 16/32/64 lanes) and the odd sizes
KS = [1, 2, 3, 4, 5, 17, 31, 32, 33, 63, 64, 65, 127, 255, 1023]
MS = [1, 2, 3, 5, 6, 7, 13, 97]        # tile heights 6 (VNNI) and 4 (AVX2), task rows 96
NS = [1, 3, 8, 17, 63, 64, 65, 130]    # panels of 64, AVX2 sub-blocks of 8


@pytest.fixture(autouse=True)
def _restore():
    n = ops.get_num_threads()
    yield
    ops.set_isa("auto")
    ops.set_num_threads(n)


def ref_i64(a, b):
    return a.astype(np.int64) @ b.astype(np.int64).T


def test_scalar_tier_always_available():
    assert "scalar" in ISAS and ops.get_isa() == ISAS[0]


@pytest.mark.parametrize("isa", ISAS)
@HYP
@given(m=st.sampled_from(MS), k=st.sampled_from(KS), n=st.sampled_from(NS), seed=st.integers(0, 2**31))
def test_gemm_bit_exact(isa, m, k, n, seed):
    ops.set_isa(isa)
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    c = ops.gemm_int8(a, b)
    assert c.dtype == np.int32 and c.shape == (m, n)
    np.testing.assert_array_equal(c, ref_i64(a, b))
    ws = rng.uniform(1e-3, 1.0, n).astype(np.float32)
    y = ops.linear_int8(a, ops.pack_weights(b), 0.037, ws)
    np.testing.assert_array_equal(y, R.linear_int8(a, b, 0.037, ws))  # same float32 ops: exact


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("va,vb", [(-128, -128), (-128, 127), (127, 127), (127, -128)])
def test_extremes(isa, va, vb):
    ops.set_isa(isa)
    for m, k, n in [(7, 4099, 65), (1, 33, 3)]:
        a = np.full((m, k), va, np.int8)
        b = np.full((n, k), vb, np.int8)
        np.testing.assert_array_equal(ops.gemm_int8(a, b), ref_i64(a, b))
    # mixed extremes, alternating per element
    a = np.where(np.arange(7 * 129).reshape(7, 129) % 3 == 0, -128, 127).astype(np.int8)
    b = np.where(np.arange(70 * 129).reshape(70, 129) % 2 == 0, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(ops.gemm_int8(a, b), ref_i64(a, b))


@pytest.mark.parametrize("isa", ISAS)
def test_largest_k_does_not_overflow(isa):
    ops.set_isa(isa)
    k = ops._C.MAX_K
    a = np.full((1, k), -128, np.int8)
    b = np.full((2, k), -128, np.int8)
    b[1, ::2] = 127
    c = ops.gemm_int8(a, b)
    np.testing.assert_array_equal(c, ref_i64(a, b))
    assert c[0, 0] == 16384 * k  # within 2^31 - 1 by construction of MAX_K


def test_tiers_agree_on_a_larger_problem():
    rng = np.random.default_rng(7)
    a = rng.integers(-128, 128, (131, 1000), dtype=np.int8)
    b = rng.integers(-128, 128, (200, 1000), dtype=np.int8)
    p = ops.pack_weights(b)
    outs = []
    for isa in ISAS:
        ops.set_isa(isa)
        outs.append(ops.gemm_packed(a, p))
    for o in outs:
        np.testing.assert_array_equal(o, ref_i64(a, b))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_identical_results(threads):
    ops.set_num_threads(threads)
    assert ops.get_num_threads() == threads
    rng = np.random.default_rng(threads)
    a = rng.integers(-128, 128, (200, 96), dtype=np.int8)
    b = rng.integers(-128, 128, (300, 96), dtype=np.int8)
    np.testing.assert_array_equal(ops.gemm_int8(a, b), ref_i64(a, b))


def test_packed_reuse_batched_input_and_row_sums():
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (70, 45), dtype=np.int8)
    p = ops.pack_weights(w)
    assert (p.n, p.k) == (70, 45) and p.nbytes >= w.size
    np.testing.assert_array_equal(p.row_sums, w.astype(np.int64).sum(1))
    ws = rng.uniform(0.1, 1, 70).astype(np.float32)
    for _ in range(3):
        a = rng.integers(-128, 128, (2, 3, 45), dtype=np.int8)  # (B, T, K)
        y = ops.linear_int8(a, p, 0.5, ws)
        assert y.shape == (2, 3, 70)
        np.testing.assert_array_equal(y, R.linear_int8(a, w, 0.5, ws))
    del w  # the packed copy owns its memory
    a = rng.integers(-128, 128, (1, 45), dtype=np.int8)
    assert ops.gemm_packed(a, p).shape == (1, 70)


def test_concurrent_python_threads():
    """The GIL is released in the kernel; a second caller runs serially instead of deadlocking."""
    rng = np.random.default_rng(2)
    b = rng.integers(-128, 128, (130, 257), dtype=np.int8)
    p = ops.pack_weights(b)
    jobs = [rng.integers(-128, 128, (50, 257), dtype=np.int8) for _ in range(6)]
    results = [None] * 6

    def work(i):
        for _ in range(5):
            results[i] = ops.gemm_packed(jobs[i], p)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for a, c in zip(jobs, results):
        np.testing.assert_array_equal(c, ref_i64(a, b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork():
    ops.set_num_threads(2)
    a = np.ones((10, 16), np.int8)
    ops.gemm_int8(a, a)  # workers exist now
    code = ("import os, sys, numpy as np\nfrom sasq import ops\nops.set_num_threads(2)\n"
            "a = np.ones((200, 16), np.int8); ops.gemm_int8(a, a)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    c = ops.gemm_int8(a, a); os._exit(0 if (c == 16).all() else 3)\n"
            "_, st = os.waitpid(pid, 0); sys.exit(os.waitstatus_to_exitcode(st))\n")
    r = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0


def test_env_sets_default_threads():
    code = "from sasq import ops; print(ops.get_num_threads())"
    env = dict(os.environ, SASQ_NUM_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "3"
    env["SASQ_NUM_THREADS"] = "lots"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "SASQ_NUM_THREADS" in out.stderr and int(out.stdout) >= 1


def test_set_num_threads_and_isa_validation():
    for bad in (0, -1, 1000):
        with pytest.raises(ValueError):
            ops.set_num_threads(bad)
    with pytest.raises(TypeError):
        ops.set_num_threads(2.5)
    with pytest.raises(ValueError, match="isa"):
        ops.set_isa("sse9")
    ops.set_isa("scalar")
    assert ops.get_isa() == "scalar"
    ops.set_isa("auto")
    assert ops.get_isa() == ISAS[0]


def test_benchmark_helpers():
    wall, cpu = ops._C._peak_int8_gops(1, 0.01)
    if "avx512vnni" in ISAS:
        assert wall > 0 and cpu > 0
    else:
        assert wall == 0
    w = np.arange(64 * 8, dtype=np.int64).reshape(64, 8).astype(np.int8)
    assert isinstance(ops._C._stream_read(ops.pack_weights(w)), int)
    with pytest.raises(ValueError):
        ops._C._peak_int8_gops(0)


def test_thread_policy_per_shape():
    """Small products run on fewer threads (thread hand-offs cost more than they save), big ones
    on all; the result never depends on it (exact integers)."""
    n0 = ops.get_num_threads()
    try:
        ops.set_num_threads(16)
        t = ops._C._gemm_threads
        assert t(1, 1536, 576) == 1            # decode on a small model: one thread
        assert t(1, 4096, 4096) > 1            # decode on a big model: bandwidth of several cores
        assert 1 < t(16, 1536, 576) < 16       # a few rows: some threads, not all
        assert t(2048, 4096, 4096) == 16
        ops._C._gemm_policy(False)             # the benchmarks' switch: all threads everywhere
        try:
            assert t(1, 1536, 576) == 16
        finally:
            ops._C._gemm_policy(True)
        assert t(1, 1536, 576) == 1
        rng = np.random.default_rng(0)
        w = rng.integers(-127, 128, (300, 77), dtype=np.int8)
        a = rng.integers(-127, 128, (40, 77), dtype=np.int8)
        p = ops.pack_weights(w)
        outs = []
        for n in (1, 3, 16):
            ops.set_num_threads(n)
            outs.append(ops.gemm_packed(a, p))
        for o in outs[1:]:
            np.testing.assert_array_equal(o, outs[0])
    finally:
        ops.set_num_threads(n0)
