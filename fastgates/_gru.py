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
from ._math import one, sigmoid_inplace, tanh_inplace


@jit(parallel=True)
def gru_forward(xw, wa_t, wn_t, bhn, h0, lengths, reverse, reset_after, chunk, fast,
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
    lengths, reverse, chunk, fast :
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
        lin = np.empty(H, dtype=xw.dtype)
        n = np.empty(H, dtype=xw.dtype)
        one_ = one(xw[0, 0, 0])
        h[:] = h0[b0:b1]
        for s in range(T):
            t = T - 1 - s if reverse else s
            np.dot(h, wa_t, acc)
            # r and z of every row (padded rows too: harmless, and the
            # reset-before product below needs r for the whole chunk).
            for r in range(nb):
                a = acc[r]
                x = xw[t, b0 + r]
                for j in range(2 * H):
                    a[j] += x[j]
                sigmoid_inplace(a[: 2 * H], fast)
            if not reset_after:
                for r in range(nb):
                    for j in range(H):
                        rh[r, j] = acc[r, j] * h[r, j]
                np.dot(rh, wn_t, accn)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        hlin[t, b, :] = 0.0
                    continue
                a = acc[r]
                x = xw[t, b]
                if reset_after:
                    for j in range(H):
                        lin[j] = a[2 * H + j] + bhn[j]
                        n[j] = x[2 * H + j] + a[j] * lin[j]
                else:
                    for j in range(H):
                        lin[j] = accn[r, j] + bhn[j]
                        n[j] = x[2 * H + j] + lin[j]
                tanh_inplace(n, fast)
                hr = h[r]
                for j in range(H):
                    z = a[H + j]
                    hr[j] = (one_ - z) * n[j] + z * hr[j]
                y[t, b, ycol:ycol + H] = hr
                if keep:
                    gates[t, b, : 2 * H] = a[: 2 * H]
                    gates[t, b, 2 * H:] = n
                    hlin[t, b, :] = lin
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
        one_ = one(gates[0, 0, 0])
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
                hp = hprev[t, b]
                if first:
                    hp[:] = h0[b]
                else:
                    hp[:] = y[tp, b, ycol:ycol + H]
                g = gates[t, b]
                dyt = dy[t, b, dycol:dycol + H]
                gx = dgx[t, b]
                gh = dgh[t, b]
                lin = hlin[t, b]
                dar = da[r]
                for j in range(H):
                    rg = g[j]
                    z = g[H + j]
                    nn = g[2 * H + j]
                    dht = dh[r, j] + dyt[j]
                    dhz[r, j] = dht * z
                    daz = dht * (hp[j] - nn) * z * (one_ - z)
                    dn = dht * (one_ - z) * (one_ - nn * nn)
                    dan[r, j] = dn
                    dar[H + j] = daz
                    gx[H + j] = daz
                    gh[H + j] = daz
                    gx[2 * H + j] = dn
                if reset_after:
                    for j in range(H):
                        rg = g[j]
                        dn = dan[r, j]
                        d_r = dn * lin[j] * rg * (one_ - rg)
                        dar[j] = d_r
                        dar[2 * H + j] = dn * rg
                        gx[j] = d_r
                        gh[j] = d_r
                        gh[2 * H + j] = dn * rg
                else:
                    rhp = rhprev[t, b]
                    for j in range(H):
                        gh[2 * H + j] = dan[r, j]
                        rhp[j] = g[j] * hp[j]
            if not reset_after:
                # Phase 2: the reset gate's gradient goes through W_hn.
                np.dot(dan, wn, drh)
                for r in range(nb):
                    b = b0 + r
                    if t >= lengths[b]:
                        continue
                    g = gates[t, b]
                    hp = hprev[t, b]
                    gx = dgx[t, b]
                    gh = dgh[t, b]
                    dar = da[r]
                    for j in range(H):
                        rg = g[j]
                        d_r = drh[r, j] * hp[j] * rg * (one_ - rg)
                        dar[j] = d_r
                        gx[j] = d_r
                        gh[j] = d_r
                        dhz[r, j] += drh[r, j] * rg
            np.dot(da, wa, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(H):
                        dh[r, j] = dhz[r, j] + dhrec[r, j]
        dh0[b0:b1] = dh


# ---------------------------------------------------------------------------
# Column-split recurrence (reset_after only), for recurrent weights too large
# for one core's L2; see the same section of :mod:`fastgates._lstm`.
# ``wblk`` (P, H, 3*hb): block p holds, for units u0 = p*hb .. u1, the
# columns r, z, n of W_hh^T, each hb wide (zero-padded past H).


@jit(parallel=True)
def _forward_cols_step(hin, xwt, wblk, bhn, lengths, t, fast, hout, gt, lt, keep, acc, scratch):
    B, H = hin.shape
    P = wblk.shape[0]
    hb = wblk.shape[2] // 3
    one_ = one(hin[0, 0])
    for p in prange(P):
        u0 = p * hb
        u1 = min(H, u0 + hb)
        nu = u1 - u0
        if nu <= 0:
            continue
        a_p = acc[p]
        np.dot(hin, wblk[p], a_p)
        lin = scratch[p, 0]
        n = scratch[p, 1]
        for b in range(B):
            if t >= lengths[b]:
                for j in range(u0, u1):
                    hout[b, j] = hin[b, j]
                continue
            a = a_p[b]
            x = xwt[b]
            for j in range(nu):
                a[j] += x[u0 + j]
                a[hb + j] += x[H + u0 + j]
            sigmoid_inplace(a[:nu], fast)
            sigmoid_inplace(a[hb:hb + nu], fast)
            for j in range(nu):
                lin[j] = a[2 * hb + j] + bhn[u0 + j]
                n[j] = x[2 * H + u0 + j] + a[j] * lin[j]
            tanh_inplace(n[:nu], fast)
            hi = hin[b]
            ho = hout[b]
            for j in range(nu):
                z = a[hb + j]
                ho[u0 + j] = (one_ - z) * n[j] + z * hi[u0 + j]
            if keep:
                g = gt[b]
                lb = lt[b]
                for j in range(nu):
                    g[u0 + j] = a[j]
                    g[H + u0 + j] = a[hb + j]
                    g[2 * H + u0 + j] = n[j]
                    lb[u0 + j] = lin[j]


@jit()
def gru_forward_cols(xw, wblk, bhn, h0, lengths, reverse, fast, y, ycol, hn, gates, hlin):
    """:func:`gru_forward` (``reset_after``) with the hidden units split across threads."""
    T, B, G = xw.shape
    H = G // 3
    P = wblk.shape[0]
    hb = wblk.shape[2] // 3
    keep = gates.shape[0] > 0
    h = h0.copy()
    h2 = np.empty_like(h)
    acc = np.empty((P, B, 3 * hb), dtype=xw.dtype)
    scratch = np.empty((P, 2, hb), dtype=xw.dtype)
    nothing = np.empty((0, 0), dtype=xw.dtype)
    for s in range(T):
        t = T - 1 - s if reverse else s
        gt = gates[t] if keep else nothing
        lt = hlin[t] if keep else nothing
        _forward_cols_step(h, xw[t], wblk, bhn, lengths, t, fast, h2, gt, lt, keep, acc, scratch)
        h, h2 = h2, h
        for b in range(B):
            if t < lengths[b]:
                y[t, b, ycol:ycol + H] = h[b]
            else:
                y[t, b, ycol:ycol + H] = 0.0
                if keep:
                    gates[t, b, :] = 0.0
                    hlin[t, b, :] = 0.0
    hn[:] = h
