"""The public layers: ``LSTM``, ``GRU``, ``LSTMCell`` and ``GRUCell``.

Parameters are NumPy arrays with PyTorch's names, shapes and gate order, so a
``state_dict`` moves between fastgates and ``torch.nn`` unchanged.  Each
public method validates its arguments in Python (:mod:`fastgates._validate`),
then runs the compiled recurrence (:mod:`fastgates._recurrent`).
"""

import warnings

import numpy as np

from . import _recurrent, cells
from . import _validate as check

__all__ = ["LSTM", "GRU", "JANET", "MGU", "SLSTM", "LSTMCell", "GRUCell", "flatten_params",
           "unflatten_params"]

# The parameters every cell has, by base name (a cell may add its own:
# Cell.params); the keys of the driver's per-direction weight dicts.
_BASES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

# More parameters than this (8 GiB in float32) is taken for a mistake in the
# sizes rather than attempted.
_MAX_PARAMS = 2**31


def _init_params(shapes, hidden_size, dtype, seed):
    """PyTorch's default initialisation: every entry uniform in (-1/sqrt(H), 1/sqrt(H)).

    Drawn in float64 from ``np.random.default_rng(seed)`` in the order of
    ``shapes``, then rounded to ``dtype``, so a seed gives the same model in
    both dtypes (up to that rounding).
    """
    total = sum(int(np.prod(shape, dtype=object)) for shape in shapes.values())
    if total > _MAX_PARAMS:
        raise ValueError(f"the sizes given ask for {total} parameters {dict(shapes)}; "
                         f"at most {_MAX_PARAMS} are supported")
    rng = np.random.default_rng(check.seed(seed))
    bound = 1.0 / np.sqrt(hidden_size)
    try:
        return {name: rng.uniform(-bound, bound, size=shape).astype(dtype) for name, shape in shapes.items()}
    except MemoryError:
        raise ValueError(f"the sizes given ask for {total} parameters {dict(shapes)}, "
                         "more than fit in memory") from None


class _FlatParams:
    """``set_flat_params`` and ``num_params`` for any model with ``_shapes``,
    ``dtype`` and ``load_state_dict`` (layers, cells, ``Linear``, ``Readout``)."""

    def set_flat_params(self, v, *, check_finite=True):
        """Set every parameter from one 1-D array laid out as :meth:`get_flat_params`.

        Parameters
        ----------
        v : array_like
            ``(num_params,)`` real numbers; converted to the model's dtype.
        check_finite : bool, default True
            Refuse NaN and inf (as :meth:`load_state_dict`).

        Raises
        ------
        ValueError
            If ``v`` is not 1-D of the right length, or holds NaN or inf
            with ``check_finite``.
        TypeError
            If ``v`` holds booleans, complex numbers, objects or strings.
        """
        check_finite = check.boolean(check_finite, "check_finite")
        self.load_state_dict(unflatten_params(self, v), check_finite=check_finite)

    @property
    def num_params(self):
        """The number of parameter entries (the length of :meth:`get_flat_params`)."""
        return sum(int(np.prod(shape)) for shape in self._shapes.values())


