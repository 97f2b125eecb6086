"""PyTorch interoperability: converters and drop-in ``torch.nn`` modules.

fastgates uses PyTorch's layout natively (parameter names, shapes, gate order,
state layout), so moving a model across is a copy of its parameters:

- :func:`from_torch` turns an ``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell`` or
  ``nn.GRUCell`` into the fastgates model with the same parameters (bitwise);
- :func:`to_torch` does the reverse;
- :class:`LSTM` and :class:`GRU` are ``torch.nn`` modules, subclasses of
  ``nn.LSTM`` and ``nn.GRU`` with the same constructor, parameters and
  initialisation, whose forward and backward passes run fastgates' compiled
  kernels on CPU tensors (through a ``torch.autograd.Function``).

This module imports torch; ``import fastgates`` does not import it (the
wrappers ``fastgates.from_torch`` and ``fastgates.to_torch`` import this
module on first call).  See ``docs/interop_torch.md``.
"""

import weakref

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import layers

__all__ = ["from_torch", "to_torch", "LSTM", "GRU"]

_NUMPY_DTYPE = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_TORCH_DTYPE = {v: k for k, v in _NUMPY_DTYPE.items()}

_DOUBLE_BACKWARD = (
    "{what} does not support double backward (backward or autograd.grad with "
    "create_graph=True): its backward pass runs fastgates' compiled NumPy kernels, "
    "which autograd cannot differentiate, and treating their result as a constant "
    "would give wrong higher-order gradients. Use torch.nn.{base} for "
    "higher-order derivatives."
)


# ---------------------------------------------------------------------------
# checks shared by the converters and the modules


