"""The stacked, bidirectional recurrence built from the per-direction kernels.

Everything here works on validated, C-contiguous, time-major arrays of the
model's dtype: ``x`` (T, B, I), states (L*D, B, H), ``lengths`` int64 (B,).
``weights`` is a list with one ``(W_ih, W_hh, b_ih, b_hh)`` tuple per
layer-direction, in PyTorch's order (layer-major, then direction); the biases
are ``None`` in a model without bias.

The large, non-sequential matrix products (the input projection of all steps,
the weight gradients, the gradient with respect to the layer input) are one
product each over all steps (:mod:`fastgates._linalg`); the recurrence runs in
the per-direction kernels.  Everything runs on Numba's threads with a
single-threaded BLAS (see :mod:`fastgates._config`).
"""

import numba
import numpy as np

from . import _config
from ._linalg import column_blocks, matmul, matmul_tn
from ._gru import gru_backward, gru_forward
from ._lstm import lstm_backward, lstm_forward

def _pool_size():
    # Work is split by the size of Numba's pool, never by the thread count in
    # force, so that results do not change with set_num_threads.
    return numba.config.NUMBA_NUM_THREADS


def _chunk_size(batch):
    return max(1, -(-batch // _pool_size()))


def _derive(derived, key, make, *args):
    """``make(*args)``, kept in the model's ``derived`` dict (None: not kept).

    Models hand in a dict that they empty whenever their parameters change,
    so transposed and blocked weights are built once, not at every call.
    """
    if derived is None:
        return make(*args)
    value = derived.get(key)
    if value is None:
        value = derived[key] = make(*args)
    return value


def _transposed_blocks(w):
    return column_blocks(w.T)


def _gru_input_bias(b_ih, b_hh, H):
    # b_hr and b_hz join the input projection; b_hn stays inside the reset.
    return np.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H:]])


def _gru_bhn(b_hh, H, dtype):
    return np.zeros(H, dtype) if b_hh is None else np.ascontiguousarray(b_hh[2 * H:])


def _empty3(dtype):
    return np.empty((0, 0, 0), dtype=dtype)


def _empty1(dtype):
    return np.empty(0, dtype=dtype)


def _peep(variant, k, H, dtype):
    if variant.peeps is None:
        return np.empty((0, H), dtype=dtype)
    return np.ascontiguousarray(variant.peeps[k], dtype=dtype)


class Tape:
    """What a forward pass keeps for its backward pass."""

    def __init__(self, cell, reset_after, fast, inputs, outputs, gates, aux, h0, c0, lengths,
                 variant, pre):
        self.cell = cell
        self.variant = variant    # Variant of the forward pass
        self.pre = pre            # per layer-direction: pre-activations when clipping
        self.fast = fast          # the activation mode of the forward pass
        self.reset_after = reset_after
        self.inputs = inputs      # per layer: its input (T, B, I_k)
        self.outputs = outputs    # per layer: its output (T, B, D*H)
        self.gates = gates        # per layer-direction: (T, B, G) post-activation
        self.aux = aux            # per layer-direction: LSTM c_t, GRU W_hn h + b_hn
        self.h0 = h0
        self.c0 = c0
        self.lengths = lengths


class Variant:
    """Options beyond PyTorch's cells (ONNX's LSTM and GRU have them).

    reverse : bool
        A one-direction model that reads each sequence backwards.
    clip : float
        Bound of every gate pre-activation; ``inf`` for none.
    coupled : bool
        LSTM: ``f = 1 - i``.
    peeps : list of (3, H) arrays or None
        LSTM peephole weights ``p_i, p_f, p_o`` per layer-direction.
    """

    def __init__(self, reverse=False, clip=np.inf, coupled=False, peeps=None):
        self.reverse = reverse
        self.clip = clip
        self.coupled = coupled
        self.peeps = peeps

    def direction_reversed(self, d):
        return d == 1 or self.reverse


_PLAIN = Variant()


def _zero_padding(x, lengths):
    """``x`` with its padded steps set to 0 (a copy, only when there are any).

    The kernels never read padded steps, but the weight gradient is a product
    over all steps, where a NaN or inf in padding would give 0 * inf = NaN.
    Layers above the first read outputs, which are already 0 there.
    """
    T = x.shape[0]
    if lengths.min() == T:
        return x
    x = x.copy()
    for b, n in enumerate(lengths):
        x[n:, b] = 0
    return x


# Products below this many multiply-adds run on one thread: waking a second
# one costs about as much as the product (measured: (100, 32) x (32, 256)
# took 22 us on two threads).
SPLIT_MIN_MACS = 2_000_000


def _product_blocks(rows, inner, cols):
    """Row blocks for a product, set by its size and the pool size only.

    Also points Numba at the threads the product will use: one below
    SPLIT_MIN_MACS, all of fastgates' threads above.
    """
    if rows * inner * cols < SPLIT_MIN_MACS:
        _config.kernel_threads(1)
        return 1
    _config.kernel_threads()
    return _pool_size()


