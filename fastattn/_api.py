"""The public functions: check input, apply the dtype policy, dispatch to a backend."""
from __future__ import annotations

import numpy as np

from . import _backends, _prepare, reference


def _cast_out(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(dtype)


def similarity(a, b, kind: str = "dot", *, backend: str = "auto") -> np.ndarray:
    """Similarity of every row of ``a`` with every row of ``b``.

    Args:
        a: (..., La, E) float array.
        b: (..., Lb, E) float array; leading dims broadcast with ``a``'s.
        kind: ``"dot"`` (a·b), ``"scaled_dot"`` (a·b / sqrt(E)) or ``"cosine"``
            (a·b / (|a| |b|); a zero vector has similarity 0 with everything, never NaN).
        backend: ``"auto"``, ``"numpy"``, ``"numba"`` or ``"cuda"``.

    Returns:
        (..., La, Lb) array in the input dtype.

    Example:
        >>> import numpy as np, fastattn
        >>> words = np.array([[1., 4.], [0., 3.], [3., 0.]])
        >>> fastattn.similarity(words, words, "dot")[0]
        array([17., 12.,  3.])
    """
    name = _backends.resolve(backend, a, b)
    if name == "cuda":
        return _backends.module("cuda").similarity(a, b, kind)
    a3, b3, scale, out_shape, dtype = _prepare.prepare_similarity(a, b, kind)
    in_dtype = np.asarray(a).dtype
    if name == "numpy":
        lead = out_shape[:-2]
        a_full = np.broadcast_to(np.asarray(a, dtype), (*lead, *np.shape(a)[-2:]))
        b_full = np.broadcast_to(np.asarray(b, dtype), (*lead, *np.shape(b)[-2:]))
        return _cast_out(reference.similarity(a_full, b_full, kind), in_dtype)
    out = _backends.module(name).similarity(a3, b3, scale)
    return _cast_out(out.reshape(out_shape), in_dtype)


def softmax(x, axis: int = -1, *, mask=None, backend: str = "auto") -> np.ndarray:
    """Numerically stable softmax along ``axis``: exp(x - max) / sum(exp(x - max)).

    Args:
        x: float array.
        axis: the axis the weights sum to one along.
        mask: optional bool array broadcastable to ``x``; True = keep, False = weight 0.
            ``-inf`` entries of ``x`` count as masked too.
        backend: ``"auto"``, ``"numpy"``, ``"numba"`` or ``"cuda"``.

    Returns:
        Array of ``x``'s shape and dtype. A row with nothing kept gives zeros (not NaN);
        a NaN in a row makes that row NaN.

    Example:
        >>> import numpy as np, fastattn
        >>> fastattn.softmax(np.array([1.0, -1.0])).round(3)
        array([0.881, 0.119])
    """
    name = _backends.resolve(backend, x, mask)
    if name == "cuda":
        return _backends.module("cuda").softmax(x, axis, mask=mask)
    rows, prepared_mask, moved_shape, axis, dtype = _prepare.prepare_softmax(x, axis, mask)
    in_dtype = np.asarray(x).dtype
    if name == "numpy":
        out = reference.softmax(np.asarray(x, dtype), axis,
                                mask=None if mask is None else np.asarray(mask))
        return _cast_out(out, in_dtype)
    out = _backends.module(name).softmax(rows, prepared_mask)
    return _cast_out(np.moveaxis(out.reshape(moved_shape), -1, axis), in_dtype)


def _reference_variants(p: _prepare.AttentionProblem, alignment, window) -> dict:
    """The checked variant options as the reference takes them."""
    v = p.variants
    alibi = None if v.alibi is None else v.alibi.reshape(p.out_shape[:-2])
    return dict(alignment=alignment, window=None if window is None else tuple(window),
                softcap=v.softcap or None, alibi_slopes=alibi)


def _reference_inputs(p: _prepare.AttentionProblem, query, key, value, attn_mask):
    cast = lambda a: None if a is None else np.asarray(a, p.dtype)  # noqa: E731
    mask = None if attn_mask is None else np.asarray(attn_mask)
    if mask is not None and mask.dtype != np.bool_:
        mask = mask.astype(p.dtype)
    return cast(query), cast(key), cast(value), mask


def attention_weights(query, key, attn_mask=None, is_causal: bool = False, scale=None,
                      enable_gqa: bool = False, *, similarity: str = "dot",
                      alignment: str = "top_left", window=None, softcap=None, alibi_slopes=None,
                      backend: str = "auto") -> np.ndarray:
    """The attention weights softmax(scores), for inspection and pictures.

    Same arguments and semantics as :func:`scaled_dot_product_attention` (without ``value``),
    variants (``alignment``, ``window``, ``softcap``, ``alibi_slopes``) included.

    Returns:
        (..., Hq, L, S) array in the input dtype; each row sums to 1, or is all zeros when no
        key takes part.

    Example:
        >>> import numpy as np, fastattn
        >>> q = k = np.eye(2)
        >>> fastattn.attention_weights(q, k, scale=1.0).round(3)
        array([[0.731, 0.269],
               [0.269, 0.731]])
    """
    variants = dict(alignment=alignment, window=window, softcap=softcap,
                    alibi_slopes=alibi_slopes)
    name = _backends.resolve(backend, query, key, attn_mask)
    if name == "cuda":
        return _backends.module("cuda").attention_weights(
            query, key, attn_mask, is_causal, scale, enable_gqa, similarity=similarity,
            **variants)
    p = _prepare.prepare_attention(query, key, None, attn_mask, is_causal, scale, enable_gqa,
                                   similarity, need_value=False, **variants)
    if name == "numpy":
        q, k, _, mask = _reference_inputs(p, query, key, None, attn_mask)
        w = reference.attention_weights(q, k, mask, p.causal, p.scale, enable_gqa,
                                        similarity=similarity,
                                        **_reference_variants(p, alignment, window))
    else:
        w = _backends.module(name).attention_weights(p).reshape(p.weights_shape)
    return _cast_out(w, p.in_dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, enable_gqa: bool = False,
                                 *, similarity: str = "dot", return_lse: bool = False,
                                 alignment: str = "top_left", window=None, softcap=None,
                                 alibi_slopes=None, backend: str = "auto"):
    """softmax(query @ key^T * scale + mask) @ value, without storing the score matrix.

    A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on NumPy arrays.

    Args:
        query: (..., L, E) float array (any number of leading dims, e.g. (B, Hq, L, E)).
        key: (..., S, E); the same leading dims (or Hkv heads with ``enable_gqa``).
        value: (..., S, Ev).
        attn_mask: bool (True = the key takes part) or float (added to the scores; -inf drops
            the key), broadcastable to (..., Hq, L, S). Read in place, never expanded.
        dropout_p: must be 0.0 (dropout is not implemented; > 0 raises NotImplementedError).
        is_causal: query i sees keys j <= i (top-left aligned, as PyTorch); combines with a mask.
        scale: multiplies the similarities; default 1/sqrt(E) for ``similarity="dot"`` and 1 for
            ``"cosine"``.
        enable_gqa: grouped-query attention: Hq a multiple of Hkv, query head h uses key/value
            head h // (Hq // Hkv), with no copy of key or value.
        similarity: ``"dot"`` (q·k) or ``"cosine"`` (cos(q, k), then times ``scale``).
        return_lse: also return the log-sum-exp of the scores, (..., Hq, L).
        alignment: ``"top_left"`` (PyTorch's ``is_causal``) or ``"bottom_right"``: query row i
            sits at position p(i) = i, or i + S - L among the keys (the last query on the last
            key, as FlashAttention and a KV cache). Applies to ``is_causal``, ``window`` and
            ``alibi_slopes``; a row with p(i) < 0 under causal attention sees no key.
        window: ``(left, right)``: key j takes part only if p(i) - left <= j <= p(i) + right;
            each side an int >= 0 or None (unbounded). ``(W - 1, 0)`` with ``is_causal`` is a
            sliding window of W keys; with ``is_causal`` the right side is at most 0.
        softcap: a float > 0: scores become softcap * tanh(scores / softcap), after the scale
            and before any mask (Gemma 2).
        alibi_slopes: float array broadcastable to the query's leading dims, e.g. (Hq,) or
            (B, Hq): adds -slope * |p(i) - j| to the score of key j (after the softcap).
        backend: ``"auto"`` (CUDA for GPU arrays, else ``"numba"``), ``"numpy"`` (the reference),
            ``"numba"`` or ``"cuda"``.

    Returns:
        out of shape (..., L, Ev) in the input dtype (float16 and bfloat16 are computed in
        float32, the result rounded to nearest even), or
        ``(out, lse)`` with ``return_lse``. A query row with no key taking part gives zeros and
        lse = -inf.

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((2, 4, 16, 8), dtype=np.float32) for _ in range(3))
        >>> fastattn.scaled_dot_product_attention(q, k, v, is_causal=True).shape
        (2, 4, 16, 8)
    """
    variants = dict(alignment=alignment, window=window, softcap=softcap,
                    alibi_slopes=alibi_slopes)
    name = _backends.resolve(backend, query, key, value, attn_mask)
    _prepare.check_dropout(dropout_p)
    if name == "cuda":
        return _backends.module("cuda").scaled_dot_product_attention(
            query, key, value, attn_mask, is_causal, scale, enable_gqa,
            similarity=similarity, return_lse=return_lse, **variants)
    # The CPU kernel reads 16-bit inputs in place and widens them as it loads them.
    p = _prepare.prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                   similarity, keep_sixteen_bit=name == "numba", **variants)
    if name == "numpy":
        q, k, v, mask = _reference_inputs(p, query, key, value, attn_mask)
        out, lse = reference.scaled_dot_product_attention(
            q, k, v, mask, 0.0, p.causal, p.scale, enable_gqa, similarity=similarity,
            return_lse=True, **_reference_variants(p, alignment, window))
    else:
        out, lse = _backends.module(name).attention(p, return_lse)
        out = out.reshape(p.out_shape)
        lse = None if lse is None else lse.reshape(p.lse_shape)
    out = _cast_out(out, p.in_dtype)
    return (out, lse) if return_lse else out
