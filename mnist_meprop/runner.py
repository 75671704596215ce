"""Run a group of configs (one train, or a sweep over k and seeds) and store every finished run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .data import Splits, load_data
from .results import append_record, make_record
from .train import method_name, train_run


def sweep_configs(base: Config, ks: Iterable[int], seeds: Iterable[int]) -> list[Config]:
    """One config per (seed, k), seeds outermost, so each seed's full k row finishes together."""
    ks = list(ks)
    return [base.replace(k=k, seed=seed) for seed in seeds for k in ks]


def _data_key(config: Config) -> tuple:
    return (config.dataset, config.data_dir, config.dev_size, config.train_limit, config.test_limit)


def run_experiments(configs: Sequence[Config], out_dir: Path,
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train each config in turn, appending each finished run to ``out_dir/runs.jsonl``.

    Data is loaded once per distinct dataset setting. Returns the records of these runs.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    loaded: dict[tuple, Splits] = {}
    records = []
    for number, config in enumerate(configs, start=1):
        key = _data_key(config)
        if key not in loaded:
            loaded[key] = load_data(config)
        data = loaded[key]
        sizes = data.sizes()
        log(f"run {number}/{len(configs)}: {config.name}, {method_name(config)}, k={config.k}, "
            f"seed={config.seed}, {config.n_epoch} epochs on {sizes['train']} train / {sizes['dev']} dev / "
            f"{sizes['test']} test ({data.source})")
        result = train_run(config, data, log)
        record = make_record(config, result, sizes, data.source)
        append_record(out_dir, record)
        records.append(record)
        log(f"run {number}/{len(configs)} done: best dev {result.best_dev_acc:.2f}% at epoch "
            f"{result.best_epoch}, test {result.test_acc:.2f}%, linear backward "
            f"{result.timings['linear_backward']:.2f}s, total {result.timings['total']:.1f}s "
            f"({record['env']['threads']} threads)")
    return records
