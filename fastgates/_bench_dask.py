"""fastgates.dask against the in-process call: ``python -m fastgates bench --dask``.

What it measures, on one data set of ``B`` sequences cut into chunks of
``--dask-chunk`` (see ``docs/dask.md``):

- **scoring**: a :class:`~fastgates.Readout` (an LSTM and a linear head,
  sequence to one) over every sequence.  In this process: ``model(x)`` on
  the whole batch, at each thread count (fastgates' best kept).  On a
  ``distributed.LocalCluster`` of 1 and of 2 worker processes (one thread
  each): ``fastgates.dask.predict(model, x).compute()``, ``x`` persisted on
  the workers first (as data read from storage would be), the scores
  gathered here.  Sequences scored per second.
- **one gradient**: ``fg.scipy_objective(...)(v)`` in this process against
  ``fastgates.dask.objective(...)(v)`` on the cluster (loss and gradient
  of the whole data set, mean squared error).
- **Dask's overhead per chunk**: what a cluster of one worker takes beyond
  the chunks' own work, the same calls on the same chunks made one after
  another in this process on one thread, divided by the number of chunks.

Each configuration alternates the in-process and the Dask side round after
round and keeps medians (the benchmark's protocol, :mod:`fastgates.bench`).
The clusters' workers load the compiled kernels from the cache; one
untimed round warms each side.
"""

import math
import warnings

import numpy as np

import fastgates as fg
from fastgates._bench_scan import _Side, _time_row

__all__ = ["run", "add_arguments"]

BATCH = 8192
CHUNKS = (128, 512, 2048)
STEPS = 100
INPUT = 8
HIDDEN = 64
WORKERS = (1, 2)


def add_arguments(p):
    """The ``--dask`` options of ``python -m fastgates bench``."""
    g = p.add_argument_group("fastgates.dask (--dask)")
    g.add_argument("--dask", action="store_true",
                   help="time scoring and one gradient on a LocalCluster of 1 and 2 worker "
                        "processes against the in-process call, and Dask's overhead per chunk "
                        "(its own rows; see docs/dask.md)")
    g.add_argument("--dask-B", type=int, default=BATCH, metavar="B",
                   help="sequences in the data set (default %(default)s)")
    g.add_argument("--dask-chunk", type=int, nargs="+", default=list(CHUNKS), metavar="ROWS",
                   help="sequences per chunk (default %(default)s)")
    g.add_argument("--dask-T", type=int, default=STEPS, metavar="T",
                   help="steps per sequence (default %(default)s)")
    g.add_argument("--dask-H", type=int, default=HIDDEN, metavar="H",
                   help="hidden size (default %(default)s; input size 8)")
    return p


def _cluster(n):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           dashboard_address=None, worker_dashboard_address=None)
    return cluster, Client(cluster)


def _setup(threads):
    def setup():
        fg.set_num_threads(threads)
    return setup


def _rows(model, x, target, chunk, threads_list, repeats, log):
    import dask.array as da

    import fastgates.dask as fgd

    B = x.shape[1]
    xd = da.from_array(x, chunks=(x.shape[0], chunk, x.shape[2]))
    v = model.get_flat_params()
    whole = fg.scipy_objective(model, "mse", x, target)
    pieces = [x[:, i:i + chunk] for i in range(0, B, chunk)]

    def chunks_in_turn():
        for piece in pieces:
            model(piece)

    rows = []
    for workers in WORKERS:
        cluster, client = _cluster(workers)
        try:
            with warnings.catch_warnings():
                # the data set goes to the workers once, here, on purpose
                warnings.filterwarnings("ignore", message="Sending large graph")
                xp = xd.persist()
            client.wait_for_workers(workers)
            fun = fgd.objective(model, "mse", xp, target)
            score = [_Side(("in process", t), lambda: model(x), _setup(t)) for t in threads_list]
            score.append(_Side(("chunks in turn", 1), chunks_in_turn, _setup(1)))
            score.append(_Side(("dask", workers), lambda: fgd.predict(model, xp).compute()))
            _time_row(score, repeats)
            grad = [_Side(("in process", t), lambda: whole(v), _setup(t)) for t in threads_list]
            grad.append(_Side(("dask", workers), lambda: fun(v)))
            _time_row(grad, repeats)
            # the answers, once: scores bitwise, the gradient to rounding
            same = np.array_equal(fgd.predict(model, xp).compute(), model(x))
            g_err = float(np.max(np.abs(fun(v)[1] - whole(v)[1])) / np.max(np.abs(whole(v)[1])))
        finally:
            client.close()
            cluster.close()
        t = {s.name: s.median for s in score}
        g = {s.name: s.median for s in grad}
        best = min(t[("in process", n)] for n in threads_list)
        best_g = min(g[("in process", n)] for n in threads_list)
        nchunks = len(pieces)
        row = {"workers": workers, "chunk": chunk, "nchunks": nchunks, "B": B,
               "score": t[("dask", workers)], "score_best": best,
               "score_threads": {n: t[("in process", n)] for n in threads_list},
               "tasks": t[("chunks in turn", 1)],
               "grad": g[("dask", workers)], "grad_best": best_g,
               "grad_threads": {n: g[("in process", n)] for n in threads_list},
               "bitwise": same, "grad_err": g_err}
        rows.append(row)
        log(f"chunk={chunk} workers={workers}: scoring {row['score'] * 1e3:.0f} ms "
            f"(in process {best * 1e3:.0f} ms, chunks in turn {row['tasks'] * 1e3:.0f} ms), "
            f"gradient {row['grad'] * 1e3:.0f} ms (in process {best_g * 1e3:.0f} ms)")
    return rows


