"""Host-side checks and preparation shared by every backend.

The public functions call these to turn user input into a small, uniform problem: C-contiguous
arrays in the compute dtype with the leading dims flattened, and masks described for kernels to
read in place through per-row offsets (never expanded to (..., L, S)).
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SIMILARITIES = ("dot", "cosine")
SIMILARITY_KINDS = ("dot", "scaled_dot", "cosine")
ALIGNMENTS = ("top_left", "bottom_right")
# A window side with no bound: further than any key can be from any query.
NO_LIMIT = 1 << 62


def is_bfloat16(dtype) -> bool:
    """``ml_dtypes.bfloat16`` (known by its name: ml_dtypes is optional, never imported here)."""
    return _is_bfloat16(np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _is_bfloat16(dtype: np.dtype) -> bool:
    # Cached: a dtype's name is slow to make, and every call checks several dtypes.
    return dtype.name == "bfloat16"


def is_sixteen_bit(dtype) -> bool:
    """float16 or bfloat16: computed in float32, read in place by the CPU kernels."""
    return np.dtype(dtype) == np.float16 or is_bfloat16(dtype)


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float16 and bfloat16 are computed in float32; float32 and float64 in themselves."""
    return np.dtype(np.float32) if is_sixteen_bit(dtype) else np.dtype(dtype)


def is_numba_device_array(x) -> bool:
    """A Numba device array (the CUDA simulator's too), checked where it lies, never copied."""
    return bool(getattr(x, "__cuda_ndarray__", False))


def check_float_dtype(dtype, name: str) -> None:
    if dtype not in (np.float16, np.float32, np.float64) and not is_bfloat16(dtype):
        raise TypeError(f"{name} must be a float16, float32 or float64 array (or "
                        f"ml_dtypes.bfloat16), got dtype {dtype}")


