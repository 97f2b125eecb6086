"""Dropout between layers: PyTorch's semantics, reproducible masks, exact gradients.

In training (``vjp`` only) the output of every layer but the last is
multiplied by a mask, 0 with probability ``p`` and ``1 / (1 - p)`` else,
before the next layer reads it; ``m(x)`` and ``m.gates`` never drop.  The
masks come from ``vjp``'s ``rng`` (drawn in layer order with
``rng.random((T, B, D*H)) >= p``), so the same ``rng`` gives the same bits,
and the pullback is the exact gradient of the function with the masks
drawn (checked against central differences with the masks fixed).
"""

import warnings

import numpy as np
import pytest

import fastgates as fg
from _bitwise import assert_bitwise
from _tolerances import FD_STEP
from test_gradcheck import assert_gradient

CELLS = {"lstm": fg.LSTM, "gru": fg.GRU, "janet": fg.JANET, "mgu": fg.MGU, "mingru": fg.MinGRU,
         "minlstm": fg.MinLSTM}


def masks_of(m, T, B, seed):
    """The masks ``m.vjp(..., rng=seed)`` draws, written out from the documented draw."""
    rng = np.random.default_rng(seed)
    p = m.dropout
    F = m.num_directions * m.hidden_size
    return [np.where(rng.random((T, B, F)) >= p, 1 / (1 - p), 0.0) for _ in range(m.num_layers - 1)]


def layer_by_layer(m, x, masks):
    """The stacked model as one-layer models, the masks applied by hand (float64)."""
    sd = m.state_dict()
    a = x
    for k in range(m.num_layers):
        one = type(m)(a.shape[2], m.hidden_size, bidirectional=m.bidirectional, dtype=m.dtype)
        one.load_state_dict({name.replace(f"_l{k}", "_l0"): v for name, v in sd.items()
                             if f"_l{k}" in name})
        a, _ = one(a)
        if k < m.num_layers - 1:
            a = a * masks[k]
    return a


@pytest.mark.parametrize("cell", list(CELLS))
def test_training_drops_with_the_masks_drawn_and_inference_never(cell):
    m = CELLS[cell](3, 4, num_layers=3, bidirectional=True, dropout=0.4, dtype=np.float64, seed=0)
    plain = CELLS[cell](3, 4, num_layers=3, bidirectional=True, dtype=np.float64, seed=0)
    x = np.random.default_rng(1).standard_normal((6, 5, 3))
    (y, _), _ = m.vjp(x, rng=11)
    np.testing.assert_allclose(y, layer_by_layer(m, x, masks_of(m, 6, 5, 11)), rtol=1e-13,
                               atol=1e-15)
    # m(x) and m.gates are the model without dropout, bit for bit
    assert_bitwise(m(x), plain(x))
    assert_bitwise(m.gates(x), plain.gates(x))
    (y_plain, _), _ = plain.vjp(x, rng=11)
    assert not np.allclose(y, y_plain)


def test_the_same_rng_gives_the_same_bits_and_the_model_has_its_own_generator():
    x = np.random.default_rng(2).standard_normal((7, 3, 2))
    dy = np.random.default_rng(3).standard_normal((7, 3, 5))

    def run(m, rng):
        (y, h), pullback = m.vjp(x, rng=rng)
        return y, h, pullback(dy)

    m = fg.GRU(2, 5, num_layers=2, dropout=0.5, seed=4)
    assert_bitwise(run(m, 7), run(m, 7))
    assert_bitwise(run(m, np.random.default_rng(7)), run(m, 7))
    assert not np.array_equal(run(m, 7)[0], run(m, 8)[0])
    # rng=None: the model's own generator, seeded by its seed; it moves on
    a, b = fg.GRU(2, 5, num_layers=2, dropout=0.5, seed=4), fg.GRU(2, 5, num_layers=2, dropout=0.5, seed=4)
    first = run(a, None)
    assert_bitwise(run(b, None), first)
    assert not np.array_equal(run(a, None)[0], first[0])
    # and the parameters do not depend on dropout
    assert_bitwise(a.state_dict(), fg.GRU(2, 5, num_layers=2, seed=4).state_dict())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_and_scale(p):
    # Mask entries are 0 or 1 / (1 - p), kept with probability 1 - p: the
    # count of kept entries is binomial, within 5 standard deviations.
    m = fg.LSTM(2, 50, num_layers=3, dropout=p, dtype=np.float32)
    T, B = 40, 25
    masks = m._dropout_masks(3)(T, B)
    assert len(masks) == 2
    for mask in masks:
        assert mask.shape == (T, B, 50) and mask.dtype == np.float32
        assert set(np.unique(mask)) == {np.float32(0), np.float32(1 / (1 - p))}
        n = mask.size
        kept = np.count_nonzero(mask)
        assert abs(kept - n * (1 - p)) < 5 * np.sqrt(n * p * (1 - p))
        # inverted scaling: the mean of the mask is 1
        assert abs(mask.mean() - 1) < 5 * np.sqrt(p / (1 - p) / n)


