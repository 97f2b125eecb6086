"""The sLSTM of xLSTM (Beck et al. 2024): the cell and its kernels.

Rows i, f, z, o (``G = 4H``); state ``(h, c, n, m)``.  With
``a = (ĩ, f̃, z̃, õ)`` the pre-activations ``W_ih x + b_ih + R h + b_hh``::

    m_t = max(log σ(f̃) + m_{t-1}, ĩ)
    i'  = exp(ĩ - m_t)
    f'  = exp(log σ(f̃) + m_{t-1} - m_t)
    c_t = f' ⊙ c_{t-1} + i' ⊙ tanh(z̃)
    n_t = f' ⊙ n_{t-1} + i'
    h_t = σ(õ) ⊙ c_t / n_t

The exponential input gate is kept in range by the stabiliser ``m``: one of
``i'``, ``f'`` is exactly ``exp(0) = 1`` at every step and the other at most
1, so nothing overflows, and ``c``, ``n`` are the unstabilised cell state and
normaliser times ``exp(-m)``, which cancels from ``h``.  ``m = -inf`` (the
state of ``None``) is the empty memory: ``exp(-inf) = 0`` and ``0 * c`` with
``c`` finite, so the first step has ``f' = 0``, ``i' = 1``, ``m = ĩ``.
``log σ(x) = min(x, 0) - log1p(exp(-|x|))`` has no overflow either.

The recurrent weights ``R`` are block diagonal: ``num_heads`` heads of
``d = H // num_heads`` units, one ``(d, d)`` block per head and gate, stored
as ``weight_hh`` ``(4H, d)`` (row ``γH + j``, unit ``j`` of head
``j // d``, multiplies ``h[head]``).  A step makes one product per head,
``h[:, head] W_head^T`` with ``W_head`` the head's ``(4d, d)`` rows of all
four gates (:func:`head_panels`), into a scratch laid out head by head,
then copied gate by gate (:func:`_gate_major`) for the step's flat passes;
the backward pass the other way round.

Gradients hold ``m`` constant: ``h`` does not depend on it (it scales ``c``
and ``n`` alike), so those of ``y`` and of the final ``h`` are exact, those
of the final ``c`` and ``n`` are taken with ``m`` held at its value (as
``c e^(m - m̄)``, the unstabilised cell state rescaled), the initial ``m``
gets 0 and a final ``m``'s ``dstate`` is ignored.  With
``r = c_t / n_t``::

    dc  = dc_carry + dh o / n_t        dn = dn_carry - dh o r / n_t
    dĩ  = (dc z + dn) i'               dz̃ = dc i' (1 - z²)
    df̃  = (dc c_{t-1} + dn n_{t-1}) f' (1 - σ(f̃))
    dõ  = dh r o (1 - o)               carried: dc f', dn f'

The tape keeps ``i'``, ``f'``, ``z``, ``o`` as its gates and ``c``, ``n``,
``m``, ``σ(-f̃)`` (that is ``1 - σ(f̃)`` without cancellation) as its
``aux`` array; ``gates()`` shows the first three.  Parallelism, lengths and
the fused input projection as in :mod:`fastgates._lstm`.
"""

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from .._config import jit
from .._linalg import (borrow, column_blocks, copy_rows, copy_vector, dot_blocked, keep_alive,
                       project_steps, weight_product)
from .._math import (_fma, exp_f32, exp_f64, one, sigmoid_fast, sigmoid_scalar, tanh_fast,
                     tanh_scalar)
from .base import Cell


# -- exp, log1p and log σ, fast or exact ---------------------------------------------
#
# The fast mode's step is straight-line code that LLVM vectorises (as the
# LSTM's), so its log1p is a polynomial of our own (within 3 ulp on [0, 1],
# measured on dense grids; tests/test_slstm.py checks 4): a call of the C
# library's stops the vectorisation.  Measured, float32 (100, 16, 256, 256)
# inference on one thread: 44 ms with math.log1p and a step over heads,
# 18.7 ms now (the LSTM 18.2 ms).  The exact mode calls the C library
# (float32 computed in float64 and rounded back, as :mod:`fastgates._math`
# does).


def exp_fast(x):
    """:func:`~fastgates._math.exp_f32` or ``exp_f64`` by ``x``'s type."""
    raise NotImplementedError("only callable from compiled code")


