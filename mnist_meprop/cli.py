"""The ``meprop`` command line: a thin shell over :mod:`mnist_meprop.runner` and :mod:`mnist_meprop.results`."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from .config import Config, config_warnings, load_config
from .errors import ConfigError, MePropError, WorkerLost
from .executors import EXECUTORS, Executor, LocalExecutor, make_executor
from .results import environment, failures, format_table, summarize, write_tables
from .runner import run_experiments, stop_on_signals, sweep_configs
from .task import task_for
from .train import RunInterrupted

EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def parse_int_list(option: str, text: str) -> list[int]:
    """``"0,10,20"`` -> ``[0, 10, 20]``; a one-line error naming the option otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option}: expected at least one value")
    return values


def _heading(config: Config, records: Sequence[dict]) -> str:
    """The table's title line: the settings, and the machine and thread counts the runs had."""
    env = environment()
    threads = sorted({r["env"]["threads"] for r in records if "env" in r}) or [env["threads"]]
    model = {"mnist": f"MLP {config.n_layer} layers", "pos": "LSTM tagger",
             "parsing": f"parser MLP {config.n_layer} layers"}[config.task] + f", hidden {config.d_hidden}"
    return (f"## {config.name}: {config.dataset}, {model}, "
            f"minibatch {config.d_minibatch}, {config.optimizer} lr {config.lr:g}"
            f" ({config.sparse_update} update{', fused engine' if config.engine == 'fused' else ''}"
            f"{', denormals flushed' if config.flush_denormal else ''}), dropout {config.dropout:g}, "
            f"{config.n_epoch} epochs; {task_for(config).metric} in %; torch {env['torch']}, "
            f"{' / '.join(map(str, threads))} threads, {env['cpu']}, {config.device}")


