"""The NumPy reference: slow, plain and obviously right.

Every backend is tested against these functions. They compute in the dtype of their inputs (pass
float64 arrays for an oracle) and read like the maths:

    scores  = similarity(q, k) * scale  (+ float mask, or -inf where a bool mask is False)
    weights = softmax(scores)           (a row with no key taking part gives zeros)
    out     = weights @ v
    lse     = log(sum(exp(scores)))     (-inf for a row with no key taking part)

The variants of current models fit in the same lines: query row i sits at position p(i) among the
keys (p(i) = i top-left, i + S - L bottom-right), and

    scores  = softcap * tanh(scores / softcap)           (softcap, right after the scale)
    keep    = p(i) - left <= j <= p(i) + right            (window; causal is right = 0)
    scores -= slope * |p(i) - j|                          (ALiBi, one slope per query head)

The backward pass (``scaled_dot_product_attention_backward``) is the gradient of
sum(grad_out * out), from the forward's own out and lse (FlashAttention-2's formulas):

    weights = exp(scores - lse)                           (recomputed, not stored)
    grad_v  = weights^T grad_out
    D       = rowsum(grad_out * out)                      (= rowsum(weights * grad_weights))
    grad_s  = weights * (grad_out v^T - D)                (the softmax's backward)
    grad_s *= 1 - tanh^2(raw / softcap)                   (softcap: raw = similarity * scale)
    grad_q  = scale grad_s k,    grad_k = scale grad_s^T q

with cosine similarity's normalisation chained in after; masks and ALiBi slopes take no gradient.

They take the same arguments as the public API but do not validate them; call the public
functions with ``backend="numpy"`` for checked input and the package's dtype policy.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "positions",
    "keys_seen",
    "alibi_bias",
    "merge_attention",
    "similarity",
    "softmax",
    "attention_weights",
    "scaled_dot_product_attention",
    "multi_head_attention",
    "scaled_dot_product_attention_backward",
    "flex_attention",
    "flex_grid",
    "block_mask_keep",
    "attention_with_kvcache",
    "varlen_attention",
]


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ np.swapaxes(b, -1, -2)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    # A zero vector stays zero, so its cosine similarity with anything is 0, never NaN.
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.where(norm == 0, 1, norm)


def similarity(a: np.ndarray, b: np.ndarray, kind: str = "dot") -> np.ndarray:
    """Similarity of every row of ``a`` (..., La, E) with every row of ``b`` (..., Lb, E)."""
    if kind == "dot":
        return _dot(a, b)
    if kind == "scaled_dot":
        return _dot(a, b) / np.sqrt(np.asarray(a.shape[-1], dtype=a.dtype))
    if kind == "cosine":
        return _dot(_unit_rows(a), _unit_rows(b))
    raise ValueError(f"unknown kind {kind!r}")


def softmax(x: np.ndarray, axis: int = -1, *, mask: np.ndarray | None = None) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)) along ``axis``; masked-out (False) entries weigh 0."""
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    row_max = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    # A row with nothing kept has max -inf; subtracting 0 instead keeps exp(-inf) = 0, not NaN.
    row_max = np.where(np.isneginf(row_max), 0, row_max)
    e = np.exp(x - row_max)
    row_sum = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(row_sum == 0, 1, row_sum)


def positions(L: int, S: int, alignment: str = "top_left") -> np.ndarray:
    """p(i), the position of each query row among the S keys: i (top-left) or i + S - L
    (bottom-right: the last query sits on the last key)."""
    return np.arange(L) + (0 if alignment == "top_left" else S - L)


def keys_seen(L: int, S: int, is_causal=False, alignment="top_left", window=None) -> np.ndarray:
    """The (L, S) bool pattern of causal attention and the window: True where key j takes part
    in row i (before any mask)."""
    p = positions(L, S, alignment)[:, None]
    j = np.arange(S)[None, :]
    keep = np.ones((L, S), dtype=bool)
    if is_causal:
        keep &= j <= p
    if window is not None:
        left, right = window
        if left is not None:
            keep &= j >= p - left
        if right is not None:
            keep &= j <= p + right
    return keep


def alibi_bias(alibi_slopes, L: int, S: int, alignment="top_left", dtype=np.float64):
    """-slope * |p(i) - j| of shape (*slopes.shape, L, S)."""
    distance = np.abs(positions(L, S, alignment)[:, None] - np.arange(S)[None, :])
    slopes = np.asarray(alibi_slopes, dtype=dtype)[..., None, None]
    return -slopes * distance.astype(dtype)


