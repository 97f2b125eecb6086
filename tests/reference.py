"""Slow, obviously correct NumPy implementations of the recurrent cells' equations.

This module is the test oracle. It is written to be read side by side with
the equations, not to be fast: Python loops run over layers, directions,
batch entries and time steps, and every gate is computed on its own line.

Two parameterisations are implemented.

PyTorch layout (what fastgates stores). With ``x`` the input and ``h`` the
previous hidden state, ``W_ih`` is ``(G*H, I)``, ``W_hh`` is ``(G*H, H)``,
``b_ih`` and ``b_hh`` are ``(G*H,)``, and the G row blocks are the gates in
the order i, f, g, o (LSTM, G = 4) or r, z, n (GRU, G = 3)::

    LSTM   i  = sigmoid(W_ii x + b_ii + W_hi h + b_hi)
           f  = sigmoid(W_if x + b_if + W_hf h + b_hf)
           g  = tanh   (W_ig x + b_ig + W_hg h + b_hg)
           o  = sigmoid(W_io x + b_io + W_ho h + b_ho)
           c' = f * c + i * g
           h' = o * tanh(c')

    GRU    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
           z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
           n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))     reset_after=True
           n  = tanh(W_in x + b_in + W_hn (r * h) + b_hn)     reset_after=False
           h' = (1 - z) * n + z * h

Concatenated ("paper") layout. One matrix per gate acts on ``[h, x]``, the
previous hidden state stacked on top of the input::

    LSTM   f  = sigmoid(W_f . [h, x] + b_f)
           i  = sigmoid(W_i . [h, x] + b_i)
           c~ = tanh   (W_c . [h, x] + b_c)
           o  = sigmoid(W_o . [h, x] + b_o)
           c' = f * c + i * c~
           h' = o * tanh(c')

    GRU    z' = sigmoid(W_z . [h, x] + b_z)
           r  = sigmoid(W_r . [h, x] + b_r)
           n  = tanh   (W_h . [r * h, x] + b_h)
           h' = (1 - z') * h + z' * n

The paper GRU is the PyTorch-layout ``reset_after=False`` GRU with
``z' = 1 - z``: since ``1 - sigmoid(a) = sigmoid(-a)``, the z rows of both
weight matrices and both z biases are negated. The converters below map
parameters between the two layouts.

Sequence functions take time-major input ``x`` of shape ``(T, B, I)`` and a
parameter dict keyed like ``torch.nn.LSTM`` / ``torch.nn.GRU``
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, the
``_reverse`` suffix for the backward direction; bias keys absent when the
model has no bias).
"""

import numpy as np
from scipy.special import expit

LSTM_GATES = ("i", "f", "g", "o")
GRU_GATES = ("r", "z", "n")
JANET_GATES = ("f", "n")
MGU_GATES = ("f", "n")
SLSTM_GATES = ("i", "f", "z", "o", "c", "n", "m")


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def sigmoid(a):
    """Logistic function ``1 / (1 + exp(-a))``.

    ``scipy.special.expit`` evaluates it without overflow for every finite
    input (the naive formula overflows ``exp(-a)`` for large negative ``a``).
    """
    return expit(a)


def tanh(a):
    """Hyperbolic tangent (``np.tanh`` saturates without overflow)."""
    return np.tanh(a)


# ---------------------------------------------------------------------------
# Parameter helpers
# ---------------------------------------------------------------------------


def gate_rows(matrix_or_vector, k, hidden_size):
    """Row block ``k`` (0-based, in gate order) of a stacked weight or bias."""
    return matrix_or_vector[k * hidden_size:(k + 1) * hidden_size]


def layer_key(name, layer, direction):
    """``weight_ih`` -> ``weight_ih_l{layer}`` plus ``_reverse`` for direction 1."""
    return f"{name}_l{layer}" + ("_reverse" if direction == 1 else "")


def _bias_or_zeros(bias, rows, dtype):
    if bias is None:
        return np.zeros(rows, dtype=dtype)
    return bias


# ---------------------------------------------------------------------------
# Single steps, PyTorch layout
# ---------------------------------------------------------------------------


def _clip(a, bound):
    """``a`` limited to ``[-bound, bound]`` (ONNX's ``clip``); no limit for None."""
    return a if bound is None else np.clip(a, -bound, bound)


