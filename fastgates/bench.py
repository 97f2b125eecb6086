"""Side-by-side benchmark of fastgates against PyTorch, onnxruntime, JAX and NumPy.

Run it as ``python -m fastgates bench`` (``--help`` lists the options).  It
implements the protocol of ``docs/benchmarks.md``:

- fastgates, PyTorch and (float32 inference only) onnxruntime run in one
  process, JAX in one worker process per thread count
  (:mod:`fastgates._bench_jax`), all on the same weights (fastgates'
  ``state_dict()`` copied across) and inputs;
- **peers at their best**: fastgates runs at each thread count asked for
  (``--threads``), each peer at every count from 1 to the largest, and
  onnxruntime with and without spinning; a row (fastgates at n threads)
  shows each peer at n threads and at its fastest setting with at most n
  threads, a user's pick.  Before each timed run a side sets every thread
  count in the process (fastgates, torch, every BLAS and OpenMP pool through
  threadpoolctl) to its own;
- **answers first**: outputs (inference) or all gradients (training) are
  compared with every peer's, and fastgates' ``y`` with
  :func:`numpy_forward`, a batch-vectorised NumPy forward pass; past the
  dtype's tolerance (``AGREE_TOL``) the row is not timed and the run exits
  with 1, naming the row, the peer, the array and the error;
- **cells no framework ships** (``--cells janet mgu slstm mingru minlstm``, opt-in): PyTorch,
  onnxruntime and JAX run the cells they ship (``FRAMEWORK_CELLS``: LSTM,
  GRU) only; any other cell is checked against :func:`numpy_forward` and
  timed beside fastgates' own LSTM of the same shape (``YARDSTICK``), which
  is neither compared nor counted as a peer; the sLSTM also has a peer, the
  xLSTM package's pure-PyTorch sLSTM cell (``xlstm``, one layer in one
  direction, on the same weights: ``XLSTM_NOTE``), compared and timed like
  any peer;
- **training steps change the weights**: before each timed training step
  every side loads the other of two weight sets that differ in every entry
  (fastgates ``m.load_state_dict``, PyTorch an in-place ``copy_`` under
  ``no_grad`` as an optimiser's step, JAX the other parameter tree passed
  to its jitted function), and that load is *not* timed, on every side.
  So no cache of derived weights is free (fastgates rebuilds its derived
  weights inside the next, timed, call), while an optimiser's own cost,
  which belongs to the optimiser and not to the layer, stays out: measured,
  ``fastgates.Adam`` took 194 ms per step at (25, 16, 1024, 1024) against
  38 ms for ``torch.optim.Adam``, more than the training step itself, and
  GFLOP/s would no longer count the layer's work;
- after a warm-up the sides alternate A B C A B C ...; each side reports the
  median of ``--repeats`` (>= 7) timed runs; every call is also timed on its
  own, for ``--load``;
- ``--load N`` runs the matrix (by default its tiny and small shapes, which
  the contention target covers) beside N busy processes (ended with the run,
  also on an error or an interrupt), with fastgates at 1 thread too, and
  reports every side's per-call median and 90th percentile at 1 and n
  threads and fastgates' n-thread over 1-thread ratio (target <= 1.5);
- GFLOP/s use forward FLOPs ``2*T*B*G*H*(I_k+H)`` summed over layers and
  directions, training = 3x, and are also given as a fraction of one
  2048x2048 ``np.dot`` measured in the same process, dtype and threads.

A peer that is not installed is left out with a note; without PyTorch the
NumPy forward pass is timed instead (inference only).  ``--memory`` measures
the peak memory of a training step, ``--compile-cost`` the first call in a
fresh process, ``--json`` writes the rows as data.  Run it on an idle machine
(except for ``--load``), one benchmark at a time.

PyTorch, onnx, onnxruntime and xlstm are imported here, inside functions, and
only when asked for; JAX never is (its thread pools would start in this process):
``import fastgates`` never imports this module.
"""

# No pool may busy-wait into the other side's run.  OMP_WAIT_POLICY=PASSIVE
# is not the way: it makes every OpenMP region of PyTorch's pay a futex wake,
# and measured here it made PyTorch's tiny LSTM 20x slower (0.29 -> 6.2 ms),
# which would flatter fastgates.  Instead both OpenMP runtimes (PyTorch's and
# Numba's) keep their default short spin, and every timed run starts after a
# pause (PAUSE), repeated until this process used (almost) no CPU during it:
# the pool of the side before has fallen asleep (a libgomp pool sometimes
# spins past 10 ms; the report names the sides after which that happened).
# onnxruntime runs both with spinning (a user's default, which may be faster)
# and without; its spinning pool falls quiet within the same pauses.  The JAX
# worker reports the CPU it used while the other sides ran.  --spin-check
# verifies it all: each side timed alone must match its time when alternating.

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import itertools
import json
import math
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

import fastgates as fg
from fastgates import _bench_attention, _bench_dask, _bench_scan, _config
from fastgates import cells as _cells
from fastgates._bench_jax import timed_calls
from fastgates.layers import layer_class

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

# Gate rows of every cell (fastgates.cells): what --cells offers.
GATES = {name: len(cell.gates) for name, cell in _cells.REGISTRY.items()}
DTYPES = {"float32": np.float32, "float64": np.float64}
PEERS = ["torch", "onnxruntime", "jax", "xlstm", "numpy"]

# The cells the frameworks ship (torch.nn.LSTM/GRU, ONNX's LSTM/GRU
# operators, the JAX worker's scans): PyTorch, onnxruntime and JAX sides are
# built for these cells only.  They are also the default of --cells: the
# full matrix of every registered cell would take twice as long.
FRAMEWORK_CELLS = ("lstm", "gru")

# For a cell no framework ships there is no peer to be faster than, so it is
# timed against fastgates' own LSTM of the same shape (T, B, I, H, layers,
# direction), dtype, mode and thread counts, in the same alternation and
# under the same rules (training: new weights before each step, untimed):
# what the cell costs next to the layer it would replace.  The yardstick
# computes another function, so its answers are not compared (it never
# enters agreement()), and it is not a peer: a user who needs a JANET cannot
# switch to an LSTM for speed, so it is no "best peer" either.  Its side is
# ``YARDSTICK@n``; the table shows it as "fastgates LSTM" and the ratio
# LSTM time / cell time.  The NumPy forward pass computes every cell, so it
# stays a check of y (and a peer when asked for) for these cells too.
YARDSTICK_CELL = "lstm"
YARDSTICK = "fastgates-lstm"

# The one peer of a cell no framework ships: the sLSTM of NX-AI's xLSTM
# package (`pip install xlstm`, Beck et al.'s code), its pure-PyTorch
# ("vanilla") backend on the CPU, in the model's dtype.  What is compared is
# the same function on the same weights: xlstm's sLSTMLayer adds a causal
# convolution, head-wise (block-diagonal) input projections, a group norm and
# dropout, which fastgates' sLSTM does not have, so the xlstm side is the
# bare recurrence, xlstm.blocks.slstm.cell.sLSTMCell (backend "vanilla"),
# fed the input projection W_ih x + b_ih computed in PyTorch
# (torch.nn.functional.linear): y = sLSTMCell(W_ih x + b_ih) with the cell's
# recurrent kernel fastgates' weight_hh_l0 per head and its one bias
# bias_hh_l0 (see xlstm_weights).  Compared: y and, in training, dx and the
# gradient of every parameter mapped back to fastgates' names; not the state
# gradients (the cell starts from its own zero state, with m = 0 and its
# first step taking m' = i~, where fastgates' m = -inf gives the same y).
# The cell is one layer in one direction: stacked and bidirectional shapes
# get no xlstm side (a note says so).
XLSTM_NOTE = ("xlstm: the sLSTM cell of the xLSTM package (xlstm.blocks.slstm.cell."
              "sLSTMCell, pure-PyTorch \"vanilla\" backend, CPU, the row's dtype) on "
              "fastgates' weights, after the input projection W_ih x + b_ih in PyTorch: "
              "the same function as fastgates' sLSTM layer (xlstm's sLSTMLayer adds a "
              "convolution, head-wise input projections, a group norm and dropout, "
              "which are not used). Compared: y and, in training, dx and every "
              "parameter's gradient.")

# Agreement bounds on max|a - b| / max(1, max|b|) (for y, whose entries lie
# in (-1, 1): the max abs error), per dtype, for y and for the gradients.
# TOLERANCES ARE SET HERE AND NOWHERE ELSE.  Measured on 2026-12-06 over the
# whole matrix (9 shapes, both cells, modes and activation modes, fastgates at
# 1 and 2 threads against PyTorch, onnxruntime and JAX at 1 and 2 threads and
# the NumPy forward pass), the largest errors were:
#   float32: y 1.4e-6 (GRU (25, 16, 1024, 1024) against PyTorch),
#            gradients 2.0e-6 (LSTM dx at (25, 16, 1024, 1024));
#   float64: y 2.5e-15, gradients 3.9e-15 (LSTM dx at (50, 64, 512, 512)).
# The bounds leave a margin of 7-10x (float32) and 25-40x (float64): room for
# sums over longer sequences and larger batches than the matrix's (rounding
# errors grow about as the square root of the terms summed), while a real
# error (a wrong gate, a missing term, one weight off by 1e-3) is far above.
AGREE_TOL = {"float32": {"y": 1e-5, "grad": 2e-5},
             "float64": {"y": 1e-13, "grad": 1e-13}}

# Training steps change the weights: before each timed training step, untimed,
# every side loads the other of two sets of weights that differ in every entry
# (the second is the first plus WEIGHT_STEP, above the float32 spacing of
# weights near 0.1, 7e-9, and small enough to change no answer materially).
WEIGHT_STEP = 1e-6

