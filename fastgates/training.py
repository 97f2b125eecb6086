"""Training without a deep-learning framework: a read-out layer, losses, Adam, SciPy.

Everything here is NumPy on top of the compiled recurrent layers:

- :class:`Linear`, a dense layer with PyTorch's ``nn.Linear`` parameters;
- :class:`Readout`, a recurrent layer followed by a :class:`Linear` head,
  sequence-to-one (``mode="last"``) or sequence-to-sequence
  (``mode="sequence"``);
- :func:`mse_loss` and :func:`cross_entropy_loss`, each returning the loss and
  its gradient with respect to the prediction;
- :class:`Adam` and :func:`clip_grad_norm`, with ``torch.optim.Adam``'s and
  ``torch.nn.utils.clip_grad_norm_``'s arithmetic;
- :func:`scipy_objective`, the ``fun(v) -> (loss, grad)`` that
  ``scipy.optimize.minimize(..., jac=True)`` wants.

Gradients flow as in the layers: ``out, pullback = model.vjp(...)``, then
``pullback(dout)`` gives the gradients of ``sum(out * dout)``, the parameter
gradients in a dict keyed like ``model.state_dict()``.

Examples
--------
One training step of a sequence classifier:

>>> import numpy as np, fastgates as fg
>>> rnn = fg.LSTM(3, 8, seed=0)
>>> model = fg.Readout(rnn, fg.Linear(8, 4, seed=1))
>>> opt = fg.Adam(model, lr=1e-2)
>>> x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
>>> logits, pullback = model.vjp(x)
>>> loss, dlogits = fg.cross_entropy_loss(logits, np.array([0, 3]))
>>> dx, grads = pullback(dlogits)
>>> grads, norm = fg.clip_grad_norm(grads, 1.0)
>>> opt.step(grads)
"""

import math

import numpy as np

from . import _recurrent
from . import _validate as check
from .attention import ForgettingAttention
from .layers import (_FlatParams, _init_params, _Parameters, _Recurrent, checked_state_dict,
                     flatten_params)

__all__ = ["Linear", "Readout", "mse_loss", "cross_entropy_loss", "Adam", "clip_grad_norm",
           "scipy_objective"]


# --------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------


