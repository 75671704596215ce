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
from torch import nn

from .config import Config, output_layer_k, paper_output_k, resolve_device
from .engine import FusedMLPStep
from .kernels import cpu_kernels, flushes_denormals, set_flush_denormal
from .log import to_stderr
from .optim import OptimizerGroup, build_optimizer
from .ops import is_meprop_active, time_linear_backward
from .simplify import Simplifier, shrink_to
from .store import load_checkpoint, save_checkpoint
from .task import Task, score_label, task_for

PHASES = ("forward", "backward", "linear_backward", "update", "train", "eval", "total")
LOSS_PARTS = 8  # the training loss is recorded per 1/8 epoch, the authors' C# logging grain


def method_name(config: Config) -> str:
    """``dense`` when no hidden layer sparsifies its gradient, else e.g. ``meProp per-example top-k``
    (``meSimp ...`` when the hidden layers are simplified); an ``output_k`` other than the task's
    paper setting is named after it, e.g. ``meProp per-example top-k, output layer dense``."""
    if config.n_layer < 2 or not is_meprop_active(config.k, config.d_hidden):
        method = "dense"
    else:
        mode = "unified" if config.unified else "per-example"
        simplified = "meSimp" if config.simplify.enabled else "meProp"
        method = f"{simplified} {mode} {'top-k' if config.selection == 'topk' else 'random-k'}"
    if output_layer_k(config) == paper_output_k(config):
        return method
    return f"{method}, output layer {f'k={config.output_k}' if config.output_k else 'dense'}"


@dataclass
class RunResult:
    """What one training run measured. Accuracies are percentages; timings are seconds summed over training."""

    best_dev_acc: float = float("-inf")
    test_acc: float | None = None
    best_epoch: float = 0  # a whole epoch, or a fraction of one with several evaluations per epoch
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



def part_ends(n_steps: int, parts: int) -> list[int]:
    """The last step (counting from 1) of each of ``parts`` near-equal parts of an ``n_steps`` epoch
    (fewer parts when the epoch has fewer steps)."""
    return sorted({math.ceil(n_steps * i / parts) for i in range(1, parts + 1)})


@dataclass
class _Run:
    """One run's live state, threaded through the harness's steps."""

    config: Config
    task: Task
    data: Any  # what task.load_data returned
    model: nn.Module
    optimizer: OptimizerGroup
    simplifier: Simplifier | None
    result: RunResult
    clock: Callable[[], float]
    log: Callable[[str], None]
    model_file: Path | None
    fused: FusedMLPStep | None = None  # engine: fused


def _prepare(config: Config, task: Task, data: Any, checkpoint: Path | None,
             log: Callable[[str], None], model_file: Path | None) -> _Run:
    """Device, kernels, the seeded model, meSimp, the optimizer, and the checkpoint's state if any
    (:func:`train_run` has set the thread count)."""
    device = resolve_device(config.device)
    if device.type == "cpu" and is_meprop_active(config.k, config.d_hidden) and not config.unified:
        cpu_kernels()  # build/load the kernels now, so a first-use compile is not timed as backward
    data = data.to(device)
    torch.manual_seed(config.seed)
    model = task.build_model(config, data).to(device)
    saved = load_checkpoint(checkpoint) if checkpoint is not None else None
    simplifier = None
    if config.simplify.enabled:
        units = [torch.as_tensor(kept) for kept in saved["units"]] if saved is not None else None
        if units is not None:
            shrink_to(model, units)
        simplifier = Simplifier(model, config.simplify, math.ceil(task.n_train(data) / config.d_minibatch), units)
    optimizer = build_optimizer(config, model)  # after any shrinking: it must hold the model's current parameters
    result = RunResult()
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
    fused = FusedMLPStep(config, model, optimizer) if config.engine == "fused" else None
    return _Run(config, task, data, model, optimizer, simplifier, result, wall_clock(device), log, model_file, fused)


