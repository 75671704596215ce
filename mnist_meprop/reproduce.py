"""``meprop reproduce``: the paper's MNIST tables and Figure 4, its POS-tagging and parsing rows on EWT,
and the authors' README table over the three tasks; paper numbers next to ours.

Each table is a YAML file in ``mnist_meprop/paper/`` (``configs/paper/`` in the repository):
a base config, and rows that override it and carry the paper's numbers. All runs go through
the sweep runner into one folder (``<out>/runs``), so rows shared between tables are trained
once, finished runs are never recomputed and an interrupted reproduction resumes.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .bench import D_INPUT, N_CLASSES, flop_limit
from .config import Config, validate
from .errors import ConfigError
from .export import compare_models
from .log import to_stderr
from .results import (UNDER_LOAD, cpu_model, cpu_share, cpu_timed_epochs, environment, format_mean_std, mean_std,
                      mean_units)
from .executors import Executor
from .runner import run_experiments
from .store import INFERENCE_FILE, append_record, latest_by_key, model_path, read_records, run_key
from .train import LOSS_PARTS

TABLES = ("1", "2", "3", "4", "5", "6", "fig4", "mesimp", "early", "ablation")
# The POS-tagging and parsing tasks (on EWT): Tables 1, 3, 4 and the authors' README row (paper/pos-*.yaml,
# paper/parsing-*.yaml); Table 2 times training: the paper's forward and backward for POS tagging, the
# training time per epoch for parsing (the paper has none); the parser has meSimp too.
EWT_TABLES = {"pos": ("1", "2", "3", "4", "readme"), "parsing": ("1", "2", "3", "4", "readme", "mesimp")}
EWT_TASKS = tuple(EWT_TABLES)
EWT_DATASET = "ewt"
# With an MNIST dataset, "readme" is the authors' README table: one row per task (readme_table).
README_TABLE = "readme"
# --quick: a few hundred examples, one epoch; enough to exercise every table and plot.
QUICK = {"dev_size": 200, "train_limit": 400, "test_limit": 300, "n_epoch": 1}
# A table's time columns, each read from a run's record: whole-run sums, but for the per-epoch training time.
TIME_METRICS = {
    "linear_backward_s": ("linear backprop (s)", lambda r: r["timings"]["linear_backward"]),
    "forward_s": ("forward (s)", lambda r: r["timings"]["forward"]),
    "backward_s": ("backward (s)", lambda r: r["timings"]["backward"]),
    "total_s": ("forward+backward (s)", lambda r: r["timings"]["forward"] + r["timings"]["backward"]),
    "train_epoch_s": ("training time per epoch (s)", lambda r: r["timings"]["train"] / len(r["epochs"])),
}


@dataclass
class Row:
    label: str
    overrides: dict[str, Any]
    paper: dict[str, float]
    baseline: str | None = None
    configs: list[Config] = field(default_factory=list)
    reduced_from: str | None = None  # meSimp: a dense MLP as wide as that row's runs ended up, per seed
    authors: str | None = None  # the authors' C# run (in authors-csharp.yaml) that measured this row
    variants: dict[str, list[Config]] = field(default_factory=dict)  # variant name -> its configs


@dataclass(frozen=True)
class Variant:
    """The table's rows once more with some keys set, e.g. ``preset: authors-csharp``."""

    name: str
    label: str
    overrides: dict[str, Any]


@dataclass
class TableSpec:
    name: str
    title: str
    base: dict[str, Any]
    rows: list[Row]
    k_values: list[int] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    max_seeds: int | None = None  # e.g. the ablation runs one seed whatever --seeds says
    authors: list[str] = field(default_factory=list)  # the early figure's authors' runs
    metrics: list[str] = field(default_factory=list)  # the columns, when the paper's numbers do not give them


SPEC_FILES = {"fig4": "fig4.yaml", "mesimp": "mesimp.yaml", "early": "early.yaml", "ablation": "ablation.yaml",
              README_TABLE: "readme.yaml"}
AUTHORS_DATA = "authors-csharp.yaml"
INFERENCE_REPEATS = 10  # meSimp's inference timing: interleaved rounds per model
EARLY_EPOCHS = 3  # the early-training figure and the ablation's early-loss column cover the first 3 epochs


def default_task(dataset: str | None) -> str:
    """The task a dataset means when none is named: ``pos`` for EWT, else ``mnist``."""
    return "pos" if dataset == EWT_DATASET else "mnist"


def tables_for(task: str) -> tuple[str, ...]:
    """The tables ``meprop reproduce`` has for a task: MNIST's (and the README table), or an EWT task's."""
    return EWT_TABLES[task] if task in EWT_TASKS else (*TABLES, README_TABLE)


def spec_path(name: str, task: str = "mnist") -> Path:
    if task in EWT_TASKS:
        file = f"{task}-{name}.yaml" if name in ("readme", "mesimp") else f"{task}-table{name}.yaml"
    else:
        file = SPEC_FILES.get(name, f"table{name}.yaml")
    return Path(str(resources.files("mnist_meprop") / "paper" / file))


def authors_runs() -> dict[str, dict[str, Any]]:
    """The authors' C# program's runs on full MNIST (``paper/authors-csharp.yaml``, with its provenance)."""
    path = Path(str(resources.files("mnist_meprop") / "paper" / AUTHORS_DATA))
    return yaml.safe_load(path.read_text(encoding="utf-8"))["runs"]


