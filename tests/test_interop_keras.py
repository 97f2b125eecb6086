"""fastgates.keras against Keras 3 itself, on its torch backend.

Both directions are checked against Keras's own forward pass: Keras layers
with random weights converted by ``from_keras``, and fastgates models
converted by ``to_keras``, each run on the same batch-major input (with and
without an initial state) and compared on the whole output sequence and the
final states, within ``tests/_tolerances.py`` (float64 comparisons get the
float32 tolerance where Keras itself computes a float64 layer with float32
products: see ``keras_float64_is_exact``).  Round trips are checked for
exactness: fastgates -> Keras -> fastgates gives bitwise the same outputs and
gradients (and the same state_dict up to where the biases sit), Keras ->
fastgates -> Keras gives back every weight bit for bit.
"""

import functools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# Keras picks its backend once, at import: torch is the one the test extra
# installs.
os.environ["KERAS_BACKEND"] = "torch"
keras = pytest.importorskip("keras")

import fastgates as fg  # noqa: E402
from fastgates.keras import from_keras, from_keras_weights, keras_weights, to_keras  # noqa: E402
from _tolerances import assert_close  # noqa: E402

if keras.backend.backend() != "torch":  # keras was imported earlier with another backend
    pytest.skip(f"these tests run Keras on its torch backend, got {keras.backend.backend()!r}",
                allow_module_level=True)

# Keras's torch backend turns tensors into arrays with np.array(tensor)
# (get_weights, convert_to_numpy), and torch.Tensor.__array__ takes no `copy`
# keyword, which NumPy 2 deprecates; the values are right.  Only that warning
# is let through, only in this module.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
KERAS_CLASSES = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}

CONFIGS = [  # kind, reset_after, bias, bidirectional, num_layers
    ("lstm", True, True, False, 1),
    ("lstm", True, False, True, 2),
    ("gru", True, True, True, 1),
    ("gru", True, False, False, 2),
    ("gru", False, True, False, 2),
    ("gru", False, True, True, 1),
    ("gru", False, False, True, 1),
]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def numpy(value):
    return keras.ops.convert_to_numpy(value)


@functools.cache
def keras_float64_is_exact(kind, reset_after=True, bias=True, masked=False, cell=False, **options):
    """Whether Keras computes this kind of float64 layer in float64.

    Off TensorFlow, Keras 3 promotes float64 operands of ``keras.ops.matmul``
    to float32 (``keras.backend.result_type`` follows JAX's default of no
    64-bit types), and its generic RNN loop multiplies with it; only its
    torch-native LSTM and ``reset_after=True`` GRU paths (unmasked, 3.15)
    stay in float64.  Probed, not assumed: one step of a one-unit layer,
    ``x = 0.7``, kernel 0.3, everything else 0, so ``a = 0.21`` and
    ``h = σ(a) tanh(σ(a) tanh(a))`` (LSTM) or ``(1 - σ(a)) tanh(a)`` (GRU);
    float32 products put ``h`` off by ~1e-8 relative.
    """
    extra = {"reset_after": reset_after} if kind == "gru" else {}
    if cell:
        layer = {"lstm": keras.layers.LSTMCell, "gru": keras.layers.GRUCell}[kind](
            1, use_bias=bias, dtype="float64", **extra)
        layer.build((None, 1))
    else:
        layer = KERAS_CLASSES[kind](1, use_bias=bias, dtype="float64", **extra, **options)
        layer.build((None, None, 1))
    weights = [np.zeros(np.shape(w)) for w in layer.get_weights()]
    weights[0][:] = 0.3
    layer.set_weights(weights)
    x = np.full((1, 1, 1), 0.7)
    if cell:
        zeros = [np.zeros((1, 1))] * (2 if kind == "lstm" else 1)
        h = numpy(layer(x[:, 0], zeros)[0]).item()
    else:
        h = numpy(layer(x, mask=np.ones((1, 1), bool) if masked else None)).item()
    a = 0.7 * 0.3
    s = 1 / (1 + np.exp(-a))
    want = s * np.tanh(s * np.tanh(a)) if kind == "lstm" else (1 - s) * np.tanh(a)
    return abs(h - want) <= 1e-13 * abs(want)


