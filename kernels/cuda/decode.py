"""Row-wise attention read in place on NVIDIA GPUs (``numba.cuda``): decoding from a KV cache
(contiguous or paged) and packed variable-length batches, as ``kernels/cpu/decode.py``.

A thread block runs one work item: (sequence b, key/value head g, a block of at most ``block_q``
query rows of that head's group, a range of keys [lo, hi), partial-row base or -1). The item's
rows are row r = (query position r // group, query head g * group + r % group) of the (b, g)
block, so one key tile staged through shared memory serves every query head of the GQA group and
every query position of the item: each key and value row is read once per item, straight from the
cache (no copy, no re-layout). Key tiles stop at page boundaries, so a paged cache is read through
its block table like a contiguous one (a contiguous cache is one page per row, a packed varlen
batch one page holding every sequence). The host (``fastattn._cuda_decode``) lists the items,
splits long key ranges (flash-decoding: each split writes its normalised (out, lse) to partial
rows) and ``merge`` combines the splits exactly (out = sum_i out_i exp(lse_i - lse), lse = log
sum_i exp(lse_i); splits that saw no key count for nothing).

The block's threads and the online softmax are those of ``attention``: a grid of ``TY = block_q
// rows_per_thread`` by ``TX = threads_per_row`` threads, thread (ty, tx) owning rows ty + r * TY,
keys tx + c * TX of each key tile and output columns tx + c * TX; ``stage_rows``,
``update_row_stats`` and ``row_totals`` are that module's. The weights go through shared memory
to the value product. No atomics, no shuffles.

The layout arguments (see ``fastattn.kernels.cpu.options.RowsLayout``, here with column strides):
``seq`` (B, 6) int64: per sequence the first element of its query, key and value rows, of its
output and lse, and its position offset; ``layout`` int64: the scalar strides, in ``LAYOUT``
order.
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import _SIMULATOR, Tiles
from .attention import attention_kernels

# seq columns
Q_FIRST, K_FIRST, V_FIRST, OUT_FIRST, LSE_FIRST, POS_OFFSET = range(6)
# layout entries
LAYOUT = ("q_pos", "q_head", "q_col", "block_size", "k_block", "k_head", "k_pos", "k_col",
          "v_block", "v_head", "v_pos", "v_col", "out_pos", "out_head", "lse_pos", "lse_head",
          "group", "E", "Ev", "heads", "left", "right")
# items columns: b, g, first row, end row, first key, end key, partial-row base (-1: none)
ITEM_COLUMNS = 7
# merges columns: b, g, first row, end row, partial-row base, number of splits
MERGE_COLUMNS = 6


def _kernel(threads: int, min_blocks: int):
    # The simulator's jit takes no launch bounds.
    if _SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=(threads, min_blocks))


@functools.lru_cache(maxsize=None)
def decode_kernels(tiles: Tiles, compute: np.dtype, min_blocks: int = 1) -> SimpleNamespace:
    """The ``attend`` (work items), ``merge`` (split partials) and ``copy_rows`` (the append of
    new keys and values into a cache) kernels for ``tiles``, computing in ``compute``;
    ``attend``'s registers capped so that ``min_blocks`` blocks fit on an SM (decoding is bound
    by memory: many warps in flight hide its latency)."""
    tiles.check(np.dtype(compute).itemsize)
    BQ, BK, TM, TX, CH, BV = tiles
    TY = BQ // TM
    TN = BK // TX   # keys per thread of a tile
    TD = BV // TX   # output columns per thread
    NT = tiles.threads
    BQ1, BK1, TX1 = BQ + 1, BK + 1, TX + 1
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)
    u, i64 = np.uint64, np.int64
    uTX, uCH, uBV, uNT = u(TX), u(CH), u(BV), u(NT)
    uBKCH = u(BK * CH)
    shared = attention_kernels(tiles, compute)
    stage_rows, update_row_stats, row_totals = (shared.stage_rows, shared.update_row_stats,
                                                shared.row_totals)

    @_kernel(NT, min_blocks)
    def attend(q, k, v, table, seq, layout, alibi, items, scale, softcap, use_alibi, out, lse,
               part_out, part_lse):
        """Work item ``blockIdx.x`` of ``items``, output columns from ``blockIdx.y * BV``.
        Grid: (items, value column blocks)."""
        sQ = cuda.shared.array((CH, BQ1), ct)
        sK = cuda.shared.array((CH, BK1), ct)
        sP = cuda.shared.array((BQ, BK1), ct)
        sV = cuda.shared.array((CH, BV), ct)
        sRed = cuda.shared.array((BQ, TX1), ct)
        s = cuda.local.array((TM, TN), ct)
        acc = cuda.local.array((TM, TD), ct)
        ar = cuda.local.array(TM, ct)
        br = cuda.local.array(TN, ct)
        row_max = cuda.local.array(TM, ct)
        row_sum = cuda.local.array(TM, ct)
        alpha = cuda.local.array(TM, ct)
        total = cuda.local.array(TM, ct)
        tid = u(cuda.threadIdx.x)
        ty = tid // uTX
        tx = tid % uTX
        item = i64(cuda.blockIdx.x)
        b, g = items[item, 0], items[item, 1]
        r0, r1 = items[item, 2], items[item, 3]
        lo, hi, part = items[item, 4], items[item, 5], items[item, 6]
        c0 = i64(cuda.blockIdx.y) * BV
        q_pos, q_head, q_col = layout[0], layout[1], layout[2]
        block_size, k_block, k_head, k_pos, k_col = (layout[3], layout[4], layout[5], layout[6],
                                                     layout[7])
        v_block, v_head, v_pos, v_col = layout[8], layout[9], layout[10], layout[11]
        out_pos, out_head, lse_pos, lse_head = layout[12], layout[13], layout[14], layout[15]
        group, E, Ev, heads, left, right = (layout[16], layout[17], layout[18], layout[19],
                                            layout[20], layout[21])
        q_first = seq[b, Q_FIRST]
        k_first = seq[b, K_FIRST]
        v_first = seq[b, V_FIRST]
        pos_offset = seq[b, POS_OFFSET]
        for r in range(TM):
            row_max[r] = neg_inf
            row_sum[r] = zero
            for c in range(TD):
                acc[r, c] = zero
        j0 = lo
        while j0 < hi:  # the same bounds for every thread: the barriers inside are uniform
            page = j0 // block_size
            stop = min(hi, j0 + BK, (page + 1) * block_size)
            n = stop - j0
            physical = table[b, page]
            at = j0 - page * block_size
            kb = physical * k_block + g * k_head + at * k_pos + k_first
            vb = physical * v_block + g * v_head + at * v_pos + v_first
            # scores of the item's rows against the tile's keys, CH features at a time
            for r in range(TM):
                for c in range(TN):
                    s[r, c] = zero
            for d0 in range(0, E, CH):
                idx = tid
                while idx < u(BQ * CH):
                    i = i64(idx // uCH)
                    d = i64(idx % uCH)
                    val = zero
                    if r0 + i < r1 and d0 + d < E:
                        row = r0 + i
                        t = row // group
                        h = g * group + row % group
                        val = ct(q[u(q_first + t * q_pos + h * q_head + (d0 + d) * q_col)])
                    sQ[idx % uCH, idx // uCH] = val
                    idx += uNT
                stage_rows(k, kb, k_pos, k_col, n, i64(0), d0, E, sK, uBKCH, tid)
                cuda.syncthreads()
                for d in range(CH):
                    for r in range(TM):
                        ar[r] = sQ[u(d), ty + u(r * TY)]
                    for c in range(TN):
                        br[c] = sK[u(d), tx + u(c * TX)]
                    for r in range(TM):
                        for c in range(TN):
                            s[r, c] += ar[r] * br[c]
                cuda.syncthreads()
            # the variants in order: scale, softcap, the window (causal folded in), ALiBi
            for r in range(TM):
                row = r0 + i64(ty) + r * TY
                t = row // group
                h = g * group + row % group
                p = pos_offset + t
                slope = zero
                if use_alibi and row < r1:
                    slope = alibi[b * heads + h]
                for c in range(TN):
                    j = j0 + i64(tx) + c * TX
                    x = s[r, c] * scale
                    if softcap > zero:
                        x = softcap * math.tanh(x / softcap)
                    if row >= r1 or j >= stop or j < p - left or j > p + right:
                        x = neg_inf
                    elif use_alibi:
                        x = x - slope * ct(abs(p - j))
                    s[r, c] = x
            update_row_stats(s, row_max, row_sum, alpha, sRed, ty, tx)
            for r in range(TM):
                for c in range(TD):
                    acc[r, c] *= alpha[r]
                for c in range(TN):
                    sP[ty + u(r * TY), tx + u(c * TX)] = s[r, c]
            # acc += weights @ values, CH value rows staged at a time
            for k0 in range(0, n, CH):
                idx = tid
                while idx < u(CH * BV):
                    kk = i64(idx // uBV)
                    col = i64(idx % uBV)
                    val = zero
                    if k0 + kk < n and c0 + col < Ev:
                        val = ct(v[u(vb + (k0 + kk) * v_pos + (c0 + col) * v_col)])
                    sV[idx // uBV, idx % uBV] = val
                    idx += uNT
                cuda.syncthreads()
                for kk in range(CH):
                    for r in range(TM):
                        w = sP[ty + u(r * TY), u(k0 + kk)]
                        for c in range(TD):
                            acc[r, c] += w * sV[u(kk), tx + u(c * TX)]
                cuda.syncthreads()
            j0 = stop
        row_totals(row_sum, total, sRed, ty, tx)
        out_first = seq[b, OUT_FIRST]
        lse_first = seq[b, LSE_FIRST]
        for r in range(TM):
            row = r0 + i64(ty) + r * TY
            if row >= r1:
                continue
            t = row // group
            h = g * group + row % group
            t_sum = total[r]
            if t_sum > zero or t_sum != t_sum:
                inv = one / t_sum
                row_lse = row_max[r] + math.log(t_sum)
            else:  # no key taken part: zeros and -inf
                inv = zero
                row_lse = neg_inf
            if part >= 0:
                for c in range(TD):
                    col = c0 + i64(tx) + c * TX
                    if col < Ev:
                        part_out[part + row - r0, col] = acc[r, c] * inv
                if tx == u(0) and c0 == 0:
                    part_lse[part + row - r0] = row_lse
            else:
                base = out_first + t * out_pos + h * out_head
                for c in range(TD):
                    col = c0 + i64(tx) + c * TX
                    if col < Ev:
                        out[u(base + col)] = acc[r, c] * inv
                if tx == u(0) and c0 == 0:
                    lse[u(lse_first + t * lse_pos + h * lse_head)] = row_lse

    @cuda.jit
    def merge(part_out, part_lse, merges, seq, layout, out, lse):
        """The exact merge of the splits of ``merges[blockIdx.x]`` into ``out`` and ``lse``.
        Grid: merges."""
        m = i64(cuda.blockIdx.x)
        b, g, r0, r1, part, nsplit = (merges[m, 0], merges[m, 1], merges[m, 2], merges[m, 3],
                                      merges[m, 4], merges[m, 5])
        out_pos, out_head, lse_pos, lse_head = layout[12], layout[13], layout[14], layout[15]
        group, Ev = layout[16], layout[18]
        R = r1 - r0
        idx = i64(cuda.threadIdx.x)
        while idx < R * Ev:
            r = idx // Ev
            e = idx % Ev
            row = r0 + r
            t = row // group
            h = g * group + row % group
            top = neg_inf
            for sp in range(nsplit):
                top = max(top, part_lse[part + sp * R + r])
            merged = neg_inf
            value = zero
            if top != neg_inf:
                t_sum = zero
                for sp in range(nsplit):
                    t_sum += math.exp(part_lse[part + sp * R + r] - top)
                merged = top + math.log(t_sum)
                for sp in range(nsplit):
                    x = part_lse[part + sp * R + r]
                    if x != neg_inf:
                        value += part_out[part + sp * R + r, e] * math.exp(x - merged)
            out[u(seq[b, OUT_FIRST] + t * out_pos + h * out_head + e)] = value
            if e == 0:
                lse[u(seq[b, LSE_FIRST] + t * lse_pos + h * lse_head)] = merged
            idx += NT

    @cuda.jit
    def copy_rows(src, src_rows, src_col, dst, dst_rows, dst_col, n_cols):
        """dst row i = src row i, the same bits (row starts in ``src_rows``, ``dst_rows``): the
        new keys and values into their cache slots. Grid: rows."""
        i = i64(cuda.blockIdx.x)
        col = i64(cuda.threadIdx.x)
        while col < n_cols:
            dst[u(dst_rows[i] + col * dst_col)] = src[u(src_rows[i] + col * src_col)]
            col += NT

    return SimpleNamespace(attend=attend, merge=merge, copy_rows=copy_rows)
