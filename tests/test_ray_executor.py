"""--executor ray: the same records as local, retries of killed workers, interrupt and resume.

The Ray tests start a local Ray instance with 2 CPUs through the CLI, as a user would; they are
skipped when Ray is not installed (CI installs the ``ray`` extra and runs them).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnist_meprop.cli import main
from mnist_meprop.config import load_config
from mnist_meprop.runner import run_experiments, sweep_configs
from mnist_meprop.train import EPOCH_TIME_KEYS

# Runs of about a second per epoch on one thread: long enough to interrupt or kill one mid-run.
SETTINGS = ["n_epoch=5", "dev_size=300", "train_limit=1500", "test_limit=500", "threads=1"]
KS = [0, 10, 20, 30]  # two at a time on 2 CPUs: after the first record, others are still running or queued


def sweep_args(out: Path, ks=KS, executor="ray", settings=SETTINGS) -> list[str]:
    args = ["sweep", "--k", ",".join(map(str, ks)), "--out", str(out), "--executor", executor]
    for setting in settings:
        args += ["--set", setting]
    return args


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mnist_meprop", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=env)


def records(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def metrics(record: dict) -> tuple:
    """What a run reports, minus its times."""
    epochs = [{k: v for k, v in epoch.items() if k not in EPOCH_TIME_KEYS} for epoch in record["epochs"]]
    return record["key"], record["status"], epochs, record["best_dev_acc"], record["test_acc"], record["best_epoch"]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def local_records(tmp_path_factory) -> dict[str, tuple]:
    """The sweep trained in this process by the local executor: the reference every Ray run must equal."""
    out = tmp_path_factory.mktemp("local")
    configs = sweep_configs(load_config(None, SETTINGS), KS, [1])
    return {r["key"]: metrics(r) for r in run_experiments(configs, out, log=lambda line: None)}


def test_without_ray_the_executor_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as when it is not installed
    result = CliRunner().invoke(main, sweep_args(tmp_path / "out", ks=[0]))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'mnist-meprop[ray]'" in lines[0], result.output
    assert not (tmp_path / "out" / "runs.jsonl").exists()


def test_ray_options_need_the_ray_executor(tmp_path):
    result = CliRunner().invoke(main, sweep_args(tmp_path, ks=[0], executor="local") + ["--cpus-per-run", "2"])
    assert result.exit_code == 2 and "only with --executor ray" in result.output


def test_cpus_per_run_may_not_contradict_the_threads_setting(tmp_path):
    result = CliRunner().invoke(main, sweep_args(tmp_path, ks=[0]) + ["--cpus-per-run", "2"])
    assert result.exit_code == 2 and "--cpus-per-run 2" in result.output and "1 threads" in result.output


def test_a_task_gets_the_thread_count_a_local_run_would_use():
    import torch

    from mnist_meprop.executors import make_executor
    assert make_executor("ray", threads=None).cpus_per_run == torch.get_num_threads()  # same numbers as local
    assert make_executor("ray", threads=1).cpus_per_run == 1
    assert make_executor("ray", cpus_per_run=3).cpus_per_run == 3


ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mnist-meprop[ray]'); CI installs it")


def test_unreachable_address_is_one_line_and_exit_2(tmp_path):
    started = time.monotonic()
    result = CliRunner().invoke(main, sweep_args(tmp_path, ks=[0]) + ["--address", "127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and "--address 127.0.0.1:9" in result.output
    assert time.monotonic() - started < 60


def test_resources_no_node_has_are_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, sweep_args(tmp_path, ks=[0], settings=SETTINGS[:-1]) + ["--cpus-per-run", "64"])
    assert result.exit_code == 2, result.output
    error_lines = [line for line in result.output.splitlines() if "error" in line]
    assert len(error_lines) == 1 and "no node of the Ray cluster" in error_lines[0], result.output


def test_ray_sweep_gives_the_local_metrics_and_table(tmp_path, local_records):
    out = tmp_path / "ray"
    completed = subprocess.run([sys.executable, "-m", "mnist_meprop", *sweep_args(out)], capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    stored = records(out)
    assert sorted(r["key"] for r in stored) == sorted(local_records)
    for record in stored:
        assert metrics(record) == local_records[record["key"]]
        assert record["env"]["threads"] == 1
        assert record["env"]["nice"] == os.nice(0)  # not Ray's default worker nice 15: timers would count waits
    table = [line for line in completed.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(KS)  # header, one row per k
    local_out = tmp_path / "local"
    local = CliRunner().invoke(main, sweep_args(local_out, executor="local"))
    # the first table run just stored those runs: run the local sweep for real, then compare the tables'
    # metric columns (best dev, test, best epoch); times differ from run to run
    local_table = [line for line in local.output.splitlines() if line.startswith("| ")]
    assert [row.split("|")[6:9] for row in table] == [row.split("|")[6:9] for row in local_table]


def worker_pids() -> list[int]:
    """Processes of this user executing the Ray task (Ray titles them ``ray::meprop_run``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::meprop_run"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_killed_worker_is_retried_and_every_record_is_stored_once(tmp_path, local_records):
    out = tmp_path / "ray"
    driver = start_driver(sweep_args(out), tmp_path / "driver.log")
    try:
        # Kill the workers once a run has checkpointed an epoch and none has finished.
        wait_for(lambda: list((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else False,
                 300, "a checkpoint")
        assert records(out) == [], "a run finished before the kill: the runs are too short for this test"
        killed = worker_pids()
        assert killed, "no process titled ray::meprop_run"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.kill()
    stored = records(out)
    assert sorted(r["key"] for r in stored) == sorted(local_records)  # each run once
    for record in stored:  # a retried run resumed from its checkpoint and ends exactly as an uninterrupted one
        assert metrics(record) == local_records[record["key"]]


def test_interrupted_driver_keeps_its_records_and_a_rerun_completes_them(tmp_path, local_records):
    out = tmp_path / "ray"
    driver = start_driver(sweep_args(out), tmp_path / "first.log")
    try:
        wait_for(lambda: records(out), 300, "the first record")
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        driver.kill()
    first_lines = (out / "runs.jsonl").read_text().splitlines()
    assert 1 <= len(first_lines) < len(KS)
    wait_for(lambda: not worker_pids(), 60, "the cancelled tasks to end")
    rerun = subprocess.run([sys.executable, "-m", "mnist_meprop", *sweep_args(out)], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "skipped" in rerun.stderr
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert lines[:len(first_lines)] == first_lines  # finished records are kept unchanged
    stored = records(out)
    assert sorted(r["key"] for r in stored) == sorted(local_records)  # the full set, each once
    for record in stored:
        assert metrics(record) == local_records[record["key"]]


def test_a_run_that_raises_is_recorded_failed_as_with_local(tmp_path):
    exploding = SETTINGS + ["optimizer=sgd", "lr=1e12", "n_epoch=2"]
    outcomes = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        completed = subprocess.run([sys.executable, "-m", "mnist_meprop",
                                    *sweep_args(out, ks=[0], executor=executor, settings=exploding)],
                                   capture_output=True, text=True, timeout=600)
        assert completed.returncode == 1, completed.stderr[-3000:]  # a failed run: exit 1, after the table
        [record] = records(out)
        outcomes[executor] = (record["key"], record["status"], record["error"])
    assert outcomes["ray"] == outcomes["local"]
    assert outcomes["ray"][1] == "failed" and "non-finite loss" in outcomes["ray"][2]