def keras_tol(dtype, *args, **kwargs):
    """The dtype whose tolerance a comparison with Keras's run gets."""
    if dtype == F64 and not keras_float64_is_exact(*args, **kwargs):
        return F32
    return dtype


def keras_stack(kind, I, H, num_layers, *, bidirectional, bias, reset_after, dtype, rng,
                **options):
    """Keras layers (a stack) with random weights, returning sequences and states."""
    extra = {"reset_after": reset_after} if kind == "gru" else {}
    D = 2 if bidirectional else 1
    layers = []
    for k in range(num_layers):
        rnn = KERAS_CLASSES[kind](H, use_bias=bias, return_sequences=True, return_state=True,
                                  dtype=dtype.name, **extra, **options)
        layer = keras.layers.Bidirectional(rnn, dtype=dtype.name) if bidirectional else rnn
        layer.build((None, None, I if k == 0 else D * H))
        layer.set_weights([rng.uniform(-0.8, 0.8, np.shape(w)).astype(dtype)
                           for w in layer.get_weights()])
        layers.append(layer)
    return layers


def run_keras(layers, kind, x, state=None, mask=None):
    """Run Keras layers one after the other; return ``y`` and the fastgates-shaped state."""
    per_state = 2 if kind == "lstm" else 1
    hs, cs = [], []
    y, pos = x, 0
    for layer in layers:
        D = 2 if isinstance(layer, keras.layers.Bidirectional) else 1
        init = None
        if state is not None:
            init = []
            for d in range(D):
                init += [state[0][pos + d], state[1][pos + d]] if kind == "lstm" else [state[pos + d]]
        out = [numpy(o) for o in layer(y, initial_state=init, mask=mask)]
        y = out[0]
        for d in range(D):
            hs.append(out[1 + d * per_state])
            if kind == "lstm":
                cs.append(out[2 + d * per_state])
        pos += D
    return y, ((np.stack(hs), np.stack(cs)) if kind == "lstm" else np.stack(hs))


def as_list(layers):
    return layers if isinstance(layers, list) else [layers]


def random_state(rng, kind, num, B, H, dtype):
    def one():
        return (0.5 * rng.standard_normal((num, B, H))).astype(dtype)
    return (one(), one()) if kind == "lstm" else one()


def states(s):
    return list(s) if isinstance(s, tuple) else [s]