def check_float_array(x, name: str):
    """``x`` as a NumPy array (a Numba device array stays as it is) of a float dtype."""
    if is_numba_device_array(x):
        check_float_dtype(x.dtype, name)
        return x
    if hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} is a GPU array; use backend='cuda' or 'auto' for device arrays")
    arr = np.asarray(x)
    check_float_dtype(arr.dtype, name)
    return arr


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_scale(scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        raise NotImplementedError(
            "dropout_p > 0 is not implemented: fastattn computes inference-time attention; "
            "pass dropout_p=0.0")


def contiguous(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous array of ``dtype``; a copy only when needed, never a view the caller can write."""
    return np.ascontiguousarray(x, dtype=dtype)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (so cosine similarity is 0, not NaN)."""
    norm = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    return x / np.where(norm == 0, 1, norm).astype(x.dtype)


@dataclass
class Mask:
    """A mask read in place: row r of the flattened (rows, cols) problem starts at element
    ``row_offset[r]`` of ``values`` and steps by ``col_stride`` (0 where the mask broadcasts).

    ``values`` is the user's mask itself unless it had to be made contiguous or, for a float
    mask, converted to the compute dtype: a bool mask is read as bytes (non-zero = takes part),
    a float mask is added to the scores.
    """
    values: np.ndarray      # 1-d: uint8 for a bool mask, the compute dtype for a float mask
    row_offset: np.ndarray  # int64 (rows,)
    col_stride: int

    @property
    def is_bool(self) -> bool:
        return self.values.dtype == np.uint8


def check_mask(mask, name: str, target_shape: tuple, target_desc: str) -> np.ndarray:
    """Check dtype (bool or float) and that ``mask`` broadcasts to ``target_shape``."""
    if not is_numba_device_array(mask):
        mask = np.asarray(mask)
    if mask.dtype != np.bool_ and mask.dtype.kind != "f" and not is_bfloat16(mask.dtype):
        raise TypeError(
            f"{name} must be a bool array (True = takes part) or a float array (added to the "
            f"scores), got dtype {mask.dtype}")
    try:
        np.broadcast_shapes(mask.shape, target_shape)
        ok = np.broadcast_shapes(mask.shape, target_shape) == tuple(target_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {mask.shape} does not broadcast to the {target_desc} shape "
            f"{tuple(target_shape)}")
    return mask


def mask_in_place(mask: np.ndarray, target_shape: tuple, dtype, axis: int = -1) -> Mask:
    """Describe a checked mask as a :class:`Mask` over the rows of ``target_shape``, the rows
    running along ``axis`` (moved last, as the data is). Never expanded to ``target_shape``;
    copied only when it is not contiguous (or a float mask is not in the compute dtype).
    """
    if mask.dtype == np.bool_:
        values = np.ascontiguousarray(mask).view(np.uint8)
    else:
        values = np.ascontiguousarray(mask, dtype=dtype)
    view = np.moveaxis(np.broadcast_to(values, target_shape), axis, -1)
    item = values.itemsize
    row_shape = view.shape[:-1]
    row_offset = np.zeros(row_shape, np.int64)
    for dim, (size, stride) in enumerate(zip(row_shape, view.strides[:-1])):
        if stride and size > 1:
            steps = np.arange(size, dtype=np.int64) * (stride // item)
            row_offset += steps.reshape((size,) + (1,) * (len(row_shape) - dim - 1))
    return Mask(values.reshape(-1), row_offset.reshape(-1), view.strides[-1] // item)


class Variants(NamedTuple):
    """Which keys each query row sees, and what is done to its scores, as every backend reads it.

    Query row i sits at position p(i) = i + ``offset`` among the keys (0: top-left, S - L:
    bottom-right). Key j takes part only if p(i) - ``left`` <= j <= p(i) + ``right`` (``NO_LIMIT``
    where a side is unbounded; causal attention is ``right = min(right, 0)``). A score becomes
    ``softcap * tanh(score / softcap)`` when ``softcap > 0`` (after the scale, before any mask);
    ALiBi then adds ``-alibi[n] * |p(i) - j|`` for flattened query head n (``alibi`` None: no
    bias).
    """
    offset: int
    left: int
    right: int
    softcap: float
    alibi: np.ndarray | None  # (N,) slopes in the compute dtype, one per flattened query head

    @property
    def windowed(self) -> bool:
        """Whether the window (causal included) can drop a key."""
        return self.left < NO_LIMIT or self.right < NO_LIMIT

    @property
    def plain(self) -> bool:
        """No window, no softcap, no ALiBi: the textbook attention."""
        return not self.windowed and self.softcap == 0 and self.alibi is None


def check_window(window, is_causal: bool) -> tuple[int, int]:
    """``window`` as (left, right) with ``NO_LIMIT`` for unbounded sides, causal folded in."""
    left = right = None
    if window is not None:
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
            raise TypeError(f"window must be a pair (left, right) of ints >= 0 or None, got "
                            f"{window!r}")
        left, right = window
        for side, value in (("left", left), ("right", right)):
            if value is None:
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"window {side} side must be an int >= 0 or None, got "
                                f"{value!r} ({type(value).__name__}) in window={window!r}")
            if value < 0:
                raise ValueError(f"window {side} side must be >= 0 (or None for unbounded), got "
                                 f"{value} in window={window!r}")
    left = NO_LIMIT if left is None else min(int(left), NO_LIMIT)
    right = NO_LIMIT if right is None else min(int(right), NO_LIMIT)
    if is_causal:
        right = min(right, 0)
    return left, right


def check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float > 0 or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a finite float > 0 (or None), got {softcap}")
    return float(softcap)


def check_alibi(alibi_slopes, lead: tuple, dtype) -> np.ndarray | None:
    """ALiBi slopes broadcast to the query's leading dims and flattened: (N,) in ``dtype``."""
    if alibi_slopes is None:
        return None
    if is_numba_device_array(alibi_slopes):
        alibi_slopes = alibi_slopes.copy_to_host()
    slopes = np.asarray(alibi_slopes)
    if slopes.dtype.kind != "f":
        raise TypeError(f"alibi_slopes must be a float array, got dtype {slopes.dtype}")
    if len(lead) == 0:
        raise ValueError(f"alibi_slopes need query heads: the query has no leading dims (its "
                         f"shape is (L, E)), got alibi_slopes of shape {slopes.shape}")
    try:
        ok = np.broadcast_shapes(slopes.shape, lead) == tuple(lead)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"alibi_slopes of shape {slopes.shape} do not broadcast to the query's "
                         f"leading dims {tuple(lead)} (e.g. (Hq,) = ({lead[-1]},) or (B, Hq))")
    if not np.all(np.isfinite(slopes)):
        raise ValueError("alibi_slopes must be finite")
    return np.ascontiguousarray(np.broadcast_to(slopes, lead), dtype=dtype).reshape(-1)


def check_variants(alignment, window, softcap, alibi_slopes, is_causal: bool, lead: tuple,
                   L: int, S: int, dtype) -> Variants:
    check_choice(alignment, "alignment", ALIGNMENTS)
    left, right = check_window(window, is_causal)
    return Variants(0 if alignment == "top_left" else S - L, left, right, check_softcap(softcap),
                    check_alibi(alibi_slopes, lead, dtype))


@dataclass
class AttentionProblem:
    """SDPA inputs with leading dims flattened: query head n uses key/value head n // group."""
    q: np.ndarray       # (N, L, E), in ``dtype`` or (``keep_sixteen_bit``) in ``in_dtype``
    k: np.ndarray       # (N // group, S, E), likewise
    v: np.ndarray       # (N // group, S, Ev), or None for attention_weights
    group: int
    scale: float
    causal: bool
    mask: Mask | None
    variants: Variants
    out_shape: tuple    # the user's (..., L, Ev)
    lse_shape: tuple    # the user's (..., L)
    weights_shape: tuple  # the user's (..., L, S)
    in_dtype: np.dtype
    dtype: np.dtype


@dataclass
class AttentionArgs:
    """Checked SDPA arguments, before any data is copied: the arrays as given (NumPy, or Numba
    device arrays for the cuda backend), the sizes, and the resolved scale and group."""
    query: object
    key: object
    value: object       # None for attention_weights
    mask: object        # the checked bool or float mask as given, or None
    lead: tuple         # the query's leading dims (..., Hq)
    L: int
    S: int
    E: int
    Ev: int
    group: int
    scale: float
    causal: bool
    similarity: str
    in_dtype: np.dtype
    dtype: np.dtype
    variants: Variants

    @property
    def N(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64))

    @property
    def weights_shape(self) -> tuple:
        return (*self.lead, self.L, self.S)


def check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, similarity,
                    *, need_value: bool = True, alignment="top_left", window=None, softcap=None,
                    alibi_slopes=None) -> AttentionArgs:
    """Check SDPA-style input (shapes, dtypes, options) without touching the data."""
    query = check_float_array(query, "query")
    key = check_float_array(key, "key")
    names = ("query", "key", "value") if need_value else ("query", "key")
    arrays = [query, key]
    if need_value:
        value = check_float_array(value, "value")
        arrays.append(value)
    for name, arr in zip(names, arrays):
        if arr.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., seq, features), "
                             f"got shape {arr.shape}")
    dtypes = {arr.dtype for arr in arrays}
    if len(dtypes) != 1:
        got = ", ".join(f"{n} {a.dtype}" for n, a in zip(names, arrays))
        raise TypeError(f"query, key and value must have the same dtype, got {got}")
    if len({arr.ndim for arr in arrays}) != 1:
        got = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays))
        raise ValueError(f"query, key and value must have the same number of dims, got {got}")
    is_causal = check_flag(is_causal, "is_causal")
    enable_gqa = check_flag(enable_gqa, "enable_gqa")
    scale = check_scale(scale)
    check_choice(similarity, "similarity", SIMILARITIES)

    *lead_q, L, E = query.shape
    *lead_k, S, Ek = key.shape
    if E != Ek:
        raise ValueError(f"query and key must have the same feature size E: query {query.shape} "
                         f"has E={E}, key {key.shape} has E={Ek}")
    if E == 0:
        raise ValueError(f"query and key need a feature size E >= 1, got query {query.shape}")
    if need_value:
        *lead_v, Sv, Ev = value.shape
        if Sv != S:
            raise ValueError(f"key and value must have the same sequence length S: key "
                             f"{key.shape} has S={S}, value {value.shape} has S={Sv}")
        if lead_v != lead_k:
            raise ValueError(f"key {key.shape} and value {value.shape} must have the same "
                             f"leading dims")
    else:
        Ev = 0
    group = 1
    if enable_gqa and query.ndim >= 3:
        if lead_q[:-1] != lead_k[:-1]:
            raise ValueError(f"query {query.shape} and key {key.shape} must have the same batch "
                             f"dims (all but the last three)")
        hq, hkv = lead_q[-1], lead_k[-1]
        if hkv == 0 or hq % hkv:
            raise ValueError(f"enable_gqa needs query heads Hq={hq} to be a multiple of key/value "
                             f"heads Hkv={hkv} (query {query.shape}, key {key.shape})")
        group = hq // hkv
    elif lead_q != lead_k:
        hint = (" (for grouped-query attention with fewer key/value heads pass enable_gqa=True)"
                if query.ndim >= 3 and lead_q[:-1] == lead_k[:-1] else "")
        raise ValueError(f"query {query.shape} and key {key.shape} must have the same leading "
                         f"dims{hint}")

    mask = None
    if attn_mask is not None:
        mask = check_mask(attn_mask, "attn_mask", (*lead_q, L, S),
                          "attention weights (..., Hq, L, S)")
    if scale is None:
        scale = 1.0 if similarity == "cosine" else 1.0 / math.sqrt(E)
    dtype = compute_dtype(query.dtype)
    variants = check_variants(alignment, window, softcap, alibi_slopes, is_causal, tuple(lead_q),
                              L, S, dtype)
    return AttentionArgs(query, key, value if need_value else None, mask, tuple(lead_q), L, S, E,
                         Ev, group, scale, is_causal, similarity, query.dtype, dtype, variants)


def prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, similarity,
                      *, need_value: bool = True, keep_sixteen_bit: bool = False,
                      **variants) -> AttentionProblem:
    """Check SDPA-style input and build the flattened problem (see ``AttentionProblem``);
    ``variants`` are ``alignment``, ``window``, ``softcap`` and ``alibi_slopes``.

    ``keep_sixteen_bit``: float16 and bfloat16 q, k and v stay in their own dtype (read in place
    by a kernel that widens them as it loads them) instead of becoming float32 copies; cosine
    similarity, which normalises the rows first, always computes them in float32."""
    a = check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa, similarity,
                        need_value=need_value, **variants)
    dtype = a.dtype
    mask = None if a.mask is None else mask_in_place(a.mask, a.weights_shape, dtype)
    N, L, E, S, Ev, group = a.N, a.L, a.E, a.S, a.Ev, a.group
    storage = a.in_dtype if keep_sixteen_bit and similarity != "cosine" else dtype
    q = contiguous(a.query, storage).reshape(N, L, E)
    k = contiguous(a.key, storage).reshape(N // group, S, E)
    if similarity == "cosine":
        q, k = unit_rows(q), unit_rows(k)
    v = contiguous(a.value, storage).reshape(N // group, S, Ev) if need_value else None
    return AttentionProblem(q, k, v, group, a.scale, a.causal, mask, a.variants,
                            (*a.lead, L, Ev), (*a.lead, L), a.weights_shape, a.in_dtype, dtype)


def check_softmax(x, axis, mask):
    """Check softmax input; return (x, axis in [0, ndim), checked mask or None)."""
    x = check_float_array(x, "x")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dim, got a 0-d array")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {x.shape}")
    axis = axis % x.ndim
    if mask is not None:
        mask = check_mask(mask, "mask", x.shape, "x")
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array (True = keep), got dtype {mask.dtype}")
    return x, axis, mask


def prepare_softmax(x, axis, mask):
    """Check softmax input; return (x moved to (rows, cols), Mask or None, undo-shape info)."""
    x, axis, checked = check_softmax(x, axis, mask)
    dtype = compute_dtype(x.dtype)
    moved = np.moveaxis(x, axis, -1)
    rows = contiguous(moved, dtype).reshape(-1, x.shape[axis]) if x.size else \
        np.zeros((int(np.prod(moved.shape[:-1])), x.shape[axis]), dtype)
    prepared_mask = None
    if checked is not None:
        prepared_mask = mask_in_place(checked, x.shape, dtype, axis)
    return rows, prepared_mask, moved.shape, axis, dtype


def check_similarity(a, b, kind):
    """Check similarity input; return (a, b, broadcast leading dims)."""
    a = check_float_array(a, "a")
    b = check_float_array(b, "b")
    check_choice(kind, "kind", SIMILARITY_KINDS)
    for name, arr in (("a", a), ("b", b)):
        if arr.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., rows, features), "
                             f"got shape {arr.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got a {a.dtype}, b {b.dtype}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must have the same feature size E: a {a.shape} has "
                         f"E={a.shape[-1]}, b {b.shape} has E={b.shape[-1]}")
    try:
        lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"the leading dims of a {a.shape} and b {b.shape} do not broadcast "
                         f"together") from None
    return a, b, lead


