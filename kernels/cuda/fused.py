"""The fused attention kernel for NVIDIA GPUs (``numba.cuda``), built the way fast SIMT GEMMs are.

out (N, L, Ev) and lse (N, L) of softmax(scale * q k^T + mask) v, never storing the L x S scores
(FlashAttention's online softmax), with the variants (alignment offset, window, softcap, ALiBi)
as runtime options. Operands are read in place through row layouts (see kernels/cuda/attention.py
and fastattn/_cuda.py).

The design, per block of ``BQ`` query rows and ``BV`` output columns (grid x: heads x query tiles,
the longest causal tiles first; grid y: output column blocks):

- The block's query tile stays in shared memory for the whole key loop (``FE`` features; when
  E > FE the features are walked in panels of FE and the query panels restaged per key tile).
- Thread (ty, tx) of the TY x TX thread grid owns a register tile of TM query rows x TN keys of
  the scores and TM rows x TD columns of the output. Its rows (and columns) come in runs of 4
  that lie contiguous in shared memory, whose rows are padded by 4 elements and 16-byte aligned,
  so that each run is one 128-bit shared load: an outer product of a run of 4 q values and one
  of 4 k values is 16 FFMA for 2 loads.
- Key and value tiles share one shared buffer. The next key tile is loaded from global memory
  into registers while the current tile's weights meet the values, and the values while the
  scores are computed, so a key tile costs 4 barriers (E <= FE).
- Staging uses 32-bit offsets within a tile from 64-bit tile bases, with a fast path for
  contiguous rows.
- A row's TX threads are consecutive lanes of one warp (TX divides 32): its max and sum are
  reduced with warp shuffles, without barriers. The simulator has no shuffles: there, the same
  reductions go through shared memory.
- ``launch_bounds`` caps the registers so that ``min_blocks`` blocks fit on an SM.

float16 and bfloat16 inputs take the tensor-core variant of this kernel (kernels/cuda/fused_mma.py,
``mma.sync`` through inline PTX), which shares ``score_steps`` (the variants and the online
softmax) with it.
"""
import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import _SIMULATOR, _device

ALIGN = None if _SIMULATOR else 16  # bytes: the simulator takes no alignment
PAD = 4  # elements added to each shared row: keeps rows 16-byte aligned (float32), shifts banks


class FusedTiles(NamedTuple):
    """Compile-time shapes of the fused attention kernel."""
    block_q: int          # query rows per block (BQ)
    block_k: int          # keys per tile of the key loop (BK)
    rows_per_thread: int  # query rows each thread owns (TM)
    threads_per_row: int  # threads sharing a query row (TX): a power of two dividing 32
    features: int         # features of q and k kept in shared memory at once (FE)
    block_v: int          # output columns per block (BV); more blocks along grid y cover Ev
    min_blocks: int = 1   # launch bound: blocks per SM that the registers must allow
    resident: bool = True  # E <= features: the query tile stays; False: E walked in panels

    @property
    def threads(self) -> int:
        return self.block_q // self.rows_per_thread * self.threads_per_row

    def shared_bytes(self, itemsize: int) -> int:
        BQ, BK, _, TX, FE, BV = self[:6]
        kv = max(FE * (BK + PAD), BK * (BV + PAD))
        red = BQ * (TX + 1) if _SIMULATOR else 1
        return itemsize * (FE * (BQ + PAD) + kv + BK * (BQ + PAD) + red)

    def check(self, itemsize: int = 4) -> "FusedTiles":
        BQ, BK, TM, TX, FE, BV = self[:6]
        NT = self.threads if min(self[:7]) > 0 and BQ % TM == 0 else 0
        ok = (min(self[:7]) > 0 and BQ % TM == 0 and BK % TX == 0 and BV % TX == 0 and BQ % BK == 0
              and 32 % TX == 0 and NT > 0 and NT % FE == 0 and NT % BV == 0
              and (BQ * FE) % NT == 0 and (BK * FE) % NT == 0 and (BK * BV) % NT == 0)
        if not ok:
            raise ValueError(f"inconsistent fused tiles {self}")
        if self.shared_bytes(itemsize) > 48 * 1024:
            raise ValueError(f"fused tiles {self} need {self.shared_bytes(itemsize)} bytes of "
                             f"shared memory for {itemsize}-byte values; static shared memory "
                             f"ends at 48 KiB")
        return self