class _Parameters(_FlatParams):
    """Named parameter arrays with PyTorch's names: shared by layers and cells."""

    def _setup_params(self, shapes, seed):
        self._shapes = shapes
        self._set_params(_init_params(shapes, self.hidden_size, self.dtype, seed))

    def _set_params(self, params):
        # Parameters are read-only: they change only through load_state_dict,
        # so what the kernels derive from them (transposed and blocked
        # weights, folded biases) can be computed once and kept in _derived.
        for value in params.values():
            value.flags.writeable = False
        self._params = params
        self._derived = _recurrent.Derived()

    def __getattr__(self, name):
        # m.weight_ih_l0 etc.: the parameter itself, read-only (change
        # parameters with load_state_dict).
        params = self.__dict__.get("_params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def state_dict(self):
        """Return the parameters as a ``dict`` of array copies, keyed as in PyTorch.

        Returns
        -------
        dict of str to ndarray
        """
        return {name: value.copy() for name, value in self._params.items()}

    def get_flat_params(self):
        """Return every parameter in one 1-D array (a copy).

        The order is that of :meth:`state_dict`, each array flattened in C
        order: the vector ``scipy.optimize`` works on.

        Returns
        -------
        ndarray
            ``(num_params,)`` in the model's dtype.
        """
        return flatten_params(self, self._params)

    def load_state_dict(self, state_dict, *, check_finite=True):
        """Replace the parameters by those in ``state_dict``.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Exactly the keys of :meth:`state_dict`, each convertible by
            ``np.asarray`` to an array of the same shape holding real floats
            or integers.  Values are copied and converted to the model's dtype
            (after the conversion, so a float64 value too large for a float32
            model counts as inf).
        check_finite : bool, default True
            Refuse parameters holding NaN or inf.  With ``False`` they are
            loaded and propagate through every result, as in PyTorch.

        Raises
        ------
        ValueError
            Listing every missing key, unexpected key, wrong shape and (with
            ``check_finite``) value holding NaN or inf; nothing is loaded
            then.
        TypeError
            If ``state_dict`` is not a mapping or a value holds booleans,
            complex numbers, objects or strings.
        """
        loaded = checked_state_dict(self._shapes, state_dict, self.dtype, check_finite)
        self._set_params({name: np.array(loaded[name], dtype=self.dtype, copy=True) for name in self._shapes})


def checked_state_dict(shapes, state_dict, dtype, check_finite):
    """``state_dict`` checked against ``shapes`` and converted to ``dtype``.

    Every problem is collected (missing and unexpected keys, wrong shapes,
    with ``check_finite`` NaN or inf) and raised together as one
    ``ValueError``, so that a caller loads all or nothing.

    Returns
    -------
    dict of str to ndarray
        In the order of ``shapes`` (arrays may be the caller's own: copy
        before keeping them).
    """
    if not hasattr(state_dict, "keys"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    check_finite = check.boolean(check_finite, "check_finite")
    problems = []
    missing = [k for k in shapes if k not in state_dict]
    unexpected = [k for k in state_dict.keys() if k not in shapes]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    loaded = {}
    for name, shape in shapes.items():
        if name not in state_dict:
            continue
        arr = check.as_float_array(state_dict[name], f"state_dict[{name!r}]", dtype, allow_int=True)
        if arr.shape != shape:
            problems.append(f"{name!r} must have shape {shape}, got {arr.shape}")
        elif check_finite and not np.isfinite(arr).all():
            problems.append(f"{name!r} must be finite, got NaN or inf (pass check_finite=False to load it)")
        loaded[name] = arr
    if problems:
        raise ValueError(f"load_state_dict: {'; '.join(problems)}")
    return loaded


def flatten_params(model, params):
    """Concatenate a dict keyed like ``model.state_dict()`` into one 1-D array.

    Use it for gradients (``dparams`` of a pullback), so that they line up
    with :meth:`~LSTM.get_flat_params`.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell, GRUCell or any fastgates model with parameters
    params : mapping of str to array_like
        Exactly the keys of ``model.state_dict()``, with the same shapes.

    Returns
    -------
    ndarray
        ``(model.num_params,)`` in the model's dtype.

    Raises
    ------
    ValueError
        Naming missing or unexpected keys and wrong shapes.
    TypeError
        If ``params`` is not a mapping or a value holds booleans, complex
        numbers, objects or strings.
    """
    shapes = model._shapes
    if not hasattr(params, "keys"):
        raise TypeError(f"params must be a mapping of names to arrays, got {type(params).__name__}")
    missing = [k for k in shapes if k not in params]
    unexpected = [k for k in params.keys() if k not in shapes]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    parts = []
    for name, shape in shapes.items():
        if name in params:
            arr = check.as_float_array(params[name], f"params[{name!r}]", model.dtype, allow_int=True)
            if arr.shape != shape:
                problems.append(f"{name!r} must have shape {shape}, got {arr.shape}")
            parts.append(arr.reshape(-1))
    if problems:
        raise ValueError(f"flatten_params: {'; '.join(problems)}")
    return np.concatenate(parts).astype(model.dtype, copy=False) if parts else np.empty(0, model.dtype)


def unflatten_params(model, v):
    """Split a 1-D array laid out as ``model.get_flat_params()`` into a dict.

    Parameters
    ----------
    model : fastgates model
    v : array_like
        ``(model.num_params,)`` real numbers.

    Returns
    -------
    dict of str to ndarray
        Keyed and shaped like ``model.state_dict()``, in the model's dtype
        (copies).
    """
    arr = check.as_float_array(v, "v", model.dtype, allow_int=True)
    n = sum(int(np.prod(shape)) for shape in model._shapes.values())
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"v must be a 1-D array of the model's {n} parameters, got shape {arr.shape}")
    out, start = {}, 0
    for name, shape in model._shapes.items():
        size = int(np.prod(shape))
        out[name] = arr[start:start + size].reshape(shape).copy()
        start += size
    return out


def _second_stream(seed):
    """A generator from ``seed`` that does not repeat the parameters' draws."""
    seed = check.seed(seed)
    if isinstance(seed, np.random.Generator):
        return seed.spawn(1)[0]
    return np.random.default_rng(None if seed is None else [seed, 1])


class _Recurrent(_Parameters):
    _cell = None      # the cell's registry name ("lstm"): what users and files see
    _spec = None      # its Cell (fastgates.cells): everything that differs between cells

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dtype=np.float32, seed=None, reset_after=True,
                 reverse=False, clip=None, peephole=False, input_forget=False, dropout=0.0,
                 proj_size=0):
        self.input_size = check.positive_int(input_size, "input_size")
        self.hidden_size = check.positive_int(hidden_size, "hidden_size")
        self.num_layers = check.positive_int(num_layers, "num_layers")
        self.bias = check.boolean(bias, "bias")
        self.batch_first = check.boolean(batch_first, "batch_first")
        self.bidirectional = check.boolean(bidirectional, "bidirectional")
        self.reset_after = check.boolean(reset_after, "reset_after")
        self.reverse = check.boolean(reverse, "reverse")
        if self.reverse and self.bidirectional:
            raise ValueError("reverse=True is a one-direction model reading backwards; "
                             "it cannot be combined with bidirectional=True")
        self.clip = check.clip_bound(clip)
        self.peephole = check.boolean(peephole, "peephole")
        self.input_forget = check.boolean(input_forget, "input_forget")
        self.proj_size = check.positive_int(proj_size, "proj_size", minimum=0)
        if self.proj_size:
            if self.proj_size >= self.hidden_size:
                raise ValueError(f"proj_size must be smaller than hidden_size={self.hidden_size} "
                                 f"(as torch.nn.LSTM), got {self.proj_size}")
            used = [f"{name}={value!r}" for name, value in (
                ("clip", clip), ("peephole", self.peephole), ("input_forget", self.input_forget))
                if value not in (None, False)]
            if used:
                raise ValueError(f"proj_size={self.proj_size} cannot be combined with "
                                 f"{', '.join(used)}: the projected LSTM is PyTorch's, which has "
                                 "neither clipping, peepholes nor a coupled forget gate")
        self.dropout = check.probability(dropout, "dropout")
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(f"dropout={self.dropout} acts between layers, and a model with "
                          "num_layers=1 has none: it will not drop anything (as torch.nn.LSTM)",
                          UserWarning, stacklevel=3)
        self.dtype = check.model_dtype(dtype)
        self._setup_params(self._param_shapes(), seed)
        # The dropout masks' own generator (vjp's rng=None), from the seed's
        # second stream: the parameters' draws do not depend on it.
        self._generator = _second_stream(seed)

    @property
    def num_directions(self):
        """2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    def _param_shapes(self):
        D = self.num_directions
        options = self._options()
        out = self._spec.state_units(self.hidden_size, options)[0]
        shapes = {}
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else D * out
            for d in range(D):
                suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
                for base, shape in self._spec.param_shapes(in_size, self.hidden_size, options,
                                                           self.bias).items():
                    shapes[base + suffix] = shape
        if self.peephole:
            # Last, so that the other parameters of a seed do not change.
            for s in self._suffixes():
                shapes["weight_peep" + s] = (3, self.hidden_size)
        return shapes

    def _options(self):
        """The options the cell reads (its kernels, its memory formula), by name."""
        return {"reset_after": self.reset_after, "input_forget": self.input_forget,
                "peephole": self.peephole, "proj_size": self.proj_size}

    def _widths(self):
        """The width of each state array: ``hidden_size`` (``h`` of an LSTM with
        ``proj_size``: that).  Fixed for the model's life; kept on it (a tiny
        call counts every microsecond)."""
        widths = self.__dict__.get("_state_widths")
        if widths is None:
            widths = self._state_widths = self._spec.state_units(self.hidden_size,
                                                                 self._options())
        return widths

    def _variant(self):
        variant = self._derived.get("variant")
        if variant is None:
            variant = self._derived["variant"] = _recurrent.Variant(
                self.reverse, self.clip, **self._options())
        return variant

    def _suffixes(self):
        # Kept on the model (the layer count and directions never change);
        # not in _derived, which the constructor has not made yet when it
        # asks for the peephole parameters' names.
        suffixes = self.__dict__.get("_suffix_list")
        if suffixes is None:
            suffixes = self._suffix_list = [
                f"_l{layer}" + ("_reverse" if d == 1 else "")
                for layer in range(self.num_layers) for d in range(self.num_directions)]
        return suffixes

    def _weights(self):
        weights = self._derived.get("weights")
        if weights is None:
            weights = self._derived["weights"] = [
                _direction_params(self._params, self._spec, s) for s in self._suffixes()]
        return weights

    # -- argument handling -------------------------------------------------

    def _prepare(self, x, state, lengths, check_finite):
        check_finite = check.boolean(check_finite, "check_finite")
        x3, batched = check.sequence(x, self.input_size, self.dtype, self.batch_first)
        T, B, _ = x3.shape
        num = self.num_layers * self.num_directions
        s0 = check.state_tuple(state, self._spec, num, B, self._widths(), batched, self.dtype)
        given = lengths is not None
        lengths = check.lengths_array(lengths, B, T, batched)
        if check_finite:
            # Padded steps are never read, so NaN there is allowed.
            check.finite(x3, "x", check.valid_steps(lengths, T) if given else None)
            # A state of None is zeros made here (about 3 us a check saved
            # in a tiny call).
            if state is not None:
                spec = self._spec
                for value, name, kind in zip(s0, check.state_parts(state, "state", spec)[1],
                                             spec.states):
                    check.finite(value, name, minus_inf=kind in spec.minus_inf)
        return x3, batched, s0, lengths

    def _seq_out(self, y, batched):
        """Time-major (T, B, F) to the caller's layout."""
        if not batched:
            return y[:, 0, :]
        if self.batch_first:
            return np.ascontiguousarray(y.transpose(1, 0, 2))
        return y

    def _seq_in(self, dy, batched, T, B, F, name):
        """A cotangent in the caller's layout to time-major (T, B, F)."""
        if not batched:
            return check.gradient(dy, name, (T, F), self.dtype)[:, None, :]
        if self.batch_first:
            arr = check.gradient(dy, name, (B, T, F), self.dtype)
            return np.ascontiguousarray(arr.transpose(1, 0, 2))
        return check.gradient(dy, name, (T, B, F), self.dtype)

    def _state_out(self, state, batched):
        """A state tuple (L*D, B, H) each to the caller's form (one array for one state)."""
        if not batched:
            state = tuple([s[:, 0, :] for s in state])
        return state[0] if len(state) == 1 else state

    def _run(self, x, state, lengths, keep, check_finite=True, checkpoint=None, masks=None):
        x3, batched, s0, lengths = self._prepare(x, state, lengths, check_finite)
        if callable(masks):
            masks = masks(x3.shape[0], x3.shape[1])
        y, sn, tape = _recurrent.forward(
            self._spec, self._weights(), x3, s0, lengths, self.num_layers, self.bidirectional,
            keep, derived=self._derived, variant=self._variant(), checkpoint=checkpoint,
            masks=masks)
        return x3, batched, y, sn, tape

    def _dropout_masks(self, rng):
        """A function of (T, B) drawing the dropout masks from ``rng``, or None (nothing drops).

        Each mask is ``(T, B, D*H)`` in the model's dtype: 0 with
        probability ``dropout``, else ``1 / (1 - dropout)``, one per layer
        but the last, drawn in that order from ``rng.random`` (float64).
        """
        p = self.dropout
        if p == 0 or self.num_layers == 1:
            return None
        if rng is None:
            rng = self._generator
        elif not isinstance(rng, np.random.Generator):
            if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)):
                raise TypeError("rng must be None, a numpy.random.Generator or an int seed, got "
                                f"{type(rng).__name__} {rng!r}")
            rng = np.random.default_rng(check.seed(rng, "rng"))
        scale = self.dtype.type(0 if p == 1 else 1 / (1 - p))
        F = self.num_directions * self._widths()[0]

        def draw(T, B):
            return [np.where(rng.random((T, B, F)) >= p, scale, self.dtype.type(0))
                    for _ in range(self.num_layers - 1)]

        return draw

    # -- public API ----------------------------------------------------------

    def __call__(self, x, state=None, lengths=None, *, check_finite=True):
        """Run the model over a sequence (inference).

        Parameters
        ----------
        x : array_like
            ``(T, B, I)`` (``(B, T, I)`` when ``batch_first``) or ``(T, I)``
            for one unbatched sequence; real floats, converted to the model's
            dtype.
        state : optional
            Initial state, ``(L*D, B, H)`` (``(L*D, H)`` unbatched); a tuple
            ``(h, c)`` for an LSTM.  ``None`` means zeros.
        lengths : array_like of int, optional
            ``(B,)`` valid steps of each right-padded sequence, each in
            ``[1, T]``.  ``None`` means all ``T``.
        check_finite : bool, default True
            Raise ``ValueError`` if ``x`` holds NaN or inf at a valid step
            (padded steps are never read and may hold anything) or the state
            holds any.  With ``False`` no check is made and NaN or inf
            propagate through the results, as in PyTorch.

        Returns
        -------
        y : ndarray
            ``(T, B, D*H)`` in ``x``'s layout: the last layer's hidden states,
            forward direction first; exactly 0 at padded steps.
        state : ndarray or tuple of ndarray
            Final state, shaped like ``state``.
        """
        _, batched, y, sn, _ = self._run(x, state, lengths, keep=False, check_finite=check_finite)
        return self._seq_out(y, batched), self._state_out(sn, batched)

    def vjp(self, x, state=None, lengths=None, *, check_finite=True, checkpoint=None, rng=None):
        """Run the model and return a function for its vector-Jacobian product.

        Parameters
        ----------
        x, state, lengths, check_finite :
            As for :meth:`__call__`; ``check_finite`` also applies to the
            pullback's ``dy`` (at valid steps) and ``dstate``.
        checkpoint : int, optional
            Gradient checkpointing: keep only the state at the start of every
            segment of about ``checkpoint`` steps and recompute each segment's
            gates when the pullback reaches it.  The memory kept between the
            forward pass and the pullback then grows like ``T / checkpoint``
            states instead of ``T`` steps of gates; the pullback needs one
            segment's worth at a time; it costs one more forward pass.  The
            results are bitwise the same as without.  The interval is rounded
            up to a whole number of blocks of ``ceil(1024 / B)`` steps (the
            blocks in which products over time are taken; see
            ``docs/guarantees.md``).  ``None`` (default) keeps everything.
        rng : numpy.random.Generator, int or None
            Where the dropout masks come from (a model built with
            ``dropout > 0`` and more than one layer; else unused): a
            generator, advanced by the draw; an int, the seed of a new one;
            ``None`` (default), the model's own generator, seeded by its
            ``seed`` (its second stream: not the parameters' draws).  The
            same masks give the same bits; the pullback differentiates the
            function with the masks that were drawn.

        Returns
        -------
        (y, state) : tuple
            As returned by :meth:`__call__`.
        pullback : callable
            ``pullback(dy, dstate=None) -> (dx, dstate0, dparams)``: the
            gradients of ``sum(y * dy) + <state, dstate>`` with respect to
            ``x`` (shaped like ``x``), the initial state (shaped like the
            state; zeros allowed) and every parameter (a dict keyed like
            :meth:`state_dict`).  For an LSTM ``dstate`` is a tuple
            ``(dh, dc)``; ``None`` anywhere means zeros.  It may be called
            any number of times.  Its keyword ``check_finite`` (default: the
            setting of this call) refuses NaN or inf in ``dy`` at valid steps
            (``dy`` at padded steps is ignored) and in ``dstate``.
        """
        return self._vjp(x, state, lengths, check_finite, checkpoint, self._dropout_masks(rng))

    def _vjp(self, x, state, lengths, check_finite, checkpoint, masks):
        """:meth:`vjp` with the dropout masks given: None, a list, or a function of (T, B)
        (the torch drop-in draws them from torch's generator)."""
        if checkpoint is not None:
            checkpoint = check.positive_int(checkpoint, "checkpoint")
        x3, batched, y, sn, tape = self._run(x, state, lengths, keep=True,
                                             check_finite=check_finite, checkpoint=checkpoint,
                                             masks=masks)
        valid = None if lengths is None else check.valid_steps(tape.lengths, x3.shape[0])
        # The pullback differentiates the forward pass just run, whatever
        # load_state_dict does to the model in between.
        weights = self._weights()
        derived = self._derived
        suffixes = self._suffixes()
        T, B, _ = x3.shape
        num = self.num_layers * self.num_directions
        widths = self._widths()
        F = self.num_directions * widths[0]
        spec = self._spec

        check_forward = check_finite

        def pullback(dy, dstate=None, *, check_finite=None):
            # None: the setting the forward pass was called with.
            check_finite = check_forward if check_finite is None else check.boolean(check_finite, "check_finite")
            dy3 = self._seq_in(dy, batched, T, B, F, "dy")
            if dstate is None:
                ds = tuple([np.zeros((num, B, w), dtype=self.dtype) for w in widths])
                if check_finite:
                    check.finite(dy3, "dy", valid)
            else:
                parts, names = check.state_parts(dstate, "dstate", spec, "d")
                ds = tuple([check.gradient(v, n, (num, B, w) if batched else (num, w),
                                           self.dtype).reshape(num, B, -1)
                            for v, n, w in zip(parts, names, widths)])
                if check_finite:
                    # dy at padded steps multiplies outputs that are constant 0;
                    # a dstate part of None is zeros made here, not checked.
                    check.finite(dy3, "dy", valid)
                    for value, arr, name in zip(parts, ds, names):
                        if value is not None:
                            check.finite(arr, name)
            dx, ds0, dweights = _recurrent.backward(
                tape, weights, dy3, ds, self.num_layers, self.bidirectional, self.bias,
                derived=derived)
            dparams = {}
            for s, grads in zip(suffixes, dweights):
                for base, value in grads.items():
                    dparams[base + s] = value
            dparams = {name: dparams[name] for name in self._shapes}
            return self._seq_out(dx, batched), self._state_out(ds0, batched), dparams

        return (self._seq_out(y, batched), self._state_out(sn, batched)), pullback

    def gates(self, x, state=None, lengths=None, *, check_finite=True):
        """Post-activation gate values at every step, layer and direction.

        Parameters are as for :meth:`__call__`.

        Returns
        -------
        dict of str to ndarray
            Each ``(L*D, T, B, H)`` (``(L*D, T, H)`` for unbatched ``x``),
            time-major whatever ``batch_first`` is, 0 at padded steps.
            LSTM: ``"i" "f" "g" "o"`` and the cell state ``"c"``; GRU:
            ``"r" "z" "n"``; sLSTM: ``"i" "f"`` (stabilised), ``"z" "o"``
            and the states ``"c" "n" "m"``.
        """
        _, batched, _, _, tape = self._run(x, state, lengths, keep=True, check_finite=check_finite)
        H = self.hidden_size
        out = {}
        for j, name in enumerate(self._spec.gates):
            out[name] = np.stack([g[:, :, j * H:(j + 1) * H] for g in tape.gates])
        # the tape's aux array shows name j as its columns j*H:(j+1)*H
        for j, name in enumerate(self._spec.shown):
            out[name] = np.stack([a[:, :, j * H:(j + 1) * H] for a in tape.aux])
        if not batched:
            out = {name: v[:, :, 0, :] for name, v in out.items()}
        return {name: np.ascontiguousarray(v) for name, v in out.items()}

    def training_memory(self, T, B=1, *, checkpoint=None, padded=False):
        """Memory of a training step on sequences of ``T`` steps, batch ``B``.

        Counts the arrays that :meth:`vjp` and its pullback allocate whose
        size grows with ``T`` (tests compare the count with what
        :mod:`tracemalloc` measures; see ``docs/guarantees.md``).  Not
        counted: the caller's ``x`` and ``dy``, and scratch of a fixed size
        (per-chunk states, BLAS packing buffers).

        Parameters
        ----------
        T, B : int
            Steps and batch size.
        checkpoint : int, optional
            As for :meth:`vjp`.
        padded : bool, default False
            Some sequences are shorter than ``T`` (``lengths``): the input
            is then copied once, with its padded steps set to zero.

        With ``dropout`` between layers the masks are counted (one array
        like a layer's output per layer but the last) and, without
        checkpointing, the dropped copy of each of those outputs.

        Returns
        -------
        dict
            ``"kept"``: bytes held between :meth:`vjp` and the pullback, the
            output ``y`` included; ``"peak"``: the most allocated at any one
            time during both calls, their results included.
        """
        T = check.positive_int(T, "T")
        B = check.positive_int(B, "B")
        if checkpoint is not None:
            checkpoint = check.positive_int(checkpoint, "checkpoint")
        kept, peak = _recurrent.training_memory(
            self._spec, T, B, self.input_size, self.hidden_size, self.num_layers,
            self.num_directions, self.dtype.itemsize, clip=self.clip < np.inf,
            options=self._options(), num_params=self.num_params, checkpoint=checkpoint,
            padded=check.boolean(padded, "padded"),
            dropout=self._dropout_masks(None) is not None)
        return {"kept": kept, "peak": peak}

    def __repr__(self):
        args = [str(self.input_size), str(self.hidden_size)]
        if self.num_layers != 1:
            args.append(f"num_layers={self.num_layers}")
        if not self.bias:
            args.append("bias=False")
        if self.batch_first:
            args.append("batch_first=True")
        if self.bidirectional:
            args.append("bidirectional=True")
        if not self.reset_after:
            args.append("reset_after=False")
        args += _variant_repr(self)
        args.append(f"dtype={self.dtype.name}")
        return f"{type(self).__name__}({', '.join(args)})"


