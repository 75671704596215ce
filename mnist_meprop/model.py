"""The paper's MLP: meProp hidden layers, ReLU, dropout, and a dense output layer."""

from __future__ import annotations

from torch import nn

from .config import Config
from .layers import MePropLinear
from .ops import is_meprop_active


def build_mlp(d_input: int, n_classes: int, d_hidden: int, n_layer: int, k: int,
              unified: bool = False, selection: str = "topk", dropout: float = 0.0,
              sparse_grad: bool = False) -> nn.Sequential:
    """``n_layer`` linear layers counting the output layer: (meProp linear, ReLU, dropout) per hidden layer.

    The output layer is a plain (dense, ``k=0``) ``MePropLinear``: ordinary backprop, but its
    backward runs through the same timed code path as the hidden layers, so the linear
    backward time covers every linear layer for meProp and the dense baseline alike.
    ``sparse_grad`` makes the hidden meProp layers return row-sparse gradients.
    """
    layers: list[nn.Module] = []
    width = d_input
    for _ in range(n_layer - 1):
        layers += [MePropLinear(width, d_hidden, k, unified=unified, selection=selection, sparse_grad=sparse_grad),
                   nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = d_hidden
    layers.append(MePropLinear(width, n_classes, k=0))
    return nn.Sequential(*layers)


def build_model(config: Config, d_input: int, n_classes: int) -> nn.Sequential:
    """The MLP described by ``config`` for data with ``d_input`` features and ``n_classes`` labels."""
    return build_mlp(d_input, n_classes, config.d_hidden, config.n_layer, config.k,
                     config.unified, config.selection, config.dropout,
                     sparse_grad=is_meprop_active(config.k, config.d_hidden))
