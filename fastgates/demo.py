"""``python -m fastgates demo``: forecast the yearly sunspot number with an LSTM.

The demo trains a small recurrent network on the shipped data set
(:func:`fastgates.datasets.load_sunspots`, 1700 to 2008) to predict the next
year's mean sunspot number from the years before it, then:

1. scores it on the held-out last years against two baselines, persistence
   (next year = this year) and a linear autoregression on the same window
   fitted by least squares, as a table of RMSEs in sunspot numbers;
2. summarises how long its units remember, from the forget gates
   (:func:`fastgates.gate_summary`; for a GRU the update gate ``z``);
3. draws three PNGs with :mod:`fastgates.plot` (needs matplotlib): the
   forget gates over a held-out window, the histogram of the units' time
   scales, and the prediction against the data with the held-out part shaded.

The set-up: inputs and targets are ``sqrt(sunspots)`` (which makes the
variance of the series roughly constant over the cycle), standardised with
the mean and standard deviation of the training years only; the network is
``Readout(LSTM(1, H), Linear(H, 1), mode="last")`` (its output after the last
step of each window), trained with Adam on the mean squared error, with
gradient clipping, a cosine learning-rate decay, and the height of each
training window jittered at random (see :func:`train`: the held-out years
hold solar cycles higher than any in the training years).  Predictions are mapped
back (``max(z * std + mean, 0) ** 2``) before any RMSE is taken, so every
number is in sunspot units.  Everything is seeded: the same options give the
same numbers on any number of threads.

Progress goes to stderr (redrawn in place on a terminal); the report to
stdout.  ``main`` returns the exit code.
"""

import argparse
import dataclasses
import importlib.util
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from . import _config, cells, init
from .analysis import gate_summary
from .datasets import load_sunspots
from .layers import layer_class
from .training import Adam, Linear, Readout, clip_grad_norm, mse_loss

__all__ = ["main", "add_arguments", "run", "make_windows", "Transform", "fit_autoregression"]

# Defaults, chosen on this data set (seed 0) to beat both baselines with a
# run that, compilation included, takes well under two minutes on 2 cores.
WINDOW = 24          # years of input: about two solar cycles
HOLDOUT = 58         # held-out target years: 1951-2008
EPOCHS = 100
HIDDEN = 32
LR = 1e-2
BATCH = 32
CLIP = 1.0
SCALE = (0.8, 1.25)  # amplitude jitter of the training windows (see train)
OUT = "fastgates_demo"
DESCRIPTION = ("Train an LSTM or GRU to forecast the yearly sunspot number, compare it "
               "with persistence and a linear autoregression, summarise its forget-gate "
               "time scales and plot them.")
PLOT_HINT = ('plots skipped: they need matplotlib; install it with\n'
             '  pip install "fastgates[demo]"   (or: pip install "matplotlib>=3.7")')


# --------------------------------------------------------------------------
# data


@dataclasses.dataclass(frozen=True)
class Transform:
    """``z = (sqrt(v) - mean) / std`` and back, with ``mean``/``std`` of training data.

    Attributes
    ----------
    mean, std : float
        Of ``sqrt(values)`` over the training years.
    """

    mean: float
    std: float

    @classmethod
    def fit(cls, values):
        """Fit on ``values`` (sunspot numbers, non-negative)."""
        root = np.sqrt(np.asarray(values, dtype=np.float64))
        return cls(float(root.mean()), float(root.std()))

    def forward(self, values):
        """Sunspot numbers to the standardised square-root scale."""
        return (np.sqrt(np.asarray(values, dtype=np.float64)) - self.mean) / self.std

    def inverse(self, z):
        """Back to sunspot numbers; negative square roots are clipped to 0."""
        root = np.asarray(z, dtype=np.float64) * self.std + self.mean
        return np.square(np.maximum(root, 0.0))


def make_windows(series, window):
    """All windows of ``window`` consecutive values and the value after each.

    Parameters
    ----------
    series : array_like
        ``(N,)`` values.
    window : int
        Steps per input window, ``1 <= window < N``.

    Returns
    -------
    x : ndarray
        ``(window, N - window, 1)`` time-major: ``x[:, n, 0]`` is
        ``series[n : n + window]``.
    y : ndarray
        ``(N - window, 1)``: ``y[n, 0] = series[n + window]``.
    """
    s = np.asarray(series)
    if s.ndim != 1 or not 1 <= window < s.size:
        raise ValueError(f"window must be in [1, len(series) - 1] = [1, {s.size - 1}] for a 1-D "
                         f"series, got window={window} and a series of shape {s.shape}")
    n = s.size - window
    index = np.arange(window)[:, None] + np.arange(n)[None, :]
    return s[index][:, :, None], s[window:, None]


