"""The GRU cell on the shared driver (kernels: :mod:`fastgates._gru`).

Rows r, z, n; state ``h``; the tape keeps ``W_hn h + b_hn`` as its ``aux``
array.  Option ``reset_after`` (default True, PyTorch's form; False: Keras'
classic form, ``n = tanh(W_in x + b_in + W_hn (r ⊙ h) + b_hn)``).  The
input projection carries ``b_ir + b_hr`` and ``b_iz + b_hz``; ``b_hn``
stays inside the reset, so ``bias_hh`` has a gradient of its own.
"""

import numpy as np

from .._gru import gru_backward, gru_forward
from .._linalg import colsum, weight_product
from .._recurrent import _empty3
from .base import Cell


class GRUCell(Cell):
    name = "gru"
    label = "GRU"
    gates = ("r", "z", "n")
    states = ("h",)
    forget = "z"
    forget_name = "update gate z"

    def input_bias(self, b_ih, b_hh, H):
        # b_hr and b_hz join the input projection; b_hn stays inside the reset.
        return np.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H:]])

    def setup(self, dr, params, variant):
        H = dr.H
        dr.reset_after = bool(variant.options.get("reset_after", True))
        b_hh = params.get("bias_hh")
        # a copy: Numba types a view of the (read-only) parameter apart from
        # the writable zeros of a GRU without biases, which would then
        # compile every kernel again
        dr.bhn = np.zeros(H, dr.dtype) if b_hh is None else b_hh[2 * H:].copy()

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        H = dr.H
        if dr.reset_after:
            wa_tb = dr.blocks_t("whh_tb", dr.w_hh)
        else:
            wa_tb = dr.blocks_t("wrz_tb", dr.w_hh[: 2 * H])
        # reset_after passes None: the kernel then compiles the code of that form only
        wn_tb = None if dr.reset_after else dr.blocks_t("wn_tb", dr.w_hh[2 * H:])
        gru_forward(x, wih_tb, bias, block, xw, wa_tb, wn_tb, dr.bhn, s0[0], lengths, dr.rev,
                    dr.chunk, dr.exact, y, ycol, sn[0], gates, aux, _clipping(dr, pre))

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        # The recurrent side's gradient is made from dgx in place, once dgx
        # has served the input side (recurrent_side).
        t, B, _ = gates.shape
        H = dr.H
        g.gates = gates
        if dr.reset_after:
            wa_b = dr.blocks("whh_b", dr.w_hh)
            rhprev = _empty3(dr.dtype)
        else:
            wa_b = dr.blocks("wrz_b", dr.w_hh[: 2 * H])
            rhprev = g.rhprev = np.empty((t, B, H), dtype=dr.dtype)
        wn_b = None if dr.reset_after else dr.blocks("wn_b", dr.w_hh[2 * H:])
        gru_backward(dy, dycol, ds[0], wa_b, wn_b, gates, aux, y, ycol, s0[0], lengths, dr.rev,
                     dr.chunk, g.dgx, g.hprev, rhprev, g.ds0[0], _clipping(dr, pre))

    def grads_setup(self, acc, with_bias):
        dr = acc.dir
        H = dr.H
        # reset_after=False: W_hn's gradient, (H, H), from the n part.
        acc.dw_hn = None if dr.reset_after else np.empty((H, H), dtype=dr.dtype)
        acc.db_hh = np.empty(dr.G, dtype=dr.dtype) if with_bias else None

    def recurrent_side(self, acc, g):
        # reset_after: the n part times r, the kernel's own product
        if acc.dir.reset_after:
            H = acc.dir.H
            dn = g.dgx[:, :, 2 * H:]
            np.multiply(dn, g.gates[:, :, :H], out=dn)

    def add_grads(self, acc, grid, g, h2, desc, init):
        H = acc.dir.H
        if acc.dw_hn is not None:
            # W_hn acts on r * h, not on h; only the n part's product is
            # needed (a copy of those columns: the product over all 3H rows
            # cost twice its size more).
            rows = h2.shape[0]
            dn = np.ascontiguousarray(h2[:, 2 * H:])
            weight_product(dn, g.rhprev.reshape(rows, H), acc.dw_hn, grid.rows,
                           grid.parts(H, H, rows), desc, init)
        if acc.db_hh is not None:
            colsum(h2, acc.db_hh, grid.rows, desc, init)

    def finish_grads(self, acc, out):
        if acc.dw_hn is not None:
            out["weight_hh"][2 * acc.dir.H:] = acc.dw_hn

    def memory(self, H, options):
        # reset_after=False: r * h_{t-1} per step, then the n part copied
        # for W_hn's gradient (a GRU's recurrent-side gradient is made in
        # dgx's place)
        classic = not options.get("reset_after", True)
        return (H if classic else 0), (H if classic else 0), 0


def _clipping(dr, pre):
    """The kernels' ``clipping`` argument: None, or the bound and the kept pre-activations."""
    return (dr.clip, pre) if dr.clipping else None


CELL = GRUCell()
