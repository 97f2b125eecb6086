"""Compiled kernels of forgetting attention: tiled, causal, online softmax.

``out[i] = sum_{j <= i} softmax_j(s_ij) v[j]`` with
``s_ij = scale * q_i . k_j + sum_{l=j+1..i} log_f[l]``, for every sequence of
a stack of ``N`` independent sequences (the caller flattens the leading
axes).  Nothing of size ``T x T`` is ever held: queries and keys are taken in
tiles of ``BT`` (64) and the softmax is accumulated tile by tile with a
running maximum and sum (FlashAttention-2's online softmax, Dao 2023).

The forget-gate bias
--------------------
With ``C_i = sum_{1 <= l <= i, log_f[l] finite} log_f[l]`` (a prefix sum
per sequence, in float64) and ``z_i`` the last step ``l <= i`` whose gate is
exactly 0 (``log_f[l] = -inf``; 0 if there is none), key ``j`` is visible
to query ``i`` iff ``z_i <= j <= i``, and then its bias is ``C_i - C_j``.
A gate of 0 is therefore an exact mask by construction: no ``-inf - -inf``
is ever formed, and the keys it hides are never visited (whole key tiles
left of ``z`` are skipped, as are the tiles above the diagonal).
``log_f[0]`` appears in no score and is never read.

``C`` is re-based per pair of tiles: the bias is ``a_i - b_j`` with
``a_i = C_i - C_ref`` and ``b_j = C_j - C_ref`` rounded to the working
dtype, ``C_ref = C`` at the first key of the key tile.  ``b_j`` spans at most
one tile of gates and ``a_i`` is about the bias itself, so a float32 kernel
rounds the bias about as a single rounding of ``C_i - C_j`` would, however
large ``C`` grows along a long sequence.

Layout
------
Scores are computed transposed, keys by queries (``ST = K_j Q_i^T``), so
that every per-query reduction of the softmax (maximum, sum, the backward
pass's row sums) runs down the columns of a tile: vector operations across
queries, with no horizontal reduction and no reassociation.  The products
are the register tiles of :mod:`fastgates._linalg` (:func:`_linalg._make_tile`):
the ``w`` operand is read in panels of ``P`` columns (64 float32 or 32
float64: four vectors), so the callers hand over ``Q^T`` in blocks of one
query tile (``qt``) and ``V``, ``Q``, ``K``, ``dout`` in column panels
(:func:`panels`, :func:`tblocks`).

Work and threads
----------------
Forward: one task per query tile (in pairs ``k``, ``nqb - 1 - k`` so that
every task has the same causal work), all sequences in one ``prange``; each
task visits its key tiles from the diagonal leftwards, so that the first
tile holds the query's own key and the running maximum is finite from the
start (a fully masked row never meets ``exp(-inf - -inf)``).

Backward: per key tile, over the query tiles below it, ``dV_j``, ``dK_j``
and the column sums of ``dS``; ``dQ_i`` and the row sums of ``dS`` either in
the same loop (one task per sequence: five products per tile pair) or, when
there are fewer sequences than threads, in a second kind of task per query
tile (seven products, but every thread busy).  Every sum runs in the same
order in both plans (key tiles ascending for ``dQ``, query tiles ascending
for ``dK``/``dV``), with the same code, so the results are the same bits
whatever the thread count and whichever plan ran.
"""

import numpy as np
from numba import prange, types
from numba.extending import overload

from . import _linalg
from ._config import jit
from ._math import exp_f32, exp_f64

BT = 64          # rows of a query tile and of a key tile


# -- dtype-generic scalars -----------------------------------------------------

def fexp(x):
    """Fast ``exp`` in ``x``'s float type (:func:`fastgates._math.exp_f32` / ``exp_f64``)."""
    raise NotImplementedError("only callable from compiled code")


