"""Fused attention kernels for the CPU (Numba, parallel).

All kernels take prepared input (see ``fastattn._prepare``): C-contiguous arrays in the compute
dtype with the leading dims flattened, query head ``n`` using key/value head ``n // group``, and an
optional mask read in place: for score row ``r`` and key ``j`` the mask element is
``mask_row_offset[r] + j * mask_col_stride`` of ``mask_keep`` (``mask_kind`` 1: a bool mask as bytes,
0 drops the key) or of ``mask_add`` (``mask_kind`` 2: a float mask, added to the score);
``mask_kind`` 0 is no mask. Outputs are written into arrays the caller allocates.

The block products go through ``np.dot`` (SciPy's BLAS). The caller must keep that BLAS
single-threaded while a kernel runs: these kernels already use every core through ``prange``.
"""
import math

import numpy as np
from numba import prange

from ._jit import exp, jit, maxnum, parallel_jit


# --- shared row steps --------------------------------------------------------------------------

@jit
def apply_mask(scores, row0, col0, mask_add, mask_keep, mask_row_offset, mask_col_stride,
               mask_kind):
    """Apply the mask to a block of scores whose first row/col are ``row0``/``col0`` of the
    flattened (rows, cols) problem."""
    bq, bk = scores.shape
    if mask_kind == 0:
        return
    for i in range(bq):
        base = mask_row_offset[row0 + i] + col0 * mask_col_stride
        if mask_col_stride == 1:  # a row of the mask itself: contiguous, so the loops vectorise
            if mask_kind == 1:
                for j in range(bk):
                    if mask_keep[base + j] == 0:
                        scores[i, j] = -np.inf
            else:
                for j in range(bk):
                    scores[i, j] += mask_add[base + j]
        else:  # broadcast along the keys (stride 0), or a softmax along another axis
            if mask_kind == 1:
                for j in range(bk):
                    if mask_keep[base + j * mask_col_stride] == 0:
                        scores[i, j] = -np.inf
            else:
                for j in range(bk):
                    scores[i, j] += mask_add[base + j * mask_col_stride]


@jit
def add_mask_and_causal(scores, row0, col0, rows_total, mask_add, mask_keep, mask_row_offset,
                        mask_col_stride, mask_kind, causal):
    """Apply the mask to a block of scores whose first row/col are ``row0``/``col0`` of the
    (rows_total, S) score plane of head ``row0 // rows_total``; set keys after the query
    (causal, top-left) to -inf."""
    bq, bk = scores.shape
    apply_mask(scores, row0, col0, mask_add, mask_keep, mask_row_offset, mask_col_stride,
               mask_kind)
    if causal:
        first_row = row0 % rows_total
        for i in range(bq):
            for j in range(max(first_row + i + 1 - col0, 0), bk):
                scores[i, j] = -np.inf


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
        e = exp(row[j] - row_max) if row_max != -np.inf else row[j]
        row[j] = e
        row_sum += e
    if row_sum != row_sum:
        for j in range(n):
            row[j] = np.nan
    elif row_sum > 0:
        inv = 1 / row_sum
        for j in range(n):
            row[j] *= inv


# --- softmax -----------------------------------------------------------------------------------

@parallel_jit
def softmax(x, mask_add, mask_keep, mask_row_offset, mask_col_stride, mask_kind, block_rows,
            out):
    """Row-wise softmax of ``x`` (rows, cols) into ``out``."""
    rows, cols = x.shape
    n_blocks = (rows + block_rows - 1) // block_rows
    for b in prange(n_blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, rows)
        block = out[r0:r1]
        block[:] = x[r0:r1]
        apply_mask(block, r0, 0, mask_add, mask_keep, mask_row_offset, mask_col_stride, mask_kind)
        for i in range(r1 - r0):
            softmax_row_inplace(block[i])


# --- similarity --------------------------------------------------------------------------------

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


# --- attention weights (the full L x S matrix, for inspection) --------------------------------

