"""The minimal gated unit (Zhou et al. 2016): the cell and its kernels.

A GRU whose one gate does the work of both: rows f, n (``G = 2H``); state
``h``::

    f   = σ(W_if x + b_if + W_hf h + b_hf)
    n   = tanh(W_in x + b_in + W_hn (f ⊙ h) + b_hn)
    h_t = (1 - f) ⊙ h_{t-1} + f ⊙ n

``f`` is the share of the new candidate, so the fraction of the state kept
is ``1 - f`` (``Cell.forget_complement``).  ``h_t`` is evaluated exactly in
this form: ``f = 0`` returns ``h_{t-1}`` bit for bit.  Every bias is
outside the products, so ``b_ih + b_hh`` is folded into the input
projection and ``bias_hh`` shares ``bias_ih``'s gradient.

A step makes two products, ``h W_hf^T`` and then ``(f ⊙ h) W_hn^T`` (the
second needs ``f``), as a GRU with ``reset_after=False``.  The tape keeps
the gates ``f`` and ``n``; the backward kernel returns ``f ⊙ h_{t-1}``,
the operand of ``W_hn``'s gradient.  Parallelism, lengths and the fused
input projection as in :mod:`fastgates._lstm`.
"""

import numpy as np
from numba import prange

from .._config import jit
from .._linalg import (borrow, copy_rows, copy_vector, dot_blocked, keep_alive, project_steps,
                       weight_product)
from .._math import one, sigmoid_fast, sigmoid_scalar, tanh_fast, tanh_scalar
from .base import Cell


@jit()
def _gate(a, xr, h, fh, exact):
    """``a`` (H,): ``W_hf h`` on entry, ``f`` on exit; ``fh = f ⊙ h``."""
    H = h.shape[0]
    if exact is None:
        for j in range(H):
            f = sigmoid_fast(a[j] + xr[j])
            a[j] = f
            fh[j] = f * h[j]
    else:
        for j in range(H):
            f = sigmoid_scalar(a[j] + xr[j], exact)
            a[j] = f
            fh[j] = f * h[j]


@jit()
def _update(an, xr, f, h, exact):
    """``an`` (H,): ``W_hn (f ⊙ h)`` on entry, ``n`` on exit; ``h`` advanced."""
    H = h.shape[0]
    one_ = one(h[0])
    if exact is None:
        for j in range(H):
            n = tanh_fast(xr[H + j] + an[j])
            h[j] = (one_ - f[j]) * h[j] + f[j] * n
            an[j] = n
    else:
        for j in range(H):
            n = tanh_scalar(xr[H + j] + an[j], exact)
            h[j] = (one_ - f[j]) * h[j] + f[j] * n
            an[j] = n


@jit(parallel=True)
def mgu_forward(x, wih_tb, bias, block, xw, wf_tb, wn_tb, h0, lengths, reverse, chunk, exact, y,
                ycol, hn, gates):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    x, wih_tb, bias, block, xw :
        The input projection or what makes it, as in
        :func:`fastgates._lstm.lstm_forward` (``bias`` is ``b_ih + b_hh``).
    wf_tb, wn_tb : column blocks of ``W_hf^T`` and ``W_hn^T``, each (H, H).
    h0 : (B, H) array
    lengths, reverse, chunk, exact :
        As in :func:`fastgates._lstm.lstm_forward`.
    y : (T, B, Y) array, output (columns ``ycol:ycol + H``)
    hn : (B, H) array, output
    gates : (T, B, 2H) array or (0, 0, 0) array, output
        ``f`` and ``n``, kept for the backward pass when not empty.
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    B, H = h0.shape
    G = 2 * H
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    x, xw, y, gates = borrow(x), borrow(xw), borrow(y), borrow(gates)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = h0.dtype
        h_own = np.empty((nb, H), dtype=dtype)
        accf_own = np.empty((nb, H), dtype=dtype)
        accn_own = np.empty((nb, H), dtype=dtype)
        fh_own = np.empty((nb, H), dtype=dtype)
        xwb_own = np.empty((block if fused else 0, nb, G), dtype=dtype)
        # the scratch is owned until keep_alive below
        h = borrow(h_own)
        accf = borrow(accf_own)
        accn = borrow(accn_own)
        fh = borrow(fh_own)
        xwb = borrow(xwb_own)
        copy_rows(h, h0[b0:b1])
        t_lo = 0
        for s in range(T):
            t = T - 1 - s if reverse else s
            if fused and s % block == 0:
                t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
            xt = xwb[t - t_lo] if fused else xw[t]
            xoff = b0 if fused else 0
            dot_blocked(h, wf_tb, accf)
            # f of every row (padded rows too: harmless, the product needs
            # the whole chunk)
            for r in range(nb):
                _gate(accf[r], xt[b0 + r - xoff], h[r], fh[r], exact)
            dot_blocked(fh, wn_tb, accn)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                    continue
                _update(accn[r], xt[b - xoff], accf[r], h[r], exact)
                copy_vector(y[t, b, ycol:ycol + H], h[r])
                if keep:
                    copy_vector(gates[t, b, :H], accf[r])
                    copy_vector(gates[t, b, H:], accn[r])
        copy_rows(hn[b0:b1], h)
        keep_alive((h_own, accf_own, accn_own, fh_own, xwb_own))