def assert_same(a, b):
    """Bitwise equality of arrays (and of their dtypes)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def build_fg(kind, I, H, num_layers, *, bidirectional, bias, reset_after, dtype, seed,
             batch_first=True):
    cls = fg.LSTM if kind == "lstm" else fg.GRU
    extra = {"reset_after": reset_after} if kind == "gru" else {}
    return cls(I, H, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
               dtype=dtype, seed=seed, **extra)


configs = st.fixed_dictionaries({
    "kind": st.sampled_from(["lstm", "gru"]),
    "reset_after": st.booleans(),
    "bias": st.booleans(),
    "bidirectional": st.booleans(),
    "num_layers": st.integers(1, 2),
    "dtype": st.sampled_from([F32, F64]),
    "T": st.integers(1, 6),
    "B": st.integers(1, 4),
    "I": st.integers(1, 5),
    "H": st.integers(1, 5),
    "with_state": st.booleans(),
    "batch_first": st.booleans(),
    "seed": st.integers(0, 2**32 - 1),
})


# ---------------------------------------------------------------------------
# Outputs against Keras's own
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(c=configs)
def test_from_keras_matches_keras(c):
    rng = np.random.default_rng(c["seed"])
    kind, dtype, T, B, I, H = c["kind"], c["dtype"], c["T"], c["B"], c["I"], c["H"]
    D = 2 if c["bidirectional"] else 1
    layers = keras_stack(kind, I, H, c["num_layers"], bidirectional=c["bidirectional"],
                         bias=c["bias"], reset_after=c["reset_after"], dtype=dtype, rng=rng)
    x = rng.standard_normal((B, T, I)).astype(dtype)
    state = random_state(rng, kind, c["num_layers"] * D, B, H, dtype) if c["with_state"] else None
    y_keras, s_keras = run_keras(layers, kind, x, state)

    m = from_keras(layers if c["num_layers"] > 1 else layers[0], batch_first=c["batch_first"])
    assert (type(m), m.input_size, m.hidden_size, m.num_layers, m.bidirectional, m.bias, m.dtype) == (
        fg.LSTM if kind == "lstm" else fg.GRU, I, H, c["num_layers"], c["bidirectional"], c["bias"],
        dtype)
    if kind == "gru":
        assert m.reset_after == c["reset_after"]
    if c["batch_first"]:
        y, s = m(x, state)
    else:
        y, s = m(x.transpose(1, 0, 2), state)
        y = y.transpose(1, 0, 2)
    assert y.dtype == dtype
    tol = keras_tol(dtype, kind, c["reset_after"], c["bias"])
    assert_close(y, y_keras, tol, "y")
    for got, want in zip(states(s), states(s_keras), strict=True):
        assert_close(got, want, tol, "final state")


@settings(max_examples=25, deadline=None)
@given(c=configs)
def test_to_keras_matches_fastgates(c):
    rng = np.random.default_rng(c["seed"])
    kind, dtype, T, B, I, H = c["kind"], c["dtype"], c["T"], c["B"], c["I"], c["H"]
    D = 2 if c["bidirectional"] else 1
    m = build_fg(kind, I, H, c["num_layers"], bidirectional=c["bidirectional"], bias=c["bias"],
                 reset_after=c["reset_after"], dtype=dtype, seed=c["seed"])
    layers = as_list(to_keras(m, return_sequences=True, return_state=True))
    assert len(layers) == c["num_layers"]
    for layer in layers:
        assert isinstance(layer, keras.layers.Bidirectional) == c["bidirectional"]
        assert layer.dtype_policy.compute_dtype == dtype.name
    x = rng.standard_normal((B, T, I)).astype(dtype)
    state = random_state(rng, kind, c["num_layers"] * D, B, H, dtype) if c["with_state"] else None
    y_keras, s_keras = run_keras(layers, kind, x, state)
    y, s = m(x, state)
    assert y_keras.dtype == dtype
    tol = keras_tol(dtype, kind, c["reset_after"], c["bias"])
    assert_close(y, y_keras, tol, "y")
    for got, want in zip(states(s), states(s_keras), strict=True):
        assert_close(got, want, tol, "final state")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_return_sequences_false_gives_last_output(kind):
    # to_keras's return_sequences goes to the last layer of a stack only.
    m = build_fg(kind, 3, 4, 2, bidirectional=True, bias=True, reset_after=True, dtype=F64, seed=1)
    layers = to_keras(m, return_sequences=False)
    assert [layer.name for layer in to_keras(m, name="enc")] == ["enc_l0", "enc_l1"]
    assert [layer.return_sequences for layer in layers] == [True, False]
    assert not any(layer.return_state for layer in layers)
    x = np.random.default_rng(0).standard_normal((2, 5, 3))
    out = layers[1](layers[0](x))
    y, _ = m(x)
    # The backward half of a Bidirectional's last output is its final state,
    # after reading the whole sequence: fastgates's y at t=0.
    H = 4
    tol = keras_tol(F64, kind)
    assert_close(numpy(out)[:, :H], y[:, -1, :H], tol)
    assert_close(numpy(out)[:, H:], y[:, 0, H:], tol)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_lengths_match_keras_mask(kind, bidirectional):
    # Keras's mask of right-padded steps is fastgates's lengths.
    rng = np.random.default_rng(3)
    lengths = np.array([4, 6, 1])
    B, T, I, H = 3, 6, 2, 3
    (layer,) = keras_stack(kind, I, H, 1, bidirectional=bidirectional, bias=True, reset_after=True,
                           dtype=F64, rng=rng)
    if not bidirectional:
        layer.zero_output_for_mask = True  # a Bidirectional forces this itself
    x = rng.standard_normal((B, T, I))
    mask = np.arange(T)[None, :] < lengths[:, None]
    x[~mask] = 50.0  # padding must not leak
    y_keras, s_keras = run_keras([layer], kind, x, mask=mask)
    y, s = from_keras(layer)(x, lengths=lengths)
    tol = keras_tol(F64, kind, masked=True)
    assert_close(y, y_keras, tol)
    assert np.all(y[~mask] == 0)
    for got, want in zip(states(s), states(s_keras), strict=True):
        assert_close(got, want, tol)


@pytest.mark.parametrize("kind, reset_after", [("lstm", True), ("gru", True), ("gru", False)])
def test_cells_match_keras_both_ways(kind, reset_after):
    rng = np.random.default_rng(4)
    I, H, B = 3, 4, 2
    cls = keras.layers.LSTMCell if kind == "lstm" else keras.layers.GRUCell
    extra = {"reset_after": reset_after} if kind == "gru" else {}
    kcell = cls(H, dtype="float64", **extra)
    kcell.build((None, I))
    kcell.set_weights([rng.uniform(-0.8, 0.8, w.shape) for w in kcell.get_weights()])
    x = rng.standard_normal((B, I))
    h, c = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    cell = from_keras(kcell)
    assert isinstance(cell, fg.LSTMCell if kind == "lstm" else fg.GRUCell)
    assert cell.dtype == F64
    if kind == "lstm":
        _, (kh, kc) = kcell(x, [h, c])
        h1, c1 = cell(x, (h, c))
        assert_close(c1, numpy(kc), keras_tol(F64, kind, cell=True))
    else:
        _, (kh,) = kcell(x, [h])
        h1 = cell(x, h)
    assert_close(h1, numpy(kh), keras_tol(F64, kind, reset_after, cell=True))
    back = to_keras(cell)
    assert isinstance(back, cls)
    for got, want in zip(back.get_weights(), kcell.get_weights(), strict=True):
        assert_same(got, want)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind, reset_after, bias, bidirectional, num_layers", CONFIGS)
def test_fastgates_keras_fastgates_is_exact(kind, reset_after, bias, bidirectional, num_layers,
                                            dtype):
    m = build_fg(kind, 3, 4, num_layers, bidirectional=bidirectional, bias=bias,
                 reset_after=reset_after, dtype=dtype, seed=5, batch_first=False)
    params = m.state_dict()
    one_keras_bias = kind == "lstm" or not reset_after
    if kind == "gru" and not reset_after and bias:
        # Keras's one GRU bias is added with the input product, so a nonzero
        # b_hn comes back inside b_in, which rounds once differently; with
        # b_hn = 0 the round trip is bitwise (see below for the general case).
        for name in params:
            if name.startswith("bias_hh"):
                params[name][8:] = 0
        m.load_state_dict(params)
    back = from_keras(to_keras(m), batch_first=False)
    assert repr(back) == repr(m)

    got = back.state_dict()
    assert got.keys() == params.keys()
    for name, value in params.items():
        if name.startswith("bias") and one_keras_bias:
            continue
        assert_same(got[name], value)
    if bias and one_keras_bias:
        for name in params:
            if name.startswith("bias_ih"):
                hh = name.replace("bias_ih", "bias_hh")
                assert_same(got[name], params[name] + params[hh])
                assert_same(got[hh], np.zeros_like(params[hh]))

    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 2, 3)).astype(dtype)
    state = random_state(rng, kind, num_layers * (2 if bidirectional else 1), 2, 4, dtype)
    (y0, s0), pull0 = m.vjp(x, state)
    (y1, s1), pull1 = back.vjp(x, state)
    assert_same(y1, y0)
    for a, b in zip(states(s1), states(s0), strict=True):
        assert_same(a, b)
    # Gradients too: fastgates's gradients with respect to b_ih and b_hh are
    # equal wherever the two are added, so moving the sum changes none.
    dy = rng.standard_normal(y0.shape).astype(dtype)
    dx0, ds0, dp0 = pull0(dy)
    dx1, ds1, dp1 = pull1(dy)
    assert_same(dx1, dx0)
    for a, b in zip(states(ds1), states(ds0), strict=True):
        assert_same(a, b)
    for name in dp0:
        assert_same(dp1[name], dp0[name])


def test_gru_reset_before_round_trip_with_nonzero_b_hn_agrees_to_rounding():
    m = fg.GRU(3, 4, 2, reset_after=False, dtype=np.float64, seed=7)
    assert np.all(m.bias_hh_l0[8:] != 0)
    back = from_keras(to_keras(m), batch_first=False)
    x = np.random.default_rng(8).standard_normal((5, 2, 3))
    (y0, h0), (y1, h1) = m(x), back(x)
    assert_close(y1, y0, F64)
    assert_close(h1, h0, F64)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind, reset_after, bias, bidirectional, num_layers", CONFIGS)
def test_keras_fastgates_keras_gives_identical_weights(kind, reset_after, bias, bidirectional,
                                                       num_layers, dtype):
    rng = np.random.default_rng(9)
    layers = keras_stack(kind, 3, 4, num_layers, bidirectional=bidirectional, bias=bias,
                         reset_after=reset_after, dtype=dtype, rng=rng)
    if bias:
        # A negative zero must survive too (-0.0 + 0.0 would be +0.0).
        w = layers[0].get_weights()
        w[2][..., 0] = -0.0
        layers[0].set_weights(w)
    original = [layer.get_weights() for layer in layers]
    source = layers if num_layers > 1 else layers[0]
    m = from_keras(source)
    assert m.dtype == dtype

    back = as_list(to_keras(m))
    for layer, weights in zip(back, original, strict=True):
        assert type(layer) is type(layers[0])
        for got, want in zip(layer.get_weights(), weights, strict=True):
            assert_same(got, want)

    # keras_weights and from_keras_weights are the same conversion on raw lists.
    raw = keras_weights(m)
    raw = raw if num_layers > 1 else [raw]
    for got_list, want_list in zip(raw, original, strict=True):
        for got, want in zip(got_list, want_list, strict=True):
            assert_same(got, want)
    weights = original if num_layers > 1 else original[0]
    m2 = from_keras_weights(weights, kind, bidirectional=bidirectional,
                            reset_after=reset_after if kind == "gru" and not bias else None)
    assert repr(m2) == repr(m)
    for name, value in m.state_dict().items():
        assert_same(m2.state_dict()[name], value)


def test_dtype_conversions():
    (layer,) = keras_stack("gru", 3, 4, 1, bidirectional=True, bias=True, reset_after=True,
                           dtype=F32, rng=np.random.default_rng(10))
    m64 = from_keras(layer, dtype=np.float64)
    assert m64.dtype == F64
    # float32 -> float64 -> float32 is exact.
    back = to_keras(m64, dtype="float32")
    assert back.dtype_policy.name == "float32"
    for got, want in zip(back.get_weights(), layer.get_weights(), strict=True):
        assert_same(got, want)
    assert to_keras(m64).dtype_policy.name == "float64"
    assert to_keras(m64, dtype=np.float32).dtype_policy.name == "float32"


def test_lazy_wrappers_in_fastgates_pass_options():
    m = fg.LSTM(2, 3, dtype=np.float64, seed=0)
    layer = fg.to_keras(m, return_state=True, name="enc")
    assert layer.name == "enc" and layer.return_state
    back = fg.from_keras(layer, batch_first=False)
    assert repr(back) == repr(m)


# ---------------------------------------------------------------------------
# What is supported, what is refused
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"unroll": True},
    {"return_sequences": False},
    {"kernel_regularizer": "l2", "bias_initializer": "ones"},
    {"use_cudnn": False},
    {"activation": keras.ops.tanh, "recurrent_activation": keras.ops.sigmoid},
])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_options_that_do_not_change_the_recurrence(kind, options):
    rng = np.random.default_rng(11)
    layer = KERAS_CLASSES[kind](4, return_state=True, dtype="float64",
                                **{"return_sequences": True, **options})
    layer.build((None, 5, 3))
    layer.set_weights([rng.uniform(-0.8, 0.8, w.shape) for w in layer.get_weights()])
    x = rng.standard_normal((2, 5, 3))
    out = [numpy(o) for o in layer(x)]
    y, s = from_keras(layer)(x)
    tol = keras_tol(F64, kind, **options)
    assert_close(y if layer.return_sequences else y[:, -1], out[0], tol)
    assert_close(states(s)[0][0], out[1], tol)


def test_rnn_over_a_cell_converts_like_the_layer():
    rng = np.random.default_rng(13)
    layer = keras.layers.RNN(keras.layers.GRUCell(4, reset_after=False, dtype="float64"),
                             return_sequences=True, dtype="float64")
    layer.build((None, None, 3))
    layer.set_weights([rng.uniform(-0.8, 0.8, w.shape) for w in layer.get_weights()])
    x = rng.standard_normal((2, 5, 3))
    m = from_keras(layer)
    assert repr(m) == "GRU(3, 4, batch_first=True, reset_after=False, dtype=float64)"
    assert_close(m(x)[0], numpy(layer(x)), keras_tol(F64, "gru", False, cell=True))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_allow_dropout_converts_for_inference(kind):
    rng = np.random.default_rng(12)
    layer = KERAS_CLASSES[kind](4, dropout=0.3, recurrent_dropout=0.2, return_sequences=True,
                                dtype="float64")
    layer.build((None, None, 3))
    layer.set_weights([rng.uniform(-0.8, 0.8, w.shape) for w in layer.get_weights()])
    with pytest.raises(NotImplementedError, match="dropout=0.3.*allow_dropout=True"):
        from_keras(layer)
    x = rng.standard_normal((2, 5, 3))
    y, _ = from_keras(layer, allow_dropout=True)(x)
    assert_close(y, numpy(layer(x, training=False)),
                 keras_tol(F64, kind, dropout=0.3, recurrent_dropout=0.2))


@pytest.mark.parametrize("options, match", [
    ({"activation": "relu"}, "activation='relu'.*'tanh'"),
    ({"recurrent_activation": "hard_sigmoid"}, "recurrent_activation='hard_sigmoid'.*'sigmoid'"),
    ({"dropout": 0.1}, r"dropout=0\.1"),
    ({"recurrent_dropout": 0.1}, r"recurrent_dropout=0\.1"),
    ({"go_backwards": True}, "go_backwards=True"),
    ({"stateful": True}, "stateful=True"),
])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unsupported_layer_options_raise(kind, options, match):
    layer = KERAS_CLASSES[kind](4, **options)
    layer.build((2, None, 3))  # stateful layers need a fixed batch size
    with pytest.raises(NotImplementedError, match=match):
        from_keras(layer)
    if "go_backwards" in options:
        # Keras itself refuses two backward layers; this pair has its
        # directions swapped.
        bidirectional = keras.layers.Bidirectional(KERAS_CLASSES[kind](4, **options),
                                                   backward_layer=KERAS_CLASSES[kind](4))
    else:
        bidirectional = keras.layers.Bidirectional(KERAS_CLASSES[kind](4, **options))
    with pytest.raises(NotImplementedError, match=match):
        from_keras(bidirectional)


def test_custom_activation_is_named_in_the_error():
    # Only Keras's own tanh and sigmoid (keras.activations or keras.ops) pass.
    layer = built(keras.layers.GRU(4, recurrent_activation=lambda a: a))
    with pytest.raises(NotImplementedError, match=r"recurrent_activation='.*<lambda>' is not supported"):
        from_keras(layer)


@pytest.mark.parametrize("merge_mode", ["sum", "mul", "ave", None])
def test_bidirectional_merge_modes_other_than_concat_raise(merge_mode):
    layer = keras.layers.Bidirectional(keras.layers.LSTM(4), merge_mode=merge_mode)
    layer.build((None, None, 3))
    with pytest.raises(NotImplementedError, match=f"merge_mode={merge_mode!r}.*'concat'"):
        from_keras(layer)


def built(layer, I=3):
    layer.build((None, None, I))
    return layer


def test_unsupported_layers_and_stacks_raise():
    with pytest.raises(TypeError, match="expected a keras.layers.LSTM or GRU.*Dense"):
        from_keras(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="expected a keras.layers.LSTM or GRU.*str"):
        from_keras("lstm")
    with pytest.raises(TypeError, match="RNN over SimpleRNNCell"):
        from_keras(built(keras.layers.SimpleRNN(3)))
    with pytest.raises(NotImplementedError, match="StackedRNNCells.*list of LSTM/GRU layers"):
        from_keras(built(keras.layers.RNN([keras.layers.LSTMCell(3), keras.layers.LSTMCell(3)])))
    with pytest.raises(ValueError, match="is not built.*layer.build"):
        from_keras(keras.layers.GRU(3))
    with pytest.raises(ValueError, match="empty list"):
        from_keras([])
    with pytest.raises(ValueError, match=r"layer_or_layers\[1\].*same units as layer 0 \(4\), got 5"):
        from_keras([built(keras.layers.LSTM(4)), built(keras.layers.LSTM(5), 4)])
    with pytest.raises(ValueError, match=r"layer_or_layers\[1\].*same cell as layer 0 \('lstm'\)"):
        from_keras([built(keras.layers.LSTM(4)), built(keras.layers.GRU(4), 4)])
    with pytest.raises(ValueError, match="same bidirectional as layer 0"):
        from_keras([built(keras.layers.Bidirectional(keras.layers.GRU(4))),
                    built(keras.layers.GRU(4), 8)])
    with pytest.raises(ValueError, match="same reset_after as layer 0"):
        from_keras([built(keras.layers.GRU(4)), built(keras.layers.GRU(4, reset_after=False), 4)])
    with pytest.raises(ValueError, match=r"kernel of layer 1 must have shape \(4, 16\), got \(3, 16\)"):
        from_keras([built(keras.layers.LSTM(4)), built(keras.layers.LSTM(4), 3)])
    custom = keras.layers.Bidirectional(keras.layers.GRU(4),
                                        backward_layer=keras.layers.GRU(5, go_backwards=True))
    with pytest.raises(ValueError, match=r"forward and backward layers differ in units \(4 and 5\)"):
        from_keras(built(custom))
    with pytest.raises(TypeError, match="model must be a fastgates LSTM, GRU.*got str"):
        to_keras("lstm")
    with pytest.raises(TypeError, match="return_state must be True or False"):
        to_keras(fg.GRU(2, 3), return_state=1)


def test_from_keras_weights_errors():
    lstm = built(keras.layers.LSTM(4)).get_weights()
    gru_nobias = built(keras.layers.GRU(4, use_bias=False)).get_weights()
    with pytest.raises(ValueError, match="cell must be 'lstm' or 'gru', got 'rnn'"):
        from_keras_weights(lstm, "rnn")
    with pytest.raises(ValueError, match="must hold 6 arrays.*forward then backward.*got 3"):
        from_keras_weights(lstm, "lstm", bidirectional=True)
    with pytest.raises(ValueError, match=r"recurrent kernel of layer 0 must have shape \(H, 3\*H\)"):
        from_keras_weights(lstm, "gru")
    with pytest.raises(ValueError, match=r"bias of layer 0 must have shape \(16,\), got \(15,\)"):
        from_keras_weights([lstm[0], lstm[1], lstm[2][:15]], "lstm")
    with pytest.raises(ValueError, match="reset_after cannot be read from a GRU without bias"):
        from_keras_weights(gru_nobias, "gru")
    gru = built(keras.layers.GRU(4)).get_weights()
    with pytest.raises(ValueError, match=r"reset_after=False but the GRU bias has shape \(2, 12\)"):
        from_keras_weights(gru, "gru", reset_after=False)
    with pytest.raises(TypeError, match=r"weights\[1\] must hold real floating-point"):
        from_keras_weights([gru[0], gru[1].astype(np.int64), gru[2]], "gru")
    with pytest.raises(ValueError, match=r"weights\[1\] has no bias but weights\[0\] has one"):
        from_keras_weights([lstm, lstm[:2]], "lstm")
    m = from_keras_weights(gru_nobias, "gru", reset_after=False, dtype=np.float64)
    assert repr(m) == "GRU(3, 4, bias=False, batch_first=True, reset_after=False, dtype=float64)"


@pytest.mark.parametrize("options", [dict(reverse=True), dict(clip=2.0), dict(peephole=True),
                                     dict(input_forget=True)], ids=lambda o: next(iter(o)))
def test_onnx_variants_have_no_keras_form(options):
    m = fg.LSTM(2, 3, **options)
    name = next(iter(options))
    with pytest.raises(NotImplementedError, match=name):
        to_keras(m)
    with pytest.raises(NotImplementedError, match=name):
        keras_weights(m)
