"""CPU kernels that return whole matrices: softmax, similarity and the attention weights.

``similarity`` and ``attention_weights`` go through ``np.dot`` (SciPy's BLAS); the caller must
keep that BLAS single-threaded while they run: they already use every core through ``prange``.
"""
import numpy as np
from numba import prange

from ._jit import parallel_jit
from .rows import apply_mask_row, pattern_row, softmax_row_inplace


@parallel_jit
def softmax(x, mask, block_rows, out):
    """Row-wise softmax of ``x`` (rows, cols) into ``out``, with ``mask`` a ``MaskArgs``."""
    rows, cols = x.shape
    n_blocks = (rows + block_rows - 1) // block_rows
    for b in prange(n_blocks):
        for r in range(b * block_rows, min((b + 1) * block_rows, rows)):
            row = out[r]
            for j in range(cols):  # not row[:] = x[r]: its shape check takes seconds to compile
                row[j] = x[r, j]
            apply_mask_row(row, r, 0, mask)
            softmax_row_inplace(row)


@parallel_jit
def similarity(a, b, scale, block_rows, out):
    """out[n] = scale * a[n] @ b[n].T for a (N, La, E), b (N, Lb, E), out (N, La, Lb)."""
    N, La, _ = a.shape
    n_blocks = (La + block_rows - 1) // block_rows
    for item in prange(N * n_blocks):
        n = item // n_blocks
        r0 = (item % n_blocks) * block_rows
        r1 = min(r0 + block_rows, La)
        block = out[n, r0:r1]
        np.dot(a[n, r0:r1], b[n].T, block)
        if scale != 1:
            block *= scale


@parallel_jit
def attention_weights(q, k, group, scale, pattern, mask, block_q, out):
    """softmax(scale * q k^T + mask) into out (N, L, S) (the full matrix, for inspection), with
    ``pattern`` a ``Pattern`` (alignment, window, softcap, ALiBi)."""
    N, L, _ = q.shape
    n_qblocks = (L + block_q - 1) // block_q
    for item in prange(N * n_qblocks):
        n = item // n_qblocks
        q0 = (item % n_qblocks) * block_q
        q1 = min(q0 + block_q, L)
        scores = out[n, q0:q1]
        np.dot(q[n, q0:q1] * scale, k[n // group].T, scores)
        for i in range(q1 - q0):
            pattern_row(scores[i], n * L + q0 + i, n, q0 + i + pattern.offset, 0, mask, pattern,
                        True)
            softmax_row_inplace(scores[i])
