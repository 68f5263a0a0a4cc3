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


class Pattern(NamedTuple):
    """Which keys each query row sees and what is done to its scores (``fastattn._prepare``'s
    ``Variants`` as the kernels read it). Query row ``i`` sits at position ``p = i + offset``
    among the keys and sees key ``j`` only if ``p - left <= j <= p + right`` (``NO_LIMIT`` = 2^62
    for an unbounded side, so the sums stay far inside int64; causal attention is ``right`` 0).
    ``softcap`` > 0: a score ``s`` (already scaled) becomes ``softcap * tanh(s / softcap)``
    before any mask; 0: none. ``has_alibi``: ``-alibi[n] * |p - j|`` is added to the scores of
    flattened query head ``n`` after the masks; else ``alibi`` is a one-element stand-in."""
    offset: int
    left: int
    right: int
    softcap: float          # compute dtype
    alibi: np.ndarray       # compute dtype (N,), or (1,) when not has_alibi
    has_alibi: bool
