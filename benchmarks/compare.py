#!/usr/bin/env python
"""Side-by-side benchmark of fastgates against PyTorch and onnxruntime.

Implements the protocol of docs/benchmarks.md:

- fastgates, PyTorch and (float32 inference only) onnxruntime run in one
  process, on the same weights (fastgates' ``state_dict()`` copied across),
  with the same thread count everywhere (fastgates, torch, onnxruntime's
  intra-op pool, every BLAS and OpenMP pool through threadpoolctl);
- outputs (inference) or all gradients (training) are compared first;
- after a warm-up the sides alternate A B A B ...; each side reports the
  median of ``--repeats`` (>= 7) timed runs;
- GFLOP/s use forward FLOPs ``2*T*B*G*H*(I_k+H)`` summed over layers and
  directions, training = 3x, and are also given as a fraction of one
  2048x2048 ``np.dot`` measured in the same process, dtype and threads.

Usage::

    python benchmarks/compare.py --quick              # one shape per group, 2 threads
    python benchmarks/compare.py --threads 1 2 --out results.md
    python benchmarks/compare.py --groups tiny --cells lstm --dtypes float32

Run it on an idle machine, one benchmark at a time.
"""

import os

# No pool may busy-wait into the other side's run.  OMP_WAIT_POLICY=PASSIVE
# is not the way: it makes every OpenMP region of PyTorch's pay a futex wake,
# and measured here it made PyTorch's tiny LSTM 20x slower (0.29 -> 6.2 ms),
# which would flatter fastgates.  Instead both OpenMP runtimes (PyTorch's and
# Numba's) keep their default short spin, and every timed run starts after a
# pause (PAUSE) long enough for the pool of the side before it to fall asleep;
# onnxruntime's pool, which spins for long, is told not to spin.  --spin-check
# verifies it: each side timed alone must match its time when alternating.

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

try:
    import fastgates as fg
except ImportError:  # not installed: use the source tree this script lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastgates as fg

try:
    import torch
except ImportError:  # the comparison degrades to fastgates alone
    torch = None

try:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
except ImportError:
    ort = None


# ---------------------------------------------------------------------------
# the matrix


@dataclasses.dataclass(frozen=True)
class Shape:
    group: str
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int = 1
    bidirectional: bool = False

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    def label(self):
        s = f"({self.T}, {self.B}, {self.I}, {self.H})"
        if self.layers > 1 or self.bidirectional:
            s += f" L={self.layers}" + (" bi" if self.bidirectional else "")
        return s

    def id(self):
        """Compact name for test ids: tiny-100x1x32x64, stacked-...-L2bi."""
        s = f"{self.group}-{self.T}x{self.B}x{self.I}x{self.H}"
        if self.layers > 1 or self.bidirectional:
            s += f"-L{self.layers}" + ("bi" if self.bidirectional else "")
        return s

    def forward_flops(self, G):
        """2*T*B*G*H*(I_k + H) per layer and direction."""
        total = 0
        for k in range(self.layers):
            i_k = self.I if k == 0 else self.D * self.H
            total += self.D * 2 * self.T * self.B * G * self.H * (i_k + self.H)
        return total


MATRIX = [
    Shape("tiny", 100, 1, 32, 64),
    Shape("tiny", 1000, 1, 8, 32),
    Shape("small", 100, 16, 64, 128),
    Shape("small", 100, 64, 128, 128),
    Shape("medium", 150, 16, 256, 256),
    Shape("medium", 100, 32, 128, 256),
    Shape("large", 50, 64, 512, 512),
    Shape("large", 25, 16, 1024, 1024),
    Shape("stacked", 50, 16, 256, 256, layers=2, bidirectional=True),
]
GROUPS = ["tiny", "small", "medium", "large", "stacked"]
# One shape per group for --quick: those with reference numbers in
# BENCHMARKS.md where there is a choice.
QUICK = [MATRIX[0], MATRIX[2], MATRIX[5], MATRIX[7], MATRIX[8]]

GATES = {"lstm": 4, "gru": 3}
DTYPES = {"float32": np.float32, "float64": np.float64}

# Agreement bound on max|a - b| / max(1, max|b|): float32 sums of up to
# T*B ~ 1e4 terms leave ~1e-5 relative; float64 ~1e-13.  An error (wrong
# gate, missing term) is orders of magnitude larger.
AGREE_TOL = {"float32": 5e-4, "float64": 1e-9}

GEMM_N = 2048


# ---------------------------------------------------------------------------
# timing