def fit_autoregression(x, y):
    """Least-squares linear autoregression ``y ~ c + sum_k a_k x_k``.

    Parameters
    ----------
    x : ndarray
        ``(window, N, 1)`` windows, as from :func:`make_windows`.
    y : ndarray
        ``(N, 1)`` targets.

    Returns
    -------
    callable
        ``predict(x) -> (N', 1)`` for windows shaped like ``x``.
    """
    def design(xx):
        lags = xx[:, :, 0].T                        # (N, window)
        return np.hstack([lags, np.ones((lags.shape[0], 1))])

    coef, *_ = np.linalg.lstsq(design(x), y, rcond=None)
    return lambda xx: design(xx) @ coef


def rmse(a, b):
    """Root mean squared difference of two arrays, as a float."""
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))


# --------------------------------------------------------------------------
# progress


class TrainingBar:
    """One line of training progress on a stream (stderr by default).

    On a terminal the line is redrawn in place (``\\r``) at most ten times a
    second and ends with a newline in :meth:`close`; otherwise a line is
    written at every tenth of the epochs, so logs stay short.
    """

    def __init__(self, epochs, stream=None, width=24):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.epochs, self.width = epochs, width
        self.start = time.perf_counter()
        self._shown = 0
        self._last_draw = -math.inf
        self._every = max(1, epochs // 10)

    def _line(self, epoch, loss, note):
        done = int(self.width * epoch / self.epochs)
        bar = "#" * done + "." * (self.width - done)
        digits = len(str(self.epochs))
        text = f"epoch {epoch:>{digits}}/{self.epochs} [{bar}]"
        if loss is not None:
            text += f" loss {loss:.4f}"
        text += f"  {time.perf_counter() - self.start:5.1f} s"
        return text + (f"  {note}" if note else "")

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()

    def update(self, epoch, loss=None, note=""):
        """Show ``epoch`` of ``epochs`` done, with the latest training loss."""
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw < 0.1 and epoch < self.epochs and not note:
                return
            self._last_draw = now
            text = self._line(epoch, loss, note)
            # A line wider than the terminal would wrap, and \r could not redraw it.
            text = text[:max(shutil.get_terminal_size().columns - 1, 1)]
            pad = " " * max(self._shown - len(text), 0)
            self._write("\r" + text + pad)
            self._shown = len(text)
        elif note or epoch == self.epochs or epoch % self._every == 0:
            self._write(self._line(epoch, loss, note) + "\n")

    def close(self):
        """End the line (terminal only)."""
        if self.tty and self._shown:
            self._write("\n")
            self._shown = 0


# --------------------------------------------------------------------------
# the model


def build_model(cell, hidden, window, seed):
    """``Readout(<cell>(1, hidden), Linear(hidden, 1), mode="last")``, initialised.

    Recurrent weights orthogonal, input weights Xavier (:func:`fastgates.init.orthogonal`);
    the biases of the gate that keeps the state (and an LSTM's input gate)
    are then set by :func:`fastgates.init.chrono` with ``t_max = window``,
    so that the units start with memories spread over 1 to ``window`` steps.
    """
    rnn = layer_class(cell)(1, hidden, dtype=np.float32, seed=seed)
    init.orthogonal(rnn, seed=seed)
    init.chrono(rnn, window, seed=seed + 1)
    head = Linear(hidden, 1, dtype=np.float32, seed=seed + 2)
    return Readout(rnn, head, mode="last")


def train(model, x, y, *, epochs, lr, batch, seed, scale=SCALE, offset=0.0, bar=None):
    """Adam on the mean squared error: minibatches, amplitude jitter, clipping, cosine decay.

    Parameters
    ----------
    model : Readout
    x : ndarray
        ``(T, N, 1)`` windows, standardised square roots.
    y : ndarray
        ``(N, 1)`` targets, likewise.
    epochs, batch : int
    lr : float
        Initial learning rate, decayed along a half cosine to ``lr / 20``.
    seed : int
        Seed of the shuffling and of the jitter.
    scale : (float, float), default (0.8, 1.25)
        At every epoch each window and its target are multiplied, on the
        square-root scale, by a factor drawn uniformly from this range
        (``(1, 1)``: no jitter).  Solar cycles differ mostly in height, and
        the held-out years hold cycles higher than any before 1951: without
        the jitter the network only ever sees the training heights, saturates
        above them and under-predicts the peaks.
    offset : float, default 0.0
        ``mean / std`` of the :class:`Transform`: a factor ``a`` on the
        square roots is ``z -> a * z + (a - 1) * offset`` on the
        standardised scale.
    bar : TrainingBar, optional

    Returns
    -------
    list of float
        The mean training loss of each epoch (over its minibatches, jittered).
    """
    rng = np.random.default_rng(seed)
    opt = Adam(model, lr=lr)
    n = x.shape[1]
    low, high = scale
    offset = np.float32(offset)
    history = []
    for epoch in range(epochs):
        opt.lr = lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)))
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            a = rng.uniform(low, high, size=(idx.size, 1)).astype(np.float32)
            xb = a * x[:, idx] + (a - 1) * offset           # a broadcasts over (T, b, 1)
            yb = a * y[idx] + (a - 1) * offset
            out, pullback = model.vjp(xb)
            loss, dout = mse_loss(out, yb)
            _, grads = pullback(dout)
            grads, _ = clip_grad_norm(grads, CLIP)
            opt.step(grads)
            total += loss * idx.size
        history.append(total / n)
        if bar is not None:
            bar.update(epoch + 1, history[-1])
    return history


