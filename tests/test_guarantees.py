"""The guarantees of docs/guarantees.md, one section each.

- non-finite values: the ``check_finite`` policy, both ways;
- awkward arrays give bitwise the answers of contiguous native copies, and
  inputs are never written;
- exploding weights and inputs saturate the gates cleanly;
- determinism across thread counts, pool sizes, call orders and seeds;
- thread safety: concurrent calls give the answers of serial ones, and the
  kernels release the GIL.
"""

import hashlib
import json
import os
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastgates as fg
from _child import ROOT, run_python
from _bitwise import assert_bitwise, flat
from _messages import raises
from _tolerances import assert_close

T, B, I, H = 5, 3, 3, 4
KINDS = ["lstm", "gru"]


def make(kind, dtype=np.float64, **kw):
    kw.setdefault("seed", 0)
    cls = fg.LSTM if kind == "lstm" else fg.GRU
    return cls(I, H, dtype=dtype, **kw)


def make_state(kind, num, rng, dtype=np.float64):
    h = rng.standard_normal((num, B, H)).astype(dtype)
    return (h, rng.standard_normal((num, B, H)).astype(dtype)) if kind == "lstm" else h


def everything(m, x, state, lengths, dy, dstate=None):
    """Outputs, gates and gradients of one model on one input."""
    out = m(x, state, lengths)
    gates = m.gates(x, state, lengths)
    (y, s), pullback = m.vjp(x, state, lengths)
    return out, gates, (y, s), pullback(dy, dstate)


# --------------------------------------------------------------------------
# 1. Non-finite values
# --------------------------------------------------------------------------


def _with(a, index, value):
    a = a.copy()
    a[index] = value
    return a


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("call", ["__call__", "vjp", "gates"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_x_raises_and_propagates_when_unchecked(kind, call, bad):
    m = make(kind)
    x = _with(np.random.default_rng(0).standard_normal((T, B, I)), (2, 1, 0), bad)
    with pytest.raises(ValueError, match=r"^x must be finite"):
        getattr(m, call)(x)
    out = getattr(m, call)(x, check_finite=False)
    y = out["o" if kind == "lstm" else "z"] if call == "gates" else (out[0][0] if call == "vjp" else out[0])
    if np.isnan(bad):
        assert np.isnan(y).any()       # NaN propagates; inf may saturate the gates to finite values


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_in_padding_is_allowed_and_ignored(kind):
    m = make(kind, bidirectional=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I))
    lengths = np.array([T, 2, 1])
    dirty = x.copy()
    dirty[2:, 1] = np.nan
    dirty[1:, 2] = np.inf
    clean = x.copy()
    clean[2:, 1] = 0
    clean[1:, 2] = 0
    dy = rng.standard_normal((T, B, 2 * H))
    dy_dirty = dy.copy()
    dy_dirty[3:, 1] = np.nan                 # dy at padded steps is ignored too
    got = everything(m, dirty, None, lengths, dy_dirty)
    assert_bitwise(got, everything(m, clean, None, lengths, dy))
    for a in flat(got):
        assert np.isfinite(a).all()


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_state_raises(kind):
    m = make(kind)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, B, I))
    state = make_state(kind, 1, rng)
    if kind == "lstm":
        for k, name in enumerate([r"state\[0\] \(h\)", r"state\[1\] \(c\)"]):
            bad = tuple(_with(s, (0, 1, 1), np.nan) if j == k else s for j, s in enumerate(state))
            with pytest.raises(ValueError, match=name):
                m(x, bad)
            assert np.isnan(m(x, bad, check_finite=False)[0]).any()
    else:
        bad = _with(state, (0, 1, 1), np.inf)
        with pytest.raises(ValueError, match="^state must be finite"):
            m.vjp(x, bad)
        m(x, bad, check_finite=False)                     # no error
        assert np.isnan(m(x, _with(state, (0, 1, 1), np.nan), check_finite=False)[0]).any()


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_cotangents_raise_with_the_setting_of_vjp(kind):
    m = make(kind)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((T, B, I))
    dy = _with(rng.standard_normal((T, B, H)), (0, 0, 0), np.nan)
    _, pullback = m.vjp(x)
    with pytest.raises(ValueError, match="^dy must be finite"):
        pullback(dy)
    dstate = make_state(kind, 1, rng)
    dbad = (_with(dstate[0], (0, 0, 0), np.inf), dstate[1]) if kind == "lstm" else _with(dstate, (0, 0, 0), np.inf)
    with raises(ValueError, "dstate"):
        pullback(np.zeros((T, B, H)), dbad)
    assert np.isnan(pullback(dy, check_finite=False)[0]).any()
    _, unchecked = m.vjp(x, check_finite=False)
    dx, _, dparams = unchecked(dy)
    assert np.isnan(dx).any() and np.isnan(dparams["weight_hh_l0"]).any()


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_parameters_refused_unless_unchecked(kind):
    m = make(kind)
    before = m.state_dict()
    d = dict(before, weight_hh_l0=_with(before["weight_hh_l0"], (0, 0), np.nan))
    with raises(ValueError, "weight_hh_l0"):
        m.load_state_dict(d)
    assert_bitwise(m.state_dict(), before)              # nothing loaded
    v = _with(m.get_flat_params(), 3, np.inf)
    with raises(ValueError, "weight_ih_l0"):
        m.set_flat_params(v)
    m.load_state_dict(d, check_finite=False)
    assert np.isnan(m(np.ones((T, B, I)))[0]).any()
    m.set_flat_params(v, check_finite=False)
    assert np.isinf(m.weight_ih_l0).any()


