"""PNG plots of gate analyses and predictions (needs matplotlib: ``pip install "fastgates[plot]"``).

matplotlib is imported inside each function, so ``import fastgates`` (and
``import fastgates.plot``) never imports it.  Figures are drawn with the Agg
backend on a ``matplotlib.figure.Figure`` of their own, never through
``pyplot``: nothing is displayed, no global backend or pyplot state of the
caller changes (an interactive session keeps its backend), and each figure is
released when the function returns.  Every function writes one PNG file and
returns its path.
"""

import os
import pathlib

import numpy as np

from .analysis import GateSummary

__all__ = ["forget_heatmap", "timescale_histogram", "prediction_plot"]

_INSTALL_HINT = 'fastgates\' plots need matplotlib: install it with pip install "fastgates[plot]"'
_GATE_LABEL = {"f": "forget gate f", "z": "update gate z (GRU: fraction of h kept)"}


def _figure(figsize):
    """A new Agg-backed Figure, outside pyplot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    path = pathlib.Path(os.fspath(path))
    try:
        fig.savefig(path, format="png")
    finally:
        fig.clear()  # the figure is not in pyplot: dropping its artists closes it
    return path


def _check_path(path):
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}") from None


def _index(value, name, size, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not -size <= value < size:
        raise ValueError(f"{name} must index one of the {size} {what} (0 to {size - 1}), got {value}")
    return int(value) % size


def _heatmap_input(summary_or_gates):
    """``(gates (K, T, B, H), mask (T, B) or None, gate name, layer labels or None)``."""
    if isinstance(summary_or_gates, GateSummary):
        s = summary_or_gates
        return s.gates, s.mask, s.gate, s.names
    gate = "f"
    value = summary_or_gates
    if hasattr(value, "keys"):
        gate = next((k for k in ("f", "z") if k in value), None)
        if gate is None:
            raise ValueError("summary_or_gates must be a GateSummary, the dict of model.gates() (with a "
                             f"key 'f' or 'z') or a gate array, got a mapping with keys {list(value.keys())}")
        value = value[gate]
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"summary_or_gates must hold real gate values, got dtype {arr.dtype}")
    if arr.ndim == 3:  # unbatched: (K, T, H)
        arr = arr[:, :, None, :]
    if arr.ndim != 4:
        raise ValueError("summary_or_gates must be a GateSummary, a dict of gates or an array (K, T, B, H) "
                         f"or (K, T, H), got an array of shape {arr.shape}")
    return arr, None, gate, None


def _describe(name):
    """"l1_reverse" -> "layer 1, reverse direction"."""
    layer, _, reverse = name[1:].partition("_")
    return f"layer {layer}" + (", reverse direction" if reverse else "")


def forget_heatmap(summary_or_gates, path, *, layer=0, sample=0, cmap="viridis", title=None):
    """Draw one sequence's forget gates as a heat map: time across, units up.

    Parameters
    ----------
    summary_or_gates : GateSummary, dict or ndarray
        A :func:`~fastgates.gate_summary` result, the dict of
        ``model.gates(x)`` (its ``"f"``, or ``"z"`` for a GRU), or one gate
        array ``(K, T, B, H)`` (``(K, T, H)`` for an unbatched sequence).
    path : str or os.PathLike
        Where to write the PNG.
    layer : int, default 0
        Layer-direction index ``k * D + d`` (PyTorch's state order): for a
        bidirectional model 0 is layer 0 forward, 1 layer 0 backward.
    sample : int, default 0
        Sequence of the batch.
    cmap : str, default "viridis"
        A matplotlib colour map; the colour scale is fixed to ``[0, 1]``.
    title : str, optional

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    With a GateSummary, the padded steps of the sequence (``t >=
    lengths[sample]``) are shown blank (light grey) and marked; a raw array
    carries no lengths, so its padded steps show their stored 0.
    """
    path = _check_path(path)
    gates, mask, gate, names = _heatmap_input(summary_or_gates)
    K, T, B, H = gates.shape
    k = _index(layer, "layer", K, "layer-directions")
    b = _index(sample, "sample", B, "sequences of the batch")
    values = np.asarray(gates[k, :, b, :], dtype=np.float64).T  # (H, T)
    valid = T if mask is None else int(np.count_nonzero(mask[:, b]))
    if valid < T:
        values = np.ma.masked_array(values, mask=np.broadcast_to(~mask[:, b], values.shape))

    fig = _figure((max(6.0, min(14.0, 3.0 + 0.12 * T)), max(3.5, min(9.0, 2.0 + 0.15 * H))))
    ax = fig.add_subplot()
    import matplotlib  # available: _figure succeeded

    colours = matplotlib.colormaps.get_cmap(cmap).with_extremes(bad="0.85")
    im = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap=colours,
                   vmin=0.0, vmax=1.0, extent=(-0.5, T - 0.5, -0.5, H - 0.5))
    if valid < T:
        ax.axvline(valid - 0.5, color="black", linestyle="--", linewidth=1.0)
        ax.text(valid - 0.5 + 0.3, H - 0.5, f" padding (length {valid})", va="top", ha="left", fontsize=8)
    label = _GATE_LABEL.get(gate, gate)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("unit")
    if H <= 20:
        ax.set_yticks(range(H))
    where = _describe(names[k]) if names is not None else f"layer-direction {k}"
    ax.set_title(title if title is not None else f"{label.split(' (')[0].capitalize()}: {where}, sequence {b}")
    return _save(fig, path)


def timescale_histogram(summary, path, *, horizon=None, bins=30, title=None):
    """Draw the distribution of the units' forget time scales, on a log axis.

    Parameters
    ----------
    summary : GateSummary
        A :func:`~fastgates.gate_summary` result; every layer-direction is
        drawn, stacked, one colour each.
    path : str or os.PathLike
        Where to write the PNG.
    horizon : float, optional
        Marked by a vertical line, with the fraction of units beyond it;
        default ``summary.horizon``.
    bins : int, default 30
        Logarithmically spaced bins.
    title : str, optional

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    Time scales of 0 (mean gate 0) or ``inf`` (mean gate 1) cannot sit on a
    log axis: they are counted in the legend instead.
    """
    if not isinstance(summary, GateSummary):
        raise TypeError(f"summary must be a GateSummary (from fastgates.gate_summary), got {type(summary).__name__}")
    path = _check_path(path)
    if isinstance(bins, (bool, np.bool_)) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if horizon is None:
        horizon = summary.horizon
    elif isinstance(horizon, (bool, np.bool_)) or not isinstance(horizon, (int, float, np.integer, np.floating)) \
            or not float(horizon) > 0:
        raise ValueError(f"horizon must be a positive number of steps or None, got {horizon!r}")
    horizon = float(horizon)

    tau = np.asarray(summary.timescale, dtype=np.float64)  # (K, H)
    finite = np.isfinite(tau) & (tau > 0)
    shown = tau[finite]
    if shown.size:
        lo, hi = shown.min(), shown.max()
    else:
        lo = hi = horizon
    lo, hi = min(lo, horizon), max(hi, horizon)
    edges = np.geomspace(lo / 1.5, hi * 1.5, int(bins) + 1)

    fig = _figure((7.5, 4.5))
    ax = fig.add_subplot()
    data = [tau[k][finite[k]] for k in range(tau.shape[0])]
    ax.hist(data, bins=edges, stacked=True, label=list(summary.names), edgecolor="white", linewidth=0.5)
    ax.set_xscale("log")
    beyond = np.mean(tau > horizon)
    ax.axvline(horizon, color="black", linestyle="--", linewidth=1.5,
               label=f"horizon {horizon:g} steps ({beyond:.0%} of units beyond)")
    n_inf = int(np.count_nonzero(np.isinf(tau)))
    n_zero = int(np.count_nonzero(tau == 0))
    if n_inf or n_zero:
        ax.plot([], [], " ", label=f"not shown: {n_inf} never forget (f = 1), {n_zero} with f = 0")
    ax.set_xlabel(f"time scale -1/ln(mean {summary.gate}) (steps, log scale)")
    ax.set_ylabel("units")
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))   # units are counted
    ax.legend(fontsize=8)
    gate = "forget gate" if summary.gate == "f" else "update gate z"
    ax.set_title(title if title is not None else
                 f"Memory time scales of the {gate} ({tau.size} units, T = {summary.num_steps})")
    return _save(fig, path)


def prediction_plot(t, data, prediction, path, *, split=None, labels=("data", "prediction"), title=None,
                    xlabel="t", ylabel="value"):
    """Draw data and a model's prediction against time, with the held-out part shaded.

    Parameters
    ----------
    t : array_like
        ``(N,)`` time values, increasing.
    data, prediction : array_like
        ``(N,)`` or ``(N, C)`` for ``C`` channels, same shape; NaN leaves a
        gap (e.g. a prediction that starts late).
    path : str or os.PathLike
        Where to write the PNG.
    split : float, optional
        The value of ``t`` where the held-out region starts: everything from
        there to the end is shaded and a vertical line marks it.  ``None``:
        nothing is held out.
    labels : (str, str), default ("data", "prediction")
        Legend labels of the data and the prediction.
    title, xlabel, ylabel : str

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = _check_path(path)
    tt = np.asarray(t)
    if tt.dtype.kind not in "fiu" or tt.ndim != 1 or tt.size == 0:
        raise ValueError(f"t must be a non-empty 1-D array of real numbers, got dtype {tt.dtype}, shape {tt.shape}")
    arrays = {}
    for name, value in (("data", data), ("prediction", prediction)):
        arr = np.asarray(value)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[0] != tt.size:
            raise ValueError(f"{name} must have shape (N,) or (N, C) with N = len(t) = {tt.size}, got {np.shape(value)}")
        arrays[name] = arr
    if arrays["data"].shape != arrays["prediction"].shape:
        raise ValueError(f"data and prediction must have the same shape, got {np.shape(data)} and {np.shape(prediction)}")
    if not isinstance(labels, (tuple, list)) or len(labels) != 2:
        raise ValueError(f"labels must be a pair (data label, prediction label), got {labels!r}")
    if split is not None and (isinstance(split, (bool, np.bool_))
                              or not isinstance(split, (int, float, np.integer, np.floating))):
        raise TypeError(f"split must be a time value (a number) or None, got {type(split).__name__} {split!r}")

    fig = _figure((9.0, 4.5))
    ax = fig.add_subplot()
    C = arrays["data"].shape[1]
    for c in range(C):
        colour = f"C{c}"
        suffix = f" [{c}]" if C > 1 else ""
        ax.plot(tt, arrays["data"][:, c], color=colour, linewidth=1.6, label=f"{labels[0]}{suffix}")
        ax.plot(tt, arrays["prediction"][:, c], color="C3" if C == 1 else colour, linestyle="--",
                linewidth=1.6, label=f"{labels[1]}{suffix}")
    if split is not None:
        end = float(np.nanmax(tt))
        ax.axvspan(float(split), max(end, float(split)), color="0.5", alpha=0.18, label="held out")
        ax.axvline(float(split), color="0.3", linestyle=":", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(float(np.nanmin(tt)), float(np.nanmax(tt)))
    ax.legend(fontsize=8, loc="best")
    if title is not None:
        ax.set_title(title)
    else:
        ax.set_title(f"{labels[0].capitalize()} and {labels[1]}" + (" (shaded: held out)" if split is not None else ""))
    return _save(fig, path)

