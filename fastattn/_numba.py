"""The ``numba`` backend: runs the CPU kernels on prepared problems (see ``_prepare``)."""
from __future__ import annotations

import functools
import sys
import threading

import numpy as np

from . import _blas
from ._prepare import AttentionProblem, Mask

# Rows of queries per work item, and keys per block, measured on a 2-core Zen 3 with D=64
# (paired A/B, the machine is noisy): a taller query block lets each key and value block, read
# from the L3 cache, serve more rows from the L2 (512 rows; 256 with causal attention, whose work
# items differ in cost, so smaller ones balance the threads better). 512 keys per block rather
# than 256 spread the online softmax's fixed cost per row and block over twice the keys: +3.6% to
# +5.3% at L = 1024 to 8192, causal and not (384 keys: -3 to -4%, 768 or 1024: level with 512).
# The key block must be a multiple of the register tile's columns (16 float32, 8 float64).
BLOCK_Q = 512
BLOCK_Q_CAUSAL = 256
BLOCK_K = 512
SOFTMAX_ROWS = 16

# One kernel call at a time: each already uses every core, and the BLAS thread count we set
# around it is process-wide state.
_lock = threading.Lock()


def _kernels():
    from .kernels import cpu  # compiled lazily on first use, loaded from Numba's cache after
    _announce_compiles()
    # Every kernel call comes through here: other libraries' spinning threads would take the
    # cores from its threads (see _blas, "the other thread pools").
    _blas.prepare_numba_pool()
    _blas.quiet_other_pools()
    return cpu


# What a user waits for when a kernel compiles (measured on a 2-core Zen 3; see the README's "JIT
# cost"), said once per kernel and dtype, and only when Numba's cache does not have it.
COMPILE_SECONDS = {"attention": 17, "attention_weights": 3, "softmax": 2, "similarity": 2,
                   "attention_backward": 20, "linear": 3, "attend_sdpa_rows": 15,
                   "attend_cache": 15, "attend_blocks": 15}
_announced = set()
# The integer views that 16-bit inputs reach the kernels as (``kernel_input``), by what they hold.
SIXTEEN_BIT_NAMES = {"int16": "float16", "uint16": "bfloat16"}


def _announce_compiles() -> None:
    if _announced:
        return
    _announced.add(None)
    from numba.core import event

    class CompileNotice(event.Listener):
        # Compiles nest (a kernel's compile compiles the functions it calls): only the
        # outermost is said, with the time of the whole.
        depth = 0

        def on_start(self, ev):
            self.depth += 1
            if self.depth > 1:
                return
            dispatcher = ev.data["dispatcher"]
            name = dispatcher.py_func.__name__
            module = getattr(dispatcher.py_func, "__module__", "") or ""
            if name not in COMPILE_SECONDS or not module.startswith(__package__ + ".kernels.cpu"):
                return
            dtype = next((str(t.dtype) for t in ev.data["args"] if hasattr(t, "dtype")), "")
            dtype = SIXTEEN_BIT_NAMES.get(dtype, dtype)
            if (name, dtype) in _announced:
                return
            _announced.add((name, dtype))
            print(f"fastattn: compiling the CPU kernel {name!r} for {dtype} once (about "
                  f"{COMPILE_SECONDS[name]} s); later runs load it from Numba's cache",
                  file=sys.stderr, flush=True)

        def on_end(self, ev):
            self.depth -= 1

    event.register("numba:compile", CompileNotice())


def _readonly(a: np.ndarray) -> np.ndarray:
    # Kernels see every input as read-only, whatever the caller's flags: one compiled
    # specialisation per dtype instead of one per combination of flags.
    view = a.view()
    view.flags.writeable = False
    return view


def kernel_input(a: np.ndarray) -> np.ndarray:
    """An input as the kernels read it, read-only and in place: a float16 or bfloat16 array as
    the integer view of its bits that says which it is (see ``kernels/cpu/widen.py``), which
    the kernels widen to float32 as they load it; other dtypes as they are."""
    view = _storage_view(a.dtype)
    return _readonly(a if view is None else a.view(view))


@functools.lru_cache(maxsize=None)
def _storage_view(dtype: np.dtype):
    # Cached: a dtype's name is slow to make, and this runs for every input of every call.
    from .kernels.cpu.widen import STORAGE_VIEWS
    return STORAGE_VIEWS.get(dtype.name)


_NO_ROWS = np.zeros(1, np.int64)
_NO_KEEP = np.zeros(1, np.uint8)


def _mask_args(mask: Mask | None, dtype):
    """The mask as the kernels read it (a ``MaskArgs``)."""
    MaskArgs = _kernels().MaskArgs
    no_add = _readonly(np.zeros(1, dtype))
    if mask is None:
        return MaskArgs(no_add, _readonly(_NO_KEEP), _readonly(_NO_ROWS), 0, 0)
    if mask.is_bool:
        return MaskArgs(no_add, _readonly(mask.values), _readonly(mask.row_offset),
                        mask.col_stride, 1)
    return MaskArgs(_readonly(mask.values), _readonly(_NO_KEEP), _readonly(mask.row_offset),
                    mask.col_stride, 2)


