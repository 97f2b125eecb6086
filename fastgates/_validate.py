"""Argument checking and normalisation.

Every public entry point passes its arguments through here before any kernel
runs.  The checks are Python but for the scan for NaN and inf
(:func:`all_finite`, compiled).  A check either returns a C-contiguous array of
the model's dtype (a copy when the input needs converting; the caller's array
is never written to) or raises ``TypeError`` (wrong kind of value) or
``ValueError`` (wrong shape, size or range) with a message naming the
argument, what was given and what was expected.
"""

import operator

import numpy as np

from ._config import jit

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# Sizes above this are refused: no layer of that width fits in memory, and a
# clear error beats a MemoryError (or an overflow) while allocating.
MAX_SIZE = 2**31 - 1


def positive_int(value, name, minimum=1, maximum=MAX_SIZE):
    """Return ``value`` as an ``int``, checking that it is an integer in [minimum, maximum]."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def seed(value, name="seed"):
    """Return ``value`` as a seed of ``np.random.default_rng``.

    ``None``, an integer >= 0, or a ``np.random.Generator`` (which
    :mod:`fastgates.init` hands on, and ``default_rng`` returns as it is).
    Checked here so that a bad seed raises ``TypeError`` or ``ValueError``
    naming it (NumPy's own errors do not, and NumPy takes ``True`` and
    arrays of integers as seeds, which ``seed : int or None`` does not
    promise).
    """
    if value is None or isinstance(value, np.random.Generator):
        return value
    return positive_int(value, name, minimum=0, maximum=np.inf)


def boolean(value, name):
    """Return ``value`` as a ``bool``, accepting only Python or NumPy booleans."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def clip_bound(value, name="clip"):
    """Return ``value`` as a positive finite ``float``, or ``inf`` for ``None``."""
    if value is None:
        return np.inf
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive number or None, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0 < value < np.inf):
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
    return value


def real(value, name):
    """Return ``value`` as a finite ``float``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def probability(value, name):
    """Return ``value`` as a ``float`` in ``[0, 1]``."""
    value = real(value, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def model_dtype(dtype):
    """Return the model dtype, which must be float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be np.float32 or np.float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be np.float32 or np.float64, got {dt}")
    return dt


def as_float_array(value, name, dtype, allow_int=False):
    """Convert ``value`` to a C-contiguous array of ``dtype``, keeping its shape.

    Only real floating-point input is accepted (and integers, when
    ``allow_int``): ``None``, booleans, complex numbers, objects, strings,
    datetimes and ragged nested lists raise.  Any byte order and memory layout
    is accepted (a copy is made when converting); the caller's array is
    returned unchanged when it already has the right dtype and layout and is
    writeable, and is never written to.  A read-only array is copied: Numba
    types read-only arrays apart, so handing one to the kernels would
    compile each of them again (about 25 s for an LSTM's, measured) to save
    a copy of the input.  A 0-d input stays 0-d (the caller's rank check
    then names it).

    Raises
    ------
    TypeError
        For ``None`` or a value that is not real numbers.
    ValueError
        If ``value`` cannot be made into an array (ragged nesting).
    """
    if value is None:
        raise TypeError(f"{name} must be an array of floats, got None")
    if (type(value) is np.ndarray and value.dtype == dtype and value.flags.c_contiguous
            and value.flags.writeable):
        return value            # nothing to convert (about 1 us saved in a tiny call)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{name} could not be converted to an array of numbers: {exc}") from None
    if arr.dtype.kind != "f" and not (allow_int and arr.dtype.kind in "iu"):
        raise TypeError(
            f"{name} must hold real floating-point numbers, got dtype {arr.dtype}"
            " (convert it with .astype(np.float32) or np.float64 explicitly)"
        )
    # np.asarray, not np.ascontiguousarray, which would turn a 0-d array 1-D.
    # A value beyond the range of ``dtype`` becomes inf, as every cast does;
    # the finite checks then name it, so NumPy's warning would only repeat it.
    with np.errstate(over="ignore"):
        out = np.asarray(arr, dtype=dtype, order="C")
    return out if out.flags.writeable else out.copy()


