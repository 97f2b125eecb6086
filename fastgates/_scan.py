"""The linear recurrence ``h_t = a_t ⊙ h_{t-1} + b_t``, scanned in parallel over time.

The cells whose gates see only the input (minGRU, minLSTM: see
:mod:`fastgates.cells.mingru`) reduce their recurrence to this scan once
their coefficients ``a_t``, ``b_t`` are known for every step; its adjoint,
``g_t = dy_t + a_{t+1} ⊙ g_{t+1}``, is the same scan run backwards.  Both
are compiled once here for every cell that uses them.

Steps are read in the direction's order ``s = 0 .. n-1`` of a sequence of
``n`` valid steps (``t = s``, or ``t = n - 1 - s`` reading backwards);
steps from ``n`` on are padding (outputs and gradients 0 there).

Parallel in time
----------------
The reading order is cut into ``nblocks`` blocks of ``S`` steps
(:func:`scan_blocks`), and the batch rows times the blocks are the tasks of
the parallel loops (reduce, then scan):

1. each block but the last sums itself up: its end state ``u_k`` scanned
   from 0 (the first block from the initial state: it is exact) and the
   product ``A_k`` of its ``a``, without writing anything else;
2. a short serial pass carries the block boundaries: the state at the
   end of block ``k`` is ``u_k + A_k ⊙ h_{k-1}``;
3. each block scans its steps from the state before it, writing ``y``: the
   sequential recurrence, from a start computed in another order.

The adjoint is cut the same way from the last block down.  Steps 1 and 3
read the coefficients twice and write each output once (a fix-up of the
outputs instead of step 3 would read and write them again: measured 30%
slower, T = 10,000 to 100,000, one sequence of 256 units).  The products ``A`` shrink geometrically over a long block; a
product below the smallest normal number (``np.finfo(dtype).tiny``) is set
to 0, which changes a state by less than ``tiny`` times the carried one
(far below its rounding) and keeps the loops off subnormal numbers, which
cost a hundred times a normal multiplication (measured: 71 ns per value and
step instead of under 1 ns, T = 100,000, one sequence).

The blocks are fixed by the shape ``(T, B)`` alone, never by the number of
threads: every value comes from the same operations in the same order on
one thread or many, so the results are the same bits.  With one block (a
batch of more than ``SCAN_TASKS // 2`` rows, or fewer than
``2 * SCAN_MIN_STEPS`` steps) this is the plain sequential scan.  Cut into blocks, the state a block starts from is
``u_k + A_k ⊙ h_{k-1}`` instead of the step-by-step value: the same sum in
another order, so the results differ from the sequential scan by rounding
only (both are forward-stable; see ``docs/mingru.md`` for the bound the
tests check).
"""

import numpy as np
from numba import prange

from . import _config
from ._config import jit
from ._linalg import copy_vector

# Tasks of the scan: a batch of B rows is cut into max(1, SCAN_TASKS // B)
# blocks of time, so that a single sequence still gives the threads work
# (and a pool thread that lags behind holds up a sixteenth of it, not a
# half).  A fixed number, not the thread count: the cut decides the bits.
SCAN_TASKS = 16
# No block shorter than this (the carry pass and the fix-up cost per block).
SCAN_MIN_STEPS = 64


