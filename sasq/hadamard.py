"""Hadamard matrices for QuaRot-style rotations (pure NumPy; the fast transform is sasq.ops.hadamard).

A Hadamard matrix of order m has entries +-1 and H H^T = m I; m is 1, 2 or a multiple of 4.
Constructions here (exact integers, int8):
- Sylvester: H_1 = [1], H_2p = [[H_p, H_p], [H_p, -H_p]], so H_p[b, b'] = (-1)^popcount(b & b').
  It is symmetric, and it is what the fast Walsh-Hadamard butterflies apply.
- Paley I: order q + 1 for a prime power q = 3 (mod 4).
- Paley II: order 2 (q + 1) for a prime power q = 1 (mod 4).
- Kronecker products of constructible orders.
Both Paley constructions use the quadratic character chi of GF(q) (chi(0) = 0, chi(x) = 1 for a
nonzero square, -1 otherwise) through the Jacobsthal matrix Q[i, j] = chi(x_i - x_j). For q = p^e,
e > 1 (27 = 3^3, 343 = 7^3, ...) the field is GF(p)[t] / f(t), f the first monic irreducible
polynomial of degree e found by search. Paley I matrices are not symmetric (H + H^T = 2 I), so a
transform and its inverse differ (sasq.ops.hadamard's `transpose`); Sylvester and Paley II are.

Layout shared with sasq.ops.hadamard, sasq.reference.hadamard and csrc/hadamard.c: for
n = m * p, p = 2^k, the element index is i = a * p + b (a < m, b < p) and

    H_n = kron(S_m, H_p):   H_n[a p + b, a' p + b'] = S_m[a, a'] * H_p[b, b'],

S_m the small construction of order m (`small_hadamard`), H_p Sylvester. The orthonormal matrix is
H_n / sqrt(n). `hadamard_factors(n)` picks the smallest constructible m (m = 1 for a power of two),
which keeps the dense m x m part of the fast transform cheapest.

Sizes of LLaMA-family models: 576 = 36 * 16 (Paley II, q = 17), 1536 = 12 * 128 (Paley I, q = 11),
2048, 4096, 64 (Sylvester), 5632 = 44 * 128 (Paley I, q = 43), 11008 = 344 * 32 (Paley I over
GF(7^3); 172 = 4 * 43 has no Paley construction), 14336 = 28 * 512 (Paley I over GF(3^3)).
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

__all__ = [
    "GF", "prime_power", "sylvester", "paley1", "paley2", "kron", "recipe", "small_hadamard",
    "hadamard_factors", "hadamard_matrix", "random_signs", "random_hadamard",
]


def _positive_int(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)


def prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e >= 1; None if q is not a prime power (q < 2 included)."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


# ---------------------------------------------------------------- GF(p^e)

def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficients low degree first, f monic."""
    a = list(a)
    df = len(f) - 1
    for d in range(len(a) - 1, df - 1, -1):
        c = a[d] % p
        if c:
            for i in range(df + 1):
                a[d - df + i] = (a[d - df + i] - c * f[i]) % p
    return [v % p for v in a[:df]]


