"""Optimizers for models whose meProp layers return row-sparse gradients.

``sparse_update=False`` (the paper's setting) turns each sparse gradient into a dense one and
runs the stock optimizer, so every parameter is updated every step. ``sparse_update=True``
updates only the rows that got a gradient:

- **sgd** and **adagrad**: the same result as the dense update (rows without a gradient would
  not move and AdaGrad's sum of squares does not decay);
- **adam**: a *lazy* Adam, as ``torch.optim.SparseAdam``: a row's moments are updated only
  when it gets a gradient. In dense Adam, a row with zero gradient keeps moving on its decaying
  first moment and its moments decay; here it neither moves nor decays. The bias correction
  uses the optimizer's global step, as SparseAdam does.

Two of the authors' details live here too: ``adagrad_eps: inside`` (their C# AdaGrad,
``w -= lr * g / sqrt(G + eps)``, instead of torch's ``lr * g / (sqrt(G) + eps)``) and
``grad_clip`` (every gradient element clipped to ``±grad_clip`` before the update).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import Config
from .kernels import cpu_kernels
from .layers import MePropLinear

ADAM_EPS, ADAGRAD_EPS = 1e-8, 1e-6  # the paper's values


def _rows_and_values(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The touched rows (sorted, unique) of a gradient and their values ``[rows, ...]``."""
    if grad.is_sparse:
        rows = grad._indices()[0]
        # meProp layers emit sorted unique rows, but autograd drops the coalesced flag; checking
        # the order is far cheaper than coalescing again. Accumulated gradients get coalesced.
        if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
        return grad._indices()[0], grad._values()
    return torch.arange(grad.shape[0], device=grad.device), grad


class RowSparseOptimizer(torch.optim.Optimizer):
    """Adam (lazy), AdaGrad or SGD that updates only the rows present in each gradient.

    Accepts sparse COO gradients whose sparse dimension is the first (the rows of a weight
    ``[out, in]`` or of a bias ``[out]``), as ``MePropLinear(..., sparse_grad=True)`` returns;
    a dense gradient updates every row.
    """

    def __init__(self, params: Iterable[torch.Tensor], kind: str, lr: float, betas=(0.9, 0.999),
                 eps: float | None = None, adagrad_eps_inside: bool = False) -> None:
        if kind not in ("adam", "adagrad", "sgd"):
            raise ValueError(f"kind must be adam, adagrad or sgd, got {kind!r}")
        eps = eps if eps is not None else (ADAM_EPS if kind == "adam" else ADAGRAD_EPS)
        # eps inside the root: the sum of squares starts at eps and nothing is added outside.
        self.initial_sum = eps if kind == "adagrad" and adagrad_eps_inside else 0.0
        if self.initial_sum:
            eps = 0.0
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.kind = kind

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, values = _rows_and_values(param.grad)
                values = values.contiguous()
                if self.kind == "sgd":
                    param.index_add_(0, rows, values, alpha=-group["lr"])
                    continue
                kernels = cpu_kernels() if param.device.type == "cpu" and param.is_contiguous() else None
                state = self.state[param]
                if self.kind == "adam":
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
                    state["step"] += 1
                    beta1, beta2 = group["betas"]
                    if kernels is not None:
                        kernels.adam_rows(param, state["exp_avg"], state["exp_avg_sq"], rows, values,
                                          group["lr"], beta1, beta2, group["eps"], state["step"])
                    else:
                        _adam_rows(param, state, rows, values, group["lr"], beta1, beta2, group["eps"])
                else:
                    if not state:
                        state["sum"] = torch.full_like(param, self.initial_sum, memory_format=torch.contiguous_format)
                    if kernels is not None:
                        kernels.adagrad_rows(param, state["sum"], rows, values, group["lr"], group["eps"])
                    else:
                        _adagrad_rows(param, state["sum"], rows, values, group["lr"], group["eps"])
        return None


def _adam_rows(param, state, rows, values, lr, beta1, beta2, eps):
    step = state["step"]
    exp_avg = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2 ** step)).add_(eps)
    param.index_add_(0, rows, exp_avg / denom, alpha=-lr / (1 - beta1 ** step))