@jit(parallel=True)
def mgu_backward(dy, dycol, dhn, wf_b, wn_b, gates, y, ycol, h0, lengths, reverse, chunk, dgx,
                 hprev, fhprev, dh0):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn : (B, H) array
        Gradient with respect to the final state.
    wf_b, wn_b : column blocks of ``W_hf`` and ``W_hn``, each (H, H).
    gates : the array kept by :func:`mgu_forward`.
    y, ycol, h0, lengths, reverse, chunk :
        As in the forward pass.
    dgx : (T, B, 2H) array, output
        Gradient with respect to the pre-activations of ``f`` and ``n``:
        of the input projection, and of the recurrent products ``W_hf h``
        and ``W_hn (f ⊙ h)``.
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps).
    fhprev : (T, B, H) array, output
        ``f ⊙ h_{t-1}`` (zero at padded steps): ``W_hn``'s operand.
    dh0 : (B, H) array, output
    """
    T, B, G = gates.shape
    H = G // 2
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    dy, gates, y, h0, dgx = borrow(dy), borrow(gates), borrow(y), borrow(h0), borrow(dgx)
    hprev, fhprev = borrow(hprev), borrow(fhprev)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = gates.dtype
        dh_own = np.empty((nb, H), dtype=dtype)
        daf_own = np.empty((nb, H), dtype=dtype)
        dan_own = np.empty((nb, H), dtype=dtype)
        dfh_own = np.empty((nb, H), dtype=dtype)
        dhrec_own = np.empty((nb, H), dtype=dtype)
        # the scratch is owned until keep_alive below
        dh = borrow(dh_own)
        daf = borrow(daf_own)
        dan = borrow(dan_own)
        dfh = borrow(dfh_own)
        dhrec = borrow(dhrec_own)
        one_ = one(gates[0, 0, 0])
        copy_rows(dh, dhn[b0:b1])
        for s in range(T):
            t = s if reverse else T - 1 - s
            # Phase 1: n's pre-activation, the direct paths, f ⊙ h_{t-1}.
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    daf[r, :] = 0.0
                    dan[r, :] = 0.0
                    dgx[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    fhprev[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                hp = hprev[t, b]
                if first:
                    copy_vector(hp, h0[b])
                else:
                    copy_vector(hp, y[t + 1 if reverse else t - 1, b, ycol:ycol + H])
                g = gates[t, b]
                dyt = dy[t, b, dycol:dycol + H]
                gx = dgx[t, b]
                fhp = fhprev[t, b]
                dhr = dh[r]
                dnr = dan[r]
                for j in range(H):
                    f = g[j]
                    n = g[H + j]
                    dht = dhr[j] + dyt[j]
                    dn = dht * f * (one_ - n * n)
                    gx[j] = dht * (n - hp[j])        # f's gradient so far
                    gx[H + j] = dn
                    dnr[j] = dn
                    dhr[j] = dht * (one_ - f)
                    fhp[j] = f * hp[j]
            # Phase 2: through W_hn to f ⊙ h_{t-1}, then f's pre-activation.
            dot_blocked(dan, wn_b, dfh)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    continue
                g = gates[t, b]
                hp = hprev[t, b]
                gx = dgx[t, b]
                dfr = daf[r]
                dq = dfh[r]
                dhr = dh[r]
                for j in range(H):
                    f = g[j]
                    d_f = (gx[j] + dq[j] * hp[j]) * f * (one_ - f)
                    gx[j] = d_f
                    dfr[j] = d_f
                    dhr[j] += dq[j] * f
            dot_blocked(daf, wf_b, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(H):
                        dh[r, j] += dhrec[r, j]
        copy_rows(dh0[b0:b1], dh)
        keep_alive((dh_own, daf_own, dan_own, dfh_own, dhrec_own))


class MGUCell(Cell):
    name = "mgu"
    label = "MGU"
    gates = ("f", "n")
    states = ("h",)
    forget = "f"
    forget_name = "gate f (memory 1 - f)"
    forget_complement = True
    aux_units = 0

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        H = dr.H
        wf_tb = dr.blocks_t("wf_tb", dr.w_hh[:H])
        wn_tb = dr.blocks_t("wn_tb", dr.w_hh[H:])
        mgu_forward(x, wih_tb, bias, block, xw, wf_tb, wn_tb, s0[0], lengths, dr.rev, dr.chunk,
                    dr.exact, y, ycol, sn[0], gates)

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        t, B, _ = gates.shape
        H = dr.H
        wf_b = dr.blocks("wf_b", dr.w_hh[:H])
        wn_b = dr.blocks("wn_b", dr.w_hh[H:])
        g.rhprev = np.empty((t, B, H), dtype=dr.dtype)
        mgu_backward(dy, dycol, ds[0], wf_b, wn_b, gates, y, ycol, s0[0], lengths, dr.rev,
                     dr.chunk, g.dgx, g.hprev, g.rhprev, g.ds0[0])

    def grads_setup(self, acc, with_bias):
        H = acc.dir.H
        acc.dw_hn = np.empty((H, H), dtype=acc.dir.dtype)

    def add_grads(self, acc, grid, g, h2, desc, init):
        # W_hn acts on f ⊙ h, not on h: its gradient from the n part
        # (a copy of those columns, as the GRU's reset-before form)
        H = acc.dir.H
        rows = h2.shape[0]
        dn = np.ascontiguousarray(h2[:, H:])
        weight_product(dn, g.rhprev.reshape(rows, H), acc.dw_hn, grid.rows,
                       grid.parts(H, H, rows), desc, init)

    def finish_grads(self, acc, out):
        out["weight_hh"][acc.dir.H:] = acc.dw_hn

    def memory(self, H, options):
        # f ⊙ h_{t-1} per step, then the n part copied for W_hn's gradient
        return H, H, 0


CELL = MGUCell()