def _input_projection(x, w_ih, bias):
    T, B, I = x.shape
    G = w_ih.shape[0]
    xw = np.empty((T * B, G), dtype=x.dtype)
    if bias is None:
        bias = _empty1(x.dtype)
    matmul(x.reshape(T * B, I), w_ih.T, bias, xw, _product_blocks(T * B, I, G))
    return xw.reshape(T, B, G)


def _peephole_grads(dgates, cprev, cs):
    """``(3, H)`` gradients of ``p_i, p_f, p_o`` from the pre-activation gradients.

    ``p_i`` and ``p_f`` multiply ``c_{t-1}``, ``p_o`` multiplies ``c_t``;
    padded steps hold zeros in every operand.  Sums over steps and batch in
    a fixed order (NumPy's pairwise sum over the flattened axis).
    """
    T, B, G = dgates.shape
    H = G // 4
    d2 = dgates.reshape(T * B, G)
    out = np.empty((3, H), dtype=dgates.dtype)
    out[0] = (d2[:, :H] * cprev.reshape(T * B, H)).sum(axis=0)
    out[1] = (d2[:, H:2 * H] * cprev.reshape(T * B, H)).sum(axis=0)
    out[2] = (d2[:, 3 * H:] * cs.reshape(T * B, H)).sum(axis=0)
    return out


def forward(*args, **kwargs):
    """Run the stacked recurrence; see :func:`_forward` for the arguments."""
    with _config.single_threaded_blas():
        return _forward(*args, **kwargs)


def backward(*args, **kwargs):
    """Back-propagate; see :func:`_backward` for the arguments."""
    with _config.single_threaded_blas():
        return _backward(*args, **kwargs)