@parallel_jit
def attention_weights(q, k, group, scale, causal, mask_add, mask_keep, mask_row_offset,
                      mask_col_stride, mask_kind, block_q, out):
    """softmax(scale * q k^T + mask) into out (N, L, S)."""
    N, L, _ = q.shape
    n_qblocks = (L + block_q - 1) // block_q
    for item in prange(N * n_qblocks):
        n = item // n_qblocks
        q0 = (item % n_qblocks) * block_q
        q1 = min(q0 + block_q, L)
        scores = out[n, q0:q1]
        np.dot(q[n, q0:q1] * scale, k[n // group].T, scores)
        add_mask_and_causal(scores, n * L + q0, 0, L, mask_add, mask_keep, mask_row_offset,
                            mask_col_stride, mask_kind, causal)
        for i in range(q1 - q0):
            softmax_row_inplace(scores[i])


# --- fused attention ---------------------------------------------------------------------------

@jit
def online_softmax_step(scores, row_max, row_sum, acc):
    """Fold one block of scores into the running max and sum of each row: rescale the rows of
    ``acc`` to the new max and turn ``scores`` into the block's unnormalised weights."""
    bq, bk = scores.shape
    for i in range(bq):
        new_max = row_max[i]
        for j in range(bk):
            new_max = maxnum(new_max, scores[i, j])
        if new_max == -np.inf:
            # Every key so far is masked: weights 0 (and NaN stays NaN), no exp(-inf - -inf).
            for j in range(bk):
                s = scores[i, j]
                scores[i, j] = s - s if s != -np.inf else 0.0
            row_sum[i] += scores[i, :].sum()
            continue
        alpha = exp(row_max[i] - new_max)
        block_sum = scores.dtype.type(0.0)
        for j in range(bk):
            p = exp(scores[i, j] - new_max)
            scores[i, j] = p
            block_sum += p
        row_sum[i] = row_sum[i] * alpha + block_sum
        row_max[i] = new_max
        for c in range(acc.shape[1]):
            acc[i, c] *= alpha


@parallel_jit
def attention(q, k, v, group, scale, causal, mask_add, mask_keep, mask_row_offset, mask_col_stride,
              mask_kind, block_q, block_k, out, lse):
    """Flash-style attention: out (N, L, Ev) and lse (N, L), never storing the L x S scores.

    Each work item is one block of queries of one head; it walks the key/value blocks once,
    keeping per row the running max, the running sum of exp(score - max) and the accumulator
    sum(exp(score - max) * v). Causal attention stops at the diagonal block.
    """
    N, L, _ = q.shape
    S = k.shape[1]
    Ev = v.shape[2]
    n_qblocks = (L + block_q - 1) // block_q
    for item in prange(N * n_qblocks):
        n = item // n_qblocks
        kv = n // group
        q0 = (item % n_qblocks) * block_q
        q1 = min(q0 + block_q, L)
        bq = q1 - q0
        q_block = q[n, q0:q1] * scale
        scores_buffer = np.empty(bq * block_k, q.dtype)
        weighted_values = np.empty((bq, Ev), q.dtype)
        acc = np.zeros((bq, Ev), q.dtype)
        row_max = np.full(bq, -np.inf, q.dtype)
        row_sum = np.zeros(bq, q.dtype)
        # Top-left causal: query i sees keys j <= i, so blocks past the last row's key are skipped.
        k_end = min(S, q1) if causal else S
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, k_end)
            scores = scores_buffer[:bq * (k1 - k0)].reshape((bq, k1 - k0))
            np.dot(q_block, k[kv, k0:k1].T, scores)
            add_mask_and_causal(scores, n * L + q0, k0, L, mask_add, mask_keep, mask_row_offset,
                                mask_col_stride, mask_kind, causal and k1 - 1 > q0)
            online_softmax_step(scores, row_max, row_sum, acc)
            np.dot(scores, v[kv, k0:k1], weighted_values)
            acc += weighted_values
        for i in range(bq):
            total = row_sum[i]
            if total > 0 or total != total:
                inv = 1 / total
                for c in range(Ev):
                    out[n, q0 + i, c] = acc[i, c] * inv
                lse[n, q0 + i] = row_max[i] + math.log(total)
            else:  # no key takes part: zeros, and log(0) = -inf
                for c in range(Ev):
                    out[n, q0 + i, c] = 0.0
                lse[n, q0 + i] = -np.inf
