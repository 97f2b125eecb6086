"""JANET, "just another network" (van der Westhuizen & Lasenby 2018): the cell and its kernels.

An LSTM reduced to its forget gate.  Rows f, n (``G = 2H``); state ``h``
(which is also the cell state)::

    s   = W_if x + b_if + W_hf h + b_hf
    n   = tanh(W_in x + b_in + W_hn h + b_hn)
    h_t = σ(s) ⊙ h_{t-1} + (1 - σ(s - β)) ⊙ n

The shift ``β`` (option ``beta``, the paper's 1) makes the input's share a
little larger than ``1 - σ(s)``, so that a forget gate near 1 does not shut
the input out entirely.  ``h_t`` is evaluated exactly in this form, so a
forget gate saturated at 1 (``σ(s) = σ(s - β) = 1``) returns ``h_{t-1}``
bit for bit.  All four biases are outside any product, so ``b_ih + b_hh``
is folded into the input projection and ``bias_hh`` shares ``bias_ih``'s
gradient.

The tape keeps the gates ``σ(s)``, ``n`` and, as its ``aux`` array,
``σ(s - β)`` (the backward pass needs both sigmoids).  One recurrent
product per step, ``h [W_hf; W_hn]^T``; parallelism, lengths and the fused
input projection as in :mod:`fastgates._lstm`.
"""

import numpy as np
from numba import prange

from .._config import jit
from .._linalg import borrow, copy_rows, copy_vector, dot_blocked, keep_alive, project_steps
from .._math import one, sigmoid_fast, sigmoid_scalar, tanh_fast, tanh_scalar
from .base import Cell


@jit()
def _step(a, xr, beta, h, q, exact):
    """One JANET step of one sequence, in place.

    ``a`` (2H,) holds the recurrent product on entry and the gates
    ``σ(s)``, ``n`` on exit; ``q`` (H,) receives ``σ(s - β)``; ``h`` (H,)
    is advanced.  One pass per activation mode, so that the fast one
    vectorises.
    """
    H = h.shape[0]
    one_ = one(h[0])
    if exact is None:
        for j in range(H):
            s = a[j] + xr[j]
            f = sigmoid_fast(s)
            fb = sigmoid_fast(s - beta)
            n = tanh_fast(a[H + j] + xr[H + j])
            h[j] = f * h[j] + (one_ - fb) * n
            a[j] = f
            a[H + j] = n
            q[j] = fb
    else:
        for j in range(H):
            s = a[j] + xr[j]
            f = sigmoid_scalar(s, exact)
            fb = sigmoid_scalar(s - beta, exact)
            n = tanh_scalar(a[H + j] + xr[H + j], exact)
            h[j] = f * h[j] + (one_ - fb) * n
            a[j] = f
            a[H + j] = n
            q[j] = fb


@jit(parallel=True)
def janet_forward(x, wih_tb, bias, block, xw, whh_tb, beta, h0, lengths, reverse, chunk, exact, y,
                  ycol, hn, gates, aux):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    x, wih_tb, bias, block, xw :
        The input projection or what makes it, as in
        :func:`fastgates._lstm.lstm_forward` (``bias`` is ``b_ih + b_hh``).
    whh_tb : column blocks of ``W_hh^T`` (H, 2H).
    beta : float
        The shift of the input's sigmoid.
    h0 : (B, H) array
    lengths, reverse, chunk, exact :
        As in :func:`fastgates._lstm.lstm_forward`.
    y : (T, B, Y) array, output (columns ``ycol:ycol + H``)
    hn : (B, H) array, output
    gates : (T, B, 2H) array or (0, 0, 0) array, output
        ``σ(s)`` and ``n``, kept for the backward pass when not empty.
    aux : (T, B, H) array or (0, 0, 0) array, output
        ``σ(s - β)``, kept with ``gates``.
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    B, H = h0.shape
    G = 2 * H
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    x, xw, y, gates, aux = borrow(x), borrow(xw), borrow(y), borrow(gates), borrow(aux)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = h0.dtype
        h_own = np.empty((nb, H), dtype=dtype)
        acc_own = np.empty((nb, G), dtype=dtype)
        q_own = np.empty(H, dtype=dtype)
        xwb_own = np.empty((block if fused else 0, nb, G), dtype=dtype)
        # the scratch is owned until keep_alive below
        h = borrow(h_own)
        acc = borrow(acc_own)
        q = borrow(q_own)
        xwb = borrow(xwb_own)
        copy_rows(h, h0[b0:b1])
        t_lo = 0
        for s in range(T):
            t = T - 1 - s if reverse else s
            if fused and s % block == 0:
                t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
            xt = xwb[t - t_lo] if fused else xw[t]
            xoff = b0 if fused else 0
            dot_blocked(h, whh_tb, acc)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        aux[t, b, :] = 0.0
                    continue
                _step(acc[r], xt[b - xoff], beta, h[r], q, exact)
                copy_vector(y[t, b, ycol:ycol + H], h[r])
                if keep:
                    copy_vector(gates[t, b], acc[r])
                    copy_vector(aux[t, b], q)
        copy_rows(hn[b0:b1], h)
        keep_alive((h_own, acc_own, q_own, xwb_own))


