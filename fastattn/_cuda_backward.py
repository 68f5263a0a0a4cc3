"""The ``cuda`` backend of ``scaled_dot_product_attention_backward``: the checks of the other
backends, then the kernels of ``kernels/cuda/backward.py``. Operands are read in place through
row layouts as in ``_cuda``; results are on the device when any data input is."""
from __future__ import annotations

import numpy as np
from numba import cuda

from . import _backends, _cuda, _prepare
from .kernels.cuda.backward import backward_kernels

# Threads per block of the row-per-thread kernels (the simulator runs blocks of Python threads).
THREADS = 4 if _cuda._SIMULATOR else 128


def _row_layout_args(x, shape):
    op = _cuda._operand(x)
    return _cuda._layout_args(op, _cuda._rows(op, shape))


def attention_backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale,
                       enable_gqa, *, similarity="dot", **variants):
    arrays = (grad_out, query, key, value, out, lse)
    on_device = any(_backends.is_device_array(x) for x in arrays)
    dev = _cuda._as_device_array
    a = _prepare.check_attention(dev(query), dev(key), dev(value), dev(attn_mask), is_causal,
                                 scale, enable_gqa, similarity, **variants)
    grad_out, out, lse = _prepare.check_backward(a, dev(grad_out), dev(out), dev(lse))
    # lse is small (one value a row): checked and laid out on the host
    lse_host = lse.array.copy_to_host() if isinstance(lse, _cuda.DeviceInput) else lse
    _prepare.check_lse_values(lse_host)
    N, L, S, E, Ev = a.N, a.L, a.S, a.E, a.Ev
    n_kv = N // a.group
    dtype, in_dtype = a.dtype, np.dtype(a.in_dtype)
    grad_q = cuda.device_array((N, L, E), in_dtype)
    grad_k = cuda.device_array((n_kv, S, E), in_dtype)
    grad_v = cuda.device_array((n_kv, S, Ev), in_dtype)
    if N * L and S:
        same = in_dtype == dtype  # accumulate in the outputs, else in compute-dtype scratch
        acc_q = grad_q if same else cuda.device_array((N, L, E), dtype)
        acc_k = grad_k if same else cuda.device_array((n_kv, S, E), dtype)
        acc_v = grad_v if same else cuda.device_array((n_kv, S, Ev), dtype)
        kernels = backward_kernels(dtype)
        operands = _cuda._attention_operands(a)
        out_shape = (*a.lead, L, Ev)
        go_args = _row_layout_args(grad_out, out_shape)
        mask_args = _cuda._mask_args(a.mask, a.weights_shape)
        delta = cuda.device_array((N, L), dtype)
        row_lse = cuda.device_array((N, L), dtype)
        kernels.row_stats[-(-N * L // THREADS), THREADS](
            *go_args, *_row_layout_args(out, out_shape),
            cuda.to_device(np.ascontiguousarray(lse_host, dtype).reshape(N, L)), N, L, Ev,
            delta, row_lse)
        v = a.variants
        alibi = cuda.to_device(np.zeros(1, dtype) if v.alibi is None else v.alibi)
        common = (*operands, *go_args, *mask_args, delta, row_lse, N, L, S, E, Ev)
        options = (dtype.type(a.scale), a.similarity == "cosine", int(v.offset), int(v.left),
                   int(v.right), dtype.type(v.softcap), alibi, v.alibi is not None)
        kernels.grad_key_value[-(-n_kv * S // THREADS), THREADS](
            *common, a.group, *options, acc_k, acc_v, grad_k, grad_v)
        kernels.grad_query[-(-N * L // THREADS), THREADS](*common, *options, acc_q, grad_q)
    else:
        for g in (grad_q, grad_k, grad_v):
            if g.size:
                g.copy_to_device(np.zeros(g.shape, in_dtype))
    shapes = (a.query.shape, a.key.shape, a.value.shape)
    return tuple(_cuda._result(g.reshape(tuple(shape)), on_device)
                 for g, shape in zip((grad_q, grad_k, grad_v), shapes))