def _run(n: int) -> int:
    """The length of the contiguous runs a thread's n rows (or columns) come in."""
    return 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1


def _kernel(threads: int, min_blocks: int):
    # The simulator's jit takes no launch bounds.
    if _SIMULATOR:
        return cuda.jit
    return cuda.jit(launch_bounds=(threads, min_blocks))


@functools.lru_cache(maxsize=None)
def score_steps(compute: np.dtype):
    """The per-score and per-row steps that the fused kernels share (this one and the
    tensor-core kernel of kernels/cuda/fused_mma.py), as inlined device functions computing in
    ``compute``: the variants of one scaled score, and the online softmax's rescaling, weights
    and final normalisation."""
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)
    u = np.uint64

    @_device
    def variant_score(x, inside, i, p, j, L, S, left, right, softcap, m, m_row, m_cs, mask_kind,
                      slope, use_alibi):
        """The scaled score x of query row i (at position p) and key j after the softcap, the
        window and key range (unless the whole tile is ``inside`` them), the mask and ALiBi."""
        if softcap > zero:
            x = softcap * math.tanh(x / softcap)
        if not inside and (j >= S or j < p - left or j > p + right):
            x = neg_inf
        elif mask_kind != 0 and i < L:
            mv = ct(m[u(m_row + j * m_cs)])
            if mask_kind == 1:  # (compared as compute floats: no float16 ==)
                if mv == zero:
                    x = neg_inf
            else:
                x = x + mv
        if use_alibi:
            x = x - slope * ct(abs(p - j))
        return x

    @_device
    def rescale(old_max, tile_max):
        """(the new row max, the factor of the old sums) after a tile whose max is tile_max."""
        new_max = max(old_max, tile_max)
        # every key so far masked: the factor 1, no exp(-inf + inf)
        return new_max, one if new_max == neg_inf else math.exp(old_max - new_max)

    @_device
    def weight(x, new_max):
        """exp(x - new_max); while every key so far is masked, 0 (and a NaN stays NaN)."""
        if new_max == neg_inf:
            return x - x if x != neg_inf else zero
        return math.exp(x - new_max)

    @_device
    def finish(row_sum, row_max):
        """(1 / row_sum, lse); a row with no key taking part gives 0 and lse = log(0) = -inf."""
        keep = row_sum > zero or row_sum != row_sum
        if keep:
            return one / row_sum, row_max + math.log(row_sum)
        return zero, neg_inf

    return variant_score, rescale, weight, finish


