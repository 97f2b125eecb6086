"""Gradients against central finite differences, in float64.

The loss is ``sum(y * dy) + <state_T, dstate>`` with random ``dy`` and
``dstate`` (for a cell: ``<out, dout>``), so the pullback's results are the
gradient of one scalar.  Every entry of ``dx``, of the initial state gradient
and of every parameter gradient is compared with a central difference.

Batch entries are independent, so the differences with respect to ``x`` and
the initial state are taken in one call each: the batch is replicated, one
replica per perturbed entry and sign, and each replica's own loss term is
differenced.  Parameters are shared by the batch, so they are perturbed one
entry at a time through ``load_state_dict``.
"""

import numpy as np
import pytest

import fastgates as fg
from _tolerances import FD_RTOL, FD_STEP

EPS = np.finfo(np.float64).eps
# A central difference carries a rounding error of about eps * S / step, where
# S = sum(|y * dy|) + sum(|state_T * dstate|) is the size of the terms the loss
# adds up; a gradient entry smaller than FLOOR_ULPS * eps * S / (step * FD_RTOL)
# cannot be resolved to FD_RTOL, so relative errors are measured against
# max(|analytic|, |numeric|, that floor) (see ``rel_error``; S is taken as at
# least 1 so that the floor never vanishes).
FLOOR_ULPS = 10
# The worst entry may sit near FD_RTOL; the typical one must be far below it.
FD_MEAN_RTOL = FD_RTOL / 10

T, B, I, H = 3, 3, 2, 2
LENGTHS = np.array([3, 1, 2])
KINDS = ("lstm", "gru", "gru_classic")


def rel_error(analytic, numeric, loss_scale):
    floor = FLOOR_ULPS * EPS * max(loss_scale, 1.0) / (FD_STEP * FD_RTOL)
    denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), floor)
    return np.abs(analytic - numeric) / denom


def assert_gradient(name, analytic, numeric, loss_scale):
    assert analytic.shape == numeric.shape, name
    assert analytic.dtype == np.float64, name
    err = rel_error(analytic, numeric, loss_scale)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() < FD_RTOL, (
        f"{name}: max relative error {err.max():.3g} at {worst}: "
        f"analytic {analytic[worst]!r}, numeric {numeric[worst]!r}"
    )
    assert err.mean() < FD_MEAN_RTOL, f"{name}: mean relative error {err.mean():.3g}"


def central_step(values):
    """Perturbed values and the step actually taken (after rounding)."""
    plus, minus = values + FD_STEP, values - FD_STEP
    return plus, minus, plus - minus


def fd_batched(per_sequence_loss, arrays, axes, target):
    """Finite-difference gradient of the summed loss w.r.t. ``arrays[target]``.

    ``per_sequence_loss(**arrays)`` returns one loss per batch entry;
    ``axes[k]`` is the batch axis of ``arrays[k]``.
    """
    a, ax = arrays[target], axes[target]
    n = a.size
    index = np.unravel_index(np.arange(n), a.shape)
    owner = np.concatenate([index[ax], index[ax]])  # the sequence of each replica
    big = {k: None if v is None else np.take(v, owner, axis=axes[k]) for k, v in arrays.items()}
    plus, minus, step = central_step(a[index])
    entry = list(index)
    entry[ax] = np.arange(n)
    big[target][tuple(entry)] = plus
    entry[ax] = np.arange(n, 2 * n)
    big[target][tuple(entry)] = minus
    losses = per_sequence_loss(**big)
    return ((losses[:n] - losses[n:]) / step).reshape(a.shape)