def _scores(query, key, attn_mask, is_causal, scale, enable_gqa, similarity_kind,
            alignment="top_left", window=None, softcap=None, alibi_slopes=None):
    if enable_gqa and query.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = np.repeat(key, group, axis=-3)
    if scale is None:
        scale = 1.0 if similarity_kind == "cosine" else 1.0 / math.sqrt(query.shape[-1])
    kind = "cosine" if similarity_kind == "cosine" else "dot"
    scores = similarity(query, key, kind) * np.asarray(scale, dtype=query.dtype)
    if softcap:
        cap = np.asarray(softcap, dtype=scores.dtype)
        scores = cap * np.tanh(scores / cap)
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, -np.inf)
        else:
            scores = scores + attn_mask.astype(scores.dtype)
    L, S = scores.shape[-2:]
    if is_causal or window is not None:
        scores = np.where(keys_seen(L, S, is_causal, alignment, window), scores, -np.inf)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, L, S, alignment, scores.dtype)
    return scores


def attention_weights(query, key, attn_mask=None, is_causal=False, scale=None,
                      enable_gqa=False, *, similarity="dot", alignment="top_left", window=None,
                      softcap=None, alibi_slopes=None) -> np.ndarray:
    """softmax(scores) of shape (..., Hq, L, S)."""
    return softmax(_scores(query, key, attn_mask, is_causal, scale, enable_gqa, similarity,
                           alignment, window, softcap, alibi_slopes))


def _logsumexp(scores: np.ndarray) -> np.ndarray:
    row_max = np.max(scores, axis=-1, initial=-np.inf)
    finite_max = np.where(np.isneginf(row_max), 0, row_max)
    with np.errstate(divide="ignore"):  # log(0) = -inf is the answer for a fully masked row
        return finite_max + np.log(np.sum(np.exp(scores - finite_max[..., None]), axis=-1))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 similarity="dot", return_lse=False, alignment="top_left",
                                 window=None, softcap=None, alibi_slopes=None):
    """softmax(q k^T * scale + mask) v, shapes (..., L, E), (..., S, E), (..., S, Ev) -> (..., L, Ev)."""
    if dropout_p:
        raise NotImplementedError("dropout_p > 0 is not supported")
    scores = _scores(query, key, attn_mask, is_causal, scale, enable_gqa, similarity, alignment,
                     window, softcap, alibi_slopes)
    if enable_gqa and value.ndim >= 3 and value.shape[-3] != query.shape[-3]:
        value = np.repeat(value, query.shape[-3] // value.shape[-3], axis=-3)
    out = softmax(scores) @ value
    if return_lse:
        return out, _logsumexp(scores)
    return out


def merge_attention(outs, lses):
    """Attention over the union of disjoint key sets from each set's (out, lse):

        lse = log(sum_i exp(lse_i)),   out = sum_i out_i * exp(lse_i - lse)

    A part that saw no key (lse_i = -inf) counts for nothing; when every part is empty the
    answer is zeros and lse -inf, as for a row with no key."""
    outs, lses = np.stack(outs), np.stack(lses)
    top = np.max(lses, axis=0)
    finite_top = np.where(np.isneginf(top), 0, top)
    with np.errstate(divide="ignore"):
        lse = finite_top + np.log(np.sum(np.exp(lses - finite_top), axis=0))
    weights = np.where(np.isneginf(lses), 0, np.exp(lses - np.where(np.isneginf(lse), 0, lse)))
    return np.sum(outs * weights[..., None], axis=0), lse


def multi_head_attention(query, key, value, num_heads, q_weight, k_weight, v_weight,
                         out_weight, q_bias=None, k_bias=None, v_bias=None, out_bias=None,
                         *, num_kv_heads=None, attn_mask=None, key_padding_mask=None,
                         is_causal=False, need_weights=False, average_attn_weights=True,
                         **variants):
    """Multi-head attention on batch-first inputs (B, L, E), (B, S, Ek), (B, S, Ev).

    Weights are (out_features, in_features) as in ``torch.nn.Linear``: x @ W.T + b, with
    q_weight (H*D, E), k_weight (Hkv*D, Ek), v_weight (Hkv*Dv, Ev), out_weight (Eo, H*Dv);
    head h takes features h*D:(h+1)*D and uses key/value head h // (H // Hkv).
    ``attn_mask`` follows this package's SDPA convention (bool True = takes part, float added),
    broadcastable to (B, H, L, S); ``key_padding_mask`` is (B, S), bool True = padding (as in
    PyTorch) or float (added to the scores of key s).
    ``variants`` (``alignment``, ``window``, ``softcap``, ``alibi_slopes``) go to the attention.
    Returns ``(out, weights)``; weights is None unless ``need_weights``, then (B, L, S) averaged
    over heads or (B, H, L, S). A query row with no key taking part attends to nothing: its
    heads are zeros, so its output is ``out_bias`` (and its weights are zeros).
    """
    def linear(x, w, b):
        y = x @ w.T
        return y if b is None else y + b

    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    q = linear(query, q_weight, q_bias)
    k = linear(key, k_weight, k_bias)
    v = linear(value, v_weight, v_bias)

    def split_heads(x, heads):  # (B, T, heads * D) -> (B, heads, T, D)
        B, T, _ = x.shape
        return x.reshape(B, T, heads, -1).transpose(0, 2, 1, 3)

    q, k, v = split_heads(q, num_heads), split_heads(k, num_kv_heads), split_heads(v, num_kv_heads)
    mask = None if attn_mask is None else np.asarray(attn_mask)
    if key_padding_mask is not None:
        pad = np.asarray(key_padding_mask)[:, None, None, :]
        if pad.dtype == np.bool_:
            pad = np.where(pad, -np.inf, 0.0).astype(query.dtype)
        if mask is None:
            mask = pad
        elif mask.dtype == np.bool_:
            mask = np.where(mask, pad, -np.inf)
        else:
            mask = mask + pad
    gqa = num_kv_heads != num_heads
    heads = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa,
                                         **variants)
    B, H, L, Dv = heads.shape
    out = linear(heads.transpose(0, 2, 1, 3).reshape(B, L, H * Dv), out_weight, out_bias)
    weights = None
    if need_weights:
        weights = attention_weights(q, k, mask, is_causal, enable_gqa=gqa, **variants)
        if average_attn_weights:
            weights = weights.mean(axis=1)
    return out, weights


