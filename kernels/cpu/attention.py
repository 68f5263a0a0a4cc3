"""The fused attention kernel for the CPU (Numba, parallel): flash-style, never storing the L x S
scores.

It takes prepared input (see ``fastattn._prepare``): C-contiguous arrays in the compute dtype (or
float16 and bfloat16 q, k, v as integer views of their bits, widened as they are loaded, see
``widen``) with the leading dims flattened, query head ``n`` using key/value head ``n // group``, and a mask read
in place (a ``MaskArgs``, see ``options``). Outputs are written into arrays the caller allocates.
Its block products are register tiles (``tile``), with no BLAS call inside, so results do not
depend on the thread count.
"""
import math

import numpy as np
from numba import prange

from ._jit import exp_flushed, exp_nonpositive, jit, maxnum, parallel_jit, prefer_512_bit_vectors
from .rows import alibi_rows, apply_mask_row, mask_outside_rows, softcap_row
from .tile import ROWS, tile_product, tile_product_add, tile_width
from .widen import widen


# Weights below exp(NEGLIGIBLE) of the row's max are made 0: together they are below S * 1.6e-28 of
# the row's sum, far under float64's rounding, but their products with v (and a rescaled
# accumulator) would be denormals, which on Intel take a microcode assist per operation. ALiBi
# puts many scores there (measured: 1.42x causal attention's time, 1.17x with the flush).
NEGLIGIBLE = -64.0


@jit
def online_softmax_rows(scores, stride, start, keys, rows, r0, row_max, row_sum, acc, new_max):
    """Fold one block of scores into the running max and sum of rows r0..r0+rows: row i's
    scores are ``scores[i * stride + start:][:keys]``. Rescale each row's accumulator (row
    r0 + i of ``acc``) to its new max and turn its scores into the block's unnormalised weights.
    ``new_max``: scratch for ``rows`` floats.

    All the rows' maxima first, then all their exps: one row at a time, each row waited for
    its max's reduction before its exps and for its sum's before the next row (measured: the
    softmax of 12 rows of 512 keys took 0.61 ns a score that way, 0.37 like this; 1.36 and 0.57
    for rows of 128), and one call per row cost Numba's reference counting of its arguments.
    """
    prefer_512_bit_vectors()
    for i in range(rows):
        row = scores[i * stride + start:i * stride + start + keys]
        m = row_max[r0 + i]
        for j in range(keys):
            m = maxnum(m, row[j])
        new_max[i] = m
    negligible = scores.dtype.type(NEGLIGIBLE)  # (a bare float would make x a float64)
    for i in range(rows):
        r = r0 + i
        row = scores[i * stride + start:i * stride + start + keys]
        m = new_max[i]
        if m == -np.inf:
            # Every key so far is masked: weights 0 (and NaN stays NaN), no exp(-inf - -inf).
            for j in range(keys):
                s = row[j]
                row[j] = s - s if s != -np.inf else 0.0
            row_sum[r] += row.sum()
            continue
        block_sum = scores.dtype.type(0.0)
        for j in range(keys):
            p = exp_flushed(row[j] - m, negligible)  # (NaN stays NaN)
            row[j] = p
            block_sum += p
        if m == row_max[r]:
            # The max held (the common case after the first blocks): the rescale factor is
            # exactly 1, so skip computing it and the pass over the accumulator.
            row_sum[r] += block_sum
            continue
        x = row_max[r] - m
        alpha = exp_nonpositive(x) if not x < negligible else scores.dtype.type(0.0)
        row_sum[r] = row_sum[r] * alpha + block_sum
        row_max[r] = m
        for c in range(acc.shape[1]):
            acc[r, c] *= alpha


@jit
def finish_rows(acc, row_max, row_sum, n, q0, rows, out, lse):
    """out[n, q0 + i] = acc[i] / row_sum[i] and lse = row_max + log(row_sum) for i < ``rows``;
    a row where no key took part gives zeros and lse -inf (log 0)."""
    Ev = out.shape[2]
    for i in range(rows):
        total = row_sum[i]
        if total > 0 or total != total:
            inv = 1 / total
            for c in range(Ev):
                out[n, q0 + i, c] = acc[i, c] * inv
            lse[n, q0 + i] = row_max[i] + math.log(total)
        else:
            for c in range(Ev):
                out[n, q0 + i, c] = 0.0
            lse[n, q0 + i] = -np.inf


