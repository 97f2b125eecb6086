"""Conversion between fastgates models and Keras 3 ``LSTM``/``GRU`` layers.

This module imports Keras (any backend: only weights cross the boundary, as
NumPy arrays), so ``import fastgates`` does not import it; it is loaded by
``import fastgates.keras`` or by the first call of :func:`fastgates.from_keras`
or :func:`fastgates.to_keras`.

The two conventions, for hidden size ``H`` and input size ``I``:

========================  ==================================  ==================================
                          Keras 3                             fastgates / PyTorch
========================  ==================================  ==================================
input weights             ``kernel`` ``(I, G*H)``             ``weight_ih`` ``(G*H, I)``
recurrent weights         ``recurrent_kernel`` ``(H, G*H)``   ``weight_hh`` ``(G*H, H)``
LSTM gate order           i, f, c, o                          i, f, g, o (the same gates)
LSTM bias                 ``bias`` ``(4H,)``                  ``bias_ih + bias_hh``
GRU gate order            z, r, h                             r, z, n
GRU bias, reset_after     ``bias`` ``(2, 3H)``: input row,    ``bias_ih``, ``bias_hh``
                          recurrent row
GRU bias, reset before    ``bias`` ``(3H,)``                  ``bias_ih + bias_hh``
========================  ==================================  ==================================

Both GRUs update ``h' = z h + (1 - z) n``.  Where Keras has one bias and
fastgates two, Keras -> fastgates puts the bias in ``bias_ih`` and zeros in
``bias_hh``, and fastgates -> Keras adds the two.  See ``docs/interop_keras.md``
for exactly what a round trip preserves.
"""

import warnings

import keras
import numpy as np

from . import _validate as check
from .layers import GRU, LSTM, GRUCell, LSTMCell, refuse_without_counterpart

__all__ = ["from_keras", "from_keras_weights", "to_keras", "keras_weights"]

_GATES = {"lstm": 4, "gru": 3}
_MODEL_CLASSES = {"lstm": LSTM, "gru": GRU}
_CELL_CLASSES = {"lstm": LSTMCell, "gru": GRUCell}


# ---------------------------------------------------------------------------
# Layout: one direction of one layer, as plain arrays
# ---------------------------------------------------------------------------


def _gate_permutation(cell, H):
    """Column order turning Keras's gate blocks into PyTorch's (and back).

    LSTM: i, f, c, o in both.  GRU: Keras z, r, h against PyTorch r, z, n;
    swapping the first two blocks is its own inverse.
    """
    if cell == "lstm":
        return np.arange(4 * H)
    return np.concatenate([np.arange(H, 2 * H), np.arange(0, H), np.arange(2 * H, 3 * H)])


def _add_biases(b_ih, b_hh):
    """``b_ih + b_hh`` as fastgates folds it, keeping ``b_ih``'s bits where ``b_hh`` is 0.

    Where ``b_hh`` is zero the sum equals ``b_ih`` anyway, except that
    ``-0.0 + 0.0`` is ``+0.0``: keeping ``b_ih`` there makes Keras -> fastgates
    -> Keras return every bias bit for bit.
    """
    return np.where(b_hh == 0, b_ih, b_ih + b_hh)


def _direction_from_keras(cell, kernel, recurrent, bias, reset_after):
    """Keras ``(kernel, recurrent_kernel, bias or None)`` -> PyTorch ``(W_ih, W_hh, b_ih, b_hh)``."""
    H = recurrent.shape[0]
    perm = _gate_permutation(cell, H)
    w_ih = np.ascontiguousarray(kernel[:, perm].T)
    w_hh = np.ascontiguousarray(recurrent[:, perm].T)
    if bias is None:
        return w_ih, w_hh, None, None
    if cell == "gru" and reset_after:
        return w_ih, w_hh, bias[0, perm].copy(), bias[1, perm].copy()
    # One Keras bias: it sits where Keras adds it, with the input product.
    return w_ih, w_hh, bias[perm].copy(), np.zeros_like(bias)