def ablation_rows(data: dict[str, Any]) -> list[Row]:
    """One row per (setting, switch): the setting with one of the authors' details switched back to ours."""
    rows = []
    reference = next(switch["label"] for switch in data["switches"] if not switch["set"])
    for setting in data["settings"]:
        for switch in data["switches"]:
            if setting["set"].get("optimizer") not in switch.get("optimizers", [setting["set"].get("optimizer")]):
                continue  # e.g. AdaGrad's eps placement means nothing to Adam
            rows.append(Row(f"{setting['label']}: {switch['label']}", {**setting["set"], **switch["set"]}, {},
                            baseline=f"{setting['label']}: {reference}"))
    return rows


def load_spec(name: str, task: str = "mnist") -> TableSpec:
    data = yaml.safe_load(spec_path(name, task).read_text(encoding="utf-8"))
    rows = [Row(r["label"], r.get("set", {}), r.get("paper", {}), r.get("baseline"),
                reduced_from=r.get("reduced_from"), authors=r.get("authors"))
            for r in data.get("rows", [])]
    if name == "ablation":
        rows = ablation_rows(data)
    variants = [Variant(v["name"], v["label"], v["set"]) for v in data.get("variants", [])]
    return TableSpec(name, data["title"], data["base"], rows, data.get("k_values", []), data.get("paper", {}),
                     variants, data.get("max_seeds"), data.get("authors", []), data.get("metrics", []))


def fig4_rows(spec: TableSpec) -> list[Row]:
    """Figure 4's series as rows: dense d=500, then per k: top-k, random-k, dense of hidden size k.
    A top-k point the authors' C# program was run at (same optimizer and k) shows its result too."""
    rows = [Row("backprop, hidden 500", {"k": 0}, {})]
    measured = authors_runs()
    for k in spec.k_values:
        authors = f"{spec.base['optimizer']}-meprop-k{k}-seed1"
        rows += [Row(f"meProp top-k, k={k}", {"k": k, "selection": "topk"}, {}, rows[0].label,
                     authors=authors if authors in measured else None),
                 Row(f"meProp random-k, k={k}", {"k": k, "selection": "random"}, {}, rows[0].label),
                 Row(f"backprop, hidden {k}", {"k": 0, "d_hidden": k}, {})]
    return rows


def data_settings(dataset: str, data_dir: str | None) -> dict[str, Any]:
    """Dataset keys: the paper's dev set of 5,000, or 1,000 for the 8,000-image bundled sample."""
    if dataset == EWT_DATASET:  # EWT's own dev file
        return {"dataset": dataset, **({"data_dir": data_dir} if data_dir is not None else {})}
    settings: dict[str, Any] = {"dataset": dataset, "dev_size": 1000 if dataset == "sample" else 5000}
    if data_dir is not None:
        settings["data_dir"] = data_dir
    elif dataset == "idx":
        raise ConfigError("--data-dir: required with --dataset idx")
    return settings


def build_configs(spec: TableSpec, data: dict[str, Any], seeds: Sequence[int], epochs: int | None,
                  quick: bool, threads: int | None) -> list[Row]:
    rows = fig4_rows(spec) if spec.name == "fig4" else spec.rows
    seeds = seeds[:spec.max_seeds] if spec.max_seeds else seeds
    for row in rows:
        raw = {**spec.base, **row.overrides, **data, "name": "paper"}
        if epochs is not None:
            raw["n_epoch"] = epochs
        if quick:
            raw.update(QUICK)
        if threads is not None:
            raw["threads"] = threads
        row.configs = [] if row.reduced_from else [validate({**raw, "seed": seed}) for seed in seeds]
        row.variants = {variant.name: [validate({**raw, **variant.overrides, "seed": seed}) for seed in seeds]
                        for variant in spec.variants}
    return rows


def all_configs(built: list[tuple[TableSpec, list[Row]]]) -> list[Config]:
    """Every distinct run of the tables, seed by seed: a reproduction stopped early has whole seeds."""
    configs = dict.fromkeys(c for _, rows in built for row in rows
                            for c in [*row.configs, *(c for cs in row.variants.values() for c in cs)])
    return sorted(configs, key=lambda config: config.seed)


def reduced_configs(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]]) -> None:
    """Fill each ``reduced_from`` row: per seed, its config with ``d_hidden`` set to the average
    active units of the source row's run with that seed (once those runs are stored)."""
    for row in rows:
        if not row.reduced_from:
            continue
        source = next(r for r in rows if r.label == row.reduced_from)
        row.configs = []
        for config in source.configs:
            record = by_key.get(run_key(config), {})
            units = record.get("simplify", {}).get("units_at_best") if record.get("status") == "ok" else None
            if units:
                width = max(1, round(statistics.fmean(units)))
                row.configs.append(config.replace(**row.overrides, d_hidden=width, simplify={}))