def _unit_rows_backward(x: np.ndarray, grad_unit: np.ndarray) -> np.ndarray:
    """The gradient through x -> x / |x| (cosine similarity's normalisation):
    (g - u (u . g)) / |x| with u = x / |x|; a zero row, where it is not differentiable, gets 0."""
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    safe = np.where(norm == 0, 1, norm)
    unit = x / safe
    grad = (grad_unit - unit * np.sum(unit * grad_unit, axis=-1, keepdims=True)) / safe
    return np.where(norm == 0, 0, grad)


def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, attn_mask=None,
                                          is_causal=False, scale=None, enable_gqa=False, *,
                                          similarity="dot", alignment="top_left", window=None,
                                          softcap=None, alibi_slopes=None):
    """(grad_query, grad_key, grad_value): the gradients of sum(grad_out * out) for the forward
    ``out, lse = scaled_dot_product_attention(..., return_lse=True)`` with the same arguments
    (see the module doc for the formulas). With GQA the gradient of a key/value head sums over
    the query heads that use it. A row with no key taking part (lse = -inf) has zero weights and
    so gives nothing to any gradient. Masks and ALiBi slopes take no gradient."""
    group = 1
    if enable_gqa and query.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
    k = np.repeat(key, group, axis=-3) if group > 1 else key
    v = np.repeat(value, group, axis=-3) if group > 1 else value
    if scale is None:
        scale = 1.0 if similarity == "cosine" else 1.0 / math.sqrt(query.shape[-1])
    scale = np.asarray(scale, dtype=query.dtype)
    q_rows, k_rows = (_unit_rows(query), _unit_rows(k)) if similarity == "cosine" else (query, k)

    scores = _scores(query, key, attn_mask, is_causal, scale, enable_gqa, similarity, alignment,
                     window, softcap, alibi_slopes)
    # lse = -inf (no key) becomes +inf: exp(scores - inf) = 0, the row's weights are all zero
    row_lse = np.where(np.isneginf(lse), np.inf, lse)[..., None]
    weights = np.exp(scores - row_lse)
    grad_v = np.swapaxes(weights, -1, -2) @ grad_out
    D = np.sum(grad_out * out, axis=-1, keepdims=True)
    grad_scores = weights * (grad_out @ np.swapaxes(v, -1, -2) - D)
    if softcap:
        cap = np.asarray(softcap, dtype=scores.dtype)
        grad_scores = grad_scores * (1 - np.tanh(_dot(q_rows, k_rows) * scale / cap) ** 2)
    grad_q = scale * (grad_scores @ k_rows)
    grad_k = scale * (np.swapaxes(grad_scores, -1, -2) @ q_rows)
    if similarity == "cosine":
        grad_q = _unit_rows_backward(query, grad_q)
        grad_k = _unit_rows_backward(k, grad_k)
    if group > 1:  # key/value head h serves query heads h * group .. (h + 1) * group - 1
        grad_k = grad_k.reshape(*key.shape[:-2], group, *key.shape[-2:]).sum(axis=-3)
        grad_v = grad_v.reshape(*value.shape[:-2], group, *value.shape[-2:]).sum(axis=-3)
    return grad_q, grad_k, grad_v


