"""What the driver needs to know about a recurrent cell: :class:`Cell`.

A cell is one object, registered by name (:mod:`fastgates.cells`), that
says everything that differs between cells: the rows of its weights (its
gates), its state arrays, which gate is its forget gate, the options it
takes, how it folds its biases into the input projection, its compiled
forward and backward kernels and what they keep, the parameter gradients
beyond the four every cell has, and its memory formula.  The driver
(:mod:`fastgates._recurrent`), the layers, ``training_memory``,
``gates()``, :mod:`fastgates.io` and the gate analysis read these and never
branch on the cell's name; a new cell is one module with a subclass.

Every cell has ``weight_ih`` ``(G, I)``, ``weight_hh`` ``(G, H)`` and, with
``bias``, ``bias_ih`` and ``bias_hh`` ``(G,)``, with ``G = len(gates) * H``;
the input projection of all steps ``x W_ih^T + bias`` is the driver's (its
register tiles), the recurrence the cell's kernels.
"""

import numpy as np

from .._linalg import weight_product


class Cell:
    """The description of one recurrent cell (subclass it; one instance per cell).

    Attributes
    ----------
    name : str
        Registry key, ``"lstm"``.
    label : str
        Name in messages, ``"LSTM"``.
    gates : tuple of str
        Gate names in the order of the weights' rows (``H`` rows each): the
        keys of ``gates()``.
    states : tuple of str
        The state arrays, each ``(L*D, B, H)``, in the order of the state
        tuple users pass: ``("h",)`` is one array, not a tuple.
    forget : str
        The gate whose value is the fraction of the state kept at a step
        (the gate analysis and the forget-bias initialiser read it).
    forget_name : str
        How messages and plots name it (``"forget gate f"``).
    forget_complement : bool
        The memory is ``1 - forget`` rather than ``forget`` (GRU's ``z`` is
        the kept fraction itself: False; an MGU's ``f``: True).
    input_gate : str or None
        A gate of its own for the input, whose bias chrono initialisation
        sets to minus the forget bias (LSTM: ``"i"``); None where the
        input's share follows from the forget gate.
    shown : tuple of str
        Names under which ``gates()`` also shows the tape's per-step ``aux``
        array (LSTM: the cell state ``"c"``); empty: not shown.
    aux_units : int
        Width of the tape's per-step ``aux`` array in units of ``H``.
    params : tuple of str
        Base names of the cell's parameters beyond ``weight_ih``,
        ``weight_hh``, ``bias_ih`` and ``bias_hh`` (each with the layer
        suffix), handed to :meth:`setup` when the model has them.
    side_by_side : bool
        The backward kernel leaves ``dgx`` as the recurrent side's gradient,
        so the weight-gradient products of both sides may run side by side
        (:meth:`fastgates._recurrent._WeightGrads.add_side_by_side`).
    recurrent : bool
        The cell has recurrent weights ``weight_hh`` (the default); False
        (minGRU, minLSTM): its gates see only the input, it has
        ``weight_ih`` and ``bias_ih`` only (:meth:`param_shapes`), the
        backward kernel leaves no ``hprev`` and there is no ``dW_hh``.
    fuses_projection : bool
        The forward kernel can make the input projection itself, a block of
        steps at a time (:meth:`fastgates._recurrent._Direction.fused`);
        False: it is always given ``xw``.
    gates_in_projection : bool
        The forward kernel turns the input projection ``xw`` into the gates
        in place, so that the tape keeps ``xw`` itself as ``gates`` (only
        with ``fuses_projection`` False); default False.
    initial : tuple of float
        The value of each state array, in the order of ``states``, when the
        caller passes none (``state=None`` or a part of it None); empty:
        0 for every state.
    minus_inf : tuple of str
        States that may hold ``-inf`` as a legitimate value (an sLSTM's
        stabiliser ``m`` before the first step): ``check_finite`` lets it
        through there, and only there.
    """

    name = None
    label = None
    gates = ()
    states = ("h",)
    forget = None
    forget_name = None
    forget_complement = False
    input_gate = None
    shown = ()
    aux_units = 1
    params = ()
    side_by_side = False
    recurrent = True
    fuses_projection = True
    gates_in_projection = False
    initial = ()
    minus_inf = ()

    # -- the driver's hooks -----------------------------------------------

    def input_bias(self, b_ih, b_hh, H):
        """The bias folded into the input projection (default ``b_ih + b_hh``)."""
        return np.add(b_ih, b_hh)

    def setup(self, direction, params, variant):
        """Per layer-direction set-up, once per model and call settings.

        ``params`` the direction's parameters by base name
        (``"weight_ih"`` ...), ``variant`` the :class:`~fastgates._recurrent.Variant`.
        Stores on ``direction`` whatever the kernels need beyond the four
        weights (default nothing).
        """

    def overlap(self, direction, t, B, fused):
        """Whether the forward pass of a batch that is one chunk runs on two
        threads, the second making the input projection ahead (default no)."""
        return False

    def forward_tier(self, direction):
        """The :class:`~fastgates._config.Tier` of the kernel :meth:`overlap`
        runs, when it is one, else None (default): while the tier's kernel
        is known not to be compiled, the call runs without the overlap."""
        return None

    def backward_tier(self, direction):
        """The :class:`~fastgates._config.Tier` of the backward kernel that
        makes the products beside it (default None; see :meth:`forward_tier`)."""
        return None

    def forward(self, dr, x, wih_tb, bias, block, xw, s0, lengths, y, ycol, sn, gates, aux, pre,
                overlap):
        """Run the forward kernel of layer-direction ``dr`` (a
        :class:`~fastgates._recurrent._Direction`).

        ``x``, ``wih_tb``, ``bias``, ``block``: the layer input (t, B, I),
        ``W_ih^T`` in column blocks, the folded bias and the steps per
        block, when the kernel makes the input projection itself (``xw``
        empty); else ``xw`` (t, B, G) is the projection and those are
        empty.  ``s0``, ``sn``: the initial and final states (tuples of
        (B, H), ``sn`` to fill); ``y`` and ``ycol``: the output and the
        column where this direction writes; ``gates``, ``aux``, ``pre``:
        what the tape keeps (empty when nothing is kept); ``overlap``:
        :meth:`overlap` said yes.
        """
        raise NotImplementedError

    def backward(self, dr, dy, dycol, ds, gates, aux, pre, y, ycol, s0, lengths, g, plan, acc,
                 grid, layer_in):
        """Run the backward kernel of layer-direction ``dr``.

        ``dy``, ``dycol``: the output gradient and this direction's column;
        ``ds``: the final state's gradient (a tuple); what the forward pass
        kept (``gates``, ``aux``, ``pre``, ``y``, ``ycol``, ``s0``,
        ``lengths``).  Fills ``g`` (a :class:`~fastgates._recurrent._StepGrads`):
        ``dgx``, ``hprev``, ``ds0`` and whatever :meth:`add_grads` reads.
        ``plan``, ``acc``, ``grid``, ``layer_in``: the products to make
        beside the kernel (``plan`` None: none; only with ``side_by_side``).
        """
        raise NotImplementedError

    def grads_setup(self, acc, with_bias):
        """Make the cell's own gradient sums on ``acc`` (a
        :class:`~fastgates._recurrent._WeightGrads`), default none."""

    def recurrent_side(self, acc, g):
        """Turn ``g.dgx`` into the recurrent side's gradient (default: as it is)."""

    def recurrent_grad(self, acc, grid, h2, hprev, desc, init):
        """Add a run of blocks to ``acc.dw_hh``, the gradient of ``weight_hh``.

        ``h2`` (rows, G) is the recurrent side's gradient, ``hprev``
        (rows, P) the states the recurrent weights multiplied.  Default: the
        one product ``h2^T hprev`` of a full ``weight_hh`` (G, P); a cell
        whose ``weight_hh`` is stored otherwise (an sLSTM's block-diagonal
        heads) makes its own.  A cell with ``side_by_side`` must keep the
        default (those products run in
        :meth:`~fastgates._recurrent._WeightGrads.add_side_by_side`).
        """
        rows, G = h2.shape
        P = hprev.shape[1]
        weight_product(h2, hprev, acc.dw_hh, grid.rows, grid.parts(G, P, rows), desc, init)

    def add_grads(self, acc, grid, g, h2, desc, init):
        """Add the cell's own gradients of a run of blocks (``h2`` the
        recurrent side's gradient as (rows, G)); default none."""

    def finish_grads(self, acc, out):
        """Complete ``out`` (base name -> gradient) from ``acc``; default nothing."""

    def memory(self, H, options):
        """Per-row sizes of the memory formula (see ``training_memory``).

        Returns ``(grads, extra, aux_to_end)``: values per step and row the
        backward kernel returns beyond ``hprev`` (H) and ``dgx`` (G); values
        per row made after ``dx`` exists (its own gradient products); and
        values per row of a checkpointed segment the backward pass keeps to
        the end of the segment (default 0, 0, 0).
        """
        return 0, 0, 0

    # -- derived sizes ---------------------------------------------------------

    def initial_value(self, j):
        """The value of state array ``j`` (index into ``states``) when none is given."""
        return self.initial[j] if self.initial else 0.0

    def rows(self, H):
        """Rows of ``weight_ih`` and ``weight_hh``: ``len(gates) * H``."""
        return len(self.gates) * H

    def state_units(self, H, options):
        """The width of each state array, in the order of ``states`` (default ``H`` each).

        The first is ``h``'s, which is also the width of a direction's
        output and of the recurrent weights' columns (an LSTM with
        ``proj_size=P``: ``(P, H)``).
        """
        return (H,) * len(self.states)

    def param_shapes(self, input_size, H, options, bias):
        """One layer-direction's parameters by base name, in PyTorch's order.

        ``weight_ih`` ``(G, I)``, ``weight_hh`` ``(G, P)`` (``P`` the width
        of ``h``) and, with ``bias``, ``bias_ih`` and ``bias_hh`` ``(G,)``;
        a cell adds its own after them.
        """
        G = self.rows(H)
        shapes = {"weight_ih": (G, input_size), "weight_hh": (G, self.state_units(H, options)[0])}
        if bias:
            shapes["bias_ih"] = (G,)
            shapes["bias_hh"] = (G,)
        return shapes

    def __repr__(self):
        return f"<cell {self.name}>"