def _direction_to_keras(cell, w_ih, w_hh, b_ih, b_hh, reset_after):
    """PyTorch ``(W_ih, W_hh, b_ih, b_hh)`` -> Keras ``[kernel, recurrent_kernel(, bias)]``."""
    H = w_hh.shape[1]
    perm = _gate_permutation(cell, H)
    weights = [np.ascontiguousarray(w_ih[perm].T), np.ascontiguousarray(w_hh[perm].T)]
    if b_ih is not None:
        if cell == "gru" and reset_after:
            weights.append(np.stack([b_ih[perm], b_hh[perm]]))
        else:
            weights.append(_add_biases(b_ih, b_hh)[perm])
    return weights


# ---------------------------------------------------------------------------
# Reading Keras layers
# ---------------------------------------------------------------------------


def _to_numpy(variable):
    """A Keras variable's value as a NumPy array, on any backend.

    Keras's torch backend converts with ``np.array(tensor)``, and a
    ``torch.Tensor.__array__`` without a ``copy`` keyword makes NumPy 2 emit a
    DeprecationWarning (the value is right all the same); only that warning is
    silenced, here only.  Callers copy what they keep (fancy indexing does).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        return np.asarray(keras.ops.convert_to_numpy(variable))


def _cell_kind(cell):
    if isinstance(cell, keras.layers.LSTMCell):
        return "lstm"
    if isinstance(cell, keras.layers.GRUCell):
        return "gru"
    return None


def _describe(layer):
    name = getattr(layer, "name", None)
    return f"{type(layer).__name__} {name!r}" if name else type(layer).__name__


def _check_cell(cell, where, allow_dropout):
    """Refuse what fastgates does not compute; return the cell's arrays."""
    if not any(cell.activation is f for f in (keras.activations.tanh, keras.ops.tanh)):
        raise NotImplementedError(
            f"{where}: activation={_activation_name(cell.activation)!r} is not supported; "
            "fastgates computes only activation='tanh'")
    if not any(cell.recurrent_activation is f for f in (keras.activations.sigmoid, keras.ops.sigmoid)):
        raise NotImplementedError(
            f"{where}: recurrent_activation={_activation_name(cell.recurrent_activation)!r} "
            "is not supported; fastgates computes only recurrent_activation='sigmoid'")
    for option in ("dropout", "recurrent_dropout"):
        value = getattr(cell, option, 0.0)
        if value and not allow_dropout:
            raise NotImplementedError(
                f"{where}: {option}={value} is not supported; fastgates has no dropout "
                f"(expected {option}=0). Keras applies it only in training, so for "
                "inference pass allow_dropout=True to convert the weights anyway")
    if not cell.built:
        raise ValueError(
            f"{where} is not built, so it has no weights yet: call it on data or "
            "build it first, e.g. layer.build((None, None, input_size))")
    kernel = _to_numpy(cell.kernel)
    recurrent = _to_numpy(cell.recurrent_kernel)
    bias = _to_numpy(cell.bias) if cell.use_bias else None
    return kernel, recurrent, bias


def _activation_name(fn):
    """Keras's name of a built-in activation (``"relu"``), else the function's full name."""
    name = getattr(fn, "__name__", None)
    try:
        if name and keras.activations.get(name) is fn:
            return name
    except ValueError:  # not the name of a Keras activation
        pass
    qualname = getattr(fn, "__qualname__", None)
    return f"{getattr(fn, '__module__', '?')}.{qualname}" if qualname else repr(fn)


