"""Row-wise softmax for NVIDIA GPUs (``numba.cuda``), rows read through row layouts."""
import functools
import math

import numpy as np
from numba import cuda  # the name must stay `cuda`: the simulator swaps it in these globals

from ._common import RowTiles


@functools.lru_cache(maxsize=None)
def softmax_kernel(tiles: RowTiles, compute: np.dtype):
    """Row-wise softmax with an optional bool mask, x, mask and out read through row layouts."""
    RB, TX = tiles
    ct = np.dtype(compute).type
    zero, one, neg_inf = ct(0), ct(1), ct(-np.inf)

    @cuda.jit
    def softmax(x, x_outer, x_rs, x_cs, m, m_outer, m_rs, m_cs, has_mask, inner, R, C,
                out, o_outer, o_rs, o_cs):
        """Row r is (outer r // inner, inner r % inner); grid: rows / RB blocks of RB x TX."""
        sMax = cuda.shared.array((RB, TX), ct)
        sSum = cuda.shared.array((RB, TX), ct)
        tid = cuda.threadIdx.x
        ty = tid // TX
        tx = tid % TX
        r = cuda.blockIdx.x * RB + ty
        x_row = 0
        m_row = 0
        # this thread's columns: running max and sum of exp(x - max), in one read
        run_max = neg_inf
        run_sum = zero
        if r < R:
            x_row = x_outer[r // inner] + r % inner * x_rs
            if has_mask:
                m_row = m_outer[r // inner] + r % inner * m_rs
            for j in range(tx, C, TX):
                val = ct(x[x_row + j * x_cs])
                if has_mask and not m[m_row + j * m_cs]:
                    val = neg_inf
                if val > run_max:
                    run_sum = run_sum * math.exp(run_max - val) + one
                    run_max = val
                elif val != neg_inf:  # a NaN makes the sum NaN
                    run_sum += math.exp(val - run_max)
        sMax[ty, tx] = run_max
        sSum[ty, tx] = run_sum
        cuda.syncthreads()
        if r < R:
            # combine the row's threads
            row_max = neg_inf
            for t in range(TX):
                row_max = max(row_max, sMax[ty, t])
            total = zero
            for t in range(TX):
                part = sSum[ty, t]
                if sMax[ty, t] != neg_inf:
                    part = part * math.exp(sMax[ty, t] - row_max)
                total += part
            inv = one / total if total > zero or total != total else zero
            o_row = o_outer[r // inner] + r % inner * o_rs
            for j in range(tx, C, TX):
                w = zero
                if inv != inv:
                    w = inv
                elif row_max != neg_inf:
                    val = ct(x[x_row + j * x_cs])
                    if not (has_mask and not m[m_row + j * m_cs]):
                        w = math.exp(val - row_max) * inv
                out[o_row + j * o_cs] = w

    return softmax
