"""The compiled matrix products against NumPy."""

import numba
import numpy as np
import pytest
from numba import prange

import fastgates as fg
from _tolerances import assert_close
from fastgates import _linalg


def assert_product(out, a, w, bias=0.0):
    """``out`` is ``a @ w + bias`` within the rounding of a sum of K products.

    Bound: (K + 1) ulps of ``sum |a_k w_k| + |bias|`` (the model-level
    tolerances assume short sums, and single entries cancel).
    """
    K = a.shape[1]
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    exact = a64 @ w64 + bias
    scale = np.abs(a64) @ np.abs(w64) + np.abs(bias)
    assert np.all(np.abs(out - exact) <= (K + 1) * np.finfo(out.dtype).eps * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (3, 7, 32), (2, 64, 100), (4, 300, 300), (1, 257, 1000),
                                   (20, 128, 512), (7, 300, 300), (1, 64, 256), (1, 64, 192),
                                   (5, 1, 1)])
def test_dot_blocked_matches_numpy(dtype, M, K, N):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    wb = _linalg.column_blocks(w)
    P = _linalg.panel_width(dtype)
    assert wb.shape == (-(-N // P), K, P)
    out = np.full((M, N), np.nan, dtype=dtype)
    _linalg.dot_blocked(a, wb, out)
    assert_product(out, a, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N", [(1, 1), (5, 3), (37, 64), (40, 100), (64, 130), (300, 520),
                                 (1024, 1024)])
@pytest.mark.parametrize("order", ["C", "F", "strided"])
def test_column_blocks_are_the_columns_in_panels(dtype, K, N, order):
    # The layout dot_blocked reads: out[p, k, j] = w[k, p * P + j], zero
    # past the last column, whatever the order of w (weights come as W.T,
    # F-ordered) and whether the panels are split between threads (by
    # _fill_blocks; on one thread NumPy makes them).
    rng = np.random.default_rng(5)
    w = rng.standard_normal((K, N)).astype(dtype)
    if order == "F":
        w = np.asfortranarray(w)
    elif order == "strided":
        w = rng.standard_normal((K, 2 * N)).astype(dtype)[:, ::2]
    P = _linalg.panel_width(dtype)
    npanel = -(-N // P)
    padded = np.zeros((K, npanel * P), dtype)
    padded[:, :N] = w
    expected = padded.reshape(K, npanel, P).transpose(1, 0, 2)
    saved = w.copy()
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        fg.set_num_threads(threads)
        wb = _linalg.column_blocks(w)
        assert wb.flags.c_contiguous and wb.shape == (npanel, K, P)
        assert wb.tobytes() == np.ascontiguousarray(expected).tobytes()
    fg.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert w.tobytes() == saved.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [1, 40, 64, 96, 100, 128, 200, 300, 520])
def test_dot_blocked_rows_do_not_depend_on_the_other_rows(dtype, N):
    # One row alone and the same row among 2-9 others (4-row tiles and the
    # 1-3 rows left over) give the same bits, whichever tile widths the
    # widths N take (one row: 2-16 vectors; last panels at most half used:
    # the 2-vector tiles); a
    # product written into columns of a wider array leaves the other
    # columns alone.
    rng = np.random.default_rng(3)
    K = 37
    w = rng.standard_normal((K, N)).astype(dtype)
    wb = _linalg.column_blocks(w)
    a = rng.standard_normal((9, K)).astype(dtype)
    alone = np.empty((9, N), dtype)
    for r in range(9):
        _linalg.dot_blocked(a[r:r + 1], wb, alone[r:r + 1])
    for M in range(2, 10):
        wide = np.full((M, N + 7), np.nan, dtype)
        _linalg.dot_blocked(a[:M], wb, wide[:, 3:3 + N])
        assert wide[:, 3:3 + N].tobytes() == alone[:M].tobytes(), M
        assert np.isnan(wide[:, :3]).all() and np.isnan(wide[:, 3 + N:]).all()


def test_dot_blocked_refuses_what_it_cannot_compute():
    a = np.ones((2, 8))
    wb = _linalg.column_blocks(np.ones((8, 10)))
    with pytest.raises(ValueError, match="shapes"):
        _linalg.dot_blocked(a, wb, np.empty((2, 10 + wb.shape[0] * wb.shape[2])))
    with pytest.raises(ValueError, match="shapes"):
        _linalg.dot_blocked(np.ones((2, 9)), wb, np.empty((2, 10)))
    with pytest.raises(ValueError, match="contiguous"):
        _linalg.dot_blocked(np.ones((8, 2)).T, wb, np.empty((2, 10)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_rows,nparts", [(37, 1), (37, 2), (10, 1), (10, 3), (1, 2), (100, 4)])
def test_matmul_and_matmul_tn_match_numpy(dtype, block_rows, nparts):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 9)).astype(dtype)
    b = rng.standard_normal((9, 11)).astype(dtype)
    bias = rng.standard_normal(11).astype(dtype)
    out = np.full((37, 11), np.nan, dtype)
    _linalg.matmul(a, b.T.copy().T, bias, out, block_rows, nparts)     # F-ordered right operand
    assert_close(out, a.astype(np.float64) @ b + bias, dtype)
    c = rng.standard_normal((37, 5)).astype(dtype)
    for descending in (False, True):
        out_tn = np.full((9, 5), np.nan, dtype)
        _linalg.matmul_tn(a, c, out_tn, block_rows, nparts, descending, True)
        assert_close(out_tn, a.T.astype(np.float64) @ c, dtype)
        # init=False adds to what is there.
        _linalg.matmul_tn(a, c, out_tn, block_rows, nparts, descending, False)
        assert_close(out_tn, 2 * (a.T.astype(np.float64) @ c), dtype)
        sums = np.full(9, np.nan, dtype)
        _linalg.colsum(a, sums, block_rows, descending, True)
        assert_close(sums, a.astype(np.float64).sum(axis=0), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,G,I,block_rows", [(37, 9, 5, 10), (37, 9, 64, 10), (250, 13, 1100, 100),
                                              (300, 12, 70, 1024), (64, 4, 200, 7), (1, 3, 33, 5)])