def finite(arr, name, valid=None, minus_inf=False):
    """Raise ``ValueError`` if ``arr`` holds NaN or inf where it is read.

    Parameters
    ----------
    arr : ndarray
        Floating-point array; with ``valid``, its first two axes are
        ``(T, B)`` (time-major).
    name : str
        The argument's name, for the message.
    valid : (T, B) bool ndarray, optional
        The steps that are read; NaN or inf elsewhere (padding) is allowed.
    minus_inf : bool, default False
        ``-inf`` is a legitimate value (a state listed in the cell's
        ``minus_inf``); NaN and ``+inf`` are still refused.
    """
    if arr.flags.c_contiguous and arr.dtype in FLOAT_DTYPES and all_finite(arr.reshape(-1)):
        return
    ok = np.isfinite(arr)
    if minus_inf:
        ok |= arr == -np.inf
    if ok.all():
        return
    if valid is not None:
        ok |= ~valid.reshape(valid.shape + (1,) * (arr.ndim - 2))
        if ok.all():
            return
    where = tuple(int(i) for i in np.argwhere(~ok)[0])
    what = "NaN" if np.isnan(arr[where]) else "inf"
    at = f" at a valid step, time-major index {where} (step, sequence, ...)" if valid is not None else f" at index {where}"
    raise ValueError(
        f"{name} must be finite, got {what}{at} (values beyond the model dtype's range count as inf); "
        "pass check_finite=False to let NaN and inf propagate"
    )


@jit()
def all_finite(a):
    """Whether the 1-D array ``a`` holds no NaN and no inf.

    One vectorised pass without a temporary: ``v - v`` is 0 for a finite
    ``v`` and NaN otherwise.  Measured against ``np.isfinite(a).all()``:
    32 values 0.4 against 1.4 us, 819,200 values 37 against 66 us.
    """
    ok = True
    for i in range(a.shape[0]):
        ok &= (a[i] - a[i]) == 0
    return ok


def valid_steps(lengths, steps):
    """The ``(T, B)`` mask of valid steps, or ``None`` when every step is valid."""
    if lengths.min() == steps:
        return None
    return np.arange(steps)[:, None] < lengths[None, :]


def sequence(x, input_size, dtype, batch_first):
    """Check ``x`` and return it time-major as ``(T, B, I)``, with ``batched``.

    Returns
    -------
    x3 : (T, B, I) C-contiguous array of ``dtype``
    batched : bool
        False when ``x`` was a 2-D ``(T, I)`` unbatched sequence.
    """
    arr = as_float_array(x, "x", dtype)
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"x must be 3-D {layout} or 2-D (T, I) for one unbatched sequence, "
            f"got {arr.ndim}-D with shape {arr.shape}"
        )
    if arr.shape[-1] != input_size:
        raise ValueError(f"x must have input_size={input_size} features in its last axis, got shape {arr.shape}")
    batched = arr.ndim == 3
    given = arr.shape
    if not batched:
        arr = arr[:, None, :]
    elif batch_first:
        arr = np.ascontiguousarray(arr.transpose(1, 0, 2))
    T, B, _ = arr.shape
    # T = 0 and B = 0 are refused (docs/guarantees.md says why): with no
    # step there is no last valid step (1 <= lengths <= T cannot hold), and
    # an empty batch is nearly always an upstream bug (an empty split or
    # filter) that an empty result would hide.
    if T == 0:
        raise ValueError(f"x must have at least one time step (T >= 1), got shape {given}")
    if B == 0:
        raise ValueError(f"x must have at least one sequence in its batch (B >= 1), got shape {given}")
    return arr, batched


