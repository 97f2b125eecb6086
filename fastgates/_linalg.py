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
