"""Forgetting attention: the functions, their gradients and the layer.

References: the dense T x T formula (``reference.forgetting_attention_reference``,
float64), central finite differences in float64, and PyTorch's
``scaled_dot_product_attention`` with the forget-gate bias as a float mask.
Properties (Hypothesis): ``log_f = 0`` is causal softmax attention, a gate of
0 hides every earlier key, and the results are the same bits on one thread
and on two.
"""

import io
import json
import tracemalloc
import zipfile

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastgates as fg
import reference as ref
from _bitwise import assert_bitwise
from _messages import raises
from _tolerances import assert_close_scaled
from test_gradcheck import assert_gradient, fd_batched
from test_io import assert_refused, edited

DTYPES = (np.float32, np.float64)
MAX_THREADS = numba.config.NUMBA_NUM_THREADS


def problem(rng, lead, T, d, dv, dtype, zero_gates=(), low=-0.3):
    """Random ``q, k, v, log_f`` (``log_f`` in ``[low, 0)``, ``-inf`` at ``zero_gates``)."""
    q = rng.standard_normal(lead + (T, d)).astype(dtype)
    k = rng.standard_normal(lead + (T, d)).astype(dtype)
    v = rng.standard_normal(lead + (T, dv)).astype(dtype)
    log_f = rng.uniform(low, -1e-3, lead + (T,)).astype(dtype)
    for where in zero_gates:
        log_f[where] = -np.inf
    return q, k, v, log_f


# ---------------------------------------------------------------------------
# Against the dense formula
# ---------------------------------------------------------------------------