def _read_rnn(layer, where, allow_dropout, backward=False):
    """One Keras ``RNN`` layer (``LSTM``, ``GRU``, ``RNN(LSTMCell)``...) -> description."""
    cell = layer.cell
    if isinstance(cell, keras.layers.StackedRNNCells):
        raise NotImplementedError(
            f"{where}: an RNN over StackedRNNCells is not supported; "
            "pass a list of LSTM/GRU layers for a stacked model")
    kind = _cell_kind(cell)
    if kind is None:
        raise TypeError(f"{where}: expected an LSTM or GRU layer, got an RNN over {_describe(cell)}")
    if bool(layer.go_backwards) != backward:
        if backward:
            raise NotImplementedError(
                f"{where}: the backward layer of a Bidirectional must have go_backwards=True, "
                "got False")
        raise NotImplementedError(
            f"{where}: go_backwards=True is not supported (a backward-only layer returns its "
            "outputs in reverse time order); expected go_backwards=False, or wrap the layer "
            "in keras.layers.Bidirectional for a backward direction")
    if layer.stateful:
        raise NotImplementedError(
            f"{where}: stateful=True is not supported (fastgates keeps no state between calls); "
            "expected stateful=False. Convert the weights with "
            "from_keras_weights(layer.get_weights(), ...) and pass the state explicitly")
    # return_sequences, return_state, unroll, use_cudnn and zero_output_for_mask
    # change what Keras returns or how it computes, not the recurrence.
    weights = _check_cell(cell, where, allow_dropout)
    return {"cell": kind, "units": cell.units, "use_bias": bool(cell.use_bias),
            "reset_after": bool(getattr(cell, "reset_after", True)), "directions": [weights]}


def _read_layer(layer, where, allow_dropout):
    """A Keras LSTM/GRU layer or a Bidirectional of one -> description."""
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat":
            raise NotImplementedError(
                f"{where}: merge_mode={layer.merge_mode!r} is not supported; fastgates "
                "concatenates the two directions (expected merge_mode='concat')")
        parts = []
        for sub, backward in ((layer.forward_layer, False), (layer.backward_layer, True)):
            if not isinstance(sub, keras.layers.RNN):
                raise TypeError(f"{where}: expected a Bidirectional of an LSTM or GRU layer, "
                                f"got one of {_describe(sub)}")
            parts.append(_read_rnn(sub, f"{where} ({'backward' if backward else 'forward'} "
                                        f"layer {sub.name!r})", allow_dropout, backward))
        forward, back = parts
        for key in ("cell", "units", "use_bias", "reset_after"):
            if forward[key] != back[key]:
                raise ValueError(
                    f"{where}: the forward and backward layers differ in {key} "
                    f"({forward[key]!r} and {back[key]!r}); fastgates needs them equal")
        forward["directions"] += back["directions"]
        return forward
    if isinstance(layer, keras.layers.RNN):
        return _read_rnn(layer, where, allow_dropout)
    raise TypeError(
        f"{where}: expected a keras.layers.LSTM or GRU layer (or an RNN of an LSTMCell/GRUCell, "
        f"or a Bidirectional of one), got {_describe(layer)}")


def _weights_dtype(arrays, dtype):
    if dtype is not None:
        return check.model_dtype(dtype)
    return np.dtype(np.float64) if arrays[0].dtype == np.float64 else np.dtype(np.float32)


# ---------------------------------------------------------------------------
# Building fastgates models
# ---------------------------------------------------------------------------


