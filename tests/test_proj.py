"""PyTorch's projected LSTM (``proj_size``): against ``torch.nn.LSTM`` exactly.

``h = W_hr (o ⊙ tanh c)``: outputs, final ``(h, c)`` and every gradient
against torch in both dtypes, stacked, bidirectional, with lengths (torch
reads them as a packed sequence) and an initial state; through
``from_torch``/``to_torch`` and the drop-in in a training loop; the
exporters refuse it by name; checkpointing and thread counts change no bit.
"""

import os

import numpy as np
import pytest

import fastgates as fg
from _bitwise import assert_bitwise
from _tolerances import assert_close

torch = pytest.importorskip("torch")
import fastgates.torch as fgt  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}

# torch.nn.LSTM's own notice that oneDNN has no projected LSTM (float32).
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")

CASES = {
    "plain": dict(num_layers=1, bidirectional=False, lengths=None, state=False),
    "stacked_bi_state": dict(num_layers=2, bidirectional=True, lengths=None, state=True),
    "lengths_bi": dict(num_layers=2, bidirectional=True, lengths=[7, 3, 5, 1, 7], state=True),
    "nobias": dict(num_layers=1, bidirectional=False, lengths=[2, 7, 4, 4, 1], state=False,
                   bias=False),
}


def _torch_run(tm, x, h0c0, lengths):
    xt = torch.from_numpy(x).requires_grad_(True)
    hx = None if h0c0 is None else tuple(torch.from_numpy(a).requires_grad_(True) for a in h0c0)
    if lengths is None:
        y, (h, c) = tm(xt, hx)
    else:
        packed = pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
        out, (h, c) = tm(packed, hx)
        y, _ = pad_packed_sequence(out, total_length=x.shape[0])
    return xt, hx, y, h, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_outputs_states_and_every_gradient(case, dtype):
    opts = dict(CASES[case])
    lengths, with_state, bias = opts.pop("lengths"), opts.pop("state"), opts.pop("bias", True)
    torch.manual_seed(len(case))
    tm = torch.nn.LSTM(3, 6, proj_size=4, bias=bias, dtype=TORCH_DTYPE[dtype], **opts)
    m = fg.from_torch(tm)
    assert m.proj_size == 4 and list(m.state_dict()) == list(tm.state_dict())
    assert m.weight_hh_l0.shape == (24, 4) and m.weight_hr_l0.shape == (4, 6)
    rng = np.random.default_rng(0)
    T, B = 7, 5
    num = opts["num_layers"] * (2 if opts["bidirectional"] else 1)
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    h0c0 = ((rng.standard_normal((num, B, 4)).astype(dtype),
             rng.standard_normal((num, B, 6)).astype(dtype)) if with_state else None)
    xt, hx, yt, ht, ct = _torch_run(tm, x, h0c0, lengths)
    (y, (h, c)), pullback = m.vjp(x, h0c0, lengths)
    assert y.shape == (T, B, 4 * (2 if opts["bidirectional"] else 1)) and c.shape == (num, B, 6)
    assert_close(y, yt.detach().numpy(), dtype, "y")
    assert_close(h, ht.detach().numpy(), dtype, "h")
    assert_close(c, ct.detach().numpy(), dtype, "c")
    dy = rng.standard_normal(y.shape).astype(dtype)
    if lengths is not None:
        dy[np.arange(T)[:, None] >= np.asarray(lengths)[None, :]] = 0
    dh, dc = rng.standard_normal(h.shape).astype(dtype), rng.standard_normal(c.shape).astype(dtype)
    ((yt * torch.from_numpy(dy)).sum() + (ht * torch.from_numpy(dh)).sum()
     + (ct * torch.from_numpy(dc)).sum()).backward()
    dx, (dh0, dc0), dparams = pullback(dy, (dh, dc))
    assert_close(dx, xt.grad.numpy(), dtype, "dx")
    if hx is not None:
        assert_close(dh0, hx[0].grad.numpy(), dtype, "dh0")
        assert_close(dc0, hx[1].grad.numpy(), dtype, "dc0")
    for name, p in tm.named_parameters():
        assert_close(dparams[name], p.grad.numpy(), dtype, name)


