"""The symmetric integer grid (DESIGN section 2), in one place.

b bits: codes q in [-qmax, qmax], qmax = 2**(b-1) - 1 (INT8: [-127, 127]; the grid stays symmetric
and -128 is never produced). Every module that needs qmax calls `qmax` here.
"""
from __future__ import annotations

import numbers

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, name: str = "bits") -> int:
    """bits as an int in [MIN_BITS, MAX_BITS]; TypeError for a non-integer (bool included),
    ValueError outside the range, each naming the argument."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return int(bits)


def qmax(bits) -> int:
    """Largest code of the symmetric `bits`-bit grid: 2**(bits-1) - 1 (127 for INT8)."""
    return (1 << (check_bits(bits) - 1)) - 1
