"""minGRU and minLSTM: the cells whose gates see only the input, and their parallel scan.

Each against the line-by-line NumPy reference (``tests/reference.py``, a
plain sequential loop) in both dtypes and both candidate forms, with every
layer option and on the scan's paths (a batch of one sequence cut into
blocks of time, larger batches scanned whole); every gradient against
central differences in float64; the scan kernels on their own (Hypothesis:
blocks of time = the sequential scan within the stated bound, the same bits
on any number of threads); the accuracy promised at T = 100,000; the layer
contract.  The invariants every cell shares (gates in range, padding,
splitting, threads, a closed input keeping the state) are drawn in
``test_properties.py``; checkpointing and the memory formula in
``test_long.py``.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgates as fg
import reference as ref
from _bitwise import assert_bitwise
from _tolerances import assert_close
from fastgates import _scan
from test_gradcheck import check_layer_gradients

CELLS = {"mingru": fg.MinGRU, "minlstm": fg.MinLSTM}

# (T, B, I, H, options, with_state, lengths): a plain layer; stacked and
# bidirectional with lengths and a state; reversed without biases; one
# sequence long enough to be scanned in blocks of time (B = 1: 16 blocks
# of 64 steps at T = 1024), with lengths that end inside a block; a batch
# scanned in a few blocks (B = 3: 5 blocks).
CASES = {
    "plain": (5, 3, 4, 6, {}, False, None),
    "stacked_bi_lengths": (7, 4, 3, 5, {"num_layers": 2, "bidirectional": True}, True,
                           [7, 2, 5, 1]),
    "reverse_nobias": (6, 2, 3, 4, {"reverse": True, "bias": False}, True, [6, 3]),
    "blocks_of_time": (1024, 1, 3, 5, {"bidirectional": True}, True, None),
    "blocks_lengths": (400, 3, 2, 3, {"reverse": True}, True, [400, 257, 3]),
}


def _reference(kind, m, x, h0, lengths):
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    h0 = None if h0 is None else h0.astype(m.dtype).astype(np.float64)
    return ref.reference_scan_cell(kind, x.astype(m.dtype).astype(np.float64), params,
                                   m.num_layers, m.bidirectional, h0, lengths, m.reverse,
                                   m.positive)


@pytest.mark.parametrize("positive", [False, True], ids=["linear", "positive"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", list(CELLS))
def test_matches_reference(kind, case, dtype, positive):
    T, B, I, H, options, with_state, lengths = CASES[case]
    m = CELLS[kind](I, H, dtype=dtype, seed=2, positive=positive, **options)
    rng = np.random.default_rng([len(case), T, B])
    x = rng.standard_normal((T, B, I))
    num = m.num_layers * m.num_directions
    h0 = rng.standard_normal((num, B, H)) if with_state else None
    y, h = m(x, h0, lengths)
    gates = m.gates(x, h0, lengths)
    yr, hr, gr = _reference(kind, m, x, h0, lengths)
    assert_close(y, yr, dtype, "y")
    assert_close(h, hr, dtype, "h")
    assert set(gates) == set(gr)
    for k in gr:
        assert_close(gates[k], gr[k], dtype, k)


GRADIENT_CASES = [
    ("mingru", {"num_layers": 2, "bidirectional": True}),
    ("mingru", {"positive": True, "bias": False, "reverse": True}),
    ("minlstm", {"num_layers": 2, "bidirectional": True}),
    ("minlstm", {"positive": True, "bias": False, "reverse": True}),
]


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("kind, options", GRADIENT_CASES,
                         ids=[f"{c}-{'-'.join(o)}" for c, o in GRADIENT_CASES])
def test_gradients_match_finite_differences(kind, options, use_lengths):
    m = CELLS[kind](2, 2, dtype=np.float64, seed=7, **options)
    rng = np.random.default_rng([len(options), int(use_lengths), len(kind)])
    check_layer_gradients(m, kind, rng, use_lengths)


@pytest.mark.parametrize("positive", [False, True], ids=["linear", "positive"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_gradients_through_blocks_of_time(kind, positive):
    # B = 1, T = 300: four blocks of 75 steps, lengths ending in the third.
    # Directional central differences of a loss of y and the final state
    # against the pullback, for x, the initial state and every parameter.
    T, I, H = 300, 2, 3
    assert _scan.scan_blocks(T, 1) == 4
    m = CELLS[kind](I, H, bidirectional=True, dtype=np.float64, seed=3, positive=positive)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((T, 1, I))
    h0 = rng.standard_normal((2, 1, H))
    dy = rng.standard_normal((T, 1, 2 * H))
    dh = rng.standard_normal((2, 1, H))
    lengths = [200]
    params = m.state_dict()

    def loss(x, h0, params):
        m.load_state_dict(params)
        y, h = m(x, h0, lengths)
        return np.sum(y * dy) + np.sum(h * dh)

    _, pullback = m.vjp(x, h0, lengths)
    dx, dh0, dparams = pullback(dy, dh)
    eps = 1e-6
    for name, value, grad in [("x", x, dx), ("h0", h0, dh0)] + [
            (k, params[k], dparams[k]) for k in params]:
        d = rng.standard_normal(value.shape)

        def shifted(sign):
            args = {"x": x, "h0": h0, "params": dict(params)}
            moved = value + sign * eps * d
            if name in ("x", "h0"):
                args[name] = moved
            else:
                args["params"][name] = moved
            return loss(**args)

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        analytic = np.sum(grad * d)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), name
    m.load_state_dict(params)


# -- the scan kernels on their own ---------------------------------------------------


def _scan_problem(rng, T, B, H, dtype):
    """Coefficients with exact 0s and 1s among them, lengths, a state, cotangents."""
    a = rng.uniform(0, 1, (T, B, H))
    a[rng.random((T, B, H)) < 0.05] = 1.0
    a[rng.random((T, B, H)) < 0.02] = 0.0
    b = rng.standard_normal((T, B, H))
    # the scan reads b as a product of two columns: b times ones
    ab = np.ascontiguousarray(np.concatenate([a, b, np.ones_like(b)], axis=2), dtype=dtype)
    lengths = rng.integers(0, T + 1, B).astype(np.int64)
    lengths[0] = T
    h0 = rng.standard_normal((B, H)).astype(dtype)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    dhn = rng.standard_normal((B, H)).astype(dtype)
    return ab, lengths, h0, dy, dhn


def _run_scans(ab, lengths, h0, dy, dhn, reverse, nblocks):
    T, B, H3 = ab.shape
    H = H3 // 3
    y = np.empty((T, B, H), dtype=ab.dtype)
    hn = np.empty((B, H), dtype=ab.dtype)
    one = ab.dtype.type(1)
    zero = ab.dtype.type(0)
    _scan.scan_forward(ab, 0, zero, one, H, 2 * H, h0, lengths, reverse, nblocks, y, 0, hn)
    g = np.empty((T, B, 2 * H), dtype=ab.dtype)
    dh0 = np.empty((B, H), dtype=ab.dtype)
    _scan.scan_backward(dy, 0, dhn, ab, 0, zero, one, lengths, reverse, nblocks, g, H, dh0)
    return y, hn, g[:, :, H:], dh0


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 300), B=st.integers(1, 3), H=st.integers(1, 5),
       nblocks=st.integers(1, 16), reverse=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**32 - 1))
def test_blocks_of_time_equal_the_sequential_scan(T, B, H, nblocks, reverse, dtype, seed):
    # Any cut into blocks gives the sequential scan's values within the
    # bound of docs/mingru.md: 4 (T + S) eps M, with M the largest state
    # (or gradient) plus the largest term added to it; on 1 or 2 threads,
    # the same bits for the same cut.
    nblocks = min(nblocks, T)
    rng = np.random.default_rng(seed)
    ab, lengths, h0, dy, dhn = _scan_problem(rng, T, B, H, dtype)
    one = _run_scans(ab, lengths, h0, dy, dhn, reverse, 1)
    cut = _run_scans(ab, lengths, h0, dy, dhn, reverse, nblocks)
    eps = np.finfo(dtype).eps
    S = -(-T // nblocks)
    b = ab[:, :, H:2 * H]
    m_fwd = np.abs(one[0]).max() + max(np.abs(b).max(), np.abs(h0).max())
    m_bwd = np.abs(one[2]).max() + max(np.abs(dy).max(), np.abs(dhn).max())
    for k, scale in enumerate((m_fwd, m_fwd, m_bwd, m_bwd)):
        np.testing.assert_array_less(np.abs(cut[k] - one[k]), 4 * (T + S) * eps * scale + 1e-300)
    # the padded steps are exactly 0 either way
    pad = np.arange(T)[:, None] >= lengths[None, :]
    assert np.all(cut[0][pad] == 0) and np.all(cut[2][pad] == 0)
    threads = fg.get_num_threads()
    try:
        for n in (1, 2):
            fg.set_num_threads(n, adaptive=False)
            assert_bitwise(_run_scans(ab, lengths, h0, dy, dhn, reverse, nblocks), cut)
    finally:
        fg.set_num_threads(threads)


def test_block_count_depends_on_the_shape_only():
    assert _scan.scan_blocks(10, 1) == 1               # shorter than one block
    assert _scan.scan_blocks(1024, 1) == _scan.SCAN_TASKS
    assert _scan.scan_blocks(1000, 1) == 1000 // _scan.SCAN_MIN_STEPS
    assert _scan.scan_blocks(100_000, 4) == _scan.SCAN_TASKS // 4
    assert _scan.scan_blocks(100_000, _scan.SCAN_TASKS) == 1
    assert _scan.scan_blocks(100_000, 1000) == 1


# -- accuracy of long sequences ------------------------------------------------------------


def _long_reference(kind, m, x):
    """The float64 sequential recurrence over one sequence, from the model's parameters."""
    w = m.weight_ih_l0.astype(np.float64)
    bias = m.bias_ih_l0.astype(np.float64)
    H = m.hidden_size
    pre = x[:, 0].astype(np.float64) @ w.T + bias
    n = pre[:, -H:]
    if m.positive:
        n = ref.positive_candidate(n)
    if kind == "mingru":
        z = ref.sigmoid(pre[:, :H])
        a, b = 1 - z, z * n
    else:
        f, i = ref.sigmoid(pre[:, :H]), ref.sigmoid(pre[:, H:2 * H])
        a, b = f / (f + i), i / (f + i) * n
    h = np.zeros(H)
    y = np.empty((len(x), H))
    for t in range(len(x)):
        h = a[t] * h + b[t]
        y[t] = h
    return y


