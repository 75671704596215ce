"""The fused engine (``engine: fused``): one C++ call per step gives the autograd path's training."""

import copy

import pytest
import torch
from click.testing import CliRunner

from mnist_meprop.cli import main
from mnist_meprop.config import validate
from mnist_meprop.data import load_data
from mnist_meprop.engine import FusedMLPStep
from mnist_meprop.kernels import cpu_kernels
from mnist_meprop.model import build_mlp, build_model
from mnist_meprop.optim import build_optimizer
from mnist_meprop.train import train_run

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU kernels could not be built here")

SETTINGS = {"dense": dict(k=0), "per_example": dict(k=5), "unified": dict(k=5, unified=True),
            "sum": dict(k=5, loss_reduction="sum"), "adagrad_dense": dict(k=0, optimizer="adagrad"),
            "adagrad": dict(k=5, optimizer="adagrad"),
            "adagrad_unified_eps_inside": dict(k=5, unified=True, optimizer="adagrad", adagrad_eps="inside")}


def stock_reference_optimizer(config, params):
    """torch's own optimizer with the config's settings: Adam, or AdaGrad with eps outside the root
    (torch's formula) or inside it (the sum of squares starts at eps, as in the authors' C#)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    if config.adagrad_eps == "inside":
        return torch.optim.Adagrad(params, lr=config.lr, initial_accumulator_value=1e-6, eps=0.0)
    return torch.optim.Adagrad(params, lr=config.lr, eps=1e-6)


def batches(count, n=8, d_in=20, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, d_in, generator=generator), torch.randint(0, classes, (n,), generator=generator))
            for _ in range(count)]


def fused_and_model(overrides):
    config = validate({"d_hidden": 16, "n_layer": 3, "engine": "fused", "lr": 0.01, **overrides})
    torch.manual_seed(0)
    model = build_model(config, 20, 4)
    optimizer = build_optimizer(config, model)
    return config, model, optimizer, FusedMLPStep(config, model, optimizer)


@pytest.mark.parametrize("setting", SETTINGS)
def test_two_fused_steps_equal_the_stock_optimizer_on_the_masked_gradients(setting):
    """The independent reference: autograd's dense gradients of the masked dy (sparse_grad off)
    and torch's Adam or AdaGrad. Two steps: the second forward reads weights every row of which is current."""
    overrides = SETTINGS[setting]
    config, model, optimizer, fused = fused_and_model(overrides)
    reference = copy.deepcopy(model)
    for layer in reference:
        if hasattr(layer, "sparse_grad"):
            layer.sparse_grad = False
    stock = stock_reference_optimizer(config, reference.parameters())
    for x, y in batches(2):
        loss, logits, seconds = fused.step(x, y)
        want_logits = reference(x)
        want = torch.nn.functional.cross_entropy(want_logits, y, reduction=config.loss_reduction)
        want.backward()
        stock.step()
        stock.zero_grad()
        torch.testing.assert_close(logits, want_logits.detach())
        torch.testing.assert_close(loss, want.detach())
        assert set(seconds) == {"forward", "backward", "linear_backward", "update"}
        assert all(value >= 0 for value in seconds.values())
    optimizer.flush()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 10, 64, 65])
