"""Bad input is rejected in Python, naming the argument; odd but valid input works.

"Before compiled code runs" is checked by looking at the traceback: no frame
of the raised error may belong to Numba.
"""

import os

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastgates as fg
from _messages import names, raises

T, B, I, H = 4, 3, 3, 2
NUMBA_DIR = os.path.dirname(numba.__file__)


def check_rejected(excinfo):
    for entry in excinfo.traceback:
        assert not str(entry.path).startswith(NUMBA_DIR), "raised from inside Numba"


def make(kind, num_layers=1, bidirectional=False, dtype=np.float64, **kw):
    kw.update(num_layers=num_layers, bidirectional=bidirectional, dtype=dtype, seed=0)
    if kind == "lstm":
        return fg.LSTM(I, H, **kw)
    return fg.GRU(I, H, reset_after=kind == "gru", **kw)


def make_cell(kind, dtype=np.float64, **kw):
    if kind == "lstm":
        return fg.LSTMCell(I, H, dtype=dtype, seed=0, **kw)
    return fg.GRUCell(I, H, reset_after=kind == "gru", dtype=dtype, seed=0, **kw)


def zeros_state(kind, shape, dtype=np.float64):
    if kind == "lstm":
        return (np.zeros(shape, dtype), np.zeros(shape, dtype))
    return np.zeros(shape, dtype)


def good_x(dtype=np.float64):
    return np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)


kinds = pytest.mark.parametrize("kind", ["lstm", "gru", "gru_classic"])
calls = pytest.mark.parametrize("call", ["__call__", "vjp", "gates"])


def run(m, call, *args, **kw):
    return getattr(m, call)(*args, **kw)


# --------------------------------------------------------------------------
# x
# --------------------------------------------------------------------------


@kinds
@calls
@pytest.mark.parametrize(
    "shape", [(I,), (T, B, I, 1), (T, B, I + 1), (T, I + 1), (T, B, 0)], ids=str
)
def test_x_wrong_rank_or_size(kind, call, shape):
    with raises(ValueError, "x") as excinfo:
        run(make(kind), call, np.zeros(shape))
    check_rejected(excinfo)


@kinds
@calls
@pytest.mark.parametrize(
    "x",
    [
        np.zeros((T, B, I), dtype=np.int64),
        np.zeros((T, B, I), dtype=np.int32),
        np.zeros((T, B, I), dtype=np.complex128),
        np.zeros((T, B, I), dtype=bool),
        np.full((T, B, I), 0.5, dtype=object),
        np.full((T, B, I), "a"),
        [[["a"] * I] * B] * T,
    ],
    ids=["int64", "int32", "complex", "bool", "object", "str", "str-list"],
)
def test_x_wrong_dtype_is_type_error(kind, call, x):
    with raises(TypeError, "x") as excinfo:
        run(make(kind), call, x)
    check_rejected(excinfo)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(0, B, I), (T, 0, I), (0, I)], ids=str)
def test_empty_sequence_or_batch_rejected(kind, shape):
    with raises(ValueError, "x") as excinfo:
        make(kind)(np.zeros(shape))
    check_rejected(excinfo)


# --------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------

BAD_STATE_SHAPES = {
    "layers": (2, B, H),
    "batch": (1, B + 1, H),
    "hidden": (1, B, H + 1),
    "rank2": (B, H),
    "rank4": (1, 1, B, H),
}


@kinds
@calls
@pytest.mark.parametrize("bad", list(BAD_STATE_SHAPES))
def test_state_wrong_shape(kind, call, bad):
    m = make(kind)
    with raises(ValueError, "state") as excinfo:
        run(m, call, good_x(), zeros_state(kind, BAD_STATE_SHAPES[bad]))
    check_rejected(excinfo)


@kinds
def test_state_wrong_shape_bidirectional_two_layers(kind):
    m = make(kind, num_layers=2, bidirectional=True)
    with raises(ValueError, "state"):
        m(good_x(), zeros_state(kind, (2, B, H)))  # needs 4 = L * D
    m(good_x(), zeros_state(kind, (4, B, H)))


