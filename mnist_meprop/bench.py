"""``meprop bench``: per-phase timings of meProp MLPs against a plain ``nn.Linear`` MLP.

Everything runs in one process with a fixed thread count, after warm-up; each figure is a
median over repeated iterations on real MNIST digits (the bundled sample). The dense
baseline is ``nn.Linear`` layers with torch's own optimizer (fused Adam where torch has
it); meProp models use row-sparse gradients and row-sparse updates. "Linear backward" is
timed the same way for both: one backward through the linear layers alone, replayed on the
inputs and output gradients they had in a real backward pass. On a GPU, CUDA events time
every phase.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, resolve_device
from .data import bundled_sample_dir, load_idx_folder
from .kernels import backend_name
from .model import build_mlp
from .optim import build_optimizer, stock_optimizer

D_INPUT, N_CLASSES = 784, 10
FULL_GRID = {"d_hidden": (500, 2000), "minibatch": (1, 10, 50, 200), "k": (10, 20, 30, 80, 160)}
# --quick: every target setting of the issue, with its baselines.
QUICK_CASES = ((500, 10, "per_example", (20,)), (500, 50, "unified", (30,)), (2000, 50, "unified", (20,)))
PHASES = ("forward", "linear_backward", "backward", "update", "step")


def flop_limit(d_input: int, d_hidden: int, n_classes: int, k: int) -> float:
    """Dense / meProp backward FLOPs of the MLP d_input-d-d-n_classes (first layer needs no dx)."""
    dense = 2 * d_input * d_hidden + 4 * d_hidden * d_hidden + 4 * d_hidden * n_classes
    sparse = (2 * d_input + 4 * d_hidden) * k + 4 * d_hidden * n_classes
    return dense / sparse


@dataclass
class BenchRecord:
    d_hidden: int
    minibatch: int
    k: int
    mode: str  # dense (nn.Linear), ours_k0, unified, per_example
    forward_us: float
    linear_backward_us: float
    backward_us: float
    update_us: float
    step_us: float
    linear_backward_speedup: float | None = None
    backward_speedup: float | None = None
    step_speedup: float | None = None
    flop_limit: float | None = None
    pct_of_flop_limit: float | None = None


def _dense_mlp(d_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(D_INPUT, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden), nn.ReLU(),
                         nn.Linear(d_hidden, N_CLASSES))


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


class _Stamps:
    """Time points: ``perf_counter`` on the CPU, recorded CUDA events on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


def _time_linear_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int,
                          stamps: _Stamps) -> float:
    """Median time of one backward through all the linear layers alone, on the inputs and output
    gradients they had in a real backward pass (the same replay for every model)."""
    layers = _linear_layers(model)
    inputs, grads = {}, {}

    def capture(module, args, output):
        inputs[module] = args[0].detach()
        output.register_hook(lambda grad: grads.__setitem__(module, grad.detach()))

    hooks = [layer.register_forward_hook(capture) for layer in layers]
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    replay_inputs = [inputs[layer].clone().requires_grad_(index > 0) for index, layer in enumerate(layers)]
    outputs = [layer(layer_input) for layer, layer_input in zip(layers, replay_inputs)]
    output_grads = [grads[layer] for layer in layers]
    samples = []
    for step in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        for layer_input in replay_inputs:
            layer_input.grad = None
        start = stamps.now()
        torch.autograd.backward(outputs, output_grads, retain_graph=True)
        end = stamps.now()
        if step >= warmup:
            samples.append(stamps.seconds(start, end))
    model.zero_grad(set_to_none=True)
    return statistics.median(samples) * 1e6


def _time_steps(model: nn.Module, optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], repeats: int,
                warmup: int, stamps: _Stamps) -> dict[str, float]:
    samples: dict[str, list[float]] = {phase: [] for phase in ("forward", "backward", "update", "step")}
    model.train()
    for step in range(warmup + repeats):
        x, y = batches[step % len(batches)]
        t0 = stamps.now()
        loss = F.cross_entropy(model(x), y)
        t1 = stamps.now()
        loss.backward()
        t2 = stamps.now()
        optimizer.step()
        optimizer.zero_grad()
        t3 = stamps.now()
        if step >= warmup:
            samples["forward"].append(stamps.seconds(t0, t1))
            samples["backward"].append(stamps.seconds(t1, t2))
            samples["update"].append(stamps.seconds(t2, t3))
            samples["step"].append(stamps.seconds(t0, t3))
    return {phase: statistics.median(values) * 1e6 for phase, values in samples.items()}


def _measure(model: nn.Module, optimizer, batches, repeats: int, warmup: int, stamps: _Stamps) -> dict[str, float]:
    timings = _time_steps(model, optimizer, batches, repeats, warmup, stamps)
    x, y = batches[0]
    timings["linear_backward"] = _time_linear_backward(model, x, y, repeats, warmup, stamps)
    return timings


