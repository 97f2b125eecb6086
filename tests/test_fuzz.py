"""Malformed arguments at every public entry point: only ValueError or TypeError.

Each test draws every argument of one entry point either valid or malformed
(wrong rank or size, every dtype kind, None, scalars, ragged nested lists,
huge or negative sizes, NaN lengths, batches that disagree, state tuples of
the wrong structure) and calls it.  Accepted outcomes:

- ``ValueError`` or ``TypeError`` whose message names one of the arguments
  as a word (``tests/_messages.py``),
  raised before any compiled code runs (no traceback frame inside Numba, and
  not a Numba typing error, which subclasses ``TypeError``);
- success, with results of the model's dtype and the shapes the arguments
  ask for.

Anything else (another exception, a crash, a wrong shape) fails.  Examples
are bounded (``FUZZ``) so that the file runs in seconds.
"""

import os

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgates as fg
from _messages import names as word_in

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
NUMBA_DIR = os.path.dirname(numba.__file__)

T, B, I, H = 3, 2, 3, 2

# -- malformed values --------------------------------------------------------

DTYPES = [np.float32, np.float64, ">f8", "<f4", np.float16, np.int64, np.uint8, np.bool_,
          np.complex128, object, "U3", "datetime64[s]", "timedelta64[s]"]


def _array(shape, dtype):
    if np.dtype(dtype).kind in "Mm":
        return np.zeros(shape, dtype=dtype)
    if np.dtype(dtype).kind == "U":
        return np.full(shape, "ab", dtype=dtype)
    return np.ones(shape).astype(dtype)


@st.composite
def arrays_near(draw, shape):
    """Arrays of the right shape in a wrong dtype, a near shape, extreme values or awkward layouts."""
    shape = tuple(shape)
    kind = draw(st.sampled_from(["dtype", "size", "rank", "empty", "extreme", "layout"]))
    if kind == "dtype":
        return _array(shape, draw(st.sampled_from(DTYPES)))
    if kind == "size" and shape:
        axis = draw(st.integers(0, len(shape) - 1))
        s = list(shape)
        s[axis] = draw(st.sampled_from([0, s[axis] + 1, max(s[axis] - 1, 0)]))
        return np.ones(s)
    if kind == "rank":
        return np.ones(draw(st.sampled_from([shape[1:], shape + (1,), (1,) + shape, ()])))
    if kind == "empty":
        return np.ones((0,) * max(len(shape), 1))
    if kind == "extreme":
        return np.full(shape, draw(st.sampled_from([1e308, -1e308, np.nan, np.inf])))
    big = np.ones(tuple(2 * n for n in shape))            # a negative-stride view
    return big[tuple(slice(None, None, -2) for _ in shape)]


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(),
    st.text(max_size=3),
    st.just([[1.0, 2.0], [3.0]]),                     # ragged
    st.just([["a", 1.0]]),
    st.just({"a": 1}),
    st.just(object()),
    st.builds(lambda s, d: _array(s, d),
              st.lists(st.integers(0, 4), max_size=4).map(tuple), st.sampled_from(DTYPES)),
)


def maybe(valid, near=None):
    """The valid value, a near miss, or junk."""
    options = [st.just(valid), JUNK]
    if near is not None:
        options.append(near)
    return st.one_of(*options)


# -- outcome check -----------------------------------------------------------