def exp_exact(x):
    """The C library's ``exp`` (float32 in float64, rounded back)."""
    raise NotImplementedError("only callable from compiled code")


def log1p_fast(u):
    """``log(1 + u)`` for ``0 <= u <= 1`` (:func:`log1p_f32`, :func:`log1p_f64`)."""
    raise NotImplementedError("only callable from compiled code")


def log_sigmoid_exact(x):
    """``log σ(x) = min(x, 0) - log1p(exp(-|x|))`` by the C library: no overflow."""
    raise NotImplementedError("only callable from compiled code")


_F32 = np.float32
_F32_ZERO = _F32(0.0)
_F32_HALF = _F32(0.5)
_F32_ONE = _F32(1.0)
_F32_SQRT2 = _F32(math.sqrt(2.0))
_F32_LN2 = _F32(math.log(2.0))
# log(v) = 2 atanh(s) = s (2 + 2/3 s^2 + 2/5 s^4 + ...), s = (v - 1) / (v + 1),
# |s| <= (sqrt 2 - 1) / (sqrt 2 + 1) = 0.172: the first omitted term is below
# 0.0295^5 / 11 = 2e-9 (float32) and 0.0295^10 / 21 = 2e-17 (float64) of the sum.
_F32_LOG_C = tuple(_F32(2.0 / (2 * k + 1)) for k in range(5))
_F64_SQRT2 = math.sqrt(2.0)
_F64_LN2 = math.log(2.0)
_F64_LOG_C = tuple(2.0 / (2 * k + 1) for k in range(10))


@jit()
def log1p_f32(u):
    """Fast float32 ``log(1 + u)`` for ``0 <= u <= 1`` (NaN in, NaN out).

    ``w = 1 + u`` rounded, ``log w`` by :data:`_F32_LOG_C` after halving
    ``w`` above ``sqrt 2`` (exact), plus the rounding error of ``1 + u``
    (``u - (w - 1)``, exact for ``u <= 1``) over ``w``.
    """
    one = _F32_ONE
    w = one + u
    corr = (u - (w - one)) / w
    big = w > _F32_SQRT2
    v = w * _F32_HALF if big else w
    k = _F32_LN2 if big else _F32_ZERO
    s = (v - one) / (v + one)
    s2 = s * s
    c = _F32_LOG_C
    p = c[4]
    p = _fma(p, s2, c[3])
    p = _fma(p, s2, c[2])
    p = _fma(p, s2, c[1])
    p = _fma(p, s2, c[0])
    return k + _fma(s, p, corr)


@jit()
def log1p_f64(u):
    """Fast float64 ``log(1 + u)`` for ``0 <= u <= 1``; see :func:`log1p_f32`."""
    w = 1.0 + u
    corr = (u - (w - 1.0)) / w
    big = w > _F64_SQRT2
    v = w * 0.5 if big else w
    k = _F64_LN2 if big else 0.0
    s = (v - 1.0) / (v + 1.0)
    s2 = s * s
    c = _F64_LOG_C
    p = c[9]
    p = _fma(p, s2, c[8])
    p = _fma(p, s2, c[7])
    p = _fma(p, s2, c[6])
    p = _fma(p, s2, c[5])
    p = _fma(p, s2, c[4])
    p = _fma(p, s2, c[3])
    p = _fma(p, s2, c[2])
    p = _fma(p, s2, c[1])
    p = _fma(p, s2, c[0])
    return k + _fma(s, p, corr)


@overload(exp_fast, jit_options={"cache": True})
def _exp_fast_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: exp_f64(x)
    return None


@overload(exp_exact, jit_options={"cache": True})
def _exp_exact_overload(x):
    if x == types.float32:
        return lambda x: np.float32(math.exp(np.float64(x)))
    if x == types.float64:
        return lambda x: math.exp(x)
    return None


@overload(log1p_fast, jit_options={"cache": True})
def _log1p_fast_overload(u):
    if u == types.float32:
        return lambda u: log1p_f32(u)
    if u == types.float64:
        return lambda u: log1p_f64(u)
    return None


@overload(log_sigmoid_exact, jit_options={"cache": True})
def _log_sigmoid_exact_overload(x):
    if x == types.float32:
        def ls32(x):
            xd = np.float64(x)
            return np.float32(min(xd, 0.0) - math.log1p(math.exp(-abs(xd))))
        return ls32
    if x == types.float64:
        return lambda x: min(x, 0.0) - math.log1p(math.exp(-abs(x)))
    return None


