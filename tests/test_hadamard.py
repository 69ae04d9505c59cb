"""Hadamard rotation: the constructions of sasq.hadamard (exact orthogonality in integers, the
sizes of LLaMA-family models, errors), and sasq.ops.hadamard / hadamard_quantize /
hadamard_fake_quant against the explicit float64 product on every ISA tier, odd row counts,
transpose (inverse and adjoint), thread-count independence, fused = unfused bit for bit, and bad
arguments."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sasq import hadamard as H
from sasq import ops
from sasq import reference as R

ISAS = ops.available_isas()  # every tier this CPU runs (scalar always)
ROWS = [1, 3, 17, 33]
U32 = 2.0**-24  # unit roundoff of float32
# Sizes of LLaMA-family models -> (m, k), and the recipe of m.
MODEL_SIZES = {
    576: (36, 4), 1536: (12, 7), 64: (1, 6), 2048: (1, 11), 4096: (1, 12), 5632: (44, 7),
    11008: (344, 5), 14336: (28, 9),
}
RECIPES = {36: ("paley2", 17), 12: ("paley1", 11), 44: ("paley1", 43), 344: ("paley1", 343),
           28: ("paley1", 27), 1: ("sylvester", 0)}
# Orders m % 4 == 0 below 400 that Sylvester, Paley I/II and Kronecker products cannot build.
NOT_CONSTRUCTIBLE_BELOW_400 = {92, 116, 156, 172, 184, 188, 232, 236, 260, 268, 292, 324, 356,
                               372, 376}
PALEY1_Q = [3, 7, 11, 19, 23, 27, 31, 43, 47, 59, 67, 71, 79, 83, 103, 107, 127, 131, 139, 343]
PALEY2_Q = [5, 9, 13, 17, 25, 29, 37, 41, 49, 53, 61, 73, 81, 89, 97, 101, 109, 113, 121, 125]


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    ops.set_isa("auto")


def gram(h: np.ndarray) -> np.ndarray:
    """h h^T of a +-1 matrix in exact integers: computed by float64 BLAS, where every partial sum
    of +-1 products is an integer below 2^53 and therefore exact; returned as int64."""
    h = h.astype(np.float64)
    return (h @ h.T).astype(np.int64)


def transform_budget(x: np.ndarray, small: np.ndarray) -> np.ndarray:
    """Worst-case |float32 kernel - exact| per element of a row (first order): the output is
    sum_j S[a, a'] H_p[b, b'] x_j / sqrt(n), summed by a depth-k butterfly tree, then an m-term
    sequential sum, then one multiply by a rounded 1/sqrt(n): (k + m + 1) u sum_j |S x_j| / sqrt(n).
    Returns (rows, 1); 1 % slack for the second-order terms."""
    n, m = x.shape[-1], small.shape[0]
    k = int(math.log2(n // m))
    mag = np.abs(x.astype(np.float64)).reshape(-1, m, n // m).sum(axis=2) @ np.abs(small).T.astype(np.float64)
    return 1.01 * (k + m + 1) * U32 * mag.max(axis=1, keepdims=True) / math.sqrt(n)


def rows_of(n: int, rows: int, seed: int) -> np.ndarray:
    """(rows, n) float32 with an outlier channel per row (what rotation is for)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[np.arange(rows), rng.integers(0, n, rows)] *= 50
    return x


# ---------------------------------------------------------------- constructions

def test_sylvester_is_the_butterfly_order():
    for k in range(9):
        h = H.sylvester(k)
        assert h.dtype == np.int8 and h.shape == (2**k, 2**k)
        np.testing.assert_array_equal(gram(h), 2**k * np.eye(2**k, dtype=np.int64))
    b = np.arange(64)
    parity = np.vectorize(lambda v: bin(v).count("1") & 1)(b[:, None] & b[None, :])
    np.testing.assert_array_equal(H.sylvester(6), 1 - 2 * parity)  # (-1)^popcount(b & b')


@pytest.mark.parametrize("q", PALEY1_Q)
def test_paley1_orthogonal_in_integers(q):
    h = H.paley1(q)
    assert h.shape == (q + 1, q + 1) and set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(gram(h), (q + 1) * np.eye(q + 1, dtype=np.int64))
    # skew type: H + H^T = 2 I, so H is not symmetric and transpose matters
    np.testing.assert_array_equal(h.astype(np.int64) + h.T, 2 * np.eye(q + 1, dtype=np.int64))


