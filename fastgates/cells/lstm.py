"""The LSTM cell on the shared driver (kernels: :mod:`fastgates._lstm`).

Rows i, f, g, o; state ``(h, c)``; the tape keeps the cell states as its
``aux`` array.  Options: ``input_forget`` (``f = 1 - i``) and peephole
weights ``weight_peep`` (3, H) (ONNX's LSTM has both); ``proj_size``
(PyTorch's): ``h = W_hr (o ⊙ tanh c)`` with ``weight_hr`` (P, H), so ``h``
has ``P`` units and ``weight_hh`` is (4H, P) (kernels
:func:`~fastgates._lstm.lstmp_forward`, :func:`~fastgates._lstm.lstmp_backward`).  A batch of one
sequence runs on two threads where a second one is free: the forward pass
makes the input projection ahead of the recurrence, the backward pass makes
the weight-gradient products beside the kernel.
"""

import numpy as np

from .. import _config
from .._linalg import colsum, weight_product
from .._lstm import (lstm_backward, lstm_backward_overlapped, lstm_forward, lstm_forward_overlapped,
                     lstmp_backward, lstmp_forward)
from .._recurrent import _empty3
from .base import Cell

# In the forward pass of a batch that is one chunk the second thread makes
# the input projection ahead of the recurrence, this many steps at a time
# (lstm_forward_overlapped).
OVERLAP_PROJECT_STEPS = 16


