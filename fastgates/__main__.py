"""Command line entry point: ``python -m fastgates``.

With no subcommand it runs the worked example of the design note: an LSTM
reads a sequence of length T = 5 from h0 = c0 = 0, and the program prints the
gates step by step, shows that c_1 = i_1 * g_1 exactly, shows what the forget
gate means on real numbers, and checks the gradients against central finite
differences.  Only the runtime dependencies are needed.

``python -m fastgates bench`` runs the side-by-side benchmark of
:mod:`fastgates.bench` (PyTorch, onnxruntime and JAX are optional peers
there).

``python -m fastgates compile`` fills the kernel cache ahead of time
(:mod:`fastgates.precompile`).

``python -m fastgates demo`` trains a forecaster of the yearly sunspot number
(:mod:`fastgates.demo`), reports it against two baselines with its forget-gate
time scales, and writes three plots (matplotlib, the `demo` extra).

New subcommands are added in ``_build_parser``: one ``add_parser`` call and a
function ``(args) -> int`` set as the subparser's ``func`` default.
"""

import argparse
import sys

import numpy as np

# Sizes of the worked example: small enough to print every number.
_T, _I, _H = 5, 3, 4
_DEFAULT_SEED = 0

# Central differences in float64: truncation ~ step**2, rounding ~ eps/step,
# so a correct gradient agrees to ~1e-9 relative and 1e-6 separates right
# from wrong by orders of magnitude.
_FD_STEP = 1e-6
_FD_RTOL = 1e-6


# --------------------------------------------------------------------------
# printing helpers


def _fmt(v):
    return f"{v:+.6f}"


