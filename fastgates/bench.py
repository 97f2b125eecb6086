"""Side-by-side benchmark of fastgates against PyTorch, onnxruntime and NumPy.

Run it as ``python -m fastgates bench`` (``--help`` lists the options).  It
implements the protocol of ``docs/benchmarks.md``:

- fastgates, PyTorch and (float32 inference only) onnxruntime run in one
  process, on the same weights (fastgates' ``state_dict()`` copied across),
  with the same thread count everywhere (fastgates, torch, onnxruntime's
  intra-op pool, every BLAS and OpenMP pool through threadpoolctl);
- outputs (inference) or all gradients (training) are compared first, and
  fastgates' ``y`` is also checked against :func:`numpy_forward`, a
  batch-vectorised NumPy forward pass;
- after a warm-up the sides alternate A B A B ...; each side reports the
  median of ``--repeats`` (>= 7) timed runs;
- GFLOP/s use forward FLOPs ``2*T*B*G*H*(I_k+H)`` summed over layers and
  directions, training = 3x, and are also given as a fraction of one
  2048x2048 ``np.dot`` measured in the same process, dtype and threads.

A peer that is not installed is left out with a note; without PyTorch the
NumPy forward pass is timed instead (inference only).  ``--memory`` measures
the peak memory of a training step, ``--compile-cost`` the first call in a
fresh process.  Run it on an idle machine, one benchmark at a time.

PyTorch, onnx and onnxruntime are imported here, inside functions, and only
when asked for: ``import fastgates`` never imports this module.
"""

# No pool may busy-wait into the other side's run.  OMP_WAIT_POLICY=PASSIVE
# is not the way: it makes every OpenMP region of PyTorch's pay a futex wake,
# and measured here it made PyTorch's tiny LSTM 20x slower (0.29 -> 6.2 ms),
# which would flatter fastgates.  Instead both OpenMP runtimes (PyTorch's and
# Numba's) keep their default short spin, and every timed run starts after a
# pause (PAUSE) long enough for the pool of the side before it to fall asleep;
# onnxruntime's pool, which spins for long, is told not to spin.  --spin-check
# verifies it: each side timed alone must match its time when alternating.

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import fastgates as fg

__all__ = ["main", "add_arguments", "run", "numpy_forward", "kept_bytes", "MATRIX", "QUICK"]

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
PEERS = ["torch", "onnxruntime", "numpy"]

# Agreement bound on max|a - b| / max(1, max|b|): float32 sums of up to
# T*B ~ 1e4 terms leave ~1e-5 relative; float64 ~1e-13.  An error (wrong
# gate, missing term) is orders of magnitude larger.
AGREE_TOL = {"float32": 5e-4, "float64": 1e-9}

GEMM_N = 2048


def parse_shape(text):
    """``T,B,I,H`` or ``T,B,I,H,L`` or ``T,B,I,H,L,bi`` -> a "custom" Shape."""
    parts = [p.strip() for p in text.split(",")]
    bidirectional = bool(parts) and parts[-1] == "bi"
    if bidirectional:
        parts = parts[:-1]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (4, 5) or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"expected T,B,I,H[,L[,bi]] with positive integers, got {text!r}")
    return Shape("custom", *dims, bidirectional=bidirectional)


# ---------------------------------------------------------------------------
# the peers


@dataclasses.dataclass
class Peers:
    """The peer libraries that could be imported, and what was said about the rest."""

    torch: object = None
    onnx: object = None
    ort: object = None
    numpy: bool = False           # time numpy_forward as a peer (inference)
    notes: list = dataclasses.field(default_factory=list)

    def timed(self):
        """Names of the peers that get a column, in table order."""
        return [name for name, here in (("torch", self.torch is not None),
                                        ("onnxruntime", self.ort is not None),
                                        ("numpy", self.numpy)) if here]


def load_peers(requested=None):
    """Import the requested peers that are installed; a note for each one missing.

    ``requested`` is a list of names from PEERS, or None for the default:
    PyTorch and onnxruntime.  The NumPy forward pass is timed when asked for,
    when PyTorch was wanted but is missing, or when no requested peer is there.
    """
    wanted = ["torch", "onnxruntime"] if requested is None else list(requested)
    peers = Peers()
    if "torch" in wanted:
        try:
            import torch
        except ImportError:
            peers.notes.append("PyTorch is not installed: no PyTorch column "
                               "(`pip install torch==2.13.0`, the CPU build).")
        else:
            peers.torch = torch
    if "onnxruntime" in wanted:
        try:
            import onnx
            import onnxruntime
        except ImportError:
            peers.notes.append("onnxruntime/onnx are not installed: no onnxruntime "
                               "column (`pip install onnxruntime onnx`).")
        else:
            peers.onnx, peers.ort = onnx, onnxruntime
    peers.numpy = "numpy" in wanted
    if not peers.numpy and (("torch" in wanted and peers.torch is None)
                            or not peers.timed()):
        peers.numpy = True
        peers.notes.append("timing the NumPy reference forward pass "
                           "(fastgates.bench.numpy_forward) as the fallback peer.")
    if peers.numpy:
        peers.notes.append("numpy: inference only (there is no NumPy backward "
                           "pass), so its training cells are empty.")
    return peers


