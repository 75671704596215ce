"""Run records (``runs.jsonl``) and the paper-style tables built from them."""

from __future__ import annotations

import csv
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from .config import Config
from .store import run_key
from .train import RunResult, method_name

def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Torch version, thread count, the process's nice value (when the record is made) and machine,
    recorded with every run."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def make_record(config: Config, result: RunResult, data_sizes: dict[str, int], source: str,
                error: str | None = None) -> dict[str, Any]:
    """The JSON object stored for one run: ``status`` is ``ok``, or ``failed`` with the ``error``."""
    record = {
        "key": run_key(config),
        "status": "ok" if error is None else "failed",
        "name": config.name,
        "method": method_name(config),
        "k": config.k,
        "seed": config.seed,
        "best_dev_acc": result.best_dev_acc if result.epochs else None,
        "test_acc": result.test_acc,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "timings": result.timings,
        "config": config.to_dict(),
        "data": {"source": source, **data_sizes},
        "env": environment(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.simplify.enabled:
        record["simplify"] = {"units_at_best": result.units_at_best, "units_final": result.units,
                              "d_hidden": config.d_hidden, "prunes": result.prunes}
    if error is not None:
        record["error"] = error
    return record


def failures(records: Iterable[dict[str, Any]]) -> list[str]:
    """One line per failed run: which run, and why."""
    return [f"failed: {r['method']} k={r['k']} seed={r['seed']}: {r['error']}"
            for r in records if r.get("status") == "failed"]


UNDER_LOAD = 0.9  # a 1-thread run whose CPU time is below this share of its wall-clock time waited for a core


def cpu_timed_epochs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's epochs that recorded their CPU time (none for runs stored before it was recorded; the
    later epochs of a run resumed by newer code)."""
    return [epoch for epoch in record.get("epochs", []) if "cpu_seconds" in epoch]


def cpu_share(record: dict[str, Any]) -> float | None:
    """The run's CPU time over its wall-clock time times its threads, over :func:`cpu_timed_epochs` (None
    without any). About 1 for a 1-thread run that had a core to itself; lower when it waited for one,
    and then its wall-clock timers count the wait too."""
    epochs = cpu_timed_epochs(record)
    wall = sum(epoch["seconds"] for epoch in epochs)
    if not epochs or wall <= 0:
        return None
    return sum(epoch["cpu_seconds"] for epoch in epochs) / (wall * record["env"]["threads"])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, k), in first-seen order: means and standard deviations over seeds,
    with speedups and accuracy deltas against the dense (k=0) row when there is one.
    Failed runs are left out (see :func:`failures`)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        if record.get("status", "ok") != "ok":
            continue
        groups.setdefault((record["method"], record["k"]), []).append(record)
    rows = []
    for (method, k), runs in groups.items():
        row: dict[str, Any] = {"method": method, "k": k, "runs": len(runs),
                               "seeds": sorted(run["seed"] for run in runs)}
        for column, values in (
            ("linear_backward_s", [run["timings"]["linear_backward"] for run in runs]),
            ("backward_s", [run["timings"]["backward"] for run in runs]),
            ("train_s", [run["timings"]["train"] for run in runs]),
            ("best_dev_acc", [run["best_dev_acc"] for run in runs]),
            ("test_acc", [run["test_acc"] for run in runs]),
            ("best_epoch", [run["best_epoch"] for run in runs]),
        ):
            row[column], row[f"{column}_std"] = mean_std(values)
        row["units"] = mean_units(runs)
        rows.append(row)
    baseline = next((row for row in rows if row["k"] == 0), None)
    for row in rows:
        has_baseline = baseline is not None
        row["linear_backward_speedup"] = (baseline["linear_backward_s"] / row["linear_backward_s"]
                                          if has_baseline and row["linear_backward_s"] > 0 else None)
        row["backward_speedup"] = (baseline["backward_s"] / row["backward_s"]
                                   if has_baseline and row["backward_s"] > 0 else None)
        row["test_delta"] = row["test_acc"] - baseline["test_acc"] if has_baseline else None
    return rows


def mean_units(runs: Sequence[dict[str, Any]]) -> list[float]:
    """Mean hidden units per layer over the runs: meSimp's units at the best dev epoch, else ``d_hidden``."""
    per_run = [run.get("simplify", {}).get("units_at_best")
               or [run["config"]["d_hidden"]] * (run["config"]["n_layer"] - 1) for run in runs]
    return [statistics.fmean(layer) for layer in zip(*per_run)]


