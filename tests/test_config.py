"""Configs load into a validated ``Config``; bad values are one-line errors naming the key."""

from pathlib import Path

import pytest

from mnist_meprop.config import Config, default_config_path, load_config, validate
from mnist_meprop.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_default_config_is_the_repository_sample():
    default = load_config()
    assert default == load_config(CONFIGS / "sample.yaml")
    assert default.name == "sample" and default.dataset == "sample"
    assert default_config_path().is_file()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config.lr > 0


def test_paper_configs_have_the_paper_settings():
    adam = load_config(CONFIGS / "mnist-adam.yaml")
    assert (adam.d_minibatch, adam.k, adam.unified, adam.n_epoch, adam.optimizer) == (10, 20, False, 20, "adam")
    assert (adam.d_hidden, adam.n_layer, adam.dev_size) == (500, 3, 5000)
    unified = load_config(CONFIGS / "mnist-unified.yaml")
    assert (unified.d_minibatch, unified.k, unified.unified, unified.dropout, unified.n_epoch) == (50, 30, True, 0.1, 20)
    fashion = load_config(CONFIGS / "fashion-mnist.yaml")
    assert fashion.dataset == "idx" and fashion.data_dir == "/usr/share/datasets/fashion-mnist"


def test_overrides_are_parsed_as_yaml_values():
    config = load_config(None, ["n_epoch=3", "unified=true", "dropout=0.25", "threads=null", "name=x"])
    assert (config.n_epoch, config.unified, config.dropout, config.threads, config.name) == (3, True, 0.25, None, "x")


def test_exponent_numbers_without_a_dot_are_floats():
    # YAML 1.1 reads 1e-3 as a string; for a float key it is the number
    assert load_config(None, ["lr=1e-3"]).lr == 0.001
    assert load_config(None, ["grad_clip=5E0"]).grad_clip == 5.0
    with pytest.raises(ConfigError, match="lr: expected float"):
        load_config(None, ["lr=fast"])


def test_lr_defaults_to_the_paper_value_of_the_optimizer():
    assert validate({"optimizer": "adagrad"}).lr == 0.1
    assert validate({"optimizer": "adam"}).lr == 0.001
    assert validate({"optimizer": "sgd", "lr": 0.5}).lr == 0.5


@pytest.mark.parametrize("raw, message", [
    ({"n_epochs": 3}, "unknown key 'n_epochs' (did you mean n_epoch?)"),
    ({"k": "20"}, "k: expected int"),
    ({"k": 2.5}, "k: expected int"),
    ({"unified": 1}, "unified: expected bool"),
    ({"n_layer": True}, "n_layer: expected int"),
    ({"k": -1}, "k: must be >= 0"),
    ({"dropout": 1.0}, "dropout: must be in [0, 1)"),
    ({"optimizer": "rmsprop"}, "optimizer: must be one of adam, adagrad, sgd"),
    ({"dataset": "cifar"}, "dataset: must be one of sample, mnist, fashion-mnist, idx"),
    ({"selection": "bottom"}, "selection: must be one of topk, random"),
    ({"lr": 0}, "lr: must be > 0"),
    ({"d_hidden": None}, "d_hidden: must not be null"),
    ({"dataset": "idx"}, "data_dir: required when dataset is idx"),
])
def test_bad_values_name_the_key_and_what_is_allowed(raw, message):
    with pytest.raises(ConfigError) as error:
        validate(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("n_epoch: 3\nk: [1,\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["n_epoch"])


def test_replace_validates():
    with pytest.raises(ConfigError, match="k: must be >= 0"):
        Config().replace(k=-3)


@pytest.mark.parametrize("raw, message", [
    ({"simplify": True}, "simplify: expected dict, got True"),
    ({"simplify": {"enable": True}}, "unknown key 'simplify.enable' (did you mean simplify.enabled?)"),
    ({"simplify": {"prune_rate": 0}}, "simplify.prune_rate: must be in (0, 1], got 0.0"),
    ({"simplify": {"cycle_epochs": 0}}, "simplify.cycle_epochs: must be >= 1, got 0"),
    ({"simplify": {"enabled": True}, "k": 0}, "simplify.enabled: needs meProp hidden layers"),
    ({"simplify": {"enabled": True}, "selection": "random"}, "simplify.enabled: needs selection topk"),
])
def test_bad_simplify_settings_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=None) as error:
        validate(raw)
    assert str(error.value).startswith(message)


def test_simplify_overrides_and_run_keys():
    from mnist_meprop.store import run_key

    config = load_config(None, ["simplify.enabled=true", "simplify.prune_rate=0.2"])
    assert config.simplify.enabled and config.simplify.prune_rate == 0.2 and config.simplify.cycle_epochs == 5
    plain = load_config(None)
    assert run_key(plain) == run_key(plain.replace(simplify={})), "the default simplify block must not change keys"
    assert run_key(config) != run_key(plain)
    mesimp = load_config(Path(__file__).parents[1] / "configs" / "mesimp.yaml")
    assert (mesimp.d_hidden, mesimp.k, mesimp.d_minibatch, mesimp.n_epoch, mesimp.optimizer) == (500, 160, 100, 20, "adam")
    assert mesimp.simplify.enabled


@pytest.mark.parametrize("raw,engine", [
    ({}, "fused"),  # Adam, exact update, no dropout: the fused engine applies
    ({"optimizer": "adagrad", "k": 10}, "fused"),
    ({"dropout": 0.2}, "autograd"),
    ({"sparse_update": "dense"}, "autograd"),  # the paper's table specs: their runs keep their keys
    ({"optimizer": "sgd"}, "autograd"),
    ({"engine": "autograd"}, "autograd"),
])
def test_engine_auto_resolves_when_the_config_is_validated(raw, engine, monkeypatch):
    monkeypatch.delenv("MEPROP_KERNELS", raising=False)
    assert validate(raw).engine == engine
    monkeypatch.setenv("MEPROP_KERNELS", "torch")  # kernels off: never fused unless asked for
    assert validate(raw).engine == "autograd"


def test_engine_auto_keeps_the_keys_of_autograd_runs():
    from mnist_meprop.store import run_key

    resolved = validate({"sparse_update": "dense"})
    assert resolved.engine == "autograd"
    assert run_key(resolved) == run_key(validate({"sparse_update": "dense", "engine": "autograd"}))
    assert run_key(validate({"engine": "fused"})) != run_key(validate({"engine": "autograd"}))
