"""fastgates.onnx: export to and import from ONNX, checked against onnxruntime.

- Export: onnxruntime runs the graph that ``to_onnx`` writes; its ``y`` and
  final states must agree with the fastgates model it came from (stacked,
  bidirectional, batch_first, with and without bias, ``sequence_lens`` and
  initial states as graph inputs).
- Import: graphs built by hand with ``onnx.helper`` in ONNX's own gate order
  and layouts are read by ``from_onnx``; the model must agree with
  onnxruntime's run of the graph.
- Round trips fastgates -> ONNX -> fastgates are bitwise exact.
- ONNX's variants (``direction="reverse"``, peepholes ``P``, ``input_forget``,
  ``clip``) map to fastgates' options both ways, checked against onnxruntime.
- What fastgates cannot compute (other activations) raises
  ``NotImplementedError`` naming it.

onnxruntime's CPU kernels refuse ``layout=1`` ("Batchwise recurrent
operations (layout == 1) are not supported"), so a ``layout=1`` graph is
checked against onnxruntime running its ``layout=0`` twin on transposed
tensors (the spec defines layout 1 as exactly that transposition) and
against ONNX's reference evaluator (``onnx.reference``), which does run
layout 1 but ignores ``sequence_lens``.  onnxruntime has no float64 kernels
for these operators (checked by ``test_onnxruntime_has_no_float64_kernels``),
so float64 graphs are checked with the reference evaluator and by round
trips.
"""

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import fastgates as fg
from _tolerances import assert_close
from fastgates import onnx as fgx

F32, F64 = np.float32, np.float64
OPS = {"lstm": "LSTM", "gru": "GRU"}
GATES = {"lstm": 4, "gru": 3}


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def session(proto, log_severity_level=3):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = log_severity_level
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(proto, feed):
    sess = session(proto)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def run_reference(proto, feed):
    names = [o.name for o in proto.graph.output]
    return dict(zip(names, ReferenceEvaluator(proto).run(None, feed)))


@dataclasses.dataclass
class Case:
    cell: str
    reset_after: bool
    num_layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    lengths: bool
    state: bool
    seed: int
    dtype: type = F32
    layout: int = 0

    @property
    def D(self):
        return 2 if self.bidirectional else 1

    def model(self):
        kw = {"bias": self.bias, "batch_first": self.batch_first, "bidirectional": self.bidirectional,
              "dtype": self.dtype, "seed": self.seed}
        if self.cell == "gru":
            return fg.GRU(self.I, self.H, self.num_layers, reset_after=self.reset_after, **kw)
        return fg.LSTM(self.I, self.H, self.num_layers, **kw)

    def inputs(self):
        """x in the model's layout, lengths (or None), state (or None)."""
        rng = np.random.default_rng(self.seed + 1)
        shape = (self.B, self.T, self.I) if self.batch_first else (self.T, self.B, self.I)
        x = rng.standard_normal(shape).astype(self.dtype)
        lengths = rng.integers(1, self.T + 1, size=self.B) if self.lengths else None
        state = None
        if self.state:
            num = self.num_layers * self.D
            parts = [(0.5 * rng.standard_normal((num, self.B, self.H))).astype(self.dtype)
                     for _ in range(2 if self.cell == "lstm" else 1)]
            state = tuple(parts) if self.cell == "lstm" else parts[0]
        return x, lengths, state


@st.composite
def cases(draw, dtypes=(F32,), layouts=(0,), lengths=(False, True)):
    cell, reset_after = draw(st.sampled_from([("lstm", True), ("gru", True), ("gru", False)]))
    return Case(
        cell=cell, reset_after=reset_after,
        num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        T=draw(st.integers(1, 6)), B=draw(st.integers(1, 4)),
        I=draw(st.integers(1, 4)), H=draw(st.integers(1, 5)),
        lengths=draw(st.sampled_from(lengths)), state=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(layouts)),
    )


def feed_for(x, lengths, state):
    """The feed of a to_onnx graph for the arguments of a model call."""
    feed = {"x": x}
    if lengths is not None:
        feed["sequence_lens"] = lengths.astype(np.int32)
    if state is not None:
        h, c = state if isinstance(state, tuple) else (state, None)
        feed["initial_h"] = h
        if c is not None:
            feed["initial_c"] = c
    return feed


