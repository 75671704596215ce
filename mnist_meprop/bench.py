"""``meprop bench``: per-phase timings of meProp MLPs against a plain ``nn.Linear`` MLP, held to a bound.

Everything runs in one process with a fixed thread count, after warm-up, on real MNIST digits
(the bundled sample). Per setting (width, minibatch) the compared models are timed
*interleaved*: round by round, each model runs a few steps in turn (the order rotating), so
drift on a noisy machine hits them alike; every speedup is the median of the per-round ratios,
with its spread (the interquartile range over the median), and rows whose spread exceeds 10%
are marked. Baselines: ``dense`` is ``nn.Linear`` layers with torch's own optimizer (fused Adam
where torch has it), i.e. stock PyTorch; ``ours_k0`` is our engine with meProp off. Our models
run through the fused step (``engine: fused``, one C++ call per step) where it supports the
setting (Adam or AdaGrad on the CPU), else through autograd with row-sparse gradients and the
row-sparse update (``sparse_update: exact``). "Linear backward" is timed the same way for all:
one backward through the linear layers alone, replayed on the inputs and output gradients they
had in a real backward pass.

The bound: each row states the time lower bound of the linear backward, dense and meProp, from
its FLOPs at the GEMM rate and from its bytes moved at the memory bandwidth, both measured here
at the start; the larger of the two binds, per layer. Their ratio is the speedup limit, and
``percent_of_bound`` is the measured speedup over stock dense as a percentage of it. At minibatch
10, per-example top-k touches at most 10 k rows of each weight (the union is counted from the
real gradients), and bytes bind; at large width with unified top-k, FLOPs do. On a GPU, CUDA
events time every phase.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, fused_engine_limits, resolve_device
from .data import bundled_sample_dir, load_idx_folder
from .engine import FusedMLPStep
from .kernels import backend_name, cpu_kernels
from .model import build_mlp
from .optim import build_optimizer, stock_optimizer

D_INPUT, N_CLASSES = 784, 10
FULL_GRID = {"d_hidden": (500, 2000), "minibatch": (1, 10, 50, 200), "k": (10, 20, 30, 80, 160)}
# --quick: every target setting of the issue, with its baselines.
QUICK_CASES = ((500, 10, "per_example", (20,)), (500, 50, "unified", (30,)), (500, 200, "per_example", (20,)),
               (2000, 50, "unified", (20,)))
PHASES = ("forward", "linear_backward", "backward", "update", "step")
NOISY_SPREAD = 0.10  # a speedup whose per-round ratios spread more than this is marked
FLOAT_BYTES = 4


def flop_limit(d_input: int, d_hidden: int, n_classes: int, k: int) -> float:
    """Dense / meProp backward FLOPs of the MLP d_input-d-d-n_classes (first layer needs no dx)."""
    dense = 2 * d_input * d_hidden + 4 * d_hidden * d_hidden + 4 * d_hidden * n_classes
    sparse = (2 * d_input + 4 * d_hidden) * k + 4 * d_hidden * n_classes
    return dense / sparse


@dataclass(frozen=True)
class MachineRates:
    """What this machine sustains at the bench's thread count: float32 GEMM, and copying a buffer
    the size of the model's weights (in cache when they fit, as in training)."""

    gemm_flops: float  # FLOP/s
    bandwidth: float  # bytes/s (read + write)


def _best_seconds(stamps: "_Stamps", work: Callable[[], Any], times: int = 5) -> float:
    work()
    samples = []
    for _ in range(times):
        start = stamps.now()
        work()
        samples.append(stamps.seconds(start, stamps.now()))
    return min(samples)


