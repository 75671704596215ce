"""mnist-meprop: meProp (minimal-effort back propagation) layers and the paper's MNIST experiments."""

from .config import Config, load_config
from .convert import convert
from .layers import MePropLinear, MePropLSTM, MePropLSTMCell
from .model import build_mlp
from .ops import meprop_linear, time_linear_backward

__all__ = ["Config", "MePropLSTM", "MePropLSTMCell", "MePropLinear", "build_mlp", "convert", "load_config", "meprop_linear", "time_linear_backward"]
__version__ = "0.1.0"
