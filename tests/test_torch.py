"""fastgates against PyTorch, through the public API only.

Every test builds a fastgates model, copies its ``state_dict()`` into the
matching ``torch.nn`` module (strict load, so the names and shapes must be
PyTorch's), runs both on the same input and compares outputs, final states
and all gradients. Gradients are those of::

    sum(y * dy) + sum(h_n * dh_n) [+ sum(c_n * dc_n)]

computed by ``pullback(dy, dstate)`` in fastgates and by ``backward()`` in
torch. Both sides compute in the model's dtype; tolerances come from
``tests/_tolerances.py``.

PyTorch has no ``reset_after=False`` GRU; that variant is compared with
``tests/reference.py`` (forward, states, gates) and with a small GRU written
in torch tensor operations (gradients by autograd), which is itself checked
against ``torch.nn.GRU`` and against the reference here.
"""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastgates as fg
import reference as ref
from _tolerances import assert_close

F32, F64 = np.float32, np.float64
TORCH_DTYPE = {np.dtype(F32): torch.float32, np.dtype(F64): torch.float64}

T, B, I, H = 6, 3, 4, 5
LENGTHS = [4, 6, 1]  # unsorted, includes T and 1


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def build(kind, num_layers=1, bidirectional=False, bias=True, batch_first=False,
          dtype=F64, reset_after=True, seed=0, sizes=(I, H)):
    if kind == "lstm":
        return fg.LSTM(*sizes, num_layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, dtype=dtype, seed=seed)
    return fg.GRU(*sizes, num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, reset_after=reset_after, dtype=dtype,
                  seed=seed)


def torch_twin(kind, m, num_layers, bidirectional, bias, batch_first, dtype):
    """The torch module holding ``m``'s parameters."""
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    tm = cls(m.input_size, m.hidden_size, num_layers, bias=bias, batch_first=batch_first,
             bidirectional=bidirectional, dtype=TORCH_DTYPE[np.dtype(dtype)])
    tm.load_state_dict({k: torch.tensor(v) for k, v in m.state_dict().items()})
    return tm


def as_list(state):
    return list(state) if isinstance(state, tuple) else [state]


def as_state(kind, arrays):
    return tuple(arrays) if kind == "lstm" else arrays[0]


def random_state(rng, kind, shape, dtype):
    n = 2 if kind == "lstm" else 1
    return as_state(kind, [(0.5 * rng.standard_normal(shape)).astype(dtype) for _ in range(n)])


def padded_input(rng, shape, lengths, batch_first, dtype, fill=None):
    """Random input; padded steps hold ``fill`` (a large value by default)."""
    x = rng.standard_normal(shape).astype(dtype)
    if lengths is not None:
        for b, n in enumerate(lengths):
            if batch_first:
                x[b, n:] = 50.0 if fill is None else fill
            else:
                x[n:, b] = 50.0 if fill is None else fill
    return x


def t_(a, grad=False):
    return torch.tensor(np.asarray(a), requires_grad=grad)


def n_(t):
    return t.detach().numpy().copy()


def torch_run(kind, tm, x, state, lengths, dy, dstate, batch_first, state_shape, dtype):
    """Forward and backward in torch; ``state=None`` becomes zeros needing grad."""
    if state is None:
        state = as_state(kind, [np.zeros(state_shape, dtype)] * (2 if kind == "lstm" else 1))
    xt = t_(x, grad=True)
    st = [t_(s, grad=True) for s in as_list(state)]
    hx = as_state(kind, st)
    if lengths is None:
        y, sn = tm(xt, hx)
    else:
        packed = pack_padded_sequence(xt, torch.tensor(lengths, dtype=torch.int64),
                                      batch_first=batch_first, enforce_sorted=False)
        out, sn = tm(packed, hx)
        total = x.shape[1] if batch_first else x.shape[0]
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=total)
    sn = as_list(sn)
    loss = (y * t_(dy)).sum()
    if dstate is not None:
        for s, ds in zip(sn, as_list(dstate)):
            loss = loss + (s * t_(ds)).sum()
    loss.backward()
    return {
        "y": n_(y),
        "state": [n_(s) for s in sn],
        "dx": n_(xt.grad),
        "dstate": [n_(s.grad) for s in st],
        "dparams": {name: n_(p.grad) for name, p in tm.named_parameters()},
    }