def _evaluate(run: _Run, at: float) -> dict[str, Any]:
    """Evaluate dev at (fractional) epoch ``at``; when dev improves, evaluate test and keep this model
    as the best (saved to the run's model file). Returns what was measured."""
    result, timings = run.result, run.result.timings
    eval_start = run.clock()
    # exact row-sparse Adam: evaluate (and save) the up-to-date weights, then train on as before
    with run.optimizer.up_to_date():
        dev_loss, dev_acc = run.task.evaluate(run.model, run.data, "dev")
        test_acc = None
        improved = dev_acc > result.best_dev_acc
        if improved:
            _, test_acc = run.task.evaluate(run.model, run.data, "test")
            result.best_dev_acc, result.test_acc = dev_acc, test_acc
            result.best_epoch = int(at) if float(at).is_integer() else at
            result.units_at_best = run.simplifier.active_units() if run.simplifier is not None else None
        timings["eval"] += run.clock() - eval_start
        run.model.train()
        if improved and run.model_file is not None:
            save_checkpoint(run.model_file, {
                "config": run.config.to_dict(), "model": run.model.state_dict(), "epoch": at,
                "units": run.simplifier.units if run.simplifier is not None else None,
                **run.task.model_info(run.data)})
    return {"at": at, "dev_loss": dev_loss, "dev_acc": dev_acc, "test_acc": test_acc}


# The epoch record's times: the only keys in which two identical runs differ.
EPOCH_TIME_KEYS = ("seconds", "cpu_seconds")


