"""``meprop bench``: per-phase timings of meProp MLPs against a plain ``nn.Linear`` MLP.

Everything runs in one process with a fixed thread count, after warm-up; each figure is a
median over repeated iterations on real MNIST digits (the bundled sample). The dense
baseline is ``nn.Linear`` layers with torch's own optimizer (fused Adam where torch has
it); meProp models use row-sparse gradients and row-sparse updates. "Linear backward" is
timed the same way for both: each linear layer's backward alone, replayed on the inputs and
output gradients of a real backward pass, summed over the layers.
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

from .config import Config
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


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _dense_mlp(d_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(D_INPUT, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden), nn.ReLU(),
                         nn.Linear(d_hidden, N_CLASSES))


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _time_linear_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int, warmup: int) -> float:
    """Sum over linear layers of the median time of that layer's backward alone."""
    layers = _linear_layers(model)
    inputs, grads = {}, {}

    def capture(module, args, output):
        inputs[module] = args[0].detach()
        output.register_hook(lambda grad: grads.__setitem__(module, grad.detach()))

    hooks = [layer.register_forward_hook(capture) for layer in layers]
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    model.zero_grad(set_to_none=True)
    total = 0.0
    for index, layer in enumerate(layers):
        layer_input = inputs[layer].clone().requires_grad_(index > 0)
        output = layer(layer_input)
        samples = []
        for step in range(warmup + repeats):
            layer_input.grad = None
            layer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            torch.autograd.backward(output, grads[layer], retain_graph=True)
            if step >= warmup:
                samples.append(time.perf_counter() - start)
        total += _median_us(samples)
    model.zero_grad(set_to_none=True)
    return total


def _time_steps(model: nn.Module, optimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], repeats: int,
                warmup: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {phase: [] for phase in ("forward", "backward", "update", "step")}
    model.train()
    for step in range(warmup + repeats):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t3 = time.perf_counter()
        if step >= warmup:
            samples["forward"].append(t1 - t0)
            samples["backward"].append(t2 - t1)
            samples["update"].append(t3 - t2)
            samples["step"].append(t3 - t0)
    return {phase: _median_us(values) for phase, values in samples.items()}


def _measure(model: nn.Module, optimizer, batches, repeats: int, warmup: int) -> dict[str, float]:
    timings = _time_steps(model, optimizer, batches, repeats, warmup)
    x, y = batches[0]
    timings["linear_backward"] = _time_linear_backward(model, x, y, repeats, warmup)
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


def _batches(images: torch.Tensor, labels: torch.Tensor, batch: int, count: int = 8):
    generator = torch.Generator().manual_seed(batch)
    order = torch.randperm(len(images), generator=generator)[: batch * count]
    return [(images[order[i * batch:(i + 1) * batch]], labels[order[i * batch:(i + 1) * batch]]) for i in range(count)]


def bench_cases(quick: bool) -> list[tuple[int, int, tuple[str, ...], tuple[int, ...]]]:
    """(d_hidden, minibatch, modes, k values) to run."""
    if quick:
        return [(d, b, (mode,), ks) for d, b, mode, ks in QUICK_CASES]
    return [(d, b, ("unified", "per_example"), FULL_GRID["k"])
            for d in FULL_GRID["d_hidden"] for b in FULL_GRID["minibatch"]]


def run_bench(quick: bool = False, repeats: int | None = None, warmup: int = 20, optimizer: str = "adam",
              log: Callable[[str], None] = print) -> list[BenchRecord]:
    """Time the dense baseline, our layer at k=0, and meProp in each mode and k; see the module doc."""
    repeats = repeats or (40 if quick else 60)
    train_images, train_labels, _, _ = load_idx_folder(bundled_sample_dir())
    images = train_images.reshape(len(train_images), -1).float().div_(255)
    labels = train_labels.long()
    lr = Config(optimizer=optimizer).replace().lr
    records = []
    for d_hidden, batch, modes, ks in bench_cases(quick):
        batches = _batches(images, labels, batch)
        torch.manual_seed(0)
        dense_model = _dense_mlp(d_hidden)
        dense = _measure(dense_model, stock_optimizer(optimizer, dense_model.parameters(), lr), batches,
                         repeats, warmup)
        records.append(_record(d_hidden, batch, 0, "dense", dense, None))
        runs: list[tuple[str, int]] = [("ours_k0", 0)] + [(mode, k) for mode in modes for k in ks if k < d_hidden]
        for mode, k in runs:
            config = Config(optimizer=optimizer, d_hidden=d_hidden, k=k, unified=(mode == "unified"),
                            sparse_update=True).replace()
            torch.manual_seed(0)
            model = build_mlp(D_INPUT, N_CLASSES, d_hidden, 3, k, unified=config.unified, sparse_grad=True)
            timings = _measure(model, build_optimizer(config, model), batches, repeats, warmup)
            records.append(_record(d_hidden, batch, k, mode, timings, dense))
        log(f"  d={d_hidden} minibatch={batch}: {len(runs) + 1} models timed")
    return records


def environment_line(optimizer: str) -> str:
    from .results import cpu_model
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
            f"meProp CPU kernels: {backend_name()}, optimizer {optimizer}")


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
