"""Nothing finished is lost: the run store, checkpoints, resume, failures and determinism."""

import json

import pytest
import torch

from mnist_meprop.config import Config
from mnist_meprop.data import load_data
from mnist_meprop.runner import run_experiments, sweep_configs
from mnist_meprop.store import (RUNS_FILE, append_record, checkpoint_path, load_checkpoint, read_records,
                                run_key, save_checkpoint)
from mnist_meprop.train import EPOCH_TIME_KEYS, RunInterrupted, train_run

TINY = dict(dataset="sample", dev_size=200, train_limit=400, test_limit=200, n_epoch=3, d_hidden=48,
            d_minibatch=20, lr=0.001)
MODES = {
    "dense": dict(k=0),
    "unified": dict(k=8, unified=True, dropout=0.2),
    "per_example": dict(k=8, unified=False),
    "random": dict(k=8, unified=False, selection="random", dropout=0.1),
}


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(Config(**TINY))


def quiet(_line):
    pass


def metrics(result):
    """Everything a run reports except its times."""
    epochs = [{k: v for k, v in epoch.items() if k not in EPOCH_TIME_KEYS} for epoch in result.epochs]
    return epochs, result.best_dev_acc, result.test_acc, result.best_epoch


def stop_at(step_number):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) >= step_number
    return should_stop


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_gives_identical_metrics(tiny_data, mode):
    config = Config(**TINY, **MODES[mode])
    assert metrics(train_run(config, tiny_data, quiet)) == metrics(train_run(config, tiny_data, quiet))


@pytest.mark.parametrize("mode", MODES)
def test_resumed_run_ends_like_an_uninterrupted_one(tiny_data, tmp_path, mode):
    config = Config(**TINY, **MODES[mode])
    uninterrupted = train_run(config, tiny_data, quiet)
    checkpoint = tmp_path / "run.pt"
    steps_per_epoch = 20  # 400 training examples / minibatch 20
    with pytest.raises(RunInterrupted) as stopped:
        train_run(config, tiny_data, quiet, checkpoint, stop_at(steps_per_epoch + 4))
    assert stopped.value.epoch == 1
    assert load_checkpoint(checkpoint)["epoch"] == 1
    lines = []
    resumed = train_run(config, tiny_data, lines.append, checkpoint)
    assert "resuming after epoch 1" in lines[0]
    assert metrics(resumed) == metrics(uninterrupted)
    assert resumed.timings["total"] > 0


def test_run_key_depends_on_every_setting_but_the_name():
    base = Config(**TINY)
    assert run_key(base) == run_key(Config(**TINY))
    assert run_key(base) == run_key(base.replace(name="another-label"))
    variants = [base.replace(**{key: value}) for key, value in
                [("k", 5), ("seed", 2), ("n_epoch", 4), ("unified", True), ("sparse_update", "lazy"), ("sparse_update", "dense"),
                 ("dropout", 0.1), ("dataset", "fashion-mnist"), ("device", "auto")]]
    assert len({run_key(base), *map(run_key, variants)}) == len(variants) + 1