def lstm_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, peep=None, input_forget=False,
              clip=None):
    """One LSTM step for one sequence: ``x`` ``(I,)``, ``h`` and ``c`` ``(H,)``.

    Returns ``h_new, c_new, gates`` where ``gates`` maps ``"i" "f" "g" "o"``
    to the post-activation gate values and ``"c"`` to ``c_new``.

    The variants of ONNX's LSTM operator: ``peep`` ``(3, H)`` holds the
    peephole weights ``p_i, p_f, p_o``; ``input_forget`` couples
    ``f = 1 - i``; ``clip`` bounds every gate's argument (the cell state is
    not clipped, also not inside ``tanh(c')``, as onnxruntime computes it)::

        i  = sigmoid(clip(W_ii x + b_ii + W_hi h + b_hi + p_i * c))
        f  = sigmoid(clip(W_if x + b_if + W_hf h + b_hf + p_f * c))  or 1 - i
        g  = tanh   (clip(W_ig x + b_ig + W_hg h + b_hg))
        c' = f * c + i * g
        o  = sigmoid(clip(W_io x + b_io + W_ho h + b_ho + p_o * c'))
        h' = o * tanh(c')
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 4 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 4 * H, w_hh.dtype)

    W_ii, W_if, W_ig, W_io = (gate_rows(w_ih, k, H) for k in range(4))
    W_hi, W_hf, W_hg, W_ho = (gate_rows(w_hh, k, H) for k in range(4))
    b_ii, b_if, b_ig, b_io = (gate_rows(b_ih, k, H) for k in range(4))
    b_hi, b_hf, b_hg, b_ho = (gate_rows(b_hh, k, H) for k in range(4))

    if peep is None:
        p_i = p_f = p_o = np.zeros(H, dtype=w_hh.dtype)
    else:
        p_i, p_f, p_o = peep
    i = sigmoid(_clip(W_ii @ x + b_ii + W_hi @ h + b_hi + p_i * c, clip))
    if input_forget:
        f = 1 - i
    else:
        f = sigmoid(_clip(W_if @ x + b_if + W_hf @ h + b_hf + p_f * c, clip))
    g = tanh(_clip(W_ig @ x + b_ig + W_hg @ h + b_hg, clip))
    c_new = f * c + i * g
    o = sigmoid(_clip(W_io @ x + b_io + W_ho @ h + b_ho + p_o * c_new, clip))
    h_new = o * tanh(c_new)
    return h_new, c_new, {"i": i, "f": f, "g": g, "o": o, "c": c_new}


def gru_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None, reset_after=True, clip=None):
    """One GRU step for one sequence: ``x`` ``(I,)``, ``h`` ``(H,)``.

    Returns ``h_new, gates`` with ``gates`` mapping ``"r" "z" "n"`` to the
    post-activation gate values.  ``clip`` bounds the argument of each
    activation (ONNX's ``clip``).
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 3 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 3 * H, w_hh.dtype)

    W_ir, W_iz, W_in = (gate_rows(w_ih, k, H) for k in range(3))
    W_hr, W_hz, W_hn = (gate_rows(w_hh, k, H) for k in range(3))
    b_ir, b_iz, b_in = (gate_rows(b_ih, k, H) for k in range(3))
    b_hr, b_hz, b_hn = (gate_rows(b_hh, k, H) for k in range(3))

    r = sigmoid(_clip(W_ir @ x + b_ir + W_hr @ h + b_hr, clip))
    z = sigmoid(_clip(W_iz @ x + b_iz + W_hz @ h + b_hz, clip))
    if reset_after:
        n = tanh(_clip(W_in @ x + b_in + r * (W_hn @ h + b_hn), clip))
    else:
        n = tanh(_clip(W_in @ x + b_in + W_hn @ (r * h) + b_hn, clip))
    h_new = (1 - z) * n + z * h
    return h_new, {"r": r, "z": z, "n": n}


