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