def assert_matches_model(outs, model, x, lengths, state, dtype):
    """Graph outputs y, h_n (, c_n) against the model's call."""
    y, final = model(x, state, lengths)
    assert_close(outs["y"], y, dtype, err_msg="y")
    if model._cell == "lstm":
        assert_close(outs["h_n"], final[0], dtype, err_msg="h_n")
        assert_close(outs["c_n"], final[1], dtype, err_msg="c_n")
    else:
        assert_close(outs["h_n"], final, dtype, err_msg="h_n")


def padded_mask(lengths, T, batch_first):
    """True at the padded steps of y."""
    mask = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]    # (T, B)
    return mask.T if batch_first else mask


def same_model(a, b):
    assert type(a) is type(b)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional",
                 "reset_after", "dtype", "reverse", "clip", "peephole", "input_forget"):
        if name == "reset_after" and a._cell == "lstm":
            continue
        assert getattr(a, name) == getattr(b, name), name
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert sa[k].tobytes() == sb[k].tobytes(), k          # bitwise


# ---------------------------------------------------------------------------
# Export: onnxruntime runs what to_onnx writes
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_exported_graph_matches_onnxruntime(case):
    m = case.model()
    x, lengths, state = case.inputs()
    proto = fgx.to_onnx(m, sequence_lens=case.lengths, initial_state=case.state)
    onnx.checker.check_model(proto, full_check=True)
    outs = run_ort(proto, feed_for(x, lengths, state))
    assert_matches_model(outs, m, x, lengths, state, F32)
    if lengths is not None:
        # onnxruntime zeroes padded steps too, as fastgates' contract says.
        assert np.all(outs["y"][padded_mask(lengths, case.T, case.batch_first)] == 0)


@settings(max_examples=25, deadline=None)
@given(case=cases(dtypes=(F32, F64), layouts=(0, 1), lengths=(False,)))
def test_exported_graph_matches_reference_evaluator(case):
    # Both layouts and both dtypes, run by ONNX's reference implementation
    # (which ignores sequence_lens, so none here).
    m = case.model()
    x, _, state = case.inputs()
    proto = fgx.to_onnx(m, layout=case.layout, initial_state=case.state)
    onnx.checker.check_model(proto, full_check=True)
    outs = run_reference(proto, feed_for(x, None, state))
    assert all(v.dtype == case.dtype for v in outs.values())
    assert_matches_model(outs, m, x, None, state, case.dtype)


def test_onnxruntime_has_no_float64_kernels():
    # Why float64 graphs are checked with the reference evaluator: onnxruntime
    # loads them but its kernels refuse to run ("does not support double
    # yet").  Should a later onnxruntime run them, this fails, and float64
    # can join the onnxruntime tests.
    x = np.ones((3, 2, 2))
    for cls in (fg.LSTM, fg.GRU):
        proto = fgx.to_onnx(cls(2, 3, dtype=F64, seed=0))
        sess = session(proto, log_severity_level=4)
        with pytest.raises(Exception, match="does not support double"):
            sess.run(None, {"x": x})


def test_onnxruntime_refuses_layout_1():
    # Why to_onnx writes layout=0 (with transposes for batch_first) by default.
    proto = fgx.to_onnx(fg.LSTM(2, 3, batch_first=True, seed=0), layout=1)
    with pytest.raises(Exception, match="layout == 1"):
        session(proto, log_severity_level=4)