def janet_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None, beta=1.0):
    """One JANET step (van der Westhuizen & Lasenby 2018) for one sequence.

    Rows f, n::

        s  = W_if x + b_if + W_hf h + b_hf
        n  = tanh(W_in x + b_in + W_hn h + b_hn)
        h' = sigmoid(s) * h + (1 - sigmoid(s - beta)) * n

    Returns ``h_new, gates`` with ``gates`` mapping ``"f"`` (``sigmoid(s)``)
    and ``"n"``.
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 2 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 2 * H, w_hh.dtype)
    W_if, W_in = (gate_rows(w_ih, k, H) for k in range(2))
    W_hf, W_hn = (gate_rows(w_hh, k, H) for k in range(2))
    b_if, b_in = (gate_rows(b_ih, k, H) for k in range(2))
    b_hf, b_hn = (gate_rows(b_hh, k, H) for k in range(2))

    s = W_if @ x + b_if + W_hf @ h + b_hf
    f = sigmoid(s)
    n = tanh(W_in @ x + b_in + W_hn @ h + b_hn)
    h_new = f * h + (1 - sigmoid(s - beta)) * n
    return h_new, {"f": f, "n": n}


def mgu_step(x, h, w_ih, w_hh, b_ih=None, b_hh=None):
    """One minimal gated unit step (Zhou et al. 2016) for one sequence.

    Rows f, n::

        f  = sigmoid(W_if x + b_if + W_hf h + b_hf)
        n  = tanh(W_in x + b_in + W_hn (f * h) + b_hn)
        h' = (1 - f) * h + f * n

    Returns ``h_new, gates`` with ``gates`` mapping ``"f"`` and ``"n"``.
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 2 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 2 * H, w_hh.dtype)
    W_if, W_in = (gate_rows(w_ih, k, H) for k in range(2))
    W_hf, W_hn = (gate_rows(w_hh, k, H) for k in range(2))
    b_if, b_in = (gate_rows(b_ih, k, H) for k in range(2))
    b_hf, b_hn = (gate_rows(b_hh, k, H) for k in range(2))

    f = sigmoid(W_if @ x + b_if + W_hf @ h + b_hf)
    n = tanh(W_in @ x + b_in + W_hn @ (f * h) + b_hn)
    h_new = (1 - f) * h + f * n
    return h_new, {"f": f, "n": n}


def positive_candidate(v):
    """The paper's ``g(v)``: ``v + 1/2`` for ``v >= 0``, ``sigmoid(v)`` below."""
    return np.where(v >= 0, v + 0.5, sigmoid(np.minimum(v, 0)))


def mingru_step(x, h, w_ih, b_ih=None, positive=False):
    """One minGRU step (Feng et al. 2024) for one sequence.

    Rows z, n of ``w_ih`` (no recurrent weights)::

        z  = sigmoid(W_iz x + b_iz)
        n  = W_in x + b_in        (positive: g(W_in x + b_in))
        h' = (1 - z) * h + z * n

    Returns ``h_new, gates`` with ``gates`` mapping ``"z"`` and ``"n"``.
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 2 * H, w_ih.dtype)
    W_iz, W_in = (gate_rows(w_ih, k, H) for k in range(2))
    b_iz, b_in = (gate_rows(b_ih, k, H) for k in range(2))
    z = sigmoid(W_iz @ x + b_iz)
    n = W_in @ x + b_in
    if positive:
        n = positive_candidate(n)
    h_new = (1 - z) * h + z * n
    return h_new, {"z": z, "n": n}


def minlstm_step(x, h, w_ih, b_ih=None, positive=False):
    """One minLSTM step (Feng et al. 2024) for one sequence.

    Rows f, i, n of ``w_ih`` (no recurrent weights)::

        f  = sigmoid(W_if x + b_if),  i = sigmoid(W_ii x + b_ii)
        n  = W_in x + b_in        (positive: g(W_in x + b_in))
        h' = f / (f + i) * h + i / (f + i) * n

    Returns ``h_new, gates`` with ``gates`` mapping ``"f"`` and ``"i"``
    (normalised) and ``"n"``.
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 3 * H, w_ih.dtype)
    W_if, W_ii, W_in = (gate_rows(w_ih, k, H) for k in range(3))
    b_if, b_ii, b_in = (gate_rows(b_ih, k, H) for k in range(3))
    f = sigmoid(W_if @ x + b_if)
    i = sigmoid(W_ii @ x + b_ii)
    n = W_in @ x + b_in
    if positive:
        n = positive_candidate(n)
    fn = f / (f + i)
    in_ = i / (f + i)
    h_new = fn * h + in_ * n
    return h_new, {"f": fn, "i": in_, "n": n}


def log_sigmoid(a):
    """``log sigmoid(a) = -log(1 + exp(-a))``, as ``-logaddexp(0, -a)`` (no overflow)."""
    return -np.logaddexp(0, -a)


def head_product(w_hh, h, num_heads):
    """The sLSTM's block-diagonal recurrent product, row by row, as the contract states it.

    ``w_hh`` is ``(4H, d)`` with ``d = H // num_heads``: row ``gamma * H + j``
    (gate ``gamma``, unit ``j`` of head ``k = j // d``) multiplies
    ``h[k*d : (k+1)*d]``.
    """
    H = h.shape[0]
    d = H // num_heads
    out = np.zeros(w_hh.shape[0], dtype=np.result_type(w_hh, h))
    for row in range(w_hh.shape[0]):
        j = row % H
        k = j // d
        out[row] = w_hh[row] @ h[k * d:(k + 1) * d]
    return out