def test_lstm_state_must_be_pair():
    m = make("lstm")
    h = np.zeros((1, B, H))
    for state in [h, (h,), (h, h, h)]:
        with raises(TypeError, "state") as excinfo:
            m(good_x(), state)
        check_rejected(excinfo)


def test_lstm_state_only_one_bad():
    m = make("lstm")
    good, bad = np.zeros((1, B, H)), np.zeros((1, B, H + 1))
    for state in [(good, bad), (bad, good)]:
        with raises(ValueError, "state"):
            m(good_x(), state)


@pytest.mark.parametrize("kind", ["gru", "gru_classic"])
def test_gru_state_given_as_pair(kind):
    h = np.zeros((1, B, H))
    with raises(ValueError, "state"):           # a (2, 1, B, H) array: wrong rank
        make(kind)(good_x(), (h, h))


@kinds
@pytest.mark.parametrize("dtype", [np.int64, np.complex128, object], ids=str)
def test_state_wrong_dtype_is_type_error(kind, dtype):
    with raises(TypeError, "state") as excinfo:
        make(kind)(good_x(), zeros_state(kind, (1, B, H), dtype))
    check_rejected(excinfo)


@kinds
def test_unbatched_state_shape(kind):
    m = make(kind)
    x = np.zeros((T, I))
    m(x, zeros_state(kind, (1, H)))
    with raises(ValueError, "state"):
        m(x, zeros_state(kind, (1, 1, H)))


# --------------------------------------------------------------------------
# lengths
# --------------------------------------------------------------------------


@kinds
@calls
@pytest.mark.parametrize(
    "lengths, exc",
    [
        (np.array([1.0, 2.0, 3.0]), TypeError),      # docs/guarantees.md: TypeError
        (np.array([True, True, True]), TypeError),
        (np.array(["1", "2", "3"]), TypeError),
        (np.array([1, 0, 2]), ValueError),
        (np.array([1, -1, 2]), ValueError),
        (np.array([1, T + 1, 2]), ValueError),
        (np.array([1, 2]), ValueError),
        (np.array([1, 2, 3, 4]), ValueError),
        (np.array([[1, 2, 3]]), ValueError),
        (np.array(2), ValueError),
    ],
    ids=["float", "bool", "str", "zero", "negative", "gt-T", "short", "long", "2d", "scalar"],
)
def test_bad_lengths(kind, call, lengths, exc):
    with raises(exc, "lengths") as excinfo:
        run(make(kind), call, good_x(), None, lengths)
    check_rejected(excinfo)


@kinds
def test_lengths_with_unbatched_x(kind):
    with raises(ValueError, "lengths"):
        make(kind)(np.zeros((T, I)), None, np.array([T]))


@kinds
def test_lengths_batch_first(kind):
    m = make(kind, batch_first=True)
    x = np.zeros((B, T, I))
    m(x, None, np.array([1, T, 2]))
    with raises(ValueError, "lengths"):
        m(x, None, np.array([1, T + 1, 2]))


# --------------------------------------------------------------------------
# pullback arguments
# --------------------------------------------------------------------------


@kinds
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "shape_of",
    [
        lambda DH: (T, B, DH + 1),
        lambda DH: (T + 1, B, DH),
        lambda DH: (T, B + 1, DH),
        lambda DH: (T, DH),
        lambda DH: (T, B, DH, 1),
    ],
    ids=["hidden", "time", "batch", "rank2", "rank4"],
)
def test_pullback_dy_wrong_shape(kind, bidirectional, shape_of):
    m = make(kind, bidirectional=bidirectional)
    DH = (2 if bidirectional else 1) * H
    _, pullback = m.vjp(good_x())
    with raises(ValueError, "dy") as excinfo:
        pullback(np.zeros(shape_of(DH)))
    check_rejected(excinfo)