def fastgates_run(m, x, state, lengths, dy, dstate, checkpoint=None):
    """Forward and pullback in fastgates; also checks inputs are not modified
    and that a second pullback call gives the same result."""
    copies = [np.copy(a) for a in [x, dy] + as_list(state) + as_list(dstate)
              if a is not None]
    (y, sn), pullback = m.vjp(x, state, lengths, checkpoint=checkpoint)
    dx, ds0, dparams = pullback(dy, dstate)
    dx2, ds02, dparams2 = pullback(dy, dstate)
    np.testing.assert_array_equal(dx2, dx)
    for a, b in zip(as_list(ds02), as_list(ds0)):
        np.testing.assert_array_equal(a, b)
    for k in dparams:
        np.testing.assert_array_equal(dparams2[k], dparams[k])
    after = [a for a in [x, dy] + as_list(state) + as_list(dstate) if a is not None]
    for a, b in zip(after, copies):
        np.testing.assert_array_equal(a, b, err_msg="an input was modified")
    return {"y": y, "state": as_list(sn), "dx": dx, "dstate": as_list(ds0),
            "dparams": dparams}


def assert_same_results(got, want, dtype):
    assert got["y"].dtype == dtype, f"y has dtype {got['y'].dtype}"
    assert got["dx"].dtype == dtype, f"dx has dtype {got['dx'].dtype}"
    assert_close(got["y"], want["y"], dtype, err_msg="y")
    assert len(got["state"]) == len(want["state"])
    for k, (a, b) in enumerate(zip(got["state"], want["state"])):
        assert a.shape == b.shape, f"final state[{k}] shape {a.shape} != {b.shape}"
        assert_close(a, b, dtype, err_msg=f"final state[{k}]")
    assert got["dx"].shape == want["dx"].shape
    assert_close(got["dx"], want["dx"], dtype, err_msg="dx")
    for k, (a, b) in enumerate(zip(got["dstate"], want["dstate"])):
        assert a.shape == b.shape, f"dstate[{k}] shape {a.shape} != {b.shape}"
        assert_close(a, b, dtype, err_msg=f"dstate[{k}]")
    assert set(got["dparams"]) == set(want["dparams"])
    for name, g in got["dparams"].items():
        assert g.dtype == dtype, f"d{name} has dtype {g.dtype}"
        assert_close(g, want["dparams"][name], dtype, err_msg=f"d{name}")


def compare_with_torch(kind, num_layers, bidirectional, bias, batch_first, dtype,
                       with_state, lengths=None, batched=True, with_dstate=True,
                       pad_fill=None, seed=0, shape=(T, B, I, H), checkpoint=None):
    """Build a model of ``shape`` (T, B, I, H) and its torch twin, run both on
    the same random input, state and cotangents, and compare everything."""
    T, B, I, H = shape
    rng = np.random.default_rng(100 + seed)
    D = 2 if bidirectional else 1
    m = build(kind, num_layers, bidirectional, bias, batch_first, dtype, seed=seed,
              sizes=(I, H))
    tm = torch_twin(kind, m, num_layers, bidirectional, bias, batch_first, dtype)
    if batched:
        x_shape = (B, T, I) if batch_first else (T, B, I)
        y_shape = x_shape[:2] + (D * H,)
        state_shape = (num_layers * D, B, H)
    else:
        x_shape, y_shape, state_shape = (T, I), (T, D * H), (num_layers * D, H)
    x = padded_input(rng, x_shape, lengths, batch_first, dtype, pad_fill)
    state = random_state(rng, kind, state_shape, dtype) if with_state else None
    dy = rng.standard_normal(y_shape).astype(dtype)  # nonzero at padded steps too
    dstate = random_state(rng, kind, state_shape, dtype) if with_dstate else None
    lengths_arr = None if lengths is None else np.array(lengths, dtype=np.int64)

    got = fastgates_run(m, x, state, lengths_arr, dy, dstate, checkpoint)
    want = torch_run(kind, tm, x, state, lengths, dy, dstate, batch_first, state_shape,
                     dtype)
    assert_same_results(got, want, dtype)

    # Inference gives the same as the forward pass of vjp.
    y_inf, s_inf = m(x, state, lengths_arr)
    assert_close(y_inf, got["y"], dtype, err_msg="__call__ y")
    for a, b in zip(as_list(s_inf), got["state"]):
        assert_close(a, b, dtype, err_msg="__call__ state")
    return got


