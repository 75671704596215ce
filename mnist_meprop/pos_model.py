"""The paper's POS tagger: word and feature embeddings, a meProp LSTM, a dense output layer."""

from __future__ import annotations

import torch
from torch import nn

from .layers import MePropLinear, MePropLSTM
from .ops import is_meprop_active

WORD_DIM, FEATURE_DIM = 50, 20


class PosTagger(nn.Module):
    """Per word: a 50-dimensional word embedding and 7 feature embeddings of 20 (190 inputs), a
    one-layer :class:`MePropLSTM` of ``d_hidden`` units, dropout, and a dense output layer over the
    tags (the paper does not apply meProp to it; it is a ``k=0`` :class:`MePropLinear`, so its
    backward is timed on the same path as the LSTM's). With meProp on, the LSTM's weights get
    row-sparse gradients, so the configured ``sparse_update`` applies to them as to the MLP's.

    ``forward(inputs [B, L, 8])`` (word index, then 7 feature indices) returns the tag scores of
    every position, ``[B * L, n_tags]``.
    """

    def __init__(self, n_words: int, feature_sizes: tuple[int, ...], n_tags: int, d_hidden: int, k: int,
                 unified: bool = False, selection: str = "topk", dropout: float = 0.0,
                 bias_grad: str = "masked") -> None:
        super().__init__()
        self.words = nn.Embedding(n_words, WORD_DIM)
        self.features = nn.ModuleList(nn.Embedding(size, FEATURE_DIM) for size in feature_sizes)
        self.lstm = MePropLSTM(WORD_DIM + FEATURE_DIM * len(feature_sizes), d_hidden, k, unified, selection,
                               batch_first=True, bias_grad=bias_grad, sparse_grad=is_meprop_active(k, d_hidden))
        self.dropout = nn.Dropout(dropout)
        self.out = MePropLinear(d_hidden, n_tags, k=0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        embedded = torch.cat([self.words(inputs[..., 0])]
                             + [table(inputs[..., 1 + i]) for i, table in enumerate(self.features)], dim=-1)
        hidden, _ = self.lstm(embedded)
        scores = self.out(self.dropout(hidden))
        return scores.reshape(-1, scores.shape[-1])