def run(args, log=print):
    """Run the ``--dask`` benchmark of parsed ``args``; print and return the exit code."""
    threads_list = args.threads or [1, 2]
    dtype = np.dtype((args.dtypes or ["float32"])[0])
    T, B, H = args.dask_T, args.dask_B, args.dask_H
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, INPUT)).astype(dtype)
    target = rng.standard_normal((B, 1))
    model = fg.Readout(fg.LSTM(INPUT, H, dtype=dtype, seed=0), fg.Linear(H, 1, dtype=dtype, seed=1))
    old = fg.get_num_threads()
    rows = []
    try:
        for chunk in args.dask_chunk:
            rows.extend(_rows(model, x, target, chunk, threads_list, max(args.repeats, 7), log))
    finally:
        fg.set_num_threads(old)
    text = report(rows, T, H, dtype, args)
    print(text, end="")
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            f.write(text)
    bad = [r for r in rows if not r["bitwise"] or r["grad_err"] > 1e-4]
    for r in bad:
        log(f"FAILED: chunk={r['chunk']} workers={r['workers']}: scores bitwise {r['bitwise']}, "
            f"gradient relative error {r['grad_err']:.1e}")
    return 1 if bad else 0


def overhead_fit(rows):
    """``(per compute, per chunk)`` seconds of Dask's overhead on one worker, fitted by
    least squares over the chunk sizes measured; ``(None, None)`` with fewer than two."""
    pts = [(r["nchunks"], r["score"] - r["tasks"]) for r in rows if r["workers"] == 1]
    if len({n for n, _ in pts}) < 2:
        return None, None
    n, o = np.array(pts, dtype=np.float64).T
    b, a = np.polyfit(n, o, 1)
    return float(a), float(b)


def report(rows, T, H, dtype, args):
    """The markdown report of the ``--dask`` rows."""
    out = ["# fastgates.dask: scoring and one gradient (median)", "",
           f"A Readout (LSTM, I = {INPUT}, H = {H}, and a linear head), T = {T}, {dtype.name}, "
           f"B = {rows[0]['B'] if rows else '-'} sequences; Dask: LocalCluster of worker "
           "processes with one thread each, data persisted on the workers, scores gathered "
           "here.  In process: the best of "
           + ", ".join(f"{n}" for n in (args.threads or [1, 2])) + " thread(s).  Overhead "
           "per chunk: (1 worker - the chunks called in turn here) / chunks.", "",
           "| chunk | chunks | workers | scoring, in process (ms) | scoring, Dask (ms) | "
           "sequences/s, Dask | Dask / in process | overhead per chunk (ms) | "
           "gradient, in process (ms) | gradient, Dask (ms) | Dask / in process |",
           "|" + "---|" * 11]
    per_call, per_chunk = overhead_fit(rows)
    overhead = {r["chunk"]: (r["score"] - r["tasks"]) / r["nchunks"] for r in rows
                if r["workers"] == 1}
    for r in rows:
        o = overhead.get(r["chunk"], math.nan)
        out.append("| " + " | ".join([
            str(r["chunk"]), str(r["nchunks"]), str(r["workers"]),
            f"{r['score_best'] * 1e3:.0f}", f"{r['score'] * 1e3:.0f}",
            f"{r['B'] / r['score']:,.0f}", f"{r['score'] / r['score_best']:.2f}",
            f"{o * 1e3:.2f}" if r["workers"] == 1 else "-",
            f"{r['grad_best'] * 1e3:.0f}", f"{r['grad'] * 1e3:.0f}",
            f"{r['grad'] / r['grad_best']:.2f}"]) + " |")
    if per_chunk is not None:
        out += ["", f"Dask's overhead on 1 worker, fitted over the chunk sizes (overhead = "
                f"a + b * chunks): a = {per_call * 1e3:.1f} ms per compute, b = "
                f"{per_chunk * 1e3:.2f} ms per chunk."]
    out += ["", "Per configuration: in-process times at each thread count (scoring, gradient, "
            "ms), the chunks in turn on one thread, and the answers (scores bitwise equal, "
            "gradient's largest relative difference).", ""]
    for r in rows:
        per = ", ".join(f"{n} thr {r['score_threads'][n] * 1e3:.0f} / {r['grad_threads'][n] * 1e3:.0f}"
                        for n in r["score_threads"])
        out.append(f"- chunk {r['chunk']}, {r['workers']} worker(s): {per}; chunks in turn "
                   f"{r['tasks'] * 1e3:.0f}; bitwise {r['bitwise']}, gradient {r['grad_err']:.1e}")
    return "\n".join(out) + "\n"
