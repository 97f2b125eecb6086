"""fastgates: LSTM and GRU networks for NumPy, compiled with Numba.

NumPy arrays in, NumPy arrays out; PyTorch's semantics and parameter layout;
forward and backward passes compiled for the CPU.
"""

from . import datasets, init
from ._config import get_activation_mode, get_num_threads, set_activation_mode, set_num_threads
from .analysis import GateSummary, gate_summary, timescale
from .attention import ForgettingAttention, forgetting_attention, forgetting_attention_vjp
from .io import load, save
from .layers import (GRU, JANET, LSTM, MGU, SLSTM, GRUCell, LSTMCell, MinGRU, MinLSTM, flatten_params,
                     unflatten_params)
from .training import Adam, Linear, Readout, clip_grad_norm, cross_entropy_loss, mse_loss, scipy_objective

__all__ = [
    # models
    "LSTM", "GRU", "JANET", "MGU", "SLSTM", "MinGRU", "MinLSTM", "LSTMCell", "GRUCell", "Linear", "Readout",
    # forgetting attention (Lin et al. 2025)
    "ForgettingAttention", "forgetting_attention", "forgetting_attention_vjp",
    # parameters as one vector (scipy.optimize)
    "flatten_params", "unflatten_params",
    # training
    "mse_loss", "cross_entropy_loss", "Adam", "clip_grad_norm", "scipy_objective", "init",
    # what a model keeps and forgets
    "gate_summary", "GateSummary", "timescale",
    # data
    "datasets",
    # files
    "save", "load",
    # threads and activations
    "set_num_threads", "get_num_threads", "set_activation_mode", "get_activation_mode",
    # other frameworks (imported on first call)
    "from_torch", "to_torch", "to_onnx", "from_onnx", "from_keras", "to_keras",
]
__version__ = "0.1.0"


# Converters.  Each lives in a module that imports its framework
# (fastgates.torch, fastgates.onnx, fastgates.keras); these wrappers import
# it on first call, so that ``import fastgates`` never imports a framework.

def from_torch(module):
    """A fastgates model with the parameters of a PyTorch ``nn.LSTM``, ``nn.GRU``,
    ``nn.LSTMCell`` or ``nn.GRUCell``; see :func:`fastgates.torch.from_torch`."""
    from .torch import from_torch as convert
    return convert(module)


def to_torch(model, **options):
    """The PyTorch module equivalent to a fastgates model; see
    :func:`fastgates.torch.to_torch`."""
    from .torch import to_torch as convert
    return convert(model, **options)


def to_onnx(model, path=None, **options):
    """An ONNX graph of ``LSTM``/``GRU`` nodes computing ``model``; see
    :func:`fastgates.onnx.to_onnx`."""
    from .onnx import to_onnx as convert
    return convert(model, path, **options)


def from_onnx(model_or_path, **options):
    """A fastgates model from the ``LSTM``/``GRU`` node(s) of an ONNX graph; see
    :func:`fastgates.onnx.from_onnx`."""
    from .onnx import from_onnx as convert
    return convert(model_or_path, **options)


def from_keras(layer, **options):
    """A fastgates model from a Keras 3 ``LSTM``/``GRU`` layer or its weights; see
    :func:`fastgates.keras.from_keras`."""
    from .keras import from_keras as convert
    return convert(layer, **options)


def to_keras(model, **options):
    """Keras 3 layer(s) equivalent to a fastgates model; see
    :func:`fastgates.keras.to_keras`."""
    from .keras import to_keras as convert
    return convert(model, **options)