def _build_model(cell, layers, *, bidirectional, use_bias, reset_after, dtype, batch_first, where):
    """``layers``: per layer, per direction ``(kernel, recurrent, bias or None)`` in Keras's layout.

    Checks every shape against the first layer's sizes, then loads a model.
    """
    G = _GATES[cell]
    D = 2 if bidirectional else 1
    kernel0, recurrent0, _ = layers[0][0]
    if recurrent0.ndim != 2 or recurrent0.shape[1] != G * recurrent0.shape[0] or recurrent0.shape[0] == 0:
        raise ValueError(f"{where}: the recurrent kernel of layer 0 must have shape (H, {G}*H) for a "
                         f"{cell.upper()}, got {recurrent0.shape}")
    H = recurrent0.shape[0]
    if kernel0.ndim != 2 or kernel0.shape[0] == 0:
        raise ValueError(f"{where}: the kernel of layer 0 must have shape (input_size, {G}*H), "
                         f"got {kernel0.shape}")
    I = kernel0.shape[0]
    if cell == "gru" and reset_after:
        bias_shape = (2, G * H)
    else:
        bias_shape = (G * H,)
    state = {}
    for k, directions in enumerate(layers):
        in_size = I if k == 0 else D * H
        for d, (kernel, recurrent, bias) in enumerate(directions):
            label = f"layer {k}" + (", backward direction" if d == 1 else "")
            expected = [("kernel", kernel, (in_size, G * H)), ("recurrent kernel", recurrent, (H, G * H))]
            if use_bias:
                expected.append(("bias", bias, bias_shape))
            for what, arr, shape in expected:
                if arr.shape != shape:
                    hint = ""
                    if what == "bias" and cell == "gru":
                        hint = (f" (a GRU with reset_after={reset_after} has a bias of shape "
                                f"{bias_shape})")
                    elif what == "kernel" and k > 0:
                        hint = f" (layer {k} reads the {D}*H features of layer {k - 1})"
                    raise ValueError(f"{where}: the {what} of {label} must have shape {shape}, "
                                     f"got {arr.shape}{hint}")
            suffix = f"_l{k}" + ("_reverse" if d == 1 else "")
            w_ih, w_hh, b_ih, b_hh = _direction_from_keras(cell, kernel, recurrent, bias, reset_after)
            state["weight_ih" + suffix] = w_ih
            state["weight_hh" + suffix] = w_hh
            if use_bias:
                state["bias_ih" + suffix] = b_ih
                state["bias_hh" + suffix] = b_hh
    options = dict(bias=use_bias, batch_first=batch_first, bidirectional=bidirectional, dtype=dtype)
    if cell == "gru":
        options["reset_after"] = reset_after
    # seed=0 only avoids drawing entropy: every parameter is replaced below.
    model = _MODEL_CLASSES[cell](I, H, len(layers), seed=0, **options)
    model.load_state_dict(state)
    return model


def _cell_from_keras(cell, dtype, allow_dropout):
    where = f"from_keras: {_describe(cell)}"
    kind = _cell_kind(cell)
    kernel, recurrent, bias = _check_cell(cell, where, allow_dropout)
    reset_after = bool(getattr(cell, "reset_after", True))
    dtype = _weights_dtype([kernel], dtype)
    w_ih, w_hh, b_ih, b_hh = _direction_from_keras(kind, kernel, recurrent, bias, reset_after)
    options = {"bias": bias is not None, "dtype": dtype}
    if kind == "gru":
        options["reset_after"] = reset_after
    model = _CELL_CLASSES[kind](kernel.shape[0], cell.units, seed=0, **options)
    state = {"weight_ih": w_ih, "weight_hh": w_hh}
    if bias is not None:
        state.update(bias_ih=b_ih, bias_hh=b_hh)
    model.load_state_dict(state)
    return model