# ---------------------------------------------------------------------------
# LSTM and GRU (reset_after=True) against torch.nn.LSTM / torch.nn.GRU
# ---------------------------------------------------------------------------

# (num_layers, bidirectional, bias, batch_first, dtype, with_state)
SEQ_CASES = [
    (1, False, True, False, F64, False),
    (2, True, True, False, F64, True),
    (3, False, False, True, F64, True),
    (2, True, False, True, F32, False),
    (1, True, True, False, F32, True),
    (2, False, True, True, F32, True),
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional,bias,batch_first,dtype,with_state",
                         SEQ_CASES)
def test_matches_torch(kind, num_layers, bidirectional, bias, batch_first, dtype,
                       with_state):
    compare_with_torch(kind, num_layers, bidirectional, bias, batch_first, dtype,
                       with_state)


# (num_layers, bidirectional, bias, batch_first, dtype, with_state)
PACKED_CASES = [
    (1, False, True, False, F64, True),
    (2, True, True, False, F64, True),
    (2, True, False, True, F32, False),
    (1, True, True, True, F32, True),
]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("num_layers,bidirectional,bias,batch_first,dtype,with_state",
                         PACKED_CASES)
def test_lengths_match_torch_packed_sequences(kind, num_layers, bidirectional, bias,
                                              batch_first, dtype, with_state):
    got = compare_with_torch(kind, num_layers, bidirectional, bias, batch_first, dtype,
                             with_state, lengths=LENGTHS)
    for b, n in enumerate(LENGTHS):
        pad_y = got["y"][b, n:] if batch_first else got["y"][n:, b]
        pad_dx = got["dx"][b, n:] if batch_first else got["dx"][n:, b]
        assert np.all(pad_y == 0), "padded steps of y must be exactly 0"
        assert np.all(pad_dx == 0), "padded steps of x must get zero gradient"


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_nan_padding_influences_nothing(kind, dtype):
    # torch never reads packed-away steps; fastgates must not either.
    got = compare_with_torch(kind, 2, True, True, False, dtype, True, lengths=LENGTHS,
                             pad_fill=np.nan)
    for key in ("y", "dx"):
        assert np.all(np.isfinite(got[key])), key
    for name, g in got["dparams"].items():
        assert np.all(np.isfinite(g)), name


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_unbatched_input_matches_torch(kind, dtype):
    got = compare_with_torch(kind, 2, True, True, False, dtype, True, batched=False)
    assert got["y"].shape == (T, 2 * H)
    assert all(s.shape == (4, H) for s in got["state"] + got["dstate"])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dstate_none_means_zeros(kind):
    compare_with_torch(kind, 2, True, True, False, F64, True, lengths=LENGTHS,
                       with_dstate=False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_load_state_dict_from_torch(kind, dtype):
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    torch.manual_seed(7)
    tm = cls(I, H, 2, bidirectional=True, dtype=TORCH_DTYPE[np.dtype(dtype)])
    m = build(kind, 2, True, True, False, dtype, seed=123)
    m.load_state_dict(tm.state_dict())
    sd = m.state_dict()
    assert set(sd) == set(tm.state_dict())
    for name, value in tm.state_dict().items():
        assert sd[name].dtype == dtype
        np.testing.assert_array_equal(sd[name], n_(value), err_msg=name)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    y, state = m(x)
    with torch.no_grad():
        y_t, state_t = tm(t_(x))
    assert_close(y, n_(y_t), dtype)
    for a, b in zip(as_list(state), as_list(state_t)):
        assert_close(a, n_(b), dtype)


# ---------------------------------------------------------------------------
# Cells against torch.nn.LSTMCell / torch.nn.GRUCell
# ---------------------------------------------------------------------------

# (bias, dtype, batched, with_state)
CELL_CASES = [
    (True, F64, True, True),
    (False, F64, True, False),
    (True, F32, True, True),
    (False, F32, False, True),
    (True, F64, False, False),
]


def build_cell(kind, bias, dtype, reset_after=True, seed=3):
    if kind == "lstm":
        return fg.LSTMCell(I, H, bias=bias, dtype=dtype, seed=seed)
    return fg.GRUCell(I, H, bias=bias, reset_after=reset_after, dtype=dtype, seed=seed)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bias,dtype,batched,with_state", CELL_CASES)
def test_cell_matches_torch(kind, bias, dtype, batched, with_state):
    rng = np.random.default_rng(5)
    cell = build_cell(kind, bias, dtype)
    cls = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell}[kind]
    tc = cls(I, H, bias=bias, dtype=TORCH_DTYPE[np.dtype(dtype)])
    tc.load_state_dict({k: torch.tensor(v) for k, v in cell.state_dict().items()})
    assert set(cell.state_dict()) == (
        {"weight_ih", "weight_hh", "bias_ih", "bias_hh"} if bias
        else {"weight_ih", "weight_hh"})

    x_shape, s_shape = ((B, I), (B, H)) if batched else ((I,), (H,))
    x = rng.standard_normal(x_shape).astype(dtype)
    state = random_state(rng, kind, s_shape, dtype) if with_state else None
    dout = random_state(rng, kind, s_shape, dtype)

    out, pullback = cell.vjp(x, state)
    dx, dstate, dparams = pullback(dout)
    out_call = cell(x, state)

    state0 = state if with_state else as_state(
        kind, [np.zeros(s_shape, dtype)] * (2 if kind == "lstm" else 1))
    xt = t_(x, grad=True)
    st = [t_(s, grad=True) for s in as_list(state0)]
    out_t = as_list(tc(xt, as_state(kind, st)))
    loss = sum((o * t_(d)).sum() for o, d in zip(out_t, as_list(dout)))
    loss.backward()

    for a, b, c in zip(as_list(out), out_t, as_list(out_call)):
        assert a.shape == tuple(b.shape) and a.dtype == dtype
        assert_close(a, n_(b), dtype, err_msg="cell output")
        assert_close(c, n_(b), dtype, err_msg="cell __call__ output")
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_close(dx, n_(xt.grad), dtype, err_msg="dx")
    for a, s in zip(as_list(dstate), st):
        assert_close(a, n_(s.grad), dtype, err_msg="dstate")
    grads = {name: n_(p.grad) for name, p in tc.named_parameters()}
    assert set(dparams) == set(grads)
    for name in grads:
        assert_close(dparams[name], grads[name], dtype, err_msg=f"d{name}")