class LSTMCell(Cell):
    name = "lstm"
    label = "LSTM"
    gates = ("i", "f", "g", "o")
    states = ("h", "c")
    forget = "f"
    forget_name = "forget gate f"
    input_gate = "i"
    shown = ("c",)
    params = ("weight_peep", "weight_hr")
    side_by_side = True

    def state_units(self, H, options):
        P = options.get("proj_size", 0)
        return (P or H, H)

    def param_shapes(self, input_size, H, options, bias):
        shapes = super().param_shapes(input_size, H, options, bias)
        P = options.get("proj_size", 0)
        if P:
            shapes["weight_hr"] = (P, H)          # after the biases, as torch.nn.LSTM
        return shapes

    def setup(self, dr, params, variant):
        peep = params.get("weight_peep")
        # a writable copy, as the empty one: Numba types a read-only array
        # apart, and peepholes would compile the variants' kernels again
        dr.peep = (np.empty((0, dr.H), dtype=dr.dtype) if peep is None
                   else np.array(peep, dtype=dr.dtype, order="C"))
        dr.coupled = bool(variant.options.get("input_forget", False))
        # the plain LSTM passes None: its kernels are compiled without the variants' code
        dr.lstm_variant = peep is not None or dr.coupled or dr.clipping
        # projected: its own kernels, the weight-gradient products after them
        dr.w_hr = params.get("weight_hr")
        if dr.w_hr is not None:
            dr.side_by_side = False

    def overlap(self, dr, t, B, fused):
        return (dr.w_hr is None and fused and B <= dr.chunk and t > OVERLAP_PROJECT_STEPS
                and _config.call_threads() > 1)

    # The overlapped kernels cost 3-4.4 s more to compile than the plain
    # ones and save 7-17% of a call: compiled once they pay (_config.Tier).
    def forward_tier(self, dr):
        return _config.tier(lstm_forward_overlapped, (dr.dtype.char, dr.lstm_variant))

    def backward_tier(self, dr):
        return _config.tier(lstm_backward_overlapped, (dr.dtype.char, dr.lstm_variant))

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        (h0, c0), (hn, cn) = s0, sn
        whh_tb = dr.blocks_t("whh_tb", dr.w_hh)
        if dr.w_hr is not None:
            lstmp_forward(x, wih_tb, bias, block, xw, whh_tb, dr.blocks_t("whr_tb", dr.w_hr), h0,
                          c0, lengths, dr.rev, dr.chunk, dr.exact, y, ycol, hn, cn, gates, aux)
            return
        variant = _variant(dr, pre)
        if overlap:
            t, B, _ = x.shape
            args = (x, wih_tb, bias, OVERLAP_PROJECT_STEPS, np.empty((t, B, dr.G), dtype=dr.dtype),
                    whh_tb, h0, c0, lengths, dr.rev, dr.exact, y, ycol, hn, cn, gates, aux,
                    variant)
            tier = self.forward_tier(dr)
            if tier.use(*args):
                lstm_forward_overlapped(*args)
                return
            # not compiled (found at a first call): the same work on one thread
            _config.kernel_threads(1)
            start = _config.clock()
        lstm_forward(x, wih_tb, bias, block, xw, whh_tb, h0, c0, lengths, dr.rev, dr.chunk,
                     dr.exact, y, ycol, hn, cn, gates, aux, variant)
        if overlap:
            tier.spent(_config.clock() - start)

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        t, B, G = gates.shape
        (dh, dc), (h0, c0), (dh0, dc0) = ds, s0, g.ds0
        whh_b = dr.blocks("whh_b", dr.w_hh)
        g.cs = aux
        if dr.w_hr is not None:
            g.dhproj = np.empty((t, B, dr.P), dtype=dr.dtype)
            g.full = np.empty((t, B, dr.H), dtype=dr.dtype)
            lstmp_backward(dy, dycol, dh, dc, whh_b, dr.blocks("whr_b", dr.w_hr), gates, aux, y,
                           ycol, h0, c0, lengths, dr.rev, dr.chunk, dr.exact, g.dgx, g.hprev, dh0,
                           dc0, g.dhproj, g.full)
            return
        peeps = dr.peep.shape[0] > 0
        g.cprev = np.empty((t, B, dr.H), dtype=dr.dtype) if peeps else _empty3(dr.dtype)
        args = (dy, dycol, dh, dc, whh_b, gates, aux, y, ycol, h0, c0, lengths, dr.rev)
        variant = _variant(dr, pre)
        if plan is not None:
            products, dx, init = acc.overlapped_products(grid, layer_in, plan)
            over = (*args, dr.exact, g.dgx, g.hprev, dh0, dc0, variant, g.cprev, *products)
            tier = self.backward_tier(dr)
            if tier.use(*over):
                acc.first = False
                g.dx = dx
                lstm_backward_overlapped(*over)
                self.add_grads(acc, grid, g, g.dgx.reshape(t * B, G), not dr.rev, init)
            else:
                # not compiled (found at a first call): the kernel on one
                # thread, the products after it
                _config.kernel_threads(1)
                start = _config.clock()
                lstm_backward(*args, dr.chunk, dr.exact, g.dgx, g.hprev, dh0, dc0, variant,
                              g.cprev)
                tier.spent(_config.clock() - start)
        else:
            lstm_backward(*args, dr.chunk, dr.exact, g.dgx, g.hprev, dh0, dc0, variant, g.cprev)
        if not peeps:
            g.cprev = None

    def grads_setup(self, acc, with_bias):
        dr = acc.dir
        acc.dpeep = np.empty(3 * dr.H, dtype=dr.dtype) if dr.peep.shape[0] else None
        acc.dw_hr = None if dr.w_hr is None else np.empty(dr.w_hr.shape, dtype=dr.dtype)

    def add_grads(self, acc, grid, g, h2, desc, init):
        """The peephole or projection weights' gradients; ``h2`` (rows, 4H) the LSTM's ``dgx``."""
        if acc.dw_hr is not None:
            # dW_hr = sum over steps of dh_t (o ⊙ tanh c_t)^T
            rows = h2.shape[0]
            P, H = acc.dw_hr.shape
            weight_product(g.dhproj.reshape(rows, P), g.full.reshape(rows, H), acc.dw_hr,
                           grid.rows, grid.parts(P, H, rows), desc, init)
        if acc.dpeep is None:
            return
        # p_i and p_f multiply c_{t-1}, p_o multiplies c_t; padded steps
        # hold zeros in every operand.
        rows = h2.shape[0]
        H = acc.dir.H
        cp = g.cprev.reshape(rows, H)
        prod = np.empty((rows, 3 * H), dtype=h2.dtype)
        np.multiply(h2[:, :H], cp, out=prod[:, :H])
        np.multiply(h2[:, H:2 * H], cp, out=prod[:, H:2 * H])
        np.multiply(h2[:, 3 * H:], g.cs.reshape(rows, H), out=prod[:, 2 * H:])
        colsum(prod, acc.dpeep, grid.rows, desc, init)

    def finish_grads(self, acc, out):
        if acc.dpeep is not None:
            out["weight_peep"] = acc.dpeep.reshape(3, acc.dir.H)
        if acc.dw_hr is not None:
            out["weight_hr"] = acc.dw_hr

    def memory(self, H, options):
        # with peepholes c_{t-1} per step, then the peephole products (3H);
        # projected: each step's dh_t (P) and o ⊙ tanh(c_t) (H), W_hr's
        # operands; the cell states are kept to the end of a segment (the
        # peephole gradients read them after the kernel)
        peep = bool(options.get("peephole", False))
        P = options.get("proj_size", 0)
        return (H if peep else 0) + (P + H if P else 0), (3 * H if peep else 0), H


def _variant(dr, pre):
    """The kernels' ``variant`` argument: None for the plain LSTM, else its options and ``pre``."""
    return (dr.peep, dr.coupled, dr.clip, pre) if dr.lstm_variant else None


CELL = LSTMCell()
