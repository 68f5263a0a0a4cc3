"""The fused attention backward for the CPU (Numba, parallel): FlashAttention-2's backward, never
storing the L x S weights.

For one key block and one query block it recomputes the block of scores from q and k, the
weights from the forward's lse (weights = exp(scores - lse)), and then

    grad_v += weights^T grad_out          grad_weights = grad_out v^T
    grad_s  = weights * (grad_weights - D) * softcap'      (D = rowsum(grad_out * out))
    grad_k += grad_s^T (scale q)          grad_q += scale grad_s k

Work items own their outputs: one per key/value head, walking its key blocks, and for each its
query heads (GQA, in order) and the query blocks that see the key block; so grad_k and grad_v of
a key block sum in one fixed order, grad_q accumulates over the key blocks in order in the work
item's own rows, no atomics, and the bits do not depend on the thread count. The five block
products are the forward's register tiles (``tile``), over operands laid out once per call by
``pack_backward``; blocks are computed transposed (keys as rows) so that grad_k and grad_v
accumulate along the rows of the tiles, and grad_q reads grad_s transposed in place
(``tile_product_add_strided``).
"""
import math
from typing import NamedTuple

import numpy as np
from numba import prange

from ._jit import exp_nonpositive, jit, parallel_jit
from .tile import ROWS, tile_product, tile_product_add, tile_product_add_strided, tile_width


class ScoreOptions(NamedTuple):
    """The score variants as the backward reads them (see ``fastattn._prepare.Variants``): query
    row i sits at position i + ``offset``; key j takes part only if p(i) - ``left`` <= j <=
    p(i) + ``right``; ``softcap`` > 0 caps the scores; ``alibi[n]`` is the ALiBi slope of query
    head n when ``has_alibi``. ``scale`` multiplies the similarities."""
    scale: float
    offset: int
    left: int
    right: int
    softcap: float
    alibi: np.ndarray
    has_alibi: bool


@parallel_jit
def pack_backward(q, k, v, grad_out, out, lse, scale, q_panels, q_rows, grad_out_panels,
                  grad_out_rows, k_rows, v_rows, row_lse, row_delta):
    """Lay the operands out as the tiles read them, zero-padded to whole blocks and tiles
    (cols = ``tile_cols``, Lp, Sp, Ep and Evp the padded sizes):

    - ``q_panels`` (N, Lp / cols, E * cols): scale * q transposed, a tile of queries at a time
      (the layout of the forward's key panels), the right operand of q k^T;
    - ``q_rows`` (N, Lp, Ep): scale * q by rows, the right operand of grad_k += grad_s^T q (a
      tile reads cols features of consecutive rows);
    - ``grad_out_panels`` (N, Lp / cols, Ev * cols) and ``grad_out_rows`` (N, Lp, Evp) likewise,
      for grad_out v^T and grad_v += weights^T grad_out;
    - ``k_rows`` (Nkv, Sp, Ep) and ``v_rows`` (Nkv, Sp, Evp) by rows: the left operands (keys as
      rows), and k the right one of grad_q += grad_s k;
    - ``row_lse`` (N, Lp): the forward's lse, with -inf (no key) and the padding rows as +inf so
      that exp(score - lse) is 0 there; ``row_delta`` (N, Lp): D = rowsum(grad_out * out).
    Copies by rows are contiguous loops (they vectorise); only the panels transpose.
    """
    N, L, E = q.shape
    n_kv, S, Ev = v.shape
    cols = tile_width(q)
    n_panels = q_panels.shape[1]
    Ep = k_rows.shape[2]
    Evp = v_rows.shape[2]
    zero = q.dtype.type(0.0)
    for item in prange(N * n_panels):
        n = item // n_panels
        panel_index = item % n_panels
        i0 = panel_index * cols
        qp = q_panels[n, panel_index]
        gp = grad_out_panels[n, panel_index]
        rows = min(cols, L - i0)
        if rows < cols:  # the last panel: padding queries are zeros, with lse +inf
            qp[:] = 0
            gp[:] = 0
        for ii in range(rows):
            i = i0 + ii
            q_row = q[n, i]
            qr = q_rows[n, i]
            for d in range(E):
                qr[d] = q_row[d] * scale
            for d in range(E, Ep):
                qr[d] = zero
            for d in range(E):
                qp[d * cols + ii] = qr[d]
            g_row = grad_out[n, i]
            o_row = out[n, i]
            gr = grad_out_rows[n, i]
            delta = zero
            for c in range(Ev):
                gr[c] = g_row[c]
                delta += g_row[c] * o_row[c]
            for c in range(Ev, Evp):
                gr[c] = zero
            for c in range(Ev):
                gp[c * cols + ii] = gr[c]
            row_delta[n, i] = delta
            row_lse[n, i] = np.inf if lse[n, i] == -np.inf else lse[n, i]
        for ii in range(rows, cols):
            i = i0 + ii
            row_delta[n, i] = zero
            row_lse[n, i] = np.inf
            q_rows[n, i, :] = zero
            grad_out_rows[n, i, :] = zero
    Sp = k_rows.shape[1]
    for item in prange(n_kv * Sp):
        m = item // Sp
        j = item % Sp
        kr = k_rows[m, j]
        vr = v_rows[m, j]
        if j < S:
            k_row = k[m, j]
            v_row = v[m, j]
            for d in range(E):
                kr[d] = k_row[d]
            for c in range(Ev):
                vr[c] = v_row[c]
        else:
            for d in range(E):
                kr[d] = zero
            for c in range(Ev):
                vr[c] = zero
        for d in range(E, Ep):
            kr[d] = zero
        for c in range(Ev, Evp):
            vr[c] = zero


