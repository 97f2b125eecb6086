"""Activation functions of the kernels: error bounds and edge behaviour.

Both modes, both dtypes, through the very functions the kernels call
(``sigmoid_inplace`` / ``tanh_inplace``).  The exact values come from
``np.longdouble`` (x87 extended precision here: 64-bit significand, 11 bits
more than float64), enough to measure float64 errors in ulps.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgates import _math

# The bounds stated in fastgates/_math.py, in ulps of the exact result.
ULP_BOUND = {"sigmoid": 3.0, "tanh": 4.0}
MODES = [None, True]  # fast, exact: the kernels' mode argument (_config.exact_arg)
DTYPES = [np.float32, np.float64]


def test_reference_precision_is_enough():
    assert np.finfo(np.longdouble).nmant >= 63


def _apply(name, x, exact):
    out = np.array(x, copy=True)
    (_math.sigmoid_inplace if name == "sigmoid" else _math.tanh_inplace)(out, exact)
    return out


def _exact(name, x):
    xl = x.astype(np.longdouble)
    if name == "tanh":
        return np.tanh(xl)
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-xl))


def _ulp_errors(name, x, got):
    """Errors in ulps of the exact result (results below the smallest normal: absolute, in units of it)."""
    exact = _exact(name, x)
    dtype = x.dtype
    tiny = np.finfo(dtype).tiny
    rounded = exact.astype(dtype)
    spacing = np.spacing(np.abs(rounded)).astype(np.longdouble)
    normal = np.abs(exact) >= tiny
    err = np.abs(got.astype(np.longdouble) - exact)
    return np.where(normal, err / spacing, err / tiny).astype(np.float64)


def _grid(dtype):
    lim = 120.0 if dtype == np.float32 else 800.0
    parts = [
        np.linspace(-lim, lim, 400_001),
        np.linspace(-2.0, 2.0, 200_001),
        np.geomspace(1e-30, 30.0, 50_001),
        -np.geomspace(1e-30, 30.0, 50_001),
    ]
    return np.concatenate(parts).astype(dtype)


@pytest.mark.parametrize("exact", MODES, ids=["fast", "exact"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_error_bound_on_dense_grid(name, dtype, exact):
    x = _grid(dtype)
    with np.errstate(all="raise"):
        got = _apply(name, x, exact)
    assert got.dtype == dtype
    err = _ulp_errors(name, x, got)
    worst = np.argmax(err)
    assert err[worst] <= ULP_BOUND[name], f"{name}({x[worst]!r}) = {got[worst]!r}: {err[worst]:.2f} ulp"


@pytest.mark.parametrize("exact", MODES, ids=["fast", "exact"])
@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
@given(data=st.data())
def test_error_bound_on_random_values(name, exact, data):
    dtype = data.draw(st.sampled_from(DTYPES))
    width = 32 if dtype == np.float32 else 64
    values = data.draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=width),
                                min_size=1, max_size=64))
    x = np.array(values, dtype=dtype)
    got = _apply(name, x, exact)
    err = _ulp_errors(name, x, got)
    assert err.max() <= ULP_BOUND[name], (x[np.argmax(err)], err.max())


@pytest.mark.parametrize("exact", MODES, ids=["fast", "exact"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_saturation_is_exact(dtype, exact):
    big = np.array([40.0, 1e3, 1e30, np.finfo(dtype).max, np.inf], dtype=dtype)
    np.testing.assert_array_equal(_apply("sigmoid", big, exact), 1.0)
    np.testing.assert_array_equal(_apply("sigmoid", -big[1:], exact), 0.0)
    np.testing.assert_array_equal(_apply("tanh", big, exact), 1.0)
    np.testing.assert_array_equal(_apply("tanh", -big, exact), -1.0)


@pytest.mark.parametrize("exact", MODES, ids=["fast", "exact"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_range_symmetry_and_nan(dtype, exact):
    x = _grid(dtype)
    s = _apply("sigmoid", x, exact)
    t = _apply("tanh", x, exact)
    assert np.all((s >= 0) & (s <= 1))
    assert np.all((t >= -1) & (t <= 1))
    # tanh is odd bit for bit (the fast sigmoid is not monotone to the last
    # ulp; only its error bound is promised).
    np.testing.assert_array_equal(_apply("tanh", -x, exact), -t)
    nan = np.array([np.nan, -np.nan], dtype=dtype)
    assert np.isnan(_apply("sigmoid", nan, exact)).all()
    assert np.isnan(_apply("tanh", nan, exact)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_is_exact_at_zero_and_tiny(dtype):
    x = np.array([0.0, -0.0, np.finfo(dtype).tiny, 1e-20], dtype=dtype)
    for exact in MODES:
        got = _apply("tanh", x, exact)
        np.testing.assert_array_equal(got, x)
        assert np.signbit(got[1])


def test_the_documentation_states_the_tested_bounds():
    # One bound, stated the same way wherever it is quoted: the table of
    # fastgates/_math.py, set_activation_mode's docstring, README.md and
    # docs/index.md all give the bounds this file tests.
    import pathlib
    import re

    import fastgates

    phrase = f"{ULP_BOUND['sigmoid']:g} ulp sigmoid, {ULP_BOUND['tanh']:g} ulp tanh"
    root = pathlib.Path(__file__).resolve().parent.parent
    places = {"set_activation_mode": fastgates.set_activation_mode.__doc__,
              "README.md": (root / "README.md").read_text(encoding="utf-8"),
              "docs/index.md": (root / "docs" / "index.md").read_text(encoding="utf-8")}
    for where, text in places.items():
        flat = " ".join(text.replace("#", " ").split())
        assert phrase in flat, f"{where} does not state {phrase!r}"
        assert len(re.findall(r"\d+(?:-\d+)? ulp", flat)) == 2, f"{where} states another bound"
    for name, bound in ULP_BOUND.items():
        row = re.search(rf"^{name}\s+(\d+) ulp\s+(\d+) ulp\s*$", _math.__doc__, re.M)
        assert row and float(row[1]) == float(row[2]) == bound, f"fastgates/_math.py's {name} row"


@pytest.mark.parametrize("name, options", [
    ("LSTM", {}), ("LSTM", {"peephole": True, "clip": 2.0}), ("GRU", {}),
    ("GRU", {"reset_after": False}), ("JANET", {}), ("MGU", {}), ("SLSTM", {"num_heads": 1}),
    ("MinGRU", {}), ("MinLSTM", {})])
def test_every_cell_runs_the_activation_mode_asked_for(name, options):
    # The mode reaches compiled code as an argument whose type (None or
    # True) picks the code Numba compiles (fastgates/_math.py); a branch
    # left on its truth, or a False, would run one mode's activations in
    # the other, close enough that no comparison with a reference would
    # notice.  The two modes' results must differ in some bits, forward and
    # backward, and each must be the same as in a second call.
    import fastgates as fg
    from fastgates import _config

    rng = np.random.default_rng(3)
    m = getattr(fg, name)(4, 6, num_layers=2, dtype=np.float64, seed=2, **options)
    x = rng.standard_normal((25, 3, 4))
    dy = rng.standard_normal((25, 3, 6))
    runs = {}
    for mode in ("fast", "exact", "fast", "exact"):
        with _config.task_settings(mode=mode):
            (y, state), pullback = m.vjp(x)
            dx, dstate, dparams = pullback(dy)
        arrays = [y, *np.atleast_1d(state), dx, *dparams.values()]
        flat = np.concatenate([np.ravel(a) for a in arrays])
        if mode in runs:
            assert flat.tobytes() == runs[mode].tobytes(), mode
        runs[mode] = flat
    assert runs["fast"].tobytes() != runs["exact"].tobytes()
    assert np.allclose(runs["fast"], runs["exact"], rtol=1e-12, atol=1e-13)
