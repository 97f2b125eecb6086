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
the kernel or made inside it, a block of steps at a time, as in
:mod:`fastgates._lstm`; ``b_hn`` stays apart because it sits inside the reset.

With ``reset_after=False`` the n-part of the recurrent product needs ``r``,
so a step makes two products: ``h [W_hr; W_hz]^T`` and then
``(r ⊙ h) W_hn^T``.

Parallelism and variable lengths work as in :mod:`fastgates._lstm`.
"""

import numpy as np
from numba import prange

from ._config import jit
from ._linalg import borrow, copy_rows, copy_vector, dot_blocked, keep_alive, project_steps
from ._lstm import _clip, _inside
from ._math import one, sigmoid_fast, sigmoid_inplace, tanh_fast, tanh_inplace


@jit()
def _step_fused(acc, xwt, xoff, bhn, h, b0, t, lengths, yt, ycol, gates, hlin, keep):
    """The element-wise part of a ``reset_after`` step, fast activations.

    Every row of the chunk in one pass over the units, each value kept in
    registers from the gate sums to ``h``; the same expressions, in the same
    order, as the general path in :func:`gru_forward`.  Row ``b`` of the
    batch reads ``xwt[b - xoff]``.
    """
    nb, H = h.shape
    one_ = one(h[0, 0])
    for r in range(nb):
        b = b0 + r
        if t >= lengths[b]:
            yt[b, ycol:ycol + H] = 0.0
            if keep:
                gates[t, b, :] = 0.0
                hlin[t, b, :] = 0.0
            continue
        a = acc[r]
        x = xwt[b - xoff]
        hr = h[r]
        yb = yt[b, ycol:ycol + H]
        if keep:
            gb = gates[t, b]
            lb = hlin[t, b]
            for j in range(H):
                rr = sigmoid_fast(a[j] + x[j])
                z = sigmoid_fast(a[H + j] + x[H + j])
                lin = a[2 * H + j] + bhn[j]
                n = tanh_fast(x[2 * H + j] + rr * lin)
                hj = (one_ - z) * n + z * hr[j]
                hr[j] = hj
                yb[j] = hj
                gb[j] = rr
                gb[H + j] = z
                gb[2 * H + j] = n
                lb[j] = lin
        else:
            for j in range(H):
                rr = sigmoid_fast(a[j] + x[j])
                z = sigmoid_fast(a[H + j] + x[H + j])
                n = tanh_fast(x[2 * H + j] + rr * (a[2 * H + j] + bhn[j]))
                hj = (one_ - z) * n + z * hr[j]
                hr[j] = hj
                yb[j] = hj


@jit(parallel=True)
def gru_forward(x, wih_tb, bias, block, xw, wa_tb, wn_tb, bhn, h0, lengths, reverse, chunk, exact,
                y, ycol, hn, gates, hlin, clipping):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    x, wih_tb, bias, block :
        The layer input and what projects it, used when ``xw`` is empty:
        as in :func:`fastgates._lstm.lstm_forward` (``bias`` with ``b_ih``
        and ``b_hr``, ``b_hz``).
    xw : (T, B, 3H) array or (0, 0, 0) array
        Input projection with ``b_ih`` and ``b_hr``, ``b_hz`` added, made
        before; empty: from ``x``.
    wa_tb : column blocks of ``W_hh^T`` (H, 3H) (``reset_after``) or of its
        r and z columns (H, 2H) only (:func:`~fastgates._linalg.column_blocks`).
    wn_tb : None or column blocks of ``W_hn^T`` (H, H)
        None: ``reset_after`` (PyTorch's GRU); else ``reset_after=False``.
        The form is told by the argument's type, so that a GRU compiles the
        code of its own form only (Numba drops the branches on
        ``wn_tb is None``).
    bhn : (H,) array
    h0 : (B, H) array
    lengths, reverse, chunk, exact :
        As in :func:`fastgates._lstm.lstm_forward`.
    y : (T, B, Y) array, output (columns ``ycol:ycol + H``)
    hn : (B, H) array, output
    gates : (T, B, 3H) array or (0, 0, 0) array, output
        Post-activation r, z, n, kept for the backward pass when not empty.
    hlin : (T, B, H) array or (0, 0, 0) array, output
        ``W_hn h + b_hn`` (kept with ``gates``; needed when ``reset_after``).
    clipping : None or tuple ``(clip, pre)``
        None: no clipping (its code is then not compiled).  Else ``clip`` the
        bound of the pre-activations of r, z and n (ONNX's ``clip``) and
        ``pre`` (T, B, 3H) or (0, 0, 0) array, output: the pre-activations
        before clipping, kept for the backward pass when not empty.
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    B, H = h0.shape
    G = 3 * H
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    x, xw, y, gates, hlin = borrow(x), borrow(xw), borrow(y), borrow(gates), borrow(hlin)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = h0.dtype
        h_own = np.empty((nb, H), dtype=dtype)
        acc_own = np.empty((nb, (3 if wn_tb is None else 2) * H), dtype=dtype)
        rh_own = np.empty((nb, H), dtype=dtype)
        accn_own = np.empty((nb, H), dtype=dtype)
        lin_own = np.empty(H, dtype=dtype)
        n_own = np.empty(H, dtype=dtype)
        xwb_own = np.empty((block if fused else 0, nb, G), dtype=dtype)
        # the scratch is owned until keep_alive below
        h = borrow(h_own)
        acc = borrow(acc_own)
        rh = borrow(rh_own)
        accn = borrow(accn_own)
        lin = borrow(lin_own)
        n = borrow(n_own)
        xwb = borrow(xwb_own)
        one_ = one(h0[0, 0])
        copy_rows(h, h0[b0:b1])
        t_lo = 0
        for s in range(T):
            t = T - 1 - s if reverse else s
            if fused and s % block == 0:
                t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
            # the step's projection: row b of the batch is xt[b - xoff]
            xt = xwb[t - t_lo] if fused else xw[t]
            xoff = b0 if fused else 0
            dot_blocked(h, wa_tb, acc)
            if exact is None and wn_tb is None and clipping is None:
                _step_fused(acc, xt, xoff, bhn, h, b0, t, lengths, y[t], ycol,
                            gates, hlin, keep)
                continue
            # r and z of every row (padded rows too: harmless, and the
            # reset-before product below needs r for the whole chunk).
            for r in range(nb):
                a = acc[r]
                xr = xt[b0 + r - xoff]
                for j in range(2 * H):
                    a[j] += xr[j]
                if clipping is not None:
                    clip, pre = clipping
                    if pre.shape[0] > 0:
                        copy_vector(pre[t, b0 + r, : 2 * H], a[: 2 * H])
                    for j in range(2 * H):
                        a[j] = _clip(a[j], clip)
                sigmoid_inplace(a[: 2 * H], exact)
            if wn_tb is not None:
                for r in range(nb):
                    for j in range(H):
                        rh[r, j] = acc[r, j] * h[r, j]
                dot_blocked(rh, wn_tb, accn)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        hlin[t, b, :] = 0.0
                    if clipping is not None:
                        clip, pre = clipping
                        if pre.shape[0] > 0:
                            pre[t, b, :] = 0.0
                    continue
                a = acc[r]
                xr = xt[b - xoff]
                if wn_tb is None:
                    for j in range(H):
                        lin[j] = a[2 * H + j] + bhn[j]
                        n[j] = xr[2 * H + j] + a[j] * lin[j]
                else:
                    for j in range(H):
                        lin[j] = accn[r, j] + bhn[j]
                        n[j] = xr[2 * H + j] + lin[j]
                if clipping is not None:
                    clip, pre = clipping
                    if pre.shape[0] > 0:
                        copy_vector(pre[t, b, 2 * H:], n)
                    for j in range(H):
                        n[j] = _clip(n[j], clip)
                tanh_inplace(n, exact)
                hr = h[r]
                for j in range(H):
                    z = a[H + j]
                    hr[j] = (one_ - z) * n[j] + z * hr[j]
                copy_vector(y[t, b, ycol:ycol + H], hr)
                if keep:
                    copy_vector(gates[t, b, : 2 * H], a[: 2 * H])
                    copy_vector(gates[t, b, 2 * H:], n)
                    copy_vector(hlin[t, b], lin)
        copy_rows(hn[b0:b1], h)
        keep_alive((h_own, acc_own, rh_own, accn_own, lin_own, n_own, xwb_own))


@jit(parallel=True)
def gru_backward(dy, dycol, dhn, wa_b, wn_b, gates, hlin, y, ycol, h0, lengths,
                 reverse, chunk, dgx, hprev, rhprev, dh0, clipping):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn : (B, H) array
        Gradient with respect to the final state.
    wa_b : column blocks of ``W_hh`` (3H, H) (``reset_after``) or of its r
        and z rows (2H, H) (:func:`~fastgates._linalg.column_blocks`).
    wn_b : None or column blocks of ``W_hn`` (H, H)
        None: ``reset_after`` (as ``wn_tb`` in :func:`gru_forward`).
    gates, hlin : arrays kept by :func:`gru_forward`.
    y, ycol, h0, lengths, reverse, chunk :
        As in the forward pass.
    dgx : (T, B, 3H) array, output
        Gradient with respect to the input projection ``W_ih x + b_ih``.
        The gradient with respect to the recurrent projection ``W_hh h +
        b_hh`` is not stored: its r and z parts are those of ``dgx``, its n
        part is ``dgx``'s times ``r`` (``reset_after``; the caller makes it
        in place once ``dgx`` is used) or, with ``reset_after=False``, taken
        with respect to ``W_hn (r ⊙ h) + b_hn``, ``dgx``'s own.
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps).
    rhprev : (T, B, H) array or (0, 0, 0) array, output
        ``r ⊙ h_{t-1}``: the operand of the ``W_hn`` gradient when
        ``reset_after`` is false.
    dh0 : (B, H) array, output
    clipping :
        As in the forward pass (``pre`` as it filled it).
    """
    T, B, G = gates.shape
    H = G // 3
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    dy, gates, hlin, y, h0 = borrow(dy), borrow(gates), borrow(hlin), borrow(y), borrow(h0)
    dgx, hprev, rhprev = borrow(dgx), borrow(hprev), borrow(rhprev)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dh_own = np.empty((nb, H), dtype=gates.dtype)
        dhz_own = np.empty((nb, H), dtype=gates.dtype)
        dhrec_own = np.empty((nb, H), dtype=gates.dtype)
        da_own = np.empty((nb, wa_b.shape[1]), dtype=gates.dtype)
        dan_own = np.empty((nb, H), dtype=gates.dtype)
        drh_own = np.empty((nb, H), dtype=gates.dtype)
        # the scratch is owned until keep_alive below
        dh = borrow(dh_own)
        dhz = borrow(dhz_own)
        dhrec = borrow(dhrec_own)
        da = borrow(da_own)
        dan = borrow(dan_own)
        drh = borrow(drh_own)
        one_ = one(gates[0, 0, 0])
        copy_rows(dh, dhn[b0:b1])
        for s in range(T):
            t = s if reverse else T - 1 - s
            # Phase 1: everything that does not need the recurrent product.
            # Loops that LLVM vectorises: each writes one array (a loop
            # writing dgx and da, reading dgx at other offsets, ran scalar:
            # 1.14 against 0.29 ns a hidden unit split in two).
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    da[r, :] = 0.0
                    dan[r, :] = 0.0
                    dgx[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    if wn_b is not None:
                        rhprev[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                tp = t + 1 if reverse else t - 1
                hp = hprev[t, b]
                if first:
                    copy_vector(hp, h0[b])
                else:
                    copy_vector(hp, y[tp, b, ycol:ycol + H])
                g = gates[t, b]
                dyt = dy[t, b, dycol:dycol + H]
                gx = dgx[t, b]
                dar = da[r]
                dhr = dh[r]
                for j in range(H):
                    z = g[H + j]
                    nn = g[2 * H + j]
                    dht = dhr[j] + dyt[j]
                    daz = dht * (hp[j] - nn) * z * (one_ - z)
                    dn = dht * (one_ - z) * (one_ - nn * nn)
                    if clipping is not None:
                        clip, pre = clipping
                        daz *= _inside(pre[t, b, H + j], clip)
                        dn *= _inside(pre[t, b, 2 * H + j], clip)
                    gx[H + j] = daz
                    gx[2 * H + j] = dn
                dzr = dhz[r]
                for j in range(H):
                    dzr[j] = (dhr[j] + dyt[j]) * g[H + j]
                if wn_b is None:
                    lin = hlin[t, b]
                    for j in range(H):
                        rg = g[j]
                        d_r = gx[2 * H + j] * lin[j] * rg * (one_ - rg)
                        if clipping is not None:
                            clip, pre = clipping
                            d_r *= _inside(pre[t, b, j], clip)
                        gx[j] = d_r
                    # the recurrent product's operand: r and z parts as
                    # dgx's, the n part times r
                    for j in range(H):
                        dar[j] = gx[j]
                        dar[H + j] = gx[H + j]
                        dar[2 * H + j] = gx[2 * H + j] * g[j]
                else:
                    rhp = rhprev[t, b]
                    for j in range(H):
                        rhp[j] = g[j] * hp[j]
                    copy_vector(dar[H:], gx[H:2 * H])
                    copy_vector(dan[r], gx[2 * H:])
            if wn_b is not None:
                # Phase 2: the reset gate's gradient goes through W_hn.
                dot_blocked(dan, wn_b, drh)
                for r in range(nb):
                    b = b0 + r
                    if t >= lengths[b]:
                        continue
                    g = gates[t, b]
                    hp = hprev[t, b]
                    gx = dgx[t, b]
                    dar = da[r]
                    drr = drh[r]
                    for j in range(H):
                        rg = g[j]
                        d_r = drr[j] * hp[j] * rg * (one_ - rg)
                        if clipping is not None:
                            clip, pre = clipping
                            d_r *= _inside(pre[t, b, j], clip)
                        gx[j] = d_r
                        dar[j] = d_r
                        dhz[r, j] += drr[j] * rg
            dot_blocked(da, wa_b, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(H):
                        dh[r, j] = dhz[r, j] + dhrec[r, j]
        copy_rows(dh0[b0:b1], dh)
        keep_alive((dh_own, dhz_own, dhrec_own, da_own, dan_own, drh_own))