# ---------------------------------------------------------------------------
# GRU reset_after=False: reference and a GRU written in torch operations
# ---------------------------------------------------------------------------


def torch_ops_gru(x, params, num_layers, bidirectional, h0, lengths, reset_after):
    """GRU over time-major ``x`` in plain torch operations (autograd does the
    backward pass). Padded steps keep the state and output 0."""
    steps, batch = x.shape[0], x.shape[1]
    D = 2 if bidirectional else 1
    Hs = params["weight_hh_l0"].shape[1]
    if lengths is None:
        lengths = [steps] * batch
    valid = torch.arange(steps)[:, None] < torch.tensor(lengths)[None, :]  # (T, B)
    zeros = torch.zeros(batch, Hs, dtype=x.dtype)
    layer_input, finals = x, []
    for layer in range(num_layers):
        outputs = []
        for direction in range(D):
            key = ref.layer_key
            w_ih = params[key("weight_ih", layer, direction)]
            w_hh = params[key("weight_hh", layer, direction)]
            b_ih = params.get(key("bias_ih", layer, direction), torch.zeros(3 * Hs, dtype=x.dtype))
            b_hh = params.get(key("bias_hh", layer, direction), torch.zeros(3 * Hs, dtype=x.dtype))
            h = h0[layer * D + direction]
            out = [None] * steps
            order = range(steps) if direction == 0 else reversed(range(steps))
            for t in order:
                gi = layer_input[t] @ w_ih.T + b_ih
                r = torch.sigmoid(gi[:, :Hs] + h @ w_hh[:Hs].T + b_hh[:Hs])
                z = torch.sigmoid(gi[:, Hs:2 * Hs] + h @ w_hh[Hs:2 * Hs].T + b_hh[Hs:2 * Hs])
                if reset_after:
                    n = torch.tanh(gi[:, 2 * Hs:] + r * (h @ w_hh[2 * Hs:].T + b_hh[2 * Hs:]))
                else:
                    n = torch.tanh(gi[:, 2 * Hs:] + (r * h) @ w_hh[2 * Hs:].T + b_hh[2 * Hs:])
                h_new = (1 - z) * n + z * h
                mask = valid[t][:, None]
                h = torch.where(mask, h_new, h)
                out[t] = torch.where(mask, h_new, zeros)
            outputs.append(torch.stack(out))
            finals.append(h)
        layer_input = torch.cat(outputs, dim=2)
    return layer_input, torch.stack(finals)