# -- the recurrent weights, head by head ---------------------------------------------


def head_panels(w_hh, heads, transposed):
    """The per-head blocks of ``w_hh`` (4H, d) in :func:`~fastgates._linalg.column_blocks`.

    Head ``k``'s block ``W_k`` (4d, d) holds rows ``γH + k d + j`` in the
    order (γ, j).  Returns ``(heads, npanel, K, P)``: the panels of
    ``W_k^T`` (K = d, for the forward product ``h_k W_k^T``) when
    ``transposed``, else of ``W_k`` (K = 4d, the backward ``da_k W_k``).
    """
    G, d = w_hh.shape
    blocks = w_hh.reshape(4, heads, d, d)
    out = None
    for k in range(heads):
        wk = blocks[:, k].reshape(4 * d, d)
        p = column_blocks(wk.T if transposed else wk)
        if out is None:
            out = np.empty((heads,) + p.shape, dtype=w_hh.dtype)
        out[k] = p
    return out


# -- kernels -----------------------------------------------------------------------------


# The products run head by head on C-contiguous (heads, rows, ...) arrays
# (a column slice of a (rows, H) array is not one, and dot_blocked would be
# compiled once more for it: about 1 s of an empty cache's first call).


@jit()
def _split_heads(src, dst, r):
    """Row ``r`` of ``dst`` (heads, rows, d) from ``src`` (H,): head ``k`` is ``src[k d:(k + 1) d]``."""
    heads, _, d = dst.shape
    for k in range(heads):
        for jj in range(d):
            dst[k, r, jj] = src[k * d + jj]


@jit()
def _join_heads(src, r, dst):
    """The inverse of :func:`_split_heads`: ``dst`` (H,) from row ``r`` of ``src``."""
    heads, _, d = src.shape
    for k in range(heads):
        for jj in range(d):
            dst[k * d + jj] = src[k, r, jj]


@jit()
def _gate_major(src, r, dst):
    """``dst`` (4H,) gate by gate from row ``r`` of ``src`` (heads, rows, 4d), head by head."""
    heads, _, d4 = src.shape
    d = d4 // 4
    H = heads * d
    for k in range(heads):
        for gate in range(4):
            for jj in range(d):
                dst[gate * H + k * d + jj] = src[k, r, gate * d + jj]


@jit()
def _head_major(src, dst, r):
    """The inverse of :func:`_gate_major`: row ``r`` of ``dst`` from ``src`` (4H,)."""
    heads, _, d4 = dst.shape
    d = d4 // 4
    H = heads * d
    for k in range(heads):
        for gate in range(4):
            for jj in range(d):
                dst[k, r, gate * d + jj] = src[gate * H + k * d + jj]


