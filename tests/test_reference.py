"""Validate the oracle in ``tests/reference.py`` against PyTorch.

These tests do not touch fastgates. Everything runs in float64 so that the
oracle itself is checked to the tight float64 tolerance.

PyTorch has no ``reset_after=False`` GRU. That variant is checked three ways:
against a scalar, unit-by-unit evaluation of its equations; against the
classic paper form of Cho et al.; and against ``torch.nn.GRU`` in the one case
where the two variants coincide (``W_hn`` diagonal and ``b_hn = 0``, where
``r * (W_hn h) = W_hn (r * h)``).
"""

import math

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import reference as ref
from _tolerances import assert_close

F64 = np.float64


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def to_torch(a):
    return torch.tensor(np.asarray(a))


def to_numpy(t):
    return t.detach().numpy().copy()


def torch_module(kind, params, input_size, hidden_size, num_layers,
                 bidirectional, bias):
    """A float64 ``torch.nn.LSTM``/``GRU`` holding ``params`` (strict load)."""
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    module = cls(input_size, hidden_size, num_layers, bias=bias,
                 bidirectional=bidirectional, dtype=torch.float64)
    module.load_state_dict({k: to_torch(v) for k, v in params.items()})
    return module


def run_torch(module, x, state, lengths):
    """Run a torch RNN on time-major ``x``; pack when ``lengths`` is given."""
    T = x.shape[0]
    with torch.no_grad():
        xt = to_torch(x)
        st = None
        if state is not None:
            st = tuple(to_torch(s) for s in state) if isinstance(state, tuple) else to_torch(state)
        if lengths is None:
            y, s_n = module(xt, st)
        else:
            packed = pack_padded_sequence(xt, torch.tensor(lengths, dtype=torch.int64),
                                          enforce_sorted=False)
            y_packed, s_n = module(packed, st)
            y, _ = pad_packed_sequence(y_packed, total_length=T)
    if isinstance(s_n, tuple):
        return to_numpy(y), tuple(to_numpy(s) for s in s_n)
    return to_numpy(y), to_numpy(s_n)


def split_bias(params, layer, direction):
    return (params.get(ref.layer_key("bias_ih", layer, direction)),
            params.get(ref.layer_key("bias_hh", layer, direction)))


# Sequence cases: (num_layers, bidirectional, bias, with_state, lengths).
# Lengths include a full-length sequence, a length-1 sequence and unsorted
# order, so pack_padded_sequence(enforce_sorted=False) has to reorder.
T_SEQ, B_SEQ, I_SEQ, H_SEQ = 7, 4, 3, 5
SEQUENCE_CASES = [
    (1, False, True, False, None),
    (1, True, True, True, None),
    (2, False, False, True, None),
    (3, True, True, True, None),
    (1, False, True, True, [3, 7, 1, 5]),
    (2, True, True, True, [3, 7, 1, 5]),
    (2, True, False, False, [7, 2, 7, 4]),
]


def sequence_inputs(rng, kind, num_layers, bidirectional, bias, with_state):
    D = 2 if bidirectional else 1
    params = ref.random_params(rng, kind, I_SEQ, H_SEQ, num_layers, bidirectional,
                               bias, scale=0.7)
    x = rng.standard_normal((T_SEQ, B_SEQ, I_SEQ))
    shape = (num_layers * D, B_SEQ, H_SEQ)
    h0 = rng.standard_normal(shape) * 0.5 if with_state else None
    c0 = rng.standard_normal(shape) * 0.5 if with_state else None
    return params, x, h0, c0