def _sigmoid(a):
    # 0.5 * (1 + tanh(a / 2)) equals 1 / (1 + exp(-a)) but cannot overflow.
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def numpy_forward(cell, params, x, num_layers=1, bidirectional=False):
    """Output ``y`` (T, B, D*H) of a stacked LSTM or GRU from a zero state, in NumPy.

    Batch-vectorised: per layer and direction one product for the input
    projection of all steps, then per step one (B, H) x (H, G*H) product and
    the gate arithmetic on whole (B, H) blocks.  The GRU is PyTorch's
    (``reset_after=True``).  Computes in the dtype of ``x`` and ``params``.

    Parameters
    ----------
    cell : {"lstm", "gru"}
    params : dict of str to ndarray
        Keyed as ``state_dict()`` (missing biases count as zero).
    x : ndarray, shape (T, B, I)
    num_layers : int
    bidirectional : bool

    Returns
    -------
    ndarray, shape (T, B, D*H)
    """
    T, B = x.shape[:2]
    suffixes = ["", "_reverse"] if bidirectional else [""]
    inp = x
    for k in range(num_layers):
        outs = []
        for suffix in suffixes:
            W = params[f"weight_ih_l{k}{suffix}"]
            R = params[f"weight_hh_l{k}{suffix}"]
            H = R.shape[1]
            b_ih = params.get(f"bias_ih_l{k}{suffix}", np.zeros(R.shape[0], R.dtype))
            b_hh = params.get(f"bias_hh_l{k}{suffix}", np.zeros(R.shape[0], R.dtype))
            xw = inp @ W.T + b_ih                                  # (T, B, G*H)
            h = np.zeros((B, H), dtype=R.dtype)
            c = np.zeros_like(h)
            out = np.empty((T, B, H), dtype=R.dtype)
            steps = range(T) if suffix == "" else range(T - 1, -1, -1)
            for t in steps:
                hw = h @ R.T + b_hh
                if cell == "lstm":
                    a = xw[t] + hw
                    i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H])
                    g, o = np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
                    c = f * c + i * g
                    h = o * np.tanh(c)
                else:
                    r = _sigmoid(xw[t, :, :H] + hw[:, :H])
                    z = _sigmoid(xw[t, :, H:2 * H] + hw[:, H:2 * H])
                    n = np.tanh(xw[t, :, 2 * H:] + r * hw[:, 2 * H:])
                    h = (1.0 - z) * n + z * h
                out[t] = h
            outs.append(out)
        inp = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)
    return inp


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
# A side whose CPU time over wall time exceeds its thread count by more than
# this used more cores than allowed (the slack covers the other side's pool
# spinning briefly into the run and the timer's own thread).
CORES_SLACK = 0.25


def _timed_run(fn, n, cpu=None):
    """Seconds per call over n calls; adds (wall, CPU) seconds to cpu if given."""
    time.sleep(PAUSE)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu[0] += wall
        cpu[1] += time.process_time() - c0
    return wall / n


def time_alternating(fns, repeats, min_run_time, warmup=2):
    """Median seconds per call of each fn, the sides alternating A B A B.

    Returns (medians, calls_per_run, cores): cores is each side's CPU time
    over wall time during its timed runs, the number of cores it kept busy
    (a side using more than the threads it was given shows up here)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    calls = {k: _calls_per_run(fn, min_run_time) for k, fn in fns.items()}
    samples = {k: [] for k in fns}
    cpu = {k: [0.0, 0.0] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            samples[k].append(_timed_run(fn, calls[k], cpu[k]))
    cores = {k: c / w if w > 0 else float("nan") for k, (w, c) in cpu.items()}
    return {k: statistics.median(v) for k, v in samples.items()}, calls, cores


def time_solo(fn, calls, repeats):
    """Median seconds per call of fn timed on its own (spinning check)."""
    return statistics.median(_timed_run(fn, calls) for _ in range(repeats))


def gemm_gflops(dtype, n=GEMM_N, repeats=5):
    """Throughput of one n x n np.dot, under the current limits."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty_like(a)
    np.dot(a, b, out=out)
    t = statistics.median(_once(lambda: np.dot(a, b, out=out))
                          for _ in range(repeats))
    return 2.0 * n ** 3 / t / 1e9


