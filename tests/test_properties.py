"""Property tests: invariants that hold for every shape, dtype and value.

Hypothesis draws the shapes, the dtype, the layer structure and a seed; the
arrays themselves come from a NumPy generator seeded by that draw, with the
value range (the thing the properties are about) drawn by Hypothesis.  Every
test goes through the public API only.
"""

import warnings
from dataclasses import dataclass

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastgates as fg
from _tolerances import assert_close

KINDS = ("lstm", "gru", "gru_classic", "janet", "mgu", "slstm", "mingru", "minlstm")  # gru = reset_after=True
DTYPES = (np.float32, np.float64)
GATE_RANGES = {
    "lstm": {"i": (0, 1), "f": (0, 1), "g": (-1, 1), "o": (0, 1)},
    "gru": {"r": (0, 1), "z": (0, 1), "n": (-1, 1)},
    "janet": {"f": (0, 1), "n": (-1, 1)},
    "mgu": {"f": (0, 1), "n": (-1, 1)},
    # the stabilised i' = exp(i~ - m), f' = exp(log σ(f~) + m_prev - m): at most
    # 1, and one of them exactly 1 at every step (so never strictly inside)
    "slstm": {"i": (0, 1), "f": (0, 1), "z": (-1, 1), "o": (0, 1)},
    # the candidate n of minGRU/minLSTM is the projection itself (unbounded)
    "mingru": {"z": (0, 1), "n": (-np.inf, np.inf)},
    "minlstm": {"f": (0, 1), "i": (0, 1), "n": (-np.inf, np.inf)},
}
# The states of each family beyond h (none: h alone).
STATES = {"lstm": 2, "slstm": 4}
MAX_THREADS = numba.config.NUMBA_NUM_THREADS  # the most set_num_threads accepts
SATURATE = 1e4  # sigmoid(-1e4) == 0 and sigmoid(1e4) == 1 exactly, in both dtypes


# --------------------------------------------------------------------------
# Problem description and data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """One model configuration plus the seed for its data."""

    kind: str
    T: int
    B: int  # 0 means unbatched input
    I: int
    H: int
    L: int
    bidirectional: bool
    dtype: type
    seed: int
    use_lengths: bool
    batch_first: bool = False

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    @property
    def family(self):
        return "gru" if self.kind.startswith("gru") else self.kind

    @property
    def batched(self):
        return self.B > 0

    def model(self, bias=True):
        kw = dict(
            num_layers=self.L,
            bias=bias,
            batch_first=self.batch_first,
            bidirectional=self.bidirectional,
            dtype=self.dtype,
            seed=self.seed,
        )
        if self.family == "gru":
            return fg.GRU(self.I, self.H, reset_after=self.kind == "gru", **kw)
        if self.family == "slstm":
            kw["num_heads"] = 2 if self.H % 2 == 0 else 1
        return fg.layers.layer_class(self.kind)(self.I, self.H, **kw)

    def rng(self, salt=0):
        return np.random.default_rng([self.seed, salt])

    def x_shape(self):
        if not self.batched:
            return (self.T, self.I)
        if self.batch_first:
            return (self.B, self.T, self.I)
        return (self.T, self.B, self.I)

    def y_shape(self):
        shape = list(self.x_shape())
        shape[-1] = self.D * self.H
        return tuple(shape)

    def state_shape(self):
        if not self.batched:
            return (self.L * self.D, self.H)
        return (self.L * self.D, self.B, self.H)

    def x(self, scale=1.0, salt=1, dtype=None):
        dtype = self.dtype if dtype is None else dtype
        return self.rng(salt).uniform(-scale, scale, self.x_shape()).astype(dtype)

    def state(self, scale=1.0, salt=2, c_scale=None):
        """A random initial state: ``(h, c)`` for an LSTM, ``(h, c, n, m)`` for an
        sLSTM (``n`` in ``[1, 1 + scale]``, ``|c| <= n``), ``h`` for the others."""
        rng = self.rng(salt)
        h = rng.uniform(-scale, scale, self.state_shape()).astype(self.dtype)
        if self.family == "slstm":
            n = rng.uniform(1, 1 + scale, self.state_shape())
            c = n * rng.uniform(-1, 1, self.state_shape())
            m = rng.uniform(-scale, scale, self.state_shape())
            return (h,) + tuple(v.astype(self.dtype) for v in (c, n, m))
        if self.family != "lstm":
            return h
        c_scale = scale if c_scale is None else c_scale
        c = rng.uniform(-c_scale, c_scale, self.state_shape()).astype(self.dtype)
        return (h, c)

    def dy(self, salt=3):
        return self.rng(salt).standard_normal(self.y_shape()).astype(self.dtype)

    def dstate(self, salt=4):
        rng = self.rng(salt)
        dh = rng.standard_normal(self.state_shape()).astype(self.dtype)
        if self.family not in STATES:
            return dh
        return (dh,) + tuple(rng.standard_normal(self.state_shape()).astype(self.dtype)
                             for _ in range(STATES[self.family] - 1))

    def lengths(self, salt=5):
        """Random lengths in [1, T] with at least one padded step when T > 1."""
        if not (self.use_lengths and self.batched):
            return None
        rng = self.rng(salt)
        lengths = rng.integers(1, self.T + 1, size=self.B)
        if self.T > 1:
            lengths[rng.integers(self.B)] = rng.integers(1, self.T)
        return lengths.astype(np.int64)

    def valid(self, lengths):
        """Boolean mask ``(T, B)`` (``(T,)`` unbatched) of the valid steps."""
        if not self.batched:
            return np.ones(self.T, dtype=bool)
        if lengths is None:
            return np.ones((self.T, self.B), dtype=bool)
        return np.arange(self.T)[:, None] < lengths[None, :]


