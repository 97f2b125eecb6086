"""The benchmark runner ``fastgates.bench`` (``python -m fastgates bench``).

Only the machinery is tested, on tiny shapes with a tiny GEMM and the
protocol's minimum of 7 timed runs: the table and its columns, the peers
(present, and absent as on a machine without PyTorch or onnxruntime), the
NumPy forward pass used as fallback peer and check, the progress display and
the memory measurement.  The numbers themselves are not benchmarks.
"""

import io
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgates as fg
import reference as ref
from _tolerances import assert_close
from fastgates import __main__ as cli
from fastgates import bench

TINY = ["--shape", "6,2,3,4", "--threads", "1", "--repeats", "7",
        "--min-run-time", "0.0005", "--gemm-n", "64"]
COLUMNS = ["group", "(T, B, I, H)", "cell", "dtype", "mode", "thr", "fastgates",
           "torch", "onnxrt", "torch/fg", "onnxrt/fg", "best peer/fg", "GFLOP/s",
           "%GEMM", "max err"]


def _table(report):
    """Header and rows (dicts) of the first markdown table in the report."""
    lines = []
    for line in report.splitlines():
        if line.startswith("|"):
            lines.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif lines:
            break
    header, body = lines[0], [r for r in lines[1:] if set(r) != {"---"}]
    return header, [dict(zip(header, r, strict=True)) for r in body]


@pytest.fixture
def restore_threads():
    n = fg.get_num_threads()
    yield
    fg.set_num_threads(n)


# ---------------------------------------------------------------------------
# the NumPy forward pass


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_numpy_forward_matches_the_reference(cell, layers, bidirectional):
    rng = np.random.default_rng(0)
    params = ref.random_params(rng, cell, 3, 5, layers, bidirectional)
    x = rng.standard_normal((7, 4, 3))
    y = bench.numpy_forward(cell, params, x, layers, bidirectional)
    oracle = ref.reference_lstm if cell == "lstm" else ref.reference_gru
    assert_close(y, oracle(x, params, layers, bidirectional)[0], np.float64)


def test_numpy_forward_keeps_float32_and_saturates_without_overflow():
    # Weights of 100 drive the pre-activations far past exp's float32 range:
    # the sigmoid must neither warn (warnings are errors here) nor leave [0, 1].
    rng = np.random.default_rng(1)
    params = ref.random_params(rng, "gru", 3, 4, scale=100.0, dtype=np.float32)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    y = bench.numpy_forward("gru", params, x)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1.0)


# ---------------------------------------------------------------------------
# the table


def test_bench_command_against_pytorch(capsys, restore_threads):
    code = cli.main(["bench", *TINY, "--cells", "gru", "--dtypes", "float32"])
    out, err = capsys.readouterr()
    assert code == 0
    header, rows = _table(out)
    assert header == COLUMNS
    assert [r["mode"] for r in rows] == ["infer", "train"]
    for r in rows:
        assert (r["(T, B, I, H)"], r["cell"], r["dtype"], r["thr"]) == (
            "(6, 2, 3, 4)", "gru", "float32", "1")
        for column in ("fastgates", "torch", "torch/fg", "best peer/fg"):
            assert math.isfinite(float(r[column])) and float(r[column]) > 0
        assert math.isfinite(float(r["GFLOP/s"])) and r["%GEMM"].endswith("%")
        assert not r["max err"].startswith("**NO**")
        assert float(r["best peer/fg"]) <= float(r["torch/fg"])
    assert "- command: `python -m fastgates bench --shape 6,2,3,4" in out
    # Not a terminal: one progress line per case, with the case and its times.
    progress = [line for line in err.splitlines() if line.startswith("[ ")]
    assert [p[:9] for p in progress] == ["[ 1/2 ] (", "[ 2/2 ] ("]
    assert "(6, 2, 3, 4) gru float32 train thr=1" in progress[1]
    assert "fastgates" in progress[1] and "ms" in progress[1]