def _variant_repr(model):
    args = []
    if getattr(model, "reverse", False):
        args.append("reverse=True")
    if model.clip < np.inf:
        args.append(f"clip={model.clip!r}")
    if model.peephole:
        args.append("peephole=True")
    if model.input_forget:
        args.append("input_forget=True")
    if getattr(model, "dropout", 0.0):
        args.append(f"dropout={model.dropout!r}")
    if getattr(model, "proj_size", 0):
        args.append(f"proj_size={model.proj_size}")
    if getattr(model, "beta", 1.0) != 1.0:
        args.append(f"beta={model.beta!r}")
    if getattr(model, "positive", False):
        args.append("positive=True")
    if getattr(model, "num_heads", 1) != 1:
        args.append(f"num_heads={model.num_heads}")
    return args


def _direction_params(params, cell, suffix):
    """One layer-direction's parameters by base name: the driver's weights entry."""
    out = {}
    for base in _BASES + cell.params:
        value = params.get(base + suffix)
        if value is not None:
            out[base] = value
    return out


class LSTM(_Recurrent):
    """Multi-layer long short-term memory network, with PyTorch's semantics.

    For each layer and step, with gate order i, f, g, o in the rows of the
    weights::

        i = σ(W_ii x + b_ii + W_hi h + b_hi)
        f = σ(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        o = σ(W_io x + b_io + W_ho h + b_ho)
        c' = f ⊙ c + i ⊙ g
        h' = o ⊙ tanh(c')

    Parameters
    ----------
    input_size : int
        Features of ``x``.
    hidden_size : int
        Features of ``h`` and ``c``.
    num_layers : int, default 1
        Stacked layers; layer ``k > 0`` reads the outputs of layer ``k - 1``.
    bias : bool, default True
        Whether the model has the biases ``bias_ih_l*`` and ``bias_hh_l*``.
    batch_first : bool, default False
        ``x`` and ``y`` are ``(B, T, F)`` instead of ``(T, B, F)``.
    bidirectional : bool, default False
        Each layer also reads the sequence backwards (parameters with the
        suffix ``_reverse``); outputs are concatenated, forward first.
    dropout : float, default 0.0
        PyTorch's dropout between layers: in training (:meth:`vjp` only)
        each output of every layer but the last is zeroed with probability
        ``dropout`` before the next layer reads it, and the kept ones are
        scaled by ``1 / (1 - dropout)``; :meth:`__call__` and :meth:`gates`
        never drop.  The masks come from ``vjp``'s ``rng``.
    proj_size : int, default 0
        PyTorch's projection of the hidden state (Sak et al. 2014): with
        ``P = proj_size > 0`` each step's ``o ⊙ tanh(c')`` is multiplied by
        ``weight_hr_l{k}`` ``(P, H)`` (no bias), so ``h`` and ``y`` have
        ``P`` units per direction, ``weight_hh_l{k}`` is ``(4H, P)`` and
        ``c`` keeps ``H``.  ``0 < P < H``; not with ``clip``, ``peephole``
        or ``input_forget``.
    dtype : {np.float32, np.float64}, default np.float32
        The dtype of parameters, outputs and gradients.
    seed : int or None
        Seed of the default initialisation (uniform in ``±1/sqrt(H)``).
    reverse : bool, default False
        A one-direction model that reads each sequence backwards, from its
        last valid step (ONNX's ``direction="reverse"``); parameters keep
        the names without ``_reverse``.
    clip : float or None, default None
        Limit every gate pre-activation to ``[-clip, clip]`` (ONNX's
        ``clip``, as onnxruntime computes it: the cell state is not clipped,
        in the state or inside ``tanh(c')``).  Gradients are 0 where a value
        was cut.
    peephole : bool, default False
        Peephole connections (Gers & Schmidhuber 2000; ONNX's ``P``): the
        parameters ``weight_peep_l{k}`` (3, H), rows ``p_i, p_f, p_o``, add
        ``p_i ⊙ c`` and ``p_f ⊙ c`` to the i and f pre-activations and
        ``p_o ⊙ c'`` to the o one.  They are initialised after every other
        parameter, so a seed gives the same other parameters either way.
    input_forget : bool, default False
        Couple the forget gate to the input gate, ``f = 1 - i`` (ONNX's
        ``input_forget``); the f rows of the weights are kept, unused, and
        get zero gradients.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.LSTM(3, 5, seed=0)
    >>> y, (h, c) = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, h.shape
    ((7, 2, 5), (1, 2, 5))
    """

    _cell = "lstm"
    _spec = cells.LSTM

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, proj_size=0, dtype=np.float32, seed=None,
                 reverse=False, clip=None, peephole=False, input_forget=False):
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reverse=reverse,
                         clip=clip, peephole=peephole, input_forget=input_forget, dropout=dropout,
                         proj_size=proj_size)


