#!/usr/bin/env python
"""Speed of a change, old and new code alternating in one process.

Runs a few benchmark shapes with two versions of fastgates in the same
process, alternating (new, old, old, new, ...), and prints each row's
median time per call and the ratio new/old: the way docs/benchmarks.md
judges a change (runs of the whole matrix move with the machine; one
process alternating two versions does not).  The old version is a source
tree (e.g. a ``git worktree`` of the commit before the change); its
``fastgates`` package is copied, as a package of another name, into
``--copy-dir`` (kept between runs, so Numba's cache there is reused).
Training steps load new weights before every step (untimed), as the
benchmark runner does.

    git worktree add /tmp/old HEAD~1
    python benchmarks/ab_speed.py --old /tmp/old
    CELLS=LSTM DTYPES=float64 MODES=train ROUNDS=11 python benchmarks/ab_speed.py \\
        --old /tmp/old --shape 100,32,128,256 --shape 50,16,256,256,2

The new version is the fastgates on ``sys.path``.
"""

import argparse
import importlib
import os
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np

import fastgates

SHAPES = ["100,1,32,64", "1000,1,8,32", "100,16,64,128", "100,32,128,256", "50,16,256,256,2"]


def load_old(tree, copy_dir):
    """The ``fastgates`` package of ``tree``, imported as ``fastgates_old``."""
    src = pathlib.Path(tree) / "fastgates"
    if not (src / "__init__.py").exists():
        raise SystemExit(f"--old {tree}: no fastgates package there")
    dst = pathlib.Path(copy_dir) / "fastgates_old"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(copy_dir))
    return importlib.import_module("fastgates_old")


def side(pkg, cell, shape, dtype, mode):
    T, B, I, H = shape[:4]
    L = shape[4] if len(shape) > 4 else 1
    m = getattr(pkg, cell)(I, H, L, bidirectional=L > 1, dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = np.ones((T, B, H * (2 if L > 1 else 1)), dtype)
    sd = m.state_dict()
    sd2 = {k: v + dtype(1e-6) for k, v in sd.items()}
    if mode == "infer":
        return pkg, m, (lambda: m(x)), None

    def step():
        (_, _), pullback = m.vjp(x)
        pullback(dy)

    return pkg, m, step, (sd, sd2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="source tree of the old version")
    p.add_argument("--copy-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                      "fastgates-ab"))
    p.add_argument("--shape", action="append", help="T,B,I,H[,layers] (bidirectional if layers > 1)")
    args = p.parse_args()
    os.makedirs(args.copy_dir, exist_ok=True)
    old = load_old(args.old, args.copy_dir)
    # both at their best: kernels compiled only once they pay (_config.Tier)
    # are compiled by the warm-up, as the benchmark runner does
    for pkg in (fastgates, old):
        if hasattr(pkg._config, "_eager_tiers"):
            pkg._config._eager_tiers = True
    shapes = [tuple(map(int, s.split(","))) for s in (args.shape or SHAPES)]
    cells = os.environ.get("CELLS", "LSTM GRU").split()
    dtypes = [np.dtype(d).type for d in os.environ.get("DTYPES", "float32 float64").split()]
    modes = os.environ.get("MODES", "infer train").split()
    ratios = []
    for shape in shapes:
        for cell in cells:
            for dtype in dtypes:
                for mode in modes:
                    for threads in (1, 2):
                        sides = {"old": side(old, cell, shape, dtype, mode),
                                 "new": side(fastgates, cell, shape, dtype, mode)}
                        times = {"old": [], "new": []}
                        T, B, _, H = shape[:4]
                        rounds = int(os.environ.get("ROUNDS", 9 if T * B * H < 500_000 else 5))
                        for r in range(rounds):
                            for name in ("old", "new") if r % 2 else ("new", "old"):
                                pkg, m, call, weights = sides[name]
                                pkg.set_num_threads(threads, adaptive=False)
                                call()
                                time.sleep(0.005)
                                n, total, t0 = 0, 0.0, time.perf_counter()
                                while time.perf_counter() - t0 < 0.03 or n < 3:
                                    if weights is not None:
                                        m.load_state_dict(weights[n % 2])
                                    s = time.perf_counter()
                                    call()
                                    total += time.perf_counter() - s
                                    n += 1
                                times[name].append(total / n)
                        a, b = statistics.median(times["old"]), statistics.median(times["new"])
                        ratios.append(b / a)
                        print(f"{shape} {cell} {np.dtype(dtype).name} {mode} {threads} thr: "
                              f"old {a * 1e3:.3f} ms, new {b * 1e3:.3f} ms, new/old {b / a:.3f}",
                              flush=True)
    print(f"geometric mean new/old {float(np.exp(np.mean(np.log(ratios)))):.3f}, "
          f"largest {max(ratios):.3f}")


if __name__ == "__main__":
    main()