@st.composite
def setups(
    draw,
    kinds=KINDS,
    max_layers=2,
    bidirectional=st.booleans(),
    use_lengths=st.booleans(),
    unbatched=st.just(False),
    batch_first=st.just(False),
    min_T=1,
):
    kind = draw(st.sampled_from(kinds))
    B = 0 if draw(unbatched) else draw(st.integers(1, 3))
    return Setup(
        kind=kind,
        T=draw(st.integers(min_T, 8)),
        B=B,
        I=draw(st.integers(1, 4)),
        H=draw(st.integers(1, 4)),
        L=draw(st.integers(1, max_layers)),
        bidirectional=draw(bidirectional),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
        use_lengths=B > 0 and draw(use_lengths),
        batch_first=B > 0 and draw(batch_first),
    )


def random_params(model, rng, bound):
    """Every parameter uniform in ``[-bound, bound]``, in the model's dtype."""
    return {
        k: rng.uniform(-bound, bound, v.shape).astype(v.dtype)
        for k, v in model.state_dict().items()
    }


def gate_rows(name, H, family):
    """The rows of a weight matrix or bias that belong to gate ``name``."""
    order = "ifgo" if family == "lstm" else "rzn"
    k = order.index(name)
    return slice(k * H, (k + 1) * H)


# --------------------------------------------------------------------------
# Comparing nested results
# --------------------------------------------------------------------------


def copy_tree(obj):
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, tuple):
        return tuple(copy_tree(o) for o in obj)
    if isinstance(obj, dict):
        return {k: copy_tree(v) for k, v in obj.items()}
    return obj