# ---------------------------------------------------------------------------
# the contestants


def _fg_model(cell, shape, dtype):
    cls = fg.LSTM if cell == "lstm" else fg.GRU
    return cls(shape.I, shape.H, shape.layers,
               bidirectional=shape.bidirectional, dtype=dtype, seed=0)


def _zero_state(cell, shape, dtype):
    h0 = np.zeros((shape.layers * shape.D, shape.B, shape.H), dtype=dtype)
    return (h0, h0.copy()) if cell == "lstm" else h0


def _torch_model(torch, cell, shape, dtype, state_dict):
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


def _onnx_session(peers, cell, shape, state_dict, threads):
    """A float32 graph of one LSTM/GRU node per layer, y as (T, B, D*H)."""
    onnx, ort = peers.onnx, peers.ort
    from onnx import TensorProto, helper, numpy_helper

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


def make_inference(peers, cell, shape, dtype_name, m, x, threads, log):
    """Callables for inference and their agreement with fastgates' y."""
    fns, errs = {"fastgates": lambda: m(x)}, {}
    y_fg, _ = m(x)
    sd = m.state_dict()
    torch = peers.torch
    if torch is not None:
        tm = _torch_model(torch, cell, shape, DTYPES[dtype_name], sd)
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                return tm(xt)
        fns["torch"] = run_torch
        errs["torch"] = _max_err([("y", y_fg, _to_np(run_torch()[0]))])
    if peers.ort is not None and dtype_name == "float32":
        try:
            sess = _onnx_session(peers, cell, shape, sd, threads)
        except Exception as exc:  # a broken or too old onnx/onnxruntime: say so, go on
            note = (f"onnxruntime could not run {shape.label()} {cell} "
                    f"({type(exc).__name__}: {exc}); its cell is left empty.")
            log(f"note: {note}")
            peers.notes.append(note)
        else:
            feed = {"X": x}
            fns["onnxruntime"] = lambda: sess.run(None, feed)
            errs["onnxruntime"] = _max_err([("y", y_fg, sess.run(None, feed)[0])])

    def run_numpy():
        return numpy_forward(cell, sd, x, shape.layers, shape.bidirectional)
    if peers.numpy:
        fns["numpy"] = run_numpy
    errs["numpy"] = _max_err([("y", y_fg, run_numpy())])
    return fns, errs


def make_training(peers, cell, shape, dtype_name, m, x, dy):
    """Callables for forward + backward and their gradients' agreement."""
    dtype = DTYPES[dtype_name]
    state = _zero_state(cell, shape, dtype)

    def run_fg():
        (y, st), pullback = m.vjp(x, state)
        return pullback(dy)
    fns, errs = {"fastgates": run_fg}, {}
    # The forward half of the training step, against the NumPy forward pass.
    (y_fg, _), _ = m.vjp(x, state)
    ref = numpy_forward(cell, m.state_dict(), x, shape.layers, shape.bidirectional)
    errs["numpy"] = _max_err([("y", y_fg, ref)])
    torch = peers.torch
    if torch is None:
        return fns, errs
    tm = _torch_model(torch, cell, shape, dtype, m.state_dict())
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
# progress


