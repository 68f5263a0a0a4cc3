"""Flex attention on the CPU: the fused kernel of ``attention`` with the user's ``score_mod`` and
``mask_mod`` compiled into it, and the kernel that builds block masks.

The kernels are built by factories, one per pair of user functions (already wrapped by
``numba.njit``), so that Numba inlines the functions into the loops over scores. Their work items
are independent (one query block of one head each) and the kernels are plain ``njit(nogil=True)``
functions over a range of work items: the host runs them on a few Python threads
(``fastattn.flex``), which keeps them out of Numba's parfor pass, most of a parallel kernel's
compile time. The results do not depend on the thread count.

Caching: Numba cannot cache a function that calls a function passed to it, whether as a closure
variable or as an argument: its cache key then holds the callee's pickle, which carries a
per-process id, so every process misses and adds one more entry. The factories give the kernels
a cache whose key is a fingerprint of the user functions' code instead (``ModCache``).

Block kinds, per (batch, head, query block, key block): ``EMPTY`` (skipped), ``PARTIAL``
(``mask_mod`` decides per score) and ``FULL`` (every key takes part).
"""
import functools
import math

import numba
import numpy as np
from numba import types
from numba.core.caching import FunctionCache
from numba.extending import overload

from ._jit import FASTMATH
from .attention import GROUP, finish_rows, online_softmax_rows
from .tile import ROWS, tile_product, tile_product_add, tile_width

EMPTY, PARTIAL, FULL = 0, 1, 2

# Keys per step of a query block's walk: consecutive non-empty key blocks are joined up to this
# many keys (the block of the fused kernel), so a small block size costs little where blocks are
# full.
RUN_KEYS = 512

# As _jit.jit without cache=True: the factories attach their own cache (ModCache).
_jit = functools.partial(numba.njit, fastmath=FASTMATH, error_model="numpy", nogil=True)


class ModCache(FunctionCache):
    """Numba's on-disk cache for a kernel built around user functions, keyed by ``fingerprint``
    (the user functions' code, constants and globals) rather than by the pickled closure."""

    def __init__(self, py_func, fingerprint: str):
        super().__init__(py_func)
        self._fingerprint = fingerprint

    def _index_key(self, sig, codegen):
        return (sig, codegen.magic_tuple(), (self._fingerprint,))


def _cached(dispatcher, fingerprint):
    if fingerprint is not None:
        dispatcher._cache = ModCache(dispatcher.py_func, fingerprint)
    return dispatcher


def keep_score(score, b, h, q_idx, kv_idx, *args):
    """The score_mod of plain attention."""
    return score


def keep_key(b, h, q_idx, kv_idx, *args):
    """The mask_mod of plain attention."""
    return True


# --- a tanh that vectorises --------------------------------------------------------------------

def fast_tanh(x):
    """tanh; in float32 a rational approximation LLVM vectorises (llvmlite here has no SVML, so
    ``math.tanh`` is a scalar libm call per score: a softcap would cost more than the rest of the
    kernel). ``fastattn.flex`` compiles ``math.tanh`` and ``np.tanh`` in user functions to it."""
    return math.tanh(x)


# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 7.9 (Eigen's and XLA's fast float32 tanh; beyond, tanh
# is 1 in float32); |x| < 4e-4 returns x.
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_TINY = np.float32(0.0004)
_TANH_P = tuple(np.float32(c) for c in (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03))
_TANH_Q = tuple(np.float32(c) for c in (
    1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


@overload(fast_tanh, fastmath=FASTMATH)
def _fast_tanh_overload(x):
    if x != types.float32:
        return lambda x: math.tanh(x)

    def fast_tanh_float32(x):
        y = x
        if y > _TANH_CLAMP:  # compares are false for NaN, which passes through
            y = _TANH_CLAMP
        if y < -_TANH_CLAMP:
            y = -_TANH_CLAMP
        y2 = y * y
        p = _TANH_P[0]
        for c in _TANH_P[1:]:
            p = p * y2 + c
        d = _TANH_Q[0]
        for c in _TANH_Q[1:]:
            d = d * y2 + c
        return x if abs(x) < _TANH_TINY else y * p / d

    return fast_tanh_float32


# --- the fused kernel ------------------------------------------------------------------------

def _jitted(fn, default):
    fn = default if fn is None else fn
    return fn if isinstance(fn, numba.core.dispatcher.Dispatcher) else numba.njit(fn)


@functools.lru_cache(maxsize=None)
def attention_kernel(score_mod, mask_mod, fingerprint=None):
    """The flex attention kernel for these jitted user functions (None: the plain ones), cached
    on disk under ``fingerprint`` (None: not cached).

    ``attention_items(q, key_panels, value_panels, S, group, heads, scale, kinds, block_q,
    block_k, order, start, stop, out, lse, args)`` computes the work items ``order[start:stop]``
    (item = flattened query head n * query blocks + query block): out (N, L, Ev) and lse (N, L)
    of those rows. ``kinds`` (B or 1, H or 1, query blocks, key blocks) int8 are the block kinds;
    query head n is batch n // heads, head n % heads, and reads key/value head n // group from
    ``key_panels`` and ``value_panels`` (laid out by ``pack_panels``). ``block_k`` need not be a
    multiple of the tile's columns (16 or 32 float32 keys). ``args`` is the tuple passed to both functions after the indices.
    """
    score_mod = _jitted(score_mod, keep_score)
    mask_mod = _jitted(mask_mod, keep_key)

    @_jit
    def attention_block(q, key_panels, value_panels, S, n, b, h, q0, q1, scale, kinds, block_k,
                        out, lse, args):
        """Queries q0..q1 of head n (batch b, head h) against the key blocks ``kinds`` keeps,
        in runs of consecutive kept blocks; ``mask_mod`` runs on the partial ones only."""
        _, L, E = q.shape
        Ev = out.shape[2]
        dtype = q.dtype
        cols = tile_width(q)
        ev_padded = -(-Ev // cols) * cols
        run_blocks = max(1, RUN_KEYS // block_k)
        # (a run starts up to a tile before its first key: see base below)
        keys_padded = -(-(run_blocks * block_k + cols) // cols) * cols
        bq = q1 - q0
        rows_padded = -(-bq // GROUP) * GROUP
        q_block = np.zeros((rows_padded, E), dtype)
        for i in range(bq):  # loops, not array assignments: their shape checks cost compile time
            for d in range(E):
                q_block[i, d] = q[n, q0 + i, d] * scale
        q_flat = q_block.reshape(-1)
        scores = np.empty(GROUP * keys_padded, dtype)
        keep = np.empty(GROUP * keys_padded, np.bool_)  # mask_mod of the partial blocks
        acc = np.zeros((rows_padded, ev_padded), dtype)
        acc_flat = acc.reshape(-1)
        row_max = np.full(rows_padded, -np.inf, dtype)
        row_sum = np.zeros(rows_padded, dtype)
        new_max = np.empty(GROUP, dtype)
        n_blocks = kinds.shape[0]
        kb = 0
        while kb < n_blocks:
            if kinds[kb] == EMPTY:
                kb += 1
                continue
            first = kb
            while kb < n_blocks and kb - first < run_blocks and kinds[kb] != EMPTY:
                kb += 1
            k0 = first * block_k
            # The key panels hold tiles of cols keys: a run starts on the tile that holds its
            # first key, and the keys before k0 (not in [lo, hi) below) are never used.
            base = k0 - k0 % cols
            keys = min(kb * block_k, S) - base
            for r0 in range(0, bq, GROUP):
                rows = min(GROUP, bq - r0)
                # mask_mod on the partial blocks first: the span [lo, hi) of keys that any row
                # of the group keeps is all the products need (on a causal diagonal, the keys
                # up to the group's last row)
                lo = keys
                hi = 0
                for sub in range(first, kb):
                    j0 = sub * block_k - base
                    j1 = min(j0 + block_k, keys)
                    if kinds[sub] == FULL:
                        lo = min(lo, j0)
                        hi = max(hi, j1)
                        continue
                    # (loops over slices from 0: an index like j0 + j may be negative as far
                    # as Numba knows, and its wraparound check keeps a loop from vectorising)
                    for i in range(rows):
                        query = q0 + r0 + i
                        flags = keep[i * keys_padded + j0:i * keys_padded + j1]
                        # the row's first and last kept key as a min and a max of selects in
                        # the same loop: they vectorise, where scans that stop at the first
                        # kept key do not (measured: 1-1.5% of a causal or window call)
                        width = j1 - j0
                        row_lo = width
                        row_hi = 0
                        for j in range(width):
                            kept = mask_mod(b, h, query, base + j0 + j, *args)
                            flags[j] = kept
                            row_lo = min(row_lo, j if kept else width)
                            row_hi = max(row_hi, j + 1 if kept else 0)
                        if row_hi > 0:
                            lo = min(lo, j0 + row_lo)
                            hi = max(hi, j0 + row_hi)
                if hi <= lo:
                    continue  # no row of the group keeps a key of this run
                for panel in range(lo // cols, -(-hi // cols)):
                    for t0 in range(0, rows, ROWS):
                        tile_product(q_flat, (r0 + t0) * E, E, key_panels,
                                     (base // cols + panel) * E * cols, cols, scores,
                                     t0 * keys_padded + panel * cols, keys_padded, E)
                for i in range(rows):
                    row = scores[i * keys_padded + lo:i * keys_padded + hi]
                    query = q0 + r0 + i
                    for j in range(hi - lo):
                        row[j] = score_mod(row[j], b, h, query, base + lo + j, *args)
                    for sub in range(first, kb):
                        if kinds[sub] == PARTIAL:
                            j0 = max(sub * block_k - base, lo)
                            j1 = min((sub + 1) * block_k - base, hi)
                            if j1 <= j0:
                                continue
                            part = row[j0 - lo:j1 - lo]
                            flags = keep[i * keys_padded + j0:i * keys_padded + j1]
                            for j in range(j1 - j0):  # a select: it vectorises, a branch not
                                part[j] = part[j] if flags[j] else -np.inf
                online_softmax_rows(scores, keys_padded, lo, hi - lo, rows, r0, row_max, row_sum,
                                    acc, new_max)
                for c0 in range(0, ev_padded, cols):
                    for t0 in range(0, rows, ROWS):
                        tile_product_add(scores, t0 * keys_padded + lo, keys_padded,
                                         value_panels, c0 * S + (base + lo) * cols, cols,
                                         acc_flat, (r0 + t0) * ev_padded + c0, ev_padded,
                                         hi - lo)
        finish_rows(acc, row_max, row_sum, n, q0, bq, out, lse)

    def attention_items(q, key_panels, value_panels, S, group, heads, scale, kinds, block_q,
                        block_k, order, start, stop, out, lse, args):
        L = q.shape[1]
        n_qblocks = -(-L // block_q)
        several_b = kinds.shape[0] > 1
        several_h = kinds.shape[1] > 1
        for t in range(start, stop):
            item = order[t]
            n = item // n_qblocks
            qb = item % n_qblocks
            b = n // heads
            h = n % heads
            q0 = qb * block_q
            attention_block(q, key_panels[n // group].reshape(-1),
                            value_panels[n // group].reshape(-1), S, n, b, h, q0,
                            min(q0 + block_q, L), scale,
                            kinds[b if several_b else 0, h if several_h else 0, qb], block_k,
                            out, lse, args)

    return _cached(_jit(attention_items), fingerprint)


# --- block masks -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def block_kinds_kernel(mask_mod, fingerprint=None):
    """``block_kinds(H, L, S, block_q, block_k, start, stop, kinds, args)``: the kinds of the
    key blocks of items start..stop (item = (b * H + h) * query blocks + query block) of
    ``kinds`` (B, H, query blocks, key blocks) int8, from ``mask_mod`` evaluated at every
    (q_idx, kv_idx) of the block (a row at a time, stopping once a block is known partial)."""
    mask_mod = _jitted(mask_mod, keep_key)

    def block_kinds(H, L, S, block_q, block_k, start, stop, kinds, args):
        n_q = kinds.shape[2]
        n_k = kinds.shape[3]
        for item in range(start, stop):
            b = item // (H * n_q)
            h = item // n_q % H
            qb = item % n_q
            for kb in range(n_k):
                j0 = kb * block_k
                j1 = min(j0 + block_k, S)
                kept = 0
                seen = 0
                for i in range(qb * block_q, min((qb + 1) * block_q, L)):
                    for j in range(j0, j1):
                        kept += 1 if mask_mod(b, h, i, j, *args) else 0
                    seen += j1 - j0
                    if 0 < kept < seen:
                        break
                kinds[b, h, qb, kb] = EMPTY if kept == 0 else FULL if kept == seen else PARTIAL

    return _cached(_jit(block_kinds), fingerprint)
