"""Activations that carry their int8 codes: the bridge from a static quantizer to the INT8 GEMM.

A quantizer whose output feeds a linear layer returns a QActivation: the fake-quant float values
(what the float graph and its backward use) with `codes` (int8, same shape) and `a_scale` (one
float, or one float32 per row) attached, codes * a_scale == the values. A linear whose weight
has a packed int8 form then runs sasq.ops.linear_int8 on the codes: exact integer products and
one store multiply, the same kernel and the same float operations as the deployed engine, so
the trained graph and sasq.StaticInt8Model compute the same numbers.
"""
from __future__ import annotations

import numpy as np


class QActivation(np.ndarray):
    codes: np.ndarray
    a_scale: object

    @classmethod
    def wrap(cls, values: np.ndarray, codes: np.ndarray, a_scale) -> "QActivation":
        out = values.view(cls)
        out.codes, out.a_scale = codes, a_scale
        return out


def linear(x, w: np.ndarray, packed=None):
    """y = x @ w.T; through the INT8 GEMM when x carries codes and the weight is packed
    (packed = (PackedWeights, w_scales)); x (..., in) -> (..., out)."""
    if packed is not None and isinstance(x, QActivation):
        from sasq import ops
        y = ops.linear_int8(x.codes, packed[0], x.a_scale, packed[1])
        return y
    from sasq import layers as L
    return L.linear_forward(np.asarray(x), w)