def _adagrad_rows(param, state_sum, rows, values, lr, eps):
    sums = state_sum.index_select(0, rows).addcmul_(values, values)
    state_sum.index_copy_(0, rows, sums)
    param.index_add_(0, rows, values / sums.sqrt().add_(eps), alpha=-lr)


def stock_optimizer(kind: str, params: Iterable[torch.Tensor], lr: float,
                    adagrad_eps_inside: bool = False) -> torch.optim.Optimizer:
    """Torch's own Adam (paper: betas 0.9/0.999, eps 1e-8; fused where available), AdaGrad (eps 1e-6) or SGD.

    ``adagrad_eps_inside`` gives the C# AdaGrad ``w -= lr * g / sqrt(G + eps)``: torch's AdaGrad
    with the sum of squares starting at eps and no eps added to its root.
    """
    params = list(params)
    if kind == "adam":
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, fused=True)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS)
    if kind == "adagrad":
        if adagrad_eps_inside:
            return torch.optim.Adagrad(params, lr=lr, eps=0.0, initial_accumulator_value=ADAGRAD_EPS)
        return torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS)
    return torch.optim.SGD(params, lr=lr)


@torch.no_grad()
def clip_gradient_elements(params: Iterable[torch.Tensor], bound: float) -> None:
    """Clamp every element of every gradient (dense or sparse COO) to ``[-bound, bound]``, in place."""
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if grad.is_sparse:
            if not grad.is_coalesced():  # duplicate rows are summed first: the clip applies to the total
                grad = param.grad = grad.coalesce()
            grad._values().clamp_(-bound, bound)
        else:
            grad.clamp_(-bound, bound)


class OptimizerGroup:
    """Several optimizers stepped together; gradients are clipped elementwise (with ``grad_clip``)
    and sparse gradients of ``densify`` params made dense first."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], densify: list[torch.Tensor],
                 grad_clip: float | None = None) -> None:
        self.optimizers = optimizers
        self.densify = densify
        self.grad_clip = grad_clip

    def params(self) -> list[torch.Tensor]:
        return [param for optimizer in self.optimizers for group in optimizer.param_groups for param in group["params"]]

    def step(self) -> None:
        if self.grad_clip is not None:
            clip_gradient_elements(self.params(), self.grad_clip)
        for param in self.densify:
            if param.grad is not None and param.grad.is_sparse:
                param.grad = param.grad.to_dense()
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def sparse_grad_params(model: nn.Module) -> list[torch.Tensor]:
    """Parameters of meProp layers that return row-sparse gradients.

    Decided by the layer's settings, not its current size, so the grouping (and with it the
    layout of the optimizer's state) stays the same when meSimp shrinks a layer to k units or fewer.
    """
    return [param for layer in model.modules()
            if isinstance(layer, MePropLinear) and layer.sparse_grad and layer.k > 0
            for param in layer.parameters()]


def build_optimizer(config: Config, model: nn.Module) -> OptimizerGroup:
    """The config's optimizer for ``model``: stock for dense gradients; for row-sparse ones, a
    row-sparse update (``sparse_update: true``) or densify + stock (``false``)."""
    sparse = sparse_grad_params(model)
    sparse_ids = {id(param) for param in sparse}
    dense = [param for param in model.parameters() if id(param) not in sparse_ids]
    eps_inside = config.adagrad_eps == "inside"
    if not config.sparse_update or not sparse:
        return OptimizerGroup([stock_optimizer(config.optimizer, dense + sparse, config.lr, eps_inside)],
                              densify=sparse, grad_clip=config.grad_clip)
    optimizers = [RowSparseOptimizer(sparse, config.optimizer, config.lr, adagrad_eps_inside=eps_inside)]
    if dense:
        optimizers.insert(0, stock_optimizer(config.optimizer, dense, config.lr, eps_inside))
    return OptimizerGroup(optimizers, densify=[], grad_clip=config.grad_clip)
