"""Row-wise attention read in place: decoding from a KV cache (contiguous or paged) and packed
variable-length batches.

Decoding is bound by memory bandwidth: each key and value row is read once per work item and
used for all the query rows of its group (the group's query heads times its query positions),
straight from the cache (no copy, no re-layout). A work item is (sequence, key/value head, a
block of query positions, a range of keys); the host (``fastattn.kvcache``, ``fastattn.varlen``)
lists them, splits long key ranges across threads (flash-decoding) and deals the items to the
threads by cost. A split writes its normalised (out, lse) to scratch, merged exactly afterwards
(out = sum_i out_i exp(lse_i - lse), as ``merge_attention``). Which thread runs an item never
changes its result, so results do not depend on the thread count.

16-bit inputs (integer views of their bits, see ``widen``) are read in place too and widened to
float32 as each element is loaded: no float32 copy of a cache is ever made.
"""
import math

import numpy as np
from numba import prange
from numba.extending import overload

from ._jit import FASTMATH, exp_nonpositive, jit, maxnum, parallel_jit
from .options import RowsLayout, RowVariants
from .tile import ROWS, tile_product_add, tile_width
from .widen import widen

# Keys per chunk of the online softmax: the chunk's scores stay in the L1 cache.
CHUNK = 64


@jit
def _scores(qs, R, kbuf, kb, k_pos, n, E, scale, scores):
    """scores[r, c] = (qs[r] . key c) * scale for the n keys from element kb on, key rows
    k_pos apart: each key row is loaded once for four query rows at a time. (Rows indexed as
    qs[r, e], not sliced: a slice per row and key costs a reference count update.)"""
    for c in range(n):
        start = kb + c * k_pos
        key = kbuf[start:start + E]
        r = 0
        while r + 4 <= R:
            s0 = s1 = s2 = s3 = qs.dtype.type(0)
            for e in range(E):
                x = widen(key[e])
                s0 += qs[r, e] * x
                s1 += qs[r + 1, e] * x
                s2 += qs[r + 2, e] * x
                s3 += qs[r + 3, e] * x
            scores[r, c] = s0 * scale
            scores[r + 1, c] = s1 * scale
            scores[r + 2, c] = s2 * scale
            scores[r + 3, c] = s3 * scale
            r += 4
        while r < R:
            s0 = qs.dtype.type(0)
            for e in range(E):
                s0 += qs[r, e] * widen(key[e])
            scores[r, c] = s0 * scale
            r += 1


@jit
def _accumulate_rows(scores, R, vbuf, vb, v_pos, n, Ev, acc):
    """acc[r] += sum_c scores[r, c] * value c: each value row loaded once for all the rows."""
    for c in range(n):
        start = vb + c * v_pos
        value = vbuf[start:start + Ev]
        for r in range(R):
            p = scores[r, c]
            if p != 0:
                for e in range(Ev):
                    acc[r, e] += p * widen(value[e])


def _accumulate(scores, R, vbuf, vb, v_pos, n, Ev, acc):
    """``_accumulate_rows``, on register tiles where the values are in the compute dtype."""


@overload(_accumulate, jit_options={"fastmath": FASTMATH})
def _accumulate_impl(scores, R, vbuf, vb, v_pos, n, Ev, acc):
    if vbuf.dtype != acc.dtype:  # 16-bit values, widened as they load: the plain loop
        def rows(scores, R, vbuf, vb, v_pos, n, Ev, acc):
            _accumulate_rows(scores, R, vbuf, vb, v_pos, n, Ev, acc)
        return rows

    def tiles(scores, R, vbuf, vb, v_pos, n, Ev, acc):
        # The weights times a tile of value columns read in place (row stride v_pos), ROWS rows
        # at a time, the partial sums in registers for the whole chunk: the plain loop loaded and
        # stored each accumulator row for every key (measured: about half the decode kernel's
        # time with 4 query rows a key/value head; interleaved A/B, 4 key/value heads of 4096
        # keys: 0.85x the time with 2 rows, 0.78x with 4, 0.76x with 8, but 1.06x with 1 row,
        # which fills one row of a tile's six). Rows past R are scratch (see attend_rows).
        cols = tile_width(acc)
        if Ev % cols or R < 2:
            _accumulate_rows(scores, R, vbuf, vb, v_pos, n, Ev, acc)
            return
        weights = scores.reshape(-1)
        acc_flat = acc.reshape(-1)
        chunk = scores.shape[1]
        for c0 in range(0, Ev, cols):
            for r0 in range(0, R, ROWS):
                tile_product_add(weights, r0 * chunk, chunk, vbuf, vb + c0, v_pos, acc_flat,
                                 r0 * Ev + c0, Ev, n)
    return tiles


