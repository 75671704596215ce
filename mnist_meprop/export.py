"""``meprop export``: a trained run's best-dev model as plain torch layers, at its reduced size.

A meSimp run's hidden layers have lost units; the exported model is built from plain
``nn.Linear`` layers of the reduced sizes (loadable with ``torch.load`` alone, no mnist_meprop
needed). Export checks that it predicts exactly what the trained model predicts on the test
set and times inference of the compact model against the full-size masked model (the
original sizes, pruned units zeroed), which is what the masked model costs without removal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, validate
from .data import load_data
from .errors import MePropError
from .log import to_stderr
from .model import build_model
from .simplify import linear_layers, shrink_to
from .store import latest_by_key, model_path, read_records


@dataclass
class ModelComparison:
    """A run's compact model checked and timed against the trained and the full-size masked model.

    Times are medians in milliseconds of one forward over the test set; ``path`` is where
    ``export_run`` wrote the compact model.
    """

    record: dict[str, Any]
    config: Config
    units: list[torch.Tensor] | None
    compact: nn.Sequential
    sizes: list[int]
    full_sizes: list[int]
    test_examples: int
    predictions_equal: bool
    full_predictions_equal: bool
    compact_ms: float
    full_ms: float
    threads: int
    path: Path | None = None

    @property
    def speedup(self) -> float:
        return self.full_ms / self.compact_ms


def find_run(run_dir: Path, key: str | None = None) -> dict[str, Any]:
    """The record of the run to export from ``run_dir`` (a folder with ``runs.jsonl``): the one
    whose key is ``key``, or the only run with a saved model."""
    records = [r for r in latest_by_key(read_records(run_dir)).values() if r.get("status", "ok") == "ok"]
    if not records:
        raise MePropError(f"--run {run_dir}: no finished runs in {run_dir / 'runs.jsonl'}")
    records = [r for r in records if r["config"].get("task", "mnist") == "mnist"]
    if not records:
        raise MePropError(f"--run {run_dir}: export writes the MNIST MLP (meSimp-reduced) as plain nn.Linear "
                          f"layers; these runs are of another task (their best-dev models are in "
                          f"{run_dir / 'models'}, loadable with torch.load)")
    with_model = [r for r in records if model_path(run_dir, r["key"]).exists()]
    if key is not None:
        chosen = [r for r in with_model if r["key"].startswith(key)]
        if len(chosen) != 1:
            raise MePropError(f"--key {key}: matches {len(chosen)} runs with a saved model in {run_dir}; keys: "
                              + ", ".join(r["key"] for r in with_model))
        return chosen[0]
    if len(with_model) != 1:
        listing = "; ".join(f"{r['key']} ({r['method']} k={r['k']} seed={r['seed']})" for r in with_model)
        raise MePropError(f"--run {run_dir}: {len(with_model)} runs with a saved model; pick one with --key"
                          + (f": {listing}" if listing else " (runs trained before models were saved have none)"))
    return with_model[0]


def load_trained(run_dir: Path, record: dict[str, Any]) -> tuple[Config, nn.Module, list[torch.Tensor] | None]:
    """The run's config, its best-dev model (``MePropLinear`` layers at the trained sizes), and meSimp's units."""
    saved = torch.load(model_path(run_dir, record["key"]), map_location="cpu", weights_only=True)
    config = validate(saved["config"])
    model = build_model(config, saved["n_features"], saved["n_classes"])
    units = saved["units"]
    if units is not None:
        shrink_to(model, units)
    model.load_state_dict(saved["model"])
    return config, model.eval(), units


def compact_model(model: nn.Module) -> nn.Sequential:
    """The same network as plain torch modules: each linear layer an ``nn.Linear`` of its current size."""
    layers: list[nn.Module] = []
    for module in model.children():
        if isinstance(module, nn.Linear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.load_state_dict(module.state_dict())
            layers.append(plain)
        else:
            layers.append(module)
    return nn.Sequential(*layers).eval()


def masked_full_model(model: nn.Module, units: list[torch.Tensor] | None, d_hidden: int) -> nn.Sequential:
    """The full-size network the reduced one is a part of: pruned units kept as zero weights (the masked model)."""
    compact = compact_model(model)
    if units is None:
        return compact
    layers: list[nn.Module] = []
    position = 0
    for module in compact.children():
        if not isinstance(module, nn.Linear):
            layers.append(module)
            continue
        rows = units[position] if position < len(units) else torch.arange(module.out_features)
        cols = units[position - 1] if position > 0 else torch.arange(module.in_features)
        full = nn.Linear(d_hidden if position > 0 else module.in_features,
                         d_hidden if position < len(units) else module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            full.weight.zero_()
            full.weight[rows.unsqueeze(1), cols.unsqueeze(0)] = module.weight
            if module.bias is not None:
                full.bias.zero_()
                full.bias[rows] = module.bias
        layers.append(full)
        position += 1
    return nn.Sequential(*layers).eval()


def inference_ms(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median milliseconds of one forward over ``x`` for each model, timed in interleaved rounds (each model
    once per round) after two warm-up rounds, so that a change in machine load hits them alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for attempt in range(repeats + 2):
            for model, model_times in zip(models, times):
                start = time.perf_counter()
                model(x)
                if attempt >= 2:
                    model_times.append(1000 * (time.perf_counter() - start))
    return [statistics.median(model_times) for model_times in times]


def _sizes(model: nn.Module) -> list[int]:
    layers = linear_layers(model)
    return [layers[0].in_features] + [layer.out_features for layer in layers]


def compare_models(run_dir: Path, record: dict[str, Any], repeats: int) -> ModelComparison:
    """Build the run's compact and full-size masked models, check their test-set predictions
    against the trained model's and time both, side by side."""
    config, trained, units = load_trained(run_dir, record)
    compact = compact_model(trained)
    full = masked_full_model(trained, units, config.d_hidden)
    test_x = load_data(config).test_x
    with torch.inference_mode():
        reference = trained(test_x).argmax(dim=1)
        same = bool((compact(test_x).argmax(dim=1) == reference).all())
        same_full = bool((full(test_x).argmax(dim=1) == reference).all())
    compact_ms, full_ms = inference_ms([compact, full], test_x, repeats)
    return ModelComparison(record, config, units, compact, _sizes(compact), _sizes(full), len(test_x), same, same_full,
                           compact_ms, full_ms, torch.get_num_threads())


def export_run(run_dir: Path, out: Path, key: str | None = None, repeats: int = 20, threads: int | None = None,
               log: Callable[[str], None] | None = None) -> ModelComparison:
    """Write the run's best-dev model as a compact ``nn.Sequential`` to ``out``; check and time it.

    The file holds ``{"model": nn.Sequential, "sizes": [...], "units": [...], "config": {...}}``;
    ``torch.load(out, weights_only=False)["model"]`` gives a plain torch model.
    """
    log = log or to_stderr
    if threads is not None:
        torch.set_num_threads(threads)
    record = find_run(run_dir, key)
    comparison = compare_models(run_dir, record, repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": comparison.compact, "sizes": comparison.sizes, "units": comparison.units,
                "config": comparison.config.to_dict(), "test_acc": record["test_acc"]}, out)
    comparison.path = out
    log(f"export: run {record['key']} ({record['method']}, k={record['k']}, seed={record['seed']}), "
        f"test {record['test_acc']:.2f}%")
    return comparison