def test_graph_interface_and_dynamic_dims():
    m = fg.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, seed=0)
    proto = fgx.to_onnx(m, sequence_lens=True, initial_state=True)
    graph = proto.graph

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in graph.input] == [
        ("x", ["B", "T", 3]), ("sequence_lens", ["B"]),
        ("initial_h", [4, "B", 4]), ("initial_c", [4, "B", 4])]
    assert [(v.name, dims(v)) for v in graph.output] == [
        ("y", ["B", "T", 8]), ("h_n", [4, "B", 4]), ("c_n", [4, "B", 4])]
    assert graph.input[1].type.tensor_type.elem_type == TensorProto.INT32
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstms) == 2
    for n in lstms:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"hidden_size": 4, "direction": b"bidirectional"}
    assert proto.opset_import[0].version == fgx.DEFAULT_OPSET
    # One session, two different (T, B): the dims are dynamic.
    sess = session(proto)
    for T, B in ((5, 3), (2, 1)):
        case = Case("lstm", True, 2, True, True, True, T, B, 3, 4, True, True, seed=T)
        x, lengths, state = case.inputs()
        outs = dict(zip(["y", "h_n", "c_n"], sess.run(None, feed_for(x, lengths, state))))
        assert_matches_model(outs, m, x, lengths, state, F32)


@pytest.mark.parametrize("opset", [fgx.MIN_OPSET, 22])
def test_other_opsets_run(opset):
    m = fg.GRU(3, 2, num_layers=2, reset_after=False, seed=1)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(F32)
    proto = fgx.to_onnx(m, opset=opset)
    assert proto.opset_import[0].version == opset
    assert_matches_model(run_ort(proto, {"x": x}), m, x, None, None, F32)


def test_constant_initial_state_is_stored_in_the_graph():
    m = fg.LSTM(2, 3, num_layers=2, seed=0)
    case = Case("lstm", True, 2, False, False, True, 4, 3, 2, 3, False, True, seed=5)
    x, _, state = case.inputs()
    proto = fgx.to_onnx(m, initial_state=state)
    assert [v.name for v in proto.graph.input] == ["x"]
    assert_matches_model(run_ort(proto, {"x": x}), m, x, None, state, F32)


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(case=cases(dtypes=(F32, F64), layouts=(0, 1)))
def test_round_trip_is_bitwise_exact(case):
    m = case.model()
    _, _, state = case.inputs()
    proto = fgx.to_onnx(m, layout=case.layout, initial_state=state)
    back, back_state = fgx.from_onnx(proto, return_state=True)
    same_model(m, back)
    if state is None:
        assert back_state is None
    else:
        for a, b in zip(state if isinstance(state, tuple) else (state,),
                        back_state if isinstance(back_state, tuple) else (back_state,), strict=True):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    # With state inputs instead of constants the model is the same.
    same_model(m, fgx.from_onnx(fgx.to_onnx(m, layout=case.layout, sequence_lens=True, initial_state=True)))


def test_round_trip_through_a_file_and_the_top_level_names(tmp_path):
    m = fg.GRU(3, 4, num_layers=2, bidirectional=True, reset_after=False, bias=False, dtype=F64, seed=3)
    path = tmp_path / "gru.onnx"
    proto = fg.to_onnx(m, path)
    assert path.exists() and onnx.load(str(path)) == proto
    same_model(m, fg.from_onnx(path))
    same_model(m, fg.from_onnx(str(path)))


def test_pick_nodes_by_name_or_index():
    m = fg.LSTM(3, 2, num_layers=2, bidirectional=True, seed=4)
    proto = fgx.to_onnx(m)
    names = [n.name for n in proto.graph.node if n.op_type == "LSTM"]
    sd = m.state_dict()
    first = fgx.from_onnx(proto, node=names[0])
    assert (first.num_layers, first.input_size) == (1, 3)
    assert all(np.array_equal(v, sd[k]) for k, v in first.state_dict().items())
    second = fgx.from_onnx(proto, node=names[1])
    assert second.input_size == 4
    assert all(np.array_equal(v, sd[k.replace("_l0", "_l1")]) for k, v in second.state_dict().items())
    index = [i for i, n in enumerate(proto.graph.node) if n.op_type == "LSTM"]
    same_model(m, fgx.from_onnx(proto, node=names))
    same_model(m, fgx.from_onnx(proto, node=index))


def test_batch_first_can_be_overridden():
    m = fg.GRU(2, 3, batch_first=True, seed=0)
    proto = fgx.to_onnx(m)
    assert fgx.from_onnx(proto).batch_first
    assert not fgx.from_onnx(proto, batch_first=False).batch_first


