"""The ``meprop`` command line: a thin shell over :mod:`mnist_meprop.runner` and :mod:`mnist_meprop.results`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from .config import Config, load_config
from .errors import ConfigError, MePropError
from .results import environment, format_table, summarize, write_tables
from .runner import run_experiments, sweep_configs


def _fail(message: object) -> None:
    click.echo(f"meprop: error: {message}", err=True)
    sys.exit(2)


def parse_int_list(option: str, text: str) -> list[int]:
    """``"0,10,20"`` -> ``[0, 10, 20]``; a one-line error naming the option otherwise."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option}: expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option}: expected at least one value")
    return values


def _heading(config: Config) -> str:
    env = environment()
    return (f"## {config.name}: {config.dataset}, MLP {config.n_layer} layers, hidden {config.d_hidden}, "
            f"minibatch {config.d_minibatch}, {config.optimizer} lr {config.lr:g}, dropout {config.dropout:g}, "
            f"{config.n_epoch} epochs; torch {env['torch']}, {env['threads']} threads, {env['cpu']}")


def _run_and_report(configs: Sequence[Config], out: str | None) -> None:
    out_dir = Path(out) if out else Path("results") / configs[0].name
    records = run_experiments(configs, out_dir)
    rows = summarize(records)
    heading = _heading(configs[0])
    click.echo(f"{heading}\n\n{format_table(rows)}")
    write_tables(out_dir, rows, heading)
    click.echo(f"\nwrote {out_dir / 'runs.jsonl'}, {out_dir / 'table.md'}, {out_dir / 'table.csv'}", err=True)


_config_option = click.option("--config", "config_path", metavar="FILE",
                              help="YAML config (default: the bundled configs/sample.yaml).")
_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                           help="Override a config key; repeatable, e.g. --set n_epoch=1.")
_out_option = click.option("--out", metavar="DIR", help="Output folder (default: results/<config name>/).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mnist-meprop")
def main() -> None:
    """meProp: train MLPs whose hidden layers back-propagate only the top-k gradient entries."""


@main.command()
@_config_option
@_set_option
@_out_option
def train(config_path: str | None, overrides: tuple[str, ...], out: str | None) -> None:
    """Train one config and print its table."""
    try:
        _run_and_report([load_config(config_path, overrides)], out)
    except MePropError as error:
        _fail(error)


@main.command()
@_config_option
@click.option("--k", "k_list", required=True, metavar="K,K,...", help="k values; 0 is the dense baseline.")
@click.option("--seeds", metavar="S,S,...", help="Seeds (default: the config's seed).")
@_set_option
@_out_option
def sweep(config_path: str | None, k_list: str, seeds: str | None, overrides: tuple[str, ...],
          out: str | None) -> None:
    """Train the config once per k (and seed) and print the comparison table."""
    try:
        base = load_config(config_path, overrides)
        ks = parse_int_list("--k", k_list)
        seed_list = parse_int_list("--seeds", seeds) if seeds else [base.seed]
        _run_and_report(sweep_configs(base, ks, seed_list), out)
    except MePropError as error:
        _fail(error)
