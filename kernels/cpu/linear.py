"""The multi-head layer's projections on Numba's threads: out = x @ w.T (+ bias).

One BLAS product per block of rows, the blocks spread over Numba's threads with ``prange`` (the
caller keeps BLAS single-threaded): the layer then runs its products and its attention on one
thread pool, instead of handing the cores back and forth between NumPy's BLAS threads and
Numba's, whose spinning would take them from each other.
"""
import numpy as np
from numba import prange

from ._jit import parallel_jit


@parallel_jit
def linear(x, w, bias, has_bias, block_rows, out):
    """out (n, m) = x (n, k) @ w (m, k).T, plus bias (m,) when ``has_bias``."""
    n = x.shape[0]
    m = w.shape[0]
    n_blocks = (n + block_rows - 1) // block_rows
    w_t = w.T
    for b in prange(n_blocks):
        r0 = b * block_rows
        r1 = min(r0 + block_rows, n)
        block = out[r0:r1]
        np.dot(x[r0:r1], w_t, block)
        if has_bias:
            for i in range(r1 - r0):
                for j in range(m):
                    block[i, j] += bias[j]