@jit(parallel=True)
def janet_backward(dy, dycol, dhn, whh_b, gates, aux, y, ycol, h0, lengths, reverse, chunk, dgx,
                   hprev, dh0):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn : (B, H) array
        Gradient with respect to the final state.
    whh_b : column blocks of ``W_hh`` (2H, H).
    gates, aux : arrays kept by :func:`janet_forward`.
    y, ycol, h0, lengths, reverse, chunk :
        As in the forward pass.
    dgx : (T, B, 2H) array, output
        Gradient with respect to the pre-activations ``s`` and that of
        ``n``: of the input projection and of the recurrent product alike.
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps).
    dh0 : (B, H) array, output
    """
    T, B, G = gates.shape
    H = G // 2
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    dy, gates, aux, y, h0 = borrow(dy), borrow(gates), borrow(aux), borrow(y), borrow(h0)
    dgx, hprev = borrow(dgx), borrow(hprev)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = gates.dtype
        dh_own = np.empty((nb, H), dtype=dtype)
        da_own = np.empty((nb, G), dtype=dtype)
        dhrec_own = np.empty((nb, H), dtype=dtype)
        # the scratch is owned until keep_alive below
        dh = borrow(dh_own)
        da = borrow(da_own)
        dhrec = borrow(dhrec_own)
        one_ = one(gates[0, 0, 0])
        copy_rows(dh, dhn[b0:b1])
        for s in range(T):
            t = s if reverse else T - 1 - s
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    da[r, :] = 0.0
                    dgx[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                hp = hprev[t, b]
                if first:
                    copy_vector(hp, h0[b])
                else:
                    copy_vector(hp, y[t + 1 if reverse else t - 1, b, ycol:ycol + H])
                g = gates[t, b]
                q = aux[t, b]
                dyt = dy[t, b, dycol:dycol + H]
                gx = dgx[t, b]
                dar = da[r]
                dhr = dh[r]
                for j in range(H):
                    f = g[j]
                    n = g[H + j]
                    fb = q[j]
                    dht = dhr[j] + dyt[j]
                    ds = dht * (hp[j] * f * (one_ - f) - n * fb * (one_ - fb))
                    dn = dht * (one_ - fb) * (one_ - n * n)
                    gx[j] = ds
                    gx[H + j] = dn
                    dar[j] = ds
                    dar[H + j] = dn
                    dhr[j] = dht * f
            dot_blocked(da, whh_b, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(H):
                        dh[r, j] += dhrec[r, j]
        copy_rows(dh0[b0:b1], dh)
        keep_alive((dh_own, da_own, dhrec_own))


class JANETCell(Cell):
    name = "janet"
    label = "JANET"
    gates = ("f", "n")
    states = ("h",)
    forget = "f"
    forget_name = "forget gate f"

    def setup(self, dr, params, variant):
        dr.beta = dr.dtype.type(variant.options.get("beta", 1.0))

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        whh_tb = dr.blocks_t("whh_tb", dr.w_hh)
        janet_forward(x, wih_tb, bias, block, xw, whh_tb, dr.beta, s0[0], lengths, dr.rev,
                      dr.chunk, dr.exact, y, ycol, sn[0], gates, aux)

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        whh_b = dr.blocks("whh_b", dr.w_hh)
        janet_backward(dy, dycol, ds[0], whh_b, gates, aux, y, ycol, s0[0], lengths, dr.rev,
                       dr.chunk, g.dgx, g.hprev, g.ds0[0])


CELL = JANETCell()
