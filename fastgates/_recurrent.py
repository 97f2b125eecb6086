"""The stacked, bidirectional recurrence built from the per-direction kernels.

Everything here works on validated, C-contiguous, time-major arrays of the
model's dtype: ``x`` (T, B, I), states (L*D, B, H), ``lengths`` int64 (B,).
``weights`` is a list with one ``(W_ih, W_hh, b_ih, b_hh)`` tuple per
layer-direction, in PyTorch's order (layer-major, then direction); the biases
are ``None`` in a model without bias.

The large, non-sequential matrix products (the input projection of all steps,
the weight gradients, the gradient with respect to the layer input) run in
NumPy with ``get_num_threads()`` BLAS threads; the kernels run with as many
Numba threads and a single-threaded BLAS (see :mod:`fastgates._config`).
"""

import numba
import numpy as np

from . import _config
from ._gru import gru_backward, gru_forward
from ._lstm import lstm_backward, lstm_forward

_NGATES = {"lstm": 4, "gru": 3}


def _chunk_size(batch):
    # Depends on the batch and the size of Numba's pool, never on the thread
    # count in force, so that results do not change with set_num_threads.
    return max(1, -(-batch // numba.config.NUMBA_NUM_THREADS))


def _empty3(dtype):
    return np.empty((0, 0, 0), dtype=dtype)


class Tape:
    """What a forward pass keeps for its backward pass."""

    def __init__(self, cell, reset_after, inputs, outputs, gates, aux, h0, c0, lengths):
        self.cell = cell
        self.reset_after = reset_after
        self.inputs = inputs      # per layer: its input (T, B, I_k)
        self.outputs = outputs    # per layer: its output (T, B, D*H)
        self.gates = gates        # per layer-direction: (T, B, G) post-activation
        self.aux = aux            # per layer-direction: LSTM c_t, GRU W_hn h + b_hn
        self.h0 = h0
        self.c0 = c0
        self.lengths = lengths


def _input_projection(x, w_ih, bias):
    T, B, I = x.shape
    xw = np.dot(x.reshape(T * B, I), w_ih.T)
    if bias is not None:
        xw += bias
    return xw.reshape(T, B, w_ih.shape[0])


def forward(cell, weights, x, h0, c0, lengths, num_layers, bidirectional,
            reset_after=True, keep=False):
    """Run the stacked recurrence.

    Returns
    -------
    y : (T, B, D*H) array
    hn : (L*D, B, H) array
    cn : (L*D, B, H) array or None (GRU)
    tape : Tape or None
        Filled when ``keep`` is true.
    """
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = h0.shape[2]
    dtype = x.dtype
    n_threads = _config.get_num_threads()
    chunk = _chunk_size(B)
    hn = np.empty_like(h0)
    cn = np.empty_like(c0) if cell == "lstm" else None
    inputs, outputs, gates_kept, aux_kept = [], [], [], []
    layer_in = x
    for layer in range(num_layers):
        y = np.empty((T, B, D * H), dtype=dtype)
        projections = []
        with _config.blas_threads(n_threads):
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = weights[layer * D + d]
                if cell == "lstm":
                    bias = None if b_ih is None else b_ih + b_hh
                else:
                    bias = None
                    if b_ih is not None:
                        bias = b_ih.copy()
                        bias[: 2 * H] += b_hh[: 2 * H]
                projections.append(_input_projection(layer_in, w_ih, bias))
        _config.kernel_threads()
        with _config.blas_threads(1):
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh = weights[k]
                G = w_hh.shape[0]
                gates = np.empty((T, B, G), dtype=dtype) if keep else _empty3(dtype)
                aux = np.empty((T, B, H), dtype=dtype) if keep else _empty3(dtype)
                if cell == "lstm":
                    lstm_forward(projections[d], np.ascontiguousarray(w_hh.T), h0[k], c0[k],
                                 lengths, d == 1, chunk, y, d * H, hn[k], cn[k], gates, aux)
                else:
                    if reset_after:
                        wa_t = np.ascontiguousarray(w_hh.T)
                    else:
                        wa_t = np.ascontiguousarray(w_hh[: 2 * H].T)
                    wn_t = np.ascontiguousarray(w_hh[2 * H:].T)
                    bhn = np.zeros(H, dtype) if b_hh is None else np.ascontiguousarray(b_hh[2 * H:])
                    gru_forward(projections[d], wa_t, wn_t, bhn, h0[k], lengths, d == 1,
                                reset_after, chunk, y, d * H, hn[k], gates, aux)
                gates_kept.append(gates)
                aux_kept.append(aux)
        inputs.append(layer_in)
        outputs.append(y)
        layer_in = y
    tape = None
    if keep:
        tape = Tape(cell, reset_after, inputs, outputs, gates_kept, aux_kept, h0, c0, lengths)
    return layer_in, hn, cn, tape


def backward(tape, weights, dy, dhn, dcn, num_layers, bidirectional, with_bias):
    """Back-propagate ``dy`` (T, B, D*H) and the final-state gradients.

    Returns
    -------
    dx : (T, B, I) array
    dh0 : (L*D, B, H) array
    dc0 : (L*D, B, H) array or None (GRU)
    dweights : list of ``(dW_ih, dW_hh, db_ih, db_hh)`` per layer-direction
        (biases ``None`` when ``with_bias`` is false).
    """
    cell = tape.cell
    reset_after = tape.reset_after
    D = 2 if bidirectional else 1
    T, B, _ = dy.shape
    H = tape.h0.shape[2]
    dtype = dy.dtype
    n_threads = _config.get_num_threads()
    chunk = _chunk_size(B)
    lengths = tape.lengths
    dh0 = np.empty_like(tape.h0)
    dc0 = np.empty_like(tape.c0) if cell == "lstm" else None
    dweights = [None] * (num_layers * D)
    dy_layer = dy
    for layer in reversed(range(num_layers)):
        layer_in = tape.inputs[layer]
        y = tape.outputs[layer]
        results = []
        _config.kernel_threads()
        with _config.blas_threads(1):
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh = weights[k]
                G = w_hh.shape[0]
                hprev = np.empty((T, B, H), dtype=dtype)
                if cell == "lstm":
                    dg = np.empty((T, B, G), dtype=dtype)
                    lstm_backward(dy_layer, d * H, dhn[k], dcn[k], np.ascontiguousarray(w_hh),
                                  tape.gates[k], tape.aux[k], y, d * H, tape.h0[k], tape.c0[k],
                                  lengths, d == 1, chunk, dg, hprev, dh0[k], dc0[k])
                    results.append((dg, dg, hprev, hprev))
                else:
                    dgx = np.empty((T, B, G), dtype=dtype)
                    dgh = np.empty((T, B, G), dtype=dtype)
                    if reset_after:
                        wa = np.ascontiguousarray(w_hh)
                        rhprev = _empty3(dtype)
                    else:
                        wa = np.ascontiguousarray(w_hh[: 2 * H])
                        rhprev = np.empty((T, B, H), dtype=dtype)
                    wn = np.ascontiguousarray(w_hh[2 * H:])
                    gru_backward(dy_layer, d * H, dhn[k], wa, wn, tape.gates[k], tape.aux[k],
                                 y, d * H, tape.h0[k], lengths, d == 1, reset_after, chunk,
                                 dgx, dgh, hprev, rhprev, dh0[k])
                    results.append((dgx, dgh, hprev, hprev if reset_after else rhprev))
        with _config.blas_threads(n_threads):
            I = layer_in.shape[2]
            in2d = layer_in.reshape(T * B, I)
            dx = None
            for d in range(D):
                k = layer * D + d
                w_ih, w_hh, b_ih, b_hh = weights[k]
                G = w_hh.shape[0]
                dgx, dgh, hprev, hop = results[d]
                dgx2 = dgx.reshape(T * B, G)
                dgh2 = dgh.reshape(T * B, G)
                hp2 = hprev.reshape(T * B, H)
                dw_ih = np.dot(dgx2.T, in2d)
                if hop is hprev:
                    dw_hh = np.dot(dgh2.T, hp2)
                else:
                    # GRU reset_after=False: W_hn acts on r * h, not on h.
                    dw_hh = np.empty((G, H), dtype=dtype)
                    np.dot(dgh2[:, : 2 * H].T, hp2, out=dw_hh[: 2 * H])
                    np.dot(dgh2[:, 2 * H:].T, hop.reshape(T * B, H), out=dw_hh[2 * H:])
                db_ih = db_hh = None
                if with_bias:
                    db_ih = dgx2.sum(axis=0)
                    db_hh = db_ih.copy() if dgh is dgx else dgh2.sum(axis=0)
                dweights[k] = (dw_ih, dw_hh, db_ih, db_hh)
                part = np.dot(dgx2, w_ih)
                if dx is None:
                    dx = part
                else:
                    dx += part
        dy_layer = dx.reshape(T, B, I)
    return dy_layer, dh0, dc0, dweights
