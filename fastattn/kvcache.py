"""Decoding from a KV cache: one step of generation (or a chunk of prefill) against the keys and
values cached so far, contiguous or paged, with the new keys and values appended in place.

The kernels (``kernels/cpu/decode.py``; on GPUs ``kernels/cuda/decode.py``, see
``fastattn._cuda_decode``) read the caches where they lie and each key and value row once for
all the query heads of its group; long caches are split across the threads (flash-decoding) and
the splits merged exactly, as :func:`fastattn.merge_attention` does.
"""
from __future__ import annotations

import functools

import numpy as np

from . import _backends, _prepare, reference

__all__ = ["attention_with_kvcache"]

# Query rows per work item (query heads of a group times query positions): enough rows to use
# each key and value row loaded from memory many times, few enough that they stay in L1.
ROWS_PER_ITEM = 64
# Flash-decoding: split the keys when there are fewer (sequence, head) items than this, into
# ranges of at least MIN_SPLIT_KEYS keys. A constant, not the thread count, so that results do
# not depend on the number of threads.
MIN_ITEMS = 16
MIN_SPLIT_KEYS = 512


def default_num_splits(blocks, min_items: int = MIN_ITEMS,
                       min_split_keys: int = MIN_SPLIT_KEYS) -> int:
    """Key splits per (b, g, t0, t1, lo, hi) block when the caller gave none: enough work items
    for ``min_items``, each split at least ``min_split_keys`` keys long (the rule of
    ``kernels/cpu/decode.default_splits``, for the cuda backend with its own constants)."""
    from .kernels.cpu import decode
    blocks = np.array(blocks, np.int64).reshape(-1, 6)
    return int(decode.default_splits(blocks, min_items, min_split_keys))


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, is_causal=True, scale=None, window=None,
                           softcap=None, alibi_slopes=None, return_lse=False, num_splits=None,
                           backend="auto"):
    """Attention of new queries over a KV cache, appending the new keys and values first.

    Args:
        q: (B, Hq, Lq, E) float array: one query row per batch row when decoding (Lq = 1), or a
            chunk of a prompt (chunked prefill).
        k_cache, v_cache: (B, Hkv, S_max, E) and (B, Hkv, S_max, Ev), or paged: (num_blocks,
            Hkv, block_size, E / Ev) with ``block_table``. The dtype of ``q``; Hq a multiple of
            Hkv (grouped-query attention: query head h uses cache head h // (Hq // Hkv)).
        k, v: optional (B, Hkv, Lq, E) and (B, Hkv, Lq, Ev): the new keys and values, written
            into the caches in place at positions cache_seqlens[b] .. cache_seqlens[b] + Lq - 1
            before the attention. This is the one function of fastattn that writes an argument,
            and it writes nothing else (a bad call raises before writing anything).
        cache_seqlens: int or (B,) int array: the tokens already in each row's cache.
        block_table: (B, max_blocks) integer array for a paged cache: row b's key t lives in
            block ``block_table[b, t // block_size]`` at ``t % block_size`` (as vLLM and
            FlashAttention's ``flash_attn_with_kvcache``).
        is_causal: default True: row b attends over its first n_b keys (n_b = cache_seqlens[b],
            + Lq with k and v), bottom-right aligned: query t sits at position n_b - Lq + t and
            sees keys j <= n_b - Lq + t.
        scale, window, softcap, alibi_slopes: as in :func:`scaled_dot_product_attention`
            (positions bottom-right aligned); ``alibi_slopes`` (Hq,) or (B, Hq).
        return_lse: also return the log-sum-exp, (B, Hq, Lq).
        num_splits: split each row's keys into this many ranges, one work item each, merged
            exactly (default: split only when B * Hkv is small and the cache long).
        backend: ``"auto"`` (``"cuda"`` for device arrays, else ``"numba"``), ``"numba"``,
            ``"numpy"`` or ``"cuda"`` (device caches are read and written on the device; NumPy
            ones are copied in, the new rows written into the user's caches).

    Returns:
        out (B, Hq, Lq, Ev) in q's dtype, or ``(out, lse)``. float16 and bfloat16
        (``ml_dtypes``) caches are read in place and widened to float32 as they are loaded
        (no float32 copy of the cache); the result, computed in float32, comes back in their
        dtype and the lse in float32. A query row that sees no key (an
        empty cache without new keys) gives zeros and lse -inf.

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> k_cache = np.zeros((1, 2, 16, 8), np.float32); v_cache = np.zeros_like(k_cache)
        >>> q, k, v = (rng.standard_normal((1, 4, 1, 8), dtype=np.float32) for _ in range(3))
        >>> out = fastattn.attention_with_kvcache(q, k_cache, v_cache, k[:, :2], v[:, :2],
        ...                                       cache_seqlens=0)
        >>> bool(np.allclose(out, np.repeat(v[:, :2], 2, axis=1)))  # one key: its value
        True
    """
    name = _backends.resolve(backend, q, k_cache, v_cache, k, v)
    if name == "cuda":
        from . import _cuda_decode
        out, lse = _cuda_decode.attention_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens, block_table, is_causal, scale, window,
            softcap, alibi_slopes, num_splits)
        return (out, lse) if return_lse else out
    a = _prepare.check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table,
                               is_causal, scale, window, softcap, alibi_slopes, num_splits)
    if a.k is not None:
        _append(a)
    if name == "numpy":
        out, lse = _reference(a, window)
    else:
        out, lse = _numba_decode(a, num_splits)
    out = out if out.dtype == a.in_dtype else out.astype(a.in_dtype)
    return (out, lse) if return_lse else out