@pytest.mark.parametrize("q", PALEY2_Q)
def test_paley2_orthogonal_in_integers(q):
    h = H.paley2(q)
    assert h.shape == (2 * (q + 1), 2 * (q + 1)) and set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(gram(h), 2 * (q + 1) * np.eye(2 * (q + 1), dtype=np.int64))


@pytest.mark.parametrize("q", [4, 8, 9, 25, 27, 49, 81, 125, 343])
def test_galois_field_axioms(q):
    """GF(p^e) on random triples: commutative, associative, distributive, inverses; exactly
    (q - 1) / 2 nonzero squares for odd q. A reducible modulus fails the inverse check."""
    f = H.GF(q)
    rng = np.random.default_rng(q)
    a, b, c = rng.integers(0, q, (3, 500))
    np.testing.assert_array_equal(f.mul(a, b), f.mul(b, a))
    np.testing.assert_array_equal(f.mul(f.mul(a, b), c), f.mul(a, f.mul(b, c)))
    np.testing.assert_array_equal(f.mul(a, f.add(b, c)), f.add(f.mul(a, b), f.mul(a, c)))
    np.testing.assert_array_equal(f.add(f.sub(a, b), b), a)
    x = np.arange(1, q)
    table = f.mul(x[:, None], x[None, :])  # (q-1, q-1): every nonzero element has an inverse
    assert (table == 1).any(axis=1).all() and (table != 0).all()
    if q % 2:
        chi = f.character()
        assert chi[0] == 0 and (chi == 1).sum() == (q - 1) // 2 == (chi == -1).sum()


def test_every_constructible_order_below_400_is_hadamard():
    missing = set()
    for m in range(1, 400):
        r = H.recipe(m)
        if r is None:
            if m % 4 == 0:
                missing.add(m)
            continue
        np.testing.assert_array_equal(gram(H.small_hadamard(m)), m * np.eye(m, dtype=np.int64),
                                      err_msg=f"m = {m} via {r}")
    assert missing == NOT_CONSTRUCTIBLE_BELOW_400
    for m in (3, 6, 10, 18):  # neither 1, 2 nor a multiple of 4
        assert H.recipe(m) is None


def test_kronecker_product_orthogonal():
    h = H.kron(H.paley1(11), H.paley2(5))  # 12 * 12
    np.testing.assert_array_equal(gram(h), 144 * np.eye(144, dtype=np.int64))


def test_model_sizes_and_listed_orders():
    for n, mk in MODEL_SIZES.items():
        assert H.hadamard_factors(n) == mk, n
    for m, r in RECIPES.items():
        assert H.recipe(m) == r
    for m in (12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 100, 108, 124, 140, 148):
        assert H.hadamard_factors(m * 8) == (m, 3)
    assert H.hadamard_factors(172 * 64) == (344, 5)  # 172 has no construction here: 344 = 343 + 1
    assert H.hadamard_factors(92 * 4) == (368, 0)    # 92 neither; 368 = 367 + 1 (Paley I)
    assert H.hadamard_factors(1) == (1, 0)


@pytest.mark.parametrize("n", [3, 6, 10, 46, 92, 184])
def test_factors_error_names_n(n):
    with pytest.raises(ValueError, match=f"n = {n} "):
        H.hadamard_factors(n)


def test_factors_and_small_bad_arguments():
    for bad in (0, -4):
        with pytest.raises(ValueError, match="n must be >= 1"):
            H.hadamard_factors(bad)
    for bad in (2.0, True, "8", None):
        with pytest.raises(TypeError, match="n must be an int"):
            H.hadamard_factors(bad)
    with pytest.raises(ValueError, match="m = 92"):
        H.small_hadamard(92)
    with pytest.raises(ValueError, match="q = 13"):
        H.paley1(13)
    with pytest.raises(ValueError, match="q = 11"):
        H.paley2(11)
    with pytest.raises(ValueError, match="prime power"):
        H.GF(12)


@pytest.mark.parametrize("n", [1, 2, 12, 24, 40, 576])
def test_hadamard_matrix_orthonormal(n):
    hi = H.hadamard_matrix(n, normalize=False)
    assert hi.dtype == np.int8
    np.testing.assert_array_equal(gram(hi), n * np.eye(n, dtype=np.int64))
    h = H.hadamard_matrix(n)
    assert h.dtype == np.float64
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-13)
    np.testing.assert_array_equal(h * math.sqrt(n), np.round(h * math.sqrt(n)))
    np.testing.assert_array_equal(np.round(h * math.sqrt(n)), hi)


