"""Kernel arguments that travel together, as small named tuples.

Numba passes a named tuple of arrays and scalars to a jitted function and caches functions that
take one, so each option family is one argument: kernel signatures stay short and every call site
says what it passes. The host side (``fastattn._numba``) builds them. The call types each field
in Python (about 1.6 us for 23 fields against 0.7 for a plain tuple, measured warm, and ten
times that on a decode step inside a model), so the per-step decode path builds its bundles in
compiled code (``decode.attend_sdpa_rows``).
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


class RowsLayout(NamedTuple):
    """Where the query, key, value, output and lse rows of a decode or varlen problem lie, as
    element offsets into flat 1-d views of the arrays (read in place, whatever their strides).

    Sequence ``b``'s query at position index t of head h starts at ``q_first[b] + t * q_pos +
    h * q_head``; its key j for key/value head g at ``table[b, j // block_size] * k_block +
    g * k_head + (j % block_size) * k_pos + k_first[b]`` (a contiguous cache is one block per
    row, a packed varlen batch one block with ``k_first`` the sequence's first row); values
    likewise; the output row and lse entry of (t, h) at ``out_first[b] + t * out_pos + h *
    out_head`` and ``lse_first[b] + t * lse_pos + h * lse_head``. Query t sits at key position
    ``pos_offset[b] + t``."""
    q_first: np.ndarray     # int64 (B,)
    q_pos: int
    q_head: int
    table: np.ndarray       # int64 (B, max_blocks)
    block_size: int
    k_first: np.ndarray     # int64 (B,)
    k_block: int
    k_head: int
    k_pos: int
    v_first: np.ndarray     # int64 (B,)
    v_block: int
    v_head: int
    v_pos: int
    out_first: np.ndarray   # int64 (B,)
    out_pos: int
    out_head: int
    lse_first: np.ndarray   # int64 (B,)
    lse_pos: int
    lse_head: int
    pos_offset: np.ndarray  # int64 (B,)
    group: int              # query heads per key/value head
    E: int
    Ev: int


class RowVariants(NamedTuple):
    """The variant options as the row kernels read them: key j takes part in a query at
    position p when p - left <= j <= p + right; ``softcap`` > 0 caps the scores; ``alibi``
    (B * Hq slopes, or a one-element stand-in when ``has_alibi`` is False) adds
    -slope * |p - j|, the slope of query head h of sequence b at ``b * heads + h``."""
    scale: float
    left: int
    right: int
    softcap: float
    alibi: np.ndarray
    has_alibi: bool
    heads: int