# --load: a side's n-thread calls may take at most this many times its own
# 1-thread calls (median and 90th percentile) with the cores busy.
LOAD_TARGET = 1.5
# With --load, fastgates at 1 and n threads are timed again after the
# alternation of every side, in LOAD_REPEATS more rounds of their own, and
# the ratios come from all their calls.  With every core busy about one call
# in ten of either setting loses a time slice whatever it runs on, so the
# 90th percentile sits on that knee: from the ~350 calls of 7 runs it fell
# on either side of it by chance (measured 0.76 against 4.4 ms for two sides
# that both ran on one thread); more calls, taken in the same rounds, narrow
# that.
LOAD_REPEATS = 40

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
    jax: bool = False             # JAX is installed: time it in worker processes
    jax_version: str = None       # as the workers report it
    xlstm: object = None          # xlstm.blocks.slstm.cell (the sLSTM's peer, XLSTM_NOTE)
    xlstm_torch: object = None    # the PyTorch it runs on
    xlstm_version: str = None
    numpy: bool = False           # time numpy_forward as a peer (inference)
    notes: list = dataclasses.field(default_factory=list)

    def timed(self):
        """Names of the peers that get a column, in table order."""
        return [name for name, here in (("torch", self.torch is not None),
                                        ("onnxruntime", self.ort is not None),
                                        ("jax", self.jax),
                                        ("xlstm", self.xlstm is not None),
                                        ("numpy", self.numpy)) if here]

    @property
    def torch_runtime(self):
        """The PyTorch module some side runs on (PyTorch's or xlstm's), or None:
        its thread count is set before every run, whichever side it is."""
        return self.torch if self.torch is not None else self.xlstm_torch


def _installed(name):
    """Whether ``name`` can be imported, without importing it (JAX must not
    start its thread pools in this process)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def default_peers(cells=()):
    """The peers timed unless --peers says otherwise: PyTorch, onnxruntime and
    JAX, and xlstm when the sLSTM is among ``cells`` (it runs that cell only)."""
    return ["torch", "onnxruntime", "jax"] + (["xlstm"] if "slstm" in cells else [])


def load_peers(requested=None, cells=()):
    """Import the requested peers that are installed; a note for each one missing.

    ``requested`` is a list of names from PEERS, or None for the default
    (:func:`default_peers` of ``cells``).  The NumPy forward pass is timed
    when asked for, when PyTorch was wanted but is missing, or when no
    requested peer is there.  JAX is only looked for here: it runs in worker
    processes.
    """
    wanted = default_peers(cells) if requested is None else list(requested)
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
    if "jax" in wanted:
        peers.jax = _installed("jax") and _installed("jaxlib")
        if not peers.jax:
            peers.notes.append("JAX is not installed: no jax column "
                               "(`pip install jax jaxlib`, the CPU build).")
    if "xlstm" in wanted:
        try:
            import torch
            import xlstm
            from xlstm.blocks.slstm import cell as xlstm_cell
        except ImportError:
            peers.notes.append("xlstm is not installed: no xlstm column for the sLSTM "
                               "(`pip install xlstm`, after PyTorch's CPU build: it "
                               "requires torch).")
        else:
            peers.xlstm, peers.xlstm_torch = xlstm_cell, torch
            peers.xlstm_version = getattr(xlstm, "__version__", "?")
            if "slstm" not in cells:
                peers.notes.append("xlstm runs the sLSTM only (--cells slstm): its "
                                   "column stays empty for the other cells.")
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


def numpy_forward(cell, params, x, num_layers=1, bidirectional=False, beta=1.0):
    """Output ``y`` (T, B, D*H) of a stacked recurrent layer from a zero state, in NumPy.

    Batch-vectorised: per layer and direction one product for the input
    projection of all steps, then per step one (B, H) x (H, G*H) product
    (MGU: two, the second on ``f ⊙ h``) and the gate arithmetic on whole
    (B, H) blocks.  The GRU is PyTorch's (``reset_after=True``); JANET and
    MGU are written from their equations (rows f, n)::

        JANET: s  = W_if x + b_if + W_hf h + b_hf
               n  = tanh(W_in x + b_in + W_hn h + b_hn)
               h' = σ(s) h + (1 - σ(s - β)) n
        MGU:   f  = σ(W_if x + b_if + W_hf h + b_hf)
               n  = tanh(W_in x + b_in + W_hn (f ⊙ h) + b_hn)
               h' = (1 - f) h + f n
        sLSTM: a  = W_ih x + b_ih + R h + b_hh     (i~, f~, z~, o~; R block diagonal)
               m' = max(log σ(f~) + m, i~),  i' = exp(i~ - m'),
               f' = exp(log σ(f~) + m - m'),  c' = f' c + i' tanh(z~),
               n' = f' n + i',  h' = σ(o~) c' / n'     (from m = -inf)
        minGRU: z = σ(W_iz x + b_iz),  n = W_in x + b_in,  h' = (1 - z) h + z n
        minLSTM: f, i = σ(W_if x + b_if), σ(W_ii x + b_ii),  n = W_in x + b_in,
               h' = f/(f+i) h + i/(f+i) n          (both: positive=False)

    Computes in the dtype of ``x`` and ``params``.

    Parameters
    ----------
    cell : {"lstm", "gru", "janet", "mgu", "slstm", "mingru", "minlstm"}
    params : dict of str to ndarray
        Keyed as ``state_dict()`` (missing biases count as zero).
    x : ndarray, shape (T, B, I)
    num_layers : int
    bidirectional : bool
    beta : float, default 1.0
        JANET's shift ``β`` (ignored by the other cells).

    Returns
    -------
    ndarray, shape (T, B, D*H)
    """
    if cell not in ("lstm", "gru", "janet", "mgu", "slstm", "mingru", "minlstm"):
        raise ValueError(f"numpy_forward has no {cell!r} cell")
    T, B = x.shape[:2]
    suffixes = ["", "_reverse"] if bidirectional else [""]
    inp = x
    for k in range(num_layers):
        outs = []
        for suffix in suffixes:
            W = params[f"weight_ih_l{k}{suffix}"]
            if cell in ("mingru", "minlstm"):
                b = params.get(f"bias_ih_l{k}{suffix}", np.zeros(W.shape[0], W.dtype))
                outs.append(_scan_cell_forward(cell, inp @ W.T + b, suffix == "_reverse"))
                continue
            R = params[f"weight_hh_l{k}{suffix}"]
            H = R.shape[1] if cell != "slstm" else W.shape[0] // 4
            b_ih = params.get(f"bias_ih_l{k}{suffix}", np.zeros(R.shape[0], R.dtype))
            b_hh = params.get(f"bias_hh_l{k}{suffix}", np.zeros(R.shape[0], R.dtype))
            xw = inp @ W.T + b_ih                                  # (T, B, G*H)
            shift = R.dtype.type(beta)       # a float64 β must not widen float32
            h = np.zeros((B, H), dtype=R.dtype)
            c = np.zeros_like(h)
            out = np.empty((T, B, H), dtype=R.dtype)
            steps = range(T) if suffix == "" else range(T - 1, -1, -1)
            if cell == "slstm":
                # (gate, head, unit, column) blocks: head k reads its part of h
                heads = H // R.shape[1]
                blocks = R.reshape(4, heads, H // heads, H // heads)
                n = np.zeros_like(h)
                mx = np.full_like(h, -np.inf)
                for t in steps:
                    hw = np.einsum("bkl,gkjl->bgkj", h.reshape(B, heads, -1), blocks)
                    a = xw[t] + hw.reshape(B, 4 * H) + b_hh
                    log_f = -np.logaddexp(0, -a[:, H:2 * H]) + mx
                    m_new = np.maximum(log_f, a[:, :H])
                    i, f = np.exp(a[:, :H] - m_new), np.exp(log_f - m_new)
                    c = f * c + i * np.tanh(a[:, 2 * H:3 * H])
                    n = f * n + i
                    mx = m_new
                    h = _sigmoid(a[:, 3 * H:]) * c / n
                    out[t] = h
                outs.append(out)
                continue
            for t in steps:
                if cell == "mgu":
                    # W_hn acts on f ⊙ h: a second product, after f.
                    f = _sigmoid(xw[t, :, :H] + h @ R[:H].T + b_hh[:H])
                    n = np.tanh(xw[t, :, H:] + (f * h) @ R[H:].T + b_hh[H:])
                    h = (1.0 - f) * h + f * n
                    out[t] = h
                    continue
                hw = h @ R.T + b_hh
                if cell == "lstm":
                    a = xw[t] + hw
                    i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H])
                    g, o = np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
                    c = f * c + i * g
                    h = o * np.tanh(c)
                elif cell == "gru":
                    r = _sigmoid(xw[t, :, :H] + hw[:, :H])
                    z = _sigmoid(xw[t, :, H:2 * H] + hw[:, H:2 * H])
                    n = np.tanh(xw[t, :, 2 * H:] + r * hw[:, 2 * H:])
                    h = (1.0 - z) * n + z * h
                else:   # janet
                    a = xw[t] + hw
                    s = a[:, :H]
                    n = np.tanh(a[:, H:])
                    h = _sigmoid(s) * h + (1.0 - _sigmoid(s - shift)) * n
                out[t] = h
            outs.append(out)
        inp = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=2)
    return inp


def _scan_cell_forward(cell, xw, reverse):
    """minGRU / minLSTM (``positive=False``) from their projection ``xw`` (T, B, G*H)."""
    T, B, G = xw.shape
    if cell == "mingru":
        H = G // 2
        z = _sigmoid(xw[:, :, :H])
        a, b = 1.0 - z, z * xw[:, :, H:]
    else:
        H = G // 3
        f, i = _sigmoid(xw[:, :, :H]), _sigmoid(xw[:, :, H:2 * H])
        a, b = f / (f + i), i / (f + i) * xw[:, :, 2 * H:]
    h = np.zeros((B, H), dtype=xw.dtype)
    out = np.empty((T, B, H), dtype=xw.dtype)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = a[t] * h + b[t]
        out[t] = h
    return out


# ---------------------------------------------------------------------------
# timing

# Seconds of idle before each timed run.  libgomp's pool threads spin for
# 5-12 ms after a region here (measured: runnable that long after a 2-thread
# region, the system's libgomp and PyTorch's), so a pause of this length
# alone may not be enough: see QUIET.
PAUSE = 0.01
# The pause is repeated while this process used more than QUIET of it in CPU
# time (a pool still spinning: onnxruntime's with spinning on), at most
# MAX_PAUSES times; the report counts the runs that needed it.
QUIET = 0.05
MAX_PAUSES = 20
# A side whose CPU time over wall time exceeds its thread count by more than
# this used more cores than allowed (the slack covers the other side's pool
# spinning briefly into the run and the timer's own thread).
CORES_SLACK = 0.25


def _pause():
    """Sleep PAUSE, again while this process keeps a core busy; return the extra pauses."""
    for extra in range(MAX_PAUSES):
        c0 = time.process_time()
        time.sleep(PAUSE)
        if time.process_time() - c0 < QUIET * PAUSE:
            return extra
    return MAX_PAUSES


class Side:
    """One contestant at one setting: ``peer`` with ``threads`` threads.

    ``call`` is one call (no arguments); ``setup`` runs before each timed run,
    untimed (it sets every thread count in the process); ``between`` (if
    given) runs before each call, untimed (training: new weights);
    ``variant`` names a setting beside the thread count (onnxruntime's
    spinning).
    """

    def __init__(self, peer, threads, call, setup=None, variant="", between=None):
        self.peer, self.threads, self.variant = peer, threads, variant
        self.call, self.setup, self.between = call, setup, between

    @property
    def label(self):
        return f"{self.peer}@{self.threads}" + (f" {self.variant}" if self.variant else "")

    def warmup(self, n):
        """``n`` untimed calls; returns the seconds the last one took."""
        if self.setup is not None:
            self.setup()
        times, _, _ = timed_calls(self.call, n, self.between)
        return times[-1]

    def run(self, calls):
        """``calls`` timed calls after a quiet pause.

        Returns (seconds of each call, wall seconds, CPU seconds of this
        process, extra pauses); with ``between``, wall and CPU seconds are
        those of the calls alone."""
        if self.setup is not None:
            self.setup()
        extra = _pause()
        return (*timed_calls(self.call, calls, self.between), extra)


class JaxSide(Side):
    """A side whose calls run in a JAX worker process (:mod:`fastgates._bench_jax`)."""

    def __init__(self, worker):
        super().__init__("jax", worker.threads, None)
        self.worker = worker

    def warmup(self, n):
        return self.worker.request("warmup", n)

    def run(self, calls):
        extra = _pause()
        # This process is quiet now and only waits for the reply meanwhile.
        times, wall, cpu, idle = self.worker.request("run", calls)
        self.worker.add_idle(*idle)
        return times, wall, cpu, extra


@dataclasses.dataclass
class Samples:
    """What the timed runs of one side measured (seconds)."""

    calls_per_run: int
    runs: list = dataclasses.field(default_factory=list)    # mean call of each run
    calls: list = dataclasses.field(default_factory=list)   # every timed call
    wall: float = 0.0
    cpu: float = 0.0
    spun_after: int = 0   # runs after which this process still used CPU at the pause's end

    def add(self, times, wall, cpu):
        self.runs.append(wall / len(times))
        self.calls += times
        self.wall += wall
        self.cpu += cpu

    @property
    def median(self):
        """Median over the runs of the time per call: the table's time."""
        return statistics.median(self.runs)

    @property
    def cores(self):
        """CPU time over wall time: the cores the side kept busy."""
        return self.cpu / self.wall if self.wall > 0 else float("nan")

    def call_percentile(self, q):
        """Percentile ``q`` of the single calls (the --load report)."""
        return float(np.percentile(self.calls, q))