@jit
def _attend_item(item, qbuf, kbuf, vbuf, out, lse, part_out, part_lse, rows, variants,
                 qs, scores, acc, row_max, row_sum):
    b, g, t0, t1, lo, hi, part = item[0], item[1], item[2], item[3], item[4], item[5], item[6]
    group, E, Ev = rows.group, rows.E, rows.Ev
    R = (t1 - t0) * group
    dtype = qs.dtype.type
    # The query rows, row r = (position t0 + r // group, head g * group + r % group), copied
    # together (R * E elements: nothing beside the R * keys * E reads of the cache).
    for r in range(R):
        t = t0 + r // group
        h = g * group + r % group
        base = rows.q_first[b] + t * rows.q_pos + h * rows.q_head
        for e in range(E):
            qs[r, e] = widen(qbuf[base + e])
        row_max[r] = -np.inf
        row_sum[r] = 0
        for e in range(Ev):
            acc[r, e] = 0
    scale = dtype(variants.scale)
    cap = dtype(variants.softcap)
    neg_inf = dtype(-np.inf)
    bs = rows.block_size
    j0 = lo
    while j0 < hi:
        block = j0 // bs
        stop = min(hi, j0 + CHUNK, (block + 1) * bs)
        n = stop - j0
        offset = j0 - block * bs
        physical = rows.table[b, block]
        kb = physical * rows.k_block + g * rows.k_head + offset * rows.k_pos + rows.k_first[b]
        vb = physical * rows.v_block + g * rows.v_head + offset * rows.v_pos + rows.v_first[b]
        _scores(qs, R, kbuf, kb, rows.k_pos, n, E, scale, scores)
        for r in range(R):
            t = t0 + r // group
            h = g * group + r % group
            p = rows.pos_offset[b] + t
            first = p - variants.left   # the keys this row may see: first <= j <= last
            last = p + variants.right
            chunk_max = neg_inf
            if cap == 0 and not variants.has_alibi and first <= j0 and stop - 1 <= last:
                # The common case, every key of the chunk seen and no score changed: only the
                # maximum (a loop LLVM vectorises).
                for c in range(n):
                    chunk_max = maxnum(chunk_max, scores[r, c])
            else:
                for c in range(n):
                    s = scores[r, c]
                    if cap > 0:
                        s = cap * math.tanh(s / cap)
                    j = j0 + c
                    if j < first or j > last:
                        s = neg_inf
                    elif variants.has_alibi:
                        s -= variants.alibi[b * variants.heads + h] * dtype(abs(p - j))
                    scores[r, c] = s
                    chunk_max = maxnum(chunk_max, s)
            new_max = maxnum(row_max[r], chunk_max)
            if new_max == -np.inf:
                for c in range(n):
                    scores[r, c] = 0
                continue
            if new_max != row_max[r]:
                alpha = exp_nonpositive(row_max[r] - new_max)
                row_sum[r] *= alpha
                for e in range(Ev):
                    acc[r, e] *= alpha
                row_max[r] = new_max
            total = dtype(0)
            for c in range(n):
                w = exp_nonpositive(scores[r, c] - new_max)
                scores[r, c] = w
                total += w
            row_sum[r] += total
        _accumulate(scores, R, vbuf, vb, rows.v_pos, n, Ev, acc)
        j0 = stop
    for r in range(R):
        t = t0 + r // group
        h = g * group + r % group
        if row_sum[r] > 0 or row_sum[r] != row_sum[r]:
            inv = dtype(1) / row_sum[r]
            row_lse = row_max[r] + math.log(row_sum[r])
        else:  # no key taken part: zeros and -inf
            inv = dtype(0)
            row_lse = neg_inf
        if part >= 0:
            for e in range(Ev):
                part_out[part + r, e] = acc[r, e] * inv
            part_lse[part + r] = row_lse
        else:
            base = rows.out_first[b] + t * rows.out_pos + h * rows.out_head
            for e in range(Ev):
                out[base + e] = acc[r, e] * inv
            lse[rows.lse_first[b] + t * rows.lse_pos + h * rows.lse_head] = row_lse