def slstm_step(x, h, c, n, m, w_ih, w_hh, b_ih=None, b_hh=None, num_heads=1, stabilised=True):
    """One sLSTM step (Beck et al. 2024) for one sequence: ``x`` ``(I,)``, the states ``(H,)``.

    Rows i, f, z, o; ``R h`` is :func:`head_product`::

        a  = W_ih x + b_ih + R h + b_hh            (i~, f~, z~, o~)
        m' = max(log sigmoid(f~) + m, i~)
        i' = exp(i~ - m')
        f' = exp(log sigmoid(f~) + m - m')
        c' = f' * c + i' * tanh(z~)
        n' = f' * n + i'
        h' = sigmoid(o~) * c' / n'

    ``m = -inf`` is the empty state (``f' = 0``).  With ``stabilised=False``
    the unstabilised equations: ``i = exp(i~)``, ``f = sigmoid(f~)``, no
    ``m`` (``m'`` returned as 0); they overflow where the stabilised ones do
    not (no warning: the caller compares only where they are finite).

    Returns ``h_new, c_new, n_new, m_new, gates`` with ``gates`` mapping
    ``"i" "f" "z" "o" "c" "n" "m"``.
    """
    H = h.shape[0]
    b_ih = _bias_or_zeros(b_ih, 4 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 4 * H, w_hh.dtype)
    a = w_ih @ x + b_ih + head_product(w_hh, h, num_heads) + b_hh
    a_i, a_f, a_z, a_o = (gate_rows(a, k, H) for k in range(4))

    if stabilised:
        m_new = np.maximum(log_sigmoid(a_f) + m, a_i)
        i = np.exp(a_i - m_new)
        f = np.exp(log_sigmoid(a_f) + m - m_new)
    else:
        m_new = np.zeros(H)
        with np.errstate(over="ignore"):
            i = np.exp(a_i)
        f = sigmoid(a_f)
    z = tanh(a_z)
    o = sigmoid(a_o)
    with np.errstate(invalid="ignore", over="ignore"):   # unstabilised: inf - inf, inf / inf
        c_new = f * c + i * z
        n_new = f * n + i
        h_new = o * c_new / n_new
    if not stabilised:
        # A normaliser below the normal range has lost digits (subnormal
        # terms): not a value to compare with.
        h_new = np.where(n_new >= 1e-290, h_new, np.nan)
    return h_new, c_new, n_new, m_new, {"i": i, "f": f, "z": z, "o": o, "c": c_new,
                                        "n": n_new, "m": m_new}


# ---------------------------------------------------------------------------
# Single steps, concatenated ("paper") layout
# ---------------------------------------------------------------------------


def lstm_step_concat(x, h, c, p):
    """One LSTM step with one matrix per gate acting on ``[h, x]``.

    ``p`` holds ``W_f W_i W_c W_o`` ``(H, H + I)`` and ``b_f b_i b_c b_o``
    ``(H,)``. Returns ``h_new, c_new``.
    """
    hx = np.concatenate([h, x])
    f = sigmoid(p["W_f"] @ hx + p["b_f"])
    i = sigmoid(p["W_i"] @ hx + p["b_i"])
    c_tilde = tanh(p["W_c"] @ hx + p["b_c"])
    o = sigmoid(p["W_o"] @ hx + p["b_o"])
    c_new = f * c + i * c_tilde
    h_new = o * tanh(c_new)
    return h_new, c_new


def gru_step_paper(x, h, p):
    """One GRU step in the form of Cho et al. (2014), acting on ``[h, x]``.

    ``p`` holds ``W_z W_r W_h`` ``(H, H + I)`` and ``b_z b_r b_h`` ``(H,)``.
    Returns ``h_new``.
    """
    hx = np.concatenate([h, x])
    z_prime = sigmoid(p["W_z"] @ hx + p["b_z"])
    r = sigmoid(p["W_r"] @ hx + p["b_r"])
    n = tanh(p["W_h"] @ np.concatenate([r * h, x]) + p["b_h"])
    h_new = (1 - z_prime) * h + z_prime * n
    return h_new


# ---------------------------------------------------------------------------
# Converters between the layouts
# ---------------------------------------------------------------------------


