"""fastgates.torch against real PyTorch: converters and drop-in modules.

- ``from_torch`` / ``to_torch``: round trips copy parameters bitwise (same
  dtype, same bytes, NaN payloads included), keep every option, and the two
  sides compute the same outputs and final states (tolerances from
  ``tests/_tolerances.py``); what fastgates cannot represent raises.
- ``fastgates.torch.LSTM`` / ``GRU``: the same initialisation as ``nn.LSTM``
  / ``nn.GRU`` under the same seed, and the same outputs, final states and
  gradients (input, initial states, every parameter) for every input layout
  torch accepts (batched, batch-first, unbatched, packed sorted and
  unsorted), on fixed cases and on Hypothesis-drawn shapes and options; the
  same loss curve over a float64 training loop.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastgates as fg
import fastgates.torch as fgt
from _tolerances import assert_close

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
TORCH_DTYPE = {F32: torch.float32, F64: torch.float64}
I, H = 3, 4
LAYOUTS = ("batched", "unbatched", "packed_sorted", "packed_unsorted")


def bitwise_equal(a, b):
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_parameters(torch_module, fg_model):
    want = dict(torch_module.named_parameters())
    got = fg_model.state_dict()
    assert list(got) == list(want), "parameter names or their order differ"
    for name, value in got.items():
        assert bitwise_equal(value, want[name]), f"{name} is not a bitwise copy"


def n_(t):
    return t.detach().numpy().copy()


# ---------------------------------------------------------------------------
# from_torch / to_torch
# ---------------------------------------------------------------------------

# (torch class, keyword arguments)
MODULES = [
    (nn.LSTM, {}),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(num_layers=2, bias=False)),
    (nn.GRU, {}),
    (nn.GRU, dict(num_layers=2, bidirectional=True)),
    (nn.GRU, dict(bias=False, batch_first=True, bidirectional=True)),
    (nn.LSTMCell, {}),
    (nn.LSTMCell, dict(bias=False)),
    (nn.GRUCell, {}),
    (nn.GRUCell, dict(bias=False)),
]
FG_CLASS = {nn.LSTM: fg.LSTM, nn.GRU: fg.GRU, nn.LSTMCell: fg.LSTMCell, nn.GRUCell: fg.GRUCell}


def compare_outputs(torch_module, fg_model, dtype, seed=0):
    """Run both on the same random input and initial state; compare the results."""
    rng = np.random.default_rng(seed)
    cell = isinstance(torch_module, (nn.LSTMCell, nn.GRUCell))
    lstm = isinstance(torch_module, (nn.LSTM, nn.LSTMCell))
    B, T = 3, 5
    if cell:
        x = rng.standard_normal((B, I)).astype(dtype)
        state_shape = (B, H)
    else:
        D = 2 if torch_module.bidirectional else 1
        x = rng.standard_normal((B, T, I) if torch_module.batch_first else (T, B, I)).astype(dtype)
        state_shape = (torch_module.num_layers * D, B, H)
    states = [(0.5 * rng.standard_normal(state_shape)).astype(dtype) for _ in range(2 if lstm else 1)]
    state = tuple(states) if lstm else states[0]
    tstate = tuple(map(torch.from_numpy, states)) if lstm else torch.from_numpy(states[0])
    with torch.no_grad():
        want = torch_module(torch.from_numpy(x), tstate)
    got = fg_model(x, state)
    if cell:
        want, got = (want, got) if lstm else ((want,), (got,))
    else:
        want = (want[0],) + (tuple(want[1]) if lstm else (want[1],))
        got = (got[0],) + (tuple(got[1]) if lstm else (got[1],))
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        assert_close(a, n_(b), dtype, err_msg=f"output {k}")


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cls,kwargs", MODULES)
def test_from_torch_then_to_torch_is_exact(cls, kwargs, dtype):
    torch.manual_seed(1)
    tm = cls(I, H, **kwargs, dtype=TORCH_DTYPE[dtype])
    m = fgt.from_torch(tm)
    assert type(m) is FG_CLASS[cls] and m.dtype == dtype
    for option in ("input_size", "hidden_size", "bias", "num_layers", "batch_first", "bidirectional"):
        if hasattr(tm, option):
            assert getattr(m, option) == getattr(tm, option), option
    if cls in (nn.GRU, nn.GRUCell):
        assert m.reset_after
    assert_same_parameters(tm, m)
    compare_outputs(tm, m, dtype)

    back = fgt.to_torch(m)
    assert type(back) is cls
    assert all(p.requires_grad and p.dtype == TORCH_DTYPE[dtype] for p in back.parameters())
    assert_same_parameters(back, m)
    assert set(back.state_dict()) == set(tm.state_dict())

    # The lazy wrappers in fastgates/__init__.py lead to the same functions.
    assert_same_parameters(tm, fg.from_torch(tm))
    assert_same_parameters(fg.to_torch(m), m)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_round_trips_keep_special_values_bitwise(dtype):
    tm = nn.LSTM(I, H, dtype=TORCH_DTYPE[dtype])
    bits = {F32: np.uint32, F64: np.uint64}[dtype]
    odd_nan = np.array([0x7FF8_0000_0000_0ABC if dtype == F64 else 0x7FC0_0ABC], dtype=bits)
    with torch.no_grad():
        w = tm.weight_ih_l0.view(-1)
        w[0] = torch.from_numpy(odd_nan.view(dtype))[0]
        w[1] = -0.0
        w[2] = float("inf")
        w[3] = np.finfo(dtype).smallest_subnormal.item()
    m = fgt.from_torch(tm)
    assert_same_parameters(tm, m)
    assert_same_parameters(fgt.to_torch(m), m)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("make", [
    lambda dt: fg.LSTM(I, H, 2, bidirectional=True, batch_first=True, dtype=dt, seed=3),
    lambda dt: fg.GRU(I, H, 2, bias=False, dtype=dt, seed=3),
    lambda dt: fg.LSTMCell(I, H, dtype=dt, seed=3),
    lambda dt: fg.GRUCell(I, H, bias=False, dtype=dt, seed=3),
], ids=["lstm", "gru", "lstm_cell", "gru_cell"])
def test_to_torch_then_from_torch_is_exact(make, dtype):
    m = make(dtype)
    rng_before = torch.get_rng_state()
    tm = fgt.to_torch(m)
    assert torch.equal(torch.get_rng_state(), rng_before), "to_torch drew from torch's RNG"
    assert not isinstance(tm, (fgt.LSTM, fgt.GRU))
    assert_same_parameters(tm, m)
    compare_outputs(tm, m, dtype, seed=4)
    again = fgt.from_torch(tm)
    assert type(again) is type(m)
    assert_same_parameters(tm, again)
    assert repr(again) == repr(m)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_to_torch_dropin(kind):
    m = (fg.LSTM if kind == "lstm" else fg.GRU)(I, H, 2, bidirectional=True, dtype=F64, seed=5)
    tm = fgt.to_torch(m, dropin=True)
    assert type(tm) is (fgt.LSTM if kind == "lstm" else fgt.GRU)
    assert_same_parameters(tm, m)
    compare_outputs(tm, m, F64, seed=5)


def test_converters_reject_what_fastgates_lacks():
    two_layers = nn.LSTM(I, H, num_layers=2, dropout=0.5)
    converted = fgt.from_torch(two_layers)            # dropout is converted, as an option
    assert converted.dropout == 0.5
    assert_same_parameters(two_layers, converted)
    assert fgt.to_torch(converted).dropout == 0.5
    with pytest.raises(TypeError, match=r"torch\.float16.*float32 or torch\.float64"):
        fgt.from_torch(nn.GRU(I, H).half())
    with pytest.raises(TypeError, match="bfloat16"):
        fgt.from_torch(nn.LSTMCell(I, H).bfloat16())
    mixed = nn.LSTM(I, H)
    mixed.weight_hh_l0 = nn.Parameter(mixed.weight_hh_l0.detach().double())
    with pytest.raises(TypeError, match="one dtype.*weight_hh_l0: torch.float64"):
        fgt.from_torch(mixed)
    with pytest.raises(ValueError, match="device meta.*CPU"):
        fgt.from_torch(nn.GRU(I, H, device="meta"))
    for other in (nn.RNN(I, H), nn.Linear(I, H), fg.LSTM(I, H)):
        with pytest.raises(TypeError, match="module must be a torch.nn.LSTM, GRU, LSTMCell or GRUCell"):
            fgt.from_torch(other)

    for model in (fg.GRU(I, H, reset_after=False), fg.GRUCell(I, H, reset_after=False)):
        with pytest.raises(NotImplementedError, match="reset_after=False.*reset-after"):
            fgt.to_torch(model)
    # fastgates' variants of ONNX's operators have no torch.nn equivalent.
    for model, option in [(fg.LSTM(I, H, reverse=True), "reverse=True"),
                          (fg.GRU(I, H, clip=3.0), "clip=3.0"),
                          (fg.LSTM(I, H, peephole=True), "peephole=True"),
                          (fg.LSTMCell(I, H, input_forget=True), "input_forget=True"),
                          (fg.LSTMCell(I, H, clip=1.5, peephole=True), "clip=1.5, peephole=True")]:
        with pytest.raises(NotImplementedError, match=f"no equivalent of {option}"):
            fgt.to_torch(model)
    with pytest.raises(NotImplementedError, match="dropin=True"):
        fgt.to_torch(fg.LSTMCell(I, H), dropin=True)
    for other in (nn.LSTM(I, H), "LSTM"):
        with pytest.raises(TypeError, match="model must be a fastgates LSTM, GRU, LSTMCell or GRUCell"):
            fgt.to_torch(other)


# ---------------------------------------------------------------------------
# The drop-in modules against torch.nn.LSTM / torch.nn.GRU
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64])
@pytest.mark.parametrize("kind,kwargs", [
    ("lstm", {}),
    ("lstm", dict(num_layers=2, bidirectional=True, bias=False, batch_first=True)),
    ("gru", {}),
    ("gru", dict(num_layers=3, bidirectional=True, dropout=0.25)),
])
def test_dropin_has_torch_init_names_and_parameters(kind, kwargs, dtype):
    ref_cls, cls = (nn.LSTM, fgt.LSTM) if kind == "lstm" else (nn.GRU, fgt.GRU)
    torch.manual_seed(11)
    ref = ref_cls(5, 6, **kwargs, dtype=dtype)
    after_ref = torch.rand(3)
    torch.manual_seed(11)
    mine = cls(5, 6, **kwargs, dtype=dtype)
    after_mine = torch.rand(3)
    assert isinstance(mine, ref_cls)
    assert repr(mine) == repr(ref)
    assert torch.equal(after_ref, after_mine), "the generator was used differently"
    want, got = list(ref.named_parameters()), list(mine.named_parameters())
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, p), (_, q) in zip(got, want):
        assert isinstance(p, nn.Parameter) and p.requires_grad
        assert bitwise_equal(p, q), name
    assert list(mine.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(mine.state_dict())  # strict, both ways
    mine.load_state_dict(ref.state_dict())


def run_module(module, kind, layout, x_np, lengths, state_np, rng_cot, batch_first, cot=None):
    """Forward and backward through ``module``; returns everything as NumPy."""
    dtype = module.weight_ih_l0.dtype
    x = torch.tensor(x_np, dtype=dtype, requires_grad=True)
    x_before = x.detach().clone()
    states = [torch.tensor(s, dtype=dtype, requires_grad=True) for s in state_np]
    hx = None if not states else (tuple(states) if kind == "lstm" else states[0])
    if layout.startswith("packed"):
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                   enforce_sorted=layout == "packed_sorted")
    else:
        inp = x
    out, hidden = module(inp, hx)
    finals = list(hidden) if kind == "lstm" else [hidden]
    info = {}
    if layout.startswith("packed"):
        assert isinstance(out, PackedSequence)
        info = {"batch_sizes": out.batch_sizes, "sorted": out.sorted_indices,
                "unsorted": out.unsorted_indices}
        y = out.data
    else:
        y = out
    if cot is None:  # cotangents drawn once, from the first module's shapes
        cot = [rng_cot.standard_normal(tuple(t.shape)) for t in [y] + finals]
    loss = sum((t * torch.tensor(c, dtype=dtype)).sum() for t, c in zip([y] + finals, cot))
    loss.backward()
    assert torch.equal(x.detach(), x_before), "the input was modified"
    return {
        "y": n_(y), "finals": [n_(f) for f in finals], "dx": n_(x.grad),
        "dstates": [n_(s.grad) for s in states],
        "dparams": {name: n_(p.grad) for name, p in module.named_parameters()},
        "info": info,
    }, cot


def compare_dropin(kind, dtype, layout, num_layers=1, bidirectional=False, bias=True,
                   batch_first=False, with_state=True, T=5, B=3, I_=I, H_=H, seed=0):
    ref_cls, cls = (nn.LSTM, fgt.LSTM) if kind == "lstm" else (nn.GRU, fgt.GRU)
    kw = dict(num_layers=num_layers, bias=bias, batch_first=batch_first,
              bidirectional=bidirectional, dtype=TORCH_DTYPE[dtype])
    torch.manual_seed(seed)
    ref = ref_cls(I_, H_, **kw)
    torch.manual_seed(seed)
    mine = cls(I_, H_, **kw)
    rng = np.random.default_rng(seed)
    D = 2 if bidirectional else 1
    if layout == "unbatched":
        x_shape, s_shape = (T, I_), (num_layers * D, H_)
    else:
        x_shape = (B, T, I_) if batch_first else (T, B, I_)
        s_shape = (num_layers * D, B, H_)
    x = rng.standard_normal(x_shape)
    lengths = None
    if layout.startswith("packed"):
        lengths = rng.integers(1, T + 1, size=B)
        if layout == "packed_sorted":
            lengths = np.sort(lengths)[::-1].copy()
    n_states = (2 if kind == "lstm" else 1) if with_state else 0
    state = [0.5 * rng.standard_normal(s_shape) for _ in range(n_states)]
    want, cot = run_module(ref, kind, layout, x, lengths, state, rng, batch_first)
    got, _ = run_module(mine, kind, layout, x, lengths, state, rng, batch_first, cot)

    for key, value in want["info"].items():
        other = got["info"][key]
        assert (value is None and other is None) or torch.equal(value, other), key
    assert got["y"].shape == want["y"].shape and got["y"].dtype == dtype
    assert_close(got["y"], want["y"], dtype, err_msg="output")
    for k, (a, b) in enumerate(zip(got["finals"], want["finals"])):
        assert a.shape == b.shape and a.dtype == dtype
        assert_close(a, b, dtype, err_msg=f"final state {k}")
    assert_close(got["dx"], want["dx"], dtype, err_msg="d input")
    for k, (a, b) in enumerate(zip(got["dstates"], want["dstates"])):
        assert_close(a, b, dtype, err_msg=f"d initial state {k}")
    assert list(got["dparams"]) == list(want["dparams"])
    for name, g in got["dparams"].items():
        assert g.dtype == dtype
        assert_close(g, want["dparams"][name], dtype, err_msg=f"d {name}")


# Every layout for both cells and dtypes, with the structure options cycling.
FIXED = [
    (kind, dtype, layout, structure)
    for kind in ("lstm", "gru") for dtype in (F32, F64)
    for layout, structure in zip(LAYOUTS, [
        dict(num_layers=2, bidirectional=True, batch_first=True),
        dict(num_layers=2, bidirectional=False, bias=False),
        dict(num_layers=1, bidirectional=True, batch_first=False),
        dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
    ])
]


@pytest.mark.parametrize("kind,dtype,layout,structure", FIXED)
def test_dropin_matches_torch(kind, dtype, layout, structure):
    compare_dropin(kind, dtype, layout, **structure, seed=21)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropin_matches_torch_without_initial_state(kind):
    compare_dropin(kind, F64, "packed_unsorted", num_layers=2, bidirectional=True,
                   with_state=False, seed=22)
    compare_dropin(kind, F32, "batched", with_state=False, seed=23)


@st.composite
def dropin_cases(draw):
    return dict(
        kind=draw(st.sampled_from(["lstm", "gru"])),
        dtype=draw(st.sampled_from([F32, F64])),
        layout=draw(st.sampled_from(LAYOUTS)),
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        with_state=draw(st.booleans()),
        T=draw(st.integers(1, 6)),
        B=draw(st.integers(1, 4)),
        I_=draw(st.integers(1, 5)),
        H_=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40)
@given(case=dropin_cases())
def test_dropin_matches_torch_on_random_shapes(case):
    compare_dropin(**case)


# ---------------------------------------------------------------------------
# Drop-in behaviour: inference, parameter updates, autograd corner cases
# ---------------------------------------------------------------------------

def twins(kind, dtype=torch.float64, seed=0, **kw):
    ref_cls, cls = (nn.LSTM, fgt.LSTM) if kind == "lstm" else (nn.GRU, fgt.GRU)
    torch.manual_seed(seed)
    ref = ref_cls(I, H, dtype=dtype, **kw)
    torch.manual_seed(seed)
    return ref, cls(I, H, dtype=dtype, **kw)


def flat(out):
    """(output, hidden) as a flat list of tensors."""
    y, hidden = out
    return [y] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropin_inference_modes(kind):
    ref, mine = twins(kind, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, I, dtype=torch.float64)
    with_grad = flat(mine(x))
    assert all(t.requires_grad for t in with_grad)
    want = [t.detach() for t in flat(ref(x))]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = flat(mine(x))
        for a, b in zip(got, want):
            assert a.grad_fn is None and not a.requires_grad
            assert_close(a.numpy(), b.numpy(), F64)
    for p in mine.parameters():
        p.requires_grad_(False)
    got = flat(mine(x))
    assert all(t.grad_fn is None for t in got)
    for a, b in zip(got, want):
        assert_close(a.numpy(), b.numpy(), F64)
    # A module built under inference_mode has inference tensors (no version
    # counter) as parameters.
    with torch.inference_mode():
        torch.manual_seed(0)
        built_inside = type(mine)(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
        for _ in range(2):
            got = flat(built_inside(x))
            for a, b in zip(got, want):
                assert_close(a.numpy(), b.numpy(), F64)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropin_follows_parameter_changes(kind):
    ref, mine = twins(kind, seed=3)
    x = torch.randn(4, 2, I, dtype=torch.float64)
    opt = torch.optim.SGD(mine.parameters(), lr=0.5)
    before = flat(mine(x))[0].detach().clone()
    flat(mine(x))[0].sum().backward()
    opt.step()  # in place, under no_grad
    after = flat(mine(x))[0].detach()
    assert not torch.equal(before, after)
    ref.load_state_dict(mine.state_dict())
    assert_close(after.numpy(), n_(flat(ref(x))[0]), F64)
    # Edits through .data or NumPy move no version counter; they must be seen too.
    mine.weight_hh_l0.data.mul_(-1.0)
    ref.load_state_dict(mine.state_dict())
    assert_close(n_(flat(mine(x))[0]), n_(flat(ref(x))[0]), F64)
    mine.bias_ih_l0.detach().numpy()[0] += 1.0
    ref.load_state_dict(mine.state_dict())
    with torch.no_grad():
        assert_close(flat(mine(x))[0].numpy(), flat(ref(x))[0].numpy(), F64)
        assert_close(flat(mine(x))[0].numpy(), flat(ref(x))[0].numpy(), F64)  # nothing changed
    # Parameters swapped for other tensors are used too.
    mine.weight_ih_l0 = nn.Parameter(torch.zeros_like(mine.weight_ih_l0))
    ref.load_state_dict(mine.state_dict())
    assert_close(n_(flat(mine(x))[0]), n_(flat(ref(x))[0]), F64)
    # And a module converted to float32 afterwards computes in float32.
    mine.float()
    ref.float()
    y = flat(mine(x.float()))[0]
    assert y.dtype == torch.float32
    assert_close(n_(y), n_(flat(ref(x.float()))[0]), F32)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropin_gradcheck_through_functional_call(kind):
    # Parameters passed by torch.func.functional_call are differentiated too.
    _, mine = twins(kind, num_layers=2, bidirectional=True, batch_first=True)
    names = [n for n, _ in mine.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mine.parameters()]
    x = torch.randn(2, 3, I, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(4, 2, H, dtype=torch.float64, requires_grad=True)
              for _ in range(2 if kind == "lstm" else 1)]

    def f(x, *rest):
        hx = tuple(rest[:2]) if kind == "lstm" else rest[0]
        ps = dict(zip(names, rest[len(states):]))
        return tuple(flat(torch.func.functional_call(mine, ps, (x, hx))))

    assert torch.autograd.gradcheck(f, (x, *states, *params), fast_mode=True)


def test_dropin_pullback_can_run_twice_and_double_backward_raises():
    _, mine = twins("lstm")
    x = torch.randn(4, 2, I, dtype=torch.float64, requires_grad=True)
    y, _ = mine(x)
    (g1,) = torch.autograd.grad((y ** 2).sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad((y ** 2).sum(), x)
    assert torch.equal(g1, g2)
    for loss in (lambda y: y.sum(), lambda y: (y ** 2).sum()):
        y, _ = mine(x)
        with pytest.raises(RuntimeError, match="does not support double backward.*create_graph=True"):
            torch.autograd.grad(loss(y), x, create_graph=True)


def test_dropin_rejects_unsupported_options():
    with pytest.raises(ValueError, match="device='cuda'.*CPU"):
        fgt.GRU(I, H, device="cuda")
    with pytest.raises(TypeError, match=r"dtype=torch\.float16"):
        fgt.LSTM(I, H, dtype=torch.float16)
    with pytest.raises(TypeError, match="proj_size"):  # not an argument of GRU
        fgt.GRU(I, H, proj_size=2)

    x = torch.randn(4, 2, I, dtype=torch.float64)
    _, lstm = twins("lstm")
    with pytest.raises(ValueError, match="input has dtype torch.float32, expected torch.float64"):
        lstm(x.float())
    with pytest.raises(ValueError, match="hx c_0 has dtype torch.float32"):
        lstm(x, (torch.zeros(1, 2, H, dtype=torch.float64), torch.zeros(1, 2, H)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(1, 2, 4\), got \[1, 3, 4\]"):
        lstm(x, (torch.zeros(1, 2, H, dtype=torch.float64), torch.zeros(1, 3, H, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        lstm(x, (torch.zeros(1, H, dtype=torch.float64),) * 2)
    with pytest.raises(TypeError, match=r"tuple \(h_0, c_0\)"):
        lstm(x, torch.zeros(1, 2, H, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 5"):
        lstm(torch.randn(4, 2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        lstm(torch.randn(1, 4, 2, I, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"torch\.float16"):
        lstm.half()(x.half())
    meta = fgt.LSTM(I, H, device="meta")
    with pytest.raises(ValueError, match="parameter weight_ih_l0 is on device meta"):
        meta(torch.randn(4, 2, I))


# ---------------------------------------------------------------------------
# A float64 training loop gives torch.nn's loss curve
# ---------------------------------------------------------------------------

def train(rnn_cls, optimizer, steps=20):
    torch.manual_seed(0)
    rnn = rnn_cls(3, 6, num_layers=2, batch_first=True, dtype=torch.float64)
    head = nn.Linear(6, 1, dtype=torch.float64)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = optimizer(params)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 10, 3, generator=gen, dtype=torch.float64)
    target = torch.sin(x.sum(dim=(1, 2)))[:, None]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        y, _ = rnn(x)
        loss = ((head(y[:, -1]) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), [n_(p) for p in params]


# One float64 forward and backward pass agrees with torch to about 1e-16 to
# 1e-15 relative (the sums run in different orders; observed 4e-16 on the
# gradients here).  An optimizer step is a smooth map of parameters and
# gradients whose Lipschitz constant is near 1 + lr * |Hessian|, so over 20
# steps at these learning rates differences grow by a small factor, not by
# orders of magnitude: observed after 20 steps, at most 7e-15 relative on the
# losses and 1.3e-15 on the parameters.  Adam divides by sqrt(v) + eps, which
# would amplify differences in gradient entries near eps = 1e-8, but the
# smallest entry here is 5e-5.  The float64 tolerance (rtol 1e-10, atol
# 1e-12) thus keeps four orders of magnitude of headroom, while a real
# discrepancy (a wrong gradient, a parameter update not seen by the next
# forward pass) moves the loss curve by orders of magnitude more than that.
@pytest.mark.parametrize("kind,optimizer", [
    ("lstm", lambda ps: torch.optim.Adam(ps, lr=0.02)),
    ("gru", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
], ids=["lstm-adam", "gru-sgd"])
def test_training_loop_gives_torch_loss_curve(kind, optimizer):
    ref_cls, cls = (nn.LSTM, fgt.LSTM) if kind == "lstm" else (nn.GRU, fgt.GRU)
    want_losses, want_params = train(ref_cls, optimizer)
    got_losses, got_params = train(cls, optimizer)
    assert want_losses[-1] < 0.8 * want_losses[0], "the loop should learn something"
    assert_close(got_losses, want_losses, F64, err_msg="loss curve")
    for a, b in zip(got_params, want_params):
        assert_close(a, b, F64, err_msg="parameters after training")