class Linear(_Parameters):
    """A dense layer ``y = x W^T + b``, with PyTorch's ``nn.Linear`` parameters.

    Parameters
    ----------
    in_features : int
        Features of the input (its last axis).
    out_features : int
        Features of the output.
    bias : bool, default True
        Whether the layer has the parameter ``bias``.
    dtype : {np.float32, np.float64}, default np.float32
        The dtype of parameters, outputs and gradients.
    seed : int or None
        Seed of the default initialisation, PyTorch's: every entry of
        ``weight`` and ``bias`` uniform in ``±1/sqrt(in_features)`` (drawn in
        float64, weight first, then rounded to ``dtype``).

    Attributes
    ----------
    weight : ndarray
        ``(out_features, in_features)``, read-only (change it with
        :meth:`load_state_dict` or :meth:`set_flat_params`).
    bias : ndarray or None
        ``(out_features,)``, read-only; ``None`` for ``bias=False``, as in
        PyTorch.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> lin = fg.Linear(3, 2, seed=0)
    >>> lin(np.ones((4, 5, 3), dtype=np.float32)).shape
    (4, 5, 2)
    """

    def __init__(self, in_features, out_features, *, bias=True, dtype=np.float32, seed=None):
        self.in_features = check.positive_int(in_features, "in_features")
        self.out_features = check.positive_int(out_features, "out_features")
        with_bias = check.boolean(bias, "bias")
        self.dtype = check.model_dtype(dtype)
        shapes = {"weight": (self.out_features, self.in_features)}
        if with_bias:
            shapes["bias"] = (self.out_features,)
        self._shapes = shapes
        # nn.Linear: kaiming_uniform_(a=sqrt(5)) on the weight is uniform in
        # ±1/sqrt(fan_in), and the bias uses the same bound.
        self._set_params(_init_params(shapes, self.in_features, self.dtype, seed))

    @property
    def bias(self):
        """The bias, ``(out_features,)`` read-only, or ``None`` without bias."""
        return self._params.get("bias")

    def _input(self, x, check_finite):
        check_finite = check.boolean(check_finite, "check_finite")
        arr = check.as_float_array(x, "x", self.dtype)
        if arr.ndim == 0:
            raise ValueError("x must have at least one axis, (..., in_features), got a scalar")
        if arr.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} features in its last axis, got shape {arr.shape}")
        if check_finite:
            check.finite(arr, "x")
        return arr

    def _apply(self, arr):
        # Overflow gives inf and inf - inf NaN, as IEEE (and PyTorch) say,
        # without NumPy's warnings: the recurrent kernels give none either.
        # The register tiles, not BLAS: a row's result does not depend on
        # the other rows (a slice of a batch gives the same bits).
        lead = arr.shape[:-1]
        out = _recurrent.linear(arr.reshape(-1, self.in_features), self._params["weight"],
                                self._params.get("bias"), self._derived)
        return out.reshape(*lead, self.out_features)

    def __call__(self, x, *, check_finite=True):
        """Apply the layer.

        Parameters
        ----------
        x : array_like
            ``(..., in_features)`` real floats, converted to the layer's dtype.
        check_finite : bool, default True
            Raise ``ValueError`` if ``x`` holds NaN or inf; with ``False``
            they propagate.

        Returns
        -------
        ndarray
            ``(..., out_features)``.
        """
        return self._apply(self._input(x, check_finite))

    def vjp(self, x, *, check_finite=True):
        """Apply the layer and return a function for its vector-Jacobian product.

        Parameters
        ----------
        x, check_finite :
            As for :meth:`__call__`; ``check_finite`` also applies to the
            pullback's ``dout``.

        Returns
        -------
        out : ndarray
            ``(..., out_features)``, as returned by :meth:`__call__`.
        pullback : callable
            ``pullback(dout) -> (dx, dparams)``: the gradients of
            ``sum(out * dout)`` with respect to ``x`` (shaped like ``x``) and
            to the parameters (a dict keyed like :meth:`state_dict`).  It
            differentiates the parameters of this call, whatever is loaded
            later, and may be called any number of times.
        """
        arr = self._input(x, check_finite)
        out = self._apply(arr)
        weight = self._params["weight"]
        with_bias = "bias" in self._params
        out_shape = out.shape

        def pullback(dout):
            d = check.gradient(dout, "dout", out_shape, self.dtype)
            if check_finite:
                check.finite(d, "dout")
            d2 = d.reshape(-1, self.out_features)
            x2 = arr.reshape(-1, self.in_features)
            with np.errstate(over="ignore", invalid="ignore"):
                dparams = {"weight": d2.T @ x2}
                if with_bias:
                    dparams["bias"] = d2.sum(axis=0)
                return d @ weight, dparams

        return out, pullback

    def __repr__(self):
        args = [str(self.in_features), str(self.out_features)]
        if self.bias is None:
            args.append("bias=False")
        args.append(f"dtype={self.dtype.name}")
        return f"Linear({', '.join(args)})"


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------


def _prediction(value, name):
    """A floating-point array; float32 and float64 keep their dtype, other floats become float64."""
    try:
        arr = np.asarray(value) if value is not None else None
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(f"{name} could not be converted to an array of numbers: {exc}") from None
    if arr is None or arr.dtype.kind != "f":
        what = "None" if arr is None else f"dtype {arr.dtype}"
        raise TypeError(f"{name} must hold real floating-point numbers, got {what}")
    dtype = arr.dtype if arr.dtype in check.FLOAT_DTYPES else np.dtype(np.float64)
    return np.asarray(arr, dtype=dtype, order="C")       # keeps 0-d arrays 0-d


def mse_loss(pred, target):
    """Mean squared error and its gradient with respect to ``pred``.

    ``loss = mean((pred - target)**2)`` over all entries, as
    ``torch.nn.functional.mse_loss`` with ``reduction="mean"``.

    Parameters
    ----------
    pred : array_like
        Real floats, any non-empty shape.
    target : array_like
        Real numbers (floats or integers) of exactly ``pred``'s shape; no
        broadcasting, so that a misplaced axis is an error, not a silently
        different loss.

    Returns
    -------
    loss : float
        Computed in float64.
    dpred : ndarray
        ``2 * (pred - target) / pred.size``, shaped like ``pred``, in
        ``pred``'s dtype (float32 or float64; other floats give float64).

    Raises
    ------
    TypeError
        If ``pred`` is not real floats or ``target`` not real numbers.
    ValueError
        If the shapes differ or ``pred`` is empty.
    """
    p = _prediction(pred, "pred")
    t = check.as_float_array(target, "target", np.float64, allow_int=True)
    if t.shape != p.shape:
        raise ValueError(f"target must have pred's shape {p.shape}, got {t.shape}")
    if p.size == 0:
        raise ValueError(f"pred must not be empty, got shape {p.shape}")
    # Huge or non-finite values follow IEEE arithmetic (inf, NaN), as in
    # PyTorch, without NumPy's warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        diff = p.astype(np.float64) - t
        loss = float(np.mean(np.square(diff)))
        return loss, ((2.0 / p.size) * diff).astype(p.dtype)