class GRU(_Recurrent):
    """Multi-layer gated recurrent unit network, with PyTorch's semantics.

    For each layer and step, with gate order r, z, n in the rows of the
    weights::

        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        z = σ(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))    reset_after=True
        n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)    reset_after=False
        h' = (1 - z) ⊙ n + z ⊙ h

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dropout, dtype, seed
        As for :class:`LSTM`.
    reset_after : bool, default True
        Apply the reset gate after the recurrent product (PyTorch, cuDNN and
        Keras) or before it (Cho et al. 2014, ONNX's default).  The paper's
        form ``h' = (1 - z') h + z' n`` is this model with ``z' = 1 - z``.
    reverse : bool, default False
        As for :class:`LSTM`.
    clip : float or None, default None
        Limit the pre-activations of r, z and n (the argument of ``tanh``)
        to ``[-clip, clip]`` (ONNX's ``clip``).
    """

    _cell = "gru"
    _spec = cells.GRU

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, reset_after=True, dtype=np.float32, seed=None,
                 reverse=False, clip=None):
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reset_after=reset_after,
                         reverse=reverse, clip=clip, dropout=dropout)


class JANET(_Recurrent):
    """Multi-layer JANET (van der Westhuizen & Lasenby 2018): an LSTM with only a forget gate.

    For each layer and step, with gate order f, n in the rows of the
    weights (``2H`` rows; the state ``h`` is also the cell state)::

        s  = W_if x + b_if + W_hf h + b_hf
        n  = tanh(W_in x + b_in + W_hn h + b_hn)
        h' = σ(s) ⊙ h + (1 - σ(s - β)) ⊙ n

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dropout, dtype, seed
        As for :class:`LSTM`.
    beta : float, default 1.0
        The shift ``β`` of the input's sigmoid (the paper's 1): the input's
        share ``1 - σ(s - β)`` stays a little open when the forget gate
        ``σ(s)`` is near 1.  0 gives the coupled form ``h' = f h + (1 - f) n``.
    reverse : bool, default False
        As for :class:`LSTM`.

    Notes
    -----
    The paper initialises the forget bias with chrono initialisation
    (:func:`fastgates.init.chrono`).  ``gates()`` returns ``"f"`` (the
    forget gate ``σ(s)``) and ``"n"``.  See ``docs/janet.md``.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.JANET(3, 5, seed=0)
    >>> y, h = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, h.shape
    ((7, 2, 5), (1, 2, 5))
    """

    _cell = "janet"
    _spec = cells.JANET

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, beta=1.0, dtype=np.float32, seed=None,
                 reverse=False):
        self.beta = check.real(beta, "beta")
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reverse=reverse,
                         dropout=dropout)

    def _options(self):
        return {**super()._options(), "beta": self.beta}


