"""The LSTM and GRU variants of ONNX's operators: reverse, clip, peepholes,
a coupled forget gate.

Outputs, final states and gates against the NumPy oracle
(``tests/reference.py``, written from ONNX's equations), for random shapes and
both dtypes; invariants that tie each variant to the plain model; argument
checks.  Gradients are in ``test_gradcheck.py`` (``test_variant_gradients``).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastgates as fg
import reference as ref
from _tolerances import assert_close

DTYPES = [np.float32, np.float64]


@st.composite
def variant_case(draw):
    cell = draw(st.sampled_from(["lstm", "gru"]))
    T = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    I = draw(st.integers(1, 4))
    H = draw(st.integers(1, 4))
    num_layers = draw(st.integers(1, 2))
    reverse = draw(st.booleans())
    bidirectional = False if reverse else draw(st.booleans())
    options = dict(reverse=reverse, bidirectional=bidirectional,
                   bias=draw(st.booleans()),
                   clip=draw(st.sampled_from([None, 0.3, 2.0])))
    if cell == "lstm":
        options["peephole"] = draw(st.booleans())
        options["input_forget"] = draw(st.booleans())
    else:
        options["reset_after"] = draw(st.booleans())
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return cell, (T, B, I, H, num_layers), options, np.array(lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=variant_case(), seed=st.integers(0, 2**16))
def test_variants_match_reference(dtype, case, seed):
    cell, (T, B, I, H, L), options, lengths = case
    cls = fg.LSTM if cell == "lstm" else fg.GRU
    m = cls(I, H, L, dtype=dtype, seed=seed, **options)
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.standard_normal((T, B, I))).astype(dtype)
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    x64 = x.astype(np.float64)
    if cell == "lstm":
        y, (h, c) = m(x, lengths=lengths)
        y_ref, (h_ref, c_ref), g_ref = ref.reference_lstm(
            x64, params, L, options["bidirectional"], lengths=lengths,
            reverse=options["reverse"], input_forget=options["input_forget"],
            clip=options["clip"])
        assert_close(c, c_ref, dtype)
    else:
        y, h = m(x, lengths=lengths)
        y_ref, h_ref, g_ref = ref.reference_gru(
            x64, params, L, options["bidirectional"], lengths=lengths,
            reset_after=options["reset_after"], reverse=options["reverse"],
            clip=options["clip"])
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype)
    assert_close(h, h_ref, dtype)
    gates = m.gates(x, lengths=lengths)
    for name in gates:
        assert_close(gates[name], g_ref[name], dtype, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reverse_is_the_backward_half_of_a_bidirectional_model(cell, dtype):
    cls = fg.LSTM if cell == "lstm" else fg.GRU
    bi = cls(3, 4, bidirectional=True, dtype=dtype, seed=1)
    rev = cls(3, 4, reverse=True, dtype=dtype, seed=2)
    rev.load_state_dict({k.replace("_reverse", ""): v for k, v in bi.state_dict().items()
                         if k.endswith("_reverse")})
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(dtype)
    lengths = np.array([6, 3])
    y_bi, s_bi = bi(x, lengths=lengths)
    y_rev, s_rev = rev(x, lengths=lengths)
    np.testing.assert_array_equal(y_rev, y_bi[:, :, 4:])
    pairs = zip(s_rev, s_bi) if cell == "lstm" else [(s_rev, s_bi)]
    for a, b in pairs:
        np.testing.assert_array_equal(a[0], b[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_peepholes_and_a_far_clip_give_the_plain_lstm_bitwise(dtype):
    # The variant path computes the same expressions in the same order.
    plain = fg.LSTM(3, 5, 2, dtype=dtype, seed=4)
    variant = fg.LSTM(3, 5, 2, dtype=dtype, seed=4, peephole=True, clip=1e30)
    sd = plain.state_dict()
    sd.update({k: np.zeros_like(v) for k, v in variant.state_dict().items() if "peep" in k})
    variant.load_state_dict(sd)
    x = np.random.default_rng(1).standard_normal((7, 3, 3)).astype(dtype)
    y0, (h0, c0) = plain(x)
    y1, (h1, c1) = variant(x)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(c0, c1)


@given(seed=st.integers(0, 2**16), clip=st.floats(0.05, 5.0))
def test_clipped_gates_stay_within_the_clipped_range(seed, clip):
    m = fg.LSTM(2, 3, dtype=np.float64, seed=seed, clip=clip, peephole=True)
    x = 50.0 * np.random.default_rng(seed).standard_normal((5, 2, 2))
    g = m.gates(x)
    lo, hi = ref.sigmoid(-clip), ref.sigmoid(clip)
    for name in ("i", "f", "o"):
        assert np.all((g[name] >= lo - 1e-15) & (g[name] <= hi + 1e-15)), name
    assert np.all(np.abs(g["g"]) <= np.tanh(clip) + 1e-15)


def test_coupled_forget_gate_is_one_minus_input_gate():
    m = fg.LSTM(2, 3, dtype=np.float64, seed=0, input_forget=True)
    g = m.gates(np.random.default_rng(0).standard_normal((4, 2, 2)))
    np.testing.assert_array_equal(g["f"], 1.0 - g["i"])


def test_input_forget_ignores_the_forget_rows():
    m = fg.LSTM(2, 3, dtype=np.float64, seed=0, input_forget=True)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    y0, _ = m(x)
    sd = m.state_dict()
    sd["weight_ih_l0"][3:6] = 7.0
    sd["bias_hh_l0"][3:6] = -7.0
    m.load_state_dict(sd)
    y1, _ = m(x)
    np.testing.assert_array_equal(y0, y1)
    (_, _), pullback = m.vjp(x)
    _, _, dparams = pullback(np.ones_like(y0))
    assert not dparams["weight_ih_l0"][3:6].any()
    assert not dparams["bias_ih_l0"][3:6].any()


def test_peephole_parameters_and_seed():
    plain = fg.LSTM(2, 3, 2, bidirectional=True, seed=9)
    m = fg.LSTM(2, 3, 2, bidirectional=True, seed=9, peephole=True)
    sd = m.state_dict()
    peeps = [k for k in sd if "peep" in k]
    assert peeps == ["weight_peep_l0", "weight_peep_l0_reverse",
                     "weight_peep_l1", "weight_peep_l1_reverse"]
    assert all(sd[k].shape == (3, 3) for k in peeps)
    for k, v in plain.state_dict().items():        # the other parameters are unchanged
        np.testing.assert_array_equal(sd[k], v)
    assert fg.LSTMCell(2, 3, peephole=True).state_dict()["weight_peep"].shape == (3, 3)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cells_with_variants_match_one_step_of_the_layer(cell):
    kw = dict(clip=0.7)
    if cell == "lstm":
        kw.update(peephole=True, input_forget=True)
    layer = (fg.LSTM if cell == "lstm" else fg.GRU)(3, 4, dtype=np.float64, seed=3, **kw)
    one = (fg.LSTMCell if cell == "lstm" else fg.GRUCell)(3, 4, dtype=np.float64, **kw)
    one.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = 3.0 * np.random.default_rng(2).standard_normal((1, 2, 3))
    y, state = layer(x)
    out = one(x[0])
    if cell == "lstm":
        np.testing.assert_array_equal(out[0], state[0][0])
        np.testing.assert_array_equal(out[1], state[1][0])
    else:
        np.testing.assert_array_equal(out, state[0])


def test_variant_argument_errors():
    with pytest.raises(ValueError, match="reverse"):
        fg.LSTM(2, 3, reverse=True, bidirectional=True)
    with pytest.raises(ValueError, match="clip"):
        fg.GRU(2, 3, clip=0.0)
    with pytest.raises(ValueError, match="clip"):
        fg.LSTM(2, 3, clip=float("inf"))
    with pytest.raises(TypeError, match="clip"):
        fg.LSTM(2, 3, clip="1")
    with pytest.raises(TypeError, match="peephole"):
        fg.LSTM(2, 3, peephole=1)
    with pytest.raises(TypeError, match="reverse"):
        fg.GRU(2, 3, reverse="yes")
    with pytest.raises(TypeError):
        fg.GRU(2, 3, peephole=True)   # GRUs have no peepholes


def test_repr_names_the_variant():
    assert repr(fg.LSTM(2, 3, reverse=True, clip=1.5, peephole=True, input_forget=True)) == (
        "LSTM(2, 3, reverse=True, clip=1.5, peephole=True, input_forget=True, dtype=float32)")
    assert repr(fg.GRUCell(2, 3, clip=2)) == "GRUCell(2, 3, clip=2.0, dtype=float32)"
