"""Attention over sequences sharded along their length, on Dask.

When one sequence's keys and values outgrow a machine (memory or cores), attention can be split
into (query chunk, key chunk) pairs: each pair is an ordinary fused-kernel call that returns
(out, lse) over its keys, and the partial results of one query chunk merge exactly by their
log-sum-exp (:func:`fastattn.merge_attention`). This module builds that as a Dask graph:

    pair (i, j)   fastattn's fused kernel on query chunk i and key/value chunk j (on a worker)
    merge         the pairs of query chunk i merged in a tree, at most MERGE_FAN_IN at a time
    result        a dask array chunked like the query along L (and lse if asked)

Pairs that causal attention or the window leave empty are never scheduled. Positions stay global:
query row i of the whole sequence sits at p(i) = i + offset (``alignment``), so a pair whose query
chunk starts at row q0 and key chunk at key s0 sees the pattern shifted by d = q0 + offset - s0.
Each pair is cut at the diagonal j = p(i) into rectangles the kernel takes as they are:

    - a square on the diagonal (local p(a) = a, "top_left"): causal, window and ALiBi apply with
      the same numbers, only the window's sides re-based;
    - rectangles wholly left (j <= p(i)) or right (j >= p(i)) of the diagonal: there the window
      is a (re-based) window, and ALiBi's -slope * |p(i) - j| is linear: a per-key bias
      (broadcast over the rows, a (..., 1, keys) float mask) plus a per-row constant that only
      shifts lse.

On dask.distributed the pair tasks are queued on the scheduler (marked as data producers), so a
worker fetches the chunks of the pairs it runs, not of every pair at once; with the
active-memory-manager policy :class:`DropSpareReplicas` configured, the copies it fetched are
dropped once unused there (at the manager's next pass), rather than kept while any later pair
anywhere still needs them.

Dask and distributed are optional (``pip install 'fastattn[dask]'``); ``import fastattn`` does not
import them.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import numpy as np

from . import _prepare
from ._prepare import NO_LIMIT

__all__ = ["scaled_dot_product_attention", "chunk_length"]

# Partial results merged per task (the merge holds these parts and two at a time their stack and
# weighted sum).
MERGE_FAN_IN = 4
BACKENDS = ("auto", "numba", "numpy")


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError("fastattn.distributed needs dask: pip install 'fastattn[dask]' "
                          "(dask[array] and distributed)") from None
    return dask, da


class _Plan(NamedTuple):
    """What every pair task of one call shares (small; travels inside the graph)."""
    left: int            # the window's sides as Variants has them (NO_LIMIT: unbounded)
    right: int
    scale: float
    enable_gqa: bool
    softcap: float | None
    alibi: np.ndarray | None  # slopes of shape lead (the query's leading dims), compute dtype
    backend: str
    dtype: np.dtype      # compute dtype


# --- geometry: where a pair's keys lie relative to its query rows -----------------------------
#
# In a pair (or a rectangle of it) with local rows a and local keys b, x = a + d - b is p(i) - j,
# the global distance; key b takes part in row a iff -right <= x <= left.


def _pair_is_empty(n: int, m: int, d: int, left: int, right: int) -> bool:
    """No row of n sees any of m keys: the distances d-(m-1) .. d+(n-1) miss [-right, left]."""
    return d + n - 1 < -right or d - (m - 1) > left


def _rectangles(n: int, m: int, d: int):
    """The n x m pair cut at its diagonal b = a + d: (row0, row1, key0, key1) with x >= 0 or
    x <= 0 throughout, or a square on the diagonal (x = 0 on it)."""
    r0 = min(max(0, -d), n)
    r1 = max(min(n, m - d), r0)  # rows r0..r1 have their diagonal key a + d inside [0, m)
    if r0 < r1:
        yield r0, r1, r0 + d, r1 + d
        if r0 + d > 0:
            yield r0, r1, 0, r0 + d
        if r1 + d < m:
            yield r0, r1, r1 + d, m
    if r0 > 0:
        yield 0, r0, 0, m   # a + d < 0: every key right of these rows
    if r1 < n:
        yield r1, n, 0, m   # a + d >= m: every key left of these rows


def _trim(r0, r1, c0, c1, d, left, right):
    """Rows of [r0, r1) that see a key of [c0, c1), and the keys some such row sees; None if
    nothing. Row a sees keys a + d - left .. a + d + right."""
    ra, rb = max(r0, c0 - d - right), min(r1, c1 - d + left)
    if ra >= rb:
        return None
    ca, cb = max(c0, ra + d - left), min(c1, rb + d + right)
    if ca >= cb:
        return None
    return ra, rb, ca, cb


def _local_window(n, m, d, left, right):
    """(is_causal, window) for a top-left aligned n x m rectangle at distance d."""
    # A side whose bound no (row, key) of the rectangle reaches is no bound at all.
    lw = None if n - 1 + d <= left else left - d
    rw = None if d - (m - 1) >= -right else right + d
    assert (lw is None or lw >= 0) and (rw is None or rw >= 0), (n, m, d, left, right)
    if lw is None and rw is None:
        return False, None
    if lw is None and rw == 0:
        return True, None
    return False, (lw, rw)


def _alibi_for(plan: _Plan, n, m, d):
    """(alibi_slopes, key bias mask or None, per-row lse shift or None) for a rectangle."""
    slopes = plan.alibi
    if slopes is None:
        return None, None, None
    lo, hi = d - (m - 1), d + n - 1
    if lo < 0 < hi:
        if d == 0:  # the diagonal square: local positions are global ones shifted alike
            return slopes, None, None
        # Not produced by _rectangles; kept exact all the same: the bias itself as a mask.
        x = np.abs(np.arange(n)[:, None] + d - np.arange(m)[None, :]).astype(plan.dtype)
        return None, -slopes[..., None, None] * x, None
    # One side of the diagonal: -slope * |a + d - b| = sign * slope * b - sign * slope * (a + d)
    # with sign = +1 left of it (x >= 0), -1 right of it.
    sign = 1.0 if lo >= 0 else -1.0
    s64 = slopes.astype(np.float64)[..., None]
    keys = (sign * s64 * np.arange(m))[..., None, :].astype(plan.dtype)
    shift = -sign * s64 * (np.arange(n) + d)
    return None, keys, shift


def _combine_masks(user, bias, dtype):
    if bias is None:
        return user
    if user is None:
        return bias
    if user.dtype == np.bool_:
        return np.where(user, bias, dtype.type(-np.inf))
    return user.astype(dtype, copy=False) + bias


def _slice_mask(mask, ra, rb, ca, cb):
    if mask is None:
        return None
    rows = slice(ra, rb) if mask.shape[-2] > 1 else slice(None)
    cols = slice(ca, cb) if mask.shape[-1] > 1 else slice(None)
    return mask[..., rows, cols]


# --- the tasks --------------------------------------------------------------------------------


def _worker_threads():
    """The thread count of the Dask worker running this task, or None outside one."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        pass
    else:
        state = getattr(worker, "state", None)
        return getattr(state, "nthreads", None) or getattr(worker, "nthreads", None)
    import multiprocessing
    if multiprocessing.parent_process() is not None and multiprocessing.current_process().name \
            .startswith(("SpawnProcess", "ForkProcess", "ForkServerProcess")):
        # dask's "processes" scheduler: a pool with one process per core, one task at a time.
        return 1
    return None