class MGU(_Recurrent):
    """Multi-layer minimal gated unit (Zhou et al. 2016): a GRU with one gate.

    For each layer and step, with gate order f, n in the rows of the
    weights (``2H`` rows)::

        f  = σ(W_if x + b_if + W_hf h + b_hf)
        n  = tanh(W_in x + b_in + W_hn (f ⊙ h) + b_hn)
        h' = (1 - f) ⊙ h + f ⊙ n

    ``f`` opens the state to the candidate: the fraction kept at a step is
    ``1 - f``, which is what :func:`fastgates.gate_summary` and
    :func:`fastgates.timescale` read.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dropout, dtype, seed
        As for :class:`LSTM`.
    reverse : bool, default False
        As for :class:`LSTM`.

    Notes
    -----
    ``gates()`` returns ``"f"`` and ``"n"``.  See ``docs/mgu.md``.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.MGU(3, 5, seed=0)
    >>> y, h = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, h.shape
    ((7, 2, 5), (1, 2, 5))
    """

    _cell = "mgu"
    _spec = cells.MGU

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, dtype=np.float32, seed=None, reverse=False):
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reverse=reverse,
                         dropout=dropout)


class SLSTM(_Recurrent):
    """Multi-layer sLSTM (Beck et al. 2024, xLSTM): exponential gating, normaliser, stabiliser.

    For each layer and step, with gate order i, f, z, o in the rows of the
    weights (``4H`` rows) and ``a = (ĩ, f̃, z̃, õ)`` the pre-activations
    ``W_i x + b_i + R h + b_h``::

        m' = max(log σ(f̃) + m, ĩ)
        i' = exp(ĩ - m'),   f' = exp(log σ(f̃) + m - m')
        c' = f' ⊙ c + i' ⊙ tanh(z̃)
        n' = f' ⊙ n + i'
        h' = σ(õ) ⊙ c' / n'

    The recurrent weights are block diagonal: ``num_heads`` heads of
    ``d = H // num_heads`` units, one ``(d, d)`` block per head and gate,
    stored as ``weight_hh_l{k}`` ``(4H, d)``: row ``γH + j`` (gate γ, unit
    ``j`` of head ``j // d``) multiplies that head's part of ``h``.  The
    state is ``(h, c, n, m)``; ``None`` means ``h = c = n = 0`` and
    ``m = -inf``, so the first step has ``f' = 0``, ``i' = 1``.

    ``h`` and ``y`` are those of the unstabilised equations (``i = exp(ĩ)``,
    ``f = σ(f̃)``, no ``m``) wherever those are finite, and stay finite for
    any finite input: ``m`` scales ``c`` and ``n`` alike, and ``h`` does not
    depend on it.

    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dropout, dtype, seed
        As for :class:`LSTM`.
    num_heads : int, default 1
        Heads of the block-diagonal recurrent weights; must divide
        ``hidden_size``.
    reverse : bool, default False
        As for :class:`LSTM`.

    Notes
    -----
    Gradients treat the stabiliser ``m`` as a constant (it cancels from
    ``h``): the gradients of ``y`` and of the final ``h`` are exact, those
    of the final ``c`` and ``n`` are taken with ``m`` held fixed, the
    gradient with respect to the initial ``m`` is 0, and a ``dstate``
    given for the final ``m`` is ignored.  ``gates()`` returns ``"i"`` and
    ``"f"`` (the stabilised ``i'``, ``f'``, each in ``[0, 1]``, one of them
    1 at every step), ``"z"`` (``tanh(z̃)``), ``"o"`` and the states
    ``"c"``, ``"n"``, ``"m"``; :func:`fastgates.gate_summary` reads ``f'``.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.SLSTM(3, 4, num_heads=2, seed=0)
    >>> y, (h, c, n, mx) = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, m.weight_hh_l0.shape
    ((7, 2, 4), (16, 2))
    """

    _cell = "slstm"
    _spec = cells.SLSTM

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, num_heads=1, dtype=np.float32, seed=None,
                 reverse=False):
        hidden = check.positive_int(hidden_size, "hidden_size")
        self.num_heads = check.positive_int(num_heads, "num_heads")
        if hidden % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={hidden} "
                             "(each head has hidden_size // num_heads units)")
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reverse=reverse,
                         dropout=dropout)

    def _options(self):
        return {**super()._options(), "num_heads": self.num_heads}


