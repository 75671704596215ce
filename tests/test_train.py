"""The training harness: seeding, dev/test bookkeeping, timers, and that it really learns."""

import dataclasses

import pytest
import torch
from torch import nn

from mnist_meprop.config import Config
from mnist_meprop.data import load_data
from mnist_meprop.layers import MePropLinear
from mnist_meprop.model import build_mlp
from mnist_meprop.task import MNIST
from mnist_meprop.train import PHASES, method_name, train_run

TINY = dict(dataset="sample", dev_size=200, train_limit=600, test_limit=300, n_epoch=3, d_hidden=64,
            d_minibatch=20, lr=0.001)


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(Config(**TINY))


def quiet(_line):
    pass


def test_mlp_structure():
    model = build_mlp(784, 10, d_hidden=32, n_layer=4, k=5, unified=True, dropout=0.2)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 32), (32, 32), (32, 10)]
    assert all(isinstance(m, MePropLinear) for m in linears)
    assert [m.k for m in linears] == [5, 5, 5, 0]
    assert [m.unified for m in linears[:3]] == [True] * 3
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["MePropLinear", "ReLU", "Dropout"] * 3 + ["MePropLinear"]
    assert [type(m).__name__ for m in build_mlp(784, 10, 32, 1, k=5)] == ["MePropLinear"]


def test_method_names():
    assert method_name(Config(k=0)) == "dense"
    assert method_name(Config(k=500, d_hidden=500)) == "dense"
    assert method_name(Config(k=20)) == "meProp per-example top-k"
    assert method_name(Config(k=20, unified=True, selection="random")) == "meProp unified random-k"


def test_run_records_epochs_and_reports_test_at_best_dev(tiny_data):
    result = train_run(Config(**TINY, k=8), tiny_data, quiet)
    assert [e["epoch"] for e in result.epochs] == [1, 2, 3]
    best = max(result.epochs, key=lambda e: e["dev_acc"])
    assert result.best_dev_acc == best["dev_acc"]
    assert result.best_epoch == next(e["epoch"] for e in result.epochs if e["dev_acc"] == best["dev_acc"])
    assert result.test_acc == result.epochs[result.best_epoch - 1]["test_acc"]
    for epoch in result.epochs:
        improved = epoch["dev_acc"] > max([e["dev_acc"] for e in result.epochs[:epoch["epoch"] - 1]], default=-1)
        assert (epoch["test_acc"] is not None) == improved
    assert set(result.timings) == set(PHASES)
    timings = result.timings
    assert 0 < timings["linear_backward"] < timings["backward"]
    assert timings["train"] == pytest.approx(timings["forward"] + timings["backward"] + timings["update"])
    assert timings["train"] + timings["eval"] <= timings["total"]


def test_same_seed_same_run_and_dense_k_values_agree(tiny_data):
    dense = train_run(Config(**TINY, k=0, seed=4), tiny_data, quiet)
    off_range = train_run(Config(**TINY, k=64, seed=4), tiny_data, quiet)
    assert [e["train_loss"] for e in dense.epochs] == [e["train_loss"] for e in off_range.epochs]
    other_seed = train_run(Config(**TINY, k=0, seed=5), tiny_data, quiet)
    assert [e["train_loss"] for e in dense.epochs] != [e["train_loss"] for e in other_seed.epochs]


def test_sweep_runs_share_their_initial_weights(tiny_data):
    first_weights = []

    def spy(config, data):
        model = MNIST.build_model(config, data)
        first_weights.append(model[0].weight.detach().clone())
        return model

    task = dataclasses.replace(MNIST, build_model=spy)
    for k in (0, 8):
        train_run(Config(**{**TINY, "n_epoch": 1}, k=k), tiny_data, quiet, task=task)
    assert torch.equal(first_weights[0], first_weights[1])


@pytest.mark.parametrize("optimizer, lr, unified, k", [("adam", 0.001, False, 0), ("adagrad", 0.1, False, 10),
                                                      ("sgd", 0.5, True, 16), ("adam", 0.001, True, 16)])
def test_it_learns(tiny_data, optimizer, lr, unified, k):
    config = Config(**{**TINY, "lr": lr, "n_epoch": 5}, optimizer=optimizer, unified=unified, k=k)
    result = train_run(config, tiny_data, quiet)
    assert result.test_acc > 70.0, [round(e["dev_acc"], 1) for e in result.epochs]
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_progress_line_per_epoch(tiny_data):
    lines = []
    train_run(Config(**TINY, k=8), tiny_data, lines.append)
    assert len(lines) == 3
    assert lines[0].strip().startswith("epoch 1/3") and "dev" in lines[0]


def test_flush_denormal_holds_during_the_run_and_is_restored_after():
    from mnist_meprop.config import validate
    from mnist_meprop.data import load_data
    from mnist_meprop.kernels import flushes_denormals
    from mnist_meprop.train import train_run
    raw = dict(dataset="sample", dev_size=100, train_limit=100, test_limit=100, n_epoch=2, d_hidden=16,
               d_minibatch=20, k=4)
    data = load_data(validate(raw))
    seen = []
    assert not flushes_denormals()
    train_run(validate({**raw, "flush_denormal": True}), data, lambda line: seen.append(flushes_denormals()))
    assert seen == [True, True] and not flushes_denormals()
    train_run(validate(raw), data, lambda line: seen.append(flushes_denormals()))
    assert seen[2:] == [False, False]