def lstm_torch_to_concat(w_ih, w_hh, b_ih=None, b_hh=None):
    """PyTorch-layout LSTM parameters -> ``W_f W_i W_c W_o``, ``b_*`` on ``[h, x]``.

    Each gate's matrix is ``[W_h*, W_i*]`` (hidden columns first, as ``[h, x]``
    stacks h first) and its bias is ``b_i* + b_h*``.
    """
    H = w_hh.shape[1]
    b_ih = _bias_or_zeros(b_ih, 4 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 4 * H, w_hh.dtype)
    p = {}
    for k, name in enumerate(("i", "f", "c", "o")):  # PyTorch order i, f, g, o
        p["W_" + name] = np.concatenate(
            [gate_rows(w_hh, k, H), gate_rows(w_ih, k, H)], axis=1)
        p["b_" + name] = gate_rows(b_ih, k, H) + gate_rows(b_hh, k, H)
    return p


def lstm_concat_to_torch(p):
    """Inverse of :func:`lstm_torch_to_concat`.

    The summed bias cannot be split back; all of it goes to ``bias_ih`` and
    ``bias_hh`` is zero. Returns a dict with ``weight_ih weight_hh bias_ih
    bias_hh``.
    """
    H = p["W_i"].shape[0]
    names = ("i", "f", "c", "o")
    w_hh = np.concatenate([p["W_" + n][:, :H] for n in names], axis=0)
    w_ih = np.concatenate([p["W_" + n][:, H:] for n in names], axis=0)
    b_ih = np.concatenate([p["b_" + n] for n in names])
    return {"weight_ih": w_ih, "weight_hh": w_hh,
            "bias_ih": b_ih, "bias_hh": np.zeros_like(b_ih)}


def gru_torch_to_paper(w_ih, w_hh, b_ih=None, b_hh=None):
    """PyTorch-layout ``reset_after=False`` GRU parameters -> paper form.

    ``z' = 1 - z = sigmoid(-(...))``, so the z rows of both matrices and both
    z biases are negated; biases of the same gate are summed.
    """
    H = w_hh.shape[1]
    b_ih = _bias_or_zeros(b_ih, 3 * H, w_ih.dtype)
    b_hh = _bias_or_zeros(b_hh, 3 * H, w_hh.dtype)

    def stacked(k):
        return np.concatenate([gate_rows(w_hh, k, H), gate_rows(w_ih, k, H)], axis=1)

    def summed(k):
        return gate_rows(b_ih, k, H) + gate_rows(b_hh, k, H)

    return {
        "W_r": stacked(0), "b_r": summed(0),
        "W_z": -stacked(1), "b_z": -summed(1),
        "W_h": stacked(2), "b_h": summed(2),
    }


def gru_paper_to_torch(p):
    """Inverse of :func:`gru_torch_to_paper` (``reset_after=False`` layout).

    The summed bias goes entirely to ``bias_ih``; ``bias_hh`` is zero.
    """
    H = p["W_r"].shape[0]
    gates = (p["W_r"], -p["W_z"], p["W_h"])
    w_hh = np.concatenate([W[:, :H] for W in gates], axis=0)
    w_ih = np.concatenate([W[:, H:] for W in gates], axis=0)
    b_ih = np.concatenate([p["b_r"], -p["b_z"], p["b_h"]])
    return {"weight_ih": w_ih, "weight_hh": w_hh,
            "bias_ih": b_ih, "bias_hh": np.zeros_like(b_ih)}


# ---------------------------------------------------------------------------
# Full sequences
# ---------------------------------------------------------------------------


def _valid_steps(length, direction):
    """Time indices a direction reads: 0..length-1 forward, reversed backward."""
    if direction == 0:
        return list(range(length))
    return list(reversed(range(length)))


def _sequence_setup(x, params, num_layers, bidirectional, lengths):
    x = np.asarray(x)
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = params["weight_hh_l0"].shape[1]
    if lengths is None:
        lengths = np.full(B, T, dtype=np.int64)
    lengths = np.asarray(lengths)
    dtype = np.result_type(x, *params.values())
    return x, T, B, D, H, lengths, dtype


def _layer_params(params, layer, direction):
    return (params[layer_key("weight_ih", layer, direction)],
            params[layer_key("weight_hh", layer, direction)],
            params.get(layer_key("bias_ih", layer, direction)),
            params.get(layer_key("bias_hh", layer, direction)))


