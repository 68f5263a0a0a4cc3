"""Reading 16-bit inputs in place: ``widen(x)`` turns one loaded element into the compute dtype.

Numba has no bfloat16, and its float16 support on the CPU is no help for a kernel that must not
copy its inputs, so the host passes 16-bit arrays as integer views of their bits and the element
type says which format they hold (a type, not a runtime flag: each input dtype compiles its own
specialisation, with no branch in the loops that load):

- ``uint16``: bfloat16 bits (``STORAGE_CODES``: 2). The upper half of a float32: widened exactly
  by a shift and a bit cast.
- ``int16``: float16 bits (code 1). Widened exactly, subnormals, infinities and NaN included, by
  bit arithmetic written with selects, so LLVM vectorises the loops that load.
- a float (code 0): already the compute dtype; ``widen`` is the identity, so float32 and float64
  kernels compile to the code they were before.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._jit import FASTMATH

# The integer view the host makes of each 16-bit dtype (by the dtype's name: ml_dtypes'
# bfloat16 is not a NumPy builtin).
STORAGE_VIEWS = {"float16": np.int16, "bfloat16": np.uint16}
STORAGE_CODES = {"float16": 1, "bfloat16": 2}


def widen(x):
    """The element ``x`` of an input array as the compute dtype (see the module's doc)."""
    return x


@intrinsic
def _bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = context.cast(builder, args[0], signature.args[0], types.int32)
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float32_as_bits(typingctx, x):
    """Reinterpret the bits of a float32 as an int32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


_EXP_BITS = np.int32(0x7C00 << 13)     # float16's exponent field, moved to float32's place
_REBIAS = np.int32((127 - 15) << 23)   # float16's exponent bias to float32's
_INF_REBIAS = np.int32((255 - 31) << 23)
_SUBNORMAL_UNIT = np.float32(2.0 ** -24)  # float16's smallest subnormal


@overload(widen, fastmath=FASTMATH)  # (LLVM inlines it; Numba's IR inlining warns on it)
def _widen_overload(x):
    if isinstance(x, types.Float):
        return lambda x: x
    if x == types.uint16:  # bfloat16 bits
        return lambda x: _bits_as_float32(np.int32(x) << np.int32(16))
    if x == types.int16:  # float16 bits
        def widen_float16(x):
            h = np.int32(x) & np.int32(0xFFFF)
            magnitude = (h & np.int32(0x7FFF)) << np.int32(13)
            exponent = magnitude & _EXP_BITS
            normal = magnitude + _REBIAS
            special = magnitude + _INF_REBIAS  # inf and NaN: exponent all ones, payload kept
            # a subnormal (or zero) is its mantissa times 2^-24, exactly representable
            subnormal = _float32_as_bits(np.float32(h & np.int32(0x3FF)) * _SUBNORMAL_UNIT)
            bits = special if exponent == _EXP_BITS else normal
            bits = subnormal if exponent == 0 else bits
            return _bits_as_float32(bits | ((h & np.int32(0x8000)) << np.int32(16)))
        return widen_float16
    return None
