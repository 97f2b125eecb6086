"""Forgetting attention (Lin et al. 2025): the forget gate inside softmax attention.

The Forgetting Transformer gives every head a scalar forget gate per step,
``f_t = sigmoid(w_f . x_t + b_f)``, and adds the sum of the log gates between
a key and a query to their score::

    s_ij = scale * q_i . k_j + sum_{l=j+1..i} log f_l        (j <= i)
    out_i = sum_{j <= i} softmax_j(s_ij) v_j

A key ``t`` steps back is weighed down by the product of the ``t`` gates in
between, as the cell state of an LSTM is: ``log f = 0`` everywhere is
ordinary causal attention, and a gate of exactly 0 (``log f = -inf``) hides
every earlier key (a hard reset).

- :func:`forgetting_attention` and :func:`forgetting_attention_vjp`: the
  operation on arrays ``q``, ``k`` ``(..., T, d)``, ``v`` ``(..., T, dv)``,
  ``log_f`` ``(..., T)``, and its gradients;
- :class:`ForgettingAttention`: a multi-head layer (projections of ``x`` to
  queries, keys and values, one forget gate per head, an output
  projection) with the calls of the other layers (``m(x)``, ``m.vjp``,
  ``state_dict``, flat parameters, :func:`fastgates.save`).

The kernels (:mod:`fastgates._attention`) never hold a ``T x T`` matrix:
memory grows as ``T``.  See ``docs/forgetting_attention.md``.

Reference: Zhixuan Lin, Evgenii Nikishin, Xu Owen He, Aaron Courville,
"Forgetting Transformer: Softmax Attention with a Forget Gate", ICLR 2025
(arXiv:2503.02130).
"""

import math
import time

import numba
import numpy as np
from scipy.special import expit

from . import _attention, _config, _linalg
from . import _validate as check
from .layers import _Parameters

__all__ = ["forgetting_attention", "forgetting_attention_vjp", "ForgettingAttention"]

_NAMES = ("q", "k", "v", "log_f")


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


def _dtype_of(values):
    """The one float dtype of ``q, k, v, log_f``, or a TypeError naming the odd one out."""
    dtypes = []
    for name, value in zip(_NAMES, values):
        if value is None:
            raise TypeError(f"{name} must be an array of floats, got None")
        dt = getattr(value, "dtype", None)
        if not isinstance(dt, np.dtype):
            try:
                dt = np.asarray(value).dtype
            except (ValueError, TypeError, OverflowError) as exc:
                raise ValueError(f"{name} could not be converted to an array of numbers: {exc}") from None
        if dt.kind != "f":
            raise TypeError(f"{name} must hold real floating-point numbers (float32 or float64), "
                            f"got dtype {dt}")
        dt = np.dtype(dt.type)          # any byte order
        if dt not in check.FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32 or float64, got {dt} "
                            "(convert it with .astype(np.float32) or np.float64)")
        dtypes.append(dt)
    for name, dt in zip(_NAMES[1:], dtypes[1:]):
        if dt != dtypes[0]:
            raise TypeError(f"{name} has dtype {dt} but q has {dtypes[0]}: pass q, k, v and log_f "
                            "in one dtype (float32 or float64), converted explicitly")
    return dtypes[0]


def _log_gates(arr):
    """Raise ValueError unless every entry of ``log_f`` is ``<= 0`` or ``-inf`` (no NaN)."""
    if np.all(arr <= 0):
        return
    bad = ~(arr <= 0)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    value = arr[where]
    what = "NaN" if np.isnan(value) else repr(float(value))
    raise ValueError(f"log_f must be <= 0 everywhere (the log of a forget gate in [0, 1]; -inf "
                     f"for a gate of exactly 0), got {what} at index {where}")