def _run_and_report(configs: Sequence[Config], out: str | None, fresh: bool, executor: Executor | None = None) -> None:
    """Run the group, print and write its table; exit 130 on interrupt, 1 if a run failed."""
    out_dir = Path(out) if out else Path("results") / configs[0].name
    for warning in dict.fromkeys(w for config in configs for w in config_warnings(config)):
        click.echo(warning, err=True)
    try:
        with executor or LocalExecutor() as running, stop_on_signals() as should_stop:
            records = run_experiments(configs, out_dir, fresh=fresh, should_stop=should_stop, executor=running)
    except (RunInterrupted, KeyboardInterrupt):
        click.echo(f"interrupted: finished runs are in {out_dir / 'runs.jsonl'} and the current run's last "
                   f"finished epoch is checkpointed; run the same command again to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except WorkerLost as error:
        _fail(error, EXIT_RUN_FAILED)
    rows = summarize(records)
    failed = failures(records)
    heading = _heading(configs[0], records)
    click.echo(f"{heading}\n\n{format_table(rows, d_hidden=configs[0].d_hidden)}")
    for line in failed:
        click.echo(line)
    write_tables(out_dir, rows, heading, failed, configs[0].d_hidden)
    click.echo(f"\nwrote {out_dir / 'runs.jsonl'}, {out_dir / 'table.md'}, {out_dir / 'table.csv'}", err=True)
    if failed:
        sys.exit(EXIT_RUN_FAILED)


def _fail(message: object, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr and exit: 2 for bad input, 1 for a run lost on the way."""
    click.echo(f"meprop: error: {message}", err=True)
    sys.exit(code)


_config_option = click.option("--config", "config_path", metavar="FILE",
                              help="YAML config (default: the bundled configs/sample.yaml).")
_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config key; repeatable, e.g. --set n_epoch=1.")
_out_option = click.option("--out", metavar="DIR", help="Output folder (default: results/<config name>/).")
_fresh_option = click.option("--fresh", is_flag=True,
                             help="Recompute runs already in the output folder instead of skipping them.")


def _executor_options(command: Callable) -> Callable:
    """--executor, --address, --cpus-per-run, --gpus-per-run (see mnist_meprop.executors)."""
    options = [
        click.option("--executor", "executor_name", type=click.Choice(EXECUTORS), default="local", show_default=True,
                     help="local: train the runs here, one after the other; ray: one Ray task per run."),
        click.option("--address", metavar="ADDR",
                     help="Ray cluster to join (auto, host:port or ray://host:port); default: start a local "
                          "Ray with this machine's cores."),
        click.option("--cpus-per-run", type=click.IntRange(min=1),
                     help="CPUs (= torch threads) per Ray task (default: the runs' threads setting, else torch's "
                          "default here, as a local run; 1 runs one task per core)."),
        click.option("--gpus-per-run", type=click.FloatRange(min=0), help="GPUs per Ray task (default 0)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnist-meprop")
def main() -> None:
    """meProp: train MLPs whose hidden layers back-propagate only the top-k gradient entries.

    Runs already stored in the output folder are skipped, and an interrupted run (Ctrl-C)
    resumes from its last finished epoch when the same command is run again.
    """
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 (warnings' hook)
    """Warnings (e.g. a deprecated config value) as one line, without the source line."""
    return f"meprop: warning: {message}\n"


@main.command()
@_config_option
@_set_option
@_out_option
@_fresh_option
def train(config_path: str | None, overrides: tuple[str, ...], out: str | None, fresh: bool) -> None:
    """Train one config and print its table."""
    try:
        _run_and_report([load_config(config_path, overrides)], out, fresh)
    except MePropError as error:
        _fail(error)


@main.command()
@_config_option
@click.option("--k", "k_list", required=True, metavar="K,K,...", help="k values; 0 is the dense baseline.")
@click.option("--seeds", metavar="S,S,...", help="Seeds (default: the config's seed).")
@_set_option
@_out_option
@_fresh_option
@_executor_options
def sweep(config_path: str | None, k_list: str, seeds: str | None, overrides: tuple[str, ...],
          out: str | None, fresh: bool, executor_name: str, address: str | None, cpus_per_run: int | None,
          gpus_per_run: float | None) -> None:
    """Train the config once per k (and seed) and print the comparison table."""
    try:
        base = load_config(config_path, overrides)
        ks = parse_int_list("--k", k_list)
        seed_list = parse_int_list("--seeds", seeds) if seeds else [base.seed]
        executor = make_executor(executor_name, address, cpus_per_run, gpus_per_run, base.threads)
        _run_and_report(sweep_configs(base, ks, seed_list), out, fresh, executor)
    except MePropError as error:
        _fail(error)


@main.command()
@click.option("--quick", is_flag=True, help="Only the target settings (d=500 mb 10 per-example k=20, "
              "d=500 mb 50 unified k=30, d=500 mb 200 per-example k=20, d=2000 mb 50 unified k=20) with "
              "their baselines.")
@click.option("--json", "json_path", metavar="FILE", help="Also write the records as JSON.")
@click.option("--plot", "plot_path", metavar="FILE", help="Also plot linear-backward speedup vs k against the bound (PNG).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads (default: torch's default on this machine); printed.")
@click.option("--repeats", type=click.IntRange(min=5), default=None,
              help="Timed steps per model per round (default 20).")
@click.option("--rounds", type=click.IntRange(min=3), default=7, show_default=True,
              help="Interleaved rounds; each speedup is the median of the per-round ratios.")
@click.option("--optimizer", type=click.Choice(["adam", "adagrad", "sgd"]), default="adam", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--engine", type=click.Choice(["fused", "autograd"]), default="fused", show_default=True,
              help="How our models (ours_k0 and meProp) train: the fused step where it supports the setting, "
                   "or autograd.")
@click.option("--lstm", is_flag=True, help="Instead: the POS tagger's LSTM, per sentence (stock, ours k=0, "
              "meProp k=5/10/20).")
@click.option("--parsing", is_flag=True, help="Instead: the parser at the paper's minibatch of 10,000 transitions "
              "(stock, ours k=0, meProp k=20 on every layer), with the bound.")
def bench(quick: bool, json_path: str | None, plot_path: str | None, threads: int | None, repeats: int | None,
          rounds: int, optimizer: str, device: str, engine: str, lstm: bool, parsing: bool) -> None:
    """Time forward, linear backward, backward, update and full step: meProp vs nn.Linear, against a bound."""
    import torch

    from .bench import as_dicts, environment_line, markdown_table, run_bench, speedup_plot

    torch.set_num_threads(threads or torch.get_num_threads())
    try:
        header = environment_line(optimizer, device)
    except MePropError as error:
        _fail(error)
    if lstm and parsing:
        _fail("--lstm and --parsing: one at a time")
    if parsing:
        from .bench_parsing import parsing_as_dicts, parsing_markdown, run_parsing_bench

        header = environment_line("adam", "cpu")
        click.echo(f"meprop bench --parsing: {header}; medians in milliseconds", err=True)
        records, rates = run_parsing_bench(rounds=rounds, steps=repeats or 3)
        machine = (f"machine: float32 GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s, copy bandwidth "
                   f"{rates.bandwidth / 1e9:.1f} GB/s")
        click.echo(f"# meprop bench --parsing\n\n{header}; {machine}; the parser (48 x 50 inputs, cube MLP 500-500, "
                   f"73 transitions, Adam), minibatch 10,000 random transition examples; medians in ms over {rounds} "
                   f"interleaved rounds; speedups: median of per-round ratios (* spread above 10%)\n\n"
                   f"{parsing_markdown(records)}")
        _write_json(json_path, {"environment": header, "machine": machine, "records": parsing_as_dicts(records)})
        return
    if lstm:
        from .bench_lstm import lstm_as_dicts, lstm_markdown, run_lstm_bench

        header = environment_line("adam", "cpu")
        click.echo(f"meprop bench --lstm: {header}; medians in microseconds", err=True)
        records = run_lstm_bench(rounds=rounds, steps=repeats or 20)
        click.echo(f"# meprop bench --lstm\n\n{header}; the POS tagger (190 inputs, LSTM 500, 49 tags), one "
                   f"sentence of 20 words per step; medians in µs over {rounds} interleaved rounds; speedups: "
                   f"median of per-round ratios (* spread above 10%)\n\n{lstm_markdown(records)}")
        _write_json(json_path, {"environment": header, "records": lstm_as_dicts(records)})
        return
    click.echo(f"meprop bench{' --quick' if quick else ''}: {header}; medians in microseconds", err=True)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line.strip())
        click.echo(line, err=True)
    records = run_bench(quick=quick, repeats=repeats, rounds=rounds, optimizer=optimizer, device=device, log=log,
                        engine=engine)
    machine = lines[0] if lines else ""
    click.echo(f"# meprop bench{' --quick' if quick else ''}\n\n{header}; our models: engine {engine}; {machine}; "
               f"medians in µs over "
               f"{rounds} interleaved rounds; speedups against stock PyTorch dense (`dense`)\n\n{markdown_table(records)}")
    _write_json(json_path, {"environment": header, "machine": machine, "records": as_dicts(records)})
    if plot_path:
        speedup_plot(records, Path(plot_path))


def _write_json(path: str | None, payload: dict) -> None:
    """Write a bench's records as JSON to ``path`` (its folder made), if one was given."""
    if path:
        import json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))