def _once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _calls_per_run(fn, min_run_time):
    """Calls that make one timed run last at least min_run_time seconds."""
    t = _once(fn)
    return max(1, math.ceil(min_run_time / max(t, 1e-9)))


# Seconds of idle before each timed run: libgomp's default spin (300,000
# iterations) is well under a millisecond.
PAUSE = 0.01


def _timed_run(fn, n):
    time.sleep(PAUSE)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def time_alternating(fns, repeats, min_run_time, warmup=2):
    """Median seconds per call of each fn, the sides alternating A B A B.

    Returns (medians, calls_per_run)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {k: _calls_per_run(fn, min_run_time) for k, fn in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_timed_run(fn, calls[k]))
    return {k: statistics.median(v) for k, v in samples.items()}, calls


def time_solo(fn, calls, repeats):
    """Median seconds per call of fn timed on its own (spinning check)."""
    return statistics.median(_timed_run(fn, calls) for _ in range(repeats))


def gemm_gflops(dtype, repeats=5):
    """Throughput of one GEMM_N x GEMM_N np.dot, under the current limits."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((GEMM_N, GEMM_N)).astype(dtype)
    b = rng.standard_normal((GEMM_N, GEMM_N)).astype(dtype)
    out = np.empty_like(a)
    np.dot(a, b, out=out)
    t = statistics.median(_once(lambda: np.dot(a, b, out=out))
                          for _ in range(repeats))
    return 2.0 * GEMM_N ** 3 / t / 1e9


# ---------------------------------------------------------------------------
# the contestants


def _fg_model(cell, shape, dtype):
    cls = fg.LSTM if cell == "lstm" else fg.GRU
    return cls(shape.I, shape.H, shape.layers,
               bidirectional=shape.bidirectional, dtype=dtype, seed=0)


def _zero_state(cell, shape, dtype):
    h0 = np.zeros((shape.layers * shape.D, shape.B, shape.H), dtype=dtype)
    return (h0, h0.copy()) if cell == "lstm" else h0


def _torch_model(cell, shape, dtype, state_dict):
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    m = cls(shape.I, shape.H, shape.layers, bidirectional=shape.bidirectional)
    m = m.to(torch.float32 if dtype == np.float32 else torch.float64)
    m.load_state_dict({k: torch.from_numpy(np.array(v))
                       for k, v in state_dict.items()})
    return m


# ONNX gate order: LSTM i, o, f, c from PyTorch's i, f, g, o; GRU z, r, h
# from r, z, n.
_ONNX_BLOCKS = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _onnx_reorder(a, cell, H):
    return np.concatenate([a[j * H:(j + 1) * H] for j in _ONNX_BLOCKS[cell]])


def _onnx_session(cell, shape, state_dict, threads):
    """A float32 graph of one LSTM/GRU node per layer, y as (T, B, D*H)."""
    T, B, H, D = shape.T, shape.B, shape.H, shape.D
    suffixes = [""] + (["_reverse"] if shape.bidirectional else [])
    op = "LSTM" if cell == "lstm" else "GRU"
    attrs = {"hidden_size": H,
             "direction": "bidirectional" if shape.bidirectional else "forward"}
    if cell == "gru":
        attrs["linear_before_reset"] = 1        # PyTorch's reset_after form
    nodes, inits = [], [numpy_helper.from_array(
        np.array([T, B, D * H], dtype=np.int64), "y_shape")]
    current = "X"
    def stack(name, k):
        """(D, G*H, ...) in ONNX gate order from layer k's PyTorch arrays."""
        return np.stack([_onnx_reorder(state_dict[f"{name}_l{k}{s}"], cell, H)
                         for s in suffixes]).astype(np.float32)

    for k in range(shape.layers):
        W, R = stack("weight_ih", k), stack("weight_hh", k)
        Bias = np.concatenate([stack("bias_ih", k), stack("bias_hh", k)], axis=1)
        for name, arr in ((f"W{k}", W), (f"R{k}", R), (f"B{k}", Bias)):
            inits.append(numpy_helper.from_array(arr, name))
        nodes.append(helper.make_node(op, [current, f"W{k}", f"R{k}", f"B{k}"],
                                      [f"Y{k}"], **attrs))
        # ONNX's Y is (T, D, B, H); the next layer and the user want (T, B, D*H).
        nodes.append(helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"],
                                      perm=[0, 2, 1, 3]))
        out = "Y" if k == shape.layers - 1 else f"X{k + 1}"
        nodes.append(helper.make_node("Reshape", [f"Yt{k}", "y_shape"], [out]))
        current = out
    graph = helper.make_graph(
        nodes, f"{op}_bench",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, shape.I])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [T, B, D * H])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8                       # what opset 17 ships with
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _max_err(pairs):
    """max |a - b| / max(1, max|b|) over (name, a, b) pairs; worst name."""
    worst, worst_name = 0.0, ""
    for name, a, b in pairs:
        b = np.asarray(b, dtype=np.float64)
        err = float(np.max(np.abs(np.asarray(a, np.float64) - b)))
        err /= max(1.0, float(np.max(np.abs(b))))
        if err >= worst:
            worst, worst_name = err, name
    return worst, worst_name