def ops_run(params_np, x, h0, lengths, dy, dh, num_layers, bidirectional, reset_after):
    params = {k: t_(v, grad=True) for k, v in params_np.items()}
    xt, h0t = t_(x, grad=True), t_(h0, grad=True)
    y, hn = torch_ops_gru(xt, params, num_layers, bidirectional, h0t, lengths, reset_after)
    ((y * t_(dy)).sum() + (hn * t_(dh)).sum()).backward()
    return {"y": n_(y), "state": [n_(hn)], "dx": n_(xt.grad), "dstate": [n_(h0t.grad)],
            "dparams": {k: n_(p.grad) for k, p in params.items()}}


def test_torch_ops_gru_matches_torch_gru():
    # Validates the autograd oracle used for reset_after=False below.
    rng = np.random.default_rng(20)
    m = build("gru", 2, True, True, False, F64, seed=20)
    tm = torch_twin("gru", m, 2, True, True, False, F64)
    x = padded_input(rng, (T, B, I), LENGTHS, False, F64)
    h0, dh = (0.5 * rng.standard_normal((4, B, H)) for _ in range(2))
    dy = rng.standard_normal((T, B, 2 * H))
    got = ops_run(m.state_dict(), x, h0, LENGTHS, dy, dh, 2, True, True)
    want = torch_run("gru", tm, x, h0, LENGTHS, dy, dh, False, (4, B, H), F64)
    assert_same_results(got, want, F64)


def test_torch_ops_gru_reset_before_matches_reference():
    rng = np.random.default_rng(21)
    params = ref.random_params(rng, "gru", I, H, 2, True, True, scale=0.8)
    x = padded_input(rng, (T, B, I), LENGTHS, False, F64)
    h0 = rng.standard_normal((4, B, H))
    y_ref, h_ref, _ = ref.reference_gru(x, params, 2, True, h0, LENGTHS, reset_after=False)
    with torch.no_grad():
        y, hn = torch_ops_gru(t_(x), {k: t_(v) for k, v in params.items()}, 2, True,
                              t_(h0), LENGTHS, False)
    assert_close(n_(y), y_ref, F64)
    assert_close(n_(hn), h_ref, F64)


# (num_layers, bidirectional, bias, dtype, with_state, lengths)
RESET_BEFORE_CASES = [
    (1, False, True, F64, False, None),
    (2, True, True, F64, True, LENGTHS),
    (2, True, False, F32, True, LENGTHS),
    (1, True, True, F32, False, None),
]


@pytest.mark.parametrize("num_layers,bidirectional,bias,dtype,with_state,lengths",
                         RESET_BEFORE_CASES)
def test_gru_reset_before_matches_reference_and_autograd(num_layers, bidirectional, bias,
                                                         dtype, with_state, lengths):
    rng = np.random.default_rng(22)
    D = 2 if bidirectional else 1
    m = build("gru", num_layers, bidirectional, bias, False, dtype, reset_after=False,
              seed=22)
    params = m.state_dict()
    x = padded_input(rng, (T, B, I), lengths, False, dtype)
    h0 = (0.5 * rng.standard_normal((num_layers * D, B, H))).astype(dtype)
    dy = rng.standard_normal((T, B, D * H)).astype(dtype)
    dh = rng.standard_normal((num_layers * D, B, H)).astype(dtype)
    lengths_arr = None if lengths is None else np.array(lengths)
    state = h0 if with_state else None

    got = fastgates_run(m, x, state, lengths_arr, dy, dh)

    # Forward against the float64 reference (exact inputs, exact arithmetic).
    params64 = {k: v.astype(F64) for k, v in params.items()}
    h0_ref = h0.astype(F64) if with_state else None
    y_ref, h_ref, gates_ref = ref.reference_gru(x.astype(F64), params64, num_layers,
                                                bidirectional, h0_ref, lengths,
                                                reset_after=False)
    assert_close(got["y"], y_ref, dtype, err_msg="y vs reference")
    assert_close(got["state"][0], h_ref, dtype, err_msg="h_n vs reference")
    gates = m.gates(x, state, lengths_arr)
    for k in ("r", "z", "n"):
        assert_close(gates[k], gates_ref[k], dtype, err_msg=f"gate {k} vs reference")

    # Everything, gradients included, against autograd in the model's dtype.
    h0_ops = h0 if with_state else np.zeros_like(h0)
    want = ops_run(params, x, h0_ops, lengths, dy, dh, num_layers, bidirectional, False)
    assert_same_results(got, want, dtype)


