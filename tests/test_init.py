"""The initialisers of ``fastgates.init``: the property that defines each one.

For random models (LSTM, GRU and their cells; stacked, bidirectional, with or
without bias, peepholes, a coupled forget gate; float32 and float64):
shapes, names and dtypes are kept and the same seed gives the same
parameters; each scheme's own property holds (bounds of the uniform draws,
``Q^T Q = gain^2 I`` per gate block, the exact effective forget bias, the
chrono range and ``b_i = -b_f``); argument errors name the argument.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastgates as fg
from _tolerances import tol
from fastgates import init

DTYPES = [np.float32, np.float64]
SEEDED = ["pytorch_default", "xavier_uniform", "orthogonal", "chrono"]


@st.composite
def model_case(draw, kinds=("LSTM", "GRU", "JANET", "MGU", "LSTMCell", "GRUCell"), bias=None):
    kind = draw(st.sampled_from(kinds))
    I = draw(st.integers(1, 6))
    H = draw(st.integers(1, 6))
    options = {"dtype": draw(st.sampled_from(DTYPES)), "seed": draw(st.integers(0, 2**16)),
               "bias": draw(st.booleans()) if bias is None else bias}
    if not kind.endswith("Cell"):
        options["bidirectional"] = draw(st.booleans())
        args = (I, H, draw(st.integers(1, 3)))
    else:
        args = (I, H)
    if kind.startswith("LSTM"):
        options["peephole"] = draw(st.booleans())
        options["input_forget"] = draw(st.booleans())
    elif kind.startswith("GRU") and draw(st.booleans()):
        options["reset_after"] = False
    return getattr(fg, kind)(*args, **options)


def apply(name, model, seed=0):
    if name == "forget_bias":
        return init.forget_bias(model, 1.5)
    if name == "chrono":
        return init.chrono(model, 20.0, seed=seed)
    return getattr(init, name)(model, seed=seed)


def cases_for(name):
    """Models an initialiser applies to: the forget-gate ones need biases."""
    if name in ("forget_bias", "chrono"):
        return model_case(bias=True)
    return model_case()


def suffixes(model):
    return [k[len("weight_ih"):] for k in model.state_dict() if k.startswith("weight_ih")]


def gate_blocks(w, H):
    return [w[j * H:(j + 1) * H] for j in range(w.shape[0] // H)]


@pytest.mark.parametrize("name", SEEDED + ["forget_bias"])
@given(data=st.data())
def test_keeps_names_shapes_and_dtypes(name, data):
    model = data.draw(cases_for(name))
    before = model.state_dict()
    assert apply(name, model) is model
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in after.items():
        assert value.shape == before[key].shape and value.dtype == before[key].dtype, key
        assert np.all(np.isfinite(value)), key


@pytest.mark.parametrize("name", SEEDED)
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_parameters_other_seed_other_parameters(name, data, seed):
    model = data.draw(cases_for(name))
    start = model.state_dict()
    first = apply(name, model, seed).state_dict()
    # From other starting parameters: pytorch_default, xavier_uniform and
    # orthogonal depend on the seed alone; chrono keeps what it does not set.
    model.load_state_dict({k: v + 1 for k, v in start.items()} if name != "chrono" else start)
    second = apply(name, model, seed).state_dict()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    other = apply(name, model, seed + 1).state_dict()
    assert any(not np.array_equal(first[k], other[k]) for k in first if k.startswith("bias_ih")
               or name != "chrono")


@given(model=model_case())
def test_pytorch_default_bounds_and_constructor_equality(model):
    init.pytorch_default(model, seed=123)
    bound = 1 / np.sqrt(model.hidden_size)
    for key, value in model.state_dict().items():
        assert np.all(np.abs(value.astype(np.float64)) <= bound * (1 + 1e-6)), key
    # The constructor's default initialisation is this function.
    fresh = {k: v.copy() for k, v in model.state_dict().items()}
    twin_seed = 7
    init.pytorch_default(model, seed=twin_seed)
    assert not all(np.array_equal(fresh[k], v) for k, v in model.state_dict().items())
    kwargs = {"dtype": model.dtype, "seed": twin_seed, "bias": model.bias}
    cls = type(model)
    if cls in (fg.LSTM, fg.GRU):
        twin = cls(model.input_size, model.hidden_size, model.num_layers,
                   bidirectional=model.bidirectional, **kwargs,
                   **({"peephole": model.peephole} if cls is fg.LSTM else {}))
    else:
        twin = cls(model.input_size, model.hidden_size, **kwargs,
                   **({"peephole": model.peephole} if cls is fg.LSTMCell else {}))
    for key, value in twin.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=key)


def xavier_bound(block, gain):
    fan_out, fan_in = block.shape
    return gain * np.sqrt(6.0 / (fan_in + fan_out))


@given(model=model_case(), gain=st.floats(0.1, 4.0))
def test_xavier_uniform_bounds_per_gate_block(model, gain):
    init.xavier_uniform(model, seed=1, gain=gain)
    H = model.hidden_size
    for key, value in model.state_dict().items():
        if key.startswith("weight"):
            for j, block in enumerate(gate_blocks(value.astype(np.float64), H)):
                bound = xavier_bound(block, gain)
                assert np.all(np.abs(block) <= bound * (1 + 1e-6)), (key, j)
        else:  # biases and peepholes
            assert np.all(value == 0), key


@pytest.mark.parametrize("cls", [fg.LSTM, fg.GRU])
def test_xavier_uniform_fills_each_block_range(cls):
    # Each gate block spans its own bound sqrt(6 / (fan_in + H)) with the
    # variance of a uniform draw on it, bound^2 / 3: the scale is per block,
    # not that of the stacked matrix (fan_out = G*H would give a smaller one).
    gain = 1.3
    m = init.xavier_uniform(cls(40, 24, bidirectional=True, dtype=np.float64), seed=5, gain=gain)
    for key, value in m.state_dict().items():
        if key.startswith("weight"):
            for block in gate_blocks(value, 24):
                bound = xavier_bound(block, gain)
                assert np.max(np.abs(block)) > 0.95 * bound, key
                assert abs(np.var(block) / (bound**2 / 3) - 1) < 0.2, key


@given(model=model_case(), gain=st.floats(0.1, 4.0), input_gain=st.floats(0.1, 4.0))
def test_orthogonal_recurrent_blocks(model, gain, input_gain):
    init.orthogonal(model, seed=2, gain=gain, input_gain=input_gain)
    H = model.hidden_size
    rtol = tol(model.dtype)["rtol"]
    seen = []
    for key, value in model.state_dict().items():
        value = value.astype(np.float64)
        if key.startswith("weight_hh"):
            for block in gate_blocks(value, H):
                np.testing.assert_allclose(block.T @ block, gain**2 * np.eye(H), rtol=0,
                                           atol=10 * rtol * gain**2, err_msg=key)
                seen.append(block)
        elif key.startswith("weight_ih"):
            for block in gate_blocks(value, H):
                assert np.all(np.abs(block) <= xavier_bound(block, input_gain) * (1 + 1e-6)), key
        else:
            assert np.all(value == 0), key
    # Blocks are drawn independently (H = 1 leaves only +-gain to choose from).
    if H > 1:
        assert all(not np.allclose(a, b) for i, a in enumerate(seen) for b in seen[:i])


def memory_rows(model):
    """The rows of the gate that keeps the state, and the sign of its bias (-1: keeps 1 - gate)."""
    spec, H = model._spec, model.hidden_size
    k = spec.gates.index(spec.forget)
    return slice(k * H, (k + 1) * H), (-1 if spec.forget_complement else 1)


@given(model=model_case(bias=True), value=st.floats(-8.0, 8.0, allow_subnormal=False))
def test_forget_bias_sets_the_effective_forget_bias_exactly(model, value):
    before = model.state_dict()
    init.forget_bias(model, value)
    after = model.state_dict()
    H = model.hidden_size
    rows, sign = memory_rows(model)
    expected = np.asarray(sign * value, dtype=model.dtype)
    changed = [(rows, expected)]
    if getattr(model, "input_forget", False):
        changed.append((slice(0, H), -expected))
    for s in suffixes(model):
        b_ih, b_hh = after["bias_ih" + s], after["bias_hh" + s]
        for r, want in changed:
            assert np.all(b_ih[r] + b_hh[r] == want), s
        untouched = np.ones(b_ih.shape[0], bool)
        for r, _ in changed:
            untouched[r] = False
        np.testing.assert_array_equal(b_ih[untouched], before["bias_ih" + s][untouched])
        np.testing.assert_array_equal(b_hh[untouched], before["bias_hh" + s][untouched])
    for key in after:
        if not key.startswith("bias"):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


@pytest.mark.parametrize("input_forget", [False, True])
def test_forget_bias_sets_the_forget_gate(input_forget):
    # With zero weights the forget gate is sigmoid(effective bias) exactly,
    # also when it is coupled to the input gate (f = 1 - i).
    m = fg.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=np.float64, seed=0, input_forget=input_forget)
    m.load_state_dict({k: np.zeros_like(v) for k, v in m.state_dict().items()})
    init.forget_bias(m, 2.0)
    f = m.gates(np.random.default_rng(0).standard_normal((4, 2, 3)))["f"]
    np.testing.assert_allclose(f, 1 / (1 + np.exp(-2.0)), **tol(np.float64))


@given(model=model_case(bias=True), t_max=st.floats(2.001, 1e5), seed=st.integers(0, 2**16))
def test_chrono_range_and_input_bias_minus_forget_bias(model, t_max, seed):
    before = model.state_dict()
    init.chrono(model, t_max, seed=seed)
    after = model.state_dict()
    H = model.hidden_size
    rows, sign = memory_rows(model)
    has_input = model._spec.input_gate is not None     # an LSTM's i
    upper = np.log(t_max - 1)
    slack = 4 * np.finfo(model.dtype).eps * max(upper, 1)  # rounding to the dtype
    for s in suffixes(model):
        b = (after["bias_ih" + s] + after["bias_hh" + s]).astype(np.float64)
        b_f = sign * b[rows]
        assert np.all(b_f >= 0) and np.all(b_f <= upper + slack), (s, b_f, upper)
        untouched = np.ones(b.shape[0], bool)
        untouched[rows] = False
        if has_input:
            np.testing.assert_array_equal(b[:H], -b_f)
            untouched[:H] = False
        for key in ("bias_ih", "bias_hh"):  # the other gates unchanged
            np.testing.assert_array_equal(after[key + s][untouched], before[key + s][untouched])
    for key in after:
        if not key.startswith("bias"):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_chrono_spreads_forget_biases_over_the_whole_range():
    # exp(b_f) is uniform on [1, t_max - 1]: it reaches both ends and its
    # mean is the middle (standard error 28.3 / sqrt(2 * 256) = 1.25).
    t_max = 100.0
    m = init.chrono(fg.LSTM(2, 256, bidirectional=True, dtype=np.float64), t_max, seed=3)
    u = np.exp(np.concatenate([m.bias_ih_l0[256:512], m.bias_ih_l0_reverse[256:512]]))
    assert u.min() < 1 + 0.02 * (t_max - 2) and u.max() > t_max - 1 - 0.02 * (t_max - 2)
    assert abs(u.mean() - t_max / 2) < 5


@pytest.mark.parametrize("function", [init.forget_bias, lambda m: init.chrono(m, 10.0)])
def test_forget_gate_initialisers_need_biases(function):
    with pytest.raises(ValueError, match="bias=False"):
        function(fg.LSTM(2, 3, bias=False))


@pytest.mark.parametrize("t_max", [2, 2.0, 1.5, -3, float("inf"), float("nan")])
def test_chrono_checks_t_max(t_max):
    with pytest.raises(ValueError, match="t_max"):
        init.chrono(fg.LSTM(2, 3), t_max)


@pytest.mark.parametrize("call, error, match", [
    (lambda: init.chrono(fg.LSTM(2, 3), "10"), TypeError, "t_max must be a real number"),
    (lambda: init.forget_bias(fg.LSTM(2, 3), float("nan")), ValueError, "value must be finite"),
    (lambda: init.xavier_uniform(fg.LSTM(2, 3), gain=0), ValueError, "gain must be > 0"),
    (lambda: init.orthogonal(fg.GRU(2, 3), gain=-1.0), ValueError, "gain must be > 0"),
    (lambda: init.orthogonal(fg.GRU(2, 3), input_gain=True), TypeError, "input_gain"),
    (lambda: init.pytorch_default(fg.GRU(2, 3), seed="abc"), TypeError, "seed must be"),
    (lambda: init.pytorch_default(fg.GRU(2, 3), seed=-1), ValueError, "seed must be"),
    (lambda: init.orthogonal({"weight_hh_l0": np.zeros((12, 3))}), TypeError,
     "model must be a fastgates recurrent model"),
])
def test_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