def test_value_beyond_float32_range_counts_as_inf():
    m = make("gru", dtype=np.float32)
    with pytest.raises(ValueError, match="^x must be finite"):
        m(np.full((T, B, I), 1e300))


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_cells(kind):
    cell = (fg.LSTMCell if kind == "lstm" else fg.GRUCell)(I, H, dtype=np.float64, seed=0)
    x = np.ones((B, I))
    with pytest.raises(ValueError, match="^x must be finite"):
        cell(_with(x, (0, 0), np.nan))
    assert np.isnan(flat(cell(_with(x, (0, 0), np.nan), check_finite=False))[0]).any()
    _, pullback = cell.vjp(x)
    dout = tuple(np.full((B, H), np.nan) for _ in range(2)) if kind == "lstm" else np.full((B, H), np.nan)
    with raises(ValueError, "dout"):
        pullback(dout)
    _, unchecked = cell.vjp(x, check_finite=False)
    assert np.isnan(unchecked(dout)[0]).all()


def test_nonfinite_readout():
    model = fg.Readout(make("gru"), fg.Linear(H, 2, dtype=np.float64, seed=1), mode="sequence")
    x = np.random.default_rng(4).standard_normal((T, B, I))
    lengths = np.array([T, 2, 1])
    with pytest.raises(ValueError, match="^x must be finite"):
        model(_with(x, (0, 1, 0), np.nan), lengths=lengths)
    model(_with(x, (4, 1, 0), np.nan), lengths=lengths)   # padding
    out, pullback = model.vjp(x, lengths=lengths)
    pullback(_with(np.ones(out.shape), (4, 2, 0), np.nan))  # padding of dout is ignored
    with pytest.raises(ValueError, match="^dout must be finite"):
        pullback(_with(np.ones(out.shape), (0, 2, 0), np.nan))


def test_adam_refuses_nonfinite_gradients_unless_unchecked():
    m = make("gru")
    opt = fg.Adam(m)
    before = m.get_flat_params()
    grads = {k: np.zeros_like(v) for k, v in m.state_dict().items()}
    grads["bias_hh_l0"] = _with(grads["bias_hh_l0"], 0, np.nan)
    with raises(ValueError, "bias_hh_l0"):
        opt.step(grads)
    assert opt.steps == 0 and before.tobytes() == m.get_flat_params().tobytes()
    opt.step(grads, check_finite=False)
    assert np.isnan(m.get_flat_params()).any()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_drop_in_propagates_nan_like_pytorch(kind):
    torch = pytest.importorskip("torch")
    import fastgates.torch as fgt

    module = (fgt.LSTM if kind == "lstm" else fgt.GRU)(I, H)
    with torch.no_grad():
        module.weight_hh_l0[0, 0] = float("nan")
    x = torch.randn(T, B, I, requires_grad=True)
    x.data[0, 0, 0] = float("nan")
    y = module(x)[0]
    assert torch.isnan(y).any()
    y.sum().backward()
    assert torch.isnan(x.grad).any()


# --------------------------------------------------------------------------
# 2. Awkward arrays, inputs never written
# --------------------------------------------------------------------------


