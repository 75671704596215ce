"""Where runs are trained: in this process (``local``), or as Ray tasks across a cluster (``ray``).

The runner (:mod:`mnist_meprop.runner`) decides which runs to train, holds their locks and
stores every finished record; an executor only trains. A run is a :class:`Job`; the worker
side of one is :func:`train_job`, which loads the data on the machine that trains (cached per
process), resumes the run's checkpoint if its folder holds one, and returns the run's record
(``status: failed`` for a non-finite loss) without storing it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .config import Config, resolve_device
from .errors import MePropError, WorkerLost
from .log import to_stderr
from .results import make_record
from .task import task_for
from .store import checkpoint_path, model_path, run_key
from .train import NonFiniteLoss, method_name, train_run

Log = Callable[[str], None]
EXECUTORS = ("local", "ray")
RAY_INSTALL_HINT = "pip install 'mnist-meprop[ray]'"
# A task whose worker process dies (killed, out of memory, node lost) is run again this many
# times; it resumes from its last finished epoch when the checkpoint folder is shared.
RAY_MAX_RETRIES = 3
ADDRESS_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Job:
    """One run to train: its position in the group (for progress lines), config and output folder."""

    number: int
    total: int
    config: Config
    out_dir: Path


def describe(config: Config) -> str:
    """``name, method, k=K, seed=S``: how progress lines name a run."""
    return f"{config.name}, {method_name(config)}, k={config.k}, seed={config.seed}"


_worker_data: dict[tuple, Any] = {}  # a Ray worker process trains many runs on the same data


def _data_key(config: Config) -> tuple:
    return (config.task, config.dataset, config.data_dir, config.dev_size, config.train_limit, config.test_limit, config.device)


def train_job(job: Job, data_cache: dict[tuple, Any], log: Log = to_stderr,
              should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train ``job`` (resuming its checkpoint) and return its record; a non-finite loss gives a failed record.

    The data is loaded here, on the machine that trains, and kept in ``data_cache`` (the last
    dataset setting only) for the next job.
    """
    config = job.config
    if _data_key(config) not in data_cache:
        data_cache.clear()
        data_cache[_data_key(config)] = task_for(config).load_data(config).to(resolve_device(config.device))
    data = data_cache[_data_key(config)]
    sizes = data.sizes()
    key = run_key(config)
    log(f"run {job.number}/{job.total}: {describe(config)}, {config.n_epoch} epochs on {sizes['train']} train / "
        f"{sizes['dev']} dev / {sizes['test']} test ({data.source})")
    try:
        result = train_run(config, data, log, checkpoint_path(job.out_dir, key), should_stop,
                           model_path(job.out_dir, key))
    except NonFiniteLoss as error:
        return make_record(config, error.result, sizes, data.source, error=str(error))
    return make_record(config, result, sizes, data.source)


