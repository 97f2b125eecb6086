"""Compiled matrix products split across Numba's threads.

All BLAS calls in fastgates are single-threaded and made from compiled code;
the parallelism is Numba's alone.  A multi-threaded BLAS beside Numba's pool
oversubscribes the cores, and OpenBLAS threads keep spinning after a product,
stealing a core from the recurrence that follows (see :mod:`fastgates._config`).

Blocks are fixed by the problem size and the size of Numba's pool, never by the
thread count in force, so results do not depend on ``set_num_threads``.
"""

import numpy as np
from numba import prange, types
from numba.core.extending import overload
from numba.np.linalg import ensure_blas

from ._config import jit


@jit(parallel=True)
def matmul(a, b, bias, out, block_rows, nparts):
    """``out = a @ b + bias`` in fixed row blocks.

    ``a`` (M, K) C-contiguous, ``b`` (K, N) C- or F-contiguous, ``bias`` (N,)
    or empty for none, ``out`` (M, N) C-contiguous.  Rows are cut into
    blocks of ``block_rows`` counted from row 0, each block into ``nparts``
    near-equal parts, one BLAS call per part.  A row's result depends on the
    call that computes it, so the grid is what makes a product over a slice
    of whole blocks give the same bits as the product over all rows.  Tasks
    are ordered part-major, so that the threads share every block.
    """
    M = a.shape[0]
    N = out.shape[1]
    nblk = (M + block_rows - 1) // block_rows
    for task in prange(nblk * nparts):
        part = task // nblk
        j = task - part * nblk
        r0 = j * block_rows
        r1 = min(M, r0 + block_rows)
        size = (r1 - r0 + nparts - 1) // nparts
        p0 = r0 + part * size
        p1 = min(r1, p0 + size)
        if p0 >= p1:
            continue
        np.dot(a[p0:p1], b, out[p0:p1])
        if bias.shape[0] > 0:
            for r in range(p0, p1):
                for c in range(N):
                    out[r, c] += bias[c]


def _gemm_external(dtype):
    return types.ExternalFunction("numba_xxgemm", types.intc(
        types.char, types.char, types.char, types.intp, types.intp, types.intp,
        types.CPointer(dtype), types.CPointer(dtype), types.intp, types.CPointer(dtype),
        types.intp, types.CPointer(dtype), types.CPointer(dtype), types.intp))


def gemm_tn(a, b, out, beta):
    """``out = a.T @ b + beta * out`` by one BLAS call, views welcome.

    Compiled code calls the overload below; this body serves Python callers
    (``NUMBA_DISABLE_JIT=1``).
    """
    prod = a.T @ b
    out[...] = prod if beta == 0 else beta * out + prod


def gemm_nn(a, b, out, beta):
    """``out = a @ b + beta * out`` by one BLAS call, views welcome (see :func:`gemm_tn`)."""
    prod = a @ b
    out[...] = prod if beta == 0 else beta * out + prod


