"""``meprop bench --parsing``: the parser's training step and its linear backward at the paper's
minibatch of 10,000 transition examples, meProp (per-example top-k on every layer, as the paper
does for parsing) against stock PyTorch and against our own dense path, held to a bound.

One process, a fixed thread count, warm-up, then interleaved rounds as in :mod:`mnist_meprop.bench`
(every speedup is the median of per-round ratios, with its spread). The models are the paper's
parser: 48 features embedded in 50 dimensions (2,400 inputs), two hidden layers of 500 with the
cube activation, an output layer over the transitions, Adam; random feature indices and targets:

- ``stock``: ``nn.Embedding``, ``nn.Linear`` layers and the cube, with torch's fused Adam;
- ``ours_k0``: :class:`mnist_meprop.parsing_model.Parser` with ``k=0`` (plain backprop, timed the
  same way as meProp's);
- ``meprop``: the parser with ``k`` on the hidden and output layers (row-sparse gradients,
  ``sparse_update: exact``).

"Linear backward" is the three linear layers' backward replayed alone on the inputs and output
gradients of a real step, ``dx`` of the first layer included (it feeds the embeddings), the same
way for every model. The bound (:func:`mnist_meprop.bench.layers_bound`) counts FLOPs at the GEMM
rate and bytes at the bandwidth measured here, the activations included: at this minibatch they do
not fit in cache (x of the first layer alone is 96 MB).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .bench import (FLOAT_BYTES, NOISY_SPREAD, LayerShape, MachineRates, _linear_backward_replay, _Stamps,
                    _Subject, _time_steps, copy_bandwidth, gemm_rate, interleaved_rounds, layers_bound,
                    ratio_of_rounds)
from .config import validate
from .ops import time_linear_backward
from .optim import build_optimizer, stock_optimizer
from .parsing_model import CHEN_MANNING_INIT, EMBEDDING_DIM, N_FEATURES, Cube, Parser

# EWT's sizes: about 20,000 embedded words, tags and labels, 73 transitions (36 relations).
N_EMBEDDINGS, N_TRANSITIONS = 20_000, 73
PHASES = ("forward", "linear_backward", "backward", "update", "step")


class StockParser(nn.Module):
    """The parser from stock PyTorch modules: the baseline every speedup is measured against."""

    def __init__(self, d_hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(N_EMBEDDINGS, EMBEDDING_DIM)
        self.mlp = nn.Sequential(nn.Linear(EMBEDDING_DIM * N_FEATURES, d_hidden), Cube(),
                                 nn.Linear(d_hidden, d_hidden), Cube(), nn.Linear(d_hidden, N_TRANSITIONS))
        with torch.no_grad():
            for tensor in (self.embed.weight, *(m.weight for m in self.mlp if isinstance(m, nn.Linear))):
                tensor.uniform_(-CHEN_MANNING_INIT, CHEN_MANNING_INIT)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(inputs).reshape(len(inputs), -1))


@dataclass
class ParsingBenchRecord:
    """Medians in milliseconds; speedups as medians of per-round ratios (spread: IQR / median)."""

    model: str
    k: int
    minibatch: int
    forward_ms: float
    linear_backward_ms: float
    backward_ms: float
    update_ms: float
    step_ms: float
    step_speedup: float | None = None  # against stock PyTorch, as every *_speedup without a suffix
    linear_backward_speedup: float | None = None
    linear_backward_speedup_vs_ours_k0: float | None = None
    spread: float | None = None
    noisy: bool = False
    touched_rows: list[int] | None = None
    flop_limit: float | None = None
    bound_binding: str | None = None
    bound_speedup: float | None = None
    percent_of_bound: float | None = None
    gemm_gflops: float | None = None
    bandwidth_gbs: float | None = None


def parser_layers(d_hidden: int) -> list[LayerShape]:
    """The parser's linear layers for the bound: all compute dx (the first feeds the embeddings), all meProp."""
    return [LayerShape(EMBEDDING_DIM * N_FEATURES, d_hidden, True, True), LayerShape(d_hidden, d_hidden, True, True),
            LayerShape(d_hidden, N_TRANSITIONS, True, True)]


def parser_flop_limit(d_hidden: int, k: int) -> float:
    """Dense / meProp FLOPs of the parser's linear backward (k on every layer, dx everywhere)."""
    widths = [(layer.fan_in, layer.out) for layer in parser_layers(d_hidden)]
    return sum(fan_in * out for fan_in, out in widths) / sum(fan_in * min(k, out) for fan_in, out in widths)


def _subject(name: str, k: int, d_hidden: int, minibatch: int, batch: tuple[torch.Tensor, torch.Tensor],
             stamps: _Stamps) -> _Subject:
    """A compared model (``mode`` is its name: stock, ours_k0 or meprop) with its optimizer and replay."""
    torch.manual_seed(0)
    if name == "stock":
        model: nn.Module = StockParser(d_hidden)
        optimizer = stock_optimizer("adam", model.parameters(), 1e-3)
    else:
        model = Parser(N_EMBEDDINGS, N_TRANSITIONS, d_hidden, 3, k, activation="cube")
        config = validate({"task": "parsing", "dataset": "ewt", "d_hidden": d_hidden, "k": k, "optimizer": "adam",
                           "activation": "cube", "d_minibatch": minibatch})
        optimizer = build_optimizer(config, model)
    replay, touched = _linear_backward_replay(model, *batch, stamps, first_dx=True)
    return _Subject(name, k, model, optimizer, replay, touched)


