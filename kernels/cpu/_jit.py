"""One place for the options every CPU kernel is compiled with, and the fast exp they share."""
import functools
import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable

# Fast-math without nnan/ninf: masks are -inf and NaN must propagate, so LLVM may not assume
# either away. reassoc lets it vectorise the row sums and maxima.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

jit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, error_model="numpy",
                        nogil=True)
parallel_jit = functools.partial(jit, parallel=True)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def maxnum(typingctx, a, b):
    """max(a, b) ignoring a NaN operand (LLVM's maxnum): unlike a compare-and-branch, LLVM
    vectorises a row maximum written with it. Callers see NaN through the row's exp sum."""
    if a != b or not isinstance(a, types.Float):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
# ln 2 in two parts (Cody-Waite), so that k * ln2 subtracts nearly exactly.
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
# exp(r) on |r| <= ln2 / 2: a degree-6 polynomial fitted for relative error (1.9e-9, far below
# float32's rounding; evaluated in float32 the error is below 1e-7).
_EXP_POLY = tuple(np.float32(c) for c in (
    0.0013836845755577087, 0.008374815806746483, 0.04166822507977486, 0.16666419804096222,
    0.49999991059303284, 1.0, 1.0))
_EXP_LOWEST = np.float32(-88.0)   # gives k = -127, whose 2^k has all exponent bits 0: exactly 0
# Below ln(2^-126) = -87.3365 exp(x) is a denormal, and on Intel an operation that makes or reads
# one takes a microcode assist (measured: 7x the exp's time): flush those to exactly 0.
_EXP_FLUSH = np.float32(-87.33)


def exp_nonpositive(x):
    """exp(x) for x <= 0 or NaN, what a stable softmax computes (score - row max); in float32 a
    vectorisable version (relative error below 1.2e-7), else math.exp.

    llvmlite here has no SVML, so math.exp in a loop stays scalar; this one LLVM vectorises. A
    positive x is not clamped (it would overflow the exponent bits): with a clamp at the top too,
    LLVM merged the two into compares and blends, about a sixth of the softmax's time.
    """
    return math.exp(x)


