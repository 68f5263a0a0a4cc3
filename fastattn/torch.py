"""fastattn on PyTorch tensors: ``torch.nn.functional.scaled_dot_product_attention``'s signature
and semantics, with autograd.

    >>> import torch, fastattn.torch
    >>> q = k = v = torch.randn(1, 8, 128, 64)
    >>> out = fastattn.torch.scaled_dot_product_attention(q, k, v, is_causal=True)

CPU tensors are read in place as NumPy arrays (no copy of contiguous, or as the NumPy path takes
them, strided tensors) and the result is handed back with ``torch.from_numpy`` (no copy). CUDA
tensors go to the ``cuda`` backend through ``__cuda_array_interface__`` and come back as CUDA
tensors on the same device (the cuda backend runs on Numba's default stream: the caller's stream
is synchronised before and after). float16 and bfloat16 CPU tensors are read in place too (a
bfloat16 tensor as a NumPy array of ``ml_dtypes.bfloat16``, a view of the same memory) and the
kernels widen them to float32 as they load them; the result, computed in float32, comes back in
the input dtype (rounded to nearest even) and the lse in float32. Without ml_dtypes installed
bfloat16 tensors are converted to float32 copies first (same results, more memory).

The differences from PyTorch: ``dropout_p`` must be 0; a query row with no key taking part gives
zeros (as PyTorch 2.13's CPU kernels do); a mask combines with ``is_causal`` (PyTorch refuses
both); the keyword-only ``fastattn_options`` are those of
:func:`fastattn.scaled_dot_product_attention` (``similarity``, ``alignment``, ``window``,
``softcap``, ``alibi_slopes``, ``return_lse``, ``backend``).

This module imports torch; ``import fastattn`` never does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

import fastattn
from . import _prepare

__all__ = ["scaled_dot_product_attention"]

# The keyword-only options of fastattn.scaled_dot_product_attention, taken as **fastattn_options.
OPTIONS = ("similarity", "alignment", "window", "softcap", "alibi_slopes", "return_lse",
           "backend")


def _bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype, or None when ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _check_tensors(query, key, value, attn_mask, alibi_slopes):
    named = [("query", query), ("key", key), ("value", value)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} (for NumPy "
                            f"arrays use fastattn.scaled_dot_product_attention)")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in named)
        raise TypeError(f"query, key and value must have the same dtype, got {got}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got "
                            f"{type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be a bool tensor (True = takes part) or a float "
                            f"tensor (added to the scores), got {attn_mask.dtype}")
        named.append(("attn_mask", attn_mask))
    if isinstance(alibi_slopes, torch.Tensor):
        named.append(("alibi_slopes", alibi_slopes))
    devices = {t.device for _, t in named}
    if len(devices) != 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"all tensors must be on the same device, got {got}")
    device = query.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastattn takes CPU or CUDA tensors, got tensors on {device}")


def _as_array(t):
    """The tensor's data as fastattn reads it: a NumPy view of a CPU tensor (bfloat16 as
    ``ml_dtypes.bfloat16``, the same memory; a float32 copy without ml_dtypes), the (detached)
    CUDA tensor itself (``__cuda_array_interface__``; bfloat16 as a float32 copy there, the CUDA
    kernels take no bfloat16)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        bfloat16 = _bfloat16() if t.device.type == "cpu" else None
        if bfloat16 is None:
            t = t.float()
        else:  # NumPy has no bfloat16: its bits, viewed as ml_dtypes' (no copy)
            return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy() if t.device.type == "cpu" else t


def _as_tensor(x, like_dtype, device):
    """fastattn's result as a torch tensor, without a copy, in ``like_dtype``."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy wants a writable array
            x = x.copy()
        if x.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: torch takes its bits (no copy)
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        t = torch.from_numpy(x)
    else:  # a Numba device array on ``device``
        t = torch.as_tensor(x, device=device)
    return t if t.dtype == like_dtype else t.to(like_dtype)


def _alibi_array(alibi_slopes):
    if isinstance(alibi_slopes, torch.Tensor):
        if alibi_slopes.requires_grad and torch.is_grad_enabled():
            raise ValueError("alibi_slopes needs grad, but fastattn computes no gradient for "
                             "the ALiBi slopes; pass alibi_slopes.detach()")
        return alibi_slopes.detach().float().cpu().numpy()
    return alibi_slopes


def _options(fastattn_options: dict) -> dict:
    unknown = sorted(set(fastattn_options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; fastattn takes "
                        f"{', '.join(OPTIONS)}")
    return dict(fastattn_options)


def _sync_for(device):
    # The cuda backend launches on Numba's default stream: wait for the work queued on the
    # caller's stream before it reads the inputs, and for its kernels before torch reads the
    # result on any stream.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _forward(query, key, value, attn_mask, is_causal, scale, enable_gqa, options,
             want_lse=True):
    """(out, lse) as tensors: out in the inputs' dtype, lse in the compute dtype (None unless
    ``want_lse``)."""
    device, dtype = query.device, query.dtype
    opts = {k: v for k, v in options.items() if k != "return_lse"}
    _sync_for(device)
    out, lse = fastattn.scaled_dot_product_attention(
        _as_array(query), _as_array(key), _as_array(value), _as_array(attn_mask), 0.0,
        is_causal, scale, enable_gqa, return_lse=True, **opts)
    if device.type == "cuda":
        from numba import cuda
        cuda.default_stream().synchronize()
    out = _as_tensor(out, dtype, device)
    if want_lse:
        lse = _as_tensor(lse, torch.float64 if dtype == torch.float64 else torch.float32, device)
    return out, (lse if want_lse else None)


def _backward(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, enable_gqa,
              options):
    """(grad_query, grad_key, grad_value) as tensors in the inputs' dtype."""
    opts = {k: v for k, v in options.items() if k != "return_lse"}
    arrays = [_as_array(t) for t in (grad_out, query, key, value, out, lse, attn_mask)]
    _sync_for(query.device)
    grads = fastattn.scaled_dot_product_attention_backward(
        *arrays, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, **opts)
    return tuple(_as_tensor(g, t.dtype, t.device) for g, t in zip(grads, (query, key, value)))


