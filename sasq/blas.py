"""NumPy's BLAS thread count, and the small-GEMM rule that keeps tiny products on one thread.

sasq's NumPy worker threads (attention heads, SwiGLU chunks) follow the same count, and
`sasq.set_num_threads` sets it together with the C kernels' pool.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

# GEMMs with fewer multiply-adds (per matrix product) than this run on one BLAS thread: for
# small shapes the threads' start/stop costs more than they save, and on a busy machine
# OpenBLAS's spinning threads made a (512, 64) x (64, 64) GEMM 100x slower (stories260K's
# whole forward is small GEMMs).
SMALL_GEMM_MACS = 1 << 25


class _OpenBLAS:
    """numpy's bundled OpenBLAS thread count through ctypes; a no-op when not found."""

    def __init__(self):
        self.get = self.set = None
        libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                      "*openblas*.so*"))
        for lib in libs:
            try:
                dll = ctypes.CDLL(lib)
            except OSError:
                continue
            for pre in ("scipy_openblas_", "openblas_"):
                for suf in ("64_", "_64_", ""):
                    g = getattr(dll, f"{pre}get_num_threads{suf}", None)
                    st = getattr(dll, f"{pre}set_num_threads{suf}", None)
                    if g is not None and st is not None:
                        g.restype, st.argtypes = ctypes.c_int, [ctypes.c_int]
                        self.get, self.set = g, st
                        return


_BLAS = None


def num_threads():
    """numpy's BLAS thread count: the parallelism sasq's own worker threads use too."""
    global _BLAS
    if _BLAS is None:
        _BLAS = _OpenBLAS()
    return _BLAS.get() if _BLAS.get is not None else 1


@contextlib.contextmanager
def blas_threads_for(macs):
    """One BLAS thread inside the block when the GEMM work is small; yields the thread count
    outside (1 when numpy's OpenBLAS was not found)."""
    n = num_threads()
    if macs >= SMALL_GEMM_MACS or n <= 1:
        yield n
        return
    _BLAS.set(1)
    try:
        yield n
    finally:
        _BLAS.set(n)


def matmul(a, b):
    """np.matmul on one BLAS thread when each matrix product is small (SMALL_GEMM_MACS)."""
    with blas_threads_for(a.shape[-2] * a.shape[-1] * b.shape[-1]):
        return np.matmul(a, b)


def set_num_threads(n: int) -> None:
    """Set numpy's BLAS thread count (no-op when numpy's OpenBLAS was not found)."""
    num_threads()
    if _BLAS.set is not None:
        _BLAS.set(int(n))
