"""Compiled LSTM kernels: the recurrence of one layer in one direction.

Notation (PyTorch's, gate order i, f, g, o; ``G = 4H``)::

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh          (B, 4H)
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

The input part ``W_ih x_t + b_ih + b_hh`` of every step is either one matrix
product done before the kernel (``xw``) or made inside it, a block of steps
at a time, by each chunk for its own rows (``x``, ``wih_tb``): then it is
read back from the cache instead of from memory.  Either way each row is
the same sum (the register tiles of :mod:`~fastgates._linalg`), so the bits
do not change.  The weight gradients are matrix products over time of the
pre-activation gradients the backward kernel stores: after the kernel, or,
when the batch is one chunk (B = 1: every thread but one would wait),
block by block on a second thread while the kernel makes the next blocks
(:func:`lstm_backward_overlapped`).

Parallelism: the batch is cut into fixed-size chunks, one ``prange``
iteration each, and the whole time loop runs inside a chunk, so threads never
wait for each other inside the recurrence.  Each chunk allocates its scratch
once, before its time loop.

Variable lengths: step ``t`` of sequence ``b`` is valid when
``t < lengths[b]``.  A forward-direction layer reads ``t = 0, 1, ...``; a
reverse-direction layer reads ``t = T-1, ..., 0`` and skips the padded steps,
so each sequence starts from its initial state at ``t = lengths[b] - 1``.  A
padded step leaves the state as it is and writes zeros.
"""

import numpy as np
from numba import prange

from ._config import jit
from ._linalg import (atomic_add, atomic_load, atomic_store, borrow, copy_rows, copy_vector,
                      dot_blocked, keep_alive, product_piece, project, project_steps, wait_until)
from ._math import (one, sigmoid_fast, sigmoid_inplace, sigmoid_scalar, tanh_fast, tanh_inplace,
                    tanh_scalar)


@jit()
def _cell_step(a, xw, c, h, tc, exact):
    """One LSTM step of one sequence, in place.

    ``a`` (4H,) holds the recurrent product on entry and the gates i, f, g, o
    on exit; ``c`` and ``h`` (H,) are advanced; ``tc`` (H,) is scratch.
    Each loop is a straight pass over contiguous vectors so that it
    vectorises.
    """
    H = c.shape[0]
    if exact is None:
        # One pass: every value stays in registers from the gate sums to h.
        for j in range(H):
            i = sigmoid_fast(a[j] + xw[j])
            f = sigmoid_fast(a[H + j] + xw[H + j])
            g = tanh_fast(a[2 * H + j] + xw[2 * H + j])
            o = sigmoid_fast(a[3 * H + j] + xw[3 * H + j])
            cc = f * c[j] + i * g
            a[j] = i
            a[H + j] = f
            a[2 * H + j] = g
            a[3 * H + j] = o
            c[j] = cc
            h[j] = o * tanh_fast(cc)
        return
    for j in range(4 * H):
        a[j] += xw[j]
    sigmoid_inplace(a[: 2 * H], exact)
    tanh_inplace(a[2 * H: 3 * H], exact)
    sigmoid_inplace(a[3 * H:], exact)
    for j in range(H):
        cc = a[H + j] * c[j] + a[j] * a[2 * H + j]
        c[j] = cc
        tc[j] = cc
    tanh_inplace(tc, exact)
    for j in range(H):
        h[j] = a[3 * H + j] * tc[j]


@jit()
def _clip(x, bound):
    """``x`` limited to ``[-bound, bound]``; NaN stays NaN."""
    if x > bound:
        return bound
    if x < -bound:
        return -bound
    return x