def pad_with_garbage(x, lengths, value=1e3):
    """Copy of ``x`` with every padded step overwritten by ``value``."""
    x = x.copy()
    if lengths is not None:
        for b, n in enumerate(lengths):
            x[n:, b] = value
    return x


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_is_stable_for_every_finite_input(dtype):
    big = np.finfo(dtype).max
    a = np.array([-big, -1e4, -800.0, -100.0, -1.0, 0.0, 1.0, 100.0, 800.0, 1e4, big],
                 dtype=dtype)
    with np.errstate(all="raise"):
        s = ref.sigmoid(a)
        t = ref.tanh(a)
    assert s.dtype == dtype and t.dtype == dtype
    assert np.all((s >= 0) & (s <= 1))
    assert np.all((t >= -1) & (t <= 1))
    assert s[0] == 0 and s[-1] == 1 and s[5] == 0.5
    assert t[0] == -1 and t[-1] == 1 and t[5] == 0


def test_sigmoid_matches_definition_where_the_naive_formula_is_safe():
    a = np.linspace(-30, 30, 601)
    assert_close(ref.sigmoid(a), 1.0 / (1.0 + np.exp(-a)), F64)
    assert_close(ref.sigmoid(-a), 1.0 - ref.sigmoid(a), F64)
    assert_close(ref.tanh(a), 2.0 * ref.sigmoid(2.0 * a) - 1.0, F64)


# ---------------------------------------------------------------------------
# Single steps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_step_matches_torch_lstm_cell(bias):
    rng = np.random.default_rng(1)
    I, H, B = 4, 6, 3
    p = ref.random_params(rng, "lstm", I, H, bias=bias, scale=0.8)
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    cell.load_state_dict({k.removesuffix("_l0"): to_torch(v) for k, v in p.items()})
    x, h, c = (rng.standard_normal((B, n)) for n in (I, H, H))
    with torch.no_grad():
        h1, c1 = cell(to_torch(x), (to_torch(h), to_torch(c)))
    for b in range(B):
        h_new, c_new, gates = ref.lstm_step(x[b], h[b], c[b], p["weight_ih_l0"],
                                            p["weight_hh_l0"], *split_bias(p, 0, 0))
        assert_close(h_new, to_numpy(h1)[b], F64)
        assert_close(c_new, to_numpy(c1)[b], F64)
        assert_close(gates["c"], c_new, F64)
        assert_close(gates["o"] * np.tanh(gates["c"]), h_new, F64)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_step_reset_after_matches_torch_gru_cell(bias):
    rng = np.random.default_rng(2)
    I, H, B = 4, 6, 3
    p = ref.random_params(rng, "gru", I, H, bias=bias, scale=0.8)
    cell = torch.nn.GRUCell(I, H, bias=bias, dtype=torch.float64)
    cell.load_state_dict({k.removesuffix("_l0"): to_torch(v) for k, v in p.items()})
    x, h = rng.standard_normal((B, I)), rng.standard_normal((B, H))
    with torch.no_grad():
        h1 = to_numpy(cell(to_torch(x), to_torch(h)))
    for b in range(B):
        h_new, gates = ref.gru_step(x[b], h[b], p["weight_ih_l0"], p["weight_hh_l0"],
                                    *split_bias(p, 0, 0), reset_after=True)
        assert_close(h_new, h1[b], F64)
        z, n = gates["z"], gates["n"]
        assert_close((1 - z) * n + z * h[b], h_new, F64)


def gru_reset_before_by_hand(x, h, w_ih, w_hh, b_ih, b_hh):
    """``reset_after=False`` GRU step, one scalar at a time with ``math``."""
    H, I = len(h), len(x)

    def logistic(a):
        return 1.0 / (1.0 + math.exp(-a))

    r = [logistic(sum(w_ih[j, k] * x[k] for k in range(I)) + b_ih[j]
                  + sum(w_hh[j, k] * h[k] for k in range(H)) + b_hh[j])
         for j in range(H)]
    z = [logistic(sum(w_ih[H + j, k] * x[k] for k in range(I)) + b_ih[H + j]
                  + sum(w_hh[H + j, k] * h[k] for k in range(H)) + b_hh[H + j])
         for j in range(H)]
    n = [math.tanh(sum(w_ih[2 * H + j, k] * x[k] for k in range(I)) + b_ih[2 * H + j]
                   + sum(w_hh[2 * H + j, k] * (r[k] * h[k]) for k in range(H))
                   + b_hh[2 * H + j])
         for j in range(H)]
    return np.array([(1 - z[j]) * n[j] + z[j] * h[j] for j in range(H)])