def test_probability_one_drops_everything_and_zero_nothing():
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    m = fg.LSTM(3, 4, num_layers=2, dropout=1.0, dtype=np.float64, seed=0)
    (y, _), _ = m.vjp(x, rng=0)
    # the second layer reads zeros: its output is that of a zero input
    top = fg.LSTM(4, 4, dtype=np.float64)
    top.load_state_dict({k.replace("_l1", "_l0"): v for k, v in m.state_dict().items() if "_l1" in k})
    assert_bitwise(y, top(np.zeros((4, 2, 4)))[0])
    none = fg.LSTM(3, 4, num_layers=2, dropout=0.0, dtype=np.float64, seed=0)
    assert_bitwise(none.vjp(x, rng=0)[0], none(x))


@pytest.mark.parametrize("cell", ["lstm", "gru", "mingru"])
def test_gradient_is_exact_for_the_mask_drawn(cell):
    # Central differences of sum(y * dy) + <state, dstate> with the masks
    # fixed (the same rng at every evaluation), every entry of x and of
    # every parameter.
    m = CELLS[cell](2, 2, num_layers=3, bidirectional=True, dropout=0.5, dtype=np.float64, seed=3)
    rng = np.random.default_rng(4)
    T, B = 3, 2
    x = rng.standard_normal((T, B, 2))
    dy = rng.standard_normal((T, B, 4))
    lengths = np.array([3, 2])

    def loss():
        (y, _), _ = m.vjp(x, lengths=lengths, rng=5)
        return np.sum(y * dy)

    (_, _), pullback = m.vjp(x, lengths=lengths, rng=5)
    dx, _, dparams = pullback(dy)

    def numeric(array, reload=None):
        g = np.empty_like(array)
        for idx in np.ndindex(array.shape):
            v = array[idx]
            vals = []
            for s in (v + FD_STEP, v - FD_STEP):
                array[idx] = s
                if reload:
                    reload()
                vals.append(loss())
            array[idx] = v
            g[idx] = (vals[0] - vals[1]) / (2 * FD_STEP)
        if reload:
            reload()
        return g

    def close(a, b, name):
        assert_gradient(name, a, b, loss_scale)

    (y, _), _ = m.vjp(x, lengths=lengths, rng=5)
    loss_scale = np.sum(np.abs(y * dy))
    close(dx, numeric(x), "dx")
    params = {k: v.copy() for k, v in m.state_dict().items()}
    for name in params:
        close(dparams[name], numeric(params[name], lambda: m.load_state_dict(params)), name)
    # the mask mattered: some entry of the layer inputs was dropped
    assert any((mask == 0).any() for mask in masks_of(m, T, B, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_with_dropout_changes_no_bit(dtype):
    m = fg.GRU(3, 5, num_layers=3, bidirectional=True, dropout=0.3, dtype=dtype, seed=1)
    rng = np.random.default_rng(2)
    T, B = 50, 64
    x = rng.standard_normal((T, B, 3)).astype(dtype)
    dy = rng.standard_normal((T, B, 10)).astype(dtype)
    lengths = rng.integers(1, T + 1, B)
    (y, h), pullback = m.vjp(x, lengths=lengths, rng=9)
    (yk, hk), pullback_k = m.vjp(x, lengths=lengths, rng=9, checkpoint=16)
    assert_bitwise((yk, hk, pullback_k(dy)), (y, h, pullback(dy)))


def test_bad_dropout_and_rng_are_named():
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\]"):
        fg.LSTM(2, 3, num_layers=2, dropout=1.5)
    with pytest.raises(TypeError, match="dropout must be a real number"):
        fg.GRU(2, 3, num_layers=2, dropout="0.1")
    with pytest.warns(UserWarning, match="num_layers=1"):
        fg.LSTM(2, 3, dropout=0.2)
    m = fg.LSTM(2, 3, num_layers=2, dropout=0.2)
    with pytest.raises(TypeError, match="rng must be None, a numpy.random.Generator or an int"):
        m.vjp(np.zeros((2, 1, 2)), rng=0.5)
    with pytest.raises(ValueError, match="rng"):
        m.vjp(np.zeros((2, 1, 2)), rng=-1)


def test_save_load_keeps_dropout_and_old_files_still_load(tmp_path):
    m = fg.LSTM(2, 3, num_layers=2, dropout=0.25, seed=0)
    fg.save(m, tmp_path / "m.fgz")
    back = fg.load(tmp_path / "m.fgz")
    assert back.dropout == 0.25 and repr(back) == repr(m)
    # a model without dropout writes no dropout option: the file an earlier
    # version wrote, which loads with dropout 0
    plain = fg.GRU(2, 3, seed=0)
    fg.save(plain, tmp_path / "p.fgz")
    import json
    import zipfile
    with zipfile.ZipFile(tmp_path / "p.fgz") as z:
        manifest = json.loads(z.read("fastgates.json"))
    assert "dropout" not in manifest["model"]["options"]
    assert fg.load(tmp_path / "p.fgz").dropout == 0.0


def test_training_memory_counts_the_masks():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = fg.LSTM(4, 8, num_layers=3, dtype=np.float64)
        dropping = fg.LSTM(4, 8, num_layers=3, dropout=0.5, dtype=np.float64)
    T, B = 100, 4
    one = T * B * 8 * 8              # a layer's output, float64
    assert dropping.training_memory(T, B)["kept"] - plain.training_memory(T, B)["kept"] == 2 * 2 * one
    assert (dropping.training_memory(T, B, checkpoint=50)["kept"]
            - plain.training_memory(T, B, checkpoint=50)["kept"]) == 2 * one


# ---------------------------------------------------------------------------
# The torch drop-in
# ---------------------------------------------------------------------------


def _twins(kind, **kw):
    torch = pytest.importorskip("torch")
    import fastgates.torch as fgt
    ref_cls, cls = (torch.nn.LSTM, fgt.LSTM) if kind == "lstm" else (torch.nn.GRU, fgt.GRU)
    torch.manual_seed(0)
    ref = ref_cls(3, 4, dtype=torch.float64, **kw)
    torch.manual_seed(0)
    return torch, ref, cls(3, 4, dtype=torch.float64, **kw)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropin_drops_like_torch_in_distribution(kind):
    # One input repeated over a batch of 4000: every copy draws its own
    # masks, so the batch is 4000 draws of y.  Their mean and variance per
    # entry match torch.nn's within sampling error (5 standard errors), and
    # spread (dropout did something; in eval mode every copy is the same).
    torch, ref, mine = _twins(kind, num_layers=3, dropout=0.4)
    n = 4000
    x = torch.randn(6, 1, 3, dtype=torch.float64).expand(6, n, 3).contiguous()
    stats = []
    for module in (ref, mine):
        module.train()
        with torch.no_grad():
            y = module(x)[0].numpy()
        stats.append((y.mean(axis=1), y.var(axis=1)))
    (m_ref, v_ref), (m_mine, v_mine) = stats
    se = np.sqrt((v_ref + v_mine) / n)
    assert np.all(np.abs(m_ref - m_mine) <= 5 * se + 1e-12)
    assert np.all(np.abs(v_ref - v_mine) <= 5 * np.sqrt(2 / n) * np.maximum(v_ref, v_mine) + 1e-12)
    assert v_mine.min() > 0 and v_mine.max() > 1e-4
    mine.eval()
    with torch.no_grad():
        assert np.ptp(mine(x)[0].numpy(), axis=1).max() == 0


def test_dropin_training_loop_repeats_with_manual_seed_and_has_exact_gradients():
    torch, _, mine = _twins("gru", num_layers=2, dropout=0.5, batch_first=True)
    head = torch.nn.Linear(4, 1, dtype=torch.float64)
    start = {k: v.clone() for k, v in mine.state_dict().items()}
    head_start = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(8, 10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.sin(x.sum(dim=(1, 2)))[:, None]

    def loop(seed):
        mine.load_state_dict(start)
        head.load_state_dict(head_start)
        opt = torch.optim.Adam(list(mine.parameters()) + list(head.parameters()), lr=0.02)
        torch.manual_seed(seed)
        losses = []
        for _ in range(15):
            opt.zero_grad()
            y, _ = mine(x)
            loss = ((head(y[:, -1]) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    first = loop(3)
    np.testing.assert_array_equal(loop(3), first)        # torch.manual_seed repeats a run
    assert not np.array_equal(loop(4), first)            # other masks, another run
    assert first[-1] < first[0]

    # The gradient is fastgates' exact one for the masks torch drew: draw
    # them again from the same seed and run the layer with them.
    import fastgates.torch as fgt
    mine.load_state_dict(start)
    mine.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    xt = x.clone().requires_grad_(True)
    y, _ = mine(xt)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y.backward(dy)
    torch.manual_seed(5)
    masks = fgt._dropout_masks(mine, torch.float64)(10, 8)
    model = fg.GRU(3, 4, num_layers=2, dropout=0.5, dtype=np.float64)      # time-major
    model.load_state_dict({k: v.detach().numpy() for k, v in mine.state_dict().items()})
    (y_np, _), pullback = model._vjp(x.numpy().transpose(1, 0, 2).copy(), None, None, True, None,
                                     masks)
    dx, _, dparams = pullback(dy.numpy().transpose(1, 0, 2).copy())
    np.testing.assert_array_equal(y.detach().numpy(), y_np.transpose(1, 0, 2))
    np.testing.assert_array_equal(xt.grad.numpy(), dx.transpose(1, 0, 2))
    for name, p in mine.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), dparams[name])
