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


@pytest.mark.parametrize("kind", FACTORIES)
def test_blocked_recurrent_products_give_the_same_answers(kind, monkeypatch):
    # Small test models keep W_hh whole; force the 32-column blocks (with a
    # padded last block: 4*37 and 3*37 are not multiples of 32) and compare.
    from _tolerances import assert_close
    from fastgates import _linalg

    def make():
        cls = fg.LSTM if kind == "lstm" else fg.GRU
        extra = {} if kind == "lstm" else {"reset_after": kind == "gru"}
        return cls(6, 37, 2, bidirectional=True, dtype=np.float64, seed=4, **extra)

    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 6))
    lengths = np.array([7, 2, 5])
    runs = []
    for whole in (_linalg.WHOLE_MAX_ENTRIES, 0):
        monkeypatch.setattr(_linalg, "WHOLE_MAX_ENTRIES", whole)
        m = make()
        (y, state), pullback = m.vjp(x, None, lengths)
        runs.append((y, pullback(np.ones_like(y))))
    (y0, (dx0, ds0, dp0)), (y1, (dx1, ds1, dp1)) = runs
    assert_close(y1, y0, np.float64)
    assert_close(dx1, dx0, np.float64)
    for name in dp0:
        assert_close(dp1[name], dp0[name], np.float64, err_msg=name)
