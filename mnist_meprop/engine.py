"""The fused engine (``engine: fused``): one C++ call per training step of the paper's MLP.

Through autograd, each step of the MLP pays a Python autograd node per meProp layer and an
optimizer loop over the parameters, which at the paper's sizes costs about as much as the
arithmetic. The fused step (``csrc/meprop_cpu.cpp``, ``mlp_train_step``) does the forward, the
softmax cross-entropy, the meProp backward and the row-sparse update (exact Adam, or AdaGrad)
in one call, for dense
(k=0) and meProp alike, so a speedup between them is the algorithm's. Its state is an ordinary
:class:`~mnist_meprop.optim.RowSparseOptimizer`'s, so evaluation, flushes and checkpoints work as
with ``engine: autograd``. What it supports: :func:`mnist_meprop.config.fused_engine_limits`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .errors import ConfigError
from .kernels import cpu_kernels
from .layers import MePropLinear
from .optim import OptimizerGroup, RowSparseOptimizer, exact_adam_horizon

PHASE_NAMES = ("forward", "backward", "linear_backward", "update")


class FusedMLPStep:
    """Trains ``model`` (the MLP of :func:`mnist_meprop.model.build_mlp`: meProp linear + ReLU
    layers, then a linear output layer) one fused step at a time, with the optimizer state
    (exact Adam or AdaGrad) held by ``optimizer`` (built by
    :func:`mnist_meprop.optim.build_optimizer` for ``engine: fused``)."""

    def __init__(self, config: Config, model: nn.Module, optimizer: OptimizerGroup) -> None:
        kernels = cpu_kernels()
        if kernels is None:
            raise ConfigError("engine: fused needs the compiled CPU kernels, which are off or did not build here "
                              "(see MEPROP_KERNELS); use engine: autograd")
        self.kernels = kernels
        self.layers = [module for module in model.modules() if isinstance(module, MePropLinear)]
        others = [module for module in model.modules() if module is not model and not isinstance(
            module, (MePropLinear, nn.ReLU))]
        if others or not self.layers or any(layer.bias is None for layer in self.layers):
            raise ValueError("the fused engine trains MLPs of biased MePropLinear layers and ReLUs only")
        (self.optimizer,) = optimizer.optimizers
        assert isinstance(self.optimizer, RowSparseOptimizer) and self.optimizer.kind in ("adam", "adagrad")
        assert self.optimizer.kind == "adagrad" or self.optimizer.exact
        self.adagrad = self.optimizer.kind == "adagrad"
        self.k = config.k
        self.unified = config.unified
        self.sum_loss = config.loss_reduction == "sum"
        self._arguments_for: object | None = None
        self._arguments_cache: tuple[list[dict], list[list[torch.Tensor]]] = ([], [])

    def _arguments(self) -> tuple[list[dict], list[list[torch.Tensor]]]:
        """The optimizer's state dicts of the parameters and the tensor lists the C++ step takes.

        Built once per state mapping: ``load_state_dict`` replaces the mapping (and the lists
        are rebuilt), while evaluation restores the state in place (``OptimizerGroup.up_to_date``).
        Rebuilding them every step cost about 10 µs of a 380 µs step at d=500, minibatch 10."""
        if self._arguments_for is not self.optimizer.state:
            params = [param for layer in self.layers for param in (layer.weight, layer.bias)]
            if self.adagrad:
                states = [self.optimizer.adagrad_state(param) for param in params]
                tensors = [[state["sum"] for state in states], [], []]
            else:
                states = [self.optimizer.adam_state(param) for param in params]
                tensors = [[state[key] for state in states] for key in ("exp_avg", "exp_avg_sq", "last_step")]
            self._arguments_cache = (states, [[layer.weight.data for layer in self.layers],
                                              [layer.bias.data for layer in self.layers], *tensors])
            self._arguments_for = self.optimizer.state
        return self._arguments_cache

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """One training step on the minibatch ``x, y``: (loss, logits, seconds per phase)."""
        states, tensors = self._arguments()
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        step = 0
        if not self.adagrad:
            for state in states:
                state["step"] += 1
            step = states[0]["step"]
        loss, logits, seconds = self.kernels.mlp_train_step(
            x, y, *tensors, self.k, self.unified, self.sum_loss, self.adagrad, group["lr"], beta1, beta2,
            group["eps"], step, exact_adam_horizon(beta1, beta2))
        return loss, logits, dict(zip(PHASE_NAMES, seconds.tolist()))
