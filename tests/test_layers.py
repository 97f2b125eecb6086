"""Parameter handling of the layers: read-only parameters, derived weights."""

import numpy as np
import pytest

import fastgates as fg


FACTORIES = {
    "lstm": lambda seed: fg.LSTM(3, 5, dtype=np.float64, seed=seed),
    "gru": lambda seed: fg.GRU(3, 5, dtype=np.float64, seed=seed),
    "gru_reset_before": lambda seed: fg.GRU(3, 5, reset_after=False, dtype=np.float64, seed=seed),
}


@pytest.mark.parametrize("kind", FACTORIES)
def test_parameters_are_read_only_views(kind):
    m = FACTORIES[kind](0)
    assert m.weight_ih_l0 is m._params["weight_ih_l0"]
    with pytest.raises(ValueError, match="read-only"):
        m.weight_hh_l0[0, 0] = 1.0
    d = m.state_dict()
    d["weight_hh_l0"][0, 0] = 1.0          # copies are writable and independent
    assert m.weight_hh_l0[0, 0] != 1.0


@pytest.mark.parametrize("kind", FACTORIES)
def test_load_state_dict_refreshes_derived_weights(kind):
    m = FACTORIES[kind](0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    (y0, _), pullback0 = m.vjp(x)
    g0 = pullback0(np.ones_like(y0))
    other = FACTORIES[kind](1)
    m.load_state_dict(other.state_dict())
    y1, _ = m(x)
    np.testing.assert_array_equal(y1, other(x)[0])
    assert not np.array_equal(y1, y0)
    # A pullback taken before the load still differentiates the old weights.
    g0_again = pullback0(np.ones_like(y0))
    for a, b in zip(g0[2].values(), g0_again[2].values()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(g0[0], g0_again[0])


MODELS = {
    "lstm_bi_2": lambda: fg.LSTM(3, 4, 2, bidirectional=True, dtype=np.float64, seed=1),
    "lstm_peephole": lambda: fg.LSTM(3, 4, peephole=True, dtype=np.float32, seed=1),
    "gru_nobias": lambda: fg.GRU(3, 4, bias=False, dtype=np.float64, seed=1),
    "lstm_cell": lambda: fg.LSTMCell(3, 4, seed=1),
    "gru_cell": lambda: fg.GRUCell(3, 4, dtype=np.float64, seed=1),
}


@pytest.mark.parametrize("make", MODELS.values(), ids=list(MODELS))
def test_flat_params_follow_state_dict_order(make):
    m = make()
    sd = m.state_dict()
    v = m.get_flat_params()
    assert v.dtype == m.dtype and v.shape == (m.num_params,)
    assert m.num_params == sum(a.size for a in sd.values())
    np.testing.assert_array_equal(v, np.concatenate([a.ravel() for a in sd.values()]))
    np.testing.assert_array_equal(fg.flatten_params(m, sd), v)
    back = fg.unflatten_params(m, v)
    assert list(back) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    w = np.arange(m.num_params, dtype=np.float64) / m.num_params
    m.set_flat_params(w)
    np.testing.assert_array_equal(m.get_flat_params(), w.astype(m.dtype))
    v[0] = 123.0                                   # a copy: the model does not change
    assert m.get_flat_params()[0] == 0.0


def test_flat_params_line_up_with_gradients():
    m = fg.GRU(2, 3, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 2))
    (y, _), pullback = m.vjp(x)
    _, _, dparams = pullback(np.ones_like(y))
    g = fg.flatten_params(m, dparams)
    # Directional derivative along e_k equals the k-th entry of the flat gradient.
    k = m.num_params // 2
    v = m.get_flat_params()
    h = 1e-6
    vp, vm = v.copy(), v.copy()
    vp[k] += h
    vm[k] -= h
    m.set_flat_params(vp)
    fp = m(x)[0].sum()
    m.set_flat_params(vm)
    fm = m(x)[0].sum()
    assert abs((fp - fm) / (2 * h) - g[k]) < 1e-6 * max(1.0, abs(g[k]))


def test_flat_params_errors():
    m = fg.LSTM(2, 3)
    n = m.num_params
    assert n == 12 * 2 + 12 * 3 + 2 * 12
    with pytest.raises(ValueError, match=f"v must be a 1-D array of the model's {n} parameters"):
        m.set_flat_params(np.zeros(n - 1))
    with pytest.raises(ValueError, match="v must be a 1-D"):
        m.set_flat_params(np.zeros((n, 1)))
    with pytest.raises(TypeError, match="v must hold real"):
        m.set_flat_params(np.zeros(n, dtype=complex))
    bad = m.state_dict()
    del bad["bias_hh_l0"]
    with pytest.raises(ValueError, match="missing keys"):
        fg.flatten_params(m, bad)