def _awkward(a, how):
    """A view of (a copy of) ``a`` with the same values in an awkward layout."""
    if how == "strided":
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        out = big[tuple(slice(None, None, 2) for _ in a.shape)]
    elif how == "fortran":
        out = np.asfortranarray(a)
    elif how == "negative":
        out = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        out = out[tuple(slice(None, None, -1) for _ in a.shape)]
    elif how == "bigendian":
        out = a.astype(a.dtype.newbyteorder(">"))
    else:
        out = a.copy()
    out.flags.writeable = False                            # read-only in every case
    np.testing.assert_array_equal(out, a)
    return out


LAYOUTS = ["readonly", "strided", "fortran", "negative", "bigendian"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("how", LAYOUTS)
def test_awkward_arrays_give_bitwise_the_same_answers(kind, dtype, how):
    rng = np.random.default_rng(5)
    m = make(kind, dtype=dtype, num_layers=2, bidirectional=True)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = make_state(kind, 4, rng, dtype)
    lengths = np.array([T, 2, 4])
    dy = rng.standard_normal((T, B, 2 * H)).astype(dtype)
    dstate = make_state(kind, 4, rng, dtype)
    want = everything(m, x, state, lengths, dy, dstate)

    ax, alen, ady = _awkward(x, how), _awkward(lengths, how), _awkward(dy, how)
    astate = tuple(_awkward(s, how) for s in state) if kind == "lstm" else _awkward(state, how)
    adstate = tuple(_awkward(s, how) for s in dstate) if kind == "lstm" else _awkward(dstate, how)
    copies = [a.copy() for a in flat((ax, alen, ady, astate, adstate))]
    assert_bitwise(everything(m, ax, astate, alen, ady, adstate), want)
    for a, c in zip(flat((ax, alen, ady, astate, adstate)), copies):
        assert a.tobytes() == c.tobytes()                   # never written

    params = {k: _awkward(v, how) for k, v in m.state_dict().items()}
    saved = {k: v.copy() for k, v in params.items()}
    m2 = make(kind, dtype=dtype, num_layers=2, bidirectional=True, seed=9)
    m2.load_state_dict(params)
    assert_bitwise(everything(m2, x, state, lengths, dy, dstate), want)
    assert_bitwise(params, saved)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 16])
def test_one_feature_inputs_with_any_stride_on_that_axis(kind, batch):
    # NumPy calls an array C-contiguous whatever the stride of a length-1
    # axis (x[:, :, None] of a series gives one): the kernels must not read
    # that stride (the demo's one-feature input once made the LSTM kernel
    # refuse its rows).  B = 16 makes chunks of 8 rows, B = 1 one chunk.
    rng = np.random.default_rng(12)
    m = (fg.LSTM if kind == "lstm" else fg.GRU)(1, H, dtype=np.float64, seed=0)
    x = rng.standard_normal((6, batch, 1))
    odd = np.lib.stride_tricks.as_strided(x, strides=x.strides[:2] + (12345 * 8,))
    assert odd.flags.c_contiguous and odd.strides[2] != 8
    dy = rng.standard_normal((6, batch, H))
    want = everything(m, x, None, None, dy, None)
    assert_bitwise(everything(m, odd, None, None, dy, None), want)


@pytest.mark.parametrize("kind", KINDS)
def test_cells_and_readout_accept_awkward_arrays(kind):
    rng = np.random.default_rng(6)
    cell = (fg.LSTMCell if kind == "lstm" else fg.GRUCell)(I, H, dtype=np.float64, seed=0)
    x = rng.standard_normal((B, I))
    for how in LAYOUTS:
        assert_bitwise(cell(_awkward(x, how)), cell(x))
    model = fg.Readout(make(kind), fg.Linear(H, 2, dtype=np.float64, seed=1))
    xs = rng.standard_normal((T, B, I))
    for how in LAYOUTS:
        assert_bitwise(model(_awkward(xs, how)), model(xs))


def test_zero_dim_inputs_are_refused_not_reshaped():
    with pytest.raises(ValueError, match="^x must be 3-D"):
        make("gru")(np.float64(1.0))
    with pytest.raises(ValueError, match="^x must be 2-D"):
        fg.GRUCell(I, H)(np.array(1.0))
    with pytest.raises(ValueError, match="^x must have at least one axis"):
        fg.Linear(I, 2)(np.array(1.0))
    with raises(ValueError, "target"):
        fg.mse_loss(np.ones(1), np.array(1.0))


