"""Multi-head attention: NumPy projections around one fused SDPA call for every head.

    out = concat_h(attention(x Wq_h, m Wk_g, m Wv_g)) Wo,   g = h // (H // Hkv)

The input projections are single matrix products over all tokens (one product for q, k and v
together in self-attention), the heads are split with one copy into the (B, H, L, D) layout the
kernels read, and all heads go through one call of the backend's fused attention kernel
(grouped-query heads share key/value heads without a copy).

Masks follow this package's SDPA convention, which differs from ``torch.nn.MultiheadAttention``:
a bool ``attn_mask`` is True where the key *takes part* (PyTorch: True = masked out). The
``key_padding_mask`` keeps PyTorch's convention: True = padding, ignored.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from . import _backends, _prepare
from ._api import attention_weights, scaled_dot_product_attention

__all__ = ["MultiHeadAttention", "multi_head_attention"]

_LAYER_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --- checks ------------------------------------------------------------------------------------

def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _check_heads(num_heads, num_kv_heads) -> tuple[int, int]:
    num_heads = _check_positive_int(num_heads, "num_heads")
    num_kv_heads = num_heads if num_kv_heads is None else \
        _check_positive_int(num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads="
                         f"{num_kv_heads} (each key/value head serves a group of query heads)")
    return num_heads, num_kv_heads


def _check_weight(w, name: str, ndim: int, dtype) -> np.ndarray:
    if w is None:
        return None
    arr = _prepare.check_float_array(w, name)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dim{'s' * (ndim > 1)}, got shape {arr.shape}")
    return np.asarray(arr, dtype)


def _check_inputs(query, key, value, batch_first):
    """Arrays of one dtype and rank 2 (unbatched) or 3; key defaults to query, value to key."""
    if key is None and value is not None:
        raise ValueError("value was given without key; pass key too (key and value default to "
                         "query only together)")
    query = _prepare.check_float_array(query, "query")
    key = query if key is None else _prepare.check_float_array(key, "key")
    value = key if value is None else _prepare.check_float_array(value, "value")
    arrays = {"query": query, "key": key, "value": value}
    if len({a.dtype for a in arrays.values()}) != 1:
        got = ", ".join(f"{n} {a.dtype}" for n, a in arrays.items())
        raise TypeError(f"query, key and value must have the same dtype, got {got}")
    layout = "(B, L, E)" if batch_first else "(L, B, E)"
    for name, arr in arrays.items():
        if arr.ndim not in (2, 3):
            raise ValueError(f"{name} must be {layout} (batch_first={batch_first}) or unbatched "
                             f"(L, E), got shape {arr.shape}")
    if len({a.ndim for a in arrays.values()}) != 1:
        got = ", ".join(f"{n} {a.shape}" for n, a in arrays.items())
        raise ValueError(f"query, key and value must all be batched or all unbatched, got {got}")
    batched = query.ndim == 3
    batch_axis = 0 if batch_first or not batched else 1
    seq_axis = 1 - batch_axis if batched else 0
    if batched and not query.shape[batch_axis] == key.shape[batch_axis] == value.shape[batch_axis]:
        raise ValueError(f"query {query.shape}, key {key.shape} and value {value.shape} must have "
                         f"the same batch size (axis {batch_axis}, batch_first={batch_first})")
    if key.shape[seq_axis] != value.shape[seq_axis]:
        raise ValueError(f"key {key.shape} and value {value.shape} must have the same sequence "
                         f"length S (axis {seq_axis})")
    return query, key, value, batched, batch_axis


def _check_features(arr, name, weight, weight_name):
    if arr.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} has {arr.shape[-1]} features (shape {arr.shape}) but "
                         f"{weight_name} of shape {weight.shape} takes {weight.shape[1]}")


def _combined_mask(attn_mask, key_padding_mask, B, H, L, S, batched, dtype):
    """attn_mask and key_padding_mask as one SDPA mask (bool True = takes part, or float added),
    broadcastable to (B, H, L, S); None when neither is given.

    The mask is only as large as its inputs need: a padding mask alone stays (B, 1, 1, S); with
    an (L, S) attn_mask the two make (B, 1, L, S).
    """
    mask = None
    if attn_mask is not None:
        target = (B, H, L, S) if batched else (H, L, S)
        desc = "attention weights (B, num_heads, L, S)" if batched else \
            "attention weights (num_heads, L, S) of unbatched input"
        try:
            mask = _prepare.check_mask(attn_mask, "attn_mask", target, desc)
        except ValueError as exc:
            shape = np.shape(attn_mask)
            if batched and len(shape) == 3 and shape[0] == B * H and B > 1:
                raise ValueError(
                    f"{exc}; a (B*num_heads, L, S) mask is PyTorch's layout: pass "
                    f"attn_mask.reshape({B}, {H}, {L}, {S}) (and note a bool mask here is True "
                    f"where the key takes part, the opposite of PyTorch)") from None
            raise
    if key_padding_mask is None:
        return mask
    pad = np.asarray(key_padding_mask)
    if pad.dtype != np.bool_ and pad.dtype.kind != "f":
        raise TypeError(f"key_padding_mask must be a bool array (True = padding, ignored) or a "
                        f"float array (added to the scores), got dtype {pad.dtype}")
    expected = (B, S) if batched else (S,)
    if pad.shape != expected:
        want = "(B, S)" if batched else "(S,) for unbatched input"
        raise ValueError(f"key_padding_mask must have shape {want} = {expected}, got {pad.shape}")
    pad = pad.reshape(B, 1, 1, S)
    if pad.dtype == np.bool_:
        keep = ~pad
        if mask is None:
            return keep
        if mask.dtype == np.bool_:
            return mask & keep
        return np.where(keep, mask.astype(dtype), dtype.type(-np.inf))
    pad = pad.astype(dtype)
    if mask is None:
        return pad
    if mask.dtype == np.bool_:
        return np.where(mask, pad, dtype.type(-np.inf))
    return mask.astype(dtype) + pad


# --- the computation ---------------------------------------------------------------------------

@dataclass
class _Projections:
    """Weights in the compute dtype, rows = heads * head_dim. ``packed_w`` (and ``packed_b``),
    when not None, is [q_w; k_w; v_w] in one C-contiguous array, whose row slices q_w, k_w, v_w
    are: self-attention then projects with one matrix product, and shared key/value with one."""
    q_w: np.ndarray
    k_w: np.ndarray
    v_w: np.ndarray
    out_w: np.ndarray
    q_b: np.ndarray | None = None
    k_b: np.ndarray | None = None
    v_b: np.ndarray | None = None
    out_b: np.ndarray | None = None
    packed_w: np.ndarray | None = None
    packed_b: np.ndarray | None = None


# Rows per BLAS product on Numba's threads: big enough that packing the weight, which every
# product does afresh, stays a small part of it, small enough for 8 blocks at 4096 tokens. A
# function of the row count only (never of the threads), so results do not depend on them.
LINEAR_MIN_ROWS = 64
LINEAR_MAX_ROWS = 512
LINEAR_BLOCKS = 8


def linear_block_rows(n: int) -> int:
    return max(LINEAR_MIN_ROWS, min(LINEAR_MAX_ROWS, -(-n // LINEAR_BLOCKS)))


def _linear(x2d: np.ndarray, w: np.ndarray, b: np.ndarray | None,
            on_numba: bool = False) -> np.ndarray:
    """x2d @ w.T (+ b); ``on_numba``: on Numba's threads (see kernels/cpu/linear.py)."""
    if not on_numba or not x2d.size or not w.size:
        y = x2d @ w.T
        if b is not None:
            y += b
        return y
    from . import _blas, _numba
    from .kernels.cpu.linear import linear

    x2d, w = np.ascontiguousarray(x2d), np.ascontiguousarray(w)
    bias = np.zeros(1, x2d.dtype) if b is None else np.ascontiguousarray(b)
    out = np.empty((x2d.shape[0], w.shape[0]), x2d.dtype)
    _numba._kernels()  # starts Numba's threads and quiets the other pools, as for a kernel
    with _numba._lock, _blas.single_threaded_blas():
        linear(_numba._readonly(x2d), _numba._readonly(w), _numba._readonly(bias),
               b is not None, linear_block_rows(x2d.shape[0]), out)
    return out


