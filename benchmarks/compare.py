#!/usr/bin/env python
"""Side-by-side benchmark of fastgates against PyTorch, onnxruntime and JAX.

A thin wrapper: the runner lives in the package, :mod:`fastgates.bench`, and
``python -m fastgates bench`` is the same command with the same options.
This script also works from a source checkout where fastgates is not
installed.  See docs/benchmarks.md for the protocol.

Usage::

    python benchmarks/compare.py --quick              # one shape per group, 2 threads
    python benchmarks/compare.py --threads 1 2 --out results.md
    python benchmarks/compare.py --groups tiny --cells lstm --dtypes float32

Run it on an idle machine, one benchmark at a time.
"""

import os
import sys

try:
    from fastgates.bench import main
except ImportError:  # not installed: use the source tree this script lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastgates.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmarks/compare.py"))
