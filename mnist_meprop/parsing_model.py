"""The paper's parser: Chen & Manning's 48 embedded features and an MLP whose hidden and output
layers all use meProp with the same k."""

from __future__ import annotations

import torch
from torch import nn

from .model import build_mlp, initialize
from .ops import is_meprop_active

EMBEDDING_DIM, N_FEATURES = 50, 48


class Cube(nn.Module):
    """Chen & Manning's activation, ``x ** 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * x


CHEN_MANNING_INIT = 0.01  # their uniform(-0.01, 0.01) for embeddings and weights, which the cube needs


class Parser(nn.Module):
    """One embedding table for words, tags and arc labels (50 dimensions each; the 48 feature indices
    are offset into it), 48 x 50 = 2,400 inputs, ``n_layer - 1`` hidden layers of ``d_hidden`` and an
    output layer over the transitions. ``forward(features [B, 48])`` returns transition scores ``[B, T]``.

    ``activation``: ``cube`` is Chen & Manning's, with their initialisation (embeddings and weights
    uniform(-0.01, 0.01)); ``relu`` keeps torch's (or ``init``'s) initialisation. The meProp paper
    does not say which its parser used; with ReLU, per-example k=20 does not train here.

    ``output_k`` is the output layer's k: ``None`` is the paper's setting (the hidden layers' ``k``),
    0 a dense output layer."""

    def __init__(self, n_embeddings: int, n_transitions: int, d_hidden: int, n_layer: int, k: int,
                 unified: bool = False, selection: str = "topk", dropout: float = 0.0,
                 bias_grad: str = "masked", init: str = "torch", activation: str = "relu",
                 output_k: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_embeddings, EMBEDDING_DIM)
        active = is_meprop_active(k, d_hidden)
        output_k = k if output_k is None else output_k
        self.mlp = build_mlp(EMBEDDING_DIM * N_FEATURES, n_transitions, d_hidden, n_layer, k, unified, selection,
                             dropout, sparse_grad=active, bias_grad=bias_grad,
                             output_k=output_k if is_meprop_active(output_k, n_transitions) else 0,
                             activation=Cube if activation == "cube" else nn.ReLU)
        initialize(self.mlp, init)
        if activation == "cube":
            with torch.no_grad():
                for tensor in (self.embed.weight, *(m.weight for m in self.mlp if isinstance(m, nn.Linear))):
                    tensor.uniform_(-CHEN_MANNING_INIT, CHEN_MANNING_INIT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(inputs).reshape(len(inputs), -1))