def test_the_fused_forward_at_the_paper_sizes_equals_the_layers(n):
    """At the paper's widths a small minibatch's forward is split between threads (one GEMM per
    thread on a part of the weight rows): the logits and loss must not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = validate({"d_hidden": 500, "n_layer": 3, "engine": "fused", "k": 20})
        torch.manual_seed(0)
        model = build_model(config, 784, 10)
        reference = copy.deepcopy(model)
        fused = FusedMLPStep(config, model, build_optimizer(config, model))
        x, y = torch.rand(n, 784), torch.randint(0, 10, (n,))
        loss, logits, _ = fused.step(x, y)
        with torch.no_grad():
            want = reference(x)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want, y))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("setting", SETTINGS)
def test_fused_steps_follow_the_autograd_path_with_the_exact_update(setting):
    overrides = SETTINGS[setting]
    _, model, optimizer, fused = fused_and_model(overrides)
    config = validate({"d_hidden": 16, "n_layer": 3, "lr": 0.01, **overrides})
    reference = copy.deepcopy(model)
    reference_optimizer = build_optimizer(config, reference)
    for x, y in batches(8):
        fused.step(x, y)
        torch.nn.functional.cross_entropy(reference(x), y, reduction=config.loss_reduction).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    optimizer.flush()
    reference_optimizer.flush()
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-4, atol=1e-5)


def test_a_fused_run_resumes_exactly_and_evaluation_does_not_change_it(tmp_path):
    raw = dict(dataset="sample", dev_size=200, train_limit=400, test_limit=200, n_epoch=2, d_hidden=48,
               d_minibatch=20, k=8, engine="fused")
    config = validate(raw)
    data = load_data(config)
    straight = train_run(config, data, lambda line: None)
    often = train_run(validate({**raw, "evals_per_epoch": 4}), data, lambda line: None)
    assert [e["train_loss"] for e in often.epochs] == [e["train_loss"] for e in straight.epochs]
    checkpoint = tmp_path / "run.pt"
    calls = []
    from mnist_meprop.train import RunInterrupted
    with pytest.raises(RunInterrupted):
        train_run(config, data, lambda line: None, checkpoint, lambda: calls.append(1) or len(calls) > 25)
    resumed = train_run(config, data, lambda line: None, checkpoint)
    assert [e["train_loss"] for e in resumed.epochs] == [e["train_loss"] for e in straight.epochs]
    assert resumed.test_acc == straight.test_acc
    assert straight.timings["linear_backward"] > 0 and straight.timings["update"] > 0
    # the same training as the autograd path, up to float rounding
    autograd = train_run(validate({**raw, "engine": "autograd"}), data, lambda line: None)
    for fused_epoch, autograd_epoch in zip(straight.epochs, autograd.epochs):
        assert fused_epoch["train_loss"] == pytest.approx(autograd_epoch["train_loss"], rel=1e-4)
    assert abs(straight.test_acc - autograd.test_acc) <= 1.0


def test_the_fused_engine_trains_only_what_it_supports():
    model = build_mlp(20, 4, 16, 3, k=5, dropout=0.1, sparse_grad=True)
    config = validate({"d_hidden": 16, "engine": "fused"})
    with pytest.raises(ValueError, match="ReLUs only"):
        FusedMLPStep(config, model, build_optimizer(config, model))
    result = CliRunner().invoke(main, ["train", "--set", "engine=fused", "--set", "optimizer=adam", "--set", "dropout=0.2"])
    assert result.exit_code == 2
    assert result.output.strip() == ("meprop: error: engine: fused does not support dropout: 0.2 (needs 0.0) "
                                     "(use engine: autograd)")

    result = CliRunner().invoke(main, ["train", "--set", "engine=fused", "--set", "optimizer=sgd"])
    assert result.exit_code == 2
    assert result.output.strip() == ("meprop: error: engine: fused does not support optimizer: sgd (needs adam or "
                                     "adagrad) (use engine: autograd)")


def test_a_fused_adagrad_run_equals_the_autograd_run():
    """AdaGrad has no idle steps and both paths use the same row kernel: a whole run through the
    harness (per-example meProp, evaluation, best-model choice) agrees to float rounding."""
    raw = dict(dataset="sample", dev_size=200, train_limit=600, test_limit=200, n_epoch=2, d_hidden=48,
               d_minibatch=10, k=8, optimizer="adagrad", lr=0.01)
    data = load_data(validate(raw))
    fused = train_run(validate({**raw, "engine": "fused"}), data, lambda line: None)
    autograd = train_run(validate({**raw, "engine": "autograd"}), data, lambda line: None)
    for fused_epoch, autograd_epoch in zip(fused.epochs, autograd.epochs, strict=True):
        assert fused_epoch["train_loss"] == pytest.approx(autograd_epoch["train_loss"], rel=1e-5)
    assert fused.test_acc == autograd.test_acc


def test_the_fused_step_follows_a_loaded_optimizer_state():
    """The step keeps its argument lists between steps: loading a state into the optimizer must
    still be what the next step trains from (the same as a fresh step object on that state)."""
    _, model, optimizer, fused = fused_and_model(SETTINGS["per_example"])
    data = batches(6)
    for x, y in data[:2]:
        fused.step(x, y)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    for x, y in data[2:4]:
        fused.step(x, y)
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(copy.deepcopy(saved_optimizer))  # torch loads state tensors without copying them
    after_load = [fused.step(x, y)[0] for x, y in data[2:4]]
    config, other_model, other_optimizer, other = fused_and_model(SETTINGS["per_example"])
    other_model.load_state_dict(saved_model)
    other_optimizer.load_state_dict(copy.deepcopy(saved_optimizer))
    fresh = [other.step(x, y)[0] for x, y in data[2:4]]
    torch.testing.assert_close(torch.stack(after_load), torch.stack(fresh), rtol=0, atol=0)