def _append(a: _prepare.KVCacheArgs) -> None:
    """Write k and v into the caches at each row's positions old .. old + Lq - 1."""
    Lq = a.Lq
    for b in range(a.B):
        start = int(a.old_lengths[b])
        if a.block_table is None:
            a.k_cache[b, :, start:start + Lq] = a.k[b]
            a.v_cache[b, :, start:start + Lq] = a.v[b]
            continue
        t = np.arange(start, start + Lq)
        block_size = a.k_cache.shape[2]
        blocks = a.block_table[b, t // block_size]
        a.k_cache[blocks, :, t % block_size] = np.swapaxes(a.k[b], 0, 1)
        a.v_cache[blocks, :, t % block_size] = np.swapaxes(a.v[b], 0, 1)


def _reference(a: _prepare.KVCacheArgs, window):
    dtype = a.dtype
    alibi = None if a.alibi is None else a.alibi.reshape(a.B, a.Hq)
    out, lse = reference.attention_with_kvcache(
        np.asarray(a.q, dtype), a.k_cache, a.v_cache, cache_seqlens=a.lengths,
        block_table=a.block_table, is_causal=a.causal, scale=a.scale,
        window=None if window is None else tuple(window), softcap=a.softcap or None,
        alibi_slopes=alibi, return_lse=True)
    return out, lse


# --- the numba backend ---------------------------------------------------------------------------

def flat_view(x: np.ndarray, dtype) -> tuple[np.ndarray, tuple]:
    """A read-only 1-d view of the memory ``x`` spans from its first element, and x's strides
    in elements: the kernels read x in place through it (float16 and bfloat16 as the integer
    views of their bits that the kernels widen as they load, ``_numba.kernel_input``). A copy
    only when x is not in ``dtype`` or its last dim is not contiguous (or a stride is
    negative)."""
    from ._numba import kernel_input
    if x.dtype == dtype and x.flags.c_contiguous and x.size:
        # The common case (a cache, a contiguous query): a plain reshape, no strides to work out.
        strides = tuple(s // x.itemsize if n > 1 else 0 for s, n in zip(x.strides, x.shape))
        return kernel_input(x.reshape(-1)), strides
    if (x.dtype != dtype or (x.shape[-1] > 1 and x.strides[-1] != x.itemsize)
            or any(s < 0 for s in x.strides) or any(s % x.itemsize for s in x.strides)):
        x = np.ascontiguousarray(x, dtype=dtype)
    strides = tuple(s // x.itemsize if n > 1 else 0 for s, n in zip(x.strides, x.shape))
    span = 0 if x.size == 0 else 1 + sum((n - 1) * s for n, s in zip(x.shape, strides))
    if x.size == 0:  # nothing to read; a read-only stand-in of the same type
        x = np.zeros(1, dtype)
    flat = np.lib.stride_tricks.as_strided(x, shape=(max(span, 1),), strides=(x.itemsize,),
                                           writeable=False)
    return kernel_input(flat), strides


def row_variants(left, right, softcap, alibi, heads, scale, dtype):
    from .kernels.cpu.options import RowVariants
    has_alibi = alibi is not None
    slopes = alibi if has_alibi else _no_slopes(np.dtype(dtype))
    return RowVariants(float(scale), int(left), int(right), float(softcap), slopes, has_alibi,
                       int(heads))


@functools.lru_cache(maxsize=None)
def _no_slopes(dtype: np.dtype) -> np.ndarray:
    # The one-element stand-in for "no ALiBi", made once per dtype; only the kernels read it
    # (writable, as the slopes a caller passes: one compiled specialisation for both).
    return np.zeros(1, dtype)


def key_range(offset, t0, t1, n, left, right):
    """The keys a block of query positions [t0, t1) can see, [lo, hi)."""
    lo = max(0, offset + t0 - left)
    hi = min(n, offset + t1 - 1 + right + 1)
    return lo, max(lo, hi)


def run_rows(qbuf, kbuf, vbuf, out, lse, rows, variants, blocks, nsplit):
    """Run the row kernel on ``blocks`` (a list of (b, g, t0, t1, lo, hi)) into the flat outputs
    ``out`` and ``lse``, each block's keys in ``nsplit`` splits."""
    import numba

    from ._numba import _kernels, _lock
    from .kernels.cpu import decode
    _kernels()  # as every kernel call: the compile notice, the other pools quieted
    blocks = np.array(blocks, np.int64).reshape(-1, 6)
    with _lock:
        decode.attend_blocks(qbuf, kbuf, vbuf, out, lse, rows, variants, blocks, (nsplit, 0, 0),
                             numba.get_num_threads())


# Up to this many query rows per key/value head (L times the group), ``scaled_dot_product_
# attention`` without a mask runs on the row kernel, which reads k and v where they lie, rather
# than the fused kernel, which first lays all of k and v out in tiles: a decode step through SDPA,
# as transformers' cache makes it, or a short speculative chunk. Measured (Hq 32, Hkv 8, D 128,
# float32, 2 cores): L = 1 at S = 4096 3.4 ms against 9.3, at 32768 23 against 156; L = 4 at 4096
# 7.9 against 14.4; but L = 16 (64 rows) at 4096 37 against 21.
SDPA_ROW_KERNEL_MAX_ROWS = 16


def sdpa_on_row_kernel(p: _prepare.AttentionProblem) -> bool:
    """Whether the numba backend runs this SDPA problem on the row kernel: few query rows, no
    mask, and the row kernel's alignment (bottom-right) or none that matters."""
    _, L, _ = p.q.shape
    S = p.k.shape[1]
    v = p.variants
    aligned = v.offset == S - L or (v.left >= S and v.right >= S and v.alibi is None)
    return 0 < L * p.group <= SDPA_ROW_KERNEL_MAX_ROWS and p.mask is None and aligned and S > 0


def sdpa_rows(p: _prepare.AttentionProblem):
    """``_numba.attention`` on the row kernel (see ``sdpa_on_row_kernel``)."""
    v = p.variants
    return row_kernel_sdpa(p.q, p.k, p.v, p.dtype, p.scale, p.group, v.left, v.right, v.softcap,
                           v.alibi)


def row_kernel_sdpa(q, k, v, dtype, scale, group, left=_prepare.NO_LIMIT,
                    right=_prepare.NO_LIMIT, softcap=0.0, alibi=None):
    """(out (N, L, Ev), lse (N, L)) in the compute ``dtype`` of C-contiguous q (N, L, E), k
    (n_kv, S, E), v (n_kv, S, Ev), N = n_kv * group, the queries bottom-right on the keys: key/value
    head g's query heads are one "sequence" of a full cache of S keys, read in place. Few steps
    in Python: this runs on every decode step of a model (``fastattn.torch`` calls it
    directly for a plain decode step)."""
    import numba

    from ._numba import _kernels, _lock, kernel_input
    from .kernels.cpu import decode
    N, L, _ = q.shape
    out = np.empty((N, L, v.shape[2]), dtype)
    lse = np.empty((N, L), dtype)
    slopes = _no_slopes(dtype) if alibi is None else np.ascontiguousarray(alibi, dtype)
    _kernels()  # as every kernel call: the compile notice, the other pools quieted
    with _lock:
        decode.attend_sdpa_rows(
            kernel_input(q), kernel_input(k), kernel_input(v), out, lse, float(scale), group,
            int(left), int(right), float(softcap), slopes, alibi is not None,
            max(1, ROWS_PER_ITEM // group), (0, MIN_ITEMS, MIN_SPLIT_KEYS),
            numba.get_num_threads())
    return out, lse


def _numba_decode(a: _prepare.KVCacheArgs, num_splits):
    import numba

    from ._numba import _kernels, _lock
    from .kernels.cpu import decode
    from .kernels.cpu.options import RowsLayout
    dtype = a.dtype
    B, Hq, Hkv, Lq, E, Ev, group = a.B, a.Hq, a.Hkv, a.Lq, a.E, a.Ev, a.group
    # read in place, as the caches (16-bit ones too: the kernel widens them as it loads)
    qbuf, qs = flat_view(a.q, a.in_dtype)
    kbuf, ks = flat_view(a.k_cache, a.in_dtype)
    vbuf, vs = flat_view(a.v_cache, a.in_dtype)
    arange, zeros, one_block_each = _index_arrays(B)
    if a.paged:
        table, block_size = np.ascontiguousarray(a.block_table), a.k_cache.shape[2]
    else:  # a contiguous cache is a paged one of one block per row
        table, block_size = one_block_each, max(a.k_cache.shape[2], 1)
    out = np.empty((B, Hq, Lq, Ev), dtype)
    lse = np.empty((B, Hq, Lq), dtype)
    rows = RowsLayout(arange * qs[0], qs[2], qs[1], table, int(block_size), zeros, ks[0], ks[1],
                      ks[2], zeros, vs[0], vs[1], vs[2], arange * (Hq * Lq * Ev), Ev, Lq * Ev,
                      arange * (Hq * Lq), 1, Lq, a.lengths - Lq, group, E, Ev)
    variants = row_variants(a.left, a.right, a.softcap, a.alibi, Hq, a.scale, dtype)
    splits = (0 if num_splits is None else int(num_splits), MIN_ITEMS, MIN_SPLIT_KEYS)
    if B * Hkv:
        _kernels()  # as every kernel call: the compile notice, the other pools quieted
        with _lock:
            decode.attend_cache(qbuf, kbuf, vbuf, out.reshape(-1), lse.reshape(-1), rows,
                                variants, a.lengths, Lq, Hkv, max(1, ROWS_PER_ITEM // group),
                                int(a.left), int(a.right), splits, numba.get_num_threads())
    return out, lse


@functools.lru_cache(maxsize=64)
def _index_arrays(B: int):
    """0 .. B-1, B zeros and the block table of a contiguous cache (one block per sequence),
    int64: made once per batch size, as every decode step needs them. Only the kernels read
    them (left writable: a read-only array would be another compiled specialisation)."""
    arange = np.arange(B, dtype=np.int64)
    return arange, np.zeros(B, np.int64), arange[:, None].copy()