@kinds
def test_pullback_dy_wrong_dtype(kind):
    _, pullback = make(kind).vjp(good_x())
    with raises(TypeError, "dy"):
        pullback(np.zeros((T, B, H), dtype=np.complex128))


@kinds
@pytest.mark.parametrize("shape", [(2, B, H), (1, B + 1, H), (1, B, H + 1), (B, H)], ids=str)
def test_pullback_dstate_wrong_shape(kind, shape):
    _, pullback = make(kind).vjp(good_x())
    with raises(ValueError, "dstate") as excinfo:
        pullback(np.zeros((T, B, H)), zeros_state(kind, shape))
    check_rejected(excinfo)


def test_pullback_lstm_dstate_must_be_pair():
    _, pullback = make("lstm").vjp(good_x())
    dh = np.zeros((1, B, H))
    for dstate in [dh, (dh,), (dh, dh, dh)]:
        with raises(TypeError, "dstate"):
            pullback(np.zeros((T, B, H)), dstate)


# --------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------


@kinds
def test_load_state_dict_missing_key(kind):
    m = make(kind, num_layers=2)
    d = m.state_dict()
    del d["weight_hh_l1"]
    with raises(ValueError, "weight_hh_l1"):
        m.load_state_dict(d)


@kinds
def test_load_state_dict_unexpected_key(kind):
    m = make(kind)
    d = m.state_dict()
    d["weight_ih_l1"] = d["weight_ih_l0"]
    with raises(ValueError, "weight_ih_l1"):
        m.load_state_dict(d)


@kinds
def test_load_state_dict_wrong_shape(kind):
    m = make(kind, bidirectional=True)
    d = m.state_dict()
    d["bias_hh_l0_reverse"] = np.zeros(d["bias_hh_l0_reverse"].shape[0] + 1)
    with raises(ValueError, "bias_hh_l0_reverse"):
        m.load_state_dict(d)


@kinds
def test_load_state_dict_names_every_offending_key(kind):
    m = make(kind, num_layers=2)
    d = m.state_dict()
    del d["bias_ih_l0"]
    d["extra"] = np.zeros(1)
    d["weight_ih_l1"] = d["weight_ih_l1"].T
    with pytest.raises(ValueError) as excinfo:
        m.load_state_dict(d)
    for key in ["bias_ih_l0", "extra", "weight_ih_l1"]:
        assert names(str(excinfo.value), key), key


@kinds
def test_failed_load_state_dict_leaves_model_unchanged(kind):
    m = make(kind, num_layers=2)
    before = m.state_dict()
    d = {k: v + 1 for k, v in before.items()}
    d["weight_hh_l1"] = np.zeros((1, 1))
    with pytest.raises(ValueError):
        m.load_state_dict(d)
    after = m.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@kinds
def test_load_state_dict_takes_anything_asarray_takes(kind):
    # Nested lists and integer arrays are numbers too: cast to the model dtype.
    m = make(kind)
    d = {k: np.arange(v.size).reshape(v.shape) % 3 - 1 for k, v in m.state_dict().items()}
    d["weight_ih_l0"] = d["weight_ih_l0"].tolist()
    m.load_state_dict(d)
    for k, v in m.state_dict().items():
        assert v.dtype == m.dtype
        np.testing.assert_array_equal(v, np.asarray(d[k]), err_msg=k)


@kinds
@pytest.mark.parametrize("bad", [np.complex128, np.bool_, object])
def test_load_state_dict_rejects_non_real_values(kind, bad):
    m = make(kind)
    d = m.state_dict()
    d["weight_hh_l0"] = np.zeros(d["weight_hh_l0"].shape, dtype=bad)
    with raises(TypeError, "weight_hh_l0"):
        m.load_state_dict(d)


def test_load_state_dict_bias_free_model_rejects_bias():
    m = fg.LSTM(I, H, bias=False, dtype=np.float64)
    d = m.state_dict()
    assert not any(k.startswith("bias") for k in d)
    d["bias_ih_l0"] = np.zeros(4 * H)
    with raises(ValueError, "bias_ih_l0"):
        m.load_state_dict(d)