def _train_epoch(run: _Run, epoch: int, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """One epoch of minibatch steps with the per-phase timers, evaluating on the config's schedule
    (``evals_per_epoch`` points, the last at the epoch's end). Returns the epoch's record."""
    config, model, timings, clock = run.config, run.model, run.result.timings, run.clock
    epoch_start, epoch_cpu_start = time.perf_counter(), time.process_time()
    model.train()
    if run.simplifier is not None:
        if run.simplifier.starts_cycle(epoch) and config.simplify.reset_optimizer and epoch > 1:
            run.optimizer.close()
            run.optimizer = build_optimizer(config, model)
        run.simplifier.start_epoch(epoch)
    n_steps = math.ceil(run.task.n_train(run.data) / config.d_minibatch)
    eval_ends = part_ends(n_steps, config.evals_per_epoch)
    loss_ends = part_ends(n_steps, LOSS_PARTS)
    evals: list[dict[str, Any]] = []
    loss_parts: list[float] = []
    loss_sum = part_loss = 0.0
    correct = part_examples = seen = 0  # seen: predictions trained on (examples, or tokens)
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    with time_linear_backward() as backward_clock:
        batches = run.task.batches(run.data, config.d_minibatch, generator)
        for step, (x, y) in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise RunInterrupted(epoch - 1)
            if run.fused is not None:
                loss, output, seconds = run.fused.step(x, y)
                for phase, spent in seconds.items():
                    timings[phase] += spent
            else:
                t0 = clock()
                output = model(x)
                loss = run.task.loss(output, y, config.loss_reduction)
                t1 = clock()
                loss.backward()
                t2 = clock()
                run.optimizer.step()
                run.optimizer.zero_grad()
                if run.simplifier is not None and (units := run.simplifier.after_step(epoch, step, run.optimizer)):
                    run.log(f"    prune at epoch {epoch} step {step}: active units {units}")
                t3 = clock()
                timings["forward"] += t1 - t0
                timings["backward"] += t2 - t1
                timings["update"] += t3 - t2
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(epoch, step, loss_value, run.result)
            count = run.task.count(y)
            summed = loss_value if config.loss_reduction == "sum" else loss_value * count
            loss_sum += summed
            part_loss += summed
            part_examples += count
            seen += count
            correct += run.task.count_correct(output, y)
            if step in loss_ends:
                loss_parts.append(part_loss / part_examples)
                part_loss, part_examples = 0.0, 0
            if step in eval_ends:
                evals.append(_evaluate(run, epoch - 1 + (eval_ends.index(step) + 1) / len(eval_ends)))
    timings["linear_backward"] += backward_clock.seconds
    last = evals[-1]
    return {
        "epoch": epoch, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
        "train_loss_parts": loss_parts, "dev_loss": last["dev_loss"], "dev_acc": last["dev_acc"],
        "test_acc": last["test_acc"], "seconds": time.perf_counter() - epoch_start,
        # CPU time of all the process's threads: below wall-clock x threads when the run waited for a core
        "cpu_seconds": time.process_time() - epoch_cpu_start,
        **({"units": run.simplifier.active_units()} if run.simplifier is not None else {}),
        **({"evals": evals} if len(evals) > 1 else {}),
    }


def _save_run_checkpoint(run: _Run, path: Path, epoch: int) -> None:
    """Everything needed to continue after ``epoch`` exactly as if uninterrupted."""
    cuda = next(run.model.parameters()).is_cuda
    save_checkpoint(path, {
        "epoch": epoch, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "rng": torch.get_rng_state(), "result": dataclasses.asdict(run.result),
        "cuda_rng": torch.cuda.get_rng_state_all() if cuda else None,
        "units": run.simplifier.units if run.simplifier is not None else None,
    })


def train_run(config: Config, data: Any, log: Callable[[str], None] | None = None,
              checkpoint: Path | None = None, should_stop: Callable[[], bool] | None = None,
              model_file: Path | None = None, task: Task | None = None) -> RunResult:
    """Train ``task``'s model (default: the task ``config.task`` names) for ``config`` on ``data``
    (what the task's ``load_data`` returned): the paper's test-group harness.

    ``torch.manual_seed(config.seed)`` precedes model construction, so every k of a sweep
    starts from the same weights; each epoch's data order depends only on the seed and the
    epoch. Dev is evaluated ``config.evals_per_epoch`` times per epoch (the epoch cut into that
    many parts, as the authors' C# program does with 8) and test whenever dev improves; the
    reported test accuracy is the one at the best dev point, whose (fractional) epoch is
    ``best_epoch``. The training loss is recorded per 1/8 epoch as well (``train_loss_parts``).

    Timers: ``forward`` (model and loss), ``backward`` (``loss.backward()``),
    ``linear_backward`` (the part of it inside the linear layers), ``update`` (clipping,
    optimizer step and zeroing the gradients), ``train`` (forward + backward + update),
    ``eval``, ``total``. With ``engine: fused`` (one C++ call per step, :mod:`mnist_meprop.engine`)
    the step times its own forward, backward, linear backward and update.

    With ``checkpoint``, the model, optimizer, RNG state and results so far are saved there
    after every epoch, and a run that finds a checkpoint continues after its epoch, ending
    exactly as an uninterrupted run would. ``should_stop`` is polled before every step; when
    it returns True the run raises :class:`RunInterrupted`. A NaN or infinite loss raises
    :class:`NonFiniteLoss`. With ``model_file``, the best-dev model (the one whose test accuracy
    is reported) is saved there, with its config and, for meSimp, its active units.

    With ``config.simplify.enabled`` the hidden layers shrink on meSimp's schedule (see
    :mod:`mnist_meprop.simplify`); the active units are logged after each prune and epoch.
    With ``config.flush_denormal`` the run computes with denormal floats flushed to zero (the
    setting in force before is restored afterwards).
    """
    log = log or to_stderr
    task = task or task_for(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)  # before the flush setting, which is per thread
    flushing_before = flushes_denormals()
    if config.flush_denormal != flushing_before:  # (setting it on every thread may load the kernels)
        set_flush_denormal(config.flush_denormal)
    try:
        run = _prepare(config, task, data, checkpoint, log, model_file)
        result, timings = run.result, run.result.timings
        elapsed_before, run_start = timings["total"], run.clock()
        score = score_label(config.task)  # the epoch line's name for the metric ("UAS "; nothing for accuracy)
        for epoch in range(len(result.epochs) + 1, config.n_epoch + 1):
            record = _train_epoch(run, epoch, should_stop)
            # Exact row-sparse Adam applies pending idle steps for good at each epoch's end (whether or
            # not a checkpoint is saved), so a resumed run continues exactly as an uninterrupted one.
            # That is deferred update work: it is timed as update.
            flush_start = run.clock()
            run.optimizer.flush()
            timings["update"] += run.clock() - flush_start
            result.epochs.append(record)
            if run.simplifier is not None:
                result.units, result.prunes = record["units"], run.simplifier.prunes
            timings["train"] = timings["forward"] + timings["backward"] + timings["update"]
            timings["total"] = elapsed_before + run.clock() - run_start
            if checkpoint is not None:
                _save_run_checkpoint(run, checkpoint, epoch)
            log(f"  epoch {epoch}/{config.n_epoch}  loss {record['train_loss']:.4f}  dev {score}{record['dev_acc']:.2f}%  "
                f"best {result.best_dev_acc:.2f}% @{result.best_epoch:g}  test@best {score}{result.test_acc:.2f}%  "
                + (f"units {record['units']}  " if "units" in record else "")
                + f"({record['seconds']:.1f}s, CPU {record['cpu_seconds']:.1f}s)")
    finally:
        if config.flush_denormal != flushing_before:
            set_flush_denormal(flushing_before)
    return result
