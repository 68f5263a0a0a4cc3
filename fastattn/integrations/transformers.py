"""fastattn as an attention implementation of Hugging Face transformers.

    >>> import fastattn.integrations.transformers as fa_hf
    >>> fa_hf.register()                    # once, as "fastattn"
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastattn")

:func:`register` adds :func:`attention_forward` to ``transformers.AttentionInterface`` and
:func:`attention_mask` to its mask interface. The mask interface hands the attention the model's
padding mask as it is, a (B, 1, 1, S) bool view of the 2-d ``attention_mask`` (None without
padding), marked as such; the attention adds the causal pattern, the sliding window
(``window=(W - 1, 0)``, blocks outside skipped by the kernel) and the cache's offset
(bottom-right alignment: query i sits at key i + S - L) itself. Patterns it does not recognise
(packed sequences, image blocks, chunked attention, a static cache) are materialised by
transformers' own ``sdpa_mask``, and the attention then uses that mask as SDPA would.

Grouped-query attention runs without ``repeat_kv``; ``softcap`` (Gemma 2), ``is_causal``,
``scaling`` and cross-attention pass through; decode reads the model's own cache tensors in
place. Training runs through :func:`fastattn.torch.scaled_dot_product_attention`'s autograd.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys


def _installed_kernels_first() -> None:
    """Run from fastattn's source tree (its root on the path, as ``python -m pytest`` puts it),
    the tree's ``kernels/`` (which fastattn loads as ``fastattn.kernels``) is importable as a
    top-level ``kernels`` and shadows Hugging Face's package of that name, which transformers
    5.25 imports when it is installed (``from kernels import CUDAProperties`` failed). So the
    installed one is imported first, with the tree off the path for that import only."""
    if "kernels" in sys.modules:
        return
    tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.origin or \
            os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))) != tree:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != tree]
    try:
        importlib.import_module("kernels")
    except Exception:  # transformers will say what is wrong with it
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_installed_kernels_first()

try:
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                            causal_mask_function, sdpa_mask)
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"fastattn.integrations.transformers needs torch and transformers >= 5.24 "
                      f"(pip install 'fastattn[hf]'): {exc}") from exc

from .. import torch as fastattn_torch

__all__ = ["register", "attention_forward", "attention_mask"]

# Set on the masks made by attention_mask(): "causal" or "bidirectional", the pattern the
# attention adds to this padding-only mask.
PATTERN = "_fastattn_pattern"


def _padding(attention_mask, kv_length: int, kv_offset: int):
    """The (B, S) keep-mask of the keys kv_offset .. kv_offset + kv_length (a view, no copy unless
    the 2-d mask is shorter than the keys), or None when no key is padding."""
    if attention_mask is None:
        return None
    short = kv_offset + kv_length - attention_mask.shape[-1]
    if short > 0:  # keys past the 2-d mask (generation appends them) take part, as in sdpa_mask
        attention_mask = torch.nn.functional.pad(attention_mask, (0, short), value=True)
    padding = attention_mask[:, kv_offset:kv_offset + kv_length]
    return None if bool(padding.all()) else padding


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=causal_mask_function, attention_mask=None, local_size=None,
                   allow_is_causal_skip: bool = True, allow_is_bidirectional_skip: bool = False,
                   **kwargs):
    """transformers' mask interface for fastattn: the padding mask in place, or None.

    Causal (with or without a sliding window) and bidirectional patterns are recognised; the
    causal ones only where the queries sit bottom-right on the keys (no cache, a dynamic cache,
    a sliding-window cache). Anything else is the (B, 1, L, S) bool mask of ``sdpa_mask``.
    """
    offset_known = isinstance(q_offset, int) and isinstance(kv_offset, int)
    bottom_right = offset_known and q_offset - kv_offset == kv_length - q_length
    if mask_function is bidirectional_mask_function:
        pattern = "bidirectional"
    elif allow_is_causal_skip and bottom_right and (mask_function is causal_mask_function
                                                    or local_size is not None):
        # create_causal_mask / create_sliding_window_causal_mask without overlays: transformers
        # allows skipping the mask (sdpa's is_causal) exactly when the pattern is plain.
        pattern = "causal"
    else:
        kwargs.pop("dtype", None)
        kwargs.pop("config", None)
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                         attention_mask, local_size, allow_is_causal_skip=False,
                         allow_is_bidirectional_skip=False, **kwargs)
    padding = _padding(attention_mask, kv_length, kv_offset)
    if padding is None:
        return None
    mask = padding[:, None, None, :].to(torch.bool)
    setattr(mask, PATTERN, pattern)
    return mask


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling=None, is_causal=None, sliding_window=None, softcap=None,
                      fastattn_options=None, **kwargs):
    """transformers' attention interface: query (B, Hq, L, D), key and value (B, Hkv, S, D) ->
    ((B, L, Hq, Dv) output, None). ``fastattn_options`` (from :func:`register`) go to
    :func:`fastattn.torch.scaled_dot_product_attention`."""
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='fastattn' does not take position_bias "
                                  "or attention sinks (s_aux); use 'eager' for this model")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    options = {}
    if softcap:
        options["softcap"] = float(softcap)
    pattern = getattr(attention_mask, PATTERN, None) if attention_mask is not None else None
    if attention_mask is not None and pattern is None:
        # A complete mask (from sdpa_mask, or the model's own): it holds the causal pattern and
        # any window, as for SDPA.
        causal = False
    else:
        causal = bool(is_causal) and pattern != "bidirectional"
        L, S = query.shape[-2], key.shape[-2]
        # Only what changes the result is passed on (so the plainest kernel runs): with S <= W
        # every key is in the window; one query row sits on the last key and sees every key;
        # with L == S both alignments agree.
        if causal and sliding_window and S > sliding_window:
            options["window"] = (int(sliding_window) - 1, 0)
        if causal and L == 1 and "window" not in options:
            causal = False
        if causal and L != S:
            options["alignment"] = "bottom_right"
        elif "window" in options and L != S:
            options["alignment"] = "bottom_right"
    options = {**(fastattn_options or {}), **options}
    out = fastattn_torch.scaled_dot_product_attention(
        query, key, value, attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1], **options)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = "fastattn", **fastattn_options) -> str:
    """Add fastattn to transformers as ``attn_implementation=name``; returns ``name``.

    ``fastattn_options`` (e.g. ``backend="numpy"``) go to every attention call of models using
    this name.
    """
    options = fastattn_torch._options(fastattn_options)  # unknown ones fail here, not in a model

    def forward(module, *args, **kwargs):
        return attention_forward(module, *args, fastattn_options=options, **kwargs)

    AttentionInterface.register(name, forward if fastattn_options else attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name
