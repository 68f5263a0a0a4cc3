"""The CPU kernels (Numba ``njit(parallel=True)``), one module per kernel family.

- ``attention``: the fused, flash-style attention kernel (``attention``, ``pack_panels``);
- ``softmax``: the kernels that return whole matrices (``softmax``, ``similarity``,
  ``attention_weights``);
- shared pieces: ``rows`` (steps on one row of scores), ``tile`` (the register-tiled block
  product), ``_jit`` (compile options and the fast exp), ``options`` (argument bundles).

Importing compiles nothing: each kernel compiles on its first call and is cached on disk.
"""
from .attention import attention, pack_panels
from .options import MaskArgs, Pattern
from .softmax import attention_weights, similarity, softmax
from .tile import tile_cols

__all__ = ["attention", "pack_panels", "attention_weights", "similarity", "softmax", "MaskArgs",
           "Pattern", "tile_cols"]
