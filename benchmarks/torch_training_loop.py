#!/usr/bin/env python
"""A PyTorch training loop with ``torch.nn.LSTM``/``GRU`` against ``fastgates.torch``.

Times one training step (zero_grad, forward, MSE loss, backward, Adam step)
of the same loop twice in one process: once with ``torch.nn.LSTM`` (or
``GRU``) and once with the drop-in ``fastgates.torch.LSTM`` (or ``GRU``),
starting from the same parameters (same seed), on the same data, with the
same thread count on both sides (``torch.set_num_threads`` and
``fastgates.set_num_threads``).  Before timing, one step's loss and gradients
are compared.  After a warm-up the sides alternate A B A B; each reports the
median of ``--repeats`` timed runs, every run long enough (``--min-run-time``)
for the timer not to matter, each preceded by a short pause so that neither
side's thread pool spins into the other's run.

Also reported: what the drop-in module spends each call copying the
parameters into its fastgates model (``load_state_dict``), which it does at
every forward pass so that optimizer steps and in-place edits are seen.

Not a test: run it by hand on an idle machine, one benchmark at a time::

    python benchmarks/torch_training_loop.py
    python benchmarks/torch_training_loop.py --threads 1 --cells lstm --dtypes float64
"""

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

try:
    import fastgates as fg
except ImportError:  # not installed: use the source tree this script lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastgates as fg
import fastgates.torch as fgt

SHAPES = [(100, 1, 32, 64), (100, 16, 64, 128)]  # (T, B, I, H)
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PAUSE = 0.01  # seconds of idle before each timed run: longer than any OpenMP spin


def make_loop(cls, shape, dtype, seed=0):
    """One training step of a fixed problem, as a function of no arguments."""
    T, B, I, H = shape
    torch.manual_seed(seed)
    rnn = cls(I, H, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, B, I, generator=gen, dtype=dtype)
    target = torch.randn(T, B, H, generator=gen, dtype=dtype)
    opt = torch.optim.Adam(rnn.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        y, _ = rnn(x)
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        opt.step()
        return loss

    return rnn, step


def first_step_error(ref_cls, cls, shape, dtype):
    """Largest relative difference of the loss and the gradients after one step."""
    results = []
    for c in (ref_cls, cls):
        rnn, step = make_loop(c, shape, dtype)
        loss = step()
        results.append([loss.detach()] + [p.grad for p in rnn.parameters()])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results))


def timed_run(fn, calls):
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_alternating(fns, repeats, min_run_time, warmup=3):
    """Median seconds per call of each function, the sides alternating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {}
    for name, fn in fns.items():
        once = timed_run(fn, 1)
        calls[name] = max(1, int(np.ceil(min_run_time / max(once, 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed_run(fn, calls[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def parameter_load_seconds(module, repeats):
    """Seconds the drop-in module spends per call loading its parameters.

    The same work as its forward pass does: NumPy views of the parameters,
    then one ``load_state_dict`` into a fastgates model.
    """
    model = fgt.from_torch(module)
    params = list(module.named_parameters())

    def load():
        model.load_state_dict({name: p.detach().numpy() for name, p in params})

    return time_alternating({"load": load}, repeats, 0.05)["load"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to run, the same on both sides (default: 1 2)")
    p.add_argument("--cells", nargs="+", choices=["lstm", "gru"], default=["lstm", "gru"])
    p.add_argument("--dtypes", nargs="+", choices=list(TORCH_DTYPES), default=["float64", "float32"])
    p.add_argument("--repeats", type=int, default=9, help="timed runs per side, median reported")
    p.add_argument("--min-run-time", type=float, default=0.2,
                   help="seconds each timed run lasts at least (several steps)")
    args = p.parse_args(argv)

    old = torch.get_num_threads(), fg.get_num_threads()
    print(f"- torch {torch.__version__}, fastgates {fg.__version__} "
          f"(activations: {fg.get_activation_mode()}), Python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    print(f"- one step: zero_grad, forward, MSE loss on y, backward, Adam; x without grad, "
          f"h0 = None; median of {args.repeats} timed runs per side, sides alternating")
    print("- ratio = torch.nn time / fastgates.torch time (above 1: fastgates is faster)")
    print("- param load: the drop-in's per-call copy of the parameters into fastgates "
          "(share of its step)")
    print("- agree: largest relative difference of loss and gradients after one step\n")
    print("| cell | dtype | (T, B, I, H) | threads | torch.nn ms | fastgates.torch ms | ratio "
          "| param load µs | agree |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for n in args.threads:
            torch.set_num_threads(n)
            fg.set_num_threads(n)
            for cell in args.cells:
                ref_cls, cls = (torch.nn.LSTM, fgt.LSTM) if cell == "lstm" else (torch.nn.GRU, fgt.GRU)
                for dtype_name in args.dtypes:
                    dtype = TORCH_DTYPES[dtype_name]
                    for shape in SHAPES:
                        err = first_step_error(ref_cls, cls, shape, dtype)
                        _, ref_step = make_loop(ref_cls, shape, dtype)
                        module, step = make_loop(cls, shape, dtype)
                        t = time_alternating({"torch": ref_step, "fastgates": step},
                                             args.repeats, args.min_run_time)
                        load = parameter_load_seconds(module, args.repeats)
                        print(f"| {cell} | {dtype_name} | {shape} | {n} | {1e3 * t['torch']:.3f} "
                              f"| {1e3 * t['fastgates']:.3f} | {t['torch'] / t['fastgates']:.2f} "
                              f"| {1e6 * load:.0f} ({100 * load / t['fastgates']:.1f}%) "
                              f"| {err:.1e} |", flush=True)
    finally:
        torch.set_num_threads(old[0])
        fg.set_num_threads(old[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
