"""Threads on a busy machine: each call's thread plan, and no collapse under load.

The policy (:class:`fastgates._config._Contention`) is tested with a fake
clock and a fake count of runnable threads; the behaviour it exists for is
tested on the machine itself, with busy processes beside the test and with
another thread pool working in the same process.
"""

import statistics
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest

import fastgates as fg
from fastgates import _config
from fastgates._config import (COLLAPSE_CALLS, COLLAPSE_FACTOR, COLLAPSE_SLACK, COLLAPSE_WINDOW,
                               HOLD_MAX, HOLD_MIN, PROBATION, QUIET, _Contention)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def policy(runnable=0, cores=2):
    clock = Clock()
    state = {"runnable": runnable}
    c = _Contention(clock=clock, runnable=lambda: state["runnable"], cores=cores)
    return c, clock, state


def collapse(c, key="k", best=1e-3):
    """One call of ``key`` reported far slower than ``best`` (which it records first)."""
    if key not in c.best:
        c.done(key, best)
    c.done(key, COLLAPSE_FACTOR * best + COLLAPSE_SLACK + 1e-3)


def test_an_idle_machine_gets_every_thread_asked_for():
    c, clock, _ = policy(runnable=0)
    for _ in range(50):
        assert c.threads(2) == 2
        c.done("k", 1e-3)
        clock.now += 1e-3
    assert c.threads(1) == 1
    assert c.collapses == 0


def test_one_collapse_alone_changes_nothing_two_close_together_hold():
    # One slow call is what a virtual machine's host does now and then; a
    # second within COLLAPSE_CALLS calls is a partner missing time slices.
    c, clock, _ = policy(runnable=0)
    collapse(c)
    assert c.threads(2) == 2
    for _ in range(COLLAPSE_CALLS + 1):
        c.done("k", 1e-3)
        clock.now += COLLAPSE_WINDOW / COLLAPSE_CALLS
    collapse(c)
    assert c.threads(2) == 2, "collapses far apart must not hold"
    collapse(c)
    assert c.threads(2) == 1
    clock.now += HOLD_MIN / 2
    assert c.threads(2) == 1
    clock.now += HOLD_MIN
    assert c.threads(2) == 2, "the hold ends when the machine has room"


def test_two_collapses_close_in_time_hold_however_many_short_calls_between():
    # Short calls (a B = 1 step of a fraction of a millisecond) on a busy
    # machine lose a time slice every few dozen calls: far apart in calls,
    # close in time, and each costs many calls' time.
    c, clock, _ = policy(runnable=0)
    collapse(c, best=3e-4)
    start = clock.now
    for _ in range(4 * COLLAPSE_CALLS):
        c.done("k", 3e-4)
        clock.now += 3e-4
    assert clock.now - start < COLLAPSE_WINDOW
    assert c.threads(2) == 2
    collapse(c, best=3e-4)
    assert c.threads(2) == 1


def test_a_hold_is_extended_while_no_core_is_free_and_ends_when_one_is():
    c, clock, state = policy(runnable=0)
    collapse(c)
    collapse(c)
    state["runnable"] = 2                       # both cores busy besides the caller
    for _ in range(5):
        clock.now += HOLD_MIN * 1.01
        assert c.threads(2) == 1
        # renewed a short hold at a time, to see the cores free soon
        assert c.held_until == pytest.approx(clock.now + HOLD_MIN)
    state["runnable"] = 0
    clock.now += HOLD_MIN * 1.01
    assert c.threads(2) == 2


def test_a_collapse_soon_after_a_hold_doubles_it_up_to_the_maximum():
    c, clock, _ = policy(runnable=0)
    holds = []
    collapse(c)
    for _ in range(12):
        collapse(c)       # within COLLAPSE_CALLS of the one before
        holds.append(c.hold)
        clock.now = c.held_until + 1e-6
        assert c.threads(2) == 2
        clock.now += PROBATION / 4
    assert holds[0] == HOLD_MIN
    assert holds[1] == 2 * HOLD_MIN
    assert max(holds) == holds[-1] == HOLD_MAX
    # load that went away: a collapse long after the last hold starts again
    clock.now += 10 * PROBATION
    collapse(c)
    collapse(c)
    assert c.hold == HOLD_MIN