def test_random_hadamard():
    n = 48
    r1, r2 = H.random_hadamard(n, 1), H.random_hadamard(n, 2)
    np.testing.assert_allclose(r1 @ r1.T, np.eye(n), atol=1e-13)
    np.testing.assert_array_equal(r1, H.random_hadamard(n, 1))
    assert not np.array_equal(r1, r2)
    d = H.random_signs(n, 1)
    np.testing.assert_array_equal(r1, H.hadamard_matrix(n) * d)
    x = rows_of(n, 3, 0)  # online: x R^T = hadamard(x * d), and back
    y = ops.hadamard((x * d).astype(np.float32))
    np.testing.assert_allclose(y, x @ r1.T, atol=1e-5)
    np.testing.assert_allclose(ops.hadamard(y, transpose=True) * d, x, atol=1e-5)


# ---------------------------------------------------------------- the kernel

KERNEL_SIZES = [1, 2, 8, 12, 24, 40, 80, 64, 344, 576, 1536]


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_matches_explicit_product(isa):
    """ops.hadamard (float32) against x @ M^T in float64 (the twin on float64 input) within the
    worst-case budget, both directions, odd row counts; and every tier gives the scalar bits."""
    for n in KERNEL_SIZES:
        m, _ = H.hadamard_factors(n)
        small = H.small_hadamard(m)
        xall = rows_of(n, max(ROWS), seed=n)
        for transpose in (False, True):
            exact_all = R.hadamard(xall.astype(np.float64), small, transpose)
            for rows in ROWS:  # each row count is its own call (chunking, tails)
                x, exact = xall[:rows], exact_all[:rows]
                budget = transform_budget(x, small)
                ops.set_isa("scalar")
                ys = ops.hadamard(x, transpose=transpose)
                ops.set_isa(isa)
                y = ops.hadamard(x, transpose=transpose)
                assert y.dtype == np.float32 and y.shape == x.shape
                err = np.abs(y - exact)
                assert (err <= budget).all(), (n, rows, transpose, float((err / budget).max()))
                np.testing.assert_array_equal(y, ys, err_msg=f"{isa} vs scalar, n = {n}")


@pytest.mark.parametrize("n", [4096, 5632, 11008, 14336])
def test_model_sizes_against_factored_product(n):
    """Large sizes without an n x n matrix: the exact value is S X H_p (X = the row as (m, p)), in
    float64; 3 rows, every tier."""
    m, k = H.hadamard_factors(n)
    s, hp = H.small_hadamard(m).astype(np.float64), H.sylvester(k).astype(np.float64)
    x = rows_of(n, 3, seed=n)
    exact = (s @ x.astype(np.float64).reshape(3, m, 2**k) @ hp).reshape(3, n) / math.sqrt(n)
    budget = transform_budget(x, H.small_hadamard(m))
    for isa in ISAS:
        ops.set_isa(isa)
        assert (np.abs(ops.hadamard(x) - exact) <= budget).all(), isa


@pytest.mark.parametrize("n", [12 * 16, 36 * 16, 1024])
def test_transpose_inverts_and_is_the_adjoint(n):
    x = rows_of(n, 17, seed=1)
    y = ops.hadamard(x)
    back = ops.hadamard(y, transpose=True)
    small = H.small_hadamard(H.hadamard_factors(n)[0])
    # the first error e (|e_i| <= budget(x)) comes back rotated: |(e M)_i| <= ||e||_2 <= sqrt(n) budget(x)
    bound = math.sqrt(n) * transform_budget(x, small) + transform_budget(y, small)
    assert (np.abs(back - x) <= bound).all()
    twice = ops.hadamard(y)
    if n != 192:  # Sylvester (1024) and Paley II (36 * 16) are symmetric: M^T M^T = I too
        assert np.array_equal(small, small.T)
        np.testing.assert_allclose(twice, x, atol=1e-4)
    else:  # Paley I (12 * 16) is not: applying M^T twice is no inverse (the flag matters)
        assert np.abs(twice - x).max() > 1.0
    # backward of y = x M^T is dx = dy M: <hadamard(x), g> == <x, hadamard(g, transpose=True)>
    g = rows_of(n, 17, seed=2)
    lhs = float(np.sum(y.astype(np.float64) * g))
    rhs = float(np.sum(x.astype(np.float64) * ops.hadamard(g, transpose=True)))
    assert lhs == pytest.approx(rhs, rel=1e-5)