def from_keras(layer_or_layers, *, dtype=None, batch_first=True, allow_dropout=False):
    """Build the fastgates model computing what Keras layer(s) compute.

    Parameters
    ----------
    layer_or_layers : keras layer or list of keras layers
        A built ``keras.layers.LSTM`` or ``keras.layers.GRU`` (or a
        ``keras.layers.RNN`` over an ``LSTMCell``/``GRUCell``), a
        ``keras.layers.Bidirectional`` of one with ``merge_mode="concat"``,
        or a list of these read as a stack: layer ``k`` reads the output
        sequence of layer ``k - 1`` (all of one cell type, size, bias and
        direction count).  A bare ``keras.layers.LSTMCell``/``GRUCell``
        gives a :class:`fastgates.LSTMCell`/:class:`fastgates.GRUCell`.
    dtype : {None, np.float32, np.float64}
        The model's dtype; ``None`` means float64 for float64 Keras weights
        and float32 otherwise.
    batch_first : bool, default True
        Layout of the model's ``x`` and ``y``.  The default takes Keras's
        batch-major ``(B, T, I)`` arrays unchanged.  Ignored for a cell.
    allow_dropout : bool, default False
        Convert layers with ``dropout`` or ``recurrent_dropout`` > 0.  Keras
        applies dropout only in training, so the converted model matches the
        layer in inference; fastgates never applies dropout.

    Returns
    -------
    LSTM or GRU or LSTMCell or GRUCell
        For a GRU, ``reset_after`` is the layer's.

    Raises
    ------
    TypeError
        If a layer is not one of those above.
    NotImplementedError
        Naming the option, for what fastgates does not compute: an activation
        other than ``tanh`` or a recurrent activation other than ``sigmoid``,
        ``dropout``/``recurrent_dropout`` > 0 (unless ``allow_dropout``),
        ``go_backwards=True`` outside a ``Bidirectional``, ``stateful=True``,
        a ``merge_mode`` other than ``"concat"``, ``StackedRNNCells``.
    ValueError
        If a layer is not built, or the layers of a list do not stack.

    Notes
    -----
    Initializers, regularizers, constraints and ``unit_forget_bias`` act only
    when Keras initialises or trains and are not carried over;
    ``return_sequences``, ``return_state``, ``unroll`` and ``use_cudnn`` do not
    change the recurrence (fastgates always returns the whole sequence and
    the final state).  Keras's mask of right-padded steps corresponds to the
    model's ``lengths`` argument.

    Examples
    --------
    >>> import keras, numpy as np, fastgates as fg  # doctest: +SKIP
    >>> layer = keras.layers.Bidirectional(keras.layers.GRU(5, return_sequences=True))
    >>> x = np.ones((2, 7, 3), np.float32)  # Keras's (B, T, I)
    >>> y_keras = layer(x)  # builds the layer
    >>> m = fg.from_keras(layer)
    >>> m
    GRU(3, 5, batch_first=True, bidirectional=True, dtype=float32)
    >>> y, h = m(x)  # y (2, 7, 10), like y_keras; h (2, 2, 5)
    """
    check.boolean(batch_first, "batch_first")
    check.boolean(allow_dropout, "allow_dropout")
    if isinstance(layer_or_layers, (keras.layers.LSTMCell, keras.layers.GRUCell)):
        return _cell_from_keras(layer_or_layers, dtype, allow_dropout)
    if isinstance(layer_or_layers, (list, tuple)):
        layers = list(layer_or_layers)
        if not layers:
            raise ValueError("from_keras: layer_or_layers is an empty list; expected at least one layer")
        wheres = [f"from_keras: layer_or_layers[{k}] ({_describe(layer)})" for k, layer in enumerate(layers)]
    else:
        layers = [layer_or_layers]
        wheres = [f"from_keras: {_describe(layer_or_layers)}"]
    described = [_read_layer(layer, where, allow_dropout) for layer, where in zip(layers, wheres)]
    first = described[0]
    bidirectional = len(first["directions"]) == 2
    for k, desc in enumerate(described[1:], start=1):
        for key, value in (("cell", first["cell"]), ("units", first["units"]),
                           ("use_bias", first["use_bias"]), ("reset_after", first["reset_after"]),
                           ("bidirectional", bidirectional)):
            got = len(desc["directions"]) == 2 if key == "bidirectional" else desc[key]
            if key == "reset_after" and first["cell"] != "gru":
                continue
            if got != value:
                raise ValueError(
                    f"{wheres[k]}: every layer of a stack must have the same {key} as layer 0 "
                    f"({value!r}), got {got!r}")
    dtype = _weights_dtype(first["directions"][0], dtype)
    return _build_model(first["cell"], [desc["directions"] for desc in described],
                        bidirectional=bidirectional, use_bias=first["use_bias"],
                        reset_after=first["reset_after"], dtype=dtype, batch_first=batch_first,
                        where="from_keras")