def _measure(subject: _Subject, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
             stamps: _Stamps) -> dict[str, float]:
    """Median seconds per phase over ``steps`` training steps (through our models' timed path, as in
    training), and the linear backward replayed ``steps`` times."""
    with time_linear_backward():
        medians = _time_steps(subject, batches, steps, stamps)
    medians["linear_backward"] = subject.replay(steps)
    return medians


def run_parsing_bench(k: int = 20, minibatch: int = 10_000, d_hidden: int = 500, rounds: int = 5, steps: int = 3,
                      warmup: int = 1) -> tuple[list[ParsingBenchRecord], MachineRates]:
    """Time the parser's step and linear backward: stock, ours with k=0, meProp with ``k``, interleaved."""
    stamps = _Stamps(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, N_EMBEDDINGS, (minibatch, N_FEATURES), generator=generator),
                torch.randint(0, N_TRANSITIONS, (minibatch,), generator=generator)) for _ in range(2)]
    subjects = [_subject("stock", 0, d_hidden, minibatch, batches[0], stamps),
                _subject("ours_k0", 0, d_hidden, minibatch, batches[0], stamps),
                _subject("meprop", k, d_hidden, minibatch, batches[0], stamps)]
    for subject in subjects:
        _measure(subject, batches, warmup, stamps)
    interleaved_rounds(subjects, rounds, lambda subject, _: _measure(subject, batches, steps, stamps))
    weight_bytes = FLOAT_BYTES * sum(p.numel() for p in subjects[0].model.mlp.parameters())
    rates = MachineRates(gemm_rate(torch.device("cpu")), copy_bandwidth(torch.device("cpu"), weight_bytes))
    stock, ours_k0 = subjects[0], subjects[1]
    records = []
    for subject in subjects:
        medians = {phase: round(statistics.median(r[phase] for r in subject.rounds) * 1e3, 2) for phase in PHASES}
        record = ParsingBenchRecord(subject.mode, subject.k, minibatch, *(medians[phase] for phase in PHASES))
        if subject is not stock:
            record.step_speedup, step_spread = ratio_of_rounds(stock, subject, "step")
            record.linear_backward_speedup, lb_spread = ratio_of_rounds(stock, subject, "linear_backward")
            record.spread = max(step_spread, lb_spread)
            if subject.k:
                record.linear_backward_speedup_vs_ours_k0, own_spread = ratio_of_rounds(
                    ours_k0, subject, "linear_backward")
                record.spread = max(record.spread, own_spread)
                bound = layers_bound(parser_layers(d_hidden), minibatch, subject.k, False, subject.touched, rates,
                                     activations_in_memory=True)
                record.touched_rows = subject.touched
                record.flop_limit = round(parser_flop_limit(d_hidden, subject.k), 1)
                record.bound_binding, record.bound_speedup = bound.binding, round(bound.speedup, 1)
                record.percent_of_bound = round(100 * record.linear_backward_speedup / bound.speedup, 1)
                record.gemm_gflops = round(rates.gemm_flops / 1e9, 1)
                record.bandwidth_gbs = round(rates.bandwidth / 1e9, 1)
            record.noisy = record.spread > NOISY_SPREAD
            for name in ("step_speedup", "linear_backward_speedup", "linear_backward_speedup_vs_ours_k0", "spread"):
                value = getattr(record, name)
                setattr(record, name, None if value is None else round(value, 3 if name == "spread" else 2))
        records.append(record)
    return records, rates


def parsing_markdown(records: list[ParsingBenchRecord]) -> str:
    """The records as a markdown table (speedups with ``*`` where their per-round spread exceeds 10%)."""
    from tabulate import tabulate

    def cell(value: float | None, suffix: str = "x") -> str:
        return "" if value is None else f"{value:g}{suffix}"
    rows = [[r.model + (" *" if r.noisy else ""), r.k, r.forward_ms, r.linear_backward_ms, r.backward_ms, r.update_ms,
             r.step_ms, cell(r.step_speedup), cell(r.linear_backward_speedup),
             cell(r.linear_backward_speedup_vs_ours_k0), cell(r.flop_limit),
             "" if r.bound_speedup is None else f"{r.bound_speedup:g}x ({r.bound_binding})",
             cell(r.percent_of_bound, "%")] for r in records]
    headers = ["model", "k", "forward ms", "linear bwd ms", "backward ms", "update ms", "step ms", "step vs stock",
               "linear bwd vs stock", "linear bwd vs ours_k0", "FLOP limit", "bound (binds)", "% of bound"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def parsing_as_dicts(records: list[ParsingBenchRecord]) -> list[dict[str, Any]]:
    return [asdict(record) for record in records]
