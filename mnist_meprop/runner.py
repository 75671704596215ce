"""Run a group of configs (one train, or a sweep over k and seeds) so that no finished work is lost.

Each finished run is appended to ``runs.jsonl`` under its key (a hash of its config); a rerun
into the same folder skips the runs already there and continues an interrupted run from its
last finished epoch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .config import Config
from .executors import Executor, Job, LocalExecutor, describe
from .log import to_stderr
from .ops import is_meprop_active
from .store import (RUNS_FILE, append_record, checkpoint_path, claim_run, latest_by_key, read_records,
                    remove_checkpoint, run_key)
from .task import score_label
from .train import RunInterrupted

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


def run_experiments(configs: Sequence[Config], out_dir: Path, log: Log | None = None, fresh: bool = False,
                    should_stop: Callable[[], bool] | None = None, poll_seconds: float = 5.0,
                    executor: Executor | None = None,
                    recompute_hint: str | None = "--fresh recomputes") -> list[dict[str, Any]]:
    """Train each config (in this process, or through ``executor``), appending each finished
    (or failed) run to ``out_dir/runs.jsonl`` as it arrives; returns the records in config order.

    Runs whose key is already stored are skipped and their stored record is returned (unless
    ``fresh``, which recomputes them; the new record then supersedes the old one). A run whose
    loss becomes non-finite is stored as failed and the group goes on. ``RunInterrupted`` from
    ``should_stop`` propagates (outstanding jobs are cancelled), leaving each interrupted run's
    checkpoint for the next call. ``recompute_hint`` ends the line of a skipped run (None: nothing,
    for commands without ``--fresh``). In a group of several runs, each finished run's line ends with
    the time elapsed and an estimate of the time left: the runs still to train here (not stored,
    not held by another process) at the rate the runs trained here so far finished.

    Several processes can work on one ``out_dir`` at once (one per core or per machine on a
    shared disk): this process holds the lock of every run it has handed to its executor, a run
    another process holds is skipped, and collected at the end once that process has stored it
    (or trained here, resuming its checkpoint, if that process stopped without storing it).
    """
    log = log or to_stderr
    executor = executor or LocalExecutor()
    stored = {} if fresh else latest_by_key(read_records(out_dir, log))
    total = len(configs)
    records: dict[int, dict[str, Any]] = {}
    started, to_train = time.monotonic(), sum(fresh or run_key(config) not in stored for config in configs)
    trained: set[int] = set()
    elsewhere: set[int] = set()  # runs another process holds or has stored since we read the store
    held: dict[int, ExitStack] = {}  # the locks of the runs handed to the executor
    waiting: list[int] = []  # runs another process holds

    def dispatch(number: int, config: Config) -> bool:
        """Take the stored record or hand the run to the executor; False while another process holds it."""
        key = run_key(config)
        if key in stored:
            hint = f" ({recompute_hint})" if recompute_hint else ""
            log(f"run {number}/{total}: {describe(config)}: already in {out_dir / RUNS_FILE}, skipped{hint}")
            records[number] = stored[key]
            return True
        lock = ExitStack()
        if not lock.enter_context(claim_run(out_dir, key)):
            lock.close()
            return False
        if not fresh:  # another process may have stored it since we read the store
            stored.update(latest_by_key(read_records(out_dir, log)))
            if key in stored:
                lock.close()
                elsewhere.add(number)
                log(f"run {number}/{total}: {describe(config)}: stored by another process")
                records[number] = stored[key]
                return True
        else:
            remove_checkpoint(checkpoint_path(out_dir, key))
        held[number] = lock
        executor.submit(Job(number, total, config, out_dir), log, should_stop)
        collect(executor.finished(timeout=0))
        return True

    def collect(finished: list[tuple[int, dict[str, Any]]]) -> None:
        for number, record in finished:
            append_record(out_dir, record)
            remove_checkpoint(checkpoint_path(out_dir, record["key"]))
            held.pop(number).close()
            stored[record["key"]] = records[number] = record
            trained.add(number)
            elsewhere.discard(number)  # the process that held it stopped without storing it
            log(_outcome(number, total, record) + (_time_left(started, len(trained), to_train - len(elsewhere))
                                                   if total > 1 else ""))

    try:
        for number, config in enumerate(configs, start=1):
            if not dispatch(number, config):
                log(f"run {number}/{total}: {describe(config)}: another process is training it; "
                    "collected at the end")
                waiting.append(number)
                elsewhere.add(number)
        last_poll = time.monotonic()
        while waiting or executor.outstanding():
            if should_stop is not None and should_stop():
                raise RunInterrupted(0)
            if executor.outstanding():
                collect(executor.finished(timeout=min(0.25, poll_seconds)))  # answers a stop request quickly
            else:
                time.sleep(max(0.0, poll_seconds - (time.monotonic() - last_poll)))
            if waiting and time.monotonic() - last_poll >= poll_seconds:
                last_poll = time.monotonic()
                waiting = [number for number in waiting if not dispatch(number, configs[number - 1])]
    except BaseException:
        executor.cancel()
        raise
    finally:
        for lock in held.values():
            lock.close()
    return [records[number] for number in range(1, total + 1)]


def _time_left(started: float, trained: int, ours: int) -> str:
    """`` [m min elapsed, about n min left]``: ``ours`` runs to train here, ``trained`` of them done."""
    elapsed = time.monotonic() - started
    left = elapsed / trained * max(0, ours - trained)
    return f" [{elapsed / 60:.1f} min elapsed, about {left / 60:.1f} min left]"


def _outcome(number: int, total: int, record: dict[str, Any]) -> str:
    """The progress line of a finished run."""
    if record.get("status") == "failed":
        return f"run {number}/{total} FAILED: {record['error']}; recorded, going on"
    timings, score = record["timings"], score_label(record["config"].get("task", "mnist"))
    return (f"run {number}/{total} done: best dev {score}{record['best_dev_acc']:.2f}% at epoch "
            f"{record['best_epoch']:g}, test {score}{record['test_acc']:.2f}%, linear backward "
            f"{timings['linear_backward']:.2f}s, total {timings['total']:.1f}s ({record['env']['threads']} threads)")
