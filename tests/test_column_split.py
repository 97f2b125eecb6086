"""The column-split forward kernels (large recurrent weights) against PyTorch.

Models in the tests are small, so the size threshold that selects these
kernels is lowered here; every other test runs the batch-chunk kernels.
"""

import numpy as np
import pytest
import torch

import fastgates as fg
from fastgates import _recurrent
from _tolerances import assert_close


@pytest.fixture
def column_split(monkeypatch):
    monkeypatch.setattr(_recurrent, "COLS_MIN_BYTES", 0)
    monkeypatch.setattr(_recurrent, "_pool_size", lambda: 3)   # more blocks than threads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional,with_lengths", [(1, False, False), (2, True, True)])
def test_column_split_matches_torch(column_split, kind, dtype, layers, bidirectional, with_lengths):
    T, B, I, H = 6, 3, 4, 7          # H not a multiple of the block count
    rng = np.random.default_rng(0)
    cls = fg.LSTM if kind == "lstm" else fg.GRU
    tcls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    D = 2 if bidirectional else 1
    m = cls(I, H, layers, bidirectional=bidirectional, dtype=dtype, seed=1)
    assert _recurrent._use_cols(kind, True, m.weight_hh_l0, B)
    tdt = torch.float32 if dtype == np.float32 else torch.float64
    tm = tcls(I, H, layers, bidirectional=bidirectional, dtype=tdt)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    x = rng.standard_normal((T, B, I)).astype(dtype)
    h0 = rng.standard_normal((layers * D, B, H)).astype(dtype)
    c0 = rng.standard_normal((layers * D, B, H)).astype(dtype)
    lengths = np.array([6, 2, 4]) if with_lengths else None
    state = (h0, c0) if kind == "lstm" else h0
    (y, s), pullback = m.vjp(x, state, lengths)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dh = rng.standard_normal(h0.shape).astype(dtype)
    dc = rng.standard_normal(h0.shape).astype(dtype)
    dx, ds, dp = pullback(dy, (dh, dc) if kind == "lstm" else dh)

    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    st = (h0t, c0t) if kind == "lstm" else h0t
    if with_lengths:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
        yp, st_n = tm(packed, st)
        yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, total_length=T)
    else:
        yt, st_n = tm(xt, st)
    hn_t = st_n[0] if kind == "lstm" else st_n
    loss = (yt * torch.from_numpy(dy)).sum() + (hn_t * torch.from_numpy(dh)).sum()
    if kind == "lstm":
        loss = loss + (st_n[1] * torch.from_numpy(dc)).sum()
    loss.backward()

    assert_close(y, yt.detach().numpy(), dtype)
    assert_close(s[0] if kind == "lstm" else s, hn_t.detach().numpy(), dtype)
    assert_close(dx, xt.grad.numpy(), dtype)
    assert_close(ds[0] if kind == "lstm" else ds, h0t.grad.numpy(), dtype)
    if kind == "lstm":
        assert_close(s[1], st_n[1].detach().numpy(), dtype)
        assert_close(ds[1], c0t.grad.numpy(), dtype)
    for name, p in tm.named_parameters():
        assert_close(dp[name], p.grad.numpy(), dtype, err_msg=name)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_column_split_gives_the_batch_chunk_answer(monkeypatch, kind):
    T, B, I, H = 5, 2, 3, 9
    cls = fg.LSTM if kind == "lstm" else fg.GRU
    m = cls(I, H, dtype=np.float64, seed=3)
    x = np.random.default_rng(1).standard_normal((T, B, I))
    lengths = np.array([5, 3])
    y_chunks, _ = m(x, lengths=lengths)
    g_chunks = m.gates(x, lengths=lengths)
    monkeypatch.setattr(_recurrent, "COLS_MIN_BYTES", 0)
    y_cols, _ = m(x, lengths=lengths)
    g_cols = m.gates(x, lengths=lengths)
    assert_close(y_cols, y_chunks, np.float64)
    for name in g_chunks:
        assert_close(g_cols[name], g_chunks[name], np.float64, err_msg=name)
