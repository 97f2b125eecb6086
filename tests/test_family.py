"""The forget-gate family beyond LSTM and GRU: JANET and the minimal gated unit.

Each against its line-by-line NumPy reference (``tests/reference.py``) in
both dtypes, with every layer option; every gradient against central
differences in float64; the layer contract (save/load, flat parameters,
gate analysis, initialisers).  The invariants Hypothesis checks for every
cell (gates in range, saturated forget gates, padding, splitting,
checkpointing) are in ``test_properties.py`` and ``test_long.py``, which
draw these cells too.
"""

import os

import numpy as np
import pytest

import fastgates as fg
import reference as ref
from _bitwise import assert_bitwise
from _tolerances import assert_close
from test_gradcheck import check_layer_gradients

CELLS = {
    "janet": (fg.JANET, ref.reference_janet),
    "mgu": (fg.MGU, ref.reference_mgu),
}

# (T, B, I, H, options, with_state, lengths): a plain layer; a stacked
# bidirectional one with lengths and an initial state; one reversed without
# biases; sizes that cut the batch into several chunks and the units into
# several column blocks, and make the input projection before the kernel.
CASES = {
    "plain": (5, 3, 4, 6, {}, False, None),
    "stacked_bi_lengths": (7, 4, 3, 5, {"num_layers": 2, "bidirectional": True}, True,
                           [7, 2, 5, 1]),
    "reverse_nobias": (6, 2, 3, 4, {"reverse": True, "bias": False}, True, [6, 3]),
    "chunks_blocks": (4, 70, 40, 72, {"num_layers": 2}, True, None),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_reference(cell, case, dtype):
    T, B, I, H, options, with_state, lengths = CASES[case]
    cls, reference = CELLS[cell]
    m = cls(I, H, dtype=dtype, seed=2, **options)
    rng = np.random.default_rng([len(case), T, B])
    x = rng.standard_normal((T, B, I))
    num = m.num_layers * m.num_directions
    h0 = rng.standard_normal((num, B, H)) if with_state else None
    y, h = m(x, h0, lengths)
    gates = m.gates(x, h0, lengths)
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    yr, hr, gr = reference(x.astype(dtype).astype(np.float64), params, m.num_layers,
                           m.bidirectional, None if h0 is None else h0.astype(dtype).astype(np.float64),
                           lengths, reverse=m.reverse)
    assert_close(y, yr, dtype, "y")
    assert_close(h, hr, dtype, "h")
    assert set(gates) == set(gr)
    for k in gr:
        assert_close(gates[k], gr[k], dtype, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta", [0.0, 2.5, -1.0])
def test_janet_beta_matches_reference(beta, dtype):
    m = fg.JANET(3, 4, num_layers=2, bidirectional=True, beta=beta, dtype=dtype, seed=4)
    x = np.random.default_rng(5).standard_normal((6, 2, 3))
    y, h = m(x, lengths=[6, 4])
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    yr, hr, _ = ref.reference_janet(x.astype(dtype).astype(np.float64), params, 2, True,
                                    lengths=[6, 4], beta=beta)
    assert_close(y, yr, dtype, "y")
    assert_close(h, hr, dtype, "h")


def test_janet_with_beta_zero_is_the_coupled_interpolation():
    # beta = 0: h' = f h + (1 - f) n, an MGU-like convex combination
    m = fg.JANET(2, 3, beta=0.0, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 2))
    y, _ = m(x)
    g = m.gates(x)
    h = np.zeros((2, 3))
    for t in range(5):
        h = g["f"][0, t] * h + (1 - g["f"][0, t]) * g["n"][0, t]
        np.testing.assert_allclose(y[t], h, rtol=1e-14, atol=1e-15)


# (cell, options): every gradient against central differences in float64
GRADIENT_CASES = [
    ("janet", {"num_layers": 2, "bidirectional": True}),
    ("janet", {"beta": 2.5, "bias": False, "reverse": True}),
    ("mgu", {"num_layers": 2, "bidirectional": True}),
    ("mgu", {"bias": False, "reverse": True}),
]


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell, options", GRADIENT_CASES,
                         ids=[f"{c}-{'-'.join(o)}" for c, o in GRADIENT_CASES])