def row_values(configs: Sequence[Config], by_key: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Per-seed values of every metric for one row's runs (failed runs left out)."""
    records = ok_records(configs, by_key)
    values = {"test": [r["test_acc"] for r in records]}
    for metric, (_, pick) in TIME_METRICS.items():
        values[metric] = [pick(r) for r in records]
    return values


def ok_records(configs: Sequence[Config], by_key: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored, successful records of ``configs`` (missing and failed runs left out)."""
    records = (by_key.get(run_key(config)) for config in configs)
    return [record for record in records if record is not None and record.get("status", "ok") == "ok"]


# The authors' per-epoch timers (seconds per epoch, forward / backward / update) behind each time metric.
AUTHORS_TIMERS = {"linear_backward_s": ("backward_s",), "backward_s": ("backward_s",),
                  "forward_s": ("forward_s",), "total_s": ("forward_s", "backward_s")}


def authors_time(run: dict[str, Any], metric: str) -> float | None:
    """The authors' program's mean seconds per epoch for ``metric`` (its ``bp`` timer stands for both
    backward metrics: it covers the linear layers and the activations)."""
    timers = run.get("timers") or []
    if not timers or metric not in AUTHORS_TIMERS:
        return None
    return statistics.fmean(sum(epoch[name] for name in AUTHORS_TIMERS[metric]) for epoch in timers)


def _sources(spec: TableSpec) -> list[tuple[str, Callable[[Row], list[Config]]]]:
    """("ours", the row's configs) and one ("ours + <variant>", its configs) per variant of the table."""
    sources: list[tuple[str, Callable[[Row], list[Config]]]] = [("ours", lambda row: row.configs)]
    for variant in spec.variants:
        sources.append((f"ours + {variant.name}", lambda row, name=variant.name: row.variants[name]))
    return sources


def table_lines(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]],
                authors: dict[str, dict[str, Any]] | None = None) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: per row the paper's number, the authors' C# program's where its log covers
    the row, ours (mean ± std over seeds) and ours with each variant (e.g. the authors' details), with
    the difference to the paper for accuracy; for times the speedup over the row's baseline."""
    authors = authors or {}
    sources = _sources(spec)
    values = {(row.label, name): row_values(pick(row), by_key) for row in rows for name, pick in sources}
    metrics = spec.metrics or list(dict.fromkeys(m for row in rows for m in row.paper))
    if spec.name == "fig4":
        metrics = ["test", "linear_backward_s"]
    # the paper-speedup column of a time metric, where the paper has figures for it (Figure 4's is the plot's)
    with_paper = {metric: spec.name == "fig4" or any(metric in row.paper for row in rows) for metric in metrics}
    with_authors = any(row.authors for row in rows)
    headers = ["row", "seeds"]
    for metric in metrics:
        if metric == "test":
            headers += ["paper test %"] + (["authors' C# here: test % (epochs run)"] if with_authors else [])
            for name, _ in sources:
                headers += [f"{name} test %", f"{name} − paper"]
        else:
            label = TIME_METRICS[metric][0]
            short = label.split(" (")[0]
            headers += [f"{name} {label}" for name, _ in sources]
            headers += [f"paper speedup ({short})"] if with_paper[metric] else []
            headers += ["authors' C# here: speedup"] if with_authors else []
            headers += [f"{name} speedup" for name, _ in sources]
    cells = []
    for row in rows:
        line = [row.label, " / ".join(str(len(values[(row.label, name)]["test"])) for name, _ in sources)]
        run = authors.get(row.authors) if row.authors else None
        for metric in metrics:
            if metric == "test":
                line += _test_cells(row, [(values[(row.label, name)]["test"], pick(row)) for name, pick in sources],
                                    run, with_authors, by_key)
                continue
            base_row = next((r for r in rows if r.label == row.baseline), None)
            base_run = authors.get(base_row.authors) if base_row is not None and base_row.authors else None
            line += _time_cells(row, base_row, metric, [(values[(row.label, name)][metric],
                                                          values[(base_row.label, name)][metric] if base_row else [])
                                                         for name, _ in sources],
                                (run, base_run) if with_authors else None, with_paper[metric])
        cells.append(line)
    return headers, cells


def _test_cells(row: Row, per_source: list[tuple[list[float], list[Config]]], run: dict[str, Any] | None,
                with_authors: bool, by_key: dict[str, dict[str, Any]]) -> list[str]:
    """Paper, [the authors' program,] then per source (its accuracies and configs): mean ± std and the
    difference to the paper."""
    paper = row.paper.get("test")
    cells = [_opt(paper)]
    if with_authors:
        cells.append(f"{run['best']['test_acc']:.2f} ({run['epochs_label']})" if run else "")
    for found, configs in per_source:
        if not found:
            cells += [_missing(configs, by_key), ""]
            continue
        mean, std = mean_std(found)
        cells += [format_mean_std(mean, std, len(found)), "" if paper is None else f"{mean - paper:+.2f}"]
    return cells


def _time_cells(row: Row, base_row: Row | None, metric: str, per_source: list[tuple[list[float], list[float]]],
                authors_runs: tuple[dict[str, Any] | None, dict[str, Any] | None] | None,
                with_paper: bool) -> list[str]:
    """Per source the time (mean ± std), then [the paper's speedup over the baseline row,] [the authors'
    program's,] and per source ours; ``per_source`` holds (this row's values, the baseline row's values)."""
    times = [format_mean_std(*mean_std(found), len(found)) if found else "" for found, _ in per_source]
    ratios = [f"{statistics.fmean(base) / statistics.fmean(found):.1f}x"
              if found and base and statistics.fmean(found) > 0 else "" for found, base in per_source]
    paper_ratio = ""
    if base_row is not None and base_row.paper.get(metric) and row.paper.get(metric):
        paper_ratio = f"{base_row.paper[metric] / row.paper[metric]:.1f}x"
    paper_cells = [paper_ratio] if with_paper else []
    if authors_runs is None:
        return times + paper_cells + ratios
    run, base_run = authors_runs
    seconds, base_seconds = (authors_time(r, metric) if r else None for r in (run, base_run))
    authors_ratio = f"{base_seconds / seconds:.1f}x" if seconds and base_seconds else ""
    return times + paper_cells + [authors_ratio] + ratios


def _missing(configs: list[Config], by_key: dict[str, dict[str, Any]]) -> str:
    """What to show for a cell without results, from the configs behind that cell only (a row's own runs
    say nothing of its variant's): "failed" if a run of them is stored, else "not run"."""
    return "failed" if any(run_key(c) in by_key for c in configs) else "not run"


def loss_parts(record: dict[str, Any], epochs: int) -> list[float]:
    """The run's training loss per 1/8 epoch over its first ``epochs`` epochs (empty if not recorded)."""
    parts = [part for epoch in record["epochs"][:epochs] for part in epoch.get("train_loss_parts", [])]
    return parts if len(parts) == LOSS_PARTS * min(epochs, len(record["epochs"])) else []


def early_series(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]],
                 authors: dict[str, dict[str, Any]]) -> list[tuple[str, list[float], list[float]]]:
    """(label, epochs, losses) per curve: our runs (seed 1) and the authors' C# runs from their logs."""
    curves = []
    for row in rows:
        records = ok_records(row.configs, by_key)
        parts = loss_parts(records[0], EARLY_EPOCHS) if records else []
        if parts:
            curves.append((row.label, [(i + 1) / LOSS_PARTS for i in range(len(parts))], parts))
    for name in spec.authors:
        run = authors.get(name)
        if run is None:
            continue
        points = [(part["at"], part["train_loss"]) for part in run["parts"] if part["at"] <= EARLY_EPOCHS]
        method = "backprop" if run["k"] == 0 else f"meProp k={run['k']}"
        curves.append((f"authors' C# program, {method} (seed {run['seed']})",
                       [at for at, _ in points], [loss for _, loss in points]))
    return curves