def time_alternating(sides, repeats, min_run_time, warmup=1):
    """Time each side, the sides alternating A B C A B C ...

    After ``warmup`` calls per side (the answers checked before were the
    first warm-up call), whose last one sizes the runs (each run repeats the
    call to last at least ``min_run_time``), ``repeats`` rounds; returns a
    dict of side label to :class:`Samples`.  A run whose pause had to wait
    for this process to go quiet counts against the side that ran before it
    (``spun_after``)."""
    samples = {}
    for side in sides:
        last = side.warmup(warmup)
        samples[side.label] = Samples(max(1, math.ceil(min_run_time / max(last, 1e-9))))
    previous = sides[-1].label
    for _ in range(repeats):
        for side in sides:
            s = samples[side.label]
            times, wall, cpu, extra = side.run(s.calls_per_run)
            s.add(times, wall, cpu)
            samples[previous].spun_after += extra > 0
            previous = side.label
    return samples


def time_solo(side, calls, repeats):
    """Median seconds per call of one side timed on its own (spinning check)."""
    s = Samples(calls)
    for _ in range(repeats):
        s.add(*side.run(calls)[:3])
    return s.median


def gemm_gflops(dtype, n=GEMM_N, repeats=5):
    """Throughput of one n x n np.dot, under the current limits."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty_like(a)
    np.dot(a, b, out=out)
    times, _, _ = timed_calls(lambda: np.dot(a, b, out=out), repeats)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------
# the contestants


def _fg_model(cell, shape, dtype):
    return layer_class(cell)(shape.I, shape.H, shape.layers,
                                bidirectional=shape.bidirectional, dtype=dtype, seed=0)


def _zero_state(cell, shape, dtype):
    """The empty initial state of ``cell``: an array, or a tuple of them (fastgates.cells).

    Zeros, but for the values a cell starts from otherwise (an sLSTM's
    ``m = -inf``).
    """
    spec = _cells.get(cell)
    parts = [np.full((shape.layers * shape.D, shape.B, shape.H), spec.initial_value(j),
                     dtype=dtype) for j in range(len(spec.states))]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _torch_model(torch, cell, shape, dtype, state_dict):
    cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    m = cls(shape.I, shape.H, shape.layers, bidirectional=shape.bidirectional)
    m = m.to(torch.float32 if dtype == np.float32 else torch.float64)
    m.load_state_dict({k: torch.from_numpy(np.array(v))
                       for k, v in state_dict.items()})
    return m


def _xlstm_recurrent(R, heads, to_xlstm=True):
    """fastgates' block-diagonal ``weight_hh`` (4H, d), row ``g*H + k*d + j``
    (gate g, unit j of head k), as the vanilla sLSTMCell's recurrent kernel
    (heads, 4*d, d), entry ``[k, g*d + j, l]`` (it multiplies h[k*d + l] into
    gate g's unit j of head k), or back (``to_xlstm=False``)."""
    if to_xlstm:
        d = R.shape[1]
        return R.reshape(4, heads, d, d).transpose(1, 0, 2, 3).reshape(heads, 4 * d, d)
    d = R.shape[2]
    return R.reshape(heads, 4, d, d).transpose(1, 0, 2, 3).reshape(4 * heads * d, d)


def xlstm_weights(sd):
    """fastgates' one-layer sLSTM weights (``state_dict()``) in the layout of
    the xlstm side's tensors, keyed by fastgates' names.

    The input projection (``weight_ih_l0``, ``bias_ih_l0``) is PyTorch's
    ``linear`` (unchanged); ``bias_hh_l0`` is the cell's bias, whose layout
    (gate, head, unit) is fastgates' too; ``weight_hh_l0`` becomes the
    cell's recurrent kernel (:func:`_xlstm_recurrent`).  A missing bias is 0.
    """
    R = sd["weight_hh_l0"]
    heads = R.shape[0] // 4 // R.shape[1]
    zero = np.zeros(R.shape[0], R.dtype)
    return {"weight_ih_l0": sd["weight_ih_l0"],
            "bias_ih_l0": sd.get("bias_ih_l0", zero),
            "weight_hh_l0": _xlstm_recurrent(R, heads),
            "bias_hh_l0": sd.get("bias_hh_l0", zero)}


def xlstm_model(peers, sd, dtype):
    """The xlstm side's sLSTM on fastgates' weights ``sd`` (see XLSTM_NOTE).

    Returns ``(forward, params)``: ``forward(x)`` maps a (T, B, I) tensor to
    y (T, B, H) from the zero state; ``params`` are its four parameters,
    keyed by fastgates' names, in xlstm's layout (:func:`xlstm_weights`).
    """
    torch, cell_module = peers.xlstm_torch, peers.xlstm
    tdtype = torch.float32 if np.dtype(dtype) == np.float32 else torch.float64
    W, R = sd["weight_ih_l0"], sd["weight_hh_l0"]
    H, d = W.shape[0] // 4, R.shape[1]
    # Input and output time-major, (T, B, 4H) in gate, head, unit order and
    # (T, B, H); "dtype" names the CUDA kernel's (the vanilla backend computes
    # in its tensors' dtype); the initialisations are overwritten below.
    config = cell_module.sLSTMCellConfig(
        hidden_size=H, num_heads=H // d, backend="vanilla", function="slstm",
        input_shape="SBGNH", output_shape="SBH", dtype="float32",
        bias_init="standard", recurrent_weight_init="zeros")
    cell = cell_module.sLSTMCell(config).to(tdtype)
    own = dict(cell.named_parameters())
    params = {"weight_ih_l0": torch.nn.Parameter(torch.empty(W.shape, dtype=tdtype)),
              "bias_ih_l0": torch.nn.Parameter(torch.empty(W.shape[0], dtype=tdtype)),
              "weight_hh_l0": own["_recurrent_kernel_"],
              "bias_hh_l0": own["_bias_"]}
    with torch.no_grad():
        for name, value in xlstm_weights(sd).items():
            params[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))

    def forward(xt):
        pre = torch.nn.functional.linear(xt, params["weight_ih_l0"], params["bias_ih_l0"])
        return cell(pre)[0]
    return forward, params


