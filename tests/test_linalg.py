"""The compiled matrix products against NumPy."""

import numpy as np
import pytest

from _tolerances import assert_close
from fastgates import _linalg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", [(1, 5, 3), (3, 7, 32), (2, 64, 100), (4, 300, 300), (2, 257, 1000),
                                   (20, 128, 512), (70, 300, 300)])  # row groups too
def test_dot_blocked_matches_numpy(dtype, M, K, N):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(dtype)
    w = rng.standard_normal((K, N)).astype(dtype)
    wb = _linalg.column_blocks(w)
    width = N if K * N <= _linalg.WHOLE_MAX_ENTRIES else _linalg.COL_BLOCK
    assert wb.shape == (-(-N // width), K, width)
    out = np.full((M, N), np.nan, dtype=dtype)
    _linalg.dot_blocked(a, wb, np.empty((M, wb.shape[2]), dtype), out)
    # A sum of K rounded products: bound the error by K ulps of sum |a_k w_k|
    # (the model-level tolerances assume short sums).
    exact = a.astype(np.float64) @ w.astype(np.float64)
    bound = K * np.finfo(dtype).eps * (np.abs(a).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nblocks", [1, 2, 3])
def test_matmul_and_matmul_tn_match_numpy(dtype, nblocks):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 9)).astype(dtype)
    b = rng.standard_normal((9, 11)).astype(dtype)
    bias = rng.standard_normal(11).astype(dtype)
    out = np.empty((37, 11), dtype)
    _linalg.matmul(a, b.T.copy().T, bias, out, nblocks)     # F-ordered right operand
    assert_close(out, a.astype(np.float64) @ b + bias, dtype)
    c = rng.standard_normal((37, 5)).astype(dtype)
    out_tn = np.empty((9, 5), dtype)
    _linalg.matmul_tn(a, c, out_tn, nblocks)
    assert_close(out_tn, a.T.astype(np.float64) @ c, dtype)
