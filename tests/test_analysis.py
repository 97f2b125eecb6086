"""Gate analysis (``fastgates.analysis``) and its plots (``fastgates.plot``).

``timescale`` is checked by its definition (``f ** tau = 1/e``);
``gate_summary`` on models whose forget (GRU: update) gate is held at known
constants, so that every statistic has a value known in closed form, and on
random models with variable lengths against the gates of each sequence run
alone; the plots write real, non-trivial PNG files.
"""

import dataclasses
import sys

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastgates as fg
from fastgates import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def logit(p):
    return np.log(p) - np.log1p(-p)


def constant_gate_model(cls, gate_values, other=0.3, **options):
    """A model with zero weights whose keep gate (LSTM f, GRU z) is ``gate_values[k, u]``.

    With every weight 0 the gates do not depend on the input or the state:
    each is the sigmoid of its effective bias.  The other sigmoid gates sit
    at ``other``, so that reading the wrong gate shows.
    """
    K, H = gate_values.shape
    layers = K // 2 if options.get("bidirectional") else K
    m = cls(2, H, layers, dtype=np.float64, seed=0, **options)
    params = {k: np.zeros_like(v) for k, v in m.state_dict().items()}
    suffixes = [k[len("weight_ih"):] for k in params if k.startswith("weight_ih")]
    for k, s in enumerate(suffixes):
        params["bias_ih" + s][:] = logit(other)
        params["bias_ih" + s][H:2 * H] = logit(gate_values[k])  # f of i,f,g,o; z of r,z,n
    m.load_state_dict(params)
    return m


# -- timescale -----------------------------------------------------------------

def test_timescale_of_0_9_is_about_9_49_steps():
    assert fg.timescale(0.9) == pytest.approx(9.4912215, rel=1e-7)


@given(f=st.floats(1e-6, 1 - 1e-6))
def test_timescale_is_the_e_folding_time(f):
    # f ** tau = 1/e: after tau steps a memory kept with gate f has shrunk by e.
    assert f ** fg.timescale(f) == pytest.approx(np.exp(-1), rel=1e-9)


def test_timescale_ends_and_arrays():
    # Warnings are errors in this test run: neither end may warn.
    assert fg.timescale(0.0) == 0.0
    assert fg.timescale(1.0) == np.inf
    out = fg.timescale(np.array([[0.0, 0.5], [0.9, 1.0]], dtype=np.float32))
    assert out.shape == (2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 1 / np.log(2)], [-1 / np.log(0.9), np.inf]], rtol=1e-6)
    assert fg.timescale(np.array([1, 0])).dtype == np.float64
    assert np.isnan(fg.timescale(np.nan))
    # Monotone: a gate closer to 1 remembers longer.
    f = np.linspace(0, 1, 101)
    assert np.all(np.diff(fg.timescale(f)) > 0)


@pytest.mark.parametrize("f, error", [(1.5, ValueError), (-0.1, ValueError), ([0.5, 2.0], ValueError),
                                      ("0.9", TypeError), (0.5 + 0j, TypeError)])
def test_timescale_rejects_non_gate_values(f, error):
    with pytest.raises(error, match="f must"):
        fg.timescale(f)


# -- gate_summary ----------------------------------------------------------------

def test_constant_forget_gate_0_9_is_9_49_steps_everywhere():
    f = np.full((4, 6), 0.9)
    m = constant_gate_model(fg.LSTM, f, bidirectional=True)
    x = np.random.default_rng(0).standard_normal((12, 3, 2))
    s = fg.gate_summary(m, x)
    np.testing.assert_allclose(s.mean, 0.9, rtol=1e-12)
    np.testing.assert_allclose(s.timescale, 9.4912215, rtol=1e-7)
    assert s.horizon == 12 and np.all(s.fraction_above == 0)   # 9.49 < T = 12
    np.testing.assert_array_equal(fg.gate_summary(m, x, horizon=9).fraction_above, 1.0)
    np.testing.assert_allclose(s.step_mean, 0.9, rtol=1e-12)


@given(cls=st.sampled_from([fg.LSTM, fg.GRU]), layers=st.integers(1, 2), bidirectional=st.booleans(),
       H=st.integers(1, 6), T=st.integers(1, 8), B=st.integers(1, 3),
       values=st.lists(st.floats(0.05, 0.999), min_size=24, max_size=24),
       horizon=st.one_of(st.none(), st.floats(0.5, 2000.0)))
