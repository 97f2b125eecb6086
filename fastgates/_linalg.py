"""Compiled matrix products split across Numba's threads.

Two engines.  Register tiles written here in LLVM IR make the per-step
recurrent products (forward and backward), the input projection
(:func:`dot_blocked`, :func:`project`) and, at the shapes where they are
faster, the backward pass's products over time: ``dx`` (``project`` again)
and the weight gradients (:func:`weight_grad`).  OpenBLAS makes the rest
(:func:`matmul`, :func:`matmul_tn`): inputs narrower than a panel of the
tiles and weight gradients too large for the caches (:func:`weight_product`
chooses by shape).

All BLAS calls in fastgates are single-threaded and made from compiled code;
the parallelism is Numba's alone.  A multi-threaded BLAS beside Numba's pool
oversubscribes the cores, and OpenBLAS threads keep spinning after a product,
stealing a core from the recurrence that follows (see :mod:`fastgates._config`).

Blocks are fixed by the problem size and the size of Numba's pool, never by the
thread count in force, so results do not depend on ``set_num_threads``.
"""

import platform
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload
from numba.np.linalg import ensure_blas

from . import _config
from ._config import jit


@jit()
def _rows_contiguous(a):
    """Whether the rows of 2-d ``a`` are contiguous (any stride when one column).

    NumPy leaves the stride of a length-1 axis free in a contiguous array
    (an input of one feature, ``x[:, :, None]``), so it is not looked at.
    """
    return a.shape[1] <= 1 or a.strides[1] == a.itemsize


# Kernels copy arrays with these loops, never with a slice assignment from
# an array (``h[:] = h0[b0:b1]``): Numba checks the two shapes at run time
# and compiles, for the error it would raise, a string formatter (str of
# ints, join, concatenation: ~40 functions) that every kernel then links
# and optimises again.  Measured: the first forward of an LSTM compiled 87
# functions in 16.4 s with them, 45 in 12.0 s without.  The loops are also
# faster for the short vectors of a step (no overlap check).


@jit()
def copy_vector(dst, src):
    """``dst[:] = src`` for vectors of one length, not overlapping."""
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@jit()
def copy_rows(dst, src):
    """``dst[:] = src`` for 2-d arrays of one shape, not overlapping."""
    for r in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[r, j] = src[r, j]


@jit()
def _add_bias(out, bias):
    """``out += bias`` row by row: ``out`` (M, N), ``bias`` (N,)."""
    N = out.shape[1]
    for r in range(out.shape[0]):
        for c in range(N):
            out[r, c] += bias[c]


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
            _add_bias(out[p0:p1], bias)


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
    P = a.shape[1]
    psize = (P + nparts - 1) // nparts
    for part in prange(nparts):
        q0 = part * psize
        q1 = min(P, q0 + psize)
        if q0 < q1:
            _matmul_tn_part(a, b, out, q0, q1, block_rows, descending, init)


@jit()
def _matmul_tn_part(a, b, out, q0, q1, block_rows, descending, init):
    """Rows ``q0:q1`` of :func:`matmul_tn`'s ``out``."""
    M = a.shape[0]
    nblk = (M + block_rows - 1) // block_rows
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
        copy_vector(tmp, a[r0])
        for r in range(r0 + 1, r1):
            for p in range(P):
                tmp[p] += a[r, p]
        if init and jj == 0:
            copy_vector(out, tmp)
        else:
            for p in range(P):
                out[p] += tmp[p]


# The per-step recurrent products: a few rows (a batch chunk, 1 at B = 1) times
# the whole recurrent weight matrix, at every step.  They are made by a
# register-blocked kernel written in LLVM IR (:func:`_tile_function`): a tile
# of MR rows by NV vectors of the result is held in vector registers while the
# loop runs over K, one fused multiply-add per element and term, in the order
# k = 0, 1, ...  Numba code cannot keep such accumulators in registers (LLVM
# leaves them in memory: 16-54 GFLOP/s); OpenBLAS, called per step, repacks
# the weights at every call unless the call is small, and pays its dispatch
# at every call.  Measured here, single-threaded, GFLOP/s (OpenBLAS small-
# matrix kernel on 32-column blocks -> these tiles): float32 (8, 256) x
# (256, 1024) 102 -> 115, (16, 1024) x (1024, 4096) 95 -> 107, (8, 64) x
# (64, 512) 111 -> 115; float64 (8, 128) x (128, 512) 55 -> 58; one row,
# float32 (1, 64) x (64, 256) 0.90 -> 0.62 us, (1, 128) x (128, 512) 4.5 ->
# 2.4 us.  The results were the same bits as OpenBLAS's small-matrix kernel
# at every shape measured (it also sums over k in order with one FMA each).
#
# The weights are laid out in panels of VECS_PER_PANEL vectors of columns,
# (npanel, K, P), each contiguous and read front to back, the last panel
# zero-padded; a tile may span several adjacent panels.
VECS_PER_PANEL = 4
_PANEL_BYTES = VECS_PER_PANEL * 64
_I64 = ir.IntType(64)


def lanes(dtype):
    """Values per 512-bit vector: 16 float32, 8 float64."""
    return 64 // np.dtype(dtype).itemsize


def panel_width(dtype):
    """Columns per panel of :func:`column_blocks`."""
    return VECS_PER_PANEL * lanes(dtype)


