"""``python -m fastgates demo`` (``fastgates.demo``), on short runs.

A few epochs of a tiny network: the machinery is tested (the table, the
time scales, the plots, the options, the progress line), not the forecast's
quality, which needs the full run (about a second of training after
compilation; see README.md).
"""

import io
import re
import textwrap

import numba
import numpy as np
import pytest

from fastgates import __main__ as cli
from fastgates import demo
from _child import run_python

SHORT = ["--epochs", "2", "--hidden", "4"]
PLOTS = ["forget_heatmap.png", "timescales.png", "prediction.png"]


def _run(capsys, argv):
    code = demo.main(argv)
    captured = capsys.readouterr()
    assert code == 0
    return captured.out, captured.err


def _table_rows(out):
    lines = out.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("One-year-ahead RMSE"))
    rows = {}
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("held out"):
            break
        name, train, held = re.match(r"(.+?)\s{2,}(\S+)\s+(\S+)$", line).groups()
        rows[name] = (float(train), float(held))
    return rows


def test_demo_runs_prints_the_table_and_writes_the_plots(tmp_path, capsys):
    out_dir = tmp_path / "plots"
    out, err = _run(capsys, SHORT + ["--out", str(out_dir)])
    rows = _table_rows(out)
    assert list(rows) == ["LSTM (fastgates)", "linear AR(24), least squares",
                          "persistence (this year's value)"]
    for train, held in rows.values():
        assert 0 < train < 200 and 0 < held < 200
    # The baselines do not depend on the network: fixed numbers of the data.
    assert rows["persistence (this year's value)"] == (22.1, 32.8)
    assert rows["linear AR(24), least squares"] == (12.9, 17.0)
    assert re.search(r"time scale: median [\d.]+ years, quartiles [\d.]+-[\d.]+", out)
    assert re.search(r"\d+% of the units keep their memory longer than the 24-year window", out)
    assert "epoch 2/2" in err                      # the progress line, on stderr
    if demo.importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped" in out and not out_dir.exists()
    else:
        for name in PLOTS:
            data = (out_dir / name).read_bytes()
            assert data.startswith(b"\x89PNG") and len(data) > 1000
        assert str(out_dir) in out


def test_demo_without_matplotlib_trains_reports_and_says_how_to_plot(tmp_path, capsys, monkeypatch):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out_dir = tmp_path / "plots"
    out, _ = _run(capsys, SHORT + ["--cell", "gru", "--out", str(out_dir)])
    assert "GRU (fastgates)" in _table_rows(out)
    assert "update gate z" in out
    assert 'pip install "fastgates[demo]"' in out
    assert not out_dir.exists()


def test_demo_is_reproducible_whatever_the_thread_count(tmp_path, capsys):
    def report(threads):
        out, _ = _run(capsys, SHORT + ["--threads", str(threads), "--out", str(tmp_path / str(threads))])
        # Everything but the timings and the folder must be identical.
        return [line for line in out.splitlines()
                if not re.search(r"trained in|total time|threads|plots written", line)]

    most = min(2, numba.config.NUMBA_NUM_THREADS)
    assert report(1) == report(most)


def test_demo_is_a_subcommand_of_the_cli(tmp_path, capsys):
    code = cli.main(["demo", *SHORT, "--window", "12", "--holdout", "50", "--seed", "3",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "(seed 3)" in out
    assert "hold out 1959-2008 (50 years)" in out
    assert "linear AR(12), least squares" in _table_rows(out)


def test_the_cli_and_the_demo_module_do_not_import_matplotlib():
    code = textwrap.dedent(
        """
        import sys
        import fastgates
        assert "fastgates.demo" not in sys.modules
        from fastgates import __main__ as cli
        cli._build_parser()              # the demo subcommand is wired in
        assert "fastgates.demo" in sys.modules
        assert "matplotlib" not in sys.modules
        """
    )
    run_python(code, check=True)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--window", "2"], "--window must be at least 3"),
    (["--threads", "999"], "--threads 999"),
    (["--cell", "rnn"], "invalid choice"),
    (["--window", "200", "--holdout", "108"], "leave 1 training windows"),
])
def test_demo_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_make_windows_and_transform():
    series = np.arange(10.0)
    x, y = demo.make_windows(series, 3)
    assert x.shape == (3, 7, 1) and y.shape == (7, 1)
    np.testing.assert_array_equal(x[:, 2, 0], [2, 3, 4])
    assert y[2, 0] == 5
    with pytest.raises(ValueError, match="window"):
        demo.make_windows(series, 10)

    values = np.array([0.0, 4.0, 9.0, 100.0])
    t = demo.Transform.fit(values)
    z = t.forward(values)
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    np.testing.assert_allclose(t.inverse(z), values, atol=1e-12)
    assert t.inverse(np.array([-100.0]))[0] == 0.0       # a negative root is clipped


def test_fit_autoregression_recovers_a_linear_recursion():
    rng = np.random.default_rng(0)
    s = np.zeros(200)
    s[:2] = rng.standard_normal(2)
    for k in range(2, s.size):
        s[k] = 0.5 + 0.9 * s[k - 1] - 0.3 * s[k - 2]
    s += 1e-3 * rng.standard_normal(s.size)
    x, y = demo.make_windows(s, 2)
    predict = demo.fit_autoregression(x, y)
    assert demo.rmse(predict(x), y) < 2e-3


@pytest.mark.parametrize("tty", [False, True])
def test_training_bar(tty):
    class Stream(io.StringIO):
        def isatty(self):
            return tty

    stream = Stream()
    bar = demo.TrainingBar(20, stream=stream)
    bar.update(0, note="compiling")
    for epoch in range(1, 21):
        bar.update(epoch, 1.0 / epoch)
    bar.close()
    text = stream.getvalue()
    assert "compiling" in text and "epoch 20/20" in text and "loss 0.0500" in text
    if tty:
        assert "\r" in text and text.endswith("\n") and text.count("\n") == 1
    else:
        assert "\r" not in text
        assert text.count("\n") == 1 + 10              # the note, then every tenth