class _ScanLayer(_Recurrent):
    """A layer of a cell whose gates see only the input (minGRU, minLSTM)."""

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False,
                 bidirectional=False, dropout=0.0, positive=False, dtype=np.float32, seed=None,
                 reverse=False):
        self.positive = check.boolean(positive, "positive")
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional, dtype=dtype, seed=seed, reverse=reverse,
                         dropout=dropout)

    def _options(self):
        return {**super()._options(), "positive": self.positive}


_SCAN_NOTES = """
    Parameters
    ----------
    input_size, hidden_size, num_layers, bias, batch_first, bidirectional, dropout, dtype, seed
        As for :class:`LSTM`; the layer has ``weight_ih_l{k}`` and (with
        ``bias``) ``bias_ih_l{k}`` only.
    positive : bool, default False
        The candidate is ``g(v)`` (``v + 1/2`` for ``v >= 0``, ``σ(v)``
        below) instead of ``v``: the paper's form for its log-space scan,
        which keeps ``h`` positive for a positive initial state.
    reverse : bool, default False
        As for :class:`LSTM`.

    Notes
    -----
    The projection of all steps is one product; the recurrence, linear in
    ``h``, is a scan split over the threads by batch rows and, for small
    batches, by blocks of time (fixed by the shape, so the bits do not
    depend on the thread count).  The accuracy of that scan: see
    ``docs/mingru.md``.
"""


