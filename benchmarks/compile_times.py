#!/usr/bin/env python
"""Where a first call's compile time goes: seconds per compiled function.

Runs one model's first forward call and first training step in this
process with an empty Numba cache (a new ``NUMBA_CACHE_DIR`` unless one is
set) and prints the two times, then, per compiled function, its
*exclusive* compile time (its own compilation minus the compilations it
triggered of the functions it calls), how many times it compiled and how
much of it the forward call took. Numba reports every real compilation
(never a load from the cache) as a ``numba:compile`` event; nested events
are the callees::

    python benchmarks/compile_times.py LSTM float32
    python benchmarks/compile_times.py GRU float64 --shape 100,16,32,64 --top 40
    python benchmarks/compile_times.py LSTM float32 --who-compiles raise_with_shape_context

``--who-compiles NAME`` prints the chain of functions being compiled
whenever a function whose name contains NAME starts compiling (for
finding which kernel pulls in, e.g., Numba's slice-assignment error
formatter). The shape is ``T,B,I,H`` (default that of ``bench
--compile-cost``).
"""

import argparse
import collections
import os
import sys
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("layer", help="layer class, e.g. LSTM, GRU, MinGRU")
    p.add_argument("dtype", choices=["float32", "float64"])
    p.add_argument("--shape", default="100,1,32,64", help="T,B,I,H (default %(default)s)")
    p.add_argument("--top", type=int, default=25, help="rows of the table (default %(default)s)")
    p.add_argument("--who-compiles", metavar="NAME")
    args = p.parse_args(argv)
    T, B, I, H = (int(v) for v in args.shape.split(","))
    os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="fastgates-compile-"))

    from numba.core import event

    stack = []                              # [start, seconds of nested compiles, name]
    own = collections.defaultdict(float)
    count = collections.Counter()

    def name_of(dispatcher):
        func = getattr(dispatcher, "py_func", None)
        if func is None:
            return str(dispatcher)
        return f"{func.__module__.rsplit('.', 1)[-1]}.{func.__qualname__}"

    class Listener(event.Listener):
        def on_start(self, ev):
            name = name_of(ev.data["dispatcher"])
            if args.who_compiles and args.who_compiles in name:
                print(f"{name} compiled from: {' <- '.join(s[2] for s in reversed(stack))}")
            stack.append([time.perf_counter(), 0.0, name])

        def on_end(self, ev):
            start, nested, name = stack.pop()
            took = time.perf_counter() - start
            own[name] += took - nested
            count[name] += 1
            if stack:
                stack[-1][1] += took

    event.register("numba:compile", Listener())

    import numpy as np
    import fastgates as fg

    model = getattr(fg, args.layer)(I, H, dtype=getattr(np, args.dtype), seed=0)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(args.dtype)
    t0 = time.perf_counter()
    model(x)
    t1 = time.perf_counter()
    in_forward = dict(own)
    (y, _), pullback = model.vjp(x)
    pullback(np.ones_like(y))
    t2 = time.perf_counter()
    print(f"{args.layer} {args.dtype} {T},{B},{I},{H}: first forward {t1 - t0:.2f} s "
          f"({len(in_forward)} functions), first training step "
          f"{t2 - t1:.2f} s ({len(own)} functions in all)")
    print(f"{'own s':>7} {'times':>5} {'in fwd':>7}  function")
    for name, secs in sorted(own.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{secs:7.2f} {count[name]:5d} {in_forward.get(name, 0.0):7.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
