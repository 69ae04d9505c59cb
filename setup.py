"""Builds the C core `sasq._C` from csrc/ with portable flags.

SIMD tiers (AVX-512 VNNI, AVX2) are compiled with per-function target attributes inside the
kernels and chosen at run time, so the default build never uses -march=native. No -ffast-math:
the quantization kernels depend on exact IEEE rounding (rintf, half-to-even).
"""
import glob
import os

import numpy as np
from setuptools import Extension, setup

sources = sorted(glob.glob(os.path.join("csrc", "*.c")))
sources = [s for s in sources if not os.path.basename(s).startswith("test_")]

extra = ["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
if os.environ.get("SASQ_NATIVE") == "1":  # opt-in only; never the default
    extra.append("-march=native")

ext = Extension(
    "sasq._C",
    sources=sources,
    include_dirs=[np.get_include(), "csrc"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=extra,
    extra_link_args=["-pthread", "-lm"],
)

setup(ext_modules=[ext] if sources else [])
