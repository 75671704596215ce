"""The authors' implementation details as options: each changes exactly what it says, and nothing else."""

import math

import pytest
import torch
from click.testing import CliRunner
from test_layers import dense_grads, make_inputs, reference_mask
from test_sparse import backend  # noqa: F401  (fixture: compiled kernels and the PyTorch fallback)

from mnist_meprop import meprop_linear
from mnist_meprop.cli import main
from mnist_meprop.config import PRESETS, Config, load_config, validate
from mnist_meprop.errors import ConfigError
from mnist_meprop.model import build_model
from mnist_meprop.optim import build_optimizer
from mnist_meprop.store import run_key
from mnist_meprop.task import MNIST
from mnist_meprop.train import part_ends, train_run

NEW_KEYS = ("init", "loss_reduction", "grad_clip", "bias_grad", "adagrad_eps", "evals_per_epoch")


def quiet(_line: str) -> None:
    pass


# --- config --------------------------------------------------------------------------------------------

def test_defaults_are_plain_pytorch_and_keep_old_run_keys():
    config = Config()
    assert (config.init, config.loss_reduction, config.grad_clip, config.bias_grad, config.adagrad_eps,
            config.evals_per_epoch, config.preset) == ("torch", "mean", None, "masked", "outside", 1, None)
    # A key from before these options existed (the default Table 1 Adam run on the sample, with
    # the dense update that was the default then).
    assert run_key(Config(sparse_update="dense")) == "44136fa355b3678a"


def test_preset_sets_the_authors_values_and_explicit_keys_win():
    csharp = validate({"preset": "authors-csharp"})
    assert (csharp.init, csharp.loss_reduction, csharp.grad_clip, csharp.bias_grad, csharp.adagrad_eps,
            csharp.evals_per_epoch) == ("authors-csharp", "sum", 5.0, "full", "inside", 8)
    pytorch = validate({"preset": "authors-pytorch"})
    assert (pytorch.init, pytorch.loss_reduction, pytorch.grad_clip, pytorch.bias_grad) == (
        "authors-pytorch", "mean", None, "full")
    assert validate({"preset": "authors-csharp", "grad_clip": None, "evals_per_epoch": 1}).grad_clip is None
    assert load_config(None, ["preset=authors-csharp", "init=torch"]).init == "torch"
    assert Config().replace(preset="authors-csharp").loss_reduction == "sum"
    assert set(PRESETS["authors-csharp"]) == set(NEW_KEYS)


def test_run_keys_tell_the_options_apart_but_not_the_preset_label():
    keys = {run_key(validate({key: value})) for key, value in [
        ("init", "authors-csharp"), ("init", "authors-pytorch"), ("loss_reduction", "sum"), ("grad_clip", 5.0),
        ("bias_grad", "full"), ("adagrad_eps", "inside"), ("evals_per_epoch", 8)]}
    assert len(keys) == 7 and run_key(Config()) not in keys
    explicit = validate({**PRESETS["authors-csharp"]})
    assert run_key(explicit) == run_key(validate({"preset": "authors-csharp"}))
    assert validate({"preset": "authors-csharp"}).to_dict()["grad_clip"] == 5.0  # recorded resolved


@pytest.mark.parametrize("key, value, message", [
    ("init", "xavier", "init: must be one of torch, authors-csharp, authors-pytorch"),
    ("loss_reduction", "avg", "loss_reduction: must be one of mean, sum"),
    ("grad_clip", 0, "grad_clip: must be > 0"),
    ("grad_clip", "five", "grad_clip: expected float"),
    ("bias_grad", "dense", "bias_grad: must be one of masked, full"),
    ("adagrad_eps", "under", "adagrad_eps: must be one of outside, inside"),
    ("evals_per_epoch", 0, "evals_per_epoch: must be >= 1"),
    ("evals_per_epoch", 2.5, "evals_per_epoch: expected int"),
    ("preset", "authors", "preset: must be one of authors-csharp, authors-pytorch"),
])
def test_bad_values_name_the_key_and_the_allowed_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        validate({key: value})


@pytest.mark.parametrize("item", ["preset=authors", "init=xavier", "loss_reduction=avg", "grad_clip=-1",
                                  "bias_grad=dense", "adagrad_eps=under", "evals_per_epoch=0"])
