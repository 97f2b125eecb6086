"""The sLSTM (xLSTM's scalar-memory cell, Beck et al. 2024): ``fg.SLSTM``.

Against its line-by-line NumPy reference (``tests/reference.py``,
stabilised form) in both dtypes with every layer option and 1, 2 and 4
heads; every gradient against central differences in float64 (with the
stabiliser ``m`` held constant, the contract's gradient); Hypothesis:
pre-activations up to about 1e4 stay finite and give the unstabilised
equations wherever those are finite; the layer contract (checkpointing,
save/load, flat parameters, gate analysis, initialisers, bad arguments).
The invariants drawn for every cell (padding, splitting, batch_first,
threads, memory) run over sLSTM too, in ``test_properties.py`` and
``test_long.py``.
"""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastgates as fg
import reference as ref
from _bitwise import assert_bitwise
from _tolerances import assert_close, tol
from test_gradcheck import B, H, I, LENGTHS, T, assert_gradient, fd_batched, fd_params, rel_error


def random_state(rng, num, B, H, empty=()):
    """``(h, c, n, m)``: ``|c| <= n``, ``n`` in ``[1, 2]``, ``m`` normal; ``m = -inf``
    (the empty memory) for the sequences listed in ``empty``."""
    h = rng.uniform(-1, 1, (num, B, H))
    n = rng.uniform(1, 2, (num, B, H))
    c = n * rng.uniform(-1, 1, (num, B, H))
    m = rng.standard_normal((num, B, H))
    m[:, list(empty)] = -np.inf
    return h, c, n, m


def cast(state, dtype):
    return None if state is None else tuple(np.asarray(v, dtype=dtype) for v in state)


def assert_states_close(final, final_r, gates, gates_r, dtype):
    """The states and gates against the reference's.

    ``c`` is a sum of terms as large as ``n``'s (``|c| <= n`` from a zero
    state) that may cancel far below ``n``: its rounding error is relative
    to ``n``, which grows with the steps (about T with ``f'`` near 1), so
    its absolute floor is the dtype's times ``n``.
    """
    t = tol(dtype)

    def close(a, d, scale, name):
        bad = ~(np.abs(a - d) <= t["atol"] * np.maximum(1, scale) + t["rtol"] * np.abs(d))
        where = tuple(np.argwhere(bad)[0]) if bad.any() else None
        assert where is None, f"{name} at {where}: {a[where]!r} against {d[where]!r}"

    for name, a, d in zip("hcnm", final, final_r):
        close(a, d, np.abs(final_r[2]) if name == "c" else 1, name)
    assert set(gates) == set(gates_r)
    for k in gates_r:
        close(gates[k], gates_r[k], np.abs(gates_r["n"]) if k == "c" else 1, k)


def run_reference(m, x, state, lengths, **kw):
    """The reference on the model's parameters and inputs, in float64."""
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    return ref.reference_slstm(np.asarray(x, m.dtype).astype(np.float64), params, m.num_layers,
                               m.bidirectional, cast(cast(state, m.dtype), np.float64), lengths,
                               reverse=m.reverse, num_heads=m.num_heads, **kw)