# --------------------------------------------------------------------------
# 3. Exploding values
# --------------------------------------------------------------------------


def _explode_case(kind, dtype, weight_scale, x_value, bidirectional=True):
    m = make(kind, dtype=dtype, num_layers=2, bidirectional=bidirectional)
    m.load_state_dict({k: v * weight_scale for k, v in m.state_dict().items()})
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((T, B, I)) * x_value).astype(dtype)
    return m, x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "dtype, weight_scale, x_value",
    [(np.float64, 1e4, 1.0), (np.float64, 1e30, 1.0), (np.float64, 1e30, 1e30),
     (np.float32, 1e4, 1.0), (np.float32, 1e30, 1.0), (np.float32, 1.0, 1e30),
     (np.float32, 1.0, "max"), (np.float64, 1.0, "max")],
    ids=str)
def test_exploding_values_saturate_cleanly(kind, dtype, weight_scale, x_value):
    if x_value == "max":
        # +-max finite: with weights below 1 in size every pre-activation is
        # finite or overflows with one sign (never inf - inf).
        x_value = np.finfo(dtype).max
        m, x = _explode_case(kind, dtype, 1.0, 1.0)
        x = np.where(x > 0, x_value, -x_value).astype(dtype)
    else:
        m, x = _explode_case(kind, dtype, weight_scale, x_value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (y, state), pullback = m.vjp(x, lengths=np.array([T, 3, 1]))
        gates = m.gates(x)
        dx, dstate, dparams = pullback(np.ones_like(y))
    assert np.isfinite(y).all() and np.abs(y).max() <= 1
    h = state[0] if kind == "lstm" else state
    assert np.isfinite(h).all() and np.abs(h).max() <= 1
    for name, g in gates.items():
        assert np.isfinite(g).all(), name
        if name != "c":
            assert g.min() >= -1 and g.max() <= 1, name
    for a in flat((dx, dstate, dparams)):
        assert np.isfinite(a).all()


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e30), (np.float64, 1e300)])
def test_products_that_overflow_with_both_signs_follow_the_order_of_the_sum(dtype, big):
    # The limit of the guarantee above: x and the weights are finite, but
    # x_0 w_0 overflows to +-inf and x_1 w_1 to the other sign, so
    # check_finite cannot see it coming.  The input projection sums over the
    # inputs in order with fused multiply-adds (as PyTorch's float32 LSTM
    # does, measured): the first product rounds to +-inf, the second is
    # added exactly to it, and the pre-activation is that first infinity,
    # not NaN.  With every gate saturated, y is tanh(1) (all gates 1, g = 1)
    # or 0 (gates 0, g = -1).
    m = fg.LSTM(2, 1, bias=False, dtype=dtype, seed=0)
    d = m.state_dict()
    d["weight_ih_l0"] = np.full((4, 2), big, dtype)
    m.load_state_dict(d)
    y_pos = m(np.array([[[big, -big]]], dtype))[0]
    y_neg = m(np.array([[[-big, big]]], dtype))[0]
    assert_close(y_pos, np.full((1, 1, 1), np.tanh(1.0)), dtype)
    assert np.all(y_neg == 0)


# --------------------------------------------------------------------------
# 4. Determinism
# --------------------------------------------------------------------------

