"""What a task gives the training harness: its model, its loss and its evaluation metric.

The harness (:func:`mnist_meprop.train.train_run`) owns everything else: the loop, the timers,
the evaluation schedule, the choice of the best model and the checkpoints. A new task (POS
tagging, parsing) is one more :class:`Task`, not a second training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .data import Splits
from .model import build_model

EVAL_BATCH = 2000


@dataclass(frozen=True)
class Task:
    """A task as the harness sees it.

    ``build_model(config, data)`` returns the model (the harness seeds torch before calling it);
    ``loss(output, target, reduction)`` is the training loss (``mean`` or ``sum`` over the
    minibatch); ``count_correct(output, target)`` counts correct training predictions;
    ``evaluate(model, x, y)`` returns the mean loss and the metric (``metric`` names it, in %).
    """

    name: str
    metric: str
    build_model: Callable[[Config, Splits], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    count_correct: Callable[[torch.Tensor, torch.Tensor], int]
    evaluate: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[float, float]]


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction=reduction)


def _count_correct(logits: torch.Tensor, target: torch.Tensor) -> int:
    return int((logits.argmax(dim=1) == target).sum())


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` on ``x, y``, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += _count_correct(logits, target)
    return loss_sum / len(x), 100.0 * correct / len(x)


MNIST = Task(
    name="mnist",
    metric="accuracy",
    build_model=lambda config, data: build_model(config, data.n_features, data.n_classes),
    loss=_cross_entropy,
    count_correct=_count_correct,
    evaluate=evaluate_classifier,
)