def from_keras_weights(weights, cell, *, bidirectional=False, reset_after=None, dtype=None,
                       batch_first=True):
    """Build a fastgates model from raw Keras weight arrays.

    Parameters
    ----------
    weights : list of array_like, or list of such lists
        What ``layer.get_weights()`` returns for a Keras LSTM/GRU layer:
        ``[kernel, recurrent_kernel, bias]`` (``bias`` left out without bias);
        for a ``Bidirectional``, the forward layer's list followed by the
        backward layer's.  A list of such lists (one per layer, in order)
        is a stacked model.  Sizes are read from the shapes.
    cell : {"lstm", "gru"}
        The Keras layer type.
    bidirectional : bool, default False
        Whether each list holds a forward and a backward direction.
    reset_after : bool or None
        GRU only.  ``None`` reads it from the bias shape (``(2, 3H)``: True,
        ``(3H,)``: False); it must be given for a GRU without bias.
    dtype : {None, np.float32, np.float64}
        As for :func:`from_keras`.
    batch_first : bool, default True
        As for :func:`from_keras`.

    Returns
    -------
    LSTM or GRU

    Raises
    ------
    ValueError
        If the number or shapes of the arrays do not fit ``cell``,
        ``bidirectional`` and ``reset_after``.
    TypeError
        If ``cell`` is not a string or an array is not real floating point.

    Examples
    --------
    >>> from fastgates.keras import from_keras_weights  # doctest: +SKIP
    >>> m = from_keras_weights(layer.get_weights(), "gru")
    """
    where = "from_keras_weights"
    if not isinstance(cell, str) or cell.lower() not in _GATES:
        raise (ValueError if isinstance(cell, str) else TypeError)(
            f"{where}: cell must be 'lstm' or 'gru', got {cell!r}")
    cell = cell.lower()
    check.boolean(bidirectional, "bidirectional")
    check.boolean(batch_first, "batch_first")
    if reset_after is not None:
        check.boolean(reset_after, "reset_after")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"{where}: weights must be a non-empty list of arrays (or of lists of arrays), "
                        f"got {type(weights).__name__}")
    stacked = all(isinstance(w, (list, tuple)) for w in weights)
    per_layer = list(weights) if stacked else [weights]
    D = 2 if bidirectional else 1
    layers = []
    use_bias = None
    for k, arrays in enumerate(per_layer):
        label = f"weights[{k}]" if stacked else "weights"
        if not isinstance(arrays, (list, tuple)) or len(arrays) not in (2 * D, 3 * D):
            n = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
            raise ValueError(
                f"{where}: {label} must hold {3 * D} arrays (kernel, recurrent_kernel, bias"
                + (", forward then backward" if bidirectional else "")
                + f") or {2 * D} without bias, got {n}")
        has_bias = len(arrays) == 3 * D
        if use_bias is None:
            use_bias = has_bias
        elif has_bias != use_bias:
            raise ValueError(f"{where}: {label} has {'a' if has_bias else 'no'} bias but "
                             f"weights[0] has {'one' if use_bias else 'none'}; every layer must agree")
        n = 3 if has_bias else 2
        arrays = [np.asarray(a) for a in arrays]
        for j, arr in enumerate(arrays):
            if arr.dtype.kind != "f":
                raise TypeError(f"{where}: {label}[{j}] must hold real floating-point numbers, "
                                f"got dtype {arr.dtype}")
        directions = []
        for d in range(D):
            part = arrays[d * n:(d + 1) * n]
            directions.append((part[0], part[1], part[2] if has_bias else None))
        layers.append(directions)
    if cell == "gru":
        if use_bias:
            inferred = layers[0][0][2].ndim == 2
            if reset_after is None:
                reset_after = inferred
            elif reset_after != inferred:
                shape = layers[0][0][2].shape
                raise ValueError(
                    f"{where}: reset_after={reset_after} but the GRU bias has shape {shape}; "
                    f"expected (2, 3H) for reset_after=True and (3H,) for reset_after=False")
        elif reset_after is None:
            raise ValueError(
                f"{where}: reset_after cannot be read from a GRU without bias; pass "
                "reset_after=True (Keras's default) or reset_after=False")
    else:
        reset_after = True
    dtype = _weights_dtype([layers[0][0][0]], dtype)
    return _build_model(cell, layers, bidirectional=bidirectional, use_bias=use_bias,
                        reset_after=reset_after, dtype=dtype, batch_first=batch_first, where=where)