def _to_np(t):
    return t.detach().numpy()


def make_inference(cell, shape, dtype_name, m, x, threads, use_onnx):
    """Callables for inference and their agreement with fastgates' y."""
    fns, errs = {"fastgates": lambda: m(x)}, {}
    y_fg, _ = m(x)
    if torch is not None:
        tm = _torch_model(cell, shape, DTYPES[dtype_name], m.state_dict())
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                return tm(xt)
        fns["torch"] = run_torch
        errs["torch"] = _max_err([("y", y_fg, _to_np(run_torch()[0]))])
    if use_onnx and dtype_name == "float32":
        sess = _onnx_session(cell, shape, m.state_dict(), threads)
        feed = {"X": x}
        fns["onnxruntime"] = lambda: sess.run(None, feed)
        errs["onnxruntime"] = _max_err([("y", y_fg, sess.run(None, feed)[0])])
    return fns, errs


def make_training(cell, shape, dtype_name, m, x, dy):
    """Callables for forward + backward and their gradients' agreement."""
    dtype = DTYPES[dtype_name]
    state = _zero_state(cell, shape, dtype)

    def run_fg():
        (y, st), pullback = m.vjp(x, state)
        return pullback(dy)
    fns, errs = {"fastgates": run_fg}, {}
    if torch is None:
        return fns, errs
    tm = _torch_model(cell, shape, dtype, m.state_dict())
    params = list(tm.parameters())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    states_t = [torch.from_numpy(s.copy()).requires_grad_(True)
                for s in (state if cell == "lstm" else (state,))]
    dyt = torch.from_numpy(dy)

    def run_torch():
        xt.grad = None
        for t in states_t + params:
            t.grad = None
        y, _ = tm(xt, tuple(states_t) if cell == "lstm" else states_t[0])
        y.backward(dyt)
    fns["torch"] = run_torch

    dx, dstate, dparams = run_fg()
    run_torch()
    pairs = [("dx", dx, _to_np(xt.grad))]
    dstates = dstate if cell == "lstm" else (dstate,)
    names = ("dh0", "dc0")[:len(states_t)]
    for name, a, t in zip(names, dstates, states_t, strict=True):
        pairs.append((name, a, _to_np(t.grad)))
    for name, p in tm.named_parameters():
        pairs.append((name, dparams[name], _to_np(p.grad)))
    errs["torch"] = _max_err(pairs)
    return fns, errs


# ---------------------------------------------------------------------------
# running the matrix


@dataclasses.dataclass
class Row:
    shape: Shape
    cell: str
    dtype: str
    mode: str
    threads: int
    times: dict
    errs: dict
    gflops: float
    gemm: float
    solo_change: float = None


def set_threads(n):
    fg.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def run_matrix(args, log):
    use_onnx = ort is not None and not args.no_onnx
    shapes = QUICK if args.quick else MATRIX
    shapes = [s for s in shapes if s.group in args.groups]
    rows, gemm = [], {}
    for n in args.threads:
        # threadpoolctl caps every BLAS and OpenMP pool in the process.
        with threadpool_limits(limits=n):
            set_threads(n)
            for dtype_name in args.dtypes:
                gemm[(dtype_name, n)] = gemm_gflops(DTYPES[dtype_name])
                log(f"threads={n} {dtype_name}: np.dot {GEMM_N}^2 "
                    f"{gemm[(dtype_name, n)]:.1f} GFLOP/s")
            for shape in shapes:
                for cell in args.cells:
                    for dtype_name in args.dtypes:
                        rows += _run_shape(args, shape, cell, dtype_name, n,
                                           gemm[(dtype_name, n)], use_onnx, log)
    return rows, gemm