@jit
def _merge_item(m, out, lse, part_out, part_lse, rows):
    """The exact merge of an item's splits: lse = log sum exp(lse_i), out = sum out_i
    exp(lse_i - lse); a split that saw no key (lse -inf) counts for nothing."""
    b, g, t0, t1, part, nsplit = m[0], m[1], m[2], m[3], m[4], m[5]
    group, Ev = rows.group, rows.Ev
    R = (t1 - t0) * group
    for r in range(R):
        t = t0 + r // group
        h = g * group + r % group
        top = part_lse[part + r]
        for s in range(1, nsplit):
            top = max(top, part_lse[part + s * R + r])
        base = rows.out_first[b] + t * rows.out_pos + h * rows.out_head
        lse_at = rows.lse_first[b] + t * rows.lse_pos + h * rows.lse_head
        for e in range(Ev):
            out[base + e] = 0
        if top == -np.inf:
            lse[lse_at] = -np.inf
            continue
        total = part_lse.dtype.type(0)
        for s in range(nsplit):
            total += math.exp(part_lse[part + s * R + r] - top)
        merged = top + math.log(total)
        for s in range(nsplit):
            x = part_lse[part + s * R + r]
            if x == -np.inf:
                continue
            w = math.exp(x - merged)
            src = part + s * R + r
            for e in range(Ev):
                out[base + e] += part_out[src, e] * w
        lse[lse_at] = merged


