"""Flex attention on NVIDIA GPUs (``numba.cuda``): the fused attention kernel of ``attention``
with the user's ``score_mod`` and ``mask_mod`` compiled in as device functions, and a block mask
whose empty blocks it skips.

Operands are read in place, as in ``attention`` (1-d arrays over their memory plus row layouts,
built by ``fastattn._cuda``). The block mask's kinds (B or 1, H or 1, query blocks, key blocks)
are looked up per score, so its block size need not match the tiles: a key tile is skipped when
every mask block it overlaps is empty (the same answer for every thread of the block, so the
barriers inside stay uniform), ``mask_mod`` runs where a block is partial, ``score_mod`` on every
score of a kept block.
"""
import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import Tiles, _device
from .attention import attention_kernels

EMPTY, PARTIAL, FULL = 0, 1, 2


def _keep_score(score, b, h, q_idx, kv_idx, *args):
    return score


def _keep_key(b, h, q_idx, kv_idx, *args):
    return True


@functools.lru_cache(maxsize=None)
def flex_kernels(tiles: Tiles, compute: np.dtype, score_mod=None, mask_mod=None):
    """The flex ``attention`` kernel for ``tiles``, computing in ``compute``, with these user
    functions (plain Python functions, compiled here as device functions; None: plain)."""
    tiles.check(np.dtype(compute).itemsize)
    BQ, BK, TM, TX, CH, BV = tiles
    TY = BQ // TM
    TN = BK // TX
    TD = BV // TX
    NT = tiles.threads
    BQ1, BK1, TX1 = BQ + 1, BK + 1, TX + 1
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)
    u, i64 = np.uint64, np.int64
    uTX, uBV, uNT = u(TX), u(BV), u(NT)
    uBQCH, uBKCH, uCHBV = u(BQ * CH), u(BK * CH), u(CH * BV)
    # The tile steps that do not depend on the user's functions are the fused kernel's own.
    shared = attention_kernels(tiles, compute)
    stage_rows, update_row_stats, row_totals = (shared.stage_rows, shared.update_row_stats,
                                                shared.row_totals)
    user_score = cuda.jit(device=True)(getattr(score_mod, "py_func", score_mod) or _keep_score)
    user_mask = cuda.jit(device=True)(getattr(mask_mod, "py_func", mask_mod) or _keep_key)

    @_device
    def score_tile(a, a_base, a_rs, a_cs, La, b, b_base, b_rs, b_cs, Lb, E, i0, j0, sA, sB, s,
                   tid, ty, tx):
        """s[r, c] = a[i0 + ty + r*TY] . b[j0 + tx + c*TX], CH features at a time."""
        ar = cuda.local.array(TM, ct)
        br = cuda.local.array(TN, ct)
        for r in range(TM):
            for c in range(TN):
                s[r, c] = zero
        for d0 in range(0, E, CH):
            stage_rows(a, a_base, a_rs, a_cs, La, i0, d0, E, sA, uBQCH, tid)
            stage_rows(b, b_base, b_rs, b_cs, Lb, j0, d0, E, sB, uBKCH, tid)
            cuda.syncthreads()
            for d in range(CH):
                for r in range(TM):
                    ar[r] = sA[u(d), ty + u(r * TY)]
                for c in range(TN):
                    br[c] = sB[u(d), tx + u(c * TX)]
                for r in range(TM):
                    for c in range(TN):
                        s[r, c] += ar[r] * br[c]
            cuda.syncthreads()

    @_device
    def tile_kept(kinds, bm, hm, q0, j0, L, S, mbq, mbk):
        """Whether any mask block under the tile at (q0, j0) keeps a key."""
        for qb in range(q0 // mbq, (min(q0 + BQ, L) - 1) // mbq + 1):
            for kb in range(j0 // mbk, (min(j0 + BK, S) - 1) // mbk + 1):
                if kinds[bm, hm, qb, kb] != EMPTY:
                    return True
        return False

    @_device
    def finish_scores(s, scale, b, h, bm, hm, i0, j0, L, S, kinds, mbq, mbk, args, ty, tx):
        """Scores: scale, then score_mod in kept blocks, -inf in empty ones, past the ends and
        where mask_mod says so in partial ones."""
        for r in range(TM):
            i = i0 + i64(ty) + r * TY
            for c in range(TN):
                j = j0 + i64(tx) + c * TX
                x = neg_inf
                if i < L and j < S:
                    kind = kinds[bm, hm, i // mbq, j // mbk]
                    if kind != EMPTY:
                        x = ct(user_score(s[r, c] * scale, b, h, i, j, *args))
                        if kind == PARTIAL and not user_mask(b, h, i, j, *args):
                            x = neg_inf
                s[r, c] = x

    @cuda.jit
    def attention(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, v, v_outer, v_rs, v_cs, N,
                  heads, L, S, E, Ev, scale, kinds, mbq, mbk, out, lse, args):
        """out (N, L, Ev) and lse (N, L); one block per (query head, query tile) along grid x
        and per BV output columns along grid y. Query head n is batch n // heads, head
        n % heads."""
        sA = cuda.shared.array((CH, BQ1), ct)
        sB = cuda.shared.array((CH, BK1), ct)
        sP = cuda.shared.array((BQ, BK1), ct)
        sV = cuda.shared.array((CH, BV), ct)
        sRed = cuda.shared.array((BQ, TX1), ct)
        s = cuda.local.array((TM, TN), ct)
        acc = cuda.local.array((TM, TD), ct)
        pr = cuda.local.array(TM, ct)
        row_max = cuda.local.array(TM, ct)
        row_sum = cuda.local.array(TM, ct)
        alpha = cuda.local.array(TM, ct)
        total = cuda.local.array(TM, ct)
        tid = u(cuda.threadIdx.x)
        ty = tid // uTX
        tx = tid % uTX
        n = i64(cuda.blockIdx.x) % N
        q0 = i64(cuda.blockIdx.x) // N * BQ
        c0 = i64(cuda.blockIdx.y) * BV
        b = n // heads
        h = n % heads
        bm = b if kinds.shape[0] > 1 else 0
        hm = h if kinds.shape[1] > 1 else 0
        for r in range(TM):
            row_max[r] = neg_inf
            row_sum[r] = zero
            for c in range(TD):
                acc[r, c] = zero
        q_base = q_outer[n]
        k_base = k_outer[n]
        v_base = v_outer[n]
        for j0 in range(0, S, BK):
            if not tile_kept(kinds, bm, hm, q0, j0, L, S, mbq, mbk):
                continue  # the same for every thread of the block
            score_tile(q, q_base, q_rs, q_cs, L, k, k_base, k_rs, k_cs, S, E, q0, j0, sA, sB, s,
                       tid, ty, tx)
            finish_scores(s, scale, b, h, bm, hm, q0, j0, L, S, kinds, mbq, mbk, args, ty, tx)
            update_row_stats(s, row_max, row_sum, alpha, sRed, ty, tx)
            for r in range(TM):
                for c in range(TD):
                    acc[r, c] *= alpha[r]
                for c in range(TN):
                    sP[ty + u(r * TY), tx + u(c * TX)] = s[r, c]
            for kc in range(0, BK, CH):
                idx = tid
                while idx < uCHBV:
                    j = j0 + kc + i64(idx // uBV)
                    col = c0 + i64(idx % uBV)
                    val = zero
                    if j < S and col < Ev:
                        val = ct(v[u(v_base + j * v_rs + col * v_cs)])
                    sV[idx // uBV, idx % uBV] = val
                    idx += uNT
                cuda.syncthreads()
                for jj in range(CH):
                    for r in range(TM):
                        pr[r] = sP[ty + u(r * TY), u(kc + jj)]
                    for c in range(TD):
                        val = sV[u(jj), tx + u(c * TX)]
                        for r in range(TM):
                            acc[r, c] += pr[r] * val
                cuda.syncthreads()
        row_totals(row_sum, total, sRed, ty, tx)
        for r in range(TM):
            i = q0 + i64(ty) + r * TY
            if i < L:
                t_sum = total[r]
                keep = t_sum > zero or t_sum != t_sum
                inv = one / t_sum if keep else zero
                for c in range(TD):
                    col = c0 + i64(tx) + c * TX
                    if col < Ev:
                        out[n, i, col] = acc[r, c] * inv
                if tx == u(0) and c0 == 0:
                    lse[n, i] = row_max[r] + math.log(t_sum) if keep else neg_inf

    return SimpleNamespace(attention=attention)