class Progress:
    """Case counter on stderr, plain text.

    On a terminal the running case is shown in place (``\\r``) and each
    finished case stays as one line with its times; otherwise one line per
    case, its label written when it starts and its times when it ends.
    """

    def __init__(self, total, stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.total, self.count = total, 0
        self._line = ""          # the started, unfinished line
        self._shown = 0          # characters drawn in place (terminal only)

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()

    def _clear(self):
        if self._shown:
            self._write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _draw(self):
        # A line wider than the terminal wraps, and \r could not redraw it.
        text = self._line[:max(shutil.get_terminal_size().columns - 1, 1)]
        self._write(text)
        self._shown = len(text)

    def start(self, label):
        """Announce the next case."""
        self.count += 1
        width = len(str(self.total))
        self._line = f"[ {self.count:>{width}}/{self.total} ] {label}"
        if self.tty:
            self._clear()
            self._draw()
        else:
            self._write(self._line)

    def finish(self, result):
        """End the current case's line with its result."""
        if self.tty:
            self._clear()
            self._write(f"{self._line}  {result}\n")
        else:
            self._write(f"  {result}\n")
        self._line = ""

    def log(self, msg):
        """A message on its own line, without losing the progress line."""
        if self.tty:
            self._clear()
            self._write(msg + "\n")
            if self._line:
                self._draw()
        else:
            if self._line:       # the case's result will follow on a line of its own
                self._write("\n")
                self._line = ""
            self._write(msg + "\n")


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
    cores: dict = None


def _set_threads(peers, n):
    fg.set_num_threads(n)
    if peers.torch is not None:
        peers.torch.set_num_threads(n)


def _shapes(args):
    if args.shape:
        return list(args.shape)
    shapes = QUICK if args.quick else MATRIX
    return [s for s in shapes if s.group in args.groups]


def run_matrix(args, peers, progress):
    shapes = _shapes(args)
    rows, gemm = [], {}
    for n in args.threads:
        # threadpoolctl caps every BLAS and OpenMP pool in the process.
        with threadpool_limits(limits=n):
            _set_threads(peers, n)
            for dtype_name in args.dtypes:
                gemm[(dtype_name, n)] = gemm_gflops(DTYPES[dtype_name], args.gemm_n)
                progress.log(f"threads={n} {dtype_name}: np.dot {args.gemm_n}^2 "
                             f"{gemm[(dtype_name, n)]:.1f} GFLOP/s")
            for shape in shapes:
                for cell in args.cells:
                    for dtype_name in args.dtypes:
                        rows += _run_shape(args, peers, shape, cell, dtype_name, n,
                                           gemm[(dtype_name, n)], progress)
    return rows, gemm


def _run_shape(args, peers, shape, cell, dtype_name, n, gemm, progress):
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(1)
    m = _fg_model(cell, shape, dtype)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(dtype)
    dy = rng.standard_normal((shape.T, shape.B, shape.D * shape.H)).astype(dtype)
    rows = []
    for mode in args.modes:
        progress.start(f"{shape.label()} {cell} {dtype_name} {mode} thr={n}")
        if mode == "infer":
            fns, errs = make_inference(peers, cell, shape, dtype_name, m, x, n,
                                       progress.log)
            flops = shape.forward_flops(GATES[cell])
        else:
            fns, errs = make_training(peers, cell, shape, dtype_name, m, x, dy)
            flops = 3 * shape.forward_flops(GATES[cell])
        # Again now that fastgates has run: the first parallel kernel starts
        # Numba's OpenMP pool, whose start-up sets the thread count of the
        # libgomp PyTorch loaded too (same soname).  Measured before this
        # line existed: PyTorch at "1 thread" ran on 2 after that point.
        _set_threads(peers, n)
        times, calls, cores = time_alternating(fns, args.repeats, args.min_run_time)
        solo = None
        if args.spin_check:
            solo = max(abs(time_solo(fn, calls[k], args.repeats) / times[k] - 1.0)
                       for k, fn in fns.items())
        row = Row(shape, cell, dtype_name, mode, n, times, errs,
                  flops / times["fastgates"] / 1e9, gemm, solo, cores)
        rows.append(row)
        progress.finish(_result_text(row))
    return rows


def _result_text(row):
    parts = [f"{k} {t * 1e3:.3f} ms ({row.cores[k]:.1f} cores)"
             if row.cores else f"{k} {t * 1e3:.3f} ms" for k, t in row.times.items()]
    parts += [f"err[{k}] {e:.1e}" for k, (e, _) in row.errs.items()]
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


def environment_lines(peers, gemm=None, gemm_n=GEMM_N):
    torch, ort = peers.torch, peers.ort
    lines = [
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- machine: {platform.machine()}, {_cpu_model()}, "
        f"{os.cpu_count()} logical cores, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"fastgates {getattr(fg, '__version__', '?')} "
        f"({os.path.dirname(fg.__file__)}, {fg.get_activation_mode()} activations), "
        f"torch {torch.__version__ if torch is not None else 'not used'}, "
        f"onnxruntime {ort.__version__ if ort is not None else 'not used'}",
    ]
    blas = [f"{p.get('internal_api')} {p.get('version')} "
            f"({p.get('architecture')}, {p.get('threading_layer')})"
            for p in threadpool_info() if p.get("user_api") == "blas"]
    lines.append(f"- BLAS: {', '.join(blas) or 'unknown'}")
    env = {k: os.environ[k] for k in sorted(os.environ)
           if k.startswith(("OPENBLAS_", "OMP_", "NUMBA_", "MKL_"))}
    lines.append(f"- environment: {env}")
    if gemm:
        lines.append(f"- GEMM throughput (np.dot, {gemm_n}x{gemm_n}), GFLOP/s: "
                     + ", ".join(f"{d} {n} thr {g:.1f}"
                                 for (d, n), g in sorted(gemm.items())))
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


_PEER_COLUMN = {"torch": "torch", "onnxruntime": "onnxrt", "numpy": "numpy"}


def table_lines(rows, peers, spin_check=False):
    """The side-by-side table, one markdown row per case."""
    shown = ["torch", "onnxruntime"] + (["numpy"] if peers.numpy else [])
    header = ["group", "(T, B, I, H)", "cell", "dtype", "mode", "thr", "fastgates"]
    header += [_PEER_COLUMN[p] for p in shown]
    header += [f"{_PEER_COLUMN[p]}/fg" for p in shown]
    header += ["best peer/fg", "GFLOP/s", "%GEMM", "max err"]
    if spin_check:
        header.append("solo vs alt")
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        mine = r.times["fastgates"]
        t_peers = [r.times.get(p) for p in shown]
        present = [t for t in t_peers if t is not None]
        cells = [r.shape.group, r.shape.label(), r.cell, r.dtype, r.mode,
                 str(r.threads), _fmt_ms(mine)]
        cells += [_fmt_ms(t) for t in t_peers]
        cells += [_fmt_ratio(t, mine) for t in t_peers]
        cells += [_fmt_ratio(min(present) if present else None, mine),
                  f"{r.gflops:.1f}", f"{100 * r.gflops / r.gemm:.0f}%", _agree(r)]
        if spin_check:
            cells.append(f"{100 * r.solo_change:.0f}%")
        out.append("| " + " | ".join(cells) + " |")
    return out


def report(rows, gemm, args, peers, compile_rows=None, memory_rows=None):
    out = ["# fastgates benchmark", ""]
    out += environment_lines(peers, gemm, args.gemm_n)
    out.append(f"- command: `{args.command_line}`")
    if rows:
        out += [f"- median of {args.repeats} timed runs after warm-up, sides "
                f"alternating; each run repeats the call to last >= "
                f"{args.min_run_time * 1e3:g} ms", "",
                "Times in ms; ratios are peer_time / fastgates_time (above 1: "
                "fastgates is faster); best peer: the fastest peer timed in that "
                "row. GFLOP/s with forward FLOPs 2*T*B*G*H*(I_k+H), training 3x; "
                "%GEMM against the GEMM throughput above. max err: max |fastgates - "
                "peer| / max(1, max|peer|), worst over the peers, over y "
                "(inference, and the NumPy check in training) or every gradient "
                "(training, PyTorch).", ""]
        out += table_lines(rows, peers, args.spin_check)
    notes = list(peers.notes)
    if args.no_onnx:
        notes.append("onnxruntime skipped (--no-onnx).")
    over = [f"{r.shape.label()} {r.cell} {r.dtype} {r.mode} thr={r.threads}: "
            + ", ".join(f"{k} {c:.2f}" for k, c in r.cores.items()
                        if c > r.threads + CORES_SLACK)
            for r in rows if r.cores and any(c > r.threads + CORES_SLACK
                                             for c in r.cores.values())]
    if over:
        notes.append("**more cores busy than threads allowed** (CPU time / wall "
                     "time of a side's timed runs; that side's time is flattered): "
                     + "; ".join(over))
    elif rows:
        notes.append("Every side kept at most its thread count of cores busy "
                     f"(CPU time / wall time of its timed runs <= threads + "
                     f"{CORES_SLACK}).")
    if rows and args.spin_check:
        notes.append("solo vs alt: largest change of a side timed on its own "
                     "against alternating; above 10% means a pool spins.")
    if compile_rows:
        out += ["", "## Compile cost (first call in a fresh process)", "",
                "| cell | dtype | cache | import s | first forward s | "
                "first vjp+pullback s |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {c} | {d} | {k} | {r['import']:.2f} | {r['forward']:.2f} | "
                f"{r['train']:.2f} |" for c, d, k, r in compile_rows]
    if memory_rows:
        out += ["", "## Memory of one training step (vjp + pullback)", ""]
        out += memory_table_lines(memory_rows)
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------
# fresh processes: compile cost and memory


def _child_env(**extra):
    """Environment of a fresh process that imports this very fastgates."""
    env = dict(os.environ, FASTGATES_ACTIVATIONS=fg.get_activation_mode(), **extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fg.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_child(code, env, arg=None):
    cmd = [sys.executable, "-c", code] + ([arg] if arg is not None else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child process failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import fastgates as fg
    t1 = time.perf_counter()
    m = fg.{cls}(32, 64, dtype=np.{dtype}, seed=0)
    x = np.random.default_rng(0).standard_normal((100, 1, 32)).astype(np.{dtype})
    m(x)
    t2 = time.perf_counter()
    (y, state), pullback = m.vjp(x)
    pullback(np.ones_like(y))
    t3 = time.perf_counter()
    print(json.dumps({{"import": t1 - t0, "forward": t2 - t1, "train": t3 - t2}}))
""")


def compile_cost(cells, dtypes, log):
    """First calls in fresh processes: empty Numba cache, then warm cache."""
    rows = []
    for cell in cells:
        for dtype_name in dtypes:
            with tempfile.TemporaryDirectory() as cache:
                env = _child_env(NUMBA_CACHE_DIR=cache)
                code = _COMPILE_SCRIPT.format(cls="LSTM" if cell == "lstm" else "GRU",
                                              dtype=dtype_name)
                for kind in ("empty", "warm"):
                    r = _run_child(code, env)
                    log(f"compile {cell} {dtype_name} {kind} cache: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()))
                    rows.append((cell, dtype_name, kind, r))
    return rows


def kept_bytes(cell, shape, itemsize):
    """Bytes of the activations a training step must keep for its backward pass.

    Per layer and direction the gates (T, B, G*H) and one more (T, B, H)
    array (LSTM: the cell states c; GRU: W_hn h + b_hn, which reset_after
    needs), per layer its output (T, B, D*H), and the input x (T, B, I) once
    (a layer's input is the previous layer's output, already counted):
    ``itemsize * T * B * (I + L * D * (G + 2) * H)``.
    """
    G = GATES[cell]
    per_layer = shape.D * (G + 1) * shape.H + shape.D * shape.H
    return itemsize * shape.T * shape.B * (shape.I + shape.layers * per_layer)


def gradient_bytes(cell, shape, itemsize):
    """Bytes of what the pullback returns: dx, dstate and one array per parameter."""
    G, H, D = GATES[cell], shape.H, shape.D
    params = 0
    for k in range(shape.layers):
        i_k = shape.I if k == 0 else D * H
        params += D * (G * H * (i_k + H) + 2 * G * H)
    states = (2 if cell == "lstm" else 1) * shape.layers * D * shape.B * H
    return itemsize * (shape.T * shape.B * shape.I + states + params)


def _rss_kb():
    """Current resident set in KiB, or None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak   # macOS: bytes


def _release_free_memory():
    """Give freed heap memory back to the system (glibc), so that the step's
    allocations show in the resident set instead of reusing resident pages."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: the rise is then a lower bound
        pass


def _hwm_kb():
    """The peak resident set that /proc/self/clear_refs resets (VmHWM), KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).

    This resets /proc's VmHWM only; getrusage's ru_maxrss keeps the old peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_step_memory(spec):
    """Peak memory of ``m.vjp(x)`` + ``pullback(dy)``, in this process.

    ``spec``: dict with cell, dtype, T, B, I, H, layers, bidirectional and
    threads.  The model is first run on short inputs, so that compiling (or
    loading) the kernels is not counted.  Returns a dict of KiB values:

    - ``rss``: rise of the peak resident set (VmHWM after a reset, else
      ``ru_maxrss``) over the resident
      set just before the step; sees every allocation, Numba's included.  None
      if the peak could not be reset and the step stayed below it.
    - ``tracemalloc``: peak of the allocations Python and NumPy report to
      tracemalloc (not those made inside compiled code), in a second step.
    """
    import tracemalloc

    fg.set_num_threads(spec["threads"])
    dtype = np.dtype(spec["dtype"])
    shape = Shape("custom", spec["T"], spec["B"], spec["I"], spec["H"],
                  spec["layers"], spec["bidirectional"])
    m = _fg_model(spec["cell"], shape, dtype)
    # Two short inputs: 48 steps of one sequence also take the overlapped
    # kernels of a batch of one (the second thread beside the recurrence).
    for steps in (2, min(shape.T, 48)):
        x_warm = np.zeros((steps, 1, shape.I), dtype)
        (y, _), pullback = m.vjp(x_warm)
        pullback(np.ones_like(y))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(dtype)
    dy = rng.standard_normal((shape.T, shape.B, shape.D * shape.H)).astype(dtype)
    del y, pullback

    # After a reset the peak is the resident set of this moment, read from the
    # same counter as the peak after the step (VmRSS may lag it by a few pages).
    _release_free_memory()
    reset = _reset_peak_rss() and _hwm_kb() is not None
    peak = _hwm_kb if reset else _maxrss_kb
    peak_before = peak()
    before = peak_before if reset else _rss_kb()
    (y, state), pullback = m.vjp(x)
    grads = pullback(dy)
    peak_after = peak()
    if reset or (before is not None and peak_after > peak_before):
        rss = max(peak_after - before, 0)
    else:   # the step stayed below an older peak that could not be reset
        rss = None
    del y, state, pullback, grads

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        (y, state), pullback = m.vjp(x)
        grads = pullback(dy)
        traced = (tracemalloc.get_traced_memory()[1] - base) // 1024
    finally:
        tracemalloc.stop()
    del y, state, pullback, grads
    return {"rss": rss, "tracemalloc": traced, "reset": reset}


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from fastgates.bench import measure_step_memory
    print(json.dumps(measure_step_memory(json.loads(sys.argv[1]))))
""")


@dataclasses.dataclass
class MemoryRow:
    shape: Shape
    cell: str
    dtype: str
    threads: int
    kept: int            # bytes, from the shapes
    grads: int           # bytes, from the shapes
    rss: object          # KiB or None
    traced: int          # KiB


def measure_memory(args, progress):
    """One fresh process per shape, cell, dtype and thread count."""
    shapes = _shapes(args)
    total = len(shapes) * len(args.cells) * len(args.dtypes) * len(args.threads)
    progress.total, progress.count = total, 0
    rows = []
    env = _child_env()
    for n in args.threads:
        for shape in shapes:
            for cell in args.cells:
                for dtype_name in args.dtypes:
                    progress.start(f"memory {shape.label()} {cell} {dtype_name} thr={n}")
                    spec = {"cell": cell, "dtype": dtype_name, "T": shape.T,
                            "B": shape.B, "I": shape.I, "H": shape.H,
                            "layers": shape.layers,
                            "bidirectional": shape.bidirectional, "threads": n}
                    r = _run_child(_MEMORY_SCRIPT, env, json.dumps(spec))
                    item = np.dtype(dtype_name).itemsize
                    row = MemoryRow(shape, cell, dtype_name, n,
                                    kept_bytes(cell, shape, item),
                                    gradient_bytes(cell, shape, item),
                                    r["rss"], r["tracemalloc"])
                    rows.append(row)
                    progress.finish(f"kept {row.kept / 2**20:.2f} MiB  peak rss "
                                    f"{_fmt_kib(row.rss)} MiB  tracemalloc "
                                    f"{_fmt_kib(row.traced)} MiB")
    return rows


def _fmt_kib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.2f}"


def memory_table_lines(rows):
    out = ["Peak memory of `(y, state), pullback = m.vjp(x)` then `pullback(dy)` in "
           "a fresh process, after a warm-up on a tiny input (compilation not "
           "counted); x and dy are allocated before. kept: activations the step "
           "must keep, `itemsize*T*B*(I + L*D*(G+2)*H)`; grads: what the pullback "
           "returns (dx, dstate, dparams). peak RSS: rise of the peak resident set (VmHWM) over the "
           "resident set before the step (every allocation, Numba's included); "
           "tracemalloc: peak of what NumPy and Python report (not allocations "
           "inside compiled code); extra: peak RSS - kept - grads, the memory "
           "beyond what the step must hold. MiB.", "",
           "| group | (T, B, I, H) | cell | dtype | thr | kept | grads | peak RSS | "
           "tracemalloc | extra | RSS/kept | tracemalloc/kept |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kept_kib = r.kept / 1024
        rss_ratio = "" if r.rss is None else f"{r.rss / kept_kib:.2f}"
        extra = "" if r.rss is None else f"{(r.rss * 1024 - r.kept - r.grads) / 2**20:.2f}"
        out.append(f"| {r.shape.group} | {r.shape.label()} | {r.cell} | {r.dtype} | "
                   f"{r.threads} | {r.kept / 2**20:.2f} | {r.grads / 2**20:.2f} | "
                   f"{_fmt_kib(r.rss)} | {_fmt_kib(r.traced)} | {extra} | {rss_ratio} | "
                   f"{r.traced / kept_kib:.2f} |")
    return out


# ---------------------------------------------------------------------------
# command line


def add_arguments(p):
    """Add the benchmark's options to an ArgumentParser (also used by __main__)."""
    p.add_argument("--quick", action="store_true",
                   help="one shape per group at 2 threads (unless --threads)")
    p.add_argument("--threads", type=int, nargs="+", default=None, metavar="N",
                   help="thread counts (default: 1 2; --quick: 2)")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS, metavar="GROUP",
                   help=f"shape groups of the matrix, from {' '.join(GROUPS)} (default: all)")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="T,B,I,H[,L[,bi]]",
                   help="a shape of your own instead of the matrix (repeatable), "
                        "e.g. 100,16,64,128 or 50,16,256,256,2,bi")
    p.add_argument("--cells", nargs="+", choices=list(GATES), default=list(GATES),
                   metavar="CELL", help="lstm, gru (default: both)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   metavar="DTYPE", help="float32, float64 (default: both)")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"],
                   default=["infer", "train"], metavar="MODE",
                   help="infer, train (default: both)")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=None, metavar="PEER",
                   help="peers to time, from torch onnxruntime numpy (default: "
                        "torch onnxruntime; numpy, the NumPy forward pass, is "
                        "timed when PyTorch is missing)")
    p.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    p.add_argument("--activations", choices=["fast", "exact"], default=None,
                   help="fastgates' activation mode (default: the current one, "
                        "fast unless FASTGATES_ACTIVATIONS says otherwise)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed runs per side, median reported (>= 7)")
    p.add_argument("--min-run-time", type=float, default=0.02,
                   help="seconds one timed run lasts at least; short calls "
                        "are repeated within a run (default 0.02)")
    p.add_argument("--gemm-n", type=int, default=GEMM_N,
                   help=f"size of the np.dot measuring the GEMM throughput "
                        f"(default {GEMM_N})")
    p.add_argument("--spin-check", action="store_true",
                   help="also time each side on its own and report the change")
    p.add_argument("--compile-cost", action="store_true",
                   help="also measure the first call in fresh processes "
                        "(empty and warm Numba cache)")
    p.add_argument("--memory", action="store_true",
                   help="also measure the peak memory of a training step, one "
                        "fresh process per shape, cell, dtype and thread count")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the side-by-side timing (with --memory or "
                        "--compile-cost)")
    p.add_argument("--out", metavar="FILE", help="also write the report here")
    p.set_defaults(func=run, _bench_parser=p)
    return p