@pytest.mark.parametrize("positive", [False, True], ids=["linear", "positive"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_float32_stays_accurate_over_100k_steps(kind, positive):
    # Memories from 2 to 20,000 steps (the kept fraction 1 - 1/tau), so
    # that rounding could build up over long spans: float32 within 1e-4 of
    # the largest |h| of the float64 recurrence at every one of 100,000
    # steps, scanned in blocks of time.
    T, I, H = 100_000, 2, 8
    m = CELLS[kind](I, H, dtype=np.float32, seed=5, positive=positive)
    tau = np.geomspace(2, 20_000, H)
    params = m.state_dict()
    keep = np.log(1 - 1 / tau) - np.log(1 / tau)         # logit of the kept fraction
    params["bias_ih_l0"][:H] = -keep if kind == "mingru" else keep
    if kind == "minlstm":
        params["bias_ih_l0"][H:2 * H] = 0.0
        params["weight_ih_l0"][:2 * H] *= 0.1
    else:
        params["weight_ih_l0"][:H] *= 0.1
    m.load_state_dict(params)
    x = np.random.default_rng(1).standard_normal((T, 1, I)).astype(np.float32)
    y, _ = m(x)
    yr = _long_reference(kind, m, x)
    err = np.abs(y[:, 0] - yr).max() / np.abs(yr).max()
    assert err <= 1e-4, err


# -- the layer contract --------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_changes_no_bit(kind, dtype):
    m = CELLS[kind](3, 5, num_layers=2, bidirectional=True, dtype=dtype, seed=3, positive=True)
    rng = np.random.default_rng(6)
    T, B = 50, 64
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    dy = rng.standard_normal((T, B, 10)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    (y, h), pullback = m.vjp(x, lengths=lengths)
    (yk, hk), pullback_k = m.vjp(x, lengths=lengths, checkpoint=16)
    assert_bitwise((yk, hk, pullback_k(dy)), (y, h, pullback(dy)))


@pytest.mark.parametrize("kind", list(CELLS))
def test_parameters_save_load_and_flat(kind, tmp_path):
    cls = CELLS[kind]
    m = cls(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0, positive=True)
    G = 2 if kind == "mingru" else 3
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        "weight_ih_l0": (G * 4, 3), "bias_ih_l0": (G * 4,),
        "weight_ih_l0_reverse": (G * 4, 3), "bias_ih_l0_reverse": (G * 4,),
        "weight_ih_l1": (G * 4, 8), "bias_ih_l1": (G * 4,),
        "weight_ih_l1_reverse": (G * 4, 8), "bias_ih_l1_reverse": (G * 4,)}
    bound = 1 / np.sqrt(4)
    assert all(np.abs(v).max() <= bound for v in m.state_dict().values())
    path = tmp_path / "model.npz"
    fg.save(m, path)
    back = fg.load(path)
    assert type(back) is cls and repr(back) == repr(m) and back.positive
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    assert_bitwise(back(x), m(x))
    v = m.get_flat_params()
    assert v.shape == (m.num_params,) == (sum(p.size for p in m.state_dict().values()),)
    other = cls(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=9, positive=True)
    other.set_flat_params(v)
    assert_bitwise(other(x), m(x))


@pytest.mark.parametrize("kind", list(CELLS))
def test_chrono_sets_the_kept_fraction(kind):
    # chrono draws each unit's kept fraction's logit b = log(u), u in
    # [1, t_max - 1]: minGRU's z bias is -b (kept 1 - z = sigmoid(b));
    # minLSTM's f bias b and i bias -b (f' = sigmoid(b) / (sigmoid(b) +
    # sigmoid(-b)) = sigmoid(b)).  Zero input weights: the bias alone.
    m = CELLS[kind](2, 3, dtype=np.float64, seed=0)
    fg.init.chrono(m, 10, seed=1)
    params = m.state_dict()
    params["weight_ih_l0"][:] = 0
    m.load_state_dict(params)
    g = m.gates(np.zeros((4, 1, 2)))
    bias = m.bias_ih_l0
    if kind == "mingru":
        kept, b = 1 - g["z"][0, :, 0], -bias[:3]
    else:
        kept, b = g["f"][0, :, 0], bias[:3]
        np.testing.assert_array_equal(bias[3:6], -b)
    assert np.all((1 <= np.exp(b)) & (np.exp(b) <= 9 + 1e-12))
    np.testing.assert_allclose(kept, np.broadcast_to(1 / (1 + np.exp(-b)), kept.shape),
                               rtol=1e-12)


@pytest.mark.parametrize("kind", list(CELLS))
def test_options_checked_and_converters_refuse(kind):
    cls = CELLS[kind]
    with pytest.raises(TypeError, match="positive"):
        cls(2, 3, positive="yes")
    m = cls(2, 3)
    assert "positive" not in repr(m)
    label = m._spec.label
    from fastgates.layers import refuse_without_counterpart
    for framework in ("torch.nn", "ONNX", "Keras"):
        with pytest.raises(TypeError, match=f"no {label} layer"):
            refuse_without_counterpart(m, framework)


@pytest.mark.parametrize("kind", list(CELLS))
def test_readout_and_scipy_objective(kind):
    rnn = CELLS[kind](2, 3, dtype=np.float64, seed=1)
    model = fg.Readout(rnn, fg.Linear(3, 1, dtype=np.float64, seed=2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4, 2))
    target = rng.standard_normal((4, 1))
    fun = fg.scipy_objective(model, fg.mse_loss, x, target)
    v = model.get_flat_params()
    loss, grad = fun(v)
    d = rng.standard_normal(v.shape)
    eps = 1e-6
    numeric = (fun(v + eps * d)[0] - fun(v - eps * d)[0]) / (2 * eps)
    assert abs(numeric - grad @ d) <= 1e-7 * max(1, abs(numeric))


def test_the_scan_benchmark_runs_and_checks_its_answers(capsys):
    # bench --scan on a tiny grid: every side timed, PyTorch's log-space scan
    # agreeing in float64 (or the run fails), the scan's own rows at B = 1.
    pytest.importorskip("torch")
    from fastgates import bench

    threads = fg.get_num_threads()
    args = bench._parser("bench").parse_args(
        ["--scan", "--scan-T", "130", "--scan-B", "1", "2", "--scan-H", "4", "--scan-input", "3",
         "--threads", "1", "--dtypes", "float32", "--repeats", "1"])
    try:
        assert bench.run(args) == 0
    finally:
        fg.set_num_threads(threads)
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| 130 |")]
    assert len(rows) == 3                       # two training rows, one scan row
    cells = rows[0].split("|")
    assert all(c.strip() not in ("", "-") for c in cells[6:18]), rows[0]
    assert float(cells[17]) <= 1e-9             # the float64 agreement


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minlstm_ratio_where_both_gates_vanish(dtype):
    # Pre-activations -200 and -201: f and i underflow to 0 in float32 (0/0
    # for f/(f+i)) and are below 2**-100 in float64; the ratio comes from
    # their difference, f' = sigmoid(1), i' = sigmoid(-1), in both dtypes.
    m = fg.MinLSTM(2, 3, dtype=dtype, seed=0)
    params = m.state_dict()
    params["weight_ih_l0"][:6] = 0
    params["bias_ih_l0"][:3] = -200.0
    params["bias_ih_l0"][3:6] = -201.0
    m.load_state_dict(params)
    x = np.random.default_rng(0).standard_normal((5, 2, 2)).astype(dtype)
    g = m.gates(x)
    sig = 1 / (1 + np.exp(-1.0))
    assert_close(g["f"], np.full(g["f"].shape, sig), dtype, "f")
    assert_close(g["i"], np.full(g["i"].shape, 1 - sig), dtype, "i")
    (y, h), pullback = m.vjp(x)
    dx, dh0, grads = pullback(np.ones_like(y))
    assert all(np.all(np.isfinite(v)) for v in (y, h, dx, dh0, *grads.values()))
