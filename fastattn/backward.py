"""The backward pass of attention: ``scaled_dot_product_attention_backward``, the gradients of
the query, key and value from the forward's own ``out`` and ``lse``, with O(L) memory."""
from __future__ import annotations

import math

import numpy as np

from . import _backends, _prepare, reference
from ._api import _cast_out, _reference_inputs, _reference_variants

__all__ = ["scaled_dot_product_attention_backward"]

# Queries and keys per block of the CPU kernel. The query block must be a multiple of the
# register tile's 6 rows and of its columns (16 float32, 8 float64), the key block of its rows.
BLOCK_Q = 96
BLOCK_K = 96
# Longer key blocks when there are many keys: each key block reads every query block's operands
# once, so longer ones read them fewer times (B=1, H=8, D=64 interleaved on the shared machine:
# 192 keys +8% and +21% at L=S=4096, +7% causal; -5% to -7% at L=S=1024).
BLOCK_K_LONG = 192
LONG_KEYS = 2048


def scaled_dot_product_attention_backward(grad_out, query, key, value, out, lse, attn_mask=None,
                                          is_causal: bool = False, scale=None,
                                          enable_gqa: bool = False, *, similarity: str = "dot",
                                          alignment: str = "top_left", window=None, softcap=None,
                                          alibi_slopes=None, backend: str = "auto"):
    """The gradients of attention: ``(grad_query, grad_key, grad_value)`` of sum(grad_out * out)
    for ``out, lse = scaled_dot_product_attention(query, key, value, ..., return_lse=True)``.

    FlashAttention-2's backward: the weights are recomputed block by block from the scores and
    the forward's ``lse`` (weights = exp(scores - lse)), never stored as an L x S matrix, and

        grad_value = weights^T grad_out,    D = rowsum(grad_out * out)
        grad_s     = weights * (grad_out value^T - D)     (times 1 - tanh^2 with ``softcap``)
        grad_query = scale grad_s key,      grad_key = scale grad_s^T query

    with cosine similarity's normalisation chained in. Masks and ALiBi slopes take no gradient
    (they are constants of the problem); a query row with no key taking part (lse = -inf) gives
    zero gradients, never NaN.

    Args:
        grad_out: (..., L, Ev), the gradient of the loss with respect to ``out``, in the dtype of
            ``query``.
        query, key, value, attn_mask, is_causal, scale, enable_gqa, similarity, alignment,
        window, softcap, alibi_slopes: exactly as given to the forward
            (:func:`fastattn.scaled_dot_product_attention`).
        out: the forward's output (..., L, Ev).
        lse: the forward's log-sum-exp (..., L) (``return_lse=True``); NaN or +inf raise.
        backend: ``"auto"`` (CUDA for GPU arrays, else ``"numba"``), ``"numpy"`` (the
            reference), ``"numba"`` or ``"cuda"``.

    Returns:
        ``(grad_query, grad_key, grad_value)`` in the shapes and dtypes of query, key and value
        (float16 computed in float32). With GQA the gradient of a key/value head sums over the
        query heads that use it.

    Example:
        >>> import numpy as np, fastattn
        >>> rng = np.random.default_rng(0)
        >>> q, k, v = (rng.standard_normal((1, 2, 8, 4)) for _ in range(3))
        >>> out, lse = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True,
        ...                                                  return_lse=True)
        >>> dq, dk, dv = fastattn.scaled_dot_product_attention_backward(
        ...     np.ones_like(out), q, k, v, out, lse, is_causal=True)
        >>> dq.shape, dk.shape, dv.shape
        ((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 8, 4))
    """
    variants = dict(alignment=alignment, window=window, softcap=softcap,
                    alibi_slopes=alibi_slopes)
    name = _backends.resolve(backend, grad_out, query, key, value, out, lse, attn_mask)
    if name == "cuda":
        from . import _cuda_backward
        return _cuda_backward.attention_backward(
            grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, enable_gqa,
            similarity=similarity, **variants)
    a = _prepare.check_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                 similarity, **variants)
    grad_out, out, lse = _prepare.check_backward(a, grad_out, out, lse)
    p = _prepare.prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                   similarity, **variants)
    dtype = p.dtype
    if name == "numpy":
        q, k, v, mask = _reference_inputs(p, query, key, value, attn_mask)
        grads = reference.scaled_dot_product_attention_backward(
            np.asarray(grad_out, dtype), q, k, v, np.asarray(out, dtype), np.asarray(lse, dtype),
            mask, p.causal, p.scale, enable_gqa, similarity=similarity,
            **_reference_variants(p, alignment, window))
    else:
        N, L, _ = p.q.shape
        Ev = p.v.shape[2]
        grads = _numba_backward(p, _prepare.contiguous(grad_out, dtype).reshape(N, L, Ev),
                                _prepare.contiguous(out, dtype).reshape(N, L, Ev),
                                _prepare.contiguous(lse, dtype).reshape(N, L))
        if similarity == "cosine":  # the kernel's gradients are of the unit rows
            grads = (_through_unit_rows(_prepare.contiguous(a.query, dtype).reshape(p.q.shape),
                                        grads[0]),
                     _through_unit_rows(_prepare.contiguous(a.key, dtype).reshape(p.k.shape),
                                        grads[1]),
                     grads[2])
    shapes = (a.query.shape, a.key.shape, a.value.shape)
    return tuple(_cast_out(g.reshape(shape), p.in_dtype) for g, shape in zip(grads, shapes))