@jit()
def _step(a, xr, h, c, n, m, g, q, exact):
    """One sLSTM step of one sequence, in place.

    ``a`` (4H,) holds the recurrent product and ``xr`` (4H,) the input
    projection, gate by gate.  ``h``, ``c``, ``n``, ``m`` (H,) are
    advanced; ``g`` (4H,) receives ``i', f', z, o`` and ``q`` (4H,)
    ``c, n, m, σ(-f̃)``.

    With ``l = log σ(f̃) + m_{t-1}`` (``-inf`` while ``m`` is), the
    stabiliser is ``max(l, ĩ)`` and one exponential ``e = exp(-|l - ĩ|)``
    makes both gates: ``f' = 1, i' = e`` where ``l >= ĩ``, else
    ``i' = 1, f' = e`` (``exp(ĩ - m_t)`` and ``exp(l - m_t)``, one of them
    ``exp(0)``; ``exp(-inf) = 0``).  The fast mode shares ``exp(-|f̃|)``
    between ``log σ(f̃)`` and ``σ(-f̃)`` (as
    :func:`~fastgates._math.sigmoid_f32` makes it).  Two flat passes (the
    gates, then the states), each with few enough arrays written that LLVM
    vectorises the fast one (measured float32, H = 256: 4.4 ns a unit
    against 38 in one pass over heads; float64 12 against 50).
    """
    H = h.shape[0]
    one_ = one(h[0])
    zero = one_ - one_
    if exact is None:
        for j in range(H):
            ai = a[j] + xr[j]
            af = a[H + j] + xr[H + j]
            ef = exp_fast(-abs(af))
            sf = one_ / (one_ + ef)
            lf = ((af if af < zero else zero) - log1p_fast(ef)) + m[j]
            up = lf >= ai
            e = exp_fast(-abs(lf - ai))
            mt = lf if up else ai
            g[j] = e if up else one_
            g[H + j] = one_ if up else e
            g[2 * H + j] = tanh_fast(a[2 * H + j] + xr[2 * H + j])
            g[3 * H + j] = sigmoid_fast(a[3 * H + j] + xr[3 * H + j])
            m[j] = mt
            q[2 * H + j] = mt
            q[3 * H + j] = sf if af <= zero else ef * sf          # σ(-f̃)
    else:
        for j in range(H):
            ai = a[j] + xr[j]
            af = a[H + j] + xr[H + j]
            lf = log_sigmoid_exact(af) + m[j]
            up = lf >= ai
            e = exp_exact(-abs(lf - ai))
            mt = lf if up else ai
            g[j] = e if up else one_
            g[H + j] = one_ if up else e
            g[2 * H + j] = tanh_scalar(a[2 * H + j] + xr[2 * H + j], exact)
            g[3 * H + j] = sigmoid_scalar(a[3 * H + j] + xr[3 * H + j], exact)
            m[j] = mt
            q[2 * H + j] = mt
            q[3 * H + j] = sigmoid_scalar(-af, exact)
    for j in range(H):
        ip = g[j]
        fp = g[H + j]
        cj = fp * c[j] + ip * g[2 * H + j]
        nj = fp * n[j] + ip
        c[j] = cj
        n[j] = nj
        h[j] = g[3 * H + j] * (cj / nj)
        q[j] = cj
        q[H + j] = nj


@jit(parallel=True)
def slstm_forward(x, wih_tb, bias, block, xw, whh_tb, h0, c0, n0, m0, lengths, reverse, chunk,
                  exact, y, ycol, hn, cn, nn, mn, gates, aux):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    x, wih_tb, bias, block, xw :
        The input projection or what makes it, as in
        :func:`fastgates._lstm.lstm_forward` (``bias`` is ``b_ih + b_hh``).
    whh_tb : (heads, npanel, d, P) array
        :func:`head_panels` of ``weight_hh``, transposed.
    h0, c0, n0, m0 : (B, H) arrays
    lengths, reverse, chunk, exact :
        As in :func:`fastgates._lstm.lstm_forward`.
    y : (T, B, Y) array, output (columns ``ycol:ycol + H``)
    hn, cn, nn, mn : (B, H) arrays, output
    gates : (T, B, 4H) array or (0, 0, 0) array, output
        ``i', f', z, o``, kept for the backward pass when not empty.
    aux : (T, B, 4H) array or (0, 0, 0) array, output
        ``c, n, m, σ(-f̃)``, kept with ``gates``.
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    B, H = h0.shape
    G = 4 * H
    heads = whh_tb.shape[0]
    d = H // heads
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
        c_own = np.empty((nb, H), dtype=dtype)
        n_own = np.empty((nb, H), dtype=dtype)
        m_own = np.empty((nb, H), dtype=dtype)
        hh_own = np.empty((heads if heads > 1 else 0, nb, d), dtype=dtype)  # h, head by head
        acc_own = np.empty((heads, nb, 4 * d), dtype=dtype)     # the product, head by head
        accg_own = np.empty(G, dtype=dtype)                     # one row of it, gate by gate
        g_own = np.empty(G, dtype=dtype)
        q_own = np.empty(G, dtype=dtype)
        xwb_own = np.empty((block if fused else 0, nb, G), dtype=dtype)
        # the scratch is owned until keep_alive below
        h = borrow(h_own)
        c = borrow(c_own)
        n = borrow(n_own)
        m = borrow(m_own)
        hh = borrow(hh_own)
        acc = borrow(acc_own)
        accg = borrow(accg_own)
        g = borrow(g_own)
        q = borrow(q_own)
        xwb = borrow(xwb_own)
        copy_rows(h, h0[b0:b1])
        copy_rows(c, c0[b0:b1])
        copy_rows(n, n0[b0:b1])
        copy_rows(m, m0[b0:b1])
        t_lo = 0
        for s in range(T):
            t = T - 1 - s if reverse else s
            if fused and s % block == 0:
                t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
            xt = xwb[t - t_lo] if fused else xw[t]
            xoff = b0 if fused else 0
            if heads == 1:
                # one head: h and the product as they are, gate by gate
                dot_blocked(h, whh_tb[0], acc[0])
            else:
                for r in range(nb):
                    _split_heads(h[r], hh, r)
                for hd in range(heads):
                    dot_blocked(hh[hd], whh_tb[hd], acc[hd])
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        aux[t, b, :] = 0.0
                    continue
                a = acc[0, r]
                if heads > 1:
                    _gate_major(acc, r, accg)
                    a = accg
                _step(a, xt[b - xoff], h[r], c[r], n[r], m[r], g, q, exact)
                copy_vector(y[t, b, ycol:ycol + H], h[r])
                if keep:
                    copy_vector(gates[t, b], g)
                    copy_vector(aux[t, b], q)
        copy_rows(hn[b0:b1], h)
        copy_rows(cn[b0:b1], c)
        copy_rows(nn[b0:b1], n)
        copy_rows(mn[b0:b1], m)
        keep_alive((h_own, c_own, n_own, m_own, hh_own, acc_own, accg_own, g_own, q_own,
                    xwb_own))