def gemm_rate(device: torch.device, size: int = 1024) -> float:
    """FLOP/s of a ``size``-cube float32 matmul (best of 5): the rate the FLOP bound assumes."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size**3 / _best_seconds(_Stamps(device), lambda: a.mm(b))


def copy_bandwidth(device: torch.device, n_bytes: int) -> float:
    """Bytes/s (read + write) copying a buffer of ``n_bytes`` (best of 5, repeated to at least 64 MB)."""
    floats = max(1, n_bytes // FLOAT_BYTES)
    src, dst = torch.empty(floats, device=device).uniform_(), torch.empty(floats, device=device)
    repeat = max(1, (64 << 20) // (floats * FLOAT_BYTES))

    def copies() -> None:
        for _ in range(repeat):
            dst.copy_(src)
    return 2 * FLOAT_BYTES * floats * repeat / _best_seconds(_Stamps(device), copies)


@dataclass(frozen=True)
class Bound:
    dense_s: float
    meprop_s: float
    binding: str  # "bytes" or "flops": what bounds the meProp backward (summed over layers)

    @property
    def speedup(self) -> float:
        return self.dense_s / self.meprop_s


@dataclass(frozen=True)
class LayerShape:
    """A linear layer of a bound: ``[out, fan_in]``, whether its backward computes ``dx`` and whether
    meProp applies to it."""

    fan_in: int
    out: int
    needs_dx: bool
    meprop: bool


def linear_backward_bound(d_hidden: int, minibatch: int, k: int, unified: bool, touched: list[int] | None,
                          rates: MachineRates) -> Bound:
    """Lower bounds on the linear backward of the MLP 784-d-d-10, dense and meProp (k on the hidden
    layers; k=0 is dense): :func:`layers_bound` of its layers (the first needs no dx)."""
    layers = [LayerShape(D_INPUT, d_hidden, False, True), LayerShape(d_hidden, d_hidden, True, True),
              LayerShape(d_hidden, N_CLASSES, True, False)]
    return layers_bound(layers, minibatch, k, unified, touched, rates)


def layers_bound(layers: list[LayerShape], minibatch: int, k: int, unified: bool, touched: list[int] | None,
                 rates: MachineRates, activations_in_memory: bool = False) -> Bound:
    """Lower bounds on the linear backward of ``layers``, dense and meProp (k on the meProp layers;
    k=0 is dense), each layer bounded by max(FLOPs / GEMM rate, bytes / bandwidth).

    Dense layer [out, in], n examples: 2n·out·in FLOPs for dW, as many for dx; bytes: dW written and,
    for dx, W read. meProp layer: 2n·k·in FLOPs each; bytes: the touched rows of dW written and of W
    read. Touched rows: k when unified, else the union counted in ``touched`` (at most n·k). The
    minibatch-sized tensors (dy, x, dx) stay in cache and are left out, unless
    ``activations_in_memory`` (the parser's minibatch of 10,000: x alone is 96 MB), where each is
    moved once, by dense and meProp alike.
    """
    dense_s = meprop_s = flops_s = bytes_s = 0.0
    for index, layer in enumerate(layers):
        passes = 2 if layer.needs_dx else 1
        dense_flops = 2 * minibatch * layer.out * layer.fan_in * passes
        activations = (FLOAT_BYTES * minibatch * (layer.fan_in * passes + layer.out)
                       if activations_in_memory else 0)
        dense_bytes = FLOAT_BYTES * (layer.out * layer.fan_in + layer.out) * passes + activations
        dense_s += max(dense_flops / rates.gemm_flops, dense_bytes / rates.bandwidth)
        if layer.meprop and 0 < k < layer.out:
            rows = k if unified else (touched[index] if touched else min(layer.out, minibatch * k))
            flops = 2 * minibatch * k * layer.fan_in * passes
            moved = FLOAT_BYTES * (rows * layer.fan_in + rows) * passes + activations
        else:
            flops, moved = dense_flops, dense_bytes
        flops_s += flops / rates.gemm_flops
        bytes_s += moved / rates.bandwidth
        meprop_s += max(flops / rates.gemm_flops, moved / rates.bandwidth)
    return Bound(dense_s, meprop_s, "bytes" if bytes_s >= flops_s else "flops")


@dataclass
class BenchRecord:
    d_hidden: int
    minibatch: int
    k: int
    mode: str  # dense (nn.Linear + stock optimizer), ours_k0, unified, per_example
    forward_us: float
    linear_backward_us: float
    backward_us: float
    update_us: float
    step_us: float
    linear_backward_speedup: float | None = None  # against stock PyTorch dense, as every *_speedup
    backward_speedup: float | None = None
    step_speedup: float | None = None
    flop_limit: float | None = None
    pct_of_flop_limit: float | None = None
    step_speedup_vs_engine_dense: float | None = None
    linear_backward_speedup_spread: float | None = None
    step_speedup_spread: float | None = None
    noisy: bool = False
    touched_rows: list[int] | None = None  # rows of each weight that got a gradient (mean per step)
    dense_bound_us: float | None = None
    meprop_bound_us: float | None = None
    bound_binding: str | None = None
    bound_speedup: float | None = None
    percent_of_bound: float | None = None
    gemm_gflops: float | None = None  # the rates the bound assumes
    bandwidth_gbs: float | None = None
    rounds: int = 0
    engine: str = "stock"  # how the model trained: stock (nn.Linear + torch's optimizer), fused or autograd


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


@dataclass
class _Subject:
    """One compared model: its optimizer (or fused step), its linear-backward replay and its per-round medians."""

    mode: str
    k: int
    model: nn.Module
    optimizer: Any
    replay: Callable[[int], float]
    touched: list[int] | None
    fused: FusedMLPStep | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)


def _linear_backward_replay(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stamps: _Stamps,
                            first_dx: bool = False) -> tuple[Callable[[int], float], list[int] | None]:
    """A function timing ``n`` backwards through the model's linear layers alone (median seconds),
    on the inputs and output gradients they had in a real backward pass; and, for row-sparse
    gradients, how many rows of each layer's weight that backward touched. The first layer computes
    ``dx`` only with ``first_dx`` (its input is the data, or, for the parser, trained embeddings)."""
    layers = _linear_layers(model)
    inputs, grads = {}, {}

    def capture(module, args, output):
        inputs[module] = args[0].detach()
        output.register_hook(lambda grad: grads.__setitem__(module, grad.detach()))

    hooks = [layer.register_forward_hook(capture) for layer in layers]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    touched = None
    if any(layer.weight.grad is not None and layer.weight.grad.is_sparse for layer in layers):
        touched = [int(layer.weight.grad.coalesce()._indices().shape[1]) if layer.weight.grad.is_sparse
                   else layer.out_features for layer in layers]
    model.zero_grad(set_to_none=True)
    replay_inputs = [inputs[layer].clone().requires_grad_(index > 0 or first_dx) for index, layer in enumerate(layers)]
    output_grads = [grads[layer] for layer in layers]

    def replay(n: int) -> float:
        # a fresh graph per call (untimed): training steps in between update the weights in
        # place, which stock optimizers record in the tensors' versions (AdaGrad's foreach path)
        outputs = [layer(layer_input) for layer, layer_input in zip(layers, replay_inputs)]
        samples = []
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            for layer_input in replay_inputs:
                layer_input.grad = None
            start = stamps.now()
            torch.autograd.backward(outputs, output_grads, retain_graph=True)
            samples.append(stamps.seconds(start, stamps.now()))
        model.zero_grad(set_to_none=True)
        return statistics.median(samples)
    return replay, touched


def _time_steps(subject: _Subject, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
                stamps: _Stamps, offset: int = 0) -> dict[str, float]:
    """Median seconds per phase over ``steps`` training steps (batches taken from ``offset`` on).
    A fused step is timed whole; its phases are the ones it times itself."""
    samples: dict[str, list[float]] = {phase: [] for phase in ("forward", "backward", "update", "step")}
    model, optimizer = subject.model, subject.optimizer
    model.train()
    for step in range(steps):
        x, y = batches[(offset + step) % len(batches)]
        if subject.fused is not None:
            t0 = stamps.now()
            _, _, phases = subject.fused.step(x, y)
            samples["step"].append(stamps.seconds(t0, stamps.now()))
            for phase in ("forward", "backward", "update"):
                samples[phase].append(phases[phase])
            continue
        forward, backward, update = timed_step(model, x, y, optimizer, stamps.now, stamps.seconds)
        for phase, value in zip(("forward", "backward", "update", "step"),
                                (forward, backward, update, forward + backward + update)):
            samples[phase].append(value)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def timed_step(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor, optimizer: Any,
               now: Callable[[], Any] = time.perf_counter,
               seconds: Callable[[Any, Any], float] = lambda start, end: end - start) -> tuple[float, float, float]:
    """One cross-entropy training step; the seconds of its forward (with the loss), backward and update."""
    t0 = now()
    loss = F.cross_entropy(model(inputs), target)
    t1 = now()
    loss.backward()
    t2 = now()
    optimizer.step()
    optimizer.zero_grad()
    t3 = now()
    return seconds(t0, t1), seconds(t1, t2), seconds(t2, t3)


def _time_interleaved(subjects: list[_Subject], batches, steps: int, rounds: int, warmup: int,
                      stamps: _Stamps) -> None:
    """Warm every subject up, then ``rounds`` rounds in which each (in a rotating order) runs
    ``steps`` training steps and ``steps`` linear-backward replays; per-round medians are kept."""
    for subject in subjects:
        _time_steps(subject, batches, warmup, stamps)
        subject.replay(max(1, warmup // 4))

    def measure(subject: _Subject, index: int) -> dict[str, float]:
        timings = _time_steps(subject, batches, steps, stamps, offset=index * steps)
        timings["linear_backward"] = subject.replay(steps)
        return timings
    interleaved_rounds(subjects, rounds, measure)


def interleaved_rounds(subjects: list[Any], rounds: int, measure: Callable[[Any, int], dict[str, float]]) -> None:
    """``rounds`` rounds in which every subject, in a rotating order, is measured once (``measure(subject,
    round_index)``), so that drift on a noisy machine hits them alike; results go to each one's ``rounds``."""
    for index in range(rounds):
        shift = index % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            subject.rounds.append(measure(subject, index))


def _median_of(subject: _Subject, phase: str) -> float:
    return statistics.median(r[phase] for r in subject.rounds)


def ratio_of_rounds(base: Any, subject: Any, phase: str) -> tuple[float, float]:
    """Median of the per-round ratios base / subject for ``phase``, and their spread (IQR / median)."""
    ratios = sorted(b[phase] / s[phase] for b, s in zip(base.rounds, subject.rounds))
    middle = statistics.median(ratios)
    if len(ratios) < 4:
        return middle, (ratios[-1] - ratios[0]) / middle
    quartiles = statistics.quantiles(ratios, n=4)
    return middle, (quartiles[2] - quartiles[0]) / middle


def _record(d_hidden: int, batch: int, subject: _Subject, stock: _Subject, ours_dense: _Subject | None,
            rates: MachineRates) -> BenchRecord:
    record = BenchRecord(d_hidden, batch, subject.k, subject.mode,
                         *(round(_median_of(subject, phase) * 1e6, 1) for phase in PHASES), rounds=len(subject.rounds),
                         engine="stock" if subject is stock else ("fused" if subject.fused is not None else "autograd"))
    if subject is stock:
        return record
    lb, lb_spread = ratio_of_rounds(stock, subject, "linear_backward")
    step, step_spread = ratio_of_rounds(stock, subject, "step")
    record.linear_backward_speedup, record.linear_backward_speedup_spread = round(lb, 2), round(lb_spread, 3)
    record.step_speedup, record.step_speedup_spread = round(step, 2), round(step_spread, 3)
    record.backward_speedup = round(ratio_of_rounds(stock, subject, "backward")[0], 2)
    record.noisy = max(lb_spread, step_spread) > NOISY_SPREAD
    if ours_dense is not None:
        record.step_speedup_vs_engine_dense = round(ratio_of_rounds(ours_dense, subject, "step")[0], 2)
    if subject.mode in ("unified", "per_example"):
        record.flop_limit = round(flop_limit(D_INPUT, d_hidden, N_CLASSES, subject.k), 2)
        record.pct_of_flop_limit = round(100 * lb / record.flop_limit, 1)
        bound = linear_backward_bound(d_hidden, batch, subject.k, subject.mode == "unified", subject.touched, rates)
        record.touched_rows = subject.touched
        record.dense_bound_us, record.meprop_bound_us = round(bound.dense_s * 1e6, 2), round(bound.meprop_s * 1e6, 2)
        record.bound_binding, record.bound_speedup = bound.binding, round(bound.speedup, 2)
        record.percent_of_bound = round(100 * lb / bound.speedup, 1)
        record.gemm_gflops, record.bandwidth_gbs = round(rates.gemm_flops / 1e9, 1), round(rates.bandwidth / 1e9, 1)
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


def _subject(mode: str, k: int, model: nn.Module, optimizer, batches, stamps: _Stamps,
             fused: FusedMLPStep | None = None) -> _Subject:
    replay, touched = _linear_backward_replay(model, *batches[0], stamps)
    return _Subject(mode, k, model, optimizer, replay, touched, fused)


def run_bench(quick: bool = False, repeats: int | None = None, warmup: int = 50, optimizer: str = "adam",
              device: str = "cpu", log: Callable[[str], None] = print, rounds: int = 7,
              engine: str = "fused") -> list[BenchRecord]:
    """Time stock dense, our engine at k=0 and meProp in each mode and k, interleaved in ``rounds``
    rounds of ``repeats`` steps; see the module doc. ``engine`` runs our models (``ours_k0`` and
    meProp) through the fused step where it supports the setting (Adam or AdaGrad on the CPU), else autograd."""
    steps = repeats or 20
    target = resolve_device(device)
    stamps = _Stamps(target)
    train_images, train_labels, _, _ = load_idx_folder(bundled_sample_dir())
    images = train_images.reshape(len(train_images), -1).float().div_(255)
    labels = train_labels.long()
    lr = Config(optimizer=optimizer).replace().lr
    gemm = gemm_rate(target)
    log(f"  machine: float32 GEMM {gemm / 1e9:.1f} GFLOP/s (1024-cube matmul)")
    records = []
    for d_hidden, batch, modes, ks in bench_cases(quick):
        batches = _batches(images, labels, batch, target)
        torch.manual_seed(0)
        dense_model = _dense_mlp(d_hidden).to(target)
        subjects = [_subject("dense", 0, dense_model, stock_optimizer(optimizer, dense_model.parameters(), lr),
                             batches, stamps)]
        for mode, k in [("ours_k0", 0)] + [(mode, k) for mode in modes for k in ks if k < d_hidden]:
            config = Config(optimizer=optimizer, d_hidden=d_hidden, k=k, unified=(mode == "unified"),
                            device=target.type, engine="autograd").replace()
            if engine == "fused" and fused_engine_limits(config) is None and cpu_kernels() is not None:
                config = config.replace(engine="fused")
            torch.manual_seed(0)
            model = build_mlp(D_INPUT, N_CLASSES, d_hidden, 3, k, unified=config.unified, sparse_grad=True).to(target)
            step_optimizer = build_optimizer(config, model)
            fused = FusedMLPStep(config, model, step_optimizer) if config.engine == "fused" else None
            subjects.append(_subject(mode, k, model, step_optimizer, batches, stamps, fused))
        _time_interleaved(subjects, batches, steps, rounds, warmup, stamps)
        weight_bytes = FLOAT_BYTES * sum(p.numel() for p in dense_model.parameters())
        rates = MachineRates(gemm, copy_bandwidth(target, weight_bytes))
        log(f"  d={d_hidden}: copy bandwidth {rates.bandwidth / 1e9:.1f} GB/s at the weights' size "
            f"({weight_bytes / 1e6:.1f} MB)")
        stock, ours_dense = subjects[0], subjects[1]
        records += [_record(d_hidden, batch, subject, stock, ours_dense if subject is not ours_dense else None, rates)
                    for subject in subjects]
        log(f"  d={d_hidden} minibatch={batch}: {len(subjects)} models timed, {rounds} interleaved rounds")
        del subjects, stock, ours_dense
        gc.collect()  # the models and optimizers (linked by the optimizers' hooks) go before the next setting
    return records


def environment_line(optimizer: str, device: str = "cpu") -> str:
    from .results import cpu_model
    target = resolve_device(device)
    where = torch.cuda.get_device_name(target) if target.type == "cuda" else f"CPU kernels: {backend_name()}"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, {target.type} "
            f"({where}), optimizer {optimizer}")