# (T, B, I, H, options, with_state, lengths): a plain layer; stacked and
# bidirectional with two heads, lengths and an initial state (some m = -inf);
# reversed without biases; four heads; sizes that cut the batch into several
# chunks and a head's gates into several column blocks; one sequence whose
# input projection is made before the kernel.
CASES = {
    "plain": (5, 3, 4, 6, {}, False, None),
    "stacked_bi_heads_lengths": (7, 4, 3, 6, {"num_layers": 2, "bidirectional": True,
                                              "num_heads": 2}, True, [7, 2, 5, 1]),
    "reverse_nobias": (6, 2, 3, 4, {"reverse": True, "bias": False, "num_heads": 2}, True, [6, 3]),
    "four_heads": (5, 2, 3, 8, {"num_heads": 4}, True, None),
    "chunks_blocks": (4, 70, 40, 72, {"num_layers": 2, "num_heads": 2}, True, None),
    "one_sequence_projected": (100, 1, 128, 64, {"num_heads": 4}, False, None),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    T_, B_, I_, H_, options, with_state, lengths = CASES[case]
    m = fg.SLSTM(I_, H_, dtype=dtype, seed=2, **options)
    rng = np.random.default_rng([len(case), T_, B_])
    x = rng.standard_normal((T_, B_, I_))
    num = m.num_layers * m.num_directions
    state = random_state(rng, num, B_, H_, empty=[0]) if with_state else None
    y, final = m(x, state, lengths)
    gates = m.gates(x, state, lengths)
    yr, final_r, gates_r = run_reference(m, x, state, lengths)
    assert_close(y, yr, dtype, "y")
    assert_states_close(final, final_r, gates, gates_r, dtype)


def test_the_empty_state_is_none_and_minus_inf():
    # state=None is h = c = n = 0, m = -inf; a part of the state left None
    # is its initial value too; the first step has f' = 0, i' = 1, m = i~.
    m = fg.SLSTM(2, 4, num_heads=2, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 2, 2))
    zeros = np.zeros((1, 2, 4))
    y, final = m(x)
    assert_bitwise(m(x, (zeros, zeros, zeros, np.full((1, 2, 4), -np.inf))), (y, final))
    assert_bitwise(m(x, (zeros, None, zeros, None)), (y, final))
    g = m.gates(x)
    np.testing.assert_array_equal(g["f"][:, 0], 0)
    np.testing.assert_array_equal(g["i"][:, 0], 1)
    np.testing.assert_array_equal(g["n"][:, 0], 1)
    (_, _), pullback = m.vjp(x)
    dx, (dh0, dc0, dn0, dm0), _ = pullback(np.ones((3, 2, 4)))
    # nothing of the empty memory reaches h: f' = 0 at the first step
    np.testing.assert_array_equal(dc0, 0)
    np.testing.assert_array_equal(dn0, 0)
    np.testing.assert_array_equal(dm0, 0)
    assert np.all(np.isfinite(dx)) and np.any(dh0 != 0)


# -- gradients ---------------------------------------------------------------------


def check_gradients(m, rng, use_lengths):
    """Every gradient of ``m`` against central differences; returns the worst relative error.

    The pullback holds the stabiliser ``m`` constant.  ``y`` and the final
    ``h`` do not depend on it, so their gradients are the function's; the
    final ``c`` and ``n`` do (they are the unstabilised ``C = c e^m``,
    ``N = n e^m`` times ``e^-m``), and with ``m`` held at its value ``m̄``
    their gradients are those of ``c e^(m - m̄)``, ``n e^(m - m̄)``:
    the loss below is made of those, so the differences see the same
    function.  The initial ``m``'s gradient is 0 by the contract, and the
    final ``m``'s ``dstate`` is ignored.
    """
    L, D = m.num_layers, m.num_directions
    shape = (L * D, B, H)
    h0, c0, n0, m0 = random_state(rng, L * D, B, H, empty=[1])
    arrays = {
        "x": rng.standard_normal((T, B, I)),
        "dy": rng.standard_normal((T, B, D * H)),
        "lengths": LENGTHS.copy() if use_lengths else None,
        "h0": h0, "c0": c0, "n0": n0, "m0": m0,
        "dh": rng.standard_normal(shape), "dc": rng.standard_normal(shape),
        "dn": rng.standard_normal(shape),
    }
    arrays["mbar"] = m(arrays["x"], (h0, c0, n0, m0), arrays["lengths"])[1][3]
    axes = {k: 1 for k in arrays}
    axes["lengths"] = 0

    def per_sequence_loss(x, dy, lengths, h0, c0, n0, m0, dh, dc, dn, mbar, magnitude=np.asarray):
        y, (h, c, n, mt) = m(x, (h0, c0, n0, m0), lengths)
        scale = np.exp(mt - mbar)
        loss = np.einsum("tbk,tbk->b", magnitude(y), magnitude(dy))
        for value, dvalue in ((h, dh), (c * scale, dc), (n * scale, dn)):
            loss += np.einsum("lbh,lbh->b", magnitude(value), magnitude(dvalue))
        return loss

    loss_scale = per_sequence_loss(magnitude=np.abs, **arrays).sum()
    state0 = (h0, c0, n0, m0)
    dm = rng.standard_normal(shape)
    _, pullback = m.vjp(arrays["x"], state0, arrays["lengths"])
    dx, (dh0, dc0, dn0, dm0), dparams = pullback(arrays["dy"], (arrays["dh"], arrays["dc"],
                                                                arrays["dn"], dm))
    # the final m's dstate is ignored, the initial m's gradient is 0
    np.testing.assert_array_equal(dm0, 0)
    assert_bitwise(pullback(arrays["dy"], (arrays["dh"], arrays["dc"], arrays["dn"], None)),
                   (dx, (dh0, dc0, dn0, dm0), dparams))

    worst = 0.0
    checks = [("dx", dx, "x"), ("dh0", dh0, "h0"), ("dc0", dc0, "c0"), ("dn0", dn0, "n0")]
    for name, analytic, target in checks:
        numeric = fd_batched(per_sequence_loss, arrays, axes, target)
        assert_gradient(name, analytic, numeric, loss_scale)
        worst = max(worst, rel_error(analytic, numeric, loss_scale).max())
    numeric = fd_params(m, lambda: per_sequence_loss(**arrays).sum())
    assert dparams.keys() == numeric.keys()
    for key in numeric:
        assert_gradient(key, dparams[key], numeric[key], loss_scale)
        worst = max(worst, rel_error(dparams[key], numeric[key], loss_scale).max())
    return worst