@jit()
def _step_back(g, q, cp, np_, dyt, dh, dc, dn, gx):
    """The pre-activations' gradient ``gx`` (4H,) of one step, gate by gate.

    ``g``, ``q`` the step's gates and ``aux``; ``cp``, ``np_`` the states
    ``c``, ``n`` it started from; ``dh`` + ``dyt`` the gradient of its
    ``h``; ``dc``, ``dn`` (H,) those of its ``c``, ``n`` on entry and of
    the previous step's on exit (times ``f'``).
    """
    H = dh.shape[0]
    one_ = one(g[0])
    for j in range(H):
        ip = g[j]
        fp = g[H + j]
        z = g[2 * H + j]
        o = g[3 * H + j]
        nt = q[H + j]
        ratio = q[j] / nt
        dht = dh[j] + dyt[j]
        dho = dht * o / nt
        dct = dc[j] + dho
        dnt = dn[j] - dho * ratio
        gx[j] = (dct * z + dnt) * ip
        gx[H + j] = (dct * cp[j] + dnt * np_[j]) * fp * q[3 * H + j]
        gx[2 * H + j] = dct * ip * (one_ - z * z)
        gx[3 * H + j] = dht * ratio * o * (one_ - o)
        dc[j] = dct * fp
        dn[j] = dnt * fp


