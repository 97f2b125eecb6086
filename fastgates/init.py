"""Initialisers that rewrite a model's parameters in place.

Each function takes a fastgates recurrent model (:class:`~fastgates.LSTM`,
:class:`~fastgates.GRU`, :class:`~fastgates.JANET`, :class:`~fastgates.MGU`,
:class:`~fastgates.LSTMCell`, :class:`~fastgates.GRUCell`), computes new
parameters in PyTorch's layout (names, shapes, gate order: i, f, g, o;
r, z, n; f, n), loads them with ``model.load_state_dict`` and returns the model, so
calls chain::

    m = fg.init.forget_bias(fg.init.orthogonal(fg.LSTM(8, 32), seed=0), 1.0)

Random draws are made in float64 from ``np.random.default_rng(seed)`` in the
order of ``model.state_dict()`` and then rounded to the model's dtype, so a
seed gives the same model in float32 and float64 (up to that rounding).

Gate blocks
-----------
PyTorch stacks the weights of the gates of one layer-direction in one matrix:
``weight_ih`` is ``(G*H, I)`` and ``weight_hh`` ``(G*H, H)`` with ``G = 4``
(LSTM, sLSTM), ``3`` (GRU) or ``2`` (JANET, MGU).  Each block of ``H`` rows is the weight matrix of one
gate, a separate linear map whose ``H`` outputs go through their own
nonlinearity.  :func:`xavier_uniform` and :func:`orthogonal` therefore work
per block, with ``fan_in = I`` (or ``H``) and ``fan_out = H``:

- Glorot & Bengio's variance argument is about one linear map: keep the
  variance of its outputs (forward) and of the gradient with respect to its
  inputs (backward) equal to that of its inputs.  The outputs of a gate's
  map are that gate's ``H`` pre-activations, so its ``fan_out`` is ``H``.
  Treating the stacked matrix as one map (Keras's ``glorot_uniform`` on the
  whole ``(I, 4H)`` kernel, or ``torch.nn.init.xavier_uniform_`` on
  ``weight_ih``) counts ``fan_out = 4H``, which shrinks every gate's weights
  by a factor ``sqrt((I + H) / (I + 4H))`` only because of how the storage
  happens to be arranged, and gives an LSTM and a GRU of the same size
  different per-gate scales.
- Orthogonality is only meaningful per block: a ``(4H, H)`` matrix can have
  orthonormal columns, but its ``H x H`` gate blocks are then not orthogonal
  (each has singular values about ``1/2``), while what matters for the
  recurrence is that each gate's map ``h -> W h`` preserves norms (Saxe et
  al. 2014).
- An sLSTM's ``weight_hh`` ``(4H, d)`` holds one ``(d, d)`` block per gate
  and head (``d = H // num_heads``), each a map of its own: the blocks are
  drawn per gate and head, with ``fan_in = fan_out = d``.

Peepholes
---------
An LSTM built with ``peephole=True`` has ``weight_peep_l{k}`` ``(3, H)``
(rows ``p_i, p_f, p_o``).  :func:`pytorch_default` draws them like every other
parameter (as the constructor does); :func:`xavier_uniform` and
:func:`orthogonal` set them to 0, ONNX's value for a missing ``P``, so that
the model starts as a plain LSTM (each peephole weight multiplies one cell
value, so neither a fan-in/fan-out nor an orthogonality argument gives it a
scale); :func:`forget_bias` and :func:`chrono` change biases only and leave
them alone.

References
----------
Glorot, X. and Bengio, Y. (2010). Understanding the difficulty of training
deep feedforward neural networks. AISTATS.

Saxe, A. M., McClelland, J. L. and Ganguli, S. (2014). Exact solutions to the
nonlinear dynamics of learning in deep linear neural networks. ICLR.

Jozefowicz, R., Zaremba, W. and Sutskever, I. (2015). An empirical
exploration of recurrent network architectures. ICML.

Tallec, C. and Ollivier, Y. (2018). Can recurrent neural networks warp time?
ICLR.
"""

