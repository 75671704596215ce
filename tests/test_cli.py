"""End-to-end ``meprop train`` and ``meprop sweep`` on a tiny subset of the bundled sample."""

import csv
import json
import os

import pytest
from click.testing import CliRunner
from conftest import TINY

from mnist_meprop.cli import main

RECORD_KEYS = {"config", "k", "seed", "best_dev_acc", "test_acc", "best_epoch", "epochs", "timings", "env"}


def run(args):
    result = CliRunner().invoke(main, args)
    return result


def set_args(overrides):
    return [arg for item in overrides for arg in ("--set", item)]


def read_runs(folder):
    return [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]


def test_train_prints_table_and_writes_files(tmp_path):
    result = run(["train", *set_args(TINY), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "linear backprop (s)" in result.stdout and "test (%)" in result.stdout
    assert "meProp per-example top-k" in result.stdout
    assert "epoch 2/2" in result.stderr
    records = read_runs(tmp_path)
    assert len(records) == 1
    record = records[0]
    assert RECORD_KEYS <= set(record)
    assert record["config"]["d_hidden"] == 64 and record["config"]["name"] == "sample"
    assert record["k"] == 10 and len(record["epochs"]) == 2
    assert record["test_acc"] == record["epochs"][record["best_epoch"] - 1]["test_acc"]
    assert record["env"]["threads"] >= 1 and record["env"]["torch"] and record["env"]["nice"] == os.nice(0)
    assert (tmp_path / "table.md").read_text().count("meProp per-example top-k") == 1
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert len(rows) == 1 and float(rows[0]["test_acc"]) == pytest.approx(record["test_acc"])


def test_sweep_two_k_values_gives_two_rows_with_speedup_and_delta(tmp_path):
    result = run(["sweep", "--k", "0,20", *set_args(TINY), "--set", "n_epoch=1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = read_runs(tmp_path)
    assert [r["k"] for r in records] == [0, 20]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3
    dense_row, meprop_row = table[1], table[2]
    assert dense_row.startswith("| dense") and "x)" not in dense_row
    assert "x)" in meprop_row
    delta = records[1]["test_acc"] - records[0]["test_acc"]
    assert f"({delta:+.2f})" in meprop_row
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert float(rows[1]["linear_backward_speedup"]) == pytest.approx(
        records[0]["timings"]["linear_backward"] / records[1]["timings"]["linear_backward"])


def test_sweep_with_seeds_reports_mean_and_std(tmp_path):
    result = run(["sweep", "--k", "0,10", "--seeds", "1,2", *set_args(TINY), "--set", "n_epoch=1",
                  "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = read_runs(tmp_path)
    assert sorted((r["seed"], r["k"]) for r in records) == [(1, 0), (1, 10), (2, 0), (2, 10)]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 and all("±" in row and "1,2" in row for row in rows)


def test_default_output_folder_is_named_after_the_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(["train", *set_args(TINY), "--set", "n_epoch=1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "sample" / "runs.jsonl").is_file()


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "n_epochs=2"], "did you mean n_epoch?"),
    (["train", "--set", "dropout=1.5"], "dropout: must be in [0, 1)"),
    (["train", "--config", "no-such.yaml"], "no-such.yaml"),
    (["sweep", "--k", "0,ten"], "--k: expected comma-separated whole numbers"),
    (["sweep", "--k", "0,-5"], "k: must be >= 0"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    result = run(args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