HEADERS = ["d", "minibatch", "mode", "k", "forward µs", "linear bwd µs", "overall bwd µs", "update µs",
           "step µs", "linear bwd speedup", "step speedup", "step vs ours_k0", "bound", "bound speedup",
           "% of bound", "FLOP limit"]


def markdown_table(records: Iterable[BenchRecord]) -> str:
    """The bench as a GitHub table; speedups are against stock dense (± their spread), noisy rows marked."""
    from tabulate import tabulate

    def cell(value: Any, suffix: str = "") -> str:
        return "" if value is None else f"{value}{suffix}"

    def speedup(value: float | None, spread: float | None) -> str:
        return "" if value is None else f"{value}x ±{100 * spread:.0f}%"

    rows = [[r.d_hidden, r.minibatch, r.mode + (" *" if r.noisy else ""), r.k, r.forward_us, r.linear_backward_us,
             r.backward_us, r.update_us, r.step_us,
             speedup(r.linear_backward_speedup, r.linear_backward_speedup_spread),
             speedup(r.step_speedup, r.step_speedup_spread), cell(r.step_speedup_vs_engine_dense, "x"),
             cell(r.bound_binding), cell(r.bound_speedup, "x"), cell(r.percent_of_bound, "%"), cell(r.flop_limit, "x")]
            for r in records]
    table = tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True)
    return table + (f"\n\n\\* spread of the per-round ratios above {100 * NOISY_SPREAD:.0f}%: a noisy figure"
                    if any(r.noisy for r in records) else "")