# ---------------------------------------------------------------------------
# Writing Keras layers
# ---------------------------------------------------------------------------


def _model_kind(model, where):
    refuse_without_counterpart(model, "Keras", f"{where}: ")
    for kind, classes in (("lstm", (LSTM, LSTMCell)), ("gru", (GRU, GRUCell))):
        if isinstance(model, classes):
            return kind, isinstance(model, classes[1])
    raise TypeError(f"{where}: model must be a fastgates LSTM, GRU, LSTMCell or GRUCell, "
                    f"got {type(model).__name__}")


def _check_variant(model, where):
    """Keras's LSTM/GRU have none of ONNX's variants: refuse them by name."""
    used = [f"{name}={value!r}" for name, value in (
        ("reverse", getattr(model, "reverse", False)),
        ("clip", None if model.clip == float("inf") else model.clip),
        ("peephole", model.peephole), ("input_forget", model.input_forget),
        ("proj_size", getattr(model, "proj_size", 0))) if value]
    if used:
        raise NotImplementedError(
            f"{where}: Keras's LSTM/GRU have no equivalent of the fastgates option(s) "
            f"{', '.join(used)} (go_backwards also reverses the output sequence)")


def _per_direction(model, where):
    """Keras weight lists: one per layer, each forward's arrays then backward's."""
    kind, is_cell = _model_kind(model, where)
    _check_variant(model, where)
    p = model.state_dict()
    if is_cell:
        suffixes = [[""]]
    else:
        suffixes = [[f"_l{k}" + ("_reverse" if d == 1 else "") for d in range(model.num_directions)]
                    for k in range(model.num_layers)]
    out = []
    for layer in suffixes:
        arrays = []
        for s in layer:
            arrays += _direction_to_keras(kind, p["weight_ih" + s], p["weight_hh" + s],
                                          p.get("bias_ih" + s), p.get("bias_hh" + s),
                                          model.reset_after)
        out.append(arrays)
    return kind, is_cell, out


def keras_weights(model):
    """The Keras weight arrays of a fastgates model.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell or GRUCell

    Returns
    -------
    list of ndarray, or list of lists of ndarray
        For a one-layer model (or a cell), what ``get_weights()`` returns for
        the layer :func:`to_keras` builds: ``[kernel, recurrent_kernel, bias]``
        (no bias without bias), forward then backward for a bidirectional
        model; for a stacked model, one such list per layer.  Arrays are in
        the model's dtype.  An LSTM's bias (and a ``reset_after=False`` GRU's)
        is ``bias_ih + bias_hh``.
    """
    _, is_cell, per_layer = _per_direction(model, "keras_weights")
    return per_layer[0] if is_cell or model.num_layers == 1 else per_layer


def _keras_dtype(dtype, model):
    if dtype is None:
        return model.dtype.name
    try:
        return np.dtype(dtype).name
    except TypeError:  # a Keras dtype policy or a policy name such as "mixed_float16"
        return dtype


