"""Experiment configuration: YAML plus ``key=value`` overrides, validated once into a ``Config``."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError
from .ops import BIAS_GRADS, is_meprop_active

TASKS = ("mnist", "pos", "parsing")  # see mnist_meprop.task
DATASETS = ("sample", "mnist", "fashion-mnist", "idx", "ewt")
ACTIVATIONS = ("relu", "cube")  # cube: Chen & Manning's parser (task parsing only)
TASK_DATASETS = {"mnist": ("sample", "mnist", "fashion-mnist", "idx"), "pos": ("ewt",), "parsing": ("ewt",)}
OPTIMIZERS = ("adam", "adagrad", "sgd")
SELECTIONS = ("topk", "random")
DEVICES = ("cpu", "cuda", "auto")
INITS = ("torch", "authors-csharp", "authors-pytorch")
LOSS_REDUCTIONS = ("mean", "sum")
ADAGRAD_EPS = ("outside", "inside")
SPARSE_UPDATES = ("exact", "lazy", "dense")  # see mnist_meprop.optim
ENGINES = ("auto", "autograd", "fused")  # see mnist_meprop.engine; auto: fused where it applies
# sparse_update was a bool before it had three values: true was the lazy update, false the dense one.
_LEGACY_SPARSE_UPDATE = {True: "lazy", False: "dense"}
# The authors' implementation details (see the README's "Configs"): each preset sets these keys;
# keys given explicitly in the same config override the preset's value.
PRESETS: dict[str, dict[str, Any]] = {
    # Their C# program (the paper's CPU experiments and meSimp).
    "authors-csharp": {"init": "authors-csharp", "loss_reduction": "sum", "grad_clip": 5.0, "bias_grad": "full",
                       "adagrad_eps": "inside", "evals_per_epoch": 8},
    # Their PyTorch code (the GPU experiments, Table 6).
    "authors-pytorch": {"init": "authors-pytorch", "loss_reduction": "mean", "grad_clip": None,
                        "bias_grad": "full", "adagrad_eps": "outside", "evals_per_epoch": 1},
}
# The paper's learning rates (Adam's defaults; AdaGrad 0.1 for MNIST); sgd has no paper value.
DEFAULT_LR = {"adam": 0.001, "adagrad": 0.1, "sgd": 0.1}


@dataclass(frozen=True)
class Simplify:
    """meSimp: prune hidden units that meProp rarely selects (the authors' released defaults)."""

    enabled: bool = False
    prune_rate: float = 0.1
    prunes_per_epoch: int = 8
    cycle_epochs: int = 5
    reset_optimizer: bool = True


@dataclass(frozen=True)
class Config:
    """One experiment. Field defaults are the paper's MNIST CPU setting (Table 1, Adam)."""

    name: str = "experiment"
    task: str = "mnist"
    dataset: str = "sample"
    data_dir: str | None = None
    dev_size: int = 5000
    train_limit: int | None = None
    test_limit: int | None = None
    n_epoch: int = 20
    d_hidden: int = 500
    n_layer: int = 3
    d_minibatch: int = 10
    k: int = 20
    # The output layer's k: null is the paper's setting for the task (dense for MNIST and POS,
    # the hidden layers' k for parsing); 0 makes it dense.
    output_k: int | None = None
    unified: bool = False
    selection: str = "topk"
    dropout: float = 0.0
    activation: str = "relu"
    optimizer: str = "adam"
    lr: float | None = None
    sparse_update: str = "exact"
    seed: int = 1
    threads: int | None = None
    device: str = "cpu"
    simplify: Simplify = Simplify()
    # The authors' implementation details; the defaults are plain PyTorch.
    preset: str | None = None  # a label: the keys below hold its resolved values
    init: str = "torch"
    loss_reduction: str = "mean"
    grad_clip: float | None = None
    bias_grad: str = "masked"
    adagrad_eps: str = "outside"
    evals_per_epoch: int = 1
    # How a training step runs: through autograd and the optimizer, or one fused C++ call;
    # `auto` (resolved when the config is validated) picks fused wherever it supports the settings.
    engine: str = "auto"
    # Flush denormal floats to zero while training (torch.set_flush_denormal): Adam's moments of
    # units that stop getting gradients decay into denormals, which the CPU computes with slowly.
    flush_denormal: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some keys changed; a new ``preset`` resets the keys it sets
        (unless they are among ``changes``)."""
        current = self.to_dict()
        if changes.get("preset") is not None:
            current = {key: value for key, value in current.items() if key not in PRESETS[str(changes["preset"])]}
        return validate({**current, **changes})


def _at_least(low: int | float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _one_of(choices: Iterable[str]) -> Callable[[Any], str | None]:
    choices = tuple(choices)
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _dropout_range(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "must be in [0, 1)"


# key -> (expected type, optional check); types marked optional accept null.
_RULES: dict[str, tuple[type, bool, Callable[[Any], str | None] | None]] = {
    "name": (str, False, None),
    "dataset": (str, False, _one_of(DATASETS)),
    "data_dir": (str, True, None),
    "dev_size": (int, False, _at_least(1)),
    "train_limit": (int, True, _at_least(1)),
    "test_limit": (int, True, _at_least(1)),
    "n_epoch": (int, False, _at_least(1)),
    "d_hidden": (int, False, _at_least(1)),
    "n_layer": (int, False, _at_least(1)),
    "d_minibatch": (int, False, _at_least(1)),
    "k": (int, False, _at_least(0)),
    "output_k": (int, True, _at_least(0)),
    "unified": (bool, False, None),
    "selection": (str, False, _one_of(SELECTIONS)),
    "dropout": (float, False, _dropout_range),
    "optimizer": (str, False, _one_of(OPTIMIZERS)),
    "lr": (float, True, lambda v: None if v > 0 else "must be > 0"),
    "sparse_update": (str, False, _one_of(SPARSE_UPDATES)),
    "seed": (int, False, _at_least(0)),
    "threads": (int, True, _at_least(1)),
    "device": (str, False, _one_of(DEVICES)),
    "simplify": (dict, False, None),
    "preset": (str, True, _one_of(PRESETS)),
    "init": (str, False, _one_of(INITS)),
    "loss_reduction": (str, False, _one_of(LOSS_REDUCTIONS)),
    "grad_clip": (float, True, lambda v: None if v > 0 else "must be > 0 (or null for no clipping)"),
    "bias_grad": (str, False, _one_of(BIAS_GRADS)),
    "adagrad_eps": (str, False, _one_of(ADAGRAD_EPS)),
    "evals_per_epoch": (int, False, _at_least(1)),
    "engine": (str, False, _one_of(ENGINES)),
    "task": (str, False, _one_of(TASKS)),
    "activation": (str, False, _one_of(ACTIVATIONS)),
    "flush_denormal": (bool, False, None),
}
assert set(_RULES) == {f.name for f in dataclasses.fields(Config)}

_SIMPLIFY_RULES: dict[str, tuple[type, bool, Callable[[Any], str | None] | None]] = {
    "enabled": (bool, False, None),
    "prune_rate": (float, False, lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1]"),
    "prunes_per_epoch": (int, False, _at_least(1)),
    "cycle_epochs": (int, False, _at_least(1)),
    "reset_optimizer": (bool, False, None),
}
assert set(_SIMPLIFY_RULES) == {f.name for f in dataclasses.fields(Simplify)}


_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(key: str, value: Any, rules: dict | None = None) -> Any:
    kind, optional, check = (rules or _RULES)[key.rpartition(".")[2]]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null (expected {kind.__name__})")
    is_bool = isinstance(value, bool)
    if kind is float and isinstance(value, int) and not is_bool:
        value = float(value)
    if kind is float and isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is the number that was meant
    if not isinstance(value, kind) or (kind is not bool and is_bool):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    if check is not None and (problem := check(value)) is not None:
        raise ConfigError(f"{key}: {problem}, got {value!r}")
    return value


def _unknown_key(key: str, valid: Iterable[str], prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key {prefix + str(key)!r}{hint}")


def _validate_simplify(value: dict[str, Any]) -> Simplify:
    fields = {}
    for key, item in value.items():
        if key not in _SIMPLIFY_RULES:
            raise _unknown_key(key, _SIMPLIFY_RULES, "simplify.")
        fields[key] = _check_value(f"simplify.{key}", item, _SIMPLIFY_RULES)
    return Simplify(**fields)


def validate(raw: dict[str, Any]) -> Config:
    """Check every key and value of ``raw`` and build the ``Config``; fills ``lr`` from the optimizer.

    A ``preset`` fills the keys it names that ``raw`` does not give.
    """
    if "preset" in raw and raw["preset"] is not None:
        preset = _check_value("preset", raw["preset"])
        raw = {**PRESETS[preset], **raw}
    if isinstance(raw.get("sparse_update"), bool):
        value = _LEGACY_SPARSE_UPDATE[raw["sparse_update"]]
        warnings.warn(f"sparse_update: {str(raw['sparse_update']).lower()} is deprecated, read as {value} "
                      f"(use one of {', '.join(SPARSE_UPDATES)})", FutureWarning, stacklevel=2)
        raw = {**raw, "sparse_update": value}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _RULES:
            raise _unknown_key(key, _RULES)
        if key == "simplify" and isinstance(value, Simplify):
            value = dataclasses.asdict(value)
        values[key] = _check_value(key, value)
    if "simplify" in values:
        values["simplify"] = _validate_simplify(values["simplify"])
    config = Config(**values)
    if config.dataset not in TASK_DATASETS[config.task]:
        raise ConfigError(f"dataset: task {config.task} takes {' or '.join(TASK_DATASETS[config.task])}, "
                          f"got {config.dataset!r}")
    if config.activation != "relu" and config.task != "parsing":
        raise ConfigError(f"activation: {config.activation} is for the parser (task parsing), not task {config.task}")
    if config.task == "pos" and config.output_k:
        raise ConfigError("output_k: the tagger's output layer stays dense (the paper), so task pos takes 0 or null")
    if config.task == "pos" and config.simplify.enabled:
        raise ConfigError("simplify.enabled: meSimp prunes MLP hidden units (task mnist or parsing), not the LSTM of task pos")
    if config.dataset == "idx" and not config.data_dir:
        raise ConfigError("data_dir: required when dataset is idx (a folder with the four IDX files)")
    if config.simplify.enabled and not (is_meprop_active(config.k, config.d_hidden) and config.n_layer >= 2):
        raise ConfigError(f"simplify.enabled: needs meProp hidden layers (0 < k < d_hidden and n_layer >= 2), "
                          f"got k={config.k}, d_hidden={config.d_hidden}, n_layer={config.n_layer}")
    if config.simplify.enabled and config.selection != "topk":
        raise ConfigError("simplify.enabled: needs selection topk (activeness is counted from the top-k sets)")
    if config.engine == "fused" and (unsupported := fused_engine_limits(config)):
        raise ConfigError(f"engine: fused does not support {unsupported} (use engine: autograd)")
    if config.engine == "auto":
        config = dataclasses.replace(config, engine=resolve_auto_engine(config))
    if config.lr is None:
        config = dataclasses.replace(config, lr=DEFAULT_LR[config.optimizer])
    return config


def resolve_auto_engine(config: Config) -> str:
    """``engine: auto``: ``fused`` where the fused engine supports the settings and the compiled
    kernels are not switched off (``MEPROP_KERNELS=torch``), else ``autograd``. The resolved value
    is what the run records (and its key hashes)."""
    kernels_off = os.environ.get("MEPROP_KERNELS", "auto").strip().lower() == "torch"
    return "autograd" if kernels_off or fused_engine_limits(config) else "fused"


def fused_engine_limits(config: Config) -> str | None:
    """What in ``config`` the fused engine cannot train (None when it can): it runs the paper's
    MLP on the CPU with Adam or AdaGrad and the exact row-sparse update, top-k selection and no
    dropout, gradient clip, full bias gradient or meSimp."""
    if config.task != "mnist":
        return f"task: {config.task} (needs mnist)"
    if config.optimizer not in ("adam", "adagrad"):
        return f"optimizer: {config.optimizer} (needs adam or adagrad)"
    needs = {"sparse_update": "exact", "selection": "topk", "dropout": 0.0, "grad_clip": None,
             "bias_grad": "masked", "device": "cpu"}
    for key, value in needs.items():
        if getattr(config, key) != value:
            return f"{key}: {getattr(config, key)} (needs {'null' if value is None else value})"
    if config.output_k:
        return f"output_k: {config.output_k} (needs a dense output layer: 0 or null)"
    if config.simplify.enabled:
        return "simplify.enabled: true"
    return None


def paper_output_k(config: Config) -> int:
    """The paper's k for the task's output layer: the hidden layers' ``k`` for the parser, dense (0) otherwise."""
    return config.k if config.task == "parsing" else 0


def output_layer_k(config: Config) -> int:
    """The output layer's k: ``output_k``, or the paper's setting for the task when it is null."""
    return paper_output_k(config) if config.output_k is None else config.output_k


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but probably not what was meant."""
    if config.k >= config.d_hidden:
        return [f"warning: k={config.k} >= d_hidden={config.d_hidden}: meProp is off, this is ordinary backprop"]
    return []


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)``, the value read as YAML (``20`` is an int, ``null`` is None)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def default_config_path() -> Path:
    """The bundled default config (``configs/sample.yaml`` in the repository)."""
    return Path(str(resources.files("mnist_meprop") / "bundled" / "sample.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; errors name the file (and the line, for bad YAML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot read ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (the bundled default when ``path`` is None), apply ``key=value`` overrides.

    The config's ``name`` defaults to the file's stem; it names the output folder.
    """
    path = Path(path) if path is not None else default_config_path()
    raw = {"name": path.stem, **read_yaml(path)}
    for item in overrides:
        key, value = parse_override(item)
        section, dot, sub = key.partition(".")
        if dot and section == "simplify":  # simplify.enabled=true
            current = raw.get("simplify")
            raw["simplify"] = {**(current if isinstance(current, dict) else {}), sub: value}
        else:
            raw[key] = value
    return validate(raw)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (a GPU when there is one) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but torch sees no GPU here (use cpu or auto)")
    return torch.device(name)
