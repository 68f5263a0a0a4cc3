"""Attention over packed batches of sequences of different lengths, without padding.

As FlashAttention's ``flash_attn_varlen_func`` and PyTorch's ``varlen_attn``: the sequences lie
one after another in q (total_q, Hq, E), k (total_k, Hkv, E) and v (total_k, Hkv, Ev), sequence b
in rows cu_seqlens[b]:cu_seqlens[b + 1]. The CPU kernel (``kernels/cpu/decode.py``, the row-wise
kernel decoding also runs on) reads the packed arrays in place, strided per head; its work items,
(sequence, key/value head, block of query positions), are dealt to the threads by cost, so one
long sequence among short ones keeps every thread busy, and the cost is in proportion to the
sum of L_b * S_b (and less with causal attention or a window). On GPUs
(``fastattn._cuda_decode``) the same work items of every sequence run in one launch of
``kernels/cuda/decode.py``'s row kernel, the longest first.
"""
from __future__ import annotations

import numpy as np

from . import _backends, _prepare, reference
from .kvcache import ROWS_PER_ITEM, flat_view, key_range, row_variants, run_rows

__all__ = ["varlen_attention"]

# Sequences with L * S at least this go through the fused attention kernel one by one; the rest
# through the row kernel in one call.
FUSED_MIN_WORK = 256 * 256


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     alignment="top_left", scale=None, window=None, softcap=None,
                     alibi_slopes=None, return_lse=False, backend="auto"):
    """Attention within each sequence of a packed batch.

    Args:
        q: (total_q, Hq, E) float array, the batch's queries one sequence after another.
        k, v: (total_k, Hkv, E) and (total_k, Hkv, Ev); Hq a multiple of Hkv (query head h
            uses key/value head h // (Hq // Hkv)).
        cu_seqlens_q, cu_seqlens_k: int32 or int64 arrays of B + 1 offsets from 0 to total_q
            (total_k): sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] against
            k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].
        is_causal, alignment, scale, window, softcap: as in
            :func:`scaled_dot_product_attention`, within each sequence.
        alibi_slopes: (Hq,) or (B, Hq).
        return_lse: also return the log-sum-exp, (Hq, total_q).
        backend: ``"auto"`` (``"cuda"`` for device arrays, else ``"numba"``), ``"numba"``,
            ``"numpy"`` or ``"cuda"`` (one launch over the work items of every sequence).

    Returns:
        out (total_q, Hq, Ev) in q's dtype, or ``(out, lse)``: what one
        ``scaled_dot_product_attention`` per sequence gives. A query row that sees no key gives
        zeros and lse -inf.

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((7, 2, 8), dtype=np.float32) for _ in range(3))
        >>> cu = np.array([0, 3, 7], np.int32)            # two sequences, 3 and 4 tokens
        >>> out = fastattn.varlen_attention(q, k, v, cu, cu, is_causal=True)
        >>> bool(np.allclose(out[3:], fastattn.scaled_dot_product_attention(
        ...     q[3:].swapaxes(0, 1), k[3:].swapaxes(0, 1), v[3:].swapaxes(0, 1),
        ...     is_causal=True).swapaxes(0, 1), atol=1e-6))
        True
    """
    name = _backends.resolve(backend, q, k, v)
    if name == "cuda":
        from . import _cuda_decode
        out, lse = _cuda_decode.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal,
                                                 alignment, scale, window, softcap, alibi_slopes)
        return (out, lse) if return_lse else out
    a = _prepare.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, alignment, scale,
                              window, softcap, alibi_slopes)
    if name == "numpy":
        dtype = a.dtype
        out, lse = reference.varlen_attention(
            np.asarray(a.q, dtype), np.asarray(a.k, dtype), np.asarray(a.v, dtype), a.cu_q,
            a.cu_k, is_causal=a.causal, alignment=a.alignment, scale=a.scale,
            window=None if window is None else tuple(window), softcap=a.softcap or None,
            alibi_slopes=None if a.alibi is None else a.alibi.reshape(a.B, a.Hq),
            return_lse=True)
    else:
        out, lse = _numba_varlen(a, window)
    out = out if out.dtype == a.in_dtype else out.astype(a.in_dtype)
    return (out, lse) if return_lse else out