@pytest.mark.parametrize("bias,dtype,batched,with_state", CELL_CASES)
def test_gru_cell_reset_before_matches_reference_and_autograd(bias, dtype, batched,
                                                              with_state):
    rng = np.random.default_rng(23)
    cell = build_cell("gru", bias, dtype, reset_after=False)
    p = cell.state_dict()
    x_shape, s_shape = ((B, I), (B, H)) if batched else ((I,), (H,))
    x = rng.standard_normal(x_shape).astype(dtype)
    h = (0.5 * rng.standard_normal(s_shape)).astype(dtype) if with_state else None
    dout = rng.standard_normal(s_shape).astype(dtype)

    h1, pullback = cell.vjp(x, h)
    dx, dh, dparams = pullback(dout)

    h_ref = np.zeros(s_shape) if h is None else h.astype(F64)
    x2, h2 = np.atleast_2d(x.astype(F64)), np.atleast_2d(h_ref)
    expected = np.stack([
        ref.gru_step(x2[b], h2[b], p["weight_ih"].astype(F64), p["weight_hh"].astype(F64),
                     None if not bias else p["bias_ih"].astype(F64),
                     None if not bias else p["bias_hh"].astype(F64),
                     reset_after=False)[0]
        for b in range(x2.shape[0])]).reshape(s_shape)
    assert h1.dtype == dtype
    assert_close(h1, expected, dtype, err_msg="h1 vs reference")
    assert_close(cell(x, h), expected, dtype, err_msg="__call__ vs reference")

    # Autograd: a one-step, one-layer sequence in torch operations; its only
    # output step is h1, so dy = dout and a zero final-state cotangent.
    seq_params = {k + "_l0": v for k, v in p.items()}
    dy = np.atleast_2d(dout)[None]
    want = ops_run(seq_params, x2[None].astype(dtype), h2[None].astype(dtype), None,
                   dy, np.zeros_like(dy), 1, False, False)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert_close(dx, want["dx"][0].reshape(x.shape), dtype, err_msg="dx")
    assert_close(dh, want["dstate"][0][0].reshape(s_shape), dtype, err_msg="dh")
    assert set(dparams) == set(p)
    for k in p:
        assert_close(dparams[k], want["dparams"][k + "_l0"], dtype, err_msg=f"d{k}")


# ---------------------------------------------------------------------------
# Gates against the reference (torch does not expose them)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind,reset_after", [("lstm", True), ("gru", True)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_gates_match_reference(kind, reset_after, dtype):
    rng = np.random.default_rng(30)
    m = build(kind, 2, True, True, False, dtype, reset_after=reset_after, seed=30)
    params64 = {k: v.astype(F64) for k, v in m.state_dict().items()}
    x = padded_input(rng, (T, B, I), LENGTHS, False, dtype)
    state = random_state(rng, kind, (4, B, H), dtype)
    gates = m.gates(x, state, np.array(LENGTHS))
    if kind == "lstm":
        _, _, want = ref.reference_lstm(x.astype(F64), params64, 2, True,
                                        state[0].astype(F64), state[1].astype(F64), LENGTHS)
    else:
        _, _, want = ref.reference_gru(x.astype(F64), params64, 2, True,
                                       state.astype(F64), LENGTHS, reset_after=reset_after)
    assert set(gates) == set(want)
    for k in want:
        assert gates[k].shape == (4, T, B, H) and gates[k].dtype == dtype
        assert_close(gates[k], want[k], dtype, err_msg=f"gate {k}")
        for b, n in enumerate(LENGTHS):
            assert np.all(gates[k][:, n:, b] == 0), f"gate {k} nonzero at padded steps"