# --------------------------------------------------------------------------
# report


def _table(headers, rows):
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])]
                         + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in cells[1:]])


def _plots(out, summary, cell, years, values, prediction, split_year, sample_years):
    """Write the three PNGs; return their paths."""
    from . import plot   # imports matplotlib inside its functions only

    out.mkdir(parents=True, exist_ok=True)
    gate = cells.get(cell).forget_name
    first, last = sample_years
    paths = [
        plot.forget_heatmap(
            summary, out / "forget_heatmap.png", sample=summary.gates.shape[2] - 1,
            title=f"{cells.get(cell).label} {gate} of each unit over the last window,\n"
                  f"{first}-{last} (predicting {last + 1}; step 0 = {first})"),
        plot.timescale_histogram(
            summary, out / "timescales.png",
            title=f"Time scales of the {cells.get(cell).label}'s {gate}: {summary.timescale.size} units,\n"
                  f"held-out windows (1 step = 1 year)"),
        plot.prediction_plot(
            years, values, prediction, out / "prediction.png", split=split_year,
            labels=("yearly sunspot number", f"{cells.get(cell).label} one-year-ahead forecast"),
            xlabel="year", ylabel="sunspot number",
            title=f"Sunspots and the {cells.get(cell).label}'s forecast of each year from the "
                  f"{last - first + 1} before it (shaded: held out)"),
    ]
    return paths


def run(args):
    """Run the demo with parsed ``args``; return the exit code."""
    err = _check_args(args)
    if err:
        args._demo_parser.error(err)
    old_threads = _config.get_num_threads()
    if args.threads is not None:
        _config.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        _config.set_num_threads(old_threads)