@functools.lru_cache(maxsize=None)
def fused_attention_kernel(tiles: FusedTiles, compute: np.dtype):
    """The fused attention kernel for ``tiles``, computing in ``compute`` (float32 or float64).

    Shared arrays are 1-d and indexed with unsigned integers (``u``): a signed index makes Numba
    emit a negative-index wraparound per access. Never mix ``u`` and signed ints in one
    expression (Numba types uint64 op int64 as float64).
    """
    tiles.check(np.dtype(compute).itemsize)
    BQ, BK, TM, TX, FE, BV, MIN_BLOCKS, RESIDENT = tiles
    TY = BQ // TM
    TN = BK // TX   # keys per thread
    TD = BV // TX   # output columns per thread
    NT = tiles.threads
    RM, RN, RD = _run(TM), _run(TN), _run(TD)
    PQ, PK, PVV = BQ + PAD, BK + PAD, BV + PAD  # padded shared rows
    SQ, KV, SP = FE * PQ, max(FE * PK, BK * PVV), BK * PQ  # shared array sizes
    PRE = max(BK * FE, BK * BV) // NT  # staged elements per thread
    RED = BQ * (TX + 1) if _SIMULATOR else 1
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)
    u, i64, i32 = np.uint64, np.int64, np.int32
    ALL = 0xFFFFFFFF
    variant_score, rescale, weight, finish = score_steps(compute)

    def row_of(r, ty):
        """The tile row of a thread's r-th row: runs of RM consecutive rows, TY * RM apart."""
        return u((r // RM) * (TY * RM) + r % RM) + ty * u(RM)

    def col_of(c, tx, run):
        return u((c // run) * (TX * run) + c % run) + tx * u(run)

    row_of = _device(row_of)
    col_of = _device(col_of)

    # --- staging: global memory -> registers -> shared memory -------------------------------------

    @_device
    def load_tile(pre, x, base, rs, cs, rows_left, cols_left, W, count, tid, salt):
        """pre[t] = x[base + row * rs + col * cs] for element tid + t * NT = row * W + col of a
        tile W wide (0 where row >= rows_left or col >= cols_left). NT is a multiple of W, so a
        thread keeps its column and steps NT // W rows at a time: one 64-bit base per tile, then
        32-bit offsets that are multiples of one step (contiguous rows: no column multiply).
        ``salt`` is 0, computed from the key loop's state: it keeps the compiler from hoisting
        the count offsets out of the key loop as 64-bit values (at D = 128, 32 per tile and
        operand: more than the registers hold, so they were spilled)."""
        row0 = i64(tid // u(W))
        col = i64(tid % u(W))
        thread_base = base + row0 * rs + (col if cs == 1 else col * cs)
        step = i32((NT // W) * rs) + salt
        in_cols = col < cols_left
        rows = rows_left - row0
        for t in range(count):
            val = zero
            if in_cols and t * (NT // W) < rows:
                val = ct(x[u(thread_base + i32(t * step))])
            pre[t] = val

    @_device
    def store_transposed(pre, sX, P, W, count, tid):
        """sX[col * P + row] = pre[t] (features-major: a run of rows is contiguous)."""
        at = (tid % u(W)) * u(P) + tid // u(W)
        for t in range(count):
            sX[at + u(t * (NT // W))] = pre[t]

    @_device
    def store_rows(pre, sX, P, W, count, tid):
        """sX[row * P + col] = pre[t]."""
        at = (tid // u(W)) * u(P) + tid % u(W)
        for t in range(count):
            sX[at + u(t * (NT // W) * P)] = pre[t]

    @_device
    def stage_query(pre, q, base, rs, cs, rows_left, cols_left, sQ, tid):
        """sQ[d * PQ + i] = q[base + i * rs + d * cs]: BK rows at a time through the registers
        (the key tile's count), so the staging needs no more registers than a key tile."""
        for g in range(BQ // BK):
            load_tile(pre, q, base + g * BK * rs, rs, cs, rows_left - g * BK, cols_left, FE,
                      BK * FE // NT, tid, i32(0))
            store_transposed(pre, sQ[u(g * BK):], PQ, FE, BK * FE // NT, tid)

    # --- row statistics across the TX threads of a row ----------------------------------------

    if _SIMULATOR:
        @_device
        def row_max_all(vals, sRed, ty, tx):
            """vals[r] = the max over the row's TX threads (through shared memory)."""
            cuda.syncthreads()
            for r in range(TM):
                sRed[row_of(r, ty) * u(TX + 1) + tx] = vals[r]
            cuda.syncthreads()
            for r in range(TM):
                m = vals[r]
                for t in range(TX):
                    m = max(m, sRed[row_of(r, ty) * u(TX + 1) + u(t)])
                vals[r] = m

        @_device
        def row_sum_all(vals, sRed, ty, tx):
            cuda.syncthreads()
            for r in range(TM):
                sRed[row_of(r, ty) * u(TX + 1) + tx] = vals[r]
            cuda.syncthreads()
            for r in range(TM):
                total = zero
                for t in range(TX):
                    total += sRed[row_of(r, ty) * u(TX + 1) + u(t)]
                vals[r] = total
    else:
        @_device
        def row_max_all(vals, sRed, ty, tx):
            """vals[r] = the max over the row's TX threads: consecutive lanes of one warp."""
            for r in range(TM):
                m = vals[r]
                step = TX // 2
                while step > 0:
                    m = max(m, cuda.shfl_xor_sync(ALL, m, step))
                    step //= 2
                vals[r] = m

        @_device
        def row_sum_all(vals, sRed, ty, tx):
            for r in range(TM):
                total = vals[r]
                step = TX // 2
                while step > 0:
                    total += cuda.shfl_xor_sync(ALL, total, step)
                    step //= 2
                vals[r] = total

    # --- the kernel ---------------------------------------------------------------------------

    @_kernel(NT, MIN_BLOCKS)
    def attention(q, q_outer, q_rs, q_cs, k, k_outer, k_rs, k_cs, v, v_outer, v_rs, v_cs,
                  m, m_outer, m_rs, m_cs, mask_kind, N, L, S, E, Ev, scale, offset, left, right,
                  softcap, alibi, use_alibi, cosine, out, lse):
        """Flash-style attention with the variants as runtime options: query row i sits at key
        position p = i + offset; key j takes part if p - left <= j <= p + right (causal folded
        into right); scores are scale * q.k (cosine: of unit rows), then softcap * tanh(x /
        softcap) if softcap > 0, then the mask (bool: -inf where False; float: added), then
        -alibi[n] * |p - j| if use_alibi. Only the key tiles some row of the block can see are
        visited. A row with no key gives zeros and lse -inf."""
        sQ = cuda.shared.array(SQ, ct, alignment=ALIGN)
        sKV = cuda.shared.array(KV, ct, alignment=ALIGN)
        sP = cuda.shared.array(SP, ct, alignment=ALIGN)
        sRed = cuda.shared.array(RED, ct)
        pre = cuda.local.array(PRE, ct)
        s = cuda.local.array((TM, TN), ct)
        acc = cuda.local.array((TM, TD), ct)
        a = cuda.local.array(TM, ct)
        b = cuda.local.array(TN, ct)
        bv = cuda.local.array(TD, ct)
        a_sq = cuda.local.array(TM, ct)
        b_sq = cuda.local.array(TN, ct)
        row_max = cuda.local.array(TM, ct)
        row_sum = cuda.local.array(TM, ct)
        tile_max = cuda.local.array(TM, ct)
        alpha = cuda.local.array(TM, ct)
        tid = u(cuda.threadIdx.x)
        ty = tid // u(TX)
        tx = tid % u(TX)
        n_qtiles = (L + BQ - 1) // BQ
        n = i64(cuda.blockIdx.x) % N
        q0 = (n_qtiles - 1 - i64(cuda.blockIdx.x) // N) * BQ
        c0 = i64(cuda.blockIdx.y) * BV
        q_base = q_outer[n] + q0 * q_rs
        k_base = k_outer[n]
        v_base = v_outer[n] + c0 * v_cs
        # resident tiles (E <= FE, the host's choice) compile without the panel walk, which
        # would hold the scores and the staging registers together
        resident = RESIDENT
        n_panels = 1 if RESIDENT else max(i64(1), (E + FE - 1) // FE)
        slope = alibi[n] if use_alibi else zero
        for r in range(TM):
            row_max[r] = neg_inf
            row_sum[r] = zero
            for c in range(TD):
                acc[r, c] = zero
        # the key tiles some row of the block sees: the window (causal folded in) on both sides
        p_first = q0 + offset
        p_last = min(q0 + BQ, L) - 1 + offset
        k_start = max(i64(0), p_first - left) // BK * BK
        k_end = min(S, p_last + right + 1)
        rows_left = min(i64(BQ), L - q0)
        if resident:  # the query tile, once for the whole key loop
            stage_query(pre, q, q_base, q_rs, q_cs, rows_left, E, sQ, tid)
        if k_start < k_end:
            load_tile(pre, k, k_base + k_start * k_rs, k_rs, k_cs, S - k_start, E, FE,
                      BK * FE // NT, tid, i32(0))
        for j0 in range(k_start, k_end, BK):
            salt = i32((j0 ^ k_end) >> 62)  # 0: both lie in [0, 2**62)
            for r in range(TM):
                a_sq[r] = zero
                for c in range(TN):
                    s[r, c] = zero
            for c in range(TN):
                b_sq[c] = zero
            for panel in range(n_panels):  # one panel when the query tile is resident
                d0 = panel * FE
                cuda.syncthreads()  # the previous readers of sKV (and sQ) are done
                if panel > 0:  # (the first panel was loaded during the previous tile)
                    load_tile(pre, k, k_base + j0 * k_rs + d0 * k_cs, k_rs, k_cs, S - j0,
                              E - d0, FE, BK * FE // NT, tid, salt)
                store_transposed(pre, sKV, PK, FE, BK * FE // NT, tid)
                if not resident:
                    stage_query(pre, q, q_base + d0 * q_cs, q_rs, q_cs, rows_left, E - d0, sQ,
                                tid)
                cuda.syncthreads()
                # scores: an outer product of a run of q values and one of k values per feature
                for d in range(FE):
                    for r in range(TM):
                        a[r] = sQ[u(d * PQ) + row_of(r, ty)]
                    for c in range(TN):
                        b[c] = sKV[u(d * PK) + col_of(c, tx, RN)]
                    for r in range(TM):
                        for c in range(TN):
                            s[r, c] += a[r] * b[c]
                    if cosine:
                        for r in range(TM):
                            a_sq[r] += a[r] * a[r]
                        for c in range(TN):
                            b_sq[c] += b[c] * b[c]
            # the values of this tile, in flight while the scores become weights
            load_tile(pre, v, v_base + j0 * v_rs, v_rs, v_cs, S - j0, Ev - c0, BV, BK * BV // NT,
                      tid, salt)
            # cosine and the scale on the registers (unrolled: constant indices keep them there)
            for r in range(TM):
                a_inv = one
                if cosine:
                    a_inv = one / math.sqrt(a_sq[r]) if a_sq[r] > zero else zero
                for c in range(TN):
                    x = s[r, c]
                    if cosine:
                        b_inv = one / math.sqrt(b_sq[c]) if b_sq[c] > zero else zero
                        x = x * (a_inv * b_inv)
                    s[r, c] = x * scale
            # the other variants, in their order, only where a tile needs them: the thread's own
            # scores pass through their places in sP (free until the weights are written), so
            # that a loop too long to unroll indexes shared memory, not local arrays
            inside = (j0 + BK <= S and j0 >= p_last - left and j0 + BK - 1 <= p_first + right)
            if not inside or mask_kind != 0 or softcap > zero or use_alibi:
                for c in range(TN):
                    for r in range(TM):
                        sP[col_of(c, tx, RN) * u(PQ) + row_of(r, ty)] = s[r, c]
                for r in range(TM):
                    i = q0 + i64(row_of(r, ty))
                    p = i + offset
                    m_row = m_outer[n] + i * m_rs if mask_kind != 0 and i < L else i64(0)
                    for c in range(TN):
                        j = j0 + i64(col_of(c, tx, RN))
                        at = col_of(c, tx, RN) * u(PQ) + row_of(r, ty)
                        sP[at] = variant_score(sP[at], inside, i, p, j, L, S, left, right,
                                               softcap, m, m_row, m_cs, mask_kind, slope,
                                               use_alibi)
                for c in range(TN):
                    for r in range(TM):
                        s[r, c] = sP[col_of(c, tx, RN) * u(PQ) + row_of(r, ty)]
            for r in range(TM):
                tmax = neg_inf
                for c in range(TN):
                    tmax = max(tmax, s[r, c])
                tile_max[r] = tmax
            # online softmax: the new row max, the weights exp(x - max), the old sums rescaled
            row_max_all(tile_max, sRed, ty, tx)
            for r in range(TM):
                new_max, alpha[r] = rescale(row_max[r], tile_max[r])
                for c in range(TN):
                    s[r, c] = weight(s[r, c], new_max)
                tile_sum = zero
                for c in range(TN):
                    tile_sum += s[r, c]
                row_sum[r] = row_sum[r] * alpha[r] + tile_sum
                row_max[r] = new_max
                for c in range(TD):
                    acc[r, c] *= alpha[r]
            cuda.syncthreads()  # every thread is done reading the keys
            store_rows(pre, sKV, PVV, BV, BK * BV // NT, tid)
            for c in range(TN):
                for r in range(TM):
                    sP[col_of(c, tx, RN) * u(PQ) + row_of(r, ty)] = s[r, c]
            if j0 + BK < k_end:  # the next key tile, in flight while the values are used
                load_tile(pre, k, k_base + (j0 + BK) * k_rs, k_rs, k_cs, S - j0 - BK, E, FE,
                          BK * FE // NT, tid, salt)
            cuda.syncthreads()
            # weights @ values: an outer product of a run of weights and one of values per key
            for jj in range(BK):
                for r in range(TM):
                    a[r] = sP[u(jj * PQ) + row_of(r, ty)]
                for c in range(TD):
                    bv[c] = sKV[u(jj * PVV) + col_of(c, tx, RD)]
                for r in range(TM):
                    for c in range(TD):
                        acc[r, c] += a[r] * bv[c]
        # normalise; a row with no key taking part gives zeros and lse = log(0) = -inf
        row_sum_all(row_sum, sRed, ty, tx)
        for r in range(TM):
            i = q0 + i64(row_of(r, ty))
            if i < L:
                inv, row_lse = finish(row_sum[r], row_max[r])
                for c in range(TD):
                    col = c0 + i64(col_of(c, tx, RD))
                    if col < Ev:
                        out[n, i, col] = acc[r, c] * inv
                if tx == u(0) and c0 == 0:
                    lse[n, i] = row_lse

    return attention