SHAPES = [
    # lead, T, d, dv, zero gates (index into lead + (T,))
    ((), 1, 3, 2, ()),
    ((2,), 70, 5, 7, ((0, 40), (1, 0))),
    ((2, 3), 130, 8, 8, ((0, 1, 64), (1, 2, 127))),
    ((1,), 64, 4, 6, ()),
    ((), 65, 64, 64, ((63,),)),
    ((3,), 129, 33, 65, ((2, 128),)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, T, d, dv, zeros", SHAPES)
def test_matches_the_dense_formula(lead, T, d, dv, zeros, dtype):
    rng = np.random.default_rng(T * 7 + d)
    q, k, v, log_f = problem(rng, lead, T, d, dv, dtype, zeros)
    out = fg.forgetting_attention(q, k, v, log_f)
    assert out.shape == lead + (T, dv) and out.dtype == dtype
    assert_close_scaled(out, ref.forgetting_attention_reference(q, k, v, log_f), dtype, "out")
    out2, pullback = fg.forgetting_attention_vjp(q, k, v, log_f, scale=0.3)
    assert_close_scaled(out2, ref.forgetting_attention_reference(q, k, v, log_f, 0.3), dtype,
                        "out, scale=0.3")


@pytest.mark.parametrize("T", [63, 64, 65, 128, 129])
def test_tile_boundaries(T):
    rng = np.random.default_rng(T)
    q, k, v, log_f = problem(rng, (2,), T, 3, 2, np.float64, ((1, T // 2),))
    assert_close_scaled(fg.forgetting_attention(q, k, v, log_f),
                        ref.forgetting_attention_reference(q, k, v, log_f), np.float64, f"T={T}")


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T, zeros", [(70, ((1, 66),)), (9, ())])
def test_gradients_match_central_differences(T, zeros):
    rng = np.random.default_rng(5)
    q, k, v, log_f = problem(rng, (2,), T, 3, 2, np.float64, zeros)
    dout = rng.standard_normal((2, T, 2))
    out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f, scale=0.7)
    grads = dict(zip(("q", "k", "v", "log_f"), pullback(dout)))
    loss_scale = float(np.abs(out * dout).sum())

    def losses(q, k, v, log_f, dout):
        # one loss per sequence (axis 0), so that fd_batched perturbs replicas
        return (fg.forgetting_attention(q, k, v, log_f, scale=0.7) * dout).sum(axis=(1, 2))

    arrays = {"q": q, "k": k, "v": v, "log_f": log_f, "dout": dout}
    axes = dict.fromkeys(arrays, 0)
    hidden = np.isneginf(log_f)
    for name in ("q", "k", "v", "log_f"):
        with np.errstate(invalid="ignore"):
            numeric = fd_batched(losses, {a: x.copy() for a, x in arrays.items()}, axes, name)
        if name == "log_f":
            numeric[hidden] = 0.0     # -inf +- a step is -inf: no difference to take
        assert_gradient(f"d{name}", grads[name], numeric, loss_scale)
    # log_f[0] enters no score, and a gate of 0 has gradient 0: exactly
    assert np.all(grads["log_f"][:, 0] == 0)
    assert np.all(grads["log_f"][hidden] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_the_dense_formula_through_torch(dtype):
    # PyTorch differentiates the dense formula (float64) with autograd,
    # including a gate of 0 (the bias built with explicit masks).
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    lead, T, d, dv = (2, 2), 100, 6, 5
    q, k, v, log_f = problem(rng, lead, T, d, dv, dtype, ((0, 1, 30), (1, 0, 99)))
    dout = rng.standard_normal(lead + (T, dv)).astype(dtype)
    out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
    mine = (out,) + pullback(dout)

    tq, tk, tv, tl = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                      for a in (q, k, v, log_f))
    finite = torch.where(torch.isinf(tl), torch.zeros_like(tl), tl)
    finite = torch.cat([torch.zeros_like(finite[..., :1]), finite[..., 1:]], dim=-1)
    c = torch.cumsum(finite, dim=-1)
    zeros = torch.cumsum(torch.isinf(tl[..., 1:]).double(), dim=-1)
    zeros = torch.cat([torch.zeros_like(zeros[..., :1]), zeros], dim=-1)
    idx = torch.arange(T)
    visible = (idx[:, None] >= idx[None, :]) & (zeros[..., :, None] == zeros[..., None, :])
    bias = torch.where(visible, c[..., :, None] - c[..., None, :], torch.tensor(-np.inf, dtype=torch.float64))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias)
    o.backward(torch.tensor(dout, dtype=torch.float64))
    theirs = (o, tq.grad, tk.grad, tv.grad, tl.grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), mine, theirs):
        assert a.dtype == dtype
        b = b.detach().numpy().copy()
        if name == "dlog_f":
            b[..., 0] = 0.0
        assert_close_scaled(a, b, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_sdpa_with_a_float_mask(dtype):
    # The benchmark's peer, in the benchmark's form, in the same dtype.
    torch = pytest.importorskip("torch")
    from fastgates._bench_attention import torch_inputs, torch_training_step

    rng = np.random.default_rng(3)
    B, H, T, d = 2, 3, 90, 16
    q, k, v, log_f = problem(rng, (B, H), T, d, d, dtype)
    dout = rng.standard_normal((B, H, T, d)).astype(dtype)
    out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
    mine = (out,) + pullback(dout)
    theirs = torch_training_step(torch, *torch_inputs(torch, q, k, v, log_f), dout)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), mine, theirs):
        b = b.copy()
        if name == "dlog_f":
            b[..., 0] = 0.0
        assert_close_scaled(a, b, dtype, name)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

shapes = st.tuples(
    st.sampled_from([(), (1,), (2,), (2, 2)]),       # leading axes
    st.integers(1, 140),                              # T
    st.integers(1, 9),                                # d
    st.integers(1, 9),                                # dv
    st.sampled_from(DTYPES),
    st.integers(0, 2**32 - 1),                        # seed
)


def causal_softmax_attention(q, k, v):
    """Plain causal softmax attention, float64 (no gates)."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    T, d = q.shape[-2:]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(d)
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


@settings(max_examples=12, deadline=None)
@given(shapes)
def test_open_gates_give_causal_softmax_attention(shape):
    lead, T, d, dv, dtype, seed = shape
    q, k, v, _ = problem(np.random.default_rng(seed), lead, T, d, dv, dtype)
    out = fg.forgetting_attention(q, k, v, np.zeros(lead + (T,), dtype=dtype))
    assert_close_scaled(out, causal_softmax_attention(q, k, v), dtype, "log_f = 0")


@settings(max_examples=12, deadline=None)
@given(shapes, st.data())
def test_a_closed_gate_hides_every_earlier_key(shape, data):
    lead, T, d, dv, dtype, seed = shape
    if T < 2:
        T = 2
    rng = np.random.default_rng(seed)
    q, k, v, log_f = problem(rng, lead, T, d, dv, dtype)
    step = data.draw(st.integers(1, T - 1), label="step")
    log_f[..., step] = -np.inf
    out = fg.forgetting_attention(q, k, v, log_f)
    # keys and values before the step changed: the outputs from the step on
    # are the same bits (those keys get weight exactly 0)
    k2, v2 = k.copy(), v.copy()
    k2[..., :step, :] = rng.standard_normal(k2[..., :step, :].shape) * 10
    v2[..., :step, :] = rng.standard_normal(v2[..., :step, :].shape) * 10
    out2 = fg.forgetting_attention(q, k2, v2, log_f)
    assert_bitwise(out[..., step:, :], out2[..., step:, :])
    # and they are attention over the keys from the step on
    alone = fg.forgetting_attention(q[..., step:, :], k[..., step:, :], v[..., step:, :],
                                    log_f[..., step:])
    assert_close_scaled(out[..., step:, :], alone, dtype, "after the closed gate")


@pytest.mark.skipif(MAX_THREADS < 2, reason="needs Numba started with 2 threads or more")
@settings(max_examples=8, deadline=None)
@given(shapes, st.booleans())
@example(((), 200, 8, 8, np.float32, 1), True)        # one sequence: the two backward plans
@example(((2, 2), 130, 4, 3, np.float64, 2), False)
def test_same_bits_on_one_and_two_threads(shape, closed):
    lead, T, d, dv, dtype, seed = shape
    rng = np.random.default_rng(seed)
    q, k, v, log_f = problem(rng, lead, T, d, dv, dtype, ((..., T // 2),) if closed else ())
    dout = rng.standard_normal(lead + (T, dv)).astype(dtype)
    n = fg.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            fg.set_num_threads(threads, adaptive=False)
            out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
            results.append((out, pullback(dout)))
    finally:
        fg.set_num_threads(n)
    assert_bitwise(results[0], results[1])


def test_memory_grows_as_T_not_T_squared():
    # A T x T float64 matrix would be 32 MiB here; everything NumPy
    # allocates for a training step stays a small multiple of T (d + dv).
    rng = np.random.default_rng(0)
    T = 2048
    q, k, v, log_f = problem(rng, (), T, 4, 4, np.float64)
    dout = rng.standard_normal((T, 4))
    # on one thread every call runs each kernel's one-thread twin, which the
    # small call compiles (on two, which form runs depends on the tiles and
    # the machine's load, and tracemalloc would count a compilation)
    with fg._config.task_settings(threads=1):
        fg.forgetting_attention_vjp(q[:70], k[:70], v[:70], log_f[:70])[1](dout[:70])
        tracemalloc.start()
        try:
            out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
            grads = pullback(dout)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    del out, grads
    assert peak < 40 * T * (4 + 4) * 8, f"peak {peak / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def good(dtype=np.float32):
    return problem(np.random.default_rng(0), (2,), 5, 3, 4, dtype)


@pytest.mark.parametrize("index, value, name", [
    (0, np.ones((2, 5)), "k"),          # q 2-D: k must have the shape of q
    (1, np.ones((2, 5, 4)), "k"),
    (1, np.ones((2, 6, 3)), "k"),
    (2, np.ones((2, 6, 4)), "v"),
    (2, np.ones((2, 5)), "v"),
    (3, np.zeros((2, 6)), "log_f"),
    (3, np.zeros((5,)), "log_f"),
])
def test_shape_mismatches_name_the_argument(index, value, name):
    args = list(good(np.float64))
    args[index] = value
    with raises(ValueError, name):
        fg.forgetting_attention(*args)


def test_rank_and_empty_axes():
    with raises(ValueError, "q"):
        fg.forgetting_attention(np.ones(3), np.ones(3), np.ones(3), np.zeros(()))
    empty = np.ones((2, 0, 3))
    with raises(ValueError, "q"):
        fg.forgetting_attention(empty, empty, np.ones((2, 0, 4)), np.zeros((2, 0)))
    with raises(ValueError, "v"):
        fg.forgetting_attention(np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 0)), np.zeros(2))


@pytest.mark.parametrize("bad, fragment", [(0.25, "0.25"), (np.nan, "NaN"), (np.inf, "inf")])
def test_log_f_must_be_a_log_gate(bad, fragment):
    q, k, v, log_f = good()
    log_f[1, 3] = bad
    with raises(ValueError, "log_f") as info:
        fg.forgetting_attention(q, k, v, log_f)
    assert fragment in str(info.value) and "(1, 3)" in str(info.value)
    with raises(ValueError, "log_f"):
        fg.forgetting_attention(q, k, v, log_f, check_finite=False)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_nan_and_inf_in_the_inputs(name):
    args = dict(zip(("q", "k", "v", "log_f"), good()))
    args[name][0, 1, 0] = np.nan
    with raises(ValueError, name):
        fg.forgetting_attention(**args)
    out = fg.forgetting_attention(**args, check_finite=False)
    assert np.isnan(out).any()


@pytest.mark.parametrize("index, name", [(0, "q"), (1, "k"), (2, "v"), (3, "log_f")])
@pytest.mark.parametrize("kind", ["int", "mixed", "half", "complex", "bool"])
def test_dtypes_are_refused_by_name(index, name, kind):
    args = list(good(np.float32))
    a = args[index]
    args[index] = {"int": lambda a: a.astype(np.int64), "mixed": lambda a: a.astype(np.float64),
                   "half": lambda a: a.astype(np.float16), "complex": lambda a: a.astype(np.complex64),
                   "bool": lambda a: a < 0}[kind](a)
    if kind == "mixed" and index == 0:
        name = "k"                   # q sets the dtype; the first to differ is named
    with raises(TypeError, name):
        fg.forgetting_attention(*args)


def test_scale_and_dout_are_checked():
    q, k, v, log_f = good()
    with raises(TypeError, "scale"):
        fg.forgetting_attention(q, k, v, log_f, scale="0.5")
    with raises(ValueError, "scale"):
        fg.forgetting_attention(q, k, v, log_f, scale=np.nan)
    out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
    with raises(ValueError, "dout"):
        pullback(np.ones((2, 5, 3)))
    bad = np.ones_like(out)
    bad[0, 0, 0] = np.inf
    with raises(ValueError, "dout"):
        pullback(bad)
    with raises(TypeError, "dout"):
        pullback(np.ones(out.shape, dtype=np.int32))


def test_inputs_are_never_modified_and_any_layout_works():
    rng = np.random.default_rng(1)
    q, k, v, log_f = problem(rng, (3,), 70, 4, 5, np.float64, ((1, 20),))
    # non-contiguous, read-only and big-endian views of the same values
    qf = np.asfortranarray(q)
    kb = k.astype(k.dtype.newbyteorder(">"))
    vr = v.copy()
    vr.flags.writeable = False
    lt = np.ascontiguousarray(log_f.T).T
    before = [a.copy() for a in (qf, kb, vr, lt)]
    out, pullback = fg.forgetting_attention_vjp(qf, kb, vr, lt)
    dout = np.ones_like(out)
    grads = pullback(dout)
    for a, b in zip((qf, kb, vr, lt), before):
        np.testing.assert_array_equal(a, b)
    assert_bitwise(out, fg.forgetting_attention(q, k, v, log_f))
    assert_bitwise(grads, fg.forgetting_attention_vjp(q, k, v, log_f)[1](dout))
    assert np.all(dout == 1)


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------

E, HEADS, T_LAYER, B_LAYER = 6, 2, 9, 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_its_reference(dtype, bias):
    m = fg.ForgettingAttention(E, HEADS, bias=bias, dtype=dtype, seed=4)
    x = np.random.default_rng(2).standard_normal((T_LAYER, B_LAYER, E)).astype(dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close_scaled(y, ref.forgetting_attention_layer_reference(x, m.state_dict(), HEADS), dtype, "y")
    # unbatched (T, E): the batch axis dropped
    assert_bitwise(m(x[:, 1]), y[:, 1])
    gates = m.gates(x)["f"]
    assert gates.shape == (T_LAYER, B_LAYER, HEADS)
    assert np.all((gates > 0) & (gates < 1))
    assert m.gates(x[:, 0])["f"].shape == (T_LAYER, HEADS)


def test_layer_default_initialisation():
    m = fg.ForgettingAttention(16, 4, seed=0)
    bound = 1 / np.sqrt(16)
    names = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "forget_weight",
             "forget_bias"]
    assert list(m.state_dict()) == names
    for name in names[:-1]:
        assert np.abs(m.state_dict()[name]).max() <= bound
    low, high = fg.attention.FORGET_BIAS_INIT
    assert np.all((m.forget_bias >= low) & (m.forget_bias <= high))
    assert_bitwise(m.state_dict(), fg.ForgettingAttention(16, 4, seed=0).state_dict())
    assert m.in_proj_weight.shape == (48, 16) and m.forget_weight.shape == (4, 16)
    with raises(ValueError, "num_heads"):
        fg.ForgettingAttention(6, 4)
    with raises(ValueError, "embed_dim"):
        m(np.ones((3, 2, 5)))
    with raises(ValueError, "dy"):
        m.vjp(np.ones((3, 2, 16)))[1](np.ones((3, 2, 15)))


def test_layer_gradients_match_central_differences():
    dtype = np.float64
    m = fg.ForgettingAttention(4, 2, dtype=dtype, seed=1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 2, 4))
    dy = rng.standard_normal((7, 2, 4))
    y, pullback = m.vjp(x)
    dx, dparams = pullback(dy)
    assert list(dparams) == list(m.state_dict())
    loss_scale = float(np.abs(y * dy).sum())

    def losses(x, dy):
        return (m(x) * dy).sum(axis=(0, 2))

    numeric = fd_batched(losses, {"x": x.copy(), "dy": dy}, {"x": 1, "dy": 1}, "x")
    assert_gradient("dx", dx, numeric, loss_scale)
    base = m.state_dict()
    for name, value in base.items():
        numeric = np.zeros(value.shape)
        for i in np.ndindex(value.shape):
            vals = []
            for sign in (1, -1):
                p = {key: a.copy() for key, a in base.items()}
                p[name][i] += sign * 1e-6
                m.load_state_dict(p)
                vals.append(float((m(x) * dy).sum()))
            step = (value[i] + 1e-6) - (value[i] - 1e-6)
            numeric[i] = (vals[0] - vals[1]) / step
        m.load_state_dict(base)
        assert_gradient(f"d{name}", dparams[name], numeric, loss_scale)


def test_layer_save_load_and_flat_parameters(tmp_path):
    m = fg.ForgettingAttention(8, 2, dtype=np.float64, seed=5)
    x = np.random.default_rng(0).standard_normal((6, 3, 8))
    buf = io.BytesIO()
    fg.save(m, buf)
    buf.seek(0)
    loaded = fg.load(buf)
    assert type(loaded) is fg.ForgettingAttention and repr(loaded) == repr(m)
    assert_bitwise(loaded.state_dict(), m.state_dict())
    assert_bitwise(loaded(x), m(x))
    fg.save(fg.ForgettingAttention(4, 4, bias=False, seed=1), tmp_path / "m.fgz")
    assert repr(fg.load(tmp_path / "m.fgz")) == "ForgettingAttention(4, 4, bias=False, dtype=float32)"
    # flat parameters: the vector scipy.optimize works on, and the gradients lined up with it
    v = m.get_flat_params()
    assert v.shape == (m.num_params,) == (4 * 64 + 2 * 8 + 4 * 8 + 2,)
    other = fg.ForgettingAttention(8, 2, dtype=np.float64, seed=6)
    other.set_flat_params(v)
    assert_bitwise(other.state_dict(), m.state_dict())
    y, pullback = m.vjp(x)
    _, dparams = pullback(2 * y / y.size)          # the gradient of mean(y**2)
    fun = fg.scipy_objective(m, "mse", x, np.zeros_like(y))
    value, grad = fun(v)
    assert grad.shape == v.shape and value == pytest.approx(np.mean(y ** 2), rel=1e-12)
    np.testing.assert_allclose(grad, fg.flatten_params(m, dparams), rtol=1e-12, atol=1e-15)
    opt = fg.Adam(m, lr=1e-2)
    opt.step(dparams)
    assert not np.array_equal(m.get_flat_params(), v)


def test_layer_file_holds_its_options_and_forged_sizes_are_refused():
    m = fg.ForgettingAttention(4, 2, seed=0)
    buf = io.BytesIO()
    fg.save(m, buf)
    raw = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        manifest = json.loads(zf.read("fastgates.json"))
    assert manifest["model"] == {"class": "ForgettingAttention", "options": {
        "embed_dim": 4, "num_heads": 2, "bias": True, "dtype": "float32"}}
    assert [a["name"] for a in manifest["arrays"]] == list(m.state_dict())
    # a configuration asking for more parameters than the file holds is
    # refused before the constructor allocates them
    assert_refused(edited(raw, lambda mf: mf["model"]["options"].update(embed_dim=100000)),
                   "implies")
    assert_refused(edited(raw, lambda mf: mf["model"]["options"].update(num_heads=3)),
                   "num_heads=3 must divide embed_dim=4")


def test_the_benchmark_runs_and_checks_its_answers(capsys):
    pytest.importorskip("torch")
    from fastgates import _bench_attention, bench

    args = bench._parser("bench").parse_args(
        ["--attention", "--attention-lengths", "70", "--attention-batches", "1", "--threads", "1",
         "--min-run-time", "0", "--no-attention-memory"])
    assert bench.run(args) == 0
    text = capsys.readouterr().out
    assert "| 70 | 1 | infer | 1 |" in text and "| 70 | 1 | train | 1 |" in text
    # the memory of one call, as the benchmark's fresh processes measure it
    # (here in this process: it sets the thread count, which is put back)
    threads = fg.get_num_threads()
    try:
        kib = _bench_attention.measure_memory({"side": "fastgates", "mode": "train", "B": 1,
                                               "T": 200, "threads": 1})
    finally:
        fg.set_num_threads(threads)
    assert kib is None or kib < 64 * 1024