def column_blocks(w):
    """``w`` (K, N) as (npanel, K, P) column panels, the last zero-padded.

    ``P = panel_width(w.dtype)``; the layout :func:`dot_blocked` reads.
    ``w`` may be C- or F-ordered (``W.T`` of a stored weight).  Made in one
    pass: by NumPy's strided copy on one thread, by :func:`_fill_blocks`
    with the panels split between threads when there are enough of them (a
    training step on new weights, every optimiser step, makes four such
    arrays per layer-direction; a first way by NumPy, zero, copy,
    transpose, three passes, took ~35 ms for a 16 MB weight here).
    """
    K, N = w.shape
    P = panel_width(w.dtype)
    npanel = -(-N // P)
    out = pooled_empty((npanel, K, P), w.dtype)
    nparts = min(npanel, _config.call_threads())
    if w.size * w.itemsize >= BLOCKS_SPLIT_BYTES and nparts > 1:
        # An F-ordered w goes in as the C-ordered array it is the transpose
        # of: one compiled layout instead of two (0.25 s of a first call).
        transposed = w.flags.f_contiguous and not w.flags.c_contiguous
        # Read-only whatever w is (a parameter is, a derived weight is not):
        # Numba types the two apart and would compile _fill_blocks for both.
        src = (w.T if transposed else w).view()
        src.flags.writeable = False
        _config.kernel_threads(nparts)
        _fill_blocks_parallel(src, transposed, out, nparts)
        return out
    # On one thread NumPy's strided copy is as fast (measured against
    # _fill_blocks, median of 7, 64x256 to 2048x2048, both dtypes, C and F
    # order: NumPy / compiled 0.4-1.1) and compiles nothing (0.4 s of every
    # cell's first call).
    full = N // P
    out[:full] = w[:, :full * P].reshape(K, full, P).transpose(1, 0, 2)
    if full < npanel:
        out[full, :, :N - full * P] = w[:, full * P:]
        out[full, :, N - full * P:] = 0
    return out


# Weights of at least this many bytes are laid out in panels on all the
# call's threads (below, waking a second thread costs more than it saves).
BLOCKS_SPLIT_BYTES = 1 << 20


# -- reuse of large panels ------------------------------------------------------
#
# A training step after a parameter update makes every panel of every
# weight again (column_blocks).  Allocated anew, a large array is fresh
# memory: glibc maps it from the system and every page is faulted in and
# zeroed on first touch, and freeing the old panels at the update handed
# theirs back.  Measured at (25, 16, 1024, 1024), float32 GRU, 2 threads:
# 78 ms a step on unchanged weights, 190-219 ms after each weight load, of
# which 18 ms is making the six 12 MB panels.  So the panels of a model's
# derived weights that nobody holds any more come back here when the model
# drops them (_recurrent.Derived) and the next panels of the same shape
# reuse them: every entry is written again, so no value carries over.
# Only arrays of at least POOL_MIN_BYTES (smaller ones come from malloc's
# own free lists), at most POOL_MAX_BYTES in all.

POOL_MIN_BYTES = 1 << 20
POOL_MAX_BYTES = 1 << 28
_pool = {}              # (shape, dtype char) -> list of arrays
_pool_bytes = 0
_pool_lock = threading.Lock()


def pooled_empty(shape, dtype):
    """``np.empty(shape, dtype)``, from the pool of released panels when it holds one."""
    dtype = np.dtype(dtype)
    key = (shape, dtype.char)
    global _pool_bytes
    with _pool_lock:
        arrays = _pool.get(key)
        if arrays:
            out = arrays.pop()
            _pool_bytes -= out.nbytes
            return out
    return np.empty(shape, dtype)


def release(arrays):
    """Give large arrays that nothing else holds to the pool (see :func:`pooled_empty`).

    Each array is taken only if it owns its memory, is C-contiguous, has
    at least POOL_MIN_BYTES, no other reference than the caller's
    (``refs`` of them: a view of it, or any other holder, keeps it out)
    and fits under POOL_MAX_BYTES.
    """
    global _pool_bytes
    with _pool_lock:
        for a, refs in arrays:
            if (a.nbytes < POOL_MIN_BYTES or not a.flags.owndata or not a.flags.c_contiguous
                    or sys.getrefcount(a) > refs or _pool_bytes + a.nbytes > POOL_MAX_BYTES):
                continue
            a.flags.writeable = True
            _pool.setdefault((a.shape, a.dtype.char), []).append(a)
            _pool_bytes += a.nbytes


@jit()
def _fill_blocks(src, transposed, out, p0, p1):
    """Panels ``p0:p1`` of :func:`column_blocks`: ``out[p, k, j] = w[k, p * P + j]``, 0 past ``N``.

    ``w`` is ``src``, or ``src.T`` when ``transposed``.  Reads along the
    contiguous axis of ``w``: its rows when they are, else a tile of 16
    rows at a time by columns.
    """
    K = src.shape[1] if transposed else src.shape[0]
    N = src.shape[0] if transposed else src.shape[1]
    P = out.shape[2]
    by_rows = not transposed and src.strides[1] <= src.strides[0]
    for p in range(p0, p1):
        c0 = p * P
        nc = min(P, N - c0)
        if by_rows:
            for k in range(K):
                for j in range(nc):
                    out[p, k, j] = src[k, c0 + j]
                for j in range(nc, P):
                    out[p, k, j] = 0.0
        else:
            for k0 in range(0, K, 16):
                k1 = min(K, k0 + 16)
                for j in range(nc):
                    if transposed:
                        for k in range(k0, k1):
                            out[p, k, j] = src[c0 + j, k]
                    else:
                        for k in range(k0, k1):
                            out[p, k, j] = src[k, c0 + j]
                for k in range(k0, k1):
                    for j in range(nc, P):
                        out[p, k, j] = 0.0


@jit(parallel=True)
def _fill_blocks_parallel(src, transposed, out, nparts):
    """:func:`_fill_blocks` with the panels cut into ``nparts`` parts, one task each."""
    npanel = out.shape[0]
    size = -(-npanel // nparts)
    for part in prange(nparts):
        _fill_blocks(src, transposed, out, part * size, min(npanel, (part + 1) * size))


def _tile_function(module, fty, L, MR, NV, acc=False, kstride=False):
    """The LLVM function computing one MR x (NV * L) tile of ``a @ w``.

    ``void tile(a, lda, ka, K, w, ldw, pstride, out, ldo, ncols)`` (pointers
    to the element type, the rest i64): ``out[r, j] = sum_k a[r, k] * w[k, j]``
    for ``r < MR`` and ``j < min(ncols, NV * L)``, where ``a[r, k]`` is at
    ``a + r * lda + k * ka`` (``ka`` is 1 unless ``kstride``) and vector ``v``
    of a row of ``w`` starts at ``w + (v // VECS_PER_PANEL) * pstride + k *
    ldw + (v % VECS_PER_PANEL) * L``.  Accumulators are phi nodes
    (registers), one ``llvm.fma`` per vector and term; columns past ``ncols``
    are computed but not stored.  With ``acc`` the tile's sums are added to
    ``out`` (``out += a @ w``), which reads whole vectors: ``out`` must
    have room for ``NV * L`` columns.
    """
    name = f"fastgates_tile_{fty}_{MR}x{NV}{'_acc' if acc else ''}{'_ka' if kstride else ''}"
    try:
        return module.get_global(name)
    except KeyError:
        pass
    vty = ir.VectorType(fty, L)
    pty = fty.as_pointer()
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [pty, _I64, _I64, _I64, pty, _I64,
                                                               _I64, pty, _I64, _I64]), name)
    fn.linkage = "internal"
    if MR == 1 and not acc:
        # Called, not inlined: with all eight one-row widths inlined into
        # dot_blocked, float32 (1, 64) x (64, 256) ran 3-5% slower a step
        # than with the four it had before; called, as fast (measured).  The
        # multi-row tiles stay inlined: called, float64 (1600, 64) x (64,
        # 512) took 11-16% longer.
        fn.attributes.add("noinline")
    a, lda, ka, K, w, ldw, pstride, out, ldo, ncols = fn.args
    for ptr in (a, w, out):
        ptr.add_attribute("noalias")
    entry = fn.append_basic_block("entry")
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("done")
    whole = fn.append_basic_block("whole")
    part = fn.append_basic_block("part")
    b = ir.IRBuilder(entry)
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(vty, [vty, vty, vty]),
                                         f"llvm.fma.v{L}{'f32' if L == 16 else 'f64'}")
    align = 64 // L
    const = lambda v: ir.Constant(_I64, v)                          # noqa: E731
    if not kstride:
        ka = const(1)

    def vec(base, r, v):
        row = b.gep(base, [b.mul(const(r), ldo)])
        return b.bitcast(b.gep(row, [const(v * L)]), vty.as_pointer())

    buf = b.alloca(fty, size=const(MR * NV * L))                    # partial tiles only
    init = [[ir.Constant(vty, None)] * NV for _ in range(MR)]
    b.cbranch(b.icmp_signed(">", K, const(0)), loop, done)

    b.position_at_end(loop)
    k = b.phi(_I64)
    k.add_incoming(const(0), entry)
    accs = [[b.phi(vty) for _ in range(NV)] for _ in range(MR)]
    for r in range(MR):
        for v in range(NV):
            accs[r][v].add_incoming(init[r][v], entry)
    wk = b.gep(w, [b.mul(k, ldw)])
    ak = b.gep(a, [b.mul(k, ka)])
    wv = []
    for v in range(NV):
        off = b.add(b.mul(const(v // VECS_PER_PANEL), pstride), const(v % VECS_PER_PANEL * L))
        wv.append(b.load(b.bitcast(b.gep(wk, [off]), vty.as_pointer()), align=align))
    new = []
    for r in range(MR):
        ark = b.load(b.gep(ak, [b.mul(const(r), lda)]))
        splat = b.insert_element(ir.Constant(vty, ir.Undefined), ark, ir.Constant(ir.IntType(32), 0))
        splat = b.shuffle_vector(splat, ir.Constant(vty, ir.Undefined),
                                 ir.Constant(ir.VectorType(ir.IntType(32), L), None))
        new.append([b.call(fma, [splat, wv[v], accs[r][v]]) for v in range(NV)])
    k1 = b.add(k, const(1))
    k.add_incoming(k1, loop)
    for r in range(MR):
        for v in range(NV):
            accs[r][v].add_incoming(new[r][v], loop)
    b.cbranch(b.icmp_signed("<", k1, K), loop, done)

    b.position_at_end(done)
    final = []
    for r in range(MR):
        for v in range(NV):
            ph = b.phi(vty)
            ph.add_incoming(init[r][v], entry)
            ph.add_incoming(new[r][v], loop)
            final.append(ph)
    if acc:
        final = [b.fadd(b.load(vec(out, i // NV, i % NV), align=align), val)
                 for i, val in enumerate(final)]
    b.cbranch(b.icmp_signed(">=", ncols, const(NV * L)), whole, part)

    b.position_at_end(whole)
    for r in range(MR):
        for v in range(NV):
            b.store(final[r * NV + v], vec(out, r, v), align=align)
    b.ret_void()

    b.position_at_end(part)
    for i, val in enumerate(final):
        b.store(val, b.bitcast(b.gep(buf, [const(i * L)]), vty.as_pointer()), align=align)
    for r in range(MR):
        orow = b.gep(out, [b.mul(const(r), ldo)])
        with cgutils.for_range(b, ncols) as j:
            b.store(b.load(b.gep(buf, [b.add(const(r * NV * L), j.index)])), b.gep(orow, [j.index]))
    b.ret_void()
    return fn


def _make_tile(MR, NV, acc=False, kstride=False):
    """An intrinsic ``tile(a, aoff, lda, K, w, woff, ldw, pstride, out, ooff, ldo, ncols)``.

    Offsets and strides in elements; calls :func:`_tile_function` for the
    arrays' dtype.  With ``kstride`` it takes ``ka``, the step of ``a``
    along ``k``, after ``lda``.
    """
    def typer(a, ints, w, out):
        if not all(isinstance(x, types.Array) for x in (a, w, out)):
            return False
        if not (a.dtype == w.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
            return False
        return all(isinstance(x, types.Integer) for x in ints)

    def codegen(context, builder, sig, args):
        a_, aoff_, lda_ = args[:3]
        rest = args[3:]
        ka_ = rest[0] if kstride else ir.Constant(_I64, 1)
        K_, w_, woff_, ldw_, ps_, out_, ooff_, ldo_, nc_ = rest[1:] if kstride else rest
        nk = 1 if kstride else 0
        dtype = sig.args[0].dtype
        fn = _tile_function(builder.module, context.get_value_type(dtype),
                            16 if dtype == types.float32 else 8, MR, NV, acc, kstride)

        def ptr(aty, arr, off):
            data = context.make_array(aty)(context, builder, arr).data
            return builder.gep(data, [off])

        builder.call(fn, [ptr(sig.args[0], a_, aoff_), lda_, ka_, K_,
                          ptr(sig.args[4 + nk], w_, woff_), ldw_, ps_,
                          ptr(sig.args[8 + nk], out_, ooff_), ldo_, nc_])
        return context.get_dummy_value()

    i = types.intp
    if kstride:
        @intrinsic
        def tile(typingctx, a, aoff, lda, ka, K, w, woff, ldw, pstride, out, ooff, ldo, ncols):
            if not typer(a, (aoff, lda, ka, K, woff, ldw, pstride, ooff, ldo, ncols), w, out):
                return None
            return types.void(a, i, i, i, i, w, i, i, i, out, i, i, i), codegen
    else:
        @intrinsic
        def tile(typingctx, a, aoff, lda, K, w, woff, ldw, pstride, out, ooff, ldo, ncols):
            if not typer(a, (aoff, lda, K, woff, ldw, pstride, ooff, ldo, ncols), w, out):
                return None
            return types.void(a, i, i, i, w, i, i, i, out, i, i, i), codegen

    return tile


# Tiles: 4 rows x 4 vectors (16 accumulators, one panel) and, for the last
# rows of a product, 1-3 rows; a single row takes up to 16 vectors (4 panels)
# at once.  One row is bound by reading the weights from the L2 cache (64 KB
# of float32 (64, 256) in 0.62 us, about 100 GB/s; software prefetching and
# visiting the panels in alternating order every other step, so that the
# last ones read are still in L1, measured no faster inside the recurrence).
# A last panel with at most half its columns in use takes the 2-vector tiles,
# and a single row only as many vectors (rounded up to even) as it needs:
# float32 (1, 128) x (128, 32), the backward product of an LSTM with H = 32
# at B = 1, 0.31 -> 0.15 us (the 4-vector tile read twice the weights it
# used).  Each column's sum is the same either way.
_tile_4x4 = _make_tile(4, 4)
_tile_3x4 = _make_tile(3, 4)
_tile_2x4 = _make_tile(2, 4)
_tile_1x4 = _make_tile(1, 4)
_tile_4x2 = _make_tile(4, 2)
_tile_3x2 = _make_tile(3, 2)
_tile_2x2 = _make_tile(2, 2)
_tile_1x2 = _make_tile(1, 2)
_tile_1x6 = _make_tile(1, 6)
_tile_1x8 = _make_tile(1, 8)
_tile_1x10 = _make_tile(1, 10)
_tile_1x12 = _make_tile(1, 12)
_tile_1x14 = _make_tile(1, 14)
_tile_1x16 = _make_tile(1, 16)


# Rows per pass over the panels in a long product: about 256 KB of ``a``, so
# that it stays in the L2 cache while every panel reads it (measured float32
# (400, 1024) x (1024, 4096): 64 rows 106 GFLOP/s, all rows at once far less).
_PASS_BYTES = 1 << 18


@jit()
def dot_blocked(a, wb, out):
    """``out = a @ W`` with ``W`` given as :func:`column_blocks` ``wb``.

    ``a`` (M, K) and ``out`` (M, N) with contiguous rows, not overlapping,
    ``N`` at most the panels' width.  A row of the result is the same
    whatever ``M`` (each element is its own sum over ``k`` in order).
    """
    M, K = a.shape
    N = out.shape[1]
    npanel, _, P = wb.shape
    item = a.itemsize
    if not (_rows_contiguous(a) and _rows_contiguous(out)):
        raise ValueError("dot_blocked: rows must be contiguous")
    if wb.shape[1] != K or N > npanel * P or out.shape[0] != M:
        raise ValueError("dot_blocked: shapes do not match")
    lda = a.strides[0] // item
    ldo = out.strides[0] // item
    ps = K * P
    if M == 1:
        L = P // VECS_PER_PANEL
        for j in range((npanel + 3) // 4):
            p = 4 * j
            c0 = p * P
            wo = p * ps
            nc = N - c0                     # columns left; the narrowest tile that holds them
            if nc > 14 * L:
                _tile_1x16(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 12 * L:
                _tile_1x14(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 10 * L:
                _tile_1x12(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 8 * L:
                _tile_1x10(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 6 * L:
                _tile_1x8(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 4 * L:
                _tile_1x6(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            elif nc > 2 * L:
                _tile_1x4(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
            else:
                _tile_1x2(a, 0, lda, K, wb, wo, P, ps, out, c0, ldo, nc)
        return
    rows = max(4, _PASS_BYTES // (K * item) // 4 * 4)
    for q0 in range(0, M, rows):
        q1 = min(M, q0 + rows)
        for p in range(npanel):
            c0 = p * P
            half = N - c0 <= P // 2
            r0 = q0
            while r0 < q1:
                n = min(q1 - r0, 4)
                ao = r0 * lda
                oo = r0 * ldo + c0
                if half:
                    _rows_tile_half(n, a, ao, lda, K, wb, p * ps, P, ps, out, oo, ldo, N - c0)
                elif n == 4:
                    _tile_4x4(a, ao, lda, K, wb, p * ps, P, ps, out, oo, ldo, N - c0)
                elif n == 3:
                    _tile_3x4(a, ao, lda, K, wb, p * ps, P, ps, out, oo, ldo, N - c0)
                elif n == 2:
                    _tile_2x4(a, ao, lda, K, wb, p * ps, P, ps, out, oo, ldo, N - c0)
                else:
                    _tile_1x4(a, ao, lda, K, wb, p * ps, P, ps, out, oo, ldo, N - c0)
                r0 += n


@jit()
def _rows_tile_half(n, a, ao, lda, K, wb, wo, P, ps, out, oo, ldo, ncols):
    """``n`` <= 4 rows by the first two vectors of a panel (see :func:`dot_blocked`)."""
    if n == 4:
        _tile_4x2(a, ao, lda, K, wb, wo, P, ps, out, oo, ldo, ncols)
    elif n == 3:
        _tile_3x2(a, ao, lda, K, wb, wo, P, ps, out, oo, ldo, ncols)
    elif n == 2:
        _tile_2x2(a, ao, lda, K, wb, wo, P, ps, out, oo, ldo, ncols)
    else:
        _tile_1x2(a, ao, lda, K, wb, wo, P, ps, out, oo, ldo, ncols)


@jit()
def project(a, wb, bias, out):
    """``out = a @ W + bias`` on one thread, ``W`` as :func:`column_blocks` ``wb``.

    ``bias`` (N,) or empty for none; see :func:`dot_blocked`.  The input
    projection of a layer: no BLAS, and every row of the result is the same
    bits however the rows are split.
    """
    dot_blocked(a, wb, out)
    if bias.shape[0] > 0:
        _add_bias(out, bias)


@jit(inline=True)
def project_steps(x, s, reverse, b0, b1, wb, bias, out):
    """The input projection of the next block of steps of one batch chunk.

    ``x`` (T, B, I) is a layer's input; the block is the next
    ``out.shape[0]`` steps (fewer at the end) in the order a recurrence
    reads them from its ``s``-th step (``T - 1 - s`` back when
    ``reverse``), rows ``b0:b1``.  ``out`` (block, b1 - b0, N) receives
    them in time order; returns the first step of the block, in time.  A
    chunk that is the whole batch projects the block in one call.

    :func:`project`, written out, and inlined into the time loops that
    call it: two levels less for Numba to compile and LLVM to optimise
    again (each compiled level re-optimises all it links in; a first
    forward call compiled 0.45 s less, LSTM and GRU).
    """
    T, B, I = x.shape
    N = out.shape[2]
    n = min(out.shape[0], T - s)
    t_lo = T - s - n if reverse else s
    if b1 - b0 == B:
        block = out[:n].reshape(n * B, N)
        dot_blocked(x[t_lo:t_lo + n].reshape(n * B, I), wb, block)
        if bias.shape[0] > 0:
            _add_bias(block, bias)
    else:
        for q in range(n):
            dot_blocked(x[t_lo + q, b0:b1], wb, out[q])
            if bias.shape[0] > 0:
                _add_bias(out[q], bias)
    return t_lo


@jit(parallel=True)
def project_parallel(a, wb, bias, out, nparts):
    """:func:`project` with the rows cut into ``nparts`` parts, one task each."""
    M = a.shape[0]
    size = -(-M // nparts)
    for part in prange(nparts):
        r0 = part * size
        r1 = min(M, r0 + size)
        if r0 < r1:
            project(a[r0:r1], wb, bias, out[r0:r1])


# Weight gradients ``dW = dG^T X`` summed over the steps: the same register
# tiles, with the roles of the operands chosen so that nothing large is
# copied.  A tile of rows of ``dW`` (columns of ``dG``) broadcasts four
# values of one row of ``dG`` per step, read in place (``ka``, the step
# along ``k``, is dG's row stride); the vectors come from ``X`` in place, a
# panel of its columns at a time.  The sum over ``k`` is taken in passes of
# about 256 KB of ``X`` (so that the rows of ``X`` a tile reads stay in the
# L2 cache for the next tiles), each pass's sums added to ``dW`` as OpenBLAS
# adds its K blocks: the rounding error is then OpenBLAS's (measured float32
# (2400, 1024)^T x (2400, 256): max error against float64 7.8e-5 here,
# 1.2e-4 OpenBLAS), not that of one chain of 2400 FMAs (4.8e-4).
# Single-threaded, GFLOP/s (OpenBLAS gemm with beta = 1 per block of 1024
# rows -> tiles): float32 (2400, 1024)^T x (2400, 256) 88 -> 108,
# (6400, 512)^T x (6400, 128) 72 -> 106, (3200, 2048)^T x (3200, 512) 97 ->
# 99, float64 44 -> 54, 36 -> 54; two threads float32 182 -> 219, 152 -> 214.
# Once ``dW`` outgrows the caches the passes cost a trip to memory for it
# each: (400, 4096)^T x (400, 1024) 100 -> 70 float32.  There OpenBLAS
# (:func:`matmul_tn`) stays in use (:func:`weight_product`).
_wtile_4 = _make_tile(4, 4, acc=True, kstride=True)
_wtile_3 = _make_tile(3, 4, acc=True, kstride=True)
_wtile_2 = _make_tile(2, 4, acc=True, kstride=True)
_wtile_1 = _make_tile(1, 4, acc=True, kstride=True)

WGRAD_TILE_MAX_BYTES = 4 << 20


def weight_product(a, b, out, block_rows, nparts, descending, init):
    """``out (+)= a.T @ b`` in :func:`matmul_tn`'s blocks, by the faster engine.

    :func:`weight_grad` (the tiles) where :func:`weight_product_tiles` says
    so, else :func:`matmul_tn` (OpenBLAS).  The choice depends on the
    shapes only, so runs of whole blocks (gradient checkpointing) take the
    same engine as one call.
    """
    G, I = out.shape
    if weight_product_tiles(G, I, out.dtype):
        weight_grad(a, b, out, block_rows, nparts, descending, init)
    else:
        matmul_tn(a, b, out, block_rows, nparts, descending, init)


def weight_product_tiles(G, I, dtype):
    """Whether :func:`weight_product` takes the tiles for an ``out`` (G, I).

    When ``b`` has at least one whole panel of columns and ``out`` is at
    most :data:`WGRAD_TILE_MAX_BYTES`.  Measured single-threaded against
    OpenBLAS: float32 with ``b`` 32 columns wide, 0.4-0.7x (a partial panel
    is copied each pass); float64 ``out`` of 6-8 MB 0.8x.
    """
    dtype = np.dtype(dtype)
    return I >= panel_width(dtype) and G * I * dtype.itemsize <= WGRAD_TILE_MAX_BYTES


@jit()
def weight_product_part(a, b, out, part, nparts, tiles, block_rows, descending, init):
    """Part ``part`` of ``nparts`` of :func:`weight_product`, ``tiles`` its engine.

    The rows of ``out`` that part computes in :func:`weight_grad` or
    :func:`matmul_tn`, by the same code: the same bits.
    """
    G = out.shape[0]
    if tiles:
        size = ((G + nparts - 1) // nparts + 3) // 4 * 4
    else:
        size = (G + nparts - 1) // nparts
    q0 = part * size
    q1 = min(G, q0 + size)
    if q0 < q1:
        if tiles:
            _weight_grad_part(a, b, out, q0, q1, block_rows, descending, init)
        else:
            _matmul_tn_part(a, b, out, q0, q1, block_rows, descending, init)


@jit()
def _matmul_blocks(a, b, out, block_rows):
    """:func:`matmul` with one part per block and no bias, on one thread."""
    M = a.shape[0]
    for r0 in range(0, M, block_rows):
        r1 = min(M, r0 + block_rows)
        np.dot(a[r0:r1], b, out[r0:r1])


# A count shared between two tasks of one parallel region: one task makes
# rows (the backward kernel, step after step), the other takes the products
# of each block of them as soon as it is complete.  The count is read and
# written atomically (acquire/release ordering: what the writer stored before
# publishing a count is visible to the reader that sees it), so the reader
# never sees a stale or torn value and the compiler cannot hoist its read out
# of a waiting loop.


def _element_pointer(context, builder, aty, arr, i):
    data = context.make_array(aty)(context, builder, arr).data
    return builder.gep(data, [i])


# -- arrays without reference counting -------------------------------------------
#
# Every view a compiled function makes of an array (``gates[t, b]``, ``h[r]``)
# takes a reference on the array's memory and gives it back when the view
# dies: two atomic operations on a count shared by all views of it.  In a
# recurrence that makes a few views per step of one sequence, that was a
# third of the time (measured, LSTM backward kernel at (1000, 1, 8, 32),
# float32, one thread: 467 us, 285 us without).  A time loop therefore works
# on *borrowed* arrays: the same data without the owner, so that views of
# them count nothing.  A borrowed array must not outlive its owner: borrow
# a function's arguments (the caller owns them for the whole call) or
# arrays the function allocated and keeps to the end of their use
# (:func:`keep_alive`), and never return or store one.


@intrinsic
def borrow(typingctx, arr):
    """``arr`` without its owner: views of it take no reference (see above)."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        out = context.make_array(sig.return_type)(context, builder)
        out.meminfo = context.get_constant_null(types.MemInfoPointer(types.voidptr))
        out.parent = context.get_constant_null(types.pyobject)
        out.nitems = a.nitems
        out.itemsize = a.itemsize
        out.data = a.data
        out.shape = a.shape
        out.strides = a.strides
        return out._getvalue()

    return arr(arr), codegen


@intrinsic
def keep_alive(typingctx, owners):
    """Nothing, but ``owners`` (an array or a tuple of them) live until here.

    For arrays a function allocated and :func:`borrow`-ed: Numba frees an
    array after the last use of its variable, and a borrowed view is not a
    use.  Put it after the last use of the borrowed arrays.
    """

    def codegen(context, builder, sig, args):
        return context.get_dummy_value()

    return types.none(owners), codegen


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """``arr[i] += v`` atomically (``arr`` int64); returns the value before."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return types.int64(arr, types.intp, types.int64), codegen


@intrinsic
def atomic_load(typingctx, arr, i):
    """``arr[i]`` (``arr`` int64), read with acquire ordering."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(arr, types.intp), codegen


@intrinsic
def atomic_store(typingctx, arr, i, v):
    """``arr[i] = v`` (``arr`` int64), written with release ordering."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(arr, types.intp, types.int64), codegen


# How two tasks of a region wait for each other.  A bare busy loop loses a
# whole scheduler time slice whenever the task it waits for is not running
# (another process has its core): measured with both cores busy, milliseconds
# instead of microseconds.  So a wait spins for SPIN_ROUNDS rounds of the
# CPU's spin-wait hint (about 5-20 us; on an idle machine the other task
# answers well within that), then gives its core away (sched_yield) between
# reads, so that the task it waits for, or whatever else wants the core, runs.
SPIN_ROUNDS = 256
_sched_yield = types.ExternalFunction("SwitchToThread" if sys.platform == "win32"
                                      else "sched_yield", types.intc())


@intrinsic
def cpu_relax(typingctx):
    """The spin-wait hint of the CPU (x86 ``pause``; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
            pause = builder.module.declare_intrinsic(
                "llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.void(), codegen


@jit()
def wait_until(progress, i, need):
    """Wait until ``progress[i]`` (read by :func:`atomic_load`) is at least ``need``.

    Spins :data:`SPIN_ROUNDS` rounds, then yields the core between reads.
    """
    rounds = 0
    while atomic_load(progress, i) < need:
        if rounds < SPIN_ROUNDS:
            cpu_relax()
            rounds += 1
        else:
            _sched_yield()


# The products of the backward pass of one layer-direction (LSTM): kinds of
# work in products_side_by_side's table.
WORK_DW_IH, WORK_DW_HH, WORK_DX, WORK_DB = 0, 1, 2, 3


@jit(parallel=True)
def products_side_by_side(dg, x, hp, w_ih, wb_ih, dw_ih, dw_hh, db, dx, work, nlanes,
                          block_rows, descending, init):
    """The products of an LSTM's backward pass after its kernel, side by side.

    ``dg`` (M, G) the pre-activation gradients, ``x`` (M, I) the layer
    input, ``hp`` (M, H) the states ``h_{t-1}``, ``w_ih`` (G, I) and, for
    the tiles, ``wb_ih`` its :func:`column_blocks`.  ``work`` (n, 5) int64:
    one row per piece of work, ``(lane, kind, part, nparts, tiles)``, kind
    one of WORK_DW_IH (``dw_ih (+)= dg^T x``), WORK_DW_HH (``dw_hh (+)= dg^T
    hp``), WORK_DX (``dx = dg w_ih``), WORK_DB (``db (+)= sum of dg's
    rows``).  Each lane, one task, does its rows of ``work`` in turn.  Each
    piece is the code the product runs on its own (:func:`weight_product_part`,
    :func:`project` or :func:`matmul` in one part, :func:`colsum`), so the
    results are the same bits as one product after another.
    """
    for lane in prange(nlanes):
        for u in range(work.shape[0]):
            if work[u, 0] == lane:
                product_piece(work[u], dg, x, hp, w_ih, wb_ih, dw_ih, dw_hh, db, dx, block_rows,
                              descending, init)


@jit()
def product_piece(row, dg, x, hp, w_ih, wb_ih, dw_ih, dw_hh, db, dx, block_rows, descending,
                  init):
    """The piece of work ``row`` of :func:`products_side_by_side`'s table."""
    kind = row[1]
    tiles = row[4] == 1
    if kind == WORK_DW_IH:
        weight_product_part(dg, x, dw_ih, row[2], row[3], tiles, block_rows, descending, init)
    elif kind == WORK_DW_HH:
        weight_product_part(dg, hp, dw_hh, row[2], row[3], tiles, block_rows, descending, init)
    elif kind == WORK_DX:
        if tiles:
            project(dg, wb_ih, np.empty(0, dtype=dg.dtype), dx)
        else:
            _matmul_blocks(dg, w_ih, dx, block_rows)
    else:
        colsum(dg, db, block_rows, descending, init)


@jit()
def _wtile(n, a, aoff, ka, K, w, woff, ldw, out, ooff, ldo):
    """``out[:n, :P] += a^T w`` for one tile of ``n`` <= 4 rows, one panel."""
    if n == 4:
        _wtile_4(a, aoff, 1, ka, K, w, woff, ldw, 0, out, ooff, ldo, 1 << 30)
    elif n == 3:
        _wtile_3(a, aoff, 1, ka, K, w, woff, ldw, 0, out, ooff, ldo, 1 << 30)
    elif n == 2:
        _wtile_2(a, aoff, 1, ka, K, w, woff, ldw, 0, out, ooff, ldo, 1 << 30)
    else:
        _wtile_1(a, aoff, 1, ka, K, w, woff, ldw, 0, out, ooff, ldo, 1 << 30)


@jit()
def _weight_grad_part(a, b, out, q0, q1, block_rows, descending, init):
    """Rows ``q0:q1`` of :func:`weight_grad`'s ``out``."""
    M, G = a.shape
    I = b.shape[1]
    item = a.itemsize
    P = _PANEL_BYTES // item
    nfull = I // P
    rem = I - nfull * P
    npan = nfull + (1 if rem > 0 else 0)
    kc_max = max(16, _PASS_BYTES // (npan * P * item))
    lda = a.strides[0] // item
    ldb = b.strides[0] // item
    ldo = out.strides[0] // item
    # the last, partial panel of ``b``: copied, zero-padded, per pass; its
    # tile adds into ``last`` (4, P), which is then added to ``out``
    tail = np.zeros((kc_max if rem > 0 else 0, P), dtype=a.dtype)
    last = np.empty((4, P), dtype=a.dtype)
    if init:
        out[q0:q1] = 0.0
    nblk = (M + block_rows - 1) // block_rows
    for jj in range(nblk):
        j = nblk - 1 - jj if descending else jj
        r0 = j * block_rows
        r1 = min(M, r0 + block_rows)
        for k0 in range(r0, r1, kc_max):
            kc = min(r1, k0 + kc_max) - k0
            if rem > 0:
                for k in range(kc):
                    for c in range(rem):
                        tail[k, c] = b[k0 + k, nfull * P + c]
            for g0 in range(q0, q1, 4):
                n = min(4, q1 - g0)
                ao = k0 * lda + g0
                for p in range(nfull):
                    _wtile(n, a, ao, lda, kc, b, k0 * ldb + p * P, ldb, out, g0 * ldo + p * P,
                           ldo)
                if rem > 0:
                    last[:] = 0.0
                    _wtile(n, a, ao, lda, kc, tail, 0, P, last, 0, P)
                    for r in range(n):
                        for c in range(rem):
                            out[g0 + r, nfull * P + c] += last[r, c]


@jit(parallel=True)
def weight_grad(a, b, out, block_rows, nparts, descending, init):
    """``out (+)= a.T @ b`` on the register tiles, in :func:`matmul_tn`'s blocks.

    ``a`` (M, G) and ``b`` (M, I) with contiguous rows, ``out`` (G, I)
    C-contiguous.  The rows are taken in blocks of ``block_rows`` from row
    0, last block first when ``descending``; with ``init`` ``out`` is
    overwritten (it may hold anything), else added to.  Each element of
    ``out`` is a fixed sum (passes of the steps fixed by ``I`` and the
    dtype, each a chain of FMAs in order, added to ``out`` in turn), so it
    is the same bits however ``out``'s rows are split into ``nparts`` (one
    task each, cut at multiples of four rows) and whether the blocks come
    in one call or in runs of whole blocks (gradient checkpointing).
    """
    M, G = a.shape
    if not (_rows_contiguous(a) and _rows_contiguous(b) and _rows_contiguous(out)):
        raise ValueError("weight_grad: rows must be contiguous")
    if b.shape[0] != M or out.shape[0] != G or out.shape[1] != b.shape[1]:
        raise ValueError("weight_grad: shapes do not match")
    size = ((G + nparts - 1) // nparts + 3) // 4 * 4
    for part in prange(nparts):
        q0 = part * size
        q1 = min(G, q0 + size)
        if q0 < q1:
            _weight_grad_part(a, b, out, q0, q1, block_rows, descending, init)
