"""fastgates: LSTM and GRU networks for NumPy, compiled with Numba.

NumPy arrays in, NumPy arrays out; PyTorch's semantics and parameter layout;
forward and backward passes compiled for the CPU.
"""

from ._config import get_activation_mode, get_num_threads, set_activation_mode, set_num_threads
from .layers import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "set_num_threads", "get_num_threads",
           "set_activation_mode", "get_activation_mode"]
__version__ = "0.1.0"
