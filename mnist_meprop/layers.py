"""Drop-in meProp layers: ``MePropLinear`` (``torch.nn.Linear``), ``MePropLSTM`` and ``MePropLSTMCell``
(``torch.nn.LSTM`` / ``LSTMCell``), whose backward keeps only the top-k of each output gradient."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .lstm_ops import meprop_lstm
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
        _check_choices(selection, bias_grad)
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
        return f"{super().extra_repr()}, {_meprop_repr(self)}"


def _meprop_repr(layer: nn.Module) -> str:
    """The meProp settings of a layer, for its ``repr``."""
    mode = "unified" if layer.unified else "per_example"
    return (f"k={layer.k}, mode={mode}, selection={layer.selection}"
            + (f", bias_grad={layer.bias_grad}" if layer.bias_grad != "masked" else ""))


def _check_choices(selection: str, bias_grad: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if bias_grad not in BIAS_GRADS:
        raise ValueError(f"bias_grad must be one of {BIAS_GRADS}, got {bias_grad!r}")


class MePropLSTM(nn.LSTM):
    """``torch.nn.LSTM`` (one layer, one direction) with a meProp backward.

    Same parameters (``weight_ih_l0 [4H, I]``, ``weight_hh_l0 [4H, H]``, ``bias_ih_l0``,
    ``bias_hh_l0``), initialisation and ``state_dict`` as ``nn.LSTM``; the same call:
    ``output, (h_n, c_n) = lstm(input, (h_0, c_0))`` with ``batch_first`` and unbatched input.
    The backward keeps, at every time step, ``k`` entries of each gate's pre-activation
    gradient (per example, or shared by the minibatch with ``unified``); see
    :mod:`mnist_meprop.lstm_ops`. ``k <= 0`` or ``k >= hidden_size`` is plain backprop: torch's
    own LSTM, except inside :func:`mnist_meprop.time_linear_backward`, where it runs the same
    timed path as meProp. ``sparse_grad=True`` gives the weights and biases row-sparse COO
    gradients of the kept gate rows (per-example top-k on the CPU; see
    :func:`mnist_meprop.lstm_ops.meprop_lstm`), for the row-sparse optimizers of
    :mod:`mnist_meprop.optim`.
    """

    def __init__(self, input_size: int, hidden_size: int, k: int, unified: bool = False, selection: str = "topk",
                 bias: bool = True, batch_first: bool = False, bias_grad: str = "masked", sparse_grad: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        _check_choices(selection, bias_grad)
        super().__init__(input_size, hidden_size, num_layers=1, bias=bias, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.k, self.unified, self.selection, self.bias_grad = int(k), bool(unified), selection, bias_grad
        self.sparse_grad = bool(sparse_grad)

    @property
    def meprop_active(self) -> bool:
        return is_meprop_active(self.k, self.hidden_size)

    def forward(self, input, hx=None):  # noqa: A002 (nn.LSTM's own argument name)  # type: ignore[override]
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError("MePropLSTM takes padded tensors, not a PackedSequence")
        if not self.meprop_active and ops._active_clock is None:
            return super().forward(input, hx)
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        if hx is None:
            zeros = x.new_zeros(x.shape[1], self.hidden_size)
            hx = (zeros, zeros)
        else:  # nn.LSTM's (1, N, H), or (1, H) unbatched
            hx = tuple(state.reshape(x.shape[1], self.hidden_size) for state in hx)
        out, (h, c) = meprop_lstm(x, hx, self.weight_ih_l0, self.weight_hh_l0, getattr(self, "bias_ih_l0", None),
                                  getattr(self, "bias_hh_l0", None), self.k, self.unified, self.selection,
                                  self.bias_grad, self.sparse_grad)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            return out.squeeze(1), (h, c)
        return out, (h.unsqueeze(0), c.unsqueeze(0))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_meprop_repr(self)}"


class MePropLSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` with the meProp backward of :class:`MePropLSTM` (one time step):
    same parameters, initialisation and ``state_dict``; ``h, c = cell(x, (h, c))``."""

    def __init__(self, input_size: int, hidden_size: int, k: int, unified: bool = False, selection: str = "topk",
                 bias: bool = True, bias_grad: str = "masked", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        _check_choices(selection, bias_grad)
        super().__init__(input_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self.k, self.unified, self.selection, self.bias_grad = int(k), bool(unified), selection, bias_grad

    def forward(self, input, hx=None):  # noqa: A002  # type: ignore[override]
        if not is_meprop_active(self.k, self.hidden_size) and ops._active_clock is None:
            return super().forward(input, hx)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        _, (h, c) = meprop_lstm(x.unsqueeze(0), hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                self.k, self.unified, self.selection, self.bias_grad)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
