"""The paper's MLP: meProp hidden layers, ReLU, dropout, and a dense output layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config, output_layer_k
from .layers import MePropLinear
from .ops import is_meprop_active


def build_mlp(d_input: int, n_classes: int, d_hidden: int, n_layer: int, k: int,
              unified: bool = False, selection: str = "topk", dropout: float = 0.0,
              sparse_grad: bool = False, bias_grad: str = "masked", output_k: int = 0,
              activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``n_layer`` linear layers counting the output layer: (meProp linear, ReLU, dropout) per hidden layer.

    The output layer is a plain (dense, ``k=0``) ``MePropLinear``: ordinary backprop, but its
    backward runs through the same timed code path as the hidden layers, so the linear
    backward time covers every linear layer for meProp and the dense baseline alike.
    ``sparse_grad`` makes the hidden meProp layers return row-sparse gradients; ``bias_grad``
    (``masked`` or ``full``) is their bias gradient (see :func:`mnist_meprop.meprop_linear`).
    ``output_k`` > 0 applies meProp to the output layer too (the paper's parser), with the same
    mode, selection and sparse gradients as the hidden layers. ``activation`` is the hidden
    layers' nonlinearity (a module class).
    """
    layers: list[nn.Module] = []
    width = d_input
    for _ in range(n_layer - 1):
        layers += [MePropLinear(width, d_hidden, k, unified=unified, selection=selection, sparse_grad=sparse_grad,
                                bias_grad=bias_grad),
                   activation()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = d_hidden
    if output_k:
        layers.append(MePropLinear(width, n_classes, output_k, unified=unified, selection=selection,
                                   sparse_grad=sparse_grad, bias_grad=bias_grad))
    else:
        layers.append(MePropLinear(width, n_classes, k=0))
    return nn.Sequential(*layers)


@torch.no_grad()
def initialize(model: nn.Module, scheme: str) -> None:
    """Re-initialise every linear layer of ``model`` in place, from torch's global generator.

    ``torch`` keeps ``nn.Linear``'s own initialisation. ``authors-csharp`` is the authors' C#
    program: weights N(0, std = sqrt(6 / (fan_in + fan_out))), biases 0. ``authors-pytorch`` is
    their PyTorch code: weights and biases uniform(-1/sqrt(out), 1/sqrt(out)).
    """
    if scheme == "torch":
        return
    for layer in (module for module in model.modules() if isinstance(module, nn.Linear)):
        fan_out, fan_in = layer.weight.shape
        if scheme == "authors-csharp":
            layer.weight.normal_(0.0, math.sqrt(6.0 / (fan_in + fan_out)))
            if layer.bias is not None:
                layer.bias.zero_()
        elif scheme == "authors-pytorch":
            bound = 1.0 / math.sqrt(fan_out)
            layer.weight.uniform_(-bound, bound)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound)
        else:
            raise ValueError(f"init must be torch, authors-csharp or authors-pytorch, got {scheme!r}")


def build_model(config: Config, d_input: int, n_classes: int) -> nn.Sequential:
    """The MLP described by ``config`` for data with ``d_input`` features and ``n_classes`` labels."""
    model = build_mlp(d_input, n_classes, config.d_hidden, config.n_layer, config.k,
                      config.unified, config.selection, config.dropout,
                      sparse_grad=is_meprop_active(config.k, config.d_hidden), bias_grad=config.bias_grad,
                      output_k=output_layer_k(config))
    initialize(model, config.init)
    return model
