"""The ``cuda`` backend: the checks of the other backends, then the kernels of kernels/cuda/.

NumPy inputs are copied to the device and the result is copied back. Inputs with
``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA tensors) are read in
place, whatever their strides, and give a Numba device array (which exposes
``__cuda_array_interface__``); a result is on the device when any data input is.

Every operand reaches the kernels as a 1-d array over its memory plus a row layout (see
``_rows``), so nothing is made contiguous, broadcast or converted on the host: masks (bool or
float, any broadcast shape) are read in place, float16 is widened in the kernels, and cosine
similarity divides by norms computed in the kernels. Attention of float16 inputs (and of bfloat16
ones, through ``bfloat16_attention``) runs on tensor cores (kernels/cuda/fused_mma.py), as
FlashAttention does: 16-bit products accumulated in float32, the weights rounded to 16 bits
before they meet the values; float32 stays exact FP32 FMA.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import cuda

from . import _backends, _prepare
from .kernels import cuda as kernels  # importing compiles nothing

_SIMULATOR = kernels._SIMULATOR

# Tile shapes per compute dtype (see kernels/cuda/attention.py) of the similarity and attention
# weights kernels. float32: 256 threads, each owning 4 query rows x 4 keys of a 64 x 64 tile; 37
# KiB of shared memory. float64 halves the tile to stay under 48 KiB. The tests swap in tiny ones.
TILES = {
    np.dtype(np.float32): kernels.Tiles(block_q=64, block_k=64, rows_per_thread=4,
                                        threads_per_row=16, chunk=16, block_v=128),
    np.dtype(np.float64): kernels.Tiles(block_q=32, block_k=32, rows_per_thread=2,
                                        threads_per_row=16, chunk=8, block_v=128),
}
# The fused attention kernel's tiles (kernels/cuda/fused.py) per compute dtype: the first that
# keeps E features is used (past the last, the first ones walk E in panels).
# float32, E <= 64: 128 threads, 4 rows x 4 keys of scores and 4 rows x 8 output columns per
# thread, the 64-row query tile resident, 35 KiB of shared memory, registers capped for 4 blocks
# (16 warps) per SM. E <= 128: 32-row query tiles (the resident tile stays under 48 KiB), 2 rows
# x 4 keys and 2 rows x 16 columns per thread, 41 KiB, capped at 128 registers for 4 blocks (16
# warps) per SM (122 used, no spills: see the staging's ``salt`` in kernels/cuda/fused.py). 256
# threads cannot reach 4 FFMA per shared load at E = 128 within 48 KiB of static shared memory
# (a block's score tile must hold 8 scores per thread), and numba-cuda has no way to raise the
# dynamic shared memory limit past 48 KiB.
GPU_FUSED_TILES = {
    np.dtype(np.float32): (
        kernels.FusedTiles(block_q=64, block_k=32, rows_per_thread=4, threads_per_row=8,
                           features=64, block_v=64, min_blocks=4),
        kernels.FusedTiles(block_q=32, block_k=32, rows_per_thread=2, threads_per_row=8,
                           features=128, block_v=128, min_blocks=4),
    ),
    np.dtype(np.float64): (
        kernels.FusedTiles(block_q=32, block_k=16, rows_per_thread=2, threads_per_row=4,
                           features=64, block_v=64, min_blocks=2),
    ),
}
FUSED_TILES = GPU_FUSED_TILES
# The tensor-core kernel's tiles (kernels/cuda/fused_mma.py) for 16-bit inputs: the first that
# keeps E features (past the last, the float32 kernel computes). 4 warps (64 query rows) a block.
# E <= 64: 128 registers, 4 blocks (16 warps) per SM, no spills. E <= 128: 217 registers, 2
# blocks (8 warps); capped for 3 blocks it spills at block_k 32, and fits (162 registers) only at
# block_k 16, whose per-tile overhead is twice as large: untimed, bench/gpu_check.py --mma-tiles
# 4,16,128,128,3 compares it.
GPU_MMA_TILES = (
    kernels.MmaTiles(warps=4, block_k=32, features=64, block_v=64, min_blocks=4),
    kernels.MmaTiles(warps=4, block_k=32, features=128, block_v=128, min_blocks=2),
)
MMA_TILES = GPU_MMA_TILES
# 16-bit input dtypes that go to the tensor-core kernel, with the kernel's kind
MMA_KINDS = {np.dtype(np.float16): "float16"}
SOFTMAX_TILES = kernels.RowTiles(rows_per_block=8, threads_per_row=32)
if _SIMULATOR:
    # Simulated threads are Python threads: small blocks keep simulated runs quick.
    TILES = {dtype: kernels.Tiles(block_q=8, block_k=8, rows_per_thread=2, threads_per_row=4,
                                  chunk=4, block_v=16) for dtype in TILES}
    FUSED_TILES = {dtype: (kernels.FusedTiles(block_q=8, block_k=8, rows_per_thread=2,
                                              threads_per_row=4, features=8, block_v=16),)
                   for dtype in FUSED_TILES}
    SOFTMAX_TILES = kernels.RowTiles(rows_per_block=2, threads_per_row=4)
    MMA_TILES = (kernels.MmaTiles(warps=1, block_k=16, features=16, block_v=16),
                 kernels.MmaTiles(warps=1, block_k=16, features=32, block_v=16))


def _lock_simulator_shared_arrays() -> None:
    """Numba's CUDA simulator (numba-cuda 0.30.4 and earlier) hands out ``cuda.shared.array``
    from a dict keyed by the calling line and filled with no lock: a block's threads, Python
    threads started together, can race at the first call, and the losers keep an array the
    others never see (a CI run failed so once: rows of a block read values nobody wrote there).
    This is the same method with the dict filled under a lock, keyed as upstream by (file, line)."""
    import sys
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None:
            raise RuntimeError("Array alignment is not supported in cudasim")
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        if shape == 0:  # dynamic shared memory: one buffer for every such call
            count = self._dynshared_size // dtype.itemsize
            return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = np.empty(shape, dtype)
                self._allocations[caller] = res
        return res

    kernelapi.FakeCUDAShared.array = array


if _SIMULATOR:
    _lock_simulator_shared_arrays()


def _tiles(dtype: np.dtype, Ev: int) -> kernels.Tiles:
    """The tiles for ``dtype``, with block_v cut to the smallest power-of-two multiple of
    threads_per_row that covers Ev (no wasted columns for Ev = 64 under block_v = 128)."""
    t = TILES[np.dtype(dtype)]
    return t._replace(block_v=_block_v(t.threads_per_row, t.block_v, Ev))


def _block_v(threads_per_row: int, block_v: int, Ev: int) -> int:
    bv = threads_per_row
    while bv < Ev and bv < block_v:
        bv *= 2
    return min(bv, block_v)


def _mma_tiles(a: _prepare.AttentionArgs):
    """The tensor-core kernel's tiles for ``a``, or None where the float32 kernel computes: not
    a 16-bit input, cosine similarity, or more features than any tile keeps."""
    if np.dtype(a.in_dtype) not in MMA_KINDS or a.similarity == "cosine":
        return None
    t = next((t for t in MMA_TILES if a.E <= t.features), None)
    if t is None:
        return None
    bv = 8
    while bv < a.Ev and bv < t.block_v:
        bv *= 2
    return t._replace(block_v=min(bv, t.block_v))


def _fused_tiles(dtype: np.dtype, E: int, Ev: int) -> kernels.FusedTiles:
    """The fused kernel's tiles for E features, block_v cut as in ``_tiles`` but kept a whole
    number of staged elements per thread."""
    choices = FUSED_TILES[np.dtype(dtype)]
    t = next((t for t in choices if E <= t.features), None)
    if t is None:  # more features than any tile keeps: the first tiles walk them in panels
        t = choices[0]._replace(resident=False, min_blocks=1)
    bv = _block_v(t.threads_per_row, t.block_v, Ev)
    while (t.block_k * bv) % t.threads:
        bv *= 2
    return t._replace(block_v=bv)


# --- operands: device memory + row layouts -------------------------------------------------------

class Operand(NamedTuple):
    """An array as the kernels see it: ``flat[offset + sum(index * strides)]``."""
    flat: object     # 1-d device array over the array's memory
    shape: tuple
    strides: tuple   # in elements; 0 along dims a NumPy input broadcast
    offset: int
    dtype: np.dtype


class DeviceInput:
    """A device array as the checks in ``_prepare`` see it: a plain tuple shape (the CUDA
    simulator's shape refuses negative indices) and a NumPy dtype; the array is ``.array``."""
    __cuda_ndarray__ = True  # what _prepare.is_numba_device_array looks for

    def __init__(self, array):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.strides = tuple(int(s) for s in array.strides)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))