def _set_numba_threads():
    threads = _worker_threads()
    if threads:
        import numba
        # Thread-local in Numba: set in the thread that calls the kernel, every task.
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))


def _rectangle_attention(q, k, v, mask, plan: _Plan, ra, rb, ca, cb, d):
    from ._api import scaled_dot_product_attention as sdpa
    n, m = rb - ra, cb - ca
    is_causal, window = _local_window(n, m, d, plan.left, plan.right)
    slopes, bias, shift = _alibi_for(plan, n, m, d)
    local_mask = _combine_masks(_slice_mask(mask, ra, rb, ca, cb), bias, plan.dtype)
    out, lse = sdpa(q[..., ra:rb, :], k[..., ca:cb, :], v[..., ca:cb, :], local_mask,
                    is_causal=is_causal, scale=plan.scale, enable_gqa=plan.enable_gqa,
                    return_lse=True, window=window, softcap=plan.softcap, alibi_slopes=slopes,
                    backend=plan.backend)
    if shift is not None:
        lse = (lse + shift).astype(plan.dtype)  # -inf (no key) stays -inf
    return out, lse


def _empty_result(lead, n, ev, dtype):
    return np.zeros((*lead, n, ev), dtype), np.full((*lead, n), -np.inf, dtype)


def _pair_task(plan: _Plan, q, k, v, mask, d: int):
    """(out, lse) of one query chunk over one key chunk, the global positions shifted by d."""
    from .merge import merge_attention
    _set_numba_threads()
    q, k, v = (np.asarray(a).astype(plan.dtype, copy=False) for a in (q, k, v))
    n, m = q.shape[-2], k.shape[-2]
    split = plan.alibi is not None or plan.left < NO_LIMIT or plan.right < NO_LIMIT
    rects = list(_rectangles(n, m, d)) if split else [(0, n, 0, m)]
    parts = [t for t in (_trim(*r, d, plan.left, plan.right) for r in rects) if t is not None]
    if len(parts) == 1 and parts[0] == (0, n, 0, m):
        return _rectangle_attention(q, k, v, mask, plan, 0, n, 0, m, d)
    out, lse = _empty_result(q.shape[:-2], n, v.shape[-1], plan.dtype)
    for ra, rb, ca, cb in parts:
        part = _rectangle_attention(q, k, v, mask, plan, ra, rb, ca, cb, ra + d - ca)
        rows = slice(ra, rb)
        merged_out, merged_lse = merge_attention([out[..., rows, :], part[0]],
                                                 [lse[..., rows], part[1]])
        out[..., rows, :], lse[..., rows] = merged_out, merged_lse
    return out, lse


