"""fastgates.dask on a distributed.LocalCluster of two worker processes.

Scoring equals the in-memory call bit for bit, and the data-parallel
objective is the same bits on the cluster as in this process (Dask's
synchronous scheduler), for every cell in both dtypes with lengths, and
equals ``fg.scipy_objective`` to rounding (``DATA_PARALLEL_TOL``).  The
model is sent to each worker once; a task's kernels run on one thread; a
worker killed in the middle of a computation changes nothing; bad input is
refused before anything reaches the scheduler.

The cluster is started once for the module (processes, not threads: the
workers load the compiled kernels from the cache like any fresh process).
"""

import os
import pathlib

import numpy as np
import pytest

import dask
import dask.array as da
from distributed import Client, LocalCluster

import fastgates as fg
import fastgates.dask as fgd
from _bitwise import assert_bitwise
from _tolerances import DATA_PARALLEL_TOL

CELLS = {"lstm": fg.LSTM, "gru": fg.GRU, "janet": fg.JANET, "mgu": fg.MGU, "slstm": fg.SLSTM,
         "mingru": fg.MinGRU, "minlstm": fg.MinLSTM}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      worker_dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


def _model(kind, dtype, **options):
    """A stacked model whose memories last hundreds of steps (chrono initialisation)."""
    extra = {"num_heads": 2} if kind == "slstm" else {}
    m = CELLS[kind](3, 4, num_layers=2, dtype=dtype, seed=1, **extra, **options)
    return fg.init.chrono(m, 1000, seed=2)