def _gemm_impl(a, b, out, transposed):
    """Numba's own BLAS entry (``numba_xxgemm``, SciPy's BLAS, as ``np.dot``).

    The operands may be views whose rows are strided (a slice of columns):
    BLAS takes the row stride as the leading dimension, so nothing is
    copied, and the result is written in place, with ``beta = 1`` adding
    to it.  Row-major ``out = a b`` is column-major ``out^T = b^T a^T``.
    """
    if a.dtype != b.dtype or a.dtype != out.dtype or a.dtype not in (types.float32, types.float64):
        return None
    ensure_blas()     # SciPy's BLAS, checked when compiling (importing it costs 0.12 s)
    gemm = _gemm_external(a.dtype)
    kind = ord("s" if a.dtype == types.float32 else "d")
    dtype = np.float32 if a.dtype == types.float32 else np.float64
    trans_a = ord("T" if transposed else "N")

    def call(a, b, out, beta):
        if transposed:
            K, M = a.shape
        else:
            M, K = a.shape
        N = b.shape[1]
        if M == 0 or N == 0:
            return
        item = a.itemsize
        if a.strides[1] != item or b.strides[1] != item or out.strides[1] != item:
            raise ValueError("gemm: rows must be contiguous")
        coef = np.empty(2, dtype=dtype)
        coef[0] = 1.0
        coef[1] = beta
        r = gemm(kind, ord("N"), trans_a, N, M, K, coef[0:].ctypes, b.ctypes,
                 b.strides[0] // item, a.ctypes, a.strides[0] // item, coef[1:].ctypes,
                 out.ctypes, out.strides[0] // item)
        if r < 0:
            raise RuntimeError("BLAS gemm failed")

    return call


@overload(gemm_tn, jit_options={"nogil": True})
def _gemm_tn(a, b, out, beta):
    return _gemm_impl(a, b, out, True)


@overload(gemm_nn, jit_options={"nogil": True})
def _gemm_nn(a, b, out, beta):
    return _gemm_impl(a, b, out, False)


@jit(parallel=True)
def matmul_tn(a, b, out, block_rows, nparts, descending, init):
    """``out (+)= a.T @ b``, added one row block at a time in a fixed order.

    ``a`` (M, P) and ``b`` (M, N) C-contiguous, ``out`` (P, N) C-contiguous.
    Rows are cut into blocks of ``block_rows`` from row 0; each block's
    product is added to ``out`` in turn (one BLAS call with ``beta = 1``),
    last block first when ``descending``.  With ``init`` the first block's
    product overwrites ``out`` (which may hold anything).  The rows of
    ``out`` are split into ``nparts`` parts, one per task, each running over
    all blocks on its columns of ``a`` in place.

    A sum over steps that arrive in pieces (gradient checkpointing) is then
    the same sum, bit for bit, as long as each piece is a run of whole
    blocks, the pieces come in the same order and ``nparts`` is the same.
    """
    M, P = a.shape
    nblk = (M + block_rows - 1) // block_rows
    psize = (P + nparts - 1) // nparts
    for part in prange(nparts):
        q0 = part * psize
        q1 = min(P, q0 + psize)
        if q0 >= q1:
            continue
        for jj in range(nblk):
            j = nblk - 1 - jj if descending else jj
            r0 = j * block_rows
            r1 = min(M, r0 + block_rows)
            gemm_tn(a[r0:r1, q0:q1], b[r0:r1], out[q0:q1], 0.0 if init and jj == 0 else 1.0)


@jit()
def colsum(a, out, block_rows, descending, init):
    """``out (+)= a.sum(axis=0)`` over the row blocks of :func:`matmul_tn`, in its order."""
    M, P = a.shape
    nblk = (M + block_rows - 1) // block_rows
    tmp = np.empty(P, dtype=out.dtype)
    for jj in range(nblk):
        j = nblk - 1 - jj if descending else jj
        r0 = j * block_rows
        r1 = min(M, r0 + block_rows)
        tmp[:] = a[r0]
        for r in range(r0 + 1, r1):
            for p in range(P):
                tmp[p] += a[r, p]
        if init and jj == 0:
            out[:] = tmp
        else:
            for p in range(P):
                out[p] += tmp[p]


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
def dot_blocked(a, wb, out):
    """``out = a @ W`` with ``W`` given as :func:`column_blocks` ``wb``.

    ``a`` (M, K) C-contiguous, ``out`` (M, N) C-contiguous.  Each block's
    product is written into its columns of ``out`` by one BLAS call (measured
    against ``np.dot`` into a scratch array then copied, single-threaded
    float32: (8, 64) x (64, 512) 6.7 -> 4.9 us, (32, 128) x (128, 512) 44 ->
    37 us, (8, 256) x (256, 1024) in 32 blocks 45 -> 42 us; float64 alike).
    """
    M, K = a.shape
    N = out.shape[1]
    bs = wb.shape[2]
    rows = max(1, SMALL_MNK // (K * bs))
    for p in range(wb.shape[0]):
        c0 = p * bs
        n = min(N, c0 + bs) - c0
        for r0 in range(0, M, rows):
            r1 = min(M, r0 + rows)
            gemm_nn(a[r0:r1], wb[p][:, :n], out[r0:r1, c0:c0 + n], 0.0)