class Executor(Protocol):
    """Trains the jobs it is given; the runner collects what finished."""

    def submit(self, job: Job, log: Log, should_stop: Callable[[], bool] | None) -> None: ...

    def finished(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        """(job number, record) of the jobs finished since the last call, waiting up to ``timeout``
        seconds for one while jobs are outstanding; a job's own error (not a lost worker) is raised."""
        ...

    def outstanding(self) -> int: ...

    def cancel(self) -> None:
        """Stop every outstanding job (their last checkpoints stay)."""
        ...


class LocalExecutor:
    """Trains each job in this process as it is submitted (the default)."""

    name = "local"

    def __init__(self) -> None:
        self._done: list[tuple[int, dict[str, Any]]] = []
        self._data: dict[tuple, Any] = {}

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, job: Job, log: Log, should_stop: Callable[[], bool] | None) -> None:
        self._done.append((job.number, train_job(job, self._data, log, should_stop)))

    def finished(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        done, self._done = self._done, []
        return done

    def outstanding(self) -> int:
        return 0

    def cancel(self) -> None:
        return None


def meprop_run(job: Job, cpus: int, cwd: str) -> dict[str, Any]:
    """The Ray task: train one job with ``cpus`` torch threads, relative paths as on the driver."""
    if os.path.isdir(cwd):  # the same folder on this node (one machine, or a shared disk): relative paths agree
        os.chdir(cwd)
    torch.set_num_threads(cpus)
    return train_job(job, _worker_data)


class RayExecutor:
    """Each job is one Ray task (``@ray.remote``), placed by Ray and retried if its worker dies.

    With no ``address`` a local Ray instance is started with this machine's cores; ``"auto"``
    joins the cluster this machine belongs to; ``host:port`` (or ``ray://host:port``) joins that
    one, after checking within ``ADDRESS_TIMEOUT_SECONDS`` that it answers. Each task gets
    ``cpus_per_run`` CPUs (its torch thread count) and ``gpus_per_run`` GPUs.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: int = 1, gpus_per_run: float = 0.0) -> None:
        self.address, self.cpus_per_run, self.gpus_per_run = address, cpus_per_run, gpus_per_run
        self._pending: dict[Any, int] = {}
        self._ray: Any = None
        self._task: Any = None

    def __enter__(self) -> RayExecutor:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every run's epoch lines, not "[repeated 3x across cluster]"
        # A local Ray starts its workers at nice 15: beside any other process they wait for a core and the
        # wall-clock timers count the wait (a 2-epoch run's linear backward: 5.9 s against 0.25 s). Keep them at
        # the driver's priority, as `local` runs are. A cluster's workers keep its own `ray start` setting.
        os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            import ray
        except ImportError:
            raise MePropError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
        if self.address not in (None, "auto"):
            _check_reachable(self.address)
        try:
            if self.address is None:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            else:
                ray.init(address=self.address, logging_level="WARNING")
        except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError... with long texts
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MePropError(f"--address {self.address}: could not join a Ray cluster ({first})") from None
        self._ray = ray
        try:
            self._check_resources()
        except MePropError:
            ray.shutdown()
            raise
        self._task = ray.remote(meprop_run).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                                    max_retries=RAY_MAX_RETRIES, retry_exceptions=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def _check_resources(self) -> None:
        """A task no node can hold would wait forever: say so now."""
        nodes = [node["Resources"] for node in self._ray.nodes() if node.get("Alive")]
        if not any(n.get("CPU", 0) >= self.cpus_per_run and n.get("GPU", 0) >= self.gpus_per_run for n in nodes):
            most_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
            most_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
            raise MePropError(f"--cpus-per-run {self.cpus_per_run} --gpus-per-run {self.gpus_per_run:g}: no node "
                              f"of the Ray cluster has that much (largest: {most_cpus:g} CPUs, {most_gpus:g} GPUs)")

    def submit(self, job: Job, log: Log, should_stop: Callable[[], bool] | None) -> None:
        job = Job(job.number, job.total, job.config, job.out_dir.resolve())
        self._pending[self._task.remote(job, self.cpus_per_run, os.getcwd())] = job.number
        log(f"run {job.number}/{job.total}: {describe(job.config)}: queued on Ray "
            f"({self.cpus_per_run} CPU{'s' if self.cpus_per_run > 1 else ''}"
            f"{f', {self.gpus_per_run:g} GPU' if self.gpus_per_run else ''})")

    def finished(self, timeout: float) -> list[tuple[int, dict[str, Any]]]:
        if not self._pending:
            return []
        ready, _ = self._ray.wait(list(self._pending), num_returns=len(self._pending), timeout=timeout,
                                  fetch_local=True)
        if not ready:
            return []
        done = []
        for ref in ready:
            number = self._pending.pop(ref)
            try:
                done.append((number, self._ray.get(ref)))
            except self._ray.exceptions.RayTaskError as error:  # the run's own error, as local would raise it
                raise error.cause if isinstance(error.cause, BaseException) else error
            except self._ray.exceptions.RayError as error:  # its worker or node died on every try
                first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                raise WorkerLost(f"run {number}: its Ray worker died on each of its {RAY_MAX_RETRIES + 1} tries ({first}); "
                                 "rerun the command to continue") from None
        return done

    def outstanding(self) -> int:
        return len(self._pending)

    def cancel(self) -> None:
        for ref in self._pending:
            self._ray.cancel(ref, force=True)
        self._pending.clear()


def _check_reachable(address: str) -> None:
    """A ``host:port`` address that does not accept a connection is a one-line error, not a long wait."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise MePropError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise MePropError(f"--address {address}: no Ray cluster answers there within "
                          f"{ADDRESS_TIMEOUT_SECONDS:g} s ({error.strerror or error})") from None


def make_executor(name: str = "local", address: str | None = None, cpus_per_run: int | None = None,
                  gpus_per_run: float | None = None, threads: int | None = None) -> LocalExecutor | RayExecutor:
    """The executor ``--executor name`` asks for, with its options checked.

    ``threads`` is the runs' configured torch thread count: a Ray task's CPUs are its threads, so
    ``cpus_per_run`` defaults to it and may not differ from it. Without either, a task gets torch's
    default thread count here (this machine's cores), the count a local run would use: results
    depend on the thread count (float sums split differently), so this keeps them equal to
    ``local``'s. Ask for fewer (``--cpus-per-run 1`` or ``threads: 1``) to run several at once.
    """
    if name not in EXECUTORS:
        raise MePropError(f"--executor: expected one of {', '.join(EXECUTORS)}, got {name!r}")
    if name == "local":
        given = [flag for flag, value in (("--address", address), ("--cpus-per-run", cpus_per_run),
                                          ("--gpus-per-run", gpus_per_run)) if value is not None]
        if given:
            raise MePropError(f"{', '.join(given)}: only with --executor ray")
        return LocalExecutor()
    if cpus_per_run is not None and threads is not None and cpus_per_run != threads:
        raise MePropError(f"--cpus-per-run {cpus_per_run} but the runs are set to {threads} threads: a Ray task "
                          f"uses its CPUs as torch threads; give one of the two")
    return RayExecutor(address, cpus_per_run or threads or torch.get_num_threads(), gpus_per_run or 0.0)
