"""Flex attention: attention with a ``score_mod`` and a ``mask_mod`` written in Python, compiled
by Numba into the fused kernel (after PyTorch's ``torch.nn.attention.flex_attention``).

    scores[b, h, i, j] = score_mod(q[b, h, i] . k[b, h, j] * scale, b, h, i, j, *args)
    key j takes part in query row i   iff   mask_mod(b, h, i, j, *args)

``b`` runs over the query's leading dims but the last (flattened), ``h`` over the last (the query
heads); ``i`` and ``j`` are the query and key indices. ``args`` (arrays and scalars) are passed to
both functions on every call, so new values (document ids, a bias table) need no recompilation.
A :class:`BlockMask` (``create_block_mask``) records which blocks of (query, key) pairs are empty,
partial or full, so the kernel skips the empty blocks and calls ``mask_mod`` on the partial ones
only. :func:`and_masks` and :func:`or_masks` combine mask functions.

    >>> import numpy as np, fastattn
    >>> doc = np.repeat(np.arange(4), 64)            # 4 documents of 64 tokens, packed
    >>> def same_doc_causal(b, h, q_idx, kv_idx, doc):
    ...     return doc[q_idx] == doc[kv_idx] and kv_idx <= q_idx
    >>> mask = fastattn.create_block_mask(same_doc_causal, None, None, 256, 256, args=(doc,))
    >>> q = k = v = np.ones((1, 2, 256, 16), np.float32)
    >>> fastattn.flex_attention(q, k, v, block_mask=mask, args=(doc,)).shape
    (1, 2, 256, 16)
"""
from __future__ import annotations

import hashlib
import inspect
import math
import numbers
import threading
import types as pytypes

import numpy as np

from . import _backends, _prepare, reference

__all__ = ["flex_attention", "create_block_mask", "BlockMask", "and_masks", "or_masks"]

EMPTY, PARTIAL, FULL = 0, 1, 2  # block kinds, as kernels/cpu/flex.py
# Rows x keys per block of a block mask (PyTorch's default too). Keys per block must be a
# multiple of 16 (AVX2's float32 tile width; the kernel takes them on a machine with AVX-512's
# 32 too), so that a block mask works on every machine.
BLOCK_SIZE = (128, 128)
KEY_BLOCK_MULTIPLE = 16
# Without a mask: query rows per work item and keys per block of the plain fused kernel.
PLAIN_BLOCK_SIZE = (128, 512)

SCORE_PARAMS = "(score, b, h, q_idx, kv_idx, *args)"
MASK_PARAMS = "(b, h, q_idx, kv_idx, *args)"


# --- block masks ----------------------------------------------------------------------------------

class BlockMask:
    """Which blocks of (query, key) pairs a mask keeps, per batch, head and query block.

    ``kinds[b, h, qb, kb]`` (int8) is 0 where every pair of query block ``qb`` and key block
    ``kb`` is masked out (the block is skipped), 2 where every pair takes part (``mask_mod`` is
    not called) and 1 where ``mask_mod`` decides per pair. ``kinds`` has size 1 along the batch
    or head dim when the mask was made with B or H None (the same for every batch or head).
    Build one with :func:`create_block_mask`, reuse it for every call with the same mask.
    """

    def __init__(self, kinds: np.ndarray, block_size: tuple, shape: tuple, mask_mod=None,
                 args: tuple = ()):
        self.kinds = kinds
        self.kinds.flags.writeable = False
        self.block_size = tuple(block_size)
        self.shape = tuple(shape)  # (B or None, H or None, L, S)
        self.mask_mod = mask_mod
        self.args = tuple(args)

    @property
    def sparsity(self) -> float:
        """The share of blocks skipped (empty)."""
        return float(np.mean(self.kinds == EMPTY)) if self.kinds.size else 0.0

    def to_dense(self) -> np.ndarray:
        """The kinds spread over every (query, key) pair: (B or 1, H or 1, L, S) int8."""
        return reference.block_mask_keep(self.kinds, self.block_size, *self.shape[2:])

    def __repr__(self) -> str:
        B, H, L, S = self.shape
        counts = {name: int(np.sum(self.kinds == k)) for k, name in
                  ((EMPTY, "empty"), (PARTIAL, "partial"), (FULL, "full"))}
        name = getattr(self.mask_mod, "__name__", None)
        return (f"BlockMask(B={B}, H={H}, L={L}, S={S}, block_size={self.block_size}, "
                f"mask_mod={name}, blocks: {counts['empty']} empty, {counts['partial']} partial, "
                f"{counts['full']} full)")


