"""The stacked, bidirectional recurrence built from the per-direction kernels.

Everything here works on validated, C-contiguous, time-major arrays of the
model's dtype: ``x`` (T, B, I), states (L*D, B, H), ``lengths`` int64 (B,).
``weights`` is a list with one dict per layer-direction, in PyTorch's order
(layer-major, then direction), of the parameters by their base names
(``"weight_ih"``, ``"weight_hh"``, ``"bias_ih"``, ``"bias_hh"`` and the
cell's own); a model without bias has no bias entries.  The state is a tuple
of arrays, one per state of the cell (``cell.states``).

Nothing here depends on which cell runs: what differs between cells is the
:class:`~fastgates.cells.base.Cell` object passed in (its kernels, its
state, its own gradients).

The large, non-sequential matrix products (the input projection of all steps,
the weight gradients, the gradient with respect to the layer input) are one
product each over all steps, in fixed blocks of steps (:mod:`fastgates._linalg`);
the recurrence runs in the per-direction kernels, which make their input
projection themselves, a block of steps at a time, where that keeps it in
the cache (:meth:`_Direction.fused`).  Everything runs on Numba's
threads with a single-threaded BLAS (see :mod:`fastgates._config`).
"""

import time
import weakref

import numba
import numpy as np

from . import _config
from ._linalg import (WORK_DB, WORK_DW_HH, WORK_DW_IH, WORK_DX, colsum, column_blocks, matmul,
                      panel_width, products_side_by_side, project, project_parallel,
                      release, weight_product, weight_product_tiles)

def _pool_size():
    # Work is split by the size of Numba's pool, never by the thread count in
    # force, so that results do not change with set_num_threads.
    return numba.config.NUMBA_NUM_THREADS


