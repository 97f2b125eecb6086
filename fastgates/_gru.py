"""Compiled GRU kernels: the recurrence of one layer in one direction.

Notation (PyTorch's, gate order r, z, n; ``G = 3H``)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))        reset_after=True
    n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)        reset_after=False
    h_t = (1 - z) ⊙ n + z ⊙ h_{t-1}

``h_t`` is evaluated exactly in this form, so ``z = 1`` returns ``h_{t-1}``
bit for bit.  The input part of every step (``xw``: ``x W_ih^T + b_ih`` plus
``b_hr``, ``b_hz`` in the r and z columns) is one matrix product done before
the kernel; ``b_hn`` stays apart because it sits inside the reset.

With ``reset_after=False`` the n-part of the recurrent product needs ``r``,
so a step makes two products: ``h [W_hr; W_hz]^T`` and then
``(r ⊙ h) W_hn^T``.

Parallelism and variable lengths work as in :mod:`fastgates._lstm`.
"""

import numpy as np
from numba import prange

from ._config import jit
from ._math import sigmoid, tanh


@jit(parallel=True)
def gru_forward(xw, wa_t, wn_t, bhn, h0, lengths, reverse, reset_after, chunk,
                y, ycol, hn, gates, hlin):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    xw : (T, B, 3H) array
        Input projection with ``b_ih`` and ``b_hr``, ``b_hz`` added.
    wa_t : (H, 3H) or (H, 2H) array
        ``W_hh^T`` (``reset_after``) or its r and z columns only.
    wn_t : (H, H) array
        ``W_hn^T``; used only when ``reset_after`` is false.
    bhn : (H,) array
    h0 : (B, H) array
    lengths, reverse, chunk :
        As in :func:`fastgates._lstm.lstm_forward`.
    reset_after : bool
    y : (T, B, Y) array, output (columns ``ycol:ycol + H``)
    hn : (B, H) array, output
    gates : (T, B, 3H) array or (0, 0, 0) array, output
        Post-activation r, z, n, kept for the backward pass when not empty.
    hlin : (T, B, H) array or (0, 0, 0) array, output
        ``W_hn h + b_hn`` (kept with ``gates``; needed when ``reset_after``).
    """
    T, B, G = xw.shape
    H = G // 3
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        h = np.empty((nb, H), dtype=xw.dtype)
        acc = np.empty((nb, wa_t.shape[1]), dtype=xw.dtype)
        rh = np.empty((nb, H), dtype=xw.dtype)
        accn = np.empty((nb, H), dtype=xw.dtype)
        h[:] = h0[b0:b1]
        for s in range(T):
            t = T - 1 - s if reverse else s
            np.dot(h, wa_t, acc)
            if not reset_after:
                for r in range(nb):
                    b = b0 + r
                    for j in range(H):
                        rg = sigmoid(acc[r, j] + xw[t, b, j])
                        rh[r, j] = rg * h[r, j]
                np.dot(rh, wn_t, accn)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        hlin[t, b, :] = 0.0
                    continue
                for j in range(H):
                    rg = sigmoid(acc[r, j] + xw[t, b, j])
                    z = sigmoid(acc[r, H + j] + xw[t, b, H + j])
                    if reset_after:
                        lin = acc[r, 2 * H + j] + bhn[j]
                        n = tanh(xw[t, b, 2 * H + j] + rg * lin)
                    else:
                        lin = accn[r, j] + bhn[j]
                        n = tanh(xw[t, b, 2 * H + j] + lin)
                    hh = (1.0 - z) * n + z * h[r, j]
                    h[r, j] = hh
                    y[t, b, ycol + j] = hh
                    if keep:
                        gates[t, b, j] = rg
                        gates[t, b, H + j] = z
                        gates[t, b, 2 * H + j] = n
                        hlin[t, b, j] = lin
        hn[b0:b1] = h


@jit(parallel=True)
def gru_backward(dy, dycol, dhn, wa, wn, gates, hlin, y, ycol, h0, lengths,
                 reverse, reset_after, chunk, dgx, dgh, hprev, rhprev, dh0):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn : (B, H) array
        Gradient with respect to the final state.
    wa : (3H, H) or (2H, H) array
        ``W_hh`` (``reset_after``) or its r and z rows.
    wn : (H, H) array
        ``W_hn``; used only when ``reset_after`` is false.
    gates, hlin : arrays kept by :func:`gru_forward`.
    y, ycol, h0, lengths, reverse, reset_after, chunk :
        As in the forward pass.
    dgx : (T, B, 3H) array, output
        Gradient with respect to the input projection ``W_ih x + b_ih``.
    dgh : (T, B, 3H) array, output
        Gradient with respect to the recurrent projection ``W_hh h + b_hh``
        (with ``reset_after=False``, its n part is taken with respect to
        ``W_hn (r ⊙ h) + b_hn``).
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps).
    rhprev : (T, B, H) array or (0, 0, 0) array, output
        ``r ⊙ h_{t-1}``: the operand of the ``W_hn`` gradient when
        ``reset_after`` is false.
    dh0 : (B, H) array, output
    """
    T, B, G = gates.shape
    H = G // 3
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dh = np.empty((nb, H), dtype=gates.dtype)
        dhz = np.empty((nb, H), dtype=gates.dtype)
        dhrec = np.empty((nb, H), dtype=gates.dtype)
        da = np.empty((nb, wa.shape[0]), dtype=gates.dtype)
        dan = np.empty((nb, H), dtype=gates.dtype)
        drh = np.empty((nb, H), dtype=gates.dtype)
        hp = np.empty((nb, H), dtype=gates.dtype)
        dh[:] = dhn[b0:b1]
        for s in range(T):
            t = s if reverse else T - 1 - s
            # Phase 1: everything that does not need the recurrent product.
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    da[r, :] = 0.0
                    dan[r, :] = 0.0
                    dgx[t, b, :] = 0.0
                    dgh[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    if not reset_after:
                        rhprev[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                tp = t + 1 if reverse else t - 1
                for j in range(H):
                    rg = gates[t, b, j]
                    z = gates[t, b, H + j]
                    n = gates[t, b, 2 * H + j]
                    hpj = h0[b, j] if first else y[tp, b, ycol + j]
                    hp[r, j] = hpj
                    hprev[t, b, j] = hpj
                    dht = dh[r, j] + dy[t, b, dycol + j]
                    dhz[r, j] = dht * z
                    daz = dht * (hpj - n) * z * (1.0 - z)
                    dn = dht * (1.0 - z) * (1.0 - n * n)
                    dan[r, j] = dn
                    da[r, H + j] = daz
                    dgx[t, b, H + j] = daz
                    dgh[t, b, H + j] = daz
                    dgx[t, b, 2 * H + j] = dn
                    if reset_after:
                        dar = dn * hlin[t, b, j] * rg * (1.0 - rg)
                        da[r, j] = dar
                        da[r, 2 * H + j] = dn * rg
                        dgx[t, b, j] = dar
                        dgh[t, b, j] = dar
                        dgh[t, b, 2 * H + j] = dn * rg
                    else:
                        dgh[t, b, 2 * H + j] = dn
                        rhprev[t, b, j] = rg * hpj
            if not reset_after:
                # Phase 2: the reset gate's gradient goes through W_hn.
                np.dot(dan, wn, drh)
                for r in range(nb):
                    b = b0 + r
                    if t >= lengths[b]:
                        continue
                    for j in range(H):
                        rg = gates[t, b, j]
                        dar = drh[r, j] * hp[r, j] * rg * (1.0 - rg)
                        da[r, j] = dar
                        dgx[t, b, j] = dar
                        dgh[t, b, j] = dar
                        dhz[r, j] += drh[r, j] * rg
            np.dot(da, wa, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(H):
                        dh[r, j] = dhz[r, j] + dhrec[r, j]
        dh0[b0:b1] = dh