def test_round_trip_and_drop_in_training_loop_give_torchs_loss_curve():
    m = fg.LSTM(3, 6, num_layers=2, proj_size=2, batch_first=True, dtype=np.float64, seed=1)
    tm = fg.to_torch(m)
    assert type(tm) is torch.nn.LSTM and tm.proj_size == 2
    assert_bitwise(fg.from_torch(tm).state_dict(), m.state_dict())

    def train(cls):
        torch.manual_seed(0)
        rnn = cls(3, 6, num_layers=2, batch_first=True, proj_size=2, dtype=torch.float64)
        head = torch.nn.Linear(2, 1, dtype=torch.float64)
        opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=0.02)
        x = torch.randn(8, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        target = torch.sin(x.sum(dim=(1, 2)))[:, None]
        losses = []
        for _ in range(15):
            opt.zero_grad()
            y, _ = rnn(x)
            loss = ((head(y[:, -1]) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    want = train(torch.nn.LSTM)
    got = train(fgt.LSTM)
    assert want[-1] < 0.8 * want[0]
    assert_close(got, want, np.float64, "loss curve")


def test_exporters_refuse_a_projection_by_name():
    m = fg.LSTM(3, 6, proj_size=2)
    pytest.importorskip("onnx")
    with pytest.raises(NotImplementedError, match="proj_size=2.*no projection"):
        fg.to_onnx(m)
    os.environ.setdefault("KERAS_BACKEND", "torch")    # as test_interop_keras
    pytest.importorskip("keras")
    with pytest.raises(NotImplementedError, match="proj_size=2"):
        fg.to_keras(m)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_threads_and_saving_change_no_bit(dtype, tmp_path):
    m = fg.LSTM(3, 8, num_layers=2, bidirectional=True, proj_size=3, dtype=dtype, seed=2)
    rng = np.random.default_rng(3)
    T, B = 50, 64
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    dy = rng.standard_normal((T, B, 6)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    (y, s), pullback = m.vjp(x, lengths=lengths)
    full = (y, s, pullback(dy))
    (yk, sk), pullback_k = m.vjp(x, lengths=lengths, checkpoint=16)
    assert_bitwise((yk, sk, pullback_k(dy)), full)
    before = fg.get_num_threads()
    try:
        fg.set_num_threads(1, adaptive=False)
        (y1, s1), pullback_1 = m.vjp(x, lengths=lengths)
        assert_bitwise((y1, s1, pullback_1(dy)), full)
    finally:
        fg.set_num_threads(before)
    fg.save(m, tmp_path / "m.fgz")
    back = fg.load(tmp_path / "m.fgz")
    assert back.proj_size == 3 and repr(back) == repr(m)
    assert_bitwise(back(x, lengths=lengths), m(x, lengths=lengths))


def test_gates_and_memory_with_a_projection():
    m = fg.LSTM(3, 8, proj_size=3, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    g = m.gates(x)
    assert set(g) == {"i", "f", "g", "o", "c"} and all(v.shape == (1, 5, 2, 8) for v in g.values())
    _, (_, c) = m(x)
    np.testing.assert_array_equal(g["c"][0, -1], c[0])
    plain = fg.LSTM(3, 8, dtype=np.float64)
    assert m.training_memory(100, 4)["kept"] < plain.training_memory(100, 4)["kept"]


def test_bad_proj_size_is_named():
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size=4"):
        fg.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size must be >= 0"):
        fg.LSTM(3, 4, proj_size=-1)
    with pytest.raises(TypeError, match="proj_size must be an integer"):
        fg.LSTM(3, 4, proj_size=2.0)
    with pytest.raises(ValueError, match="proj_size=2 cannot be combined with peephole=True"):
        fg.LSTM(3, 4, proj_size=2, peephole=True)
    m = fg.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"state\[0\] \(h\) must have shape .* = \(1, 1, 2\)"):
        m(np.zeros((2, 1, 3)), (np.zeros((1, 1, 4)), np.zeros((1, 1, 4))))


def test_readout_reads_the_projected_output():
    rnn = fg.LSTM(2, 5, bidirectional=True, proj_size=2, dtype=np.float64, seed=0)
    with pytest.raises(ValueError, match="num_directions \\* proj_size = 4"):
        fg.Readout(rnn, fg.Linear(10, 1, dtype=np.float64))
    model = fg.Readout(rnn, fg.Linear(4, 1, dtype=np.float64, seed=1))
    x = np.random.default_rng(0).standard_normal((6, 3, 2))
    y, _ = rnn(x, lengths=[6, 2, 4])
    want = np.concatenate([y[[5, 1, 3], [0, 1, 2], :2], y[0, :, 2:]], axis=1) @ model.head.weight.T
    np.testing.assert_allclose(model(x, lengths=[6, 2, 4]), want + model.head.bias, rtol=1e-13)


@pytest.mark.parametrize("scheme", ["orthogonal", "xavier_uniform", "pytorch_default"])
def test_initialisers_shape_the_projection(scheme):
    m = getattr(fg.init, scheme)(fg.LSTM(3, 6, num_layers=2, proj_size=2, dtype=np.float64), seed=0)
    assert np.abs(m.weight_hr_l1).max() > 0
    if scheme == "orthogonal":
        # each (H, P) gate block has orthonormal columns, W_hr orthonormal rows
        for k in range(4):
            block = m.weight_hh_l0[6 * k:6 * (k + 1)]
            np.testing.assert_allclose(block.T @ block, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(m.weight_hr_l0 @ m.weight_hr_l0.T, np.eye(2), atol=1e-12)


def test_dropout_with_a_projection_drops_the_projected_outputs():
    # the masks are as wide as the projected output (D * P), in the layer
    # and in the drop-in (whose masks come from torch's generator)
    m = fg.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, dropout=0.5,
                dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 4, 3))
    (y, _), pullback = m.vjp(x, rng=1)
    assert y.shape == (5, 4, 4)
    dx, _, grads = pullback(np.ones_like(y))
    assert np.isfinite(dx).all() and grads["weight_hr_l1_reverse"].shape == (2, 6)
    torch.manual_seed(0)
    tm = fgt.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, dropout=0.5,
                  dtype=torch.float64)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt, _ = tm(xt)
    yt.sum().backward()
    assert yt.shape == (5, 4, 4) and torch.isfinite(xt.grad).all()
    tm.eval()
    assert np.array_equal(tm(xt)[0].detach().numpy(), fg.from_torch(tm)(x)[0])