def test_cli_bad_value_is_one_line_and_exit_2(tmp_path, item):
    result = CliRunner().invoke(main, ["train", "--set", item, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1 and item.split("=")[0] in result.stderr
    assert "Traceback" not in result.output


# --- init ----------------------------------------------------------------------------------------------

def test_csharp_init_is_normal_with_glorot_std_and_zero_bias():
    torch.manual_seed(0)
    model = build_model(validate({"init": "authors-csharp", "d_hidden": 400}), 784, 10)
    for layer, (fan_in, fan_out) in zip([model[0], model[2], model[4]], [(784, 400), (400, 400), (400, 10)]):
        std = math.sqrt(6.0 / (fan_in + fan_out))
        assert abs(layer.weight.std().item() / std - 1) < 0.05 and abs(layer.weight.mean().item()) < 0.01 * std
        assert layer.weight.abs().max().item() > 3 * std  # normal, not uniform(±std)
        assert torch.count_nonzero(layer.bias) == 0


def test_pytorch_authors_init_is_uniform_over_out_features():
    torch.manual_seed(0)
    model = build_model(validate({"init": "authors-pytorch", "d_hidden": 300}), 784, 10)
    for layer in (model[0], model[2], model[4]):
        bound = 1.0 / math.sqrt(layer.out_features)
        for tensor in (layer.weight, layer.bias):
            assert tensor.abs().max().item() <= bound
            assert tensor.abs().max().item() > 0.9 * bound
    # torch's own init depends on fan_in instead: the first layer's bound would be 1/sqrt(784)
    assert model[0].weight.abs().max().item() > 1.5 / math.sqrt(784)


# --- bias_grad -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("unified", [False, True])
def test_full_bias_grad_is_the_full_dy_and_the_rest_stays_masked(backend, unified, sparse_grad):
    x, weight, bias, dy = make_inputs((9, 12), d_out=16)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    meprop_linear(*leaves, k=3, unified=unified, sparse_grad=sparse_grad, bias_grad="full").backward(dy)
    want_x, want_w, _ = dense_grads(x, weight, bias, reference_mask(dy, 3, unified))
    torch.testing.assert_close(leaves[0].grad, want_x)
    got_w = leaves[1].grad.to_dense() if leaves[1].grad.is_sparse else leaves[1].grad
    torch.testing.assert_close(got_w, want_w)
    assert not leaves[2].grad.is_sparse
    torch.testing.assert_close(leaves[2].grad, dy.sum(dim=0))


# --- loss_reduction and grad_clip ----------------------------------------------------------------------

def one_step_grads(config, x, y):
    torch.manual_seed(3)
    model = build_model(config, x.shape[1], 10)
    optimizer = build_optimizer(config, model)
    MNIST.loss(model(x), y, config.loss_reduction).backward()
    return model, optimizer


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def test_summed_gradient_is_batch_size_times_the_mean_one():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.rand(10, 784, generator=generator), torch.randint(0, 10, (10,), generator=generator)
    base = {"d_hidden": 32, "k": 5, "init": "authors-csharp"}
    mean_model, _ = one_step_grads(validate(base), x, y)
    sum_model, _ = one_step_grads(validate({**base, "loss_reduction": "sum"}), x, y)
    for mean_param, sum_param in zip(mean_model.parameters(), sum_model.parameters()):
        torch.testing.assert_close(dense(sum_param.grad), 10 * dense(mean_param.grad))


def test_clip_acts_on_the_gradient_the_optimizer_sees():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 784, generator=generator), torch.randint(0, 10, (10,), generator=generator)
    config = validate({"d_hidden": 32, "k": 5, "optimizer": "sgd", "lr": 1.0, "loss_reduction": "sum",
                       "grad_clip": 0.01})
    model, optimizer = one_step_grads(config, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    grads = [dense(p.grad).clone() for p in model.parameters()]
    assert all(bool((grad.abs() > 0.01).any()) for grad in grads)  # the clip has work to do in every tensor
    optimizer.step()
    for param, old, grad in zip(model.parameters(), before, grads):
        torch.testing.assert_close(old - param.detach(), grad.clamp(-0.01, 0.01))


# --- adagrad_eps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparse_update", ["dense", "exact"])
def test_csharp_adagrad_step_is_lr_g_over_sqrt_of_g2_sum_plus_eps(backend, sparse_update):
    generator = torch.Generator().manual_seed(4)
    config = validate({"d_hidden": 32, "k": 5, "optimizer": "adagrad", "lr": 0.1, "adagrad_eps": "inside",
                       "sparse_update": sparse_update})
    torch.manual_seed(5)
    model = build_model(config, 20, 10)
    optimizer = build_optimizer(config, model)
    expected = [p.detach().clone().double() for p in model.parameters()]
    squares = [torch.zeros_like(p) for p in expected]
    for _ in range(4):
        x, y = torch.rand(10, 20, generator=generator), torch.randint(0, 10, (10,), generator=generator)
        MNIST.loss(model(x), y, "mean").backward()
        for index, param in enumerate(model.parameters()):
            g = dense(param.grad).double()
            squares[index] += g * g
            expected[index] -= 0.1 * g / torch.sqrt(squares[index] + 1e-6)
        optimizer.step()
        optimizer.zero_grad()
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_eps_placement_changes_the_adagrad_step_only_for_small_gradients():
    from mnist_meprop.optim import stock_optimizer
    outside = torch.nn.Parameter(torch.zeros(3))
    inside = torch.nn.Parameter(torch.zeros(3))
    grad = torch.tensor([1.0, 1e-3, 1e-6])
    for param, eps_inside in ((outside, False), (inside, True)):
        param.grad = grad.clone()
        stock_optimizer("adagrad", [param], 0.1, eps_inside).step()
    torch.testing.assert_close(outside.detach(), -0.1 * grad / (grad.abs() + 1e-6))
    torch.testing.assert_close(inside.detach(), -0.1 * grad / torch.sqrt(grad * grad + 1e-6))
    assert abs(inside[0].item() - outside[0].item()) < 1e-6 and abs(inside[2].item()) < 0.01 * abs(outside[2].item())


# --- evals_per_epoch -----------------------------------------------------------------------------------

TINY = dict(dataset="sample", dev_size=200, train_limit=600, test_limit=300, n_epoch=2, d_hidden=64,
            d_minibatch=20, k=8)


@pytest.fixture(scope="module")
def tiny_data():
    from mnist_meprop.data import load_data
    return load_data(validate(TINY))


def test_part_ends_cut_the_epoch_into_near_equal_parts():
    assert part_ends(30, 8) == [4, 8, 12, 15, 19, 23, 27, 30]
    assert part_ends(30, 1) == [30]
    assert part_ends(3, 8) == [1, 2, 3]


def test_several_evaluations_per_epoch_test_whenever_dev_improves(tiny_data):
    result = train_run(validate({**TINY, "evals_per_epoch": 5}), tiny_data, quiet)
    evals = [point for epoch in result.epochs for point in epoch["evals"]]
    assert [point["at"] for point in evals] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]
    best_so_far = float("-inf")
    for point in evals:
        improved = point["dev_acc"] > best_so_far
        assert (point["test_acc"] is not None) == improved
        best_so_far = max(best_so_far, point["dev_acc"])
    best = max(evals, key=lambda point: point["dev_acc"])  # the first of equal maxima
    assert result.best_epoch == best["at"] and result.test_acc == best["test_acc"]
    assert result.best_dev_acc == best_so_far
    # evaluating more often changes what is reported, never what is trained
    once = train_run(validate({**TINY, "evals_per_epoch": 1}), tiny_data, quiet)
    assert [e["train_loss"] for e in once.epochs] == [e["train_loss"] for e in result.epochs]
    assert [e["dev_acc"] for e in once.epochs] == [e["evals"][-1]["dev_acc"] for e in result.epochs]


def test_training_loss_is_recorded_per_eighth_of_an_epoch(tiny_data):
    result = train_run(validate({**TINY, "n_epoch": 1}), tiny_data, quiet)
    parts = result.epochs[0]["train_loss_parts"]
    assert len(parts) == 8
    # 30 steps of 20 examples cut at [4, 8, 12, 15, 19, 23, 27, 30]: the example-weighted mean is the epoch's
    weights = [4, 4, 4, 3, 4, 4, 4, 3]
    assert sum(w * p for w, p in zip(weights, parts)) / 30 == pytest.approx(result.epochs[0]["train_loss"])


def test_summed_loss_is_reported_per_example(tiny_data):
    mean = train_run(validate({**TINY, "n_epoch": 1, "optimizer": "sgd", "lr": 0.05}), tiny_data, quiet)
    summed = train_run(validate({**TINY, "n_epoch": 1, "optimizer": "sgd", "lr": 0.05 / 20,
                                 "loss_reduction": "sum"}), tiny_data, quiet)
    # SGD with lr/B on the summed loss is SGD with lr on the mean loss: the same training, the same report
    assert summed.epochs[0]["train_loss"] == pytest.approx(mean.epochs[0]["train_loss"], rel=1e-4)
    assert summed.epochs[0]["dev_acc"] == pytest.approx(mean.epochs[0]["dev_acc"], abs=0.6)


def test_preset_run_end_to_end_on_the_sample(tmp_path):
    result = CliRunner().invoke(main, ["train", "--set", "preset=authors-csharp", "--set", "n_epoch=1",
                                       "--set", "train_limit=500", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    import json
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])
    assert record["config"]["preset"] == "authors-csharp" and record["config"]["grad_clip"] == 5.0
    assert len(record["epochs"][0]["evals"]) == 8