def fd_params(model, total_loss):
    """Finite-difference gradient of ``total_loss()`` w.r.t. every parameter."""
    base = model.state_dict()
    grads = {}
    for key, value in base.items():
        g = np.empty_like(value)
        for idx in np.ndindex(value.shape):
            plus, minus, step = central_step(value[idx])
            losses = []
            for v in (plus, minus):
                params = dict(base)
                params[key] = value.copy()
                params[key][idx] = v
                model.load_state_dict(params)
                losses.append(total_loss())
            g[idx] = (losses[0] - losses[1]) / step
        grads[key] = g
    model.load_state_dict(base)
    return grads


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def from_tuple(family, parts):
    return tuple(parts) if family == "lstm" else parts[0]


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_gradients(kind, num_layers, bidirectional, use_lengths, bias):
    family = "lstm" if kind == "lstm" else "gru"
    kw = dict(bias=bias, bidirectional=bidirectional, dtype=np.float64, seed=7)
    if family == "lstm":
        m = fg.LSTM(I, H, num_layers, **kw)
    else:
        m = fg.GRU(I, H, num_layers, reset_after=kind == "gru", **kw)
    D = 2 if bidirectional else 1
    rng = np.random.default_rng([num_layers, D, int(use_lengths), int(bias), KINDS.index(kind)])
    check_layer_gradients(m, family, rng, use_lengths)


# ONNX's variants: peepholes, a coupled forget gate, clipping, one reversed
# direction.  The clip bound is set where part of the pre-activations (with
# inputs scaled up) lies beyond it; the test checks it does.
VARIANTS = {
    "lstm_reverse": ("lstm", dict(reverse=True)),
    "lstm_peephole": ("lstm", dict(peephole=True)),
    "lstm_input_forget": ("lstm", dict(input_forget=True)),
    "lstm_clip": ("lstm", dict(clip=0.5)),
    "lstm_all_bi": ("lstm", dict(peephole=True, input_forget=True, clip=0.5, bidirectional=True)),
    "gru_reverse": ("gru", dict(reverse=True)),
    "gru_clip": ("gru", dict(clip=0.5)),
    "gru_classic_clip_bi": ("gru", dict(clip=0.5, reset_after=False, bidirectional=True)),
}


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_gradients(variant, num_layers):
    family, options = VARIANTS[variant]
    cls = fg.LSTM if family == "lstm" else fg.GRU
    m = cls(I, H, num_layers, dtype=np.float64, seed=5, **options)
    if "peephole" in options:
        # Peepholes initialised like the rest are small; make them matter.
        sd = m.state_dict()
        for k in sd:
            if k.startswith("weight_peep"):
                sd[k] *= 4
        m.load_state_dict(sd)
    rng = np.random.default_rng([num_layers, list(VARIANTS).index(variant)])
    check_layer_gradients(m, family, rng, use_lengths=True, x_scale=3.0 if "clip" in options else 1.0)