def test_dtype_can_be_chosen_on_import():
    m = fg.LSTM(2, 3, dtype=F64, seed=0)
    m32 = fgx.from_onnx(fgx.to_onnx(m), dtype=F32)
    assert m32.dtype == F32
    for k, v in m32.state_dict().items():
        assert np.array_equal(v, m.state_dict()[k].astype(F32))


# ---------------------------------------------------------------------------
# Import: hand-built ONNX graphs in ONNX's own conventions
# ---------------------------------------------------------------------------


def onnx_node_graph(cell, *, W, R, Bias=None, h0=None, c0=None, P=None, T="T", B="B", lens=False,
                    layout=0, hidden_size=True, **attrs):
    """One LSTM/GRU node with constant weights (and states), ONNX's layouts.

    ``h0``/``c0`` are given as (D, B, H) and stored in the layout's order.
    """
    dtype = W.dtype
    elem = TensorProto.FLOAT if dtype == F32 else TensorProto.DOUBLE
    D, _, I = W.shape
    H = R.shape[-1]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")]
    inputs = ["X", "W", "R", "", "", "", "", ""]
    if Bias is not None:
        inits.append(numpy_helper.from_array(Bias, "B"))
        inputs[3] = "B"
    graph_inputs = [helper.make_tensor_value_info("X", elem, [B, T, I] if layout else [T, B, I])]
    if lens:
        inputs[4] = "sequence_lens"
        graph_inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [B]))
    for slot, name, value in ((5, "initial_h", h0), (6, "initial_c", c0), (7, "P", P)):
        if value is not None:
            if layout and slot != 7:
                value = value.transpose(1, 0, 2)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            inputs[slot] = name
    while inputs[-1] == "":
        inputs.pop()
    if hidden_size:
        attrs["hidden_size"] = H
    if layout:
        attrs["layout"] = 1
    outputs = ["Y", "Y_h"] + (["Y_c"] if cell == "lstm" else [])
    node = helper.make_node(OPS[cell], inputs, outputs, name="rnn", **attrs)
    y_dims = [B, T, D, H] if layout else [T, D, B, H]
    s_dims = [B, D, H] if layout else [D, B, H]
    graph = helper.make_graph([node], "hand_built", graph_inputs,
                              [helper.make_tensor_value_info(o, elem, y_dims if o == "Y" else s_dims)
                               for o in outputs],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_weights(rng, cell, D, I, H, dtype=F32, bias=True):  # noqa: E741
    G = GATES[cell]
    k = 1.0 / np.sqrt(H)
    W = rng.uniform(-k, k, (D, G * H, I)).astype(dtype)
    R = rng.uniform(-k, k, (D, G * H, H)).astype(dtype)
    Bias = rng.uniform(-k, k, (D, 2 * G * H)).astype(dtype) if bias else None
    return W, R, Bias


@settings(max_examples=40, deadline=None)
@given(case=cases(layouts=(0, 1)), explicit_defaults=st.booleans())
def test_imported_hand_built_graph_matches_onnxruntime(case, explicit_defaults):
    rng = np.random.default_rng(case.seed)
    D, H, T, B = case.D, case.H, case.T, case.B
    W, R, Bias = onnx_weights(rng, case.cell, D, case.I, H, bias=case.bias)
    h0 = c0 = None
    if case.state:
        h0 = (0.5 * rng.standard_normal((D, B, H))).astype(F32)
        c0 = (0.5 * rng.standard_normal((D, B, H))).astype(F32) if case.cell == "lstm" else None
    attrs = {"direction": "bidirectional" if case.bidirectional else "forward"}
    if case.cell == "gru" and (case.reset_after or explicit_defaults):
        attrs["linear_before_reset"] = int(case.reset_after)   # absent means 0
    if explicit_defaults:                      # the defaults spelt out are accepted
        acts = ["Sigmoid", "Tanh", "Tanh"] if case.cell == "lstm" else ["Sigmoid", "Tanh"]
        attrs["activations"] = acts * D
        if case.cell == "lstm":
            attrs["input_forget"] = 0
    kw = dict(W=W, R=R, Bias=Bias, h0=h0, c0=c0, lens=case.lengths,
              B=B if case.state else "B", **attrs)
    proto = onnx_node_graph(case.cell, layout=case.layout, **kw)

    m, state = fgx.from_onnx(proto, return_state=True)
    assert isinstance(m, fg.LSTM if case.cell == "lstm" else fg.GRU)
    assert (m.num_layers, m.bidirectional, m.bias, m.batch_first, m.dtype) == (
        1, case.bidirectional, case.bias, case.layout == 1, np.dtype(F32))
    if case.cell == "gru":
        assert m.reset_after == case.reset_after

    X = rng.standard_normal((T, B, case.I)).astype(F32)        # time-major
    feed = {"X": X}
    lengths = None
    if case.lengths:
        lengths = rng.integers(1, T + 1, size=B)
        feed["sequence_lens"] = lengths.astype(np.int32)
    # onnxruntime runs the layout=0 graph; the layout=1 graph is the same
    # computation on transposed tensors (checked against the reference
    # evaluator in test_imported_layout_1_graph_matches_reference_evaluator).
    outs = run_ort(onnx_node_graph(case.cell, layout=0, **kw) if case.layout else proto, feed)
    Y = outs["Y"].transpose(0, 2, 1, 3).reshape(T, B, D * H)  # (T, D, B, H) -> (T, B, D*H)
    x = X
    if case.layout:
        x, Y = X.transpose(1, 0, 2), Y.transpose(1, 0, 2)
    y, final = m(x, state, lengths)
    assert_close(y, Y, F32, err_msg="Y")
    if case.cell == "lstm":
        assert_close(final[0], outs["Y_h"], F32, err_msg="Y_h")
        assert_close(final[1], outs["Y_c"], F32, err_msg="Y_c")
    else:
        assert_close(final, outs["Y_h"], F32, err_msg="Y_h")


@pytest.mark.parametrize("cell,linear_before_reset", [("lstm", None), ("gru", 0), ("gru", 1)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_imported_layout_1_graph_matches_reference_evaluator(cell, linear_before_reset, dtype):
    rng = np.random.default_rng(7)
    D, I, H, T, B = 2, 3, 4, 5, 2  # noqa: E741
    W, R, Bias = onnx_weights(rng, cell, D, I, H, dtype)
    h0 = (0.5 * rng.standard_normal((D, B, H))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((D, B, H))).astype(dtype) if cell == "lstm" else None
    attrs = {} if linear_before_reset is None else {"linear_before_reset": linear_before_reset}
    proto = onnx_node_graph(cell, W=W, R=R, Bias=Bias, h0=h0, c0=c0, B=B, layout=1, hidden_size=False,
                            direction="bidirectional", **attrs)  # hidden_size is optional
    X = rng.standard_normal((B, T, I)).astype(dtype)           # batch-major
    outs = ReferenceEvaluator(proto).run(None, {"X": X})
    m, state = fgx.from_onnx(proto, return_state=True)
    assert m.batch_first and m.dtype == dtype
    y, final = m(X, state)
    assert_close(y, outs[0].reshape(B, T, D * H), dtype)      # Y (B, T, D, H)
    finals = final if cell == "lstm" else (final,)
    for got, want in zip(finals, outs[1:], strict=True):       # Y_h, Y_c (B, D, H)
        assert_close(got, want.transpose(1, 0, 2), dtype)


def test_all_zero_peepholes_are_accepted():
    rng = np.random.default_rng(0)
    W, R, Bias = onnx_weights(rng, "lstm", 1, 2, 3)
    proto = onnx_node_graph("lstm", W=W, R=R, Bias=Bias, P=np.zeros((1, 9), F32))
    X = rng.standard_normal((4, 2, 2)).astype(F32)
    outs = run_ort(proto, {"X": X})
    y, (h, c) = fgx.from_onnx(proto)(X)
    assert_close(y, outs["Y"][:, 0], F32)
    assert_close(h, outs["Y_h"], F32)
    assert_close(c, outs["Y_c"], F32)


# ---------------------------------------------------------------------------
# What fastgates cannot compute yet, and bad arguments
# ---------------------------------------------------------------------------


UNSUPPORTED = [
    ("lstm", {"activations": ["Sigmoid", "Tanh", "Relu"]}, "activations"),
    ("gru", {"activations": ["HardSigmoid", "Tanh"]}, "activations"),
    ("gru", {"activations": ["Sigmoid", "Tanh"], "activation_alpha": [0.5]}, "activation_alpha"),
    ("lstm", {"activations": ["Sigmoid", "Tanh", "Tanh"], "activation_beta": [0.5]}, "activation_beta"),
]


@pytest.mark.parametrize("cell,attrs,named", UNSUPPORTED, ids=[f"{c}-{n}" for c, _, n in UNSUPPORTED])
def test_unsupported_attributes_raise_naming_them(cell, attrs, named):
    rng = np.random.default_rng(0)
    W, R, Bias = onnx_weights(rng, cell, 1, 2, 3)
    attrs = dict(attrs)
    P = rng.standard_normal((1, 9)).astype(F32) if attrs.pop("P", False) else None
    proto = onnx_node_graph(cell, W=W, R=R, Bias=Bias, P=P, **attrs)
    with pytest.raises(NotImplementedError, match=f"{named}.*'rnn'.*not supported"):
        fgx.from_onnx(proto)


def test_import_errors():
    rng = np.random.default_rng(0)
    W, R, Bias = onnx_weights(rng, "gru", 1, 2, 3)
    proto = onnx_node_graph("gru", W=W, R=R, Bias=Bias)
    with pytest.raises(ValueError, match="no LSTM/GRU node of that name"):
        fgx.from_onnx(proto, node="nope")
    with pytest.raises(ValueError, match=r"graph.node\[3\] is not an LSTM/GRU node"):
        fgx.from_onnx(proto, node=3)
    with pytest.raises(TypeError, match="model_or_path"):
        fgx.from_onnx(b"not a model")
    # Weights fed at run time.
    runtime_w = onnx.ModelProto()
    runtime_w.CopyFrom(proto)
    del runtime_w.graph.initializer[0]
    runtime_w.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 9, 2]))
    with pytest.raises(ValueError, match="input W of node 'rnn'.*not a constant"):
        fgx.from_onnx(runtime_w)
    # No recurrent node at all.
    empty = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["X"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])]))
    with pytest.raises(ValueError, match="no LSTM or GRU node"):
        fgx.from_onnx(empty)
    # The state is a graph input: there is no constant to return.
    with pytest.raises(ValueError, match="initial_h.*run time"):
        fgx.from_onnx(fgx.to_onnx(fg.GRU(2, 3, seed=0), initial_state=True), return_state=True)


