"""The paper's test-group harness: seeded training, dev/test evaluation and per-phase timers."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, resolve_device
from .data import Splits, iterate_minibatches
from .kernels import cpu_kernels
from .log import to_stderr
from .model import build_model
from .optim import build_optimizer
from .ops import is_meprop_active, time_linear_backward
from .simplify import Simplifier, shrink_to
from .store import load_checkpoint, save_checkpoint

PHASES = ("forward", "backward", "linear_backward", "update", "train", "eval", "total")
EVAL_BATCH = 2000


def method_name(config: Config) -> str:
    """``dense`` when no hidden layer sparsifies its gradient, else e.g. ``meProp per-example top-k``
    (``meSimp ...`` when the hidden layers are simplified)."""
    if config.n_layer < 2 or not is_meprop_active(config.k, config.d_hidden):
        return "dense"
    mode = "unified" if config.unified else "per-example"
    method = "meSimp" if config.simplify.enabled else "meProp"
    return f"{method} {mode} {'top-k' if config.selection == 'topk' else 'random-k'}"


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) of ``model`` on ``x, y``, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), EVAL_BATCH):
        logits = model(x[start:start + EVAL_BATCH])
        target = y[start:start + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / len(x), 100.0 * correct / len(x)


@dataclass
class RunResult:
    """What one training run measured. Accuracies are percentages; timings are seconds summed over training."""

    best_dev_acc: float = float("-inf")
    test_acc: float | None = None
    best_epoch: int = 0
    epochs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    units_at_best: list[int] | None = None  # meSimp: active units per hidden layer of the best-dev model
    units: list[int] | None = None  # meSimp: active units per hidden layer at the end
    prunes: list[dict[str, Any]] = field(default_factory=list)  # meSimp: units after each prune


class RunInterrupted(Exception):
    """A stop was requested; the run's checkpoint after epoch ``epoch`` is intact on disk."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stopped after epoch {epoch}")
        self.epoch = epoch


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; ``result`` holds the epochs finished before."""

    def __init__(self, epoch: int, step: int, value: float, result: RunResult) -> None:
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}")
        self.result = result


def wall_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, after waiting for queued GPU work when ``device`` is a GPU."""
    if device.type != "cuda":
        return time.perf_counter

    def synchronized() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return synchronized


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch: the same for every run of a sweep with this seed."""
    return seed * 1_000_003 + epoch


def train_run(config: Config, data: Splits, log: Callable[[str], None] | None = None,
              checkpoint: Path | None = None, should_stop: Callable[[], bool] | None = None,
              model_file: Path | None = None) -> RunResult:
    """Train the config's MLP on ``data``; evaluate dev each epoch and test whenever dev improves.

    ``torch.manual_seed(config.seed)`` precedes model construction, so every k of a sweep
    starts from the same weights; each epoch's data order depends only on the seed and the
    epoch. Timers: ``forward`` (model and loss), ``backward`` (``loss.backward()``),
    ``linear_backward`` (the part of it inside the linear layers), ``update`` (optimizer
    step and zeroing the gradients), ``train`` (forward + backward + update), ``eval``,
    ``total``.

    With ``checkpoint``, the model, optimizer, RNG state and results so far are saved there
    after every epoch, and a run that finds a checkpoint continues after its epoch, ending
    exactly as an uninterrupted run would. ``should_stop`` is polled before every step; when
    it returns True the run raises :class:`RunInterrupted`. A NaN or infinite loss raises
    :class:`NonFiniteLoss`. With ``model_file``, the best-dev model (the one whose test accuracy
    is reported) is saved there, with its config and, for meSimp, its active units.

    With ``config.simplify.enabled`` the hidden layers shrink on meSimp's schedule (see
    :mod:`mnist_meprop.simplify`); the active units are logged after each prune and epoch.
    """
    log = log or to_stderr
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cpu" and is_meprop_active(config.k, config.d_hidden) and not config.unified:
        cpu_kernels()  # build/load the kernels now, so a first-use compile is not timed as backward
    clock = wall_clock(device)
    if data.train_x.device != device:
        data = data.to(device)
    torch.manual_seed(config.seed)
    model = build_model(config, data.n_features, data.n_classes).to(device)
    result = RunResult()
    saved = load_checkpoint(checkpoint) if checkpoint is not None else None
    simplifier = None
    if config.simplify.enabled:
        units = [torch.as_tensor(kept) for kept in saved["units"]] if saved is not None else None
        if units is not None:
            shrink_to(model, units)
        simplifier = Simplifier(model, config.simplify, math.ceil(len(data.train_y) / config.d_minibatch), units)
    optimizer = build_optimizer(config, model)  # after any shrinking: it must hold the model's current parameters
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        result = RunResult(**saved["result"])
        if simplifier is not None:
            simplifier.prunes = result.prunes
        log(f"  resuming after epoch {saved['epoch']} from {checkpoint}")
    timings = result.timings
    elapsed_before, run_start = timings["total"], clock()
    n_train = len(data.train_y)
    for epoch in range(len(result.epochs) + 1, config.n_epoch + 1):
        epoch_start = time.perf_counter()
        model.train()
        if simplifier is not None:
            if simplifier.starts_cycle(epoch) and config.simplify.reset_optimizer and epoch > 1:
                optimizer = build_optimizer(config, model)
            simplifier.start_epoch(epoch)
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
        loss_sum, correct = 0.0, 0
        with time_linear_backward() as backward_clock:
            batches = iterate_minibatches(data.train_x, data.train_y, config.d_minibatch, generator)
            for step, (x, y) in enumerate(batches, start=1):
                if should_stop is not None and should_stop():
                    raise RunInterrupted(epoch - 1)
                t0 = clock()
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                t1 = clock()
                loss.backward()
                t2 = clock()
                optimizer.step()
                optimizer.zero_grad()
                if simplifier is not None and (units := simplifier.after_step(epoch, step, optimizer)):
                    log(f"    prune at epoch {epoch} step {step}: active units {units}")
                t3 = clock()
                timings["forward"] += t1 - t0
                timings["backward"] += t2 - t1
                timings["update"] += t3 - t2
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(epoch, step, loss_value, result)
                loss_sum += loss_value * len(y)
                correct += int((logits.argmax(dim=1) == y).sum())
        timings["linear_backward"] += backward_clock.seconds
        eval_start = clock()
        dev_loss, dev_acc = evaluate(model, data.dev_x, data.dev_y)
        test_acc = None
        units = simplifier.active_units() if simplifier is not None else None
        if dev_acc > result.best_dev_acc:
            _, test_acc = evaluate(model, data.test_x, data.test_y)
            result.best_dev_acc, result.test_acc, result.best_epoch = dev_acc, test_acc, epoch
            result.units_at_best = units
        timings["eval"] += clock() - eval_start
        if model_file is not None and result.best_epoch == epoch:
            save_checkpoint(model_file, {"config": config.to_dict(), "model": model.state_dict(), "epoch": epoch,
                                         "units": simplifier.units if simplifier is not None else None,
                                         "n_features": data.n_features, "n_classes": data.n_classes})
        result.epochs.append({
            "epoch": epoch, "train_loss": loss_sum / n_train, "train_acc": 100.0 * correct / n_train,
            "dev_loss": dev_loss, "dev_acc": dev_acc, "test_acc": test_acc,
            "seconds": time.perf_counter() - epoch_start,
            **({"units": units} if units is not None else {}),
        })
        if simplifier is not None:
            result.units, result.prunes = units, simplifier.prunes
        timings["train"] = timings["forward"] + timings["backward"] + timings["update"]
        timings["total"] = elapsed_before + clock() - run_start
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(), "result": dataclasses.asdict(result),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "units": simplifier.units if simplifier is not None else None,
            })
        log(f"  epoch {epoch}/{config.n_epoch}  loss {loss_sum / n_train:.4f}  dev {dev_acc:.2f}%  "
            f"best {result.best_dev_acc:.2f}% @{result.best_epoch}  test@best {result.test_acc:.2f}%  "
            + (f"units {units}  " if units is not None else "")
            + f"({time.perf_counter() - epoch_start:.1f}s)")
    return result