def state_array(value, name, num, batch, hidden, batched, dtype, fill=0.0):
    """Check one state array, returning it as ``(num, B, H)``; ``None`` means ``fill`` (zeros)."""
    if value is None:
        return _filled((num, batch, hidden), dtype, fill)
    arr = as_float_array(value, name, dtype)
    expected = (num, batch, hidden) if batched else (num, hidden)
    if arr.shape != expected:
        what = "(num_layers * num_directions, B, H)" if batched else "(num_layers * num_directions, H)"
        raise ValueError(f"{name} must have shape {what} = {expected}, got {arr.shape}")
    if not batched:
        arr = arr[:, None, :]
    return arr


def state_parts(value, name, cell, prefix=""):
    """The parts of a state (or, with ``prefix="d"``, of its gradient) of ``cell``.

    Returns ``(values, names)``: one value per state of the cell (``None``
    everywhere for ``None``) and the name each is checked under.  A cell
    with one state takes the array itself; with more, a tuple of them.
    """
    states = cell.states
    if len(states) == 1:
        return (value,), (name,)
    names = tuple(f"{name}[{j}] ({prefix}{s})" for j, s in enumerate(states))
    if value is None:
        return (None,) * len(states), names
    if not isinstance(value, (tuple, list)) or len(value) != len(states):
        article = "an" if cell.label[0].upper() in "AEFHILMNORSX" else "a"
        parts = ", ".join(prefix + s for s in states)
        raise TypeError(f"{name} of {article} {cell.label} must be a tuple ({parts}) or None, "
                        f"got {type(value).__name__}")
    return tuple(value), names


def _filled(shape, dtype, fill):
    if fill == 0:
        return np.zeros(shape, dtype=dtype)
    return np.full(shape, fill, dtype=dtype)


def state_tuple(state, cell, num, batch, widths, batched, dtype, name="state"):
    """Check the state of ``cell`` (see :func:`state_parts`); ``None`` means its initial state.

    ``widths``: the width of each state array (``Cell.state_units``).  A
    state not given (``None``, or a part of it ``None``) holds the cell's
    :meth:`~fastgates.cells.base.Cell.initial_value` (zeros but for an
    sLSTM's ``m``, ``-inf``).  Returns a tuple of ``(num, B, width)``
    arrays, one per state of the cell.
    """
    if state is None:
        return tuple([_filled((num, batch, w), dtype, cell.initial_value(j))
                      for j, w in enumerate(widths)])
    values, names = state_parts(state, name, cell)
    return tuple([state_array(v, n, num, batch, w, batched, dtype, cell.initial_value(j))
                  for j, (v, n, w) in enumerate(zip(values, names, widths))])


def integer_array(value, name, expected):
    """``value`` as an integer array, or a ValueError/TypeError naming ``name``.

    Booleans, floats (even integral ones, and NaN), objects and strings
    raise ``TypeError`` ("``name`` must be ``expected``, got dtype ...").
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{name} could not be converted to an array of integers: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be {expected}, got dtype {arr.dtype}")
    return arr


def lengths_array(lengths, batch, steps, batched):
    """Check ``lengths`` and return it as an int64 array ``(B,)``.

    Only integer arrays are accepted: booleans, floats (even integral ones,
    and NaN), objects and strings raise ``TypeError``.
    """
    if lengths is None:
        arr = np.empty(batch, dtype=np.int64)
        arr.fill(steps)             # np.full costs 0.5 us more in a tiny call
        return arr
    if not batched:
        raise ValueError("lengths must be None for unbatched 2-D x (slice x to the length you want)")
    arr = integer_array(lengths, "lengths", "an array of integers")
    if arr.shape != (batch,):
        raise ValueError(f"lengths must have shape (B,) = ({batch},), one per sequence, got {arr.shape}")
    low, high = arr.min(), arr.max()
    if low < 1 or high > steps:
        raise ValueError(f"lengths must lie in [1, T] = [1, {steps}], got values from {low} to {high}")
    return arr.astype(np.int64)


def gradient(value, name, shape, dtype):
    """Check a cotangent (``dy``, ``dstate``) of the given shape; ``None`` means zeros."""
    if value is None:
        return np.zeros(shape, dtype=dtype)
    arr = as_float_array(value, name, dtype)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, like the value it is the gradient of, got {arr.shape}")
    return arr
