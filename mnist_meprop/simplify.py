"""meSimp: remove the hidden units that meProp rarely selects, shrinking the model as it trains.

As the authors' released code does it: during meProp training, count for each hidden unit how
many examples selected it among their top-k (:class:`~mnist_meprop.ops.TopkCounter`). Several
times per epoch, mask every unit selected by fewer than ``prune_rate`` times the counted
examples, then reset the counts. Masks never come back. Training alternates cycles of
``cycle_epochs`` epochs: even cycles (the first included) simplify, odd cycles train normally
(still with meProp); the optimizer state resets at the start of each cycle.

Masking here is removal: a pruned unit's row of its layer's weight and bias, the matching
column of the next layer's weight, and the optimizer state of those entries are cut out of
the tensors (new ``Parameter`` objects take their place in the model and the optimizer). The forward
and backward then compute only the active units: training gets cheaper as the model shrinks.
``units`` keeps, per hidden layer, the original indices of the units still active.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import Simplify
from .layers import MePropLinear
from .ops import TopkCounter
from .optim import OptimizerGroup


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The model's linear layers in order; all but the last are hidden layers."""
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def _slice_parameter(module: nn.Module, name: str, keep: torch.Tensor, dim: int,
                     optimizer: OptimizerGroup | None) -> None:
    """Replace ``module.<name>`` by a new ``Parameter`` holding only the entries ``keep`` along
    ``dim``, and move its optimizer state (same-shaped tensors sliced alike, per-row ones such as
    exact Adam's ``last_step`` too when rows are cut) to the new one.

    A new ``Parameter`` is needed: autograd remembers a parameter's shape, so resizing one in
    place would break the next backward.
    """
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, keep).contiguous(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for inner in optimizer.optimizers:
        for group in inner.param_groups:
            group["params"] = [new if param is old else param for param in group["params"]]
        if old in inner.state:
            state = inner.state.pop(old)
            inner.state[new] = {key: _slice_state(value, old.shape, keep, dim) for key, value in state.items()}
    optimizer.densify = [new if param is old else param for param in optimizer.densify]


def _slice_state(value: Any, shape: torch.Size, keep: torch.Tensor, dim: int) -> Any:
    """One optimizer-state entry of a parameter of ``shape`` cut to ``keep`` along ``dim``."""
    if not torch.is_tensor(value):
        return value
    if value.shape == shape:
        return value.index_select(dim, keep).contiguous()
    if dim == 0 and value.dim() == 1 and len(value) == shape[0]:  # one entry per row
        return value.index_select(0, keep).contiguous()
    return value


def remove_units(model: nn.Module, layer: int, keep: torch.Tensor, optimizer: OptimizerGroup | None = None) -> None:
    """Keep only output units ``keep`` (indices into the current units) of hidden linear layer ``layer``."""
    layers = linear_layers(model)
    hidden, following = layers[layer], layers[layer + 1]
    keep = keep.to(hidden.weight.device)
    _slice_parameter(hidden, "weight", keep, 0, optimizer)
    if hidden.bias is not None:
        _slice_parameter(hidden, "bias", keep, 0, optimizer)
    _slice_parameter(following, "weight", keep, 1, optimizer)
    hidden.out_features = following.in_features = len(keep)


def shrink_to(model: nn.Module, units: list[torch.Tensor]) -> None:
    """Cut a full-size model down to the active ``units`` (original indices per hidden layer), e.g. to load a checkpoint."""
    for layer, kept in enumerate(units):
        remove_units(model, layer, kept)


class Simplifier:
    """Counts activeness in the hidden meProp layers and prunes on meSimp's schedule.

    The training loop calls :meth:`start_epoch` before an epoch, :meth:`after_step` after each
    optimizer step, and reads :meth:`active_units` for its reports.
    """

    def __init__(self, model: nn.Module, settings: Simplify, steps_per_epoch: int,
                 units: list[torch.Tensor] | None = None) -> None:
        self.model = model
        self.settings = settings
        self.hidden = linear_layers(model)[:-1]
        if not all(isinstance(layer, MePropLinear) for layer in self.hidden):
            raise ValueError("meSimp needs MePropLinear hidden layers")
        self.units = units or [torch.arange(layer.out_features) for layer in self.hidden]
        self.interval = max(1, math.ceil(steps_per_epoch / settings.prunes_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.simplifying = False
        self.prunes: list[dict[str, Any]] = []

    def active_units(self) -> list[int]:
        return [len(kept) for kept in self.units]

    def starts_cycle(self, epoch: int) -> bool:
        """True for the first epoch of a cycle (epochs count from 1)."""
        return (epoch - 1) % self.settings.cycle_epochs == 0

    def start_epoch(self, epoch: int) -> None:
        """Turn counting on in simplifying cycles (even cycles: the 1st, 3rd, ...) and off otherwise."""
        self.simplifying = ((epoch - 1) // self.settings.cycle_epochs) % 2 == 0
        for layer in self.hidden:
            layer.counter = TopkCounter(layer.out_features, layer.weight.device) if self.simplifying else None

    def after_step(self, epoch: int, step: int, optimizer: OptimizerGroup) -> list[int] | None:
        """Prune when a simplifying epoch reaches a prune point; returns the new unit counts if it pruned."""
        if not self.simplifying or (step % self.interval and step != self.steps_per_epoch):
            return None
        for index, layer in enumerate(self.hidden):
            counter = layer.counter
            keep = torch.nonzero(counter.counts >= self.settings.prune_rate * counter.examples).flatten()
            if len(keep) == 0:  # never empty a layer: keep its most selected unit
                keep = counter.counts.argmax().reshape(1)
            if len(keep) < layer.out_features:
                remove_units(self.model, index, keep, optimizer)
                self.units[index] = self.units[index][keep.cpu()]
            layer.counter = TopkCounter(layer.out_features, layer.weight.device)
        units = self.active_units()
        self.prunes.append({"epoch": epoch, "step": step, "units": units})
        return units