def scan_blocks(T, B):
    """Blocks of time per sequence for a scan of ``T`` steps of a batch of ``B``.

    The only choice of the scan that depends on the batch: a call on a slice
    of a batch gets the whole batch's blocks, and so its bits, when the
    slice is planned as the batch (:class:`fastgates._config.task_settings`,
    as :mod:`fastgates.dask` does).
    """
    return max(1, min(SCAN_TASKS // _config.planned_batch(B), T // SCAN_MIN_STEPS))


@jit(parallel=True)
def scan_forward(g, acol, c0, c1, bcol, ncol, h0, lengths, reverse, nblocks, y, ycol, hn):
    """``h_t = a_t ⊙ h_{t-1} + b_t`` over every sequence, written to ``y``.

    Parameters
    ----------
    g : (T, B, *) array
        What the coefficients are made of, a cell's gates: ``a_t = c0 + c1
        g[t, :, acol:acol + H]`` and ``b_t = g[t, :, bcol:bcol + H] ⊙
        g[t, :, ncol:ncol + H]`` (minGRU: ``1 - z`` and ``z ⊙ n``).
    c0, c1 : scalars of ``g``'s dtype
    h0 : (B, H) array
        The state before the first step read.
    lengths : (B,) int64 array
    reverse : bool
        Read each sequence from its last valid step to its first.
    nblocks : int
        Blocks of time per sequence (:func:`scan_blocks`).
    y : (T, B, Y) array, output
        ``h_t`` in columns ``ycol:ycol + H``; 0 at padded steps.
    hn : (B, H) array, output
        The state after the last valid step (``h0`` for an empty sequence).
    """
    T = y.shape[0]
    B, H = h0.shape
    S = (T + nblocks - 1) // nblocks
    dtype = h0.dtype
    tiny = np.finfo(dtype).tiny
    # per block but the last: its end state (from 0, then carried) and the
    # product of its coefficients
    u = np.empty((nblocks, B, H), dtype=dtype)
    p = np.empty((nblocks, B, H), dtype=dtype)
    if nblocks > 1:
        for task in prange(B * (nblocks - 1)):
            b = task // (nblocks - 1)
            k = task % (nblocks - 1)
            n = lengths[b]
            s0 = k * S
            s1 = min(s0 + S, n)
            ub = u[k, b]
            pb = p[k, b]
            if k == 0:
                copy_vector(ub, h0[b])
            else:
                ub[:] = 0.0
            pb[:] = 1.0
            for s in range(s0, s1):
                t = n - 1 - s if reverse else s
                gt = g[t, b]
                for j in range(H):
                    a = c0 + c1 * gt[acol + j]
                    ub[j] = a * ub[j] + gt[bcol + j] * gt[ncol + j]
                    q = pb[j] * a
                    pb[j] = q if q >= tiny else 0.0
        # the block boundaries, in order (an empty block has u = 0, p = 1)
        for b in range(B):
            for k in range(1, nblocks - 1):
                for j in range(H):
                    u[k, b, j] += p[k, b, j] * u[k - 1, b, j]
    for task in prange(B * nblocks):
        b = task // nblocks
        k = task % nblocks
        n = lengths[b]
        s0 = k * S
        s1 = min(s0 + S, n)
        for t in range(max(s0, n), min(s0 + S, T)):
            y[t, b, ycol:ycol + H] = 0.0
        if s0 >= s1 and not (k == 0 and n == 0):
            continue
        # the state before the block (p[k] is free: the summaries are read)
        h = p[k, b]
        if k == 0:
            copy_vector(h, h0[b])
        else:
            copy_vector(h, u[k - 1, b])
        for s in range(s0, s1):
            t = n - 1 - s if reverse else s
            gt = g[t, b]
            yt = y[t, b]
            for j in range(H):
                v = (c0 + c1 * gt[acol + j]) * h[j] + gt[bcol + j] * gt[ncol + j]
                h[j] = v
                yt[ycol + j] = v
        if s1 == n:
            copy_vector(hn[b], h)


@jit(parallel=True)
def scan_backward(dy, dycol, dhn, a, acol, c0, c1, lengths, reverse, nblocks, g, gcol, dh0):
    """The adjoint of :func:`scan_forward`: ``g_t = dy_t + a_{t+1} ⊙ g_{t+1}``.

    In reading order ``s``: ``g_s = dy_s + a_{s+1} ⊙ g_{s+1}``, and at the
    last valid step ``g = dy + dhn``; ``g_s`` is the gradient with respect
    to ``h_s``, from which a cell's coefficient gradients follow.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient with respect to the outputs (columns ``dycol:dycol + H``).
    dhn : (B, H) array
        Gradient with respect to the final state.
    a, acol, c0, c1 :
        The coefficients ``a_t = c0 + c1 a[t, :, acol:acol + H]`` of the
        forward scan.
    lengths, reverse, nblocks :
        As for :func:`scan_forward`.
    g : (T, B, *) array, output
        ``g_t`` in columns ``gcol:gcol + H`` (may be ``a``'s array, other
        columns); 0 at padded steps.
    dh0 : (B, H) array, output
        Gradient with respect to the initial state, ``a_0 ⊙ g_0``.
    """
    T = g.shape[0]
    B, H = dhn.shape
    S = (T + nblocks - 1) // nblocks
    dtype = dhn.dtype
    tiny = np.finfo(dtype).tiny
    # per block after the first, up to the one holding the last valid step
    # (top, which starts from dhn): g at its first step scanned from 0
    # (top: from dhn), the product of a over its later steps, and a at its
    # first step; then the carry into the block below, a_{s1} g_{s1}
    first = np.empty((nblocks, B, H), dtype=dtype)
    m = np.empty((nblocks, B, H), dtype=dtype)
    afirst = np.empty((nblocks, B, H), dtype=dtype)
    if nblocks > 1:
        for task in prange(B * (nblocks - 1)):
            b = task // (nblocks - 1)
            k = task % (nblocks - 1) + 1
            n = lengths[b]
            s0 = k * S
            s1 = min(s0 + S, n)
            if s0 >= s1:
                continue
            acc = first[k, b]
            mb = m[k, b]
            if s1 == n:
                copy_vector(acc, dhn[b])
            else:
                acc[:] = 0.0
            mb[:] = 1.0
            tnext = 0
            for s in range(s1 - 1, s0 - 1, -1):
                t = n - 1 - s if reverse else s
                dyt = dy[t, b]
                if s == s1 - 1:
                    for j in range(H):
                        acc[j] = dyt[dycol + j] + acc[j]
                else:
                    an = a[tnext, b]
                    for j in range(H):
                        c = c0 + c1 * an[acol + j]
                        acc[j] = dyt[dycol + j] + c * acc[j]
                        q = mb[j] * c
                        mb[j] = q if q >= tiny else 0.0
                tnext = t
            af = afirst[k, b]
            an = a[tnext, b]
            for j in range(H):
                af[j] = c0 + c1 * an[acol + j]
        # the block boundaries, from the top block down: m[k] becomes the
        # carry into block k - 1
        for b in range(B):
            n = lengths[b]
            if n == 0:
                continue
            top = (n - 1) // S
            for k in range(top, 0, -1):
                mk = m[k, b]
                fk = first[k, b]
                ak = afirst[k, b]
                if k == top:
                    for j in range(H):
                        mk[j] = ak[j] * fk[j]
                else:
                    cin = m[k + 1, b]
                    for j in range(H):
                        mk[j] = ak[j] * (fk[j] + mk[j] * cin[j])
    for task in prange(B * nblocks):
        b = task // nblocks
        k = task % nblocks
        n = lengths[b]
        s0 = k * S
        s1 = min(s0 + S, n)
        for t in range(max(s0, n), min(s0 + S, T)):
            g[t, b, gcol:gcol + H] = 0.0
        if n == 0:
            if k == 0:
                copy_vector(dh0[b], dhn[b])
            continue
        if s0 >= s1:
            continue
        # what comes in from above (first[k] is free: the summaries are read)
        acc = first[k, b]
        if s1 == n:
            copy_vector(acc, dhn[b])
        else:
            copy_vector(acc, m[k + 1, b])
        tnext = 0
        for s in range(s1 - 1, s0 - 1, -1):
            t = n - 1 - s if reverse else s
            dyt = dy[t, b]
            gt = g[t, b]
            if s == s1 - 1:
                for j in range(H):
                    v = dyt[dycol + j] + acc[j]
                    acc[j] = v
                    gt[gcol + j] = v
            else:
                an = a[tnext, b]
                for j in range(H):
                    v = dyt[dycol + j] + (c0 + c1 * an[acol + j]) * acc[j]
                    acc[j] = v
                    gt[gcol + j] = v
            tnext = t
        if k == 0:
            an = a[tnext, b]
            for j in range(H):
                dh0[b, j] = (c0 + c1 * an[acol + j]) * acc[j]
