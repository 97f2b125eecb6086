"""Cells whose gates see only the input: :class:`ScanCell`, the base of minGRU and minLSTM.

Such a cell (Feng et al. 2024, "Were RNNs all we needed?") has no
recurrent weights: every gate and candidate is a function of ``x_t``
alone, so the whole input projection is one product over all steps and
the recurrence is linear, ``h_t = a_t ⊙ h_{t-1} + b_t``.  A cell module
gives two element-wise kernels, each parallel over all steps and rows, and
says how its scan's coefficients follow from its gates
(``ScanCell.coefficients``):

- ``activate``: the projection ``xw`` (t, B, G) becomes the gates, in
  place (it is the tape's ``gates``: no second array), the ``aux`` array
  filled when the tape keeps one; padded steps 0;
- ``gradients``: from ``g_t`` (the gradient with respect to ``h_t``,
  which the backward scan leaves in columns ``H:2H`` of ``dgx``) to the
  gradient of the whole projection, in place.

The scans are :mod:`fastgates._scan`'s, shared by every such cell, reading
the coefficients from the gates as they go, and parallel in time where the
batch is small.
"""


from .. import _config
from .._config import jit
from .._math import one, sigmoid_fast, sigmoid_scalar
from .._scan import scan_backward, scan_blocks, scan_forward
from .base import Cell

# Elements per thread below which an element-wise pass runs on fewer
# threads: waking a thread costs microseconds, this many elements take
# about as long.
GRAIN = 1 << 14


@jit()
def candidate_inplace(v, positive, exact):
    """The candidate from its pre-activation, in place: ``v`` as it is, or ``g(v)``
    with ``positive``.

    ``g(v) = v + 1/2`` for ``v >= 0`` and ``σ(v)`` below (continuous at 0,
    always positive): the paper's form for positive states.  One loop per
    mode, so that the fast one vectorises.
    """
    if not positive:
        return
    half = one(v[0]) / 2
    if exact is None:
        for j in range(v.shape[0]):
            x = v[j]
            s = sigmoid_fast(x)
            v[j] = x + half if x >= 0 else s
    else:
        for j in range(v.shape[0]):
            x = v[j]
            s = sigmoid_scalar(x, exact)
            v[j] = x + half if x >= 0 else s


@jit()
def candidate_slopes(n, positive, out):
    """``out[j] *= dn/dv`` from the candidates ``n``: nothing, or ``g'(v)`` with ``positive``.

    ``g(v) >= 1/2`` exactly when ``v >= 0`` (``g'(v) = 1``); below,
    ``g = σ(v)`` and ``g' = σ(1 - σ)``.  At ``n = 1/2`` (``v = 0``, or a
    ``v`` so close below 0 that ``σ(v)`` rounds to 1/2) the slope is taken
    as 1, the right-hand one, as ``torch.where(v >= 0, ...)`` gives at 0.
    """
    if not positive:
        return
    one_ = one(n[0])
    half = one_ / 2
    for j in range(n.shape[0]):
        x = n[j]
        out[j] *= one_ if x >= half else x * (one_ - x)


@jit()
def state_before(y, ycol, h0, lengths, reverse, t, b):
    """``h_{t-1}`` of sequence ``b`` in its reading order: the output of the step
    read before ``t`` (columns ``ycol:ycol + H`` of ``y``), ``h0[b]`` at the first."""
    n = lengths[b]
    if (t == n - 1) if reverse else (t == 0):
        return h0[b]
    return y[t + 1 if reverse else t - 1, b, ycol:ycol + h0.shape[1]]


@jit()
def row_range(task, per_task, rows):
    """Rows ``task * per_task`` up to ``rows`` of an element-wise pass's task."""
    r0 = task * per_task
    return r0, min(rows, r0 + per_task)


def rows_per_task(width):
    """Rows of ``width`` values per task of an element-wise pass (about GRAIN values)."""
    return max(1, GRAIN // width)


def _threads(rows, width):
    """Point Numba at the threads of an element-wise pass over ``rows`` x ``width``."""
    _config.kernel_threads(-(-rows // rows_per_task(width)))


class ScanCell(Cell):
    """A cell without recurrent weights whose state follows ``h_t = a_t h_{t-1} + b_t``.

    Subclasses set ``activate`` and ``gradients`` (their compiled kernels,
    see the module's notes), ``coefficients`` and the usual attributes.
    Parameters are ``weight_ih`` ``(G, I)`` and ``bias_ih`` ``(G,)`` only;
    the option ``positive`` chooses the candidate ``g(v)``.

    Attributes
    ----------
    coefficients : tuple
        ``(acol, c0, c1, bcol, ncol)``: in terms of the gates (blocks of
        ``H`` columns), ``a_t = c0 + c1 gate[acol]`` and ``b_t = gate[bcol]
        ⊙ gate[ncol]`` (minGRU: ``1 - z``, ``z ⊙ n``).
    """

    recurrent = False
    fuses_projection = False
    gates_in_projection = True
    activate = gradients = None
    coefficients = None

    def input_bias(self, b_ih, b_hh, H):
        # a copy, writable as every other cell's folded bias: Numba types
        # the read-only parameter apart, and the shared projection kernels
        # would compile again for it
        return b_ih.copy()

    def param_shapes(self, input_size, H, options, bias):
        G = self.rows(H)
        shapes = {"weight_ih": (G, input_size)}
        if bias:
            shapes["bias_ih"] = (G,)
        return shapes

    def setup(self, dr, params, variant):
        dr.positive = bool(variant.options.get("positive", False))
        acol, c0, c1, bcol, ncol = self.coefficients
        H = dr.H
        dr.scan_coefficients = (acol * H, dr.dtype.type(c0), dr.dtype.type(c1), bcol * H,
                                ncol * H)

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        t, B, G = xw.shape
        _threads(t * B, G)
        type(self).activate(xw, lengths, dr.positive, dr.exact, aux, rows_per_task(G))
        nblocks = scan_blocks(t, B)
        _config.kernel_threads(B * nblocks)
        acol, c0, c1, bcol, ncol = dr.scan_coefficients
        scan_forward(xw, acol, c0, c1, bcol, ncol, s0[0], lengths, dr.rev, nblocks, y, ycol,
                     sn[0])

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        t, B, G = gates.shape
        H = dr.H
        dgx = g.dgx
        nblocks = scan_blocks(t, B)
        _config.kernel_threads(B * nblocks)
        acol, c0, c1, _, _ = dr.scan_coefficients
        scan_backward(dy, dycol, ds[0], gates, acol, c0, c1, lengths, dr.rev, nblocks, dgx, H,
                      g.ds0[0])
        _threads(t * B, G)
        type(self).gradients(gates, aux, y, ycol, s0[0], lengths, dr.rev, dr.positive, dgx,
                             rows_per_task(G))

    def recurrent_grad(self, acc, grid, h2, hprev, desc, init):
        raise AssertionError("a cell without recurrent weights has no recurrent gradient")