@pytest.mark.parametrize("cell_kind", ["lstm", "gru"])
def test_cell_load_state_dict_errors(cell_kind):
    cell = make_cell(cell_kind)
    d = cell.state_dict()
    assert set(d) == {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
    bad = dict(d, weight_hh=np.zeros((1, 1)))
    with raises(ValueError, "weight_hh"):
        cell.load_state_dict(bad)
    bad = {k: v for k, v in d.items() if k != "bias_ih"}
    with raises(ValueError, "bias_ih"):
        cell.load_state_dict(bad)


# --------------------------------------------------------------------------
# constructors
# --------------------------------------------------------------------------

CONSTRUCTORS = {
    "LSTM": lambda **kw: fg.LSTM(**{"input_size": I, "hidden_size": H, **kw}),
    "GRU": lambda **kw: fg.GRU(**{"input_size": I, "hidden_size": H, **kw}),
    "LSTMCell": lambda **kw: fg.LSTMCell(**{"input_size": I, "hidden_size": H, **kw}),
    "GRUCell": lambda **kw: fg.GRUCell(**{"input_size": I, "hidden_size": H, **kw}),
}
constructors = pytest.mark.parametrize("ctor", list(CONSTRUCTORS))


@constructors
@pytest.mark.parametrize("arg", ["input_size", "hidden_size"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "3", None], ids=repr)
def test_constructor_bad_sizes(ctor, arg, value):
    with raises(ValueError if isinstance(value, int) else TypeError, arg):
        CONSTRUCTORS[ctor](**{arg: value})


@pytest.mark.parametrize("ctor", ["LSTM", "GRU"])
@pytest.mark.parametrize("value", [0, -2, 1.5], ids=repr)
def test_constructor_bad_num_layers(ctor, value):
    with raises(ValueError if isinstance(value, int) else TypeError, "num_layers"):
        CONSTRUCTORS[ctor](num_layers=value)


@constructors
@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.float16, np.complex128, object, "int8"], ids=str
)
def test_constructor_bad_dtype(ctor, dtype):
    with raises(TypeError, "dtype"):
        CONSTRUCTORS[ctor](dtype=dtype)


@constructors
def test_constructor_accepts_numpy_integers_and_dtype_spellings(ctor):
    a = CONSTRUCTORS[ctor](input_size=np.int64(I), hidden_size=np.int32(H), dtype="float64", seed=3)
    b = CONSTRUCTORS[ctor](dtype=np.dtype(np.float64), seed=3)
    for k, v in a.state_dict().items():
        assert v.dtype == np.float64
        np.testing.assert_array_equal(v, b.state_dict()[k])


# --------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------

cell_kinds = pytest.mark.parametrize("kind", ["lstm", "gru", "gru_classic"])


@cell_kinds
@pytest.mark.parametrize("shape", [(B, I + 1), (I + 1,), (1, B, I), ()], ids=str)
def test_cell_x_wrong_shape(kind, shape):
    with raises(ValueError, "x") as excinfo:
        make_cell(kind)(np.zeros(shape), None)
    check_rejected(excinfo)


@cell_kinds
def test_cell_x_wrong_dtype(kind):
    with raises(TypeError, "x"):
        make_cell(kind)(np.zeros((B, I), dtype=np.int64), None)


@cell_kinds
@pytest.mark.parametrize("shape", [(B + 1, H), (B, H + 1), (1, B, H), (H,)], ids=str)
def test_cell_state_wrong_shape(kind, shape):
    with raises(ValueError, "state") as excinfo:
        make_cell(kind)(np.zeros((B, I)), zeros_state(kind, shape))
    check_rejected(excinfo)


