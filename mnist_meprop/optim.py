"""Optimizers for models whose meProp layers return row-sparse gradients.

``sparse_update`` chooses how a row-sparse gradient is applied:

- ``exact`` (default): only the rows with a gradient are updated, with the result of the dense
  update. For **sgd** and **adagrad** that is immediate (a row without gradient does not move
  and AdaGrad's sum of squares does not decay). For **adam**, a row without gradient still moves
  in dense Adam (on its decaying first moment) and its moments decay; those idle steps are
  applied when the row next gets a gradient, and before anything reads the weights: call
  :meth:`RowSparseOptimizer.flush` (the harness evaluates and saves its best model inside
  :meth:`OptimizerGroup.up_to_date` and flushes at each epoch's end, before its checkpoint; the
  optimizer's ``state_dict`` flushes too). The training forward in between sees an idle row as
  of its last update: that is what keeps the step row-sparse.
- ``lazy``: Adam as ``torch.optim.SparseAdam``: a row's moments are updated only when it gets a
  gradient; an idle row neither moves nor decays. The bias correction uses the optimizer's global
  step, as SparseAdam does. (sgd and adagrad: the same as ``exact``.)
- ``dense`` (the paper's setting): each sparse gradient is made dense and the stock optimizer
  updates every parameter every step.

Two of the authors' details live here too: ``adagrad_eps: inside`` (their C# AdaGrad,
``w -= lr * g / sqrt(G + eps)``, instead of torch's ``lr * g / (sqrt(G) + eps)``) and
``grad_clip`` (every gradient element clipped to ``±grad_clip`` before the update).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import Config
from .kernels import cpu_kernels
from .layers import MePropLinear, MePropLSTM

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


@functools.cache  # called on every exact step, with the same few betas
def exact_adam_horizon(beta1: float, beta2: float, tolerance: float = 1e-10) -> int:
    """How many idle steps of exact Adam are summed: later ones add less than ``tolerance`` of the
    first idle step's update. The i-th idle step is at most ``(beta1 / sqrt(beta2))^(i-1) /
    sqrt(1 - beta2)`` times the first (moment decay over the bias correction's change), a
    geometric series; without decay (``beta1 >= sqrt(beta2)``) every idle step is summed."""
    ratio = beta1 / math.sqrt(beta2)
    if ratio >= 1.0:
        return 2**62
    tail = tolerance * (1.0 - ratio) * math.sqrt(1.0 - beta2)
    return max(1, math.ceil(math.log(tail) / math.log(ratio)) + 1)


class RowSparseOptimizer(torch.optim.Optimizer):
    """Adam (exact or lazy), AdaGrad or SGD that updates only the rows present in each gradient.

    Accepts sparse COO gradients whose sparse dimension is the first (the rows of a weight
    ``[out, in]`` or of a bias ``[out]``), as ``MePropLinear(..., sparse_grad=True)`` returns;
    a dense gradient updates every row. With ``adam_update="exact"`` the parameters equal those
    of ``torch.optim.Adam`` fed the same (densified) gradients once :meth:`flush` has run.
    """

    def __init__(self, params: Iterable[torch.Tensor], kind: str, lr: float, betas=(0.9, 0.999),
                 eps: float | None = None, adagrad_eps_inside: bool = False, adam_update: str = "exact") -> None:
        if kind not in ("adam", "adagrad", "sgd"):
            raise ValueError(f"kind must be adam, adagrad or sgd, got {kind!r}")
        if adam_update not in ("exact", "lazy"):
            raise ValueError(f"adam_update must be exact or lazy, got {adam_update!r}")
        eps = eps if eps is not None else (ADAM_EPS if kind == "adam" else ADAGRAD_EPS)
        # eps inside the root: the sum of squares starts at eps and nothing is added outside.
        self.initial_sum = eps if kind == "adagrad" and adagrad_eps_inside else 0.0
        if self.initial_sum:
            eps = 0.0
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.kind = kind
        self.exact = kind == "adam" and adam_update == "exact"

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
                if self.kind == "adam":
                    state = self.adam_state(param)
                    state["step"] += 1
                    beta1, beta2 = group["betas"]
                    if self.exact:
                        _adam_rows_exact(kernels, param, state, rows, values, group)
                    elif kernels is not None:
                        kernels.adam_rows(param, state["exp_avg"], state["exp_avg_sq"], rows, values,
                                          group["lr"], beta1, beta2, group["eps"], state["step"])
                    else:
                        _adam_rows(param, state, rows, values, group["lr"], beta1, beta2, group["eps"])
                else:
                    state = self.adagrad_state(param)
                    if kernels is not None:
                        kernels.adagrad_rows(param, state["sum"], rows, values, group["lr"], group["eps"])
                    else:
                        _adagrad_rows(param, state["sum"], rows, values, group["lr"], group["eps"])
        return None

    def adam_state(self, param: torch.Tensor) -> dict[str, Any]:
        """Adam's state of ``param``, created (zero moments, step 0) on first use."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
            if self.exact:
                state["last_step"] = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)
        return state

    def adagrad_state(self, param: torch.Tensor) -> dict[str, Any]:
        """AdaGrad's state of ``param``: the sum of squared gradients (from eps when it is inside
        the root), created on first use."""
        state = self.state[param]
        if not state:
            state["sum"] = torch.full_like(param, self.initial_sum, memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def flush(self) -> None:
        """Exact Adam: apply every row's pending idle steps, so the parameters equal dense Adam's now.
        A no-op for the other kinds (their rows are always up to date)."""
        if not self.exact:
            return
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                stale = torch.nonzero(state["last_step"] < state["step"]).flatten()
                if len(stale):
                    kernels = cpu_kernels() if param.device.type == "cpu" and param.is_contiguous() else None
                    _adam_rows_exact(kernels, param, state, stale, None, group)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The state after :meth:`flush`, so a saved optimizer never holds pending steps."""
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts state tensors to the parameter's dtype
            if "last_step" in state:
                state["last_step"] = state["last_step"].long()


def _adam_rows_exact(kernels, param, state, rows, values, group) -> None:
    """Exact Adam on ``rows``: their idle steps since ``last_step``, then (with ``values``) this step."""
    beta1, beta2 = group["betas"]
    horizon = exact_adam_horizon(beta1, beta2)
    if kernels is not None:
        kernels.adam_rows_exact(param, state["exp_avg"], state["exp_avg_sq"], state["last_step"], rows, values,
                                group["lr"], beta1, beta2, group["eps"], state["step"], horizon)
        return
    lr, eps, step, last = group["lr"], group["eps"], state["step"], state["last_step"]
    upto = step - 1 if values is not None else step
    since = last.index_select(0, rows)
    idle = upto - since
    busy = idle > 0
    if bool(busy.any()):
        caught, since, idle = rows[busy], since[busy], idle[busy]
        exp_avg = state["exp_avg"].index_select(0, caught)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, caught)
        root = exp_avg_sq.sqrt()
        moved = torch.zeros_like(exp_avg)
        shape = (-1,) + (1,) * (param.dim() - 1)
        for q in range(1, min(int(idle.max()), horizon) + 1):  # idle step j = since + q
            j = (since + q).double()
            scale = lr * beta1**q / (1 - beta1**j) * (idle >= q)
            shrink = beta2 ** (0.5 * q) / (1 - beta2**j).sqrt()
            moved += scale.to(moved.dtype).view(shape) * exp_avg / (shrink.to(moved.dtype).view(shape) * root + eps)
        param.index_add_(0, caught, moved, alpha=-1.0)
        state["exp_avg"].index_copy_(0, caught, exp_avg * (beta1 ** idle.double()).to(exp_avg.dtype).view(shape))
        state["exp_avg_sq"].index_copy_(0, caught, exp_avg_sq * (beta2 ** idle.double()).to(exp_avg.dtype).view(shape))
    if values is not None:
        _adam_rows(param, state, rows, values, lr, beta1, beta2, eps)
    last.index_fill_(0, rows, step if values is not None else upto)


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
        self._hooks: list[Any] = []

    def watch(self, model: nn.Module) -> None:
        """Flush before ``model`` is read outside training: its ``state_dict`` and any forward in
        eval mode or without grad. (Training forwards see idle rows as of their last update.)"""
        def before_forward(module: nn.Module, args: Any) -> None:
            if not module.training or not torch.is_grad_enabled():
                self.flush()
        self._hooks += [model.register_forward_pre_hook(before_forward),
                        model.register_state_dict_pre_hook(lambda *args: self.flush())]

    def close(self) -> None:
        """Flush and stop watching the model: call before replacing this optimizer by a new one."""
        self.flush()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def params(self) -> list[torch.Tensor]:
        return [param for optimizer in self.optimizers for group in optimizer.param_groups for param in group["params"]]

    def flush(self) -> None:
        """Bring every parameter up to date (exact Adam's pending idle steps): call before reading
        the weights outside training (evaluation, checkpoints, export)."""
        for optimizer in self.optimizers:
            if isinstance(optimizer, RowSparseOptimizer):
                optimizer.flush()

    @contextmanager
    def up_to_date(self) -> Iterator[None]:
        """Within the block the parameters are up to date (as :meth:`flush`); afterwards they and the
        optimizer state are as before, so that reading the weights (e.g. to evaluate) does not
        change the training that follows."""
        saved = [(param, param.detach().clone(), optimizer.state[param],
                  {key: value.clone() for key, value in optimizer.state[param].items() if torch.is_tensor(value)})
                 for optimizer in self.optimizers if isinstance(optimizer, RowSparseOptimizer) and optimizer.exact
                 for group in optimizer.param_groups for param in group["params"] if optimizer.state.get(param)]
        self.flush()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, data, state, copies in saved:
                    param.copy_(data)
                    for key, value in copies.items():
                        state[key].copy_(value)

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
            if isinstance(layer, (MePropLinear, MePropLSTM)) and layer.sparse_grad and layer.k > 0
            for param in layer.parameters()]


def build_optimizer(config: Config, model: nn.Module) -> OptimizerGroup:
    """The config's optimizer for ``model``: stock for dense gradients; for row-sparse ones, a
    row-sparse update (``sparse_update: exact`` or ``lazy``) or densify + stock (``dense``).
    A row-sparse optimizer watches ``model`` (see :meth:`OptimizerGroup.watch`); call its
    ``close()`` before replacing it."""
    eps_inside = config.adagrad_eps == "inside"
    if config.engine == "fused":  # the engine updates every parameter row-sparse (exact Adam or AdaGrad)
        group = OptimizerGroup([RowSparseOptimizer(model.parameters(), config.optimizer, config.lr,
                                                   adagrad_eps_inside=eps_inside)], densify=[])
        group.watch(model)
        return group
    sparse = sparse_grad_params(model)
    sparse_ids = {id(param) for param in sparse}
    dense = [param for param in model.parameters() if id(param) not in sparse_ids]
    if config.sparse_update == "dense" or not sparse:
        return OptimizerGroup([stock_optimizer(config.optimizer, dense + sparse, config.lr, eps_inside)],
                              densify=sparse, grad_clip=config.grad_clip)
    optimizers: list[torch.optim.Optimizer] = [
        RowSparseOptimizer(sparse, config.optimizer, config.lr, adagrad_eps_inside=eps_inside,
                           adam_update=config.sparse_update)]
    if dense:
        optimizers.insert(0, stock_optimizer(config.optimizer, dense, config.lr, eps_inside))
    group = OptimizerGroup(optimizers, densify=[], grad_clip=config.grad_clip)
    group.watch(model)
    return group