def assert_identical(actual, desired, path="result"):
    """Bitwise equality (up to the sign of zero) of arrays, tuples and dicts."""
    if isinstance(desired, dict):
        assert isinstance(actual, dict), path
        assert actual.keys() == desired.keys(), path
        for k in desired:
            assert_identical(actual[k], desired[k], f"{path}[{k!r}]")
    elif isinstance(desired, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(desired), path
        for k, (a, d) in enumerate(zip(actual, desired)):
            assert_identical(a, d, f"{path}[{k}]")
    elif desired is None:
        assert actual is None, path
    else:
        np.testing.assert_array_equal(actual, desired, err_msg=path, strict=True)


# --------------------------------------------------------------------------
# Gates stay in range
# --------------------------------------------------------------------------


@given(
    setup=setups(unbatched=st.booleans()),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e6]),
)
def test_gates_in_range_for_any_finite_values(setup, scale):
    m = setup.model()
    m.load_state_dict(random_params(m, setup.rng(0), scale))
    x, state, lengths = setup.x(scale), setup.state(scale), setup.lengths()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gates = m.gates(x, state, lengths)
        y, final = m(x, state, lengths)

    ranges = GATE_RANGES[setup.family]
    expected_names = set(ranges) | set(m._spec.shown)
    assert set(gates) == expected_names
    shape = (setup.L * setup.D, setup.T) + ((setup.B,) if setup.batched else ()) + (setup.H,)
    for name, value in gates.items():
        assert value.shape == shape, name
        assert value.dtype == np.dtype(setup.dtype), name
        assert np.all(np.isfinite(value)), name
    for name, (lo, hi) in ranges.items():
        assert np.all((lo <= gates[name]) & (gates[name] <= hi)), name
    # Padded steps report 0 for every gate.
    padded = ~setup.valid(lengths)
    for name, value in gates.items():
        assert np.all(value[:, padded] == 0), name
    for arr in (y,) + (final if isinstance(final, tuple) else (final,)):
        assert np.all(np.isfinite(arr))
    # |y| <= 1 for an LSTM (o * tanh(c)); a GRU and an MGU interpolate
    # between h and n; JANET's shares f and 1 - sigmoid(s - 1) add up to
    # more than 1, but |h'| <= f M + 1 - sigmoid(s - 1) <= M for every
    # M >= (1 + e^s) / (1 + e^(s - 1)), whose supremum is e.  An sLSTM's
    # y = o c / n with |c| <= n kept exactly from a state where it holds (as
    # drawn here): f' and i' are in [0, 1], |tanh| <= 1, and rounding is
    # monotone.  minGRU and minLSTM interpolate between h and their
    # unbounded candidate n (their shares add up to 1 within rounding).
    h0 = state[0] if setup.family in STATES else state
    bound = {"lstm": 1, "slstm": 1, "janet": max(np.e * (1 + 1e-6), np.abs(h0).max())}.get(
        setup.family, max(1, np.abs(h0).max()))
    if setup.family in ("mingru", "minlstm"):
        bound = max(bound, np.abs(gates["n"]).max()) * (1 + 1e-5)
    assert np.all(np.abs(y) <= bound)


@given(setup=setups(unbatched=st.booleans()))
def test_gates_strictly_inside_when_preactivations_bounded(setup):
    # With |x| <= 1, |h| <= 1 and every weight and bias in [-w, w], each
    # pre-activation is at most w * (fan_in + H + 2) <= 5 in magnitude, and
    # sigmoid(+-5), tanh(+-5) are representably away from 0, 1 and -1, 1.
    m = setup.model()
    fan_in = max(setup.I, setup.D * setup.H)
    bound = 5.0 / (fan_in + setup.H + 2)
    m.load_state_dict(random_params(m, setup.rng(0), bound))
    x = setup.x(1.0)
    state = setup.state(1.0, c_scale=100.0)  # c never enters a pre-activation
    lengths = setup.lengths()
    gates = m.gates(x, state, lengths)
    valid = setup.valid(lengths)
    ranges = dict(GATE_RANGES[setup.family])
    if setup.family == "slstm":
        # i' and f' are in (0, 1] (the state's m is finite), one of them 1
        del ranges["i"], ranges["f"]
        i, f = gates["i"][:, valid], gates["f"][:, valid]
        assert np.all((0 < i) & (i <= 1) & (0 < f) & (f <= 1))
        np.testing.assert_array_equal(np.maximum(i, f), 1)
    for name, (lo, hi) in ranges.items():
        value = gates[name][:, valid]
        assert np.all((lo < value) & (value < hi)), name


# --------------------------------------------------------------------------
# Saturated gates carry the state through bitwise
# --------------------------------------------------------------------------