def _data(T, B, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    return x, lengths


def _relative(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny)


# T = 300 and chunks of 4, 4, 3 of a batch of 11: minGRU's and minLSTM's scan
# cuts a chunk of 3 or 4 sequences into four blocks of time on its own, the
# whole batch into one; the tasks must plan for the whole batch (with
# memories this long the blocks change the last bits: measured, every cell
# and dtype differs when the tasks plan for their chunk).
T, B, CHUNKS = 300, 11, (4, 4, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cluster_equals_in_memory(client, kind, dtype):
    m = _model(kind, dtype, bidirectional=True)
    x, lengths = _data(T, B, dtype)
    xd = da.from_array(x, chunks=(T, CHUNKS, 3))
    y = fgd.predict(m, xd, lengths=lengths).compute()
    assert_bitwise(y, m(x, lengths=lengths)[0])

    target = np.random.default_rng(1).standard_normal(y.shape)
    v = m.get_flat_params()
    # lengths as a dask array in other chunks than x's: rechunked
    fun = fgd.objective(m, "mse", xd, target, lengths=da.from_array(lengths, chunks=5))
    on_cluster = fun(v)
    with dask.config.set(scheduler="sync"):
        in_process = fgd.objective(m, "mse", xd, target, lengths=lengths)(v)
    assert on_cluster[0] == in_process[0]
    assert_bitwise(on_cluster[1], in_process[1])
    whole = fg.scipy_objective(m, "mse", x, target, lengths=lengths)(v)
    bound = DATA_PARALLEL_TOL[np.dtype(dtype)]
    assert abs(on_cluster[0] - whole[0]) <= bound * abs(whole[0])
    assert _relative(on_cluster[1], whole[1]) <= bound



# -- heads, states, layouts ----------------------------------------------------


def test_readout_last_with_state_and_cross_entropy(client):
    # batch_first, a Readout reading the last valid step, an LSTM's (h, c)
    # given as dask arrays in other chunks than x's
    rnn = _model("lstm", np.float64, batch_first=True)
    m = fg.Readout(rnn, fg.Linear(4, 5, dtype=np.float64, seed=3))
    x, lengths = _data(T, B, np.float64)
    x = np.ascontiguousarray(x.transpose(1, 0, 2))
    rng = np.random.default_rng(4)
    h0, c0 = rng.standard_normal((2, 2, B, 4))
    state = (da.from_array(h0, chunks=(2, 6, 4)), da.from_array(c0, chunks=(2, 5, 4)))
    xd = da.from_array(x, chunks=(CHUNKS, T, 3))
    pred = fgd.predict(m, xd, state=state, lengths=lengths)
    assert pred.shape == (B, 5) and pred.chunks == (CHUNKS, (5,))
    assert_bitwise(pred.compute(), m(x, (h0, c0), lengths))

    classes = rng.integers(0, 5, B)
    v = m.get_flat_params()
    got = fgd.objective(m, "cross_entropy", xd, classes, state=state, lengths=lengths)(v)
    want = fg.scipy_objective(m, "cross_entropy", x, classes, state=(h0, c0), lengths=lengths)(v)
    assert abs(got[0] - want[0]) <= 1e-12 * abs(want[0])
    assert _relative(got[1], want[1]) <= DATA_PARALLEL_TOL[np.dtype(np.float64)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_readout_sequence_and_a_gru_state(client, dtype):
    rnn = _model("gru", dtype, bidirectional=True)
    m = fg.Readout(rnn, fg.Linear(8, 2, dtype=dtype, seed=3), mode="sequence")
    x, lengths = _data(T, B, dtype)
    h0 = np.random.default_rng(5).standard_normal((4, B, 4)).astype(dtype)
    xd = da.from_array(x, chunks=(T, CHUNKS, 3))
    pred = fgd.predict(m, xd, state=h0, lengths=lengths).compute()
    assert_bitwise(pred, m(x, h0, lengths))
    target = np.random.default_rng(6).standard_normal(pred.shape)
    v = m.get_flat_params()
    got = fgd.objective(m, "mse", xd, da.from_array(target, chunks=(T, 2, 2)), state=h0,
                        lengths=lengths, checkpoint=64)(v)
    want = fg.scipy_objective(m, "mse", x, target, state=h0, lengths=lengths)(v)
    bound = DATA_PARALLEL_TOL[np.dtype(dtype)]
    assert abs(got[0] - want[0]) <= bound * abs(want[0])
    assert _relative(got[1], want[1]) <= bound


# -- how the work is sent and run ----------------------------------------------


def _loads(token):
    return fgd._loads.get(token, 0)


def test_model_is_one_key_and_loaded_once_per_worker(client):
    m = _model("gru", np.float32)
    x, lengths = _data(20, 64, np.float32)
    y = fgd.predict(m, da.from_array(x, chunks=(20, 4, 3)), lengths=lengths)
    graph = dict(y.__dask_graph__())
    models = [value for value in graph.values() if isinstance(value, fgd._Model)]
    assert len(models) == 1                     # one key, not a copy per task
    token = models[0].token
    y.compute()
    loads = client.run(_loads, token)           # per worker process
    assert sorted(loads.values()) in ([1, 1], [0, 1]), loads
    # the objective scatters it once to each worker, and each worker keeps a
    # second copy to train: one more load at most, whatever the evaluations
    v = m.get_flat_params()
    fun = fgd.objective(m, "mse", da.from_array(x, chunks=(20, 4, 3)), np.zeros(y.shape),
                        lengths=lengths)
    fun(v)
    fun(v * 0.5)
    assert fun.token == token
    assert all(n <= 2 for n in client.run(_loads, token).values())
    # scoring afterwards uses the saved parameters, not the last ones evaluated
    m.set_flat_params(v)
    assert_bitwise(y.compute(), m(x, lengths=lengths)[0])


_SEEN = []


def _spy_loss(pred, target):
    # runs inside the task, after the model's calls
    import numba
    from threadpoolctl import threadpool_info

    import fastgates._config as config
    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    _SEEN.append((config.call_threads(), numba.get_num_threads(), max(blas)))
    return fg.mse_loss(pred, target)


def _seen():
    return list(_SEEN)


def _threads_two_fixed():
    fg.set_num_threads(2, adaptive=False)
    return fg.get_num_threads()


def test_each_task_runs_on_the_thread_dask_gives_it(client):
    # Workers told to use two kernel threads for every call (not adaptive):
    # inside a task, calls still take one, Numba runs one, BLAS runs one.
    if fg.get_num_threads() < 2:
        pytest.skip("needs two cores")
    assert set(client.run(_threads_two_fixed).values()) == {2}
    m = _model("lstm", np.float32)
    x, lengths = _data(40, 16, np.float32)
    xd = da.from_array(x, chunks=(40, 4, 3))
    target = np.zeros((40, 16, 4), np.float32)
    fgd.objective(m, _spy_loss, xd, target, lengths=lengths)(m.get_flat_params())
    seen = [s for per_worker in client.run(_seen).values() for s in per_worker]
    assert len(seen) == 4
    assert set(seen) == {(1, 1, 1)}, seen


# -- faults --------------------------------------------------------------------


def _claim(marker):
    """Whether this call removed the file ``marker`` (one call wins, however many race)."""
    try:
        pathlib.Path(marker).unlink()
    except FileNotFoundError:
        return False
    return True


def _die_once(marker):
    """A loss that kills its worker process the first time it runs (``marker`` a file)."""
    def loss(pred, target):
        if _claim(marker):
            os._exit(1)
        return fg.mse_loss(pred, target)
    return loss


def _kill_once(block, marker):
    if _claim(marker):
        os._exit(1)
    return block


def test_a_killed_worker_changes_nothing(client, tmp_path):
    m = _model("minlstm", np.float64)
    x, lengths = _data(T, B, np.float64)
    xd = da.from_array(x, chunks=(T, CHUNKS, 3))
    target = np.random.default_rng(7).standard_normal((T, B, 4))
    v = m.get_flat_params()
    with dask.config.set(scheduler="sync"):
        want = fgd.objective(m, "mse", xd, target, lengths=lengths)(v)

    marker = tmp_path / "die"
    marker.touch()
    got = fgd.objective(m, _die_once(str(marker)), xd, target, lengths=lengths)(v)
    assert not marker.exists()                  # a worker did die
    assert got[0] == want[0]
    assert_bitwise(got[1], want[1])

    marker.touch()
    # meta given: map_blocks would otherwise call the function here to find it
    killing = xd.map_blocks(_kill_once, str(marker), dtype=xd.dtype, meta=np.empty((0, 0, 0), xd.dtype))
    y = fgd.predict(m, killing, lengths=lengths).compute()
    assert not marker.exists()
    assert_bitwise(y, m(x, lengths=lengths)[0])
    client.wait_for_workers(2, timeout=60)


# -- mini-batches ----------------------------------------------------------------


def test_chunks_are_mini_batches_for_adam(client):
    m = _model("gru", np.float64)
    x, lengths = _data(30, 12, np.float64)
    xd = da.from_array(x, chunks=(30, 4, 3))
    target = np.random.default_rng(8).standard_normal((30, 12, 4))
    fun = fgd.objective(m, "mse", xd, target, lengths=lengths)
    assert fun.nchunks == 3 and fun.rows == (4, 4, 4)
    v = m.get_flat_params()
    one = fun(v, chunks=[1])
    want = fg.scipy_objective(m, "mse", x[:, 4:8], target[:, 4:8], lengths=lengths[4:8])(v)
    assert abs(one[0] - want[0]) <= 1e-12 * abs(want[0])
    assert _relative(one[1], want[1]) <= 1e-12
    # the chunks in any order and repeated are the same mini-batch
    assert_bitwise(fun(v, chunks=[2, 0, 2])[1], fun(v, chunks=(0, 2))[1])

    opt = fg.Adam(m, lr=1e-2)
    start = fun(m.get_flat_params())[0]
    rng = np.random.default_rng(9)
    for _ in range(5):
        for i in rng.permutation(fun.nchunks):
            _, g = fun(m.get_flat_params(), chunks=[i])
            opt.step(fg.unflatten_params(m, g))
    assert fun(m.get_flat_params())[0] < start


# -- bad input -----------------------------------------------------------------


def _bad_calls():
    m = _model("lstm", np.float32)
    x, lengths = _data(10, 6, np.float32)
    xd = da.from_array(x, chunks=(10, 3, 3))
    y = np.zeros((10, 6, 4))
    return m, x, xd, lengths, y, [
        (lambda: fgd.predict(m, x), TypeError, "dask array"),
        (lambda: fgd.predict(m, da.from_array(x, chunks=(5, 3, 3))), ValueError,
         r"chunked along its batch axis \(1\) only.*axis 0 \(time\).*rechunk\(\{0: -1\}\)"),
        (lambda: fgd.predict(m, da.from_array(x, chunks=(10, 3, 1))), ValueError, r"rechunk\(\{2: -1\}\)"),
        (lambda: fgd.predict(m, xd[:, :, :2]), ValueError, "features"),
        (lambda: fgd.predict(m, xd[0]), ValueError, "3-D"),
        (lambda: fgd.predict(m, xd[:, :0]), ValueError, "at least one sequence"),
        (lambda: fgd.predict(m, xd.rechunk({1: (3, 0, 3)})), ValueError,
         r"empty chunks.*rechunk\(\{1: 3\}\)"),
        (lambda: fgd.predict(m, xd.astype(bool)), TypeError, "floating-point"),
        (lambda: fgd.predict(m, xd, lengths=lengths + 20), ValueError, r"lengths must lie in \[1, T\]"),
        (lambda: fgd.predict(m, xd, lengths=lengths[:5]), ValueError, "lengths must have shape"),
        (lambda: fgd.predict(m, xd, lengths=da.from_array(lengths * 1.0)), TypeError, "integers"),
        (lambda: fgd.predict(m, xd, state=np.zeros((1, 6, 4))), TypeError, r"tuple \(h, c\)"),
        (lambda: fgd.predict(m, xd, state=(np.zeros((1, 5, 4)),) * 2), ValueError, "batch B = 6"),
        (lambda: fgd.predict(fg.Linear(3, 2), xd), TypeError, "recurrent layer"),
        (lambda: fgd.objective(m, "mae", xd, y), ValueError, "loss must be"),
        (lambda: fgd.objective(m, "mse", xd, y[:, :5]), ValueError, "batch of 6"),
        (lambda: fgd.objective(m, "mse", xd, y[..., :3]), ValueError, r"shape \(10, 6, 4\)"),
        (lambda: fgd.objective(m, "cross_entropy", xd, y[..., 0]), TypeError, "integer class"),
        (lambda: fgd.objective(m, "mse", xd, y, checkpoint=0), ValueError, "checkpoint"),
        (lambda: fgd.objective(_model("gru", np.float32, dropout=0.5), "mse", xd, y), ValueError,
         "dropout"),
    ]


def test_bad_input_is_refused_on_the_client(client):
    scheduler = client.cluster.scheduler
    before = set(scheduler.tasks)               # earlier tests' tasks may still be leaving
    *_, calls = _bad_calls()
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
    assert set(scheduler.tasks) <= before       # nothing was sent


def test_bad_chunk_indices_and_values_found_in_a_task(client):
    m, x, xd, lengths, y, _ = _bad_calls()
    fun = fgd.objective(m, "mse", xd, y)
    for bad in ([], [2], [-1]):
        with pytest.raises(ValueError, match="chunks must name"):
            fun(m.get_flat_params(), chunks=bad)
    with pytest.raises(TypeError, match="chunk indices"):
        fun(m.get_flat_params(), chunks=["a"])
    # values are the model's to check, in the task: its message comes back
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T\]"):
        fgd.predict(m, xd, lengths=da.from_array(lengths + 20, chunks=2)).compute()
    with pytest.raises(ValueError, match="x"):
        fgd.predict(m, da.from_array(np.full_like(x, np.nan), chunks=(10, 3, 3))).compute()