def _inputs(q, k, v, log_f, scale, check_finite):
    """Checked ``(q, k, v, log_f)`` as C-contiguous arrays of one dtype, and the scale."""
    check_finite = check.boolean(check_finite, "check_finite")
    dtype = _dtype_of((q, k, v, log_f))
    q, k, v, log_f = (check.as_float_array(a, name, dtype) for a, name in zip((q, k, v, log_f), _NAMES))
    if q.ndim < 2:
        raise ValueError(f"q must have shape (..., T, d), at least 2-D, got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (..., T, d) = {q.shape}, got {k.shape}")
    if v.ndim != q.ndim or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"v must have shape (..., T, dv) with the leading axes and T of q, "
                         f"{q.shape[:-1]} + (dv,), got {v.shape}")
    if log_f.shape != q.shape[:-1]:
        raise ValueError(f"log_f must have shape (..., T) = {q.shape[:-1]}, one gate per step of q, "
                         f"got {log_f.shape}")
    for name, arr in (("q", q), ("v", v)):
        if 0 in arr.shape:
            raise ValueError(f"{name} must not have an empty axis (shape (..., T, d) with every "
                             f"size >= 1), got shape {arr.shape}")
    _log_gates(log_f)
    if check_finite:
        check.finite(q, "q")
        check.finite(k, "k")
        check.finite(v, "v")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    else:
        scale = check.real(scale, "scale")
    return q, k, v, log_f, dtype.type(scale)


# --------------------------------------------------------------------------
# The kernels, called with the thread plan of one call
# --------------------------------------------------------------------------


def _timed(key, tasks, run, *args):
    """``run(*args)`` on the call's threads (at most ``tasks``), its time reported."""
    threads = _config.begin_call()
    elapsed = None
    try:
        start = time.perf_counter()
        _config.kernel_threads(tasks)
        out = run(*args)
        elapsed = time.perf_counter() - start
    finally:
        _config.end_call(key, threads, elapsed)
    return out


class _Tape:
    """What the backward pass needs from the forward pass (all O(T d))."""

    __slots__ = ("q", "k", "v", "qt", "vp", "C", "z", "mrow", "grow", "out", "scale", "hidden")