def test_two_unconnected_nodes_need_node():
    rng = np.random.default_rng(0)
    W, R, _ = onnx_weights(rng, "lstm", 1, 2, 3)
    W2, R2, _ = onnx_weights(rng, "lstm", 1, 2, 3)
    inits = [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (R, "R"), (W2, "W2"), (R2, "R2"))]
    nodes = [helper.make_node("LSTM", ["X", "W", "R"], ["Y"], name="a", hidden_size=3),
             helper.make_node("LSTM", ["X", "W2", "R2"], ["Y2"], name="b", hidden_size=3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", 2])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["T", 1, "B", 3])
                               for y in ("Y", "Y2")],
                              initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match="do not form one chain.*node="):
        fgx.from_onnx(proto)
    b = fgx.from_onnx(proto, node="b")
    assert np.array_equal(b.weight_ih_l0, np.concatenate([W2[0, :3], W2[0, 6:9], W2[0, 9:], W2[0, 3:6]]))


def test_export_errors():
    with pytest.raises(TypeError, match="model must be a fastgates LSTM or GRU, got LSTMCell"):
        fgx.to_onnx(fg.LSTMCell(2, 3))
    m = fg.GRU(2, 3, num_layers=2, seed=0)
    with pytest.raises(ValueError, match=r"opset must lie in \[14, "):
        fgx.to_onnx(m, opset=13)
    with pytest.raises(ValueError, match="layout must be 0"):
        fgx.to_onnx(m, layout=2)
    with pytest.raises(TypeError, match="sequence_lens must be True or False"):
        fgx.to_onnx(m, sequence_lens="yes")
    with pytest.raises(ValueError, match=r"initial_state must have shape .* \(2, B, 3\)"):
        fgx.to_onnx(m, initial_state=np.zeros((1, 4, 3), F32))
    with pytest.raises(TypeError, match=r"tuple \(h, c\)"):
        fgx.to_onnx(fg.LSTM(2, 3), initial_state=np.zeros((1, 4, 3), F32))