def test_gru_step_reset_before_matches_scalar_derivation():
    rng = np.random.default_rng(3)
    I, H = 3, 4
    p = ref.random_params(rng, "gru", I, H, scale=0.9)
    w_ih, w_hh, b_ih, b_hh = (p[k + "_l0"] for k in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    for _ in range(3):
        x, h = rng.standard_normal(I), rng.standard_normal(H)
        expected = gru_reset_before_by_hand(x, h, w_ih, w_hh, b_ih, b_hh)
        actual, _ = ref.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=False)
        assert_close(actual, expected, F64)
        # The two variants genuinely differ here, so the flag is honoured.
        other, _ = ref.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=True)
        assert np.max(np.abs(other - actual)) > 1e-6


def test_gru_reset_before_tiny_example_by_hand():
    # H = I = 1, all weights 1, all biases 0, x = h = 1:
    # r = z = sigmoid(2), n = tanh(1 + r), h' = (1 - z) n + z.
    one = np.ones((3, 1))
    zero = np.zeros(3)
    s2 = 1.0 / (1.0 + math.exp(-2.0))
    expected = (1 - s2) * math.tanh(1.0 + s2) + s2
    actual, gates = ref.gru_step(np.ones(1), np.ones(1), one, one, zero, zero,
                                 reset_after=False)
    assert_close(actual, [expected], F64)
    assert_close(gates["r"], [s2], F64)
    assert_close(gates["n"], [math.tanh(1.0 + s2)], F64)


# ---------------------------------------------------------------------------
# Concatenated / paper forms and the converters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_gru_paper_form_agrees_with_reset_before_layout(bias):
    rng = np.random.default_rng(4)
    I, H = 3, 5
    p = ref.random_params(rng, "gru", I, H, bias=bias, scale=0.9)
    w_ih, w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    b_ih, b_hh = split_bias(p, 0, 0)
    paper = ref.gru_torch_to_paper(w_ih, w_hh, b_ih, b_hh)
    back = ref.gru_paper_to_torch(paper)
    h = h_paper = h_back = rng.standard_normal(H)
    for _ in range(6):
        x = rng.standard_normal(I)
        h, gates = ref.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=False)
        h_paper = ref.gru_step_paper(x, h_paper, paper)
        h_back, _ = ref.gru_step(x, h_back, back["weight_ih"], back["weight_hh"],
                                 back["bias_ih"], back["bias_hh"], reset_after=False)
        assert_close(h_paper, h, F64)
        assert_close(h_back, h, F64)
    # Round trip paper -> torch -> paper is exact.
    again = ref.gru_torch_to_paper(back["weight_ih"], back["weight_hh"],
                                   back["bias_ih"], back["bias_hh"])
    for k in paper:
        np.testing.assert_array_equal(again[k], paper[k])


