"""meSimp: activeness counts, pruning that removes units for real, the schedule, resume and export."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mnist_meprop.cli import main
from mnist_meprop.config import Config, Simplify
from mnist_meprop.data import load_data
from mnist_meprop.layers import MePropLinear
from mnist_meprop.model import build_mlp
from mnist_meprop.ops import TopkCounter
from mnist_meprop.optim import build_optimizer
from mnist_meprop.simplify import Simplifier, linear_layers, remove_units
from mnist_meprop.train import EPOCH_TIME_KEYS, RunInterrupted, train_run

TINY = dict(dataset="sample", dev_size=200, train_limit=600, test_limit=300, n_epoch=4, d_hidden=64,
            d_minibatch=20, k=16, optimizer="adam", lr=0.001)
SIMPLIFY = Simplify(enabled=True, prune_rate=0.1, prunes_per_epoch=4, cycle_epochs=2)


def quiet(_line):
    pass


def reference_counts(dy, k, unified):
    """Independent count: per row, which columns of |dy| are among the k largest."""
    scores = dy.abs().sum(0, keepdim=True).expand_as(dy) if unified else dy.abs()
    chosen = torch.zeros_like(dy, dtype=torch.float64)
    chosen.scatter_(1, scores.argsort(dim=1, descending=True)[:, :k], 1.0)
    return chosen.sum(0)


@pytest.mark.parametrize("unified", [False, True])
def test_counter_records_each_examples_selected_units(unified):
    torch.manual_seed(0)
    layer = MePropLinear(12, 30, k=7, unified=unified)
    layer.counter = TopkCounter(30)
    x = torch.randn(9, 12)
    y = layer(x)
    y.retain_grad()
    (y.sin() * torch.randn(9, 30)).sum().backward()
    assert layer.counter.examples == 9
    assert torch.equal(layer.counter.counts, reference_counts(y.grad, 7, unified))


def test_a_dense_layer_counts_every_unit_and_eval_counts_nothing():
    layer = MePropLinear(5, 8, k=8)
    layer.counter = TopkCounter(8)
    layer(torch.randn(4, 5)).sum().backward()
    assert torch.equal(layer.counter.counts, torch.full((8,), 4.0, dtype=torch.float64))
    layer.eval()
    layer(torch.randn(4, 5))
    assert layer.counter.examples == 4


def test_removing_units_equals_zeroing_them_and_keeps_their_optimizer_state():
    torch.manual_seed(1)
    config = Config(**{**TINY, "d_hidden": 10, "k": 4})
    model = build_mlp(6, 3, 10, 3, 4)
    optimizer = build_optimizer(config, model)
    x = torch.randn(5, 6)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    optimizer.step()
    optimizer.zero_grad()
    keep = torch.tensor([0, 2, 3, 7, 9])
    masked = build_mlp(6, 3, 10, 3, 4)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        dropped = torch.ones(10, dtype=torch.bool)
        dropped[keep] = False
        masked[0].weight[dropped] = 0
        masked[0].bias[dropped] = 0
    first = linear_layers(model)[0]
    old_avg = next(o for o in optimizer.optimizers if first.weight in o.state).state[first.weight]["exp_avg"].clone()
    remove_units(model, 0, keep, optimizer)
    assert model[0].weight.shape == (5, 6) and model[2].weight.shape == (10, 5)
    assert torch.allclose(model(x), masked(x), atol=1e-6)
    state = next(o for o in optimizer.optimizers if model[0].weight in o.state).state[model[0].weight]
    assert torch.equal(state["exp_avg"], old_avg[keep])
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1])).backward()
    optimizer.step()  # the optimizer trains the new, smaller parameters
    assert all(p.grad is not None for p in model.parameters())


def test_prune_masks_units_below_the_rate_and_never_empties_a_layer():
    model = build_mlp(6, 3, 10, 3, 4)
    optimizer = build_optimizer(Config(**{**TINY, "d_hidden": 10, "k": 4}), model)
    simplifier = Simplifier(model, SIMPLIFY, steps_per_epoch=8)
    simplifier.start_epoch(1)
    first, second = simplifier.hidden
    first.counter.counts = torch.tensor([0, 5, 9, 10, 11, 40, 0, 100, 3, 10], dtype=torch.float64)
    first.counter.examples = 100  # threshold 10: keep units 3, 4, 5, 7, 9
    second.counter.examples = 100  # nothing reached the threshold: keep the most selected
    second.counter.counts[6] = 2
    assert simplifier.after_step(1, 1, optimizer) is None  # not a prune point (every 2 steps)
    assert simplifier.after_step(1, 2, optimizer) == [5, 1]
    assert simplifier.units[0].tolist() == [3, 4, 5, 7, 9] and simplifier.units[1].tolist() == [6]
    assert first.counter.examples == 0 and len(first.counter.counts) == 5


def test_cycles_alternate_simplifying_and_plain_training():
    simplifier = Simplifier(build_mlp(6, 3, 10, 3, 4), SIMPLIFY, steps_per_epoch=8)
    pattern = []
    for epoch in range(1, 8):
        simplifier.start_epoch(epoch)
        pattern.append(simplifier.simplifying)
    assert pattern == [True, True, False, False, True, True, False]
    assert [simplifier.starts_cycle(e) for e in (1, 2, 3, 4, 5)] == [True, False, True, False, True]


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(Config(**TINY))


@pytest.mark.parametrize("unified", [False, True])
def test_mesimp_run_shrinks_every_hidden_layer_and_resumes_exactly(tiny_data, tmp_path, unified):
    config = Config(**{**TINY, "unified": unified, "simplify": SIMPLIFY, "n_layer": 4})
    whole = train_run(config, tiny_data, quiet)
    assert all(units < config.d_hidden for units in whole.units)
    assert whole.prunes and whole.epochs[-1]["units"] == whole.units
    checkpoint = tmp_path / "run.pt"
    calls = []
    with pytest.raises(RunInterrupted):  # stop in epoch 2, after prunes and an optimizer reset are due
        train_run(config, tiny_data, quiet, checkpoint, lambda: calls.append(1) or len(calls) > 40)
    resumed = train_run(config, tiny_data, quiet, checkpoint)
    strip = lambda r: [{k: v for k, v in e.items() if k not in EPOCH_TIME_KEYS} for e in r.epochs]  # noqa: E731
    assert strip(resumed) == strip(whole) and resumed.units == whole.units and resumed.prunes == whole.prunes


def test_export_writes_a_smaller_plain_torch_model_with_identical_predictions(tmp_path):
    out = tmp_path / "run"
    settings = [f"{key}={value}" for key, value in TINY.items()] + [
        "simplify.enabled=true", "simplify.cycle_epochs=2", "simplify.prunes_per_epoch=4"]
    result = CliRunner().invoke(main, ["train", "--out", str(out)] + [arg for s in settings for arg in ("--set", s)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    units = record["simplify"]["units_at_best"]
    assert all(u < TINY["d_hidden"] for u in units)
    exported = CliRunner().invoke(main, ["export", "--run", str(out), "--out", str(tmp_path / "small.pt"),
                                         "--repeats", "2"])
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.count("identical") == 2 and "ms" in exported.stdout
    saved = torch.load(tmp_path / "small.pt", weights_only=False)
    model = saved["model"]
    assert all(type(m) in (torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Sequential)
               for m in model.modules())
    assert saved["sizes"][1:-1] == units
    data = load_data(Config(**TINY))
    with torch.no_grad():
        accuracy = 100.0 * int((model(data.test_x).argmax(1) == data.test_y).sum()) / len(data.test_y)
    assert accuracy == pytest.approx(record["test_acc"], abs=1e-9)  # the reported test accuracy, reproduced
    missing = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "none"), "--out", "x.pt"])
    assert missing.exit_code == 2 and "no finished runs" in missing.stderr