def _forward(cell, weights, x, h0, c0, lengths, num_layers, bidirectional,
             reset_after=True, keep=False, derived=None, variant=_PLAIN):
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
    chunk = _chunk_size(B)
    fast = _config.fast_activations()
    hn = np.empty_like(h0)
    cn = np.empty_like(c0) if cell == "lstm" else None
    inputs, outputs, gates_kept, aux_kept, pre_kept = [], [], [], [], []
    clip = dtype.type(variant.clip)
    layer_in = _zero_padding(x, lengths)
    for layer in range(num_layers):
        y = np.empty((T, B, D * H), dtype=dtype)
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh = weights[k]
            G = w_hh.shape[0]
            if b_ih is None:
                bias = None
            elif cell == "lstm":
                bias = _derive(derived, ("bias", k), np.add, b_ih, b_hh)
            else:
                bias = _derive(derived, ("bias", k), _gru_input_bias, b_ih, b_hh, H)
            xw = _input_projection(layer_in, w_ih, bias)
            gates = np.empty((T, B, G), dtype=dtype) if keep else _empty3(dtype)
            aux = np.empty((T, B, H), dtype=dtype) if keep else _empty3(dtype)
            pre = np.empty((T, B, G), dtype=dtype) if keep and clip < np.inf else _empty3(dtype)
            rev = variant.direction_reversed(d)
            _config.kernel_threads(-(-B // chunk))
            if cell == "lstm":
                whh_tb = _derive(derived, ("whh_tb", k), _transposed_blocks, w_hh)
                peep = _peep(variant, k, H, dtype)
                lstm_forward(xw, whh_tb, h0[k], c0[k], lengths, rev, chunk, fast, y, d * H,
                             hn[k], cn[k], gates, aux, peep, variant.coupled, clip, pre)
            else:
                if reset_after:
                    wa_tb = _derive(derived, ("whh_tb", k), _transposed_blocks, w_hh)
                else:
                    wa_tb = _derive(derived, ("wrz_tb", k), _transposed_blocks, w_hh[: 2 * H])
                wn_tb = _derive(derived, ("wn_tb", k), _transposed_blocks, w_hh[2 * H:])
                bhn = _derive(derived, ("bhn", k), _gru_bhn, b_hh, H, dtype)
                gru_forward(xw, wa_tb, wn_tb, bhn, h0[k], lengths, rev,
                            reset_after, chunk, fast, y, d * H, hn[k], gates, aux, clip, pre)
            gates_kept.append(gates)
            aux_kept.append(aux)
            pre_kept.append(pre)
        inputs.append(layer_in)
        outputs.append(y)
        layer_in = y
    tape = None
    if keep:
        tape = Tape(cell, reset_after, fast, inputs, outputs, gates_kept, aux_kept, h0, c0, lengths,
                    variant, pre_kept)
    return layer_in, hn, cn, tape


def _backward(tape, weights, dy, dhn, dcn, num_layers, bidirectional, with_bias, derived=None):
    """Back-propagate ``dy`` (T, B, D*H) and the final-state gradients.

    Returns
    -------
    dx : (T, B, I) array
    dh0 : (L*D, B, H) array
    dc0 : (L*D, B, H) array or None (GRU)
    dweights : list of ``(dW_ih, dW_hh, db_ih, db_hh, dpeep)`` per
        layer-direction (biases ``None`` when ``with_bias`` is false;
        ``dpeep`` (3, H) with peepholes, else ``None``).
    """
    cell = tape.cell
    reset_after = tape.reset_after
    D = 2 if bidirectional else 1
    T, B, _ = dy.shape
    H = tape.h0.shape[2]
    dtype = dy.dtype
    chunk = _chunk_size(B)
    fast = tape.fast
    lengths = tape.lengths
    variant = tape.variant
    clip = dtype.type(variant.clip)
    dh0 = np.empty_like(tape.h0)
    dc0 = np.empty_like(tape.c0) if cell == "lstm" else None
    dweights = [None] * (num_layers * D)
    dy_layer = dy
    for layer in reversed(range(num_layers)):
        layer_in = tape.inputs[layer]
        I = layer_in.shape[2]
        in2d = layer_in.reshape(T * B, I)
        y = tape.outputs[layer]
        dx = None
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh = weights[k]
            G = w_hh.shape[0]
            _config.kernel_threads(-(-B // chunk))
            hprev = np.empty((T, B, H), dtype=dtype)
            dgx = np.empty((T, B, G), dtype=dtype)
            rev = variant.direction_reversed(d)
            dpeep = None
            if cell == "lstm":
                dgh = dgx
                hop = hprev
                whh_b = _derive(derived, ("whh_b", k), column_blocks, w_hh)
                peep = _peep(variant, k, H, dtype)
                cprev = np.empty((T, B, H), dtype=dtype) if peep.shape[0] else _empty3(dtype)
                lstm_backward(dy_layer, d * H, dhn[k], dcn[k], whh_b,
                              tape.gates[k], tape.aux[k], y, d * H, tape.h0[k], tape.c0[k],
                              lengths, rev, chunk, fast, dgx, hprev, dh0[k], dc0[k],
                              peep, variant.coupled, clip, tape.pre[k], cprev)
                if peep.shape[0]:
                    dpeep = _peephole_grads(dgx, cprev, tape.aux[k])
            else:
                dgh = np.empty((T, B, G), dtype=dtype)
                if reset_after:
                    wa_b = _derive(derived, ("whh_b", k), column_blocks, w_hh)
                    hop = hprev
                    rhprev = _empty3(dtype)
                else:
                    wa_b = _derive(derived, ("wrz_b", k), column_blocks, w_hh[: 2 * H])
                    hop = rhprev = np.empty((T, B, H), dtype=dtype)
                wn_b = _derive(derived, ("wn_b", k), column_blocks, w_hh[2 * H:])
                gru_backward(dy_layer, d * H, dhn[k], wa_b, wn_b, tape.gates[k], tape.aux[k],
                             y, d * H, tape.h0[k], lengths, rev, reset_after, chunk,
                             dgx, dgh, hprev, rhprev, dh0[k], clip, tape.pre[k])
            dgx2 = dgx.reshape(T * B, G)
            dgh2 = dgh.reshape(T * B, G)
            dw_ih = np.empty((G, I), dtype=dtype)
            matmul_tn(dgx2, in2d, dw_ih, _product_blocks(T * B, G, I))
            dw_hh = np.empty((G, H), dtype=dtype)
            nblocks = _product_blocks(T * B, G, H)
            if hop is hprev:
                matmul_tn(dgh2, hprev.reshape(T * B, H), dw_hh, nblocks)
            else:
                # GRU reset_after=False: W_hn acts on r * h, not on h.
                part = np.empty((G, H), dtype=dtype)
                matmul_tn(dgh2, hprev.reshape(T * B, H), part, nblocks)
                dw_hh[: 2 * H] = part[: 2 * H]
                matmul_tn(dgh2, hop.reshape(T * B, H), part, nblocks)
                dw_hh[2 * H:] = part[2 * H:]
            db_ih = db_hh = None
            if with_bias:
                db_ih = dgx2.sum(axis=0)
                db_hh = db_ih.copy() if dgh is dgx else dgh2.sum(axis=0)
            dweights[k] = (dw_ih, dw_hh, db_ih, db_hh, dpeep)
            part_dx = np.empty((T * B, I), dtype=dtype)
            matmul(dgx2, w_ih, _empty1(dtype), part_dx, _product_blocks(T * B, G, I))
            if dx is None:
                dx = part_dx
            else:
                dx += part_dx
        dy_layer = dx.reshape(T, B, I)
    return dy_layer, dh0, dc0, dweights