def test_gradients_match_finite_differences(cell, options, use_lengths):
    cls, _ = CELLS[cell]
    m = cls(2, 2, dtype=np.float64, seed=7, **options)
    rng = np.random.default_rng([len(options), int(use_lengths), len(cell)])
    check_layer_gradients(m, cell, rng, use_lengths)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_changes_no_bit(cell, dtype):
    # B = 64: blocks of 16 steps, so an interval of 16 cuts 50 steps in 4
    # segments; two layers, both directions, lengths.
    cls, _ = CELLS[cell]
    m = cls(3, 5, num_layers=2, bidirectional=True, dtype=dtype, seed=3)
    rng = np.random.default_rng(6)
    T, B = 50, 64
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    dy = rng.standard_normal((T, B, 10)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    (y, h), pullback = m.vjp(x, lengths=lengths)
    (yk, hk), pullback_k = m.vjp(x, lengths=lengths, checkpoint=16)
    assert_bitwise((yk, hk, pullback_k(dy)), (y, h, pullback(dy)))


@pytest.mark.parametrize("cell", list(CELLS))
def test_save_load_and_flat_parameters(cell, tmp_path):
    cls, _ = CELLS[cell]
    options = {"beta": 0.5} if cell == "janet" else {}
    m = cls(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0, **options)
    path = tmp_path / "model.npz"
    fg.save(m, path)
    back = fg.load(path)
    assert type(back) is cls and repr(back) == repr(m)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    assert_bitwise(back(x), m(x))
    v = m.get_flat_params()
    assert v.shape == (m.num_params,)
    other = cls(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=9, **options)
    other.set_flat_params(v)
    assert_bitwise(other(x), m(x))
    _, pullback = m.vjp(x)
    _, _, dparams = pullback(np.ones((5, 2, 8)))
    assert fg.flatten_params(m, dparams).shape == v.shape


def test_gate_analysis_reads_each_cells_memory():
    # JANET's memory is its forget gate f; an MGU's is 1 - f.
    x = np.random.default_rng(0).standard_normal((30, 4, 2))
    for cls, memory in ((fg.JANET, lambda f: f), (fg.MGU, lambda f: 1 - f)):
        m = cls(2, 3, dtype=np.float64, seed=0)
        s = fg.gate_summary(m, x)
        f = m.gates(x)["f"]
        np.testing.assert_allclose(s.mean, memory(f).mean(axis=(1, 2)), rtol=1e-12)
        np.testing.assert_allclose(s.timescale, fg.timescale(s.mean))


@pytest.mark.parametrize("cell", list(CELLS))
def test_forget_bias_sets_the_memory_at_zero_input(cell):
    # With zero weights and state, each cell keeps sigmoid(value) of its state.
    cls, _ = CELLS[cell]
    m = cls(2, 3, dtype=np.float64, seed=0)
    sd = {k: (np.zeros_like(v) if k.startswith("weight") else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    fg.init.forget_bias(m, 2.0)
    f = m.gates(np.zeros((1, 1, 2)))["f"]
    memory = f if cell == "janet" else 1 - f
    np.testing.assert_allclose(memory, 1 / (1 + np.exp(-2.0)), rtol=1e-14)


def test_janet_chrono_spreads_the_forget_biases():
    # The paper's initialisation: b_f = log(U[1, t_max - 1]) in every layer
    # and direction, the candidate's bias untouched.
    m = fg.JANET(2, 200, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    before = m.state_dict()
    fg.init.chrono(m, 50.0, seed=1)
    H = m.hidden_size
    for k, v in m.state_dict().items():
        if k.startswith("bias_ih"):
            assert np.all((0 <= v[:H]) & (v[:H] <= np.log(49.0)))
            assert v[:H].max() > np.log(40.0) and v[:H].min() < np.log(3.0)
            np.testing.assert_array_equal(v[H:], before[k][H:])
        elif k.startswith("bias_hh"):
            np.testing.assert_array_equal(v[:H], 0)
            np.testing.assert_array_equal(v[H:], before[k][H:])
        else:
            np.testing.assert_array_equal(v, before[k])


@pytest.mark.parametrize("cell", list(CELLS))
def test_bad_arguments_are_named(cell):
    cls, _ = CELLS[cell]
    with pytest.raises(ValueError, match="hidden_size"):
        cls(3, 0)
    m = cls(3, 4)
    with pytest.raises(ValueError, match="input_size=3"):
        m(np.zeros((2, 1, 5)))
    with pytest.raises(ValueError, match="state"):
        m(np.zeros((2, 1, 3)), (np.zeros((1, 1, 4)), np.zeros((1, 1, 4))))


def test_janet_beta_must_be_a_finite_number():
    with pytest.raises(TypeError, match="beta"):
        fg.JANET(2, 3, beta="1")
    with pytest.raises(ValueError, match="beta"):
        fg.JANET(2, 3, beta=np.inf)


@pytest.mark.parametrize("cell", list(CELLS))
def test_converters_refuse_a_cell_they_have_no_layer_for(cell):
    cls, _ = CELLS[cell]
    m = cls(2, 3)
    label = m._spec.label
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match=f"torch.nn has no {label} layer"):
        fg.to_torch(m)
    pytest.importorskip("onnx")
    with pytest.raises(TypeError, match=f"ONNX has no {label} layer"):
        fg.to_onnx(m)
    os.environ.setdefault("KERAS_BACKEND", "torch")    # as test_interop_keras
    pytest.importorskip("keras")
    with pytest.raises(TypeError, match=f"Keras has no {label} layer"):
        fg.to_keras(m)


@pytest.mark.parametrize("cell", list(CELLS))
def test_readout_and_scipy_objective_take_every_cell(cell):
    cls, _ = CELLS[cell]
    rnn = cls(2, 3, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    model = fg.Readout(rnn, fg.Linear(6, 1, dtype=np.float64, seed=1))
    rng = np.random.default_rng(0)
    x, target = rng.standard_normal((5, 4, 2)), rng.standard_normal((4, 1))
    fun = fg.scipy_objective(model, "mse", x, target, lengths=[5, 2, 3, 1])
    v = model.get_flat_params()
    loss, grad = fun(v)
    assert np.isfinite(loss) and grad.shape == v.shape
    # a central difference along the gradient agrees with its norm
    step = 1e-6 * grad / np.linalg.norm(grad)
    slope = (fun(v + step)[0] - fun(v - step)[0]) / (2e-6)
    np.testing.assert_allclose(slope, np.linalg.norm(grad), rtol=1e-6)
