"""Long sequences, gradient checkpointing and the memory of a training step.

- ``vjp(..., checkpoint=k)`` gives bitwise the results of ``vjp(...)`` for
  every cell, variant, stack and interval (Hypothesis draws the shapes);
- T = 100,000 runs forward and backward with finite results, with and
  without checkpointing;
- ``training_memory`` agrees with what :mod:`tracemalloc` measures, and the
  memory of a checkpointed step grows like T / k + k.
"""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastgates as fg
from _bitwise import assert_bitwise, flat
from _messages import raises
from fastgates import _config, _recurrent


def make(kind, I, H, dtype, **kw):
    return fg.layers.layer_class(kind)(I, H, dtype=dtype, seed=kw.pop("seed", 0), **kw)


def step(m, x, dy, lengths=None, checkpoint=None, dstate=None):
    """Outputs, final state and every gradient of one training step."""
    (y, state), pullback = m.vjp(x, lengths=lengths, checkpoint=checkpoint)
    return y, state, pullback(dy, dstate)


def random_problem(m, T, B, rng, padded):
    x = rng.standard_normal((T, B, m.input_size)).astype(m.dtype)
    dy = rng.standard_normal((T, B, m.num_directions * m.hidden_size)).astype(m.dtype)
    lengths = None
    if padded:
        lengths = rng.integers(1, T + 1, B)
        lengths[0] = T
    num = m.num_layers * m.num_directions
    dh = rng.standard_normal((num, B, m.hidden_size)).astype(m.dtype)
    more = len(m._spec.states) - 1          # (h, c) of an LSTM, (h, c, n, m) of an sLSTM
    dstate = (dh,) + tuple(rng.standard_normal(dh.shape).astype(m.dtype)
                           for _ in range(more)) if more else dh
    return x, dy, lengths, dstate


VARIANTS = {
    "lstm": [{}, {"peephole": True}, {"clip": 1.5, "input_forget": True}, {"reverse": True}],
    "gru": [{}, {"reset_after": False}, {"clip": 1.5}, {"reverse": True}],
    "janet": [{}, {"beta": 0.0}, {"bias": False}, {"reverse": True}],
    "mgu": [{}, {"bias": False}, {}, {"reverse": True}],
    "slstm": [{}, {"num_heads": 5}, {"bias": False}, {"reverse": True}],   # H = 5
    "mingru": [{}, {"positive": True}, {"bias": False}, {"reverse": True}],
    "minlstm": [{}, {"positive": True}, {"bias": False}, {"reverse": True}],
}