def test_weight_grad_matches_numpy_and_adds_when_asked(dtype, M, G, I, block_rows):
    # The tiles of the weight gradients: rows of the result in tiles of 1-4,
    # whole panels of columns read in place and a partial one copied, several
    # passes per block when I is wide (1100 columns), several blocks.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((M, G)).astype(dtype)
    b = rng.standard_normal((M, I)).astype(dtype)
    for descending in (False, True):
        out = np.full((G, I), np.nan, dtype)
        _linalg.weight_grad(a, b, out, block_rows, 2, descending, True)
        assert_product(out, a.T, b)
        _linalg.weight_grad(a, b, out, block_rows, 2, descending, False)
        assert_product(out, np.hstack([a.T, a.T]), np.vstack([b, b]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_refuses_what_it_cannot_compute(dtype):
    a = np.ones((6, 8), dtype)
    with pytest.raises(ValueError, match="shapes"):
        _linalg.weight_grad(a, np.ones((6, 70), dtype), np.empty((8, 71), dtype), 4, 1, False, True)
    with pytest.raises(ValueError, match="shapes"):
        _linalg.weight_grad(a, np.ones((5, 70), dtype), np.empty((8, 70), dtype), 4, 1, False, True)
    with pytest.raises(ValueError, match="contiguous"):
        _linalg.weight_grad(a, np.ones((70, 6), dtype).T, np.empty((8, 70), dtype), 4, 1, False,
                            True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_product_takes_the_tiles_where_they_are_faster(dtype):
    # One whole panel of columns and a result of at most 4 MB: the tiles;
    # narrower (a partial panel copied at every pass) or larger: OpenBLAS.
    rng = np.random.default_rng(6)
    P = _linalg.panel_width(dtype)
    item = np.dtype(dtype).itemsize
    big = _linalg.WGRAD_TILE_MAX_BYTES // (item * P) + 4
    for G, I, engine in [(8, P, _linalg.weight_grad), (8, P - 1, _linalg.matmul_tn),
                         (big, P, _linalg.matmul_tn), (big - 8, P, _linalg.weight_grad)]:
        a = rng.standard_normal((50, G)).astype(dtype)
        b = rng.standard_normal((50, I)).astype(dtype)
        out = np.empty((G, I), dtype)
        ref = np.empty((G, I), dtype)
        _linalg.weight_product(a, b, out, 16, 2, True, True)
        engine(a, b, ref, 16, 2, True, True)
        assert out.tobytes() == ref.tobytes(), (G, I)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,G,I,H", [(100, 256, 32, 64), (37, 128, 8, 32), (45, 256, 70, 64),
                                     (20, 96, 3, 24)])
def test_products_side_by_side_give_the_bits_of_one_after_another(dtype, M, G, I, H):
    # Any sharing of the work between lanes, any split of dW_hh, either
    # engine: the bits of weight_product, project/matmul and colsum run one
    # after another, and both the overwriting and the adding form.
    rng = np.random.default_rng(8)
    dg = rng.standard_normal((M, G)).astype(dtype)
    x = rng.standard_normal((M, I)).astype(dtype)
    hp = rng.standard_normal((M, H)).astype(dtype)
    w_ih = rng.standard_normal((G, I)).astype(dtype)
    wb = _linalg.column_blocks(w_ih)
    empty = np.empty(0, dtype)
    for init in (True, False):
        start = [rng.standard_normal(shape).astype(dtype) for shape in ((G, I), (G, H), (G,))]
        ref = [a.copy() for a in start]
        ref_dx = np.empty((M, I), dtype)
        for nhh in (1, 2, 3):
            for lanes, tiles in ((1, (0, 0, 0)), (2, (1, 1, 1)), (3, (1, 0, 1)), (2, (0, 1, 0))):
                if tiles[0] and I < _linalg.panel_width(dtype) or tiles[1] and H < _linalg.panel_width(dtype):
                    continue
                ref = [a.copy() for a in start]
                (_linalg.weight_grad if tiles[0] else _linalg.matmul_tn)(dg, x, ref[0], 16, 1, True, init)
                (_linalg.weight_grad if tiles[1] else _linalg.matmul_tn)(dg, hp, ref[1], 16, nhh, True, init)
                _linalg.colsum(dg, ref[2], 16, True, init)
                if tiles[2]:
                    _linalg.project(dg, wb, empty, ref_dx)
                else:
                    _linalg.matmul(dg, w_ih, empty, ref_dx, 16, 1)
                pieces = [(_linalg.WORK_DW_IH, 0, 1, tiles[0]), (_linalg.WORK_DX, 0, 1, tiles[2]),
                          (_linalg.WORK_DB, 0, 1, 0)]
                pieces += [(_linalg.WORK_DW_HH, p, nhh, tiles[1]) for p in range(nhh)]
                work = np.array([(u % lanes,) + w for u, w in enumerate(pieces)], np.int64)
                out = [a.copy() for a in start]
                dx = np.full((M, I), np.nan, dtype)
                _linalg.products_side_by_side(dg, x, hp, w_ih, wb, out[0], out[1], out[2], dx, work,
                                              lanes, 16, True, init)
                for got, want in zip(out + [dx], ref + [ref_dx]):
                    assert got.tobytes() == want.tobytes(), (init, nhh, lanes, tiles)


@numba.njit(parallel=True)
def _hand_over(values):
    # Two tasks: the first to start writes values[s] = s + 1 step by step and
    # publishes the count; the other waits for each value and sums them.
    n = values.shape[0]
    progress = np.zeros(2, dtype=np.int64)
    roles = np.zeros(2, dtype=np.int64)
    total = np.zeros(1, dtype=np.int64)
    for lane in prange(2):
        role = _linalg.atomic_add(progress, 0, 1)
        roles[lane] = role
        if role == 0:
            for s in range(n):
                values[s] = s + 1
                _linalg.atomic_store(progress, 1, s + 1)
        else:
            for s in range(n):
                while _linalg.atomic_load(progress, 1) < s + 1:
                    pass
                total[0] += values[s]
    return total[0], roles


@pytest.mark.parametrize("threads", [1, 2])
def test_a_count_published_by_one_task_hands_its_writes_to_the_other(threads):
    # What lstm_backward_overlapped relies on: one task takes the first role
    # whatever the threads (on one thread the maker runs first, nobody
    # waits), and a value written before its count is published is seen by
    # the task that sees the count.
    saved = numba.get_num_threads()
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("needs a pool of two threads")
    numba.set_num_threads(threads)
    try:
        for _ in range(20):
            n = 200_000
            values = np.zeros(n, dtype=np.int64)       # zeros: a value read early is lost
            total, roles = _hand_over(values)
            assert total == n * (n + 1) // 2
            assert sorted(roles) == [0, 1]
    finally:
        numba.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("product_tn", ["matmul_tn", "weight_grad"])
def test_products_over_runs_of_whole_blocks_give_the_same_bits(dtype, product_tn):
    # What gradient checkpointing relies on: a product or a sum taken over
    # consecutive runs of whole blocks, in order, equals the one over all
    # rows bit for bit (the blocks, not the call, fix every rounding).  The
    # tiles' weight gradients are also the same bits whatever nparts.
    matmul_tn = getattr(_linalg, product_tn)
    rng = np.random.default_rng(2)
    M, K, N, rows = 1000, 48, 300, 64       # 15 blocks and a tail of 40 rows
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    c = rng.standard_normal((M, N)).astype(dtype)
    runs = [(0, 192), (192, 256), (256, 896), (896, M)]
    for nparts in (1, 2, 3):
        whole = np.empty((M, N), dtype)
        _linalg.matmul(a, b, np.empty(0, dtype), whole, rows, nparts)
        pieces = np.empty((M, N), dtype)
        for r0, r1 in runs:
            _linalg.matmul(a[r0:r1], b, np.empty(0, dtype), pieces[r0:r1], rows, nparts)
        assert whole.tobytes() == pieces.tobytes()
        for descending in (False, True):
            whole_tn = np.empty((K, N), dtype)
            matmul_tn(a, c, whole_tn, rows, nparts, descending, True)
            whole_sum = np.empty(N, dtype)
            _linalg.colsum(c, whole_sum, rows, descending, True)
            tn = np.empty((K, N), dtype)
            sums = np.empty(N, dtype)
            for i, (r0, r1) in enumerate(runs[::-1] if descending else runs):
                matmul_tn(a[r0:r1], c[r0:r1], tn, rows, nparts, descending, i == 0)
                _linalg.colsum(c[r0:r1], sums, rows, descending, i == 0)
            assert whole_tn.tobytes() == tn.tobytes()
            assert whole_sum.tobytes() == sums.tobytes()
            if product_tn == "weight_grad":
                one = np.empty((K, N), dtype)
                matmul_tn(a, c, one, rows, 1, descending, True)
                assert one.tobytes() == whole_tn.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_project_adds_the_bias_and_any_split_gives_the_same_bits(dtype):
    # The input projection: x W^T + b by the register tiles.  Rows are
    # independent sums, so however the rows are cut between threads (or into
    # checkpointed segments) the bits are the same.
    rng = np.random.default_rng(4)
    M, K, N = 203, 40, 150
    a = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype)
    wb = _linalg.column_blocks(w)
    out = np.full((M, N), np.nan, dtype)
    _linalg.project(a, wb, bias, out)
    assert_product(out, a, w, bias.astype(np.float64))
    no_bias = np.full((M, N), np.nan, dtype)
    _linalg.project(a, wb, np.empty(0, dtype), no_bias)
    assert_product(no_bias, a, w)
    for nparts in (1, 2, 3, 7):
        split = np.full((M, N), np.nan, dtype)
        _linalg.project_parallel(a, wb, bias, split, nparts)
        assert split.tobytes() == out.tobytes(), nparts
    pieces = np.full((M, N), np.nan, dtype)
    for r0, r1 in ((0, 1), (1, 64), (64, 203)):
        _linalg.project(a[r0:r1], wb, bias, pieces[r0:r1])
    assert pieces.tobytes() == out.tobytes()