def test_torn_last_line_is_skipped_and_the_next_record_is_kept(tmp_path):
    append_record(tmp_path, {"key": "a", "value": 1})
    with open(tmp_path / RUNS_FILE, "a") as handle:
        handle.write('{"key": "b", "val')  # a crash in the middle of a write
    warnings = []
    assert read_records(tmp_path, warnings.append) == [{"key": "a", "value": 1}]
    assert "line 2" in warnings[0]
    append_record(tmp_path, {"key": "c", "value": 3})
    assert [r["key"] for r in read_records(tmp_path, warnings.append)] == ["a", "c"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "run.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]


def test_rerun_skips_stored_runs_and_fresh_recomputes(tmp_path):
    configs = sweep_configs(Config(**{**TINY, "n_epoch": 1}), [0, 8], [1])
    first = run_experiments(configs, tmp_path, quiet)
    lines = []
    again = run_experiments(configs, tmp_path, lines.append)
    assert again == first
    assert sum("skipped" in line for line in lines) == 2
    assert len(read_records(tmp_path)) == 2
    fresh = run_experiments(configs[:1], tmp_path, quiet, fresh=True)
    assert fresh[0]["finished_at"] >= first[0]["finished_at"]
    assert len(read_records(tmp_path)) == 3
    assert not (tmp_path / "checkpoints").exists()


def test_interrupted_group_resumes_from_the_checkpoint(tmp_path):
    configs = sweep_configs(Config(**TINY), [0, 8], [1])
    with pytest.raises(RunInterrupted):
        # first run: 3 epochs x 20 steps; stop in the second run's second epoch
        run_experiments(configs, tmp_path, quiet, should_stop=stop_at(60 + 25))
    stored = read_records(tmp_path)
    assert [r["k"] for r in stored] == [0]
    assert checkpoint_path(tmp_path, run_key(configs[1])).exists()
    lines = []
    records = run_experiments(configs, tmp_path, lines.append)
    assert records[0] == stored[0]
    assert any("resuming after epoch 1" in line for line in lines)
    assert [r["k"] for r in read_records(tmp_path)] == [0, 8]


def test_non_finite_loss_is_recorded_and_the_sweep_goes_on(tmp_path):
    exploding = Config(**{**TINY, "optimizer": "sgd", "lr": 1e12, "n_epoch": 2})
    fine = Config(**{**TINY, "n_epoch": 1})
    records = run_experiments([exploding, fine], tmp_path, quiet)
    failed, ok = records
    assert failed["status"] == "failed" and "non-finite loss" in failed["error"]
    assert "epoch 1, step" in failed["error"]
    assert ok["status"] == "ok" and ok["test_acc"] > 0
    stored = [json.loads(line) for line in (tmp_path / RUNS_FILE).read_text().splitlines()]
    assert [r["status"] for r in stored] == ["failed", "ok"]
    lines = []
    run_experiments([exploding, fine], tmp_path, lines.append)
    assert sum("skipped" in line for line in lines) == 2


def _wait_for(condition, seconds=60.0):
    import time
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("other_stores_it", [True, False])
def test_a_run_claimed_by_another_process_is_collected_not_retrained(tmp_path, other_stores_it):
    """Two workers on one folder: the runner skips the run the other holds, then collects its record
    (or, if the other stopped without storing it, trains it itself); every key is stored once."""
    import threading

    from mnist_meprop.store import claim_run

    first, second = sweep_configs(Config(**{**TINY, "n_epoch": 1}), ks=[0, 8], seeds=[1])
    out = tmp_path / "shared"
    result = {}
    with claim_run(out, run_key(second)) as held:
        assert held
        worker = threading.Thread(target=lambda: result.update(
            records=run_experiments([first, second], out, log=quiet, poll_seconds=0.02)))
        worker.start()
        _wait_for(lambda: len(read_records(out)) == 1)
        assert worker.is_alive(), "the runner must wait for the claimed run, not return without it"
        if other_stores_it:
            other = run_experiments([second], tmp_path / "other", log=quiet)[0]
            append_record(out, other)
    worker.join(timeout=120)
    assert not worker.is_alive()
    stored = read_records(out)
    assert sorted(r["key"] for r in stored) == sorted([run_key(first), run_key(second)])
    assert [r["key"] for r in result["records"]] == [run_key(first), run_key(second)]
    if other_stores_it:
        assert result["records"][1] == other


def test_a_held_claim_is_refused_and_released_after(tmp_path):
    from mnist_meprop.store import claim_run

    with claim_run(tmp_path, "abc") as held:
        with claim_run(tmp_path, "abc") as again:
            assert held and not again
    with claim_run(tmp_path, "abc") as after:
        assert after


def test_time_left_counts_only_the_runs_this_process_trains(tmp_path, monkeypatch):
    """A stored run costs nothing: with 1 of 3 runs stored, the estimates are over 2 runs to train."""
    from mnist_meprop import runner

    configs = sweep_configs(Config(**{**TINY, "n_epoch": 1}), [0, 8, 16], [1])
    run_experiments(configs[1:2], tmp_path, quiet)
    estimates = []
    monkeypatch.setattr(runner, "_time_left", lambda started, trained, ours: estimates.append((trained, ours)) or "")
    run_experiments(configs, tmp_path, quiet)
    assert estimates == [(1, 2), (2, 2)]
    run_experiments(configs[:1], tmp_path / "single", quiet)
    assert len(estimates) == 2  # a single run gets no estimate


def test_time_left_is_the_rate_so_far_times_the_runs_left(monkeypatch):
    from mnist_meprop import runner

    monkeypatch.setattr(runner.time, "monotonic", lambda: 1200.0)
    assert runner._time_left(0.0, 2, 5) == " [20.0 min elapsed, about 30.0 min left]"
    assert runner._time_left(0.0, 5, 5).endswith("about 0.0 min left]")