# --- flex attention: user functions over index grids ----------------------------------------------

def flex_grid(fn, L: int, S: int, b: int, h: int, *args, score=None) -> np.ndarray:
    """``fn`` evaluated at every (q_idx, kv_idx) of one (b, h): an (L, S) array.

    ``fn`` is a ``mask_mod(b, h, q_idx, kv_idx, *args)`` or, given ``score`` (L, S), a
    ``score_mod(score, b, h, q_idx, kv_idx, *args)``. It is first called once on index grids
    (q_idx (L, 1), kv_idx (1, S)), which NumPy broadcasts; a function that takes scalars only
    (``math.tanh``, ``if``, ``and``) is then called element by element.
    """
    fn = getattr(fn, "py_func", fn)  # a numba.njit-ed function: its Python itself
    q_idx = np.arange(L, dtype=np.int64)[:, None]
    kv_idx = np.arange(S, dtype=np.int64)[None, :]
    lead = () if score is None else (score,)
    try:
        with np.errstate(all="ignore"):
            grid = np.asarray(fn(*lead, np.int64(b), np.int64(h), q_idx, kv_idx, *args))
        return np.broadcast_to(grid, (L, S))
    except Exception:  # noqa: BLE001 - it takes scalars only: evaluated one by one below
        pass
    out = np.empty((L, S), dtype=bool if score is None else score.dtype)
    for i in range(L):
        for j in range(S):
            lead = () if score is None else (score[i, j],)
            out[i, j] = fn(*lead, np.int64(b), np.int64(h), np.int64(i), np.int64(j), *args)
    return out


def block_mask_keep(kinds: np.ndarray, block_size: tuple, L: int, S: int) -> np.ndarray:
    """A block mask's block kinds (..., L blocks, S blocks; 0 empty, 1 partial, 2 full) spread
    over the (..., L, S) scores."""
    bq, bk = block_size
    return np.repeat(np.repeat(kinds, bq, axis=-2), bk, axis=-1)[..., :L, :S]


def flex_attention(query, key, value, score_mod=None, mask_mod=None, *, block_kinds=None,
                   block_size=None, args=(), scale=None, enable_gqa=False, return_lse=False):
    """Attention with user functions, shapes as :func:`scaled_dot_product_attention`:

        scores[b, h, i, j] = score_mod(q[b, h, i] . k[b, h, j] * scale, b, h, i, j, *args)
        key j takes part in row i  iff  mask_mod(b, h, i, j, *args)

    where ``b`` runs over the query's leading dims but the last (flattened) and ``h`` over the
    last (the query heads). With ``block_kinds`` (a block mask's kinds, broadcastable to
    (B, H, L blocks, S blocks), see ``fastattn.BlockMask``) a key in an empty block never takes
    part, one in a full block always does, and ``mask_mod`` decides in a partial block.
    """
    if enable_gqa and query.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = np.repeat(key, group, axis=-3)
        value = np.repeat(value, group, axis=-3)
    *lead, L, E = query.shape
    S = key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(E)
    H = lead[-1] if lead else 1
    B = int(np.prod(lead[:-1], dtype=np.int64)) if lead else 1
    scores = (_dot(query, key) * np.asarray(scale, dtype=query.dtype)).reshape(B, H, L, S)
    keep = np.ones((B, H, L, S), dtype=bool)
    for b in range(B):
        for h in range(H):
            if score_mod is not None:
                scores[b, h] = flex_grid(score_mod, L, S, b, h, *args, score=scores[b, h])
            if mask_mod is not None:
                keep[b, h] = flex_grid(mask_mod, L, S, b, h, *args)
    if block_kinds is not None:
        kinds = block_mask_keep(np.broadcast_to(block_kinds, (B, H) + block_kinds.shape[-2:]),
                                block_size, L, S)
        keep = (kinds == 2) | ((kinds == 1) & keep)
    scores = np.where(keep, scores, -np.inf).reshape(*lead, L, S)
    out = softmax(scores) @ value
    if return_lse:
        return out, _logsumexp(scores)
    return out