def check_checkpointing(kind, dtype, variant, layers, bidirectional, T, B, every, padded, seed):
    kw = dict(VARIANTS[kind][variant])
    if kw.get("reverse"):
        bidirectional = False
    m = make(kind, 3, 5, dtype, num_layers=layers, bidirectional=bidirectional, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    x, dy, lengths, dstate = random_problem(m, T, B, rng, padded)
    full = step(m, x, dy, lengths, None, dstate)
    assert_bitwise(step(m, x, dy, lengths, every, dstate), full)


PROBLEMS = dict(kind=st.sampled_from(list(VARIANTS)), dtype=st.sampled_from([np.float32, np.float64]),
                variant=st.integers(0, 3), layers=st.integers(1, 3), bidirectional=st.booleans(),
                T=st.integers(1, 60), B=st.integers(1, 5), every=st.integers(1, 70),
                padded=st.booleans(), seed=st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(**PROBLEMS)
def test_checkpointing_changes_no_bit(**problem):
    # At these sizes a block (ceil(1024 / B) steps) covers the sequence:
    # one segment, recomputed.
    check_checkpointing(**problem)


@settings(max_examples=100, deadline=None)
@given(**PROBLEMS)
def test_checkpointing_changes_no_bit_across_many_blocks(**problem):
    # Blocks of one or two steps (2 rows): the segments cut through many
    # blocks, sequences end inside segments, backward directions read the
    # segments last first.  (Set by hand: a fixture would not be reset
    # between Hypothesis examples.)
    saved = _recurrent.ROWS_PER_BLOCK
    _recurrent.ROWS_PER_BLOCK = 2
    try:
        check_checkpointing(**problem)
    finally:
        _recurrent.ROWS_PER_BLOCK = saved


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_changes_no_bit_with_split_products(kind, dtype):
    # Products big enough to be split between the pool's threads (blocks of
    # 1024 rows x 64 x 4H well above SPLIT_MIN_MACS), a batch that does not
    # divide the block, two layers and both directions.
    T, B = 130, 24
    m = make(kind, 64, 96, dtype, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(3)
    x, dy, lengths, dstate = random_problem(m, T, B, rng, padded=True)
    grid = _recurrent._Grid(T, B)
    assert grid.parts(64, 4 * 96, T * B) == _recurrent._pool_size()
    full = step(m, x, dy, lengths, None, dstate)
    for every in (1, 50, 100, 129):
        assert _recurrent.checkpoint_interval(every, T, B) % grid.steps == 0
        assert_bitwise(step(m, x, dy, lengths, every, dstate), full)


def test_checkpoint_interval_is_rounded_to_whole_blocks():
    assert _recurrent.block_steps(100_000, 16) == 64
    assert _recurrent.block_steps(100_000, 3000) == 1
    # One sequence: about eight blocks of at least 16 steps (so that a
    # second thread can overlap the backward products with the kernel),
    # whatever the pool.
    assert _recurrent.block_steps(100_000, 1) == 1024
    assert _recurrent.block_steps(1000, 1) == 125
    assert _recurrent.block_steps(100, 1) == 16
    assert _recurrent.block_steps(100, 2) == 512
    assert _recurrent.checkpoint_interval(20, 100, 1) == 32
    assert _recurrent.checkpoint_interval(100, 100_000, 1) == 1024
    assert _recurrent.checkpoint_interval(1025, 100_000, 1) == 2048
    assert _recurrent.checkpoint_interval(64, 1000, 16) == 64
    assert _recurrent.checkpoint_interval(10**9, 1000, 16) == 1024   # whole blocks covering T


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                        (True, TypeError), ("10", TypeError)])
def test_bad_checkpoint_is_refused(bad, error):
    m = fg.LSTM(2, 3)
    with raises(error, "checkpoint"):
        m.vjp(np.zeros((4, 1, 2), np.float32), checkpoint=bad)
    with raises(error, "checkpoint"):
        m.training_memory(4, 1, checkpoint=bad)


# -- T = 100,000 ------------------------------------------------------------------

LONG_T = 100_000


def traced(fn):
    """``fn()`` and the NumPy bytes it allocated: still held, and at the peak."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, held - before, peak - before


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hundred_thousand_steps_forward_and_backward(kind, dtype):
    # Inputs of unit size and a loss that weighs every step: each weight
    # gradient is a sum of 200,000 terms.  Nothing overflows or turns NaN,
    # the state stays in the gates' ranges, and checkpointing (about sqrt(T)
    # steps) gives the same bits with a fraction of the memory.
    B, H = 2, 8
    m = make(kind, 3, H, dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((LONG_T, B, 3)).astype(dtype)
    dy = np.ones((LONG_T, B, H), dtype)
    runs = {}
    for every in (None, 300):
        def run(every=every):
            (y, state), pullback = m.vjp(x, checkpoint=every)
            return y, state, pullback(dy)
        runs[every] = traced(run)
    (y, state, (dx, dstate, dparams)), held, peak = runs[None]
    assert np.all(np.abs(y) < 1)
    for a in flat((state, dx, dstate, dparams)):
        assert np.all(np.isfinite(a))
    # A sum of 200,000 terms of size about 1 would be about 1e5: the
    # gradients are of that order, not inf and not NaN.
    assert 1 < np.abs(dparams["bias_ih_l0"]).max() < 1e6
    assert_bitwise(runs[300][0], runs[None][0])
    estimate = m.training_memory(LONG_T, B)
    estimate_ck = m.training_memory(LONG_T, B, checkpoint=300)
    assert peak <= 1.05 * estimate["peak"]
    assert runs[300][2] <= 1.05 * estimate_ck["peak"]
    assert runs[300][2] < peak / 3


# -- what a training step costs ------------------------------------------------------

MEMORY_CASES = [
    ("lstm", {}), ("gru", {}), ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("gru", {"num_layers": 3, "reset_after": False}), ("lstm", {"peephole": True, "clip": 3.0}),
    ("gru", {"bidirectional": True, "clip": 3.0}), ("janet", {"num_layers": 2, "bidirectional": True}),
    ("mgu", {"num_layers": 2}), ("lstm", {"num_layers": 2, "bidirectional": True, "proj_size": 8}),
    ("gru", {"num_layers": 3, "dropout": 0.3}),
    ("slstm", {"num_layers": 2, "bidirectional": True}), ("slstm", {"num_heads": 4}),
    ("mingru", {"num_layers": 2, "bidirectional": True}), ("minlstm", {"positive": True}),
]


@pytest.fixture
def one_thread():
    """Every call on one thread, whatever the machine's load, for tracemalloc.

    A parallel kernel runs its parallel form or its one-thread twin by the
    call's thread count, which depends on its shape and, on a busy machine,
    on the thread plan: a warm-up on a small input could compile one form
    and the measured call the other, and tracemalloc counts the compiler's
    allocations (measured in CI: 19 MB "kept" by a GRU's forward).  On one
    thread every call runs the twin; the arrays a step keeps are the same.
    The warm-up is then a call of the measured shape (a small one may take
    other kernels: a longer input is projected on the tiles of
    ``project_parallel``).
    """
    with _config.task_settings(threads=1):
        yield


@pytest.mark.parametrize("kind, kw", MEMORY_CASES)
@pytest.mark.parametrize("checkpoint", [None, 100, 1000])
def test_training_memory_matches_tracemalloc(kind, kw, checkpoint, one_thread):
    T, B, I, H = 3000, 4, 6, 20
    m = make(kind, I, H, np.float64, **kw)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, m.num_directions * (kw.get("proj_size") or H)))
    step(m, x, dy, checkpoint=checkpoint)        # compiled before measuring (one_thread)

    def forward():
        return m.vjp(x, checkpoint=checkpoint)

    (_, pullback), kept, peak_forward = traced(forward)
    _, _, peak_backward = traced(lambda: pullback(dy))
    estimate = m.training_memory(T, B, checkpoint=checkpoint)
    # The estimate counts every array whose size grows with T; what it
    # leaves out (per-chunk scratch, the small arrays of Python calls) is a
    # few kilobytes here.
    assert abs(kept - estimate["kept"]) <= 0.02 * estimate["kept"] + 20_000
    measured = max(peak_forward, kept + peak_backward)
    assert abs(measured - estimate["peak"]) <= 0.02 * estimate["peak"] + 50_000


@pytest.mark.default_pass_only          # memory does not depend on the activation mode
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_checkpointed_memory_grows_like_T_over_k_plus_k(kind, one_thread):
    # docs/guarantees.md: with checkpoint=k a step keeps the state each of
    # the T / k segments starts from and holds one segment of k steps at a
    # time, so its memory grows like T / k + k.  Measured (tracemalloc, the
    # peak of vjp and pullback) at k from 8 steps (B = 128: blocks of 8
    # steps, so every k below is a whole number of blocks) to 1024:
    # the peaks fit a T / k + b k + c to within 1%, a is the bytes of
    # the states kept per segment, the least memory lies between the ends
    # (both terms count), and every peak agrees with training_memory.
    T, B, I, H = 2048, 128, 1, 4
    m = make(kind, I, H, np.float64)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, H))
    ks = [8, 16, 32, 64, 128, 256, 512, 1024]
    assert all(_recurrent.checkpoint_interval(k, T, B) == k for k in ks)

    def measured(k):
        step(m, x, dy, checkpoint=k)             # compiled before measuring (one_thread)
        (_, pullback), kept, peak_forward = traced(lambda: m.vjp(x, checkpoint=k))
        _, _, peak_backward = traced(lambda: pullback(dy))
        return max(peak_forward, kept + peak_backward)

    peaks = np.array([measured(k) for k in ks], dtype=float)
    for k, peak in zip(ks, peaks):
        estimate = m.training_memory(T, B, checkpoint=k)["peak"]
        assert abs(peak - estimate) <= 0.02 * estimate + 50_000, (k, peak, estimate)
    A = np.array([[T / k, k, 1.0] for k in ks])
    (a, b, c), *_ = np.linalg.lstsq(A, peaks, rcond=None)
    assert np.abs(A @ (a, b, c) - peaks).max() <= 0.01 * peaks.min(), (a, b, c, peaks)
    states = B * H * 8 * (2 if kind == "lstm" else 1)   # (h, c) or h, float64
    assert 0.9 * states <= a <= 1.2 * states, (a, states)
    assert b > 0
    assert 0 < int(np.argmin(peaks)) < len(ks) - 1, peaks
    # without checkpointing: T steps of gates, far more than the best k
    assert measured(None) > 3 * peaks.min()


@pytest.mark.parametrize("mode", ["last", "sequence"])
def test_readout_and_scipy_objective_pass_checkpoint_through(mode):
    T, B, I, H = 300, 3, 2, 6
    saved = _recurrent.ROWS_PER_BLOCK
    _recurrent.ROWS_PER_BLOCK = 2            # many segments at this size
    try:
        rnn = fg.GRU(I, H, dtype=np.float64, seed=0)
        model = fg.Readout(rnn, fg.Linear(H, 1, dtype=np.float64, seed=1), mode=mode)
        rng = np.random.default_rng(2)
        x = rng.standard_normal((T, B, I))
        lengths = np.array([T, 17, 250])
        out, pullback = model.vjp(x, lengths=lengths)
        dout = rng.standard_normal(out.shape)
        out_ck, pullback_ck = model.vjp(x, lengths=lengths, checkpoint=40)
        assert_bitwise((out_ck, pullback_ck(dout)), (out, pullback(dout)))
        target = rng.standard_normal(out.shape)
        v = model.get_flat_params()
        plain = fg.scipy_objective(model, "mse", x, target, lengths=lengths)(v)
        checked = fg.scipy_objective(model, "mse", x, target, lengths=lengths, checkpoint=40)(v)
        assert plain[0] == checked[0] and plain[1].tobytes() == checked[1].tobytes()
    finally:
        _recurrent.ROWS_PER_BLOCK = saved
    with pytest.raises(ValueError, match="checkpoint must be None for a Linear"):
        fg.scipy_objective(fg.Linear(2, 1), "mse", np.ones((3, 2)), np.ones((3, 1)), checkpoint=5)
