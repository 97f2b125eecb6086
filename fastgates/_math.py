"""Activations for the compiled kernels: exact and fast, float32 and float64.

Two modes (chosen with :func:`fastgates.set_activation_mode`):

``"exact"``
    ``math.exp``/``math.tanh`` from the C library.  Without SVML (pip's
    llvmlite has none) these are scalar calls of about 20 ns each and stop
    LLVM from vectorising the loop around them.
``"fast"`` (default)
    Branch-free polynomial versions made of fused multiply-adds, one
    division, comparisons and exponent-field bit casts, which LLVM vectorises (16
    float32 or 8 float64 lanes with AVX-512).  Separate versions for float32
    and float64 so that a float32 kernel never widens to float64.

The mode reaches compiled code as an argument, ``exact``, that is ``None``
for the fast activations and ``True`` for the exact ones, so that Numba
compiles no exact code into the fast mode's kernels: it drops a branch on
``exact is None`` when the argument's type is ``None`` (only then: a
``bool`` argument compiles both branches).  A first call in the default
mode compiled 0.2-1.0 s less for it (the GRU the most: its general path
went with the exact code).  Never ``False``, and never a branch on the
argument's truth (Numba takes ``None`` as true): the scalar functions
below refuse a ``False`` written in compiled code.
``_config.exact_arg()`` makes the argument.

Every function is also correct at the edges in both modes: no overflow for
any finite input, NaN in gives NaN out, and saturation is exact: the sigmoid
returns exactly 0 and 1, ``tanh`` exactly -1 and 1, once the true value rounds
there.

Error bounds of the fast versions, measured against the exact function
computed in higher precision over dense grids of the whole real line and on
random draws (``tests/test_math.py`` checks the sigmoid and tanh bounds,
the functions the kernels call; measured on those grids: sigmoid 2.6 ulp,
tanh 2.5 (float32) and 2.6 (float64), the internal ``exp`` 0.9):

========  ===========================  ===============================
function  float32                      float64
========  ===========================  ===============================
exp       2 ulp                        2 ulp
sigmoid   3 ulp                        3 ulp
tanh      4 ulp                        4 ulp
========  ===========================  ===============================

(an ulp taken of the exact result, for results in the normal range: the fast
``exp`` flushes results below the smallest normal number to 0, so the
sigmoid's far negative tail, below ``1e-38`` in float32 and ``1e-308`` in
float64, is 0 instead of a subnormal.)

Method.  ``exp(x) = 2^n exp(r)`` with ``n = round(x / ln 2)`` and
``r = x - n ln 2`` (Cody-Waite: ``ln 2`` split in a high part exact in a few
bits and a low part), ``|r| <= ln(2) / 2``; ``exp(r)`` by its Taylor
polynomial (degree 7 in float32, 13 in float64, truncation error below half
an ulp) in Horner form with fused multiply-adds; ``2^n`` built directly in
the exponent field.  ``n`` is rounded by adding and subtracting
``1.5 * 2^mantissa bits``, which also leaves it as an integer in the low bits
of the sum, so there is no float-to-integer conversion.  These two changes
(FMA, no conversion) halved the time per element: float32 sigmoid 1.16 ->
0.63 ns, tanh 0.76 -> 0.43; float64 1.97 -> 1.36 and 1.77 -> 1.15 (one
core, 256-element vectors in L1).  The sigmoid is
``1 / (1 + e)`` or ``e / (1 + e)`` with ``e = exp(-|x|) <= 1``, so nothing
overflows.  ``tanh(|x|) = -u / (2 + u)`` with ``u = exp(-2|x|) - 1``
evaluated as ``2^n (exp(r) - 1) + (2^n - 1)``, the polynomial for
``exp(r) - 1`` having no constant term, so that nothing cancels near 0 and
there is no branch between a small-argument and a large-argument formula
(a select between two such formulas stopped LLVM from vectorising).
"""