def prepare_similarity(a, b, kind):
    """Check similarity input; return (a, b) as (N, La, E), (N, Lb, E) and the output shape."""
    a, b, lead = check_similarity(a, b, kind)
    dtype = compute_dtype(a.dtype)
    E = a.shape[-1]
    a3 = contiguous(np.broadcast_to(a, (*lead, *a.shape[-2:])), dtype).reshape(-1, a.shape[-2], E)
    b3 = contiguous(np.broadcast_to(b, (*lead, *b.shape[-2:])), dtype).reshape(-1, b.shape[-2], E)
    if kind == "cosine":
        a3, b3 = unit_rows(a3), unit_rows(b3)
    scale = 1.0 / math.sqrt(E) if kind == "scaled_dot" and E else 1.0
    return a3, b3, scale, (*lead, a.shape[-2], b.shape[-2]), dtype


def check_backward(a: AttentionArgs, grad_out, out, lse):
    """Check the backward's own inputs against the checked forward arguments ``a``: grad_out and
    out of the forward's output shape (..., L, Ev) and the query's dtype, lse of shape (..., L)
    and a float dtype, without NaN (a Numba device array is checked for NaN by its backend).
    Returns them as arrays (device arrays as they are)."""
    out_shape = (*a.lead, a.L, a.Ev)
    checked = []
    for name, x in (("grad_out", grad_out), ("out", out)):
        x = check_float_array(x, name)
        if tuple(x.shape) != out_shape:
            raise ValueError(f"{name} must have the forward's output shape (..., L, Ev) = "
                             f"{out_shape} for query {tuple(a.query.shape)} and value "
                             f"{tuple(a.value.shape)}, got shape {tuple(x.shape)}")
        if x.dtype != a.in_dtype:
            raise TypeError(f"{name} must have the dtype of query, value and the forward's out "
                            f"({a.in_dtype}), got dtype {x.dtype}")
        checked.append(x)
    lse = check_float_array(lse, "lse")
    lse_shape = (*a.lead, a.L)
    if tuple(lse.shape) != lse_shape:
        raise ValueError(f"lse must be the forward's log-sum-exp of shape (..., L) = {lse_shape} "
                         f"(scaled_dot_product_attention(..., return_lse=True)), got shape "
                         f"{tuple(lse.shape)}")
    if not is_numba_device_array(lse):
        check_lse_values(lse)
    return checked[0], checked[1], lse