def speedup_plot(records: Iterable[BenchRecord], path: Path) -> Path:
    """Linear-backward speedup vs k (measured, solid) against the bound (dashed), one panel per
    (width, minibatch), one colour per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meprop = [r for r in records if r.mode in ("unified", "per_example") and r.bound_speedup is not None]
    panels = sorted({(r.d_hidden, r.minibatch) for r in meprop})
    columns = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for axis, (d_hidden, batch) in zip(axes.flat, panels):
        for colour, mode in zip(("tab:blue", "tab:orange"), ("unified", "per_example")):
            points = sorted((r.k, r.linear_backward_speedup, r.bound_speedup) for r in meprop
                            if (r.d_hidden, r.minibatch, r.mode) == (d_hidden, batch, mode))
            if points:
                ks, measured, bound = zip(*points)
                axis.plot(ks, measured, "o-", color=colour, label=f"{mode} measured")
                axis.plot(ks, bound, "x--", color=colour, label=f"{mode} bound")
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_title(f"d={d_hidden}, minibatch {batch}", fontsize=9)
        axis.set_xlabel("k")
        axis.set_ylabel("linear backward speedup")
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if panels:
        axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def as_dicts(records: Iterable[BenchRecord]) -> list[dict[str, Any]]:
    return [asdict(record) for record in records]
