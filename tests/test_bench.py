"""The benchmark runner ``fastgates.bench`` (``python -m fastgates bench``).

Only the machinery is tested, on tiny shapes with a tiny GEMM and the
protocol's minimum of 7 timed runs: the table and its columns, the peers
(present, and absent as on a machine without PyTorch or onnxruntime), the
NumPy forward pass used as fallback peer and check, the progress display and
the memory measurement.  The numbers themselves are not benchmarks.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fastgates as fg
from _child import run_python
import reference as ref
from _tolerances import assert_close
from fastgates import __main__ as cli
from fastgates import bench

TINY = ["--shape", "6,2,3,4", "--threads", "1", "--repeats", "7",
        "--min-run-time", "0.0005", "--gemm-n", "64"]
PEER_COLUMNS = ["torch", "torch best", "onnxrt", "onnxrt best", "jax", "jax best"]
RATIO_COLUMNS = ["torch/fg", "torch best/fg", "onnxrt/fg", "onnxrt best/fg", "jax/fg", "jax best/fg"]
COLUMNS = (["group", "(T, B, I, H)", "cell", "dtype", "mode", "thr", "fastgates"]
           + PEER_COLUMNS + RATIO_COLUMNS
           + ["best peer", "best peer/fg", "GFLOP/s", "%GEMM", "max err"])


def _ms(cell):
    """The time in a cell such as "0.223" or "0.223 (1 thr, spin)"."""
    return float(cell.split()[0])


def _table(report, after=None):
    """Header and rows (dicts) of the first markdown table in the report
    (after the line starting with ``after``, if given)."""
    lines = []
    text = report if after is None else report[report.index("\n" + after):]
    for line in text.splitlines():
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


ORACLES = {"lstm": ref.reference_lstm, "gru": ref.reference_gru,
           "janet": ref.reference_janet, "mgu": ref.reference_mgu}


@pytest.mark.parametrize("cell", ["lstm", "gru", "janet", "mgu"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_numpy_forward_matches_the_reference(cell, layers, bidirectional):
    rng = np.random.default_rng(0)
    params = ref.random_params(rng, cell, 3, 5, layers, bidirectional)
    x = rng.standard_normal((7, 4, 3))
    y = bench.numpy_forward(cell, params, x, layers, bidirectional)
    assert_close(y, ORACLES[cell](x, params, layers, bidirectional)[0], np.float64)


@pytest.mark.parametrize("heads, layers, bidirectional", [(1, 1, False), (2, 2, True)])
def test_numpy_forward_matches_the_slstm_reference(heads, layers, bidirectional):
    m = fg.SLSTM(3, 4, layers, bidirectional=bidirectional, num_heads=heads, dtype=np.float64,
                 seed=0)
    params = m.state_dict()
    x = np.random.default_rng(0).standard_normal((7, 4, 3))
    y = bench.numpy_forward("slstm", params, x, layers, bidirectional)
    assert_close(y, ref.reference_slstm(x, params, layers, bidirectional, num_heads=heads)[0],
                 np.float64)


def test_numpy_forward_uses_janets_beta():
    rng = np.random.default_rng(2)
    params = ref.random_params(rng, "janet", 3, 5)
    x = rng.standard_normal((6, 2, 3))
    y = bench.numpy_forward("janet", params, x, beta=0.3)
    assert_close(y, ref.reference_janet(x, params, beta=0.3)[0], np.float64)
    # beta matters: the default's answer is another one
    assert np.max(np.abs(y - bench.numpy_forward("janet", params, x))) > 1e-3


def test_numpy_forward_refuses_a_cell_it_does_not_know():
    with pytest.raises(ValueError, match="no 'rnn' cell"):
        bench.numpy_forward("rnn", {}, np.zeros((1, 1, 1)))


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
    code = cli.main(["bench", *TINY, "--cells", "gru", "--dtypes", "float32",
                     "--peers", "torch"])
    out, err = capsys.readouterr()
    assert code == 0
    header, rows = _table(out)
    assert header == COLUMNS
    assert [r["mode"] for r in rows] == ["infer", "train"]
    for r in rows:
        assert (r["(T, B, I, H)"], r["cell"], r["dtype"], r["thr"]) == (
            "(6, 2, 3, 4)", "gru", "float32", "1")
        for column in ("fastgates", "torch", "torch/fg", "torch best/fg", "best peer/fg"):
            assert math.isfinite(float(r[column])) and float(r[column]) > 0
        assert r["torch best"] == f"{r['torch']} (1 thr)"
        assert r["best peer"] == "torch (1 thr)"
        assert math.isfinite(float(r["GFLOP/s"])) and r["%GEMM"].endswith("%")
        assert not r["max err"].startswith("**NO**")
        assert r["jax"] == r["onnxrt"] == ""
    assert "- command: `python -m fastgates bench --shape 6,2,3,4" in out
    assert "loading new weights before each step" in out
    # Not a terminal: one progress line per case, with the case and its times.
    progress = [line for line in err.splitlines() if line.startswith("[ ")]
    assert [p[:9] for p in progress] == ["[ 1/2 ] (", "[ 2/2 ] ("]
    assert "(6, 2, 3, 4) gru float32 train" in progress[1]
    assert "fastgates@1" in progress[1] and "torch@1" in progress[1] and "ms" in progress[1]


def test_each_peer_is_timed_at_every_thread_count(tmp_path, capsys, restore_threads):
    # fastgates at 2 threads; PyTorch at 1 and 2, onnxruntime at 1 and 2 with
    # and without spinning: the row shows each peer at 2 and at its fastest.
    path = tmp_path / "rows.json"
    argv = [*TINY[:2], "--threads", "2", *TINY[4:], "--cells", "lstm", "--dtypes",
            "float32", "--modes", "infer", "--peers", "torch", "onnxruntime",
            "--json", str(path)]
    assert bench.main(argv) == 0
    out, _ = capsys.readouterr()
    [row] = json.loads(path.read_text())["rows"]
    sides = row["sides"]
    assert sorted(sides) == ["fastgates@2", "onnxruntime@1 no spin", "onnxruntime@1 spin",
                             "onnxruntime@2 no spin", "onnxruntime@2 spin",
                             "torch@1", "torch@2"]
    [shown] = _table(out)[1]
    for peer, column in (("torch", "torch"), ("onnxruntime", "onnxrt")):
        mine = {k: v["median_ms"] for k, v in sides.items() if k.startswith(peer)}
        assert _ms(shown[f"{column} best"]) == pytest.approx(min(mine.values()), rel=0.01, abs=1e-3)
        at_two = min(v for k, v in mine.items() if k.startswith(f"{peer}@2"))
        assert _ms(shown[column]) == pytest.approx(at_two, rel=0.01, abs=1e-3)
    assert _ms(shown["onnxrt best"]) <= _ms(shown["onnxrt"])
    assert shown["onnxrt best"].endswith(("spin)", "no spin)"))


def test_bench_without_any_peer_installed(monkeypatch, capsys, restore_threads):
    # A module set to None in sys.modules cannot be imported: as if absent.
    for name in ("torch", "onnx", "onnxruntime", "jax"):
        monkeypatch.setitem(sys.modules, name, None)
    code = bench.main([*TINY, "--cells", "lstm", "--dtypes", "float64"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "note: PyTorch is not installed" in err
    assert "note: onnxruntime/onnx are not installed" in err
    assert "note: JAX is not installed" in err
    header, rows = _table(out)
    numpy_at = COLUMNS.index("jax best/fg") + 1
    assert header == (COLUMNS[:13] + ["numpy", "numpy best"] + COLUMNS[13:numpy_at]
                      + ["numpy/fg", "numpy best/fg"] + COLUMNS[numpy_at:])
    infer, train = rows
    assert infer["torch"] == infer["onnxrt"] == ""
    assert math.isfinite(float(infer["numpy/fg"])) and float(infer["numpy/fg"]) > 0
    assert infer["best peer/fg"] == infer["numpy/fg"]
    assert not infer["max err"].startswith("**NO**")
    # No NumPy backward pass: the training row has fastgates alone, still
    # checked against the NumPy forward pass.
    assert train["numpy"] == train["numpy/fg"] == train["best peer/fg"] == ""
    assert train["best peer"] == ""
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


# ---------------------------------------------------------------------------
# agreement, weight updates, JAX


def _wrong_fastgates(monkeypatch, delta):
    """fastgates computes with one recurrent weight off by ``delta`` but hands
    the peers the right weights: a wrong model on the fastgates side only."""
    real = bench._fg_model

    def wrong(cell, shape, dtype):
        m = real(cell, shape, dtype)
        right = m.state_dict()
        off = m.state_dict()
        off["weight_hh_l0"][0, 0] += delta
        m.load_state_dict(off)
        m.state_dict = lambda: {k: v.copy() for k, v in right.items()}
        return m

    monkeypatch.setattr(bench, "_fg_model", wrong)


def test_a_wrong_answer_fails_the_run_instead_of_being_timed(monkeypatch, capsys,
                                                              restore_threads):
    # 1e-3 on one weight moves y by ~1e-4 here: far above the float32 bound
    # (1e-5), yet below the 5e-4 the runner used to allow.
    _wrong_fastgates(monkeypatch, 1e-3)
    code = bench.main([*TINY, "--cells", "lstm", "--dtypes", "float32",
                       "--modes", "infer", "--peers", "torch"])
    out, err = capsys.readouterr()
    assert code == 1
    message = [line for line in err.splitlines() if line.startswith("DISAGREEMENT")]
    assert message and message[0].startswith(
        "DISAGREEMENT: (6, 2, 3, 4) lstm float32 infer thr=1: fastgates@1 against ")
    err_value = float(message[0].split("differs by ")[1].split()[0])
    assert bench.AGREE_TOL["float32"]["y"] < err_value < 5e-4
    assert "FAILED: " in err
    [row] = _table(out)[1]
    assert row["fastgates"] == row["torch"] == ""          # not timed
    assert row["max err"].startswith("**NO**")
    assert "the run failed" in out


def test_a_right_answer_passes_with_the_same_perturbation_of_zero(monkeypatch, capsys,
                                                                  restore_threads):
    # The same machinery with nothing wrong: the failure above is the weight's.
    _wrong_fastgates(monkeypatch, 0.0)
    assert bench.main([*TINY, "--cells", "lstm", "--dtypes", "float32",
                       "--modes", "infer", "--peers", "torch"]) == 0
    capsys.readouterr()


def test_training_steps_get_new_weights_on_both_sides(monkeypatch, restore_threads):
    pytest.importorskip("torch")
    made = []
    real = bench._torch_model

    def keep(*args):
        made.append(real(*args))
        return made[-1]

    monkeypatch.setattr(bench, "_torch_model", keep)
    args = bench._parser("x").parse_args([*TINY, "--peers", "torch"])
    assert bench._check_args(args) is None
    ctx = bench._Context(args, bench.load_peers(["torch"]), bench.Progress(0, io.StringIO()))
    shape = bench.Shape("custom", 6, 2, 3, 4)
    case = bench.Case(shape, "gru", "float64", "train")
    m = bench._fg_model("gru", shape, np.float64)
    first = m.state_dict()
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 2, 3)), rng.standard_normal((6, 2, 4))
    sides, answers, ref = bench.case_sides(ctx, case, m, x, dy)
    [tm] = made

    def torch_params():
        return {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}

    by_peer = {s.peer: s for s in sides}
    for peer, params in (("fastgates", m.state_dict), ("torch", torch_params)):
        side = by_peer[peer]
        side.call()
        assert all(np.array_equal(params()[k], first[k]) for k in first), peer
        side.between()              # every weight changes before the next step
        for k in first:
            assert np.allclose(params()[k] - first[k], bench.WEIGHT_STEP, rtol=1e-6), (peer, k)
        side.between()              # and back
        assert all(np.array_equal(params()[k], first[k]) for k in first), peer
    # The untimed update is not counted: wall and CPU seconds are the calls'.
    calls = []
    times, wall, cpu = bench.timed_calls(lambda: calls.append("call"), 3,
                                         lambda: (calls.append("load"), time.sleep(0.01)))
    assert calls == ["load", "call"] * 3 and wall == sum(times) < 0.01
    # The answers compared are the gradients at the first weights.
    assert set(answers["torch@1"]) == set(answers["fastgates@1"]) - {"y"}
    errs, failures = bench.agreement(case, 1, answers, ref)
    assert not failures and errs["torch@1"][0] < 1e-13


def test_jax_is_a_peer(request, monkeypatch, capsys, restore_threads):
    pytest.importorskip("jax")
    # JAX compiles each training step for seconds: keep what it compiled for
    # the next test run (CI runs the suite twice), in pytest's cache folder.
    cache = request.config.cache.mkdir("jax-compilation-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # Training steps of both cells, both directions (a reversed scan), in
    # float64: gradients of sum(y * dy) that agree with fastgates' to 1e-13
    # need JAX's forward pass right too.  (Every benchmark run checks every
    # other case, inference and the stacked shape included, the same way.)
    code = bench.main(["--shape", "5,2,3,4,1,bi", *TINY[2:], "--dtypes", "float64",
                       "--modes", "train", "--peers", "jax"])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, rows = _table(out)
    assert [r["cell"] for r in rows] == ["lstm", "gru"]
    for r in rows:
        assert float(r["jax"]) > 0 and float(r["jax best/fg"]) > 0
        assert r["best peer"] == "jax (1 thr)"
        assert float(r["max err"]) < 1e-13
    assert "jax 0." in out or "jax 1." in out


# ---------------------------------------------------------------------------
# cells no framework ships: timed against fastgates' LSTM


def test_default_cells_are_the_frameworks_and_help_lists_every_cell(capsys):
    args = bench._parser("x").parse_args([])
    assert args.cells == ["lstm", "gru"] == list(bench.FRAMEWORK_CELLS)
    with pytest.raises(SystemExit):
        bench._parser("x").parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("from lstm gru janet mgu slstm mingru minlstm (default: lstm gru); janet mgu slstm "
            "mingru minlstm: opt-in") in text
    assert "fastgates' own LSTM" in text


def test_a_cell_no_framework_ships_gets_the_lstm_yardstick_not_peers(monkeypatch,
                                                                      restore_threads):
    pytest.importorskip("torch")
    made = []
    real = bench._fg_model

    def keep(cell, shape, dtype):
        made.append((cell, real(cell, shape, dtype)))
        return made[-1][1]

    monkeypatch.setattr(bench, "_fg_model", keep)
    args = bench._parser("x").parse_args([*TINY, "--peers", "torch", "numpy"])
    assert bench._check_args(args) is None
    ctx = bench._Context(args, bench.load_peers(["torch", "numpy"]),
                         bench.Progress(0, io.StringIO()))
    shape = bench.Shape("custom", 6, 2, 3, 4)
    case = bench.Case(shape, "mgu", "float64", "train")
    m = bench._fg_model("mgu", shape, np.float64)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 2, 3)), rng.standard_normal((6, 2, 4))
    sides, answers, ref_y = bench.case_sides(ctx, case, m, x, dy)
    # PyTorch is loaded but has no MGU: no side; numpy is inference only.
    assert [s.label for s in sides] == ["fastgates@1", "fastgates-lstm@1"]
    assert list(answers) == ["fastgates@1"]          # the yardstick is not compared
    errs, failures = bench.agreement(case, 1, answers, ref_y)
    assert not failures and list(errs) == ["numpy forward"]
    assert errs["numpy forward"][0] < 1e-13
    # The yardstick is an LSTM of the same shape and dtype, and its training
    # steps get new weights in between, as the cell's do.
    [(cell, lstm)] = made[1:]
    assert cell == "lstm" and lstm.hidden_size == 4 and lstm.dtype == np.float64
    first = lstm.state_dict()
    yard = sides[1]
    yard.call()
    yard.between()
    for k in first:
        assert np.allclose(lstm.state_dict()[k] - first[k], bench.WEIGHT_STEP, rtol=1e-6), k
    # An inference case of the cell keeps the NumPy peer (it computes MGU).
    sides, answers, _ = bench.case_sides(ctx, bench.Case(shape, "mgu", "float64", "infer"),
                                         m, x, dy)
    assert [s.label for s in sides] == ["fastgates@1", "fastgates-lstm@1", "numpy@1"]
    assert sorted(answers) == ["fastgates@1", "numpy@1"]


def test_bench_janet_and_mgu_against_the_lstm_yardstick(tmp_path, capsys, restore_threads):
    # Every peer asked for (the default): none of them is built for these
    # cells, and no note says one failed.
    path = tmp_path / "rows.json"
    code = bench.main([*TINY, "--cells", "janet", "mgu", "--dtypes", "float64",
                       "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, rows = _table(out)
    at = header.index("fastgates")
    assert header[at:at + 3] == ["fastgates", "fastgates LSTM", "LSTM/cell"]
    assert [(r["cell"], r["mode"]) for r in rows] == [
        ("janet", "infer"), ("janet", "train"), ("mgu", "infer"), ("mgu", "train")]
    for r in rows:
        mine, lstm = float(r["fastgates"]), float(r["fastgates LSTM"])
        assert mine > 0 and lstm > 0
        assert float(r["LSTM/cell"]) == pytest.approx(lstm / mine, rel=0.05, abs=0.01)
        assert all(r[c] == "" for c in PEER_COLUMNS + RATIO_COLUMNS)
        assert r["best peer"] == r["best peer/fg"] == ""        # the yardstick is no peer
        assert float(r["max err"]) < bench.AGREE_TOL["float64"]["y"]
    assert "could not run" not in err + out
    assert "jax not used" in out                     # no JAX worker was started
    assert "JANET, MGU: no framework ships the cell" in out
    data = json.loads(path.read_text())["rows"]
    for row in data:
        assert sorted(row["sides"]) == ["fastgates-lstm@1", "fastgates@1"]
        # checked against the NumPy forward pass only, and agreeing with it
        assert list(row["errors"]) == ["numpy forward"] and not row["failures"]
        assert row["errors"]["numpy forward"]["array"] == "y"
        assert row["errors"]["numpy forward"]["max_error"] < 1e-13
        yard = row["yardstick"]
        assert yard["cell"] == "lstm" and yard["side"] == "fastgates-lstm@1"
        assert yard["compared"] is False
        assert yard["median_ms"] == row["sides"]["fastgates-lstm@1"]["median_ms"] > 0
        assert row["sides"]["fastgates-lstm@1"]["calls_per_run"] >= 1
        # GFLOP/s of the cell's own two gate rows, in the cell's time
        flops = 2 * 6 * 2 * 2 * 4 * (3 + 4) * (3 if row["mode"] == "train" else 1)
        assert row["gflops"] == pytest.approx(
            flops / row["sides"]["fastgates@1"]["median_ms"] / 1e6, rel=1e-9)


def test_a_wrong_janet_fails_against_the_numpy_forward_pass(monkeypatch, capsys,
                                                             restore_threads):
    # The NumPy forward pass is the only check of a cell no framework ships:
    # a wrong fastgates JANET must fail the run, however its LSTM fares.
    _wrong_fastgates(monkeypatch, 1e-3)
    code = bench.main([*TINY, "--cells", "janet", "--dtypes", "float32", "--modes", "infer"])
    out, err = capsys.readouterr()
    assert code == 1
    assert ("DISAGREEMENT: (6, 2, 3, 4) janet float32 infer thr=1: fastgates@1 against "
            "numpy forward: y differs by") in err
    [row] = _table(out)[1]
    assert row["fastgates"] == row["fastgates LSTM"] == ""         # not timed


def test_compile_cost_covers_every_cell_asked_for(monkeypatch, capsys, restore_threads):
    # The fresh process is replaced by the same script run in this one
    # (compiling from an empty cache takes ~20 s a cell); what is checked is
    # that each cell's own class is built and its row reported.
    scripts = []

    def in_process(code, env, arg=None):
        assert os.path.isdir(env["NUMBA_CACHE_DIR"])
        scripts.append(code)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(code, {})
        return json.loads(stdout.getvalue().strip().splitlines()[-1])

    monkeypatch.setattr(bench, "_run_child", in_process)
    code = bench.main(["--compile-cost", "--no-timing", "--cells", "janet", "mgu",
                       "--dtypes", "float64"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert sum("fg.JANET(" in c for c in scripts) == sum("fg.MGU(" in c for c in scripts) == 2
    header, rows = _table(out.split("## Compile cost", 1)[1])
    assert [(r["cell"], r["dtype"], r["cache"]) for r in rows] == [
        ("janet", "float64", "empty"), ("janet", "float64", "warm"),
        ("mgu", "float64", "empty"), ("mgu", "float64", "warm")]
    assert all(float(r["first vjp+pullback s"]) >= 0 for r in rows)


# ---------------------------------------------------------------------------
# the sLSTM's peer: the xLSTM package's pure-PyTorch sLSTM cell


def test_xlstm_is_a_default_peer_of_the_slstm_only_and_missing_is_a_note(monkeypatch):
    assert bench.default_peers(["lstm", "gru"]) == ["torch", "onnxruntime", "jax"]
    assert bench.default_peers(["lstm", "slstm"]) == ["torch", "onnxruntime", "jax", "xlstm"]
    monkeypatch.setitem(sys.modules, "xlstm", None)      # as if absent
    peers = bench.load_peers(["xlstm"], ["slstm"])
    assert peers.xlstm is None and "xlstm" not in peers.timed()
    assert any("xlstm is not installed" in n and "`pip install xlstm" in n
               for n in peers.notes)
    assert peers.numpy                       # the fallback peer when none is there


def test_xlstm_side_computes_fastgates_slstm_from_its_weights():
    pytest.importorskip("xlstm")
    torch = pytest.importorskip("torch")
    peers = bench.load_peers(["xlstm"], ["slstm"])
    assert peers.xlstm is not None and peers.timed() == ["xlstm"]
    # Two heads and biases that differ everywhere: a mapping that mixed up
    # gates, heads, units or rows and columns would change y.
    m = fg.SLSTM(3, 4, num_heads=2, dtype=np.float64, seed=0)
    rng = np.random.default_rng(3)
    sd = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    R = sd["weight_hh_l0"]
    kernel = bench._xlstm_recurrent(R, 2)
    assert kernel.shape == (2, 8, 2)
    assert np.array_equal(bench._xlstm_recurrent(kernel, 2, to_xlstm=False), R)
    # head 1, gate z (2), unit 0 of the head, column 1: fastgates' row 2H + d + 0
    assert kernel[1, 2 * 2 + 0, 1] == R[2 * 4 + 2 + 0, 1]
    forward, params = bench.xlstm_model(peers, sd, np.float64)
    assert all(p.dtype == torch.float64 for p in params.values())
    x, dy = rng.standard_normal((7, 3, 3)), rng.standard_normal((7, 3, 4))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = forward(xt)
    y.backward(torch.from_numpy(dy))
    (y_fg, _), pullback = m.vjp(x)
    dx, _, dparams = pullback(dy)
    assert_close(bench._to_np(y), y_fg, np.float64)
    assert_close(bench._to_np(xt.grad), dx, np.float64)
    grads = bench.xlstm_gradients(params)
    assert sorted(grads) == sorted(dparams)
    for name, g in grads.items():
        assert_close(g, dparams[name], np.float64, err_msg=name)


def test_bench_slstm_against_xlstm(tmp_path, capsys, restore_threads):
    pytest.importorskip("xlstm")
    # The default peers with --cells slstm: xlstm is one of them; the
    # stacked bidirectional shape has no xlstm side, which is a note.
    path = tmp_path / "rows.json"
    code = bench.main(["--shape", "6,2,3,4", "--shape", "5,2,3,4,2,bi", *TINY[2:],
                       "--cells", "slstm", "--dtypes", "float64", "--json", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    header, rows = _table(out)
    assert header[header.index("jax best") + 1:][:2] == ["xlstm", "xlstm best"]
    assert [(r["(T, B, I, H)"], r["mode"]) for r in rows] == [
        ("(6, 2, 3, 4)", "infer"), ("(6, 2, 3, 4)", "train"),
        ("(5, 2, 3, 4) L=2 bi", "infer"), ("(5, 2, 3, 4) L=2 bi", "train")]
    for r in rows[:2]:
        assert float(r["xlstm"]) > 0 and r["xlstm best"] == f"{r['xlstm']} (1 thr)"
        assert float(r["xlstm/fg"]) > 0 and float(r["fastgates LSTM"]) > 0
        assert r["best peer"] == "xlstm (1 thr)" and r["best peer/fg"] == r["xlstm/fg"]
        assert all(r[c] == "" for c in PEER_COLUMNS + RATIO_COLUMNS)     # no framework
        assert float(r["max err"]) < bench.AGREE_TOL["float64"]["y"]
    for r in rows[2:]:
        assert r["xlstm"] == r["best peer"] == "" and float(r["fastgates"]) > 0
    assert "could not run" not in err + out
    assert "xlstm's sLSTM cell is one layer in one direction: no xlstm side for (5, 2, 3, 4)" in out
    assert "xlstm 0." in out or "xlstm 1." in out or "xlstm 2." in out
    assert "xlstm: the sLSTM cell of the xLSTM package" in out
    infer, train = json.loads(path.read_text())["rows"][:2]
    for row in (infer, train):
        assert row["sides"]["xlstm@1"]["median_ms"] > 0
        assert row["sides"]["xlstm@1"]["calls_per_run"] >= 1
        assert row["errors"]["xlstm@1"]["max_error"] < 1e-13 and not row["failures"]
    assert infer["errors"]["xlstm@1"]["array"] == "y"


def test_xlstm_training_side_answers_every_gradient_and_gets_new_weights(restore_threads):
    pytest.importorskip("xlstm")
    torch = pytest.importorskip("torch")
    args = bench._parser("x").parse_args([*TINY, "--peers", "xlstm", "--cells", "slstm"])
    assert bench._check_args(args) is None
    peers = bench.load_peers(args.peers, args.cells)
    ctx = bench._Context(args, peers, bench.Progress(0, io.StringIO()))
    assert ctx.threads.torch is peers.xlstm_torch          # its thread count is set
    shape = bench.Shape("custom", 6, 2, 3, 4)
    case = bench.Case(shape, "slstm", "float64", "train")
    m = bench._fg_model("slstm", shape, np.float64)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 2, 3)), rng.standard_normal((6, 2, 4))
    sides, answers, ref_y = bench.case_sides(ctx, case, m, x, dy)
    assert [s.label for s in sides] == ["fastgates@1", "fastgates-lstm@1", "xlstm@1"]
    # y, dx and the four parameters' gradients; not the state gradients
    assert set(answers["xlstm@1"]) == {"y", "dx", "weight_ih_l0", "weight_hh_l0",
                                       "bias_ih_l0", "bias_hh_l0"}
    errs, failures = bench.agreement(case, 1, answers, ref_y)
    assert not failures and errs["xlstm@1"][0] < 1e-13
    # Training steps load the other weights in between (untimed), and back.
    sd = m.state_dict()
    side = sides[2]
    side.between()
    y_next = bench._to_np(side.call())
    forward, _ = bench.xlstm_model(peers, bench._next_weights(sd), np.float64)
    assert np.array_equal(y_next, bench._to_np(forward(torch.from_numpy(x))))
    assert not np.array_equal(y_next, answers["xlstm@1"]["y"])
    side.between()
    assert np.array_equal(bench._to_np(side.call()), answers["xlstm@1"]["y"])


# ---------------------------------------------------------------------------
# --load


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_busy_processes_end_on_an_interrupt():
    with pytest.raises(KeyboardInterrupt):
        with bench.busy_processes(2, lambda msg: None) as pids:
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            raise KeyboardInterrupt
    assert not any(_alive(p) for p in pids)


def test_load_reports_each_side_at_1_and_n_threads(capsys, restore_threads):
    code = bench.main(["--load", "1", "--shape", "6,2,3,4", "--threads", "2",
                       *TINY[4:], "--cells", "gru", "--dtypes", "float32",
                       "--modes", "infer", "--peers", "torch"])
    out, err = capsys.readouterr()
    assert code == 0
    pids = [int(p) for p in err.split("started busy processes [")[1].split("]")[0].split(",")]
    assert len(pids) == 1 and not _alive(pids[0])
    # fastgates at 1 thread too: the time it is held to.
    assert [r["thr"] for r in _table(out)[1]] == ["1", "2"]
    header, [row] = _table(out, "| group | (T, B, I, H) | cell | dtype | mode | fastgates 1 thr")
    assert header[5:10] == ["fastgates 1 thr", "fastgates 2 thr", "fg 2/1 median",
                            "fg 2/1 p90", "<= 1.5"]
    median_1, p90_1 = (float(v) for v in row["fastgates 1 thr"].split(" / "))
    median_2, p90_2 = (float(v) for v in row["fastgates 2 thr"].split(" / "))
    assert 0 < median_1 <= p90_1 and 0 < median_2 <= p90_2
    # the ratio is of the unrounded times: each printed one is off by up
    # to half a unit of its last decimal
    def rounding(text):
        decimals = len(text.split(".")[1]) if "." in text else 0
        return 0.5 * 10.0 ** -decimals / float(text)

    for column, cell_1, cell_2 in [("fg 2/1 median", 0, 0), ("fg 2/1 p90", 1, 1)]:
        t1 = row["fastgates 1 thr"].split(" / ")[cell_1]
        t2 = row["fastgates 2 thr"].split(" / ")[cell_2]
        a, b = float(t1), float(t2)
        rel = rounding(t1) + rounding(t2)
        # and the ratio itself is printed with 2 decimals
        assert abs(float(row[column]) - b / a) <= 0.005 + rel * b / a + 1e-12
    # the verdict is of the unrounded ratios: the printed ones decide it
    # unless they are within their rounding of the bound
    worst, slack = 0.0, 0.0
    for cell in (0, 1):
        t1 = row["fastgates 1 thr"].split(" / ")[cell]
        t2 = row["fastgates 2 thr"].split(" / ")[cell]
        ratio = float(t2) / float(t1)
        if ratio > worst:
            worst, slack = ratio, (rounding(t1) + rounding(t2)) * ratio
    if abs(worst - 1.5) > slack:
        assert row["<= 1.5"] == ("yes" if worst <= 1.5 else "**no**"), row
    else:
        assert row["<= 1.5"] in ("yes", "**no**"), row
    assert " / " in row["torch 1 thr"] and " / " in row["torch 2 thr"]
    assert "under load: 1 busy processes" in out


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "3"], "at least 7"),
    (["--shape", "1,2,3"], "T,B,I,H"),
    (["--no-timing"], "needs --memory or --compile-cost"),
    (["--threads", "100000"], "NUMBA_NUM_THREADS"),
    (["--load", "-1"], "--load must be 0 or more"),
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
    run_python(code, check=True)


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


def test_a_failing_jax_worker_is_a_note(monkeypatch, capsys, restore_threads):
    # A stand-in for the worker process: it started, then fails every case.
    class Broken:
        threads, version, idle_wall, idle_cpu = 1, "0.0", 0.0, 0.0

        class proc:
            @staticmethod
            def poll():
                return None

        def send(self, kind, arg=None):
            pass

        def receive(self):
            raise RuntimeError("the JAX worker (1 threads) failed:\nTraceback\nValueError: boom")

        def close(self):
            pass

    monkeypatch.setattr(bench, "_installed", lambda name: True)
    monkeypatch.setattr(bench, "start_jax_workers", lambda threads, log: ([Broken()], None))
    code = bench.main([*TINY, "--cells", "gru", "--dtypes", "float32", "--modes", "infer",
                       "--peers", "torch", "jax"])
    out, err = capsys.readouterr()
    assert code == 0
    assert ("note: JAX could not run (6, 2, 3, 4) gru (RuntimeError: the JAX worker "
            "(1 threads) failed: ... ValueError: boom)") in err
    [row] = _table(out)[1]
    assert row["jax"] == "" and float(row["torch"]) > 0