def _check_size(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be an int >= 1{none}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_block_size(block_size) -> tuple:
    if block_size is None:
        return BLOCK_SIZE
    if isinstance(block_size, numbers.Integral) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if isinstance(block_size, (str, bytes)) or not hasattr(block_size, "__len__") or \
            len(block_size) != 2:
        raise TypeError(f"block_size must be an int or a pair (query rows, keys), got "
                        f"{block_size!r}")
    bq = _check_size(block_size[0], "block_size (query rows)")
    bk = _check_size(block_size[1], "block_size (keys)")
    if bk % KEY_BLOCK_MULTIPLE:
        raise ValueError(f"block_size keys must be a multiple of {KEY_BLOCK_MULTIPLE} (the CPU "
                         f"kernel's tile), got block_size={tuple(block_size)}")
    return bq, bk


def create_block_mask(mask_mod, B, H, L, S, *, args=(), block_size=None) -> BlockMask:
    """Evaluate ``mask_mod(b, h, q_idx, kv_idx, *args)`` at every pair once and record, per
    (batch, head, query block), which key blocks are empty, partial or full.

    Args:
        mask_mod: a function returning a bool (True = the key takes part), plain Python (compiled
            by Numba here) or already ``numba.njit``-ed.
        B, H: batch and (query) heads; None when the mask is the same for every batch or head
            (it is then evaluated at b = 0 or h = 0, and kept once).
        L, S: query and key lengths.
        args: arrays and scalars passed to ``mask_mod`` after the indices.
        block_size: query rows and keys per block, an int or a pair (default (128, 128)); keys a
            multiple of 16.

    Returns:
        A :class:`BlockMask` for :func:`flex_attention` with the same B (or None), H (or None),
        L and S.
    """
    B_ = _check_size(B, "B", allow_none=True)
    H_ = _check_size(H, "H", allow_none=True)
    L = _check_size(L, "L")
    S = _check_size(S, "S")
    block_size = _check_block_size(block_size)
    if mask_mod is None:
        raise TypeError(f"create_block_mask needs a mask_mod {MASK_PARAMS} -> bool, got None")
    _check_mod(mask_mod, "mask_mod", MASK_PARAMS, 4, args)
    args = tuple(args) if isinstance(args, (tuple, list)) else args
    _check_args_container(args)
    bq, bk = block_size
    Bm, Hm = B_ or 1, H_ or 1
    kinds = np.empty((Bm, Hm, -(-L // bq), -(-S // bk)), np.int8)
    if _backends.numba_unavailable_reason() is None:
        kernel_args = _kernel_args(args, np.dtype(np.float64))
        mod = _compiled_mod(mask_mod, "mask_mod", kernel_args, None)
        from .kernels.cpu import flex as kernels
        kernel = kernels.block_kinds_kernel(mod.dispatcher, mod.fingerprint)
        n_items = Bm * Hm * kinds.shape[2]
        _run_items(lambda start, stop: kernel(Hm, L, S, bq, bk, start, stop, kinds, kernel_args),
                   np.arange(n_items), kernel)
    else:
        for b in range(Bm):
            for h in range(Hm):
                keep = reference.flex_grid(mask_mod, L, S, b, h, *args)
                for qb in range(kinds.shape[2]):
                    for kb in range(kinds.shape[3]):
                        block = keep[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
                        kinds[b, h, qb, kb] = FULL if block.all() else \
                            EMPTY if not block.any() else PARTIAL
    return BlockMask(kinds, block_size, (B_, H_, L, S), mask_mod, args)


# --- combining masks --------------------------------------------------------------------------------

_jitable = set()


def _callable_in_numba(fn):
    """``fn`` itself, made callable from Numba-compiled code (``register_jitable``) too."""
    import numba
    from numba.extending import register_jitable

    if isinstance(fn, numba.core.dispatcher.Dispatcher) or fn in _jitable:
        return fn
    _jitable.add(fn)
    return register_jitable(boundscheck=True)(fn)


def _combine(mask_mods, kind: str):
    for i, fn in enumerate(mask_mods):
        if not callable(fn):
            raise TypeError(f"{kind}: argument {i} must be a mask function {MASK_PARAMS} -> "
                            f"bool, got {type(fn).__name__}")
    if _backends.numba_unavailable_reason() is None:
        mask_mods = [_callable_in_numba(fn) for fn in mask_mods]
    combined = mask_mods[0] if mask_mods else None
    for fn in mask_mods[1:]:
        combined = _both(combined, fn) if kind == "and_masks" else _either(combined, fn)
    return combined


def _both(first, second):
    def both(b, h, q_idx, kv_idx, *args):
        return first(b, h, q_idx, kv_idx, *args) & second(b, h, q_idx, kv_idx, *args)
    both.__name__ = both.__qualname__ = f"and_masks({_name(first)}, {_name(second)})"
    return both


def _either(first, second):
    def either(b, h, q_idx, kv_idx, *args):
        return first(b, h, q_idx, kv_idx, *args) | second(b, h, q_idx, kv_idx, *args)
    either.__name__ = either.__qualname__ = f"or_masks({_name(first)}, {_name(second)})"
    return either


def _all_keys(b, h, q_idx, kv_idx, *args):
    return True


def _no_keys(b, h, q_idx, kv_idx, *args):
    return False


def and_masks(*mask_mods):
    """A mask function that keeps a key where every one of ``mask_mods`` does (all get the same
    ``args``); with none, every key."""
    return _combine(mask_mods, "and_masks") if mask_mods else _all_keys


def or_masks(*mask_mods):
    """A mask function that keeps a key where any of ``mask_mods`` does; with none, no key."""
    return _combine(mask_mods, "or_masks") if mask_mods else _no_keys


# --- checking and compiling the user's functions ----------------------------------------------------

def _name(fn) -> str:
    fn = getattr(fn, "py_func", fn)
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _check_args_container(args):
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple (or list) of arrays and scalars passed to the mod "
                        f"functions, got {type(args).__name__}")


def _check_mod(fn, role: str, params: str, n_fixed: int, args) -> None:
    """A callable that takes ``n_fixed`` + len(args) positional arguments."""
    if fn is None:
        return
    if not callable(fn):
        kind = "float" if role == "score_mod" else "bool"
        raise TypeError(f"{role} must be a function {params} -> {kind}, got "
                        f"{type(fn).__name__}")
    n_args = len(args) if isinstance(args, (tuple, list)) else 0
    py = getattr(fn, "py_func", fn)
    try:
        signature = inspect.signature(py)
    except (TypeError, ValueError):
        return  # (a builtin: Numba says later whether it can call it)
    try:
        signature.bind(*range(n_fixed + n_args))
    except TypeError:
        raise TypeError(
            f"{role} {_name(fn)!r} takes {signature} but is called as {role}{params} with "
            f"{n_args} arg{'s' if n_args != 1 else ''} from args, {n_fixed + n_args} positional "
            f"arguments (both functions get every arg: end the parameters with *args to ignore some)"
        ) from None


def _kernel_args(args: tuple, dtype: np.dtype) -> tuple:
    """``args`` as the kernels take them: arrays as read-only views, float scalars in the compute
    dtype (so that float32 scores stay float32), ints as int64, bools as bools."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray) or _prepare.is_numba_device_array(a):
            if a.dtype.kind not in "biuf":
                raise TypeError(f"args[{i}] must be an array of bools, ints or floats, got dtype "
                                f"{a.dtype}")
            if isinstance(a, np.ndarray):
                a = a.view()
                a.flags.writeable = False
            out.append(a)
        elif isinstance(a, (bool, np.bool_)):
            out.append(np.bool_(a))
        elif isinstance(a, numbers.Integral):
            out.append(np.int64(a))
        elif isinstance(a, numbers.Real):
            out.append(dtype.type(a))
        else:
            raise TypeError(f"args[{i}] must be a NumPy array or a scalar (bool, int, float), "
                            f"got {type(a).__name__}" + (
                                " (pass np.asarray(...) for a list)"
                                if isinstance(a, (list, tuple)) else ""))
    return tuple(out)


class _Mod:
    """A user function compiled by Numba: ``dispatcher``, and ``fingerprint`` (its code,
    constants and globals, the key of the on-disk cache; None when it cannot be cached)."""

    def __init__(self, dispatcher, fingerprint):
        self.dispatcher = dispatcher
        self.fingerprint = fingerprint


# What the fingerprints say on top of the functions' own code: bump when the compilation of user
# functions changes (the tanh substitution, the options).
_FINGERPRINT_VERSION = "flex-1"
_mods: dict = {}
_mods_lock = threading.Lock()


class _Uncacheable(Exception):
    pass


def _value_fingerprint(value, seen) -> str:
    import numba

    if isinstance(value, pytypes.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, numba.core.dispatcher.Dispatcher):
        return _function_fingerprint(value.py_func, seen)
    if isinstance(value, pytypes.FunctionType):
        return _function_fingerprint(value, seen)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, np.generic,
                                           np.dtype)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_value_fingerprint(v, seen) for v in value) + ")"
    if isinstance(value, np.ndarray):
        return f"array {value.dtype} {value.shape} " + hashlib.sha256(
            np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, (type, pytypes.BuiltinFunctionType, np.ufunc)):
        return f"{type(value).__name__} {getattr(value, '__module__', '')}." \
               f"{getattr(value, '__qualname__', getattr(value, '__name__', ''))}"
    raise _Uncacheable(type(value).__name__)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, pytypes.CodeType):
            names |= _code_names(const)
    return names


def _code_fingerprint(code) -> str:
    consts = [_code_fingerprint(c) if isinstance(c, pytypes.CodeType) else repr(c)
              for c in code.co_consts]
    return hashlib.sha256(repr((code.co_code, consts, code.co_names, code.co_varnames,
                                code.co_argcount, code.co_flags)).encode()).hexdigest()


def _function_fingerprint(fn, seen) -> str:
    if fn in seen:
        return f"recursive {fn.__qualname__}"
    seen.add(fn)
    parts = [fn.__module__ or "", fn.__qualname__, _code_fingerprint(fn.__code__)]
    for name in sorted(_code_names(fn.__code__)):
        if name in fn.__globals__:
            parts.append(f"{name}={_value_fingerprint(fn.__globals__[name], seen)}")
    for cell in fn.__closure__ or ():
        parts.append(_value_fingerprint(_cell_value(cell), seen))
    parts.append(_value_fingerprint(fn.__defaults__, seen))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _fingerprint(fn) -> str | None:
    try:
        return _FINGERPRINT_VERSION + " " + _function_fingerprint(fn, set())
    except (_Uncacheable, AttributeError):
        return None


class _ShimModule(pytypes.ModuleType):
    """``math`` or ``numpy`` as a user function sees it when compiled: ``tanh`` is the kernels'
    vectorisable one, every other name the module's own."""

    def __init__(self, module, tanh):
        super().__init__(module.__name__)
        self._module = module
        self.tanh = tanh

    def __getattr__(self, name):
        return getattr(self._module, name)


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _with_fast_tanh(fn):
    """``fn`` with ``math.tanh`` and ``np.tanh`` compiled to ``fast_tanh`` (float32 only; other
    dtypes get math.tanh), or ``fn`` itself when it uses neither."""
    from .kernels.cpu.flex import fast_tanh

    def substitute(value):
        if value is math or value is np:
            return _ShimModule(value, fast_tanh)
        if value is math.tanh or value is np.tanh:
            return fast_tanh
        return None

    replaced = {}
    for name in _code_names(fn.__code__):
        new = substitute(fn.__globals__.get(name))
        if new is not None:
            replaced[name] = new
    closure = fn.__closure__
    if closure:  # (a function defined inside another, which imported math there)
        cells = [substitute(_cell_value(c)) for c in closure]
        if any(c is not None for c in cells):
            closure = tuple(pytypes.CellType(new) if new is not None else old
                            for new, old in zip(cells, closure))
    if not replaced and closure is fn.__closure__:
        return fn
    new_globals = dict(fn.__globals__)
    new_globals.update(replaced)
    rebound = pytypes.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__,
                                   closure)
    rebound.__qualname__ = fn.__qualname__
    rebound.__module__ = fn.__module__
    return rebound


def _numba_reason(exc: BaseException) -> str:
    """Numba's reason, without its pipeline banners."""
    lines = [line for line in str(exc).splitlines()
             if line.strip() and not line.startswith(("Failed in nopython mode pipeline",
                                                      "During: "))]
    if len(lines) > 14:  # the start (what failed) and the end (where, in the user's source)
        lines = lines[:5] + ["..."] + lines[-7:]
    text = "\n".join(lines)
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _jit_mod(fn):
    """The Numba dispatcher and fingerprint of a user function (made once per function)."""
    import numba
    from .kernels.cpu.flex import ModCache

    with _mods_lock:
        mod = _mods.get(fn)
        if mod is not None:
            return mod
        py = fn.py_func if isinstance(fn, numba.core.dispatcher.Dispatcher) else fn
        fingerprint = _fingerprint(py) if isinstance(py, pytypes.FunctionType) else None
        if isinstance(fn, numba.core.dispatcher.Dispatcher):
            dispatcher = fn
        elif isinstance(py, pytypes.FunctionType):
            dispatcher = numba.njit(_with_fast_tanh(py), boundscheck=True,
                                    fastmath=_fastmath(), error_model="numpy")
            if fingerprint is not None:
                try:
                    dispatcher._cache = ModCache(dispatcher.py_func, fingerprint)
                except RuntimeError:  # no file to cache beside (python -c, some notebooks)
                    pass
        else:
            dispatcher = numba.njit(py)
        mod = _mods[fn] = _Mod(dispatcher, fingerprint)
        return mod


def _fastmath():
    from .kernels.cpu._jit import FASTMATH
    return FASTMATH


def _compiled_mod(fn, role: str, kernel_args: tuple, score_dtype) -> _Mod:
    """``fn`` compiled for the kernels' argument types, its return type checked."""
    import numba
    from numba import types

    mod = _jit_mod(fn)
    index = types.int64
    arg_types = tuple(numba.typeof(a) for a in kernel_args)
    signature = ((numba.from_dtype(score_dtype),) if role == "score_mod" else ()) + \
        (index,) * 4 + arg_types
    try:
        # (through the dispatcher's typing, which folds the star-args of *args into a tuple)
        _, _, folded, _ = mod.dispatcher.get_call_template(list(signature), {})
    except Exception as exc:
        described = ", ".join(str(t) for t in signature)
        raise TypeError(f"Numba cannot compile {role} {_name(fn)!r} for arguments "
                        f"({described}):\n{_numba_reason(exc)}") from None
    returns = mod.dispatcher.overloads[tuple(folded)].signature.return_type
    if role == "score_mod":
        if isinstance(returns, types.Boolean) or not isinstance(returns, (types.Float,
                                                                          types.Integer)):
            raise TypeError(f"score_mod {_name(fn)!r} must return a float (the new score), it "
                            f"returns {returns}" + (" (is it a mask_mod?)"
                                                    if isinstance(returns, types.Boolean)
                                                    else ""))
    elif not isinstance(returns, types.Boolean):
        raise TypeError(f"mask_mod {_name(fn)!r} must return a bool (True = the key takes "
                        f"part), it returns {returns}")
    return mod


# --- running the CPU kernels ------------------------------------------------------------------------

def _run_items(call, order: np.ndarray, kernel) -> None:
    """``call(start, stop)`` over chunks of ``order`` on Numba's thread count of Python threads
    (the kernels release the GIL); the kernel is compiled first, here, with no items."""
    import numba

    call(0, 0)
    n = len(order)
    threads = max(1, min(numba.get_num_threads(), n))
    chunk = max(1, n // (threads * 8))
    starts = iter(range(0, n, chunk))
    lock = threading.Lock()
    errors = []

    def work():
        while not errors:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            try:
                call(start, min(start + chunk, n))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)

    helpers = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for done in helpers:
        done.result()
    if errors:
        raise errors[0]


_pools: dict = {}


def _pool(workers: int):
    """Threads kept between calls (starting threads costs milliseconds on a busy machine)."""
    from concurrent.futures import ThreadPoolExecutor

    with _mods_lock:
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fastattn")
        return pool


def _item_order(kinds: np.ndarray, N: int, heads: int) -> np.ndarray:
    """Work items (query head n, query block), the most kept blocks first, so that the threads
    finish together (the longest first, then ever shorter ones fill the gaps)."""
    n_q = kinds.shape[2]
    kept = np.count_nonzero(kinds != EMPTY, axis=-1)          # (Bm, Hm, n_q)
    n = np.arange(N)
    b = n // heads
    h = n % heads
    cost = kept[b if kinds.shape[0] > 1 else 0 * b, h if kinds.shape[1] > 1 else 0 * h]
    return np.argsort(-cost.reshape(-1), kind="stable").astype(np.int64)


_last_kernel = None  # (for the tests: what the last call ran)


def _numba_attention(p: _prepare.AttentionProblem, heads: int, score_mod, mask_mod, kinds,
                     block_size, kernel_args):
    from . import _numba
    from .kernels.cpu import flex as kernels
    from .kernels.cpu.attention import pack_panels
    from .kernels.cpu.tile import tile_cols

    N, L, E = p.q.shape
    n_kv, S, Ev = p.v.shape
    out = np.empty((N, L, Ev), p.dtype)
    lse = np.empty((N, L), p.dtype)
    score = None if score_mod is None else _compiled_mod(score_mod, "score_mod", kernel_args,
                                                         p.dtype)
    mask = None if mask_mod is None else _compiled_mod(mask_mod, "mask_mod", kernel_args,
                                                       p.dtype)
    fingerprint = None
    if (score is None or score.fingerprint) and (mask is None or mask.fingerprint):
        fingerprint = f"score {score and score.fingerprint}; mask {mask and mask.fingerprint}"
    kernel = kernels.attention_kernel(score and score.dispatcher, mask and mask.dispatcher,
                                      fingerprint)
    global _last_kernel
    _last_kernel = kernel
    if N and L:
        bq, bk = block_size
        cols = tile_cols(p.dtype.itemsize)
        order = _item_order(kinds, N, heads)
        q, k, v = (_numba._readonly(x) for x in (p.q, p.k, p.v))
        scale = p.dtype.type(p.scale)
        with _numba._lock:
            key_panels, value_panels = _numba._scratch_arrays(
                [(n_kv, -(-S // cols), E * cols), (n_kv, -(-Ev // cols), S * cols)], p.dtype)
            pack_panels(k, v, key_panels, value_panels)
            _run_items(lambda start, stop: kernel(
                q, key_panels, value_panels, S, p.group, heads, scale, kinds, bq, bk, order,
                start, stop, out, lse, kernel_args), order, kernel)
    return out, lse


def _cuda_attention(query, key, value, score_mod, mask_mod, block_mask, args, scale, enable_gqa,
                    return_lse):
    """The cuda backend: the checks of the others, then kernels/cuda/flex.py. Results are on
    the device when an input is."""
    from numba import cuda

    from . import _cuda
    from .kernels.cuda import flex as kernels

    on_device = any(_backends.is_device_array(x) for x in (query, key, value))
    a = _prepare.check_attention(_cuda._as_device_array(query), _cuda._as_device_array(key),
                                 _cuda._as_device_array(value), None, False, scale, enable_gqa,
                                 "dot")
    H = a.lead[-1] if a.lead else 1
    B = a.N // H if H else 0
    if block_mask is not None:
        _check_block_mask(block_mask, B, H, a.L, a.S, a.query.shape)
        kinds, (mbq, mbk) = block_mask.kinds, block_mask.block_size
    elif mask_mod is not None and a.L and a.S:
        made = create_block_mask(mask_mod, B, H, a.L, a.S, args=_host_args(args))
        kinds, (mbq, mbk) = made.kinds, made.block_size
    else:
        mbq, mbk = PLAIN_BLOCK_SIZE
        kinds = np.full((1, 1, -(-a.L // mbq), -(-a.S // mbk)), FULL, np.int8)
    kernel_args = tuple(cuda.to_device(x) if isinstance(x, np.ndarray) else x
                        for x in _kernel_args(args, a.dtype))
    out = cuda.device_array((a.N, a.L, a.Ev), a.in_dtype)
    lse = cuda.device_array((a.N, a.L), a.dtype)
    if a.N * a.L:
        tiles = _cuda._tiles(a.dtype, a.Ev)
        kernel = kernels.flex_kernels(tiles, a.dtype, score_mod, mask_mod).attention
        grid = (a.N * -(-a.L // tiles.block_q), max(1, -(-a.Ev // tiles.block_v)))
        kernel[grid, tiles.threads](
            *_cuda._attention_operands(a), a.N, H, a.L, a.S, a.E, a.Ev, a.dtype.type(a.scale),
            cuda.to_device(kinds), mbq, mbk, out, lse, kernel_args)
    out = _cuda._result(out.reshape((*a.lead, a.L, a.Ev)), on_device)
    if not return_lse:
        return out
    return out, _cuda._result(lse.reshape((*a.lead, a.L)), on_device)


def _host_args(args: tuple) -> tuple:
    """``args`` with device arrays copied to the host (to build a block mask on the CPU)."""
    return tuple(a.copy_to_host() if _prepare.is_numba_device_array(a) else a for a in args)


# --- the public function ----------------------------------------------------------------------------

def _check_block_mask(block_mask, B: int, H: int, L: int, S: int, query_shape) -> None:
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (from fastattn.create_block_mask), got "
                        f"{type(block_mask).__name__}")
    Bm, Hm, Lm, Sm = block_mask.shape
    if (Bm not in (None, B)) or (Hm not in (None, H)) or Lm != L or Sm != S:
        raise ValueError(
            f"block_mask was made for B={Bm}, H={Hm}, L={Lm}, S={Sm}, but the query "
            f"{tuple(query_shape)} and key have B={B}, H={H}, L={L}, S={S} (B and H may be "
            f"None in create_block_mask for a mask shared by every batch or head)")


def flex_attention(query, key, value, score_mod=None, mask_mod=None, *, block_mask=None,
                   args=(), scale=None, enable_gqa: bool = False, return_lse: bool = False,
                   backend: str = "auto"):
    """Attention whose scores and mask are Python functions, compiled into the fused kernel.

    Args:
        query, key, value: (..., L, E), (..., S, E), (..., S, Ev) float arrays as
            :func:`scaled_dot_product_attention` takes them (e.g. (B, Hq, L, E) and (B, Hkv, S,
            E) with ``enable_gqa``). ``b`` below indexes the leading dims but the last
            (flattened), ``h`` the last one (query heads).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx, *args) -> float``, the new score
            from ``score`` = q . k * scale (e.g. a bias, a softcap); None keeps the score.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx, *args) -> bool``, True where key ``kv_idx``
            takes part in row ``q_idx``; None: the block mask's, or every key.
        block_mask: a :class:`BlockMask` from :func:`create_block_mask` (made once, reused): the
            kernel skips its empty blocks and calls ``mask_mod`` on its partial blocks only.
            Without one, a ``mask_mod`` is evaluated everywhere on each call.
        args: a tuple of arrays and scalars passed to both functions after the indices (arrays
            read-only; float scalars in the compute dtype); new values need no recompilation.
            Default: the block mask's args.
        scale: default 1/sqrt(E).
        enable_gqa: grouped-query attention, as in scaled_dot_product_attention.
        return_lse: also return the log-sum-exp of each row's kept scores.
        backend: ``"auto"``, ``"numba"``, ``"numpy"`` (the reference) or ``"cuda"``.

    The functions are plain Python (or already ``numba.njit``-ed) working on scalars: indices
    are int64, ``score`` is float32 or float64 (the compute dtype). Each is compiled once per
    process for its argument types, and cached on disk (when its code, constants and globals
    are the same). ``math.tanh`` and ``np.tanh`` compile to a vectorised tanh in float32.
    Array indexing in them is bounds-checked (IndexError).

    Returns:
        out (..., L, Ev) in the input dtype, or ``(out, lse)``. A row with no key taking part
        gives zeros and lse = -inf.
    """
    name = _backends.resolve(backend, query, key, value)
    if isinstance(args, list):
        args = tuple(args)
    _check_args_container(args)
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        _check_block_mask(block_mask, 0, 0, 0, 0, ())
    if block_mask is not None:
        if mask_mod is None:
            mask_mod = block_mask.mask_mod
        if not args:
            args = block_mask.args
    _check_mod(score_mod, "score_mod", SCORE_PARAMS, 5, args)
    _check_mod(mask_mod, "mask_mod", MASK_PARAMS, 4, args)
    if name == "cuda":
        return _cuda_attention(query, key, value, score_mod, mask_mod, block_mask, args, scale,
                               enable_gqa, return_lse)
    p = _prepare.prepare_attention(query, key, value, None, False, scale, enable_gqa, "dot")
    lead = p.out_shape[:-2]
    L, S = p.q.shape[1], p.k.shape[1]
    H = lead[-1] if lead else 1
    B = p.q.shape[0] // H if H else 0
    if block_mask is not None:
        _check_block_mask(block_mask, B, H, L, S, np.shape(query))
    kernel_args = _kernel_args(args, p.dtype)
    if name == "numpy":
        q, k, v = (np.asarray(x, p.dtype) for x in (query, key, value))
        ref_args = tuple(a.astype(p.dtype) if isinstance(a, np.floating) else a
                         for a in kernel_args)
        out, lse = reference.flex_attention(
            q, k, v, score_mod, mask_mod,
            block_kinds=None if block_mask is None else block_mask.kinds,
            block_size=None if block_mask is None else block_mask.block_size,
            args=ref_args, scale=p.scale, enable_gqa=enable_gqa, return_lse=True)
    else:
        if block_mask is not None:
            kinds, block_size = block_mask.kinds, block_mask.block_size
        elif mask_mod is not None and L and S:
            made = create_block_mask(mask_mod, B, H, L, S, args=args)
            kinds, block_size = made.kinds, made.block_size
        else:
            block_size = PLAIN_BLOCK_SIZE
            kinds = np.full((1, 1, -(-L // block_size[0]), -(-S // block_size[1])), FULL,
                            np.int8)
        out, lse = _numba_attention(p, H, score_mod, mask_mod, kinds, block_size, kernel_args)
        out = out.reshape(p.out_shape)
        lse = lse.reshape(p.lse_shape)
    out = out if out.dtype == p.in_dtype else out.astype(p.in_dtype)
    return (out, lse) if return_lse else out
