"""Fill the kernel cache ahead of time: ``python -m fastgates compile``.

A kernel is compiled at its first call and its machine code cached (in
``fastgates/__pycache__``, or ``NUMBA_CACHE_DIR``); a later process loads it
in a fraction of a second.  A container image, a CI job or a Dask worker
that starts with an empty cache pays the compilation at its first call:
this command pays it once, beforehand, for every cell and dtype, each
(cell, dtype) in its own process, several processes at a time.

Each job runs the calls a model of that cell makes (forward, training step
and ``gates``, one sequence and a padded batch, stacked and bidirectional,
the variants with kernels of their own, narrow and wide layers, a
``Readout`` head), which compiles everything those calls reach; the shared building blocks are compiled by
whichever job gets there first and loaded by the others once cached.  It
also compiles the kernels a process otherwise compiles only once they pay
(``_config.Tier``: the LSTM's overlapped kernels).

The kernels of each activation mode are compiled apart (only the mode's
own code is in them): by default those of the mode this process runs in
(``FASTGATES_ACTIVATIONS``, else fast); ``--activations fast exact`` for
both.

::

    python -m fastgates compile                       # every cell and dtype
    python -m fastgates compile --cells lstm gru --dtypes float32
    python -m fastgates compile --activations fast exact
    python -m fastgates compile --jobs 1              # one process at a time
"""

import json
import os
import subprocess
import sys
import textwrap
import time

__all__ = ["JOBS", "Compiles", "add_arguments", "run", "warm"]

CELLS = ("lstm", "gru", "janet", "mgu", "slstm", "mingru", "minlstm", "attention")
DTYPES = ("float32", "float64")
MODES = ("fast", "exact")
JOBS = tuple((cell, dtype) for cell in CELLS for dtype in DTYPES)

_LAYERS = {"lstm": "LSTM", "gru": "GRU", "janet": "JANET", "mgu": "MGU", "slstm": "SLSTM",
           "mingru": "MinGRU", "minlstm": "MinLSTM"}
# the options whose calls reach kernels of their own, per cell
_VARIANTS = {"lstm": [{"proj_size": 4}, {"peephole": True, "clip": 3.0}],
             "gru": [{"reset_after": False}, {"clip": 3.0}, {"reset_after": False, "clip": 3.0}],
             "mingru": [{"positive": True}], "minlstm": [{"positive": True}]}


def warm(cell, dtype):
    """Make, in this process, the calls that compile ``cell``'s kernels in ``dtype``.

    The calls run on one thread and on every thread of Numba's pool, not
    adaptively: some plans (the LSTM's overlapped forward, the products
    beside the backward kernel) exist only on more than one thread, and
    the jobs running side by side would otherwise make every call take one.
    """
    import numba

    import fastgates as fg

    before = fg.get_num_threads(), fg._config._adaptive, fg._config._eager_tiers
    # the kernels a process otherwise compiles only once they pay
    # (_config.Tier), such as the LSTM's overlapped ones, now
    fg._config._eager_tiers = True
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            fg.set_num_threads(threads, adaptive=False)
            _warm(cell, dtype)
    finally:
        fg.set_num_threads(before[0], adaptive=before[1])
        fg._config._eager_tiers = before[2]
    _both_forms()


def _both_forms():
    """Compile the other form of each parallel kernel for every signature one form has.

    Which form a call runs (:class:`~fastgates._config.ParallelKernel`)
    depends on its thread count and on how many tasks its shape makes, so
    the calls above cannot reach both for every signature (measured: an
    LSTM step at (20, 64, 8, 256) then compiled for 1.1 s in a fresh
    process).
    """
    from . import _config

    kernels = {id(k): k for name, mod in list(sys.modules.items())
               if name == "fastgates" or name.startswith("fastgates.")
               for k in list(vars(mod).values()) if isinstance(k, _config.ParallelKernel)}
    for k in kernels.values():
        parallel, serial = set(k.parallel.signatures), set(k.serial.signatures)
        for sig in parallel - serial:
            k.serial.compile(sig)
        for sig in serial - parallel:
            k.parallel.compile(sig)