class _Attention(torch.autograd.Function):
    """Forward by the fused kernel (keeping the log-sum-exp), backward by the fused backward."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, enable_gqa, options):
        out, lse = _forward(query, key, value, attn_mask, is_causal, scale, enable_gqa, options)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.attn_mask = attn_mask
        ctx.args = (is_causal, scale, enable_gqa, options)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises, never silently 0
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        grads = _backward(grad_out, query, key, value, out, lse, ctx.attn_mask, *ctx.args)
        return (*[g if t.requires_grad else None for g, t in zip(grads, (query, key, value))],
                None, None, None, None, None)


# The dtypes of ``_decode_step``, by the torch dtype (16-bit ones take the general path, which
# rounds the float32 result back).
_DECODE_STEP_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _decode_step(query, key, value, scale, enable_gqa):
    """The output of a plain call with few query rows per key/value head (a decode step):
    contiguous 4-d float32/float64 CPU tensors needing no grad, no mask, not causal, no
    option. Computed by the row kernel exactly as the general path computes it, with a few
    checks instead of that path's, because a decode step inside a model spent more time in
    them than in the kernel (host work measured 3-5x slower there than in a loop of calls: the
    model's weights stream through the caches between calls). None for any other call: the
    general path then checks and computes it."""
    dtype = _DECODE_STEP_DTYPES.get(query.dtype) if type(query) is torch.Tensor else None
    if (dtype is None or type(key) is not torch.Tensor or type(value) is not torch.Tensor
            or key.dtype != query.dtype or value.dtype != query.dtype
            or query.dim() != 4 or key.dim() != 4 or value.dim() != 4
            or query.device.type != "cpu" or key.device.type != "cpu"
            or value.device.type != "cpu"
            or query.requires_grad or key.requires_grad or value.requires_grad
            or not (query.is_contiguous() and key.is_contiguous() and value.is_contiguous())):
        return None
    B, Hq, L, E = query.shape
    Bk, Hkv, S, Ek = key.shape
    if (value.shape[:3] != key.shape[:3] or Bk != B or Ek != E or 0 in query.shape
            or 0 in value.shape or Hq % Hkv or (Hq != Hkv and enable_gqa is not True)
            or L * (Hq // Hkv) > _kvcache().SDPA_ROW_KERNEL_MAX_ROWS
            or not (scale is None or type(scale) is float and math.isfinite(scale))):
        return None
    from . import _backends
    if _backends.numba_unavailable_reason() is not None:
        return None
    Ev = value.shape[3]
    out, _ = _kvcache().row_kernel_sdpa(
        query.numpy().reshape(B * Hq, L, E), key.numpy().reshape(B * Hkv, S, E),
        value.numpy().reshape(B * Hkv, S, Ev), dtype,
        1.0 / math.sqrt(E) if scale is None else scale, Hq // Hkv)
    return torch.from_numpy(out.reshape(B, Hq, L, Ev))


def _kvcache():
    from . import kvcache
    return kvcache


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, enable_gqa: bool = False,
                                 **fastattn_options):
    """``torch.nn.functional.scaled_dot_product_attention`` computed by fastattn, with autograd.

    Args are PyTorch's: query (..., L, E), key (..., S, E), value (..., S, Ev) tensors of one
    dtype (float16, bfloat16, float32, float64) on one device; ``attn_mask`` bool (True = the key
    takes part, as in PyTorch) or float (added to the scores), broadcastable to (..., L, S);
    ``dropout_p`` must be 0. ``fastattn_options`` are fastattn's keyword options, e.g.
    ``window=(W - 1, 0)``, ``softcap=50.0``, ``alignment="bottom_right"``, ``backend="numpy"``.

    Returns the output tensor (..., L, Ev) in the inputs' dtype on their device, or ``(out, lse)``
    with ``return_lse=True``. When query, key or value needs grad, ``out.backward`` computes
    their gradients with the fused backward (not through ``attn_mask``, ``alibi_slopes`` or the
    lse: a tensor needing grad there raises ``ValueError``).
    """
    if (attn_mask is None and is_causal is False and not fastattn_options
            and type(dropout_p) in (float, int) and dropout_p == 0):
        out = _decode_step(query, key, value, scale, enable_gqa)
        if out is not None:
            return out
    options = _options(fastattn_options)
    alibi = options.get("alibi_slopes")
    _check_tensors(query, key, value, attn_mask, alibi)
    if alibi is not None:
        options["alibi_slopes"] = _alibi_array(alibi)
    _prepare.check_dropout(dropout_p)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if torch.is_grad_enabled() and attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("attn_mask needs grad, but fastattn computes gradients only for query, "
                         "key and value; pass attn_mask.detach()")
    if needs_grad and options.get("return_lse"):
        raise ValueError("return_lse=True with query, key or value needing grad: the lse is "
                         "not differentiable here; compute it under torch.no_grad() or with "
                         "detached inputs")
    if needs_grad:
        return _Attention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                                options)
    want_lse = bool(options.get("return_lse"))
    out, lse = _forward(query, key, value, attn_mask, is_causal, scale, enable_gqa, options,
                        want_lse)
    return (out, lse) if want_lse else out
