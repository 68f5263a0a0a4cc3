"""The ``cuda`` backend of ``attention_with_kvcache`` and ``varlen_attention``: the checks of the
other backends, then the row kernels of ``kernels/cuda/decode.py``.

Arrays move as in ``fastattn._cuda``: device arrays (Numba's, CuPy's, PyTorch CUDA tensors) are
read in place whatever their strides, and a result is on the device when any data input is;
NumPy inputs are copied to the device. The new keys and values go into device caches on the
device (``copy_rows``, the same bits). Into NumPy caches they are written on the host, by the
same code as the numba backend's, before the caches are copied in: the user's caches hold the
new rows, bit-exact, and nothing else of them is written.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import cuda

from . import _backends, _prepare
from ._cuda import _SIMULATOR, DeviceInput, _as_device_array, _block_v, _operand
from .kernels import cuda as kernels
from .kernels.cuda.decode import LAYOUT, decode_kernels

# float32: 8 x 16 threads, each owning 1 query row (8 rows: a GQA group of up to 8 heads, or
# several query positions) x 4 keys of a 64-key tile and 8 output columns; 15 KiB of shared
# memory; registers capped at 96 for 5 blocks (20 warps) per SM (at 80 or 64 the compiler
# spills). float64: 16 rows (2 per thread), half the key tile and the staged features, 128
# registers for 4 blocks (16 warps) per SM (bench/cuda_compile_check.py reports them).
GPU_TILES = {
    np.dtype(np.float32): kernels.Tiles(block_q=8, block_k=64, rows_per_thread=1,
                                        threads_per_row=16, chunk=16, block_v=128),
    np.dtype(np.float64): kernels.Tiles(block_q=16, block_k=32, rows_per_thread=2,
                                        threads_per_row=16, chunk=8, block_v=128),
}
TILES = GPU_TILES
if _SIMULATOR:  # simulated threads are Python threads: small blocks keep simulated runs quick
    TILES = {dtype: kernels.Tiles(block_q=4, block_k=8, rows_per_thread=2, threads_per_row=4,
                                  chunk=4, block_v=8) for dtype in GPU_TILES}
# Flash-decoding: when there are fewer work items than this (two thread blocks for each SM of
# an H100/H200), split the keys into ranges of at least MIN_SPLIT_KEYS. Constants, not the
# device's properties, so that results do not depend on the device.
MIN_ITEMS = 264
MIN_SPLIT_KEYS = 256
# The row kernel's launch bound: blocks per SM its registers must allow.
MIN_BLOCKS = {np.dtype(np.float32): 5, np.dtype(np.float64): 4}


def _tiles(dtype, Ev: int) -> kernels.Tiles:
    t = TILES[np.dtype(dtype)]
    return t._replace(block_v=_block_v(t.threads_per_row, t.block_v, Ev))


def _host(x):
    """Lengths, block tables and cu_seqlens are read on the host: a device array is copied."""
    if x is None or isinstance(x, (int, np.integer)):
        return x
    if _prepare.is_numba_device_array(x):
        return x.copy_to_host()
    if hasattr(x, "__cuda_array_interface__") and not hasattr(x, "__array_interface__"):
        return cuda.as_cuda_array(x).copy_to_host()
    return x


def _to_host(x):
    return x.array.copy_to_host() if isinstance(x, DeviceInput) else x


def _item_rows(B, Hkv, rows_of, block_q):
    """(b, g, r0, r1) for every block of at most ``block_q`` rows of each (b, g)."""
    for b in range(B):
        R = int(rows_of[b])
        for g in range(Hkv):
            for r0 in range(0, R, block_q):
                yield b, g, r0, min(R, r0 + block_q)


def _key_range(offset, r0, r1, group, n, left, right):
    """[lo, hi): the keys the query positions of rows r0..r1-1 can see."""
    t0, t1 = r0 // group, (r1 - 1) // group + 1
    lo = max(0, offset + t0 - left)
    hi = min(n, offset + t1 - 1 + right + 1)
    return lo, max(lo, hi)


def _split(blocks, nsplit):
    """Work items (n, 7) from (b, g, r0, r1, lo, hi) blocks, each split into ``nsplit`` key
    ranges (then written to partial rows, merged by merges (m, 6)), longest first (the GPU
    starts blocks roughly in order: the long ones first keep every SM busy to the end)."""
    items, merges, parts = [], [], 0
    for b, g, r0, r1, lo, hi in blocks:
        if nsplit == 1:
            items.append((b, g, r0, r1, lo, hi, -1))
            continue
        R = r1 - r0
        for s in range(nsplit):
            items.append((b, g, r0, r1, lo + (hi - lo) * s // nsplit,
                          lo + (hi - lo) * (s + 1) // nsplit, parts + s * R))
        merges.append((b, g, r0, r1, parts, nsplit))
        parts += nsplit * R
    items.sort(key=lambda it: (-(it[5] - it[4]), it))
    return (np.array(items, np.int64).reshape(-1, 7), np.array(merges, np.int64).reshape(-1, 6),
            parts)


def _run(tiles, dtype, opq, opk, opv, table, seq, layout, alibi, scale, softcap, blocks,
         nsplit, out, lse):
    ks = decode_kernels(tiles, dtype, MIN_BLOCKS[dtype])
    items, merges, parts = _split(blocks, nsplit)
    if not len(items):
        return
    Ev = layout["Ev"]
    ct = dtype.type
    part_out = cuda.device_array((max(parts, 1), max(Ev, 1)), dtype)
    part_lse = cuda.device_array(max(parts, 1), dtype)
    table = np.ascontiguousarray(table, np.int64)
    if table.shape[1] == 0:
        table = np.zeros((table.shape[0], 1), np.int64)
    d_seq = cuda.to_device(np.ascontiguousarray(seq, np.int64))
    d_layout = cuda.to_device(np.array([layout[name] for name in LAYOUT], np.int64))
    use_alibi = alibi is not None
    slopes = np.ascontiguousarray(alibi if use_alibi else np.zeros(1), dtype)
    grid = (len(items), max(1, -(-Ev // tiles.block_v)))
    ks.attend[grid, tiles.threads](
        opq.flat, opk.flat, opv.flat, cuda.to_device(table), d_seq, d_layout,
        cuda.to_device(slopes), cuda.to_device(items), ct(scale), ct(softcap), use_alibi, out,
        lse, part_out, part_lse)
    if len(merges):
        ks.merge[len(merges), tiles.threads](part_out, part_lse, cuda.to_device(merges), d_seq,
                                             d_layout, out, lse)


def _window(left, right, far):
    """Window sides past any position clamped to ``far``: p - left and p + right stay small."""
    return min(left, far), min(right, far)


# --- attention_with_kvcache ---------------------------------------------------------------------

def _append_on_device(a, tiles, dtype, caches):
    """Write k and v into the device caches at each row's positions old .. old + Lq - 1."""
    copy_rows = decode_kernels(tiles, dtype, MIN_BLOCKS[dtype]).copy_rows
    B, Hkv, Lq = a.B, a.Hkv, a.Lq
    b, h, t = (x.reshape(-1) for x in np.meshgrid(np.arange(B), np.arange(Hkv), np.arange(Lq),
                                                  indexing="ij"))
    pos = a.old_lengths[b] + t
    for new, cache in zip((a.k, a.v), caches):
        src = _operand(new)
        ss, cs = src.strides, cache.strides
        src_rows = src.offset + b * ss[0] + h * ss[1] + t * ss[2]
        if a.paged:
            block_size = a.k_cache.shape[2]
            page = a.block_table[b, pos // block_size]
            dst_rows = cache.offset + page * cs[0] + h * cs[1] + (pos % block_size) * cs[2]
        else:
            dst_rows = cache.offset + b * cs[0] + h * cs[1] + pos * cs[2]
        copy_rows[len(b), tiles.threads](src.flat, cuda.to_device(src_rows.astype(np.int64)),
                                         ss[3], cache.flat,
                                         cuda.to_device(dst_rows.astype(np.int64)), cs[3],
                                         new.shape[3])


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, is_causal,
                           scale, window, softcap, alibi_slopes, num_splits):
    """(out, lse) of ``fastattn.attention_with_kvcache`` on the GPU (see there)."""
    from .kvcache import _append
    arrays = (q, k_cache, v_cache, k, v)
    on_device = any(_backends.is_device_array(x) for x in arrays if x is not None)
    q, k_cache, v_cache, k, v = (_as_device_array(x) for x in arrays)
    a = _prepare.check_kvcache(q, k_cache, v_cache, k, v, _host(cache_seqlens),
                               _host(block_table), is_causal, scale, window, softcap,
                               alibi_slopes, num_splits)
    dtype = a.dtype
    tiles = _tiles(dtype, a.Ev)
    B, Hq, Hkv, Lq, E, Ev, group = a.B, a.Hq, a.Hkv, a.Lq, a.E, a.Ev, a.group
    device_caches = _prepare.is_numba_device_array(a.k_cache)
    if a.k is not None and not device_caches:
        # NumPy caches take the new rows on the host (the numba backend's append), then go in.
        _append(dataclasses.replace(a, k=_to_host(a.k), v=_to_host(a.v)))
    opq, opk, opv = _operand(a.q), _operand(a.k_cache), _operand(a.v_cache)
    if a.k is not None and device_caches:
        _append_on_device(a, tiles, dtype, (opk, opv))
    out = cuda.device_array(B * Hq * Lq * Ev, a.in_dtype)
    lse = cuda.device_array(B * Hq * Lq, dtype)
    qs, ks, vs = opq.strides, opk.strides, opv.strides
    arange = np.arange(B, dtype=np.int64)
    if a.paged:
        table, block_size = a.block_table, a.k_cache.shape[2]
    else:  # a contiguous cache is a paged one of one page per row
        table, block_size = arange[:, None], max(a.k_cache.shape[2], 1)
    seq = np.stack([opq.offset + arange * qs[0], np.full(B, opk.offset), np.full(B, opv.offset),
                    arange * (Hq * Lq * Ev), arange * (Hq * Lq), a.lengths - Lq], axis=1)
    capacity = (table.shape[1] * block_size) if a.paged else a.k_cache.shape[2]
    left, right = _window(a.left, a.right, capacity + Lq + 1)
    layout = dict(q_pos=qs[2], q_head=qs[1], q_col=qs[3], block_size=block_size, k_block=ks[0],
                  k_head=ks[1], k_pos=ks[2], k_col=ks[3], v_block=vs[0], v_head=vs[1],
                  v_pos=vs[2], v_col=vs[3], out_pos=Ev, out_head=Lq * Ev, lse_pos=1,
                  lse_head=Lq, group=group, E=E, Ev=Ev, heads=Hq, left=left, right=right)
    blocks = []
    for b, g, r0, r1 in _item_rows(B, Hkv, np.full(B, Lq * group), tiles.block_q):
        n = int(a.lengths[b])
        blocks.append((b, g, r0, r1, *_key_range(n - Lq, r0, r1, group, n, a.left, a.right)))
    if num_splits is None:
        from .kvcache import default_num_splits
        num_splits = default_num_splits(blocks, MIN_ITEMS, MIN_SPLIT_KEYS)
    _run(tiles, dtype, opq, opk, opv, table, seq, layout, a.alibi, a.scale, a.softcap, blocks,
         int(num_splits), out, lse)
    out = out.reshape((B, Hq, Lq, Ev))
    lse = lse.reshape((B, Hq, Lq))
    if on_device:
        return out, lse
    return out.copy_to_host(), lse.copy_to_host()