def test_a_borrowed_array_is_the_same_data_without_its_owner():
    # What the LSTM's time loops rely on (_linalg.borrow): the same memory,
    # shape and strides (a strided view too), writes through a view of it
    # land in the original, and its views carry no owner (so making one
    # takes no reference), while views of the original do.
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def owner(typingctx, arr):
        def codegen(context, builder, sig, args):
            meminfo = context.make_array(sig.args[0])(context, builder, args[0]).meminfo
            return builder.ptrtoint(meminfo, context.get_value_type(types.intp))
        return types.intp(arr), codegen

    @njit
    def through(a):
        b = _linalg.borrow(a)
        for i in range(b.shape[0]):
            row = b[i]
            row[0] = 10.0 * i + row[1]
        return (b.shape[0], b.shape[1], b.strides[0], b.strides[1], b.ctypes.data,
                owner(b[0]), owner(a[0]))

    a = np.arange(24.0).reshape(6, 4)[::2, 1:]          # not contiguous
    want = 10.0 * np.arange(3) + a[:, 1]
    *layout, borrowed_owner, own_owner = through(a)
    assert tuple(layout) == (*a.shape, *a.strides, a.ctypes.data)
    np.testing.assert_array_equal(a[:, 0], want)
    assert borrowed_owner == 0 and own_owner != 0