def _record(d_hidden: int, batch: int, k: int, mode: str, timings: dict[str, float],
            dense: dict[str, float] | None) -> BenchRecord:
    record = BenchRecord(d_hidden, batch, k, mode, *(round(timings[p], 1) for p in
                                                     ("forward", "linear_backward", "backward", "update", "step")))
    if dense is not None:
        record.linear_backward_speedup = round(dense["linear_backward"] / timings["linear_backward"], 2)
        record.backward_speedup = round(dense["backward"] / timings["backward"], 2)
        record.step_speedup = round(dense["step"] / timings["step"], 2)
    if mode in ("unified", "per_example"):
        record.flop_limit = round(flop_limit(D_INPUT, d_hidden, N_CLASSES, k), 2)
        record.pct_of_flop_limit = round(100 * record.linear_backward_speedup / record.flop_limit, 1)
    return record


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device, count: int = 8):
    generator = torch.Generator().manual_seed(batch)
    order = torch.randperm(len(images), generator=generator)[: batch * count]
    return [(images[order[i * batch:(i + 1) * batch]].to(device), labels[order[i * batch:(i + 1) * batch]].to(device))
            for i in range(count)]


def bench_cases(quick: bool) -> list[tuple[int, int, tuple[str, ...], tuple[int, ...]]]:
    """(d_hidden, minibatch, modes, k values) to run."""
    if quick:
        return [(d, b, (mode,), ks) for d, b, mode, ks in QUICK_CASES]
    return [(d, b, ("unified", "per_example"), FULL_GRID["k"])
            for d in FULL_GRID["d_hidden"] for b in FULL_GRID["minibatch"]]


def run_bench(quick: bool = False, repeats: int | None = None, warmup: int = 100, optimizer: str = "adam",
              device: str = "cpu", log: Callable[[str], None] = print) -> list[BenchRecord]:
    """Time the dense baseline, our layer at k=0, and meProp in each mode and k; see the module doc."""
    repeats = repeats or 100
    target = resolve_device(device)
    stamps = _Stamps(target)
    train_images, train_labels, _, _ = load_idx_folder(bundled_sample_dir())
    images = train_images.reshape(len(train_images), -1).float().div_(255)
    labels = train_labels.long()
    lr = Config(optimizer=optimizer).replace().lr
    records = []
    # Warm the process up (allocator, thread pool, kernels) before the first figure.
    warm = _dense_mlp(500).to(target)
    _time_steps(warm, stock_optimizer(optimizer, warm.parameters(), lr), _batches(images, labels, 10, target),
                200, 0, stamps)
    for d_hidden, batch, modes, ks in bench_cases(quick):
        batches = _batches(images, labels, batch, target)
        torch.manual_seed(0)
        dense_model = _dense_mlp(d_hidden).to(target)
        dense = _measure(dense_model, stock_optimizer(optimizer, dense_model.parameters(), lr), batches,
                         repeats, warmup, stamps)
        records.append(_record(d_hidden, batch, 0, "dense", dense, None))
        runs: list[tuple[str, int]] = [("ours_k0", 0)] + [(mode, k) for mode in modes for k in ks if k < d_hidden]
        for mode, k in runs:
            config = Config(optimizer=optimizer, d_hidden=d_hidden, k=k, unified=(mode == "unified")).replace()
            torch.manual_seed(0)
            model = build_mlp(D_INPUT, N_CLASSES, d_hidden, 3, k, unified=config.unified, sparse_grad=True).to(target)
            timings = _measure(model, build_optimizer(config, model), batches, repeats, warmup, stamps)
            records.append(_record(d_hidden, batch, k, mode, timings, dense))
        log(f"  d={d_hidden} minibatch={batch}: {len(runs) + 1} models timed")
    return records


def environment_line(optimizer: str, device: str = "cpu") -> str:
    from .results import cpu_model
    target = resolve_device(device)
    where = torch.cuda.get_device_name(target) if target.type == "cuda" else f"CPU kernels: {backend_name()}"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, {target.type} "
            f"({where}), optimizer {optimizer}")


HEADERS = ["d", "minibatch", "mode", "k", "forward µs", "linear bwd µs", "overall bwd µs", "update µs",
           "step µs", "linear bwd speedup", "bwd speedup", "step speedup", "FLOP limit", "% of limit"]


def markdown_table(records: Iterable[BenchRecord]) -> str:
    from tabulate import tabulate

    def cell(value: Any, suffix: str = "") -> str:
        return "" if value is None else f"{value}{suffix}"

    rows = [[r.d_hidden, r.minibatch, r.mode, r.k, r.forward_us, r.linear_backward_us, r.backward_us, r.update_us,
             r.step_us, cell(r.linear_backward_speedup, "x"), cell(r.backward_speedup, "x"),
             cell(r.step_speedup, "x"), cell(r.flop_limit, "x"), cell(r.pct_of_flop_limit, "%")]
            for r in records]
    return tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)


def as_dicts(records: Iterable[BenchRecord]) -> list[dict[str, Any]]:
    return [asdict(record) for record in records]
