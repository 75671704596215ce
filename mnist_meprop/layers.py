"""``MePropLinear``: a drop-in ``torch.nn.Linear`` whose backward keeps only top-k of ``dy``."""

from __future__ import annotations

import torch
from torch import nn

from .ops import BIAS_GRADS, SELECTIONS, TopkCounter, is_meprop_active, meprop_linear


class MePropLinear(nn.Linear):
    """``torch.nn.Linear`` with a meProp backward.

    Same weight ``[out, in]``, same initialisation and same ``state_dict`` keys as
    ``nn.Linear``, so a trained ``nn.Linear`` state loads into it and back. The forward is
    unchanged; the backward follows :func:`mnist_meprop.meprop_linear` with this layer's
    ``k``, ``unified``, ``selection`` and ``bias_grad`` (``masked``: the bias gradient is the
    masked ``dy``'s, ``full``: the full ``dy``'s, as the authors' code). ``k <= 0`` or ``k >= out_features`` is plain
    backprop. ``sparse_grad=True`` makes the weight and bias gradients sparse COO tensors of
    the selected rows (like ``nn.Embedding(sparse=True)``): no dense work in the backward,
    for optimizers that take sparse gradients (see :mod:`mnist_meprop.optim`). While
    ``counter`` holds a :class:`TopkCounter`, training steps record the selected units in it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        k: int,
        unified: bool = True,
        selection: str = "topk",
        bias: bool = True,
        sparse_grad: bool = False,
        bias_grad: str = "masked",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if bias_grad not in BIAS_GRADS:
            raise ValueError(f"bias_grad must be one of {BIAS_GRADS}, got {bias_grad!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.k = int(k)
        self.unified = bool(unified)
        self.selection = selection
        self.sparse_grad = bool(sparse_grad)
        self.bias_grad = bias_grad
        self.counter: TopkCounter | None = None

    @property
    def meprop_active(self) -> bool:
        """False when ``k`` makes this an ordinary linear layer."""
        return is_meprop_active(self.k, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        counter = self.counter if self.training else None
        return meprop_linear(x, self.weight, self.bias, self.k, self.unified, self.selection, self.sparse_grad,
                             counter, self.bias_grad)

    def extra_repr(self) -> str:
        mode = "unified" if self.unified else "per_example"
        return (f"{super().extra_repr()}, k={self.k}, mode={mode}, selection={self.selection}"
                + (f", bias_grad={self.bias_grad}" if self.bias_grad != "masked" else ""))