@parallel_jit
def attend_rows(qbuf, kbuf, vbuf, out, lse, rows, variants, items, slot_start, max_rows,
                part_out, part_lse):
    """Run the work items ``items`` (n, 7: sequence, key/value head, first and end query
    position, first and end key, partial-row base or -1), thread slot s taking items
    slot_start[s]:slot_start[s + 1]. ``out`` and ``lse`` are flat views of the outputs,
    ``qbuf``, ``kbuf``, ``vbuf`` flat views of the inputs (see ``RowsLayout``); an item with a
    partial-row base writes its rows there instead, for ``merge_rows``. The compute dtype is
    ``out``'s (the inputs may be 16-bit, widened as they are loaded)."""
    dtype = out.dtype
    for slot in prange(slot_start.shape[0] - 1):
        qs = np.empty((max_rows, rows.E), dtype)
        # Whole register tiles of rows for ``_accumulate``: rows past an item's own are scratch
        # the tiles compute and nobody reads (zeros at first, then earlier items' weights).
        padded = -(-max_rows // ROWS) * ROWS
        scores = np.zeros((padded, CHUNK), dtype)
        acc = np.zeros((padded, rows.Ev), dtype)
        row_max = np.empty(max_rows, dtype)
        row_sum = np.empty(max_rows, dtype)
        for i in range(slot_start[slot], slot_start[slot + 1]):
            _attend_item(items[i], qbuf, kbuf, vbuf, out, lse, part_out, part_lse, rows,
                         variants, qs, scores, acc, row_max, row_sum)


@jit
def merge_rows(out, lse, part_out, part_lse, rows, merges):
    """Merge the splits of each of ``merges`` (m, 6: sequence, key/value head, first and end
    query position, partial-row base, number of splits) into ``out`` and ``lse``. On the
    calling thread: keys are split only when there are few (sequence, head) items, so there are
    few rows to merge, and waking the pool for a second parallel region cost more than the merge
    (measured in a transformers decode step: 25-35 us a call against a few us)."""
    for i in range(merges.shape[0]):
        _merge_item(merges[i], out, lse, part_out, part_lse, rows)


@jit
def attend_blocks(qbuf, kbuf, vbuf, out, lse, rows, variants, blocks, splits, threads):
    """Everything a call does after the host has listed its ``blocks`` (n, 6: sequence,
    key/value head, first and end query position, first and end key): the ``schedule``,
    ``attend_rows``, and ``merge_rows`` of the splits. ``splits``: (key splits per block, or 0
    for ``default_splits`` with the two limits that follow).

    One compiled call rather than three from Python: on a decode step inside a model the host's
    work is a large share of the call, and each entry from Python costs tens of microseconds
    there (its arguments typed anew, the interpreter's own data out of the caches)."""
    nsplit = splits[0]
    if nsplit == 0:
        nsplit = default_splits(blocks, splits[1], splits[2])
    items, slot_start, merges, parts = schedule(blocks, rows.group, nsplit, threads)
    max_rows = 1
    for i in range(blocks.shape[0]):
        max_rows = max(max_rows, (blocks[i, 3] - blocks[i, 2]) * rows.group)
    part_out = np.empty((max(parts, 1), rows.Ev), out.dtype)
    part_lse = np.empty(max(parts, 1), out.dtype)
    attend_rows(qbuf, kbuf, vbuf, out, lse, rows, variants, items, slot_start, max_rows,
                part_out, part_lse)
    if merges.shape[0]:
        merge_rows(out, lse, part_out, part_lse, rows, merges)


@jit
def attend_cache(qbuf, kbuf, vbuf, out, lse, rows, variants, lengths, Lq, Hkv, per_item,
                 left, right, splits, threads):
    """``attend_blocks`` on the blocks of a KV-cache problem (``cache_blocks``)."""
    attend_blocks(qbuf, kbuf, vbuf, out, lse, rows, variants,
                  cache_blocks(lengths, Lq, Hkv, per_item, left, right), splits, threads)


@jit
def attend_sdpa_rows(q, k, v, out, lse, scale, group, left, right, softcap, alibi, has_alibi,
                     per_item, splits, threads):
    """Scaled dot-product attention of a few query rows per key/value head on the row kernel
    (``attend_blocks``), every array C-contiguous: q (N, L, E) with N = n_kv * group,
    k (n_kv, S, E), v (n_kv, S, Ev), out (N, L, Ev), lse (N, L). Key/value head g is a "sequence" of S keys
    whose query heads are query heads g * group ...; its queries sit bottom-right on the keys
    (the row kernel's alignment). The layout is built here, not by the host: on a decode step
    inside a model, typing two named tuples of two dozen fields at the call, and building
    them in Python, cost more than the kernel's own time on a short cache."""
    N, L, E = q.shape
    n_kv, S, Ev = v.shape
    first = np.arange(n_kv) * (group * L * E)
    zeros = np.zeros(n_kv, np.int64)
    rows = RowsLayout(first, E, L * E, np.arange(n_kv).reshape(n_kv, 1), max(S, 1), zeros,
                      S * E, 0, E, zeros, S * Ev, 0, Ev, np.arange(n_kv) * (group * L * Ev), Ev,
                      L * Ev, np.arange(n_kv) * (group * L), 1, L,
                      np.full(n_kv, S - L, np.int64), group, E, Ev)
    variants = RowVariants(scale, left, right, softcap, alibi, has_alibi, group)
    lengths = np.full(n_kv, S, np.int64)
    attend_blocks(q.reshape(-1), k.reshape(-1), v.reshape(-1), out.reshape(-1), lse.reshape(-1),
                  rows, variants, cache_blocks(lengths, L, 1, per_item, left, right), splits,
                  threads)


@jit
def cache_blocks(lengths, Lq, Hkv, per_item, left, right):
    """The blocks (n, 6) of a KV-cache problem: for each sequence b (``lengths[b]`` keys, its Lq
    queries on the last ones), key/value head and ``per_item`` query positions, the keys
    [lo, hi) that the window (p - left <= j <= p + right) lets those positions see."""
    B = lengths.shape[0]
    per_head = -(-Lq // per_item)
    blocks = np.empty((B * Hkv * per_head, 6), np.int64)
    i = 0
    for b in range(B):
        n = lengths[b]
        offset = n - Lq
        for g in range(Hkv):
            for t0 in range(0, Lq, per_item):
                t1 = min(Lq, t0 + per_item)
                lo = max(0, offset + t0 - left)
                hi = max(lo, min(n, offset + t1 - 1 + right + 1))
                blocks[i, 0], blocks[i, 1], blocks[i, 2], blocks[i, 3] = b, g, t0, t1
                blocks[i, 4], blocks[i, 5] = lo, hi
                i += 1
    return blocks


@jit
def default_splits(blocks, min_items, min_split_keys):
    """Key splits per block (n, 6; its last two columns a key range) when the caller gave
    none: enough work items for ``min_items``, each split at least ``min_split_keys`` long."""
    n = blocks.shape[0]
    if n >= min_items:
        return 1
    longest = 0
    for i in range(n):
        longest = max(longest, blocks[i, 5] - blocks[i, 4])
    return max(1, min(-(-min_items // max(n, 1)), longest // min_split_keys))


@jit
def schedule(blocks, group, nsplit, threads):
    """Work items from ``blocks`` (n, 6: sequence, key/value head, first and end query position,
    first and end key), each split into ``nsplit`` key ranges when ``nsplit`` > 1 (written to
    partial rows, then merged), dealt to ``threads`` slots by cost, longest first to the least
    loaded slot (the first on a tie). Returns (items (n * nsplit, 7) slot by slot, slot_start
    (threads + 1,), merges (m, 6), partial rows). Compiled, not Python: it runs on every decode
    step, where the host's work is a large share of a call."""
    n = blocks.shape[0]
    count = n * nsplit
    split = np.empty((count, 7), np.int64)
    merges = np.empty((n if nsplit > 1 else 0, 6), np.int64)
    part = 0
    for i in range(n):
        b, g, t0, t1, lo, hi = (blocks[i, 0], blocks[i, 1], blocks[i, 2], blocks[i, 3],
                                blocks[i, 4], blocks[i, 5])
        R = (t1 - t0) * group
        for s in range(nsplit):
            it = split[i * nsplit + s]
            it[0], it[1], it[2], it[3] = b, g, t0, t1
            if nsplit == 1:
                it[4], it[5], it[6] = lo, hi, -1
            else:
                it[4] = lo + (hi - lo) * s // nsplit
                it[5] = lo + (hi - lo) * (s + 1) // nsplit
                it[6] = part + s * R
        if nsplit > 1:
            m = merges[i]
            m[0], m[1], m[2], m[3], m[4], m[5] = b, g, t0, t1, part, nsplit
            part += nsplit * R
    cost = np.empty(count, np.int64)
    for i in range(count):
        cost[i] = (split[i, 3] - split[i, 2]) * (split[i, 5] - split[i, 4] + 16)
    order = np.argsort(-cost, kind="mergesort")  # stable: equal costs keep their order
    load = np.zeros(threads, np.int64)
    slot_of = np.empty(count, np.int64)
    per_slot = np.zeros(threads, np.int64)
    for i in order:
        s = 0
        for t in range(1, threads):
            if load[t] < load[s]:
                s = t
        slot_of[i] = s
        load[s] += cost[i]
        per_slot[s] += 1
    slot_start = np.zeros(threads + 1, np.int64)
    for t in range(threads):
        slot_start[t + 1] = slot_start[t] + per_slot[t]
    items = np.empty((count, 7), np.int64)
    filled = slot_start[:threads].copy()
    for i in order:
        s = slot_of[i]
        items[filled[s]] = split[i]
        filled[s] += 1
    return items, slot_start, merges, part
