"""The CUDA kernels (``numba.cuda``), one module per kernel family.

- ``attention``: ``attention_kernels(tiles, dtype)``, the attention-weights and similarity
  kernels for one tile shape;
- ``fused``: ``fused_attention_kernel(tiles, dtype)``, the fused attention kernel (``FusedTiles``);
- ``fused_mma``: ``mma_attention_kernel(tiles, kind)``, the same on tensor cores for float16 and
  bfloat16 inputs (``MmaTiles``);
- ``softmax``: ``softmax_kernel(tiles, dtype)``;
- ``decode``: ``decode_kernels(tiles, dtype)``, the row kernels of decoding from a KV cache and
  of packed variable-length batches (work items, the merge of split keys, the cache append);
- ``_common``: the tile shapes (``Tiles``, ``RowTiles``) and the device-function decorator.

Importing compiles nothing: the factories build (and cache) kernels, which compile on first launch.
"""
from ._common import _SIMULATOR, RowTiles, Tiles
from .attention import attention_kernels
from .decode import decode_kernels
from .fused import FusedTiles, fused_attention_kernel
from .fused_mma import MmaTiles, mma_attention_kernel
from .softmax import softmax_kernel

__all__ = ["Tiles", "RowTiles", "FusedTiles", "MmaTiles", "attention_kernels",
           "decode_kernels", "fused_attention_kernel", "mma_attention_kernel", "softmax_kernel"]