GRADIENT_CASES = [
    {"num_layers": 2, "bidirectional": True, "num_heads": 2},
    {"bias": False, "reverse": True},
]


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("options", GRADIENT_CASES, ids=["-".join(o) for o in GRADIENT_CASES])
def test_gradients_match_finite_differences(options, use_lengths):
    m = fg.SLSTM(I, H, dtype=np.float64, seed=7, **options)
    rng = np.random.default_rng([len(options), int(use_lengths)])
    check_gradients(m, rng, use_lengths)


# -- the stabiliser ---------------------------------------------------------------


@st.composite
def large_problems(draw):
    H_ = draw(st.sampled_from([1, 2, 4]))
    return dict(T=draw(st.integers(1, 6)), B=draw(st.integers(1, 3)), I=draw(st.integers(1, 3)),
                H=H_, heads=draw(st.sampled_from([h for h in (1, 2, 4) if H_ % h == 0])),
                L=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                dtype=draw(st.sampled_from([np.float32, np.float64])),
                scale=draw(st.sampled_from([1e-2, 1.0, 30.0, 1e3])),
                with_state=draw(st.booleans()), lengths=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


@given(problem=large_problems())
def test_large_preactivations_stay_finite_and_match_the_unstabilised_equations(problem):
    # Weights and biases up to `scale` = 1e3 with |x| <= 1 and |h| <= 1 give
    # pre-activations up to about 1e4, where exp(i~) overflows in both
    # dtypes.  The stabilised layer stays finite, its gates in range, and
    # agrees with the unstabilised equations (in float64) wherever those are
    # finite: to the dtype's tolerance plus eps * max|a| over the
    # pre-activations a, since rounding a (by |a| eps) moves exp(a) by that
    # relative amount (exp's condition number is |a|).  Measured over 400
    # draws: float32 errors at most 1/20 of that bound at scale 1e3 (4x the
    # plain tolerance there), 0.43x the plain tolerance at 30; float64
    # within 0.002x the plain tolerance everywhere.
    p = problem
    m = fg.SLSTM(p["I"], p["H"], p["L"], bidirectional=p["bidirectional"], num_heads=p["heads"],
                 dtype=p["dtype"], seed=p["seed"] % 1000)
    rng = np.random.default_rng(p["seed"])
    m.load_state_dict({k: rng.uniform(-p["scale"], p["scale"], v.shape)
                       for k, v in m.state_dict().items()})
    T_, B_, H_ = p["T"], p["B"], p["H"]
    x = rng.uniform(-1, 1, (T_, B_, p["I"]))
    num = m.num_layers * m.num_directions
    state = random_state(rng, num, B_, H_) if p["with_state"] else None
    lengths = rng.integers(1, T_ + 1, B_) if p["lengths"] else None
    valid = np.ones((T_, B_), bool) if lengths is None else np.arange(T_)[:, None] < lengths

    y, final = m(x, state, lengths)
    gates = m.gates(x, state, lengths)
    for value in (y,) + final:
        assert np.all(np.isfinite(value))
    assert np.all(np.abs(y) <= 1)                        # |c| <= n stays true, exactly
    i, f = gates["i"][:, valid], gates["f"][:, valid]
    assert np.all((0 <= i) & (i <= 1) & (0 <= f) & (f <= 1))
    np.testing.assert_array_equal(np.maximum(i, f), 1)   # the stabiliser's choice
    assert np.all(gates["n"][:, valid] >= 1)
    assert np.all(np.abs(gates["z"]) <= 1) and np.all((0 <= gates["o"]) & (gates["o"] <= 1))

    # the unstabilised state is C = c e^m, N = n e^m (in float64)
    free = None
    if state is not None:
        h0, c0, n0, m0 = cast(cast(state, m.dtype), np.float64)
        free = (h0, c0 * np.exp(m0), n0 * np.exp(m0), m0)
    params = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    yu, _, _ = ref.reference_slstm(x.astype(m.dtype).astype(np.float64), params, m.num_layers,
                                   m.bidirectional, free, lengths, num_heads=m.num_heads,
                                   stabilised=False)
    finite = np.isfinite(yu)
    # |a| <= max|parameter| * (fan-in + d + 2), with |x|, |h| <= 1
    largest = max(np.abs(v).max() for v in params.values())
    kappa = max(1.0, largest * (max(p["I"], m.num_directions * H_) + H_ // p["heads"] + 2))
    t = tol(m.dtype)
    rtol = t["rtol"] + np.finfo(m.dtype).eps * kappa
    np.testing.assert_allclose(y[finite], yu[finite], rtol=rtol, atol=t["atol"])


def test_large_inputs_are_where_the_unstabilised_equations_overflow():
    # The property above is not empty: a pre-activation of 1e3 overflows
    # exp in both dtypes, yet y is finite and equals o * tanh(z~) at the
    # first step (i' = 1, n = 1).
    m = fg.SLSTM(1, 1, dtype=np.float32, seed=0)
    m.load_state_dict({"weight_ih_l0": np.array([[1e3], [0], [1], [1]]),
                       "weight_hh_l0": np.zeros((4, 1)), "bias_ih_l0": np.zeros(4),
                       "bias_hh_l0": np.zeros(4)})
    x = np.ones((3, 1, 1))
    y, (h, c, n, mx) = m(x)
    assert np.all(np.isfinite(y)) and mx[0, 0, 0] >= 1e3
    yu, _, _ = run_reference(m, x, None, None, stabilised=False)
    assert not np.isfinite(yu).any()
    np.testing.assert_allclose(y[0, 0, 0], 1 / (1 + np.exp(-1)) * np.tanh(1), rtol=1e-6)


def test_split_sequence_with_carried_state_equals_whole():
    m = fg.SLSTM(3, 4, num_layers=2, num_heads=2, dtype=np.float64, seed=1)
    x = np.random.default_rng(1).standard_normal((9, 2, 3))
    y, final = m(x)
    y_a, mid = m(x[:4])
    assert np.all(np.isfinite(mid[3]))                   # m is finite after a step
    y_b, final_split = m(x[4:], mid)
    assert_close(np.concatenate([y_a, y_b]), y, np.float64, "y")
    for name, a, d in zip("hcnm", final_split, final):
        assert_close(a, d, np.float64, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_log1p_is_within_four_ulp(dtype):
    # The fast mode's log σ(x) = min(x, 0) - log1p(exp(-|x|)) uses a log1p
    # of its own on [0, 1] (a library call would stop the vectorisation).
    import numba

    from fastgates.cells.slstm import log1p_fast

    @numba.njit(error_model="numpy")
    def apply(u):
        out = np.empty_like(u)
        for k in range(u.shape[0]):
            out[k] = log1p_fast(u[k])
        return out

    rng = np.random.default_rng(0)
    u = np.concatenate([np.linspace(0, 1, 200_001), np.exp(-rng.uniform(0, 100, 100_000)),
                        np.geomspace(1e-40, 1, 10_000), [0.0, 1.0]]).astype(dtype)
    got = apply(u).astype(np.longdouble)
    want = np.log1p(u.astype(np.longdouble))
    ulp = np.spacing(np.maximum(want, np.finfo(dtype).tiny).astype(dtype)).astype(np.longdouble)
    assert np.max(np.abs(got - want) / ulp) <= 4
    assert apply(np.array([0.0], dtype))[0] == 0 and np.isnan(apply(np.array([np.nan], dtype))[0])


# -- the layer contract -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_checkpointing_changes_no_bit(dtype):
    # B = 64: blocks of 16 steps, so an interval of 16 cuts 50 steps in 4
    # segments; two layers, both directions, two heads, lengths, a state.
    m = fg.SLSTM(3, 6, num_layers=2, bidirectional=True, num_heads=2, dtype=dtype, seed=3)
    rng = np.random.default_rng(6)
    T_, B_ = 50, 64
    x = rng.standard_normal((T_, B_, 3)).astype(dtype)
    dy = rng.standard_normal((T_, B_, 12)).astype(dtype)
    lengths = rng.integers(1, T_ + 1, B_)
    lengths[0] = T_
    state = cast(random_state(rng, 4, B_, 6, empty=[3]), dtype)
    dstate = tuple(rng.standard_normal((4, B_, 6)).astype(dtype) for _ in range(4))
    (y, s), pullback = m.vjp(x, state, lengths)
    (yk, sk), pullback_k = m.vjp(x, state, lengths, checkpoint=16)
    assert_bitwise((yk, sk, pullback_k(dy, dstate)), (y, s, pullback(dy, dstate)))


def test_save_load_and_flat_parameters(tmp_path):
    m = fg.SLSTM(3, 4, num_layers=2, bidirectional=True, num_heads=2, dtype=np.float64, seed=0)
    assert m.weight_hh_l1_reverse.shape == (16, 2) and m.weight_ih_l1.shape == (16, 8)
    path = tmp_path / "model.npz"
    fg.save(m, path)
    back = fg.load(path)
    assert type(back) is fg.SLSTM and back.num_heads == 2 and repr(back) == repr(m)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    assert_bitwise(back(x), m(x))
    v = m.get_flat_params()
    assert v.shape == (m.num_params,) == (2 * (16 * 3 + 16 * 2 + 32) + 2 * (16 * 8 + 16 * 2 + 32),)
    other = fg.SLSTM(3, 4, num_layers=2, bidirectional=True, num_heads=2, dtype=np.float64, seed=9)
    other.set_flat_params(v)
    assert_bitwise(other(x), m(x))
    _, pullback = m.vjp(x)
    _, _, dparams = pullback(np.ones((5, 2, 8)))
    assert fg.flatten_params(m, dparams).shape == v.shape


def test_gate_analysis_reads_the_stabilised_forget_gate():
    x = np.random.default_rng(0).standard_normal((30, 4, 2))
    m = fg.SLSTM(2, 4, num_heads=2, dtype=np.float64, seed=0)
    s = fg.gate_summary(m, x)
    f = m.gates(x)["f"]
    np.testing.assert_allclose(s.mean, f.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s.timescale, fg.timescale(s.mean))


def test_initialisers_draw_one_block_per_head_and_gate():
    m = fg.SLSTM(3, 8, num_heads=4, dtype=np.float64)
    fg.init.orthogonal(m, seed=0, gain=2.0)
    w = m.weight_hh_l0.reshape(16, 2, 2)            # (gate, head) blocks of (d, d)
    for block in w:
        np.testing.assert_allclose(block.T @ block, 4 * np.eye(2), atol=1e-12)
    fg.init.xavier_uniform(m, seed=0)
    assert np.abs(m.weight_hh_l0).max() <= np.sqrt(6 / 4)
    fg.init.forget_bias(m, 2.0)
    np.testing.assert_array_equal(m.bias_ih_l0[8:16] + m.bias_hh_l0[8:16], 2.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"num_heads=3 must divide hidden_size=4"):
        fg.SLSTM(2, 4, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        fg.SLSTM(2, 4, num_heads=0)
    with pytest.raises(TypeError, match="num_heads"):
        fg.SLSTM(2, 4, num_heads=2.0)
    m = fg.SLSTM(2, 4)
    x = np.zeros((3, 1, 2))
    s = np.zeros((1, 1, 4))
    with pytest.raises(TypeError, match=r"state of an sLSTM must be a tuple \(h, c, n, m\)"):
        m(x, (s, s))
    with pytest.raises(ValueError, match=r"state\[3\] \(m\) must have shape"):
        m(x, (s, s, s, np.zeros((1, 1, 3))))
    # m may be -inf (the empty memory), not +inf or NaN; the others must be finite
    m(x, (s, s, s, np.full_like(s, -np.inf)))
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match=r"state\[3\] \(m\) must be finite"):
            m(x, (s, s, s, np.full_like(s, bad)))
    with pytest.raises(ValueError, match=r"state\[1\] \(c\) must be finite"):
        m(x, (s, np.full_like(s, -np.inf), s, s))


def test_converters_refuse_an_slstm_by_name():
    m = fg.SLSTM(2, 4, num_heads=2)
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match="torch.nn has no sLSTM layer"):
        fg.to_torch(m)
    pytest.importorskip("onnx")
    with pytest.raises(TypeError, match="ONNX has no sLSTM layer"):
        fg.to_onnx(m)
    os.environ.setdefault("KERAS_BACKEND", "torch")    # as test_interop_keras
    pytest.importorskip("keras")
    with pytest.raises(TypeError, match="Keras has no sLSTM layer"):
        fg.to_keras(m)
