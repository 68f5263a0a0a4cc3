"""fastattn: fused attention kernels for NumPy users, compiled with Numba.

    >>> import numpy as np, fastattn
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 8, 128, 64), dtype=np.float32)
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

Public API: :func:`scaled_dot_product_attention`, :func:`attention_weights`, :func:`softmax`,
:func:`similarity`, :func:`backends`; :mod:`fastattn.reference` is the NumPy oracle.
"""
from . import reference
from ._api import attention_weights, scaled_dot_product_attention, similarity, softmax
from ._backends import BackendUnavailableError, backends
from .mha import MultiHeadAttention, multi_head_attention

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "attention_weights",
    "softmax",
    "similarity",
    "backends",
    "BackendUnavailableError",
    "reference",
    "MultiHeadAttention",
    "multi_head_attention",
]