@intrinsic
def _float32_bits_as_int32(typingctx, x):
    """The bits of a float32 as an int32 (no conversion)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


# 1.5 * 2^23: adding it rounds any |y| < 2^22 to an integer, which then sits in the low bits of
# the sum's mantissa.
_ROUND_TO_INTEGER = np.float32(12582912.0)


# Without reassoc, which would let LLVM fold the two parts of ln 2 back into one (relative error
# 3e-7 at the ends of the range, measured) and (y + c) - c into y.
@register_jitable(fastmath=FASTMATH - {"reassoc"})
def _exp_float32_in_range(x):
    # x = k ln2 + r with |r| <= ln2 / 2, so exp(x) = 2^k exp(r): exp(r) by a polynomial, 2^k
    # built in the exponent bits; x must lie in [_EXP_LOWEST, 0] or be NaN (which stays NaN
    # through r). x = -88 gives exactly 0, so most of float32's denormal range is flushed to 0.
    # k by the rounding constant rather than floor(x log2e + 1/2): four instructions instead of
    # six (a round is two), the exp 20% faster (measured), the same results.
    y = x * _LOG2E + _ROUND_TO_INTEGER
    k = y - _ROUND_TO_INTEGER
    r = x - k * _LN2_HI - k * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    # y's low 9 bits are k (mod 512): shifted into the exponent field they make 2^k with the bias
    return p * _int32_bits_as_float32((_float32_bits_as_int32(y) << np.int32(23)) +
                                      np.int32(127 << 23))


def exp_flushed(x, negligible):
    """exp(x) for x <= 0 or NaN, and exactly 0 where x < ``negligible`` (at least -87): the
    online softmax's exp, with one select for both its flush and the exp's range (in float32;
    else math.exp)."""
    return math.exp(x) if not x < negligible else 0.0


@overload(exp_flushed, fastmath=FASTMATH)
def _exp_flushed_overload(x, negligible):
    if x != types.float32:
        return lambda x, negligible: math.exp(x) if not x < negligible else 0.0

    def exp_flushed_float32(x, negligible):
        if x < negligible:  # false for NaN, which passes through
            x = _EXP_LOWEST
        return _exp_float32_in_range(x)

    return exp_flushed_float32


@overload(exp_nonpositive, fastmath=FASTMATH)
def _exp_nonpositive_overload(x):
    if x != types.float32:
        return lambda x: math.exp(x)

    def exp_nonpositive_float32(x):
        if x < _EXP_FLUSH:  # false for NaN, which passes through; -inf gives exactly 0
            x = _EXP_LOWEST
        return _exp_float32_in_range(x)

    return exp_nonpositive_float32


# 2^r - 1 = r P(r) on |r| <= 1/2: P of degree 5 fitted for relative error (2.1e-8 with these
# float32 coefficients; an expm1 rather than an exp, so that tanh of a small x keeps its low bits).
_EXP2M1_POLY = tuple(np.float32(c) for c in (
    1.5403512225020677e-4, 1.3390735257416964e-3, 9.618237614631653e-3, 5.550357326865196e-2,
    0.24022649228572845, 0.6931471824645996))
_MINUS_2_LOG2E = np.float32(-2.0 * 1.4426950408889634)
# Above 9.1 tanh rounds to 1 in float32: clamping |x| there keeps 2^k in the exponent's range and
# makes tanh(inf) exactly 1 (NaN passes the compare and stays NaN).
_TANH_CLAMP = np.float32(9.1)


def tanh(x):
    """tanh(x); in float32 a vectorisable version (at most 3.1 ulp), else math.tanh.

    llvmlite here has no SVML, so math.tanh in a loop stays scalar (the softcap's cost). This
    one is a single branch-free formula, tanh|x| = -m / (2 + m) with m = expm1(-2|x|), and the
    sign of x: 22 vector instructions for 16 scores, where an exp-based formula with a separate
    polynomial for small |x| took 33 (measured on one core: 0.76 against 0.98 ns a score).
    Error, measured on 4 million float32 of [0, 10] and their negatives: at most 1.8 ulp where
    |x| >= 0.75 (|tanh| > 0.63, the scores a softmax weighs most), 3.1 ulp below, 0.44 on
    average (NumPy's float32 tanh: at most 1.4). The attention outputs' errors are the same as
    with the 1.5-ulp formula before it (measured on the shapes of the softcap tests).
    """
    return math.tanh(x)


@register_jitable(fastmath=FASTMATH - {"reassoc"})
def _tanh_float32(x):
    ax = abs(x)
    if ax > _TANH_CLAMP:
        ax = _TANH_CLAMP
    # expm1(-2|x|) = 2^t - 1 with t = k + r, k an integer and |r| <= 1/2:
    # 2^k (2^r - 1) + (2^k - 1), 2^k built in the exponent bits. (A Cody-Waite split of t, as
    # in the exp above, changed neither the worst nor the mean error here: measured.)
    y = ax * _MINUS_2_LOG2E + _ROUND_TO_INTEGER  # k = round(t) as in the exp above
    k = y - _ROUND_TO_INTEGER
    r = ax * _MINUS_2_LOG2E - k
    p = _EXP2M1_POLY[0]
    for c in _EXP2M1_POLY[1:]:
        p = p * r + c
    two_k = _int32_bits_as_float32((_float32_bits_as_int32(y) << np.int32(23)) +
                                   np.int32(127 << 23))
    m = two_k * (p * r) + (two_k - np.float32(1.0))
    # 2 + m in one rounding from exact parts rather than two (the mean error 0.56 -> 0.44 ulp)
    d = two_k * (p * r) + (two_k + np.float32(1.0))
    # m / d is -tanh|x|; copysign keeps only its magnitude
    return math.copysign(m / d, x)


@overload(tanh, fastmath=FASTMATH)
def _tanh_overload(x):
    if x != types.float32:
        return lambda x: math.tanh(x)
    return lambda x: _tanh_float32(x)


@intrinsic
def prefer_512_bit_vectors(typingctx):
    """Let LLVM vectorise the loops of the calling function with 512-bit vectors where the
    machine has them (clang's -mprefer-vector-width=512, as a function attribute).

    LLVM's tuning for AVX-512 Intel CPUs prefers 256-bit vectors in the loops it vectorises
    itself; for the per-score row steps (tanh, exp: long chains of arithmetic on each score,
    L1-resident) the 512-bit loops take about half the instructions. On machines without
    AVX-512 the attribute changes nothing. llvmlite knows only a fixed list of attribute names, so this one is
    written into the attribute set directly (it is printed as is into the IR)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        try:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        except TypeError:  # an llvmlite whose attribute set is no set: LLVM's choice stands
            pass
        return context.get_dummy_value()

    return sig, codegen
