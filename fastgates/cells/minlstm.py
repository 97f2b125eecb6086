"""minLSTM (Feng et al. 2024, "Were RNNs all we needed?"): the cell and its kernels.

An LSTM whose gates see only the input, its forget and input gates
normalised to sum to one.  Rows f, i, n (``G = 3H``), parameters
``weight_ih`` and ``bias_ih`` only::

    f   = σ(W_if x + b_if),   i = σ(W_ii x + b_ii)
    n   = W_in x + b_in            (positive: g(W_in x + b_in))
    f'  = f / (f + i),        i' = i / (f + i)
    h_t = f' ⊙ h_{t-1} + i' ⊙ n

so ``a_t = f'``, ``b_t = i' ⊙ n`` in :mod:`fastgates._scan`'s terms.
Where both gates are below ``2**-100`` (pre-activations below about -69;
in float32 their sum would underflow to 0 from about -87 on, 0/0)
``f' = σ(a_f - a_i)`` and ``i' = σ(a_i - a_f)``, the same values to
rounding (``σ(v) = e^v (1 + O(e^v))`` there).  An input gate of 0 makes
``f' = 1``, ``i' = 0``: ``h_{t-1}`` is kept bit for bit.

The tape keeps ``f'``, ``i'``, ``n`` as gates (the activated projection)
and the raw ``f``, ``i`` as its ``aux`` array (their derivatives): with ``δ = g ⊙ (h_{t-1} - n) ⊙ f' ⊙ i'``,
the pre-activations' gradients are ``δ (1 - f)``, ``-δ (1 - i)`` and
``g ⊙ i' ⊙ g'(v)``.
"""

import numpy as np
from numba import prange

from .._config import jit
from .._linalg import copy_vector
from .._math import one, sigmoid_inplace, sigmoid_scalar
from .scan import ScanCell, candidate_inplace, candidate_slopes, row_range, state_before

# Below this sum of the two gates the ratio is taken from the difference of
# the pre-activations (see the module's notes): normal in both dtypes.
_TINY = 2.0 ** -100


@jit()
def _normalise(pre, fi, out, exact):
    """``out[:2H]`` = ``(f', i')`` from the gates ``fi`` = ``(f, i)`` and, where both
    are below _TINY, from their pre-activations ``pre[:2H]`` (``out`` may be
    ``pre``: element ``j`` and ``H + j`` of both are read before written)."""
    H = fi.shape[0] // 2
    few = 0
    for j in range(H):
        few += fi[j] + fi[H + j] < _TINY
    if few == 0:
        for j in range(H):
            s = fi[j] + fi[H + j]
            out[j] = fi[j] / s
            out[H + j] = fi[H + j] / s
    else:
        for j in range(H):
            f = fi[j]
            i = fi[H + j]
            s = f + i
            if s < _TINY:
                d = pre[j] - pre[H + j]
                out[j] = sigmoid_scalar(d, exact)
                out[H + j] = sigmoid_scalar(-d, exact)
            else:
                out[j] = f / s
                out[H + j] = i / s


@jit(parallel=True)
def minlstm_activate(xw, lengths, positive, exact, aux, per_task):
    """The projection ``xw`` (t, B, 3H) becomes the gates ``f'``, ``i'``, ``n``, in place.

    ``aux`` (t, B, 2H) receives the raw ``f``, ``i`` when not empty.
    Padded steps 0.  ``per_task`` rows per task of the parallel loop.
    """
    T, B, G = xw.shape
    H = G // 3
    keep = aux.shape[0] > 0
    R = T * B
    for task in prange((R + per_task - 1) // per_task):
        r0, r1 = row_range(task, per_task, R)
        # the raw gates, unless the tape keeps them
        fi = np.empty(0 if keep else 2 * H, dtype=xw.dtype)
        for r in range(r0, r1):
            t = r // B
            b = r % B
            row = xw[t, b]
            if t >= lengths[b]:
                row[:] = 0.0
                if keep:
                    aux[t, b, :] = 0.0
                continue
            gi = aux[t, b] if keep else fi
            copy_vector(gi, row[:2 * H])
            sigmoid_inplace(gi, exact)
            _normalise(row, gi, row, exact)
            candidate_inplace(row[2 * H:], positive, exact)


@jit(parallel=True)
def minlstm_gradients(gates, aux, y, ycol, h0, lengths, reverse, positive, dgx, per_task):
    """The projection's gradient from ``g_t`` (in ``dgx[..., H:2H]``), in place; 0 at
    padded steps."""
    T, B, G = gates.shape
    H = G // 3
    R = T * B
    for task in prange((R + per_task - 1) // per_task):
        r0, r1 = row_range(task, per_task, R)
        for r in range(r0, r1):
            t = r // B
            b = r % B
            n_ = lengths[b]
            out = dgx[t, b]
            if t >= n_:
                out[:] = 0.0
                continue
            hp = state_before(y, ycol, h0, lengths, reverse, t, b)
            gt = gates[t, b]
            at = aux[t, b]
            one_ = one(gt[0])
            for j in range(H):
                fn = gt[j]
                in_ = gt[H + j]
                gj = out[H + j]
                d = gj * (hp[j] - gt[2 * H + j]) * fn * in_
                out[j] = d * (one_ - at[j])
                out[H + j] = -d * (one_ - at[H + j])
                out[2 * H + j] = gj * in_
            candidate_slopes(gt[2 * H:], positive, out[2 * H:])


class MinLSTMCell(ScanCell):
    name = "minlstm"
    label = "minLSTM"
    gates = ("f", "i", "n")
    states = ("h",)
    forget = "f"
    forget_name = "forget gate f' = f/(f+i)"
    input_gate = "i"
    aux_units = 2
    coefficients = (0, 0.0, 1.0, 1, 2)       # a = f', b = i' ⊙ n
    activate = minlstm_activate
    gradients = minlstm_gradients


CELL = MinLSTMCell()
