"""Scalar activations for the compiled kernels.

The sigmoid never overflows: for ``x >= 0`` it evaluates ``1 / (1 + e^-x)``
and for ``x < 0`` the algebraically equal ``e^x / (1 + e^x)``, so the
exponential's argument is never positive.  It saturates to exactly 1 once
``e^-x`` is below half an ulp of 1, and to exactly 0 once ``e^x`` underflows.
"""

import math

from ._config import jit


@jit()
def sigmoid(x):
    """Logistic function, overflow-free for every finite ``x``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@jit()
def tanh(x):
    """Hyperbolic tangent."""
    return math.tanh(x)
