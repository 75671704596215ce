"""Run a group of configs (one train, or a sweep over k and seeds) so that no finished work is lost.

Each finished run is appended to ``runs.jsonl`` under its key (a hash of its config); a rerun
into the same folder skips the runs already there and continues an interrupted run from its
last finished epoch.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Config, resolve_device
from .data import Splits, load_data
from .log import to_stderr
from .results import make_record
from .store import (append_record, checkpoint_path, latest_by_key, read_records, remove_checkpoint,
                    run_key)
from .train import NonFiniteLoss, method_name, train_run

Log = Callable[[str], None]


def sweep_configs(base: Config, ks: Iterable[int], seeds: Iterable[int]) -> list[Config]:
    """One config per (seed, k), seeds outermost, so each seed's full k row finishes together."""
    ks = list(ks)
    return [base.replace(k=k, seed=seed) for seed in seeds for k in ks]


@contextmanager
def stop_on_signals(log: Log = to_stderr) -> Iterator[Callable[[], bool]]:
    """Within the block, SIGINT and SIGTERM request a stop at the next safe point.

    Yields a function that says whether a stop was requested; the training loop polls it
    between minibatches. A second signal stops at once (``KeyboardInterrupt``).
    """
    requested = []

    def handler(signum: int, _frame: object) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log(f"\n{signal.Signals(signum).name}: stopping after the current minibatch "
            "(send it again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _data_key(config: Config) -> tuple:
    return (config.dataset, config.data_dir, config.dev_size, config.train_limit, config.test_limit, config.device)


def _describe(config: Config) -> str:
    return f"{config.name}, {method_name(config)}, k={config.k}, seed={config.seed}"


def run_experiments(configs: Sequence[Config], out_dir: Path, log: Log | None = None, fresh: bool = False,
                    should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Train each config in turn, appending each finished (or failed) run to ``out_dir/runs.jsonl``.

    Runs whose key is already stored are skipped and their stored record is returned (unless
    ``fresh``, which recomputes them; the new record then supersedes the old one). Data is
    loaded once per distinct dataset setting. A run whose loss becomes non-finite is stored
    as failed and the group goes on. ``RunInterrupted`` from ``should_stop`` propagates,
    leaving the interrupted run's checkpoint for the next call.
    """
    log = log or to_stderr
    stored = {} if fresh else latest_by_key(read_records(out_dir, log))
    loaded: dict[tuple, Splits] = {}
    records = []
    total = len(configs)
    for number, config in enumerate(configs, start=1):
        key = run_key(config)
        if key in stored:
            log(f"run {number}/{total}: {_describe(config)}: already in {out_dir / 'runs.jsonl'}, skipped "
                "(--fresh recomputes)")
            records.append(stored[key])
            continue
        checkpoint = checkpoint_path(out_dir, key)
        if fresh:
            remove_checkpoint(checkpoint)
        if _data_key(config) not in loaded:
            loaded[_data_key(config)] = load_data(config).to(resolve_device(config.device))
        data = loaded[_data_key(config)]
        sizes = data.sizes()
        log(f"run {number}/{total}: {_describe(config)}, {config.n_epoch} epochs on {sizes['train']} train / "
            f"{sizes['dev']} dev / {sizes['test']} test ({data.source})")
        try:
            result = train_run(config, data, log, checkpoint, should_stop)
        except NonFiniteLoss as error:
            record = make_record(config, error.result, sizes, data.source, error=str(error))
            append_record(out_dir, record)
            remove_checkpoint(checkpoint)
            log(f"run {number}/{total} FAILED: {error}; recorded, going on")
            records.append(record)
            continue
        record = make_record(config, result, sizes, data.source)
        append_record(out_dir, record)
        remove_checkpoint(checkpoint)
        records.append(record)
        log(f"run {number}/{total} done: best dev {result.best_dev_acc:.2f}% at epoch "
            f"{result.best_epoch}, test {result.test_acc:.2f}%, linear backward "
            f"{result.timings['linear_backward']:.2f}s, total {result.timings['total']:.1f}s "
            f"({record['env']['threads']} threads)")
    return records