def _warm(cell, dtype):
    import numpy as np

    import fastgates as fg

    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    if cell == "attention":
        q, k, v = rng.standard_normal((3, 1, 2, 70, 8)).astype(dt)
        log_f = -rng.uniform(0, 0.1, (1, 2, 70)).astype(dt)
        out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
        pullback(np.ones_like(out))
        layer = fg.ForgettingAttention(8, 2, dtype=dt, seed=0)
        y, pullback = layer.vjp(rng.standard_normal((1, 70, 8)).astype(dt))
        pullback(np.ones_like(y))
        return
    cls = getattr(fg, _LAYERS[cell])
    extra = {"num_heads": 2} if cell == "slstm" else {}
    I, H = 3, 8
    for options in [{}] + _VARIANTS.get(cell, []):
        for layers, bidirectional in ((1, False), (2, True)):
            m = cls(I, H, num_layers=layers, bidirectional=bidirectional, dtype=dt, seed=0,
                    **extra, **options)
            for T, B in ((5, 1), (130, 4)):
                x = rng.standard_normal((T, B, I)).astype(dt)
                lengths = np.full(B, T)
                lengths[-1] = max(1, T - 2)
                m(x)
                (y, _), pullback = m.vjp(x, lengths=lengths)
                pullback(np.ones_like(y))
                m.gates(x, lengths=lengths)
    # wider layers take other paths (the overlapped forward, the tiles of
    # the weight gradients): one sequence and a batch, a step each
    # (weights of a megabyte and more are laid out on two threads)
    for T, B, I_wide, H_wide in ((40, 1, 32, 64), (40, 16, 64, 64), (10, 4, 8, 256)):
        m = cls(I_wide, H_wide, dtype=dt, seed=0, **extra)
        x = rng.standard_normal((T, B, I_wide)).astype(dt)
        m(x)
        (y, _), pullback = m.vjp(x)
        pullback(np.ones_like(y))
    m = cls(I, H, num_layers=2, bidirectional=True, dtype=dt, seed=0, **extra)
    width = m.num_directions * m._widths()[0]
    head = fg.Readout(m, fg.Linear(width, 2, dtype=dt, seed=1))
    x = rng.standard_normal((5, 3, I)).astype(dt)
    out, pullback = head.vjp(x)
    pullback(np.ones_like(out))


def add_arguments(p):
    """The options of ``python -m fastgates compile``."""
    p.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS), metavar="CELL",
                   help=f"cells to compile (default: all of {' '.join(CELLS)})")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), metavar="DTYPE",
                   help="dtypes (default: both)")
    p.add_argument("--activations", nargs="+", choices=MODES, default=None, metavar="MODE",
                   help="activation modes (default: this process's, FASTGATES_ACTIVATIONS or "
                        "fast)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes at a time (default: the cores this process may use)")
    p.set_defaults(func=run)
    return p


_CHILD = textwrap.dedent("""
    import json, sys, time
    t0 = time.perf_counter()
    from fastgates.precompile import warm, Compiles
    with Compiles() as compiles:
        warm(sys.argv[1], sys.argv[2])
    print(json.dumps({"seconds": time.perf_counter() - t0, "compiled": compiles.count}))
""")


class Compiles:
    """Context: counts the fastgates functions compiled (not loaded from the cache) in it."""

    def __enter__(self):
        from numba.core import event

        from ._config import _CompileNotice

        class Counter(event.Listener):
            def on_start(listener, ev):
                self.count += _CompileNotice._ours(ev)

            def on_end(listener, ev):
                pass

        self.count = 0
        self._listener = Counter()
        event.register("numba:compile", self._listener)
        return self

    def __exit__(self, *exc):
        from numba.core import event

        event.unregister("numba:compile", self._listener)
        return False


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Bar:
    """A progress line on stderr, redrawn in place on a terminal."""

    def __init__(self, total, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()

    def show(self, note):
        width = 24
        filled = width * self.done // max(1, self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:5.0f} s  {note}")
        if self.tty:
            self.stream.write("\r" + line[:100].ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run(args):
    """Compile the chosen cells, dtypes and modes in parallel processes; return the exit code."""
    from . import get_activation_mode
    from .bench import _child_env, child_root   # a child imports this very fastgates

    modes = list(dict.fromkeys(args.activations or [get_activation_mode()]))
    jobs = [(c, d, m) for m in modes for c in args.cells for d in args.dtypes]
    n = _cores() if args.jobs is None else args.jobs
    if n < 1:
        print("--jobs must be at least 1", file=sys.stderr)
        return 2
    envs, cwd = {m: _child_env(FASTGATES_ACTIVATIONS=m) for m in modes}, child_root()
    bar = _Bar(len(jobs))
    pending, running, failed, seconds, compiled = list(jobs), {}, [], {}, 0
    start = time.perf_counter()
    bar.show("starting")
    while pending or running:
        while pending and len(running) < n:
            job = pending.pop(0)
            running[job] = subprocess.Popen([sys.executable, "-c", _CHILD, *job[:2]],
                                            env=envs[job[2]], cwd=cwd, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
        for job, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[job]
            bar.done += 1
            if proc.returncode != 0:
                failed.append((job, err))
                bar.show(f"{_name(job, modes)} FAILED")
            else:
                result = json.loads(out.strip().splitlines()[-1])
                seconds[job] = result["seconds"]
                compiled += result["compiled"]
                bar.show(f"{_name(job, modes)} {seconds[job]:.1f} s, "
                         f"{result['compiled']} compiled")
        time.sleep(0.05)
    bar.close()
    wall = time.perf_counter() - start
    what = "(cell, dtype, mode)" if len(modes) > 1 else "(cell, dtype)"
    print(f"{len(seconds)} of {len(jobs)} {what} done in {wall:.1f} s with {n} processes "
          f"at a time ({compiled} functions compiled, the rest loaded from the cache; the jobs' "
          f"own times add up to {sum(seconds.values()):.1f} s)")
    for job, err in failed:
        print(f"FAILED {_name(job, modes)}:\n{err}", file=sys.stderr)
    return 1 if failed else 0


def _name(job, modes):
    cell, dtype, mode = job
    return f"{cell} {dtype}" + (f" {mode}" if len(modes) > 1 else "")