@jit()
def _cell_step_variant(a, xw, c, h, peep, coupled, clip, pre, exact):
    """One LSTM step with peepholes, a coupled forget gate or clipping.

    As :func:`_cell_step`, and (ONNX's LSTM): with ``peep`` (3, H) not
    empty, ``p_i ⊙ c_{t-1}`` and ``p_f ⊙ c_{t-1}`` join the i and f
    pre-activations and ``p_o ⊙ c_t`` the o one; with ``coupled``,
    ``f = 1 - i``; every gate pre-activation is limited to
    ``[-clip, clip]`` (``clip = inf``: none), and ``c_t`` is not (neither
    the state nor the argument of ``tanh(c_t)``: onnxruntime's LSTM, measured,
    although ONNX's text could be read otherwise).  When
    ``pre`` (4H,) is not empty the pre-activations are written to it, before
    clipping, for the backward pass.
    """
    H = c.shape[0]
    one_ = one(c[0])
    peephole = peep.shape[0] > 0
    keep_pre = pre.shape[0] > 0
    for j in range(H):
        cp = c[j]
        ai = a[j] + xw[j]
        af = a[H + j] + xw[H + j]
        ag = a[2 * H + j] + xw[2 * H + j]
        ao = a[3 * H + j] + xw[3 * H + j]
        if peephole:
            ai += peep[0, j] * cp
            af += peep[1, j] * cp
        i = sigmoid_scalar(_clip(ai, clip), exact)
        f = one_ - i if coupled else sigmoid_scalar(_clip(af, clip), exact)
        g = tanh_scalar(_clip(ag, clip), exact)
        cc = f * cp + i * g
        if peephole:
            ao += peep[2, j] * cc
        o = sigmoid_scalar(_clip(ao, clip), exact)
        c[j] = cc
        h[j] = o * tanh_scalar(cc, exact)
        a[j] = i
        a[H + j] = f
        a[2 * H + j] = g
        a[3 * H + j] = o
        if keep_pre:
            pre[j] = ai
            pre[H + j] = af
            pre[2 * H + j] = ag
            pre[3 * H + j] = ao


@jit()
def _inside(x, bound):
    """1 where ``clip`` lets ``x`` through (the derivative of the clip), else 0."""
    return one(x) if -bound <= x <= bound else x - x


@jit()
def _cell_grad_variant(g, ct, cp, dyt, dh, dc, da, peep, coupled, clip, pre, exact):
    """Gradient through one step of :func:`_cell_step_variant`, in place.

    As :func:`_cell_grad`; ``pre`` (4H,) holds the step's pre-activations
    when ``clip`` is finite (else it may be empty).
    """
    H = ct.shape[0]
    one_ = one(ct[0])
    peephole = peep.shape[0] > 0
    clipping = pre.shape[0] > 0
    for j in range(H):
        i = g[j]
        f = g[H + j]
        gg = g[2 * H + j]
        o = g[3 * H + j]
        cc = ct[j]
        tc = tanh_scalar(cc, exact)
        dht = dh[j] + dyt[j]
        dao = dht * tc * o * (one_ - o)
        dtc = dht * o * (one_ - tc * tc)
        if clipping:
            dao *= _inside(pre[3 * H + j], clip)
        dct = dc[j] + dtc
        if peephole:
            dct += dao * peep[2, j]
        di = dct * gg
        if coupled:
            di -= dct * cp[j]
            daf = cc - cc
        else:
            daf = dct * cp[j] * f * (one_ - f)
        dai = di * i * (one_ - i)
        dag = dct * i * (one_ - gg * gg)
        if clipping:
            dai *= _inside(pre[j], clip)
            dag *= _inside(pre[2 * H + j], clip)
            if not coupled:
                daf *= _inside(pre[H + j], clip)
        dcp = dct * f
        if peephole:
            dcp += dai * peep[0, j] + daf * peep[1, j]
        da[j] = dai
        da[H + j] = daf
        da[2 * H + j] = dag
        da[3 * H + j] = dao
        dc[j] = dcp