def xlstm_gradients(params):
    """The gradients of the xlstm side's ``params``, in fastgates' layout."""
    grads = {name: _to_np(p.grad) for name, p in params.items()}
    R = grads["weight_hh_l0"]
    grads["weight_hh_l0"] = _xlstm_recurrent(R, R.shape[0], to_xlstm=False)
    return grads


# ONNX gate order: LSTM i, o, f, c from PyTorch's i, f, g, o; GRU z, r, h
# from r, z, n.
_ONNX_BLOCKS = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2]}


def _onnx_reorder(a, cell, H):
    return np.concatenate([a[j * H:(j + 1) * H] for j in _ONNX_BLOCKS[cell]])


def _onnx_session(peers, cell, shape, state_dict, threads, spin):
    """A float32 graph of one LSTM/GRU node per layer, y as (T, B, D*H).

    ``spin``: whether the intra-op pool's threads spin waiting for work.
    """
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
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def _to_np(t):
    return np.array(t.detach().numpy())


def _grad_dict(cell, dx, dstate, dparams):
    """Gradients keyed dx, dh0 (dc0) and by parameter name."""
    grads = {"dx": dx}
    states = _cells.get(cell).states
    for s, g in zip(states, dstate if len(states) > 1 else (dstate,)):
        grads[f"d{s}0"] = g
    grads.update(dparams)
    return grads