def reference_lstm(x, params, num_layers=1, bidirectional=False,
                   h0=None, c0=None, lengths=None, reverse=False, input_forget=False,
                   clip=None):
    """Multi-layer, optionally bidirectional LSTM over a time-major sequence.

    Parameters
    ----------
    x : ndarray, shape (T, B, I)
    params : dict of ndarray, keyed like ``torch.nn.LSTM.state_dict()``
    num_layers : int
    bidirectional : bool
    h0, c0 : ndarray, shape (L*D, B, H), optional (zeros)
    lengths : int array, shape (B,), optional (all T); right-padded sequences
    reverse : bool
        One direction reading backwards (ONNX's ``direction="reverse"``).
    input_forget, clip :
        As for :func:`lstm_step`; peephole weights are read from
        ``params["weight_peep_l{k}"]`` when present.

    Returns
    -------
    y : ndarray, shape (T, B, D*H), zero at padded steps
    (h_n, c_n) : ndarrays, shape (L*D, B, H), states after the last valid step
    gates : dict ``"i" "f" "g" "o" "c"`` -> ndarray (L*D, T, B, H), zero at
        padded steps
    """
    x, T, B, D, H, lengths, dtype = _sequence_setup(
        x, params, num_layers, bidirectional, lengths)
    if h0 is None:
        h0 = np.zeros((num_layers * D, B, H), dtype=dtype)
    if c0 is None:
        c0 = np.zeros((num_layers * D, B, H), dtype=dtype)

    h_n = np.zeros((num_layers * D, B, H), dtype=dtype)
    c_n = np.zeros((num_layers * D, B, H), dtype=dtype)
    gates = {k: np.zeros((num_layers * D, T, B, H), dtype=dtype)
             for k in LSTM_GATES + ("c",)}

    layer_input = x
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(D):
            w_ih, w_hh, b_ih, b_hh = _layer_params(params, layer, direction)
            peep = params.get(layer_key("weight_peep", layer, direction))
            s = layer * D + direction
            out = np.zeros((T, B, H), dtype=dtype)
            for b in range(B):
                h = h0[s, b]
                c = c0[s, b]
                for t in _valid_steps(lengths[b], 1 if reverse else direction):
                    h, c, g = lstm_step(layer_input[t, b], h, c, w_ih, w_hh, b_ih, b_hh,
                                        peep, input_forget, clip)
                    out[t, b] = h
                    for k in g:
                        gates[k][s, t, b] = g[k]
                h_n[s, b] = h
                c_n[s, b] = c
            direction_outputs.append(out)
        layer_input = np.concatenate(direction_outputs, axis=2)
    return layer_input, (h_n, c_n), gates


def reference_gru(x, params, num_layers=1, bidirectional=False, h0=None,
                  lengths=None, reset_after=True, reverse=False, clip=None):
    """Multi-layer, optionally bidirectional GRU over a time-major sequence.

    Same conventions as :func:`reference_lstm`; returns ``y, h_n, gates``
    with gates ``"r" "z" "n"``.
    """
    def step(x, h, w_ih, w_hh, b_ih, b_hh):
        return gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=reset_after, clip=clip)

    return _reference_h(step, GRU_GATES, x, params, num_layers, bidirectional, h0, lengths,
                        reverse)


def reference_janet(x, params, num_layers=1, bidirectional=False, h0=None, lengths=None,
                    reverse=False, beta=1.0):
    """Multi-layer, optionally bidirectional JANET (:func:`janet_step`).

    Same conventions as :func:`reference_gru`; gates ``"f" "n"``.
    """
    def step(x, h, w_ih, w_hh, b_ih, b_hh):
        return janet_step(x, h, w_ih, w_hh, b_ih, b_hh, beta=beta)

    return _reference_h(step, JANET_GATES, x, params, num_layers, bidirectional, h0, lengths,
                        reverse)


def reference_mgu(x, params, num_layers=1, bidirectional=False, h0=None, lengths=None,
                  reverse=False):
    """Multi-layer, optionally bidirectional MGU (:func:`mgu_step`).

    Same conventions as :func:`reference_gru`; gates ``"f" "n"``.
    """
    return _reference_h(mgu_step, MGU_GATES, x, params, num_layers, bidirectional, h0, lengths,
                        reverse)


