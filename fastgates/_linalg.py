"""Compiled matrix products split across Numba's threads.

All BLAS calls in fastgates are single-threaded and made from compiled code;
the parallelism is Numba's alone.  A multi-threaded BLAS beside Numba's pool
oversubscribes the cores, and OpenBLAS threads keep spinning after a product,
stealing a core from the recurrence that follows (see :mod:`fastgates._config`).

Blocks are fixed by the problem size and the size of Numba's pool, never by the
thread count in force, so results do not depend on ``set_num_threads``.
"""

import numpy as np
from numba import prange

from ._config import jit


@jit(parallel=True)
def matmul(a, b, bias, out, nblocks):
    """``out = a @ b + bias``, rows split into ``nblocks`` blocks.

    ``a`` (M, K) C-contiguous, ``b`` (K, N) C- or F-contiguous, ``bias`` (N,)
    or empty for none, ``out`` (M, N) C-contiguous.
    """
    M = a.shape[0]
    N = out.shape[1]
    block = max(1, (M + nblocks - 1) // nblocks)
    count = (M + block - 1) // block
    for k in prange(count):
        r0 = k * block
        r1 = min(M, r0 + block)
        np.dot(a[r0:r1], b, out[r0:r1])
        if bias.shape[0] > 0:
            for r in range(r0, r1):
                for j in range(N):
                    out[r, j] += bias[j]


@jit(parallel=True)
def matmul_tn(a, b, out, nblocks):
    """``out = a.T @ b``: partial products over row blocks, summed in order.

    ``a`` (M, P) and ``b`` (M, N) C-contiguous, ``out`` (P, N) C-contiguous.
    """
    M, P = a.shape
    N = b.shape[1]
    block = max(1, (M + nblocks - 1) // nblocks)
    count = (M + block - 1) // block
    parts = np.empty((count, P, N), dtype=out.dtype)
    for k in prange(count):
        r0 = k * block
        r1 = min(M, r0 + block)
        np.dot(a[r0:r1].T, b[r0:r1], parts[k])
    # A fixed summation order, split over the rows of the result.
    for p in prange(P):
        for j in range(N):
            out[p, j] = parts[0, p, j]
        for k in range(1, count):
            for j in range(N):
                out[p, j] += parts[k, p, j]


# Column blocks for the per-step recurrent products.  OpenBLAS repacks the
# right-hand operand of every GEMM call, which dominates a product of a few
# rows by a large weight matrix; below a size threshold it instead runs a
# small-matrix kernel without packing.  Cutting W into 32-column blocks keeps
# each call under that threshold.  Measured here, single-threaded float32:
# (8, 256) x (256, 1024) 35 -> 103 GFLOP/s, (8, 1024) x (1024, 4096)
# 17 -> 95, (32, 256) x (256, 1024) 70 -> 113; float64 32 -> 54, 17 -> 36.
# Weights of at most 2^16 entries are already small enough and stay whole:
# there the extra calls only cost (tiny LSTM (100, 1, 32, 64) inference
# 0.17 -> 0.36 ms in 32-column blocks; (8, 128) x (128, 512) 115 -> 101).
# The threshold is on the call's M * N * K (measured: at most 100^3 runs the
# small kernel, float32 (128, 512) M = 15 108 GFLOP/s, M = 16 55; (256, 32)
# M = 122 114, M = 123 83; float64 alike, but (128, 512) already slows at
# M = 15, 0.98e6), so the rows of a product are also cut, into groups of
# at most SMALL_MNK / (K * width) rows: 2^19, half the threshold, clear of
# its edge in both dtypes.
COL_BLOCK = 32
WHOLE_MAX_ENTRIES = 1 << 16
SMALL_MNK = 1 << 19


def column_blocks(w):
    """``w`` (K, N) as (nblk, K, width) column blocks, the last zero-padded.

    One block of width N for weights of at most ``WHOLE_MAX_ENTRIES``
    entries, else blocks of ``COL_BLOCK`` columns.
    """
    K, N = w.shape
    width = N if K * N <= WHOLE_MAX_ENTRIES else COL_BLOCK
    nblk = -(-N // width)
    out = np.zeros((K, nblk * width), dtype=w.dtype)
    out[:, :N] = w
    return np.ascontiguousarray(out.reshape(K, nblk, width).transpose(1, 0, 2))


@jit()
def dot_blocked(a, wb, scratch, out):
    """``out = a @ W`` with ``W`` given as :func:`column_blocks` ``wb``.

    ``a`` (M, K) C-contiguous, ``scratch`` (M, block width), ``out`` (M, N).
    """
    M, K = a.shape
    N = out.shape[1]
    bs = wb.shape[2]
    rows = max(1, SMALL_MNK // (K * bs))
    for p in range(wb.shape[0]):
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            np.dot(a[r0:r1], wb[p], scratch[r0:r1])
        c0 = p * bs
        n = min(N, c0 + bs) - c0
        for r in range(M):
            for j in range(n):
                out[r, c0 + j] = scratch[r, j]