class JaxWorker:
    """A process that runs JAX's side at ``threads`` threads (:mod:`fastgates._bench_jax`).

    JAX sizes its thread pools once, when it starts, so each thread count
    needs a process of its own; it is started once per benchmark run and
    reused by every case."""

    def __init__(self, threads):
        self.threads = threads
        self.idle_wall = self.idle_cpu = 0.0
        self._stderr = tempfile.TemporaryFile()
        # XLA sizes its pools from the CPUs the process may use (no XLA_FLAGS
        # setting limits them in jaxlib 0.10): the process is held to
        # ``threads`` CPUs from its start, as `taskset -c` would.
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        self.proc = subprocess.Popen(
            # The file, not the module: its package (Numba) is not needed there.
            [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "_bench_jax.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=_child_env(), preexec_fn=functools.partial(os.sched_setaffinity, 0, cpus))
        try:
            self.version = self.receive()
        except BaseException:
            self.close()
            raise

    def receive(self):
        """The reply's payload to the request sent (RuntimeError on failure)."""
        try:
            status, payload = pickle.load(self.proc.stdout)
        except EOFError:
            self._stderr.seek(0)
            tail = self._stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"the JAX worker ({self.threads} threads) ended:\n{tail}") from None
        if status != "ok":
            raise RuntimeError(f"the JAX worker ({self.threads} threads) failed:\n{payload}")
        return payload

    def send(self, kind, arg=None):
        """Send one request; :meth:`receive` gets its reply."""
        pickle.dump((kind, arg), self.proc.stdin)
        self.proc.stdin.flush()

    def request(self, kind, arg=None):
        """Send one request, return the reply's payload (RuntimeError on failure)."""
        self.send(kind, arg)
        return self.receive()

    def add_idle(self, wall, cpu):
        """Count the worker's time between requests and the CPU it used then."""
        self.idle_wall += wall
        self.idle_cpu += cpu

    def close(self):
        """End the worker (it ends at the end of its input)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()


def start_jax_workers(threads, log):
    """One :class:`JaxWorker` per thread count, or none (with a note) if one fails."""
    if not hasattr(os, "sched_setaffinity"):
        return [], ("JAX is held to a thread count through the CPU affinity, which "
                    "this system lacks: no jax column.")
    workers = []
    try:
        for n in threads:
            workers.append(JaxWorker(n))
    except (RuntimeError, OSError) as exc:
        for w in workers:
            w.close()
        log(f"note: JAX could not start, no jax column: {exc}")
        return [], f"JAX could not start ({str(exc).splitlines()[0]}): no jax column."
    return workers, None


class ThreadSetter:
    """Sets every thread count of this process: BLAS and OpenMP pools
    (threadpoolctl), fastgates and PyTorch.  Each side calls it before each
    of its timed runs, so that no side runs with another side's count."""

    def __init__(self, torch):
        self.torch = torch
        self.refresh()

    def refresh(self):
        """Take in the libraries loaded since (Numba's OpenMP starts with its first kernel)."""
        self.controller = ThreadpoolController()

    def __call__(self, n):
        self.controller.limit(limits=n)
        fg.set_num_threads(n)
        if self.torch is not None:
            # Also after fastgates: the start of Numba's OpenMP pool sets the
            # thread count of the libgomp PyTorch uses too (same soname);
            # measured before this was done per run: PyTorch at "1 thread"
            # ran on 2 after fastgates' first parallel kernel.
            self.torch.set_num_threads(n)

    def setter(self, n):
        return functools.partial(self, n)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    cell: str
    dtype: str
    mode: str

    def label(self):
        return f"{self.shape.label()} {self.cell} {self.dtype} {self.mode}"


def _next_weights(sd):
    """The second set of weights of a training case (see WEIGHT_STEP)."""
    return {k: (v + WEIGHT_STEP).astype(v.dtype) for k, v in sd.items()}


def _alternate(load, weights):
    """A function that loads the next of ``weights`` at each call, cycling;
    the first call loads the second set (the first is loaded already)."""
    order = itertools.cycle(weights[1:] + weights[:1])

    def between():
        load(next(order))
    return between


def _fastgates_call(mode, m, x, dy, state):
    """One call of a fastgates model and the weight update between training
    steps (None for inference)."""
    if mode != "train":
        return functools.partial(m, x), None
    between = _alternate(m.load_state_dict, [m.state_dict(), _next_weights(m.state_dict())])

    def call():
        (y, _), pullback = m.vjp(x, state)
        return y, pullback(dy)
    return call, between


def _fastgates_sides(ctx, case, m, x, dy, state, add):
    call, between = _fastgates_call(case.mode, m, x, dy, state)
    for n in ctx.args.threads:
        ctx.threads(n)
        if case.mode == "train":
            y, (dx, dstate, dparams) = call()
            answer = {"y": y, **_grad_dict(case.cell, dx, dstate, dparams)}
        else:
            answer = {"y": m(x)[0]}
        add(Side("fastgates", n, call, ctx.threads.setter(n), between=between), answer)


def _yardstick_sides(ctx, case, x, dy, add):
    """fastgates' LSTM of the case's shape at each of fastgates' thread counts
    (see YARDSTICK): timed, never compared."""
    dtype = DTYPES[case.dtype]
    m = _fg_model(YARDSTICK_CELL, case.shape, dtype)
    state = _zero_state(YARDSTICK_CELL, case.shape, dtype)
    call, between = _fastgates_call(case.mode, m, x, dy, state)
    for n in ctx.args.threads:
        ctx.threads(n)
        # Untimed, as fastgates' answer is: the first call compiles or loads
        # the kernels, and the warm-up call that sizes the runs must not.
        call()
        add(Side(YARDSTICK, n, call, ctx.threads.setter(n), between=between), None)


def _torch_training(torch, tm, cell, x, state, dy, sd):
    """PyTorch's training step, the weight update between steps, and the
    gradients at the first set of weights (``sd``)."""
    params = list(tm.parameters())
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    states_t = [torch.from_numpy(s.copy()).requires_grad_(True)
                for s in (state if cell == "lstm" else (state,))]
    dyt = torch.from_numpy(dy)

    def call():
        for t in [xt, *states_t, *params]:
            t.grad = None
        y, _ = tm(xt, tuple(states_t) if cell == "lstm" else states_t[0])
        y.backward(dyt)

    def load(weights):
        # In place, as an optimiser's step changes them.
        with torch.no_grad():
            for name, p in tm.named_parameters():
                p.copy_(weights[name])

    weights = [{k: torch.from_numpy(v) for k, v in w.items()}
               for w in (sd, _next_weights(sd))]

    def answer():
        call()
        grads = {"dx": _to_np(xt.grad)}
        for name, t in zip(("dh0", "dc0"), states_t):
            grads[name] = _to_np(t.grad)
        grads.update((name, _to_np(p.grad)) for name, p in tm.named_parameters())
        return grads
    return call, _alternate(load, weights), answer


def _torch_sides(ctx, case, sd, x, dy, state, add):
    torch = ctx.peers.torch
    tm = _torch_model(torch, case.cell, case.shape, DTYPES[case.dtype], sd)
    between = None
    if case.mode == "train":
        call, between, answer = _torch_training(torch, tm, case.cell, x, state, dy, sd)
    else:
        xt = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                return tm(xt)

        def answer():
            return {"y": _to_np(call()[0])}
    for k in ctx.peer_threads:
        ctx.threads(k)
        add(Side("torch", k, call, ctx.threads.setter(k), between=between), answer())


def _xlstm_sides(ctx, case, sd, x, dy, add):
    """xlstm's sLSTM cell at each peer thread count (see XLSTM_NOTE)."""
    torch = ctx.peers.xlstm_torch
    forward, params = xlstm_model(ctx.peers, sd, DTYPES[case.dtype])
    between = None
    if case.mode == "train":
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def call():
            for t in [xt, *params.values()]:
                t.grad = None
            y = forward(xt)
            y.backward(dyt)
            return y

        def load(weights):
            # In place, as an optimiser's step changes them.
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(weights[name])

        weights = [{k: torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in xlstm_weights(w).items()} for w in (sd, _next_weights(sd))]
        between = _alternate(load, weights)

        def answer():
            y = call()
            return {"y": _to_np(y), "dx": _to_np(xt.grad), **xlstm_gradients(params)}
    else:
        xt = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                return forward(xt)

        def answer():
            return {"y": _to_np(call())}
    for k in ctx.peer_threads:
        ctx.threads(k)
        add(Side("xlstm", k, call, ctx.threads.setter(k), between=between), answer())


def _onnx_sides(ctx, case, sd, x, add):
    feed = {"X": x}
    for k in ctx.peer_threads:
        for spin in (True, False):
            sess = _onnx_session(ctx.peers, case.cell, case.shape, sd, k, spin)
            call = functools.partial(sess.run, None, feed)
            add(Side("onnxruntime", k, call, ctx.threads.setter(k),
                     "spin" if spin else "no spin"), {"y": call()[0]})


def _jax_sides(ctx, case, sd, x, dy, state, add):
    spec = {"cell": case.cell, "mode": case.mode, "layers": case.shape.layers,
            "bidirectional": case.shape.bidirectional, "params": sd, "x": x,
            "state": state}
    if case.mode == "train":
        spec.update(dy=dy, params_next=_next_weights(sd))
    # Every worker compiles at once (each on its own CPUs).
    for worker in ctx.workers:
        worker.send("setup", spec)
    replies = []
    for worker in ctx.workers:      # every reply read, so that none is left behind
        try:
            replies.append(worker.receive())
        except RuntimeError as exc:
            replies.append(exc)
    for reply in replies:
        if isinstance(reply, RuntimeError):
            raise reply
    for worker, (answer, _) in zip(ctx.workers, replies, strict=True):
        add(JaxSide(worker), answer if case.mode == "train" else {"y": answer})


def case_sides(ctx, case, m, x, dy):
    """The sides of one case, and each side's answer, before any is timed.

    An answer is a dict of array name to array: ``y`` for inference (and
    the forward half of fastgates' training step) and, for training, the
    gradients ``dx``, ``dh0`` (``dc0``) and one per parameter, all at the
    initial weights (the timed steps then update them).  PyTorch,
    onnxruntime and JAX sides are built for FRAMEWORK_CELLS only; for any
    other cell fastgates' LSTM is timed instead (YARDSTICK), and it has no
    answer; xlstm sides are built for the sLSTM of one layer and direction
    only (XLSTM_NOTE).  Returns (sides, answers keyed by side label, the
    NumPy forward pass's ``y``).
    """
    sides, answers = [], {}

    def add(side, answer):
        sides.append(side)
        if answer is not None:          # None: timed, not compared
            answers[side.label] = answer

    dtype = DTYPES[case.dtype]
    sd = m.state_dict()
    state = _zero_state(case.cell, case.shape, dtype)
    ref = numpy_forward(case.cell, sd, x, case.shape.layers, case.shape.bidirectional,
                        beta=getattr(m, "beta", 1.0))
    _fastgates_sides(ctx, case, m, x, dy, state, add)
    shipped = case.cell in FRAMEWORK_CELLS
    if not shipped:
        _yardstick_sides(ctx, case, x, dy, add)
    if ctx.peers.torch is not None and shipped:
        _torch_sides(ctx, case, sd, x, dy, state, add)
    def attempt(peer, build):
        """Add a peer's sides; if it fails, a note, and the peer is left out."""
        before = len(sides)
        try:
            build()
        except Exception as exc:  # a broken peer install: say so, go on
            lines = str(exc).strip().splitlines() or [""]
            short = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
            note = (f"{peer} could not run {case.shape.label()} {case.cell} "
                    f"({type(exc).__name__}: {short}); its cell is left empty.")
            ctx.log(f"note: {note}")
            ctx.peers.notes.append(note)
            for side in sides[before:]:
                del answers[side.label]
            del sides[before:]

    if (ctx.peers.ort is not None and shipped and case.dtype == "float32"
            and case.mode == "infer"):
        attempt("onnxruntime", lambda: _onnx_sides(ctx, case, sd, x, add))
    if ctx.peers.xlstm is not None and case.cell == "slstm":
        if case.shape.layers > 1 or case.shape.bidirectional:
            note = (f"xlstm's sLSTM cell is one layer in one direction: no xlstm side "
                    f"for {case.shape.label()}; its cells are left empty.")
            if note not in ctx.peers.notes:
                ctx.log(f"note: {note}")
                ctx.peers.notes.append(note)
        else:
            attempt("xlstm", lambda: _xlstm_sides(ctx, case, sd, x, dy, add))
    if ctx.peers.numpy and case.mode == "infer":
        def call():
            return numpy_forward(case.cell, sd, x, case.shape.layers, case.shape.bidirectional,
                                 beta=getattr(m, "beta", 1.0))
        for k in ctx.peer_threads:
            add(Side("numpy", k, call, ctx.threads.setter(k)), {"y": ref})
    if ctx.workers and shipped:
        attempt("JAX", lambda: _jax_sides(ctx, case, sd, x, dy, state, add))
        if any(w.proc.poll() is not None for w in ctx.workers):   # a worker died
            ctx.close_workers()
    return sides, answers, ref


def tolerance(dtype_name, array):
    """The agreement bound of ``array`` ("y" or a gradient's name) in a dtype."""
    return AGREE_TOL[dtype_name]["y" if array == "y" else "grad"]


def compare(mine, theirs):
    """``max|a - b| / max(1, max|b|)`` for each array both answers hold (NaN if any is)."""
    out = {}
    for name, b in theirs.items():
        if name in mine:
            b = np.asarray(b, dtype=np.float64)
            diff = np.abs(np.asarray(mine[name], dtype=np.float64) - b)
            out[name] = float(np.max(diff)) / max(1.0, float(np.max(np.abs(b))))
    return out


def agreement(case, n, answers, ref):
    """fastgates at ``n`` threads against every other side and the NumPy forward pass.

    Returns (errs, failures): errs maps each side's label (and "numpy
    forward") to (max error, array) of its array nearest to or furthest
    past its tolerance; failures names every array past its tolerance (a
    NaN counts as past it)."""
    mine = answers[f"fastgates@{n}"]
    # fastgates' other thread counts are its own; the yardstick (which
    # case_sides gives no answer) computes another function.
    others = [(label, a) for label, a in answers.items()
              if not label.startswith(("fastgates@", f"{YARDSTICK}@"))]
    errs, failures = {}, []
    for label, theirs in [("numpy forward", {"y": ref})] + others:
        worst = None
        for name, err in compare(mine, theirs).items():
            tol = tolerance(case.dtype, name)
            if not err <= tol:
                failures.append(f"{case.label()} thr={n}: fastgates@{n} against "
                                f"{label}: {name} differs by {err:.1e} "
                                f"(tolerance {tol:.0e})")
            score = err / tol if err <= tol else math.inf
            if worst is None or score >= worst[0]:
                worst = (score, err, name)
        if worst is not None:
            errs[label] = worst[1:]
    return errs, failures


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


SideInfo = collections.namedtuple("SideInfo", "peer threads variant label")


@dataclasses.dataclass
class Row:
    """fastgates at ``threads`` threads in one case, against every peer's sides.

    The rows of one case (one per fastgates thread count) share its
    ``samples``; a row whose answers disagree has ``failures`` and no
    samples: it was not timed."""

    shape: Shape
    cell: str
    dtype: str
    mode: str
    threads: int
    sides: list            # SideInfo of every side of the case
    errs: dict             # side label (or "numpy forward") -> (max error, array)
    failures: list = dataclasses.field(default_factory=list)
    samples: dict = None   # side label -> Samples
    gflops: float = None
    gemm: float = None
    solo_change: float = None
    held: float = None     # --load: share of fastgates' n-thread calls run on fewer threads

    def label(self):
        return f"{self.shape.label()} {self.cell} {self.dtype} {self.mode} thr={self.threads}"

    @property
    def fastgates(self):
        return self.samples[f"fastgates@{self.threads}"].median

    def peer(self, peer, threads=None):
        """(median, SideInfo) of the peer's fastest side with ``threads``
        threads (None: with 1 to this row's count: its best), or None."""
        timed = [(self.samples[s.label].median, s) for s in self.sides
                 if s.peer == peer and (s.threads == threads if threads is not None
                                        else s.threads <= self.threads)]
        return min(timed, key=lambda ts: ts[0]) if timed else None

    def best_peer(self):
        """(median, SideInfo) of the fastest side of any peer at its best, or None.

        fastgates' own sides are no peers, its LSTM yardstick included (see
        YARDSTICK): nobody switches to another cell for its speed."""
        best = [b for b in (self.peer(p) for p in {s.peer for s in self.sides}
                            if p not in ("fastgates", YARDSTICK)) if b is not None]
        return min(best, key=lambda ts: ts[0]) if best else None

    def yardstick(self):
        """(median, SideInfo) of fastgates' LSTM at this row's thread count, or
        None (a cell that frameworks ship, or a row not timed)."""
        if self.samples is None:
            return None
        return self.peer(YARDSTICK, self.threads)


class _Context:
    """What every case of one run shares."""

    def __init__(self, args, peers, progress, workers=()):
        self.args, self.peers, self.progress = args, peers, progress
        self.log = progress.log
        self.workers = list(workers)
        # Each peer is timed at every thread count up to the largest asked for.
        self.peer_threads = list(range(1, max(args.threads) + 1))
        self.threads = ThreadSetter(peers.torch_runtime)

    def close_workers(self):
        for w in self.workers:
            w.close()
        self.workers = []


def _shapes(args):
    if args.shape:
        return list(args.shape)
    shapes = QUICK if args.quick else MATRIX
    return [s for s in shapes if s.group in args.groups]


def _cases(args):
    return [Case(shape, cell, dtype, mode) for shape in _shapes(args)
            for cell in args.cells for dtype in args.dtypes for mode in args.modes]


def run_matrix(args, peers, progress):
    """Every case of the matrix: returns (rows, GEMM throughput, JAX worker notes)."""
    gemm = {}
    for dtype_name in args.dtypes:
        for n in args.threads:
            with threadpool_limits(limits=n):
                gemm[(dtype_name, n)] = gemm_gflops(DTYPES[dtype_name], args.gemm_n)
            progress.log(f"threads={n} {dtype_name}: np.dot {args.gemm_n}^2 "
                         f"{gemm[(dtype_name, n)]:.1f} GFLOP/s")
    ctx = _Context(args, peers, progress)
    # The workers take seconds to start: not for a run that has no case JAX
    # could run (its version is then "not used").
    if peers.jax and any(c in FRAMEWORK_CELLS for c in args.cells):
        ctx.workers, note = start_jax_workers(ctx.peer_threads, progress.log)
        if note:
            peers.notes.append(note)
        else:
            peers.jax_version = ctx.workers[0].version
    rows = []
    # threadpoolctl restores the pools' thread counts at the end.
    with threadpool_limits(limits=max(args.threads)):
        try:
            for shape in _shapes(args):
                for cell in args.cells:
                    for dtype_name in args.dtypes:
                        rows += _run_shape(ctx, shape, cell, dtype_name, gemm)
        finally:
            notes = _worker_notes(ctx.workers)
            ctx.close_workers()
    peers.notes += notes
    return rows, gemm


def _worker_notes(workers):
    notes = []
    for w in workers:
        if w.idle_wall > 0 and w.idle_cpu > QUIET * w.idle_wall:
            notes.append(f"**the JAX worker at {w.threads} threads used "
                         f"{w.idle_cpu / w.idle_wall:.2f} cores while the other "
                         "sides ran**: its pool spins into their runs.")
    return notes


def _run_shape(ctx, shape, cell, dtype_name, gemm):
    args, progress = ctx.args, ctx.progress
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(1)
    m = _fg_model(cell, shape, dtype)
    x = rng.standard_normal((shape.T, shape.B, shape.I)).astype(dtype)
    dy = rng.standard_normal((shape.T, shape.B, shape.D * shape.H)).astype(dtype)
    rows = []
    for mode in args.modes:
        case = Case(shape, cell, dtype_name, mode)
        progress.start(case.label())
        sides, answers, ref = case_sides(ctx, case, m, x, dy)
        infos = [SideInfo(s.peer, s.threads, s.variant, s.label) for s in sides]
        case_rows = []
        for n in args.threads:
            errs, failures = agreement(case, n, answers, ref)
            case_rows.append(Row(shape, cell, dtype_name, mode, n, infos, errs, failures))
        failures = [f for r in case_rows for f in r.failures]
        if failures:
            # A fast wrong answer is a failure, not a time.
            for f in failures:
                progress.log(f"DISAGREEMENT: {f}")
            progress.finish("not timed: the answers disagree")
            rows += case_rows
            continue
        del answers
        ctx.threads.refresh()
        samples = time_alternating(sides, args.repeats, args.min_run_time)
        held = _load_rounds(ctx, sides, samples) if args.load else None
        solo = {}
        if args.spin_check:
            for side in sides:
                s = samples[side.label]
                solo[side.label] = abs(time_solo(side, s.calls_per_run, args.repeats)
                                       / s.median - 1.0)
        # The cell's own gate count: GFLOP/s and %GEMM are of the cell's
        # work in the cell's time (the yardstick's do not enter a row).
        flops = shape.forward_flops(GATES[cell]) * (3 if mode == "train" else 1)
        for row in case_rows:
            row.samples = samples
            row.held = held
            row.gflops = flops / row.fastgates / 1e9
            row.gemm = gemm[(dtype_name, row.threads)]
            if solo:
                row.solo_change = max(solo.values())
        rows += case_rows
        progress.finish(_result_text(case_rows))
    return rows


def _load_rounds(ctx, sides, samples):
    """--load: LOAD_REPEATS more rounds of fastgates at 1 and n threads alone,
    their calls added to ``samples``; returns the share of the n-thread
    calls that fastgates' thread plan ran on fewer threads (busy cores)."""
    from . import _config

    n = max(ctx.args.threads)
    pair = [s for s in sides if s.peer == "fastgates" and s.threads in (1, n)]
    plan = _config._contention
    asked, reduced = plan.asked, plan.reduced
    extra = time_alternating(pair, LOAD_REPEATS, ctx.args.min_run_time)
    for side in pair:
        s, more = samples[side.label], extra[side.label]
        s.runs += more.runs
        s.calls += more.calls
    asked = plan.asked - asked
    return (plan.reduced - reduced) / asked if asked else None


def _result_text(case_rows):
    row = case_rows[-1]
    parts = [f"{label} {s.median * 1e3:.3f} ms ({s.cores:.1f} cores)"
             for label, s in row.samples.items()]
    worst = max((e for r in case_rows for e, _ in r.errs.values()), default=0.0)
    return "  ".join(parts + [f"max err {worst:.1e}"])


# ---------------------------------------------------------------------------
# report


def _fmt_ms(t):
    return "" if t is None else (f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}")


def _fmt_ratio(peer, mine):
    return "" if peer is None or mine is None else f"{peer / mine:.2f}"


def _agree(row):
    if row.failures:
        label, (err, name) = max(row.errs.items(), key=lambda kv: kv[1][0] / tolerance(row.dtype, kv[1][1]))
        return f"**NO** {err:.0e} ({label}: {name}; not timed)"
    if not row.errs:
        return "n/a"
    return f"{max(err for err, _ in row.errs.values()):.0e}"


def environment_lines(peers, gemm=None, gemm_n=GEMM_N):
    torch, ort = peers.torch_runtime, peers.ort
    lines = [
        f"- date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        f"- machine: {platform.machine()}, {_cpu_model()}, "
        f"{os.cpu_count()} logical cores, load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- Python {platform.python_version()}, NumPy {np.__version__}, "
        f"fastgates {getattr(fg, '__version__', '?')} "
        f"({os.path.dirname(fg.__file__)}, {fg.get_activation_mode()} activations), "
        f"torch {torch.__version__ if torch is not None else 'not used'}, "
        f"onnxruntime {ort.__version__ if ort is not None else 'not used'}, "
        f"jax {peers.jax_version or 'not used'}"
        + (f", xlstm {peers.xlstm_version} (sLSTM cell, vanilla backend)"
           if peers.xlstm is not None else ""),
    ]
    blas = [f"{p.get('internal_api')} {p.get('version')} "
            f"({p.get('architecture')}, {p.get('threading_layer')})"
            for p in threadpool_info() if p.get("user_api") == "blas"]
    lines.append(f"- BLAS: {', '.join(blas) or 'unknown'}")
    env = {k: os.environ[k] for k in sorted(os.environ)
           if k.startswith(("OPENBLAS_", "OMP_", "NUMBA_", "MKL_", "XLA_"))}
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


_PEER_COLUMN = {"torch": "torch", "onnxruntime": "onnxrt", "jax": "jax", "xlstm": "xlstm",
                "numpy": "numpy", YARDSTICK: "fastgates LSTM"}


def _shown(peers):
    return (["torch", "onnxruntime", "jax"] + (["xlstm"] if peers.xlstm is not None else [])
            + (["numpy"] if peers.numpy else []))


def _setting(side):
    """How a side was run, for the table: "1 thr" or "2 thr, spin"."""
    return f"{side.threads} thr" + (f", {side.variant}" if side.variant else "")


def _has_yardstick(rows):
    return any(s.peer == YARDSTICK for r in rows for s in r.sides)


def table_lines(rows, peers, spin_check=False):
    """The side-by-side table, one markdown row per case and fastgates thread count.

    With a cell that no framework ships, two more columns follow fastgates:
    its LSTM of the same shape and thread count (YARDSTICK) and the ratio
    LSTM time / cell time (above 1: the cell is faster than the LSTM)."""
    shown = _shown(peers)
    cols = [_PEER_COLUMN[p] for p in shown]
    yard = _has_yardstick(rows)
    header = ["group", "(T, B, I, H)", "cell", "dtype", "mode", "thr", "fastgates"]
    if yard:
        header += ["fastgates LSTM", "LSTM/cell"]
    for c in cols:
        header += [c, f"{c} best"]
    for c in cols:
        header += [f"{c}/fg", f"{c} best/fg"]
    header += ["best peer", "best peer/fg", "GFLOP/s", "%GEMM", "max err"]
    if spin_check:
        header.append("solo vs alt")
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [r.shape.group, r.shape.label(), r.cell, r.dtype, r.mode, str(r.threads)]
        if r.samples is None:
            cells += [""] * (len(header) - len(cells) - 1 - spin_check) + [_agree(r)]
            cells += [""] * spin_check
            out.append("| " + " | ".join(cells) + " |")
            continue
        mine = r.fastgates
        at_n = [r.peer(p, r.threads) for p in shown]
        best = [r.peer(p) for p in shown]
        cells.append(_fmt_ms(mine))
        if yard:
            lstm = r.yardstick()
            cells += [_fmt_ms(lstm and lstm[0]), _fmt_ratio(lstm and lstm[0], mine)]
        for a, b in zip(at_n, best, strict=True):
            cells += [_fmt_ms(a and a[0]),
                      "" if b is None else f"{_fmt_ms(b[0])} ({_setting(b[1])})"]
        for a, b in zip(at_n, best, strict=True):
            cells += [_fmt_ratio(a and a[0], mine), _fmt_ratio(b and b[0], mine)]
        top = r.best_peer()
        cells += ["" if top is None else f"{_PEER_COLUMN[top[1].peer]} ({_setting(top[1])})",
                  _fmt_ratio(top and top[0], mine),
                  f"{r.gflops:.1f}", f"{100 * r.gflops / r.gemm:.0f}%", _agree(r)]
        if spin_check:
            cells.append(f"{100 * r.solo_change:.0f}%")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _call_stats(samples):
    return samples.call_percentile(50), samples.call_percentile(90)


def _fmt_stats(stats):
    return "" if stats is None else f"{_fmt_ms(stats[0])} / {_fmt_ms(stats[1])}"


def load_rows(rows):
    """Per timed case (its row at the largest thread count n): each side's
    per-call median and 90th percentile at 1 and n threads, and fastgates'
    n-thread over 1-thread ratios.  A list of dicts."""
    n = max(r.threads for r in rows)
    out = []
    for r in rows:
        if r.threads != n or r.samples is None or "fastgates@1" not in r.samples:
            continue
        item = {"row": r, "n": n, "sides": {}}
        for peer in ["fastgates"] + sorted({s.peer for s in r.sides} - {"fastgates"}):
            for k in (1, n):
                # onnxruntime: the faster of spinning and not (by median).
                cands = [_call_stats(r.samples[s.label]) for s in r.sides
                         if s.peer == peer and s.threads == k]
                if cands:
                    item["sides"][(peer, k)] = min(cands)
        one, many = item["sides"][("fastgates", 1)], item["sides"][("fastgates", n)]
        item["ratio"] = (many[0] / one[0], many[1] / one[1])
        item["met"] = max(item["ratio"]) <= LOAD_TARGET
        out.append(item)
    return out


def load_table_lines(items, peers):
    """The --load table: per-call median / p90 (ms) at 1 and n threads.

    The target and fg n/1 are the cell's own; fastgates' LSTM yardstick (a
    cell no framework ships) gets columns of its own, as a peer does."""
    n = items[0]["n"]
    yard = [YARDSTICK] if _has_yardstick([it["row"] for it in items]) else []
    shown = ["fastgates"] + yard + _shown(peers)
    header = ["group", "(T, B, I, H)", "cell", "dtype", "mode",
              "fastgates 1 thr", f"fastgates {n} thr", f"fg {n}/1 median", f"fg {n}/1 p90",
              f"<= {LOAD_TARGET}", f"fg {n}-thr calls on fewer"]
    for p in shown[1:]:
        header += [f"{_PEER_COLUMN[p]} 1 thr", f"{_PEER_COLUMN[p]} {n} thr"]
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" --- " for _ in header) + "|"]
    for it in items:
        r, s = it["row"], it["sides"]
        cells = [r.shape.group, r.shape.label(), r.cell, r.dtype, r.mode,
                 _fmt_stats(s[("fastgates", 1)]), _fmt_stats(s[("fastgates", n)]),
                 f"{it['ratio'][0]:.2f}", f"{it['ratio'][1]:.2f}",
                 "yes" if it["met"] else "**no**",
                 "" if r.held is None else f"{r.held:.0%}"]
        for p in shown[1:]:
            cells += [_fmt_stats(s.get((p, 1))), _fmt_stats(s.get((p, n)))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _notes(rows, args, peers):
    notes = list(peers.notes)
    if args.no_onnx:
        notes.append("onnxruntime skipped (--no-onnx).")
    alone = [c for c in GATES if c not in FRAMEWORK_CELLS and any(r.cell == c for r in rows)]
    if alone:
        gates = ", ".join(f"{_cells.get(c).label} G = {GATES[c]}" for c in alone)
        notes.append(f"{', '.join(_cells.get(c).label for c in alone)}: no framework "
                     "ships the cell, so PyTorch, onnxruntime and JAX are not run for it; "
                     "fastgates' own LSTM of the same shape, dtype, mode and thread "
                     "count is timed beside it instead (fastgates LSTM; LSTM/cell = "
                     "LSTM time / cell time, above 1: the cell is faster). The LSTM "
                     "computes another function: it is not compared (max err is "
                     "against the NumPy forward pass, and for the sLSTM against "
                     "xlstm too) and it is no peer (best peer). "
                     f"GFLOP/s and %GEMM count the cell's own gates ({gates}).")
    if any(s.peer == "xlstm" for r in rows for s in r.sides):
        notes.append(XLSTM_NOTE)
    timed = [r for r in rows if r.samples is not None]
    over = []
    for r in timed:
        if r.threads != max(args.threads):
            continue   # the case's sides are the same in its other rows
        busy = [f"{s.label} {r.samples[s.label].cores:.2f}" for s in r.sides
                if r.samples[s.label].cores > s.threads + CORES_SLACK]
        if busy:
            over.append(f"{r.shape.label()} {r.cell} {r.dtype} {r.mode}: " + ", ".join(busy))
    if over:
        notes.append("**more cores busy than threads allowed** (CPU time / wall "
                     "time of a side's timed runs; that side's time is flattered): "
                     + "; ".join(over))
    elif timed:
        notes.append("Every side kept at most its thread count of cores busy "
                     f"(CPU time / wall time of its timed runs <= threads + "
                     f"{CORES_SLACK}).")
    spun = collections.Counter()
    for r in timed:
        if r.threads == max(args.threads):
            spun.update({label: s.spun_after for label, s in r.samples.items()})
    spun = {label: k for label, k in spun.items() if k}
    if spun:
        notes.append(f"After these sides' runs this process still used CPU at the end "
                     f"of the {PAUSE * 1e3:g} ms pause (a pool spinning down), so the "
                     "next run waited until it was quiet (runs): "
                     + ", ".join(f"{label} {k}" for label, k in sorted(spun.items())))
    if timed and args.spin_check:
        notes.append("solo vs alt: largest change of a side timed on its own "
                     "against alternating; above 10% means a pool spins.")
    failures = [f for r in rows for f in r.failures]
    if failures:
        notes.append("**The answers disagree: the run failed.** Not timed: "
                     + "; ".join(failures))
    return notes


def report(rows, gemm, args, peers, compile_rows=None, memory_rows=None):
    out = ["# fastgates benchmark", ""]
    out += environment_lines(peers, gemm, args.gemm_n)
    out.append(f"- command: `{args.command_line}`")
    if args.load:
        out.append(f"- under load: {args.load} busy processes (`python -c \"while True: pass\"`) "
                   "beside the run")
    if rows:
        out += [f"- median of {args.repeats} timed runs after warm-up, sides "
                f"alternating; each run repeats the call to last >= "
                f"{args.min_run_time * 1e3:g} ms", "",
                "Times in ms; ratios are peer_time / fastgates_time (above 1: "
                "fastgates is faster). Each peer is timed at every thread count "
                "from 1 to that of the row (onnxruntime with and without spinning): "
                "its column is its time at the row's thread count, `best` its "
                "fastest setting; best peer: the fastest peer at its best. "
                "Training: forward and backward, every side loading new weights "
                "before each step (untimed). GFLOP/s with forward FLOPs 2*T*B*G*H*(I_k+H), "
                "training 3x; %GEMM against the GEMM throughput above. max err: "
                "max |fastgates - peer| / max(1, max|peer|), worst over the peers' "
                "sides and the NumPy forward pass, over y (inference, and the NumPy "
                "check in training) or every gradient (training); above the "
                "tolerance the row fails and is not timed."
                + (" fastgates LSTM: fastgates' LSTM of the row's shape and thread "
                   "count, timed in the same alternation beside a cell no framework "
                   "ships; LSTM/cell: its time over the cell's (not compared, no peer)."
                   if _has_yardstick(rows) else ""), ""]
        out += table_lines(rows, peers, args.spin_check)
        items = load_rows(rows) if args.load else []
        if items:
            met = sum(it["met"] for it in items)
            n = items[0]["n"]
            out += ["", f"## Under load: each call at 1 and {n} threads", "",
                    f"Per-call median / 90th percentile (ms) of every timed call "
                    f"(fastgates: also of {LOAD_REPEATS} more rounds of its 1- and "
                    f"{n}-thread settings alone). fg {n}/1: fastgates' {n}-thread time "
                    f"over its own 1-thread time in the same run; the target is <= "
                    f"{LOAD_TARGET} for both. fg {n}-thr calls on fewer: the share of "
                    f"those calls that its thread plan ran on fewer threads (the cores "
                    f"were busy). Peers: the faster setting at that thread count. Met "
                    f"in {met} of {len(items)} cases.", ""]
            out += load_table_lines(items, peers)
    notes = _notes(rows, args, peers)
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


def _json_yardstick(r):
    """A row's yardstick (fastgates' LSTM, timed and not compared), or None."""
    lstm = r.yardstick()
    if lstm is None:
        return None
    return {"cell": YARDSTICK_CELL, "side": lstm[1].label, "median_ms": lstm[0] * 1e3,
            "lstm_over_cell": lstm[0] / r.fastgates, "compared": False}


def json_report(rows, gemm, args, peers):
    """The rows as plain data (``--json``): every side's samples and the errors."""
    def side(s, info):
        return {"peer": info.peer, "threads": info.threads, "variant": info.variant,
                "median_ms": s.median * 1e3, "runs_ms": [t * 1e3 for t in s.runs],
                "call_median_ms": s.call_percentile(50) * 1e3,
                "call_p90_ms": s.call_percentile(90) * 1e3,
                "calls_per_run": s.calls_per_run, "cores": s.cores,
                "spun_after": s.spun_after}
    out = []
    for r in rows:
        out.append({
            "group": r.shape.group, "T": r.shape.T, "B": r.shape.B, "I": r.shape.I,
            "H": r.shape.H, "layers": r.shape.layers, "bidirectional": r.shape.bidirectional,
            "cell": r.cell, "dtype": r.dtype, "mode": r.mode, "threads": r.threads,
            "errors": {k: {"max_error": e, "array": a} for k, (e, a) in r.errs.items()},
            "failures": r.failures, "gflops": r.gflops, "load_fewer_threads": r.held,
            "sides": None if r.samples is None else {
                i.label: side(r.samples[i.label], i) for i in r.sides},
            "yardstick": _json_yardstick(r)})
    return {"command": args.command_line, "environment": environment_lines(peers, gemm, args.gemm_n),
            "load": args.load, "repeats": args.repeats, "weight_step": WEIGHT_STEP,
            "tolerances": AGREE_TOL, "rows": out}


# ---------------------------------------------------------------------------
# fresh processes: compile cost and memory


def child_root():
    """The folder holding this very fastgates: a child's ``PYTHONPATH`` and working directory.

    Both: ``python -c`` puts its working directory first on ``sys.path``,
    so a child started in a source checkout would otherwise import the
    checkout's fastgates, not the installed one running here (and fill
    another kernel cache: measured in tox, where ``python -m fastgates
    compile`` compiled into the checkout while the tests loaded from the
    installed package).
    """
    return os.path.dirname(os.path.dirname(os.path.abspath(fg.__file__)))


def _child_env(**extra):
    """Environment of a fresh process that imports this very fastgates (run it in :func:`child_root`)."""
    env = dict(os.environ, FASTGATES_ACTIVATIONS=fg.get_activation_mode())
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [child_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_child(code, env, arg=None):
    cmd = [sys.executable, "-c", code] + ([arg] if arg is not None else [])
    res = subprocess.run(cmd, env=env, cwd=child_root(), capture_output=True, text=True)
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
                code = _COMPILE_SCRIPT.format(cls=layer_class(cell).__name__, dtype=dtype_name)
                for kind in ("empty", "warm"):
                    r = _run_child(code, env)
                    log(f"compile {cell} {dtype_name} {kind} cache: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()))
                    rows.append((cell, dtype_name, kind, r))
    return rows


def kept_bytes(cell, shape, itemsize):
    """Bytes of the activations a training step must keep for its backward pass.

    Per layer and direction the gates (T, B, G*H) and the cell's ``aux``
    array (``Cell.aux_units`` of H: LSTM the cell states c; GRU W_hn h +
    b_hn, which reset_after needs; JANET sigmoid(s - beta); an MGU none),
    per layer its output (T, B, D*H), and the input x (T, B, I) once (a
    layer's input is the previous layer's output, already counted):
    ``itemsize * T * B * (I + L * D * (G + aux + 1) * H)``.
    """
    G = GATES[cell]
    aux = _cells.get(cell).aux_units
    per_layer = shape.D * (G + aux) * shape.H + shape.D * shape.H
    return itemsize * shape.T * shape.B * (shape.I + shape.layers * per_layer)


def gradient_bytes(cell, shape, itemsize):
    """Bytes of what the pullback returns: dx, dstate and one array per parameter."""
    G, H, D = GATES[cell], shape.H, shape.D
    params = 0
    for k in range(shape.layers):
        i_k = shape.I if k == 0 else D * H
        params += D * (G * H * (i_k + H) + 2 * G * H)
    states = len(_cells.get(cell).states) * shape.layers * D * shape.B * H
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
    _config._eager_tiers = True     # the kernels of the timings (see run)
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
# busy processes (--load)

# What a busy neighbour runs: one core, all the time.
BUSY_CODE = "while True: pass"


def _die_with_parent():
    """In a child before exec: be killed when the runner dies (Linux), so that
    no busy process outlives it even if it is killed outright."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def busy_processes(n, log):
    """``n`` processes each keeping a core busy, for the duration of the block.

    They are ended when the block ends, on an error, a KeyboardInterrupt or a
    SIGTERM (turned into SystemExit meanwhile), and die with the runner on
    Linux."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    procs, previous = [], None
    if n:
        try:
            previous = signal.signal(signal.SIGTERM, stop)
        except ValueError:   # not the main thread, where only Python may catch it
            pass
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", BUSY_CODE], stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
        if n:
            log(f"--load {n}: started busy processes {[p.pid for p in procs]}")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        if procs:
            log(f"--load {n}: busy processes ended")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------
# command line


def add_arguments(p):
    """Add the benchmark's options to an ArgumentParser (also used by __main__)."""
    p.add_argument("--quick", action="store_true",
                   help="one shape per group at 2 threads (unless --threads)")
    p.add_argument("--threads", type=int, nargs="+", default=None, metavar="N",
                   help="fastgates' thread counts (default: 1 2; --quick: 2); "
                        "each peer is timed at every count from 1 to the largest")
    p.add_argument("--groups", nargs="+", choices=GROUPS, default=None, metavar="GROUP",
                   help=f"shape groups of the matrix, from {' '.join(GROUPS)} "
                        "(default: all; with --load: tiny small)")
    p.add_argument("--shape", type=parse_shape, action="append", metavar="T,B,I,H[,L[,bi]]",
                   help="a shape of your own instead of the matrix (repeatable), "
                        "e.g. 100,16,64,128 or 50,16,256,256,2,bi")
    # Every registered cell is offered; the default stays the frameworks'
    # cells, so that a new cell does not lengthen the default matrix.
    others = [c for c in GATES if c not in FRAMEWORK_CELLS]
    cells_help = f"from {' '.join(GATES)} (default: {' '.join(FRAMEWORK_CELLS)})"
    if others:
        cells_help += (f"; {' '.join(others)}: opt-in; no framework ships them, so "
                       "they are timed against fastgates' own LSTM of the same shape "
                       "(not compared: another function)")
    p.add_argument("--cells", nargs="+", choices=list(GATES), default=list(FRAMEWORK_CELLS),
                   metavar="CELL", help=cells_help)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                   metavar="DTYPE", help="float32, float64 (default: both)")
    p.add_argument("--modes", nargs="+", choices=["infer", "train"],
                   default=["infer", "train"], metavar="MODE",
                   help="infer, train (default: both); training steps get new "
                        "weights before each step on every side")
    p.add_argument("--peers", nargs="+", choices=PEERS, default=None, metavar="PEER",
                   help=f"peers to time, from {' '.join(PEERS)} (default: torch "
                        "onnxruntime jax, and xlstm with --cells slstm: the xLSTM "
                        "package's pure-PyTorch sLSTM cell, for that cell only; "
                        "numpy, the NumPy forward pass, is timed when PyTorch is "
                        "missing)")
    p.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run beside N busy processes (`python -c \"while True: "
                        "pass\"`, ended with the run) and report each side's "
                        "per-call median and 90th percentile at 1 and n threads, "
                        f"and fastgates' n-thread over 1-thread ratio (target <= "
                        f"{LOAD_TARGET}); fastgates is timed at 1 thread too")
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
    p.add_argument("--json", metavar="FILE",
                   help="also write the rows as JSON here (every side's runs and "
                        "calls summarised, the errors)")
    # Forgetting attention against PyTorch's SDPA: its own rows and options
    # (fastgates._bench_attention).
    _bench_attention.add_arguments(p)
    # minGRU / minLSTM against the LSTM and PyTorch's log-space scan
    # (fastgates._bench_scan).
    _bench_scan.add_arguments(p)
    # fastgates.dask on a LocalCluster against the in-process call
    # (fastgates._bench_dask).
    _bench_dask.add_arguments(p)
    p.set_defaults(func=run, _bench_parser=p)
    return p


def _parser(prog):
    return add_arguments(argparse.ArgumentParser(
        prog=prog,
        description="fastgates vs PyTorch, onnxruntime, JAX and NumPy side by "
                    "side; see docs/benchmarks.md. Exits with 1 if answers "
                    "disagree beyond the tolerance."))


def _check_args(args):
    """Fill defaults that depend on other options; return an error or None."""
    import numba

    if args.load < 0:
        return "--load must be 0 or more"
    if args.threads is None:
        args.threads = [1, 2] if args.load or not args.quick else [2]
    elif args.load and 1 not in args.threads:
        args.threads = [1] + list(args.threads)     # the 1-thread time it is held to
    args.threads = sorted(set(args.threads))
    if args.groups is None:
        # Under load the target covers the tiny and small shapes.
        args.groups = ["tiny", "small"] if args.load else list(GROUPS)
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
        args.peers = [p for p in (args.peers or default_peers(args.cells))
                      if p != "onnxruntime"]
    return None


def run(args):
    """Run the benchmark described by parsed ``args``; return the exit code
    (1 if any row's answers disagree beyond the tolerance)."""
    # fastgates at its best: the kernels a process otherwise compiles only
    # once they pay (_config.Tier, the LSTM's overlapped ones) are compiled
    # by the warm-up calls, as after `python -m fastgates compile` (the
    # compile-cost rows run in fresh processes of their own)
    eager, _config._eager_tiers = _config._eager_tiers, True
    try:
        return _run(args)
    finally:
        _config._eager_tiers = eager


def _run(args):
    # their own rows, under --load's busy processes as the matrix is
    for flag, own in (("attention", _bench_attention.run), ("scan", _bench_scan.run),
                      ("dask", _bench_dask.run)):
        if getattr(args, flag, False):
            with busy_processes(args.load, print):
                return own(args)
    error = _check_args(args)
    if error:
        args._bench_parser.error(error)
    if getattr(args, "command_line", None) is None:
        args.command_line = "python -m fastgates bench"
    progress = Progress(0)
    log = progress.log

    peers = Peers() if args.no_timing else load_peers(args.peers, args.cells)
    for note in peers.notes:
        log(f"note: {note}")
    torch = peers.torch_runtime
    if torch is not None:
        try:
            torch.set_num_interop_threads(1)
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
    old_torch = torch.get_num_threads() if torch is not None else None
    rows, gemm, compile_rows, memory_rows = [], {}, None, None
    try:
        if not args.no_timing:
            progress.total = len(_cases(args))
            with busy_processes(args.load, log):
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
            torch.set_num_threads(old_torch)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        log(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(json_report(rows, gemm, args, peers), f, indent=1)
        log(f"wrote {args.json}")
    failures = [f for r in rows for f in r.failures]
    if failures:
        log(f"FAILED: {len(failures)} disagreement(s) beyond the tolerance "
            f"(see the notes); those rows were not timed.")
        return 1
    return 0


def main(argv=None, prog="python -m fastgates bench"):
    """Parse ``argv`` (default: ``sys.argv[1:]``), run, return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(prog).parse_args(argv)
    args.command_line = " ".join([prog] + argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