@cell_kinds
@pytest.mark.parametrize("shape", [(B + 1, H), (B, H + 1), (H,)], ids=str)
def test_cell_pullback_dout_wrong_shape(kind, shape):
    cell = make_cell(kind)
    _, pullback = cell.vjp(np.zeros((B, I)), None)
    with raises(ValueError, "dout") as excinfo:
        pullback(zeros_state(kind, shape))
    check_rejected(excinfo)


def test_cell_lstm_dout_must_be_pair():
    _, pullback = make_cell("lstm").vjp(np.zeros((B, I)), None)
    for dout in [np.zeros((B, H)), (np.zeros((B, H)),)]:
        with raises(TypeError, "dout"):
            pullback(dout)


# --------------------------------------------------------------------------
# valid edge cases
# --------------------------------------------------------------------------


def _assert_same(a, b):
    if isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif isinstance(b, dict):
        assert a.keys() == b.keys()
        for k in b:
            _assert_same(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b, strict=True)


@kinds
@pytest.mark.parametrize(
    "model_dtype, x_dtype", [(np.float32, np.float64), (np.float64, np.float32)], ids=str
)
def test_other_float_dtype_is_cast_to_model_dtype(kind, model_dtype, x_dtype):
    m = make(kind, dtype=model_dtype)
    x = good_x(x_dtype)
    y, state = m(x)
    assert y.dtype == model_dtype
    for s in state if isinstance(state, tuple) else (state,):
        assert s.dtype == model_dtype
    _assert_same((y, state), m(x.astype(model_dtype)))
    (_, _), pullback = m.vjp(x)
    dx, dstate, dparams = pullback(np.ones(y.shape, dtype=x_dtype))
    assert dx.dtype == model_dtype
    for v in dparams.values():
        assert v.dtype == model_dtype


@kinds
def test_nested_list_input(kind):
    m = make(kind)
    x = good_x()
    _assert_same(m(x.tolist()), m(x))
    _assert_same(m(x.tolist(), None, [1, T, 2]), m(x, None, np.array([1, T, 2])))


@kinds
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed", "negative"])
def test_non_contiguous_input(kind, bidirectional, layout):
    m = make(kind, num_layers=2, bidirectional=bidirectional)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2 * T, B, 2 * I))
    x = {
        "fortran": np.asfortranarray(base[:T, :, :I]),
        "strided": base[::2, :, ::2],
        "transposed": np.ascontiguousarray(base[:T, :, :I].transpose(2, 1, 0)).transpose(2, 1, 0),
        "negative": base[T - 1 :: -1, ::-1, :I],
    }[layout]
    assert not x.flags.c_contiguous
    xc = np.ascontiguousarray(x)
    D = 2 if bidirectional else 1
    state_base = rng.standard_normal((B, 2 * D, 2 * H)).transpose(1, 0, 2)[:, :, ::2]
    state = (state_base, state_base[::-1]) if kind == "lstm" else state_base
    state_c = tuple(map(np.ascontiguousarray, state)) if kind == "lstm" else np.ascontiguousarray(state)
    lengths = np.array([T, 0, 1, 0, 2])[::2]  # non-contiguous view of [T, 1, 2]
    lengths_c = np.ascontiguousarray(lengths)

    _assert_same(m(x, state, lengths), m(xc, state_c, lengths_c))
    _assert_same(m.gates(x, state, lengths), m.gates(xc, state_c, lengths_c))
    dy = rng.standard_normal((2 * T, B, 2 * D * H))[::2, :, ::2]
    (_, _), pb = m.vjp(x, state, lengths)
    (_, _), pb_c = m.vjp(xc, state_c, lengths_c)
    _assert_same(pb(dy), pb_c(np.ascontiguousarray(dy)))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_batch_first_matches_time_major(kind):
    m = make(kind, bidirectional=True)
    mb = make(kind, bidirectional=True, batch_first=True)
    x = good_x()
    lengths = np.array([T, 1, 2])
    y, state = m(x, None, lengths)
    yb, state_b = mb(x.transpose(1, 0, 2), None, lengths)
    np.testing.assert_array_equal(yb, y.transpose(1, 0, 2))
    _assert_same(state_b, state)