@main.command("reproduce")
@click.option("--table", "table", default="all", show_default=True,
              metavar="1|2|3|4|5|6|fig4|mesimp|early|ablation|readme|all[,...]",
              help="Which tables (and/or Figure 4, meSimp, the early-training figure, the ablation of the "
                   "authors' details) to reproduce; comma-separated for several. readme alone: the authors' "
                   "README table over the three tasks (parsing, POS tagging, MNIST), written as "
                   "<out>/README-TABLE.md from the runs in <out>/parsing-ewt, <out>/pos-ewt and the MNIST "
                   "dataset's folder (default out: results). With --task pos or parsing: that task's rows, "
                   "1|3|4|readme (parsing also mesimp).")
@click.option("--task", type=click.Choice(["mnist", "pos", "parsing"]),
              help="mnist: the MLP tables (the default); pos, parsing: the POS-tagging or parsing rows on "
                   "UD English-EWT (--dataset ewt, implied).")
@click.option("--dataset", type=click.Choice(["sample", "mnist", "fashion-mnist", "idx", "ewt"]),
              help="MNIST-format images for the MLP tables (default: sample), or ewt (UD English-EWT), which "
                   "alone means --task pos.")
@click.option("--data-dir", metavar="DIR", help="Download folder, or the IDX folder for --dataset idx.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True, help="Seeds 1..N per row.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs per run (default: the paper's 20).")
@click.option("--fig4-seeds", type=click.IntRange(min=1), help="Seeds for Figure 4 only (default: --seeds).")
@click.option("--fig4-epochs", type=click.IntRange(min=1), help="Epochs for Figure 4 only (default: --epochs).")
@click.option("--quick", is_flag=True, help="A few hundred examples, one epoch: checks the pipeline in minutes.")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads (recorded in the report).")
@click.option("--out", metavar="DIR", help="Output folder (default: results/reproduce-<dataset>[-quick]/).")
@click.option("--report-only", is_flag=True,
              help="Train nothing: write the report from the runs stored so far (missing rows say \"not run\").")
@_executor_options
def reproduce_command(table: str, task: str | None, dataset: str | None, data_dir: str | None, seeds: int,
                      epochs: int | None,
                      fig4_seeds: int | None, fig4_epochs: int | None, quick: bool,
                      threads: int | None, out: str | None, report_only: bool, executor_name: str,
                      address: str | None, cpus_per_run: int | None, gpus_per_run: float | None) -> None:
    """Re-run the paper's tables (MNIST, POS tagging, parsing), Figure 4, meSimp and the authors' README
    table; print and write paper vs ours (REPORT.md or README-TABLE.md, CSV, PNG)."""
    from .config import TASK_DATASETS
    from .reproduce import EWT_TASKS, README_TABLE, default_task, readme_table, reproduce, tables_for

    task = task or default_task(dataset)
    dataset = dataset or TASK_DATASETS[task][0]  # sample for mnist, ewt for pos and parsing
    if dataset not in TASK_DATASETS[task]:
        _fail(f"--dataset: task {task} runs on {' or '.join(TASK_DATASETS[task])}, got {dataset}")
    tables = tables_for(task)
    chosen = [part.strip() for part in table.split(",") if part.strip()]
    if "all" in chosen:
        chosen = [name for name in tables if task in EWT_TASKS or name != README_TABLE]
    unknown = [part for part in chosen if part not in tables]
    if unknown or not chosen:
        _fail(f"--table: with --task {task} expected {', '.join(tables)} or all (comma-separated), got {table!r}")
    whole_readme = task == "mnist" and README_TABLE in chosen
    if whole_readme and len(chosen) > 1:
        _fail(f"--table: {README_TABLE} (the README table over the three tasks) goes alone, got {table!r}")
    if whole_readme:
        out_dir = Path(out) if out else Path("results") / ("reproduce-readme-quick" if quick else "")
    else:
        folder = f"reproduce-{dataset}" if task == "mnist" else f"reproduce-{task}-{dataset}"
        out_dir = Path(out) if out else Path("results") / f"{folder}{'-quick' if quick else ''}"
    command = "meprop " + " ".join(sys.argv[1:]) if sys.argv[1:] else "meprop reproduce"
    try:
        executor = make_executor(executor_name, address, cpus_per_run, gpus_per_run, threads)
        with (executor if not report_only else LocalExecutor()) as running, stop_on_signals() as should_stop:
            if whole_readme:
                report = readme_table(dataset, data_dir, seeds, epochs, quick, out_dir, command, threads,
                                      should_stop=should_stop, report_only=report_only, executor=running)
            else:
                report = reproduce(chosen, dataset, data_dir, seeds, epochs, quick, out_dir, command, threads,
                                   should_stop=should_stop, fig4_seeds=fig4_seeds, fig4_epochs=fig4_epochs,
                                   report_only=report_only, executor=running, task=task)
    except MePropError as error:
        _fail(error)
    except (RunInterrupted, KeyboardInterrupt):
        where = "each task's folder under " + str(out_dir) if whole_readme else str(out_dir / "runs")
        click.echo(f"interrupted: finished runs are in {where}; run the same command again to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except WorkerLost as error:
        _fail(error, EXIT_RUN_FAILED)
    beside = "" if whole_readme else " (tables as CSV beside it" + (", and the Figure 4 plots)" if "fig4" in chosen else ")")
    click.echo(f"\nwrote {report}{beside}")


@main.command("export")
@click.option("--run", "run_dir", required=True, metavar="DIR",
              help="A run folder (the --out of train/sweep, or a reproduction's runs/ folder).")
@click.option("--key", metavar="KEY", help="Which run, when the folder holds several (a key or its prefix).")
@click.option("--out", "out", required=True, metavar="FILE", help="Where to write the compact model (.pt).")
@click.option("--threads", type=click.IntRange(min=1), help="torch threads for the inference timing.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed passes over the test set per model (median reported).")
def export_command(run_dir: str, key: str | None, out: str, threads: int | None, repeats: int) -> None:
    """Write a run's best-dev model as plain nn.Linear layers of its (meSimp-reduced) sizes; check and time it."""
    from .export import export_run

    try:
        summary = export_run(Path(run_dir), Path(out), key, repeats, threads)
    except MePropError as error:
        _fail(error)
    click.echo(f"wrote {summary.path}: layer sizes {summary.sizes} (full size {summary.full_sizes})\n"
               f"test-set predictions ({summary.test_examples} examples): compact = trained model: "
               f"{'identical' if summary.predictions_equal else 'DIFFERENT'}; full-size masked = trained model: "
               f"{'identical' if summary.full_predictions_equal else 'DIFFERENT'}\n"
               f"inference over the test set, median of {repeats}, {summary.threads} threads: compact "
               f"{summary.compact_ms:.2f} ms, full-size {summary.full_ms:.2f} ms ({summary.speedup:.2f}x)\n"
               f"load it with plain torch: torch.load({str(summary.path)!r}, weights_only=False)['model']")
    if not (summary.predictions_equal and summary.full_predictions_equal):
        sys.exit(EXIT_RUN_FAILED)
