"""Steps on one row of scores, shared by the CPU kernels.

Each works on one row as a contiguous 1-d array, so that LLVM vectorises its loops.
"""
import numpy as np

from ._jit import exp_nonpositive, jit, maxnum, prefer_512_bit_vectors, tanh


@jit
def apply_mask_row(row, r, col0, mask):
    """Apply ``mask`` (a ``MaskArgs``) to ``row``, the keys from ``col0`` on of row ``r`` of the
    flattened (rows, cols) problem."""
    prefer_512_bit_vectors()
    if mask.kind == 0:
        return
    n = row.shape[0]
    stride = mask.col_stride
    base = mask.row_offset[r] + col0 * stride
    # Contiguous slices and selects rather than branches, so that the loops vectorise (an index
    # like base + j may be negative as far as Numba knows, and its wraparound check would not).
    if stride == 1:  # a row of the mask itself
        if mask.kind == 1:
            keep = mask.keep[base:base + n]
            for j in range(n):
                row[j] = row[j] if keep[j] != 0 else -np.inf
        else:
            add = mask.add[base:base + n]
            for j in range(n):
                row[j] += add[j]
    elif stride == 0:  # one mask value for the whole row (broadcast along the keys)
        if mask.kind == 1:
            if mask.keep[base] == 0:
                row[:] = -np.inf
        else:
            value = mask.add[base]
            for j in range(n):
                row[j] += value
    else:  # a softmax along another axis of the mask
        if mask.kind == 1:
            for j in range(n):
                row[j] = row[j] if mask.keep[base + j * stride] != 0 else -np.inf
        else:
            for j in range(n):
                row[j] += mask.add[base + j * stride]


@jit
def mask_outside(row, first_kept, end_kept):
    """Window (causal included): only the keys of ``row`` with index in [first_kept, end_kept)
    take part (either bound may lie outside the row). Two fills rather than a select per key:
    they vectorise and touch only the keys they drop."""
    n = row.shape[0]
    for j in range(min(max(first_kept, 0), n)):
        row[j] = -np.inf
    for j in range(min(max(end_kept, 0), n), n):
        row[j] = -np.inf


@jit
def mask_outside_rows(scores, stride, keys, rows, position0, left, right):
    """``mask_outside`` for rows 0..rows of a block of scores (row i: ``scores[i * stride:]
    [:keys]``), row i sitting at key ``position0 + i`` of the block and seeing the keys from
    ``left`` before it to ``right`` after it. One call for the block (the loops of
    ``mask_outside``, inline): a call per row cost about as much as the fills, in Numba's
    reference counting of the arguments."""
    for i in range(rows):
        row = scores[i * stride:i * stride + keys]
        first_kept = position0 + i - left
        end_kept = position0 + i + right + 1
        for j in range(min(max(first_kept, 0), keys)):
            row[j] = -np.inf
        for j in range(min(max(end_kept, 0), keys), keys):
            row[j] = -np.inf


@jit
def softcap_row(row, softcap):
    """Logit softcapping (Gemma 2): s -> softcap * tanh(s / softcap)."""
    prefer_512_bit_vectors()
    inv = row.dtype.type(1.0) / softcap  # (1 / a float32 would be a float64 in Numba)
    for j in range(row.shape[0]):
        row[j] = softcap * tanh(row[j] * inv)


@jit
def alibi_row(row, slope, position):
    """ALiBi: adds -slope * |position - j| to key j of ``row`` (``position``: the query's position
    minus the row's first key, so possibly outside the row)."""
    prefer_512_bit_vectors()
    # The distance as a float counting down, exact for any |position - j| < 2^24: AVX2 has no
    # vector int64 -> float conversion, so dtype(position - j) would make the loop scalar.
    distance = row.dtype.type(position)
    one = row.dtype.type(1.0)  # (a bare 1 would make distance a float64)
    for j in range(row.shape[0]):
        row[j] -= slope * abs(distance)
        distance -= one


@jit
def alibi_rows(scores, stride, keys, rows, slope, position0):
    """``alibi_row`` for rows 0..rows of a block of scores (row i: ``scores[i * stride:]
    [:keys]``, its query at key ``position0 + i`` of the block), in one call."""
    prefer_512_bit_vectors()
    one = scores.dtype.type(1.0)
    for i in range(rows):
        row = scores[i * stride:i * stride + keys]
        distance = scores.dtype.type(position0 + i)  # (see alibi_row)
        for j in range(keys):
            row[j] -= slope * abs(distance)
            distance -= one


@jit
def pattern_row(row, r, n, position, col0, mask, pattern, windowed):
    """Every per-score step between the block product and the softmax, in the order of the
    semantics, for ``row``, the keys from ``col0`` on of flattened score row ``r`` (query head
    ``n``, at key ``position``): softcap, ``mask`` (a ``MaskArgs``), the window (skipped unless
    ``windowed``: the caller knows when the row lies wholly inside it) and ALiBi. (The fused
    kernel does the same on a whole block of rows at a time.)"""
    if pattern.softcap > 0:
        softcap_row(row, pattern.softcap)
    apply_mask_row(row, r, col0, mask)
    if windowed:
        mask_outside(row, position - pattern.left - col0, position + pattern.right + 1 - col0)
    if pattern.has_alibi:
        alibi_row(row, pattern.alibi[n], position - col0)


@jit
def softmax_row_inplace(row):
    """Stable softmax of one row in place; a row with nothing kept (all -inf) becomes zeros."""
    n = row.shape[0]
    row_max = row.dtype.type(-np.inf)
    for j in range(n):
        row_max = maxnum(row_max, row[j])
    if row_max == -np.inf:
        for j in range(n):
            # -inf -> 0; a NaN stays NaN and so does the row, below
            row[j] = row[j] - row[j] if row[j] != -np.inf else 0.0
    row_sum = row.dtype.type(0.0)
    for j in range(n):
        e = exp_nonpositive(row[j] - row_max) if row_max != -np.inf else row[j]
        row[j] = e
        row_sum += e
    if row_sum != row_sum:
        for j in range(n):
            row[j] = np.nan
    elif row_sum > 0:
        inv = 1 / row_sum
        for j in range(n):
            row[j] *= inv