def _assign(cell, arrays):
    variables = [cell.kernel, cell.recurrent_kernel] + ([cell.bias] if cell.use_bias else [])
    for variable, value in zip(variables, arrays, strict=True):
        variable.assign(value)


def to_keras(model, *, return_sequences=True, return_state=False, dtype=None, name=None):
    """Build Keras layer(s) computing what a fastgates model computes.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell or GRUCell
    return_sequences : bool, default True
        Passed to the Keras layer (to the last one of a stack; the others
        always return sequences, to feed the next).
    return_state : bool, default False
        Passed to every Keras layer: each returns its own final state(s),
        forward then backward, after its output.
    dtype : dtype, str, keras.DTypePolicy or None
        The Keras layers' dtype; ``None`` means the model's.
    name : str or None
        Name of the Keras layer (``name_l{k}`` for layer ``k`` of a stack).

    Returns
    -------
    keras layer or list of keras layers
        Built and loaded: a ``keras.layers.LSTM`` or ``keras.layers.GRU``
        (with ``reset_after`` the model's) with the default activations,
        wrapped in ``keras.layers.Bidirectional`` (``merge_mode="concat"``)
        for a bidirectional model; a list of them, one per layer, for a
        stacked model; a ``keras.layers.LSTMCell``/``GRUCell`` for a cell.
        Keras layers take batch-major ``(B, T, I)`` input whatever the
        model's ``batch_first``.

    Notes
    -----
    An LSTM (or ``reset_after=False`` GRU) has one Keras bias, which holds
    ``bias_ih + bias_hh`` as fastgates itself adds them: converting back
    gives a model whose ``bias_ih`` is that sum and ``bias_hh`` zero, whose
    outputs are bitwise those of ``model`` (see ``docs/interop_keras.md``).

    Examples
    --------
    >>> layers = fg.to_keras(fg.LSTM(3, 5, num_layers=2, seed=0))  # doctest: +SKIP
    >>> model = keras.Sequential([keras.Input((None, 3)), *layers])
    >>> y = model(np.ones((2, 7, 3), np.float32))  # (2, 7, 5)
    """
    where = "to_keras"
    kind, is_cell, per_layer = _per_direction(model, where)
    return_sequences = check.boolean(return_sequences, "return_sequences")
    return_state = check.boolean(return_state, "return_state")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"{where}: name must be a string or None, got {type(name).__name__}")
    keras_dtype = _keras_dtype(dtype, model)
    options = {"use_bias": model.bias, "dtype": keras_dtype}
    if kind == "gru":
        options["reset_after"] = model.reset_after
    H = model.hidden_size
    if is_cell:
        cls = keras.layers.LSTMCell if kind == "lstm" else keras.layers.GRUCell
        cell = cls(H, name=name, **options)
        cell.build((None, model.input_size))
        _assign(cell, per_layer[0])
        return cell
    cls = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    D = model.num_directions
    out = []
    for k, arrays in enumerate(per_layer):
        layer_name = name if name is None or model.num_layers == 1 else f"{name}_l{k}"
        last = k == model.num_layers - 1
        rnn = cls(H, return_sequences=return_sequences or not last, return_state=return_state,
                  **options, **({} if D == 2 else {"name": layer_name}))
        in_size = model.input_size if k == 0 else D * H
        if D == 2:
            # The wrapper needs the dtype too: it casts both directions'
            # outputs to its own compute dtype.
            layer = keras.layers.Bidirectional(rnn, merge_mode="concat", dtype=keras_dtype,
                                               name=layer_name)
            layer.build((None, None, in_size))
            n = len(arrays) // 2
            _assign(layer.forward_layer.cell, arrays[:n])
            _assign(layer.backward_layer.cell, arrays[n:])
        else:
            layer = rnn
            layer.build((None, None, in_size))
            _assign(layer.cell, arrays)
        out.append(layer)
    return out[0] if model.num_layers == 1 else out