# --- varlen_attention ---------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, alignment, scale, window,
                     softcap, alibi_slopes):
    """(out, lse) of ``fastattn.varlen_attention`` on the GPU in one launch: the work items
    (sequence, key/value head, block of query rows) of every sequence, the longest first."""
    arrays = (q, k, v)
    on_device = any(_backends.is_device_array(x) for x in arrays)
    q, k, v = (_as_device_array(x) for x in arrays)
    a = _prepare.check_varlen(q, k, v, _host(cu_seqlens_q), _host(cu_seqlens_k), is_causal,
                              alignment, scale, window, softcap, alibi_slopes)
    dtype = a.dtype
    tiles = _tiles(dtype, a.Ev)
    B, Hq, Hkv, E, Ev, group = a.B, a.Hq, a.Hkv, a.E, a.Ev, a.group
    total_q, total_k = int(a.q.shape[0]), int(a.k.shape[0])
    opq, opk, opv = _operand(a.q), _operand(a.k), _operand(a.v)
    qs, ks, vs = opq.strides, opk.strides, opv.strides
    out = cuda.device_array(total_q * Hq * Ev, a.in_dtype)
    lse = cuda.device_array(Hq * total_q, dtype)
    L, S = np.diff(a.cu_q), np.diff(a.cu_k)
    offset = np.zeros(B, np.int64) if a.alignment == "top_left" else S - L
    cu_q, cu_k = a.cu_q[:-1], a.cu_k[:-1]
    # The packed k and v are one page holding every sequence, sequence b from row cu_k[b].
    seq = np.stack([opq.offset + cu_q * qs[0], opk.offset + cu_k * ks[0],
                    opv.offset + cu_k * vs[0], cu_q * (Hq * Ev), cu_q, offset], axis=1)
    left, right = _window(a.left, a.right, total_q + total_k + 1)
    layout = dict(q_pos=qs[0], q_head=qs[1], q_col=qs[2], block_size=total_k + 1, k_block=0,
                  k_head=ks[1], k_pos=ks[0], k_col=ks[2], v_block=0, v_head=vs[1], v_pos=vs[0],
                  v_col=vs[2], out_pos=Hq * Ev, out_head=Ev, lse_pos=1, lse_head=total_q,
                  group=group, E=E, Ev=Ev, heads=Hq, left=left, right=right)
    blocks = [(b, g, r0, r1, *_key_range(int(offset[b]), r0, r1, group, int(S[b]), a.left,
                                         a.right))
              for b, g, r0, r1 in _item_rows(B, Hkv, L * group, tiles.block_q)]
    _run(tiles, dtype, opq, opk, opv, np.zeros((B, 1), np.int64), seq, layout, a.alibi, a.scale,
         a.softcap, blocks, 1, out, lse)
    out = out.reshape((total_q, Hq, Ev))
    lse = lse.reshape((Hq, total_q))
    if on_device:
        return out, lse
    return out.copy_to_host(), lse.copy_to_host()