def cross_entropy_loss(logits, targets):
    """Softmax cross-entropy with integer class targets, and its gradient.

    ``loss = -mean_n log softmax(logits[n])[targets[n]]`` over every sample
    ``n``, as ``torch.nn.functional.cross_entropy`` with ``reduction="mean"``,
    except that the class axis is the **last** one, so that the ``(T, B, C)``
    output of a sequence-to-sequence :class:`Readout` is used as it is.

    The log-softmax subtracts each sample's largest logit before
    exponentiating, so any finite logits work (no overflow).

    Parameters
    ----------
    logits : array_like
        ``(..., C)`` real floats: ``(N, C)``, ``(T, B, C)`` or ``(C,)`` for
        one sample.
    targets : array_like of int
        ``logits.shape[:-1]``, each in ``[0, C)``.

    Returns
    -------
    loss : float
        Computed in float64.
    dlogits : ndarray
        ``(softmax(logits) - onehot(targets)) / N``, shaped like ``logits``,
        in ``logits``' dtype (float32 or float64; other floats give float64).

    Raises
    ------
    TypeError
        If ``logits`` is not real floats or ``targets`` not integers (floats
        and booleans are refused: convert them explicitly).
    ValueError
        If the shapes do not match, there are no samples or classes, or a
        target lies outside ``[0, C)``.
    """
    z = _prediction(logits, "logits")
    if z.ndim == 0:
        raise ValueError("logits must have a class axis, (..., C), got a scalar")
    t = check.integer_array(targets, "targets", "integer class indices")
    if t.shape != z.shape[:-1]:
        raise ValueError(f"targets must have shape logits.shape[:-1] = {z.shape[:-1]}, got {t.shape}")
    n, classes = t.size, z.shape[-1]
    if n == 0 or classes == 0:
        raise ValueError(f"logits must hold at least one sample and one class, got shape {z.shape}")
    low, high = t.min(), t.max()
    if low < 0 or high >= classes:
        raise ValueError(f"targets must lie in [0, C) = [0, {classes}), got values from {low} to {high}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # IEEE, as in mse_loss
        rows = np.arange(n)
        t1 = t.reshape(n).astype(np.intp)
        shifted = z.reshape(n, classes).astype(np.float64)
        shifted -= shifted.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        loss = float(np.mean(log_norm - shifted[rows, t1]))
        grad = np.exp(shifted - log_norm[:, None])
        grad[rows, t1] -= 1.0
        grad /= n
        return loss, grad.reshape(z.shape).astype(z.dtype)


_LOSSES = {"mse": mse_loss, "cross_entropy": cross_entropy_loss}


# --------------------------------------------------------------------------
# Readout
# --------------------------------------------------------------------------


class Readout(_FlatParams):
    """A recurrent layer followed by a :class:`Linear` read-out.

    Parameters
    ----------
    rnn : LSTM, GRU, JANET or MGU
        The recurrent layer (any options: layers, directions, ``batch_first``).
    head : Linear
        Applied to the rnn's output; ``head.in_features`` must be the rnn's
        output width ``D * hidden_size`` (``D * proj_size`` for a projected
        LSTM) and the dtypes must agree.
    mode : {"last", "sequence"}, default "last"
        ``"last"`` (sequence to one): the head reads one feature vector per
        sequence, the top layer's output after each direction has read the
        whole valid part of the sequence:

        - a forward direction: its output at the last valid step,
          ``t = lengths[b] - 1``;
        - a backward direction (the second half of a bidirectional rnn, or a
          ``reverse=True`` rnn): its output at step ``t = 0``, where it ends.

        This is the top layer's final hidden state ``h_n[-D:]`` (forward
        half first), what PyTorch users feed a classifier with
        ``torch.cat([h_n[-2], h_n[-1]], dim=1)``.  Taking both halves at the
        last valid step instead would give the backward direction after it
        has read one step only.

        ``"sequence"`` (sequence to sequence): the head reads the output at
        every step; at padded steps the output is exactly 0 and whatever
        ``dout`` holds there is ignored (no gradient).

    Notes
    -----
    The parameters are those of ``rnn`` and ``head``, named ``"rnn.<name>"``
    and ``"head.<name>"`` (rnn first), as the ``state_dict`` of a PyTorch
    module with attributes ``rnn`` and ``head`` would name them.  The model
    holds ``rnn`` and ``head`` themselves, not copies: loading parameters
    into it changes them.

    With ``mode="sequence"`` and ``lengths``, a loss averaged over all
    entries (:func:`mse_loss`, :func:`cross_entropy_loss`) also averages over
    the padded ones, whose outputs are constant 0: they add no gradient but
    scale it down; select the valid entries first if that matters.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> rnn = fg.GRU(2, 4, bidirectional=True, batch_first=True, seed=0)
    >>> model = fg.Readout(rnn, fg.Linear(8, 1, seed=1))
    >>> x = np.zeros((3, 6, 2), dtype=np.float32)               # (B, T, I)
    >>> model(x, lengths=np.array([6, 2, 4])).shape
    (3, 1)
    """

    def __init__(self, rnn, head, *, mode="last"):
        if not isinstance(rnn, _Recurrent):
            raise TypeError(f"rnn must be a fastgates recurrent layer (LSTM, GRU, JANET, MGU, SLSTM), "
                            f"got {type(rnn).__name__}")
        if not isinstance(head, Linear):
            raise TypeError(f"head must be a fastgates Linear, got {type(head).__name__}")
        if head.dtype != rnn.dtype:
            raise TypeError(f"head.dtype ({head.dtype}) must be rnn.dtype ({rnn.dtype})")
        width = rnn.num_directions * rnn._widths()[0]
        if head.in_features != width:
            raise ValueError(
                f"head.in_features must be the rnn's output width num_directions * "
                f"{'proj_size' if getattr(rnn, 'proj_size', 0) else 'hidden_size'} = {width}, "
                f"got {head.in_features}")
        if mode not in ("last", "sequence"):
            raise ValueError(f"mode must be 'last' or 'sequence', got {mode!r}")
        self.rnn = rnn
        self.head = head
        self.mode = mode

    @property
    def dtype(self):
        """The dtype of parameters, outputs and gradients (the rnn's)."""
        return self.rnn.dtype

    @property
    def _shapes(self):
        shapes = {f"rnn.{name}": shape for name, shape in self.rnn._shapes.items()}
        shapes.update({f"head.{name}": shape for name, shape in self.head._shapes.items()})
        return shapes

    # -- parameters ----------------------------------------------------------

    def state_dict(self):
        """Return the parameters as a ``dict`` of array copies, ``rnn.*`` then ``head.*``.

        Returns
        -------
        dict of str to ndarray
        """
        out = {f"rnn.{name}": value for name, value in self.rnn.state_dict().items()}
        out.update({f"head.{name}": value for name, value in self.head.state_dict().items()})
        return out

    def load_state_dict(self, state_dict, *, check_finite=True):
        """Replace the parameters of ``rnn`` and ``head`` by those in ``state_dict``.

        Parameters
        ----------
        state_dict : mapping of str to array_like
            Exactly the keys of :meth:`state_dict`, each of the same shape,
            real floats or integers (converted to the model's dtype).
        check_finite : bool, default True
            Refuse parameters holding NaN or inf.

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
        # Everything is checked: neither load below can fail half-way.
        self.rnn.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("rnn.")},
                                 check_finite=False)
        self.head.load_state_dict({k[5:]: v for k, v in loaded.items() if k.startswith("head.")},
                                  check_finite=False)

    def get_flat_params(self):
        """Return every parameter in one 1-D array (a copy), in :meth:`state_dict` order.

        Returns
        -------
        ndarray
            ``(num_params,)`` in the model's dtype.
        """
        return flatten_params(self, self.state_dict())

    # -- forward and backward ------------------------------------------------

    def _time_major(self, y):
        """The rnn output ``y`` in the caller's layout as a (T, B, F) view, and ``batched``."""
        if y.ndim == 2:
            return y[:, None, :], False
        return (y.transpose(1, 0, 2) if self.rnn.batch_first else y), True

    def _from_time_major(self, arr, batched):
        if not batched:
            return arr[:, 0]
        return np.ascontiguousarray(arr.transpose(1, 0, 2)) if self.rnn.batch_first else arr

    def _last_steps(self, lengths, T):
        """For each direction of the top layer: (feature columns, step read per sequence)."""
        H = self.rnn._widths()[0]             # a direction's output width
        last = lengths - 1
        first = np.zeros_like(lengths)
        if self.rnn.bidirectional:
            return [(slice(0, H), last), (slice(H, 2 * H), first)]
        return [(slice(0, H), first if self.rnn.reverse else last)]

    def _forward(self, x, state, lengths, keep, check_finite, checkpoint=None):
        if keep:
            (y, _), rnn_pullback = self.rnn.vjp(x, state, lengths, check_finite=check_finite,
                                                checkpoint=checkpoint)
        else:
            (y, _), rnn_pullback = self.rnn(x, state, lengths, check_finite=check_finite), None
        yt, batched = self._time_major(y)
        T, B, F = yt.shape
        # The rnn has validated lengths against x already.
        lengths = check.lengths_array(lengths, B, T, batched)
        if self.mode == "last":
            columns = np.arange(B)
            feats = np.empty((B, F), dtype=self.dtype)
            for cols, steps in self._last_steps(lengths, T):
                feats[:, cols] = yt[steps, columns, cols]
            head_in = feats if batched else feats[0]
            mask = None
        else:
            head_in = y
            valid = np.arange(T)[:, None] < lengths[None, :]              # (T, B)
            mask = None if valid.all() else self._from_time_major(valid[:, :, None], batched)[..., 0]
        # The head reads the rnn's output, checked by the rnn's own checks.
        if keep:
            out, head_pullback = self.head.vjp(head_in, check_finite=False)
        else:
            out, head_pullback = self.head(head_in, check_finite=False), None
        if mask is not None:
            out[~mask] = 0
        return out, (yt.shape, batched, lengths, mask, rnn_pullback, head_pullback)

    def __call__(self, x, state=None, lengths=None, *, check_finite=True):
        """Run the rnn and the head (inference).

        Parameters
        ----------
        x : array_like
            As for the rnn: ``(T, B, I)`` (``(B, T, I)`` when
            ``rnn.batch_first``) or ``(T, I)`` for one unbatched sequence.
        state : optional
            The rnn's initial state; ``None`` means zeros.
        lengths : array_like of int, optional
            ``(B,)`` valid steps of each right-padded sequence.
        check_finite : bool, default True
            Raise ``ValueError`` if ``x`` (at valid steps) or the state holds
            NaN or inf; with ``False`` they propagate.

        Returns
        -------
        ndarray
            ``mode="last"``: ``(B, O)`` (``(O,)`` unbatched).
            ``mode="sequence"``: ``(T, B, O)`` in ``x``'s layout (``(T, O)``
            unbatched), exactly 0 at padded steps.  ``O`` is
            ``head.out_features``.
        """
        return self._forward(x, state, lengths, keep=False, check_finite=check_finite)[0]

    def vjp(self, x, state=None, lengths=None, *, check_finite=True, checkpoint=None):
        """Run the model and return a function for its vector-Jacobian product.

        Parameters are as for :meth:`__call__`; ``check_finite`` also applies
        to the pullback's ``dout`` (except at padded steps, which are ignored).
        ``checkpoint`` is passed to the rnn's ``vjp`` (gradient checkpointing).

        Returns
        -------
        out : ndarray
            As returned by :meth:`__call__`.
        pullback : callable
            ``pullback(dout) -> (dx, dparams)``: the gradients of
            ``sum(out * dout)`` with respect to ``x`` (shaped like ``x``) and
            to every parameter (a dict keyed like :meth:`state_dict`).  Entries
            of ``dout`` at padded steps are ignored.  It may be called any
            number of times.  (The gradient with respect to the initial state
            is the rnn's: use ``rnn.vjp`` and ``head.vjp`` for it.)
        """
        out, (shape, batched, lengths, mask, rnn_pullback, head_pullback) = self._forward(
            x, state, lengths, keep=True, check_finite=check_finite, checkpoint=checkpoint)
        T, B, F = shape
        out_shape = out.shape

        def pullback(dout):
            d = check.gradient(dout, "dout", out_shape, self.dtype)
            if check_finite:
                check.finite(d if mask is None else np.where(mask[..., None], d, 0), "dout")
            if self.mode == "last":
                dfeats, dhead = head_pullback(d)
                dfeats = dfeats.reshape(B, F)
                dyt = np.zeros((T, B, F), dtype=self.dtype)
                columns = np.arange(B)
                for cols, steps in self._last_steps(lengths, T):
                    dyt[steps, columns, cols] = dfeats[:, cols]
                dy = self._from_time_major(dyt, batched)
            else:
                if mask is not None:
                    d = np.where(mask[..., None], d, 0).astype(self.dtype, copy=False)
                dy, dhead = head_pullback(d)
            dx, _, drnn = rnn_pullback(dy, check_finite=False)
            dparams = {f"rnn.{name}": value for name, value in drnn.items()}
            dparams.update({f"head.{name}": value for name, value in dhead.items()})
            return dx, dparams

        return out, pullback

    def __repr__(self):
        return f"Readout({self.rnn!r}, {self.head!r}, mode={self.mode!r})"


# --------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------


def _check_model(model, name="model"):
    needed = ("_shapes", "dtype", "get_flat_params", "set_flat_params")
    if not all(hasattr(model, attr) for attr in needed):
        raise TypeError(f"{name} must be a fastgates model with parameters (LSTM, GRU, their cells, "
                        f"Linear, Readout), got {type(model).__name__}")


def _real(value, name, low=0.0, high=np.inf, high_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_high = value >= high if high_open else value > high
    if not (value >= low) or too_high or math.isinf(value):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in [{low}, {high}{bracket}, got {value!r}")
    return value


class Adam:
    """Adam (Kingma & Ba 2015) with ``torch.optim.Adam``'s update rule.

    At step ``t`` with gradient ``g`` of the parameters ``p``::

        g = g + weight_decay * p                     (if weight_decay != 0)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    the arithmetic of PyTorch's default (``amsgrad=False``,
    ``maximize=False``), including where ``eps`` enters: outside the square
    root and after the bias correction of ``v``.  ``weight_decay`` is
    Adam's L2 penalty added to the gradient, not AdamW's decoupled decay.

    Parameters
    ----------
    model : fastgates model
        ``LSTM``, ``GRU``, a cell, :class:`Linear` or :class:`Readout`; its
        parameters are updated in place by :meth:`step`.
    lr : float, default 1e-3
        Learning rate, ``>= 0``.
    betas : tuple of float, default (0.9, 0.999)
        Decay rates of the first and second moment estimates, each in
        ``[0, 1)``.
    eps : float, default 1e-8
        Added to the denominator, ``>= 0``.
    weight_decay : float, default 0.0
        L2 penalty, ``>= 0``.

    Attributes
    ----------
    steps : int
        Steps taken since construction or :meth:`zero_state`.

    Notes
    -----
    The moment estimates ``m`` and ``v`` are kept in the model's dtype, as
    ``torch.optim.Adam`` keeps them in the parameters' dtype: a float32
    model follows the arithmetic of a float32 torch model, and float64
    moments would buy nothing, because each update is rounded to the
    parameter's dtype anyway (the rounding of ``m`` and ``v``, relative
    ``6e-8`` in float32, changes the update by about as much, far below the
    rounding of ``p`` itself).  They are flat vectors in
    ``model.get_flat_params()`` order.

    The parameters are read from the model at each step, so parameters loaded
    between steps are the ones updated; the moments carry on (call
    :meth:`zero_state` to restart them).
    """

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        _check_model(model)
        self.model = model
        self.lr = _real(lr, "lr")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_real(betas[0], "betas[0]", 0.0, 1.0, high_open=True),
                      _real(betas[1], "betas[1]", 0.0, 1.0, high_open=True))
        self.eps = _real(eps, "eps")
        self.weight_decay = _real(weight_decay, "weight_decay")
        self.zero_state()

    def zero_state(self):
        """Forget the moment estimates and the step count (as a fresh optimiser)."""
        n = self.model.num_params
        self._m = np.zeros(n, dtype=self.model.dtype)
        self._v = np.zeros(n, dtype=self.model.dtype)
        self.steps = 0

    def step(self, grads, *, check_finite=True):
        """Update the model's parameters in place with one Adam step.

        Parameters
        ----------
        grads : mapping of str to array_like
            The gradient of the loss, keyed and shaped like
            ``model.state_dict()`` (the ``dparams`` of a pullback).
        check_finite : bool, default True
            Refuse gradients holding NaN or inf, before anything changes
            (:func:`clip_grad_norm` does not help there: a NaN norm makes
            every gradient NaN).  With ``False`` they propagate into the
            moments and parameters, as in ``torch.optim.Adam``.

        Raises
        ------
        ValueError
            If the keys or shapes of ``grads`` do not match the model's, or
            (with ``check_finite``) a gradient holds NaN or inf; nothing is
            changed then.
        TypeError
            If ``grads`` is not a mapping or holds non-real values.
        """
        try:
            g = flatten_params(self.model, grads)
        except ValueError as exc:
            raise ValueError(f"grads must match the model's parameters: {exc}") from None
        check_finite = check.boolean(check_finite, "check_finite")
        if check_finite and not np.isfinite(g).all():
            bad = [k for k in self.model._shapes if not np.isfinite(np.asarray(grads[k])).all()]
            raise ValueError(f"grads must be finite, got NaN or inf in {bad}; "
                             "pass check_finite=False to apply them anyway")
        beta1, beta2 = self.betas
        p = self.model.get_flat_params()
        if self.weight_decay != 0:
            with np.errstate(over="ignore", invalid="ignore"):
                g = g + self.weight_decay * p
        steps = self.steps + 1
        # On copies, committed only once the parameters are set, so that a
        # refused step (an update that overflows) changes nothing.  Overflow
        # follows IEEE arithmetic without NumPy's warnings.
        m, v = self._m.copy(), self._v.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            m += (1 - beta1) * (g - m)           # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= beta2
            v += (1 - beta2) * (g * g)
            step_size = self.lr / (1 - beta1 ** steps)
            denom = np.sqrt(v) / math.sqrt(1 - beta2 ** steps) + self.eps
            p -= step_size * (m / denom)
        # Through set_flat_params, so the model rebuilds what its kernels derive from the weights.
        self.model.set_flat_params(p, check_finite=check_finite)
        self._m, self._v, self.steps = m, v, steps

    def __repr__(self):
        return (f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}, "
                f"weight_decay={self.weight_decay!r})")


def clip_grad_norm(grads, max_norm, *, norm_type=2.0):
    """Scale gradients down so that their global norm is at most ``max_norm``.

    The arithmetic of ``torch.nn.utils.clip_grad_norm_``: the norm is taken
    over all entries of all arrays together, and every array is multiplied
    by ``min(1, max_norm / (total_norm + 1e-6))``.  The inputs are not
    modified.

    Parameters
    ----------
    grads : mapping of str to array_like
        Real floating-point arrays (e.g. the ``dparams`` of a pullback).
    max_norm : float
        ``>= 0``.
    norm_type : float, default 2.0
        The ``p`` of the p-norm, ``> 0``, or ``np.inf`` for the largest
        absolute entry.

    Returns
    -------
    clipped_grads : dict of str to ndarray
        New arrays, same keys, shapes and dtypes.
    total_norm : float
        The norm before clipping, computed in float64.

    Raises
    ------
    TypeError
        If ``grads`` is not a mapping or holds non-floating-point values.
    ValueError
        If ``max_norm`` is negative or ``norm_type`` not positive.
    """
    if not hasattr(grads, "keys"):
        raise TypeError(f"grads must be a mapping of names to arrays, got {type(grads).__name__}")
    max_norm = _real(max_norm, "max_norm")
    if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, (int, float, np.integer, np.floating)):
        raise TypeError(f"norm_type must be a positive number or np.inf, got {norm_type!r}")
    p = float(norm_type)
    if not p > 0:
        raise ValueError(f"norm_type must be positive, got {p!r}")
    arrays = {}
    for key, value in grads.items():
        try:
            arr = np.asarray(value) if value is not None else np.asarray(np.nan, dtype=object)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"grads[{key!r}] could not be converted to an array of numbers: {exc}") from None
        if arr.dtype.kind != "f":
            raise TypeError(f"grads[{key!r}] must hold real floating-point numbers, got dtype {arr.dtype}")
        arrays[key] = arr
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing norm is inf, as in torch
        flat = [np.abs(a.astype(np.float64, copy=False)).ravel() for a in arrays.values()]
        if math.isinf(p):
            total = max((float(a.max()) for a in flat if a.size), default=0.0)
        elif p == 2.0:
            total = math.sqrt(sum(float(a @ a) for a in flat))
        else:
            total = sum(float(np.sum(a ** p)) for a in flat) ** (1.0 / p)
        # As torch, multiply always (by exactly 1.0 when not clipping) so that a
        # NaN norm spreads to the gradients instead of passing silently.
        coef = max_norm / (total + 1e-6)
        coef = coef if coef < 1.0 or math.isnan(coef) else 1.0
        return {key: a * a.dtype.type(coef) for key, a in arrays.items()}, total