def test_gru_paper_update_gate_is_one_minus_z():
    rng = np.random.default_rng(5)
    I, H = 2, 3
    p = ref.random_params(rng, "gru", I, H, scale=0.9)
    w_ih, w_hh, b_ih, b_hh = (p[k + "_l0"] for k in
                              ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    paper = ref.gru_torch_to_paper(w_ih, w_hh, b_ih, b_hh)
    x, h = rng.standard_normal(I), rng.standard_normal(H)
    _, gates = ref.gru_step(x, h, w_ih, w_hh, b_ih, b_hh, reset_after=False)
    z_prime = ref.sigmoid(paper["W_z"] @ np.concatenate([h, x]) + paper["b_z"])
    assert_close(z_prime, 1 - gates["z"], F64)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_concat_form_agrees_with_torch_layout(bias):
    rng = np.random.default_rng(6)
    I, H = 3, 5
    p = ref.random_params(rng, "lstm", I, H, bias=bias, scale=0.9)
    w_ih, w_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    b_ih, b_hh = split_bias(p, 0, 0)
    concat = ref.lstm_torch_to_concat(w_ih, w_hh, b_ih, b_hh)
    back = ref.lstm_concat_to_torch(concat)
    h = h_cat = h_back = rng.standard_normal(H)
    c = c_cat = c_back = rng.standard_normal(H)
    for _ in range(6):
        x = rng.standard_normal(I)
        h, c, _ = ref.lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
        h_cat, c_cat = ref.lstm_step_concat(x, h_cat, c_cat, concat)
        h_back, c_back, _ = ref.lstm_step(x, h_back, c_back, back["weight_ih"],
                                          back["weight_hh"], back["bias_ih"],
                                          back["bias_hh"])
        for actual in (h_cat, h_back):
            assert_close(actual, h, F64)
        for actual in (c_cat, c_back):
            assert_close(actual, c, F64)
    again = ref.lstm_torch_to_concat(back["weight_ih"], back["weight_hh"],
                                     back["bias_ih"], back["bias_hh"])
    for k in concat:
        np.testing.assert_array_equal(again[k], concat[k])


def test_lstm_concat_forget_gate_reads_the_f_rows():
    # Only the f rows non-zero: f = sigmoid(W_f [h, x] + b_f), i = o = 1/2, g = 0.
    I, H = 2, 2
    w_ih = np.zeros((4 * H, I))
    w_hh = np.zeros((4 * H, H))
    w_ih[H:2 * H] = [[1.0, 2.0], [3.0, 4.0]]
    w_hh[H:2 * H] = [[0.5, 0.0], [0.0, -0.5]]
    b = np.zeros(4 * H)
    b[H:2 * H] = [0.1, -0.1]
    concat = ref.lstm_torch_to_concat(w_ih, w_hh, b, np.zeros(4 * H))
    np.testing.assert_array_equal(concat["W_f"], [[0.5, 0.0, 1.0, 2.0],
                                                  [0.0, -0.5, 3.0, 4.0]])
    np.testing.assert_array_equal(concat["b_f"], [0.1, -0.1])
    x, h, c = np.array([1.0, -1.0]), np.array([2.0, 1.0]), np.array([3.0, -2.0])
    f = ref.sigmoid(np.array([1.0 - 2.0 + 1.0 + 0.1, 3.0 - 4.0 - 0.5 - 0.1]))
    h_new, c_new, gates = ref.lstm_step(x, h, c, w_ih, w_hh, b, None)
    assert_close(gates["f"], f, F64)
    assert_close(c_new, f * c, F64)
    assert_close(h_new, 0.5 * np.tanh(f * c), F64)


# ---------------------------------------------------------------------------
# Full sequences against torch.nn.LSTM / torch.nn.GRU
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers,bidirectional,bias,with_state,lengths", SEQUENCE_CASES)
def test_reference_lstm_matches_torch(num_layers, bidirectional, bias, with_state, lengths):
    rng = np.random.default_rng(10)
    params, x, h0, c0 = sequence_inputs(rng, "lstm", num_layers, bidirectional, bias,
                                        with_state)
    x = pad_with_garbage(x, lengths)
    module = torch_module("lstm", params, I_SEQ, H_SEQ, num_layers, bidirectional, bias)
    state = (h0, c0) if with_state else None
    y_t, (h_t, c_t) = run_torch(module, x, state, lengths)
    y, (h_n, c_n), gates = ref.reference_lstm(x, params, num_layers, bidirectional,
                                              h0, c0, lengths)
    D = 2 if bidirectional else 1
    assert y.shape == (T_SEQ, B_SEQ, D * H_SEQ)
    assert h_n.shape == c_n.shape == (num_layers * D, B_SEQ, H_SEQ)
    assert set(gates) == {"i", "f", "g", "o", "c"}
    assert_close(y, y_t, F64)
    assert_close(h_n, h_t, F64)
    assert_close(c_n, c_t, F64)


@pytest.mark.parametrize("num_layers,bidirectional,bias,with_state,lengths", SEQUENCE_CASES)
def test_reference_gru_matches_torch(num_layers, bidirectional, bias, with_state, lengths):
    rng = np.random.default_rng(11)
    params, x, h0, _ = sequence_inputs(rng, "gru", num_layers, bidirectional, bias,
                                       with_state)
    x = pad_with_garbage(x, lengths)
    module = torch_module("gru", params, I_SEQ, H_SEQ, num_layers, bidirectional, bias)
    y_t, h_t = run_torch(module, x, h0, lengths)
    y, h_n, gates = ref.reference_gru(x, params, num_layers, bidirectional, h0, lengths,
                                      reset_after=True)
    D = 2 if bidirectional else 1
    assert y.shape == (T_SEQ, B_SEQ, D * H_SEQ)
    assert h_n.shape == (num_layers * D, B_SEQ, H_SEQ)
    assert set(gates) == {"r", "z", "n"}
    assert_close(y, y_t, F64)
    assert_close(h_n, h_t, F64)


@pytest.mark.parametrize("num_layers,bidirectional,bias,with_state,lengths",
                         [SEQUENCE_CASES[1], SEQUENCE_CASES[3], SEQUENCE_CASES[5]])
def test_reference_gru_reset_before_matches_torch_when_variants_coincide(
        num_layers, bidirectional, bias, with_state, lengths):
    # With W_hn diagonal and b_hn = 0, r * (W_hn h + b_hn) = W_hn (r * h) + b_hn,
    # so torch's (reset_after=True) GRU computes the reset_after=False model.
    rng = np.random.default_rng(12)
    params, x, h0, _ = sequence_inputs(rng, "gru", num_layers, bidirectional, bias,
                                       with_state)
    H = H_SEQ
    for key in params:
        if key.startswith("weight_hh"):
            params[key][2 * H:] = np.diag(rng.uniform(-1.0, 1.0, H))
        if key.startswith("bias_hh"):
            params[key][2 * H:] = 0.0
    module = torch_module("gru", params, I_SEQ, H, num_layers, bidirectional, bias)
    y_t, h_t = run_torch(module, x, h0, lengths)
    y, h_n, _ = ref.reference_gru(x, params, num_layers, bidirectional, h0, lengths,
                                  reset_after=False)
    assert_close(y, y_t, F64)
    assert_close(h_n, h_t, F64)


def test_reference_gru_reset_before_sequence_follows_the_paper_form():
    rng = np.random.default_rng(13)
    T, B, I, H = 5, 2, 3, 4
    params = ref.random_params(rng, "gru", I, H, 1, True, True, scale=0.8)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((2, B, H))
    lengths = [5, 3]
    y, h_n, _ = ref.reference_gru(x, params, 1, True, h0, lengths, reset_after=False)
    for direction in range(2):
        paper = ref.gru_torch_to_paper(
            *(params[ref.layer_key(k, 0, direction)]
              for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
        for b in range(B):
            h = h0[direction, b]
            steps = range(lengths[b]) if direction == 0 else reversed(range(lengths[b]))
            for t in steps:
                h = ref.gru_step_paper(x[t, b], h, paper)
                assert_close(y[t, b, direction * H:(direction + 1) * H], h, F64)
            assert_close(h_n[direction, b], h, F64)
            np.testing.assert_array_equal(y[lengths[b]:, b], 0.0)


# ---------------------------------------------------------------------------
# Gates and padding
# ---------------------------------------------------------------------------


def test_reference_lstm_gates_rebuild_the_recursion():
    rng = np.random.default_rng(14)
    num_layers, bidirectional, lengths = 2, True, [6, 2, 7, 4]
    params, x, h0, c0 = sequence_inputs(rng, "lstm", num_layers, bidirectional, True, True)
    y, (h_n, c_n), g = ref.reference_lstm(x, params, num_layers, bidirectional, h0, c0,
                                          lengths)
    H = H_SEQ
    for s in range(num_layers * 2):
        layer, direction = divmod(s, 2)
        for b in range(B_SEQ):
            n = lengths[b]
            steps = range(n) if direction == 0 else reversed(range(n))
            c_prev, h = c0[s, b], h0[s, b]
            for t in steps:
                c = g["f"][s, t, b] * c_prev + g["i"][s, t, b] * g["g"][s, t, b]
                assert_close(g["c"][s, t, b], c, F64)
                h = g["o"][s, t, b] * np.tanh(c)
                if layer == num_layers - 1:
                    assert_close(y[t, b, direction * H:(direction + 1) * H], h, F64)
                c_prev = c
            assert_close(c_n[s, b], c_prev, F64)
            assert_close(h_n[s, b], h, F64)
            for k in g:
                np.testing.assert_array_equal(g[k][s, n:, b], 0.0)
    for b in range(B_SEQ):
        np.testing.assert_array_equal(y[lengths[b]:, b], 0.0)


@pytest.mark.parametrize("reset_after", [True, False])
def test_reference_gru_gates_rebuild_the_recursion(reset_after):
    rng = np.random.default_rng(15)
    num_layers, bidirectional, lengths = 2, True, [6, 2, 7, 4]
    params, x, h0, _ = sequence_inputs(rng, "gru", num_layers, bidirectional, True, True)
    y, h_n, g = ref.reference_gru(x, params, num_layers, bidirectional, h0, lengths,
                                  reset_after=reset_after)
    H = H_SEQ
    for s in range(num_layers * 2):
        layer, direction = divmod(s, 2)
        for b in range(B_SEQ):
            n = lengths[b]
            steps = range(n) if direction == 0 else reversed(range(n))
            h = h0[s, b]
            for t in steps:
                z = g["z"][s, t, b]
                h = (1 - z) * g["n"][s, t, b] + z * h
                if layer == num_layers - 1:
                    assert_close(y[t, b, direction * H:(direction + 1) * H], h, F64)
            assert_close(h_n[s, b], h, F64)
            for k in g:
                np.testing.assert_array_equal(g[k][s, n:, b], 0.0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_reference_ignores_padded_input(kind):
    rng = np.random.default_rng(16)
    lengths = [3, 7, 1, 5]
    params, x, h0, c0 = sequence_inputs(rng, kind, 2, True, True, True)
    if kind == "lstm":
        first = ref.reference_lstm(x, params, 2, True, h0, c0, lengths)
        second = ref.reference_lstm(pad_with_garbage(x, lengths), params, 2, True, h0, c0,
                                    lengths)
        pairs = [(first[0], second[0]), (first[1][0], second[1][0]),
                 (first[1][1], second[1][1])]
    else:
        first = ref.reference_gru(x, params, 2, True, h0, lengths)
        second = ref.reference_gru(pad_with_garbage(x, lengths), params, 2, True, h0,
                                   lengths)
        pairs = [(first[0], second[0]), (first[1], second[1])]
    pairs += [(first[2][k], second[2][k]) for k in first[2]]
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)


def test_full_lengths_equal_no_lengths():
    rng = np.random.default_rng(17)
    params, x, h0, c0 = sequence_inputs(rng, "lstm", 2, True, True, True)
    y1, (h1, c1), _ = ref.reference_lstm(x, params, 2, True, h0, c0, None)
    y2, (h2, c2), _ = ref.reference_lstm(x, params, 2, True, h0, c0, [T_SEQ] * B_SEQ)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(h1, h2)
    np.testing.assert_array_equal(c1, c2)