def reference_slstm(x, params, num_layers=1, bidirectional=False, state0=None, lengths=None,
                    reverse=False, num_heads=1, stabilised=True):
    """Multi-layer, optionally bidirectional sLSTM (:func:`slstm_step`).

    Conventions of :func:`reference_lstm`; ``state0`` is ``(h0, c0, n0, m0)``
    each ``(L*D, B, H)`` (None: zeros and ``m0 = -inf``).  Returns ``y``,
    ``(h_n, c_n, n_n, m_n)`` and the gates ``"i" "f" "z" "o" "c" "n" "m"``
    (zero at padded steps).  ``stabilised=False``: the unstabilised
    equations (see :func:`slstm_step`; pass the unstabilised ``c0 e^m0``,
    ``n0 e^m0`` as the state).
    """
    x = np.asarray(x)
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = params["weight_ih_l0"].shape[0] // 4
    if lengths is None:
        lengths = np.full(B, T, dtype=np.int64)
    dtype = np.result_type(x, *params.values())
    num = num_layers * D
    if state0 is None:
        state0 = (np.zeros((num, B, H)), np.zeros((num, B, H)), np.zeros((num, B, H)),
                  np.full((num, B, H), -np.inf))
    final = tuple(np.zeros((num, B, H), dtype=dtype) for _ in range(4))
    gates = {k: np.zeros((num, T, B, H), dtype=dtype) for k in SLSTM_GATES}

    layer_input = x
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(D):
            w_ih, w_hh, b_ih, b_hh = _layer_params(params, layer, direction)
            s = layer * D + direction
            out = np.zeros((T, B, H), dtype=dtype)
            for b in range(B):
                h, c, n, m = (v[s, b] for v in state0)
                for t in _valid_steps(lengths[b], 1 if reverse else direction):
                    h, c, n, m, g = slstm_step(layer_input[t, b], h, c, n, m, w_ih, w_hh, b_ih,
                                               b_hh, num_heads, stabilised)
                    out[t, b] = h
                    for k in g:
                        gates[k][s, t, b] = g[k]
                for v, value in zip(final, (h, c, n, m)):
                    v[s, b] = value
            direction_outputs.append(out)
        layer_input = np.concatenate(direction_outputs, axis=2)
    return layer_input, final, gates


def reference_scan_cell(kind, x, params, num_layers=1, bidirectional=False, h0=None,
                        lengths=None, reverse=False, positive=False):
    """Multi-layer, optionally bidirectional minGRU (``kind="mingru"``) or minLSTM.

    A plain sequential loop of :func:`mingru_step` / :func:`minlstm_step`;
    conventions of :func:`reference_gru` (``params`` has ``weight_ih_l*`` and
    ``bias_ih_l*`` only).
    """
    step, names, G = {"mingru": (mingru_step, ("z", "n"), 2),
                      "minlstm": (minlstm_step, ("f", "i", "n"), 3)}[kind]
    H = params["weight_ih_l0"].shape[0] // G
    # the common loop reads the recurrent weights' width: give it zero ones
    full = dict(params)
    D = 2 if bidirectional else 1
    for layer in range(num_layers):
        for direction in range(D):
            full[layer_key("weight_hh", layer, direction)] = np.zeros((G * H, H))

    def one_step(x, h, w_ih, w_hh, b_ih, b_hh):
        return step(x, h, w_ih, b_ih, positive)

    return _reference_h(one_step, names, x, full, num_layers, bidirectional, h0, lengths,
                        reverse)


def _reference_h(step, gate_names, x, params, num_layers, bidirectional, h0, lengths, reverse):
    """A stacked recurrence whose state is ``h`` alone, one ``step`` at a time."""
    x, T, B, D, H, lengths, dtype = _sequence_setup(
        x, params, num_layers, bidirectional, lengths)
    if h0 is None:
        h0 = np.zeros((num_layers * D, B, H), dtype=dtype)

    h_n = np.zeros((num_layers * D, B, H), dtype=dtype)
    gates = {k: np.zeros((num_layers * D, T, B, H), dtype=dtype) for k in gate_names}

    layer_input = x
    for layer in range(num_layers):
        direction_outputs = []
        for direction in range(D):
            w_ih, w_hh, b_ih, b_hh = _layer_params(params, layer, direction)
            s = layer * D + direction
            out = np.zeros((T, B, H), dtype=dtype)
            for b in range(B):
                h = h0[s, b]
                for t in _valid_steps(lengths[b], 1 if reverse else direction):
                    h, g = step(layer_input[t, b], h, w_ih, w_hh, b_ih, b_hh)
                    out[t, b] = h
                    for k in g:
                        gates[k][s, t, b] = g[k]
                h_n[s, b] = h
            direction_outputs.append(out)
        layer_input = np.concatenate(direction_outputs, axis=2)
    return layer_input, h_n, gates


# ---------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------


