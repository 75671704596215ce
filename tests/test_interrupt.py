"""A real ``meprop sweep`` process stopped by SIGINT / SIGTERM keeps its finished runs and resumes."""

import json
import signal
import subprocess
import sys
import time

import pytest

SWEEP = ["sweep", "--k", "0,20", "--set", "dev_size=200", "--set", "train_limit=2000", "--set", "test_limit=300",
         "--set", "d_hidden=100", "--set", "n_epoch=8", "--set", "d_minibatch=10"]


def command(out_dir):
    return [sys.executable, "-m", "mnist_meprop", *SWEEP, "--out", str(out_dir)]


def wait_for(condition, process, timeout=300.0):  # generous: a loaded machine, and the kernels may compile first
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def records(out_dir):
    path = out_dir / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_after_first_run_then_resume(tmp_path, sig):
    process = subprocess.Popen(command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "checkpoints"
    # Interrupt once the first run is stored and the second has checkpointed an epoch.
    wait_for(lambda: len(records(tmp_path)) == 1 and checkpoints.is_dir() and any(checkpoints.glob("*.pt")),
             process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "run the same command again to resume" in stderr
    first = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["k"] == 0
    assert any(checkpoints.glob("*.pt"))

    resumed = subprocess.run(command(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "already in" in resumed.stderr and "skipped" in resumed.stderr
    assert "resuming after epoch" in resumed.stderr
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0] == first[0]
    assert [json.loads(line)["k"] for line in lines] == [0, 20]
    assert not checkpoints.exists()
    table = [line for line in resumed.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3