def _table(headers, rows):
    """Return an aligned plain-text table (first column left, others right)."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]

    def line(row):
        parts = [row[0].ljust(widths[0])]
        parts += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _heading(text):
    print()
    print(text)
    print("=" * len(text))


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


# --------------------------------------------------------------------------
# the worked example


def _model_and_input(seed):
    import fastgates as fg

    m = fg.LSTM(_I, _H, dtype=np.float64, seed=seed)
    x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(_T, _I))
    return fg, m, x


def _walk_through(m, x):
    """Print every gate at every step; return whether c_1 == i_1 * g_1."""
    _heading(f"1. An LSTM (input_size={_I}, hidden_size={_H}, float64) reads "
             f"T={_T} steps from h0 = c0 = 0")
    print("Input x (rows are time steps t = 1..5):")
    print(_table(["t"] + [f"x[{k}]" for k in range(_I)],
                 [[t + 1] + [_fmt(v) for v in x[t]] for t in range(_T)]))

    gates = m.gates(x)                      # each (L*D, T, H) = (1, 5, 4)
    y, (h_n, c_n) = m(x)                    # y (T, H); h_n, c_n (1, H)
    i, f, g, o, c = (gates[k][0] for k in ("i", "f", "g", "o", "c"))
    h = y                                   # one layer, one direction

    print()
    print("i = input gate, f = forget gate, g = candidate cell, o = output gate;")
    print("c_t = f_t * c_(t-1) + i_t * g_t,  h_t = o_t * tanh(c_t).")
    for t in range(_T):
        print()
        print(f"t = {t + 1}")
        rows = [[name] + [_fmt(v) for v in arr[t]]
                for name, arr in (("i", i), ("f", f), ("g", g), ("o", o),
                                  ("c", c), ("h", h))]
        print(_table(["value"] + [f"unit {u}" for u in range(_H)], rows))

    # The equations, recomputed in NumPy from the parameters, at t = 1.
    sd = m.state_dict()
    a = sd["weight_ih_l0"] @ x[0] + sd["bias_ih_l0"] + sd["bias_hh_l0"]
    ref = {"i": _sigmoid(a[0:_H]), "f": _sigmoid(a[_H:2 * _H]),
           "g": np.tanh(a[2 * _H:3 * _H]), "o": _sigmoid(a[3 * _H:])}
    print()
    print("At t = 1 with h0 = 0 the gates are the activations of "
          "W_ih x_1 + b_ih + b_hh (rows i, f, g, o);")
    print("recomputed in NumPy from state_dict():")
    print(_table(["gate", "max |fastgates - numpy|"],
                 [[k, f"{np.max(np.abs(gates[k][0, 0] - ref[k])):.1e}"]
                  for k in ("i", "f", "g", "o")]))

    exact = bool(np.array_equal(c[0], i[0] * g[0]))
    print()
    print("Since c_0 = 0, c_1 = f_1 * 0 + i_1 * g_1 = i_1 * g_1:")
    print(_table(["", *[f"unit {u}" for u in range(_H)]],
                 [["c_1"] + [_fmt(v) for v in c[0]],
                  ["i_1 * g_1"] + [_fmt(v) for v in i[0] * g[0]]]))
    print(f"bit-for-bit equal: {'yes' if exact else 'no'}"
          f" (max difference {np.max(np.abs(c[0] - i[0] * g[0])):.1e})")
    dev = np.max(np.abs(h - o * np.tanh(c)))
    print(f"h_t = o_t * tanh(c_t) at every step: max difference {dev:.1e}")
    print("final state (h_n, c_n) against (h_5, c_5): max difference "
          f"{max(np.max(np.abs(h_n[0] - h[-1])), np.max(np.abs(c_n[0] - c[-1]))):.1e}")
    return exact


def _forget_gate(m, x):
    """Pin f to 0.2 and 0.8 with i ~ 0 and show c_t / c_(t-1)."""
    _heading("2. What the forget gate means: c keeps the fraction f of its "
             "previous value")
    print("On a copy of state_dict(): the i and f rows of weight_ih_l0 and "
          "weight_hh_l0 are set")
    print("to 0, the i biases to -40 (so i = sigmoid(-40) ~ 4e-18: nothing new "
          "is written),")
    print("and bias_ih_l0's f rows to logit(f), so that f is that constant at "
          "every step.")
    print("The sequence starts from h0 = 0 and c0 = (1, -2, 0.5, 3).")
    H = _H
    c0 = np.array([[1.0, -2.0, 0.5, 3.0]])
    h0 = np.zeros((1, H))
    original = m.state_dict()
    try:
        for f_target in (0.2, 0.8):
            sd = {k: v.copy() for k, v in original.items()}
            for name in ("weight_ih_l0", "weight_hh_l0"):
                sd[name][0:2 * H] = 0.0                        # rows of i and f
            sd["bias_ih_l0"][0:H] = -40.0
            sd["bias_hh_l0"][0:H] = 0.0
            sd["bias_ih_l0"][H:2 * H] = np.log(f_target / (1.0 - f_target))
            sd["bias_hh_l0"][H:2 * H] = 0.0
            m.load_state_dict(sd)
            gates = m.gates(x, state=(h0, c0))
            f, i, c = gates["f"][0], gates["i"][0], gates["c"][0]
            prev = np.vstack([c0, c[:-1]])
            print()
            print(f"target f = {f_target}: f in [{f.min():.12f}, "
                  f"{f.max():.12f}], max i = {i.max():.1e}")
            rows = []
            for t in range(_T):
                rows.append([t + 1] + [_fmt(v) for v in c[t]]
                            + [f"{np.mean(c[t] / prev[t]):.12f}"])
            print(_table(["t", *[f"c unit {u}" for u in range(H)],
                          "mean c_t / c_(t-1)"], rows))
            print(f"after {_T} steps c_5 / c_0 = {f_target}^{_T} = "
                  f"{f_target ** _T:.5f}; measured "
                  f"{np.mean(c[-1] / c0[0]):.5f}")
    finally:
        m.load_state_dict(original)


def _gradient_check(fg, m, x, seed):
    """Compare the pullback with central differences; return the max error."""
    _heading("3. Gradient check: pullback against central finite differences "
             "(float64)")
    rng = np.random.default_rng(seed + 1)
    h0 = rng.uniform(-0.5, 0.5, size=(1, _H))
    c0 = rng.uniform(-0.5, 0.5, size=(1, _H))
    dy = rng.standard_normal((_T, _H))
    dh = rng.standard_normal((1, _H))
    dc = rng.standard_normal((1, _H))
    print("Loss L = sum(y * dy) + <h_n, dh> + <c_n, dc>, random dy, dh, dc, "
          "and a random (h0, c0).")
    print("(y, state), pullback = m.vjp(x, (h0, c0));  "
          "dx, (dh0, dc0), dparams = pullback(dy, (dh, dc))")

    (y, state), pullback = m.vjp(x, (h0, c0))
    dx, (dh0, dc0), dparams = pullback(dy, (dh, dc))

    params = m.state_dict()
    probe = fg.LSTM(_I, _H, dtype=np.float64, seed=seed)

    def loss(p, xx, hh, cc):
        probe.load_state_dict(p)
        yy, (hn, cn) = probe(xx, (hh, cc))
        return float(np.sum(yy * dy) + np.sum(hn * dh) + np.sum(cn * dc))

    def central(which, idx):
        vals = []
        for sign in (1.0, -1.0):
            p = {k: v.copy() for k, v in params.items()}
            xx, hh, cc = x.copy(), h0.copy(), c0.copy()
            target = {"x": xx, "h0": hh, "c0": cc}.get(which, p.get(which))
            target[idx] += sign * _FD_STEP
            vals.append(loss(p, xx, hh, cc))
        return (vals[0] - vals[1]) / (2.0 * _FD_STEP)

    analytic = {"x": dx, "h0": dh0, "c0": dc0, **dparams}
    probes = [("x", (0, 0)), ("x", (2, 1)), ("x", (4, 2)),
              ("h0", (0, 1)), ("c0", (0, 3)),
              ("weight_ih_l0", (1, 0)), ("weight_ih_l0", (5, 2)),   # i, f rows
              ("weight_hh_l0", (9, 3)), ("weight_hh_l0", (14, 1)),  # g, o rows
              ("bias_ih_l0", (6,)), ("bias_hh_l0", (13,))]
    rows, worst = [], 0.0
    for which, idx in probes:
        a = float(analytic[which][idx])
        n = central(which, idx)
        rel = abs(a - n) / max(abs(a), abs(n), 1e-8)
        worst = max(worst, rel)
        rows.append([f"{which}{list(idx)}", f"{a:+.10e}", f"{n:+.10e}",
                     f"{rel:.1e}"])
    print()
    print(_table(["entry", "pullback", "finite difference", "rel. error"],
                 rows))
    print()
    verdict = "OK" if worst <= _FD_RTOL else "FAILED"
    print(f"max relative error: {worst:.1e} (step {_FD_STEP:g}; "
          f"bound {_FD_RTOL:g}) -> {verdict}")
    return worst


def _run_example(args):
    fg, m, x = _model_and_input(args.seed)
    version = getattr(fg, "__version__", "")
    print(f"fastgates {version} worked example (seed {args.seed})")
    _walk_through(m, x)
    _forget_gate(m, x)
    worst = _gradient_check(fg, m, x, args.seed)
    return 0 if worst <= _FD_RTOL else 1


# --------------------------------------------------------------------------
# command line


def _add_example_options(parser, default):
    # The subcommand's default is SUPPRESS so that `--seed 3 example` keeps 3.
    parser.add_argument("--seed", type=int, default=default,
                        help="seed of the parameters and inputs "
                             f"(default {_DEFAULT_SEED})")


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastgates",
        description="fastgates: Numba-compiled LSTM and GRU layers with "
                    "PyTorch's semantics. Without a command, runs the worked "
                    "example.")
    _add_example_options(parser, _DEFAULT_SEED)
    parser.set_defaults(func=_run_example)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    example = sub.add_parser(
        "example", help="the worked example (the default): an LSTM reads "
                        "T=5 steps; gates, the forget gate, a gradient check")
    _add_example_options(example, argparse.SUPPRESS)
    example.set_defaults(func=_run_example)
    # Imports only NumPy, threadpoolctl and fastgates; the peers (PyTorch,
    # onnxruntime) are imported when the benchmark runs, JAX only in its
    # worker processes.
    from . import bench

    bench.add_arguments(sub.add_parser(
        "bench", help="fastgates against PyTorch, onnxruntime, JAX and NumPy side "
                      "by side, each peer at its best thread count (--quick: one "
                      "shape per group; --load N: beside N busy processes)",
        description="fastgates against PyTorch, onnxruntime, JAX and NumPy side by "
                    "side, as in docs/benchmarks.md: each peer at every thread "
                    "count up to n, answers checked first (exit status 1 if "
                    "they disagree), training steps on changing weights."))
    from . import precompile

    precompile.add_arguments(sub.add_parser(
        "compile", help="fill the kernel cache ahead of time, every cell and dtype, "
                        "in parallel processes (container images, CI, Dask workers)",
        description=precompile.__doc__.split("\n\n")[0]))
    from . import demo   # NumPy and fastgates only; matplotlib when it plots

    demo.add_arguments(sub.add_parser(
        "demo", help="train an LSTM to forecast the yearly sunspot number; RMSE "
                     "against baselines, forget-gate time scales, three plots",
        description=demo.DESCRIPTION))
    return parser


def main(argv=None):
    """Run the command line; return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser().parse_args(argv)
    args.command_line = " ".join(["python -m fastgates", *argv])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