def random_params(rng, kind, input_size, hidden_size, num_layers=1,
                  bidirectional=False, bias=True, dtype=np.float64, scale=None):
    """Random parameters keyed like ``torch.nn.LSTM`` / ``torch.nn.GRU``.

    ``kind`` is ``"lstm"``, ``"gru"``, ``"janet"`` or ``"mgu"``. Entries are
    uniform in ``(-scale, scale)``; the default scale is PyTorch's ``1/sqrt(H)``.
    """
    G = {"lstm": 4, "gru": 3, "janet": 2, "mgu": 2}[kind]
    D = 2 if bidirectional else 1
    H = hidden_size
    if scale is None:
        scale = 1.0 / np.sqrt(H)
    params = {}
    for layer in range(num_layers):
        layer_input_size = input_size if layer == 0 else D * H
        for direction in range(D):
            shapes = {"weight_ih": (G * H, layer_input_size), "weight_hh": (G * H, H)}
            if bias:
                shapes["bias_ih"] = (G * H,)
                shapes["bias_hh"] = (G * H,)
            for name, shape in shapes.items():
                params[layer_key(name, layer, direction)] = rng.uniform(
                    -scale, scale, size=shape).astype(dtype)
    return params


# ---------------------------------------------------------------------------
# Forgetting attention (Lin et al. 2025)
# ---------------------------------------------------------------------------


def forgetting_attention_reference(q, k, v, log_f, scale=None):
    """Forgetting attention as the dense T x T formula, one query at a time, in float64.

    For every sequence (the leading axes) and query ``i``::

        s_ij  = scale * q_i . k_j + sum_{l=j+1..i} log_f[l]     for j <= i
        out_i = sum_{j <= i} softmax_j(s_ij) v_j

    A gate of exactly 0 (``log_f[l] = -inf``) gives the keys before ``l`` a
    score of ``-inf``: weight 0.  ``scale`` defaults to ``1 / sqrt(d)``.
    """
    q, k, v, log_f = (np.asarray(a, dtype=np.float64) for a in (q, k, v, log_f))
    lead = q.shape[:-2]
    T, d = q.shape[-2:]
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    out = np.zeros(lead + (T, v.shape[-1]))
    for idx in np.ndindex(*lead):
        qs, ks, vs, gs = q[idx], k[idx], v[idx], log_f[idx]
        for i in range(T):
            scores = np.full(i + 1, -np.inf)
            bias = 0.0                       # sum of the gates between key j and query i
            for j in range(i, -1, -1):
                if j < i:
                    bias += gs[j + 1]
                if bias == -np.inf:
                    break                    # key j and every earlier key: weight 0
                scores[j] = scale * (qs[i] @ ks[j]) + bias
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            out[idx][i] = weights @ vs[: i + 1]
    return out


def log_sigmoid_reference(a):
    """``log(sigmoid(a))``, written as ``-log(1 + exp(-a))`` for ``a >= 0`` and ``a - log(1 + exp(a))`` below."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(a >= 0, -np.log1p(np.exp(-np.abs(a))), a - np.log1p(np.exp(-np.abs(a))))


def forgetting_attention_layer_reference(x, params, num_heads):
    """The ``ForgettingAttention`` layer in float64: ``x`` (T, B, E) -> ``y`` (T, B, E).

    ``params`` keyed like its ``state_dict``::

        [q | k | v] = x W_in^T + b_in          (in_proj_weight, in_proj_bias)
        f           = sigmoid(W_f x + b_f)     (forget_weight, forget_bias), one per head
        o_head      = forgetting_attention(q_head, k_head, v_head, log f_head)
        y           = [o_1 | ... | o_h] W_out^T + b_out      (out_proj.weight, out_proj.bias)
    """
    x = np.asarray(x, dtype=np.float64)
    T, B, E = x.shape
    d = E // num_heads
    p = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    b_in = p.get("in_proj_bias", np.zeros(3 * E))
    b_f = p.get("forget_bias", np.zeros(num_heads))
    b_out = p.get("out_proj.bias", np.zeros(E))
    y = np.zeros((T, B, E))
    for b in range(B):
        qkv = x[:, b] @ p["in_proj_weight"].T + b_in                  # (T, 3E)
        log_f = log_sigmoid_reference(x[:, b] @ p["forget_weight"].T + b_f)   # (T, h)
        heads = []
        for h in range(num_heads):
            q = qkv[:, h * d:(h + 1) * d]
            k = qkv[:, E + h * d:E + (h + 1) * d]
            v = qkv[:, 2 * E + h * d:2 * E + (h + 1) * d]
            heads.append(forgetting_attention_reference(q, k, v, log_f[:, h]))
        y[:, b] = np.concatenate(heads, axis=1) @ p["out_proj.weight"].T + b_out
    return y