def _as_device_array(x):
    """A :class:`DeviceInput` for a GPU array, or ``x`` unchanged."""
    if x is None:
        return x
    if _prepare.is_bfloat16(getattr(x, "dtype", np.float32)):
        raise TypeError("the cuda backend has no bfloat16 kernels: pass float16, float32 or "
                        "float64 arrays, or use backend='numba' for bfloat16")
    if _prepare.is_numba_device_array(x):
        return DeviceInput(x)
    if hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray):
        return DeviceInput(cuda.as_cuda_array(x))
    return x


def _operand(x) -> Operand:
    dtype = np.dtype(x.dtype)
    shape = tuple(int(n) for n in x.shape)
    if isinstance(x, np.ndarray):
        # Copy only the array's own data: dims it broadcasts (stride 0) are copied once.
        core = x[tuple(slice(0, 1) if s == 0 else slice(None) for s in x.strides)]
        core = np.ascontiguousarray(core)
        strides = tuple(0 if xs == 0 else cs // dtype.itemsize
                        for xs, cs in zip(x.strides, core.strides))
        flat = cuda.to_device(core.reshape(-1) if core.size else np.zeros(1, dtype))
        return Operand(flat, shape, strides, 0, dtype)
    if x.size == 0:
        return Operand(cuda.to_device(np.zeros(1, dtype)), shape, (0,) * len(shape), 0, dtype)
    x = x.array
    strides = []
    for s in x.strides:
        if s % dtype.itemsize:
            raise ValueError(f"strides {tuple(x.strides)} are not a multiple of the item size")
        strides.append(s // dtype.itemsize)
    low = sum((n - 1) * s for n, s in zip(shape, strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(shape, strides) if s > 0)
    return Operand(_span(x, low, high - low + 1), shape, tuple(strides), -low, dtype)


def _span(x, low: int, size: int):
    """A 1-d device array of ``size`` elements over ``x``'s memory from element offset ``low``."""
    item = x.dtype.itemsize
    if _SIMULATOR:  # the simulator's device memory is host memory
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        host = np.asarray(x)
        first = host[tuple(slice(n - 1, n) if s < 0 else slice(0, 1)
                           for n, s in zip(host.shape, host.strides))]
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(first, (size,), (item,)))
    desc = x.__cuda_array_interface__
    return cuda.from_cuda_array_interface(
        {"shape": (size,), "strides": None, "typestr": x.dtype.str,
         "data": (desc["data"][0] + low * item, False), "version": 3},
        owner=x, sync=False)


class Rows(NamedTuple):
    """Row ``(o, i)`` of an operand seen as rows x columns starts at ``outer[o] + i * row_stride``
    and steps by ``col_stride``; ``o`` runs over all row dims but the last, ``i`` over the last."""
    outer: np.ndarray  # int64
    inner: int
    row_stride: int
    col_stride: int


def _rows(op: Operand, target: tuple, axis: int = -1) -> Rows:
    """The row layout of ``op`` broadcast to ``target``, with ``axis`` as its columns."""
    nd = len(target)
    shape = (1,) * (nd - len(op.shape)) + op.shape
    strides = (0,) * (nd - len(op.strides)) + op.strides
    strides = [0 if n == 1 else s for n, s in zip(shape, strides)]  # broadcast: the same element
    axis %= nd
    order = [d for d in range(nd) if d != axis] + [axis]
    row_shape = [target[d] for d in order[:-1]]
    row_strides = [strides[d] for d in order[:-1]]
    col_stride = strides[axis]
    if not row_shape:
        return Rows(np.full(1, op.offset, np.int64), 1, 0, col_stride)
    outer = np.full(row_shape[:-1], op.offset, np.int64)
    for dim, (n, s) in enumerate(zip(row_shape[:-1], row_strides[:-1])):
        outer = outer + (np.arange(n, dtype=np.int64) * s).reshape(
            (n,) + (1,) * (len(row_shape) - dim - 2))
    return Rows(outer.reshape(-1), row_shape[-1], row_strides[-1], col_stride)


def _layout_args(op: Operand, rows: Rows, outer=None, bits=False):
    """(flat, outer, row stride, col stride); ``bits``: flat as uint16 (the 16-bit patterns)."""
    flat = op.flat.view(np.uint16) if bits else op.flat
    return (flat, cuda.to_device(rows.outer if outer is None else outer), rows.row_stride,
            rows.col_stride)


def _no_mask():
    return (cuda.to_device(np.zeros(1, np.float32)), cuda.to_device(np.zeros(1, np.int64)), 0, 0)


def _mask_args(mask, target: tuple, axis: int = -1):
    """(values, outer, row stride, col stride, kind: 0 none, 1 bool, 2 float) of a checked mask."""
    if mask is None:
        return (*_no_mask(), 0)
    op = _operand(mask)
    rows = _rows(op, target, axis)
    return (*_layout_args(op, rows), 1 if op.dtype == np.bool_ else 2)


def _result(x, on_device: bool):
    return x if on_device else x.copy_to_host()


def _empty(shape, dtype, on_device: bool):
    return cuda.device_array(shape, dtype) if on_device else np.empty(shape, dtype)


# --- the public functions -------------------------------------------------------------------------

def similarity(a, b, kind):
    on_device = _backends.is_device_array(a) or _backends.is_device_array(b)
    a, b, lead = _prepare.check_similarity(_as_device_array(a), _as_device_array(b), kind)
    La, Lb, E = a.shape[-2], b.shape[-2], a.shape[-1]
    in_dtype = np.dtype(a.dtype)
    dtype = _prepare.compute_dtype(in_dtype)
    out_shape = (*lead, La, Lb)
    N = int(np.prod(lead, dtype=np.int64))
    if N * La * Lb == 0:
        return _empty(out_shape, in_dtype, on_device)
    scale = 1.0 / math.sqrt(E) if kind == "scaled_dot" and E else 1.0
    opa, opb = _operand(a), _operand(b)
    tiles = _tiles(dtype, 0)
    out = cuda.device_array((N, La, Lb), in_dtype)
    kernel = kernels.attention_kernels(tiles, dtype).similarity
    grid = (N * -(-La // tiles.block_q), -(-Lb // tiles.block_k))
    kernel[grid, tiles.threads](
        *_layout_args(opa, _rows(opa, (*lead, La, E))),
        *_layout_args(opb, _rows(opb, (*lead, Lb, E))),
        N, La, Lb, E, dtype.type(scale), kind == "cosine", out)
    return _result(out.reshape(out_shape), on_device)


def softmax(x, axis, mask=None):
    on_device = _backends.is_device_array(x)
    x, mask = _as_device_array(x), _as_device_array(mask)
    if mask is not None:
        mask_dtype = mask.dtype if isinstance(mask, DeviceInput) else np.asarray(mask).dtype
        if mask_dtype != np.bool_:
            raise TypeError(f"mask must be a bool array (True = keep), got dtype {mask_dtype}")
    x, axis, mask = _prepare.check_softmax(x, axis, mask)
    in_dtype = np.dtype(x.dtype)
    dtype = _prepare.compute_dtype(in_dtype)
    shape = tuple(x.shape)
    out = cuda.device_array(shape, in_dtype)
    if x.size:
        opx = _operand(x)
        xr = _rows(opx, shape, axis)
        C = shape[axis]
        R = x.size // C
        contiguous = tuple(int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape)))
        o_rows = _rows(Operand(None, shape, contiguous, 0, in_dtype), shape, axis)
        m_values, m_outer, m_rs, m_cs, kind = _mask_args(mask, shape, axis)
        tiles = SOFTMAX_TILES
        kernel = kernels.softmax_kernel(tiles, dtype)
        kernel[-(-R // tiles.rows_per_block), tiles.threads](
            *_layout_args(opx, xr), m_values, m_outer, m_rs, m_cs, kind != 0, xr.inner, R, C,
            out.reshape(-1), cuda.to_device(o_rows.outer), o_rows.row_stride, o_rows.col_stride)
    return _result(out, on_device)


def _attention_operands(a: _prepare.AttentionArgs, bits=False):
    """Layout args of q, k (and v): per query head n, the offset of its (GQA-shared) key head.
    ``bits``: the operands as uint16 arrays of their 16-bit patterns."""
    opq = _operand(a.query)
    args = list(_layout_args(opq, _rows(opq, opq.shape), bits=bits))
    head_of = np.arange(a.N, dtype=np.int64) // a.group
    for x in (a.key, a.value) if a.value is not None else (a.key,):
        op = _operand(x)
        rows = _rows(op, op.shape)
        args += _layout_args(op, rows, rows.outer[head_of], bits=bits)
    return args


def _variant_args(a: _prepare.AttentionArgs):
    """(offset, left, right, softcap, alibi slopes, use_alibi) as the kernels take them. Window
    sides past any position (|p(i)| <= L + S) are clamped to L + S, so that p(i) - left and
    p(i) + right stay small integers."""
    v = a.variants
    far = a.L + a.S
    ct = a.dtype.type
    alibi = v.alibi if v.alibi is not None else np.zeros(1, a.dtype)
    return (v.offset, min(v.left, far), min(v.right, far), ct(v.softcap),
            cuda.to_device(np.ascontiguousarray(alibi, a.dtype)), v.alibi is not None)


def _check_offsets_fit(a: _prepare.AttentionArgs, tiles):
    """The fused kernel stages tiles with 32-bit offsets from a 64-bit tile base: a tile's span
    (rows x row stride + columns x column stride) must stay under 2**31 elements."""
    rows = max(tiles.block_q, tiles.block_k)
    cols = max(tiles.features, tiles.block_v)
    for name, x in (("query", a.query), ("key", a.key), ("value", a.value)):
        item = np.dtype(x.dtype).itemsize
        span = rows * abs(x.strides[-2] // item) + cols * abs(x.strides[-1] // item)
        if span >= 2 ** 31:
            raise ValueError(f"{name} of shape {tuple(x.shape)} has strides {tuple(x.strides)} "
                             f"too large for the cuda backend (a tile must span under 2**31 "
                             f"elements); make it contiguous")


def attention_weights(query, key, attn_mask, is_causal, scale, enable_gqa, *, similarity="dot",
                      **variants):
    on_device = any(_backends.is_device_array(x) for x in (query, key))
    a = _prepare.check_attention(_as_device_array(query), _as_device_array(key), None,
                                 _as_device_array(attn_mask), is_causal, scale, enable_gqa,
                                 similarity, need_value=False, **variants)
    out = cuda.device_array((a.N, a.L, a.S), a.in_dtype)
    if out.size:
        tiles = _tiles(a.dtype, 0)
        kernel = kernels.attention_kernels(tiles, a.dtype).attention_weights
        grid = a.N * -(-a.L // tiles.block_q)
        kernel[grid, tiles.threads](
            *_attention_operands(a), *_mask_args(a.mask, a.weights_shape), a.N, a.L, a.S, a.E,
            a.dtype.type(a.scale), *_variant_args(a), a.similarity == "cosine", out)
    return _result(out.reshape(a.weights_shape), on_device)


def scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, *,
                                 similarity="dot", return_lse=False, _bits_kind=None, **variants):
    """``_bits_kind="bfloat16"``: query, key and value are float16 arrays that hold bfloat16 bit
    patterns (NumPy has no bfloat16; e.g. a torch bfloat16 tensor viewed as float16), and so is
    the result (see ``bfloat16_attention``)."""
    on_device = any(_backends.is_device_array(x) for x in (query, key, value))
    a = _prepare.check_attention(_as_device_array(query), _as_device_array(key),
                                 _as_device_array(value), _as_device_array(attn_mask), is_causal,
                                 scale, enable_gqa, similarity, **variants)
    out = cuda.device_array((a.N, a.L, a.Ev), a.in_dtype)
    lse = cuda.device_array((a.N, a.L), a.dtype)
    mma = _mma_tiles(a) if a.N * a.L else None
    if _bits_kind is not None and mma is None:
        raise ValueError(f"{_bits_kind} attention runs on the tensor-core kernel only: dot "
                         f"similarity and at most {MMA_TILES[-1].features} features (got "
                         f"{a.similarity}, E = {a.E})")
    if mma is not None:  # 16-bit inputs on tensor cores
        kernel = kernels.mma_attention_kernel(mma, _bits_kind or MMA_KINDS[np.dtype(a.in_dtype)])
        grid = (a.N * -(-a.L // mma.block_q), max(1, -(-a.Ev // mma.block_v)))
        kernel[grid, mma.threads](
            *_attention_operands(a, bits=True), *_mask_args(a.mask, a.weights_shape), a.N, a.L,
            a.S, a.E, a.Ev, np.float32(a.scale), *_variant_args(a), False,
            out.view(np.uint16), lse)
    elif a.N * a.L:
        tiles = _fused_tiles(a.dtype, a.E, a.Ev)
        kernel = kernels.fused_attention_kernel(tiles, a.dtype)
        _check_offsets_fit(a, tiles)
        grid = (a.N * -(-a.L // tiles.block_q), max(1, -(-a.Ev // tiles.block_v)))
        kernel[grid, tiles.threads](
            *_attention_operands(a), *_mask_args(a.mask, a.weights_shape), a.N, a.L, a.S, a.E,
            a.Ev, a.dtype.type(a.scale), *_variant_args(a), a.similarity == "cosine", out, lse)
    out = _result(out.reshape((*a.lead, a.L, a.Ev)), on_device)
    if not return_lse:
        return out
    return out, _result(lse.reshape((*a.lead, a.L)), on_device)


def bfloat16_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                       enable_gqa=False, *, return_lse=False, **variants):
    """Attention of bfloat16 inputs given as float16 arrays of their bit patterns (NumPy has no
    bfloat16 dtype; a torch bfloat16 CUDA tensor ``t`` is ``t.view(torch.float16)``), on tensor
    cores; the result holds bfloat16 bit patterns the same way (lse is float32). A float mask
    must be float32."""
    if attn_mask is not None and np.dtype(attn_mask.dtype) == np.float16:
        raise TypeError("attn_mask of bfloat16 attention must be bool or float32, got float16 "
                        "(its bits would be read as float16)")
    return scaled_dot_product_attention(query, key, value, attn_mask, is_causal, scale,
                                        enable_gqa, return_lse=return_lse,
                                        _bits_kind="bfloat16", **variants)