def _cache_rows(cache, b, n, block_table):
    """Row b's first n keys (or values) of a cache, (Hkv, n, E): contiguous (B, Hkv, S_max, E),
    or paged (num_blocks, Hkv, block_size, E) with key t in block block_table[b, t // block_size]
    at t % block_size."""
    if block_table is None:
        return cache[b, :, :n]
    t = np.arange(n)
    block_size = cache.shape[2]
    blocks = np.asarray(block_table)[b, t // block_size]
    return np.swapaxes(cache[blocks, :, t % block_size], 0, 1)  # (n, Hkv, E) -> (Hkv, n, E)


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                           block_table=None, is_causal=True, scale=None, window=None,
                           softcap=None, alibi_slopes=None, return_lse=False):
    """Attention of q (B, Hq, Lq, E) over each row's cached keys and values followed by the new
    ones: row b attends over its first cache_seqlens[b] cached keys, then k[b] and v[b] when given
    (n_b keys in all), bottom-right aligned (query t sits at position n_b - Lq + t), causal by
    default. Writes nothing (the public function appends k and v to the caches itself).
    Returns out (B, Hq, Lq, Ev), and lse (B, Hq, Lq) with ``return_lse``."""
    B, Hq = q.shape[:2]
    seqlens = np.broadcast_to(np.asarray(cache_seqlens), (B,))
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (B, Hq))
    outs, lses = [], []
    for b in range(B):
        keys = _cache_rows(k_cache, b, int(seqlens[b]), block_table)
        values = _cache_rows(v_cache, b, int(seqlens[b]), block_table)
        if k is not None:
            keys = np.concatenate([keys, k[b]], axis=1)
            values = np.concatenate([values, v[b]], axis=1)
        out, lse = scaled_dot_product_attention(
            q[b], keys.astype(q.dtype), values.astype(q.dtype), is_causal=is_causal,
            scale=scale, enable_gqa=True, return_lse=True, alignment="bottom_right",
            window=window, softcap=softcap, alibi_slopes=None if slopes is None else slopes[b])
        outs.append(out)
        lses.append(lse)
    out, lse = np.stack(outs), np.stack(lses)
    return (out, lse) if return_lse else out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, is_causal=False,
                     alignment="top_left", scale=None, window=None, softcap=None,
                     alibi_slopes=None, return_lse=False):
    """Attention over packed sequences: q (total_q, Hq, E), k (total_k, Hkv, E), v (total_k,
    Hkv, Ev); sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and
    cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v, one ``scaled_dot_product_attention`` each.
    ``alibi_slopes`` (Hq,) or (B, Hq). Returns out (total_q, Hq, Ev), and lse (Hq, total_q)
    with ``return_lse``."""
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    B, Hq = len(cu_q) - 1, q.shape[1]
    slopes = None if alibi_slopes is None else np.broadcast_to(alibi_slopes, (B, Hq))
    out = np.zeros((q.shape[0], Hq, v.shape[2]), dtype=q.dtype)
    lse = np.full((Hq, q.shape[0]), -np.inf, dtype=q.dtype)
    for b in range(B):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, x = scaled_dot_product_attention(
            np.swapaxes(q[qs], 0, 1), np.swapaxes(k[ks], 0, 1), np.swapaxes(v[ks], 0, 1),
            is_causal=is_causal, scale=scale, enable_gqa=True, return_lse=True,
            alignment=alignment, window=window, softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b])
        out[qs] = np.swapaxes(o, 0, 1)
        lse[:, qs] = x
    return (out, lse) if return_lse else out