def _run_shape(args, shape, cell, dtype_name, n, gemm, use_onnx, log):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(1)
    m = _fg_model(cell, shape, dtype)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(dtype)
    dy = rng.standard_normal((shape.T, shape.B, shape.D * shape.H)).astype(dtype)
    rows = []
    for mode in args.modes:
        if mode == "infer":
            fns, errs = make_inference(cell, shape, dtype_name, m, x, n, use_onnx)
            flops = shape.forward_flops(GATES[cell])
        else:
            fns, errs = make_training(cell, shape, dtype_name, m, x, dy)
            flops = 3 * shape.forward_flops(GATES[cell])
        times, calls = time_alternating(fns, args.repeats, args.min_run_time)
        solo = None
        if args.spin_check:
            solo = max(abs(time_solo(fn, calls[k], args.repeats) / times[k] - 1.0)
                       for k, fn in fns.items())
        row = Row(shape, cell, dtype_name, mode, n, times, errs,
                  flops / times["fastgates"] / 1e9, gemm, solo)
        rows.append(row)
        log(_log_line(row))
    return rows


def _log_line(row):
    parts = [f"{row.shape.label():<28} {row.cell} {row.dtype} {row.mode:<5} "
             f"thr={row.threads}"]
    for k, t in row.times.items():
        parts.append(f"{k} {t * 1e3:.3f} ms")
    for k, (e, _) in row.errs.items():
        parts.append(f"err[{k}] {e:.1e}")
    return "  ".join(parts)


# ---------------------------------------------------------------------------
# report


def _fmt_ms(t):
    return "" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}")


def _fmt_ratio(peer, mine):
    return "" if peer is None else f"{peer / mine:.2f}"


def _agree(row):
    tol = AGREE_TOL[row.dtype]
    if not row.errs:
        return "n/a"
    worst = max(row.errs.items(), key=lambda kv: kv[1][0])
    peer, (err, name) = worst
    if err <= tol:
        return f"{err:.0e}"
    return f"**NO** {err:.0e} ({peer}: {name})"