DET_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    import fastgates as fg

    def digest(arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def flat(r):
        if isinstance(r, np.ndarray):
            return [r]
        if isinstance(r, dict):
            return [a for k in r for a in flat(r[k])]
        return [a for x in r for a in flat(x)]

    rng = np.random.default_rng(0)
    models = {
        "lstm": fg.LSTM(5, 8, num_layers=2, bidirectional=True, dtype=np.float64, seed=0),
        "gru32": fg.GRU(5, 8, dtype=np.float32, seed=1),
        "lstm_big": fg.LSTM(16, 64, dtype=np.float32, seed=2),
        "lstm_tiles": fg.LSTM(64, 64, dtype=np.float32, seed=3),
        # one sequence: on two threads or more its kernels overlap with the
        # projection and the products (blocks of 38 steps, whatever the pool)
        "lstm_one": fg.LSTM(8, 32, dtype=np.float32, seed=4),
    }
    result = {}
    for name, m in models.items():
        T, B = (300, 1) if name == "lstm_one" else (60, 37)
        x = rng.standard_normal((T, B, m.input_size)).astype(m.dtype)
        lengths = rng.integers(1, T + 1, B) if B > 1 else np.array([T - 7])
        for n in range(1, fg.get_num_threads() + 1):
            fg.set_num_threads(n, adaptive=False)   # the n-thread paths, busy or not
            (y, s), pullback = m.vjp(x, lengths=lengths)
            g = pullback(np.ones_like(y))
            result[f"{name}/{n}/forward"] = digest(flat((y, s, m.gates(x, lengths=lengths))))
            result[f"{name}/{n}/gradients"] = digest(flat(g))
    print(json.dumps(result))
""")


def _determinism_run(pool):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(pool))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = run_python(DET_SCRIPT, env=env, capture_output=True, text=True, timeout=600,
                     check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def determinism_runs():
    return {pool: _determinism_run(pool) for pool in (1, 2, 4)}


def test_results_do_not_depend_on_set_num_threads(determinism_runs):
    for pool, result in determinism_runs.items():
        for key, value in result.items():
            name, _, what = key.split("/")
            assert value == result[f"{name}/1/{what}"], (pool, key)


def test_forward_does_not_depend_on_the_pool_size(determinism_runs):
    # Outputs, states and gates: bitwise the same for NUMBA_NUM_THREADS 1, 2
    # and 4 (4 is more than this machine's cores).
    for key, value in determinism_runs[1].items():
        if key.endswith("forward"):
            for pool in (2, 4):
                assert determinism_runs[pool][key] == value, (pool, key)


def test_gradients_depend_on_the_pool_size_only_for_split_products(determinism_runs):
    # Products below _recurrent.SPLIT_MIN_MACS run in one block whatever the
    # pool; larger ones are cut into one row block per pool thread, and
    # OpenBLAS's weight gradients (lstm_big's dW_ih: 16 input columns) and
    # dx may then round differently.  lstm_tiles makes every product over
    # time on the register tiles, split too, where each element's sum is
    # the same whatever the split: its gradients do not depend on the pool.
    for key, value in determinism_runs[1].items():
        if key.endswith("gradients") and not key.startswith("lstm_big"):
            for pool in (2, 4):
                assert determinism_runs[pool][key] == value, (pool, key)


def test_backward_products_side_by_side_give_the_bits_of_one_thread(monkeypatch):
    # On two or more threads an LSTM's small backward products run side by
    # side (_WeightGrads.add_side_by_side) or, when the batch is one chunk
    # (B = 1) and the steps make two blocks or more, block by block beside
    # the kernel (lstm_backward_overlapped), and the forward kernel's input
    # projection is made ahead of it by the other thread
    # (lstm_forward_overlapped); on one thread, one after another.  The
    # outputs and gradients are the same bits, with peepholes, without
    # biases, stacked and bidirectional (a reverse direction completes the
    # blocks first to last), checkpointed, with lengths, tiles or OpenBLAS.
    import numba

    import fastgates.cells.lstm as lstm_cell
    from fastgates import _recurrent
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a pool of two threads")
    from fastgates import _config
    overlapped = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(lstm_cell, name)

        def __call__(self, *args):
            overlapped.append((self.name, fg.get_num_threads()))
            return self.kernel(*args)

        def __getattr__(self, attr):      # what _config.Tier reads
            return getattr(self.kernel, attr)

    def spy(name):
        monkeypatch.setattr(lstm_cell, name, Spy(name))

    # the overlapped kernels run from the first call, compiled or not
    # (a process otherwise runs them once they pay: _config.Tier)
    monkeypatch.setattr(_config, "_eager_tiers", True)

    spy("lstm_forward_overlapped")
    spy("lstm_backward_overlapped")
    rng = np.random.default_rng(12)
    threads = fg.get_num_threads()
    cases = [dict(shape=(100, 1, 32, 64), overlap=True),
             dict(shape=(300, 1, 8, 32), peephole=True, overlap=True),
             dict(shape=(70, 1, 64, 16), bidirectional=True, num_layers=2, lengths=True,
                  overlap=True),
             dict(shape=(200, 1, 6, 24), checkpoint=50, bias=False, dtype=np.float64,
                  overlap=True),
             dict(shape=(9, 5, 70, 64), num_layers=2, bidirectional=True, checkpoint=4),
             dict(shape=(20, 3, 6, 16), bias=False, lengths=True, dtype=np.float64)]
    try:
        for case in cases:
            T, B, I, H = case.pop("shape")
            lengths = np.arange(B) % T + 1 if B > 1 and case.get("lengths") else None
            if B == 1 and case.get("lengths"):
                lengths = np.array([T - 5])
            case.pop("lengths", None)
            checkpoint = case.pop("checkpoint", None)
            dtype = case.pop("dtype", np.float32)
            overlap = case.pop("overlap", False)
            m = fg.LSTM(I, H, dtype=dtype, seed=4, **case)
            x = rng.standard_normal((T, B, I)).astype(dtype)
            grads = []
            for n in (1, 2):
                fg.set_num_threads(n, adaptive=False)   # the 2-thread paths, busy or not
                overlapped.clear()
                (y, s), pullback = m.vjp(x, lengths=lengths, checkpoint=checkpoint)
                grads.append((y, s, pullback(np.cos(y))))
                kernels = {name for name, threads in overlapped if threads == 2}
                want = {"lstm_forward_overlapped", "lstm_backward_overlapped"}
                assert kernels == (want if overlap and n == 2 else set()), (T, B, I, H, n)
                assert len(kernels) == len(set(overlapped))
            assert_bitwise(grads[0], grads[1])
            plans = [p for k, p in _recurrent._PLANS.items() if k[2] == I and k[1] == H
                     and (k[5], k[7]) == (T, B)]
            assert any(p is not False for p in plans), (T, B, I, H)
    finally:
        fg.set_num_threads(threads)


def test_call_order_does_not_matter():
    rng = np.random.default_rng(8)
    jobs = []
    for kind in KINDS:
        for dtype in (np.float32, np.float64):
            for Tn, Bn in [(3, 1), (7, 5), (20, 9)]:
                m = make(kind, dtype=dtype, bidirectional=Tn == 7)
                x = rng.standard_normal((Tn, Bn, I)).astype(dtype)
                D = m.num_directions
                dy = rng.standard_normal((Tn, Bn, D * H)).astype(dtype)
                jobs.append((m, x, dy))

    def run(job):
        m, x, dy = job
        (y, s), pullback = m.vjp(x)
        return y, s, pullback(dy)

    first = [run(j) for j in jobs]
    order = np.random.default_rng(9).permutation(len(jobs))
    again = {i: run(jobs[i]) for i in order}
    for i, r in enumerate(first):
        assert_bitwise(again[i], r)


# sha256 of get_flat_params() bytes for (input 2, hidden 3, seed 0): catches a
# change of the generator (NumPy's PCG64 and uniform) across machines or versions.
SEED_DIGESTS = {
    ("GRU", "float32"): "1c8140832aa3449cd0bbedec6a5bd483fe5f27a66b5abc2b1b0542d64c682b13",
    ("LSTM", "float32"): "43b51b701fce47f5176db8ff3046827a680e0bfbe54fda6ad6f2bedfc6ba0e96",
    ("GRU", "float64"): "d678108c0d304421f083b851f6455636fc5d4336a391909c2f1d6db71c371d8e",
    ("LSTM", "float64"): "0dd255bcd10774a5acd9cbd99b587db3b308edcd344b0aeb6a858ed90bcfaf69",
}


@pytest.mark.parametrize("cls, dtype", list(SEED_DIGESTS), ids=str)
def test_seed_gives_stored_parameters(cls, dtype):
    v = getattr(fg, cls)(2, 3, seed=0, dtype=dtype).get_flat_params()
    assert hashlib.sha256(v.tobytes()).hexdigest() == SEED_DIGESTS[(cls, dtype)]
    if cls == "GRU":
        # The first two values written out, for a reader (float64 draws).
        expected = [float.fromhex("0x1.43e401fe365a8p-3"), float.fromhex("-0x1.10350f350637ap-2")]
        np.testing.assert_array_equal(v[:2], np.array(expected).astype(dtype))


# --------------------------------------------------------------------------
# 5. Thread safety
# --------------------------------------------------------------------------


def _thread_jobs():
    rng = np.random.default_rng(10)
    models = [fg.LSTM(8, 32, dtype=np.float64, seed=1), fg.GRU(8, 32, dtype=np.float32, seed=2),
              fg.LSTM(8, 32, num_layers=2, bidirectional=True, dtype=np.float32, seed=3),
              fg.GRU(8, 32, reset_after=False, dtype=np.float64, seed=4)]
    jobs = []
    for k in range(16):
        m = models[k % 4]
        x = rng.standard_normal((40, 24, 8)).astype(m.dtype)
        lengths = rng.integers(1, 41, 24)
        jobs.append((m, x, lengths, k % 2 == 0))
    return jobs


def _thread_run(job):
    m, x, lengths, train = job
    if not train:
        return m(x, lengths=lengths)
    (y, s), pullback = m.vjp(x, lengths=lengths)
    return y, s, pullback(np.ones_like(y))


def test_concurrent_calls_match_serial_calls():
    jobs = _thread_jobs()
    serial = [_thread_run(j) for j in jobs]
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(_thread_run, jobs))
        for a, b in zip(concurrent, serial):
            assert_bitwise(a, b)


BLAS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's OpenBLAS, as Numba does)
    from concurrent.futures import ThreadPoolExecutor
    from threadpoolctl import threadpool_info, threadpool_limits
    from _bitwise import assert_bitwise
    from test_guarantees import _thread_jobs, _thread_run

    def blas():
        return {os.path.basename(os.path.dirname(lib["filepath"])): lib["num_threads"]
                for lib in threadpool_info() if lib["user_api"] == "blas"}

    seen = {"start": blas()}
    jobs = _thread_jobs()
    serial = [_thread_run(j) for j in jobs]
    seen["after serial calls"] = blas()
    # Then from worker threads (whose own settings OpenBLAS would ignore).
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(_thread_run, jobs))
    seen["after concurrent calls"] = blas()
    for a, b in zip(concurrent, serial):
        assert_bitwise(a, b)
    # The user sets SciPy's BLAS again, from this thread: one thread during
    # each call, the user's count restored after it, the same bits.
    with threadpool_limits(limits=2, user_api="blas"):
        seen["user's setting"] = blas()
        again = [_thread_run(j) for j in jobs]
        seen["after calls under the user's setting"] = blas()
    for a, b in zip(again, serial):
        assert_bitwise(a, b)
    print(json.dumps(seen))
""")