def early_lines(curves: list[tuple[str, list[float], list[float]]]) -> tuple[list[str], list[list[str]]]:
    """The early figure as a table: per curve, the mean loss of each 1/8 of epoch 1, then epochs 2 and 3."""
    headers = ["curve"] + [f"ep 1, {i}/8" for i in range(1, 9)] + ["epoch 2 mean", "epoch 3 mean"]
    cells = []
    for label, xs, ys in curves:
        by_epoch = [[y for x, y in zip(xs, ys) if epoch - 1 < x <= epoch] for epoch in (1, 2, 3)]
        first = [f"{y:.2f}" for y in by_epoch[0]] + [""] * (8 - len(by_epoch[0]))
        cells.append([label] + first + [f"{statistics.fmean(e):.2f}" if e else "" for e in by_epoch[1:]])
    return headers, cells


def early_plot(curves: list[tuple[str, list[float], list[float]]], out_dir: Path) -> Path:
    """early-training-loss.png: training loss per 1/8 epoch. Colour is the method (backprop blue, meProp
    red), line and marker the implementation: ours solid, ours with the authors' details dash-dotted,
    the authors' C# program dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 5.4))
    seen: set[str] = set()
    for label, xs, ys in curves:
        authors, preset = label.startswith("authors'"), "preset" in label
        style, marker = ("--", "^") if authors else (("-.", "s") if preset else ("-", "o"))
        colour = "tab:red" if "meProp" in label else "tab:blue"
        curve = label.split(" (seed")[0]
        again = curve in seen  # a second seed of the same curve: fainter
        seen.add(curve)
        axis.plot(xs, ys, style, marker=marker, markersize=3, color=colour, alpha=0.45 if again else 1.0,
                  label=label)
    axis.set_yscale("log")
    axis.set_xlabel("epoch (points every 1/8 epoch)")
    axis.set_ylabel("mean training loss over the 1/8 epoch")
    axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    path = out_dir / "early-training-loss.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def ablation_lines(rows: list[Row], by_key: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per ablation row: test accuracy, its change from the row with all the authors' details, the
    largest 1/8-epoch training loss of the first 3 epochs (the early blow-up), the third epoch's training
    loss (the recovery from it) and the best epoch."""
    headers = ["setting: detail switched back to ours", "test %", "change vs all the authors' details",
               "max 1/8-epoch train loss, epochs 1-3", "epoch 3 train loss", "best epoch"]
    cells = []
    tests = {row.label: [r["test_acc"] for r in ok_records(row.configs, by_key)] for row in rows}
    for row in rows:
        records = ok_records(row.configs, by_key)
        if not records:
            cells.append([row.label, _missing(row.configs, by_key), "", "", "", ""])
            continue
        record = records[0]
        base = tests[row.baseline][0] if tests.get(row.baseline) else None
        parts = loss_parts(record, EARLY_EPOCHS)
        epochs = record["epochs"]
        cells.append([row.label, f"{record['test_acc']:.2f}", "" if base is None else f"{record['test_acc'] - base:+.2f}",
                      f"{max(parts):.2f}" if parts else "",
                      f"{epochs[EARLY_EPOCHS - 1]['train_loss']:.3f}" if len(epochs) >= EARLY_EPOCHS else "",
                      f"{record['best_epoch']:g}"])
    return headers, cells