def test_a_call_after_a_quiet_pool_looks_at_the_machine_first():
    c, clock, state = policy(runnable=2)
    assert c.threads(2) == 1, "both cores busy: no partner"
    assert c.samples == 1
    state["runnable"] = 1
    clock.now += HOLD_MIN * 1.01
    assert c.threads(2) == 1, "one core busy of two: still no core for a partner"
    state["runnable"] = 0
    clock.now += HOLD_MIN * 1.01
    assert c.threads(2) == 2
    c.done("k", 1e-3)
    # right after a call on two threads the pool's own threads spin: not sampled
    samples = c.samples
    state["runnable"] = 5
    clock.now += QUIET / 2
    assert c.threads(2) == 2
    assert c.samples == samples
    clock.now += QUIET
    assert c.threads(2) == 1


def test_a_call_takes_no_more_threads_than_have_a_core():
    # four cores, one busy besides the caller: three threads fit
    for want, got in ((2, 2), (3, 3), (4, 3), (8, 3)):
        c, clock, state = policy(runnable=1, cores=4)
        assert c.threads(want) == got, want
    c, clock, state = policy(runnable=1, cores=4)
    assert c.threads(4) == 3
    clock.now += HOLD_MIN / 2
    assert c.threads(4) == 3, "held at what fits"
    state["runnable"] = 0
    clock.now += HOLD_MIN
    assert c.threads(4) == 4


def test_without_a_machine_count_only_collapses_decide():
    c, clock, state = policy(runnable=9, cores=None)
    assert c.threads(2) == 2
    assert c.samples == 0
    collapse(c)
    collapse(c)
    assert c.threads(2) == 1
    clock.now += HOLD_MIN * 1.01
    assert c.threads(2) == 2


def test_the_machine_count_is_read_from_proc_loadavg():
    others = _config._runnable_others()
    if not sys.platform.startswith("linux"):
        assert others is None
        return
    # the reader itself is running and not counted
    assert others is not None and others >= 0


@pytest.fixture
def threads2():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a pool of two threads")
    n = fg.get_num_threads()
    fg.set_num_threads(2)
    yield
    fg.set_num_threads(n)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_a_call_held_to_one_thread_gives_the_same_bits(cell, threads2, monkeypatch):
    m = getattr(fg, cell)(5, 24, num_layers=2, bidirectional=True, dtype=np.float64, seed=1)
    x = np.random.default_rng(2).standard_normal((70, 1, 5))

    def run():
        (y, state), pullback = m.vjp(x)
        dx, dstate, dparams = pullback(np.cos(y))
        return [y, dx, *dparams.values()]

    fresh = _Contention(runnable=lambda: 0, cores=2)
    monkeypatch.setattr(_config, "_contention", fresh)
    parallel = run()
    fresh.held, fresh.held_until = 1, time.perf_counter() + 3600
    seen = []
    real = _config._Contention.threads
    monkeypatch.setattr(_config._Contention, "threads",
                        lambda self, want: seen.append(real(self, want)) or seen[-1])
    serial = run()
    assert seen and set(seen) == {1}
    for a, b in zip(parallel, serial):
        assert a.tobytes() == b.tobytes()


# -- on the machine ------------------------------------------------------------
# (default_pass_only: the thread plan does not depend on the activation mode)

# Bound of the issue: with every core busy, a call on two threads takes at
# most 1.5 times its own one-thread time.  Checked here on the median and
# the mean of each side's calls, which a collapse (milliseconds in one call
# in ten or more) moves by several times.  The 90th percentile, the
# benchmark's second statistic, is not asserted on in CI: with every core
# busy about one call in ten of either side loses a time slice whatever it
# runs on, so the 90th percentile of each side falls by chance on one side
# or the other of that knee (measured: 0.94 against 4.46 ms with both sides
# on one thread); the benchmark reports it from many more calls.
BUSY_BOUND = 1.5