class MinGRU(_ScanLayer):
    __doc__ = """Multi-layer minGRU (Feng et al. 2024): a GRU whose gate sees only the input.

    For each layer and step, with gate order z, n in the rows of
    ``weight_ih`` (``2H`` rows)::

        z  = σ(W_iz x + b_iz)
        n  = W_in x + b_in            (positive=True: g(W_in x + b_in))
        h' = (1 - z) ⊙ h + z ⊙ n

    ``1 - z`` is the fraction of the state kept at a step, which
    :func:`fastgates.gate_summary` and :func:`fastgates.timescale` read;
    ``gates()`` returns ``"z"`` and ``"n"``.
""" + _SCAN_NOTES + """
    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.MinGRU(3, 5, seed=0)
    >>> y, h = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, h.shape, sorted(m.state_dict())
    ((7, 2, 5), (1, 2, 5), ['bias_ih_l0', 'weight_ih_l0'])
    """

    _cell = "mingru"
    _spec = cells.MINGRU


class MinLSTM(_ScanLayer):
    __doc__ = """Multi-layer minLSTM (Feng et al. 2024): an LSTM whose gates see only the input.

    For each layer and step, with gate order f, i, n in the rows of
    ``weight_ih`` (``3H`` rows)::

        f  = σ(W_if x + b_if),   i = σ(W_ii x + b_ii)
        n  = W_in x + b_in            (positive=True: g(W_in x + b_in))
        h' = f/(f + i) ⊙ h + i/(f + i) ⊙ n

    ``gates()`` returns the normalised ``"f"`` = ``f/(f+i)`` and ``"i"`` =
    ``i/(f+i)``, and ``"n"``; ``"f"`` is the fraction of the state kept.
""" + _SCAN_NOTES + """
    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.MinLSTM(3, 5, seed=0)
    >>> y, h = m(np.ones((7, 2, 3), dtype=np.float32))
    >>> y.shape, m.weight_ih_l0.shape
    ((7, 2, 5), (15, 3))
    """

    _cell = "minlstm"
    _spec = cells.MINLSTM