@overload(fexp, jit_options={"cache": True})
def _fexp_overload(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    if x == types.float64:
        return lambda x: exp_f64(x)
    return None


def minus_inf(a):
    """``-inf`` in the float type of the array ``a``."""
    raise NotImplementedError("only callable from compiled code")


@overload(minus_inf, jit_options={"cache": True})
def _minus_inf_overload(a):
    if a.dtype == types.float32:
        return lambda a: np.float32(-np.inf)
    if a.dtype == types.float64:
        return lambda a: -np.inf
    return None


# -- register-tile products ----------------------------------------------------
#
# ``_plain[n]``: out[r, c] = sum_k a[ao + r*lda + k] w[k, c] over one panel,
# stored whole (the buffers have room for every column).  ``_accum[n]``:
# out[r, c] += sum_k a[ao + r*lda + k*ka] w[k, c], ``a`` read with any
# stride along k (``ka``): a tile of ``dS`` read transposed in place.

_plain4 = _linalg._make_tile(4, 4)
_plain3 = _linalg._make_tile(3, 4)
_plain2 = _linalg._make_tile(2, 4)
_plain1 = _linalg._make_tile(1, 4)
_accum4 = _linalg._make_tile(4, 4, acc=True, kstride=True)
_accum3 = _linalg._make_tile(3, 4, acc=True, kstride=True)
_accum2 = _linalg._make_tile(2, 4, acc=True, kstride=True)
_accum1 = _linalg._make_tile(1, 4, acc=True, kstride=True)


@jit()
def product(a, ao, lda, K, w, wo, ldw, ps, npan, out, oo, ldo, M):
    """``out[r, :npan*P] = sum_k a[ao + r*lda + k] w[k, :]`` for ``r < M``.

    ``w`` is ``npan`` panels of ``P`` columns (``P`` = 64 float32, 32
    float64), row ``k`` of panel ``p`` at ``wo + p*ps + k*ldw``; ``out`` row
    ``r`` at ``oo + r*ldo``.  Every element is its own chain of FMAs over
    ``k`` in order.
    """
    P = 256 // a.itemsize
    for p in range(npan):
        r = 0
        while r < M:
            n = M - r
            ar = ao + r * lda
            wp = wo + p * ps
            orow = oo + r * ldo + p * P
            if n >= 4:
                _plain4(a, ar, lda, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 4
            elif n == 3:
                _plain3(a, ar, lda, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 3
            elif n == 2:
                _plain2(a, ar, lda, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 2
            else:
                _plain1(a, ar, lda, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 1


@jit()
def product_add(a, ao, lda, ka, K, w, wo, ldw, ps, npan, out, oo, ldo, M):
    """``out[r, :npan*P] += sum_k a[ao + r*lda + k*ka] w[k, :]`` for ``r < M`` (see :func:`product`)."""
    P = 256 // a.itemsize
    for p in range(npan):
        r = 0
        while r < M:
            n = M - r
            ar = ao + r * lda
            wp = wo + p * ps
            orow = oo + r * ldo + p * P
            if n >= 4:
                _accum4(a, ar, lda, ka, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 4
            elif n == 3:
                _accum3(a, ar, lda, ka, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 3
            elif n == 2:
                _accum2(a, ar, lda, ka, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 2
            else:
                _accum1(a, ar, lda, ka, K, w, wp, ldw, ps, out, orow, ldo, P)
                r += 1


# -- the prefix sums of the gates ----------------------------------------------

@jit()
def gate_prefix(log_f, C, z):
    """``C`` (N, T) float64 and ``z`` (N, T) int64 of ``log_f`` (N, T); see the module notes.

    One thread: O(N T) additions, far less than waking the pool costs at
    small sizes and under 1% of the attention's time at large ones.
    """
    N, T = log_f.shape
    for n in range(N):
        acc = 0.0
        last = 0
        C[n, 0] = 0.0
        z[n, 0] = 0
        for t in range(1, T):
            g = log_f[n, t]
            if g == -np.inf:
                last = t
            else:
                acc += g
            C[n, t] = acc
            z[n, t] = last


# -- one tile pair ---------------------------------------------------------------

@jit()
def _bias_rows(C, n, i0, nr, j0, nc, av, bv):
    """The re-based bias terms of one tile pair.

    ``av[r] = C_i - C_ref`` for the queries, ``bv[c] = C_j - C_ref`` for the
    keys (``C_ref = C[j0]``), rounded to the working dtype; padded query
    rows (``r >= nr``) get ``av = 0``.
    """
    ref = C[n, j0]
    for r in range(nr):
        av[r] = C[n, i0 + r] - ref
    for r in range(nr, BT):
        av[r] = 0.0
    for c in range(nc):
        bv[c] = C[n, j0 + c] - ref


@jit()
def scores(k, qt, C, z, n, ib, jb, scale, ST, av, bv, zr, T, npq):
    """``ST[c, r] = s(i0 + r, j0 + c)``, ``-inf`` where masked; returns ``nc``.

    Keys by queries; the full ``BT`` query columns are filled (padded
    queries, past ``T``, are masked).  ``npq``: panels per query tile.
    """
    d = k.shape[2]
    P = 256 // k.itemsize
    i0 = ib * BT
    j0 = jb * BT
    nr = min(BT, T - i0)
    nc = min(BT, T - j0)
    product(k, (n * T + j0) * d, d, d, qt, ((n * qt.shape[1] + ib) * npq) * d * P, P, d * P,
            npq, ST, 0, BT, nc)
    _bias_rows(C, n, i0, nr, j0, nc, av, bv)
    ninf = minus_inf(ST)
    # a mask is needed on the diagonal tile, where some row's z falls in the
    # key tile, and for padded query rows
    masked = jb == ib or j0 < z[n, i0 + nr - 1] or nr < BT
    if masked:
        for r in range(nr):
            zr[r] = z[n, i0 + r]
        for r in range(nr, BT):
            zr[r] = T + BT          # past every key: the padded row is masked
        for c in range(nc):
            j = j0 + c
            b = bv[c]
            for r in range(BT):
                s = ST[c, r] * scale + (av[r] - b)
                ok = (j <= i0 + r) & (j >= zr[r])
                ST[c, r] = s if ok else ninf
    else:
        for c in range(nc):
            b = bv[c]
            for r in range(BT):
                ST[c, r] = ST[c, r] * scale + (av[r] - b)
    return nc


# -- forward ---------------------------------------------------------------------

@jit()
def _forward_tile(n, ib, k, vp, qt, C, z, scale, out, mrow, grow, ST, O, mx, mold, lsum,
                  alpha, av, bv, zr, npq, npv):
    T = k.shape[1]
    dv = out.shape[2]
    P = 256 // k.itemsize
    Tpad = vp.shape[2]
    dvp = O.shape[1]
    i0 = ib * BT
    nr = min(BT, T - i0)
    ninf = minus_inf(ST)
    for r in range(BT):
        mold[r] = ninf if r < nr else 0.0     # padded rows: all masked, max stays 0
        lsum[r] = 0.0
    O[:, :] = 0.0
    zlo = z[n, i0]
    jb = ib
    while jb >= 0 and (jb + 1) * BT > zlo:
        j0 = jb * BT
        nc = scores(k, qt, C, z, n, ib, jb, scale, ST, av, bv, zr, T, npq)
        for r in range(BT):
            mx[r] = mold[r]
        for c in range(nc):
            for r in range(BT):
                mx[r] = max(mx[r], ST[c, r])
        for r in range(BT):
            alpha[r] = fexp(mold[r] - mx[r])
            mold[r] = mx[r]
            lsum[r] *= alpha[r]
        for c in range(nc):
            for r in range(BT):
                p = fexp(ST[c, r] - mx[r])
                ST[c, r] = p
                lsum[r] += p
        for r in range(nr):
            a = alpha[r]
            for u in range(dvp):
                O[r, u] *= a
        # O += P V_j, P read transposed in place from ST
        product_add(ST, 0, 1, BT, nc, vp, (n * vp.shape[1] * Tpad + j0) * P, P, Tpad * P, npv,
                    O, 0, dvp, nr)
        jb -= 1
    for r in range(nr):
        inv = lsum[r]
        for u in range(dv):
            out[n, i0 + r, u] = O[r, u] / inv
        mrow[n, i0 + r] = mold[r]
        grow[n, i0 + r] = np.log(lsum[r])


@jit(parallel=True)
def forward(k, vp, qt, C, z, scale, out, mrow, grow):
    """Forgetting attention forward over ``N`` sequences.

    ``k`` (N, T, d), ``vp`` :func:`panels` of ``v``, ``qt`` :func:`tblocks`
    of ``q``, ``C``/``z`` from :func:`gate_prefix`; writes ``out`` (N, T,
    dv) and, per query, the final running maximum ``mrow`` and the log of
    the softmax denominator ``grow`` (what the backward pass needs to
    recompute the probabilities).
    """
    N, T, d = k.shape
    nqb = (T + BT - 1) // BT
    npairs = (nqb + 1) // 2
    npq = qt.shape[2]
    npv = vp.shape[1]
    dvp = npv * vp.shape[3]
    for task in prange(N * npairs):
        n = task // npairs
        pair = task - n * npairs
        ST = np.empty((BT, BT), dtype=k.dtype)
        O = np.empty((BT, dvp), dtype=k.dtype)
        mx = np.empty(BT, dtype=k.dtype)
        mold = np.empty(BT, dtype=k.dtype)
        lsum = np.empty(BT, dtype=k.dtype)
        alpha = np.empty(BT, dtype=k.dtype)
        av = np.empty(BT, dtype=k.dtype)
        bv = np.empty(BT, dtype=k.dtype)
        zr = np.empty(BT, dtype=np.int64)
        _forward_tile(n, pair, k, vp, qt, C, z, scale, out, mrow, grow, ST, O, mx, mold, lsum,
                      alpha, av, bv, zr, npq, npv)
        other = nqb - 1 - pair
        if other != pair:
            _forward_tile(n, other, k, vp, qt, C, z, scale, out, mrow, grow, ST, O, mx, mold,
                          lsum, alpha, av, bv, zr, npq, npv)


# -- layouts (NumPy) --------------------------------------------------------------

def panel_width(dtype):
    """Columns of a panel of the register tiles: 64 float32, 32 float64."""
    return _linalg.panel_width(dtype)


def panels(x):
    """``x`` (N, T, D) as column panels (N, ceil(D/P), Tpad, P), zero-padded; ``Tpad`` a multiple of BT."""
    N, T, D = x.shape
    P = panel_width(x.dtype)
    npan = -(-D // P)
    Tpad = -(-T // BT) * BT
    if D == npan * P and T == Tpad and npan == 1:
        return x.reshape(N, 1, T, P)
    out = np.zeros((N, npan, Tpad, P), dtype=x.dtype)
    xp = np.zeros((N, T, npan * P), dtype=x.dtype)
    xp[:, :, :D] = x
    out[:, :, :T, :] = xp.reshape(N, T, npan, P).transpose(0, 2, 1, 3)
    return out


def tblocks(x):
    """``x`` (N, T, D) transposed per tile of BT rows: (N, nqb, BT/P, D, P), zero-padded.

    ``out[n, b, s, k, c] = x[n, b*BT + s*P + c, k]``: the ``w`` operand of
    ``x_b^T`` in panels.
    """
    N, T, D = x.shape
    P = panel_width(x.dtype)
    nb = -(-T // BT)
    if T == nb * BT:
        xp = x                      # no padding: one copy, not two
    else:
        xp = np.zeros((N, nb * BT, D), dtype=x.dtype)
        xp[:, :T] = x
    return np.ascontiguousarray(xp.reshape(N, nb, BT // P, P, D).transpose(0, 1, 2, 4, 3))


# -- backward ----------------------------------------------------------------------

@jit(parallel=True)
def row_dots(a, b, out):
    """``out[n, t] = sum_u a[n, t, u] * b[n, t, u]`` (N, T, D), summed in float64 in order."""
    N, T, D = a.shape
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for u in range(D):
                acc += np.float64(a[n, t, u]) * np.float64(b[n, t, u])
            out[n, t] = acc


@jit()
def _probs_and_dscores(n, ib, jb, k, v, qt, dot, C, z, scale, mrow, grow, Dv, ST, DP, av, bv,
                       zr, mr, gr, dr, npq):
    """``ST`` := P^T and ``DP`` := dS^T of one tile pair (keys by queries); returns ``nc``.

    ``P = exp((s - m_i) - g_i)`` from the forward pass's row statistics,
    ``dP^T = V_j dO_i^T``, ``dS = P * (dP - D_i)``.  Masked and padded
    entries are exactly 0.
    """
    T = k.shape[1]
    dv = v.shape[2]
    P = 256 // k.itemsize
    i0 = ib * BT
    j0 = jb * BT
    nr = min(BT, T - i0)
    nc = scores(k, qt, C, z, n, ib, jb, scale, ST, av, bv, zr, T, npq)
    for r in range(nr):
        mr[r] = mrow[n, i0 + r]
        gr[r] = grow[n, i0 + r]
        dr[r] = Dv[n, i0 + r]
    for r in range(nr, BT):
        mr[r] = 0.0
        gr[r] = 0.0
        dr[r] = 0.0
    for c in range(nc):
        for r in range(BT):
            ST[c, r] = fexp((ST[c, r] - mr[r]) - gr[r])
    product(v, (n * T + j0) * dv, dv, dv, dot, ((n * dot.shape[1] + ib) * npq) * dv * P, P,
            dv * P, npq, DP, 0, BT, nc)
    for c in range(nc):
        for r in range(BT):
            DP[c, r] = ST[c, r] * (DP[c, r] - dr[r])
    return nc


@jit()
def _row_sums(DP, nc, rows, n, i0, nr, rs):
    """``rows[n, i0 + r] += sum_c DP[c, r]`` (the tile's sum in the dtype, added in float64)."""
    for r in range(BT):
        rs[r] = 0.0
    for c in range(nc):
        for r in range(BT):
            rs[r] += DP[c, r]
    for r in range(nr):
        rows[n, i0 + r] += rs[r]


@jit()
def _col_parts(DP, nc, part):
    """``part[c, u] += sum_q DP[c, 16 q + u]``: column sums kept in 16 float64 lanes per key."""
    for c in range(nc):
        for u in range(16):
            part[c, u] += (DP[c, u] + DP[c, u + 16]) + (DP[c, u + 32] + DP[c, u + 48])


@jit()
def _key_tile(n, jb, with_dq, k, v, qt, dot, qp, kp, dop, C, z, scale, mrow, grow, Dv, dq_buf,
              dk, dv_out, rows, cols, ST, DP, dK, dV, part, av, bv, zr, mr, gr, dr, rs, npq):
    """The gradients that key tile ``jb`` of sequence ``n`` receives, over query tiles ascending.

    Writes ``dk``, ``dv_out`` for its keys and ``cols`` (the column sums of
    dS); with ``with_dq`` also adds ``dS K_j`` to ``dq_buf`` (Tpad, dpad)
    and the row sums to ``rows``.
    """
    T = k.shape[1]
    d = k.shape[2]
    dv = v.shape[2]
    P = 256 // k.itemsize
    Tpad = qp.shape[2]
    npd = qp.shape[1]
    npv = dop.shape[1]
    dp = dK.shape[1]
    dvp = dV.shape[1]
    nqb = (T + BT - 1) // BT
    j0 = jb * BT
    j1 = j0 + BT
    dK[:, :] = 0.0
    dV[:, :] = 0.0
    part[:, :] = 0.0
    nc = min(BT, T - j0)
    for ib in range(jb, nqb):
        i0 = ib * BT
        if z[n, i0] >= j1:
            break                   # this and every later query tile sees none of these keys
        nr = min(BT, T - i0)
        _probs_and_dscores(n, ib, jb, k, v, qt, dot, C, z, scale, mrow, grow, Dv, ST, DP, av, bv,
                           zr, mr, gr, dr, npq)
        # dV_j += P^T dO_i, dK_j += dS^T Q_i (sums over the tile's queries)
        product_add(ST, 0, BT, 1, nr, dop, (n * npv * Tpad + i0) * P, P, Tpad * P, npv, dV, 0,
                    dvp, nc)
        product_add(DP, 0, BT, 1, nr, qp, (n * npd * Tpad + i0) * P, P, Tpad * P, npd, dK, 0, dp,
                    nc)
        _col_parts(DP, nc, part)
        if with_dq:
            # dQ_i += dS K_j: dS read transposed in place
            product_add(DP, 0, 1, BT, nc, kp, (n * npd * Tpad + j0) * P, P, Tpad * P, npd, dq_buf,
                        i0 * dp, dp, nr)
            _row_sums(DP, nc, rows, n, i0, nr, rs)
    for c in range(nc):
        for u in range(d):
            dk[n, j0 + c, u] = dK[c, u] * scale
        for u in range(dv):
            dv_out[n, j0 + c, u] = dV[c, u]
        acc = 0.0
        for u in range(16):
            acc += part[c, u]
        cols[n, j0 + c] = acc


@jit()
def _query_tile(n, ib, k, v, qt, dot, kp, C, z, scale, mrow, grow, Dv, dq, rows, ST, DP, dQ,
                av, bv, zr, mr, gr, dr, rs, npq):
    """``dq`` and the row sums of dS of query tile ``ib``: key tiles ascending, as :func:`_key_tile`."""
    T = k.shape[1]
    d = k.shape[2]
    P = 256 // k.itemsize
    Tpad = kp.shape[2]
    npd = kp.shape[1]
    dp = dQ.shape[1]
    i0 = ib * BT
    nr = min(BT, T - i0)
    dQ[:, :] = 0.0
    for jb in range(z[n, i0] // BT, ib + 1):
        j0 = jb * BT
        nc = _probs_and_dscores(n, ib, jb, k, v, qt, dot, C, z, scale, mrow, grow, Dv, ST, DP, av,
                                bv, zr, mr, gr, dr, npq)
        product_add(DP, 0, 1, BT, nc, kp, (n * npd * Tpad + j0) * P, P, Tpad * P, npd, dQ, 0, dp,
                    nr)
        _row_sums(DP, nc, rows, n, i0, nr, rs)
    for r in range(nr):
        for u in range(d):
            dq[n, i0 + r, u] = dQ[r, u] * scale


@jit(parallel=True)
def backward(k, v, qt, dot, qp, kp, dop, C, z, scale, mrow, grow, Dv, dq, dk, dv_out, rows, cols,
             per_sequence):
    """Gradients of forgetting attention over ``N`` sequences.

    ``qt``/``dot``: :func:`tblocks` of ``q`` and ``dout``; ``qp``, ``kp``,
    ``dop``: :func:`panels` of ``q``, ``k``, ``dout``; ``Dv`` (N, T) the
    rows of ``dout * out`` summed.  Writes ``dq``, ``dk``, ``dv_out`` and
    the row and column sums of dS (``rows``, ``cols``, (N, T) float64, zeroed
    by the caller), from which the caller makes ``dlog_f``.

    ``per_sequence``: one task per sequence (five products per tile pair);
    else tasks per pair of key tiles and per pair of query tiles, interleaved
    (seven).  The same bits either way (see the module notes).
    """
    N, T, d = k.shape
    P = 256 // k.itemsize
    nqb = (T + BT - 1) // BT
    Tpad = nqb * BT
    npq = qt.shape[2]
    dp = qp.shape[1] * P
    dvp = dop.shape[1] * P
    npairs = (nqb + 1) // 2
    ntasks = N if per_sequence else 2 * N * npairs
    for task in prange(ntasks):
        ST = np.empty((BT, BT), dtype=k.dtype)
        DP = np.empty((BT, BT), dtype=k.dtype)
        av = np.empty(BT, dtype=k.dtype)
        bv = np.empty(BT, dtype=k.dtype)
        zr = np.empty(BT, dtype=np.int64)
        mr = np.empty(BT, dtype=k.dtype)
        gr = np.empty(BT, dtype=k.dtype)
        dr = np.empty(BT, dtype=k.dtype)
        rs = np.empty(BT, dtype=k.dtype)
        if per_sequence:
            n = task
            dQ = np.zeros((Tpad, dp), dtype=k.dtype)
            dK = np.empty((BT, dp), dtype=k.dtype)
            dV = np.empty((BT, dvp), dtype=k.dtype)
            part = np.empty((BT, 16), dtype=np.float64)
            for jb in range(nqb):
                _key_tile(n, jb, True, k, v, qt, dot, qp, kp, dop, C, z, scale, mrow, grow, Dv, dQ,
                          dk, dv_out, rows, cols, ST, DP, dK, dV, part, av, bv, zr, mr, gr, dr, rs,
                          npq)
            for i in range(T):
                for u in range(d):
                    dq[n, i, u] = dQ[i, u] * scale
        else:
            kind = task & 1
            idx = task >> 1
            n = idx // npairs
            pair = idx - n * npairs
            other = nqb - 1 - pair
            if kind == 0:
                dK = np.empty((BT, dp), dtype=k.dtype)
                dV = np.empty((BT, dvp), dtype=k.dtype)
                part = np.empty((BT, 16), dtype=np.float64)
                _key_tile(n, pair, False, k, v, qt, dot, qp, kp, dop, C, z, scale, mrow, grow, Dv,
                          dK, dk, dv_out, rows, cols, ST, DP, dK, dV, part, av, bv, zr, mr, gr, dr,
                          rs, npq)
                if other != pair:
                    _key_tile(n, other, False, k, v, qt, dot, qp, kp, dop, C, z, scale, mrow, grow,
                              Dv, dK, dk, dv_out, rows, cols, ST, DP, dK, dV, part, av, bv, zr, mr,
                              gr, dr, rs, npq)
            else:
                dQ = np.empty((BT, dp), dtype=k.dtype)
                _query_tile(n, pair, k, v, qt, dot, kp, C, z, scale, mrow, grow, Dv, dq, rows, ST,
                            DP, dQ, av, bv, zr, mr, gr, dr, rs, npq)
                if other != pair:
                    _query_tile(n, other, k, v, qt, dot, kp, C, z, scale, mrow, grow, Dv, dq, rows,
                                ST, DP, dQ, av, bv, zr, mr, gr, dr, rs, npq)