def call_ok(fn, names, *args, **kwargs):
    """Call ``fn``; return the result or None when it refused the input properly."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert not isinstance(exc, numba.core.errors.NumbaError), f"Numba error: {exc}"
        tb = exc.__traceback__
        while tb is not None:
            assert not tb.tb_frame.f_code.co_filename.startswith(NUMBA_DIR), f"raised inside Numba: {exc!r}"
            tb = tb.tb_next
        message = str(exc)
        assert any(word_in(message, name) for name in names), f"message names none of {names}: {message}"
        return None


def assert_array(a, dtype, shape):
    assert isinstance(a, np.ndarray), type(a)
    assert a.dtype == dtype, (a.dtype, dtype)
    assert a.shape == tuple(shape), (a.shape, shape)


# -- models ------------------------------------------------------------------

MODELS = {
    "lstm": fg.LSTM(I, H, dtype=np.float64, seed=0),
    "gru": fg.GRU(I, H, bidirectional=True, batch_first=True, dtype=np.float32, seed=0),
}
CELLS = {"lstm": fg.LSTMCell(I, H, dtype=np.float64, seed=0), "gru": fg.GRUCell(I, H, seed=0)}


def state_value(kind, shape, dtype):
    h = np.zeros(shape, dtype)
    return (h, h.copy()) if kind == "lstm" else h


def state_strategy(kind, shape, dtype):
    valid = state_value(kind, shape, dtype)
    near = arrays_near(shape)
    if kind == "lstm":
        h = valid[0]
        structures = st.sampled_from([(h,), (h, h, h), [h, h], {"h": h}, (None, h), h, "hc"])
        tuple_near = st.tuples(st.one_of(st.just(h), near), st.one_of(st.just(h), near))
        return st.one_of(st.just(valid), st.none(), structures, tuple_near, JUNK)
    return st.one_of(st.just(valid), st.none(), near, JUNK, st.just((valid, valid)))


LENGTHS = st.one_of(
    st.none(),
    st.just(np.array([T, 1])),
    st.just(np.array([T, 1], dtype=np.uint8)),
    st.just(np.array([0, 1])), st.just(np.array([T + 1, 1])), st.just(np.array([-1, 1])),
    st.just(np.array([T])), st.just(np.array([T, 1, 1])), st.just(np.array([[T, 1]])),
    st.just(np.array(T)), st.just(np.array([np.nan, 1.0])), st.just(np.array([2.0, 1.0])),
    st.just(np.array([True, True])), st.just(np.array([T, 1], dtype=object)),
    st.just([T, 1]), st.just([T, 2**70]), st.just(np.array([2**64 - 1, 1], dtype=np.uint64)),
    JUNK,
)

FLAGS = st.one_of(st.just(True), st.just(False), st.sampled_from([None, 1, "yes", np.bool_(False)]))


def x_shape(model):
    return (B, T, I) if model.batch_first else (T, B, I)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@FUZZ
@given(data=st.data())
def test_fuzz_layer_calls(kind, data):
    m = MODELS[kind]
    num = m.num_layers * m.num_directions
    F = m.num_directions * H
    x = data.draw(maybe(np.ones(x_shape(m)), arrays_near(x_shape(m))), label="x")
    state = data.draw(state_strategy(kind, (num, B, H), m.dtype), label="state")
    lengths = data.draw(LENGTHS, label="lengths")
    check_finite = data.draw(FLAGS, label="check_finite")
    method = data.draw(st.sampled_from(["__call__", "vjp", "gates"]), label="method")
    names = ("x", "state", "lengths", "check_finite")
    out = call_ok(getattr(m, method), names, x, state, lengths, check_finite=check_finite)
    if out is None:
        return
    xa = np.asarray(x)
    batched = xa.ndim == 3
    Tx = xa.shape[1] if (batched and m.batch_first) else xa.shape[0]
    Bx = (xa.shape[0] if m.batch_first else xa.shape[1]) if batched else None
    if method == "gates":
        for g in out.values():
            assert_array(g, m.dtype, (num, Tx, Bx, H) if batched else (num, Tx, H))
        return
    (y, s), pullback = out if method == "vjp" else (out, None)
    y_shape = ((Bx, Tx, F) if m.batch_first else (Tx, Bx, F)) if batched else (Tx, F)
    s_shape = (num, Bx, H) if batched else (num, H)
    assert_array(y, m.dtype, y_shape)
    for part in (s if kind == "lstm" else (s,)):
        assert_array(part, m.dtype, s_shape)
    if pullback is None:
        return
    dy = data.draw(maybe(np.ones(y_shape), arrays_near(y_shape)), label="dy")
    dstate = data.draw(state_strategy(kind, s_shape, m.dtype), label="dstate")
    grads = call_ok(pullback, ("dy", "dstate", "check_finite"), dy, dstate)
    if grads is None:
        return
    dx, ds, dparams = grads
    assert_array(dx, m.dtype, xa.shape)
    for part in (ds if kind == "lstm" else (ds,)):
        assert_array(part, m.dtype, s_shape)
    assert dparams.keys() == m.state_dict().keys()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@FUZZ
@given(data=st.data())
def test_fuzz_cell_calls(kind, data):
    cell = CELLS[kind]
    x = data.draw(maybe(np.ones((B, I)), arrays_near((B, I))), label="x")
    state = data.draw(state_strategy(kind, (B, H), cell.dtype), label="state")
    check_finite = data.draw(FLAGS, label="check_finite")
    out = call_ok(cell.vjp, ("x", "state", "check_finite"), x, state, check_finite=check_finite)
    if out is None:
        return
    s, pullback = out
    shape = np.asarray(x).shape[:-1] + (H,)
    for part in (s if kind == "lstm" else (s,)):
        assert_array(part, cell.dtype, shape)
    dout = data.draw(state_strategy(kind, shape, cell.dtype), label="dout")
    grads = call_ok(pullback, ("dout",), dout)
    if grads is not None:
        assert_array(grads[0], cell.dtype, np.asarray(x).shape)


SIZES = st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 2**40, 10**30, 2**63, 2.0, 1.5, True, None, "3",
                                                      np.int8(2), np.float64(2)]))


@FUZZ
@given(data=st.data())
def test_fuzz_constructors(data):
    ctor = data.draw(st.sampled_from([fg.LSTM, fg.GRU, fg.LSTMCell, fg.GRUCell, fg.Linear]), label="ctor")
    a, b = data.draw(SIZES, label="size0"), data.draw(SIZES, label="size1")
    kw = {"dtype": data.draw(st.sampled_from([np.float32, np.float64, np.float16, "f8", int, None, "x"]),
                             label="dtype"),
          "bias": data.draw(FLAGS, label="bias"),
          "seed": data.draw(st.one_of(st.sampled_from([None, 0, 1]), JUNK), label="seed")}
    if ctor in (fg.LSTM, fg.GRU):
        kw["num_layers"] = data.draw(st.one_of(st.integers(1, 2), SIZES), label="num_layers")
        kw["bidirectional"] = data.draw(FLAGS, label="bidirectional")
    names = ("input_size", "hidden_size", "in_features", "out_features", "num_layers", "dtype", "bias",
             "bidirectional", "parameters", "seed")
    call_ok(ctor, names, a, b, **kw)


@FUZZ
@given(data=st.data())
def test_fuzz_parameters(data):
    m = data.draw(st.sampled_from([MODELS["lstm"], MODELS["gru"], CELLS["gru"]]), label="model")
    good = m.state_dict()
    d = dict(good)
    key = data.draw(st.sampled_from(sorted(good)), label="key")
    d[key] = data.draw(maybe(good[key], arrays_near(good[key].shape)), label="value")
    if data.draw(st.booleans(), label="extra"):
        d["extra"] = np.zeros(1)
    check_finite = data.draw(FLAGS, label="check_finite")
    target = fg.LSTM(I, H, dtype=np.float64, seed=0) if m is MODELS["lstm"] else (
        fg.GRU(I, H, bidirectional=True, batch_first=True, seed=0) if m is MODELS["gru"]
        else fg.GRUCell(I, H, seed=0))
    call_ok(target.load_state_dict, (key, "extra", "state_dict", "check_finite"), d,
            check_finite=check_finite)
    call_ok(fg.flatten_params, (key, "extra", "params"), target, d)
    v = data.draw(maybe(target.get_flat_params(), arrays_near((target.num_params,))), label="v")
    call_ok(target.set_flat_params, ("v", "check_finite"), v, check_finite=check_finite)
    for name, value in target.state_dict().items():
        assert value.shape == good[name].shape and value.dtype == target.dtype


@FUZZ
@given(data=st.data())
def test_fuzz_training(data):
    rnn = fg.GRU(I, H, seed=0)
    head = fg.Linear(H, 2, seed=1)
    model = fg.Readout(rnn, head, mode=data.draw(st.sampled_from(["last", "sequence"]), label="mode"))
    x = data.draw(maybe(np.ones((T, B, I)), arrays_near((T, B, I))), label="x")
    lengths = data.draw(LENGTHS, label="lengths")
    out = call_ok(model.vjp, ("x", "state", "lengths"), x, None, lengths)
    if out is not None:
        pred, pullback = out
        dout = data.draw(maybe(np.ones(pred.shape), arrays_near(pred.shape)), label="dout")
        call_ok(pullback, ("dout",), dout)
    xl = data.draw(maybe(np.ones((4, H)), arrays_near((4, H))), label="x_linear")
    call_ok(head, ("x",), xl)
    pred = data.draw(maybe(np.ones((4, 2)), arrays_near((4, 2))), label="pred")
    target = data.draw(maybe(np.zeros((4, 2)), arrays_near((4, 2))), label="target")
    call_ok(fg.mse_loss, ("pred", "target"), pred, target)
    classes = data.draw(maybe(np.array([0, 1, 1, 0]), arrays_near((4,))), label="targets")
    call_ok(fg.cross_entropy_loss, ("logits", "targets"), pred, classes)
    grads = dict(model.state_dict())
    key = data.draw(st.sampled_from(sorted(grads)), label="key")
    grads[key] = data.draw(maybe(grads[key], arrays_near(grads[key].shape)), label="grad")
    max_norm = data.draw(st.one_of(st.floats(-1, 10), JUNK), label="max_norm")
    call_ok(fg.clip_grad_norm, (key, "grads", "max_norm", "norm_type"), grads, max_norm)
    call_ok(fg.Adam(model).step, (key, "grads", "check_finite"), grads)
    horizon = data.draw(st.one_of(st.none(), st.floats(-1, 10), JUNK), label="horizon")
    call_ok(fg.gate_summary, ("x", "state", "lengths", "horizon"), rnn, x, None, lengths, horizon=horizon)