# --------------------------------------------------------------------------
# issue 6: empty inputs, scalars, lengths kinds, huge sizes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@calls
@pytest.mark.parametrize("shape, what", [((0, B, I), "T >= 1"), ((T, 0, I), "B >= 1"), ((0, I), "T >= 1")],
                         ids=str)
def test_empty_time_or_batch_message(kind, call, shape, what):
    with pytest.raises(ValueError, match=rf"^x must have at least one .*\({what}\)") as excinfo:
        run(make(kind), call, np.zeros(shape))
    check_rejected(excinfo)


@kinds
@pytest.mark.parametrize("x", [np.float64(1.0), 1.0, np.array(1.0)], ids=["np-scalar", "float", "0d"])
def test_scalar_x_is_rejected_by_rank(kind, x):
    with raises(ValueError, "x") as excinfo:
        make(kind)(x)
    assert "0-D" in str(excinfo.value)


@kinds
@pytest.mark.parametrize(
    "lengths",
    [np.array([1, 2, 3], dtype=object), np.array([np.nan, 1.0, 2.0]), [1.0, 2.0, 3.0], [True, False, True],
     [[1, 2], [3]], np.array(["1", "2", "3"])],
    ids=["object", "nan", "float-list", "bool-list", "ragged", "str"])
def test_lengths_must_be_integers(kind, lengths):
    # docs/guarantees.md: TypeError for every kind but ragged lists (ValueError)
    with raises(ValueError if isinstance(lengths, list) and lengths == [[1, 2], [3]] else TypeError,
                "lengths"):
        make(kind)(good_x(), None, lengths)


@constructors
@pytest.mark.parametrize("value", [2**31, 10**30, 2**63], ids=str)
def test_constructor_huge_sizes(ctor, value):
    with raises(ValueError, "hidden_size"):
        CONSTRUCTORS[ctor](hidden_size=value)


def test_constructor_too_many_parameters():
    with raises(ValueError, "parameters"):
        fg.LSTM(2**20, 2**20)


@kinds
def test_check_finite_must_be_bool(kind):
    with raises(TypeError, "check_finite"):
        make(kind)(good_x(), check_finite="yes")


# -- the compiled scan behind check_finite ----------------------------------

@settings(max_examples=150, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]))
def test_finite_scan_agrees_with_numpy(data, dtype):
    from fastgates._validate import all_finite

    width = 32 if dtype == np.float32 else 64
    arr = data.draw(hnp.arrays(dtype, st.integers(0, 200),
                               elements=st.floats(width=width, allow_nan=True, allow_infinity=True)))
    arr.flags.writeable = data.draw(st.booleans())
    assert all_finite(arr) == bool(np.isfinite(arr).all())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_finite_scan_finds_one_bad_value_anywhere(dtype, bad):
    from fastgates._validate import all_finite

    big = np.finfo(dtype).max
    arr = np.array([big, -big, np.finfo(dtype).tiny, 0.0] * 9, dtype=dtype)
    assert all_finite(arr)
    for k in range(arr.size):
        planted = arr.copy()
        planted[k] = bad
        assert not all_finite(planted)


# --------------------------------------------------------------------------
# docs/guarantees.md: TypeError for a value of the wrong kind, at every entry point
# --------------------------------------------------------------------------
#
# "raises only TypeError (a value of the wrong kind: None where an array is
# needed, booleans, complex numbers, objects, strings, datetimes, integer x)
# or ValueError (wrong rank or size, ...)": each kind, at each argument that
# needs an array, must be TypeError (not ValueError), naming the argument.

WRONG_KINDS = {
    "None": lambda shape: None,
    "bool": lambda shape: np.ones(shape, bool),
    "complex": lambda shape: np.ones(shape, complex),
    "object": lambda shape: np.full(shape, 0.5, dtype=object),
    "str": lambda shape: np.full(shape, "ab"),
    "datetime": lambda shape: np.full(shape, np.datetime64("2024-01-01")),
    "int": lambda shape: np.ones(shape, np.int64),
}


