"""minGRU (Feng et al. 2024, "Were RNNs all we needed?"): the cell and its kernels.

A GRU whose gate and candidate see only the input.  Rows z, n
(``G = 2H``), parameters ``weight_ih`` and ``bias_ih`` only::

    z   = σ(W_iz x + b_iz)
    n   = W_in x + b_in            (positive: g(W_in x + b_in))
    h_t = (1 - z) ⊙ h_{t-1} + z ⊙ n

so ``a_t = 1 - z``, ``b_t = z ⊙ n`` in :mod:`fastgates._scan`'s terms.  A
gate ``z = 0`` keeps ``h_{t-1}`` bit for bit (``1 - 0 = 1``, ``0 ⊙ n = 0``).
The tape keeps ``z`` and ``n`` (the activated projection; no ``aux``); the
backward pass needs ``h_{t-1}``, which it reads from the outputs.
"""

from numba import prange

from .._config import jit
from .._math import one, sigmoid_inplace
from .scan import ScanCell, candidate_inplace, candidate_slopes, row_range, state_before


@jit(parallel=True)
def mingru_activate(xw, lengths, positive, exact, aux, per_task):
    """The projection ``xw`` (t, B, 2H) becomes the gates ``z``, ``n``, in place.

    Padded steps 0; ``aux`` is unused (minGRU keeps none).  ``per_task``
    rows per task of the parallel loop.
    """
    T, B, G = xw.shape
    H = G // 2
    R = T * B
    for task in prange((R + per_task - 1) // per_task):
        r0, r1 = row_range(task, per_task, R)
        for r in range(r0, r1):
            t = r // B
            b = r % B
            row = xw[t, b]
            if t >= lengths[b]:
                row[:] = 0.0
                continue
            sigmoid_inplace(row[:H], exact)
            candidate_inplace(row[H:], positive, exact)


@jit(parallel=True)
def mingru_gradients(gates, aux, y, ycol, h0, lengths, reverse, positive, dgx, per_task):
    """The projection's gradient from ``g_t`` (in ``dgx[..., H:2H]``), in place.

    ``dz = g ⊙ (n - h_{t-1}) ⊙ z (1 - z)``, ``dn = g ⊙ z ⊙ g'(v)``; 0 at
    padded steps.
    """
    T, B, G = gates.shape
    H = G // 2
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
            one_ = one(gt[0])
            for j in range(H):
                z = gt[j]
                gj = out[H + j]
                out[j] = gj * (gt[H + j] - hp[j]) * z * (one_ - z)
                out[H + j] = gj * z
            candidate_slopes(gt[H:], positive, out[H:])


class MinGRUCell(ScanCell):
    name = "mingru"
    label = "minGRU"
    gates = ("z", "n")
    states = ("h",)
    forget = "z"
    forget_name = "update gate z (memory 1 - z)"
    forget_complement = True
    aux_units = 0
    coefficients = (0, 1.0, -1.0, 0, 1)      # a = 1 - z, b = z ⊙ n
    activate = mingru_activate
    gradients = mingru_gradients


CELL = MinGRUCell()
