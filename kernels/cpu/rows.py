"""Steps on one row of scores, shared by the CPU kernels.

Each works on one row as a contiguous 1-d array, so that LLVM vectorises its loops.
"""
import numpy as np

from ._jit import exp_nonpositive, jit, maxnum


@jit
def apply_mask_row(row, r, col0, mask):
    """Apply ``mask`` (a ``MaskArgs``) to ``row``, the keys from ``col0`` on of row ``r`` of the
    flattened (rows, cols) problem."""
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
def mask_after(row, first_masked):
    """Causal mask: the keys of ``row`` from index ``first_masked`` on come after the query."""
    for j in range(max(first_masked, 0), row.shape[0]):
        row[j] = -np.inf


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