@given(
    setup=setups(kinds=("lstm",)),
    c_scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_lstm_open_forget_closed_input_keeps_cell_state(setup, c_scale):
    m = setup.model()
    params = random_params(m, setup.rng(0), 1.0)
    i_rows, f_rows = gate_rows("i", setup.H, "lstm"), gate_rows("f", setup.H, "lstm")
    for name in params:
        if name.startswith(("weight_ih", "weight_hh")):
            params[name][i_rows] = 0
            params[name][f_rows] = 0
        elif name.startswith("bias_ih"):
            params[name][i_rows] = -SATURATE
            params[name][f_rows] = SATURATE
        elif name.startswith("bias_hh"):
            params[name][i_rows] = 0
            params[name][f_rows] = 0
    m.load_state_dict(params)
    x, (h0, c0), lengths = setup.x(), setup.state(c_scale=c_scale), setup.lengths()

    gates = m.gates(x, (h0, c0), lengths)
    _, (h1, c1) = m(x, (h0, c0), lengths)

    np.testing.assert_array_equal(c1, c0)
    valid = setup.valid(lengths)
    for t in range(setup.T):
        for b in range(setup.B):
            if valid[t, b]:
                np.testing.assert_array_equal(gates["i"][:, t, b], 0)
                np.testing.assert_array_equal(gates["f"][:, t, b], 1)
                np.testing.assert_array_equal(gates["c"][:, t, b], c0[:, b])


@given(setup=setups(kinds=("gru", "gru_classic")), h_scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_gru_saturated_update_gate_keeps_hidden_state(setup, h_scale):
    m = setup.model()
    params = random_params(m, setup.rng(0), 1.0)
    z_rows = gate_rows("z", setup.H, "gru")
    for name in params:
        if name.startswith(("weight_ih", "weight_hh", "bias_hh")):
            params[name][z_rows] = 0
        elif name.startswith("bias_ih"):
            params[name][z_rows] = SATURATE
    m.load_state_dict(params)
    x, h0, lengths = setup.x(), setup.state(h_scale), setup.lengths()

    gates = m.gates(x, h0, lengths)
    y, h1 = m(x, h0, lengths)

    np.testing.assert_array_equal(h1, h0)
    valid = setup.valid(lengths)
    top = (setup.L - 1) * setup.D  # first state row of the last layer
    H = setup.H
    for t in range(setup.T):
        for b in range(setup.B):
            if valid[t, b]:
                np.testing.assert_array_equal(gates["z"][:, t, b], 1)
                for d in range(setup.D):
                    np.testing.assert_array_equal(y[t, b, d * H : (d + 1) * H], h0[top + d, b])


@given(setup=setups(kinds=("janet", "mgu")), h_scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_saturated_forget_gate_keeps_hidden_state(setup, h_scale):
    # JANET keeps h when sigmoid(s) = sigmoid(s - beta) = 1; an MGU when its
    # memory 1 - f is 1 (f = 0).
    m = setup.model()
    params = random_params(m, setup.rng(0), 1.0)
    f_rows = slice(0, setup.H)
    for name in params:
        if name.startswith(("weight_ih", "weight_hh", "bias_hh")):
            params[name][f_rows] = 0
        elif name.startswith("bias_ih"):
            params[name][f_rows] = SATURATE if setup.kind == "janet" else -SATURATE
    m.load_state_dict(params)
    x, h0, lengths = setup.x(), setup.state(h_scale), setup.lengths()

    gates = m.gates(x, h0, lengths)
    y, h1 = m(x, h0, lengths)

    np.testing.assert_array_equal(h1, h0)
    valid = setup.valid(lengths)
    top = (setup.L - 1) * setup.D
    H = setup.H
    kept = 1 if setup.kind == "janet" else 0
    for t in range(setup.T):
        for b in range(setup.B):
            if valid[t, b]:
                np.testing.assert_array_equal(gates["f"][:, t, b], kept)
                for d in range(setup.D):
                    np.testing.assert_array_equal(y[t, b, d * H : (d + 1) * H], h0[top + d, b])


@given(setup=setups(kinds=("mingru", "minlstm")), h_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       positive=st.booleans())
def test_closed_input_keeps_hidden_state_of_scan_cells(setup, h_scale, positive):
    # minGRU keeps h where its update gate z is 0 (1 - z = 1, z n = 0);
    # minLSTM where its input gate i is 0 (f' = f / f = 1, i' = 0), whatever f.
    m = fg.layers.layer_class(setup.kind)(setup.I, setup.H, num_layers=setup.L,
                                          bidirectional=setup.bidirectional, dtype=setup.dtype,
                                          seed=setup.seed, positive=positive)
    params = random_params(m, setup.rng(0), 1.0)
    H = setup.H
    closed = slice(0, H) if setup.kind == "mingru" else slice(H, 2 * H)
    for name in params:
        params[name][closed] = -SATURATE if name.startswith("bias_ih") else 0
    m.load_state_dict(params)
    x, h0, lengths = setup.x(), setup.state(h_scale), setup.lengths()

    gates = m.gates(x, h0, lengths)
    y, h1 = m(x, h0, lengths)

    np.testing.assert_array_equal(h1, h0)
    valid = setup.valid(lengths)
    top = (setup.L - 1) * setup.D
    kept = gates["z"] if setup.kind == "mingru" else gates["i"]
    np.testing.assert_array_equal(kept[:, valid], 0)
    if setup.kind == "minlstm":
        np.testing.assert_array_equal(gates["f"][:, valid], 1)
    for t in range(setup.T):
        for b in range(setup.B):
            if valid[t, b]:
                for d in range(setup.D):
                    np.testing.assert_array_equal(y[t, b, d * H : (d + 1) * H], h0[top + d, b])


@given(setup=setups(kinds=("slstm",)), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_slstm_open_forget_closed_input_keeps_cell_state(setup, scale):
    # f~ = 1e4: log σ(f~) = 0 exactly, so m stays (while i~ = -1e4 < m) and
    # f' = exp(0) = 1, i' = exp(-1e4 - m) = 0: c, n and m pass through bitwise.
    m = setup.model()
    params = random_params(m, setup.rng(0), 1.0)
    H = setup.H
    i_rows, f_rows = slice(0, H), slice(H, 2 * H)
    for name in params:
        if name.startswith(("weight_ih", "weight_hh", "bias_hh")):
            params[name][i_rows] = 0
            params[name][f_rows] = 0
        elif name.startswith("bias_ih"):
            params[name][i_rows] = -SATURATE
            params[name][f_rows] = SATURATE
    m.load_state_dict(params)
    x, state, lengths = setup.x(), setup.state(scale), setup.lengths()

    gates = m.gates(x, state, lengths)
    _, final = m(x, state, lengths)

    for k in (1, 2, 3):
        np.testing.assert_array_equal(final[k], state[k])
    valid = setup.valid(lengths)
    np.testing.assert_array_equal(gates["i"][:, valid], 0)
    np.testing.assert_array_equal(gates["f"][:, valid], 1)


# --------------------------------------------------------------------------
# Padding never leaks
# --------------------------------------------------------------------------


def _padded_mask(setup, lengths):
    """Mask shaped like x's leading two axes (respecting batch_first)."""
    valid = setup.valid(lengths)
    return ~(valid.T if setup.batch_first else valid)


@given(
    setup=setups(use_lengths=st.just(True), batch_first=st.booleans(), min_T=2),
    scale=st.sampled_from([1.0, 1e3]),
)
def test_padded_steps_do_not_influence_anything(setup, scale):
    m = setup.model()
    x, state, lengths, dy, dstate = (
        setup.x(),
        setup.state(),
        setup.lengths(),
        setup.dy(),
        setup.dstate(),
    )
    padded = _padded_mask(setup, lengths)
    x_other, dy_other = x.copy(), dy.copy()
    rng = setup.rng(9)
    x_other[padded] = rng.uniform(-scale, scale, x_other[padded].shape)
    dy_other[padded] = rng.uniform(-scale, scale, dy_other[padded].shape)

    y, final = m(x, state, lengths)
    assert np.all(y[padded] == 0)
    assert_identical(m(x_other, state, lengths), (y, final))
    assert_identical(m.gates(x_other, state, lengths), m.gates(x, state, lengths))

    (y_v, final_v), pullback = m.vjp(x, state, lengths)
    assert_identical((y_v, final_v), (y, final))
    grads = pullback(dy, dstate)
    dx = grads[0]
    assert np.all(dx[padded] == 0)
    assert_identical(pullback(dy_other, dstate), grads)

    (y_o, final_o), pullback_other = m.vjp(x_other, state, lengths)
    assert_identical((y_o, final_o), (y, final))
    assert_identical(pullback_other(dy, dstate), grads)
    assert_identical(pullback_other(dy_other, dstate), grads)


@given(setup=setups(use_lengths=st.just(True)))
def test_padding_equals_truncation(setup):
    # Sequence b with its padding cut off, run alone as an unbatched input,
    # gives the same outputs, final state and gradients as inside the batch;
    # the batch's parameter gradient is the sum over its sequences.
    m = setup.model()
    x, state, lengths = setup.x(), setup.state(), setup.lengths()
    dy, dstate = setup.dy(), setup.dstate()
    dtype = setup.dtype
    (y, final), pullback = m.vjp(x, state, lengths)
    dx, dstate0, dparams = pullback(dy, dstate)

    def column(tree, b):  # the state (or its gradient) of sequence b
        return tuple(a[:, b] for a in tree) if isinstance(tree, tuple) else tree[:, b]

    def close(a, d, msg):
        if isinstance(d, tuple):
            for k, (u, v) in enumerate(zip(a, d)):
                assert_close(u, v, dtype, f"{msg}[{k}]")
        else:
            assert_close(a, d, dtype, msg)

    total = {k: np.zeros_like(v) for k, v in dparams.items()}
    for b, n in enumerate(lengths):
        (y_b, final_b), pullback_b = m.vjp(x[:n, b], column(state, b))
        close(y_b, y[:n, b], f"y of sequence {b}")
        close(final_b, column(final, b), f"final state of sequence {b}")
        dx_b, dstate0_b, dparams_b = pullback_b(dy[:n, b], column(dstate, b))
        close(dx_b, dx[:n, b], f"dx of sequence {b}")
        close(dstate0_b, column(dstate0, b), f"initial state gradient of sequence {b}")
        for k in total:
            total[k] += dparams_b[k]
    for k in total:
        assert_close(total[k], dparams[k], dtype, k)


@given(setup=setups(unbatched=st.just(False)))
def test_batch_first_is_a_transpose(setup):
    m = setup.model()
    m_bf = Setup(**{**setup.__dict__, "batch_first": True}).model()
    assert_identical(m_bf.state_dict(), m.state_dict(), "parameters from the same seed")
    x, state, lengths = setup.x(), setup.state(), setup.lengths()
    dy, dstate = setup.dy(), setup.dstate()
    x_bf, dy_bf = x.transpose(1, 0, 2).copy(), dy.transpose(1, 0, 2).copy()

    (y, final), pullback = m.vjp(x, state, lengths)
    (y_bf, final_bf), pullback_bf = m_bf.vjp(x_bf, state, lengths)
    assert_identical(y_bf, y.transpose(1, 0, 2).copy(), "y")
    assert_identical(final_bf, final, "final state")
    # gates() is time-major whatever batch_first is.
    assert_identical(m_bf.gates(x_bf, state, lengths), m.gates(x, state, lengths), "gates")
    dx, dstate0, dparams = pullback(dy, dstate)
    dx_bf, dstate0_bf, dparams_bf = pullback_bf(dy_bf, dstate)
    assert_identical(dx_bf, dx.transpose(1, 0, 2).copy(), "dx")
    assert_identical(dstate0_bf, dstate0, "dstate")
    assert_identical(dparams_bf, dparams, "dparams")


# --------------------------------------------------------------------------
# Splitting a sequence
# --------------------------------------------------------------------------


@given(
    setup=setups(bidirectional=st.just(False), use_lengths=st.just(False), max_layers=3, min_T=2),
    data=st.data(),
)
def test_split_sequence_with_carried_state_equals_whole(setup, data):
    split = data.draw(st.integers(1, setup.T - 1), label="split")
    m = setup.model()
    x, state = setup.x(), setup.state()

    y, final = m(x, state)
    y_a, mid = m(x[:split], state)
    y_b, final_split = m(x[split:], mid)

    assert_close(np.concatenate([y_a, y_b]), y, setup.dtype, "y")
    if setup.family in STATES:
        # (h, c) or (h, c, n, m): the carried state continues the sequence
        for k, (a, d) in enumerate(zip(final_split, final)):
            assert_close(a, d, setup.dtype, f"state[{k}]")
    else:
        assert_close(final_split, final, setup.dtype, "h")


# --------------------------------------------------------------------------
# Thread count
# --------------------------------------------------------------------------


@given(setup=setups(use_lengths=st.just(True)), threads=st.integers(1, MAX_THREADS))
def test_thread_count_does_not_change_results(setup, threads):
    m = setup.model()
    x, state, lengths = setup.x(), setup.state(), setup.lengths()
    dy, dstate = setup.dy(), setup.dstate()
    before = fg.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            fg.set_num_threads(n, adaptive=False)
            assert fg.get_num_threads() == n
            out, pullback = m.vjp(x, state, lengths)
            results.append((out, pullback(dy, dstate)))
    finally:
        fg.set_num_threads(before)
    one, many = results

    def close(a, d, path):
        if isinstance(d, dict):
            for k in d:
                close(a[k], d[k], f"{path}[{k!r}]")
        elif isinstance(d, tuple):
            for k, (u, v) in enumerate(zip(a, d)):
                close(u, v, f"{path}[{k}]")
        else:
            assert_close(a, d, setup.dtype, path)

    close(many, one, "result")


# --------------------------------------------------------------------------
# Inputs are never modified; pullbacks are repeatable
# --------------------------------------------------------------------------


@given(
    setup=setups(unbatched=st.booleans(), batch_first=st.booleans()),
    x_dtype=st.sampled_from(DTYPES),
    pass_dstate=st.booleans(),
)
def test_inputs_unmodified_and_pullback_repeatable(setup, x_dtype, pass_dstate):
    m = setup.model()
    x, state, lengths = setup.x(dtype=x_dtype), setup.state(), setup.lengths()
    dy, dstate = setup.dy(), setup.dstate() if pass_dstate else None
    inputs = (x, state, lengths, dy, dstate)
    saved = copy_tree(inputs)
    params = m.state_dict()

    m(x, state, lengths)
    m.gates(x, state, lengths)
    (y, final), pullback = m.vjp(x, state, lengths)
    first = pullback(dy, dstate)
    first_saved = copy_tree(first)
    second = pullback(dy, dstate)

    assert_identical(inputs, saved, "inputs")
    assert_identical(second, first_saved, "second pullback")
    assert_identical(first, first_saved, "first pullback after the second call")
    assert_identical(m.state_dict(), params, "parameters")

    dx, dstate0, dparams = first
    assert dx.shape == x.shape and dx.dtype == np.dtype(setup.dtype)
    if setup.family in STATES:
        assert isinstance(dstate0, tuple) and len(dstate0) == STATES[setup.family]
        for a in dstate0:
            assert a.shape == setup.state_shape() and a.dtype == np.dtype(setup.dtype)
    else:
        assert dstate0.shape == setup.state_shape() and dstate0.dtype == np.dtype(setup.dtype)
    assert dparams.keys() == params.keys()
    for k in params:
        assert dparams[k].shape == params[k].shape and dparams[k].dtype == params[k].dtype, k


@given(setup=setups(max_layers=1))
def test_state_dict_returns_copies_and_load_keeps_argument(setup):
    m = setup.model()
    before = m.state_dict()
    leaked = m.state_dict()
    for v in leaked.values():
        v[...] = 7
    assert_identical(m.state_dict(), before)

    new = random_params(m, setup.rng(0), 1.0)
    new_saved = copy_tree(new)
    m.load_state_dict(new)
    assert_identical(new, new_saved, "load_state_dict argument")
    assert_identical(m.state_dict(), new_saved)


@pytest.mark.parametrize("cell_kind", ["lstm", "gru", "gru_classic"])
@given(
    B=st.integers(0, 3),
    I=st.integers(1, 4),
    H=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_cell_inputs_unmodified_and_pullback_repeatable(cell_kind, B, I, H, dtype, seed):
    if cell_kind == "lstm":
        cell = fg.LSTMCell(I, H, dtype=dtype, seed=seed)
    else:
        cell = fg.GRUCell(I, H, reset_after=cell_kind == "gru", dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    lead = (B,) if B else ()  # B == 0: unbatched

    def arr(*shape):
        return rng.standard_normal(lead + shape).astype(dtype)

    x = arr(I)
    state = (arr(H), arr(H)) if cell_kind == "lstm" else arr(H)
    dout = (arr(H), arr(H)) if cell_kind == "lstm" else arr(H)
    saved = copy_tree((x, state, dout))

    out = cell(x, state)
    out_v, pullback = cell.vjp(x, state)
    assert_identical(out_v, out, "vjp output")
    first = pullback(dout)
    first_saved = copy_tree(first)
    second = pullback(dout)

    assert_identical((x, state, dout), saved, "inputs")
    assert_identical(second, first_saved, "second pullback")
    assert_identical(first, first_saved, "first pullback after the second call")