@jit
def score_variants_row(scores, cap_slope, j, n, L, q0, bq, options, mask):
    """Row j (a key) of a transposed block of scores (similarities * scale of the block's
    queries) through the variants in the forward's order: softcap (its slope 1 - tanh^2 kept in
    ``cap_slope`` for the gradient), mask, window, ALiBi."""
    width = scores.shape[0]
    dtype = scores.dtype
    cap = dtype.type(options.softcap)
    if cap > 0:
        inv_cap = dtype.type(1.0) / cap
        for i in range(width):
            t = math.tanh(scores[i] * inv_cap)
            scores[i] = cap * t
            cap_slope[i] = 1 - t * t
    if mask.kind != 0:
        stride = mask.col_stride
        for i in range(bq):
            at = mask.row_offset[n * L + q0 + i] + j * stride
            if mask.kind == 1:
                if mask.keep[at] == 0:
                    scores[i] = -np.inf
            else:
                scores[i] += mask.add[at]
    # the window keeps the queries with j - right <= p(i) <= j + left: a run of the block's
    # columns (NO_LIMIT is far enough from int64's ends for these sums)
    first = j - options.right - options.offset - q0
    last = j + options.left - options.offset - q0
    if first > 0 or last < width - 1:
        for i in range(min(max(first, 0), width)):
            scores[i] = -np.inf
        for i in range(max(last + 1, 0), width):
            scores[i] = -np.inf
    if options.has_alibi:
        slope = options.alibi[n]
        for i in range(width):
            scores[i] -= slope * dtype.type(abs(q0 + i + options.offset - j))


@jit
def weights_and_grad_rows(scores, grad_weights, cap_slope, keys, stride, width, lse, delta,
                          capped):
    """Rows 0..keys (``stride`` apart, ``width`` used) of a transposed block: the scores become
    the weights exp(score - lse), ``grad_weights`` (grad_out . v_j) becomes
    grad_s = weights * (grad_weights - D) * softcap' (with ``capped``)."""
    zero = scores.dtype.type(0.0)
    for jj in range(keys):
        # (slices from 0: an index like jj * stride + i may be negative as far as Numba knows,
        # and its wraparound check keeps the loop from vectorising)
        row = scores[jj * stride:jj * stride + width]
        grad = grad_weights[jj * stride:jj * stride + width]
        for i in range(width):
            # min(.., 0): exp_nonpositive's domain; the forward's lse is never below a score
            weight = exp_nonpositive(min(row[i] - lse[i], zero))
            row[i] = weight
            grad[i] = weight * (grad[i] - delta[i])
        if capped:
            slope = cap_slope[jj * stride:jj * stride + width]
            for i in range(width):
                grad[i] *= slope[i]


