"""The fused engine (``engine: fused``): one C++ call per training step of the paper's MLP.

Through autograd, each step of the MLP pays a Python autograd node per meProp layer and an
optimizer loop over the parameters, which at the paper's sizes costs about as much as the
arithmetic. The fused step (``csrc/meprop_cpu.cpp``, ``mlp_adam_step``) does the forward, the
softmax cross-entropy, the meProp backward and exact row-sparse Adam in one call, for dense
(k=0) and meProp alike, so a speedup between them is the algorithm's. Its state is an ordinary
:class:`~mnist_meprop.optim.RowSparseOptimizer`'s, so evaluation, flushes and checkpoints work as
with ``engine: autograd``. What it supports: :func:`mnist_meprop.config.fused_engine_limits`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .kernels import cpu_kernels
from .layers import MePropLinear
from .optim import OptimizerGroup, RowSparseOptimizer, exact_adam_horizon

PHASE_NAMES = ("forward", "backward", "linear_backward", "update")


class FusedMLPStep:
    """Trains ``model`` (the MLP of :func:`mnist_meprop.model.build_mlp`: meProp linear + ReLU
    layers, then a linear output layer) one fused step at a time, with the Adam state held by
    ``optimizer`` (built by :func:`mnist_meprop.optim.build_optimizer` for ``engine: fused``)."""

    def __init__(self, config: Config, model: nn.Module, optimizer: OptimizerGroup) -> None:
        kernels = cpu_kernels()
        if kernels is None:
            raise RuntimeError("engine: fused needs the compiled CPU kernels (see MEPROP_KERNELS)")
        self.kernels = kernels
        self.layers = [module for module in model.modules() if isinstance(module, MePropLinear)]
        others = [module for module in model.modules() if module is not model and not isinstance(
            module, (MePropLinear, nn.ReLU))]
        if others or not self.layers or any(layer.bias is None for layer in self.layers):
            raise ValueError("the fused engine trains MLPs of biased MePropLinear layers and ReLUs only")
        (self.adam,) = optimizer.optimizers
        assert isinstance(self.adam, RowSparseOptimizer) and self.adam.exact
        self.k = config.k
        self.unified = config.unified
        self.sum_loss = config.loss_reduction == "sum"

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One training step on the minibatch ``x, y``: (loss, logits, seconds per phase)."""
        params = [param for layer in self.layers for param in (layer.weight, layer.bias)]
        states = [self.adam.adam_state(param) for param in params]
        for state in states:
            state["step"] += 1
        group = self.adam.param_groups[0]
        beta1, beta2 = group["betas"]
        loss, logits, seconds = self.kernels.mlp_adam_step(
            x, y, [layer.weight.data for layer in self.layers], [layer.bias.data for layer in self.layers],
            [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states],
            [state["last_step"] for state in states], self.k, self.unified, self.sum_loss, group["lr"], beta1, beta2,
            group["eps"], states[0]["step"], exact_adam_horizon(beta1, beta2))
        return loss, logits, dict(zip(PHASE_NAMES, seconds.tolist()))