# Smaller query blocks for small problems, so there are work items for every thread. A constant,
# not the thread count: the blocks (and so the bits of the result) must not depend on threads.
MIN_WORK_ITEMS = 16


def query_block(N: int, L: int, causal: bool) -> int:
    """Rows per work item: the measured best, halved while there would be too few work items."""
    block = BLOCK_Q_CAUSAL if causal else BLOCK_Q
    while block > 32 and N * -(-L // block) < MIN_WORK_ITEMS:
        block //= 2
    return block


# Scratch kept between calls (which _lock serialises) for k and v laid out in tiles: a fresh
# buffer of a few MiB costs a page fault per 4 KiB on first touch, which in this project's VM came
# to about a tenth of a call at B=1, H=8, L=1024. Buffers up to KEEP_SCRATCH_BYTES are kept.
KEEP_SCRATCH_BYTES = 32 << 20
_scratch = np.empty(0, np.uint8)


# The tiles load 64 bytes (a cache line) per row: NumPy's buffers start 16 or 48 bytes into a
# line, so every such load would touch two lines.
ALIGN = 64


def _scratch_arrays(shapes: list, dtype) -> list:
    """Uninitialised arrays of these shapes, each starting on a cache line, in memory kept
    between calls."""
    global _scratch
    sizes = [-(-int(np.prod(shape)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
             for shape in shapes]
    nbytes = sum(sizes)
    if nbytes + ALIGN <= _scratch.nbytes:
        buffer = _scratch
    else:
        buffer = np.empty(nbytes + ALIGN, np.uint8)
        if nbytes <= KEEP_SCRATCH_BYTES:
            _scratch = buffer
    start = -buffer.ctypes.data % ALIGN
    arrays = []
    for shape, size in zip(shapes, sizes):
        count = int(np.prod(shape))
        arrays.append(buffer[start:start + size].view(dtype)[:count].reshape(shape))
        start += size
    return arrays


_NO_SLOPES = {}


def _pattern(p: AttentionProblem):
    """The variants (alignment, window with causal folded in, softcap, ALiBi) as the kernels
    read them (a ``Pattern``)."""
    v = p.variants
    if v.alibi is None:
        slopes = _NO_SLOPES.setdefault(p.dtype, _readonly(np.zeros(1, p.dtype)))
    else:
        slopes = _readonly(np.ascontiguousarray(v.alibi, p.dtype))
    return _kernels().Pattern(int(v.offset), int(v.left), int(v.right), p.dtype.type(v.softcap),
                              slopes, v.alibi is not None)


def _query_block(p: AttentionProblem) -> int:
    # A window (causal included) makes work items differ in cost: smaller ones balance better.
    N, L, _ = p.q.shape
    return query_block(N, L, p.causal or p.variants.windowed)


def attention(p: AttentionProblem, want_lse: bool):
    N, L, E = p.q.shape
    n_kv, S, Ev = p.v.shape
    from . import kvcache
    if N and kvcache.sdpa_on_row_kernel(p):
        out, lse = kvcache.sdpa_rows(p)
        return out, (lse if want_lse else None)
    out = np.empty((N, L, Ev), p.dtype)
    lse = np.empty((N, L), p.dtype)
    if N and L:
        cpu = _kernels()
        cols = cpu.tile_cols(p.dtype.itemsize)
        with _lock:  # no BLAS inside: the kernel has its own block products
            key_panels, value_panels = _scratch_arrays(
                [(n_kv, -(-S // cols), E * cols), (n_kv, -(-Ev // cols), S * cols)], p.dtype)
            cpu.attention(kernel_input(p.q), kernel_input(p.k), kernel_input(p.v), p.group,
                          p.dtype.type(p.scale), _pattern(p), _mask_args(p.mask, p.dtype),
                          _query_block(p), BLOCK_K, key_panels, value_panels, out, lse)
    return out, (lse if want_lse else None)


def attention_weights(p: AttentionProblem):
    N, L, _ = p.q.shape
    out = np.empty((N, L, p.k.shape[1]), p.dtype)
    if out.size:
        cpu = _kernels()
        with _lock, _blas.single_threaded_blas():
            cpu.attention_weights(_readonly(p.q), _readonly(p.k), p.group, p.dtype.type(p.scale),
                                  _pattern(p), _mask_args(p.mask, p.dtype), _query_block(p),
                                  out)
    return out


def softmax(rows: np.ndarray, mask: Mask | None):
    out = np.empty_like(rows)
    if out.size:
        cpu = _kernels()
        with _lock:
            cpu.softmax(_readonly(rows), _mask_args(mask, rows.dtype), SOFTMAX_ROWS, out)
    return out


def similarity(a: np.ndarray, b: np.ndarray, scale: float):
    out = np.empty((a.shape[0], a.shape[1], b.shape[1]), a.dtype)
    if out.size:
        cpu = _kernels()
        with _lock, _blas.single_threaded_blas():
            cpu.similarity(_readonly(a), _readonly(b), a.dtype.type(scale),
                           query_block(a.shape[0], a.shape[1], False), out)
    return out