def check_lse_values(lse: np.ndarray) -> None:
    """The forward's lse is finite, or -inf for a row with no key: NaN or +inf is not one."""
    if np.isnan(lse).any() or np.isposinf(lse).any():
        bad = int(np.count_nonzero(np.isnan(lse) | np.isposinf(lse)))
        raise ValueError(f"lse has {bad} NaN or +inf entries: it must be the forward's "
                         f"log-sum-exp (finite, or -inf for a row with no key), as returned by "
                         f"scaled_dot_product_attention(..., return_lse=True)")


# --- decoding from a KV cache and packed variable-length batches --------------------------------

def check_int_count(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def check_lengths(value, name: str, B: int) -> np.ndarray:
    """An int or a (B,) integer array of lengths >= 0, as int64 (B,)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        lengths = np.full(B, int(value), np.int64)
    else:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an int or an integer array of shape ({B},), got "
                            f"dtype {arr.dtype}")
        if arr.shape != (B,):
            raise ValueError(f"{name} must be an int or an array of shape ({B},) (one length per "
                             f"batch row), got shape {arr.shape}")
        lengths = arr.astype(np.int64)
    if np.any(lengths < 0):
        raise ValueError(f"{name} must be >= 0, got {lengths.tolist()}")
    return lengths


@dataclass
class KVCacheArgs:
    """Checked ``attention_with_kvcache`` arguments; nothing written or copied yet."""
    q: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    k: np.ndarray | None
    v: np.ndarray | None
    old_lengths: np.ndarray   # int64 (B,): tokens in each row's cache before the call
    lengths: np.ndarray       # int64 (B,): n_b, the keys row b attends over
    block_table: np.ndarray | None  # int64 (B, max_blocks), paged caches only
    B: int
    Hq: int
    Hkv: int
    Lq: int
    E: int
    Ev: int
    group: int
    scale: float
    causal: bool
    left: int
    right: int
    softcap: float
    alibi: np.ndarray | None  # (B * Hq,) in the compute dtype
    in_dtype: np.dtype
    dtype: np.dtype

    @property
    def paged(self) -> bool:
        return self.block_table is not None


def _cache_array(x, name: str, writes: bool):
    if is_numba_device_array(x):  # (the cuda backend's; written on the device)
        check_float_dtype(x.dtype, name)
        if x.ndim != 4:
            raise ValueError(f"{name} must have 4 dims, (B, Hkv, S_max, E) or paged (num_blocks, "
                             f"Hkv, block_size, E), got shape {tuple(x.shape)}")
        return x
    if hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} is a GPU array; use backend='cuda' or 'auto' for device "
                        f"arrays")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (the cache is written in place), got "
                        f"{type(x).__name__}")
    check_float_dtype(x.dtype, name)
    if x.ndim != 4:
        raise ValueError(f"{name} must have 4 dims, (B, Hkv, S_max, E) or paged (num_blocks, "
                         f"Hkv, block_size, E), got shape {x.shape}")
    if writes and not x.flags.writeable:
        raise ValueError(f"{name} is read-only, but k and v are to be written into it")
    return x


def check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, is_causal, scale,
                  window, softcap, alibi_slopes, num_splits) -> KVCacheArgs:
    """Check everything before anything is written: a bad call leaves the caches untouched."""
    q = check_float_array(q, "q")
    if q.ndim != 4:
        raise ValueError(f"q must be (B, Hq, Lq, E), got shape {q.shape}")
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together (the new keys and their values), got "
                         f"k {'None' if k is None else np.shape(k)} and v "
                         f"{'None' if v is None else np.shape(v)}")
    writes = k is not None
    k_cache = _cache_array(k_cache, "k_cache", writes)
    v_cache = _cache_array(v_cache, "v_cache", writes)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache and v_cache must have the same dtype, got q {q.dtype}, "
                        f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    B, Hq, Lq, E = q.shape
    first, Hkv, slots, Ek = k_cache.shape
    Ev = v_cache.shape[3]
    if Ek != E:
        raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} must have the same feature "
                         f"size E")
    if E == 0:
        raise ValueError(f"q needs a feature size E >= 1, got shape {q.shape}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must agree in all "
                         f"but the last dim")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the cache's key/value "
                         f"heads Hkv={Hkv} (q {q.shape}, k_cache {k_cache.shape})")
    if block_table is None:
        if first != B:
            raise ValueError(f"k_cache {k_cache.shape} must have one row per query row, B={B} "
                             f"(q {q.shape}); a paged cache needs block_table")
        capacity = slots
        table = None
    else:
        table = np.asarray(block_table)
        if table.dtype.kind not in "iu":
            raise TypeError(f"block_table must be an integer array, got dtype {table.dtype}")
        if table.ndim != 2 or table.shape[0] != B:
            raise ValueError(f"block_table must be (B, max_blocks) = ({B}, ...), got shape "
                             f"{table.shape}")
        if slots == 0:
            raise ValueError(f"a paged k_cache needs a block size >= 1, got shape "
                             f"{k_cache.shape}")
        capacity = table.shape[1] * slots
        table = table.astype(np.int64)
    if writes:
        k = check_float_array(k, "k")
        v = check_float_array(v, "v")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k and v must have the dtype of q and the caches ({q.dtype}), got "
                            f"k {k.dtype}, v {v.dtype}")
        if k.shape != (B, Hkv, Lq, E) or v.shape != (B, Hkv, Lq, Ev):
            raise ValueError(f"k and v must be (B, Hkv, Lq, E) = {(B, Hkv, Lq, E)} and "
                             f"(B, Hkv, Lq, Ev) = {(B, Hkv, Lq, Ev)}, got k {k.shape}, "
                             f"v {v.shape}")
    old = check_lengths(cache_seqlens, "cache_seqlens", B)
    lengths = old + Lq if writes else old
    if np.any(lengths > capacity):
        what = "cache_seqlens + Lq" if writes else "cache_seqlens"
        where = (f"the block table's capacity max_blocks * block_size = {table.shape[1]} * "
                 f"{slots}" if table is not None else f"S_max = {capacity}")
        raise ValueError(f"{what} = {lengths.tolist()} exceeds {where}")
    if table is not None:
        used = np.arange(table.shape[1])[None, :] * slots < lengths[:, None]
        bad = used & ((table < 0) | (table >= first))
        if bad.any():
            b, i = map(int, np.argwhere(bad)[0])
            raise ValueError(f"block_table[{b}, {i}] = {table[b, i]} is out of range for a paged "
                             f"cache of {first} blocks (k_cache {k_cache.shape})")
        if writes:
            t = old[:, None] + np.arange(Lq)[None, :]
            slot = table[np.arange(B)[:, None], t // slots] * slots + t % slots
            if len(np.unique(slot)) != slot.size:
                raise ValueError("two batch rows would write their new keys into the same cache "
                                 "slot: their block_table entries share a block")
    causal = check_flag(is_causal, "is_causal")
    scale = check_scale(scale)
    if num_splits is not None:
        if check_int_count(num_splits, "num_splits") < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {num_splits}")
    left, right = check_window(window, causal)
    dtype = compute_dtype(q.dtype)
    return KVCacheArgs(q, k_cache, v_cache, k, v, old, lengths, table, B, Hq, Hkv, Lq, E, Ev,
                       Hq // Hkv, 1.0 / math.sqrt(E) if scale is None else scale, causal, left,
                       right, check_softcap(softcap), check_alibi(alibi_slopes, (B, Hq), dtype),
                       q.dtype, dtype)


def check_cu_seqlens(cu, name: str, total: int, total_name: str) -> np.ndarray:
    arr = np.asarray(cu)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int32 or int64 array, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must be 1-d with B + 1 entries, got shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {arr[0]}")
    if np.any(np.diff(arr) < 0):
        i = int(np.argmax(np.diff(arr) < 0))
        raise ValueError(f"{name} must not decrease, got {name}[{i}] = {arr[i]} > "
                         f"{name}[{i + 1}] = {arr[i + 1]}")
    if arr[-1] != total:
        raise ValueError(f"{name} must end at {total_name} = {total}, got {name}[-1] = "
                         f"{arr[-1]}")
    return arr


@dataclass
class VarlenArgs:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    cu_q: np.ndarray   # int64 (B + 1,)
    cu_k: np.ndarray
    B: int
    Hq: int
    Hkv: int
    E: int
    Ev: int
    group: int
    scale: float
    causal: bool
    alignment: str
    left: int
    right: int
    softcap: float
    alibi: np.ndarray | None  # (B * Hq,)
    in_dtype: np.dtype
    dtype: np.dtype


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, alignment, scale, window,
                 softcap, alibi_slopes) -> VarlenArgs:
    arrays = [check_float_array(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"))]
    q, k, v = arrays
    for name, arr in zip("qkv", arrays):
        if arr.ndim != 3:
            raise ValueError(f"{name} must be packed as (total, heads, features), got shape "
                             f"{tuple(arr.shape)}")
    if len({a.dtype for a in arrays}) != 1:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    total_q, Hq, E = q.shape
    total_k, Hkv, Ek = k.shape
    if Ek != E or E == 0:
        raise ValueError(f"q {q.shape} and k {k.shape} must have the same feature size E >= 1")
    if v.shape[:2] != (total_k, Hkv):
        raise ValueError(f"v {v.shape} must be (total_k, Hkv, Ev) = ({total_k}, {Hkv}, ...) "
                         f"like k {k.shape}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the key/value heads "
                         f"Hkv={Hkv} (q {q.shape}, k {k.shape})")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q, "total_q (q.shape[0])")
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k, "total_k (k.shape[0])")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same number of entries "
                         f"(B + 1), got {len(cu_q)} and {len(cu_k)}")
    B = len(cu_q) - 1
    causal = check_flag(is_causal, "is_causal")
    check_choice(alignment, "alignment", ALIGNMENTS)
    scale = check_scale(scale)
    left, right = check_window(window, causal)
    dtype = compute_dtype(q.dtype)
    return VarlenArgs(q, k, v, cu_q, cu_k, B, Hq, Hkv, E, v.shape[2], Hq // Hkv,
                      1.0 / math.sqrt(E) if scale is None else scale, causal, alignment, left,
                      right, check_softcap(softcap), check_alibi(alibi_slopes, (B, Hq), dtype), q.dtype,
                      dtype)