def _project(x_q, x_k, x_v, p: _Projections, on_numba: bool = False):
    """The q, k, v projections of (tokens, features) inputs, as few matrix products as possible."""
    nq, nk = p.q_w.shape[0], p.k_w.shape[0]
    if p.packed_w is not None and x_q is x_k and x_k is x_v:  # self-attention
        y = _linear(x_q, p.packed_w, p.packed_b, on_numba)
        return y[:, :nq], y[:, nq:nq + nk], y[:, nq + nk:]
    q = _linear(x_q, p.q_w, p.q_b, on_numba)
    if p.packed_w is not None and x_k is x_v:  # one memory for key and value
        y = _linear(x_k, p.packed_w[nq:], None if p.packed_b is None else p.packed_b[nq:],
                    on_numba)
        return q, y[:, :nk], y[:, nk:]
    return q, _linear(x_k, p.k_w, p.k_b, on_numba), _linear(x_v, p.v_w, p.v_b, on_numba)


def _forward(query, key, value, p: _Projections, num_heads, num_kv_heads, *, key_padding_mask,
             attn_mask, is_causal, need_weights, average_attn_weights, batch_first, backend,
             variants):
    """Checked multi-head attention; see :func:`multi_head_attention`."""
    _prepare.check_choice(backend, "backend", _backends.CHOICES)
    is_causal = _prepare.check_flag(is_causal, "is_causal")
    need_weights = _prepare.check_flag(need_weights, "need_weights")
    average_attn_weights = _prepare.check_flag(average_attn_weights, "average_attn_weights")
    query, key, value, batched, batch_axis = _check_inputs(query, key, value, batch_first)
    _check_features(query, "query", p.q_w, "the query projection")
    _check_features(key, "key", p.k_w, "the key projection")
    _check_features(value, "value", p.v_w, "the value projection")
    in_dtype = query.dtype
    dtype = _prepare.compute_dtype(in_dtype)
    if batched:
        B, L, S = query.shape[batch_axis], query.shape[1 - batch_axis], key.shape[1 - batch_axis]
    else:
        B, L, S = 1, query.shape[0], key.shape[0]
    mask = _combined_mask(attn_mask, key_padding_mask, B, num_heads, L, S, batched, dtype)

    # Tokens as rows, in the input's own layout: (B*L, E) or (L*B, E), a view when contiguous.
    # Self-attention passes the same array three times, so _project fuses its products.
    flat = {}
    for x in (query, key, value):
        if id(x) not in flat:
            flat[id(x)] = np.asarray(x, dtype).reshape(-1, x.shape[-1])
    # On the numba backend the products run on Numba's threads too: one pool for the layer.
    on_numba = _backends.resolve(backend, query, key, value) == "numba"
    q, k, v = _project(flat[id(query)], flat[id(key)], flat[id(value)], p, on_numba)

    # (tokens, heads * D) -> (B, heads, T, D), C-contiguous: the one copy the kernel needs.
    order = (1, 2, 0, 3) if batch_axis == 1 else (0, 2, 1, 3)

    def to_heads(y, T, heads):
        lead = (T, B) if batch_axis == 1 else (B, T)
        return np.ascontiguousarray(y.reshape(*lead, heads, y.shape[1] // heads).transpose(order))

    q, k, v = to_heads(q, L, num_heads), to_heads(k, S, num_kv_heads), to_heads(v, S, num_kv_heads)
    gqa = num_kv_heads != num_heads
    heads = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa,
                                         backend=backend, **variants)  # (B, H, L, Dv)

    # Concatenate the heads back into the input's layout and project.
    back = (2, 0, 1, 3) if batch_axis == 1 else (0, 2, 1, 3)
    concat = heads.transpose(back).reshape(-1, heads.shape[1] * heads.shape[3])
    out = _linear(concat, p.out_w, p.out_b, on_numba)
    out = out.reshape(query.shape[:-1] + (out.shape[-1],)).astype(in_dtype, copy=False)

    weights = None
    if need_weights:
        weights = attention_weights(q, k, mask, is_causal, enable_gqa=gqa, backend=backend,
                                    **variants)
        if average_attn_weights:
            weights = weights.mean(axis=1)
        if not batched:
            weights = weights[0]
        weights = weights.astype(in_dtype, copy=False)
    return out, weights


def multi_head_attention(query, key, value, num_heads: int, q_weight, k_weight, v_weight,
                         out_weight, q_bias=None, k_bias=None, v_bias=None, out_bias=None, *,
                         num_kv_heads: int | None = None, key_padding_mask=None, attn_mask=None,
                         is_causal: bool = False, need_weights: bool = False,
                         average_attn_weights: bool = True, batch_first: bool = True,
                         alignment: str = "top_left", window=None, softcap=None,
                         alibi_slopes=None, backend: str = "auto"):
    """Multi-head attention with the given weights (the functional form of
    :class:`MultiHeadAttention`).

    Weights are ``(out_features, in_features)`` as in ``torch.nn.Linear`` (y = x @ W.T + b);
    head h owns features ``h*D:(h+1)*D`` of the projections and uses key/value head
    ``h // (num_heads // num_kv_heads)``.

    Args:
        query: (B, L, E) (``batch_first``), (L, B, E) (not ``batch_first``) or unbatched (L, E).
        key: (B, S, Ek) in the same layout; None means ``query`` (self-attention).
        value: (B, S, Ev); None means ``key``.
        num_heads: H, the number of query heads.
        q_weight: (H*D, E). k_weight: (Hkv*D, Ek). v_weight: (Hkv*Dv, Ev). out_weight: (Eo, H*Dv).
        q_bias, k_bias, v_bias, out_bias: matching 1-d biases, or None.
        num_kv_heads: Hkv, the number of key/value heads (default H; 1 = multi-query).
        key_padding_mask: (B, S) ((S,) unbatched); bool True = padding (PyTorch's convention),
            or float, added to the scores of key s.
        attn_mask: bool (True = the key *takes part*, the opposite of PyTorch's MHA) or float
            (added to the scores), broadcastable to (B, H, L, S) ((H, L, S) unbatched).
        is_causal: query i sees keys j <= i (top-left aligned); combines with both masks.
        need_weights: also return the attention weights.
        average_attn_weights: average the weights over the heads.
        batch_first: whether batched input is (B, L, E) or (L, B, E).
        alignment, window, softcap, alibi_slopes: the attention variants, as in
            :func:`fastattn.scaled_dot_product_attention` (``alibi_slopes`` broadcast to
            (B, H), e.g. (H,)).
        backend: the backend of the attention kernel: ``"auto"``, ``"numpy"``, ``"numba"`` or
            ``"cuda"``; the projections are NumPy matrix products on the host.

    Returns:
        ``(out, weights)``: out in the query's layout with Eo features, in the query's dtype
        (weights are cast to it; float16 is computed in float32); weights is None unless
        ``need_weights``, then (B, L, S) averaged or (B, H, L, S) ((L, S) or (H, L, S)
        unbatched). A query row with no key taking part attends to nothing: its heads are zeros
        and its output is ``out_bias`` (PyTorch gives NaN), its weights zeros.

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((2, 10, 16), dtype=np.float32)
        >>> wq, wk, wv, wo = (rng.standard_normal((16, 16), dtype=np.float32) / 4 for _ in range(4))
        >>> out, _ = fastattn.multi_head_attention(x, x, x, 4, wq, wk, wv, wo, is_causal=True)
        >>> out.shape
        (2, 10, 16)
    """
    num_heads, num_kv_heads = _check_heads(num_heads, num_kv_heads)
    batch_first = _prepare.check_flag(batch_first, "batch_first")
    dtype = _prepare.compute_dtype(_prepare.check_float_array(query, "query").dtype)
    weights = {name: _check_weight(w, name, ndim, dtype) for name, w, ndim in (
        ("q_weight", q_weight, 2), ("k_weight", k_weight, 2), ("v_weight", v_weight, 2),
        ("out_weight", out_weight, 2), ("q_bias", q_bias, 1), ("k_bias", k_bias, 1),
        ("v_bias", v_bias, 1), ("out_bias", out_bias, 1))}
    for name in ("q_weight", "k_weight", "v_weight", "out_weight"):
        if weights[name] is None:
            raise TypeError(f"{name} is required, got None")
    q_w, k_w, v_w, out_w = (weights[n] for n in ("q_weight", "k_weight", "v_weight", "out_weight"))
    if q_w.shape[0] % num_heads:
        raise ValueError(f"q_weight {q_w.shape} must have num_heads * head_dim rows; "
                         f"{q_w.shape[0]} is not a multiple of num_heads={num_heads}")
    D = q_w.shape[0] // num_heads
    if k_w.shape[0] != num_kv_heads * D:
        raise ValueError(f"k_weight {k_w.shape} must have num_kv_heads * head_dim = "
                         f"{num_kv_heads} * {D} = {num_kv_heads * D} rows (head_dim from "
                         f"q_weight {q_w.shape} and num_heads={num_heads})")
    if v_w.shape[0] % num_kv_heads:
        raise ValueError(f"v_weight {v_w.shape} must have num_kv_heads * value_head_dim rows; "
                         f"{v_w.shape[0]} is not a multiple of num_kv_heads={num_kv_heads}")
    Dv = v_w.shape[0] // num_kv_heads
    if out_w.shape[1] != num_heads * Dv:
        raise ValueError(f"out_weight {out_w.shape} must take num_heads * value_head_dim = "
                         f"{num_heads} * {Dv} = {num_heads * Dv} features (value_head_dim from "
                         f"v_weight {v_w.shape})")
    for b_name, w_name in (("q_bias", "q_weight"), ("k_bias", "k_weight"),
                           ("v_bias", "v_weight"), ("out_bias", "out_weight")):
        b, w = weights[b_name], weights[w_name]
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"{b_name} must have shape ({w.shape[0]},) to match {w_name} "
                             f"{w.shape}, got {b.shape}")
    p = _Projections(q_w, k_w, v_w, out_w, weights["q_bias"], weights["k_bias"],
                     weights["v_bias"], weights["out_bias"])
    return _forward(query, key, value, p, num_heads, num_kv_heads,
                    key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                    need_weights=need_weights, average_attn_weights=average_attn_weights,
                    batch_first=batch_first, backend=backend,
                    variants=dict(alignment=alignment, window=window, softcap=softcap,
                                  alibi_slopes=alibi_slopes))


