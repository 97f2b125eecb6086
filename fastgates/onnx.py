"""ONNX export and import: ``to_onnx`` and ``from_onnx``.

ONNX's ``LSTM`` and ``GRU`` operators compute one layer each and hold the same
numbers as fastgates (and PyTorch) in another order:

======  ==================  ==================  ========================
cell    PyTorch gate order  ONNX gate order     ``W`` / ``R`` / ``B``
======  ==================  ==================  ========================
LSTM    i, f, g, o          i, o, f, c (c = g)  ``(D, 4H, I)`` /
                                                ``(D, 4H, H)`` /
                                                ``(D, 8H)`` = [Wb, Rb]
GRU     r, z, n             z, r, h (h = n)     ``(D, 3H, ·)``, ``(D, 6H)``
======  ==================  ==================  ========================

``W[d]`` is ``weight_ih`` of direction ``d`` with its gate blocks reordered,
``R[d]`` is ``weight_hh``, ``B[d]`` is ``bias_ih`` then ``bias_hh``, so both
biases survive and a round trip is exact.  GRU ``linear_before_reset=1`` is
``reset_after=True`` (PyTorch's form), ``0`` (ONNX's default) is
``reset_after=False``.

:func:`to_onnx` writes one node per layer, joined by the Transpose/Reshape
that turns a node's ``Y`` into the next node's input, and graph inputs and
outputs shaped like fastgates' own (see its docstring and
``docs/interop_onnx.md``).  :func:`from_onnx` reads such a chain, or any
single ``LSTM``/``GRU`` node, back into a model.

This module imports ``onnx``; ``import fastgates`` does not import it.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from . import _validate as check
from .layers import GRU, LSTM, refuse_without_counterpart

__all__ = ["to_onnx", "from_onnx", "DEFAULT_OPSET", "MIN_OPSET"]

#: Opset written by :func:`to_onnx` unless told otherwise: recent enough for
#: ``layout``, old enough for most runtimes.
DEFAULT_OPSET = 17
#: The first opset whose ``LSTM``/``GRU`` have the ``layout`` attribute.
MIN_OPSET = 14

_OP = {"lstm": "LSTM", "gru": "GRU"}
_CELL = {"LSTM": "lstm", "GRU": "gru"}
_GATES = {"lstm": 4, "gru": 3}

# ONNX's gate blocks, each given by its index in PyTorch's order:
# LSTM i, o, f, c <- PyTorch i(0), o(3), f(1), g(2); GRU z, r, h <- z(1), r(0), n(2).
_TO_ONNX = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2)}
# ... and the inverse permutation: PyTorch's blocks by their index in ONNX's order.
_FROM_ONNX = {cell: tuple(int(j) for j in np.argsort(order)) for cell, order in _TO_ONNX.items()}

# Input slots of the operators (ONNX spec; an empty name is an absent input).
_INPUTS = {
    "lstm": ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"),
    "gru": ("X", "W", "R", "B", "sequence_lens", "initial_h"),
}
_DEFAULT_ACTIVATIONS = {"lstm": ("sigmoid", "tanh", "tanh"), "gru": ("sigmoid", "tanh")}

# Names of the graph's inputs and outputs written by to_onnx.
X_NAME, LENS_NAME, H0_NAME, C0_NAME = "x", "sequence_lens", "initial_h", "initial_c"
Y_NAME, HN_NAME, CN_NAME = "y", "h_n", "c_n"

_TENSOR_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


def _reorder(a, order, H):
    """Gate blocks of ``H`` rows of ``a`` (first axis), taken in ``order``."""
    return np.concatenate([a[j * H:(j + 1) * H] for j in order], axis=0)


# ---------------------------------------------------------------------------
# model options <-> node attributes: the one place that maps between them.
#
# Every attribute ONNX defines for these operators maps to a model option
# (direction, layout, linear_before_reset, input_forget, clip; the peephole
# input P to the weight_peep parameters in _read_layer) except other
# activation functions, which are refused with a NotImplementedError naming
# the attribute.


def _unsupported(what, node_label, detail=""):
    raise NotImplementedError(
        f"{what} of {node_label} is not supported by fastgates yet{detail}; "
        "fastgates runs ONNX's default form only (direction 'forward' or 'bidirectional', "
        "default activations only: Sigmoid, Tanh, Tanh for LSTM, Sigmoid, Tanh for GRU)")


def _options_from_attributes(cell, attrs, node_label):
    """fastgates constructor options from one node's attributes.

    Parameters
    ----------
    cell : {"lstm", "gru"}
    attrs : dict of str to value
        The node's attributes (strings decoded); the entries used are removed.
    node_label : str
        How errors name the node.

    Returns
    -------
    dict
        ``bidirectional``, ``reverse`` (from ``direction``), ``batch_first``
        (from ``layout``), ``clip`` (None when absent); for a GRU
        ``reset_after``, for an LSTM ``input_forget``.

    Raises
    ------
    NotImplementedError
        For non-default ``activations``, ``activation_alpha``,
        ``activation_beta``, or an attribute ONNX does not define.
    ValueError
        For a value the ONNX spec does not allow.
    """
    options = {}
    direction = attrs.pop("direction", "forward")
    if direction in ("forward", "reverse", "bidirectional"):
        options["bidirectional"] = direction == "bidirectional"
        options["reverse"] = direction == "reverse"
    else:
        raise ValueError(f"attribute direction of {node_label} must be 'forward', 'reverse' or "
                         f"'bidirectional', got {direction!r}")

    layout = attrs.pop("layout", 0)
    if layout not in (0, 1):
        raise ValueError(f"attribute layout of {node_label} must be 0 or 1, got {layout!r}")
    options["batch_first"] = layout == 1

    if cell == "gru":
        # The spec reads any non-zero value as "linear before reset".
        options["reset_after"] = attrs.pop("linear_before_reset", 0) != 0
    else:
        input_forget = attrs.pop("input_forget", 0)
        if input_forget not in (0, 1):
            raise ValueError(f"attribute input_forget of {node_label} must be 0 or 1, got {input_forget!r}")
        options["input_forget"] = input_forget == 1

    clip = attrs.pop("clip", None)
    if clip is not None and not (isinstance(clip, float) and 0 < clip < np.inf):
        raise ValueError(f"attribute clip of {node_label} must be a positive finite float, got {clip!r}")
    options["clip"] = clip

    activations = attrs.pop("activations", None)
    if activations is not None:
        default = _DEFAULT_ACTIVATIONS[cell]
        given = tuple(a.lower() for a in activations)
        D = 2 if options["bidirectional"] else 1
        if given not in (default, default * D):
            wanted = ", ".join(a.capitalize() for a in default)
            _unsupported(f"attribute activations={list(activations)!r}", node_label,
                         f" (only the default [{wanted}] per direction)")
    for name in ("activation_alpha", "activation_beta"):
        if name in attrs:
            _unsupported(f"attribute {name}={attrs[name]!r}", node_label)
    attrs.pop("hidden_size", None)
    if attrs:
        _unsupported(f"attribute(s) {sorted(attrs)}", node_label,
                     f" (not an attribute of ONNX's {_OP[cell]})")
    return options


def _node_attributes(model, layout):
    """ONNX attributes of each node that computes one layer of ``model``."""
    direction = "bidirectional" if model.bidirectional else "reverse" if model.reverse else "forward"
    attrs = {"hidden_size": model.hidden_size, "direction": direction}
    if model._cell == "gru":
        attrs["linear_before_reset"] = int(model.reset_after)
    elif model.input_forget:
        attrs["input_forget"] = 1
    if model.clip < np.inf:
        attrs["clip"] = float(model.clip)
    if layout == 1:
        attrs["layout"] = 1
    return attrs


# ---------------------------------------------------------------------------
# export


def to_onnx(model, path=None, *, opset=DEFAULT_OPSET, layout=0, sequence_lens=False,
            initial_state=None):
    """Write an ONNX graph computing a fastgates ``LSTM`` or ``GRU``.

    The graph has one ``LSTM``/``GRU`` node per layer (direction
    ``"forward"``, ``"reverse"`` or ``"bidirectional"``; ``clip``,
    ``input_forget`` and the peephole input ``P`` for models that have
    them), the weights as initializers in ONNX's gate order, and between
    layers the Transpose/Reshape that turns a
    node's ``Y`` into the next layer's ``(T, B, D*H)`` input.  Its inputs and
    outputs mirror a call of the model, ``y, state = model(x, state, lengths)``:

    - ``x``: ``(T, B, I)``, or ``(B, T, I)`` if ``model.batch_first``;
    - ``sequence_lens`` (if ``sequence_lens=True``): ``(B,)`` int32, each
      in ``[1, T]``;
    - ``initial_h`` and, for an LSTM, ``initial_c`` (if
      ``initial_state=True``): ``(L*D, B, H)``;
    - outputs ``y``: ``(T, B, D*H)``, or ``(B, T, D*H)`` if
      ``model.batch_first``; ``h_n`` and, for an LSTM, ``c_n``:
      ``(L*D, B, H)``.

    ``T`` and ``B`` are dynamic (named dimensions ``"T"`` and ``"B"``), except
    that ``B`` is fixed when ``initial_state`` is given as arrays.  ONNX
    stores ``clip`` as a float32: a bound that float32 cannot represent
    exactly comes back rounded from :func:`from_onnx`.

    Parameters
    ----------
    model : fastgates.LSTM or fastgates.GRU
    path : str or os.PathLike, optional
        Where to save the model as well.
    opset : int, default DEFAULT_OPSET (17)
        ONNX opset of the graph, from ``MIN_OPSET`` (14) to the newest the
        installed ``onnx`` knows.
    layout : {0, 1}, default 0
        The nodes' ``layout`` attribute.  0 (time-major) runs everywhere,
        onnxruntime included; a ``batch_first`` model then gets a Transpose
        on ``x`` and a permuted Transpose on the last ``Y``.  1 (batch-major)
        matches ``batch_first`` models without transposes but onnxruntime
        (CPU and CUDA) refuses to run it; other runtimes may not.
    sequence_lens : bool, default False
        Give the graph a ``sequence_lens`` input, fed to every node: the
        ``lengths`` of a fastgates call (padded steps of ``y`` are 0; final
        states are those after each sequence's last valid step).
    initial_state : None, bool, ndarray or tuple of ndarray, default None
        ``None`` or ``False``: the graph starts from zeros.  ``True``: graph
        inputs ``initial_h`` (and ``initial_c``) of shape ``(L*D, B, H)``,
        as fastgates' ``state``.  An array (GRU) or a tuple ``(h, c)``
        (LSTM) of that shape: a constant initial state stored as each
        node's ``initial_h``/``initial_c`` initializer.

    Returns
    -------
    onnx.ModelProto
        Checked with ``onnx.checker``.

    Raises
    ------
    TypeError
        If ``model`` is not a fastgates ``LSTM`` or ``GRU``.
    NotImplementedError
        For an LSTM with ``proj_size`` (ONNX's LSTM has no projection).
    ValueError
        For an opset, layout or initial state out of range.

    Notes
    -----
    ``dropout`` is a training-time option: the graph computes ``m(x)``,
    which never drops.
    """
    refuse_without_counterpart(model, "ONNX")
    if not isinstance(model, (LSTM, GRU)):
        raise TypeError(f"model must be a fastgates LSTM or GRU, got {type(model).__name__} "
                        "(cells export as a one-layer model: copy their parameters into one)")
    if getattr(model, "proj_size", 0):
        raise NotImplementedError(
            f"model has proj_size={model.proj_size}: ONNX's LSTM operator has no projection of "
            "the hidden state (weight_hr), so the model cannot be exported to it")
    # dropout acts in training only: the exported graph is the inference
    # function, as m(x) computes it.
    opset = check.positive_int(opset, "opset")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must lie in [{MIN_OPSET}, {newest}] (the LSTM/GRU layout attribute "
                         f"needs {MIN_OPSET}; onnx {onnx.__version__} knows up to {newest}), got {opset}")
    if isinstance(layout, (bool, np.bool_)) or layout not in (0, 1):
        raise ValueError(f"layout must be 0 (time-major) or 1 (batch-major), got {layout!r}")
    sequence_lens = check.boolean(sequence_lens, "sequence_lens")
    return _Exporter(model, opset, layout, sequence_lens, initial_state).build(path)


class _Exporter:
    """Builds the graph of :func:`to_onnx`, node by node."""

    def __init__(self, model, opset, layout, sequence_lens, initial_state):
        self.m = model
        self.cell = model._cell
        self.opset = opset
        self.layout = layout
        self.lens = sequence_lens
        self.D = model.num_directions
        self.H = model.hidden_size
        self.L = model.num_layers
        self.dtype = model.dtype
        self.elem = _TENSOR_TYPE[model.dtype]
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.state_inputs = False
        self.const_state = None
        self.batch = "B"
        if initial_state is True:
            self.state_inputs = True
        elif initial_state is not None and initial_state is not False:
            self.const_state = self._check_state(initial_state)
            self.batch = self.const_state[0].shape[1]

    def _check_state(self, state):
        num = self.L * self.D
        names = ("initial_state[0] (h)", "initial_state[1] (c)") if self.cell == "lstm" else ("initial_state",)
        if self.cell == "lstm":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise TypeError("initial_state of an LSTM must be None, True or a tuple (h, c) of arrays, "
                                f"got {type(state).__name__}")
            arrays = list(state)
        else:
            arrays = [state]
        out = []
        for name, value in zip(names, arrays):
            arr = check.as_float_array(value, name, self.dtype)
            if arr.ndim != 3 or arr.shape[0] != num or arr.shape[2] != self.H or arr.shape[1] < 1:
                raise ValueError(f"{name} must have shape (num_layers * num_directions, B, H) = "
                                 f"({num}, B, {self.H}) with B >= 1, got {arr.shape}")
            out.append(arr)
        if len(out) == 2 and out[0].shape != out[1].shape:
            raise ValueError(f"initial_state h and c must have the same shape, got {out[0].shape} and {out[1].shape}")
        return out

    # -- small builders ------------------------------------------------------

    def _node(self, op, inputs, outputs, **attrs):
        name = f"{op}_{len(self.nodes)}" if op not in _CELL else outputs[0].replace("Y_", op + "_")
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def _init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _int64(self, name, values):
        """A shared int64 constant (written once, however often it is asked for)."""
        if name not in {t.name for t in self.inits}:
            self._init(name, np.asarray(values, dtype=np.int64))
        return name

    def _value_info(self, name, elem, dims):
        return helper.make_tensor_value_info(name, elem, list(dims))

    # -- the graph -----------------------------------------------------------

    def build(self, path):
        m, H, D = self.m, self.H, self.D
        bf = m.batch_first
        nb = self.batch
        self.inputs.append(self._value_info(X_NAME, self.elem, (nb, "T", m.input_size) if bf
                                            else ("T", nb, m.input_size)))
        if self.lens:
            self.inputs.append(self._value_info(LENS_NAME, TensorProto.INT32, (self.batch,)))
        state_names = (H0_NAME, C0_NAME) if self.cell == "lstm" else (H0_NAME,)
        if self.state_inputs:
            for name in state_names:
                self.inputs.append(self._value_info(name, self.elem, (self.L * D, self.batch, H)))
        self._int64("flatten_directions", [0, 0, -1])     # Reshape: keep two axes, merge the rest

        # The nodes' input: time-major for layout 0, batch-major for layout 1.
        x = X_NAME
        if bf != (self.layout == 1):
            x = self._node("Transpose", [X_NAME], ["x_nodes"], perm=[1, 0, 2])

        params = m.state_dict()
        finals = {name: [] for name in state_names}
        for k in range(self.L):
            ys = self._layer(k, x, params)
            finals[H0_NAME].append(ys[1])
            if self.cell == "lstm":
                finals[C0_NAME].append(ys[2])
            last = k == self.L - 1
            x = self._flatten(ys[0], Y_NAME if last else f"X_l{k + 1}", bf if last else self.layout == 1)

        out_seq = (nb, "T", D * H) if bf else ("T", nb, D * H)
        self.outputs.append(self._value_info(Y_NAME, self.elem, out_seq))
        for name, out in zip(state_names, (HN_NAME, CN_NAME)):
            self._gather_states(finals[name], out)
            self.outputs.append(self._value_info(out, self.elem, (self.L * D, self.batch, H)))

        graph = helper.make_graph(self.nodes, f"fastgates_{self.cell}", self.inputs, self.outputs,
                                  initializer=self.inits)
        model = helper.make_model_gen_version(
            graph, opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="fastgates", producer_version=__version__, doc_string=repr(m))
        onnx.checker.check_model(model)
        if path is not None:
            onnx.save(model, os.fspath(path))
        return model

    def _layer(self, k, x, params):
        """One LSTM/GRU node for layer k; returns the names of its outputs."""
        cell, H, D = self.cell, self.H, self.D
        order = _TO_ONNX[cell]
        suffixes = [f"_l{k}", f"_l{k}_reverse"][:D]

        def stacked(name):
            return np.stack([_reorder(params[name + s], order, H) for s in suffixes])

        inputs = [x, self._init(f"W_l{k}", stacked("weight_ih")), self._init(f"R_l{k}", stacked("weight_hh"))]
        inputs.append(self._init(f"B_l{k}", np.concatenate([stacked("bias_ih"), stacked("bias_hh")], axis=1))
                      if self.m.bias else "")
        inputs.append(LENS_NAME if self.lens else "")
        state_names = (H0_NAME, C0_NAME) if cell == "lstm" else (H0_NAME,)
        for j, name in enumerate(state_names):
            inputs.append(self._initial_state(k, j, name))
        if cell == "lstm" and self.m.peephole:
            # fastgates' rows p_i, p_f, p_o -> ONNX's P = [p_i, p_o, p_f].
            inputs.append(self._init(f"P_l{k}", np.stack(
                [params["weight_peep" + s][[0, 2, 1]].reshape(-1) for s in suffixes])))
        while inputs[-1] == "":
            inputs.pop()
        outputs = [f"Y_l{k}", f"Y_h_l{k}"] + ([f"Y_c_l{k}"] if cell == "lstm" else [])
        self._node(_OP[cell], inputs, outputs, **_node_attributes(self.m, self.layout))
        return outputs

    def _initial_state(self, k, j, name):
        """Layer k's initial_h (j=0) or initial_c (j=1) in the nodes' layout."""
        D = self.D
        if self.const_state is not None:
            part = self.const_state[j][k * D:(k + 1) * D]
            if self.layout == 1:
                part = part.transpose(1, 0, 2)
            return self._init(f"{name}_l{k}", part)
        if not self.state_inputs:
            return ""
        part = name
        if self.L > 1:
            part = self._node("Slice", [name, self._int64(f"start_l{k}", [k * D]),
                                        self._int64(f"end_l{k}", [(k + 1) * D]), self._int64("axis_0", [0])],
                              [f"{name}_l{k}"])
        if self.layout == 1:
            part = self._node("Transpose", [part], [f"{name}_l{k}_bdh"], perm=[1, 0, 2])
        return part

    def _flatten(self, y, out, batch_major):
        """A node's Y to ``(T, B, D*H)``, or ``(B, T, D*H)`` when batch_major."""
        if self.layout == 0:                      # Y is (T, D, B, H)
            perm = [2, 0, 1, 3] if batch_major else [0, 2, 1, 3]
            y = self._node("Transpose", [y], [y + "_t"], perm=perm)
            return self._node("Reshape", [y, "flatten_directions"], [out])
        # layout 1: Y is (B, T, D, H)
        if batch_major:
            return self._node("Reshape", [y, "flatten_directions"], [out])
        y = self._node("Transpose", [y], [y + "_t"], perm=[1, 0, 2, 3])
        return self._node("Reshape", [y, "flatten_directions"], [out])

    def _gather_states(self, parts, out):
        """Per-layer final states to one ``(L*D, B, H)`` output."""
        if self.layout == 0:                      # each (D, B, H)
            if len(parts) == 1:
                self._node("Identity", parts, [out])
            else:
                self._node("Concat", parts, [out], axis=0)
            return
        # layout 1: each (B, D, H)
        joined = parts[0] if len(parts) == 1 else self._node("Concat", parts, [out + "_bdh"], axis=1)
        self._node("Transpose", [joined], [out], perm=[1, 0, 2])


# ---------------------------------------------------------------------------
# import


def from_onnx(model_or_path, *, node=None, dtype=None, batch_first=None, return_state=False):
    """Build a fastgates model from the ``LSTM``/``GRU`` node(s) of an ONNX model.

    Parameters
    ----------
    model_or_path : onnx.ModelProto, str or os.PathLike
        The model, or the path of a ``.onnx`` file.
    node : str, int or sequence of them, optional
        Which node(s) to read, by name (or by index in ``graph.node``).  One
        node gives a one-layer model; a sequence gives a stacked model, one
        layer per node in that order (each node after the first must read
        ``D*H`` features).  By default the graph's only ``LSTM``/``GRU``
        node, or the chain of them that :func:`to_onnx` writes (each node
        reading the previous one's ``Y`` through Transpose/Reshape/Squeeze
        nodes that give ``(T, B, D*H)``).
    dtype : {None, np.float32, np.float64}
        The model's dtype; ``None`` takes the dtype of the weights (which
        must then be float32 or float64).
    batch_first : bool, optional
        ``None`` decides from the graph: the nodes' ``layout`` (1 is
        batch-major), flipped when the first node reads its input through a
        ``Transpose`` with ``perm=[1, 0, 2]`` (as :func:`to_onnx` writes for
        a model whose ``batch_first`` differs from the layout).
    return_state : bool, default False
        Also return the initial state held in the graph as constants
        (``initial_h``, ``initial_c`` initializers or ``Constant`` nodes).

    Returns
    -------
    model : fastgates.LSTM or fastgates.GRU
    state : ndarray, tuple of ndarray or None
        Only when ``return_state``: ``(L*D, B, H)`` as fastgates takes it
        (``(h, c)`` for an LSTM, zeros where a node has no initial state),
        or ``None`` when no node has one.

    Raises
    ------
    NotImplementedError
        For what fastgates cannot compute, naming it: non-default
        ``activations``, ``activation_alpha``, ``activation_beta``.
    ValueError
        If no node (or more than one candidate) is found, a weight is not a
        constant, shapes disagree, or ``return_state`` is asked for an
        initial state that is computed at run time.
    TypeError
        For a ``model_or_path`` or ``dtype`` of the wrong kind.

    Notes
    -----
    ``sequence_lens`` is an input of a run, not of the model: pass it as
    ``lengths`` when calling the model.  ``direction="reverse"`` gives a
    model with ``reverse=True``, a peephole input ``P`` one with
    ``peephole=True`` (its ``weight_peep_l{k}`` rows are ONNX's ``P`` in the
    order i, f, o), ``input_forget=1`` one with ``input_forget=True`` and
    ``clip`` one with that ``clip``.
    """
    proto = _load(model_or_path)
    graph = proto.graph
    if dtype is not None:
        dtype = check.model_dtype(dtype)
    if batch_first is not None:
        batch_first = check.boolean(batch_first, "batch_first")
    return_state = check.boolean(return_state, "return_state")
    index = _GraphIndex(graph)
    nodes = index.select(node)
    layers = [_read_layer(n, index, dtype) for n in nodes]
    model = _build(layers, index.batch_first(nodes[0], layers[0]) if batch_first is None else batch_first)
    if not return_state:
        return model
    return model, _initial_state(layers, model)


def _load(model_or_path):
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return onnx.load(os.fspath(model_or_path))
    raise TypeError(f"model_or_path must be an onnx.ModelProto or a path, got {type(model_or_path).__name__}")


class _GraphIndex:
    """Constants, producers and recurrent nodes of one graph.

    Nodes are referred to by their index in ``graph.node``.
    """

    _CONNECTORS = ("Transpose", "Reshape", "Squeeze", "Identity")

    def __init__(self, graph):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {}
        for i, n in enumerate(graph.node):
            for out in n.output:
                if out:
                    self.producer[out] = i
        self.recurrent = [i for i, n in enumerate(graph.node) if _is_recurrent(n)]

    def constant(self, name):
        """The value of ``name`` if it is an initializer or a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        if name in self.producer:
            n = self.graph.node[self.producer[name]]
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        return numpy_helper.to_array(a.t)
        return None

    def label(self, i):
        n = self.graph.node[i]
        return f"node {n.name!r} ({n.op_type})" if n.name else f"node #{i} ({n.op_type}, unnamed)"

    # -- choosing the nodes ----------------------------------------------------

    def select(self, node):
        """Indices of the recurrent nodes to read, in layer order."""
        if not self.recurrent:
            ops = sorted({n.op_type for n in self.graph.node})
            raise ValueError(f"the graph has no LSTM or GRU node (its operators: {ops})")
        if node is None:
            return self._chain()
        picks = [node] if isinstance(node, (str, int, np.integer)) else list(node)
        if not picks:
            raise ValueError("node must name at least one LSTM/GRU node, got an empty sequence")
        return [self._find(p) for p in picks]

    def _find(self, key):
        names = [self.graph.node[i].name for i in self.recurrent]
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
            raise TypeError(f"node must be a node name, an index or a sequence of them, got {type(key).__name__}")
        if isinstance(key, str):
            for i in self.recurrent:
                if self.graph.node[i].name == key:
                    return i
            raise ValueError(f"node={key!r}: no LSTM/GRU node of that name; the graph has {names}")
        if int(key) not in self.recurrent:
            raise ValueError(f"node={key}: graph.node[{key}] is not an LSTM/GRU node; they are at "
                             f"indices {self.recurrent} (names {names})")
        return int(key)

    def trace(self, name):
        """Follow ``name`` back through connector nodes.

        Returns the index of the recurrent node whose ``Y`` it comes from (or
        None) and the connector nodes on the way, in the order they run.
        """
        path = []
        while name in self.producer:
            i = self.producer[name]
            n = self.graph.node[i]
            if _is_recurrent(n):
                return (i if n.output[0] == name else None), path[::-1]
            if n.op_type not in self._CONNECTORS or n.domain not in ("", "ai.onnx") or not n.input:
                break
            path.append(n)
            name = n.input[0]
        return None, path[::-1]

    def _chain(self):
        if len(self.recurrent) == 1:
            return list(self.recurrent)
        hint = ("; pick the node(s) to read with node=<name>, node=<index> or node=[<names in layer "
                f"order>] (LSTM/GRU nodes: {[self.label(i) for i in self.recurrent]})")
        after, roots = {}, []
        for i in self.recurrent:
            prev, path = self.trace(self.graph.node[i].input[0])
            if prev is None:
                roots.append(i)
            elif prev in after:
                raise ValueError(f"two nodes read the Y of {self.label(prev)}, so the graph is not one "
                                 f"chain of layers{hint}")
            else:
                after[prev] = (i, path)
        if len(roots) != 1:
            raise ValueError(f"the graph's {len(self.recurrent)} LSTM/GRU nodes do not form one chain "
                             f"of layers{hint}")
        chain = roots
        while chain[-1] in after:
            i, path = after[chain[-1]]
            if not self._flattens(chain[-1], path):
                raise ValueError(f"{self.label(i)} reads the Y of {self.label(chain[-1])} through "
                                 f"{[p.op_type for p in path]}, which does not give the (T, B, D*H) "
                                 f"input of a stacked layer{hint}")
            chain.append(i)
        if len(chain) != len(self.recurrent):
            raise ValueError(f"the graph's LSTM/GRU nodes do not form one chain of layers{hint}")
        return chain

    # -- running connectors on NumPy arrays ------------------------------------

    def run(self, path, arr):
        """Run Transpose/Reshape/Squeeze/Identity nodes on ``arr``; None if that fails."""
        try:
            for n in path:
                arr = self._run_one(n, arr)
                if arr is None:
                    return None
        except (ValueError, IndexError, TypeError):
            return None
        return arr

    def _run_one(self, n, arr):
        attrs = _attributes(n)
        if n.op_type == "Identity":
            return arr
        if n.op_type == "Transpose":
            return arr.transpose(attrs.get("perm", list(range(arr.ndim))[::-1]))
        if n.op_type == "Reshape":
            shape = self.constant(n.input[1]) if len(n.input) > 1 else None
            if shape is None:
                return None
            shape = [int(s) for s in np.ravel(shape)]
            if not attrs.get("allowzero", 0):
                shape = [arr.shape[j] if s == 0 else s for j, s in enumerate(shape)]
            return arr.reshape(shape)
        # Squeeze: axes from the attribute (opset < 13) or the second input.
        axes = attrs.get("axes")
        if axes is None and len(n.input) > 1 and n.input[1]:
            axes = self.constant(n.input[1])
            if axes is None:
                return None
        return np.squeeze(arr) if axes is None else np.squeeze(arr, tuple(int(a) for a in np.ravel(axes)))

    def _flattens(self, prev, path):
        """Whether ``path`` turns the Y of node ``prev`` into a stacked layer's input."""
        n = self.graph.node[prev]
        attrs = _attributes(n)
        D = 2 if attrs.get("direction", "forward") == "bidirectional" else 1
        R = self.constant(n.input[2]) if len(n.input) > 2 else None
        H = attrs.get("hidden_size") or (R.shape[-1] if R is not None and R.ndim == 3 else 1)
        T, B = 2, 3                               # distinct, so that a swap shows
        if attrs.get("layout", 0) == 1:           # Y (B, T, D, H) -> (B, T, D*H)
            y = np.arange(B * T * D * H).reshape(B, T, D, H)
            want = y.reshape(B, T, D * H)
        else:                                     # Y (T, D, B, H) -> (T, B, D*H)
            y = np.arange(T * D * B * H).reshape(T, D, B, H)
            want = y.transpose(0, 2, 1, 3).reshape(T, B, D * H)
        got = self.run(path, y)
        return got is not None and got.shape == want.shape and np.array_equal(got, want)

    def batch_first(self, first, layer):
        """Whether the model's input is batch-major (see from_onnx's batch_first).

        The nodes' layout, flipped when the first node reads a graph input
        through a Transpose of its first two axes.
        """
        major = layer.options["batch_first"]
        prev, path = self.trace(self.graph.node[first].input[0])
        if prev is not None or not path:
            return major
        probe = np.arange(2 * 3 * 5).reshape(2, 3, 5)
        got = self.run(path, probe)
        if got is not None and got.shape == (3, 2, 5) and np.array_equal(got, probe.transpose(1, 0, 2)):
            return not major
        return major


def _is_recurrent(node):
    return node.op_type in _CELL and node.domain in ("", "ai.onnx")


def _attributes(node):
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


class _Layer:
    """What one node says: cell, options, sizes, parameters and initial state."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


_RUNTIME = object()       # an initial state computed or fed at run time


def _read_layer(i, index, dtype):
    """Parameters (fastgates' layout and gate order) and options of node i."""
    node = index.graph.node[i]
    label = index.label(i)
    cell = _CELL[node.op_type]
    attrs = _attributes(node)
    hidden = attrs.get("hidden_size")
    options = _options_from_attributes(cell, dict(attrs), label)
    slots = dict(zip(_INPUTS[cell], list(node.input) + [""] * len(_INPUTS[cell])))
    if len(node.input) > len(_INPUTS[cell]):
        raise ValueError(f"{label} has {len(node.input)} inputs; ONNX's {node.op_type} takes at most "
                         f"{len(_INPUTS[cell])}")

    def const(slot, required=False):
        name = slots[slot]
        if not name:
            if required:
                raise ValueError(f"{label} has no input {slot}")
            return None
        value = index.constant(name)
        if value is None:
            return _RUNTIME
        return value

    W, R, Bias = const("W", True), const("R", True), const("B")
    for slot, value in (("W", W), ("R", R), ("B", Bias)):
        if value is _RUNTIME:
            raise ValueError(f"input {slot} of {label} ({slots[slot]!r}) is not a constant (an initializer "
                             "or a Constant node); fastgates needs the weights in the graph")
    P = const("P") if cell == "lstm" else None
    if P is _RUNTIME:
        raise ValueError(f"input P of {label} ({slots['P']!r}) is not a constant (an initializer "
                         "or a Constant node); fastgates needs the peephole weights in the graph")
    if cell == "lstm":
        options["peephole"] = P is not None

    G = _GATES[cell]
    D = 2 if options["bidirectional"] else 1
    if R.ndim != 3 or R.shape[0] != D or R.shape[1] != G * R.shape[2]:
        raise ValueError(f"input R of {label} must have shape (num_directions, {G}*hidden_size, hidden_size) "
                         f"with num_directions={D}, got {R.shape}")
    H = R.shape[2]
    if hidden is not None and hidden != H:
        raise ValueError(f"attribute hidden_size={hidden} of {label} disagrees with input R of shape {R.shape}")
    if W.ndim != 3 or W.shape[:2] != (D, G * H) or W.shape[2] < 1:
        raise ValueError(f"input W of {label} must have shape ({D}, {G * H}, input_size), got {W.shape}")
    if Bias is not None and Bias.shape != (D, 2 * G * H):
        raise ValueError(f"input B of {label} must have shape ({D}, {2 * G * H}), got {Bias.shape}")
    if dtype is None:
        if W.dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"the weights of {label} are {W.dtype}; fastgates computes in float32 or "
                            "float64: pass dtype=np.float32 or np.float64")
        dtype = W.dtype

    peeps = None
    if P is not None:
        if P.shape != (D, 3 * H):
            raise ValueError(f"input P of {label} must have shape ({D}, {3 * H}), got {P.shape}")
        # ONNX's P = [p_i, p_o, p_f] -> fastgates' rows p_i, p_f, p_o.
        peeps = [P[d].reshape(3, H)[[0, 2, 1]] for d in range(D)]
    order = _FROM_ONNX[cell]
    params = []                                   # per direction: (w_ih, w_hh, b_ih, b_hh)
    for d in range(D):
        b = (None, None) if Bias is None else (_reorder(Bias[d, :G * H], order, H),
                                               _reorder(Bias[d, G * H:], order, H))
        params.append((_reorder(W[d], order, H), _reorder(R[d], order, H)) + b)

    states = []
    for slot in ("initial_h", "initial_c")[:2 if cell == "lstm" else 1]:
        s = const(slot)
        if s is not None and s is not _RUNTIME:
            expected = "(batch, num_directions, hidden)" if options["batch_first"] else \
                "(num_directions, batch, hidden)"
            if options["batch_first"]:
                s = s.transpose(1, 0, 2) if s.ndim == 3 else s
            if s.ndim != 3 or s.shape[0] != D or s.shape[2] != H:
                raise ValueError(f"input {slot} of {label} must have shape {expected} with num_directions={D}, "
                                 f"hidden={H}, got {s.shape}")
        states.append((slot, slots[slot], s))
    return _Layer(node=node, label=label, cell=cell, options=options, D=D, H=H, I=W.shape[2],
                  dtype=np.dtype(dtype), params=params, has_bias=Bias is not None, states=states,
                  peeps=peeps)


def _build(layers, batch_first):
    """One fastgates model from per-node layers, checking they stack."""
    first = layers[0]
    for k, layer in enumerate(layers[1:], start=1):
        same = {"cell": (layer.cell, first.cell), "hidden_size": (layer.H, first.H),
                "options": (layer.options, first.options)}
        for what, (a, b) in same.items():
            if a != b:
                raise ValueError(f"layer {k} ({layer.label}) differs from layer 0 ({first.label}) in {what}: "
                                 f"{a} against {b}; stacked layers must agree")
        if layer.I != first.D * first.H:
            raise ValueError(f"layer {k} ({layer.label}) reads {layer.I} features; a stacked layer must read "
                             f"num_directions * hidden_size = {first.D * first.H}")
    options = dict(first.options, batch_first=batch_first)
    bias = any(layer.has_bias for layer in layers)
    cls = LSTM if first.cell == "lstm" else GRU
    model = cls(first.I, first.H, len(layers), bias=bias, dtype=first.dtype, seed=0, **options)
    G = _GATES[first.cell] * first.H
    zeros = np.zeros(G, dtype=first.dtype)
    state = {}
    for k, layer in enumerate(layers):
        for d, (w_ih, w_hh, b_ih, b_hh) in enumerate(layer.params):
            s = f"_l{k}" + ("_reverse" if d else "")
            state["weight_ih" + s], state["weight_hh" + s] = w_ih, w_hh
            if bias:
                state["bias_ih" + s] = zeros if b_ih is None else b_ih
                state["bias_hh" + s] = zeros if b_hh is None else b_hh
            if layer.peeps is not None:
                state["weight_peep" + s] = layer.peeps[d]
    model.load_state_dict(state)
    return model


def _initial_state(layers, model):
    """The constant initial state of the nodes, as fastgates takes it (or None)."""
    kinds = len(layers[0].states)
    found = [[s for _, _, s in layer.states] for layer in layers]
    for layer in layers:
        for slot, name, s in layer.states:
            if s is _RUNTIME:
                raise ValueError(f"return_state=True, but input {slot} of {layer.label} ({name!r}) is computed "
                                 "or fed at run time, not a constant of the graph; call from_onnx without "
                                 "return_state and pass the state to the model")
    arrays = [s for per in found for s in per if s is not None]
    if not arrays:
        return None
    batch = {a.shape[1] for a in arrays}
    if len(batch) != 1:
        raise ValueError(f"the constant initial states of the nodes disagree in batch size: {sorted(batch)}")
    B = batch.pop()
    out = []
    for j in range(kinds):
        parts = [per[j] if per[j] is not None else np.zeros((layer.D, B, layer.H))
                 for per, layer in zip(found, layers)]
        out.append(np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=model.dtype))
    return tuple(out) if kinds == 2 else out[0]