@jit(parallel=True)
def slstm_backward(dy, dycol, dhn, dcn, dnn, whh_b, gates, aux, y, ycol, h0, c0, n0, lengths,
                   reverse, chunk, dgx, hprev, dh0, dc0, dn0):
    """Back-propagate through the recurrence of one layer-direction, ``m`` held constant.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn, dcn, dnn : (B, H) arrays
        Gradients with respect to the final ``h``, ``c``, ``n``.
    whh_b : (heads, npanel, 4d, P) array
        :func:`head_panels` of ``weight_hh``.
    gates, aux : arrays kept by :func:`slstm_forward`.
    y, ycol, h0, c0, n0, lengths, reverse, chunk :
        As in the forward pass.
    dgx : (T, B, 4H) array, output
        Gradient with respect to the pre-activations, gate by gate: of the
        input projection and of the recurrent product alike.
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps).
    dh0, dc0, dn0 : (B, H) arrays, output
    """
    T, B, G = gates.shape
    H = G // 4
    heads = whh_b.shape[0]
    d = H // heads
    nchunks = (B + chunk - 1) // chunk
    # views of borrowed arrays take no references (_linalg.borrow)
    dy, gates, aux, y, h0 = borrow(dy), borrow(gates), borrow(aux), borrow(y), borrow(h0)
    c0, n0, dgx, hprev = borrow(c0), borrow(n0), borrow(dgx), borrow(hprev)
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = gates.dtype
        dh_own = np.empty((nb, H), dtype=dtype)
        dc_own = np.empty((nb, H), dtype=dtype)
        dn_own = np.empty((nb, H), dtype=dtype)
        da_own = np.empty((heads, nb, 4 * d), dtype=dtype)     # head by head
        dhh_own = np.empty((heads, nb, d), dtype=dtype)
        # the scratch is owned until keep_alive below
        dh = borrow(dh_own)
        dc = borrow(dc_own)
        dn = borrow(dn_own)
        da = borrow(da_own)
        dhh = borrow(dhh_own)
        copy_rows(dh, dhn[b0:b1])
        copy_rows(dc, dcn[b0:b1])
        copy_rows(dn, dnn[b0:b1])
        for s in range(T):
            t = s if reverse else T - 1 - s
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    da[:, r, :] = 0.0
                    dgx[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                hp = hprev[t, b]
                if first:
                    copy_vector(hp, h0[b])
                    cp = c0[b]
                    np_ = n0[b]
                else:
                    tp = t + 1 if reverse else t - 1
                    copy_vector(hp, y[tp, b, ycol:ycol + H])
                    cp = aux[tp, b, :H]
                    np_ = aux[tp, b, H:2 * H]
                gx = dgx[t, b]
                _step_back(gates[t, b], aux[t, b], cp, np_, dy[t, b, dycol:dycol + H], dh[r],
                           dc[r], dn[r], gx)
                if heads == 1:
                    copy_vector(da[0, r], gx)
                else:
                    _head_major(gx, da, r)
            for hd in range(heads):
                dot_blocked(da[hd], whh_b[hd], dhh[hd])
            for r in range(nb):
                if t < lengths[b0 + r]:
                    if heads == 1:
                        copy_vector(dh[r], dhh[0, r])
                    else:
                        _join_heads(dhh, r, dh[r])
        copy_rows(dh0[b0:b1], dh)
        copy_rows(dc0[b0:b1], dc)
        copy_rows(dn0[b0:b1], dn)
        keep_alive((dh_own, dc_own, dn_own, da_own, dhh_own))


class SLSTMCell(Cell):
    name = "slstm"
    label = "sLSTM"
    gates = ("i", "f", "z", "o")
    states = ("h", "c", "n", "m")
    forget = "f"
    forget_name = "forget gate f' (stabilised)"
    input_gate = "i"
    shown = ("c", "n", "m")
    aux_units = 4
    initial = (0.0, 0.0, 0.0, -np.inf)
    minus_inf = ("m",)

    def param_shapes(self, input_size, H, options, bias):
        shapes = super().param_shapes(input_size, H, options, bias)
        shapes["weight_hh"] = (self.rows(H), H // options.get("num_heads", 1))
        return shapes

    def setup(self, dr, params, variant):
        dr.heads = dr.H // dr.w_hh.shape[1]

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        whh_tb = dr.derive("whh_heads_tb", head_panels, dr.w_hh, dr.heads, True)
        slstm_forward(x, wih_tb, bias, block, xw, whh_tb, *s0, lengths, dr.rev, dr.chunk,
                      dr.exact, y, ycol, *sn, gates, aux)

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        (dh, dc, dn, _), (h0, c0, n0, _), (dh0, dc0, dn0, dm0) = ds, s0, g.ds0
        whh_b = dr.derive("whh_heads_b", head_panels, dr.w_hh, dr.heads, False)
        slstm_backward(dy, dycol, dh, dc, dn, whh_b, gates, aux, y, ycol, h0, c0, n0, lengths,
                       dr.rev, dr.chunk, g.dgx, g.hprev, dh0, dc0, dn0)
        dm0[:] = 0          # m is held constant: nothing flows to the initial m

    def recurrent_grad(self, acc, grid, h2, hprev, desc, init):
        # One (d, d) product per gate and head: block (γ, k) of weight_hh
        # multiplies head k of h.  One head is the plain product.
        dr = acc.dir
        if dr.heads == 1:
            return super().recurrent_grad(acc, grid, h2, hprev, desc, init)
        rows = h2.shape[0]
        H = dr.H
        d = H // dr.heads
        nparts = grid.parts(d, d, rows)
        for gate in range(4):
            for k in range(dr.heads):
                r0 = gate * H + k * d
                weight_product(h2[:, r0:r0 + d], hprev[:, k * d:(k + 1) * d],
                               acc.dw_hh[r0:r0 + d], grid.rows, nparts, desc, init)


CELL = SLSTMCell()
