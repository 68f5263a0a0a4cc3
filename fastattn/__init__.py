"""fastattn: fused attention kernels for NumPy users, compiled with Numba.

    >>> import numpy as np, fastattn
    >>> q = k = v = np.random.default_rng(0).standard_normal((1, 8, 128, 64), dtype=np.float32)
    >>> out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

Public API: :func:`scaled_dot_product_attention` (and its gradients,
:func:`scaled_dot_product_attention_backward`), :func:`attention_weights`, :func:`softmax`,
:func:`similarity`, :func:`merge_attention`, :func:`attention_with_kvcache`,
:func:`varlen_attention`, :func:`flex_attention` (with :func:`create_block_mask`),
:func:`backends`, :class:`MultiHeadAttention`;
:mod:`fastattn.reference` is the NumPy oracle.
"""
import importlib.util as _util
import os as _os
import sys as _sys


def _kernels_from_source_tree() -> None:
    # Installed, the kernels are the subpackage fastattn/kernels (setup.py maps kernels/ there).
    # In a source checkout (python -m fastattn run from the repository root, the repository on
    # PYTHONPATH, an editable install) they sit in kernels/ beside this package: load those, the
    # kernels of this very checkout, under the same name.
    here = _os.path.dirname(__file__)
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return
    where = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(where, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _util.spec_from_file_location(__name__ + ".kernels", init,
                                         submodule_search_locations=[where])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_kernels_from_source_tree()

# Before PyTorch can load its OpenMP runtime with the default spin (see _blas, "the other thread
# pools"): a dlopen, no threads started.
from . import _blas  # noqa: E402
_blas.load_openmp_runtime_early()

from . import reference  # noqa: E402
from ._api import attention_weights, scaled_dot_product_attention, similarity, softmax  # noqa: E402
from ._backends import BackendUnavailableError, backends  # noqa: E402
from .backward import scaled_dot_product_attention_backward  # noqa: E402
from .flex import BlockMask, and_masks, create_block_mask, flex_attention, or_masks  # noqa: E402
from .kvcache import attention_with_kvcache  # noqa: E402
from .merge import merge_attention  # noqa: E402
from .varlen import varlen_attention  # noqa: E402
from .mha import MultiHeadAttention, multi_head_attention  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention",
    "scaled_dot_product_attention_backward",
    "attention_weights",
    "softmax",
    "similarity",
    "backends",
    "BackendUnavailableError",
    "reference",
    "MultiHeadAttention",
    "multi_head_attention",
    "merge_attention",
    "flex_attention",
    "create_block_mask",
    "BlockMask",
    "and_masks",
    "or_masks",
    "attention_with_kvcache",
    "varlen_attention",
]