def test_generic_small_matrix():
    """The C side is generic in S: a random float (m, m) matrix matches the twin with the same S;
    the int8 Hadamard passed explicitly equals the default."""
    rng = np.random.default_rng(4)
    s = rng.standard_normal((5, 5)).astype(np.float32)
    x = rows_of(5 * 32, 17, seed=5)
    for transpose in (False, True):
        y = ops.hadamard(x, s, transpose)
        exact = R.hadamard(x.astype(np.float64), s, transpose)
        st = s.T if transpose else s
        assert (np.abs(y - exact) <= transform_budget(x, st)).all()
    x = rows_of(1536, 3, seed=6)
    np.testing.assert_array_equal(ops.hadamard(x, H.small_hadamard(12)), ops.hadamard(x))
    # the same M factored differently: kron(S12, H2) with H64 is kron(S12, H128) (other rounding)
    np.testing.assert_allclose(ops.hadamard(x, H.kron(H.small_hadamard(12), H.sylvester(1))),
                               ops.hadamard(x), atol=1e-4)


def test_out_and_in_place():
    x = rows_of(576, 33, seed=7)
    y = ops.hadamard(x)
    out = np.empty_like(x)
    assert ops.hadamard(x, out=out) is out
    np.testing.assert_array_equal(out, y)
    x2 = x.copy()
    assert ops.hadamard(x2, out=x2) is x2
    np.testing.assert_array_equal(x2, y)
    xs = x.reshape(3, 11, 576)  # any leading shape: the last axis is transformed
    np.testing.assert_array_equal(ops.hadamard(xs).reshape(33, 576), y)
    big = np.zeros((34, 576), np.float32)
    big[:33] = x
    with pytest.raises(ValueError, match="overlaps"):
        ops.hadamard(big[:33], out=big[1:])
    with pytest.raises(ValueError, match="out must have the shape of x"):
        ops.hadamard(x, out=np.empty((33, 575), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        ops.hadamard(x, out=np.empty(x.shape))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        ops.hadamard(x, out=ro)


def test_thread_count_independence():
    x = rows_of(1536, 301, seed=8)  # many fixed row chunks
    n0 = ops.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            ops.set_num_threads(threads)
            outs.append((ops.hadamard(x), ops.hadamard(x, transpose=True),
                         ops.hadamard_quantize(x, 0.05, 8), ops.hadamard_fake_quant(x, 0.05, 4)))
    finally:
        ops.set_num_threads(n0)
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_fused_equals_unfused(isa):
    """hadamard_quantize == quantize(hadamard(x)) and hadamard_fake_quant == fake_quant(hadamard(x))
    bit for bit (per tensor and per channel, every bits, both directions); x is not modified; the
    codes are within 1 of the float64 twin's."""
    ops.set_isa(isa)
    rng = np.random.default_rng(9)
    for n in (12, 576, 1536):
        for rows in (1, 17):
            x = rows_of(n, rows, seed=n * rows)
            keep = x.copy()
            for transpose in (False, True):
                h = ops.hadamard(x, transpose=transpose)
                for bits, scale in ((8, np.float32(0.11)), (4, np.float32(0.7)),
                                    (2, (rng.random(n) * 0.2 + 0.01).astype(np.float32))):
                    q = ops.hadamard_quantize(x, scale, bits, transpose=transpose)
                    assert q.dtype == np.int8
                    np.testing.assert_array_equal(q, ops.quantize(h, scale, bits))
                    np.testing.assert_array_equal(
                        ops.hadamard_fake_quant(x, scale, bits, transpose=transpose),
                        ops.fake_quant(h, scale, bits))
                    twin = R.hadamard_quantize(x, scale, bits, transpose=transpose)
                    assert np.abs(q.astype(int) - twin).max() <= 1
            np.testing.assert_array_equal(x, keep)


def test_fused_non_finite_rules():
    x = rows_of(576, 3, seed=10)
    x[2, 5] = np.nan
    with pytest.raises(ValueError, match="hadamard_quantize: x contains NaN or inf"):
        ops.hadamard_quantize(x, 0.1)
    y = ops.hadamard_fake_quant(x, 0.1)
    assert np.isnan(y[2]).all() and not np.isnan(y[:2]).any()  # NaN spreads over its row only
    big = np.full((1, 64), 3e38, np.float32)  # finite input, the rotated sum overflows
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.hadamard_quantize(big, 1.0)
    with pytest.raises(ValueError, match="scale \\* qmax overflows"):
        ops.hadamard_fake_quant(x, 1e37)


def test_bad_arguments_name_the_argument():
    x = rows_of(24, 3, seed=11)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        ops.hadamard(x.astype(np.float64))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        ops.hadamard([1.0, 2.0])
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        ops.hadamard(np.asfortranarray(rows_of(8, 3, 0)))
    with pytest.raises(ValueError, match="x is empty"):
        ops.hadamard(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="x must have at least 1"):
        ops.hadamard(np.zeros((), np.float32))
    with pytest.raises(ValueError, match="x: its last axis.*n = 92"):
        ops.hadamard(np.zeros((2, 92), np.float32))
    with pytest.raises(ValueError, match="x: its last axis n = 100004 = 100004 \\* 2\\^k"):
        ops.hadamard(np.zeros((1, 100004), np.float32))  # Paley I (q = 100003) but too large
    with pytest.raises(ValueError, match="small must be a square"):
        ops.hadamard(x, np.ones((3, 4)))
    with pytest.raises(ValueError, match="small must have at least 2"):
        ops.hadamard(x, np.ones(3))
    with pytest.raises(ValueError, match=r"last axis \(24\) must be m \* 2\^k"):
        ops.hadamard(x, H.small_hadamard(20))
    with pytest.raises(ValueError, match="small must be finite"):
        ops.hadamard(x, np.array([[1.0, np.inf], [1.0, -1.0]]))
    with pytest.raises(TypeError, match="small must be a real"):
        ops.hadamard(x, "H12")
    with pytest.raises(TypeError, match="small must be a real"):
        ops.hadamard(x, np.ones((2, 2), np.complex64))
    with pytest.raises(TypeError, match="transpose must be a bool"):
        ops.hadamard(x, transpose=1)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.hadamard_quantize(x, 0.0)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ops.hadamard_quantize(x, np.nan)
    with pytest.raises(ValueError, match="scale must be a scalar or a 1-D array of length 24"):
        ops.hadamard_quantize(x, np.ones(5, np.float32))
    with pytest.raises(ValueError, match="bits must be in"):
        ops.hadamard_quantize(x, 0.1, 9)
    with pytest.raises(TypeError, match="bits must be an int"):
        ops.hadamard_fake_quant(x, 0.1, 8.0)


JUNK = st.one_of(
    st.sampled_from([None, True, "a", b"x", 1 + 2j, object(), [], [1.0, 2.0], [[1.0], [1.0, 2.0]],
                     float("nan"), float("inf"), -1.0, 0, 1e300, 3]),
    st.integers(-2**70, 2**70),
    st.sampled_from(["f2", "f4", "f8", "i1", "u1", "?", "c8", ">f4", "O"]).flatmap(
        lambda dt: st.sampled_from([(), (0,), (1,), (3,), (4,), (2, 2), (3, 3), (2, 4), (0, 8),
                                    (2, 12)]).map(lambda shape, dt=dt: np.ones(shape, dt))),
    st.just(np.ones((4, 24), np.float32)[:, ::2]),  # non-contiguous
)
SIGNATURES = {"hadamard": ("x", "small", "transpose"),
              "hadamard_quantize": ("x", "scale", "bits", "small", "transpose"),
              "hadamard_fake_quant": ("x", "scale", "bits", "small", "transpose")}
GOOD = {"x": rows_of(24, 3, 12), "small": H.small_hadamard(12), "transpose": True,
        "scale": np.float32(0.05), "bits": 8}


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fn=st.sampled_from(sorted(SIGNATURES)), which=st.integers(0, 4), junk=JUNK)
def test_fuzz_bad_arguments_raise_named_errors(fn, which, junk):
    """One argument replaced by junk: the call succeeds or raises TypeError/ValueError naming
    that argument (a wrong kind of object is always a TypeError); nothing else escapes."""
    params = SIGNATURES[fn]
    bad = params[which % len(params)]
    kw = {p: GOOD[p] for p in params}
    kw[bad] = junk
    wrong_kind = isinstance(junk, (bool, bytes, complex, str, type(None))) or type(junk) is object
    if bad == "transpose":
        wrong_kind = not isinstance(junk, (bool, np.bool_))
    if bad == "small" and junk is None:  # the default construction
        wrong_kind = False
    try:
        if fn == "hadamard":
            ops.hadamard(*[kw[p] for p in params])
        else:  # small and transpose are keyword-only
            getattr(ops, fn)(*[kw[p] for p in params[:-2]], small=kw["small"],
                             transpose=kw["transpose"])
    except (TypeError, ValueError) as e:
        assert bad in str(e), (fn, bad, str(e))
        assert not wrong_kind or isinstance(e, TypeError), (fn, bad, junk, e)
        return
    assert not wrong_kind, (fn, bad, junk)