@parallel_jit
def pack_panels(k, v, key_panels, value_panels):
    """Lay k and v out as the tiles read them, zero past the last key and value column:
    ``key_panels[n, p]`` holds k[n]^T for keys p*cols.. as (E, cols) row-major, and
    ``value_panels[n, c]`` holds v[n][:, c*cols:(c+1)*cols] as (S, cols) row-major (cols =
    ``tile_cols``). Each tile row is then one aligned run of 64 bytes (the caller aligns the
    panels), read in order. 16-bit k and v (integer views, see ``widen``) are widened here, as
    they are copied: the kernel reads them in place and never makes a float32 copy beside the
    panels."""
    N, S, E = k.shape
    Ev = v.shape[2]
    cols = tile_width(key_panels)  # a constant: whole panels copy in loops of known length
    n_panels = key_panels.shape[1]
    n_chunks = value_panels.shape[1]
    for item in prange(N * n_panels):
        n = item // n_panels
        p = item % n_panels
        keys = min(cols, S - p * cols)
        panel = key_panels[n, p]
        k_rows = k[n].reshape(-1)[p * cols * E:(p * cols + keys) * E]
        if keys == cols:
            for jj in range(cols):
                for d in range(E):
                    panel[d * cols + jj] = widen(k_rows[jj * E + d])
        else:
            panel[:] = 0
            for jj in range(keys):
                for d in range(E):
                    panel[d * cols + jj] = widen(k_rows[jj * E + d])
    for item in prange(v.shape[0] * n_chunks):
        n = item // n_chunks
        c = item % n_chunks
        chunk = value_panels[n, c]
        width = min(cols, Ev - c * cols)
        if width == cols:
            for j in range(S):
                for e in range(cols):
                    chunk[j * cols + e] = widen(v[n, j, c * cols + e])
        else:
            chunk[:] = 0
            for j in range(S):
                for e in range(width):
                    chunk[j * cols + e] = widen(v[n, j, c * cols + e])


# Query rows per group: GROUP // ROWS register tiles share each key and value tile while it is in
# the L1 cache.
GROUP = 2 * ROWS