def test_gates_unbatched_drop_the_batch_axis():
    rng = np.random.default_rng(31)
    m = build("lstm", 1, True, True, False, F64, seed=31)
    x = rng.standard_normal((T, I))
    gates = m.gates(x)
    _, _, want = ref.reference_lstm(x[:, None, :], m.state_dict(), 1, True)
    for k in want:
        assert gates[k].shape == (2, T, H)
        assert_close(gates[k], want[k][:, :, 0, :], F64, err_msg=f"gate {k}")


# ---------------------------------------------------------------------------
# Realistic sizes: the paths that only open above the small shapes above
# ---------------------------------------------------------------------------
#
# The small shapes above fit in one block, one chunk and one panel of the
# register tiles, so every path that opens with size (fastgates/_recurrent.py,
# fastgates/_linalg.py) would otherwise be compared only with other fastgates
# paths.  Each shape below crosses some of those thresholds on a pool of two
# threads (this machine's and CI's), at 2 threads, and the test checks, by
# watching which kernels run, that it really does:
#
# - "overlap fwd" / "overlap bwd": B = 1 is one chunk, so a second thread makes
#   the input projection ahead of the LSTM's recurrence (T > cells.lstm.OVERLAP_PROJECT_STEPS
#   = 16) and the products over time of each block beside the backward kernel
#   (lstm_forward_overlapped / lstm_backward_overlapped: T > one block);
# - "fused chunks": B > one chunk (ceil(B / 2) rows) of at least
#   PROJECT_MIN_ROWS = 8 rows: each chunk makes its own input projection, in
#   blocks of PROJECT_BLOCK_BYTES // (chunk * 4H or 3H * 8) steps, here two or more;
# - "split tiles": a block of the products over time of at least
#   SPLIT_MIN_MACS = 2e6 multiply-adds, cut into one part per pool thread, made
#   by the register tiles (I and H >= 32, a float64 panel): weight gradients
#   (weight_grad) and the input gradient (project_parallel);
# - "blocks": a product over more than one block of block_steps(T, B) steps
#   (ceil(1024 / B), at B = 1 about T / 8 and at least 16) summed block by block;
# - "BLAS": weight gradients of narrow inputs (I or H below a panel) by OpenBLAS;
# - "projection first": chunks below PROJECT_MIN_ROWS rows: the input
#   projection of all steps is made before the recurrence;
# - "side by side": an LSTM's small backward products shared between two threads
#   (products_side_by_side).
#
# Checkpointing (a few segments of whole blocks) recomputes each segment from
# its starting state, in runs of blocks that differ from the plain call.

REALISTIC = {
    # (num_layers, bidirectional, lengths, checkpoint): per kind, what it crosses
    (40, 1, 8, 32): dict(
        layers=1, bidirectional=False, lengths=False, checkpoint=20,
        lstm={"overlap fwd", "overlap bwd"}, gru={"blocks", "BLAS"},
        # the checkpointed segments: 32 steps (overlapped), then 8 (side by side)
        lstm_checkpoint={"overlap fwd", "overlap bwd", "side by side"}),
    # T = 40: a GRU chunk's projection block is 21 steps, so it takes two too
    (40, 16, 64, 64): dict(
        layers=1, bidirectional=False, lengths=False, checkpoint=30,
        lstm={"fused chunks", "split tiles"}, gru={"fused chunks", "split tiles"}),
    (130, 24, 64, 96): dict(
        layers=2, bidirectional=True, lengths=True, checkpoint=50,
        lstm={"fused chunks", "split tiles", "blocks"},
        gru={"fused chunks", "split tiles", "blocks"}),
    # thousands of steps: 8 blocks of 250 steps; narrow I and H go to OpenBLAS
    (2000, 1, 3, 8): dict(
        layers=1, bidirectional=False, lengths=False, checkpoint=500,
        lstm={"overlap fwd", "overlap bwd"}, gru={"blocks", "BLAS"}),
    # ten thousand steps (docs/guarantees.md, "Long sequences"): chunks of one
    # row are too small to project themselves, so the projection comes first;
    # 20 blocks of 512 steps
    (10_000, 2, 3, 8): dict(
        layers=1, bidirectional=False, lengths=False, checkpoint=1000,
        lstm={"projection first", "side by side"}, gru={"projection first", "blocks", "BLAS"}),
}