def _param_names(num_layers, bidirectional, bias, cell=False, proj=False):
    """PyTorch's (and fastgates') parameter names, in registration order."""
    kinds = (["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else [])
             + (["weight_hr"] if proj else []))
    if cell:
        return kinds
    return [f"{kind}_l{layer}{'_reverse' if d else ''}"
            for layer in range(num_layers) for d in range(2 if bidirectional else 1)
            for kind in kinds]


def _check_cpu(tensor, what):
    if tensor.device.type != "cpu":
        raise ValueError(
            f"{what} is on device {tensor.device}, expected the CPU: fastgates runs on the "
            "CPU only (move it with .cpu())"
        )


def _common_dtype(named_tensors, what):
    """The one dtype of ``named_tensors``, which must be float32 or float64."""
    dtypes = {name: t.dtype for name, t in named_tensors}
    kinds = set(dtypes.values())
    if len(kinds) != 1:
        listed = ", ".join(f"{name}: {dt}" for name, dt in dtypes.items())
        raise TypeError(f"{what} must all have one dtype, got {listed}")
    dtype = kinds.pop()
    if dtype not in _NUMPY_DTYPE:
        raise TypeError(
            f"{what} have dtype {dtype}, expected torch.float32 or torch.float64: fastgates "
            "computes in those two only (convert with .float() or .double())"
        )
    return dtype


def _params_as_numpy(module, names, what):
    """``{name: ndarray}`` views of the module's parameters, checked."""
    tensors = [(name, getattr(module, name)) for name in names]
    for name, t in tensors:
        _check_cpu(t, f"{what} parameter {name}")
    dtype = _common_dtype(tensors, f"the parameters of {what}")
    return {name: t.detach().numpy() for name, t in tensors}, _NUMPY_DTYPE[dtype]


# ---------------------------------------------------------------------------
# converters


def from_torch(module):
    """Return the fastgates model with the parameters of a PyTorch module.

    Parameters
    ----------
    module : torch.nn.LSTM, torch.nn.GRU, torch.nn.LSTMCell or torch.nn.GRUCell
        On the CPU, with float32 or float64 parameters (the model's dtype).
        :class:`LSTM` and :class:`GRU` of this module are accepted too.

    Returns
    -------
    fastgates.LSTM, fastgates.GRU, fastgates.LSTMCell or fastgates.GRUCell
        With the module's ``input_size``, ``hidden_size``, ``num_layers``,
        ``bias``, ``batch_first`` and ``bidirectional``, and a bitwise copy of
        its parameters (later changes to either side do not reach the other).
        A GRU gets ``reset_after=True``, PyTorch's form.

    Raises
    ------
    TypeError
        If ``module`` is of another type, or its parameters are not all
        float32 or all float64.
    ValueError
        If a parameter is not on the CPU.

    Examples
    --------
    >>> import torch, fastgates as fg
    >>> m = fg.from_torch(torch.nn.GRU(3, 5, num_layers=2))
    >>> m
    GRU(3, 5, num_layers=2, dtype=float32)
    """
    if isinstance(module, (nn.LSTM, nn.GRU)):
        kind = "lstm" if isinstance(module, nn.LSTM) else "gru"
        what = f"module {type(module).__name__}"
        proj = getattr(module, "proj_size", 0)
        names = _param_names(module.num_layers, module.bidirectional, module.bias, proj=proj > 0)
        params, dtype = _params_as_numpy(module, names, what)
        options = {"proj_size": proj} if proj else {}
        cls = layers.LSTM if kind == "lstm" else layers.GRU
        model = cls(module.input_size, module.hidden_size, module.num_layers, bias=module.bias,
                    batch_first=module.batch_first, bidirectional=module.bidirectional,
                    dropout=module.dropout, dtype=dtype, seed=0, **options)
    elif isinstance(module, (nn.LSTMCell, nn.GRUCell)):
        what = f"module {type(module).__name__}"
        names = _param_names(1, False, module.bias, cell=True)
        params, dtype = _params_as_numpy(module, names, what)
        cls = layers.LSTMCell if isinstance(module, nn.LSTMCell) else layers.GRUCell
        model = cls(module.input_size, module.hidden_size, bias=module.bias, dtype=dtype, seed=0)
    else:
        raise TypeError(
            "module must be a torch.nn.LSTM, GRU, LSTMCell or GRUCell, "
            f"got {type(module).__module__}.{type(module).__qualname__}"
        )
    # A conversion copies the parameters exactly, NaN and inf included.
    model.load_state_dict(params, check_finite=False)
    return model


def _variants_torch_lacks(model):
    """The options of a fastgates model that no torch.nn module has."""
    found = []
    if getattr(model, "reverse", False):
        found.append("reverse=True")
    clip = getattr(model, "clip", None)
    if clip is not None and clip < np.inf:
        found.append(f"clip={clip!r}")
    for option in ("peephole", "input_forget"):
        if getattr(model, option, False):
            found.append(f"{option}=True")
    return found


def to_torch(model, dropin=False):
    """Return the PyTorch module equivalent to a fastgates model.

    Parameters
    ----------
    model : fastgates.LSTM, fastgates.GRU, fastgates.LSTMCell or fastgates.GRUCell
        A GRU must have ``reset_after=True``.
    dropin : bool, default False
        Return this module's :class:`LSTM` or :class:`GRU` (a subclass of the
        ``torch.nn`` class that computes with fastgates) instead of
        ``torch.nn.LSTM`` or ``torch.nn.GRU``.  Not available for cells.

    Returns
    -------
    torch.nn.Module
        ``torch.nn.LSTM``, ``GRU``, ``LSTMCell`` or ``GRUCell`` on the CPU,
        with the model's dtype and options and a bitwise copy of its
        parameters.  Building it leaves PyTorch's global random generator
        untouched.

    Raises
    ------
    TypeError
        If ``model`` is not a fastgates LSTM, GRU or one of their cells
        (torch.nn has no JANET or MGU).
    NotImplementedError
        For a model with an option ``torch.nn`` lacks: ``reverse=True``,
        ``clip``, ``peephole=True`` or ``input_forget=True``; and for a GRU
        with ``reset_after=False``: PyTorch has only the reset-after form
        ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, and no
        re-parametrisation turns one form into the other.  Also for
        ``dropin=True`` with a cell.
    """
    if not isinstance(dropin, bool):
        raise TypeError(f"dropin must be True or False, got {type(dropin).__name__} {dropin!r}")
    layers.refuse_without_counterpart(model, "torch.nn")
    variants = _variants_torch_lacks(model)
    if variants:
        raise NotImplementedError(
            f"model is {model!r}: torch.nn has no equivalent of {', '.join(variants)} "
            "(torch.nn.LSTM and GRU read forwards or in both directions, with no clipping, "
            "peepholes or coupled gates); fastgates.to_onnx can export such a model"
        )
    if isinstance(model, (layers.GRU, layers.GRUCell)) and not model.reset_after:
        raise NotImplementedError(
            f"model is {model!r} with reset_after=False; PyTorch has only the reset-after "
            "GRU (n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), which computes a different "
            "function: a reset_after=False GRU has no torch.nn equivalent"
        )
    if isinstance(model, (layers.LSTM, layers.GRU)):
        if dropin:
            cls = LSTM if isinstance(model, layers.LSTM) else GRU
        else:
            cls = nn.LSTM if isinstance(model, layers.LSTM) else nn.GRU
        args = dict(input_size=model.input_size, hidden_size=model.hidden_size,
                    num_layers=model.num_layers, bias=model.bias, batch_first=model.batch_first,
                    bidirectional=model.bidirectional, dropout=model.dropout)
        if getattr(model, "proj_size", 0):
            args["proj_size"] = model.proj_size
    elif isinstance(model, (layers.LSTMCell, layers.GRUCell)):
        if dropin:
            raise NotImplementedError(
                f"dropin=True is for LSTM and GRU models, got {type(model).__name__}: "
                "fastgates.torch has no drop-in cell modules"
            )
        cls = nn.LSTMCell if isinstance(model, layers.LSTMCell) else nn.GRUCell
        args = dict(input_size=model.input_size, hidden_size=model.hidden_size, bias=model.bias)
    else:
        raise TypeError(
            "model must be a fastgates LSTM, GRU, LSTMCell or GRUCell, "
            f"got {type(model).__module__}.{type(model).__qualname__}"
        )
    # The constructor draws PyTorch's default initialisation from the global
    # generator; these values are overwritten at once, so the draw is undone.
    with torch.random.fork_rng(devices=[]):
        module = cls(**args, dtype=_TORCH_DTYPE[model.dtype])
    module.load_state_dict({name: torch.from_numpy(v) for name, v in model.state_dict().items()})
    return module


# ---------------------------------------------------------------------------
# drop-in modules


def _check_factory(what, device=None, dtype=None):
    """Reject at construction what the forward pass could never run."""
    if device is not None and torch.device(device).type not in ("cpu", "meta"):
        raise ValueError(
            f"{what}: device={device!r} is not supported, expected the CPU: fastgates runs on "
            "the CPU only (use torch.nn for other devices)"
        )
    if dtype is not None and dtype not in _NUMPY_DTYPE:
        raise TypeError(
            f"{what}: dtype={dtype} is not supported, expected torch.float32 or torch.float64"
        )


# One fastgates model per module and configuration, made on first use.  Kept
# outside the module so that copying, pickling or saving the module never
# carries it.
_MODELS = weakref.WeakKeyDictionary()

_BITS = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


class _Slot:
    """A fastgates model and what its parameters were last loaded from."""

    def __init__(self, model):
        self.model = model
        self.loaded_from = None


def _fastgates_model(module, kind, dtype):
    proj = getattr(module, "proj_size", 0)
    key = (kind, dtype, module.input_size, module.hidden_size, module.num_layers, module.bias,
           module.bidirectional, proj)
    cache = _MODELS.setdefault(module, {})
    slot = cache.get(key)
    if slot is None:
        # Always time-major: the module transposes batch-first tensors itself,
        # as views, and packed sequences are padded time-major.
        cls = layers.LSTM if kind == "lstm" else layers.GRU
        options = {"proj_size": proj} if proj else {}
        slot = cache[key] = _Slot(cls(module.input_size, module.hidden_size, module.num_layers,
                                      bias=module.bias, bidirectional=module.bidirectional,
                                      dtype=dtype, seed=0, **options))
    return slot


def _same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def _version(tensor):
    try:
        return tensor._version
    except (AttributeError, RuntimeError):  # inference tensors keep no counter
        return None


def _sync_parameters(slot, names, params):
    """Load the module's parameters into the fastgates model unless unchanged.

    A load copies them (tens of microseconds) and makes the model rebuild the
    weight layouts its kernels use (measured: several times the copy, and
    more than the recurrence itself for short inputs), so it is skipped when the model
    provably holds the same values: the same tensors at the same version
    counters (any in-place change, an optimizer step included, moves the
    counter) and the same bits (edits through ``.data`` or ``.numpy()`` move
    no counter, so the contents are compared too).  Correctness rests on the
    comparison alone; the counters only spare it when a step has just run.
    """
    arrays = [p.detach().numpy() for p in params]
    source = tuple((id(p), p.data_ptr(), _version(p)) for p in params)
    model = slot.model
    if source == slot.loaded_from and all(
            _same_bits(a, getattr(model, name)) for name, a in zip(names, arrays)):
        return
    slot.loaded_from = None  # a failed load must not leave a stale record
    # As torch.nn: NaN or inf parameters propagate instead of raising.
    model.load_state_dict(dict(zip(names, arrays)), check_finite=False)
    slot.loaded_from = source


class _Run:
    """One forward call: the fastgates model and the layout of the input.

    Moves arrays between the module's tensors and fastgates' time-major
    NumPy arrays: a plain input (already time-major) as it is, a packed
    sequence's data ``(N, F)`` to and from right-padded ``(T, B, F)``.
    """

    def __init__(self, model, kind, names, batch_sizes=None, masks=None):
        self.model = model
        self.kind = kind
        self.names = names
        self.masks = masks        # dropout between layers: a function of (T, B), or None
        self.valid = self.lengths = None
        self.full = True
        if batch_sizes is not None:
            sizes = batch_sizes.numpy()
            # Packed data lists step 0's batch_sizes[0] rows, then step 1's
            # batch_sizes[1] rows, ...: exactly the True entries of this mask
            # in C order, so one boolean index packs or unpacks.
            self.valid = np.arange(sizes[0]) < sizes[:, None]
            self.lengths = self.valid.sum(axis=0)
            self.full = bool(sizes[-1] == sizes[0])  # every sequence has all steps

    def to_padded(self, a):
        if self.valid is None:
            return a
        T, B = self.valid.shape
        if self.full:
            return a.reshape(T, B, a.shape[-1])
        out = np.zeros((T, B, a.shape[-1]), dtype=a.dtype)
        out[self.valid] = a
        return out

    def to_packed(self, a):
        if self.valid is None:
            return a
        if self.full:
            return a.reshape(-1, a.shape[-1])
        return a[self.valid]

    def lengths_or_none(self):
        return None if self.full else self.lengths

    def state_in(self, h0, c0):
        h = None if h0 is None else h0.detach().numpy()
        if self.kind == "gru":
            return h
        c = None if c0 is None else c0.detach().numpy()
        return None if h is None and c is None else (h, c)

    def outputs(self, y, state):
        y = torch.from_numpy(np.ascontiguousarray(self.to_packed(y)))
        if self.kind == "gru":
            return y, torch.from_numpy(state)
        return y, torch.from_numpy(state[0]), torch.from_numpy(state[1])

    def infer(self, x, h0, c0):
        """The forward pass without a tape (nothing will be differentiated)."""
        args = (self.to_padded(x.detach().numpy()), self.state_in(h0, c0), self.lengths_or_none())
        if self.masks is None:
            y, state = self.model(*args, check_finite=False)
        else:
            # training mode drops under no_grad too (as torch.nn.LSTM)
            (y, state), _ = self.model._vjp(*args, False, None, self.masks)
        return self.outputs(y, state)

    def vjp(self, x, h0, c0):
        """The forward pass and its pullback (``check_finite=False``: NaN propagates)."""
        return self.model._vjp(self.to_padded(x.detach().numpy()), self.state_in(h0, c0),
                               self.lengths_or_none(), False, None, self.masks)


def _as_numpy(grad):
    return None if grad is None else grad.detach().numpy()


class _Recurrence(torch.autograd.Function):
    """Forward with ``model.vjp``, backward with its pullback."""

    @staticmethod
    def forward(ctx, run, x, h0, c0, *params):
        # Unused outputs get no zero gradient: fastgates reads None as zeros.
        ctx.set_materialize_grads(False)
        # check_finite=False, here and in the pullback: NaN propagates as in torch.nn.
        (y, state), pullback = run.vjp(x, h0, c0)
        ctx.run = run
        ctx.pullback = pullback
        return run.outputs(y, state)

    @staticmethod
    def backward(ctx, dy, *dstate):
        run = ctx.run
        if torch.is_grad_enabled():
            base = "LSTM" if run.kind == "lstm" else "GRU"
            raise RuntimeError(_DOUBLE_BACKWARD.format(what=f"fastgates.torch.{base}", base=base))
        if dy is not None:
            dy = run.to_padded(dy.detach().numpy())
        if run.kind == "gru":
            ds = _as_numpy(dstate[0])
        else:
            dh, dc = _as_numpy(dstate[0]), _as_numpy(dstate[1])
            ds = None if dh is None and dc is None else (dh, dc)
        dx, ds0, dparams = ctx.pullback(dy, ds)
        need = ctx.needs_input_grad
        dh0, dc0 = (ds0, None) if run.kind == "gru" else ds0
        grads = [None,
                 torch.from_numpy(np.ascontiguousarray(run.to_packed(dx))) if need[1] else None,
                 torch.from_numpy(dh0) if need[2] else None,
                 torch.from_numpy(dc0) if need[3] and dc0 is not None else None]
        grads += [torch.from_numpy(dparams[name]) if need[4 + k] else None
                  for k, name in enumerate(run.names)]
        return tuple(grads)


def _check_state(kind, hx, batched):
    """Check hx's type and rank like torch.nn does; return it batched (3-D)."""
    if hx is None:
        return None
    rank = 3 if batched else 2
    layout = "batched 3-D" if batched else "unbatched 2-D"
    if kind == "lstm":
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx of an LSTM must be a tuple (h_0, c_0) or None, got {type(hx).__name__}")
        for name, t in zip(("h_0", "c_0"), hx):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"hx {name} must be a tensor, got {type(t).__name__}")
        if hx[0].dim() != rank or hx[1].dim() != rank:
            raise RuntimeError(
                f"For {layout} input, hx and cx should also be {rank}-D but got "
                f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        return tuple(hx) if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    if not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx of a GRU must be a tensor or None, got {type(hx).__name__}")
    if hx.dim() != rank:
        raise RuntimeError(f"For {layout} input, hx should also be {rank}-D but got {hx.dim()}-D tensor")
    return hx if batched else hx.unsqueeze(1)


def _check_sizes(module, kind, x, h0, c0, batch, dtype, what):
    """Check input and state sizes and dtypes with torch.nn's exception types."""
    if x.dtype != dtype:
        raise ValueError(
            f"input has dtype {x.dtype}, expected {dtype}, the dtype of the parameters of "
            f"{what} (convert the input with .to({dtype}) or the module with .to({x.dtype}))"
        )
    if x.size(-1) != module.input_size:
        raise RuntimeError(
            f"input.size(-1) must be equal to input_size. Expected {module.input_size}, "
            f"got {x.size(-1)}"
        )
    num = module.num_layers * (2 if module.bidirectional else 1)
    widths = (getattr(module, "proj_size", 0) or module.hidden_size, module.hidden_size)
    for k, (name, t) in enumerate((("h_0", h0), ("c_0", c0))):
        if t is None:
            continue
        expected = (num, batch, widths[k])
        if tuple(t.shape) != expected:
            label = f"hidden[{k}]" if kind == "lstm" else "hidden"
            raise RuntimeError(f"Expected {label} size {expected}, got {list(t.shape)}")
        _check_cpu(t, f"hx {name}")
        if t.dtype != dtype:
            raise ValueError(f"hx {name} has dtype {t.dtype}, expected {dtype}, the dtype of "
                             f"the parameters of {what}")


def _dropout_masks(module, dtype):
    """The dropout between layers of a module in training mode, drawn from torch's generator.

    A function of (T, B) returning one ``(T, B, D*H)`` mask per layer but
    the last (0 with probability ``dropout``, else ``1 / (1 - dropout)``),
    or None when nothing drops: ``torch.manual_seed`` repeats the masks.
    """
    p = float(module.dropout)
    if not (module.training and p > 0 and module.num_layers > 1):
        return None
    F = (2 if module.bidirectional else 1) * (getattr(module, "proj_size", 0) or module.hidden_size)
    scale = 0.0 if p == 1 else 1.0 / (1.0 - p)

    def draw(T, B):
        return [torch.empty((T, B, F), dtype=dtype).bernoulli_(1.0 - p).mul_(scale).numpy()
                for _ in range(module.num_layers - 1)]

    return draw


def _forward(module, kind, input, hx):
    """The forward pass shared by :class:`LSTM` and :class:`GRU`."""
    what = f"fastgates.torch.{type(module).__name__}"
    names = _param_names(module.num_layers, module.bidirectional, module.bias,
                         proj=getattr(module, "proj_size", 0) > 0)
    params = [getattr(module, name) for name in names]
    for name, p in zip(names, params):
        _check_cpu(p, f"{what} parameter {name}")
    dtype = _common_dtype(list(zip(names, params)), f"the parameters of {what}")

    packed = isinstance(input, PackedSequence)
    if packed:
        x, batch_sizes, sorted_indices, unsorted_indices = input
        if x.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {x.dim()}")
        batched = True
        batch = int(batch_sizes[0])
        hx = _check_state(kind, hx, True)
    else:
        if not isinstance(input, torch.Tensor):
            raise TypeError(
                f"input must be a tensor or a PackedSequence, got {type(input).__name__}"
            )
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{type(module).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead"
            )
        batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        hx = _check_state(kind, hx, batched)
        batch = input.size(batch_dim)
        x, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
    _check_cpu(x, "input")
    h0, c0 = (None, None) if hx is None else (hx if kind == "lstm" else (hx, None))
    _check_sizes(module, kind, x, h0, c0, batch, dtype, what)
    if sorted_indices is not None and h0 is not None:
        # hx follows the caller's batch order; packed data is sorted by length.
        h0 = h0.index_select(1, sorted_indices)
        c0 = None if c0 is None else c0.index_select(1, sorted_indices)
    if not packed and module.batch_first:
        x = x.transpose(0, 1)  # a view; autograd transposes the gradient back

    slot = _fastgates_model(module, kind, _NUMPY_DTYPE[dtype])
    _sync_parameters(slot, names, params)
    run = _Run(slot.model, kind, names, batch_sizes, _dropout_masks(module, dtype))

    inputs = [x, h0, c0] + params
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        out = _Recurrence.apply(run, x, h0, c0, *params)
    else:
        out = run.infer(x, h0, c0)
    y, hn = out[0], out[1]
    cn = out[2] if kind == "lstm" else None

    if packed:
        y = PackedSequence(y, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            hn = hn.index_select(1, unsorted_indices)
            cn = None if cn is None else cn.index_select(1, unsorted_indices)
    else:
        if module.batch_first:
            y = y.transpose(0, 1)
        if not batched:
            y = y.squeeze(batch_dim)
            hn = hn.squeeze(1)
            cn = None if cn is None else cn.squeeze(1)
    return y, (hn if kind == "gru" else (hn, cn))


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` computed by fastgates' kernels, on CPU tensors.

    A subclass of ``torch.nn.LSTM`` with the same constructor, parameters
    (names, shapes, ``nn.Parameter``), default initialisation (the same
    ``torch.manual_seed`` gives the same weights), ``state_dict`` and
    ``forward(input, hx=None)`` contract, including unbatched 2-D input and
    ``PackedSequence`` input (sorted or not).  Forward and backward run
    fastgates through a ``torch.autograd.Function``; under ``torch.no_grad()``,
    ``torch.inference_mode()`` or when nothing requires grad, the cheaper
    inference pass runs instead.  The parameters are read at every call, so
    optimizers and in-place edits work as with ``nn.LSTM``.

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int, default 1
    bias : bool, default True
    batch_first : bool, default False
    dropout : float, default 0.0
        As in PyTorch: in training mode each output of every layer but the
        last is zeroed with probability ``dropout`` and the others scaled
        by ``1 / (1 - dropout)``; the masks come from torch's generator, so
        ``torch.manual_seed`` repeats a run.  No effect in eval mode.
    bidirectional : bool, default False
    proj_size : int, default 0
        As in PyTorch: ``h`` and the output have ``proj_size`` units,
        ``weight_hr_l{k}`` projects ``o ⊙ tanh(c)`` to them.
    device : None, "cpu" or torch.device
        Other devices raise ``ValueError`` ("meta" is accepted for deferred
        initialisation; the forward pass needs CPU tensors).
    dtype : None, torch.float32 or torch.float64
        ``None`` means torch's default dtype; other dtypes raise ``TypeError``.

    Notes
    -----
    Double backward (``create_graph=True``) raises ``RuntimeError``.
    ``torch.jit.script``, ``torch.func`` transforms and devices other than
    the CPU are not supported.

    Examples
    --------
    >>> import torch, fastgates.torch as fgt
    >>> _ = torch.manual_seed(0)
    >>> m = fgt.LSTM(3, 5, num_layers=2, batch_first=True)
    >>> y, (h, c) = m(torch.randn(2, 7, 3))
    >>> y.shape, h.shape
    (torch.Size([2, 7, 5]), torch.Size([2, 2, 5]))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        _check_factory("fastgates.torch.LSTM", device, dtype)
        super().__init__(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                         bias=bias, batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional, proj_size=proj_size, device=device,
                         dtype=dtype)
        _check_factory("fastgates.torch.LSTM", dtype=self.weight_ih_l0.dtype)

    def forward(self, input, hx=None):
        """Run the LSTM, as ``torch.nn.LSTM.forward``.

        Parameters
        ----------
        input : Tensor or PackedSequence
            ``(T, B, I)`` (``(B, T, I)`` when ``batch_first``), ``(T, I)``
            unbatched, or a ``PackedSequence``; on the CPU, in the
            parameters' dtype.
        hx : tuple of Tensor, optional
            ``(h_0, c_0)``, each ``(L*D, B, H)`` (``(L*D, H)`` unbatched), in
            the caller's batch order also for a packed input.  ``None`` means
            zeros.

        Returns
        -------
        output : Tensor or PackedSequence
            Like ``input``, with ``D*H`` features.
        (h_n, c_n) : tuple of Tensor
            Final states, shaped like ``hx``.
        """
        return _forward(self, "lstm", input, hx)


class GRU(nn.GRU):
    """``torch.nn.GRU`` computed by fastgates' kernels, on CPU tensors.

    A subclass of ``torch.nn.GRU`` with the same constructor, parameters,
    default initialisation and ``forward(input, hx=None)`` contract; see
    :class:`LSTM` for what is and is not supported.  The GRU is PyTorch's
    (fastgates' ``reset_after=True``).

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int, default 1
    bias : bool, default True
    batch_first : bool, default False
    dropout : float, default 0.0
        As for :class:`LSTM`.
    bidirectional : bool, default False
    device : None, "cpu" or torch.device
    dtype : None, torch.float32 or torch.float64

    Examples
    --------
    >>> import torch, fastgates.torch as fgt
    >>> m = fgt.GRU(3, 5, bidirectional=True)
    >>> y, h = m(torch.randn(7, 3))
    >>> y.shape, h.shape
    (torch.Size([7, 10]), torch.Size([2, 5]))
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        _check_factory("fastgates.torch.GRU", device=device, dtype=dtype)
        super().__init__(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                         bias=bias, batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional, device=device, dtype=dtype)
        _check_factory("fastgates.torch.GRU", dtype=self.weight_ih_l0.dtype)

    def forward(self, input, hx=None):
        """Run the GRU, as ``torch.nn.GRU.forward``.

        Parameters
        ----------
        input : Tensor or PackedSequence
            As for :meth:`LSTM.forward`.
        hx : Tensor, optional
            ``h_0``, ``(L*D, B, H)`` (``(L*D, H)`` unbatched); ``None`` means
            zeros.

        Returns
        -------
        output : Tensor or PackedSequence
        h_n : Tensor
        """
        return _forward(self, "gru", input, hx)
