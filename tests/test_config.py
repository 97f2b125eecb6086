"""Threads, BLAS coordination, compilation cache and import hygiene."""

import json
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastgates as fg
from _child import run_python


@pytest.fixture
def restore_threads():
    n = fg.get_num_threads()
    yield
    fg.set_num_threads(n)


def test_adaptive_must_be_a_bool(restore_threads):
    with pytest.raises(TypeError, match=r"\badaptive\b"):
        fg.set_num_threads(1, adaptive=1)


def test_thread_count_round_trips(restore_threads):
    assert fg.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    fg.set_num_threads(1)
    assert fg.get_num_threads() == 1
    fg.set_num_threads(np.int64(numba.config.NUMBA_NUM_THREADS))
    assert fg.get_num_threads() == numba.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("bad", [0, -1, numba.config.NUMBA_NUM_THREADS + 1])
def test_thread_count_out_of_range(bad, restore_threads):
    with pytest.raises(ValueError, match="n must be between 1 and"):
        fg.set_num_threads(bad)


@pytest.mark.parametrize("bad", [1.0, "2", True, None])
def test_thread_count_not_an_integer(bad, restore_threads):
    with pytest.raises(TypeError, match="n must be an integer"):
        fg.set_num_threads(bad)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs a pool of two threads")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_equal_calls_at_b1_leave_numbas_thread_count_alone(cell, restore_threads, monkeypatch):
    # Each change of Numba's thread count costs about 1.6 us, a few percent
    # of a tiny training step: at B = 1 a run of equal calls (an optimiser's
    # loop) sets it once.  The LSTM runs its overlapped kernels there (two
    # tasks) beside nothing else; the GRU runs on one.  (From B = 2 up the
    # kernels take two threads and small products after them one: those
    # calls still switch.)
    fg.set_num_threads(2, adaptive=False)   # a busy moment would change the count
    m = getattr(fg, cell)(3, 8, seed=0)
    x = np.ones((40, 1, 3), np.float32)
    dy = np.ones((40, 1, 8), np.float32)

    def step():
        (y, _), pullback = m.vjp(x)
        pullback(dy)
        m(x)

    step()
    calls = []
    real = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: (calls.append(n), real(n)))
    for _ in range(3):
        step()
    assert calls == []


def test_user_blas_settings_are_restored():
    # fastgates runs every BLAS pool single-threaded while it computes, then
    # gives back whatever the user had set.
    m = fg.GRU(3, 4, seed=0)
    x = np.ones((5, 2, 3), np.float32)
    m(x)  # loads SciPy's BLAS
    with threadpool_limits(limits=2, user_api="blas"):
        before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        (y, s), pullback = m.vjp(x)
        pullback(y)
        after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert before == after