def _parser(prog):
    return add_arguments(argparse.ArgumentParser(
        prog=prog,
        description="fastgates vs PyTorch, onnxruntime and NumPy side by side; "
                    "see docs/benchmarks.md."))


def _check_args(args):
    """Fill defaults that depend on other options; return an error or None."""
    import numba

    if args.threads is None:
        args.threads = [2] if args.quick else [1, 2]
    if args.repeats < 7:
        return "--repeats must be at least 7 (the protocol's minimum)"
    most = numba.config.NUMBA_NUM_THREADS
    bad = [n for n in args.threads if not 1 <= n <= most]
    if bad:
        return (f"--threads {' '.join(map(str, bad))}: Numba was started with "
                f"{most} threads (NUMBA_NUM_THREADS); use 1 to {most}")
    if args.no_timing and not (args.memory or args.compile_cost):
        return "--no-timing needs --memory or --compile-cost"
    if args.no_onnx:
        args.peers = [p for p in (args.peers or ["torch"]) if p != "onnxruntime"]
    return None


def run(args):
    """Run the benchmark described by parsed ``args``; return the exit code."""
    error = _check_args(args)
    if error:
        args._bench_parser.error(error)
    if getattr(args, "command_line", None) is None:
        args.command_line = "python -m fastgates bench"
    progress = Progress(0)
    log = progress.log

    peers = Peers() if args.no_timing else load_peers(args.peers)
    for note in peers.notes:
        log(f"note: {note}")
    if peers.torch is not None:
        try:
            peers.torch.set_num_interop_threads(1)
        except RuntimeError:   # only possible before PyTorch's first parallel work
            pass
    if "OPENBLAS_CORETYPE" in os.environ:
        log("note: OPENBLAS_CORETYPE is set, which can select a slower BLAS "
            "kernel; for benchmarking run with "
            "`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`.")
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"warning: load average {load:.2f}: the machine is not idle; "
            "ratios may be distorted.")

    old_fg, old_mode = fg.get_num_threads(), fg.get_activation_mode()
    if args.activations is not None:
        fg.set_activation_mode(args.activations)
    old_torch = peers.torch.get_num_threads() if peers.torch is not None else None
    rows, gemm, compile_rows, memory_rows = [], {}, None, None
    try:
        if not args.no_timing:
            progress.total = (len(args.threads) * len(_shapes(args)) * len(args.cells)
                              * len(args.dtypes) * len(args.modes))
            rows, gemm = run_matrix(args, peers, progress)
        if args.memory:
            memory_rows = measure_memory(args, progress)
        if args.compile_cost:
            compile_rows = compile_cost(args.cells, args.dtypes, log)
        text = report(rows, gemm, args, peers, compile_rows, memory_rows)
    finally:
        fg.set_num_threads(old_fg)
        fg.set_activation_mode(old_mode)
        if old_torch is not None:
            peers.torch.set_num_threads(old_torch)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        log(f"wrote {args.out}")
    return 0


def main(argv=None, prog="python -m fastgates bench"):
    """Parse ``argv`` (default: ``sys.argv[1:]``), run, return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog).parse_args(argv)
    args.command_line = " ".join([prog] + argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