@jit(parallel=True)
def lstm_forward(x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, reverse, chunk, exact, y,
                 ycol, hn, cn, gates, cs, variant):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    x : (T, B, I) array
        The layer's input, when ``xw`` is empty: each chunk then makes
        ``x W_ih^T + b_ih + b_hh`` itself, ``block`` steps at a time (all
        its rows of those steps at once when the chunk is the whole batch).
    wih_tb : (npanel, I, P) array
        ``W_ih`` transposed, in column blocks (used with ``x``).
    bias : (4H,) array or empty
        ``b_ih + b_hh`` (used with ``x``).
    block : int
        Steps per block of the input projection (used with ``x``).
    xw : (T, B, 4H) array or (0, 0, 0) array
        ``x W_ih^T + b_ih + b_hh`` for every step, made before; empty: from ``x``.
    whh_tb : (nblk, H, COL_BLOCK) array
        ``W_hh`` transposed, in column blocks (:func:`~fastgates._linalg.column_blocks`).
    h0, c0 : (B, H) arrays
        Initial state.
    lengths : (B,) int64 array
    reverse : bool
        Read the sequence backwards.
    chunk : int
        Batch rows per parallel task.
    exact : None or True
        None: the fast (vectorised) activations; True: the C library's
        (by type: see :mod:`fastgates._math`).
    y : (T, B, Y) array, output
        Hidden states are written to columns ``ycol:ycol + H``.
    hn, cn : (B, H) arrays, output
        Final state.
    gates : (T, B, 4H) array or (0, 0, 0) array, output
        Post-activation i, f, g, o, kept for the backward pass when not empty.
    cs : (T, B, H) array or (0, 0, 0) array, output
        Cell states, kept with ``gates``.
    variant : None or tuple ``(peep, coupled, clip, pre)``
        None for the plain LSTM: the variants' code is then not compiled at
        all (Numba drops a branch on ``variant is None`` by the argument's
        type).  Else ``peep`` (3, H) or (0, H) array: peephole weights
        ``p_i, p_f, p_o`` (empty: no peepholes); ``coupled``: ``f = 1 - i``
        (ONNX's ``input_forget``); ``clip``: bound of the gate
        pre-activations (``inf``: none); ``pre`` (T, B, 4H) or (0, 0, 0)
        array, output: the pre-activations (before clipping), kept for the
        backward pass when clipping.
    """
    fused = xw.shape[0] == 0
    B, H = h0.shape
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        scratch = _forward_scratch(b1 - b0, H, block if fused else 0, h0.dtype)
        _forward_rows(b0, b1, x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, reverse,
                      exact, y, ycol, hn, cn, gates, cs, variant, scratch, None)


@jit(parallel=True)
def lstm_forward_overlapped(x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, reverse, exact,
                            y, ycol, hn, cn, gates, cs, variant):
    """:func:`lstm_forward` of a batch that is one chunk, with the input
    projection made ``block`` steps at a time, in reading order, into ``xw``
    (T, B, 4H) by whichever task gets to each block first, while the
    recurrence reads the blocks made before.

    The first task to start (the calling thread, unless it is late) runs the
    recurrence; the other projects blocks ahead of it.  Blocks are claimed
    from a shared count, so the recurrence never waits for a block nobody
    has started: on reaching one it makes it itself, and it only waits (see
    :func:`~fastgates._linalg.wait_until`) for a block that the other task
    has claimed and not finished.  On one thread, or with the other task
    late (a busy machine), the recurrence makes them all.  Each row of the
    projection is its own sum (:func:`~fastgates._linalg.project`): the same
    bits whoever makes it.
    """
    B, H = h0.shape
    T = x.shape[0]
    nblk = (T + block - 1) // block
    scratch = _forward_scratch(B, H, 0, h0.dtype)
    # [0] tasks started, [1] blocks claimed, [2 + j] block j made
    sync = np.zeros(2 + nblk, dtype=np.int64)
    for _task in prange(2):
        if atomic_add(sync, 0, 1) == 0:
            _forward_rows(0, B, x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, reverse,
                          exact, y, ycol, hn, cn, gates, cs, variant, scratch, sync)
        else:
            while _project_next(x, wih_tb, bias, block, xw, reverse, sync):
                pass


@jit()
def _project_next(x, wih_tb, bias, block, xw, reverse, sync):
    """Claim the next block of the input projection and make it; False when none is left.

    See :func:`lstm_forward_overlapped` (``sync``: tasks started, blocks
    claimed, then one flag per block, set with release ordering once the
    block is made).
    """
    T, B, I = x.shape
    nblk = sync.shape[0] - 2
    j = atomic_add(sync, 1, 1)
    if j >= nblk:
        return False
    s = j * block
    n = min(block, T - s)
    t_lo = T - s - n if reverse else s
    project(x[t_lo:t_lo + n].reshape(n * B, I), wih_tb, bias,
            xw[t_lo:t_lo + n].reshape(n * B, xw.shape[2]))
    atomic_store(sync, 2 + j, 1)
    return True


@jit()
def _projected(x, wih_tb, bias, block, xw, reverse, sync, j):
    """Return once block ``j`` of the projection is made, making unclaimed blocks up to it."""
    while atomic_load(sync, 2 + j) == 0:
        if atomic_load(sync, 1) <= j:
            _project_next(x, wih_tb, bias, block, xw, reverse, sync)
        else:
            wait_until(sync, 2 + j, 1)


@jit()
def _forward_scratch(nb, H, block, dtype):
    """A chunk's scratch: ``h``, ``c`` (nb, H), ``acc`` (nb, 4H), ``tc`` (H,),
    ``xwb`` (block, nb, 4H) for the projection made inside, ``nopre`` (0,)."""
    return (np.empty((nb, H), dtype=dtype), np.empty((nb, H), dtype=dtype),
            np.empty((nb, 4 * H), dtype=dtype), np.empty(H, dtype=dtype),
            np.empty((block, nb, 4 * H), dtype=dtype), np.empty(0, dtype=dtype))


@jit(inline_in_twins=True)
def _forward_rows(b0, b1, x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, reverse, exact,
                  y, ycol, hn, cn, gates, cs, variant, scratch, progress):
    """The time loop of rows ``b0:b1`` (see :func:`lstm_forward`).

    ``scratch`` from :func:`_forward_scratch`.  With ``xw`` empty the
    projection is made here, ``block`` steps at a time.  With ``progress``
    an array (not None), the projection is shared with another task
    through it (:func:`lstm_forward_overlapped`): before each ``block``
    steps the loop makes sure their block of ``xw`` is made
    (:func:`_projected`).  None, as :func:`lstm_forward` passes, drops that
    code by type: not compiled for the plain kernel.
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    H = h0.shape[1]
    keep = gates.shape[0] > 0
    nb = b1 - b0
    # views of borrowed arrays take no references (_linalg.borrow): the
    # caller owns the arguments and the scratch for the whole call (kept
    # alive to the end below, for a caller that inlines this function)
    h, c, acc, tc, xwb, nopre = (borrow(scratch[0]), borrow(scratch[1]), borrow(scratch[2]),
                                 borrow(scratch[3]), borrow(scratch[4]), scratch[5])
    x, xw, y, gates, cs = borrow(x), borrow(xw), borrow(y), borrow(gates), borrow(cs)
    copy_rows(h, h0[b0:b1])
    copy_rows(c, c0[b0:b1])
    t_lo = 0
    for s in range(T):
        t = T - 1 - s if reverse else s
        if fused and s % block == 0:
            t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
        if progress is not None:
            if s % block == 0:
                _projected(x, wih_tb, bias, block, xw, reverse, progress, s // block)
        dot_blocked(h, whh_tb, acc)
        for r in range(nb):
            b = b0 + r
            xwr = xwb[t - t_lo, r] if fused else xw[t, b]
            if t >= lengths[b]:
                y[t, b, ycol:ycol + H] = 0.0
                if keep:
                    gates[t, b, :] = 0.0
                    cs[t, b, :] = 0.0
                continue
            if variant is None:
                _cell_step(acc[r], xwr, c[r], h[r], tc, exact)
            else:
                peep, coupled, clip, pre = variant
                _cell_step_variant(acc[r], xwr, c[r], h[r], peep, coupled, clip,
                                   pre[t, b] if pre.shape[0] > 0 else nopre, exact)
            copy_vector(y[t, b, ycol:ycol + H], h[r])
            if keep:
                copy_vector(gates[t, b], acc[r])
                copy_vector(cs[t, b], c[r])
    copy_rows(hn[b0:b1], h)
    copy_rows(cn[b0:b1], c)
    # the scratch was borrowed: inlined into a twin that allocated it, this
    # is its last use (see docs/internals.md, "Views in a time loop")
    keep_alive(scratch)


@jit()
def _cell_grad(g, ct, cp, dyt, dh, dc, da, tc, exact):
    """Gradient through one LSTM step of one sequence, in place.

    ``g`` (4H,) the kept gates i, f, g, o; ``ct``/``cp`` (H,) the cell state
    after/before the step; ``dyt`` (H,) the output gradient.  On entry
    ``dh``, ``dc`` hold the gradient with respect to the state after the
    step; on exit ``dc`` holds the gradient with respect to ``c_{t-1}`` and
    ``da`` (4H,) the one with respect to the pre-activations (``dh`` is left
    for the caller: it needs the recurrent product).
    """
    H = ct.shape[0]
    one_ = one(ct[0])
    if exact is None:
        for j in range(H):
            tc[j] = tanh_fast(ct[j])
    else:
        for j in range(H):
            tc[j] = ct[j]
        tanh_inplace(tc, exact)
    for j in range(H):
        i = g[j]
        f = g[H + j]
        gg = g[2 * H + j]
        o = g[3 * H + j]
        dht = dh[j] + dyt[j]
        dct = dc[j] + dht * o * (one_ - tc[j] * tc[j])
        da[j] = dct * gg * i * (one_ - i)
        da[H + j] = dct * cp[j] * f * (one_ - f)
        da[2 * H + j] = dct * i * (one_ - gg * gg)
        da[3 * H + j] = dht * tc[j] * o * (one_ - o)
        dc[j] = dct * f


@jit(parallel=True)
def lstm_backward(dy, dycol, dhn, dcn, whh_b, gates, cs, y, ycol, h0, c0, lengths,
                  reverse, chunk, exact, dgates, hprev, dh0, dc0, variant, cprev):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient of the loss with respect to the outputs; this direction's
        columns are ``dycol:dycol + H``.
    dhn, dcn : (B, H) arrays
        Gradient with respect to the final state.
    whh_b : (nblk, 4H, COL_BLOCK) array
        ``W_hh`` in column blocks (:func:`~fastgates._linalg.column_blocks`).
    gates, cs : arrays kept by :func:`lstm_forward`.
    y : (T, B, Y) array
        The forward outputs; this direction's columns start at ``ycol``.
    h0, c0 : (B, H) arrays
        Initial state of the forward pass.
    lengths, reverse, chunk, exact :
        As in the forward pass.
    dgates : (T, B, 4H) array, output
        Gradient with respect to the pre-activations ``a_t`` (zero at padded
        steps).
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps): the operand of
        the ``W_hh`` gradient.
    dh0, dc0 : (B, H) arrays, output
        Gradient with respect to the initial state.
    variant :
        As in the forward pass (``pre`` as it filled it).
    cprev : (T, B, H) array or (0, 0, 0) array, output
        With peepholes, ``c_{t-1}`` of every valid step (zero at padded
        steps): the operand of the ``p_i``, ``p_f`` gradients.
    """
    T, B, G = gates.shape
    H = G // 4
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        scratch = _backward_scratch(b1 - b0, H, gates.dtype)
        _backward_rows(b0, b1, dy, dycol, dhn, dcn, whh_b, gates, cs, y, ycol, h0, c0, lengths,
                       reverse, exact, dgates, hprev, dh0, dc0, variant, cprev, scratch,
                       np.empty(0, dtype=np.int64))


@jit(parallel=True)
def lstm_backward_overlapped(dy, dycol, dhn, dcn, whh_b, gates, cs, y, ycol, h0, c0, lengths,
                             reverse, exact, dgates, hprev, dh0, dc0, variant, cprev, x, w_ih,
                             wb_ih, dw_ih, dw_hh, db, dx, work, block_rows, init):
    """:func:`lstm_backward` of a batch that is one chunk, with the products
    over time of each block of steps taken by a second task as soon as the
    recurrence has made the block.

    One chunk leaves every thread but one idle in the recurrence; here the
    second does the work of :func:`~fastgates._linalg.products_side_by_side`
    (the rows of ``work``, on ``x`` (T*B, I), ``w_ih``, ``wb_ih``, into
    ``dw_ih``, ``dw_hh``, ``db``, ``dx`` (T*B, I)) block by block (blocks of
    ``block_rows`` rows from row 0), in the order the recurrence completes
    them, each as a run of whole blocks in the order of a call over all the
    steps: the same bits as the kernel followed by the products.

    The first task to start (the calling thread, unless it is late) runs the
    recurrence, then takes whatever blocks of products are left; the other
    takes blocks as the recurrence completes them.  Blocks are claimed in
    order from a shared count, and each waits for the one before (their sums
    go into the same arrays in that order), so on one thread, or with the
    other task late (a busy machine), the first makes them all and waits for
    nobody.  (Roles by order of arrival, not by task number: a scheduler
    that ran the second task first on the only thread would otherwise wait
    forever for a recurrence that has not started.)
    """
    T, B, G = gates.shape
    rows = T * B
    steps = block_rows // B
    nblk = (rows + block_rows - 1) // block_rows
    scratch = _backward_scratch(B, G // 4, gates.dtype)
    # [0] tasks started, [1] steps the recurrence has done, [2] blocks of
    # products claimed, [3] blocks of products done
    sync = np.zeros(4, dtype=np.int64)
    for _task in prange(2):
        if atomic_add(sync, 0, 1) == 0:
            _backward_rows(0, B, dy, dycol, dhn, dcn, whh_b, gates, cs, y, ycol, h0, c0, lengths,
                           reverse, exact, dgates, hprev, dh0, dc0, variant, cprev, scratch,
                           sync)
        while _products_next(sync, nblk, steps, T, reverse, work, dgates, x, hprev, w_ih, wb_ih,
                             dw_ih, dw_hh, db, dx, block_rows, init):
            pass


@jit()
def _products_next(sync, nblk, steps, T, reverse, work, dgates, x, hprev, w_ih, wb_ih, dw_ih,
                   dw_hh, db, dx, block_rows, init):
    """Claim the next block of :func:`lstm_backward_overlapped`'s products and make it.

    Waits until the recurrence has made the block's steps and the block
    before is done; returns False when no block is left.
    """
    jj = atomic_add(sync, 2, 1)
    if jj >= nblk:
        return False
    rows, G = T * dgates.shape[1], dgates.shape[2]
    j = jj if reverse else nblk - 1 - jj
    # the steps the recurrence has made when block j is complete
    wait_until(sync, 1, min(T, (j + 1) * steps) if reverse else T - j * steps)
    wait_until(sync, 3, jj)
    r0 = j * block_rows
    r1 = min(rows, r0 + block_rows)
    dg = dgates.reshape(rows, G)
    hp = hprev.reshape(rows, hprev.shape[2])
    for u in range(work.shape[0]):
        product_piece(work[u], dg[r0:r1], x[r0:r1], hp[r0:r1], w_ih, wb_ih, dw_ih, dw_hh, db,
                      dx[r0:r1], block_rows, not reverse, init and jj == 0)
    atomic_store(sync, 3, jj + 1)
    return True


@jit()
def _backward_scratch(nb, H, dtype):
    """A chunk's scratch: ``dh``, ``dc``, ``dhrec`` (nb, H), ``tc`` (H,), ``nopre`` (0,)."""
    return (np.empty((nb, H), dtype=dtype), np.empty((nb, H), dtype=dtype),
            np.empty((nb, H), dtype=dtype), np.empty(H, dtype=dtype), np.empty(0, dtype=dtype))


@jit(inline_in_twins=True)
def _backward_rows(b0, b1, dy, dycol, dhn, dcn, whh_b, gates, cs, y, ycol, h0, c0, lengths,
                   reverse, exact, dgates, hprev, dh0, dc0, variant, cprev, scratch, progress):
    """The backward time loop of rows ``b0:b1`` (see :func:`lstm_backward`).

    ``scratch`` from :func:`_backward_scratch`.  When ``progress`` has
    elements, ``progress[1]`` is set to the number of steps done after each
    step (an atomic store: what the step wrote is visible to a task that
    reads the count).  Nothing in here raises or allocates: a task waiting
    on the count must not wait for a task that failed.
    """
    T, B, G = gates.shape
    H = G // 4
    keep_cprev = cprev.shape[0] > 0
    publish = progress.shape[0] > 0
    nb = b1 - b0
    # views of borrowed arrays take no references (_linalg.borrow): the
    # caller owns the arguments and the scratch for the whole call (kept
    # alive to the end below, for a caller that inlines this function)
    dh, dc, dhrec, tc, nopre = (borrow(scratch[0]), borrow(scratch[1]), borrow(scratch[2]),
                                borrow(scratch[3]), scratch[4])
    dy, gates, cs, y, dgates = borrow(dy), borrow(gates), borrow(cs), borrow(y), borrow(dgates)
    hprev, cprev, h0, c0 = borrow(hprev), borrow(cprev), borrow(h0), borrow(c0)
    copy_rows(dh, dhn[b0:b1])
    copy_rows(dc, dcn[b0:b1])
    for s in range(T):
        t = s if reverse else T - 1 - s
        # The step's pre-activation gradient is written in place into
        # dgates, which is also the operand of the recurrent product.
        da = dgates[t, b0:b1]
        for r in range(nb):
            b = b0 + r
            n = lengths[b]
            if t >= n:
                dgates[t, b, :] = 0.0
                hprev[t, b, :] = 0.0
                if keep_cprev:
                    cprev[t, b, :] = 0.0
                continue
            first = t == n - 1 if reverse else t == 0
            tp = t + 1 if reverse else t - 1
            if first:
                cp = c0[b]
                copy_vector(hprev[t, b], h0[b])
            else:
                cp = cs[tp, b]
                copy_vector(hprev[t, b], y[tp, b, ycol:ycol + H])
            if keep_cprev:
                copy_vector(cprev[t, b], cp)
            if variant is None:
                _cell_grad(gates[t, b], cs[t, b], cp, dy[t, b, dycol:dycol + H],
                           dh[r], dc[r], da[r], tc, exact)
            else:
                peep, coupled, clip, pre = variant
                _cell_grad_variant(gates[t, b], cs[t, b], cp, dy[t, b, dycol:dycol + H],
                                   dh[r], dc[r], da[r], peep, coupled, clip,
                                   pre[t, b] if pre.shape[0] > 0 else nopre, exact)
        dot_blocked(da, whh_b, dhrec)
        for r in range(nb):
            # A padded step passes the state's gradient through untouched.
            if t < lengths[b0 + r]:
                copy_vector(dh[r], dhrec[r])
        if publish:
            atomic_store(progress, 1, s + 1)
    copy_rows(dh0[b0:b1], dh)
    copy_rows(dc0[b0:b1], dc)
    keep_alive(scratch)   # as in _forward_rows


# -- the projected LSTM (PyTorch's proj_size) ------------------------------------


@jit(parallel=True)
def lstmp_forward(x, wih_tb, bias, block, xw, whh_tb, whr_tb, h0, c0, lengths, reverse, chunk,
                  exact, y, ycol, hn, cn, gates, cs):
    """:func:`lstm_forward` with PyTorch's projection of the hidden state.

    ``h_t = W_hr (o ⊙ tanh(c_t))``: ``h0``, ``hn`` and the output columns
    ``ycol:ycol + P`` have ``P`` units, ``c0``, ``cn`` and the cell states
    ``H``; ``whh_tb`` holds ``W_hh^T`` (P, 4H) and ``whr_tb`` ``W_hr^T``
    (H, P), in column blocks.  A step makes the recurrent product, the
    cell step of each valid row, then the projection of the chunk's rows;
    padded rows keep their ``h`` and ``c``.  Other arguments as in
    :func:`lstm_forward` (no peepholes, coupling or clipping: PyTorch's
    projected LSTM has none).
    """
    fused = xw.shape[0] == 0
    T = x.shape[0] if fused else xw.shape[0]
    B, P = h0.shape
    H = c0.shape[1]
    G = 4 * H
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = h0.dtype
        h = np.empty((nb, P), dtype=dtype)
        c = np.empty((nb, H), dtype=dtype)
        acc = np.empty((nb, G), dtype=dtype)
        full = np.empty((nb, H), dtype=dtype)      # o ⊙ tanh(c_t), before the projection
        proj = np.empty((nb, P), dtype=dtype)
        tc = np.empty(H, dtype=dtype)
        xwb = np.empty((block if fused else 0, nb, G), dtype=dtype)
        copy_rows(h, h0[b0:b1])
        copy_rows(c, c0[b0:b1])
        t_lo = 0
        for s in range(T):
            t = T - 1 - s if reverse else s
            if fused and s % block == 0:
                t_lo = project_steps(x, s, reverse, b0, b1, wih_tb, bias, xwb)
            dot_blocked(h, whh_tb, acc)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    full[r, :] = 0.0
                    continue
                _cell_step(acc[r], xwb[t - t_lo, r] if fused else xw[t, b], c[r], full[r], tc,
                           exact)
            dot_blocked(full, whr_tb, proj)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + P] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        cs[t, b, :] = 0.0
                    continue
                copy_vector(h[r], proj[r])
                copy_vector(y[t, b, ycol:ycol + P], proj[r])
                if keep:
                    copy_vector(gates[t, b], acc[r])
                    copy_vector(cs[t, b], c[r])
        copy_rows(hn[b0:b1], h)
        copy_rows(cn[b0:b1], c)