@jit
def attention_block(q, key_panels, value_panels, S, n, q0, q1, scale, pattern, mask, block_k, out,
                    lse):
    """One work item of ``attention``: queries q0..q1 of head ``n`` against the S keys and values
    of its key/value head, laid out in tiles in ``key_panels`` and ``value_panels`` (flat)."""
    _, L, E = q.shape
    Ev = out.shape[2]
    dtype = key_panels.dtype  # the compute dtype (q may hold 16-bit inputs, see ``widen``)
    cols = tile_width(key_panels)
    ev_padded = -(-Ev // cols) * cols
    keys_padded = -(-block_k // cols) * cols
    bq = q1 - q0
    # Zero padding to whole tiles: padded query rows and value columns compute harmless numbers
    # that are never read back.
    rows_padded = -(-bq // GROUP) * GROUP
    q_block = np.zeros((rows_padded, E), dtype)
    for i in range(bq):  # a loop, not an array assignment: its shape check costs seconds to compile
        for d in range(E):
            q_block[i, d] = widen(q[n, q0 + i, d]) * scale
    q_flat = q_block.reshape(-1)
    scores = np.empty(GROUP * keys_padded, dtype)
    acc = np.zeros((rows_padded, ev_padded), dtype)
    acc_flat = acc.reshape(-1)
    row_max = np.full(rows_padded, -np.inf, dtype)
    row_sum = np.zeros(rows_padded, dtype)
    new_max = np.empty(GROUP, dtype)
    left, right = pattern.left, pattern.right
    # Query i sits at key position i + offset and sees keys p - left .. p + right: the work item
    # needs only the key blocks that some row's window touches (a causal or sliding window skips
    # the rest), and each group of rows only the keys from its first row's first key (down to a
    # whole tile) to its last row's last.
    position0 = q0 + pattern.offset
    k_begin = max(0, position0 - left) // block_k * block_k
    k_end = min(S, position0 + bq - 1 + right + 1)
    for k0 in range(k_begin, k_end, block_k):
        for r0 in range(0, bq, GROUP):
            rows = min(GROUP, bq - r0)
            first = position0 + r0  # the positions of the group's first and last rows
            last = first + rows - 1
            ka = max(k0, first - left)
            ka -= (ka - k0) % cols
            kb = min(k0 + block_k, k_end, last + right + 1)
            keys = kb - ka
            if keys <= 0:  # the block lies wholly outside every row's window
                continue
            # scores of the group's queries against keys ka..kb, a tile of keys at a time
            for panel in range(-(-keys // cols)):
                for t0 in range(0, rows, ROWS):
                    tile_product(q_flat, (r0 + t0) * E, E, key_panels,
                                 (ka // cols + panel) * E * cols, cols, scores,
                                 t0 * keys_padded + panel * cols, keys_padded, E)
            # Keys wholly inside every row's window need no per-score window work.
            partial = ka < last - left or kb - 1 > first + right
            # The steps between the products in the semantics' order (softcap, mask, window,
            # ALiBi), each on the whole block in one call where it can: one call per row cost
            # about a tenth of the causal kernel's time, nearly as much as the tanh (measured; the
            # padding columns get a harmless tanh too).
            if pattern.softcap > 0:
                softcap_row(scores[:rows * keys_padded], pattern.softcap)
            if mask.kind != 0:
                for i in range(rows):
                    apply_mask_row(scores[i * keys_padded:i * keys_padded + keys],
                                   n * L + q0 + r0 + i, ka, mask)
            if partial:
                mask_outside_rows(scores, keys_padded, keys, rows, first - ka, left, right)
            if pattern.has_alibi:
                alibi_rows(scores, keys_padded, keys, rows, pattern.alibi[n], first - ka)
            online_softmax_rows(scores, keys_padded, 0, keys, rows, r0, row_max, row_sum, acc,
                                new_max)
            # acc += weights @ v for the keys, a tile of value columns at a time
            for c0 in range(0, ev_padded, cols):
                for t0 in range(0, rows, ROWS):
                    tile_product_add(scores, t0 * keys_padded, keys_padded, value_panels,
                                     c0 * S + ka * cols, cols, acc_flat,
                                     (r0 + t0) * ev_padded + c0, ev_padded, keys)
    finish_rows(acc, row_max, row_sum, n, q0, bq, out, lse)


@parallel_jit
def attention(q, k, v, group, scale, pattern, mask, block_q, block_k, key_panels, value_panels,
              out, lse):
    """Flash-style attention: out (N, L, Ev) and lse (N, L), never storing the L x S scores.

    Each work item is one block of queries of one head; it walks the key/value blocks once,
    keeping per row the running max, the running sum of exp(score - max) and the accumulator
    sum(exp(score - max) * v). Within a key block, GROUP queries at a time go through the three
    steps (scores, online softmax, weighted values) while their scores sit in the L1 cache; the
    two products are register tiles (``tile``) over k and v laid out once per call in tiles
    (``pack_panels``). ``pattern`` (a ``Pattern``: alignment, window, softcap, ALiBi) says which
    keys each row sees: key blocks outside every row's window are skipped, and only blocks that
    straddle a window's edge are masked key by key.

    ``block_k`` must be a multiple of the tile's columns (``tile_cols``). ``key_panels``
    (k.shape[0], ceil(S / cols), E * cols) and ``value_panels`` (v.shape[0], ceil(Ev / cols),
    S * cols) are scratch, best aligned to 64 bytes: memory like one more copy of k and v, so
    O(S), not O(L S).
    """
    N, L, E = q.shape
    pack_panels(k, v, key_panels, value_panels)
    n_qblocks = (L + block_q - 1) // block_q
    for item in prange(N * n_qblocks):
        n = item // n_qblocks
        # Query blocks in the order 0, last, 1, last - 1, ...: with causal attention later blocks
        # cost more, and each thread's share (a run of consecutive items) gets both kinds.
        qb = item % n_qblocks
        qb = qb // 2 if qb % 2 == 0 else n_qblocks - 1 - qb // 2
        q0 = qb * block_q
        attention_block(q, key_panels[n // group].reshape(-1),
                        value_panels[n // group].reshape(-1), k.shape[1], n, q0,
                        min(q0 + block_q, L), scale, pattern, mask, block_k, out, lse)
