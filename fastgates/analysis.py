"""How long a trained model remembers: forget gates and their time scales.

A unit whose forget gate holds a constant value ``f`` keeps ``f**t`` of its
memory after ``t`` steps, i.e. ``exp(-t / tau)`` with ``tau = -1 / ln f``:
:func:`timescale` is that ``tau``, in steps.  :func:`gate_summary` runs a
model over a batch (:meth:`fastgates.LSTM.gates`) and reports, for every
layer, direction and unit, the mean forget gate and its time scale, and how
the gate moves along the sequence; :mod:`fastgates.plot` draws them.

For a GRU the gate that keeps the state is the update gate ``z``
(``h' = (1 - z) * n + z * h``, the gate order r, z, n of PyTorch): it plays
the forget gate's part here.
"""

import dataclasses

import numpy as np

from .layers import _Recurrent

__all__ = ["GateSummary", "gate_summary", "timescale"]

def timescale(f):
    """The time scale ``-1 / ln f`` of a forget gate ``f``, in steps.

    A memory multiplied by ``f`` at every step shrinks by a factor ``e``
    over this many steps: ``f = 0.9`` gives about 9.49 steps.  It is 0 at
    ``f = 0`` (forgets at once) and ``inf`` at ``f = 1`` (never forgets),
    without warnings.

    Parameters
    ----------
    f : float or array_like
        Gate values in ``[0, 1]`` (NaN passes through).

    Returns
    -------
    float or ndarray
        Same shape as ``f``; float64, or ``f``'s dtype when it is a float
        array.

    Raises
    ------
    TypeError
        If ``f`` is not real numbers.
    ValueError
        If a value lies outside ``[0, 1]``.

    Examples
    --------
    >>> import fastgates as fg
    >>> round(float(fg.timescale(0.9)), 2)
    9.49
    """
    arr = np.asarray(f)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"f must be real gate values in [0, 1], got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    bad = (arr < 0) | (arr > 1)
    if np.any(bad):
        raise ValueError(f"f must lie in [0, 1] (a gate value), got {arr[bad].ravel()[:5].tolist()}"
                         f"{' ...' if np.count_nonzero(bad) > 5 else ''}")
    with np.errstate(divide="ignore"):  # ln 0 = -inf is wanted: it gives tau = 0
        log_f = np.log(arr)
    out = np.full(arr.shape, np.inf, dtype=arr.dtype)
    np.divide(-1, log_f, out=out, where=log_f != 0)  # ln 1 = 0: tau = inf
    return out[()] if out.ndim == 0 else out


@dataclasses.dataclass(frozen=True, eq=False)
class GateSummary:
    """The forget gates of a model over one batch, summarised per unit and step.

    ``K = L*D`` layer-directions in PyTorch's order (layer-major, forward
    direction first), ``T`` steps, ``B`` sequences (1 for an unbatched
    ``x``), ``H`` units.  Statistics are float64 and average over valid
    steps only (``t < lengths[b]``); arrays are read-only.

    Attributes
    ----------
    cell : str
        The cell's name: ``"lstm"``, ``"gru"``, ``"janet"``, ``"mgu"``.
    gate : str
        What is summarised, the fraction of the state each step keeps:
        ``"f"`` for an LSTM and JANET, ``"z"`` (the update gate) for a GRU,
        ``"1 - f"`` for an MGU (whose gate ``f`` lets the candidate in).
    names : tuple of str
        ``K`` labels of the layer-directions, e.g. ``("l0", "l0_reverse")``.
    gates : ndarray
        ``(K, T, B, H)``, the model's dtype: the kept fractions at every
        step (the gate's values, ``1 - f`` for an MGU; time-major whatever
        ``batch_first`` is), 0 at padded steps.
    lengths : ndarray
        ``(B,)`` int64: valid steps of each sequence.
    mask : ndarray
        ``(T, B)`` bool: True at valid steps.
    mean : ndarray
        ``(K, H)``: each unit's gate averaged over all valid steps of all
        sequences.
    timescale : ndarray
        ``(K, H)``: ``timescale(mean)``, in steps (``inf`` where the mean is 1).
    horizon : float
        The horizon, in steps, that ``fraction_above`` compares with.
    fraction_above : ndarray
        ``(K,)``: fraction of the units of each layer-direction whose time
        scale exceeds ``horizon``.
    step_mean : ndarray
        ``(K, T)``: the gate averaged over units and the sequences valid at
        each step, i.e. how the gate moves along the sequence; NaN at steps
        no sequence reaches.
    """

    cell: str
    gate: str
    names: tuple
    gates: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray
    mean: np.ndarray
    timescale: np.ndarray
    horizon: float
    fraction_above: np.ndarray
    step_mean: np.ndarray

    @property
    def num_steps(self):
        """``T``, the padded sequence length."""
        return self.gates.shape[1]

    @property
    def hidden_size(self):
        """``H``, units per layer-direction."""
        return self.gates.shape[3]