def test_first_call_keeps_other_openmp_thread_counts():
    # Starting Numba's OpenMP pool used to set the thread count of PyTorch's
    # libgomp too (same soname): torch.set_num_threads(1) silently became 2.
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import numpy as np, torch, fastgates as fg
        from threadpoolctl import threadpool_info
        def omp():
            return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()
                    if lib["user_api"] == "openmp"}
        torch.set_num_threads(1)
        before = omp()
        fg.set_num_threads(fg.get_num_threads())
        fg.LSTM(3, 4, seed=0)(np.ones((5, 4, 3)))
        after = omp()
        assert all(after[k] == n for k, n in before.items()), (before, after)
        assert torch.get_num_threads() == 1
        """
    )
    run_python(code, check=True)


def test_importing_fastgates_imports_no_optional_dependency():
    code = textwrap.dedent(
        """
        import sys, fastgates
        heavy = [m for m in ("torch", "onnx", "onnxruntime", "matplotlib", "keras", "dask", "distributed")
                 if m in sys.modules]
        assert not heavy, heavy
        """
    )
    run_python(code, check=True)


def test_second_process_loads_compiled_kernels_from_cache(tmp_path):
    # cache=True: the first process compiles and writes the cache, a second
    # one only loads it (no cache misses).  The kernels of the building
    # blocks, each with what might keep it out of a cache: the register
    # tiles (LLVM intrinsics), a BLAS call (Numba's external gemm), the
    # bounded wait (sched_yield, an external function, and the pause hint),
    # a parallel loop.  (A whole model's kernels took 35-50 s to compile
    # from nothing, twice per CI run.)
    code = textwrap.dedent(
        """
        import numpy as np
        from fastgates import _linalg
        a = np.ones((6, 5)); w = np.ones((5, 9)); out = np.empty((6, 9))
        wb = np.empty((1, 5, _linalg.panel_width(w.dtype)))
        _linalg._fill_blocks(w, False, wb, 0, 1)   # (column_blocks: NumPy on one thread)
        _linalg.dot_blocked(a, wb, out)
        _linalg.matmul(a, w, np.empty(0), out, 4, 2)
        _linalg.project_parallel(a, wb, np.empty(0), out, 2)
        _linalg.wait_until(np.ones(1, np.int64), 0, 1)
        kernels = [_linalg._fill_blocks, _linalg.dot_blocked, _linalg.matmul,
                   _linalg.project_parallel, _linalg.wait_until]
        print(sum(sum(k.stats.cache_misses.values()) for k in kernels),
              sum(sum(k.stats.cache_hits.values()) for k in kernels))
        """
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run():
        out = run_python(code, env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        return int(out[0]), int(out[1])

    misses, _ = run()
    assert misses > 0
    misses, hits = run()
    assert misses == 0 and hits >= 5


_READ_ONLY_CHECK = textwrap.dedent(
    """
    import json
    import numpy as np
    from numba.core.registry import CPUDispatcher
    import fastgates as fg
    from fastgates import _config

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((6, 2, 3)).astype(dtype)
        models = [fg.LSTM(3, 4, dtype=dtype, peephole=True), fg.LSTM(3, 4, dtype=dtype, proj_size=2),
                  fg.LSTM(3, 4, dtype=dtype, input_forget=True),
                  fg.GRU(3, 4, dtype=dtype, clip=2.0), fg.GRU(3, 4, dtype=dtype, reset_after=False)]
        models += [getattr(fg, name)(3, 4, num_layers=2, dtype=dtype, bias=bias)
                   for name in ("LSTM", "GRU", "JANET", "MGU", "SLSTM", "MinGRU", "MinLSTM")
                   for bias in (True, False)]
        for threads in (1, 2):
            fg.set_num_threads(threads, adaptive=False)
            for m in models:
                m.load_state_dict(m.state_dict())
                (y, _), pullback = m.vjp(x)
                pullback(np.ones_like(y))
                head = fg.Readout(m, fg.Linear(y.shape[-1], 2, dtype=dtype))
                out, pullback = head.vjp(x)
                pullback(np.ones_like(out))
            att = fg.ForgettingAttention(4, 2, dtype=dtype)
            out, pullback = att.vjp(rng.standard_normal((1, 6, 4)).astype(dtype))
            pullback(np.ones_like(out))

    seen, twice = {}, set()
    for name, module in list(sys.modules.items()):
        if name != "fastgates" and not name.startswith("fastgates."):
            continue
        for value in list(vars(module).values()):
            forms = ((value.parallel, value.serial) if isinstance(value, _config.ParallelKernel)
                     else (value,) if isinstance(value, CPUDispatcher) else ())
            for form in forms:
                for sig in form.signatures:
                    key = form.py_func.__qualname__, ", ".join(map(str, sig)).replace("readonly ", "")
                    if key in seen and seen[key] != sig:
                        twice.add((key[0], tuple(i for i, (a, b) in enumerate(zip(seen[key], sig))
                                                 if a != b)))
                    seen[key] = sig
    print(json.dumps(sorted(twice)))
    """
)


def test_no_kernel_is_compiled_for_both_a_read_only_and_a_writable_array():
    # Numba types a read-only array apart from a writable one, so a kernel
    # that met both (a view of a read-only parameter from one model, a
    # fresh array from another) compiled everything it calls twice: a GRU's
    # b_hn and an LSTM's peepholes did, 5-6 s each.  Parameters are
    # read-only, inputs are copied when read-only (_validate), and what the
    # kernels derive is writable: each argument of a kernel must always be
    # one or the other.  Checked in a fresh process (kernels loaded from the
    # cache count as compiled) over the calls of the public API: each cell
    # with and without biases, its variants, a Readout head, the attention.
    code = "import sys\n" + _READ_ONLY_CHECK
    res = run_python(code, capture_output=True, text=True,
                     env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 0, res.stderr[-3000:]
    twice = json.loads(res.stdout.strip().splitlines()[-1])
    assert twice == [], twice


# rows_<name> borrows the scratch its caller allocates; <end> is what it does last
_INLINE_KERNELS = textwrap.dedent(
    """

    @jit(inline_in_twins=True)
    def rows_{name}(scratch, n):
        h = borrow(scratch[0])
        for i in range(n):
            h[i] = 1.0
        z = np.zeros(n)          # takes the scratch's memory if it was freed
        z[:] = 7.0
        total = h.sum() + 0.0 * z[0]
        {end}
        return total


    @jit(parallel=True)
    def {name}(n):
        out = np.empty(1)
        for k in prange(1):
            out[k] = rows_{name}((np.empty(n), np.empty(1)), n)
        return out[0]
    """
)
_INLINE_MODULE = textwrap.dedent(
    """
    import numpy as np
    from numba import prange
    from fastgates._config import jit
    from fastgates._linalg import borrow, keep_alive
    """
) + _INLINE_KERNELS.format(name="kept", end="keep_alive(scratch)") + _INLINE_KERNELS.format(
    name="freed", end="pass")


def test_inlined_borrowing_function_keeps_its_arguments_alive(tmp_path):
    # A function that borrows its arguments relies on its caller owning
    # them for the whole call.  Inlined into a one-thread twin that
    # allocates them (@jit(inline_in_twins=True)), the twin's last use of
    # them is the borrow, and Numba frees them there: the LSTM's inlined
    # twins ran on freed scratch (signal 11 in Dask workers).  Such a
    # function ends with keep_alive of what it borrowed: shown here on a
    # kernel that allocates after the borrow (glibc's malloc hands the freed
    # block straight back, so without keep_alive the borrowed row reads 7s).
    (tmp_path / "inlined_borrow.py").write_text(_INLINE_MODULE)
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        import inlined_borrow as m
        print(m.kept.serial(64), m.freed.serial(64))
        """
    )
    res = run_python(code, str(tmp_path), capture_output=True, text=True,
                     env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache")))
    assert res.returncode == 0, res.stderr[-3000:]
    kept, freed = map(float, res.stdout.split())
    assert kept == 64.0
    if platform.libc_ver()[0] == "glibc":
        assert freed != 64.0


_TIER_MODULE = textwrap.dedent(
    """
    import numpy as np
    from numba import prange
    from fastgates._config import jit


    @jit(parallel=True)
    def doubled(a, out):
        for i in prange(a.shape[0]):
            out[i] = 2.0 * a[i]
    """
)

_TIER_CHECK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import tiered
    from fastgates import _config

    a, out = np.arange(4.0), np.empty(4)
    tier = _config.tier(tiered.doubled, "f8", pays_after=1.0)
    seen = []
    for spent in (0.6, 0.6, 0.0):
        seen.append([tier.maybe(), tier.use(a, out), len(tiered.doubled.parallel.signatures)])
        tier.spent(spent)
    print(json.dumps(seen))
    """
)


def test_a_tier_runs_its_kernel_once_compiled_or_cached_else_once_it_pays(tmp_path):
    # _config.Tier: a faster kernel that costs more to compile (the LSTM's
    # overlapped ones) runs when it is compiled or in the cache; otherwise
    # the calls do the work another way until that way has taken
    # pays_after seconds, and then it is compiled, saying so.
    (tmp_path / "tiered.py").write_text(_TIER_MODULE)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               FASTGATES_COMPILE_NOTICE_AFTER="0")

    def run():
        res = run_python(_TIER_CHECK, str(tmp_path), capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr

    seen, err = run()
    # unchecked, then known not ready (1.2 s > 1.0: compiled at the third call)
    assert seen == [[True, False, 0], [False, False, 0], [True, True, 1]]
    assert "compiling doubled, once" in err
    seen, err = run()
    assert seen == [[True, True, 1]] * 3          # loaded from the cache at once
    assert "compiling" not in err


def test_task_settings_cap_threads_set_mode_and_plan_batch_then_restore(restore_threads):
    from fastgates import _config, _scan

    fg.set_num_threads(fg.get_num_threads(), adaptive=False)
    top = fg.get_num_threads()
    mode = fg.get_activation_mode()
    other = "exact" if mode == "fast" else "fast"
    assert _scan.scan_blocks(1024, 4) == 4
    with _config.task_settings(threads=1, mode=other, batch=16):
        assert _config.begin_call() == 1
        _config.end_call("k", 1, None)
        assert _config.call_threads() == 1
        assert _config.fast_activations() == (other == "fast")
        assert _scan.scan_blocks(1024, 4) == 1          # planned as 16 rows
        assert _scan.scan_blocks(1024, 32) == 1         # never fewer rows than it has
        with _config.task_settings(batch=8):            # nested: the inner batch, the outer rest
            assert _scan.scan_blocks(1024, 4) == 2
            assert _config.call_threads() == 1
        assert _scan.scan_blocks(1024, 4) == 1
    assert _config.call_threads() == top
    assert _config.fast_activations() == (mode == "fast")
    assert _scan.scan_blocks(1024, 4) == 4
    # the settings are the calling thread's own
    import threading
    seen = []
    with _config.task_settings(threads=1, batch=16):
        t = threading.Thread(target=lambda: seen.append((_config.call_threads(), _scan.scan_blocks(1024, 4))))
        t.start()
        t.join()
    assert seen == [(top, 4)]


@pytest.mark.parametrize("bad", [{"threads": 0}, {"threads": True}, {"batch": 1.5}, {"mode": "quick"}])
def test_task_settings_refuse_bad_values(bad):
    from fastgates import _config

    with pytest.raises(ValueError):
        _config.task_settings(**bad)


_STALE_SCRIPT = """
import json, sys
import numpy as np
import fastgates
from fastgates.cells.mingru import mingru_activate
xw = np.array([[[0.0, 0.5, -1.0, 2.0]]])          # (T=1, B=1, 2H=4): z | n
mingru_activate(xw, np.array([1]), True, True, np.empty((0, 0, 0)), 4)
stats = mingru_activate.stats
print(json.dumps({"file": fastgates.__file__, "n": xw[0, 0, 2:].tolist(),
                  "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
"""


@pytest.mark.default_pass_only
def test_editing_a_helper_in_another_file_recompiles_the_kernel_and_says_so(tmp_path):
    # minGRU's activation kernel (cells/mingru.py) calls candidate_inplace
    # (cells/scan.py).  Numba alone stamps a cached kernel with its own
    # file: after the helper's edit it would load the old machine code.
    import shutil

    src = pathlib.Path(fg.__file__).parent
    pkg = tmp_path / "fastgates"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # the notice of a compiling first call: at once, to see it whatever the speed
    env = dict(os.environ, PYTHONPATH=str(tmp_path), FASTGATES_COMPILE_NOTICE_AFTER="0")
    env.pop("NUMBA_CACHE_DIR", None)        # the copy's own __pycache__

    def run():
        res = subprocess.run([sys.executable, "-c", _STALE_SCRIPT], env=env, check=True,
                             capture_output=True, text=True, cwd=tmp_path)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        out["notices"] = res.stderr.count("python -m fastgates compile")
        return out

    first = run()
    assert first["file"].startswith(str(pkg))
    assert first["misses"] == 1 and first["hits"] == 0
    assert first["notices"] == 1                                # said once, on stderr
    # the positive candidate g(v): v + 1/2 for v >= 0, sigmoid(v) below
    np.testing.assert_allclose(first["n"], [1 / (1 + np.exp(1.0)), 2.5], rtol=1e-6)
    again = run()
    assert again["hits"] == 1 and again["misses"] == 0 and again["n"] == first["n"]
    assert again["notices"] == 0                                # loaded: nothing to say

    helper = pkg / "cells" / "scan.py"
    text = helper.read_text()
    assert text.count("half = one(v[0]) / 2\n") == 1
    helper.write_text(text.replace("half = one(v[0]) / 2\n", "half = one(v[0]) / 2 + 1\n"))
    edited = run()
    assert edited["misses"] == 1 and edited["hits"] == 0        # compiled again
    assert edited["notices"] == 1
    np.testing.assert_allclose(edited["n"], [1 / (1 + np.exp(1.0)), 3.5], rtol=1e-6)


def test_compile_command_runs_every_job_and_reports(tmp_path):
    # With the cache the suite has filled, the command's children load
    # rather than compile; what is checked is the command: one child per
    # (cell, dtype), the progress line of each, the summary, exit status 0.
    # It is started in a folder holding another fastgates (a source
    # checkout, as tox starts it): its children must import the one the
    # command runs (they filled the checkout's cache instead, and tox's
    # tests then compiled everything again).
    from fastgates import precompile

    (tmp_path / "fastgates").mkdir()
    (tmp_path / "fastgates" / "__init__.py").write_text("raise ImportError('the decoy')\n")
    # the command as the installed `fastgates` script runs it: its own
    # folder first on sys.path, not the working directory
    command = "import sys; del sys.path[0]; from fastgates.__main__ import main; sys.exit(main())"
    res = subprocess.run([sys.executable, "-c", command, "compile", "--cells", "mgu", "mingru",
                          "--dtypes", "float32", "--jobs", "2"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "2/2" in res.stderr and "mgu float32" in res.stderr and "mingru float32" in res.stderr
    assert "2 of 2 (cell, dtype) done" in res.stdout
    # each activation mode's kernels are their own (fastgates/_math.py)
    res = subprocess.run([sys.executable, "-c", command, "compile", "--cells", "mgu",
                          "--dtypes", "float32", "--activations", "fast", "exact"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "mgu float32 fast" in res.stderr and "mgu float32 exact" in res.stderr
    assert "2 of 2 (cell, dtype, mode) done" in res.stdout
    assert len(precompile.JOBS) == 16 and ("attention", "float64") in precompile.JOBS