def _fused_per_sequence(a: _prepare.VarlenArgs, window, chosen, out, lse) -> bool:
    """The long sequences through the fused (register-tiled) attention kernel, one call each,
    parallel within the call; False (nothing written) where that kernel lacks a variant asked
    for. The call's copy of a sequence's rows costs O(L E), nothing beside its O(L S E)."""
    from ._api import scaled_dot_product_attention
    slopes = None if a.alibi is None else a.alibi.reshape(a.B, a.Hq)
    for i, b in enumerate(chosen):
        qs, ks = slice(a.cu_q[b], a.cu_q[b + 1]), slice(a.cu_k[b], a.cu_k[b + 1])
        try:
            o, x = scaled_dot_product_attention(
                *(np.swapaxes(arr[s], 0, 1) for arr, s in ((a.q, qs), (a.k, ks), (a.v, ks))),
                is_causal=a.causal, scale=a.scale, enable_gqa=True, return_lse=True,
                alignment=a.alignment, window=window, softcap=a.softcap or None,
                alibi_slopes=None if slopes is None else slopes[b], backend="numba")
        except NotImplementedError:
            if i == 0:
                return False
            raise
        out[qs] = np.swapaxes(o, 0, 1)
        lse[:, qs] = x
    return True


def _numba_varlen(a: _prepare.VarlenArgs, window):
    from .kernels.cpu.options import RowsLayout
    dtype = a.dtype
    B, Hq, Hkv, E, Ev, group = a.B, a.Hq, a.Hkv, a.E, a.Ev, a.group
    total_q = a.q.shape[0]
    qbuf, qs = flat_view(a.q, a.in_dtype)  # 16-bit ones too, widened as they are loaded
    kbuf, ks = flat_view(a.k, a.in_dtype)
    vbuf, vs = flat_view(a.v, a.in_dtype)
    out = np.empty((total_q, Hq, Ev), dtype)
    lse = np.empty((Hq, total_q), dtype)
    L = np.diff(a.cu_q)
    S = np.diff(a.cu_k)
    offset = np.zeros(B, np.int64) if a.alignment == "top_left" else S - L
    # The packed k and v are one block holding every sequence, sequence b from row cu_k[b].
    rows = RowsLayout(a.cu_q[:-1] * qs[0], qs[0], qs[1], np.zeros((B, 1), np.int64),
                      int(a.k.shape[0]) + 1, a.cu_k[:-1] * ks[0], 0, ks[1], ks[0],
                      a.cu_k[:-1] * vs[0], 0, vs[1], vs[0], a.cu_q[:-1] * (Hq * Ev), Hq * Ev,
                      Ev, a.cu_q[:-1].copy(), 1, total_q, offset.astype(np.int64), group, E, Ev)
    variants = row_variants(a.left, a.right, a.softcap, a.alibi, Hq, a.scale, dtype)
    # Long sequences go to the fused kernel (its register-tiled block products do more per
    # cycle than the row kernel's dot products); the short ones, all in one call, to the row
    # kernel, whose work items over (sequence, head, query block) keep the threads busy.
    long_ones = [b for b in range(B) if L[b] * S[b] >= FUSED_MIN_WORK]
    if long_ones and not _fused_per_sequence(a, window, long_ones, out, lse):
        long_ones = []
    skip = set(long_ones)
    per_item = max(1, ROWS_PER_ITEM // group)
    blocks = []
    for b in range(B):
        if b in skip:
            continue
        for t0 in range(0, int(L[b]), per_item):
            t1 = min(int(L[b]), t0 + per_item)
            lo, hi = key_range(int(offset[b]), t0, t1, int(S[b]), a.left, a.right)
            blocks.extend((b, g, t0, t1, lo, hi) for g in range(Hkv))
    if blocks:
        run_rows(qbuf, kbuf, vbuf, out.reshape(-1), lse.reshape(-1), rows, variants, blocks, 1)
    return out, lse
