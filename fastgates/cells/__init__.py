"""The recurrent cells, one module each, by name.

Each module defines a :class:`~fastgates.cells.base.Cell` subclass and its
instance ``CELL``; :func:`get` finds it by name.  What a cell is made of and
what the driver asks of it: :mod:`fastgates.cells.base`.
"""

from .base import Cell
from .gru import CELL as GRU
from .janet import CELL as JANET
from .lstm import CELL as LSTM
from .mgu import CELL as MGU
from .mingru import CELL as MINGRU
from .minlstm import CELL as MINLSTM
from .slstm import CELL as SLSTM

REGISTRY = {cell.name: cell for cell in (LSTM, GRU, JANET, MGU, SLSTM, MINGRU, MINLSTM)}


def get(name):
    """The cell registered as ``name`` (``"lstm"``, ``"gru"``, ``"janet"``, ``"mgu"``, ``"slstm"``,
    ``"mingru"``, ``"minlstm"``)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown cell {name!r}; expected one of {sorted(REGISTRY)}") from None


__all__ = ["Cell", "GRU", "JANET", "LSTM", "MGU", "MINGRU", "MINLSTM", "REGISTRY", "SLSTM", "get"]