# ---------------------------------------------------------------------------
# ONNX's variants: reverse-only direction, clip, peepholes, input_forget
# ---------------------------------------------------------------------------


@st.composite
def variant_models(draw):
    cell = draw(st.sampled_from(["lstm", "gru"]))
    reverse = draw(st.booleans())
    kw = dict(reverse=reverse, bidirectional=False if reverse else draw(st.booleans()),
              clip=draw(st.sampled_from([None, 0.5, 2.0])),     # float32-exact bounds
              bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)), dtype=F32)
    if cell == "lstm":
        kw.update(peephole=draw(st.booleans()), input_forget=draw(st.booleans()))
    else:
        kw.update(reset_after=draw(st.booleans()))
    sizes = (draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 2)))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    return cell, sizes, kw, T, B, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(case=variant_models())
def test_variants_export_run_in_onnxruntime_and_round_trip(case):
    cell, (I, H, L), kw, T, B, use_lengths = case  # noqa: E741
    m = (fg.LSTM if cell == "lstm" else fg.GRU)(I, H, L, **kw)
    if kw.get("peephole"):
        sd = m.state_dict()
        m.load_state_dict({k: 4 * v if "peep" in k else v for k, v in sd.items()})
    rng = np.random.default_rng(kw["seed"])
    x = (3 * rng.standard_normal((T, B, I))).astype(F32)
    lengths = rng.integers(1, T + 1, size=B) if use_lengths else None
    proto = fgx.to_onnx(m, sequence_lens=use_lengths)
    onnx.checker.check_model(proto, full_check=True)
    outs = run_ort(proto, feed_for(x, lengths, None))
    assert_matches_model(outs, m, x, lengths, None, F32)
    same_model(fgx.from_onnx(proto), m)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_hand_built_variant_graph_matches_onnxruntime(cell, direction):
    # P in ONNX's order (i, o, f), input_forget, clip and direction read
    # from a graph written with onnx.helper, against onnxruntime's run.
    rng = np.random.default_rng(3)
    D = 2 if direction == "bidirectional" else 1
    I, H, T, B = 3, 4, 6, 2  # noqa: E741
    W, R, Bias = onnx_weights(rng, cell, D, I, H)
    W, R = 2 * W, 2 * R
    attrs = dict(direction=direction, clip=0.75)
    P = None
    if cell == "lstm":
        attrs["input_forget"] = 1
        P = rng.uniform(-1, 1, (D, 3 * H)).astype(F32)
    else:
        attrs["linear_before_reset"] = 1
    proto = onnx_node_graph(cell, W=W, R=R, Bias=Bias, P=P, lens=True, **attrs)
    m = fgx.from_onnx(proto)
    assert m.clip == 0.75 and m.reverse == (direction == "reverse")
    if cell == "lstm":
        assert m.peephole and m.input_forget
        # ONNX's P rows (i, o, f) land in weight_peep's rows (i, f, o).
        np.testing.assert_array_equal(m.weight_peep_l0, P[0].reshape(3, H)[[0, 2, 1]])
    X = (3 * rng.standard_normal((T, B, I))).astype(F32)
    lengths = np.array([T, 3])
    outs = run_ort(proto, {"X": X, "sequence_lens": lengths.astype(np.int32)})
    y, final = m(X, None, lengths)
    assert_close(y, outs["Y"].transpose(0, 2, 1, 3).reshape(T, B, D * H), F32, err_msg="Y")
    h = final[0] if cell == "lstm" else final
    assert_close(h, outs["Y_h"], F32, err_msg="Y_h")
    if cell == "lstm":
        assert_close(final[1], outs["Y_c"], F32, err_msg="Y_c")