# --------------------------------------------------------------------------
# SciPy
# --------------------------------------------------------------------------


def _runner(model, x, state, lengths, checkpoint):
    """A function running ``model.vjp`` on the data, returning (pred, pullback to dparams)."""
    if isinstance(model, Readout):
        def run():
            out, pullback = model.vjp(x, state, lengths, checkpoint=checkpoint)
            return out, lambda d: pullback(d)[1]
    elif isinstance(model, _Recurrent):
        def run():
            (y, _), pullback = model.vjp(x, state, lengths, checkpoint=checkpoint)
            return y, lambda d: pullback(d)[2]
    elif isinstance(model, (Linear, ForgettingAttention)):
        if state is not None or lengths is not None or checkpoint is not None:
            raise ValueError(f"state, lengths and checkpoint must be None for a {type(model).__name__} model")

        def run():
            out, pullback = model.vjp(x)
            return out, lambda d: pullback(d)[1]
    else:
        raise TypeError(f"model must be a fastgates Readout, recurrent layer (LSTM, GRU, JANET, "
                        f"MGU), ForgettingAttention or Linear, got {type(model).__name__}")
    return run


def scipy_objective(model, loss, x, target, *, state=None, lengths=None, checkpoint=None):
    """The objective ``fun(v) -> (loss, grad)`` of ``scipy.optimize.minimize(..., jac=True)``.

    ::

        fun = fg.scipy_objective(model, "mse", x, target)
        res = scipy.optimize.minimize(fun, model.get_flat_params(), jac=True,
                                      method="L-BFGS-B")
        model.set_flat_params(res.x)

    Parameters
    ----------
    model : Readout, a recurrent layer (LSTM, GRU, JANET, MGU, SLSTM), ForgettingAttention or Linear
        The prediction is ``model(x, state, lengths)`` for a
        :class:`Readout`, the output sequence ``y`` for an ``LSTM``/``GRU``,
        ``model(x)`` for a :class:`Linear` or a
        :class:`~fastgates.ForgettingAttention` (``state`` and ``lengths``
        must then be ``None``).
    loss : {"mse", "cross_entropy"} or callable
        :func:`mse_loss`, :func:`cross_entropy_loss`, or any
        ``loss(pred, target) -> (loss_value, dpred)`` with ``dpred`` the
        gradient of ``loss_value`` with respect to ``pred``.
    x : array_like
        The inputs, as the model takes them.
    target : array_like
        Passed to ``loss`` unchanged.
    state, lengths : optional
        Passed to the model.
    checkpoint : int, optional
        Gradient checkpointing for long sequences, as for the rnn's ``vjp``
        (the same gradients, less memory, one more forward pass).

    Returns
    -------
    fun : callable
        ``fun(v) -> (loss_value, grad)``: ``v`` is a parameter vector laid
        out as ``model.get_flat_params()``; ``loss_value`` a float and
        ``grad`` its gradient, a float64 vector in the same order
        (:func:`fastgates.flatten_params`).

    Notes
    -----
    ``fun(v)`` **sets the model's parameters to** ``v`` (rounded to the
    model's dtype) at each call, so after a minimisation the model holds the
    last point evaluated, which need not be the result: set ``res.x``
    explicitly.  For L-BFGS use a float64 model: a float32 model rounds ``v``
    and computes the loss and gradient in float32, whose noise (relative
    ``1e-7``) stalls the line searches long before float64 would.

    Arguments are checked at the first call of ``fun``.
    """
    _check_model(model)
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"loss must be 'mse', 'cross_entropy' or a callable, got {loss!r}")
        loss_fn = _LOSSES[loss]
    elif callable(loss):
        loss_fn = loss
    else:
        raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable, got {type(loss).__name__}")
    run = _runner(model, x, state, lengths, checkpoint)

    def fun(v):
        model.set_flat_params(v)
        pred, pullback = run()
        value, dpred = loss_fn(pred, target)
        grad = flatten_params(model, pullback(dpred))
        return float(value), grad.astype(np.float64)

    return fun