def environment_lines():
    lines = [
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- machine: {platform.machine()}, {_cpu_model()}, "
        f"{os.cpu_count()} logical cores, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"fastgates {getattr(fg, '__version__', '?')} "
        f"({os.path.dirname(fg.__file__)}), "
        f"torch {torch.__version__ if torch is not None else 'not installed'}, "
        f"onnxruntime {ort.__version__ if ort is not None else 'not installed'}",
    ]
    blas = [f"{p.get('internal_api')} {p.get('version')} "
            f"({p.get('architecture')}, {p.get('threading_layer')})"
            for p in threadpool_info() if p.get("user_api") == "blas"]
    lines.append(f"- BLAS: {', '.join(blas) or 'unknown'}")
    env = {k: os.environ[k] for k in sorted(os.environ)
           if k.startswith(("OPENBLAS_", "OMP_", "NUMBA_", "MKL_"))}
    lines.append(f"- environment: {env}")
    return lines


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(rows, gemm, args, compile_rows=None):
    out = ["# fastgates benchmark", ""]
    out += environment_lines()
    out += [f"- command: `python benchmarks/compare.py {' '.join(sys.argv[1:])}`",
            f"- median of {args.repeats} timed runs after warm-up, sides "
            f"alternating; each run repeats the call to last >= "
            f"{args.min_run_time * 1e3:g} ms", ""]
    out += ["## GEMM throughput (np.dot, 2048x2048)", "",
            "| dtype | threads | GFLOP/s |", "| --- | --- | --- |"]
    out += [f"| {d} | {n} | {g:.1f} |" for (d, n), g in sorted(gemm.items())]
    out += ["", "## Side by side", "",
            "Times in ms; ratios are peer_time / fastgates_time (above 1: "
            "fastgates is faster). GFLOP/s with forward FLOPs "
            "2*T*B*G*H*(I_k+H), training 3x; %GEMM against the table above. "
            "err: max |fastgates - peer| / max(1, max|peer|) over y "
            "(inference) or every gradient (training).", ""]
    header = ["group", "(T, B, I, H)", "cell", "dtype", "mode", "thr",
              "fastgates", "torch", "onnxrt", "torch/fg", "onnxrt/fg",
              "best peer/fg", "GFLOP/s", "%GEMM", "err"]
    if args.spin_check:
        header.append("solo vs alt")
    out += ["| " + " | ".join(header) + " |",
            "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        mine = r.times["fastgates"]
        t_torch, t_ort = r.times.get("torch"), r.times.get("onnxruntime")
        peers = [t for t in (t_torch, t_ort) if t is not None]
        cells = [r.shape.group, r.shape.label(), r.cell, r.dtype, r.mode,
                 str(r.threads), _fmt_ms(mine), _fmt_ms(t_torch), _fmt_ms(t_ort),
                 _fmt_ratio(t_torch, mine), _fmt_ratio(t_ort, mine),
                 _fmt_ratio(min(peers) if peers else None, mine),
                 f"{r.gflops:.1f}", f"{100 * r.gflops / r.gemm:.0f}%", _agree(r)]
        if args.spin_check:
            cells.append(f"{100 * r.solo_change:.0f}%")
        out.append("| " + " | ".join(cells) + " |")
    notes = []
    if torch is None:
        notes.append("PyTorch is not installed: only fastgates was timed "
                     "(`pip install torch==2.13.0`, the CPU build).")
    if ort is None:
        notes.append("onnxruntime/onnx are not installed: no onnxruntime column "
                     "(`pip install onnxruntime onnx`).")
    elif args.no_onnx:
        notes.append("onnxruntime skipped (--no-onnx).")
    if args.spin_check:
        notes.append("solo vs alt: largest change of a side timed on its own "
                     "against alternating; above 10% means a pool spins.")
    if compile_rows:
        out += ["", "## Compile cost (first call in a fresh process)", "",
                "| cell | cache | import s | first forward s | first vjp+pullback s |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {c} | {k} | {r['import']:.2f} | {r['forward']:.2f} | "
                f"{r['train']:.2f} |" for c, k, r in compile_rows]
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# compile cost


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import fastgates as fg
    t1 = time.perf_counter()
    m = fg.{cls}(32, 64, dtype=np.float32, seed=0)
    x = np.random.default_rng(0).standard_normal((100, 1, 32)).astype(np.float32)
    m(x)
    t2 = time.perf_counter()
    (y, state), pullback = m.vjp(x)
    pullback(np.ones_like(y))
    t3 = time.perf_counter()
    print(json.dumps({{"import": t1 - t0, "forward": t2 - t1, "train": t3 - t2}}))
""")


def compile_cost(cells, log):
    """First calls in fresh processes: empty Numba cache, then warm cache."""
    rows = []
    for cell in cells:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            code = _COMPILE_SCRIPT.format(cls="LSTM" if cell == "lstm" else "GRU")
            for kind in ("empty", "warm"):
                res = subprocess.run([sys.executable, "-c", code], env=env,
                                     capture_output=True, text=True, check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                log(f"compile {cell} {kind} cache: {r}")
                rows.append((cell, kind, r))
    return rows


# ---------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="fastgates vs PyTorch (and onnxruntime) side by side; "
                    "see docs/benchmarks.md.")
    p.add_argument("--quick", action="store_true",
                   help="one shape per group at 2 threads (unless --threads)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts (default: 1 2; --quick: 2)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS)
    p.add_argument("--cells", nargs="+", choices=list(GATES), default=list(GATES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                   default=list(DTYPES))
    p.add_argument("--modes", nargs="+", choices=["infer", "train"],
                   default=["infer", "train"])
    p.add_argument("--repeats", type=int, default=7,
                   help="timed runs per side, median reported (>= 7)")
    p.add_argument("--min-run-time", type=float, default=0.02,
                   help="seconds one timed run lasts at least; short calls "
                        "are repeated within a run (default 0.02)")
    p.add_argument("--spin-check", action="store_true",
                   help="also time each side on its own and report the change")
    p.add_argument("--compile-cost", action="store_true",
                   help="also measure the first call in fresh processes "
                        "(empty and warm Numba cache)")
    p.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    p.add_argument("--out", metavar="FILE", help="also write the table here")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = [2] if args.quick else [1, 2]
    if args.repeats < 7:
        p.error("--repeats must be at least 7 (the protocol's minimum)")
    return args


def main(argv=None):
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if torch is None:
        log("note: PyTorch is not installed; timing fastgates alone "
            "(install the CPU build: pip install torch==2.13.0).")
    else:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
    if ort is None and not args.no_onnx:
        log("note: onnxruntime/onnx are not installed; no onnxruntime column.")
    if "OPENBLAS_CORETYPE" in os.environ:
        log("note: OPENBLAS_CORETYPE is set, which can select a slower BLAS "
            "kernel; for benchmarking run with "
            "`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`.")
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}: the machine is not idle; "
            "ratios may be distorted.")

    rows, gemm = run_matrix(args, log)
    compile_rows = compile_cost(args.cells, log) if args.compile_cost else None
    text = report(rows, gemm, args, compile_rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