def _chunk_size(batch):
    return max(1, -(-batch // _pool_size()))


class Derived(dict):
    """What the kernels derive from a model's parameters, kept until they change.

    A model makes a new one whenever its parameters change (a pullback of
    an earlier call keeps the old one it used).  Nothing it holds refers
    back to it (:class:`_Direction` holds it weakly), so it dies as soon as
    nobody uses it any more; then its large arrays, the weight panels, go
    to :func:`~fastgates._linalg.release` for the next panels to reuse.
    """

    __slots__ = ("__weakref__",)

    def __reduce__(self):
        # A copy or a pickled model starts with an empty cache (its
        # directions refer to this dict weakly, which cannot be pickled,
        # and the panels are remade from the parameters on the first call).
        return (Derived, ())

    def __del__(self):
        try:
            # each value held by nothing else has four references when
            # release counts them: this dict, the pair below, release's
            # loop variable and getrefcount's argument
            arrays = [(v, 4) for v in self.values() if type(v) is np.ndarray]
            release(arrays)
        except Exception:       # pragma: no cover (interpreter shutdown)
            pass


def _derive(derived, key, make, *args):
    """``make(*args)``, kept in the model's :class:`Derived` dict (None: not kept).

    Models hand in a dict that they replace whenever their parameters
    change, so transposed and blocked weights are built once, not at every
    call.
    """
    if derived is None:
        return make(*args)
    value = derived.get(key)
    if value is None:
        value = derived[key] = make(*args)
    return value


def _transposed_blocks(w):
    return column_blocks(w.T)


# Empty placeholders for the kernels' optional arrays, made once per dtype
# (a tiny call passes several).
_EMPTY = {(np.dtype(t), n): np.empty((0,) * n, dtype=t) for t in (np.float32, np.float64)
          for n in (1, 3)}


def _empty3(dtype):
    return _EMPTY[dtype, 3]


def _empty1(dtype):
    return _EMPTY[dtype, 1]


class Tape:
    """What a forward pass keeps for its backward pass."""

    def __init__(self, cell, exact, inputs, outputs, gates, aux, state0, lengths, variant, pre,
                 masks=None):
        self.cell = cell          # the Cell
        self.variant = variant    # Variant of the forward pass
        self.pre = pre            # per layer-direction: pre-activations when clipping
        self.exact = exact        # the activation mode of the forward pass
        self.inputs = inputs      # per layer: its input (T, B, I_k)
        self.outputs = outputs    # per layer: its output (T, B, D*H)
        self.gates = gates        # per layer-direction: (T, B, G) post-activation
        self.aux = aux            # per layer-direction: the cell's (LSTM c_t, GRU W_hn h + b_hn)
        self.state0 = state0      # tuple of (L*D, B, H) arrays
        self.lengths = lengths
        self.masks = masks        # dropout: per layer but the last, (T, B, D*P) scales; or None


class Variant:
    """The call's options beyond the weights.

    reverse : bool
        A one-direction model that reads each sequence backwards.
    clip : float
        Bound of every gate pre-activation; ``inf`` for none.
    options : dict
        The cell's own options by name (LSTM ``input_forget``, GRU
        ``reset_after``), read by its :meth:`~fastgates.cells.base.Cell.setup`.
    """

    def __init__(self, reverse=False, clip=np.inf, **options):
        self.reverse = reverse
        self.clip = clip
        self.options = options

    def direction_reversed(self, d):
        return d == 1 or self.reverse


_PLAIN = Variant()


def _zero_padding(x, lengths):
    """``x`` with its padded steps set to 0 (a copy, only when there are any).

    The kernels never read padded steps, but the weight gradient is a product
    over all steps, where a NaN or inf in padding would give 0 * inf = NaN.
    Layers above the first read outputs, which are already 0 there.
    """
    T = x.shape[0]
    if lengths.shape[0] == 1 and lengths[0] == T or lengths.min() == T:
        return x
    x = x.copy()
    for b, n in enumerate(lengths):
        x[n:, b] = 0
    return x


# Products below this many multiply-adds run on one thread: waking a second
# one costs about as much as the product (measured: (100, 32) x (32, 256)
# took 22 us on two threads).
SPLIT_MIN_MACS = 2_000_000

# The kernels make the input projection themselves, about this many bytes
# of it at a time per chunk (a block of steps), where chunks have at least
# this many rows (fewer rows per call would read the whole W_ih for little
# work) or the batch is one chunk: see _Direction.fused.
PROJECT_BLOCK_BYTES = 1 << 18
PROJECT_MIN_ROWS = 8
# ... and where W_ih is small enough to be read from the caches at every step
# of every chunk: float32 LSTM (25, 16, 1024, 1024) (W_ih 16 MB, 8 rows per
# chunk) inference took 43 ms fused against 32 ms with one projection before.
PROJECT_MAX_WEIGHT_BYTES = 4 << 20

# Every product over the steps of a sequence (the input projection, the
# gradient with respect to the layer input, the weight and bias gradients)
# is taken in blocks of whole steps, about this many rows (steps x batch)
# each: see _Grid.
ROWS_PER_BLOCK = 1024
# ... but a batch of one sequence (one chunk, whatever the pool) is cut into
# about OVERLAP_BLOCKS blocks of at least OVERLAP_MIN_STEPS steps, so that
# a second thread can take the products of each block while the backward
# kernel makes the next ones (a cell with side_by_side: the LSTM's
# lstm_backward_overlapped).  The same on one
# thread and in a pool of one, so that the sums, and the bits, do not depend
# on the pool.  Smaller blocks cost nothing measurable (float32 training on
# one thread, 1024-row blocks -> these: (100, 1, 32, 64) 16 steps 1.02x the
# time, (1000, 1, 8, 32) 128 steps 0.89x; two threads (100, 1, 512, 512)
# 16 steps 1.01x).
OVERLAP_BLOCKS = 8
OVERLAP_MIN_STEPS = 16


def block_steps(T, batch):
    """Steps per block of the products over time, for ``T`` steps of a batch of ``batch``."""
    steps = max(1, -(-ROWS_PER_BLOCK // batch))
    if batch == 1:
        steps = min(steps, max(OVERLAP_MIN_STEPS, -(-T // OVERLAP_BLOCKS)))
    return steps


class _Grid:
    """The fixed blocks of a call's products over time.

    Blocks of :func:`block_steps` steps counted from step 0, each cut into a
    number of parts that depends on ``T``, ``B`` and the product's other
    sizes only.  Every row of such a product therefore comes from the same
    BLAS call whether the product runs over all steps at once or over runs
    of whole blocks (gradient checkpointing), and sums over steps add the
    same block products in the same order: checkpointing changes no bit.
    """

    def __init__(self, T, B):
        self.T = T
        self.B = B
        self.steps = block_steps(T, B)
        self.rows = self.steps * B

    def parts(self, inner, cols, rows):
        """Parts per block for a product with these sizes over ``rows`` rows.

        A block of at least SPLIT_MIN_MACS multiply-adds is cut into one part
        per pool thread.  Also points Numba at the threads the call will use
        (which never changes a result): one below SPLIT_MIN_MACS in all.
        """
        _config.kernel_threads(1 if rows * inner * cols < SPLIT_MIN_MACS else None)
        block = min(self.T, self.steps) * self.B
        return _pool_size() if block * inner * cols >= SPLIT_MIN_MACS else 1


def _product(grid, a, b):
    """``a @ b`` by BLAS for ``a`` (t, B, K), a run of whole blocks; (t, B, N)."""
    t, B, K = a.shape
    N = b.shape[1]
    out = np.empty((t, B, N), dtype=a.dtype)
    matmul(a.reshape(t * B, K), b, _empty1(a.dtype), out.reshape(t * B, N), grid.rows,
           grid.parts(K, N, t * B))
    return out


def _input_grad_tiles(G, I, dtype):
    """Whether the tiles (else OpenBLAS) make ``dx = dG W_ih``, ``W_ih`` (G, I).

    Measured at 2 threads, OpenBLAS time / tiles time: float32 1.21-1.26
    from I = 64 up (to (400, 4096) x (4096, 1024)), but 0.3-0.7 at I = 8
    and 32 (a panel of 64 columns computed for 8 or 32); float64 1.11-1.38
    from I = 32 up (one whole panel) but 0.76 at (400, 4096) x (4096,
    1024), where a panel of ``W_ih`` (1 MB) outgrows the L2 cache.
    """
    P = panel_width(dtype)
    item = np.dtype(dtype).itemsize
    return I >= P and (item == 4 or G * P * item <= 1 << 19)


class _Direction:
    """One layer-direction of a call: its weights and the kernels' options.

    The cell's :meth:`~fastgates.cells.base.Cell.setup` adds what its
    kernels need beyond these.
    """

    def __init__(self, cell, weights, k, derived, variant, exact, chunk, clip, H, dtype, rev):
        self.cell = cell
        self.k = k
        params = weights[k]
        self.w_ih = params["weight_ih"]
        self.w_hh = params.get("weight_hh")       # None: a cell without recurrent weights
        b_ih = params.get("bias_ih")
        self.bias = None if b_ih is None else _derive(derived, ("bias", k), cell.input_bias,
                                                      b_ih, params.get("bias_hh"), H)
        self.has_bias_hh = "bias_hh" in params
        # weakly: the direction lives in ``derived`` (a cycle would keep
        # the dict, and its panels, alive until the cyclic collector runs)
        self._derived = None if derived is None else weakref.ref(derived)
        self.variant = variant
        self.exact = exact
        self.chunk = chunk
        self.clip = clip
        self.H = H
        # the widths of the state arrays (h first: the output's), and
        # whether the weight-gradient products may run side by side
        self.widths = cell.state_units(H, variant.options)
        self.P = self.widths[0]
        self.side_by_side = cell.side_by_side
        self.dtype = dtype
        self.rev = rev
        # Fixed for the object's life; worked out once (a tiny call counts
        # every microsecond).
        self.G = self.w_ih.shape[0]
        self.clipping = bool(clip < np.inf)
        self.project_fits = self.w_ih.size * dtype.itemsize <= PROJECT_MAX_WEIGHT_BYTES
        cell.setup(self, params, variant)

    def blocks(self, name, w):
        """``w`` in column blocks (:func:`~fastgates._linalg.column_blocks`), kept as ``name``."""
        return _derive(self._derived and self._derived(), (name, self.k), column_blocks, w)

    def blocks_t(self, name, w):
        """``w.T`` in column blocks, kept as ``name``."""
        return _derive(self._derived and self._derived(), (name, self.k), _transposed_blocks, w)

    def derive(self, name, make, *args):
        """``make(*args)``, kept as ``name`` with the model's parameters (a cell's own
        layout of its weights)."""
        return _derive(self._derived and self._derived(), (name, self.k), make, *args)

    def project(self, grid, a):
        """The input projection ``a W_ih^T + b`` of ``a`` (t, B, I), a run of whole blocks.

        Made by the register tiles of :mod:`~fastgates._linalg`, not BLAS:
        every row is its own sum, so the result does not depend on how the
        rows are cut (checkpointed segments give the same bits).
        """
        t, B, K = a.shape
        G = self.w_ih.shape[0]
        out = np.empty((t, B, G), dtype=a.dtype)
        wb = self.blocks_t("wih_tb", self.w_ih)
        bias = _empty1(a.dtype) if self.bias is None else self.bias
        a2, out2 = a.reshape(t * B, K), out.reshape(t * B, G)
        nparts = grid.parts(K, G, t * B)
        if nparts == 1:
            project(a2, wb, bias, out2)
        else:
            project_parallel(a2, wb, bias, out2, nparts)
        return out

    def input_grad(self, grid, dg):
        """``dg W_ih`` for ``dg`` (t, B, G), a run of whole blocks: the gradient of the input.

        By the register tiles, as :meth:`project` (no bias, ``W_ih`` in
        column blocks as it is stored), where they are faster than OpenBLAS
        (:func:`_input_grad_tiles`), else by :func:`_product`.
        """
        t, B, G = dg.shape
        I = self.w_ih.shape[1]
        if not _input_grad_tiles(G, I, dg.dtype):
            return _product(grid, dg, self.w_ih)
        out = np.empty((t, B, I), dtype=dg.dtype)
        wb = self.blocks("wih_b", self.w_ih)
        a2, out2 = dg.reshape(t * B, G), out.reshape(t * B, I)
        nparts = grid.parts(G, I, t * B)
        if nparts == 1:
            project(a2, wb, _empty1(dg.dtype), out2)
        else:
            project_parallel(a2, wb, _empty1(dg.dtype), out2, nparts)
        return out

    def fused(self, t, B, I):
        """Whether the kernel makes the input projection itself (see :func:`lstm_forward`).

        Where ``W_ih`` is at most PROJECT_MAX_WEIGHT_BYTES and each chunk
        has at least PROJECT_MIN_ROWS rows, or the whole batch is one chunk
        and the projection would not be split between threads anyway.  The
        projection is then written and read back in the cache instead of
        through memory: float32 LSTM inference 2-8% faster from B = 16 up
        (measured, (100, 64, 128, 128) 1 thread 20.2 -> 18.5 ms), the same
        bits.
        """
        if not (self.cell.fuses_projection and self.project_fits):
            return False
        if B <= self.chunk:
            return t * B * I * self.G < SPLIT_MIN_MACS
        return self.chunk >= PROJECT_MIN_ROWS

    def forward(self, grid, a, s0, lengths, y, ycol, keep, sn=None):
        """Run the recurrence over the layer input ``a`` (t, B, I), a run of whole blocks.

        ``s0`` the initial state, a tuple of (B, H) arrays; ``sn`` (B, H)
        arrays for the final state, else new ones.  Returns sn, gates,
        aux, pre.
        """
        t, B, I = a.shape
        H, dtype = self.H, self.dtype
        G = self.G
        fused = self.fused(t, B, I)
        if fused:
            xw = _empty3(dtype)
            x = np.ascontiguousarray(a)
            wih_tb = self.blocks_t("wih_tb", self.w_ih)
            bias = _empty1(dtype) if self.bias is None else self.bias
            step_bytes = min(B, self.chunk) * G * dtype.itemsize
            block = max(1, min(t, PROJECT_BLOCK_BYTES // step_bytes))
        else:
            xw = self.project(grid, a)
            x, wih_tb, bias, block = _empty3(dtype), _empty3(dtype), _empty1(dtype), 1
        if keep and self.cell.gates_in_projection:
            gates = xw            # the cell's kernel turns the projection into its gates
        else:
            gates = np.empty((t, B, G), dtype=dtype) if keep else _empty3(dtype)
        aux = (np.empty((t, B, self.cell.aux_units * H), dtype=dtype) if keep
               else _empty3(dtype))
        pre = np.empty((t, B, G), dtype=dtype) if keep and self.clipping else _empty3(dtype)
        if sn is None:
            sn = tuple([np.empty((B, w), dtype=dtype) for w in self.widths])
        # one chunk: an idle thread may make the projection ahead of the recurrence
        overlap = self.cell.overlap(self, t, B, fused)
        waiting = _waiting(overlap and self.cell.forward_tier(self))
        overlap = overlap and waiting is None
        # Set once (each change costs about 1.6 us).
        _config.kernel_threads(2 if overlap else -(-B // self.chunk))
        start = _config.clock()
        self.cell.forward(self, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux,
                          pre, overlap)
        if waiting is not None:
            waiting.spent(_config.clock() - start)
        return sn, gates, aux, pre

    def backward(self, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths,
                 grid=None, acc=None, layer_in=None):
        """Back-propagate through kept values; returns a :class:`_StepGrads`.

        ``ds`` the final state's gradient and ``s0`` the initial state,
        tuples of (B, H) arrays.  Given ``grid``, the :class:`_WeightGrads`
        ``acc`` and the layer input, a cell whose batch is one chunk may
        also make the products over time, overlapped with the kernel
        (:meth:`_WeightGrads.overlap`): then ``g.dx`` holds the input
        gradient and ``acc`` has them.
        """
        t, B, G = gates.shape
        H, dtype = self.H, self.dtype
        g = _StepGrads()
        g.hprev = np.empty((t, B, self.P), dtype=dtype) if self.cell.recurrent else None
        g.dgx = np.empty((t, B, G), dtype=dtype)
        g.ds0 = tuple([np.empty((B, w), dtype=dtype) for w in self.widths])
        # the products beside the kernel (None: after it)
        plan = None if acc is None else acc.overlap(grid, t, B, layer_in.shape[2])
        waiting = _waiting(plan is not None and self.cell.backward_tier(self))
        if waiting is not None:
            plan = None
        # Set once (each change costs about 1.6 us).
        _config.kernel_threads(-(-B // self.chunk) if plan is None else 2)
        start = _config.clock()
        self.cell.backward(self, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan,
                           acc, grid, layer_in)
        if waiting is not None:
            waiting.spent(_config.clock() - start)
        return g


def _waiting(tier):
    """``tier`` (a :class:`~fastgates._config.Tier`, or a false value for
    none) when its kernel is known not to be ready: the call then does the
    work the other way, and counts its time."""
    return tier if tier and not tier.maybe() else None


class _StepGrads:
    """What the backward kernel of one layer-direction gives for a run of steps.

    ``dgx`` (t, B, G) the gate pre-activations' gradient, ``hprev`` (t, B, H)
    the states the recurrent weights multiplied, ``ds0`` the initial
    state's gradient (a tuple); cells add what their own gradients read.
    """

    dgx = hprev = ds0 = None
    rhprev = cprev = cs = gates = dhproj = full = None
    dx = None        # the input gradient, when the kernel made the products too


# add_side_by_side's work tables by everything they depend on: kept across
# parameter updates (making one costs about 10 us; an optimiser changes the
# parameters, and with them a model's derived objects, at every step).
_PLANS = {}


class _WeightGrads:
    """The parameter gradients of one layer-direction, summed block by block.

    Blocks are added last step first for a forward direction and first step
    first for a backward one: the order in which the backward pass reaches
    them, so that checkpointed segments add up in the same order.
    """

    # A cell whose bias_hh has a gradient of its own (not that of bias_ih)
    # makes db_hh in its grads_setup.
    db_hh = None

    def __init__(self, direction, I, with_bias):
        self.dir = direction
        dtype = direction.dtype
        G = direction.G
        self.dw_ih = np.empty((G, I), dtype=dtype)
        self.dw_hh = (None if direction.w_hh is None
                      else np.empty(direction.w_hh.shape, dtype=dtype))
        self.db_ih = np.empty(G, dtype=dtype) if with_bias else None
        self.first = True
        direction.cell.grads_setup(self, with_bias)

    def add_input(self, grid, g, layer_in):
        """Add the input side's gradients of a run of whole blocks (``dW_ih``, ``b_ih``).

        ``g`` a :class:`_StepGrads`, ``layer_in`` the blocks' layer input.
        """
        t, B, G = g.dgx.shape
        rows = t * B
        I = layer_in.shape[2]
        desc = not self.dir.rev
        d2 = g.dgx.reshape(rows, G)
        weight_product(d2, layer_in.reshape(rows, I), self.dw_ih, grid.rows,
                       grid.parts(G, I, rows), desc, self.first)
        if self.db_ih is not None:
            colsum(d2, self.db_ih, grid.rows, desc, self.first)

    def add_side_by_side(self, grid, g, layer_in):
        """All the products of :meth:`add_input`, :meth:`add_recurrent` and
        :meth:`_Direction.input_grad` at once, where that pays; returns the
        input gradient, or None when it did nothing.

        For a cell whose recurrent side uses ``g.dgx`` as it is
        (``side_by_side``: the LSTM) when
        fastgates runs on two or more threads and the input side's products
        are each too small to be split (below SPLIT_MIN_MACS): then they
        would run one after another on one thread.  Here they and the parts
        of ``dW_hh`` run side by side, shared out between the threads by
        their sizes (:func:`~fastgates._linalg.products_side_by_side`), each
        by the code it runs on its own: the same bits.
        """
        dr = self.dir
        t, B, G = g.dgx.shape
        I = layer_in.shape[2]
        plan = self._cached_plan(grid, t, B, I)
        if plan is False:
            return None
        work, nlanes, dx_tiles = plan
        rows = t * B
        desc = not dr.rev
        x2, wb, db, dx, init = self._operands(layer_in, dx_tiles)
        d2 = g.dgx.reshape(rows, G)
        args = (d2, x2, g.hprev.reshape(rows, dr.P), dr.w_ih, wb, self.dw_ih, self.dw_hh, db,
                dx.reshape(rows, I), work, nlanes, grid.rows, desc, init)
        tier = _config.tier(products_side_by_side, (dr.dtype.char,))
        if not tier.use(*args):
            # not compiled yet: one after another (_config.Tier)
            start = _config.clock()
            self.add_input(grid, g, layer_in)
            dx = dr.input_grad(grid, g.dgx)
            self.add_recurrent(grid, g)
            tier.spent(_config.clock() - start)
            return dx
        self.first = False
        _config.kernel_threads(nlanes)
        products_side_by_side(*args)
        dr.cell.add_grads(self, grid, g, d2, desc, init)
        return dx

    def overlap(self, grid, t, B, I):
        """The work table of the products beside the backward kernel, else None
        (:func:`~fastgates._lstm.lstm_backward_overlapped`).

        For a cell with ``side_by_side`` whose batch is one chunk (threads idle in the kernel),
        over ``t`` steps holding two blocks or more, where
        :meth:`add_side_by_side` would run (two threads or more, the input
        side's products unsplit).
        """
        dr = self.dir
        if B > dr.chunk or t * B <= grid.rows:
            return None
        plan = self._cached_plan(grid, t, B, I)
        return None if plan is False else plan

    def overlapped_products(self, grid, layer_in, plan):
        """What :func:`~fastgates._lstm.lstm_backward_overlapped` takes after
        the kernel's own arguments, the input gradient it fills and whether
        these are the first blocks (set ``first`` False once they are made)."""
        work, _, dx_tiles = plan
        x2, wb, db, dx, init = self._operands(layer_in, dx_tiles)
        args = (x2, self.dir.w_ih, wb, self.dw_ih, self.dw_hh, db, dx.reshape(x2.shape), work,
                grid.rows, init)
        return args, dx, init

    def _operands(self, layer_in, dx_tiles):
        """The operands of the products of a run of blocks taken together.

        ``(x, wb, db, dx, init)``: the layer input as (rows, I), ``W_ih`` in
        column blocks when the tiles make ``dx`` (else empty), the bias
        gradient (empty without biases), a new ``dx`` (t, B, I), and whether
        these are the first blocks (which overwrite the sums; the caller
        sets ``first`` False once it made them).
        """
        dr = self.dir
        t, B, I = layer_in.shape
        dtype = dr.dtype
        init = self.first
        wb = dr.blocks("wih_b", dr.w_ih) if dx_tiles else _empty3(dtype)
        db = _empty1(dtype) if self.db_ih is None else self.db_ih
        return layer_in.reshape(t * B, I), wb, db, np.empty((t, B, I), dtype=dtype), init

    def _cached_plan(self, grid, t, B, I):
        dr = self.dir
        if not dr.side_by_side:
            return False
        key = (dr.G, dr.P, I, dr.dtype.char, self.db_ih is None, grid.T, t, B, grid.rows,
               _config.call_threads())
        plan = _PLANS.get(key)
        if plan is None:
            if len(_PLANS) >= 4096:
                _PLANS.clear()
            plan = _PLANS[key] = self._plan(grid, t * B, I)
        return plan

    def _plan(self, grid, rows, I):
        """The work table of :meth:`add_side_by_side` for ``rows`` rows, else False."""
        dr = self.dir
        threads = _config.call_threads()
        G, P, dtype = dr.G, dr.P, dr.dtype      # dW_hh is (G, P)
        if threads < 2 or grid.parts(G, I, rows) != 1:
            return False
        nhh = grid.parts(G, P, rows)
        tiles_ih = weight_product_tiles(G, I, dtype)
        tiles_hh = weight_product_tiles(G, P, dtype)
        dx_tiles = _input_grad_tiles(G, I, dtype)
        # (kind, part, nparts, tiles, multiply-adds)
        pieces = [(WORK_DW_IH, 0, 1, tiles_ih, rows * G * I), (WORK_DX, 0, 1, dx_tiles, rows * G * I)]
        pieces += [(WORK_DW_HH, p, nhh, tiles_hh, rows * G * P // nhh) for p in range(nhh)]
        if self.db_ih is not None:
            pieces.append((WORK_DB, 0, 1, False, rows * G))
        # the largest first, each to the lane with the least so far
        nlanes = min(threads, len(pieces))
        load = [0] * nlanes
        work = np.zeros((len(pieces), 5), dtype=np.int64)
        for u, (kind, part, nparts, tiles, macs) in enumerate(sorted(pieces, key=lambda w: -w[4])):
            lane = load.index(min(load))
            load[lane] += macs
            work[u] = lane, kind, part, nparts, tiles
        return work, nlanes, dx_tiles

    def add_recurrent(self, grid, g):
        """Add the recurrent side's gradients of the same blocks; after :meth:`add_input`.

        The cell may turn ``g.dgx`` into the recurrent side's gradient in
        place (:meth:`~fastgates.cells.base.Cell.recurrent_side`: a GRU with
        ``reset_after``), so ``g.dgx`` must have served the input side
        (``dW_ih``, ``b_ih``, ``dx``) first.
        """
        t, B, G = g.dgx.shape
        rows = t * B
        P = self.dir.P
        init, self.first = self.first, False
        desc = not self.dir.rev
        cell = self.dir.cell
        cell.recurrent_side(self, g)
        h2 = g.dgx.reshape(rows, G)          # now the recurrent side's gradient
        if cell.recurrent:
            cell.recurrent_grad(self, grid, h2, g.hprev.reshape(rows, P), desc, init)
        cell.add_grads(self, grid, g, h2, desc, init)

    def result(self):
        """The gradients by parameter base name (``"weight_ih"`` ...)."""
        out = {"weight_ih": self.dw_ih}
        if self.dw_hh is not None:
            out["weight_hh"] = self.dw_hh
        if self.db_ih is not None:
            out["bias_ih"] = self.db_ih
            if self.dir.has_bias_hh:
                out["bias_hh"] = self.db_ih.copy() if self.db_hh is None else self.db_hh
        self.dir.cell.finish_grads(self, out)
        return out


def forward(cell, weights, x, state0, lengths, num_layers, bidirectional, keep=False,
            derived=None, variant=_PLAIN, checkpoint=None, masks=None):
    """Run the stacked recurrence; see :func:`_forward` for the arguments.

    The call's thread count is chosen when it starts (:func:`fastgates._config.begin_call`:
    one thread while the cores are contended) and its time reported when it
    ends.  The forward pass makes no BLAS call (its products are the
    register tiles of :mod:`~fastgates._linalg`), so it needs no BLAS
    thread setting.
    """
    key = ("forward", cell.name, x.shape, state0[0].shape[2], num_layers, bidirectional,
           x.dtype.char, keep, checkpoint)
    return _timed(key, _forward, cell, weights, x, state0, lengths, num_layers, bidirectional,
                  keep, derived, variant, checkpoint, masks)


def backward(tape, weights, dy, dstate, num_layers, bidirectional, with_bias, derived=None):
    """Back-propagate; see :func:`_backward` for the arguments (timed as :func:`forward`)."""
    key = ("backward", tape.cell.name, dy.shape, dstate[0].shape[2], num_layers, bidirectional,
           dy.dtype.char, getattr(tape, "interval", None))
    with _config.single_threaded_blas():
        return _timed(key, _backward, tape, weights, dy, dstate, num_layers, bidirectional,
                      with_bias, derived)


def linear(a, w, bias, derived=None):
    """``a @ w.T + bias`` for ``a`` (M, K), by the register tiles: a dense layer.

    Every row of the result is its own sum over ``k`` in order, so a row's
    bits do not depend on the other rows (BLAS's do: measured, a
    ``Readout``'s head on a slice of a batch differed from the same rows of
    the whole batch in the last bit).  ``w`` (N, K) in blocks is kept in
    ``derived`` as the layers keep theirs; ``bias`` (N,) or None.
    """
    M, K = a.shape
    N = w.shape[0]
    out = np.empty((M, N), dtype=a.dtype)
    if M == 0:
        return out
    wb = _derive(derived, "linear_tb", _transposed_blocks, w)
    # a writable copy, as the cells' folded biases are: the kernels would
    # compile again for the read-only parameter
    b = _empty1(a.dtype) if bias is None else _derive(derived, "linear_bias", np.array, bias)
    a = np.ascontiguousarray(a)
    if M * K * N < SPLIT_MIN_MACS:
        project(a, wb, b, out)
        return out
    key = ("linear", a.shape, N, a.dtype.char)
    return _timed(key, _linear_parallel, a, wb, b, out)


def _linear_parallel(a, wb, bias, out):
    nparts = _pool_size()
    _config.kernel_threads(nparts)
    project_parallel(a, wb, bias, out, nparts)
    return out


def _timed(key, run, *args):
    """``run(*args)`` with the thread plan of one call, its time reported."""
    threads = _config.begin_call()
    elapsed = None
    try:
        start = time.perf_counter()
        out = run(*args)
        elapsed = time.perf_counter() - start
    finally:
        _config.end_call(key, threads, elapsed)
    return out


def _directions(cell, weights, layer, D, H, dtype, derived, variant, exact, chunk):
    """The :class:`_Direction` objects of a layer, kept in ``derived``.

    They depend on the model's parameters and options (which ``derived``
    lives with) and on the activation mode and batch chunk of the call;
    building them costs about 3 us per direction, noticeable in a tiny call.
    """
    def make():
        clip = dtype.type(variant.clip)
        return [_Direction(cell, weights, layer * D + d, derived, variant, exact, chunk, clip, H,
                           dtype, variant.direction_reversed(d))
                for d in range(D)]

    return _derive(derived, ("directions", layer, exact, chunk), make)


def _forward(cell, weights, x, state0, lengths, num_layers, bidirectional, keep=False,
             derived=None, variant=_PLAIN, checkpoint=None, masks=None):
    """Run the stacked recurrence.

    ``state0``: the initial state, a tuple of (L*D, B, H) arrays (one per
    ``cell.states``).  ``checkpoint``: with ``keep``, an interval in steps
    (see :func:`checkpoint_interval`); the tape then keeps only the states
    at segment boundaries (:class:`CheckpointTape`).  ``masks``: dropout
    between layers, one (T, B, D*P) array per layer but the last (P a
    direction's output width), each 0 or ``1 / (1 - p)``: the output of
    layer ``k`` times ``masks[k]`` is the input of layer ``k + 1`` (the
    tape keeps them for the backward pass).

    Returns
    -------
    y : (T, B, D*H) array
    state : tuple of (L*D, B, H) arrays
        The final state.
    tape : Tape, CheckpointTape or None
        Filled when ``keep`` is true.
    """
    T, B, _ = x.shape
    D = 2 if bidirectional else 1
    H = weights[0]["weight_ih"].shape[0] // len(cell.gates)
    P = state0[0].shape[2]                  # the width of h, and of the output
    dtype = x.dtype
    chunk = _chunk_size(B)
    exact = _config.exact_arg()
    grid = _Grid(T, B)
    staten = tuple([np.empty_like(s) for s in state0])
    interval = checkpoint_interval(checkpoint, T, B) if keep and checkpoint is not None else None
    kept = keep and interval is None
    inputs, outputs, gates_kept, aux_kept, pre_kept, states = [], [], [], [], [], []
    x = layer_in = _zero_padding(x, lengths)
    for layer in range(num_layers):
        y = np.empty((T, B, D * P), dtype=dtype)
        dirs = _directions(cell, weights, layer, D, H, dtype, derived, variant, exact, chunk)
        for d, dr in enumerate(dirs):
            k = dr.k
            s0 = tuple([s[k] for s in state0])
            if interval is None:
                _, gates, aux, pre = dr.forward(grid, layer_in, s0, lengths, y, d * P, kept,
                                                tuple([s[k] for s in staten]))
                gates_kept.append(gates)
                aux_kept.append(aux)
                pre_kept.append(pre)
            else:
                sk, kept_states = _forward_segments(dr, grid, interval, layer_in, s0, lengths, y,
                                                    d * P)
                states.append(kept_states)
                for s, v in zip(staten, sk):
                    s[k] = v
        if kept:
            inputs.append(layer_in)
            outputs.append(y)
        if masks is None or layer == num_layers - 1:
            layer_in = y
        else:
            layer_in = None       # the layer's input goes first (unless the tape keeps it)
            layer_in = np.multiply(y, masks[layer])
        del y
    tape = None
    if kept:
        tape = Tape(cell, exact, inputs, outputs, gates_kept, aux_kept, state0, lengths, variant,
                    pre_kept, masks)
    elif keep:
        tape = CheckpointTape(cell, exact, variant, x, state0, lengths, interval, states, masks)
    return layer_in, staten, tape


# -- gradient checkpointing ----------------------------------------------------


def checkpoint_interval(every, T, B):
    """The checkpoint interval used for a request of ``every`` steps.

    ``every`` rounded up to a whole number of blocks of the products over
    time (:func:`block_steps`: ``ceil(1024 / B)`` steps, fewer at B = 1),
    and to at most ``T`` in blocks.
    """
    steps = block_steps(T, B)
    interval = -(-every // steps) * steps
    return min(interval, -(-T // steps) * steps)


class CheckpointTape:
    """What a checkpointed forward pass keeps: the states at segment starts.

    ``states[k]`` is a tuple with one ``(nseg, B, H)`` array per state of
    the cell, for layer-direction ``k``: the state each segment of
    ``interval`` steps starts from, in the direction's reading order (for
    a backward direction the state after it has read the later steps).
    """

    def __init__(self, cell, exact, variant, x, state0, lengths, interval, states, masks=None):
        self.cell = cell
        self.exact = exact
        self.variant = variant
        self.x = x                # the input, padded steps zero
        self.state0 = state0
        self.lengths = lengths
        self.interval = interval
        self.states = states
        self.masks = masks        # dropout between layers, as Tape.masks


def _segments(T, interval):
    return [(t0, min(T, t0 + interval)) for t0 in range(0, T, interval)]


def _local_lengths(lengths, t0, t1):
    """Valid steps of each sequence within steps ``t0:t1`` (0 to t1 - t0)."""
    return np.clip(lengths - t0, 0, t1 - t0).astype(np.int64)


def _forward_segments(dr, grid, interval, layer_in, s0, lengths, y, ycol):
    """Run one layer-direction segment by segment, keeping the starting states."""
    T, B, _ = layer_in.shape
    segs = _segments(T, interval)
    kept = tuple(np.empty((len(segs), B, w), dtype=dr.dtype) for w in dr.widths)
    state = s0
    order = range(len(segs) - 1, -1, -1) if dr.rev else range(len(segs))
    for s in order:
        t0, t1 = segs[s]
        for k, v in zip(kept, state):
            k[s] = v
        state, _, _, _ = dr.forward(grid, layer_in[t0:t1], state,
                                    _local_lengths(lengths, t0, t1), y[t0:t1], ycol, False)
    return state, kept


def _segment_input(tape, grid, layers, s, t0, t1):
    """The input of layer ``len(layers)`` over steps ``t0:t1``, recomputed.

    ``layers`` holds the :class:`_Direction` lists of the layers below.
    """
    if not layers:
        return tape.x[t0:t1]
    below = _segment_input(tape, grid, layers[:-1], s, t0, t1)
    dirs = layers[-1]
    P = dirs[0].P
    y = np.empty((t1 - t0, grid.B, len(dirs) * P), dtype=below.dtype)
    local = _local_lengths(tape.lengths, t0, t1)
    for d, dr in enumerate(dirs):
        start = tuple(v[s] for v in tape.states[dr.k])
        dr.forward(grid, below, start, local, y, d * P, False)
    if tape.masks is not None:
        np.multiply(y, tape.masks[len(layers) - 1][t0:t1], out=y)
    return y


def _backward(tape, weights, dy, dstate, num_layers, bidirectional, with_bias, derived=None):
    """Back-propagate ``dy`` (T, B, D*H) and the final state's gradient.

    ``dstate``: a tuple of (L*D, B, H) arrays, one per state of the cell.
    Layer by layer from the top, and in each direction over its segments in
    the order the backward pass reaches them: a :class:`Tape` is one segment
    holding every step; a :class:`CheckpointTape` recomputes each segment
    from its starting state (its input too, from the layers below, for a
    stacked model) before running the backward kernel over it.  Every
    product over time sees the same blocks, in the same order, either way,
    so the results are the same bits.

    Returns
    -------
    dx : (T, B, I) array
    dstate0 : tuple of (L*D, B, H) arrays
    dweights : list of dicts per layer-direction
        The gradients by parameter base name (:meth:`_WeightGrads.result`;
        no biases when ``with_bias`` is false).
    """
    D = 2 if bidirectional else 1
    T, B, _ = dy.shape
    H = weights[0]["weight_ih"].shape[0] // len(tape.cell.gates)
    P = tape.state0[0].shape[2]
    grid = _Grid(T, B)
    checkpointed = isinstance(tape, CheckpointTape)
    segs = _segments(T, tape.interval) if checkpointed else [(0, T)]
    dstate0 = tuple([np.empty_like(s) for s in tape.state0])
    dweights = [None] * (num_layers * D)
    layers = [_directions(tape.cell, weights, layer, D, H, dy.dtype, derived, tape.variant,
                          tape.exact, _chunk_size(B)) for layer in range(num_layers)]
    dy_layer = dy
    for layer in reversed(range(num_layers)):
        dx = None
        for d, dr in enumerate(layers[layer]):
            k = dr.k
            ds = tuple([s[k] for s in dstate])
            acc = None
            order = range(len(segs)) if dr.rev else range(len(segs) - 1, -1, -1)
            for s in order:
                t0, t1 = segs[s]
                if checkpointed:
                    seg_in, kept = _recompute(tape, grid, layers, layer, dr, s, t0, t1)
                else:
                    seg_in = tape.inputs[layer]
                    kept = (tape.gates[k], tape.aux[k], tape.pre[k], tape.outputs[layer], d * P,
                            tuple([v[k] for v in tape.state0]), tape.lengths)
                if acc is None:
                    acc = _WeightGrads(dr, seg_in.shape[2], with_bias)
                g = dr.backward(dy_layer[t0:t1], d * P, ds, *kept, grid, acc, seg_in)
                del kept
                ds = g.ds0
                part = g.dx
                if part is None:
                    part = acc.add_side_by_side(grid, g, seg_in)
                if part is None:
                    acc.add_input(grid, g, seg_in)
                    part = dr.input_grad(grid, g.dgx)
                    acc.add_recurrent(grid, g)
                del g, seg_in
                if dx is None and len(segs) == 1:
                    dx = part
                else:
                    if dx is None:
                        dx = np.empty((T, B, part.shape[2]), dtype=part.dtype)
                    if d == 0:
                        dx[t0:t1] = part
                    else:
                        dx[t0:t1] += part
                del part
            dweights[k] = acc.result()
            for out, v in zip(dstate0, ds):
                out[k] = v
        if tape.masks is not None and layer > 0:
            # through the dropout between layer - 1 and this one (dx is the
            # backward pass's own array)
            np.multiply(dx, tape.masks[layer - 1], out=dx)
        dy_layer = dx
        del dx
    return dy_layer, dstate0, dweights


def _recompute(tape, grid, layers, layer, dr, s, t0, t1):
    """Segment ``s`` of a layer-direction, recomputed from its starting state.

    Returns its input and what :meth:`_Direction.backward` takes after the
    state gradient: gates, aux, pre, the direction's outputs and their
    column, the starting state and the lengths within the segment.
    """
    seg_in = _segment_input(tape, grid, layers[:layer], s, t0, t1)
    local = _local_lengths(tape.lengths, t0, t1)
    start = tuple(v[s] for v in tape.states[dr.k])
    y = np.empty((t1 - t0, grid.B, dr.P), dtype=seg_in.dtype)
    _, gates, aux, pre = dr.forward(grid, seg_in, start, local, y, 0, True)
    return seg_in, (gates, aux, pre, y, 0, start, local)


# -- memory ------------------------------------------------------------------


def training_memory(cell, T, B, input_size, H, num_layers, D, itemsize, *, clip=False,
                    options=None, num_params=0, checkpoint=None, padded=False, dropout=False):
    """Bytes of the arrays a ``vjp`` and its pullback allocate (see ``training_memory``).

    Returns ``(kept, peak)``: what the pullback holds between the two calls
    (the output ``y`` included), and the most allocated at any one time from
    the start of ``vjp`` to the end of the pullback (its results included).
    Counted: every array of a size proportional to ``T``; not counted: the
    caller's ``x`` and ``dy``, and scratch of a fixed size (per-chunk
    states, BLAS packing), which does not grow with ``T``.  ``options``:
    the model's options by name, read by the cell's
    :meth:`~fastgates.cells.base.Cell.memory`.  ``dropout``: masks between
    the layers (one (T, B, D*H) array per layer but the last, and without
    checkpointing the dropped copy of each output, the next layer's input).
    """
    G = cell.rows(H)
    N = T * B
    L = num_layers
    options = options or {}
    widths = cell.state_units(H, options)
    P = widths[0]                                          # h, and the output, per direction
    sizes = [input_size] + [D * P] * (L - 1)
    pre = G if clip else 0
    own, extra, aux_to_end = cell.memory(H, options)
    # Per step and row of the backward kernel's results: hprev, dgx and the
    # cell's own.  Made after dx (which then exists): ``extra`` per row,
    # the cell's own gradient products.
    grads = (P if cell.recurrent else 0) + G + own
    aux_units = cell.aux_units * H
    pad = N * input_size if padded else 0
    # gradients, states (two arrays of H + P per row and direction, at
    # least one of each state's width: an sLSTM has four states)
    small = num_params + 2 * L * D * B * max(H + P, sum(widths))
    masks = (L - 1) * N * D * P if dropout else 0
    if checkpoint is None:
        kept = pad + 2 * masks + L * (N * D * P + D * N * (G + aux_units + pre))
        # the last input projection (unless it becomes the tape's gates)
        peak = kept + (0 if cell.gates_in_projection else N * G)
        for layer in reversed(range(L)):
            dy_between = N * D * P if layer < L - 1 else 0
            for d in range(D):
                dx = sizes[layer] * N if d else 0
                peak = max(peak, kept + dy_between + dx + N * grads
                           + N * (sizes[layer] + extra))
        return itemsize * kept, itemsize * (peak + small)
    interval = checkpoint_interval(checkpoint, T, B)
    nseg = -(-T // interval)
    n = min(interval, T) * B
    states = L * D * nseg * B * sum(widths)
    kept = pad + N * D * P + states + masks
    peak = kept + n * G
    if L > 1:
        peak = max(peak, kept + N * D * P + n * G)          # a layer's input and output
    segment = n * (G + aux_units + pre + P)                 # gates, aux, pre, own outputs
    xw = 0 if cell.gates_in_projection else n * G           # the projection beside them
    aux = n * aux_to_end                                    # kept to the segment's end
    for layer in reversed(range(L)):
        dy_between = N * D * P if layer < L - 1 else 0
        seg_in = n * D * P if layer else 0
        below = n * (2 * D * P + G) if layer > 1 else (n * G if layer else 0)
        # dx exists from the second segment on.
        base = kept + dy_between + N * sizes[layer] + seg_in
        peak = max(peak, base + below,
                   base + segment + xw,                     # recomputing: with its xw
                   base + segment + n * grads,              # the backward kernel
                   base + aux + n * grads + n * (sizes[layer] + extra))
    return itemsize * kept, itemsize * (peak + small)