def _check_args(args):
    import numba

    for name in ("epochs", "hidden", "window", "holdout", "batch"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1, got {getattr(args, name)}"
    if not args.lr > 0:
        return f"--lr must be positive, got {args.lr}"
    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        return (f"--threads {args.threads}: Numba was started with "
                f"{numba.config.NUMBA_NUM_THREADS} threads (NUMBA_NUM_THREADS); use 1 to "
                f"{numba.config.NUMBA_NUM_THREADS}")
    if args.window <= 2:
        return f"--window must be at least 3 (chrono initialisation), got {args.window}"
    n_years = load_sunspots()[0].size
    if n_years - args.window - args.holdout < 2:
        return (f"--window {args.window} and --holdout {args.holdout} leave "
                f"{n_years - args.window - args.holdout} training windows in the {n_years} "
                f"years; make them smaller")
    return None


def _run(args):
    t0 = time.perf_counter()
    years, values = load_sunspots()
    W, n_test = args.window, args.holdout
    n_train_targets = years.size - W - n_test       # checked: at least 2
    split = years.size - n_test                     # index of the first held-out year
    transform = Transform.fit(values[:split])       # training years only
    z = transform.forward(values)
    x, y = make_windows(z.astype(np.float32), W)    # target year of window n: years[n + W]
    x_train, y_train = x[:, :n_train_targets], y[:n_train_targets]
    x_test = x[:, n_train_targets:]
    cell = args.cell
    model = build_model(cell, args.hidden, W, args.seed)

    print(f"fastgates demo: forecasting the yearly sunspot number (seed {args.seed})")
    print(f"data: yearly mean sunspot numbers {years[0]}-{years[-1]} ({years.size} years; "
          "NOAA NGDC, public domain, as shipped by statsmodels)")
    print(f"task: predict each year from the {W} years before it; train on target years "
          f"{years[W]}-{years[split - 1]} ({n_train_targets} windows), hold out "
          f"{years[split]}-{years[-1]} ({n_test} years)")
    print(f"inputs: sqrt(sunspots), standardised with the mean and std of "
          f"{years[0]}-{years[split - 1]}")
    print(f"model: {model.rnn!r} -> {model.head!r} ({model.num_params} parameters); Adam lr "
          f"{args.lr:g} (cosine decay), {args.epochs} epochs, batch {args.batch}, heights "
          f"jittered x{SCALE[0]:g}-{SCALE[1]:g}, "
          f"{_config.get_num_threads()} threads")
    sys.stdout.flush()

    bar = TrainingBar(args.epochs)
    bar.update(0, note="(the first step compiles the kernels: ~50 s on an empty cache)")
    t_train = time.perf_counter()
    history = train(model, x_train, y_train, epochs=args.epochs, lr=args.lr, batch=args.batch,
                    seed=args.seed, scale=SCALE, offset=transform.mean / transform.std, bar=bar)
    bar.close()
    t_train = time.perf_counter() - t_train
    print(f"trained in {t_train:.1f} s (compilation included); final training loss "
          f"{history[-1]:.4f} (MSE on the standardised sqrt scale)")

    # One-step-ahead forecasts of every year after the first window.
    pred_z = model(x).astype(np.float64)
    pred = transform.inverse(pred_z[:, 0])
    truth = values[W:]
    ar = fit_autoregression(x_train.astype(np.float64), y_train.astype(np.float64))
    ar_pred = transform.inverse(ar(x.astype(np.float64))[:, 0])
    persistence = values[W - 1:-1]
    tr, te = slice(0, n_train_targets), slice(n_train_targets, None)
    rows = [(f"{cells.get(cell).label} (fastgates)", pred),
            (f"linear AR({W}), least squares", ar_pred),
            ("persistence (this year's value)", persistence)]
    scores = {name: (rmse(p[tr], truth[tr]), rmse(p[te], truth[te])) for name, p in rows}
    print()
    print("One-year-ahead RMSE in sunspot numbers (lower is better):")
    print(_table(["forecast", f"train {years[W]}-{years[split - 1]}",
                  f"held out {years[split]}-{years[-1]}"],
                 [[name, f"{a:.1f}", f"{b:.1f}"] for name, (a, b) in scores.items()]))
    ours, ar_te, pers_te = (s[1] for s in scores.values())
    verdict = []
    for name, other in (("persistence", pers_te), (f"AR({W})", ar_te)):
        word = "beats" if ours < other else "does not beat"
        verdict.append(f"{word} {name} by {abs(1 - ours / other):.0%}")
    print(f"held out, the {cells.get(cell).label} " + " and ".join(verdict) + ".")

    # How long the trained units remember, on the held-out windows.
    summary = gate_summary(model.rnn, x_test, horizon=W)
    tau = summary.timescale[0]
    with np.errstate(invalid="ignore"):    # inf - inf between two units that never forget
        q1, med, q3 = np.percentile(tau, [25, 50, 75])
    gate = cells.get(cell).forget_name
    print()
    print(f"Memory of the {args.hidden} units ({gate}, mean over the held-out windows; "
          f"time scale -1/ln(mean), in years):")
    print(f"  mean gate: median {np.median(summary.mean):.3f}, range "
          f"{summary.mean.min():.3f}-{summary.mean.max():.3f}")
    print(f"  time scale: median {med:.1f} years, quartiles {q1:.1f}-{q3:.1f}, longest "
          f"{tau.max():.1f}")
    print(f"  {summary.fraction_above[0]:.0%} of the units keep their memory longer than the "
          f"{W}-year window (time scale > {W})")

    print()
    if importlib.util.find_spec("matplotlib") is None:
        print(PLOT_HINT)
    else:
        prediction = np.full(values.shape, np.nan)
        prediction[W:] = pred
        first = years[split + n_test - W - 1]
        paths = _plots(pathlib.Path(args.out), summary, cell, years, values, prediction,
                       float(years[split]) - 0.5, (int(first), int(years[-2])))
        print(f"plots written to {os.path.abspath(args.out)}{os.sep}:")
        for path in paths:
            print(f"  {path.name}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------
# command line


def add_arguments(p):
    """Add the demo's options to an ArgumentParser (also used by ``__main__``)."""
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the shuffling (default 0)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help=f"hidden units (default {HIDDEN})")
    p.add_argument("--cell", choices=sorted(cells.REGISTRY), default="lstm",
                   help="recurrent cell (default lstm)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of the compiled kernels (default: fastgates' current setting)")
    p.add_argument("--out", default=OUT, metavar="DIR",
                   help=f"folder for the plots, created if needed (default ./{OUT}/)")
    p.add_argument("--window", type=int, default=WINDOW,
                   help=f"years of input before each forecast (default {WINDOW})")
    p.add_argument("--holdout", type=int, default=HOLDOUT,
                   help=f"last years held out from training (default {HOLDOUT})")
    p.add_argument("--lr", type=float, default=LR, help=f"Adam's initial learning rate (default {LR:g})")
    p.add_argument("--batch", type=int, default=BATCH, help=f"windows per minibatch (default {BATCH})")
    p.set_defaults(func=run, _demo_parser=p)
    return p


def main(argv=None, prog="python -m fastgates demo"):
    """Parse ``argv`` (default ``sys.argv[1:]``), run the demo, return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = add_arguments(argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
