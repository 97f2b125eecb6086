"""The cell descriptions (fastgates.cells) and the driver that reads them."""

import ast
import inspect

import numpy as np
import pytest
from _bitwise import assert_bitwise

import fastgates as fg
from fastgates import _recurrent, cells

# Each cell's sequence layer and one-step class (None: it has none).
LAYERS = {"lstm": (fg.LSTM, fg.LSTMCell), "gru": (fg.GRU, fg.GRUCell), "janet": (fg.JANET, None),
          "mgu": (fg.MGU, None), "slstm": (fg.SLSTM, None), "mingru": (fg.MinGRU, None),
          "minlstm": (fg.MinLSTM, None)}


def test_registry_finds_every_cell_by_name():
    assert set(cells.REGISTRY) == set(LAYERS)
    for name, cell in cells.REGISTRY.items():
        assert cells.get(name) is cell and cell.name == name
    with pytest.raises(ValueError, match=r"unknown cell 'elman'; expected one of \['gru', 'janet'"):
        cells.get("elman")


@pytest.mark.parametrize("name", sorted(cells.REGISTRY))
def test_a_description_is_consistent_with_its_layers(name):
    cell = cells.get(name)
    assert cell.forget in cell.gates
    assert cell.states[0] == "h" and len(set(cell.states)) == len(cell.states)
    layer_cls, cell_cls = LAYERS[name]
    assert layer_cls._spec is cell and (cell_cls is None or cell_cls._spec is cell)
    assert fg.layers.layer_class(name) is layer_cls
    m = layer_cls(3, 5, 2, bidirectional=True, seed=0)
    assert m.weight_ih_l1_reverse.shape == (cell.rows(5), 10)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    # the state: one array per cell state (a bare array for one), as gates() shows them
    _, state = m(x)
    parts = state if isinstance(state, tuple) else (state,)
    assert len(parts) == len(cell.states) and all(p.shape == (4, 2, 5) for p in parts)
    assert set(m.gates(x)) == set(cell.gates) | set(cell.shown)


def test_the_driver_never_branches_on_a_cell_name():
    # What differs between cells lives in their modules (fastgates/cells/):
    # the driver reads the description it is handed.  No cell name as a
    # value, no kernel module imported.
    tree = ast.parse(inspect.getsource(_recurrent))
    names = {c.name for c in cells.REGISTRY.values()} | {c.label for c in cells.REGISTRY.values()}
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert not names & constants
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {None, "_linalg"}, imported


@pytest.mark.parametrize("name", sorted(cells.REGISTRY))
def test_memory_formula_counts_one_state_array_per_cell_state(name):
    # checkpointed: the kept states grow with the number of state arrays
    cell = cells.get(name)
    layer_cls, _ = LAYERS[name]
    m = layer_cls(4, 8, dtype=np.float64)
    T, B = 4096, 2
    every = 64
    kept = m.training_memory(T, B, checkpoint=every)["kept"]
    interval = _recurrent.checkpoint_interval(every, T, B)
    nseg = -(-T // interval)
    y = T * B * 8
    assert kept == 8 * (y + nseg * B * 8 * len(cell.states))


def test_weight_panels_of_replaced_parameters_are_reused_and_change_no_bit():
    # A training step after a parameter update makes the weight panels
    # again; those of the parameters replaced come back from the pool
    # (_linalg.release) once nothing holds them, a pullback of the old
    # parameters included, and every entry is written again.
    from fastgates import _linalg
    rng = np.random.default_rng(3)
    m = fg.GRU(64, 512, seed=0)                 # W_hh panels of 3 MB
    x = rng.standard_normal((6, 2, 64)).astype(np.float32)
    dy = rng.standard_normal((6, 2, 512)).astype(np.float32)
    sd = m.state_dict()
    sd2 = {k: v + np.float32(1e-3) for k, v in sd.items()}
    (_, _), held = m.vjp(x)                     # keeps the first parameters' panels
    m.load_state_dict(sd2)
    before = sum(len(v) for v in _linalg._pool.values())
    (_, _), pullback = m.vjp(x)
    got = pullback(dy)
    # the pullback of the first parameters still sees its own panels
    m_ref = fg.GRU(64, 512, seed=0)
    (_, _), ref_pullback = m_ref.vjp(x)
    assert_bitwise(held(dy), ref_pullback(dy))
    del held
    assert sum(len(v) for v in _linalg._pool.values()) > before
    del pullback                                # its panels go to the pool
    m.load_state_dict(sd)
    m.load_state_dict(sd2)
    pooled = sum(len(v) for v in _linalg._pool.values())
    (_, _), again = m.vjp(x)
    assert sum(len(v) for v in _linalg._pool.values()) < pooled      # reused
    assert_bitwise(again(dy), got)
    fresh = fg.GRU(64, 512, seed=0)
    fresh.load_state_dict(sd2)
    assert_bitwise(fresh.vjp(x)[1](dy), got)


@pytest.mark.parametrize("make", [lambda: fg.LSTM(3, 4, 2, bidirectional=True, peephole=True, seed=0),
                                  lambda: fg.GRU(3, 4, reset_after=False, seed=0),
                                  lambda: fg.LSTMCell(3, 4, seed=0)], ids=["lstm", "gru", "cell"])
def test_a_used_model_pickles_and_copies_without_its_derived_weights(make):
    # What the kernels derive from the parameters is a cache: a pickled or
    # copied model starts without it and gives the same bits.
    import copy
    import pickle
    m = make()
    x = np.random.default_rng(0).standard_normal(
        (5, 2, 3) if isinstance(m, fg.LSTM | fg.GRU) else (2, 3)).astype(np.float32)
    first = m(x)
    assert len(m._derived) > 0
    fresh = pickle.dumps(make())
    data = pickle.dumps(m)
    # no panels in the file (each is kilobytes; the used model has only
    # cached its parameter suffixes beside them)
    assert len(data) <= len(fresh) + 100
    for other in (pickle.loads(data), copy.deepcopy(m), copy.copy(m)):
        assert len(other._derived) == 0 or other._derived is m._derived
        assert_bitwise(other(x), first)