def check_layer_gradients(m, family, rng, use_lengths, x_scale=1.0):
    """Every gradient of layer ``m`` against central differences."""
    num_layers, D = m.num_layers, m.num_directions
    n_state = 2 if family == "lstm" else 1
    state_shape = (num_layers * D, B, H)
    arrays = {
        "x": x_scale * rng.standard_normal((T, B, I)),
        "dy": rng.standard_normal((T, B, D * H)),
        "lengths": LENGTHS.copy() if use_lengths else None,
    }
    for k in range(n_state):
        arrays[f"s{k}"] = 0.5 * rng.standard_normal(state_shape)
        arrays[f"ds{k}"] = rng.standard_normal(state_shape)
    axes = {k: 1 for k in arrays}
    axes["lengths"] = 0
    states = [f"s{k}" for k in range(n_state)]

    def per_sequence_loss(x, dy, lengths, magnitude=np.asarray, **rest):
        y, final = m(x, from_tuple(family, [rest[s] for s in states]), lengths)
        loss = np.einsum("tbk,tbk->b", magnitude(y), magnitude(dy))
        for f, s in zip(as_tuple(final), states):
            loss += np.einsum("lbh,lbh->b", magnitude(f), magnitude(rest[f"d{s}"]))
        return loss

    loss_scale = per_sequence_loss(magnitude=np.abs, **arrays).sum()

    state0 = from_tuple(family, [arrays[s] for s in states])
    dstate = from_tuple(family, [arrays[f"d{s}"] for s in states])
    _, pullback = m.vjp(arrays["x"], state0, arrays["lengths"])
    dx, dstate0, dparams = pullback(arrays["dy"], dstate)

    assert_gradient("dx", dx, fd_batched(per_sequence_loss, arrays, axes, "x"), loss_scale)
    for s, analytic in zip(states, as_tuple(dstate0)):
        assert_gradient(f"d{s}", analytic, fd_batched(per_sequence_loss, arrays, axes, s), loss_scale)

    def total_loss():
        return per_sequence_loss(**arrays).sum()

    numeric = fd_params(m, total_loss)
    assert dparams.keys() == numeric.keys()
    assert m.bias or not any(k.startswith("bias") for k in numeric)
    for key in numeric:
        assert_gradient(key, dparams[key], numeric[key], loss_scale)
    if m.clip < np.inf:
        # The bound must have cut something, or the clip paths went untested.
        unclipped = type(m)(m.input_size, m.hidden_size, m.num_layers, bias=m.bias,
                            bidirectional=m.bidirectional, reverse=m.reverse,
                            dtype=m.dtype, **_family_options(m))
        unclipped.load_state_dict(m.state_dict())
        state0 = from_tuple(family, [arrays[s] for s in states])
        y_clip, _ = m(arrays["x"], state0, arrays["lengths"])
        y_free, _ = unclipped(arrays["x"], state0, arrays["lengths"])
        assert not np.allclose(y_clip, y_free)


def _family_options(m):
    if isinstance(m, fg.LSTM):
        return dict(peephole=m.peephole, input_forget=m.input_forget)
    return dict(reset_after=m.reset_after)


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_gradients(kind, bias):
    family = "lstm" if kind == "lstm" else "gru"
    kw = dict(bias=bias, dtype=np.float64, seed=11)
    if family == "lstm":
        cell = fg.LSTMCell(I, H, **kw)
    else:
        cell = fg.GRUCell(I, H, reset_after=kind == "gru", **kw)
    rng = np.random.default_rng([KINDS.index(kind), int(bias)])
    n_state = 2 if family == "lstm" else 1
    arrays = {"x": rng.standard_normal((B, I))}
    for k in range(n_state):
        arrays[f"s{k}"] = 0.5 * rng.standard_normal((B, H))
        arrays[f"ds{k}"] = rng.standard_normal((B, H))
    axes = {k: 0 for k in arrays}
    states = [f"s{k}" for k in range(n_state)]

    def per_sequence_loss(x, magnitude=np.asarray, **rest):
        out = cell(x, from_tuple(family, [rest[s] for s in states]))
        return sum(
            np.einsum("bh,bh->b", magnitude(o), magnitude(rest[f"d{s}"]))
            for o, s in zip(as_tuple(out), states)
        )

    loss_scale = per_sequence_loss(magnitude=np.abs, **arrays).sum()

    state0 = from_tuple(family, [arrays[s] for s in states])
    dout = from_tuple(family, [arrays[f"d{s}"] for s in states])
    _, pullback = cell.vjp(arrays["x"], state0)
    dx, dstate0, dparams = pullback(dout)

    assert_gradient("dx", dx, fd_batched(per_sequence_loss, arrays, axes, "x"), loss_scale)
    for s, analytic in zip(states, as_tuple(dstate0)):
        assert_gradient(f"d{s}", analytic, fd_batched(per_sequence_loss, arrays, axes, s), loss_scale)

    numeric = fd_params(cell, lambda: per_sequence_loss(**arrays).sum())
    expected_keys = {"weight_ih", "weight_hh"} | ({"bias_ih", "bias_hh"} if bias else set())
    assert set(numeric) == expected_keys
    assert dparams.keys() == numeric.keys()
    for key in numeric:
        assert_gradient(key, dparams[key], numeric[key], loss_scale)