import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._config import jit


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 as a float32 (no conversion)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    """Reinterpret an int64 as a float64 (no conversion)."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# ---------------------------------------------------------------------------
# float32

@intrinsic
def _f32_bits(typingctx, x):
    """Reinterpret a float32 as an int32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _f64_bits(typingctx, x):
    """Reinterpret a float64 as an int64 (no conversion)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``): exact IEEE fused multiply-add.

    Without ``fastmath`` LLVM never fuses a multiply and an add by itself;
    this asks for it where the single rounding is wanted.  It vectorises, and
    gives the same bits on every machine (a library call where the hardware
    has no FMA).
    """
    if not (a == b == c and a in (types.float32, types.float64)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


_F32 = np.float32
_F32_ZERO = _F32(0.0)
_F32_HALF = _F32(0.5)
_F32_ONE = _F32(1.0)
_F32_TWO = _F32(2.0)
_F32_LOG2E = _F32(1.4426950408889634)
_F32_LN2_HI = _F32(0.693359375)           # 9 significant bits: n * hi is exact
_F32_LN2_LO = _F32(-2.12194440e-4)
_F32_EXP_LO = _F32(-87.33654)             # below: result under the smallest normal
_F32_EXP_HI = _F32(88.72283)              # above: overflow
_F32_EXPM1_LO = _F32(-20.0)               # exp(y) - 1 rounds to -1 below
_F32_EXP_C = tuple(_F32(1.0 / math.factorial(k)) for k in range(8))
# Adding 1.5 * 2^23 to |t| < 2^22 rounds t to an integer n (to nearest) and
# leaves n in the low mantissa bits: n = bits(t + M) - bits(M).  No float to
# integer conversion (which went through int64 and cost a third of the loop).
_F32_ROUND = _F32(12582912.0)
_F32_ROUND_BITS = np.int32(0x4B400000)


@jit()
def exp_f32(x):
    """Fast float32 ``exp``; 0 below the normal range, inf above it."""
    xc = min(max(x, _F32_EXP_LO), _F32_EXP_HI)
    m = xc * _F32_LOG2E + _F32_ROUND
    n = m - _F32_ROUND                                  # round(x / ln 2)
    k = _f32_bits(m) - _F32_ROUND_BITS                  # the same, as an integer
    r = _fma(-n, _F32_LN2_HI, xc)                       # exact: n * hi has few bits
    r = _fma(-n, _F32_LN2_LO, r)
    c = _F32_EXP_C
    p = c[7]
    p = _fma(p, r, c[6])
    p = _fma(p, r, c[5])
    p = _fma(p, r, c[4])
    p = _fma(p, r, c[3])
    p = _fma(p, r, c[2])
    p = _fma(p, r, c[1])
    p = _fma(p, r, c[0])
    # 2^k in two factors: 2^128 (k = 128 at the top of the range) has no
    # float32 exponent of its own.
    k1 = k >> np.int32(1)
    k2 = k - k1
    s1 = _f32_from_bits(np.int32((k1 + np.int32(127)) << np.int32(23)))
    s2 = _f32_from_bits(np.int32((k2 + np.int32(127)) << np.int32(23)))
    e = (p * s1) * s2
    if x < _F32_EXP_LO:
        e = _F32_ZERO
    if x > _F32_EXP_HI:
        e = np.float32(np.inf)
    if x != x:
        e = x
    return e


@jit()
def sigmoid_f32(x):
    """Fast float32 logistic function."""
    e = exp_f32(-abs(x))
    s = _F32_ONE / (_F32_ONE + e)
    # NaN: e and s are NaN already.
    return s if x >= _F32_ZERO else e * s


@jit()
def _expm1_neg_f32(y):
    """Fast float32 ``exp(y) - 1`` for ``y <= 0`` (accurate near 0 too)."""
    y = _F32_EXPM1_LO if y < _F32_EXPM1_LO else y       # keeps NaN
    m = y * _F32_LOG2E + _F32_ROUND
    n = m - _F32_ROUND
    k = _f32_bits(m) - _F32_ROUND_BITS
    r = _fma(-n, _F32_LN2_HI, y)
    r = _fma(-n, _F32_LN2_LO, r)
    c = _F32_EXP_C
    q = c[7]
    q = _fma(q, r, c[6])
    q = _fma(q, r, c[5])
    q = _fma(q, r, c[4])
    q = _fma(q, r, c[3])
    q = _fma(q, r, c[2])
    q = _fma(q, r, c[1])
    q = q * r                                           # exp(r) - 1
    s = _f32_from_bits(np.int32((k + np.int32(127)) << np.int32(23)))
    return _fma(s, q, s - _F32_ONE)                     # 2^k exp(r) - 1


@jit()
def tanh_f32(x):
    """Fast float32 hyperbolic tangent."""
    u = _expm1_neg_f32(-_F32_TWO * abs(x))
    v = -u / (_F32_TWO + u)
    return v if x >= _F32_ZERO else -v


# ---------------------------------------------------------------------------
# float64

_F64_ZERO = 0.0
_F64_HALF = 0.5
_F64_ONE = 1.0
_F64_TWO = 2.0
_F64_LOG2E = 1.4426950408889634
_F64_LN2_HI = 6.93147180369123816490e-01   # low bits zero: n * hi is exact
_F64_LN2_LO = 1.90821492927058770002e-10
_F64_EXP_LO = -708.3964185322641          # below: result under the smallest normal
_F64_EXP_HI = 709.782712893384             # above: overflow
_F64_EXPM1_LO = -40.0                      # exp(y) - 1 rounds to -1 below
_F64_EXP_C = tuple(1.0 / math.factorial(k) for k in range(14))
_F64_ROUND = 6755399441055744.0            # 1.5 * 2^52, see _F32_ROUND
_F64_ROUND_BITS = np.int64(0x4338000000000000)


@jit()
def exp_f64(x):
    """Fast float64 ``exp``; 0 below the normal range, inf above it."""
    xc = min(max(x, _F64_EXP_LO), _F64_EXP_HI)
    m = xc * _F64_LOG2E + _F64_ROUND
    n = m - _F64_ROUND
    k = _f64_bits(m) - _F64_ROUND_BITS
    r = _fma(-n, _F64_LN2_HI, xc)
    r = _fma(-n, _F64_LN2_LO, r)
    c = _F64_EXP_C
    p = c[13]
    p = _fma(p, r, c[12])
    p = _fma(p, r, c[11])
    p = _fma(p, r, c[10])
    p = _fma(p, r, c[9])
    p = _fma(p, r, c[8])
    p = _fma(p, r, c[7])
    p = _fma(p, r, c[6])
    p = _fma(p, r, c[5])
    p = _fma(p, r, c[4])
    p = _fma(p, r, c[3])
    p = _fma(p, r, c[2])
    p = _fma(p, r, c[1])
    p = _fma(p, r, c[0])
    k1 = k >> np.int64(1)                               # see exp_f32
    k2 = k - k1
    s1 = _f64_from_bits((k1 + np.int64(1023)) << np.int64(52))
    s2 = _f64_from_bits((k2 + np.int64(1023)) << np.int64(52))
    e = (p * s1) * s2
    if x < _F64_EXP_LO:
        e = _F64_ZERO
    if x > _F64_EXP_HI:
        e = np.inf
    if x != x:
        e = x
    return e


@jit()
def sigmoid_f64(x):
    """Fast float64 logistic function."""
    e = exp_f64(-abs(x))
    s = _F64_ONE / (_F64_ONE + e)
    # NaN: e and s are NaN already.
    return s if x >= _F64_ZERO else e * s


@jit()
def _expm1_neg_f64(y):
    """Fast float64 ``exp(y) - 1`` for ``y <= 0`` (accurate near 0 too)."""
    y = _F64_EXPM1_LO if y < _F64_EXPM1_LO else y       # keeps NaN
    m = y * _F64_LOG2E + _F64_ROUND
    n = m - _F64_ROUND
    k = _f64_bits(m) - _F64_ROUND_BITS
    r = _fma(-n, _F64_LN2_HI, y)
    r = _fma(-n, _F64_LN2_LO, r)
    c = _F64_EXP_C
    q = c[13]
    q = _fma(q, r, c[12])
    q = _fma(q, r, c[11])
    q = _fma(q, r, c[10])
    q = _fma(q, r, c[9])
    q = _fma(q, r, c[8])
    q = _fma(q, r, c[7])
    q = _fma(q, r, c[6])
    q = _fma(q, r, c[5])
    q = _fma(q, r, c[4])
    q = _fma(q, r, c[3])
    q = _fma(q, r, c[2])
    q = _fma(q, r, c[1])
    q = q * r                                           # exp(r) - 1
    s = _f64_from_bits((k + np.int64(1023)) << np.int64(52))
    return _fma(s, q, s - _F64_ONE)                     # 2^k exp(r) - 1


@jit()
def tanh_f64(x):
    """Fast float64 hyperbolic tangent."""
    u = _expm1_neg_f64(-_F64_TWO * abs(x))
    v = -u / (_F64_TWO + u)
    return v if x >= _F64_ZERO else -v


# ---------------------------------------------------------------------------
# exact (C library), any float type


@jit()
def sigmoid_exact(x):
    """Logistic function from ``math.exp``, overflow-free for every finite ``x``."""
    if x >= 0:
        return 1 / (1 + math.exp(-x))
    e = math.exp(x)
    return e / (1 + e)


@jit()
def tanh_exact(x):
    """Hyperbolic tangent from ``math.tanh``."""
    return math.tanh(x)


# ---------------------------------------------------------------------------
# the float type's 1 (a literal 1.0 would widen float32 arithmetic to float64)


def one(x):
    """1 in ``x``'s float type (a literal 1.0 would widen float32 to float64)."""
    raise NotImplementedError("only callable from compiled code")


@overload(one, jit_options={"cache": True})
def _one_overload(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    if x == types.float64:
        return lambda x: 1.0
    return None


# ---------------------------------------------------------------------------
# whole-vector activations, in place: the mode is tested once per call, so
# each loop body is straight-line code that LLVM can vectorise.


def sigmoid_fast(x):
    """Fast logistic function in ``x``'s float type."""
    raise NotImplementedError("only callable from compiled code")


def tanh_fast(x):
    """Fast hyperbolic tangent in ``x``'s float type."""
    raise NotImplementedError("only callable from compiled code")


@overload(sigmoid_fast, jit_options={"cache": True})
def _sigmoid_fast_overload(x):
    if x == types.float32:
        return lambda x: sigmoid_f32(x)
    if x == types.float64:
        return lambda x: sigmoid_f64(x)
    return None


@overload(tanh_fast, jit_options={"cache": True})
def _tanh_fast_overload(x):
    if x == types.float32:
        return lambda x: tanh_f32(x)
    if x == types.float64:
        return lambda x: tanh_f64(x)
    return None


def sigmoid_scalar(x, exact):
    """Logistic function of ``x`` in ``x``'s float type, fast or exact."""
    raise NotImplementedError("only callable from compiled code")


def tanh_scalar(x, exact):
    """Hyperbolic tangent of ``x`` in ``x``'s float type, fast or exact."""
    raise NotImplementedError("only callable from compiled code")


# The exact versions compute in float64 (math.exp of a float32 mixes with
# Python's float); the result is rounded back to the argument's type, as the
# in-place versions do by storing it, so that no float64 value leaks into
# float32 arithmetic.
def _exact_mode(exact):
    """Whether the mode argument's type says exact (see the module's docstring)."""
    if isinstance(exact, types.NoneType):
        return False
    if isinstance(exact, types.BooleanLiteral) and not exact.literal_value:
        raise TypeError("fastgates' activation mode argument is None (fast) or True (exact), "
                        "never False")
    return True


@overload(sigmoid_scalar, jit_options={"cache": True})
def _sigmoid_scalar_overload(x, exact):
    exact = _exact_mode(exact)
    if x == types.float32:
        return ((lambda x, exact: np.float32(sigmoid_exact(x))) if exact
                else (lambda x, exact: sigmoid_f32(x)))
    if x == types.float64:
        return (lambda x, exact: sigmoid_exact(x)) if exact else (lambda x, exact: sigmoid_f64(x))
    return None


@overload(tanh_scalar, jit_options={"cache": True})
def _tanh_scalar_overload(x, exact):
    exact = _exact_mode(exact)
    if x == types.float32:
        return ((lambda x, exact: np.float32(tanh_exact(x))) if exact
                else (lambda x, exact: tanh_f32(x)))
    if x == types.float64:
        return (lambda x, exact: tanh_exact(x)) if exact else (lambda x, exact: tanh_f64(x))
    return None


@jit()
def sigmoid_inplace(v, exact):
    """``v[:] = sigmoid(v)`` for a 1-D array; ``exact`` None (fast) or True."""
    if exact is None:
        for j in range(v.shape[0]):
            v[j] = sigmoid_fast(v[j])
    else:
        for j in range(v.shape[0]):
            v[j] = sigmoid_exact(v[j])


@jit()
def tanh_inplace(v, exact):
    """``v[:] = tanh(v)`` for a 1-D array; ``exact`` None (fast) or True."""
    if exact is None:
        for j in range(v.shape[0]):
            v[j] = tanh_fast(v[j])
    else:
        for j in range(v.shape[0]):
            v[j] = tanh_exact(v[j])