def _forward(q3, k3, v3, lf2, scale):
    """Run the forward kernel on (N, T, d) arrays; returns ``out`` (N, T, dv) and a tape."""
    N, T, d = q3.shape
    dv = v3.shape[2]
    dtype = q3.dtype
    C = np.empty((N, T), dtype=np.float64)
    z = np.empty((N, T), dtype=np.int64)
    out = np.empty((N, T, dv), dtype=dtype)
    mrow = np.empty((N, T), dtype=dtype)
    grow = np.empty((N, T), dtype=dtype)
    qt = _attention.tblocks(q3)
    vp = _attention.panels(v3)
    nqb = -(-T // _attention.BT)

    def run():
        _attention.gate_prefix(lf2, C, z)
        _attention.forward(k3, vp, qt, C, z, scale, out, mrow, grow)

    _timed(("attention_forward", N, T, d, dv, dtype.char), N * ((nqb + 1) // 2), run)
    tape = _Tape()
    tape.q, tape.k, tape.v, tape.qt, tape.vp = q3, k3, v3, qt, vp
    tape.C, tape.z, tape.mrow, tape.grow, tape.out = C, z, mrow, grow, out
    tape.scale = scale
    tape.hidden = np.isneginf(lf2)
    return out, tape


def _backward(tape, dout3):
    """Run the backward kernel; returns ``dq, dk, dv`` (N, T, .) and ``dlog_f`` (N, T)."""
    q3, k3, v3 = tape.q, tape.k, tape.v
    N, T, d = q3.shape
    dv = v3.shape[2]
    dtype = q3.dtype
    dq = np.empty_like(q3)
    dk = np.empty_like(k3)
    dvv = np.empty_like(v3)
    rows = np.zeros((N, T), dtype=np.float64)
    cols = np.zeros((N, T), dtype=np.float64)
    Dv = np.empty((N, T), dtype=dtype)
    dot = _attention.tblocks(dout3)
    dop = _attention.panels(dout3)
    qp = _attention.panels(q3)
    kp = _attention.panels(k3)
    nqb = -(-T // _attention.BT)
    npairs = (nqb + 1) // 2

    def run():
        # One task per sequence when there are enough of them for every
        # thread; else tasks per tile (more products, every thread busy).
        # The bits are the same either way.
        per_sequence = N >= _config.call_threads()
        _attention.row_dots(dout3, tape.out, Dv)
        _attention.backward(k3, v3, tape.qt, dot, qp, kp, dop, tape.C, tape.z, tape.scale,
                            tape.mrow, tape.grow, Dv, dq, dk, dvv, rows, cols, per_sequence)

    _timed(("attention_backward", N, T, d, dv, dtype.char), max(N, 2 * N * npairs), run)
    # s_ij holds C_i - C_j: dL/dC_t is the row sum of dS at t minus its column
    # sum, and C_t sums log_f[1..t], so dL/dlog_f[l] sums dL/dC_t over t >= l.
    dc = rows - cols
    dlog_f = np.cumsum(dc[:, ::-1], axis=1)[:, ::-1]
    # log_f[0] is in no score; a gate of 0 multiplies keys whose weight is
    # exactly 0: both gradients are 0 exactly (the sums above leave rounding).
    dlog_f[:, 0] = 0.0
    dlog_f[tape.hidden] = 0.0
    return dq, dk, dvv, dlog_f.astype(dtype)


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------


def forgetting_attention(q, k, v, log_f, *, scale=None, check_finite=True):
    """Causal softmax attention with a forget gate (Lin et al. 2025).

    ``out[..., i, :] = sum_{j <= i} softmax_j(s_ij) v[..., j, :]`` with
    ``s_ij = scale * q_i . k_j + sum_{l=j+1..i} log_f[..., l]``.

    Parameters
    ----------
    q, k : array_like
        ``(..., T, d)`` queries and keys, any number of leading axes (batch,
        heads, ...), the same for every argument.
    v : array_like
        ``(..., T, dv)`` values.
    log_f : array_like
        ``(..., T)`` log forget gates, each ``<= 0``; ``-inf`` is a gate of
        exactly 0, which hides every earlier key from the queries at and
        after its step.  ``log_f[..., 0]`` enters no score.
    scale : float, optional
        Multiplies ``q . k``; default ``1 / sqrt(d)``.
    check_finite : bool, default True
        Refuse NaN and inf in ``q``, ``k`` and ``v``.  ``log_f`` is always
        checked (no NaN, nothing above 0).

    Returns
    -------
    ndarray
        ``(..., T, dv)``, in the inputs' dtype.

    Raises
    ------
    TypeError
        If an argument is not float32 or float64, or their dtypes differ
        (no silent conversion: convert explicitly).
    ValueError
        If the shapes do not match (the message names the argument), an
        axis is empty, ``log_f`` holds NaN or a value above 0, or (with
        ``check_finite``) ``q``, ``k`` or ``v`` hold NaN or inf.

    Notes
    -----
    Computed in tiles of 64 queries by 64 keys with an online softmax: the
    memory beyond the inputs and output is ``O(T (d + dv))`` per sequence,
    never ``T x T``.  The result is the same bits for any number of threads.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 5, 4))
    >>> out = fg.forgetting_attention(q, k, v, np.zeros((2, 5)))
    >>> out.shape
    (2, 5, 4)
    """
    q, k, v, log_f, scale = _inputs(q, k, v, log_f, scale, check_finite)
    lead, (T, d), dv = q.shape[:-2], q.shape[-2:], v.shape[-1]
    N = int(np.prod(lead, dtype=np.int64))
    out, _ = _forward(q.reshape(N, T, d), k.reshape(N, T, d), v.reshape(N, T, dv),
                      log_f.reshape(N, T), scale)
    return out.reshape(lead + (T, dv))


def forgetting_attention_vjp(q, k, v, log_f, scale=None, *, check_finite=True):
    """:func:`forgetting_attention` and a function for its vector-Jacobian product.

    Parameters
    ----------
    q, k, v, log_f, scale, check_finite :
        As for :func:`forgetting_attention`; ``check_finite`` also applies to
        the pullback's ``dout``.

    Returns
    -------
    out : ndarray
        ``(..., T, dv)``.
    pullback : callable
        ``pullback(dout) -> (dq, dk, dv, dlog_f)``: the gradients of
        ``sum(out * dout)``, each shaped like its argument and in the
        inputs' dtype (``dout`` is converted to it).  ``dlog_f[..., 0]`` is
        0 (``log_f[..., 0]`` enters no score), and so is ``dlog_f`` where
        ``log_f`` is ``-inf`` (the keys that gate hides have weight exactly
        0).  It differentiates the arrays of this call and may be called
        any number of times.  The forward pass keeps ``O(T (d + dv))`` per
        sequence for it; the pullback needs about as much again.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 6, 4))
    >>> log_f = np.log(np.full(6, 0.9))
    >>> out, pullback = fg.forgetting_attention_vjp(q, k, v, log_f)
    >>> dq, dk, dv, dlog_f = pullback(np.ones_like(out))
    >>> dlog_f.shape, float(dlog_f[0])
    ((6,), 0.0)
    """
    q, k, v, log_f, scale = _inputs(q, k, v, log_f, scale, check_finite)
    dtype = q.dtype
    lead, (T, d), dv = q.shape[:-2], q.shape[-2:], v.shape[-1]
    N = int(np.prod(lead, dtype=np.int64))
    out, tape = _forward(q.reshape(N, T, d), k.reshape(N, T, d), v.reshape(N, T, dv),
                         log_f.reshape(N, T), scale)
    out_shape = lead + (T, dv)
    check_forward = check_finite

    def pullback(dout, *, check_finite=None):
        check_finite = check_forward if check_finite is None else check.boolean(check_finite, "check_finite")
        dout = check.gradient(dout, "dout", out_shape, dtype)
        if check_finite:
            check.finite(dout, "dout")
        dq, dk, dvv, dlog_f = _backward(tape, dout.reshape(N, T, dv))
        return (dq.reshape(lead + (T, d)), dk.reshape(lead + (T, d)), dvv.reshape(out_shape),
                dlog_f.reshape(lead + (T,)))

    return out.reshape(out_shape), pullback


# --------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------

# The layer's products are fastgates' register tiles (fastgates._linalg) on
# Numba's threads, not NumPy's BLAS: an OpenBLAS pool left spinning after a
# NumPy product slows the attention kernel that follows (measured: 9.0 ms
# alone, 23 ms right after a float32 (4096, 512) x (512, 1536) product).
# Below this many multiply-adds a product stays on one thread (as the
# recurrent layers' input projections, fastgates._recurrent).
SPLIT_MIN_MACS = 2_000_000
# Rows per block of a weight gradient's sum (fixed: the same bits for any
# thread count; see fastgates._linalg.weight_product).
WGRAD_BLOCK_ROWS = 1024


def _product(a, wb, bias, N):
    """``a @ W + bias`` (M, N) for ``a`` (M, K), ``W`` as :func:`fastgates._linalg.column_blocks` ``wb``.

    Every row of the result is its own sum: the same bits however the rows
    are split between threads.
    """
    M, K = a.shape
    out = np.empty((M, N), dtype=a.dtype)
    if M * K * N < SPLIT_MIN_MACS or M < 2:
        _linalg.project(a, wb, bias, out)
    else:
        nparts = min(_config.call_threads(), M)
        _config.kernel_threads(nparts)
        _linalg.project_parallel(a, wb, bias, out, nparts)
    return out


def _weight_grad(a, b):
    """``a.T @ b`` for ``a`` (M, G), ``b`` (M, I): a weight gradient summed over the rows."""
    M, G = a.shape
    I = b.shape[1]
    out = np.empty((G, I), dtype=a.dtype)
    # parts fixed by the sizes and Numba's pool, never by the thread count
    nparts = numba.config.NUMBA_NUM_THREADS if M * G * I >= SPLIT_MIN_MACS else 1
    _config.kernel_threads(nparts)
    with _config.single_threaded_blas():
        _linalg.weight_product(a, b, out, WGRAD_BLOCK_ROWS, nparts, False, True)
    return out


# The forget biases start in this range (see ForgettingAttention): gates of
# sigmoid(3) = 0.953 to sigmoid(6) = 0.9975, memories of about 20 to 400 steps.
FORGET_BIAS_INIT = (3.0, 6.0)


def _log_sigmoid(a):
    """``log sigmoid(a) = -softplus(-a)``, without overflow: ``min(a, 0) - log1p(exp(-|a|))``."""
    return np.minimum(a, 0) - np.log1p(np.exp(-np.abs(a)))


class ForgettingAttention(_Parameters):
    """Multi-head causal attention with a forget gate per head (Forgetting Transformer).

    For an input ``x`` ``(T, B, E)`` and ``h = num_heads`` heads of
    ``d = E // h`` features::

        q, k, v = split(x W_in^T + b_in)            each (T, B, E), then h heads of d
        f_t     = sigmoid(W_f x_t + b_f)            (T, B, h): one gate per head and step
        o       = forgetting_attention(q, k, v, log f), per head, scale 1/sqrt(d)
        y       = concat_heads(o) W_out^T + b_out   (T, B, E)

    with ``log f = -softplus(-(W_f x + b_f))`` computed without overflow.
    Causal: ``y_t`` depends on ``x_1..x_t`` only.

    Parameters
    ----------
    embed_dim : int
        ``E``, the features of ``x`` and ``y``.
    num_heads : int
        Heads; must divide ``embed_dim``.
    bias : bool, default True
        Whether the layer has the four bias arrays.  Without them the
        forget gates start near ``sigmoid(0) = 0.5``: a memory of a step or
        two.
    dtype : {np.float32, np.float64}, default np.float32
    seed : int or None
        Seed of the default initialisation.

    Attributes
    ----------
    in_proj_weight : ndarray
        ``(3E, E)``: rows of ``W_q``, ``W_k``, ``W_v`` (PyTorch's
        ``nn.MultiheadAttention`` name and layout).
    in_proj_bias : ndarray
        ``(3E,)`` (``bias=True`` only).
    out_proj.weight, out_proj.bias : ndarray
        ``(E, E)`` and ``(E,)``: keys of :meth:`state_dict` (PyTorch's names,
        so the projections of an ``nn.MultiheadAttention`` load as they
        are); not attributes.
    forget_weight : ndarray
        ``(num_heads, E)``: row ``h`` makes head ``h``'s gate.
    forget_bias : ndarray
        ``(num_heads,)`` (``bias=True`` only).

    Notes
    -----
    Default initialisation: every entry uniform in ``(-1/sqrt(E),
    1/sqrt(E))`` but ``forget_bias``, uniform in ``(3, 6)``
    (:data:`FORGET_BIAS_INIT`), so that each head starts retaining: gates of
    0.95 to 0.998, memories of about 20 to 400 steps, different per head.
    Drawn in float64 from ``np.random.default_rng(seed)`` in the order of
    :meth:`state_dict`, then rounded to ``dtype``.

    :meth:`vjp`'s pullback returns ``(dx, dparams)``, ``dparams`` keyed like
    :meth:`state_dict`, as :class:`fastgates.Linear` does (the layer has no
    state).  :meth:`gates` returns ``{"f": (T, B, num_heads)}``.

    Examples
    --------
    >>> import numpy as np, fastgates as fg
    >>> m = fg.ForgettingAttention(8, 2, seed=0)
    >>> y = m(np.ones((5, 3, 8), dtype=np.float32))
    >>> y.shape, m.gates(np.ones((5, 3, 8)))["f"].shape
    ((5, 3, 8), (5, 3, 2))
    """

    def __init__(self, embed_dim, num_heads, *, bias=True, dtype=np.float32, seed=None):
        self.embed_dim = check.positive_int(embed_dim, "embed_dim")
        self.num_heads = check.positive_int(num_heads, "num_heads")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide embed_dim={self.embed_dim} "
                             "(each head has embed_dim // num_heads features)")
        self.bias = check.boolean(bias, "bias")
        self.dtype = check.model_dtype(dtype)
        E, h = self.embed_dim, self.num_heads
        shapes = {"in_proj_weight": (3 * E, E)}
        if self.bias:
            shapes["in_proj_bias"] = (3 * E,)
        shapes["out_proj.weight"] = (E, E)
        if self.bias:
            shapes["out_proj.bias"] = (E,)
        shapes["forget_weight"] = (h, E)
        if self.bias:
            shapes["forget_bias"] = (h,)
        total = sum(int(np.prod(s, dtype=object)) for s in shapes.values())
        if total > 2**31:
            raise ValueError(f"embed_dim={E} asks for {total} parameters; at most 2**31 are supported")
        self._shapes = shapes
        rng = np.random.default_rng(check.seed(seed))
        bound = 1.0 / math.sqrt(E)
        params = {}
        for name, shape in shapes.items():
            low, high = FORGET_BIAS_INIT if name == "forget_bias" else (-bound, bound)
            params[name] = rng.uniform(low, high, size=shape).astype(self.dtype)
        self._set_params(params)

    @property
    def head_dim(self):
        """``embed_dim // num_heads``, the features of one head."""
        return self.embed_dim // self.num_heads

    # -- pieces ----------------------------------------------------------

    def _input(self, x, check_finite):
        check_finite = check.boolean(check_finite, "check_finite")
        arr = check.as_float_array(x, "x", self.dtype)
        if arr.ndim not in (2, 3):
            raise ValueError(f"x must be 3-D (T, B, E) or 2-D (T, E) for one unbatched sequence, "
                             f"got {arr.ndim}-D with shape {arr.shape}")
        if arr.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have embed_dim={self.embed_dim} features in its last axis, "
                             f"got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"x must have at least one time step (T >= 1), got shape {arr.shape}")
        if arr.ndim == 3 and arr.shape[1] == 0:
            raise ValueError(f"x must have at least one sequence in its batch (B >= 1), got shape {arr.shape}")
        if check_finite:
            check.finite(arr, "x")
        batched = arr.ndim == 3
        return (arr if batched else arr[:, None, :]), batched

    def _blocks(self, key, make):
        """A layout of the weights made by ``make()``, kept until the parameters change."""
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def _gate_rows(self):
        """``[W_in; W_f]`` (3E + h, E) and ``[b_in; b_f]`` (or empty): one product makes
        the queries, keys, values and the gates' logits."""
        p = self._params
        w = np.concatenate([p["in_proj_weight"], p["forget_weight"]])
        b = (np.concatenate([p["in_proj_bias"], p["forget_bias"]]) if self.bias
             else np.empty(0, dtype=self.dtype))
        return w, b

    def _heads(self, a, T, B):
        """(T*B, E) columns -> (B*h, T, d), C-contiguous."""
        h, d = self.num_heads, self.head_dim
        return np.ascontiguousarray(a.reshape(T, B, h, d).transpose(1, 2, 0, 3)).reshape(B * h, T, d)

    def _unheads(self, a, T, B, out):
        """(B*h, T, d) -> ``out`` (T*B, E) (a view of columns allowed)."""
        h, d = self.num_heads, self.head_dim
        out.reshape(T, B, h, d)[...] = a.reshape(B, h, T, d).transpose(2, 0, 1, 3)

    def _forward(self, x3, keep):
        T, B, E = x3.shape
        h = self.num_heads
        x2 = x3.reshape(T * B, E)
        w, b = self._blocks("in", self._gate_rows)
        wb = self._blocks("in_t", lambda: _linalg.column_blocks(w.T))
        qkva = _product(x2, wb, b, 3 * E + h)                           # (T*B, 3E + h)
        q, k, v = (self._heads(qkva[:, j * E:(j + 1) * E], T, B) for j in range(3))
        a = qkva[:, 3 * E:]                                             # the gates' logits
        with np.errstate(over="ignore", invalid="ignore"):
            log_f = np.ascontiguousarray(_log_sigmoid(a).reshape(T, B, h).transpose(1, 2, 0))
        # the log gates of a finite x are finite and <= 0: nothing to check
        scale = self.dtype.type(1.0 / math.sqrt(self.head_dim))
        o3, tape = _forward(q, k, v, log_f.reshape(B * h, T), scale)
        o2 = np.empty((T * B, E), dtype=self.dtype)
        self._unheads(o3, T, B, o2)
        wo = self._blocks("out_t", lambda: _linalg.column_blocks(self._params["out_proj.weight"].T))
        # a writable copy, kept with the derived weights (the parameter is
        # read-only, which Numba would compile the projection kernels for again)
        bo = (self._blocks("out_bias", lambda: np.array(self._params["out_proj.bias"]))
              if self.bias else np.empty(0, dtype=self.dtype))
        y = _product(o2, wo, bo, E).reshape(T, B, E)
        if not keep:
            return y, None
        return y, (x2, np.ascontiguousarray(a), o2, tape)

    # -- public API --------------------------------------------------------

    def __call__(self, x, *, check_finite=True):
        """Run the layer (inference).

        Parameters
        ----------
        x : array_like
            ``(T, B, E)``, or ``(T, E)`` for one unbatched sequence; real
            floats, converted to the layer's dtype.
        check_finite : bool, default True
            Refuse NaN and inf in ``x``; with ``False`` they propagate.

        Returns
        -------
        ndarray
            ``y``, shaped like ``x``.
        """
        x3, batched = self._input(x, check_finite)
        y, _ = self._forward(x3, keep=False)
        return y if batched else y[:, 0, :]

    def vjp(self, x, *, check_finite=True):
        """Run the layer and return a function for its vector-Jacobian product.

        Parameters
        ----------
        x, check_finite :
            As for :meth:`__call__`; ``check_finite`` also applies to the
            pullback's ``dy``.

        Returns
        -------
        y : ndarray
            As returned by :meth:`__call__`.
        pullback : callable
            ``pullback(dy) -> (dx, dparams)``: the gradients of
            ``sum(y * dy)`` with respect to ``x`` (shaped like ``x``) and to
            every parameter (a dict keyed like :meth:`state_dict`).  It
            differentiates the parameters of this call, whatever is loaded
            later, and may be called any number of times.
        """
        x3, batched = self._input(x, check_finite)
        T, B, E = x3.shape
        y, (x2, a, o2, tape) = self._forward(x3, keep=True)
        # the parameters of this call and what was derived from them, whatever
        # load_state_dict does to the layer before the pullback runs
        params, derived = self._params, self._derived
        h = self.num_heads
        empty = np.empty(0, dtype=self.dtype)
        check_forward = check_finite

        def pullback(dy, *, check_finite=None):
            check_finite = check_forward if check_finite is None else check.boolean(check_finite, "check_finite")
            shape = (T, B, E) if batched else (T, E)
            dy3 = check.gradient(dy, "dy", shape, self.dtype).reshape(T * B, E)
            if check_finite:
                check.finite(dy3, "dy")
            grads = {}
            with np.errstate(over="ignore", invalid="ignore"):
                grads["out_proj.weight"] = _weight_grad(dy3, o2)
                if self.bias:
                    grads["out_proj.bias"] = dy3.sum(axis=0)
                wo = derived.get("out")
                if wo is None:
                    wo = derived["out"] = _linalg.column_blocks(params["out_proj.weight"])
                do = self._heads(_product(dy3, wo, empty, E), T, B)
                dq, dk, dv, dlog_f = _backward(tape, do)
                # the gradients of [q | k | v | a], a the gates' logits
                g = np.empty((T * B, 3 * E + h), dtype=self.dtype)
                for j, part in enumerate((dq, dk, dv)):
                    self._unheads(part, T, B, g[:, j * E:(j + 1) * E])
                # d log sigmoid(a) / da = sigmoid(-a) = 1 - f
                g[:, 3 * E:] = dlog_f.reshape(B, h, T).transpose(2, 0, 1).reshape(T * B, h) * expit(-a)
                dw = _weight_grad(g, x2)
                grads["in_proj_weight"], grads["forget_weight"] = dw[:3 * E], dw[3 * E:]
                if self.bias:
                    db = g.sum(axis=0)
                    grads["in_proj_bias"], grads["forget_bias"] = db[:3 * E], db[3 * E:]
                wi = derived.get("in_b")
                if wi is None:
                    wi = derived["in_b"] = _linalg.column_blocks(derived["in"][0])
                dx = _product(g, wi, empty, E)
            dparams = {name: grads[name].astype(self.dtype, copy=False) for name in self._shapes}
            dx = dx.reshape(T, B, E)
            return (dx if batched else dx[:, 0, :]), dparams

        return (y if batched else y[:, 0, :]), pullback

    def gates(self, x, *, check_finite=True):
        """The forget gate of every head at every step.

        Parameters
        ----------
        x, check_finite :
            As for :meth:`__call__`.

        Returns
        -------
        dict of str to ndarray
            ``{"f": f}``, ``f`` ``(T, B, num_heads)`` (``(T, num_heads)``
            for unbatched ``x``): ``sigmoid(W_f x_t + b_f)``, in ``[0, 1]``.
        """
        x3, batched = self._input(x, check_finite)
        T, B, E = x3.shape
        p = self._params
        with np.errstate(over="ignore", invalid="ignore"):
            a = x3.reshape(T * B, E) @ p["forget_weight"].T
            if self.bias:
                a += p["forget_bias"]
        f = expit(a).reshape(T, B, self.num_heads)
        return {"f": f if batched else f[:, 0, :]}

    def __repr__(self):
        args = [str(self.embed_dim), str(self.num_heads)]
        if not self.bias:
            args.append("bias=False")
        args.append(f"dtype={self.dtype.name}")
        return f"ForgettingAttention({', '.join(args)})"