def _merge_task(parts):
    # Two at a time: the merge's temporaries stay a few chunks whatever the fan-in.
    from .merge import merge_attention
    out, lse = parts[0]
    for part_out, part_lse in parts[1:]:
        out, lse = merge_attention([out, part_out], [lse, part_lse])
    return out, lse


def _finish_task(part, in_dtype):
    out, lse = part
    return out.astype(in_dtype, copy=False), lse


def _no_keys_task(lead, n, ev, in_dtype, dtype):
    out, lse = _empty_result(lead, n, ev, dtype)
    return out.astype(in_dtype), lse


# --- the graph --------------------------------------------------------------------------------


def chunk_length(L: int, S: int, heads: int, kv_heads: int, E: int, Ev: int, itemsize: int,
                 budget: int) -> int:
    """Query and key positions per chunk so that one task stays within ``budget`` bytes.

    A pair task holds a query chunk and its output (heads * (E + Ev + 1) per row), a key and
    value chunk and the kernel's tiled copy of them (2 * kv_heads * (E + Ev) per key); a merge
    holds MERGE_FAN_IN outputs and, merging two at a time, their stack, weighted sum and result
    ((MERGE_FAN_IN + 5) * heads * (Ev + 1) per row). A multiple of 512 (the kernel's key block)
    when that large.
    """
    per_position = itemsize * max(heads * (E + Ev + 1) + 2 * kv_heads * (E + Ev),
                                  (MERGE_FAN_IN + 5) * heads * (Ev + 1))
    length = max(1, budget // per_position)
    if length >= 1024:
        length -= length % 512
    return int(min(length, max(L, S, 1)))


def _queued_task(key, func, *args):
    """A pair task, marked (where this Dask can) as one of a large group of data producers:
    dask.distributed then hands such tasks to a worker only as it has a thread free (its
    scheduler-side queuing) instead of all at once. A worker given every ready pair up front
    would fetch the key and value chunks of all of them and hold copies of most of the sequence.
    """
    try:
        from dask._task_spec import Task, TaskRef
    except ImportError:
        return (func, *args)
    refs = [TaskRef(a) if isinstance(a, tuple) else a for a in args]
    try:
        return Task(key, func, *refs, _data_producer=True)
    except TypeError:  # a Dask without the flag
        return Task(key, func, *refs)


def _stand_in(x, name):
    """An array of ``x``'s shape and dtype that costs no memory, for the shared checks."""
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        x = np.asarray(x)
        shape, dtype = x.shape, x.dtype
    if any(isinstance(s, float) and math.isnan(s) for s in shape):
        raise ValueError(f"{name} has unknown chunk sizes {shape}; call {name}.compute_chunk_sizes() "
                         f"first")
    return np.broadcast_to(np.zeros((), np.dtype(dtype)), tuple(int(s) for s in shape))


def _is_dask(x) -> bool:
    return hasattr(x, "__dask_graph__") and hasattr(x, "chunks")


def _as_dask(da, x, chunks):
    """``x`` as a dask array with these chunks (a NumPy array is wrapped, never copied here)."""
    if _is_dask(x):
        return x.rechunk(chunks)
    return da.from_array(np.asarray(x), chunks=chunks)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                                 enable_gqa=False, *, alignment="top_left", window=None,
                                 softcap=None, alibi_slopes=None, return_lse=False,
                                 backend="auto"):
    """:func:`fastattn.scaled_dot_product_attention` on Dask, sharded along the sequence.

    Args:
        query, key, value: dask arrays (or NumPy arrays, wrapped with chunks sized from Dask's
            ``array.chunk-size`` setting, the memory one task may use), shapes (..., L, E),
            (..., S, E), (..., S, Ev), chunked along L and S; the leading and feature dims are
            brought to one chunk, and value takes key's chunks along S.
        attn_mask, is_causal, scale, enable_gqa, alignment, window, softcap, alibi_slopes,
            return_lse: as in :func:`fastattn.scaled_dot_product_attention`, with global
            positions (query row i at p(i) = i or i + S - L over the whole sequences).
            ``attn_mask`` (NumPy or dask) is cut into the same pairs of chunks.
        backend: the per-chunk backend on the workers: ``"auto"``, ``"numba"`` or ``"numpy"``.

    Returns:
        A lazy dask array (..., L, Ev) in the query's dtype, chunked like the query along L (one
        chunk along the other dims), or ``(out, lse)`` with ``return_lse`` (lse (..., L)). Each
        (query chunk, key chunk) pair that the causal mask or the window leaves wholly empty is
        never scheduled; the others run fastattn's fused kernel on a worker (the worker's Numba
        threads set from its thread count) and merge exactly in a tree.

    Example:
        >>> import numpy as np, dask.array as da, fastattn.distributed
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (da.from_array(rng.standard_normal((2, 1000, 16)), chunks=(2, 250, 16))
        ...            for _ in range(3))
        >>> out = fastattn.distributed.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> out.chunks[1]
        (250, 250, 250, 250)
        >>> out.compute().shape   # any scheduler, or a dask.distributed Client
        (2, 1000, 16)
    """
    dask, da = _import_dask()
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph
    from dask.utils import parse_bytes

    _prepare.check_choice(backend, "backend", BACKENDS)
    stand_ins = [_stand_in(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value"))]
    mask_stand_in = None if attn_mask is None else _stand_in(attn_mask, "attn_mask")
    if _is_dask(alibi_slopes):
        alibi_slopes = np.asarray(alibi_slopes.compute())
    a = _prepare.check_attention(*stand_ins, mask_stand_in, is_causal, scale, enable_gqa, "dot",
                                 alignment=alignment, window=window, softcap=softcap,
                                 alibi_slopes=alibi_slopes)
    var = a.variants
    lead, L, S, Ev, nd = a.lead, a.L, a.S, a.Ev, len(a.lead) + 2
    alibi = None if var.alibi is None else var.alibi.reshape(lead)
    plan = _Plan(var.left, var.right, a.scale, bool(enable_gqa and len(lead) > 0),
                 var.softcap or None, alibi, backend, a.dtype)

    # Chunks: dask inputs keep theirs along L and S; NumPy ones get the budget's.
    budget = parse_bytes(dask.config.get("array.chunk-size", "128MiB"))
    kv_heads = a.N // a.group
    length = chunk_length(L, S, a.N, kv_heads, a.E, Ev, a.dtype.itemsize, budget)
    whole = {i: -1 for i in range(nd - 2)}
    q_chunks = {**whole, nd - 2: query.chunks[-2] if _is_dask(query) else length, nd - 1: -1}
    k_chunks = {**whole, nd - 2: key.chunks[-2] if _is_dask(key) else length, nd - 1: -1}
    q = _as_dask(da, query, q_chunks)
    k = _as_dask(da, key, k_chunks)
    v = _as_dask(da, value, {**k_chunks, nd - 2: k.chunks[-2]})
    q_sizes, k_sizes = q.chunks[-2], k.chunks[-2]
    q_starts, k_starts = np.cumsum((0,) + q_sizes[:-1]), np.cumsum((0,) + k_sizes[:-1])

    mask = None
    if attn_mask is not None:
        mshape = (1,) * (nd - mask_stand_in.ndim) + mask_stand_in.shape
        m_in = attn_mask.reshape(mshape) if _is_dask(attn_mask) else \
            np.asarray(attn_mask).reshape(mshape)
        m_chunks = {**{i: -1 for i in range(nd - 2)},
                    nd - 2: q_sizes if mshape[-2] > 1 else -1,
                    nd - 1: k_sizes if mshape[-1] > 1 else -1}
        mask = _as_dask(da, m_in, m_chunks)

    token = tokenize(q.name, k.name, v.name, None if mask is None else mask.name, plan.left,
                     plan.right, plan.scale, plan.enable_gqa, plan.softcap,
                     None if alibi is None else alibi.tobytes(), backend, var.offset)
    name, lse_name = f"fastattn-sdpa-{token}", f"fastattn-sdpa-lse-{token}"
    pair_name, merge_name, chunk_name = (f"fastattn-{w}-{token}" for w in ("pair", "merge", "chunk"))
    zeros = (0,) * (nd - 2)
    pair = functools.partial(_pair_task, plan)
    dsk = {}
    for i, (q0, n) in enumerate(zip(q_starts, q_sizes)):
        parts = []
        for j, (s0, m) in enumerate(zip(k_starts, k_sizes)):
            d = int(q0) + var.offset - int(s0)
            if n == 0 or m == 0 or _pair_is_empty(n, m, d, var.left, var.right):
                continue
            mask_block = None if mask is None else \
                (mask.name, *zeros, i if mask.shape[-2] > 1 else 0, j if mask.shape[-1] > 1 else 0)
            dsk[(pair_name, i, j)] = _queued_task((pair_name, i, j), pair, (q.name, *zeros, i, 0),
                                                  (k.name, *zeros, j, 0), (v.name, *zeros, j, 0),
                                                  mask_block, d)
            parts.append((pair_name, i, j))
        level = 0
        while len(parts) > 1:
            merged = []
            for g in range(0, len(parts), MERGE_FAN_IN):
                group = parts[g:g + MERGE_FAN_IN]
                if len(group) == 1:
                    merged.append(group[0])
                    continue
                dsk[(merge_name, i, level, g)] = (_merge_task, group)
                merged.append((merge_name, i, level, g))
            parts, level = merged, level + 1
        if parts:
            dsk[(chunk_name, i)] = (_finish_task, parts[0], a.in_dtype)
        else:  # no key takes part in any row of this chunk
            dsk[(chunk_name, i)] = (_no_keys_task, lead, n, Ev, a.in_dtype, a.dtype)
        dsk[(name, *zeros, i, 0)] = (operator.getitem, (chunk_name, i), 0)

    deps = [q, k, v] + ([] if mask is None else [mask])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    lead_chunks = tuple((s,) for s in lead)
    out = da.Array(graph, name, (*lead_chunks, q_sizes, (Ev,)),
                   meta=np.empty((0,) * nd, a.in_dtype))
    if not return_lse:
        return out
    lse_dsk = {(lse_name, *zeros, i): (operator.getitem, (chunk_name, i), 1)
               for i in range(len(q_sizes))}
    lse_graph = HighLevelGraph.from_collections(lse_name, lse_dsk, dependencies=[out])
    lse = da.Array(lse_graph, lse_name, (*lead_chunks, q_sizes),
                   meta=np.empty((0,) * (nd - 1), a.dtype))
    return out, lse


# --- replicas -----------------------------------------------------------------------------------


def _drop_spare_replicas_policy():
    from distributed.active_memory_manager import ActiveMemoryManagerPolicy, Suggestion

    class DropSpareReplicas(ActiveMemoryManagerPolicy):
        """An active-memory-manager policy: keep one copy of each chunk, dropping the others
        from workers where no task that needs it is running.

        A worker that ran pair (i, j) keeps its copy of key and value chunk j while any pair of
        a later query chunk still needs it, somewhere: over a causal sequence that is most of
        the other workers' share. Dropping those copies as soon as they are unused here bounds
        each worker's memory by the chunks of its running tasks, at the price of fetching a
        chunk again when a later pair needs it on the same worker (as ring attention passes
        each chunk on). Dask's own ReduceReplicas keeps a copy for each waiting task.
        """

        def run(self):
            for ts in self.manager.scheduler.replicated_tasks:
                # The manager never drops the last copy, nor one a running task there needs.
                for _ in range(len(ts.who_has) - 1):
                    yield Suggestion("drop", ts)

    DropSpareReplicas.__module__ = __name__
    return DropSpareReplicas


def __getattr__(name):
    # distributed is imported only when the policy is asked for (dask's config names it as
    # "fastattn.distributed.DropSpareReplicas").
    if name == "DropSpareReplicas":
        cls = _drop_spare_replicas_policy()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
