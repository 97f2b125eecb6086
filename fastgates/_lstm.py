"""Compiled LSTM kernels: the recurrence of one layer in one direction.

Notation (PyTorch's, gate order i, f, g, o; ``G = 4H``)::

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh          (B, 4H)
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

The input part ``W_ih x_t + b_ih + b_hh`` of every step is one matrix product
done before the kernel (``xw``); the kernels run only what is sequential: the
recurrent product ``h_{t-1} W_hh^T`` and the element-wise gate update.  The
weight gradients are matrix products after the backward kernel, over all steps
at once, from the pre-activation gradients it stores.

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
from ._math import sigmoid, tanh


@jit(parallel=True)
def lstm_forward(xw, whh_t, h0, c0, lengths, reverse, chunk, y, ycol, hn, cn, gates, cs):
    """Run the recurrence of one layer-direction.

    Parameters
    ----------
    xw : (T, B, 4H) array
        ``x W_ih^T + b_ih + b_hh`` for every step.
    whh_t : (H, 4H) array
        ``W_hh`` transposed, C-contiguous.
    h0, c0 : (B, H) arrays
        Initial state.
    lengths : (B,) int64 array
    reverse : bool
        Read the sequence backwards.
    chunk : int
        Batch rows per parallel task.
    y : (T, B, Y) array, output
        Hidden states are written to columns ``ycol:ycol + H``.
    hn, cn : (B, H) arrays, output
        Final state.
    gates : (T, B, 4H) array or (0, 0, 0) array, output
        Post-activation i, f, g, o, kept for the backward pass when not empty.
    cs : (T, B, H) array or (0, 0, 0) array, output
        Cell states, kept with ``gates``.
    """
    T, B, G = xw.shape
    H = G // 4
    keep = gates.shape[0] > 0
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        h = np.empty((nb, H), dtype=xw.dtype)
        c = np.empty((nb, H), dtype=xw.dtype)
        acc = np.empty((nb, G), dtype=xw.dtype)
        h[:] = h0[b0:b1]
        c[:] = c0[b0:b1]
        for s in range(T):
            t = T - 1 - s if reverse else s
            np.dot(h, whh_t, acc)
            for r in range(nb):
                b = b0 + r
                if t >= lengths[b]:
                    y[t, b, ycol:ycol + H] = 0.0
                    if keep:
                        gates[t, b, :] = 0.0
                        cs[t, b, :] = 0.0
                    continue
                for j in range(H):
                    i = sigmoid(acc[r, j] + xw[t, b, j])
                    f = sigmoid(acc[r, H + j] + xw[t, b, H + j])
                    g = tanh(acc[r, 2 * H + j] + xw[t, b, 2 * H + j])
                    o = sigmoid(acc[r, 3 * H + j] + xw[t, b, 3 * H + j])
                    cc = f * c[r, j] + i * g
                    hh = o * tanh(cc)
                    c[r, j] = cc
                    h[r, j] = hh
                    y[t, b, ycol + j] = hh
                    if keep:
                        gates[t, b, j] = i
                        gates[t, b, H + j] = f
                        gates[t, b, 2 * H + j] = g
                        gates[t, b, 3 * H + j] = o
                        cs[t, b, j] = cc
        hn[b0:b1] = h
        cn[b0:b1] = c


@jit(parallel=True)
def lstm_backward(dy, dycol, dhn, dcn, whh, gates, cs, y, ycol, h0, c0, lengths,
                  reverse, chunk, dgates, hprev, dh0, dc0):
    """Back-propagate through the recurrence of one layer-direction.

    Parameters
    ----------
    dy : (T, B, Y) array
        Gradient of the loss with respect to the outputs; this direction's
        columns are ``dycol:dycol + H``.
    dhn, dcn : (B, H) arrays
        Gradient with respect to the final state.
    whh : (4H, H) array
        ``W_hh``, C-contiguous.
    gates, cs : arrays kept by :func:`lstm_forward`.
    y : (T, B, Y) array
        The forward outputs; this direction's columns start at ``ycol``.
    h0, c0 : (B, H) arrays
        Initial state of the forward pass.
    lengths, reverse, chunk :
        As in the forward pass.
    dgates : (T, B, 4H) array, output
        Gradient with respect to the pre-activations ``a_t`` (zero at padded
        steps).
    hprev : (T, B, H) array, output
        ``h_{t-1}`` of every valid step (zero at padded steps): the operand of
        the ``W_hh`` gradient.
    dh0, dc0 : (B, H) arrays, output
        Gradient with respect to the initial state.
    """
    T, B, G = gates.shape
    H = G // 4
    nchunks = (B + chunk - 1) // chunk
    for k in prange(nchunks):
        b0 = k * chunk
        b1 = min(B, b0 + chunk)
        nb = b1 - b0
        dh = np.empty((nb, H), dtype=gates.dtype)
        dc = np.empty((nb, H), dtype=gates.dtype)
        dhrec = np.empty((nb, H), dtype=gates.dtype)
        da = np.empty((nb, G), dtype=gates.dtype)
        dh[:] = dhn[b0:b1]
        dc[:] = dcn[b0:b1]
        for s in range(T):
            t = s if reverse else T - 1 - s
            for r in range(nb):
                b = b0 + r
                n = lengths[b]
                if t >= n:
                    da[r, :] = 0.0
                    dgates[t, b, :] = 0.0
                    hprev[t, b, :] = 0.0
                    continue
                first = t == n - 1 if reverse else t == 0
                tp = t + 1 if reverse else t - 1
                for j in range(H):
                    i = gates[t, b, j]
                    f = gates[t, b, H + j]
                    g = gates[t, b, 2 * H + j]
                    o = gates[t, b, 3 * H + j]
                    if first:
                        cp = c0[b, j]
                        hp = h0[b, j]
                    else:
                        cp = cs[tp, b, j]
                        hp = y[tp, b, ycol + j]
                    hprev[t, b, j] = hp
                    tc = tanh(cs[t, b, j])
                    dht = dh[r, j] + dy[t, b, dycol + j]
                    dct = dc[r, j] + dht * o * (1.0 - tc * tc)
                    dai = dct * g * i * (1.0 - i)
                    daf = dct * cp * f * (1.0 - f)
                    dag = dct * i * (1.0 - g * g)
                    dao = dht * tc * o * (1.0 - o)
                    da[r, j] = dai
                    da[r, H + j] = daf
                    da[r, 2 * H + j] = dag
                    da[r, 3 * H + j] = dao
                    dgates[t, b, j] = dai
                    dgates[t, b, H + j] = daf
                    dgates[t, b, 2 * H + j] = dag
                    dgates[t, b, 3 * H + j] = dao
                    dc[r, j] = dct * f
            np.dot(da, whh, dhrec)
            for r in range(nb):
                # A padded step passes the state's gradient through untouched.
                if t < lengths[b0 + r]:
                    dh[r, :] = dhrec[r, :]
        dh0[b0:b1] = dh
        dc0[b0:b1] = dc