@jit(parallel=True)
def lstmp_backward(dy, dycol, dhn, dcn, whh_b, whr_b, gates, cs, y, ycol, h0, c0, lengths,
                   reverse, chunk, exact, dgates, hprev, dh0, dc0, dhproj, full):
    """Back-propagate through :func:`lstmp_forward`.

    ``whh_b``, ``whr_b``: column blocks of ``W_hh`` (4H, P) and ``W_hr``
    (P, H).  Fills, besides what :func:`lstm_backward` fills (``hprev``
    with ``P`` units), ``dhproj`` (T, B, P), the gradient of each step's
    ``h_t``, and ``full`` (T, B, H), its ``o ⊙ tanh(c_t)``: ``W_hr``'s
    gradient is their product over time.  Zero at padded steps.
    """
    T, B, G = gates.shape
    H = G // 4
    P = h0.shape[1]
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dtype = gates.dtype
        dh = np.empty((nb, P), dtype=dtype)
        dc = np.empty((nb, H), dtype=dtype)
        dht = np.empty((nb, P), dtype=dtype)
        dfull = np.empty((nb, H), dtype=dtype)
        da = np.empty((nb, G), dtype=dtype)
        dhrec = np.empty((nb, P), dtype=dtype)
        tc = np.empty(H, dtype=dtype)
        nodyt = np.zeros(H, dtype=dtype)        # dy enters through dht, before W_hr
        copy_rows(dh, dhn[b0:b1])
        copy_rows(dc, dcn[b0:b1])
        for s in range(T):
            t = s if reverse else T - 1 - s
            # Phase 1: the gradient of h_t, and through W_hr that of o ⊙ tanh(c_t).
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    dht[r, :] = 0.0
                    continue
                dyt = dy[t, b, dycol:dycol + P]
                for j in range(P):
                    dht[r, j] = dh[r, j] + dyt[j]
            dot_blocked(dht, whr_b, dfull)
            # Phase 2: the cell step's gradient.
            for r in range(nb):
                b = b0 + r
                n_ = lengths[b]
                if t >= n_:
                    da[r, :] = 0.0
                    dgates[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    dhproj[t, b, :] = 0.0
                    full[t, b, :] = 0.0
                    continue
                first = t == n_ - 1 if reverse else t == 0
                tp = t + 1 if reverse else t - 1
                if first:
                    copy_vector(hprev[t, b], h0[b])
                    cp = c0[b]
                else:
                    copy_vector(hprev[t, b], y[tp, b, ycol:ycol + P])
                    cp = cs[tp, b]
                g = gates[t, b]
                _cell_grad(g, cs[t, b], cp, nodyt, dfull[r], dc[r], da[r], tc, exact)
                fu = full[t, b]
                for j in range(H):
                    fu[j] = g[3 * H + j] * tc[j]
                copy_vector(dhproj[t, b], dht[r])
                copy_vector(dgates[t, b], da[r])
            dot_blocked(da, whh_b, dhrec)
            for r in range(nb):
                if t < lengths[b0 + r]:
                    for j in range(P):
                        dh[r, j] = dhrec[r, j]
        copy_rows(dh0[b0:b1], dh)
        copy_rows(dc0[b0:b1], dc)