def test_bench_without_any_peer_installed(monkeypatch, capsys, restore_threads):
    # A module set to None in sys.modules cannot be imported: as if absent.
    for name in ("torch", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)
    code = bench.main([*TINY, "--cells", "lstm", "--dtypes", "float64"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "note: PyTorch is not installed" in err
    assert "note: onnxruntime/onnx are not installed" in err
    header, rows = _table(out)
    assert header == COLUMNS[:9] + ["numpy"] + COLUMNS[9:11] + ["numpy/fg"] + COLUMNS[11:]
    infer, train = rows
    assert infer["torch"] == infer["onnxrt"] == ""
    assert math.isfinite(float(infer["numpy/fg"])) and float(infer["numpy/fg"]) > 0
    assert infer["best peer/fg"] == infer["numpy/fg"]
    assert not infer["max err"].startswith("**NO**")
    # No NumPy backward pass: the training row has fastgates alone, still
    # checked against the NumPy forward pass.
    assert train["numpy"] == train["numpy/fg"] == train["best peer/fg"] == ""
    assert float(train["fastgates"]) > 0 and not train["max err"].startswith("**NO**")
    assert "PyTorch is not installed" in out and "training cells are empty" in out


def test_peers_and_activations_options(capsys, restore_threads):
    mode = fg.get_activation_mode()
    other = "exact" if mode == "fast" else "fast"
    code = bench.main([*TINY, "--cells", "gru", "--dtypes", "float64",
                       "--modes", "infer", "--peers", "numpy", "--activations", other])
    out, err = capsys.readouterr()
    assert code == 0
    assert "not installed" not in err
    [row] = _table(out)[1]
    assert row["torch"] == "" and float(row["numpy/fg"]) > 0
    assert not row["max err"].startswith("**NO**")
    assert f"{other} activations" in out
    assert fg.get_activation_mode() == mode


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "3"], "at least 7"),
    (["--shape", "1,2,3"], "T,B,I,H"),
    (["--no-timing"], "needs --memory or --compile-cost"),
    (["--threads", "100000"], "NUMBA_NUM_THREADS"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------
# progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_in_place_on_a_terminal():
    stream = _Terminal()
    p = bench.Progress(2, stream)
    p.start("case one")
    p.log("a note")
    p.finish("1 ms")
    p.start("case two")
    p.finish("2 ms")
    text = stream.getvalue()
    assert "\r" in text
    # What stays on the screen: each line as it was last drawn.
    screen = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    assert screen == ["a note", "[ 1/2 ] case one  1 ms", "[ 2/2 ] case two  2 ms", ""]


def test_progress_writes_one_line_per_case_otherwise():
    stream = io.StringIO()
    p = bench.Progress(2, stream)
    for label in ("case one", "case two"):
        p.start(label)
        p.finish("1 ms")
    assert stream.getvalue() == "[ 1/2 ] case one  1 ms\n[ 2/2 ] case two  1 ms\n"


# ---------------------------------------------------------------------------
# memory


def test_kept_bytes_follows_the_stated_formula():
    one = bench.Shape("x", 10, 3, 5, 7)
    # LSTM: gates 4H, cell states H, output H, input I; GRU: 3H, H, H, I.
    assert bench.kept_bytes("lstm", one, 4) == 4 * 10 * 3 * (5 + 6 * 7)
    assert bench.kept_bytes("gru", one, 8) == 8 * 10 * 3 * (5 + 5 * 7)
    stacked = bench.Shape("x", 10, 3, 5, 7, layers=2, bidirectional=True)
    per_layer = 2 * (4 * 7 + 7) + 2 * 7          # both directions, then the output
    assert bench.kept_bytes("lstm", stacked, 4) == 4 * 10 * 3 * (5 + 2 * per_layer)


def test_memory_report(monkeypatch, capsys, restore_threads):
    # The fresh process is replaced by a call in this one (same function).
    def in_process(code, env, arg=None):
        assert "measure_step_memory" in code
        assert env["PYTHONPATH"].split(os.pathsep)[0] == os.path.dirname(
            os.path.dirname(os.path.abspath(fg.__file__)))
        return json.loads(json.dumps(bench.measure_step_memory(json.loads(arg))))

    monkeypatch.setattr(bench, "_run_child", in_process)
    code = bench.main(["--memory", "--no-timing", "--shape", "20,4,3,8",
                       "--cells", "gru", "--dtypes", "float32", "--threads", "1"])
    out, _ = capsys.readouterr()
    assert code == 0
    header, [row] = _table(out.split("## Memory", 1)[1])
    assert header[-2:] == ["RSS/kept", "tracemalloc/kept"]
    assert float(row["kept"]) == pytest.approx(4 * 20 * 4 * (3 + 5 * 8) / 2**20, abs=0.01)
    assert float(row["tracemalloc"]) >= 0
    assert row["peak RSS"] == "n/a" or float(row["peak RSS"]) >= 0


# ---------------------------------------------------------------------------
# packaging


def test_import_fastgates_does_not_import_the_runner_or_its_peers():
    code = textwrap.dedent(
        """
        import sys
        import fastgates
        assert "fastgates.bench" not in sys.modules
        from fastgates import __main__ as cli
        cli._build_parser()              # the bench subcommand is wired in
        assert "fastgates.bench" in sys.modules
        heavy = [m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_script_is_the_same_runner():
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compare.py")
    assert os.path.exists(script), "benchmarks/compare.py is missing"
    res = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                         text=True, check=True)
    assert "--quick" in res.stdout and "--memory" in res.stdout


def test_a_failing_onnxruntime_session_is_a_note(monkeypatch, capsys, restore_threads):
    # onnx and onnxruntime are in the test extra: this path always runs.

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported model")

    monkeypatch.setattr(bench, "_onnx_session", broken)
    code = bench.main([*TINY, "--cells", "lstm", "--dtypes", "float32",
                       "--modes", "infer", "--peers", "onnxruntime"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "note: onnxruntime could not run (6, 2, 3, 4) lstm (RuntimeError: unsupported" in err
    assert "onnxruntime could not run" in out
    [row] = _table(out)[1]
    assert row["onnxrt"] == "" and row["best peer/fg"] == ""
