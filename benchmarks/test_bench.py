"""pytest-benchmark suite: fastgates forward and training over the matrix.

Not part of the test run (``testpaths = ["tests"]``); run it explicitly::

    pytest benchmarks/test_bench.py                          # quick subset
    FASTGATES_BENCH_FULL=1 pytest benchmarks/test_bench.py   # whole matrix
    pytest benchmarks/test_bench.py --benchmark-save=NAME    # keep a baseline
    pytest benchmarks/test_bench.py --benchmark-compare      # compare with it

The quick subset is one shape per group, both cells, both dtypes, both modes,
at 2 threads; the full matrix adds every shape and 1 thread.  For the
side-by-side comparison with PyTorch and onnxruntime use
``python -m fastgates bench``.
"""

import os
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from threadpoolctl import threadpool_limits  # noqa: E402

# The matrix is defined once, in the comparison runner fastgates.bench; from
# a source checkout where fastgates is not installed, use the tree this file
# lives in.
try:
    import fastgates as fg
except ImportError:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import fastgates as fg
from fastgates.bench import DTYPES, GATES, MATRIX, QUICK  # noqa: E402

FULL = os.environ.get("FASTGATES_BENCH_FULL", "") not in ("", "0")
SHAPES = MATRIX if FULL else QUICK
THREADS = [1, 2] if FULL else [2]


def _model(cell, shape, dtype):
    cls = fg.LSTM if cell == "lstm" else fg.GRU
    return cls(shape.I, shape.H, shape.layers,
               bidirectional=shape.bidirectional, dtype=dtype, seed=0)


@pytest.fixture(params=THREADS, ids=lambda n: f"thr{n}")
def threads(request):
    """Same thread count for fastgates and every BLAS/OpenMP pool."""
    n = request.param
    old = fg.get_num_threads()
    with threadpool_limits(limits=n):
        fg.set_num_threads(n)
        yield n
    fg.set_num_threads(old)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.id())
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_fastgates(benchmark, threads, mode, shape, cell, dtype_name):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(1)
    m = _model(cell, shape, dtype)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(dtype)
    dy = rng.standard_normal((shape.T, shape.B, shape.D * shape.H)).astype(dtype)

    if mode == "infer":
        def run():
            return m(x)
        flops = shape.forward_flops(GATES[cell])
    else:
        def run():
            (y, state), pullback = m.vjp(x)
            return pullback(dy)
        flops = 3 * shape.forward_flops(GATES[cell])

    run()  # compile and warm up outside the timing
    benchmark.group = f"{mode} {cell} {dtype_name} thr{threads}"
    benchmark.extra_info["flops"] = flops
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_median"] = flops / stats.stats.median / 1e9