def test_summary_of_known_constant_gates(cls, layers, bidirectional, H, T, B, values, horizon):
    K = layers * (2 if bidirectional else 1)
    f = np.resize(np.array(values), (K, H))
    tau = -1 / np.log(f)
    h = T if horizon is None else horizon
    assume(np.all(np.abs(tau - h) > 1e-6 * h))  # no time scale on the horizon itself
    m = constant_gate_model(cls, f, bidirectional=bidirectional)
    x = np.random.default_rng(1).standard_normal((T, B, 2))
    s = fg.gate_summary(m, x, horizon=horizon)
    assert s.gate == ("f" if cls is fg.LSTM else "z") and s.cell == m._cell
    assert s.gates.shape == (K, T, B, H) and s.mean.shape == s.timescale.shape == (K, H)
    assert s.step_mean.shape == (K, T) and s.fraction_above.shape == (K,)
    np.testing.assert_allclose(s.mean, f, rtol=1e-12)
    np.testing.assert_allclose(s.timescale, tau, rtol=1e-8)
    assert s.horizon == h
    np.testing.assert_array_equal(s.fraction_above, np.mean(tau > h, axis=1))
    np.testing.assert_allclose(s.step_mean, np.broadcast_to(f.mean(axis=1)[:, None], (K, T)), rtol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_summary_reads_the_update_gate(reset_after):
    m = fg.GRU(3, 5, num_layers=2, dtype=np.float64, seed=4, reset_after=reset_after)
    x = 2 * np.random.default_rng(2).standard_normal((7, 4, 3))
    s = fg.gate_summary(m, x)
    z = m.gates(x)["z"]
    assert s.gate == "z"
    np.testing.assert_array_equal(s.gates, z)
    np.testing.assert_allclose(s.mean, z.mean(axis=(1, 2)), rtol=1e-12)
    assert not np.allclose(s.mean, m.gates(x)["r"].mean(axis=(1, 2)))


@pytest.mark.parametrize("cls", [fg.LSTM, fg.GRU])
def test_summary_counts_valid_steps_only(cls):
    # Each sequence run alone (only its valid steps) gives the gates the
    # summary must average; what stands in the padding cannot matter.
    rng = np.random.default_rng(3)
    T, B, I, H = 9, 4, 3, 5
    m = cls(I, H, num_layers=2, bidirectional=True, dtype=np.float64, seed=5)
    m.load_state_dict({k: 3 * v for k, v in m.state_dict().items()})  # gates far from constant
    lengths = np.array([9, 2, 5, 1])
    x = rng.standard_normal((T, B, I))
    s = fg.gate_summary(m, x, lengths=lengths, horizon=3.0)
    gate = s.gate
    alone = [m.gates(x[:n, b])[gate] for b, n in enumerate(lengths)]  # (K, n, H) each
    np.testing.assert_allclose(s.mean, np.concatenate(alone, axis=1).mean(axis=1), rtol=1e-12)
    for t in range(T):
        valid = [g[:, t] for g, n in zip(alone, lengths) if t < n]
        np.testing.assert_allclose(s.step_mean[:, t], np.mean(valid, axis=(0, 2)), rtol=1e-12)
    np.testing.assert_array_equal(s.mask, np.arange(T)[:, None] < lengths)
    np.testing.assert_array_equal(s.lengths, lengths)

    garbage = x.copy()
    garbage[~s.mask] = 1e3
    again = fg.gate_summary(m, garbage, lengths=lengths, horizon=3.0)
    np.testing.assert_array_equal(again.mean, s.mean)
    np.testing.assert_array_equal(again.fraction_above, s.fraction_above)

    # Steps that no sequence reaches have no mean.
    short = fg.gate_summary(m, x, lengths=np.array([4, 2, 3, 1]))
    assert np.all(np.isnan(short.step_mean[:, 4:])) and not np.any(np.isnan(short.step_mean[:, :4]))
    assert np.all(np.isfinite(short.timescale))


def test_summary_layouts_and_immutability():
    m = fg.LSTM(2, 3, batch_first=True, dtype=np.float64, seed=0)
    x = np.random.default_rng(4).standard_normal((2, 6, 2))  # (B, T, I)
    s = fg.gate_summary(m, x)
    assert s.gates.shape == (1, 6, 2, 3) and s.gates.dtype == m.dtype
    assert s.mean.dtype == np.float64 and s.names == ("l0",)
    assert s.num_steps == 6 and s.hidden_size == 3
    np.testing.assert_array_equal(s.gates, m.gates(x)["f"])
    one = fg.gate_summary(m, x[0])  # unbatched (T, I)
    assert one.gates.shape == (1, 6, 1, 3) and one.lengths.tolist() == [6]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.horizon = 3.0
    with pytest.raises(ValueError, match="read-only"):
        s.mean[0, 0] = 1.0
    gru = fg.GRU(2, 3, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    assert fg.gate_summary(gru, x).names == ("l0", "l0_reverse", "l1", "l1_reverse")


@pytest.mark.parametrize("call, error, match", [
    (lambda x: fg.gate_summary(fg.LSTMCell(2, 3), x), TypeError, "model must be a fastgates recurrent layer"),
    (lambda x: fg.gate_summary(fg.LSTM(2, 3), x, horizon=0), ValueError, "horizon must be a positive"),
    (lambda x: fg.gate_summary(fg.LSTM(2, 3), x, horizon="10"), TypeError, "horizon must be"),
    (lambda x: fg.gate_summary(fg.GRU(2, 3), x, lengths=[1, 7]), ValueError, "lengths"),
])
def test_summary_argument_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(np.zeros((5, 2, 2), np.float32))


# -- plots -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def summary():
    m = fg.init.chrono(fg.LSTM(3, 16, num_layers=2, bidirectional=True, dtype=np.float64, seed=0), 60.0, seed=1)
    x = np.sin(np.linspace(0, 8, 30))[:, None, None] * np.ones((30, 3, 3)) + 0.3
    return fg.gate_summary(m, x, lengths=np.array([30, 18, 25]))


def assert_real_png(path, min_colours=20):
    import matplotlib.image

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    colours = np.unique(image.reshape(-1, image.shape[2]), axis=0)
    assert len(colours) > min_colours, len(colours)


def no_open_pyplot_figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    return pyplot is None or not pyplot.get_fignums()


@pytest.mark.parametrize("make", [
    lambda s, p: plot.forget_heatmap(s, p, layer=1, sample=1),
    lambda s, p: plot.forget_heatmap(fg.GRU(3, 4, dtype=np.float64, seed=0).gates(np.ones((10, 2, 3))), p),
    lambda s, p: plot.forget_heatmap(s.gates[:, :, 0], p, layer=-1),
    lambda s, p: plot.timescale_histogram(s, p),
    lambda s, p: plot.timescale_histogram(s, p, horizon=10, bins=12),
    lambda s, p: plot.prediction_plot(np.arange(50) * 0.1, np.sin(np.arange(50) * 0.1),
                                      np.sin(np.arange(50) * 0.1 + 0.2), p, split=3.5),
    lambda s, p: plot.prediction_plot(np.arange(40), np.c_[np.cos(np.arange(40) / 5), np.arange(40) / 40],
                                      np.c_[np.cos(np.arange(40) / 5.5), np.arange(40) / 35], p,
                                      labels=("series", "model")),
], ids=["heatmap-summary", "heatmap-gru-dict", "heatmap-array", "histogram", "histogram-horizon",
        "prediction", "prediction-2-channels"])
def test_plots_write_png_files(make, summary, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure.png"
    out = make(summary, path)
    assert out == path
    assert_real_png(path)
    assert no_open_pyplot_figures()


def test_plot_argument_errors(summary, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="layer must index one of the 4 layer-directions"):
        plot.forget_heatmap(summary, tmp_path / "a.png", layer=4)
    with pytest.raises(ValueError, match="sample must index"):
        plot.forget_heatmap(summary, tmp_path / "a.png", sample=3)
    with pytest.raises(TypeError, match="summary must be a GateSummary"):
        plot.timescale_histogram(summary.gates, tmp_path / "a.png")
    with pytest.raises(ValueError, match="data and prediction must have the same shape"):
        plot.prediction_plot(np.arange(5), np.zeros(5), np.zeros((5, 2)), tmp_path / "a.png")
    with pytest.raises(ValueError, match="data must have shape"):
        plot.prediction_plot(np.arange(5), np.zeros(4), np.zeros(4), tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch, summary, tmp_path):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry fails
    with pytest.raises(ImportError, match=r'pip install "fastgates\[plot\]"'):
        plot.timescale_histogram(summary, tmp_path / "a.png")
