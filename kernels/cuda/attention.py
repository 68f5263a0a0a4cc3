"""The similarity and attention-weights kernels for NVIDIA GPUs (``numba.cuda``); the fused
attention kernel is in kernels/cuda/fused.py.

Operands are read in place whatever their strides. Each is a 1-d array over its memory plus a
row layout: row ``i`` of head ``n`` starts at ``outer[n] + i * row_stride`` and steps by
``col_stride`` (0 where a mask broadcasts); ``fastattn._cuda`` builds them. Values are loaded into
the compute dtype (float16 widens to float32), accumulated in it, and stored in the output's dtype.

Local and shared arrays need shapes known at compile time, so the kernels are built by factories
from a :class:`Tiles` (and cached): the tests build tiny tiles so that tiny inputs span several
blocks and partial tiles. Nothing compiles before a kernel's first launch.

A block's threads form a grid of ``TY = block_q // rows_per_thread`` rows by ``TX =
threads_per_row`` columns. Thread (ty, tx) owns query rows ``ty + r * TY`` of its block, key
columns ``tx + c * TX`` of each key tile and output columns ``tx + c * TX``; the ``TX`` threads of
a row share its softmax statistics through shared memory. No atomics, no shuffles (the simulator
has none).
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import Tiles, _device


@functools.lru_cache(maxsize=None)
def attention_kernels(tiles: Tiles, compute: np.dtype) -> SimpleNamespace:
    """The ``similarity`` and ``attention_weights`` kernels for ``tiles``, computing in
    ``compute`` (float32 or float64).

    Indexing: shared and flat arrays are indexed with unsigned integers (``u``). A signed index
    makes Numba emit a negative-index wraparound select per access, which in the inner loops
    costs more instructions than the FMAs. Never mix ``u`` and signed ints in one expression
    (Numba types uint64 op int64 as float64): convert with ``u(...)`` or ``i64(...)``.
    """
    tiles.check(np.dtype(compute).itemsize)
    BQ, BK, TM, TX, CH, _ = tiles
    TY = BQ // TM
    TN = BK // TX   # key columns per thread
    NT = tiles.threads
    BQ1, BK1, TX1 = BQ + 1, BK + 1, TX + 1  # padded rows of shared arrays (fewer bank conflicts)
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)
    u, i64 = np.uint64, np.int64
    uTX, uCH, uNT = u(TX), u(CH), u(NT)
    uBQCH, uBKCH = u(BQ * CH), u(BK * CH)

    # --- one tile of similarities ----------------------------------------------------------------

    @_device
    def stage_rows(x, base, rs, cs, n_rows, row0, d0, E, sX, size, tid):
        """sX[d, i] = x[row0 + i, d0 + d] (0 past the ends) for the ``size // CH`` rows of a
        block; consecutive threads read consecutive features (coalesced when contiguous)."""
        idx = tid
        while idx < size:
            i = i64(idx // uCH)
            d = i64(idx % uCH)
            val = zero
            if row0 + i < n_rows and d0 + d < E:
                val = ct(x[u(base + (row0 + i) * rs + (d0 + d) * cs)])
            sX[idx % uCH, idx // uCH] = val
            idx += uNT

    @_device
    def score_tile(a, a_base, a_rs, a_cs, La, b, b_base, b_rs, b_cs, Lb, E, i0, j0, cosine,
                   sA, sB, s, a_sq, b_sq, tid, ty, tx):
        """s[r, c] = a[i0 + ty + r*TY] . b[j0 + tx + c*TX] (rows past La or Lb read as zeros),
        staging CH features of both blocks through shared memory at a time; with ``cosine``
        also the squared norms of those rows."""
        ar = cuda.local.array(TM, ct)
        br = cuda.local.array(TN, ct)
        for r in range(TM):
            a_sq[r] = zero
            for c in range(TN):
                s[r, c] = zero
        for c in range(TN):
            b_sq[c] = zero
        for d0 in range(0, E, CH):
            stage_rows(a, a_base, a_rs, a_cs, La, i0, d0, E, sA, uBQCH, tid)
            stage_rows(b, b_base, b_rs, b_cs, Lb, j0, d0, E, sB, uBKCH, tid)
            cuda.syncthreads()
            # an outer product per feature, from registers
            for d in range(CH):
                for r in range(TM):
                    ar[r] = sA[u(d), ty + u(r * TY)]
                for c in range(TN):
                    br[c] = sB[u(d), tx + u(c * TX)]
                for r in range(TM):
                    for c in range(TN):
                        s[r, c] += ar[r] * br[c]
                if cosine:
                    for r in range(TM):
                        a_sq[r] += ar[r] * ar[r]
                    for c in range(TN):
                        b_sq[c] += br[c] * br[c]
            cuda.syncthreads()

    @_device
    def finish_scores(s, a_sq, b_sq, cosine, scale, i0, j0, La, Lb, opts, slope, m, m_row, m_cs,
                      mask_kind, ty, tx):
        """Scores from similarities in the variants' order: cosine, scale, softcap, then -inf
        past the ends, outside the window (causal folded in) and where a bool mask is False (a
        float mask is added), then the ALiBi bias -slope * |p(i) - j|."""
        offset, left, right, softcap, use_alibi = opts
        b_inv = cuda.local.array(TN, ct)
        for c in range(TN):
            b_inv[c] = one
            if cosine:
                b_inv[c] = one / math.sqrt(b_sq[c]) if b_sq[c] > zero else zero
        for r in range(TM):
            i = i0 + i64(ty) + r * TY
            p = i + offset  # the row's position among the keys
            a_inv = one
            if cosine:
                a_inv = one / math.sqrt(a_sq[r]) if a_sq[r] > zero else zero
            for c in range(TN):
                j = j0 + i64(tx) + c * TX
                x = s[r, c]
                if cosine:
                    x = x * (a_inv * b_inv[c])
                x = x * scale
                if softcap > zero:
                    x = softcap * math.tanh(x / softcap)
                if i >= La or j >= Lb or j < p - left or j > p + right:
                    x = neg_inf
                elif mask_kind == 1:  # (compared as compute floats: NVVM has no float16 compare)
                    if ct(m[u(m_row[r] + j * m_cs)]) == zero:
                        x = neg_inf
                elif mask_kind == 2:
                    x = x + ct(m[u(m_row[r] + j * m_cs)])
                if use_alibi:
                    x = x - slope * ct(abs(p - j))
                s[r, c] = x

    @_device
    def key_range(q0, L, S, opts):
        """[start, end): the key tiles that some row of the query block q0 can see (start a tile
        boundary); tiles wholly outside the window on either side are never visited."""
        offset, left, right = opts[0], opts[1], opts[2]
        p_first = q0 + offset
        p_last = min(q0 + BQ, L) - 1 + offset
        start = max(i64(0), p_first - left) // BK * BK
        end = min(S, p_last + right + 1)
        return start, end

    @_device
    def update_row_stats(s, row_max, row_sum, alpha, sRed, ty, tx):
        """Online softmax: fold a tile of scores into the running max and sum of each owned row;
        ``alpha`` gets the factor that rescales older sums to the new max, and ``s`` becomes the
        tile's unnormalised weights exp(s - new max)."""
        # new max: this thread's columns, then the row's TX threads through shared memory
        for r in range(TM):
            mx = neg_inf
            for c in range(TN):
                mx = max(mx, s[r, c])
            sRed[ty + u(r * TY), tx] = mx
        cuda.syncthreads()
        for r in range(TM):
            new_max = row_max[r]
            for t in range(TX):
                new_max = max(new_max, sRed[ty + u(r * TY), u(t)])
            if new_max == neg_inf:
                # every key so far is masked: weights 0 (a NaN stays NaN), no exp(-inf - -inf)
                alpha[r] = one
                for c in range(TN):
                    x = s[r, c]
                    s[r, c] = x - x if x != neg_inf else zero
            else:
                alpha[r] = math.exp(row_max[r] - new_max)
                for c in range(TN):
                    s[r, c] = math.exp(s[r, c] - new_max)
            tile_sum = zero
            for c in range(TN):
                tile_sum += s[r, c]
            row_sum[r] = row_sum[r] * alpha[r] + tile_sum
            row_max[r] = new_max

    @_device
    def row_totals(row_sum, total, sRed, ty, tx):
        """total[r] = the sum over the row's TX threads of their running sums."""
        cuda.syncthreads()  # every thread is done reading sRed (the last tile's maxima)
        for r in range(TM):
            sRed[ty + u(r * TY), tx] = row_sum[r]
        cuda.syncthreads()
        for r in range(TM):
            t_sum = zero
            for t in range(TX):
                t_sum += sRed[ty + u(r * TY), u(t)]
            total[r] = t_sum
        cuda.syncthreads()

    @_device
    def start_block(m_outer, m_rs, mask_kind, n, q0, L, m_row, row_max, row_sum, ty):
        for r in range(TM):
            row_max[r] = neg_inf
            row_sum[r] = zero
            i = q0 + i64(ty) + r * TY
            m_row[r] = 0
            if mask_kind != 0 and i < L:
                m_row[r] = m_outer[n] + i * m_rs

    # --- similarity -------------------------------------------------------------------------------

    @cuda.jit
    def similarity(a, a_outer, a_rs, a_cs, b, b_outer, b_rs, b_cs, N, La, Lb, E, scale, cosine,
                   out):
        """out[n] = scale * a[n] @ b[n].T (cosine: of unit rows).
        Grid: (N * row tiles, column tiles)."""
        sA = cuda.shared.array((CH, BQ1), ct)
        sB = cuda.shared.array((CH, BK1), ct)
        s = cuda.local.array((TM, TN), ct)
        a_sq = cuda.local.array(TM, ct)
        b_sq = cuda.local.array(TN, ct)
        no_rows = cuda.local.array(TM, np.int64)
        tid = u(cuda.threadIdx.x)
        ty = tid // uTX
        tx = tid % uTX
        n = i64(cuda.blockIdx.x) % N
        i0 = i64(cuda.blockIdx.x) // N * BQ
        j0 = i64(cuda.blockIdx.y) * BK
        score_tile(a, a_outer[n], a_rs, a_cs, La, b, b_outer[n], b_rs, b_cs, Lb, E, i0, j0,
                   cosine, sA, sB, s, a_sq, b_sq, tid, ty, tx)
        everything = (i64(0), La + Lb, La + Lb, zero, False)  # no window, softcap or ALiBi
        finish_scores(s, a_sq, b_sq, cosine, scale, i0, j0, La, Lb, everything, zero, a_outer,
                      no_rows, 0, 0, ty, tx)
        for r in range(TM):
            i = i0 + i64(ty) + r * TY
            for c in range(TN):
                j = j0 + i64(tx) + c * TX
                if i < La and j < Lb:
                    out[n, i, j] = s[r, c]

    # --- attention weights (the full L x S matrix, for inspection) --------------------------------

    @cuda.jit
    def attention_weights(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, m, m_outer, m_rs, m_cs,
                          mask_kind, N, L, S, E, scale, offset, left, right, softcap, alibi,
                          use_alibi, cosine, out):
        """softmax(scale * q k^T + mask) into out (N, L, S): one pass for each row's max and
        sum, one that writes exp(score - max) / sum. Grid: N * query tiles."""
        sA = cuda.shared.array((CH, BQ1), ct)
        sB = cuda.shared.array((CH, BK1), ct)
        sRed = cuda.shared.array((BQ, TX1), ct)
        s = cuda.local.array((TM, TN), ct)
        a_sq = cuda.local.array(TM, ct)
        b_sq = cuda.local.array(TN, ct)
        row_max = cuda.local.array(TM, ct)
        row_sum = cuda.local.array(TM, ct)
        alpha = cuda.local.array(TM, ct)
        total = cuda.local.array(TM, ct)
        m_row = cuda.local.array(TM, np.int64)
        tid = u(cuda.threadIdx.x)
        ty = tid // uTX
        tx = tid % uTX
        n_qtiles = (L + BQ - 1) // BQ
        n = i64(cuda.blockIdx.x) % N
        q0 = (n_qtiles - 1 - i64(cuda.blockIdx.x) // N) * BQ
        start_block(m_outer, m_rs, mask_kind, n, q0, L, m_row, row_max, row_sum, ty)
        q_base = q_outer[n]
        k_base = k_outer[n]
        opts = (offset, left, right, softcap, use_alibi)
        slope = alibi[n] if use_alibi else zero
        k_start, k_end = key_range(q0, L, S, opts)
        # pass 1: the max and the sum of exp(score - max) of each row
        for j0 in range(k_start, k_end, BK):
            score_tile(q, q_base, q_rs, q_cs, L, k, k_base, k_rs, k_cs, S, E, q0, j0, cosine,
                       sA, sB, s, a_sq, b_sq, tid, ty, tx)
            finish_scores(s, a_sq, b_sq, cosine, scale, q0, j0, L, S, opts, slope, m, m_row,
                          m_cs, mask_kind, ty, tx)
            update_row_stats(s, row_max, row_sum, alpha, sRed, ty, tx)
        row_totals(row_sum, total, sRed, ty, tx)
        for r in range(TM):
            # 1/total, NaN for a row with a NaN, 0 for a row with no key (its weights are 0)
            t_sum = total[r]
            total[r] = one / t_sum if t_sum > zero or t_sum != t_sum else zero
        # pass 2: the weights (tiles outside the block's key range are 0)
        for j0 in range(0, S, BK):
            seen = k_start <= j0 and j0 < k_end
            if seen:  # the same for every thread of the block: syncthreads is safe
                score_tile(q, q_base, q_rs, q_cs, L, k, k_base, k_rs, k_cs, S, E, q0, j0,
                           cosine, sA, sB, s, a_sq, b_sq, tid, ty, tx)
                finish_scores(s, a_sq, b_sq, cosine, scale, q0, j0, L, S, opts, slope, m,
                              m_row, m_cs, mask_kind, ty, tx)
            for r in range(TM):
                i = q0 + i64(ty) + r * TY
                inv = total[r]
                mx = row_max[r]
                for c in range(TN):
                    j = j0 + i64(tx) + c * TX
                    if i < L and j < S:
                        w = zero
                        if inv != inv:
                            w = inv
                        elif seen and mx != neg_inf:
                            w = math.exp(s[r, c] - mx) * inv
                        out[n, i, j] = w

    # (the tile steps too, for the flex kernel, which shares them)
    return SimpleNamespace(similarity=similarity, attention_weights=attention_weights,
                           stage_rows=stage_rows, update_row_stats=update_row_stats,
                           row_totals=row_totals)
