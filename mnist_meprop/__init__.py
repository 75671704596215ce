"""mnist-meprop: meProp (minimal-effort back propagation) layers and the paper's MNIST experiments."""

from .config import Config, load_config
from .layers import MePropLinear
from .model import build_mlp
from .ops import meprop_linear, time_linear_backward

__all__ = ["Config", "MePropLinear", "build_mlp", "load_config", "meprop_linear", "time_linear_backward"]
__version__ = "0.1.0"
