"""Kernel arguments that travel together, as small named tuples.

Numba passes a named tuple of arrays and scalars to a jitted function at no cost and caches
functions that take one, so each option family is one argument: kernel signatures stay short and
every call site says what it passes. The host side (``fastattn._numba``) builds them.
"""
from typing import NamedTuple

import numpy as np


class MaskArgs(NamedTuple):
    """A mask read in place. For score row ``r`` (of the flattened (rows, cols) problem) and key
    ``j`` the element is ``row_offset[r] + j * col_stride`` of ``keep`` (``kind`` 1: a bool mask as
    bytes, 0 drops the key) or of ``add`` (``kind`` 2: a float mask, added to the score); ``kind``
    0 is no mask. The array a kind does not read is a one-element stand-in, so each dtype
    compiles once."""
    add: np.ndarray         # compute dtype
    keep: np.ndarray        # uint8
    row_offset: np.ndarray  # int64 (rows,)
    col_stride: int
    kind: int