def format_units(units: Sequence[float], d_hidden: int) -> str:
    """``164 / 161 (33%)``: hidden units per layer and their average as a share of ``d_hidden``."""
    if not units:
        return ""
    return " / ".join(f"{u:.0f}" for u in units) + f" ({100 * statistics.fmean(units) / d_hidden:.0f}%)"


def format_mean_std(mean: float, std: float, runs: int, digits: int = 2) -> str:
    """``mean ± std`` over several runs, the bare mean for one."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if runs > 1 else f"{mean:.{digits}f}"


TABLE_HEADERS = ["method", "k", "linear backprop (s)", "overall backprop (s)", "train time (s)",
                 "best dev (%)", "test (%)", "best epoch", "seeds"]


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The summary rows as display strings: ``1.23 (12.3x)`` speedups, ``97.81 (+0.21)`` deltas."""
    lines = []
    for row in rows:
        n = row["runs"]
        linear = format_mean_std(row["linear_backward_s"], row["linear_backward_s_std"], n, 2)
        backward = format_mean_std(row["backward_s"], row["backward_s_std"], n, 2)
        test = format_mean_std(row["test_acc"], row["test_acc_std"], n, 2)
        if row["k"] != 0 and row["linear_backward_speedup"] is not None:
            linear += f" ({row['linear_backward_speedup']:.1f}x)"
            backward += f" ({row['backward_speedup']:.1f}x)"
            test += f" ({row['test_delta']:+.2f})"
        lines.append([
            row["method"], str(row["k"]), linear, backward,
            format_mean_std(row["train_s"], row["train_s_std"], n, 2),
            format_mean_std(row["best_dev_acc"], row["best_dev_acc_std"], n, 2), test,
            format_mean_std(row["best_epoch"], row["best_epoch_std"], n, 1) if n > 1 else f"{row['best_epoch']:g}",
            ",".join(str(seed) for seed in row["seeds"]),
        ])
    return lines


def format_table(rows: Sequence[dict[str, Any]], fmt: str = "github", d_hidden: int | None = None) -> str:
    """The paper-style table as text (``github`` Markdown by default); with meSimp rows and
    ``d_hidden``, a column of hidden units per layer (and % of ``d_hidden``) is added."""
    lines, headers = table_rows(rows), TABLE_HEADERS
    if d_hidden and any("meSimp" in row["method"] for row in rows):
        headers = TABLE_HEADERS[:2] + ["hidden units"] + TABLE_HEADERS[2:]
        lines = [line[:2] + [format_units(row["units"], d_hidden)] + line[2:] for line, row in zip(lines, rows)]
    return tabulate(lines, headers=headers, tablefmt=fmt, disable_numparse=True)


CSV_COLUMNS = ["method", "k", "units", "runs", "seeds", "linear_backward_s", "linear_backward_s_std",
               "linear_backward_speedup", "backward_s", "backward_s_std", "backward_speedup", "train_s",
               "train_s_std", "best_dev_acc", "best_dev_acc_std", "test_acc", "test_acc_std", "test_delta",
               "best_epoch", "best_epoch_std"]


def write_tables(out_dir: Path, rows: Sequence[dict[str, Any]], heading: str, notes: Sequence[str] = (),
                 d_hidden: int | None = None) -> None:
    """Write ``table.md`` (heading, Markdown table, notes) and ``table.csv`` (raw numbers) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tail = "".join(f"\n{note}\n" for note in notes)
    (out_dir / "table.md").write_text(f"{heading}\n\n{format_table(rows, d_hidden=d_hidden)}\n{tail}",
                                      encoding="utf-8")
    with open(out_dir / "table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "seeds": " ".join(str(seed) for seed in row["seeds"]),
                             "units": " ".join(f"{u:g}" for u in row["units"])})