@parallel_jit
def attention_backward(q_panels, q_rows, grad_out_panels, grad_out_rows, k_rows, v_rows,
                       row_lse, row_delta, L, S, group, options, mask, block_q, block_k,
                       grad_q_acc, grad_q, grad_k, grad_v):
    """grad_q (N, L, E), grad_k (Nkv, S, E), grad_v (Nkv, S, Ev) from the operands of
    ``pack_backward``; ``grad_q_acc`` (N, Lp, Ep) is scratch.

    ``block_q`` must be a multiple of both the tile's rows (6) and columns (``tile_cols``), and
    ``block_k`` of its rows; the padded lengths Lp and Sp are multiples of them. Memory beyond
    the packed operands: per work item three block_k x block_q blocks and two block_k x E ones.
    """
    N, Lp, Ep = grad_q_acc.shape
    n_kv, Sp, Evp = v_rows.shape
    E = grad_q.shape[2]
    Ev = grad_v.shape[2]
    dtype = k_rows.dtype
    cols = tile_width(k_rows)
    panels_per_head = Lp // cols
    qp_flat = q_panels.reshape(-1)
    qr_flat = q_rows.reshape(-1)
    gp_flat = grad_out_panels.reshape(-1)
    gr_flat = grad_out_rows.reshape(-1)
    k_flat = k_rows.reshape(-1)
    v_flat = v_rows.reshape(-1)
    acc_flat = grad_q_acc.reshape(-1)
    for m in prange(n_kv):
        # scores, then weights (keys as rows); grad of the weights, then of the scores
        scores = np.empty(block_k * block_q, dtype)
        grad_s_t = np.empty(block_k * block_q, dtype)
        cap_slope = np.empty(block_k * block_q, dtype)
        grad_k_block = np.empty(block_k * Ep, dtype)
        grad_v_block = np.empty(block_k * Evp, dtype)
        for n in range(m * group, (m + 1) * group):
            for x in range(n * Lp * Ep, (n + 1) * Lp * Ep):
                acc_flat[x] = 0.0
        for k0 in range(0, S, block_k):
            keys = min(block_k, S - k0)
            key_rows = -(-keys // ROWS) * ROWS
            for x in range(block_k * Ep):
                grad_k_block[x] = 0.0
            for x in range(block_k * Evp):
                grad_v_block[x] = 0.0
            # the queries that see a key of the block: j - right <= p(i) <= j + left
            i_first = max(k0 - options.right - options.offset, 0)
            i_last = min(k0 + keys - 1 + options.left - options.offset, L - 1)
            for n in range(m * group, (m + 1) * group):
                for q0 in range(i_first // block_q * block_q, i_last + 1, block_q):
                    bq = min(block_q, L - q0)
                    query_panels = -(-bq // cols)
                    query_rows = -(-bq // ROWS) * ROWS
                    q_panel0 = n * panels_per_head + q0 // cols
                    # one product at a time, a tile of keys through every query panel: the
                    # panels of one operand (block_q x E) stay in the L1 cache, where those of
                    # both did not
                    for t0 in range(0, key_rows, ROWS):
                        for panel in range(query_panels):
                            tile_product(k_flat, (m * Sp + k0 + t0) * Ep, Ep, qp_flat,
                                         (q_panel0 + panel) * E * cols, cols, scores,
                                         t0 * block_q + panel * cols, block_q, E)
                    for t0 in range(0, key_rows, ROWS):
                        for panel in range(query_panels):
                            tile_product(v_flat, (m * Sp + k0 + t0) * Evp, Evp, gp_flat,
                                         (q_panel0 + panel) * Ev * cols, cols, grad_s_t,
                                         t0 * block_q + panel * cols, block_q, Ev)
                    width = query_panels * cols
                    lse = row_lse[n, q0:q0 + width]
                    delta = row_delta[n, q0:q0 + width]
                    # the variants a row at a time where they can change a score of the block
                    cut = (k0 + keys - 1 - options.right - options.offset - q0 > 0
                           or k0 + options.left - options.offset - q0 < width - 1)
                    if options.softcap > 0 or mask.kind != 0 or options.has_alibi or cut:
                        for jj in range(keys):
                            score_variants_row(scores[jj * block_q:jj * block_q + width],
                                               cap_slope[jj * block_q:jj * block_q + width],
                                               k0 + jj, n, L, q0, bq, options, mask)
                    weights_and_grad_rows(scores, grad_s_t, cap_slope, keys, block_q, width, lse,
                                          delta, options.softcap > 0)
                    # grad_v += weights^T grad_out, grad_k += grad_s^T (scale q)
                    for t0 in range(0, key_rows, ROWS):
                        for c0 in range(0, Evp, cols):
                            tile_product_add(scores, t0 * block_q, block_q, gr_flat,
                                             (n * Lp + q0) * Evp + c0, Evp, grad_v_block,
                                             t0 * Evp + c0, Evp, bq)
                    for t0 in range(0, key_rows, ROWS):
                        for c0 in range(0, Ep, cols):
                            tile_product_add(grad_s_t, t0 * block_q, block_q, qr_flat,
                                             (n * Lp + q0) * Ep + c0, Ep, grad_k_block,
                                             t0 * Ep + c0, Ep, bq)
                    # grad_q += grad_s k (scaled at the end), grad_s read transposed in place
                    for r0 in range(0, query_rows, ROWS):
                        for c0 in range(0, Ep, cols):
                            tile_product_add_strided(grad_s_t, r0, 1, block_q, k_flat,
                                                     (m * Sp + k0) * Ep + c0, Ep,
                                                     acc_flat, (n * Lp + q0 + r0) * Ep + c0, Ep,
                                                     keys)
            for jj in range(keys):
                for d in range(E):
                    grad_k[m, k0 + jj, d] = grad_k_block[jj * Ep + d]
                for c in range(Ev):
                    grad_v[m, k0 + jj, c] = grad_v_block[jj * Evp + c]
        scale = dtype.type(options.scale)
        for n in range(m * group, (m + 1) * group):
            for i in range(L):
                for d in range(E):
                    grad_q[n, i, d] = grad_q_acc[n, i, d] * scale