def _monic(p: int, d: int):
    """Every monic polynomial of degree d over GF(p), low degree first."""
    for low in range(p ** d):
        yield [(low // p**i) % p for i in range(d)] + [1]


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p) (no monic factor of degree
    1..e//2), in the order of _monic."""
    for f in _monic(p, e):
        if all(any(_poly_mod(f, g, p)) for d in range(1, e // 2 + 1) for g in _monic(p, d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")  # one always exists


class GF:
    """GF(q), q = p^e. Element x in [0, q) stands for the polynomial sum_i digit_i(x) t^i (base-p
    digits, constant first) reduced modulo `poly` (monic, degree e, irreducible over GF(p));
    for e = 1 that is plain arithmetic modulo p."""

    def __init__(self, q: int):
        pe = prime_power(q)
        if pe is None:
            raise ValueError(f"q must be a prime power, got {q}")
        self.q = q
        self.p, self.e = pe
        self.poly = _irreducible(self.p, self.e) if self.e > 1 else [0, 1]
        self.digits = (np.arange(q)[:, None] // self.p ** np.arange(self.e)) % self.p  # (q, e)
        self._weights = self.p ** np.arange(self.e)

    def _index(self, digits: np.ndarray) -> np.ndarray:  # (..., e) digits -> element
        return (digits % self.p) @ self._weights

    def add(self, a, b):
        return self._index(self.digits[a] + self.digits[b])

    def sub(self, a, b):
        return self._index(self.digits[a] - self.digits[b])

    def mul(self, a, b):
        """Elementwise product of element arrays a and b (broadcast)."""
        da, db = self.digits[np.asarray(a)], self.digits[np.asarray(b)]  # (..., e)
        e, p = self.e, self.p
        prod = np.zeros(np.broadcast_shapes(da.shape, db.shape)[:-1] + (2 * e - 1,), np.int64)
        for i in range(e):  # polynomial product, degree <= 2e - 2
            for j in range(e):
                prod[..., i + j] += da[..., i] * db[..., j]
        prod %= p
        for d in range(2 * e - 2, e - 1, -1):  # t^e = -(f_0 + ... + f_{e-1} t^{e-1})
            c = prod[..., d].copy()
            prod[..., d] = 0
            for i in range(e):
                prod[..., d - e + i] = (prod[..., d - e + i] - c * self.poly[i]) % p
        return self._index(prod[..., :e])

    def character(self) -> np.ndarray:
        """chi (q,) int8: 0 at 0, 1 on the nonzero squares, -1 on the non-squares."""
        chi = np.full(self.q, -1, np.int8)
        x = np.arange(1, self.q)
        chi[self.mul(x, x)] = 1
        chi[0] = 0
        return chi

    def jacobsthal(self) -> np.ndarray:
        """Q (q, q) int8, Q[i, j] = chi(x_i - x_j)."""
        diff = self._index(self.digits[:, None, :] - self.digits[None, :, :])  # (q, q)
        return self.character()[diff]


# ---------------------------------------------------------------- constructions (int8, +-1)

def sylvester(k: int) -> np.ndarray:
    """H_{2^k} (2^k, 2^k) int8, H[b, b'] = (-1)^popcount(b & b') (the butterflies' order)."""
    h = np.ones((1, 1), np.int8)
    for _ in range(k):
        h = np.block([[h, h], [h, -h]])
    return h


def paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime power q = 3 (mod 4): H = I + [[0, 1^T], [-1, Q]] (Q antisymmetric
    because chi(-1) = -1)."""
    if prime_power(q) is None or q % 4 != 3:
        raise ValueError(f"Paley I needs a prime power q = 3 (mod 4), got q = {q}")
    h = np.zeros((q + 1, q + 1), np.int8)
    h[0, 1:], h[1:, 0], h[1:, 1:] = 1, -1, GF(q).jacobsthal()
    return h + np.eye(q + 1, dtype=np.int8)


def paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1) for a prime power q = 1 (mod 4): from the symmetric conference matrix
    C = [[0, 1^T], [1, Q]], replace each 0 (the diagonal) by [[1, -1], [-1, -1]] and each +-1 by
    +-[[1, 1], [1, -1]]."""
    if prime_power(q) is None or q % 4 != 1:
        raise ValueError(f"Paley II needs a prime power q = 1 (mod 4), got q = {q}")
    c = np.zeros((q + 1, q + 1), np.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, GF(q).jacobsthal()
    zero = np.array([[1, -1], [-1, -1]], np.int8)
    one = np.array([[1, 1], [1, -1]], np.int8)
    return np.kron(c, one) + np.kron(np.eye(q + 1, dtype=np.int8), zero)


def kron(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """kron(a, b): Hadamard of order len(a) * len(b) when a and b are; index i = i_a * len(b) + i_b."""
    return np.kron(a, b)


@functools.lru_cache(maxsize=None)
def recipe(m: int) -> tuple | None:
    """How to build a Hadamard matrix of order m with the constructions above, or None:
    ("sylvester", k) | ("paley1", q) | ("paley2", q) | ("kron", m1, m2). Paley before Kronecker."""
    if m in (1, 2):
        return ("sylvester", m - 1)
    if m < 1 or m % 4:
        return None
    if m & (m - 1) == 0:
        return ("sylvester", m.bit_length() - 1)
    if prime_power(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    if prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    for d in range(2, math.isqrt(m) + 1):
        if m % d == 0 and recipe(d) and recipe(m // d):
            return ("kron", d, m // d)
    return None


@functools.lru_cache(maxsize=64)
def _small(m: int) -> np.ndarray:
    r = recipe(m)
    if r is None:
        raise ValueError(f"no Hadamard construction of order m = {m} here (Sylvester, Paley I/II "
                         f"and Kronecker products)")
    kind, *args = r
    if kind == "kron":
        h = kron(_small(args[0]), _small(args[1]))
    else:
        h = {"sylvester": sylvester, "paley1": paley1, "paley2": paley2}[kind](args[0])
    h.flags.writeable = False  # cached: shared by every caller
    return h


def small_hadamard(m: int) -> np.ndarray:
    """S_m (m, m) int8, read-only (cached), built by `recipe(m)`; ValueError naming m if none."""
    return _small(_positive_int(m, "m"))


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, k) with n = m * 2^k and a constructible Hadamard matrix of order m, the smallest such
    m (1 when n is a power of two). ValueError naming n when none of the orders odd(n) * 2^j
    (2^j dividing n) can be built: e.g. n = 6 or 10 (orders other than 1 and 2 are multiples
    of 4), or n = 92 (92 = 4 * 23 has no Paley or Kronecker construction here)."""
    n = _positive_int(n, "n")
    k2 = (n & -n).bit_length() - 1  # 2-adic valuation
    odd = n >> k2
    for j in range(k2 + 1):
        if recipe(odd << j) is not None:
            return odd << j, k2 - j
    raise ValueError(f"no Hadamard transform of size n = {n} = {odd} * 2^{k2}: none of the orders "
                     f"{odd} * 2^j (j <= {k2}) has a Sylvester, Paley I/II or Kronecker construction")


def hadamard_matrix(n: int, normalize: bool = True, dtype=np.float64) -> np.ndarray:
    """The dense H_n = kron(S_m, H_{2^k}) of hadamard_factors(n): orthonormal (H H^T = I) in
    `dtype` when normalize, else the +-1 matrix as int8 (H H^T = n I). n * n entries: for the
    test oracle and benchmarks; the fast transform never forms it."""
    m, k = hadamard_factors(n)
    if not normalize:
        return kron(small_hadamard(m), sylvester(k))
    dt = np.dtype(dtype)
    h = kron(small_hadamard(m).astype(dt), sylvester(k).astype(dt))
    h *= dt.type(1.0 / math.sqrt(n))
    return h


MAX_ORTHOGONAL_ORDER = 256  # the dense m-term sum of the fast transform grows with m


def orthogonal_factor(n: int, seed) -> np.ndarray:
    """S (m, m) float64 with S S^T = m I, m the odd part of n: sqrt(m) times a random orthogonal
    matrix (QR of a Gaussian, signs fixed by R's diagonal; numpy default_rng(seed)). Then
    kron(S, H_{2^k}) / sqrt(n) is orthonormal and mixes every input into every output, like a
    Hadamard: the rotation for sizes with no Hadamard construction here (stories260K's
    intermediate 172 = 43 * 4). Its entries are not +-1, so float32 kernels round S once."""
    n = _positive_int(n, "n")
    m = n >> ((n & -n).bit_length() - 1)
    if m > MAX_ORTHOGONAL_ORDER:
        raise ValueError(f"n = {n}: its odd part {m} exceeds MAX_ORTHOGONAL_ORDER = "
                         f"{MAX_ORTHOGONAL_ORDER} (the transform's dense m-term sum)")
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    return q * math.sqrt(m)


def random_signs(n: int, seed) -> np.ndarray:
    """d (n,) float64 of independent +-1 (numpy default_rng(seed))."""
    n = _positive_int(n, "n")
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)


def random_hadamard(n: int, seed) -> np.ndarray:
    """QuaRot's randomized Hadamard R = H diag(d) (n, n) float64, H = hadamard_matrix(n), d =
    random_signs(n, seed): still orthonormal, but the rotation varies with the seed (QuaRot reports
    the random signs help at 4 bits). Online it is a sign flip then the fast transform:
    x R^T = (x * d) H^T, i.e. sasq.ops.hadamard(x * d); its inverse is sasq.ops.hadamard(y,
    transpose=True) * d."""
    return hadamard_matrix(n) * random_signs(n, seed)[None, :]