class _Cell(_Parameters):
    """One step of a recurrent cell: a one-layer, one-step sequence model."""

    _cell = None
    _spec = None

    def __init__(self, input_size, hidden_size, *, bias=True, dtype=np.float32, seed=None,
                 reset_after=True, clip=None, peephole=False, input_forget=False):
        self.input_size = check.positive_int(input_size, "input_size")
        self.hidden_size = check.positive_int(hidden_size, "hidden_size")
        self.bias = check.boolean(bias, "bias")
        self.reset_after = check.boolean(reset_after, "reset_after")
        self.clip = check.clip_bound(clip)
        self.peephole = check.boolean(peephole, "peephole")
        self.input_forget = check.boolean(input_forget, "input_forget")
        self.dtype = check.model_dtype(dtype)
        G = self._spec.rows(self.hidden_size)
        shapes = {"weight_ih": (G, self.input_size), "weight_hh": (G, self.hidden_size)}
        if self.bias:
            shapes["bias_ih"] = (G,)
            shapes["bias_hh"] = (G,)
        if self.peephole:
            shapes["weight_peep"] = (3, self.hidden_size)
        self._setup_params(shapes, seed)

    def _weights(self):
        return [_direction_params(self._params, self._spec, "")]

    def _variant(self):
        return _recurrent.Variant(False, self.clip, reset_after=self.reset_after,
                                  input_forget=self.input_forget)

    def _prepare(self, x, state, check_finite):
        check_finite = check.boolean(check_finite, "check_finite")
        arr = check.as_float_array(x, "x", self.dtype)
        if arr.ndim not in (1, 2):
            raise ValueError(f"x must be 2-D (B, I) or 1-D (I,) for one sample, got {arr.ndim}-D with shape {arr.shape}")
        if arr.shape[-1] != self.input_size:
            raise ValueError(f"x must have input_size={self.input_size} features in its last axis, got shape {arr.shape}")
        batched = arr.ndim == 2
        x3 = arr[None] if batched else arr[None, None]
        B = x3.shape[1]
        if B == 0:
            raise ValueError(f"x must have at least one sample, got shape {arr.shape}")
        parts, names = check.state_parts(state, "state", self._spec)
        s0 = tuple(self._state_in(v, n, B, batched) for v, n in zip(parts, names))
        if check_finite:
            check.finite(x3, "x")
            for value, name in zip(s0, names):
                check.finite(value, name)
        return x3, batched, s0

    def _state_in(self, value, name, B, batched):
        shape = (B, self.hidden_size) if batched else (self.hidden_size,)
        return check.gradient(value, name, shape, self.dtype).reshape(1, B, self.hidden_size)

    def _state_out(self, state, batched):
        state = tuple([s[0] if batched else s[0, 0] for s in state])
        return state[0] if len(state) == 1 else state

    def _forward(self, x, state, keep, check_finite=True):
        x3, batched, s0 = self._prepare(x, state, check_finite)
        lengths = np.ones(x3.shape[1], dtype=np.int64)
        _, sn, tape = _recurrent.forward(self._spec, self._weights(), x3, s0, lengths, 1, False,
                                         keep, derived=self._derived, variant=self._variant())
        return x3, batched, sn, tape

    def __call__(self, x, state=None, *, check_finite=True):
        """Advance the cell one step.

        Parameters
        ----------
        x : array_like
            ``(B, I)``, or ``(I,)`` for one sample.
        state : optional
            ``(B, H)`` (``(H,)`` for one sample); a tuple ``(h, c)`` for an
            LSTM cell.  ``None`` means zeros.
        check_finite : bool, default True
            Raise ``ValueError`` if ``x`` or the state holds NaN or inf; with
            ``False`` they propagate, as in PyTorch.

        Returns
        -------
        ndarray or tuple of ndarray
            The new state, shaped like ``state``.
        """
        _, batched, sn, _ = self._forward(x, state, keep=False, check_finite=check_finite)
        return self._state_out(sn, batched)

    def vjp(self, x, state=None, *, check_finite=True):
        """Advance one step and return a function for the vector-Jacobian product.

        Parameters are as for :meth:`__call__`; ``check_finite`` also applies
        to the pullback's ``dout``.

        Returns
        -------
        out : ndarray or tuple of ndarray
            As returned by :meth:`__call__`.
        pullback : callable
            ``pullback(dout) -> (dx, dstate, dparams)``: gradients of
            ``<out, dout>`` with respect to ``x``, the state (shaped like it)
            and the parameters (keyed like :meth:`state_dict`).
        """
        x3, batched, sn, tape = self._forward(x, state, keep=True, check_finite=check_finite)
        weights = self._weights()
        derived = self._derived
        B = x3.shape[1]
        H = self.hidden_size

        def pullback(dout):
            parts, names = check.state_parts(dout, "dout", self._spec, "d")
            ds = tuple(self._state_in(v, n, B, batched) for v, n in zip(parts, names))
            if check_finite:
                for value, name in zip(ds, names):
                    check.finite(value, name)
            dy = np.zeros((1, B, H), dtype=self.dtype)
            dx, ds0, dweights = _recurrent.backward(tape, weights, dy, ds, 1, False, self.bias,
                                                    derived=derived)
            dparams = {name: dweights[0][name] for name in self._shapes}
            dx = dx[0] if batched else dx[0, 0]
            return dx, self._state_out(ds0, batched), dparams

        return self._state_out(sn, batched), pullback

    def __repr__(self):
        args = [str(self.input_size), str(self.hidden_size)]
        if not self.bias:
            args.append("bias=False")
        if not self.reset_after:
            args.append("reset_after=False")
        args += _variant_repr(self)
        args.append(f"dtype={self.dtype.name}")
        return f"{type(self).__name__}({', '.join(args)})"


class LSTMCell(_Cell):
    """One step of an LSTM, with PyTorch's ``nn.LSTMCell`` semantics.

    Parameters ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih``,
    ``bias_hh`` (4H,), gate order i, f, g, o; the equations of :class:`LSTM`.

    Parameters
    ----------
    input_size, hidden_size : int
    bias : bool, default True
    dtype : {np.float32, np.float64}, default np.float32
    seed : int or None
    clip, peephole, input_forget :
        As for :class:`LSTM` (the peephole parameter is ``weight_peep``).
    """

    _cell = "lstm"
    _spec = cells.LSTM

    def __init__(self, input_size, hidden_size, *, bias=True, dtype=np.float32, seed=None,
                 clip=None, peephole=False, input_forget=False):
        super().__init__(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed, clip=clip,
                         peephole=peephole, input_forget=input_forget)


class GRUCell(_Cell):
    """One step of a GRU, with PyTorch's ``nn.GRUCell`` semantics.

    Parameters ``weight_ih`` (3H, I), ``weight_hh`` (3H, H), ``bias_ih``,
    ``bias_hh`` (3H,), gate order r, z, n; the equations of :class:`GRU`.

    Parameters
    ----------
    input_size, hidden_size : int
    bias : bool, default True
    reset_after : bool, default True
        As for :class:`GRU`.
    dtype : {np.float32, np.float64}, default np.float32
    seed : int or None
    clip : float or None, default None
        As for :class:`GRU`.
    """

    _cell = "gru"
    _spec = cells.GRU

    def __init__(self, input_size, hidden_size, *, bias=True, reset_after=True, dtype=np.float32,
                 seed=None, clip=None):
        super().__init__(input_size, hidden_size, bias=bias, dtype=dtype, seed=seed,
                         reset_after=reset_after, clip=clip)


# The layer and one-step classes of each cell, by the cell's name.
_LAYERS = {cls._cell: cls for cls in (LSTM, GRU, JANET, MGU, SLSTM, MinGRU, MinLSTM)}
_STEPS = {cls._cell: cls for cls in (LSTMCell, GRUCell)}


def refuse_without_counterpart(model, framework, where=""):
    """Refuse by name a recurrent layer whose cell ``framework`` has no layer for.

    The converters (:mod:`fastgates.torch`, :mod:`fastgates.onnx`,
    :mod:`fastgates.keras`) know LSTM and GRU, the cells every framework
    ships; a JANET, an MGU or an sLSTM has no counterpart to become.
    """
    if isinstance(model, _Recurrent) and model._cell not in ("lstm", "gru"):
        label = model._spec.label
        raise TypeError(f"{where}{framework} has no {label} layer: a fastgates {label} cannot be "
                        f"converted to {framework} (LSTM and GRU models can)")


def layer_class(cell):
    """The sequence layer class of the cell named ``cell`` (``"lstm"`` -> :class:`LSTM`)."""
    try:
        return _LAYERS[cell]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {sorted(_LAYERS)}, got {cell!r}") from None


def cell_class(cell):
    """The one-step class of the cell named ``cell`` (``"lstm"`` -> :class:`LSTMCell`)."""
    try:
        return _STEPS[cell]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {sorted(_STEPS)}, got {cell!r}") from None