def test_blas_threads_in_a_fresh_process():
    # docs/guarantees.md, "Thread safety": SciPy's OpenBLAS (the one Numba
    # calls) is set to one thread at the first call that needs it and stays
    # so, for the calls of worker threads too (OpenBLAS obeys only the
    # thread that first set it: restoring the count after the main thread's
    # calls, as fastgates once did, left the workers' calls multi-threaded);
    # NumPy's own BLAS is left alone; a count the user sets afterwards is
    # restored after each call.  In a fresh process, so that no earlier
    # test has made the first call.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    tests = os.path.dirname(os.path.abspath(__file__))
    out = run_python(BLAS_SCRIPT, tests, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    if set(seen["start"]) != {"scipy.libs", "numpy.libs"}:
        pytest.skip(f"not the pip wheels' two OpenBLAS copies: {seen['start']}")
    assert seen["start"] == {"scipy.libs": 2, "numpy.libs": 2}, seen
    assert seen["after serial calls"] == {"scipy.libs": 1, "numpy.libs": 2}, seen
    assert seen["after concurrent calls"] == seen["after serial calls"], seen
    assert seen["user's setting"] == {"scipy.libs": 2, "numpy.libs": 2}, seen
    assert seen["after calls under the user's setting"] == seen["user's setting"], seen


def test_kernels_release_the_gil():
    # While another Python thread is inside a long kernel, this thread keeps
    # running Python: the longest pause it sees is far below the kernel's
    # duration.  A kernel holding the GIL would stall it for the whole call.
    # (Timing two models on two threads against one after the other also
    # shows the overlap on an idle machine, but not reliably on a shared one.)
    import threading

    m = fg.LSTM(16, 256, seed=0)
    x = np.random.default_rng(11).standard_normal((3000, 2, 16)).astype(np.float32)
    m(x[:2])
    t0 = time.perf_counter()
    m(x)
    duration = time.perf_counter() - t0
    worker = threading.Thread(target=m, args=(x,))
    stamps = []
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    gaps = np.diff(stamps)
    assert len(stamps) > 10 and gaps.max() < 0.5 * duration, (duration, gaps.max(), len(stamps))