@pytest.fixture
def watch_paths(monkeypatch):
    """Two threads, and the set of size-dependent paths the calls take."""
    import numba

    import fastgates.cells.gru as gru_cell
    import fastgates.cells.lstm as lstm_cell
    from fastgates import _config, _linalg, _recurrent
    if numba.config.NUMBA_NUM_THREADS != 2:
        pytest.skip("the shapes are chosen for a pool of two threads")
    seen = set()

    class Spy:
        def __init__(self, kernel, note):
            self.kernel, self.note = kernel, note

        def __call__(self, *args):
            seen.update(self.note(*args))
            return self.kernel(*args)

        def __getattr__(self, attr):      # what _config.Tier reads
            return getattr(self.kernel, attr)

    def spy(module, name, note):
        monkeypatch.setattr(module, name, Spy(getattr(module, name), note))

    # the paths of a process whose kernels are all compiled (a process
    # otherwise takes the overlapped ones once they pay: _config.Tier)
    monkeypatch.setattr(_config, "_eager_tiers", True)

    def fused(x, block, xw, chunk):
        # the kernel projects from x itself, in several chunks and blocks of
        # steps, or reads a projection made before
        t, b = x.shape[:2]
        if xw.shape[0]:
            return {"projection first"}
        return {"fused chunks"} if chunk < b and t > block else set()

    def weights(a, b, out, block_rows, nparts, *rest):
        return ({"split tiles"} if nparts > 1 else set()) | (
            {"blocks"} if a.shape[0] > block_rows else set())

    def blas(a, b, out, block_rows, *rest):
        return {"BLAS", "blocks"} if a.shape[0] > block_rows else {"BLAS"}

    spy(lstm_cell, "lstm_forward", lambda *a: fused(a[0], a[3], a[4], a[10]))
    spy(gru_cell, "gru_forward", lambda *a: fused(a[0], a[3], a[4], a[11]))
    spy(lstm_cell, "lstm_forward_overlapped", lambda *a: {"overlap fwd"})
    spy(lstm_cell, "lstm_backward_overlapped", lambda *a: {"overlap bwd"})
    spy(_recurrent, "products_side_by_side", lambda *a: {"side by side"})
    spy(_recurrent, "project_parallel", lambda *a: {"split tiles"})
    spy(_linalg, "weight_grad", weights)
    spy(_linalg, "matmul_tn", blas)
    threads = fg.get_num_threads()
    # Not adaptive: a busy moment of the machine (the PyTorch reference's
    # own pool spinning) would otherwise put a call on one thread, where the
    # two-task paths are not taken.
    fg.set_num_threads(2, adaptive=False)
    yield seen
    fg.set_num_threads(threads)


# The two largest run in the default pass only (tests/conftest.py): the paths
# they cross do not depend on the activation mode, and the smaller shapes
# cross most of them in both passes.
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [
    pytest.param(shape, marks=pytest.mark.default_pass_only) if shape[0] * shape[1] > 3000
    else shape for shape in REALISTIC], ids=str)
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpoint"])
def test_matches_torch_at_realistic_sizes(kind, shape, checkpointed, watch_paths):
    case = REALISTIC[shape]
    T_, B_ = shape[:2]
    lengths = None
    if case["lengths"]:
        # unsorted, the longest T, the shortest one step
        lengths = list(np.random.default_rng(7).integers(1, T_ + 1, B_))
        lengths[3], lengths[B_ // 2] = T_, 1
    checkpoint = case["checkpoint"] if checkpointed else None
    compare_with_torch(kind, case["layers"], case["bidirectional"], True, False, F64,
                       True, lengths=lengths, shape=shape, checkpoint=checkpoint, seed=1)
    want = case.get(f"{kind}_checkpoint" if checkpointed else kind, case[kind])
    assert want <= watch_paths, f"{shape} no longer crosses {want - watch_paths}"