def mesimp_lines(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]],
                 runs_dir: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """meSimp's table: units per hidden layer, average units (% of d), test accuracy paper vs ours,
    and, for the simplified rows, inference speedup of the compact model over the full-size masked one;
    then a note on where and how those inference times were taken."""
    d_hidden = spec.base["d_hidden"]
    headers = ["row", "seeds", "paper avg units", "ours units per layer", "ours avg units (% of d)",
               "paper test %", "ours test %", "ours − paper", "inference speedup (compact vs full)"]
    cells = []
    timings: list[dict[str, Any]] = []
    stored = latest_by_key(read_records(runs_dir, file=INFERENCE_FILE))
    for row in rows:
        records = ok_records(row.configs, by_key)
        paper_units, paper_test = row.paper.get("units"), row.paper.get("test")
        if not records:
            cells.append([row.label, "0", _opt_int(paper_units), "", "", _opt(paper_test), _missing(row.configs, by_key), "", ""])
            continue
        layer_means = mean_units(records)
        average = statistics.fmean(layer_means)
        mean, std = mean_std([r["test_acc"] for r in records])
        row_timings = [t for t in (inference_timing(runs_dir, r, stored) for r in records if r.get("simplify")) if t]
        timings += row_timings
        cells.append([row.label, str(len(records)), _opt_int(paper_units), " / ".join(f"{m:.0f}" for m in layer_means),
                      f"{average:.0f} ({100 * average / d_hidden:.0f}%)", _opt(paper_test),
                      format_mean_std(mean, std, len(records)), "" if paper_test is None else f"{mean - paper_test:+.2f}",
                      f"{statistics.fmean(t['speedup'] for t in row_timings):.2f}x" if row_timings else ""])
    return headers, cells, _inference_note(timings)