def _through_unit_rows(x: np.ndarray, grad_unit: np.ndarray) -> np.ndarray:
    """The gradient with respect to x of a function of x / |x|, from the one with respect to
    x / |x|: (g - u (u . g)) / |x|; 0 for a zero row."""
    norm = np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]
    safe = np.where(norm == 0, 1, norm).astype(x.dtype)
    unit = x / safe
    grad = (grad_unit - unit * np.einsum("...i,...i->...", unit, grad_unit)[..., None]) / safe
    return np.where(norm == 0, 0, grad).astype(x.dtype)


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _numba_backward(p: _prepare.AttentionProblem, grad_out, out, lse):
    """grad_q, grad_k, grad_v (in the compute dtype, flattened like ``p``) from the CPU kernel."""
    from . import _numba
    from .kernels.cpu import backward as kernels
    from .kernels.cpu.tile import tile_cols

    N, L, E = p.q.shape
    n_kv, S, Ev = p.v.shape
    dtype = p.dtype
    grad_q = np.empty((N, L, E), dtype)
    grad_k = np.empty((n_kv, S, E), dtype)
    grad_v = np.empty((n_kv, S, Ev), dtype)
    if N * L == 0 or S == 0:  # nothing attends to anything: no gradient
        return np.zeros_like(grad_q), np.zeros_like(grad_k), np.zeros_like(grad_v)
    _numba._kernels()  # as every kernel call: the compile notice, the other pools quieted
    cols = tile_cols(dtype.itemsize)
    block_k = BLOCK_K_LONG if S > LONG_KEYS else BLOCK_K
    if BLOCK_Q % math.lcm(kernels.ROWS, cols) or block_k % kernels.ROWS:
        raise ValueError(f"BLOCK_Q={BLOCK_Q} must be a multiple of {math.lcm(kernels.ROWS, cols)} "
                         f"and the key block {block_k} of {kernels.ROWS} for {dtype}")
    Lp, Sp = _padded(L, BLOCK_Q), _padded(S, block_k)
    Ep, Evp = _padded(E, cols), _padded(Ev, cols)
    v = p.variants
    alibi = np.zeros(1, dtype) if v.alibi is None else v.alibi
    options = kernels.ScoreOptions(float(p.scale), int(v.offset), int(v.left), int(v.right),
                                   float(v.softcap), _numba._readonly(alibi), v.alibi is not None)
    ro = _numba._readonly
    with _numba._lock:  # no BLAS inside: the kernel has its own block products
        packed = _numba._scratch_arrays(
            [(N, Lp // cols, E * cols), (N, Lp, Ep), (N, Lp // cols, Ev * cols), (N, Lp, Evp),
             (n_kv, Sp, Ep), (n_kv, Sp, Evp), (N, Lp), (N, Lp), (N, Lp, Ep)], dtype)
        grad_q_acc = packed.pop()
        kernels.pack_backward(ro(p.q), ro(p.k), ro(p.v), ro(grad_out), ro(out), ro(lse),
                              dtype.type(p.scale), *packed)
        kernels.attention_backward(*(ro(x) for x in packed), L, S, p.group, options,
                                   _numba._mask_args(p.mask, dtype), BLOCK_Q, block_k,
                                   grad_q_acc, grad_q, grad_k, grad_v)
    return grad_q, grad_k, grad_v
