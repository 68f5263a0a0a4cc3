"""Merging partial attention results computed over disjoint sets of keys.

Attention over keys K = K_1 u ... u K_n can be computed one part at a time and merged exactly
from each part's (out_i, lse_i), because lse is the log of the softmax's normaliser:

    lse = log(sum_i exp(lse_i)),    out = sum_i out_i * exp(lse_i - lse)

This is what split-KV decoding, ring attention and the Dask scale-out use.
"""
from __future__ import annotations

import numpy as np

from . import _prepare, reference

__all__ = ["merge_attention"]


def merge_attention(outs, lses):
    """Merge attention computed over disjoint key sets into attention over their union.

    Args:
        outs: a sequence of n arrays (..., L, Ev), each ``scaled_dot_product_attention(q, k_i,
            v_i)`` over one part of the keys (all of one shape and float dtype).
        lses: the matching sequence of n (..., L) log-sum-exps (``return_lse=True``).

    Returns:
        ``(out, lse)``: exactly what one call over all the keys returns, up to rounding. A part
        that saw no key (lse -inf) counts for nothing; a row whose parts are all empty gives
        zeros and lse -inf. Computed in the dtype of ``outs`` (float16 in float32).

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
        >>> parts = [fastattn.scaled_dot_product_attention(q, k[:, s], v[:, s], return_lse=True)
        ...          for s in (slice(0, 2), slice(2, 5))]
        >>> out, lse = fastattn.merge_attention(*zip(*parts))
        >>> bool(np.allclose(out, fastattn.scaled_dot_product_attention(q, k, v)))
        True
    """
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError("outs and lses must be sequences of arrays (one per part), e.g. lists; "
                        "got an array")
    outs = [_prepare.check_float_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    lses = [_prepare.check_float_array(x, f"lses[{i}]") for i, x in enumerate(lses)]
    if not outs:
        raise ValueError("merge_attention needs at least one part, got none")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have one entry per part, got {len(outs)} outs "
                         f"and {len(lses)} lses")
    shape, dtype = outs[0].shape, outs[0].dtype
    if len(shape) < 1:
        raise ValueError(f"outs[0] must be (..., L, Ev), got shape {shape}")
    for i, (o, x) in enumerate(zip(outs, lses)):
        if o.shape != shape or o.dtype != dtype:
            raise ValueError(f"outs[{i}] is {o.shape} {o.dtype}; every part must be "
                             f"{shape} {dtype} like outs[0]")
        if x.shape != shape[:-1]:
            raise ValueError(f"lses[{i}] has shape {x.shape}; it must be {shape[:-1]}, the "
                             f"shape of outs[{i}] {o.shape} without its last dim")
    compute = _prepare.compute_dtype(dtype)
    out, lse = reference.merge_attention([o.astype(compute, copy=False) for o in outs],
                                         [x.astype(compute, copy=False) for x in lses])
    return out.astype(dtype, copy=False), lse