def _entry_points():
    """``(name, argument named in the message, shape, call, integers refused)``.

    Integers are refused where the docstrings say so (a model's ``x``, a
    prediction, logits, ``clip_grad_norm``'s gradients), else cast.
    """
    f64 = np.float64
    m, gru = make("lstm"), make("gru")
    cell = make_cell("gru")
    lin = fg.Linear(I, 2, dtype=f64, seed=0)
    readout = fg.Readout(make("gru"), fg.Linear(H, 2, dtype=f64, seed=0))
    grads = {k: np.zeros_like(v) for k, v in gru.state_dict().items()}
    w_shape = gru.weight_hh_l0.shape
    return [
        ("LSTM.__call__", "x", (T, B, I), lambda v: m(v), True),
        ("LSTM.vjp", "x", (T, B, I), lambda v: m.vjp(v), True),
        ("GRU.gates", "x", (T, B, I), lambda v: gru.gates(v), True),
        ("GRUCell.vjp", "x", (B, I), lambda v: cell.vjp(v), True),
        ("Linear.__call__", "x", (B, I), lambda v: lin(v), True),
        ("Readout.vjp", "x", (T, B, I), lambda v: readout.vjp(v), True),
        ("gate_summary", "x", (T, B, I), lambda v: fg.gate_summary(gru, v), True),
        ("load_state_dict", "weight_hh_l0", w_shape,
         lambda v: gru.load_state_dict(dict(gru.state_dict(), weight_hh_l0=v)), False),
        ("set_flat_params", "v", (gru.num_params,), lambda v: gru.set_flat_params(v), False),
        ("flatten_params", "weight_hh_l0", w_shape,
         lambda v: fg.flatten_params(gru, dict(gru.state_dict(), weight_hh_l0=v)), False),
        ("mse_loss", "pred", (4, 2), lambda v: fg.mse_loss(v, np.zeros((4, 2))), True),
        ("mse_loss", "target", (4, 2), lambda v: fg.mse_loss(np.zeros((4, 2)), v), False),
        ("cross_entropy_loss", "logits", (4, 3),
         lambda v: fg.cross_entropy_loss(v, np.zeros(4, int)), True),
        ("Adam.step", "weight_hh_l0", w_shape,
         lambda v: fg.Adam(gru).step(dict(grads, weight_hh_l0=v)), False),
        ("clip_grad_norm", "weight_hh_l0", w_shape,
         lambda v: fg.clip_grad_norm(dict(grads, weight_hh_l0=v), 1.0), True),
    ]


@pytest.mark.parametrize("kind", list(WRONG_KINDS))
def test_wrong_kind_of_value_is_type_error_naming_the_argument(kind):
    for entry, name, shape, call, ints_refused in _entry_points():
        if kind == "int" and not ints_refused:
            continue                      # integers are numbers: cast, as NumPy would
        with raises(TypeError, name) as excinfo:
            call(WRONG_KINDS[kind](shape))
        check_rejected(excinfo)


@constructors
@pytest.mark.parametrize("arg", ["input_size", "hidden_size", "seed"])
@pytest.mark.parametrize("value", [True, 2.5, "3", None, 1j, object(), np.ones(2, int)], ids=repr)
def test_constructor_wrong_kind_is_type_error(ctor, arg, value):
    if arg == "seed" and value is None:
        CONSTRUCTORS[ctor](seed=None)      # None: a fresh, unseeded generator
        return
    with raises(TypeError, arg):
        CONSTRUCTORS[ctor](**{arg: value})


@constructors
@pytest.mark.parametrize("value", [-1, 2**31], ids=repr)
def test_constructor_seed_out_of_range_is_value_error(ctor, value):
    if value > 0:
        CONSTRUCTORS[ctor](seed=value)     # any size of non-negative integer seeds
        return
    with raises(ValueError, "seed"):
        CONSTRUCTORS[ctor](seed=value)