# --- the layer ---------------------------------------------------------------------------------

def _as_numpy(x) -> np.ndarray:
    """A NumPy array from an array-like or a torch tensor (duck typed, no torch import)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class MultiHeadAttention:
    """Multi-head attention with grouped-query heads, a NumPy drop-in for
    ``torch.nn.MultiheadAttention`` (inference only: no dropout, no ``add_bias_kv``).

    Args:
        embed_dim: E, the query features and the output features.
        num_heads: H; E must be a multiple of it (head_dim D = E // H).
        num_kv_heads: Hkv, key/value heads (default H); H must be a multiple of it. Fewer gives
            grouped-query attention, 1 multi-query attention (PyTorch's layer has neither).
        bias: whether the input and output projections have biases.
        kdim, vdim: the features of key and value (default E).
        batch_first: batched input is (B, L, E) if True (the default here), else (L, B, E).
        dtype: float32 or float64, the dtype of the weights.
        seed: None, an int or a ``numpy.random.Generator`` for the initial weights.

    Weights are initialised as PyTorch does: Xavier-uniform on ``in_proj_weight`` (on each of
    ``q/k/v_proj_weight`` when they are separate), out_proj.weight uniform in
    ±1/sqrt(E), biases zero. They are NumPy arrays exchanged through :meth:`state_dict` and
    :meth:`load_state_dict` with PyTorch's names and shapes, so a PyTorch layer's weights give
    the same outputs here.

    With ``num_kv_heads < num_heads`` there is no PyTorch equivalent; the state dict then uses
    the separate-weights layout: ``q_proj_weight`` (E, E), ``k_proj_weight`` (Hkv*D, kdim),
    ``v_proj_weight`` (Hkv*D, vdim), ``in_proj_bias`` (E + 2*Hkv*D,) packed [q; k; v],
    ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,). Query head h uses key/value head
    h // (H // Hkv).

    Masks: a bool ``attn_mask`` is True where the key takes part (PyTorch's layer: True =
    masked out, so pass ``~torch_mask``); a float one is added to the scores. It broadcasts
    to (B, H, L, S) (PyTorch's 3-d (B*H, L, S) layout: reshape it to (B, H, L, S)).
    ``key_padding_mask`` keeps PyTorch's convention, True = padding. A query row that no key
    takes part in gives zeros from the attention, so the layer returns ``out_proj.bias`` there
    (PyTorch returns NaN).

    Example:
        >>> import numpy as np, fastattn
        >>> layer = fastattn.MultiHeadAttention(64, 8, num_kv_heads=2, seed=0)
        >>> x = np.random.default_rng(1).standard_normal((4, 100, 64), dtype=np.float32)
        >>> pad = np.zeros((4, 100), bool); pad[:, 90:] = True     # the last 10 keys are padding
        >>> out, w = layer(x, key_padding_mask=pad, is_causal=True, need_weights=True)
        >>> out.shape, w.shape
        ((4, 100, 64), (4, 100, 100))
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 bias: bool = True, kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = True, dtype=np.float32, seed=None):
        self.embed_dim = _check_positive_int(embed_dim, "embed_dim")
        self.num_heads, self.num_kv_heads = _check_heads(num_heads, num_kv_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads="
                             f"{self.num_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        self.kdim = self.embed_dim if kdim is None else _check_positive_int(kdim, "kdim")
        self.vdim = self.embed_dim if vdim is None else _check_positive_int(vdim, "vdim")
        self.bias = _prepare.check_flag(bias, "bias")
        self.batch_first = _prepare.check_flag(batch_first, "batch_first")
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            self.dtype = None
        if self.dtype not in _LAYER_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}")
        if seed is not None and not isinstance(seed, np.random.Generator) and (
                isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be None, an int or a numpy.random.Generator, got "
                            f"{type(seed).__name__}")
        # Storage: one packed [q; k; v] weight when they all take E features (so self-attention
        # projects with one matrix product), else three.
        self._packed = self.kdim == self.vdim == self.embed_dim
        self._params: dict[str, np.ndarray] = {}
        self._init_weights(np.random.default_rng(seed))

    # --- weights --------------------------------------------------------------------------------

    @property
    def _kv_rows(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def _torch_packed(self) -> bool:
        """Whether the state dict uses PyTorch's packed ``in_proj_weight``."""
        return self._packed and self.num_kv_heads == self.num_heads

    def _expected_shapes(self) -> dict[str, tuple]:
        E, kv = self.embed_dim, self._kv_rows
        shapes = {}
        if self._torch_packed:
            shapes["in_proj_weight"] = (3 * E, E)
        else:
            shapes.update(q_proj_weight=(E, E), k_proj_weight=(kv, self.kdim),
                          v_proj_weight=(kv, self.vdim))
        if self.bias:
            shapes["in_proj_bias"] = (E + 2 * kv,)
        shapes["out_proj.weight"] = (E, E)
        if self.bias:
            shapes["out_proj.bias"] = (E,)
        return shapes

    def _init_weights(self, rng: np.random.Generator) -> None:
        def xavier_uniform(shape):
            bound = np.sqrt(6.0 / (shape[0] + shape[1]))
            return rng.uniform(-bound, bound, shape)

        d = {}
        for name, shape in self._expected_shapes().items():
            if name == "out_proj.weight":  # torch.nn.Linear's kaiming_uniform(a=sqrt(5))
                bound = 1.0 / np.sqrt(shape[1])
                d[name] = rng.uniform(-bound, bound, shape)
            elif name.endswith("weight"):
                d[name] = xavier_uniform(shape)
            else:
                d[name] = np.zeros(shape)
        self._store(d)

    def _store(self, d: dict[str, np.ndarray]) -> None:
        """Keep checked state-dict arrays as fresh C-contiguous arrays in the layer's dtype."""
        p = {}
        if self._packed:
            p["in_proj_weight"] = np.array(
                d["in_proj_weight"] if "in_proj_weight" in d else
                np.concatenate([d["q_proj_weight"], d["k_proj_weight"], d["v_proj_weight"]]),
                self.dtype, order="C")
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p[name] = np.array(d[name], self.dtype, order="C")
        for name in ("in_proj_bias", "out_proj.weight", "out_proj.bias"):
            if name in d:
                p[name] = np.array(d[name], self.dtype, order="C")
        self._params = p

    def _rows(self, part: int) -> np.ndarray:
        E, kv = self.embed_dim, self._kv_rows
        start, stop = ((0, E), (E, E + kv), (E + kv, E + 2 * kv))[part]
        return self._params["in_proj_weight"][start:stop]

    @property
    def in_proj_weight(self) -> np.ndarray | None:
        """(E + 2*Hkv*D, E), the packed [q; k; v] weight, or None when kdim/vdim differ from E."""
        return self._params.get("in_proj_weight")

    @property
    def q_proj_weight(self) -> np.ndarray:
        """(E, E); a view of ``in_proj_weight`` when packed."""
        return self._rows(0) if self._packed else self._params["q_proj_weight"]

    @property
    def k_proj_weight(self) -> np.ndarray:
        """(Hkv*D, kdim); a view of ``in_proj_weight`` when packed."""
        return self._rows(1) if self._packed else self._params["k_proj_weight"]

    @property
    def v_proj_weight(self) -> np.ndarray:
        """(Hkv*D, vdim); a view of ``in_proj_weight`` when packed."""
        return self._rows(2) if self._packed else self._params["v_proj_weight"]

    @property
    def in_proj_bias(self) -> np.ndarray | None:
        """(E + 2*Hkv*D,), the packed [q; k; v] bias, or None without bias."""
        return self._params.get("in_proj_bias")

    @property
    def out_proj_weight(self) -> np.ndarray:
        """(E, E)."""
        return self._params["out_proj.weight"]

    @property
    def out_proj_bias(self) -> np.ndarray | None:
        """(E,), or None without bias."""
        return self._params.get("out_proj.bias")

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the weights under ``torch.nn.MultiheadAttention``'s names and shapes.

        ``in_proj_weight`` (3E, E) when kdim = vdim = E and num_kv_heads = num_heads, else
        ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``; then ``in_proj_bias``,
        ``out_proj.weight``, ``out_proj.bias`` (no biases with ``bias=False``).
        """
        views = {"in_proj_weight": self.in_proj_weight, "q_proj_weight": self.q_proj_weight,
                 "k_proj_weight": self.k_proj_weight, "v_proj_weight": self.v_proj_weight,
                 "in_proj_bias": self.in_proj_bias, "out_proj.weight": self.out_proj_weight,
                 "out_proj.bias": self.out_proj_bias}
        return {name: views[name].copy() for name in self._expected_shapes()}

    def load_state_dict(self, state_dict) -> None:
        """Load weights named and shaped as :meth:`state_dict` gives them (NumPy arrays,
        array-likes or torch tensors); they are copied and cast to the layer's dtype.

        Raises:
            ValueError: missing or unexpected names, or wrong shapes; the message lists what
                this layer expects.
            TypeError: a value that is not a float array.
        """
        expected = self._expected_shapes()
        listing = ", ".join(f"{n} {s}" for n, s in expected.items())
        names = set(state_dict)
        missing = [n for n in expected if n not in names]
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            got = []
            if missing:
                got.append(f"missing {', '.join(missing)}")
            if unexpected:
                got.append(f"unexpected {', '.join(map(str, unexpected))}")
            raise ValueError(f"state_dict does not fit {self!r}: {'; '.join(got)}. "
                             f"Expected exactly: {listing}")
        arrays = {}
        for name, shape in expected.items():
            arr = _as_numpy(state_dict[name])
            if arr.dtype.kind != "f":
                raise TypeError(f"state_dict[{name!r}] must be a float array, got dtype "
                                f"{arr.dtype}")
            if arr.shape != shape:
                raise ValueError(f"state_dict[{name!r}] has shape {arr.shape}, expected {shape}. "
                                 f"Expected exactly: {listing}")
            arrays[name] = arr
        self._store(arrays)

    # --- forward --------------------------------------------------------------------------------

    def _projections(self, dtype) -> _Projections:
        def cast(a):
            return None if a is None else np.asarray(a, dtype)

        # Cast once (no copy in the layer's dtype); the q, k, v parts are row slices of it.
        E, kv = self.embed_dim, self._kv_rows
        parts = (slice(0, E), slice(E, E + kv), slice(E + kv, None))
        b = cast(self.in_proj_bias)
        qb, kb, vb = (None,) * 3 if b is None else (b[s] for s in parts)
        if self._packed:
            w = cast(self.in_proj_weight)
            qw, kw, vw = (w[s] for s in parts)
        else:
            w = None
            qw, kw, vw = (cast(x) for x in (self.q_proj_weight, self.k_proj_weight,
                                            self.v_proj_weight))
        return _Projections(qw, kw, vw, cast(self.out_proj_weight), qb, kb, vb,
                            cast(self.out_proj_bias), packed_w=w, packed_b=b)

    def __call__(self, query, key=None, value=None, *, key_padding_mask=None, attn_mask=None,
                 is_causal: bool = False, need_weights: bool = False,
                 average_attn_weights: bool = True, alignment: str = "top_left", window=None,
                 softcap=None, alibi_slopes=None, backend: str = "auto"):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, L, E) (``batch_first``), (L, B, E) (not ``batch_first``) or unbatched
                (L, E).
            key: (B, S, kdim) in the same layout; None means ``query`` (self-attention).
            value: (B, S, vdim); None means ``key``.
            key_padding_mask: (B, S) ((S,) unbatched); bool True = padding, or float, added.
            attn_mask: bool True = takes part (the opposite of PyTorch's bool mask), or float,
                added; broadcastable to (B, H, L, S) ((H, L, S) unbatched).
            is_causal: query i sees keys j <= i (top-left); combines with both masks.
            need_weights: also return the attention weights.
            average_attn_weights: average them over the heads.
            alignment, window, softcap, alibi_slopes: the attention variants, as in
                :func:`fastattn.scaled_dot_product_attention`.
            backend: the attention kernel's backend (``"auto"``, ``"numpy"``, ``"numba"``,
                ``"cuda"``).

        Returns:
            ``(out, weights)``: out like ``query`` with E features, in the query's dtype
            (computed in it, the weights cast to it); weights None unless ``need_weights``,
            then (B, L, S), or (B, H, L, S) when not averaged (no batch dim when unbatched).
        """
        query_dtype = _prepare.compute_dtype(_prepare.check_float_array(query, "query").dtype)
        return _forward(query, key, value, self._projections(query_dtype), self.num_heads,
                        self.num_kv_heads, key_padding_mask=key_padding_mask,
                        attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights,
                        average_attn_weights=average_attn_weights,
                        batch_first=self.batch_first, backend=backend,
                        variants=dict(alignment=alignment, window=window, softcap=softcap,
                                      alibi_slopes=alibi_slopes))

    forward = __call__

    def __repr__(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("kdim", "vdim")
                        if getattr(self, n) != self.embed_dim)
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}{extra}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dtype={self.dtype.name})")