import numbers

import numpy as np

from .layers import _Cell, _init_params, _Recurrent

__all__ = ["pytorch_default", "xavier_uniform", "orthogonal", "forget_bias", "chrono"]

# -- argument checking ---------------------------------------------------------

def _check_model(model):
    if not isinstance(model, (_Recurrent, _Cell)):
        raise TypeError("model must be a fastgates recurrent model (LSTM, GRU, JANET, MGU, SLSTM, "
                        f"LSTMCell or GRUCell), got {type(model).__name__}")
    return model


def _check_biased(model, function):
    _check_model(model)
    if not model.bias:
        raise ValueError(f"{function} sets biases, but model {model!r} was built with bias=False "
                         "and has none; build it with bias=True")
    return model


def _rng(seed):
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"seed must be None, a non-negative integer or a numpy Generator, "
                        f"got {type(seed).__name__} {seed!r} ({exc})") from None


def _real(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _gain(value, name="gain"):
    value = _real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


# -- helpers -----------------------------------------------------------------

def _suffixes(params):
    """The layer-direction suffixes of a state dict ("" for a cell), in order."""
    return [name[len("weight_ih"):] for name in params if name.startswith("weight_ih")]


def _load(model, params):
    model.load_state_dict(params)
    return model


def _xavier_blocks(rng, shape, num_gates, gain):
    """A ``(G*H, n)`` matrix of G independent Xavier-uniform ``(H, n)`` blocks."""
    rows, fan_in = shape
    fan_out = rows // num_gates
    bound = gain * np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def _orthogonal_blocks(rng, shape, num_gates, gain):
    """A ``(G*R, C)`` matrix of G independent random (semi-)orthogonal ``(R, C)`` blocks, times ``gain``.

    Each block is the Q of the QR decomposition of a standard normal matrix,
    its columns' signs fixed by the diagonal of R so that Q is distributed
    uniformly (Haar) over the orthogonal group (Mezzadri 2007), not biased by
    the sign convention of the QR routine.  A square block (``R = C = H``,
    ``weight_hh``) is orthogonal; an oblong one (a projected LSTM's
    ``(H, P)`` gate blocks and ``(P, H)`` ``weight_hr``) has orthonormal
    columns or rows, whichever are fewer.
    """
    rows, cols = shape[0] // num_gates, shape[1]
    blocks = []
    for _ in range(num_gates):
        q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
        signs = np.where(np.diagonal(r) < 0, -1.0, 1.0)
        q = gain * q * signs
        blocks.append(q if rows >= cols else q.T)
    return np.concatenate(blocks, axis=0)


def _scheme(model, rng, recurrent, input_gain):
    """Xavier input weights, ``recurrent`` for ``weight_hh`` (and a projection's
    ``weight_hr``), zero biases and peepholes."""
    G = len(model._spec.gates)
    params = model.state_dict()
    out = {}
    for name, value in params.items():
        if name.startswith("weight_ih"):
            out[name] = _xavier_blocks(rng, value.shape, G, input_gain)
        elif name.startswith("weight_hh"):
            # an sLSTM's heads: one (d, d) block per gate and head
            out[name] = recurrent(rng, value.shape, G * getattr(model, "num_heads", 1))
        elif name.startswith("weight_hr"):
            # a projected LSTM's projection (P, H): one map, like a recurrent one
            out[name] = recurrent(rng, value.shape, 1)
        else:  # biases and peepholes
            out[name] = np.zeros(value.shape)
    return out


# -- public initialisers -------------------------------------------------------

def pytorch_default(model, seed=None):
    """PyTorch's default initialisation: every parameter uniform in ``±1/sqrt(H)``.

    This is what the constructors do; for the same ``seed`` the model gets
    exactly the parameters ``type(model)(..., seed=seed)`` would have
    (peephole weights included).

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell or GRUCell
        Changed in place.
    seed : int, numpy.random.Generator or None
        ``None`` draws fresh entropy.

    Returns
    -------
    model
        The same object, for chaining.
    """
    _check_model(model)
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    return _load(model, _init_params(shapes, model.hidden_size, model.dtype, _rng(seed)))


def xavier_uniform(model, seed=None, gain=1.0):
    """Glorot & Bengio's uniform initialisation per gate block; zero biases.

    Every ``(H, n)`` gate block of ``weight_ih`` (``n = I_k``) and
    ``weight_hh`` (``n = H``) is drawn uniform in ``±gain *
    sqrt(6 / (n + H))``, so each gate's map has variance
    ``gain**2 * 2 / (fan_in + fan_out)``.  Per block rather than per stacked
    matrix (as Keras does): each block is its own linear map with
    ``fan_out = H`` (see the module notes).  Biases and peephole weights are
    set to 0.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell or GRUCell
        Changed in place.
    seed : int, numpy.random.Generator or None
    gain : float, default 1.0
        Scale of the bound (e.g. 5/3 for ``tanh``, as ``torch.nn.init.calculate_gain``).

    Returns
    -------
    model
    """
    _check_model(model)
    gain = _gain(gain)
    rng = _rng(seed)
    params = _scheme(model, rng, lambda r, shape, G: _xavier_blocks(r, shape, G, gain), gain)
    return _load(model, params)


def orthogonal(model, seed=None, gain=1.0, *, input_gain=1.0):
    """Orthogonal recurrent weights per gate block, Xavier input weights, zero biases.

    Every ``(H, H)`` gate block ``Q`` of ``weight_hh`` is an independent
    random orthogonal matrix times ``gain`` (``Q^T Q = gain**2 I``), so each
    gate's recurrent map preserves the norm of ``h`` up to ``gain`` (Saxe et
    al. 2014); ``weight_ih`` is :func:`xavier_uniform` per block with
    ``input_gain``; biases and peephole weights are set to 0.

    Parameters
    ----------
    model : LSTM, GRU, LSTMCell or GRUCell
        Changed in place.
    seed : int, numpy.random.Generator or None
    gain : float, default 1.0
        Scale of the recurrent blocks.
    input_gain : float, default 1.0
        Gain of the Xavier input weights.

    Returns
    -------
    model
    """
    _check_model(model)
    gain = _gain(gain)
    input_gain = _gain(input_gain, "input_gain")
    rng = _rng(seed)
    params = _scheme(model, rng, lambda r, shape, G: _orthogonal_blocks(r, shape, G, gain), input_gain)
    return _load(model, params)


def _set_biases(model, values):
    """Set effective biases: ``values`` maps a gate index to ``(H,)`` arrays per suffix.

    The effective bias of a gate is ``bias_ih + bias_hh`` (both are added);
    the value goes in ``bias_ih`` and ``bias_hh`` gets 0, so the sum is the
    value exactly, without a rounding of its own.  A cell without recurrent
    weights (minGRU, minLSTM) has ``bias_ih`` only.
    """
    params = model.state_dict()
    H = model.hidden_size
    for k, suffix in enumerate(_suffixes(params)):
        for gate, per_suffix in values.items():
            rows = slice(gate * H, (gate + 1) * H)
            params["bias_ih" + suffix][rows] = per_suffix[k]
            if "bias_hh" + suffix in params:
                params["bias_hh" + suffix][rows] = 0
    return _load(model, params)


def _memory_gate(model):
    """The row block of the gate that sets the fraction of the state kept, and its sign.

    The sign is -1 where the fraction kept is ``1 - gate`` (an MGU's f):
    a bias ``-b`` there keeps ``sigmoid(b)``.
    """
    spec = model._spec
    return spec.gates.index(spec.forget), (-1 if spec.forget_complement else 1)


def forget_bias(model, value=1.0):
    """Set the effective bias of the gate that keeps the state to ``value`` (Jozefowicz et al. 2015).

    The gate is the one the cell keeps its state with: an LSTM's and
    JANET's forget gate ``f``, a GRU's update gate ``z``; an MGU keeps
    ``1 - f``, so its f rows get ``-value``.  Those rows of ``bias_ih`` get
    the value and those of ``bias_hh`` 0, so ``b_ih + b_hh`` is it exactly
    (in the model's dtype) in every layer and direction.  Nothing else
    changes, except for an LSTM built with ``input_forget=True``: its
    forget gate is ``f = 1 - i`` and the f rows are unused, so the i rows
    get ``-value`` (split the same way), which makes ``f = sigmoid(value + ...)``
    there too.

    Parameters
    ----------
    model : LSTM, GRU, JANET, MGU, SLSTM, LSTMCell or GRUCell
        Changed in place; it must have biases.
    value : float, default 1.0
        With zero weights and state, the fraction of the state kept at a
        step is ``sigmoid(value)`` (0.73 for 1.0).

    Returns
    -------
    model

    Raises
    ------
    TypeError
        If ``model`` is not a fastgates model.
    ValueError
        If ``model`` has no biases, or ``value`` is not finite.
    """
    _check_biased(model, "forget_bias")
    value = _real(value, "value")
    gate, sign = _memory_gate(model)
    n = len(_suffixes(model.state_dict()))
    const = [np.full(model.hidden_size, sign * value)] * n
    values = {gate: const}
    if getattr(model, "input_forget", False):
        values[model._spec.gates.index(model._spec.input_gate)] = [-v for v in const]
    return _set_biases(model, values)


def chrono(model, t_max, seed=None):
    """Chrono initialisation of the biases that set the time scales (Tallec & Ollivier 2018).

    For every unit of every layer and direction, independently::

        b_f = log(u),  u ~ Uniform[1, t_max - 1]

    as the effective bias of the gate that keeps the state (see
    :func:`forget_bias`: ``-b_f`` for an MGU, whose memory is ``1 - f``),
    and for an LSTM ``b_i = -b_f`` for its input gate, so that the gates
    start with characteristic forgetting times spread over ``[1, t_max]``
    steps and the input is their complement.  ``bias_ih`` holds the values,
    ``bias_hh`` 0 in those rows.  JANET's authors initialise its forget gate
    this way (van der Westhuizen & Lasenby 2018); its input share
    ``1 - sigmoid(s - beta)`` follows from ``f``, as a GRU's ``1 - z`` does.
    Every other bias, the weights and any peepholes are unchanged.

    Parameters
    ----------
    model : LSTM, GRU, JANET, MGU, SLSTM, LSTMCell or GRUCell
        Changed in place; it must have biases.
    t_max : float
        The longest dependency (in steps) the model should start able to
        keep; must be > 2 (the range of ``u`` is then not empty).
    seed : int, numpy.random.Generator or None

    Returns
    -------
    model

    Raises
    ------
    TypeError
        If ``model`` is not a fastgates model, or ``t_max`` is not a real
        number.
    ValueError
        If ``model`` has no biases or ``t_max`` is not a finite number > 2.
    """
    _check_biased(model, "chrono")
    t_max = _real(t_max, "t_max")
    if not t_max > 2:
        raise ValueError(f"t_max must be > 2 (b_f = log(U[1, t_max - 1])), got {t_max!r}")
    rng = _rng(seed)
    n = len(_suffixes(model.state_dict()))
    b_f = [np.log(rng.uniform(1.0, t_max - 1.0, size=model.hidden_size)) for _ in range(n)]
    # Round b_f to the model's dtype first, so that b_i is exactly -b_f there.
    b_f = [b.astype(model.dtype) for b in b_f]
    gate, sign = _memory_gate(model)
    values = {gate: [sign * b for b in b_f]}
    if model._spec.input_gate is not None:
        values[model._spec.gates.index(model._spec.input_gate)] = [-b for b in b_f]
    return _set_biases(model, values)
