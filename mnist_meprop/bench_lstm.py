"""``meprop bench --lstm``: the POS tagger's training step and its LSTM's backward, meProp against
stock PyTorch and against our own dense path.

One process, a fixed thread count, warm-up, then interleaved rounds as in :mod:`mnist_meprop.bench`
(every speedup is the median of per-round ratios, with its spread). The models are the paper's
tagger (190 inputs per word, an LSTM of 500, 49 tags, Adam), one sentence of ``words`` random words
per step:

- ``stock``: ``nn.LSTM`` and ``nn.Linear`` with torch's fused Adam;
- ``ours_k0``: :class:`mnist_meprop.pos_model.PosTagger` with ``k=0`` (plain backprop through our
  LSTM path, timed the same way as meProp's);
- ``meprop``: the tagger with ``k`` per gate (row-sparse LSTM gradients, ``sparse_update: exact``).

Columns: the phases of a training step; the LSTM's backward alone, replayed on the input and
output gradient of a real step (the same for every model, so stock is comparable), and for our
models the linear part of it (the gate-gradient selection, the recurrence's matmuls, ``dx`` and
the weight gradients; our compiled per-example path times its gates' elementwise backward too).
The FLOP limit of the LSTM's linear backward is ``H / k`` (per word ``16 H (I + H)`` dense against
``16 k (I + H)``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .bench import NOISY_SPREAD, interleaved_rounds, ratio_of_rounds, timed_step
from .config import validate
from .ops import time_linear_backward
from .optim import build_optimizer, stock_optimizer
from .pos_model import FEATURE_DIM, WORD_DIM, PosTagger

N_WORDS, FEATURE_SIZES, N_TAGS = 10_000, (6, 4, 3, 400, 60, 500, 1500), 49
PHASES = ("forward", "backward", "update", "step", "lstm_backward", "lstm_linear_backward")


class StockTagger(nn.Module):
    """The tagger from stock PyTorch modules: the baseline every speedup is measured against."""

    def __init__(self, d_hidden: int) -> None:
        super().__init__()
        self.words = nn.Embedding(N_WORDS, WORD_DIM)
        self.features = nn.ModuleList(nn.Embedding(size, FEATURE_DIM) for size in FEATURE_SIZES)
        self.lstm = nn.LSTM(WORD_DIM + FEATURE_DIM * len(FEATURE_SIZES), d_hidden, batch_first=True)
        self.out = nn.Linear(d_hidden, N_TAGS)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        embedded = torch.cat([self.words(inputs[..., 0])]
                             + [table(inputs[..., 1 + i]) for i, table in enumerate(self.features)], dim=-1)
        scores = self.out(self.lstm(embedded)[0])
        return scores.reshape(-1, N_TAGS)


@dataclass
class _Subject:
    name: str
    k: int
    model: nn.Module
    optimizer: Any
    ours: bool
    rounds: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LstmBenchRecord:
    """Medians in microseconds; speedups as medians of per-round ratios (spread: IQR / median)."""

    model: str
    k: int
    forward_us: float
    backward_us: float
    update_us: float
    step_us: float
    lstm_backward_us: float
    lstm_linear_backward_us: float | None
    step_speedup: float | None = None
    lstm_backward_speedup: float | None = None
    lstm_linear_backward_speedup_vs_ours_k0: float | None = None
    spread: float | None = None
    flop_limit: float | None = None
    noisy: bool = False


def _subject(name: str, k: int, d_hidden: int) -> _Subject:
    if name == "stock":
        model = StockTagger(d_hidden)
        return _Subject(name, 0, model, stock_optimizer("adam", model.parameters(), 1e-3), ours=False)
    model = PosTagger(N_WORDS, tuple(size + 1 for size in FEATURE_SIZES), N_TAGS, d_hidden, k)
    config = validate({"task": "pos", "dataset": "ewt", "d_hidden": d_hidden, "k": k, "optimizer": "adam",
                       "d_minibatch": 1})
    return _Subject(name, k, model, build_optimizer(config, model), ours=True)


def _sentence(words: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    columns = [torch.randint(0, N_WORDS, (1, words, 1), generator=generator)]
    columns += [torch.randint(0, size, (1, words, 1), generator=generator) for size in FEATURE_SIZES]
    return torch.cat(columns, dim=-1), torch.randint(0, N_TAGS, (words,), generator=generator)


def _lstm_replay(subject: _Subject, inputs: torch.Tensor) -> Callable[[], tuple[float, float]]:
    """A function timing one backward of the subject's LSTM alone (its whole backward, and the
    linear part of it for our models) on the embedded input and output gradient of a real step."""
    captured: dict[str, torch.Tensor] = {}
    handle = subject.model.lstm.register_forward_hook(
        lambda module, args, output: captured.update(x=args[0].detach(), out=output[0]))
    subject.model.zero_grad(set_to_none=True)
    captured_grad: list[torch.Tensor] = []
    scores = subject.model(inputs)
    captured["out"].register_hook(lambda grad: captured_grad.append(grad.detach()))
    scores.sum().backward()
    handle.remove()
    subject.model.zero_grad(set_to_none=True)
    x = captured["x"].clone().requires_grad_()

    def replay() -> tuple[float, float]:
        with time_linear_backward() as clock:
            out = subject.model.lstm(x)[0]  # untimed: a fresh graph each time
            start = time.perf_counter()
            out.backward(captured_grad[0])
            seconds = time.perf_counter() - start
        subject.model.zero_grad(set_to_none=True)
        x.grad = None
        return seconds, clock.seconds
    return replay


def _round(subject: _Subject, sentences, steps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    model, optimizer = subject.model, subject.optimizer
    replay = _lstm_replay(subject, sentences[0][0])
    for step in range(steps):
        inputs, tags = sentences[step % len(sentences)]
        model.train()
        with time_linear_backward():  # our models' timed path, as in training
            forward, backward, update = timed_step(model, inputs, tags, optimizer)
        lstm_backward, linear = replay()
        for phase, value in zip(PHASES, (forward, backward, update, forward + backward + update, lstm_backward,
                                         linear)):
            samples[phase].append(value)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def _rounded(base: _Subject, subject: _Subject, phase: str) -> tuple[float, float]:
    ratio, spread = ratio_of_rounds(base, subject, phase)
    return round(ratio, 2), spread


def run_lstm_bench(ks: tuple[int, ...] = (5, 10, 20), d_hidden: int = 500, words: int = 20, rounds: int = 7,
                   steps: int = 20, warmup: int = 10) -> list[LstmBenchRecord]:
    """Time the tagger per sentence: stock, ours with k=0, and meProp with each k, interleaved."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    sentences = [_sentence(words, generator) for _ in range(8)]
    subjects = [_subject("stock", 0, d_hidden), _subject("ours_k0", 0, d_hidden)]
    subjects += [_subject("meprop", k, d_hidden) for k in ks]
    for subject in subjects:
        _round(subject, sentences, warmup)
    interleaved_rounds(subjects, rounds, lambda subject, _: _round(subject, sentences, steps))
    stock, ours_k0 = subjects[0], subjects[1]
    records = []
    for subject in subjects:
        medians = {phase: round(statistics.median(r[phase] for r in subject.rounds) * 1e6, 1) for phase in PHASES}
        record = LstmBenchRecord(subject.name, subject.k, medians["forward"], medians["backward"], medians["update"],
                                 medians["step"], medians["lstm_backward"],
                                 medians["lstm_linear_backward"] if subject.ours else None)
        if subject is not stock:
            record.step_speedup, step_spread = _rounded(stock, subject, "step")
            record.lstm_backward_speedup, lstm_spread = _rounded(stock, subject, "lstm_backward")
            record.spread = round(max(step_spread, lstm_spread), 3)
            if subject.k:
                record.lstm_linear_backward_speedup_vs_ours_k0, linear_spread = _rounded(
                    ours_k0, subject, "lstm_linear_backward")
                record.spread = round(max(record.spread, linear_spread), 3)
                record.flop_limit = round(d_hidden / subject.k, 1)
            record.noisy = record.spread > NOISY_SPREAD
        records.append(record)
    return records


def lstm_markdown(records: list[LstmBenchRecord]) -> str:
    """The records as a markdown table (speedups with ``*`` where their per-round spread exceeds 10%)."""
    from tabulate import tabulate

    def speedup(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}x"
    rows = [[r.model + (" *" if r.noisy else ""), r.k, r.forward_us, r.backward_us, r.update_us, r.step_us,
             r.lstm_backward_us, "" if r.lstm_linear_backward_us is None else r.lstm_linear_backward_us,
             speedup(r.step_speedup), speedup(r.lstm_backward_speedup),
             speedup(r.lstm_linear_backward_speedup_vs_ours_k0), "" if r.flop_limit is None else f"{r.flop_limit:g}x"]
            for r in records]
    headers = ["model", "k", "forward µs", "backward µs", "update µs", "step µs", "LSTM backward µs",
               "LSTM linear bwd µs", "step vs stock", "LSTM bwd vs stock", "LSTM linear bwd vs ours_k0",
               "FLOP limit"]
    return tabulate(rows, headers=headers, tablefmt="github")


def lstm_as_dicts(records: list[LstmBenchRecord]) -> list[dict[str, Any]]:
    return [asdict(record) for record in records]
