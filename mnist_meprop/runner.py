"""Run a group of configs (one train, or a sweep over k and seeds) so that no finished work is lost.

Each finished run is appended to ``runs.jsonl`` under its key (a hash of its config); a rerun
into the same folder skips the runs already there and continues an interrupted run from its
last finished epoch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import Config, resolve_device
from .data import Splits, load_data
from .log import to_stderr
from .ops import is_meprop_active
from .results import make_record
from .store import (append_record, checkpoint_path, claim_run, latest_by_key, model_path, read_records,
                    remove_checkpoint, run_key)
from .train import NonFiniteLoss, RunInterrupted, method_name, train_run

Log = Callable[[str], None]


def sweep_configs(base: Config, ks: Iterable[int], seeds: Iterable[int]) -> list[Config]:
    """One config per (seed, k), seeds outermost, so each seed's full k row finishes together.

    A k that turns meProp off (0, or >= d_hidden) is the plain backprop baseline, so it runs
    without meSimp's simplification even when ``base`` has it.
    """
    ks = list(ks)
    return [base.replace(k=k, seed=seed, **({} if is_meprop_active(k, base.d_hidden) else {"simplify": {}}))
            for seed in seeds for k in ks]


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
                    should_stop: Callable[[], bool] | None = None,
                    poll_seconds: float = 5.0) -> list[dict[str, Any]]:
    """Train each config in turn, appending each finished (or failed) run to ``out_dir/runs.jsonl``.

    Runs whose key is already stored are skipped and their stored record is returned (unless
    ``fresh``, which recomputes them; the new record then supersedes the old one). Data is
    loaded once per distinct dataset setting. A run whose loss becomes non-finite is stored
    as failed and the group goes on. ``RunInterrupted`` from ``should_stop`` propagates,
    leaving the interrupted run's checkpoint for the next call.

    Several processes can work on one ``out_dir`` at once (one per core or per machine on a
    shared disk): a run another process is training is skipped, and collected at the end
    once that process has stored it (or trained here, resuming its checkpoint, if that
    process stopped without storing it).
    """
    log = log or to_stderr
    stored = {} if fresh else latest_by_key(read_records(out_dir, log))
    loaded: dict[tuple, Splits] = {}
    total = len(configs)
    records: dict[int, dict[str, Any]] = {}
    busy: list[int] = []

    def obtain(number: int, config: Config) -> dict[str, Any] | None:
        """The run's record, trained here if need be; None while another process trains it."""
        key = run_key(config)
        if key in stored:
            log(f"run {number}/{total}: {_describe(config)}: already in {out_dir / 'runs.jsonl'}, skipped "
                "(--fresh recomputes)")
            return stored[key]
        with claim_run(out_dir, key) as claimed:
            if not claimed:
                return None
            if not fresh:  # another process may have stored it since we read the store
                stored.update(latest_by_key(read_records(out_dir, log)))
                if key in stored:
                    log(f"run {number}/{total}: {_describe(config)}: stored by another process")
                    return stored[key]
            stored[key] = _train_and_store(number, total, config, out_dir, loaded, log, fresh, should_stop)
            return stored[key]

    for number, config in enumerate(configs, start=1):
        record = obtain(number, config)
        if record is None:
            log(f"run {number}/{total}: {_describe(config)}: another process is training it; "
                "collected at the end")
            busy.append(number)
        else:
            records[number] = record
    while busy:
        if should_stop is not None and should_stop():
            raise RunInterrupted(0)
        time.sleep(poll_seconds)
        for number in list(busy):
            record = obtain(number, configs[number - 1])
            if record is not None:
                records[number] = record
                busy.remove(number)
    return [records[number] for number in range(1, total + 1)]


def _train_and_store(number: int, total: int, config: Config, out_dir: Path, loaded: dict[tuple, Splits],
                     log: Log, fresh: bool, should_stop: Callable[[], bool] | None) -> dict[str, Any]:
    """Train one run (resuming its checkpoint) and append its record; a non-finite loss is stored as failed."""
    checkpoint = checkpoint_path(out_dir, run_key(config))
    if fresh:
        remove_checkpoint(checkpoint)
    if _data_key(config) not in loaded:
        loaded[_data_key(config)] = load_data(config).to(resolve_device(config.device))
    data = loaded[_data_key(config)]
    sizes = data.sizes()
    log(f"run {number}/{total}: {_describe(config)}, {config.n_epoch} epochs on {sizes['train']} train / "
        f"{sizes['dev']} dev / {sizes['test']} test ({data.source})")
    try:
        result = train_run(config, data, log, checkpoint, should_stop, model_path(out_dir, run_key(config)))
    except NonFiniteLoss as error:
        record = make_record(config, error.result, sizes, data.source, error=str(error))
        append_record(out_dir, record)
        remove_checkpoint(checkpoint)
        log(f"run {number}/{total} FAILED: {error}; recorded, going on")
        return record
    record = make_record(config, result, sizes, data.source)
    append_record(out_dir, record)
    remove_checkpoint(checkpoint)
    log(f"run {number}/{total} done: best dev {result.best_dev_acc:.2f}% at epoch "
        f"{result.best_epoch}, test {result.test_acc:.2f}%, linear backward "
        f"{result.timings['linear_backward']:.2f}s, total {result.timings['total']:.1f}s "
        f"({record['env']['threads']} threads)")
    return record