def _busy(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _timed_rounds(step, rounds=90, calls=6, pause=0.005):
    """Times of ``step`` at one and two threads, call by call alternating (ms).

    Both sides must meet the other processes alike.  The calling thread,
    woken after each round's pause, runs about 1.5 ms before the busy
    processes take their time slices (4.4 ms); so the calls that lose one
    are those a round makes late (measured: 99 of 106 at the fifth and
    sixth of six calls).  With each side's calls together in a round, a
    few microseconds more before one side's calls (the thread plan's own
    work) moved more of its calls past that point: 142 against 105 slow
    calls, and the ratio of the means over 1.5 in one run in three after
    other tests, with every call on one thread on both sides.  So the
    sides alternate call by call, which one goes first changing each
    round: each meets every place in a round as often.
    """
    times = {1: [], 2: []}
    for r in range(rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for _ in range(calls):
            for n in order:
                fg.set_num_threads(n)
                t0 = time.perf_counter()
                step()
                times[n].append((time.perf_counter() - t0) * 1e3)
        time.sleep(pause)
    return times


def _assert_no_collapse(times):
    one, two = np.array(times[1]), np.array(times[2])
    med = statistics.median(two) / statistics.median(one)
    mean = two.mean() / one.mean()
    detail = (f"1 thread: median {statistics.median(one):.3f} ms, mean {one.mean():.3f}, "
              f"p90 {np.percentile(one, 90):.3f}; 2 threads: median {statistics.median(two):.3f} "
              f"ms, mean {two.mean():.3f}, p90 {np.percentile(two, 90):.3f}")
    assert med <= BUSY_BOUND and mean <= BUSY_BOUND, detail


def _lstm_step():
    # the call of the issue: a B = 1 LSTM training step, float32
    m = fg.LSTM(32, 64, seed=0)
    x = np.random.default_rng(0).standard_normal((100, 1, 32)).astype(np.float32)
    dy = np.ones((100, 1, 64), np.float32)

    def step():
        (y, _), pullback = m.vjp(x)
        pullback(dy)

    # both forms of each kernel compiled (a parallel kernel and its
    # one-thread twin): not adaptive, or a busy machine would leave the
    # parallel form to compile inside the timed calls
    for n in (1, 2):
        fg.set_num_threads(n, adaptive=False)
        step()
        step()
    return step


def test_without_adaptive_a_call_takes_the_threads_set(threads2, monkeypatch):
    fresh = _Contention(runnable=lambda: 5, cores=2)
    monkeypatch.setattr(_config, "_contention", fresh)
    assert _config.begin_call() == 1
    _config.end_call("k", 1, None)
    fg.set_num_threads(2, adaptive=False)
    assert _config.begin_call() == 2
    _config.end_call("k", 2, None)
    assert fresh.asked == 1


@pytest.mark.default_pass_only
def test_every_core_busy_no_collapse_at_b1(threads2, monkeypatch):
    # Before: both cores busy with other processes, this step took 32 ms on
    # two threads against 0.38 ms on one (the partner thread of every
    # parallel region missed time slices).
    if _config._cores() is None:
        pytest.skip("the machine's runnable count does not apply (CPU affinity): "
                    "only the reactive rule works, tested above with a fake clock")
    plan = _Contention()
    monkeypatch.setattr(_config, "_contention", plan)
    step = _lstm_step()
    procs = _busy(_config._cores())
    try:
        time.sleep(0.3)
        times = _timed_rounds(step)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    _assert_no_collapse(times)
    # the plan saw the busy cores: (almost) every call that asked for two
    # threads ran on one
    assert plan.reduced >= 0.9 * plan.asked, (plan.reduced, plan.asked)


@pytest.mark.default_pass_only
def test_another_thread_pool_working_in_the_process_no_collapse(threads2, monkeypatch):
    # NumPy's OpenBLAS (its own pool of threads, which spin between its
    # calls) working in another thread of the same process.  Measured
    # without the thread plan: 20 ms on two threads against 0.69 ms on one.
    # (PyTorch's pool does not do this here: it shares Numba's libgomp,
    # which stops spinning when it runs more threads than there are cores.)
    from threadpoolctl import ThreadpoolController

    numpy_blas = ThreadpoolController().select(user_api="blas").lib_controllers
    numpy_blas = [lib for lib in numpy_blas if "numpy" in lib.filepath]
    if not numpy_blas:
        pytest.skip("needs NumPy's own BLAS (a separate library in the wheels)")
    # two threads whatever an earlier test left (restored at the end)
    limits = ThreadpoolController().select(filepath=numpy_blas[0].filepath).limit(limits=2)
    monkeypatch.setattr(_config, "_contention", _Contention())
    step = _lstm_step()
    stop = threading.Event()

    def work():
        a = np.random.default_rng(0).standard_normal((256, 256))
        while not stop.is_set():
            for _ in range(4):
                a @ a
            time.sleep(0.002)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        time.sleep(0.2)
        times = _timed_rounds(step)
    finally:
        stop.set()
        worker.join()
        limits.restore_original_limits()
    _assert_no_collapse(times)