def inference_timing(runs_dir: Path, record: dict[str, Any],
                     stored: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The full-size masked model's test-set inference time against the compact model's, for a meSimp run
    (None without a saved model, or for another task than MNIST's MLP, which is all
    :mod:`mnist_meprop.export` compacts). Measured once, side by side, and kept in
    ``runs_dir/inference-timings.jsonl`` (``stored``: that file's records by run key, updated here) with its
    threads, time and machine load, so that regenerating a report does not re-time it on a machine that
    may be busy."""
    if record["config"].get("task", "mnist") != "mnist" or not model_path(runs_dir, record["key"]).exists():
        return None
    if record["key"] not in stored:
        comparison = compare_models(runs_dir, record, repeats=INFERENCE_REPEATS)
        stored[record["key"]] = {
            "key": record["key"], "speedup": comparison.speedup, "compact_ms": comparison.compact_ms,
            "full_ms": comparison.full_ms, "threads": comparison.threads, "repeats": INFERENCE_REPEATS,
            "load_average_1min": os.getloadavg()[0], "cpu": cpu_model(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        append_record(runs_dir, stored[record["key"]], file=INFERENCE_FILE)
    return stored[record["key"]]


def _inference_note(timings: list[dict[str, Any]]) -> list[str]:
    """How the meSimp table's inference speedups were measured: when, threads, machine load."""
    if not timings:
        return []
    days = sorted({t["measured_at"][:10] for t in timings})
    threads = sorted({t["threads"] for t in timings})
    loads = [t["load_average_1min"] for t in timings]
    return [(f"Inference speedup: one forward over the test set, the full-size masked model against the compact "
            f"one, timed side by side (median of {timings[0]['repeats']} interleaved rounds), once per run and kept in "
            f"`runs/{INFERENCE_FILE}`: {len(timings)} runs, {' / '.join(map(str, threads))} thread(s), measured "
            f"{' to '.join([days[0], days[-1]] if len(days) > 1 else days)} on {timings[0]['cpu']}, 1-minute load "
            f"average {min(loads):.1f}-{max(loads):.1f} (a load above 0 means other processes shared the cores). "
            f"`meprop export` times one run again."), ""]


def _opt_int(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _opt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(headers: list[str], cells: list[list[str]]) -> str:
    from tabulate import tabulate
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True)


def fig4_plots(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]], out_dir: Path) -> list[Path]:
    """accuracy-vs-k.png (top-k, random-k, dense of hidden k) and speedup-vs-k.png (with the FLOP limit)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_hidden = spec.base["d_hidden"]
    values = {row.label: row_values(row.configs, by_key) for row in rows}

    def series(prefix: str, metric: str = "test") -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for k in spec.k_values:
            found = values.get(f"{prefix}{k}", {}).get(metric, [])
            if found:
                xs.append(100.0 * k / d_hidden)
                ys.append(statistics.fmean(found))
        return xs, ys

    paths = []
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for prefix, label, style in (("meProp top-k, k=", "meProp top-k", "o-"),
                                 ("meProp random-k, k=", "meProp random-k", "s--"),
                                 ("backprop, hidden ", "backprop, hidden size k", "^:")):
        xs, ys = series(prefix)
        axis.plot(xs, ys, style, label=label)
    dense = values["backprop, hidden 500"]["test"]
    if dense:
        axis.axhline(statistics.fmean(dense), color="grey", linewidth=0.8, label=f"backprop, hidden {d_hidden}")
    axis.set_xscale("log")
    axis.set_xlabel(f"k / d (%), d = {d_hidden}")
    axis.set_ylabel("test accuracy (%)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(out_dir / "fig4-accuracy-vs-k.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    dense_time = values["backprop, hidden 500"]["linear_backward_s"]
    xs, ys = [], []
    for k in spec.k_values:
        found = values.get(f"meProp top-k, k={k}", {}).get("linear_backward_s", [])
        if found and dense_time:
            xs.append(k)
            ys.append(statistics.fmean(dense_time) / statistics.fmean(found))
    axis.plot(xs, ys, "o-", label="measured (linear backprop time)")
    axis.plot(spec.k_values, [flop_limit(D_INPUT, d_hidden, N_CLASSES, k) for k in spec.k_values], "k--",
              label="FLOP limit")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("k")
    axis.set_ylabel("backward speedup over backprop (x)")
    axis.legend()
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    paths.append(out_dir / "fig4-speedup-vs-k.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    return paths


def reproduce(tables: Iterable[str], dataset: str, data_dir: str | None, seeds: int, epochs: int | None,
              quick: bool, out_dir: Path, command: str, threads: int | None = None,
              log: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
              fig4_seeds: int | None = None, fig4_epochs: int | None = None, report_only: bool = False,
              executor: Executor | None = None, task: str | None = None) -> Path:
    """Run every requested table (resuming), write CSVs, plots and ``REPORT.md``; returns the report path.

    ``task`` is ``mnist`` (the MLP tables, on ``dataset``), ``pos`` or ``parsing`` (on EWT); by default
    ``pos`` for ``dataset="ewt"``, else ``mnist``.

    ``fig4_seeds`` and ``fig4_epochs`` let Figure 4's 28 series points use fewer seeds or epochs
    than the tables (the report says so). A hand-written ``NOTES.md`` in ``out_dir`` (where and
    why our numbers differ) is appended to the report, so rerunning the command keeps it.
    ``report_only`` trains nothing: the report shows the runs stored so far (others as "not run"),
    e.g. while other processes are still working on the same folder. ``executor`` trains the
    runs (default: in this process; see :mod:`mnist_meprop.executors`).
    """
    log = log or to_stderr
    task = task or default_task(dataset)
    data = data_settings(dataset, data_dir)
    specs = [load_spec(name, task) for name in tables]
    fig4_seeds = fig4_seeds or seeds
    fig4_epochs = fig4_epochs or epochs
    built = [(spec, build_configs(spec, data, list(range(1, (fig4_seeds if spec.name == "fig4" else seeds) + 1)),
                                  fig4_epochs if spec.name == "fig4" else epochs, quick, threads))
             for spec in specs]
    configs = all_configs(built)
    log(f"reproduce: {len(configs)} distinct runs for {', '.join(s.name for s in specs)} into {out_dir / 'runs'}")
    by_key = _run_or_read(configs, out_dir / "runs", report_only, log, should_stop, executor)
    for spec, rows in built:  # rows sized by other rows' results (meSimp's reduced MLP) run second
        reduced_configs(spec, rows, by_key)
    extra = [c for _, rows in built for row in rows if row.reduced_from for c in row.configs]
    if extra and not report_only:
        log(f"reproduce: {len(extra)} more runs, dense MLPs of the sizes meSimp reached")
        by_key.update((r["key"], r) for r in run_experiments(extra, out_dir / "runs", log=log,
                                                             should_stop=should_stop, executor=executor))
    stored = sum(run_key(c) in by_key for c in configs)
    threads_used = sorted({by_key[run_key(c)]["env"]["threads"] for c in configs if run_key(c) in by_key})
    header = _report_header(command, task, dataset, data_dir, [spec.name for spec in specs], seeds, epochs,
                            fig4_seeds, fig4_epochs, quick, threads_used, stored, len(configs))
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = header + [line for spec, rows in built for line in _table_section(spec, rows, by_key, out_dir, log)]
    sections += _load_section(built, by_key)
    notes = out_dir / "NOTES.md"
    if notes.exists():
        sections += ["## Where our numbers differ from the paper, and why (NOTES.md, written by hand)", "",
                     notes.read_text(encoding="utf-8").strip(), ""]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(sections) + "\n", encoding="utf-8")
    return report


def _report_header(command: str, task: str, dataset: str, data_dir: str | None, tables: list[str], seeds: int,
                   epochs: int | None, fig4_seeds: int, fig4_epochs: int | None, quick: bool,
                   threads_used: list[int], stored: int, total: int) -> list[str]:
    """The report's opening lines: how it was made (command, data, seeds, epochs, machine), how to read its
    numbers, and, while runs are missing, that it is partial."""
    env = environment()
    threads_text = " / ".join(map(str, threads_used)) if threads_used else str(env["threads"])
    ewt = task in EWT_TASKS
    return [
        "# meProp reproduction report",
        "",
        f"- command: `{command}`",
        f"- dataset: {dataset}{' (' + data_dir + ')' if data_dir else ''}; seeds 1-{seeds}; "
        f"epochs: {'1 (quick)' if quick else (epochs or 'as the paper, 20')}"
        + (f"; Figure 4: seeds 1-{fig4_seeds}, epochs {'1 (quick)' if quick else (fig4_epochs or 20)}"
           if "fig4" in tables and (fig4_seeds, fig4_epochs) != (seeds, epochs) else "")
        + ((f"; quick subset: the first {QUICK['train_limit']} train and {QUICK['test_limit']} dev and test sentences"
            if ewt else f"; quick subset: {QUICK['train_limit']} train / {QUICK['dev_size']} dev / "
                        f"{QUICK['test_limit']} test") if quick else ""),
        f"- torch {env['torch']}, {threads_text} thread(s) per run, {env['cpu']} ({env['cpu_count']} CPUs), "
        f"Python {env['python']}",
        "- accuracies: test accuracy (%) at the best dev epoch, mean ± std over seeds; times: speedup of the",
        "  row over its backprop baseline (absolute seconds depend on the machine, so the paper's are not compared)",
        *(["- the authors' C# program's numbers come from its logs on this machine "
           "(`mnist_meprop/paper/authors-csharp.yaml`,", "  with their provenance); its runs stopped after the number "
           "of epochs shown"] if not ewt else
          ["- the paper's numbers are on WSJ (Penn Treebank), ours on UD English-EWT r2.16: compare ours with ours,",
           "  backprop with meProp; the paper's accuracies and times are context"]),
        *([f"- **partial report**: {stored} of {total} runs stored so far; the seeds column counts the runs "
           "behind each number and \"not run\" marks rows still to come"] if stored < total else []),
        "",
    ]


def _table_section(spec: TableSpec, rows: list[Row], by_key: dict[str, dict[str, Any]], out_dir: Path,
                   log: Callable[[str], None]) -> list[str]:
    """One table of the report: writes its CSV (and plots) into ``out_dir``, logs it and returns its
    Markdown section."""
    extra_lines: list[str] = []
    after_table: list[str] = []
    if spec.name == "mesimp":
        headers, cells, after_table = mesimp_lines(spec, rows, by_key, out_dir / "runs")
    elif spec.name == "early":
        curves = early_series(spec, rows, by_key, authors_runs())
        headers, cells = early_lines(curves)
        extra_lines = [f"![early training loss]({early_plot(curves, out_dir).name})", ""]
    elif spec.name == "ablation":
        headers, cells = ablation_lines(rows, by_key)
    else:
        headers, cells = table_lines(spec, rows, by_key, authors_runs())
    name = spec.name if spec.name in SPEC_FILES else f"table{spec.name}"
    with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(headers)
        writer.writerows(cells)
    section = [f"## {spec.title}", ""] + extra_lines
    if spec.variants:
        section += [f"Columns \"ours + {v.name}\": {v.label}." for v in spec.variants] + [""]
    if spec.name == "fig4":
        plots = fig4_plots(spec, rows, by_key, out_dir)
        best = max((statistics.fmean(v["test"]) for row in rows if row.label.startswith("meProp top-k")
                    for v in [row_values(row.configs, by_key)] if v["test"]), default=None)
        section += [f"Best meProp top-k test accuracy in the sweep: "
                    f"{'n/a' if best is None else f'{best:.2f}'} (paper: {spec.paper['best_meprop_test']:.2f}).", ""]
        section += [f"![{path.stem}]({path.name})" for path in plots] + [""]
    section += [markdown(headers, cells), ""] + after_table
    log(f"\n{spec.title}\n{markdown(headers, cells)}")
    return section


def _load_section(built: list[tuple[TableSpec, list[Row]]], by_key: dict[str, dict[str, Any]]) -> list[str]:
    """Which stored 1-thread runs waited for a core while they trained, from their CPU time over their
    wall-clock time (:func:`mnist_meprop.results.cpu_share`): their times count the wait."""
    labelled: dict[str, tuple[str, dict[str, Any]]] = {}  # run key -> (row and seed, record)
    for spec, rows in built:
        for row in rows:
            for config in row.configs:
                record = by_key.get(run_key(config))
                if record is not None and record.get("status", "ok") == "ok" and record["env"]["threads"] == 1:
                    name = spec.name if spec.name in SPEC_FILES else f"Table {spec.name}"
                    labelled.setdefault(record["key"], (f"{name}, {row.label}, seed {config.seed}", record))
    measured = [(label, share, record) for label, record in labelled.values()
                if (share := cpu_share(record)) is not None]
    if not measured:
        return []
    shares = [share for _, share, _ in measured]
    waited = [f"{label} ({share:.2f})" for label, share, _ in measured if share < UNDER_LOAD]
    partly = [f"{label} ({len(cpu_timed_epochs(record))} of {len(record['epochs'])} epochs)"
              for label, _, record in measured if len(cpu_timed_epochs(record)) < len(record["epochs"])]
    return ["## Machine load while the runs trained", "",
            f"CPU time over wall-clock time, per 1-thread run (1.00: the run had a core to itself; lower: it waited "
            f"for one, and its times count the wait). Recorded for {len(measured)} of the {len(labelled)} stored "
            f"1-thread runs (runs stored before it was recorded have none): "
            f"{min(shares):.2f} to {max(shares):.2f}. "
            + (f"Below {UNDER_LOAD}: {'; '.join(waited)}." if waited else f"None below {UNDER_LOAD}.")
            + (f" Over only the epochs that recorded it (a run resumed by newer code): {'; '.join(partly)}."
               if partly else ""), ""]


def _run_or_read(configs: Sequence[Config], runs_dir: Path, report_only: bool, log: Callable[[str], None],
                 should_stop: Callable[[], bool] | None, executor: Executor | None) -> dict[str, dict[str, Any]]:
    """The records of ``configs`` by run key: trained where missing (resuming), or, with ``report_only``,
    whatever ``runs_dir`` holds so far."""
    if report_only:
        return latest_by_key(read_records(runs_dir, log))
    records = run_experiments(configs, runs_dir, log=log, should_stop=should_stop, executor=executor,
                              recompute_hint=None)
    return {record["key"]: record for record in records}


# The authors' README table: its tasks in its order, each with its folder under the results root
# (the task's own reproduction writes there too, so the runs are shared).
README_TASKS = (("parsing", "Parsing", "UAS"), ("pos", "POS tagging", "accuracy %"), ("mnist", "MNIST", "accuracy %"))
MNIST_FOLDERS = {"mnist": "mnist", "sample": "mnist-sample", "fashion-mnist": "fashion-mnist", "idx": "mnist-idx"}


def task_folder(task: str, dataset: str) -> str:
    """The results folder of a task's reproduction: ``parsing-ewt``, ``pos-ewt``, or the MNIST dataset's."""
    return f"{task}-{EWT_DATASET}" if task in EWT_TASKS else MNIST_FOLDERS[dataset]


def readme_table(dataset: str, data_dir: str | None, seeds: int, epochs: int | None, quick: bool, root: Path,
                 command: str, threads: int | None = None, log: Callable[[str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, report_only: bool = False,
                 executor: Executor | None = None, ewt_dir: str | None = None) -> Path:
    """The authors' README table (parsing, POS tagging, MNIST: backprop time and test score, backprop vs
    meProp), paper next to ours: trains each task's README rows where missing, into
    ``root/<task folder>/runs``, and writes ``root/README-TABLE.md``; returns its path. MNIST's row runs
    on ``dataset`` (``data_dir``), the other two on EWT (``ewt_dir``, default: where they download)."""
    log = log or to_stderr
    lines = []
    seed_list = list(range(1, seeds + 1))
    for task, name, metric in README_TASKS:
        on = EWT_DATASET if task in EWT_TASKS else dataset
        spec = load_spec(README_TABLE, task)
        rows = build_configs(spec, data_settings(on, ewt_dir if task in EWT_TASKS else data_dir), seed_list,
                             epochs, quick, threads)
        runs_dir = root / task_folder(task, on) / "runs"
        configs = all_configs([(spec, rows)])
        log(f"readme table, {name}: {len(configs)} runs in {runs_dir}")
        by_key = _run_or_read(configs, runs_dir, report_only, log, should_stop, executor)
        meprop_rows = [row for row in rows if row.baseline == rows[0].label]
        for row in meprop_rows:  # a variant row (the parser's output layer at the paper's share) gets a line of its own
            variant = row.label.removeprefix(meprop_rows[0].label)
            lines.append(_readme_line(f"{name}{variant} ({metric})", rows[0], row, by_key))
    headers = ["task (test score)", "paper: backprop", "paper: meProp", "ours: backprop", "ours: meProp", "seeds"]
    table = markdown(headers, lines)
    env = environment()
    text = "\n".join([
        "# The authors' README table: backprop vs meProp on the paper's three tasks",
        "",
        f"- command: `{command}`",
        f"- ours: MNIST on {dataset}, parsing and POS tagging on UD English-EWT r2.16 (the paper: WSJ); seeds "
        f"1-{seeds}; epochs: {'1, on a quick subset' if quick else (epochs or 'as the paper, 20')}; torch "
        f"{env['torch']}, {env['cpu']} ({env['cpu_count']} CPUs)",
        "- each cell: linear backprop time (the linear layers' backward, summed over the run), with meProp's speedup "
        "over backprop; then the test score at the best dev epoch, with meProp's difference to backprop; ours are "
        "means over seeds",
        "- the paper's times are its C# program's on its machine (per epoch for parsing and POS tagging), ours are "
        "whole runs here: compare the speedups, not the seconds. The authors' README prints the parsing difference as +0.04 (88.94 against "
        "89.80: it is inconsistent as published)",
        "- our runs were timed as they trained, whenever the command (or a task's own reproduction) stored them, "
        "some beside other runs: a speedup here compares whole runs, not timings taken side by side (each task's "
        "report says when and how its runs ran)",
        "",
        table,
        "",
    ])
    path = root / "README-TABLE.md"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log(f"\n{table}")
    return path


def _readme_line(task: str, base: Row, meprop: Row, by_key: dict[str, dict[str, Any]]) -> list[str]:
    """One README-table row: the task, then paper and ours for backprop and meProp, each as time and score,
    meProp's with its speedup and difference."""
    cells = [task]
    if all(row.paper.get(key) is not None for row in (base, meprop) for key in ("linear_backward_s", "test")):
        base_time, base_score = base.paper["linear_backward_s"], base.paper["test"]
        cells += [_readme_cell(base_time, base_score),
                  _readme_cell(meprop.paper["linear_backward_s"], meprop.paper["test"], None, base_time, base_score)]
    else:
        cells += ["", ""]
    ours_base, ours_meprop = row_values(base.configs, by_key), row_values(meprop.configs, by_key)
    base_time = base_score = None  # meProp's cell compares with backprop's only when both are stored
    if ours_base["test"]:
        base_time, base_score = statistics.fmean(ours_base["linear_backward_s"]), statistics.fmean(ours_base["test"])
        cells.append(_readme_cell(base_time, base_score, mean_std(ours_base["test"])[1]))
    else:
        cells.append(_missing(base.configs, by_key))
    if ours_meprop["test"]:
        cells.append(_readme_cell(statistics.fmean(ours_meprop["linear_backward_s"]),
                                  statistics.fmean(ours_meprop["test"]), mean_std(ours_meprop["test"])[1],
                                  base_time, base_score))
    else:
        cells.append(_missing(meprop.configs, by_key))
    return cells + [f"{len(ours_base['test'])} / {len(ours_meprop['test'])}"]


def _readme_cell(time_s: float, score: float, std: float | None = None, base_time: float | None = None,
                 base_score: float | None = None) -> str:
    """``time s [(speedup over base)], score [± std] [(difference to base)]``."""
    speedup = f" ({base_time / time_s:.1f}x)" if base_time and time_s > 0 else ""
    spread = f" ± {std:.2f}" if std else ""
    difference = f" ({score - base_score:+.2f})" if base_score is not None else ""
    seconds = f"{time_s:,.0f}" if time_s >= 100 else f"{time_s:.3g}"
    return f"{seconds} s{speedup}, {score:.2f}{spread}{difference}"