def _horizon(horizon, default):
    if horizon is None:
        return float(default)
    if isinstance(horizon, (bool, np.bool_)) or not isinstance(horizon, (int, float, np.integer, np.floating)):
        raise TypeError(f"horizon must be a positive number of steps or None, got {type(horizon).__name__} {horizon!r}")
    horizon = float(horizon)
    if not horizon > 0 or np.isnan(horizon):
        raise ValueError(f"horizon must be a positive number of steps, got {horizon!r}")
    return horizon


def gate_summary(model, x, state=None, lengths=None, *, horizon=None):
    """Run ``model`` over ``x`` and summarise its forget gates (GRU: update gates).

    Parameters
    ----------
    model : LSTM, GRU, JANET or MGU
        Any fastgates recurrent layer: what is read is the fraction of the
        state its cell keeps at a step (``GateSummary.gate``).
    x, state, lengths :
        As for :meth:`fastgates.LSTM.__call__` (``lengths`` respected: padded
        steps count nowhere).
    horizon : float, optional
        Steps that ``fraction_above`` compares time scales with; default the
        padded sequence length ``T``.

    Returns
    -------
    GateSummary

    Raises
    ------
    TypeError
        If ``model`` is not a fastgates recurrent layer (cells have no sequence
        to summarise), or ``horizon`` is not a number.
    ValueError
        For a bad ``x``, ``state`` or ``lengths`` (as the model's own checks)
        or a ``horizon`` that is not positive.
    """
    if not isinstance(model, _Recurrent):
        raise TypeError(f"model must be a fastgates recurrent layer (LSTM, GRU, JANET, MGU, SLSTM), "
                        f"got {type(model).__name__}")
    spec = model._spec
    gate = spec.forget
    horizon_arg = horizon
    if horizon is not None:  # check it before running the model
        _horizon(horizon, 1)
    g = model.gates(x, state, lengths)[gate]
    if g.ndim == 3:  # unbatched x: (K, T, H)
        g = g[:, :, None, :]
    K, T, B, H = g.shape
    lengths = np.full(B, T, dtype=np.int64) if lengths is None else np.asarray(lengths).astype(np.int64)
    mask = np.arange(T)[:, None] < lengths[None, :]
    if spec.forget_complement:
        # the kept fraction is 1 - gate (0 again at padded steps)
        g = np.where(mask[None, :, :, None], 1 - g, g.dtype.type(0))
        gate = f"1 - {gate}"

    g64 = g.astype(np.float64)
    weight = mask.astype(np.float64)[None, :, :, None]
    mean = np.sum(g64 * weight, axis=(1, 2)) / np.count_nonzero(mask)
    per_step = np.sum(g64 * weight, axis=(2, 3))  # (K, T)
    count = np.count_nonzero(mask, axis=1) * H  # (T,)
    step_mean = np.full((K, T), np.nan)
    np.divide(per_step, count[None, :], out=step_mean, where=count[None, :] > 0)
    # Exact averages of values in [0, 1] can still leave [0, 1] by one ulp.
    mean = np.clip(mean, 0.0, 1.0)
    tau = timescale(mean)
    horizon = _horizon(horizon_arg, T)

    D = 2 if model.bidirectional else 1
    names = tuple(f"l{k // D}" + ("_reverse" if k % D else "") for k in range(K))
    fields = {"gates": np.ascontiguousarray(g), "lengths": lengths, "mask": mask, "mean": mean,
              "timescale": tau, "fraction_above": np.mean(tau > horizon, axis=1), "step_mean": step_mean}
    for value in fields.values():
        value.flags.writeable = False
    return GateSummary(cell=model._cell, gate=gate, names=names, horizon=horizon, **fields)
