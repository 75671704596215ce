"""Exact row-sparse Adam (``sparse_update: exact``): dense ``torch.optim.Adam``'s result, touching only
the rows with a gradient, with idle steps applied on the next touch or a flush."""

import io

import pytest
import torch
from click.testing import CliRunner
from test_sparse import backend  # noqa: F401  (fixture: compiled kernels and the PyTorch fallback)

from mnist_meprop.cli import main
from mnist_meprop.config import Config, validate
from mnist_meprop.model import build_mlp
from mnist_meprop.optim import RowSparseOptimizer, build_optimizer, exact_adam_horizon
from mnist_meprop.store import run_key

N_ROWS, WIDTH = 24, 5


def gradient_schedule(steps: int, seed: int = 0, width: int = WIDTH, zero_columns: tuple[int, ...] = ()):
    """Row-sparse gradients: each row has its own touch rate (from every step to about once in
    500 steps) and magnitude (1e-9 to 1, per element too); row 0 is idle for steps 200-1199 and
    row 1 is never touched after step 100; ``zero_columns`` never get a gradient (as weights of
    MNIST's border pixels). Yields (rows, values) per step."""
    generator = torch.Generator().manual_seed(seed)
    rate = torch.logspace(0, -2.7, N_ROWS)
    scale = torch.logspace(-9, 0, N_ROWS)[torch.randperm(N_ROWS, generator=generator)]
    for step in range(1, steps + 1):
        touched = torch.rand(N_ROWS, generator=generator) < rate
        touched[0] = not 200 <= step < 1200
        touched[1] = step <= 100
        rows = torch.nonzero(touched).flatten()
        if len(rows) == 0:
            rows = torch.tensor([2])
        element = 10 ** (-3 * torch.rand(len(rows), width, generator=generator))
        values = torch.randn(len(rows), width, generator=generator) * element * scale[rows, None]
        values[:, list(zero_columns)] = 0
        yield rows, values


def sparse_grad(rows, values, shape):
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values.reshape(len(rows), *shape[1:]), shape,
                                   check_invariants=True)


def run_pair(steps, lr=0.01, seed=0, adam_update="exact", width=WIDTH, zero_columns=()):
    """The row-sparse optimizer, its parameters (weight [N_ROWS, width], bias [N_ROWS]) and those of
    dense ``torch.optim.Adam`` after ``steps`` of the same gradients."""
    torch.manual_seed(seed)
    weight, bias = torch.randn(N_ROWS, width), torch.randn(N_ROWS)
    ours = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    theirs = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    exact = RowSparseOptimizer(ours, "adam", lr=lr, adam_update=adam_update)
    dense = torch.optim.Adam(theirs, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    for rows, values in gradient_schedule(steps, seed, width, zero_columns):
        ours[0].grad = sparse_grad(rows, values, weight.shape)
        ours[1].grad = sparse_grad(rows, values[:, 0], bias.shape)
        exact.step()
        theirs[0].grad = ours[0].grad.to_dense()
        theirs[1].grad = ours[1].grad.to_dense()
        dense.step()
    return exact, ours, theirs


def test_exact_adam_equals_dense_adam_over_2000_steps_with_long_idle_rows(backend):
    exact, ours, theirs = run_pair(2000)
    state = exact.state[ours[0]]
    assert int(state["last_step"].min()) < 2000 - 500  # some rows really were idle for long
    exact.flush()
    assert bool((state["last_step"] == 2000).all())
    for got, want in zip(ours, theirs):
        assert float((got - want).detach().abs().max()) <= 1e-5 * float(want.detach().abs().max())
    # the idle steps matter: without them (the lazy update) the same comparison fails
    _, lazy, theirs = run_pair(2000, adam_update="lazy")
    assert float((lazy[0] - theirs[0]).detach().abs().max()) > 100 * 1e-5 * float(theirs[0].detach().abs().max())


def test_exact_adam_with_columns_that_never_get_a_gradient(backend):
    """Weights whose input is always zero keep m = v = 0: they must not move (no 0 / 0 from the
    series), at a width that takes several vector blocks and a tail."""
    exact, ours, theirs = run_pair(600, width=37, zero_columns=(0, 1, 16, 36))
    exact.flush()
    assert bool(torch.isfinite(ours[0]).all())
    torch.testing.assert_close(ours[0].detach()[:, [0, 1, 16, 36]], theirs[0].detach()[:, [0, 1, 16, 36]], rtol=0,
                               atol=0)
    assert float((ours[0] - theirs[0]).detach().abs().max()) <= 1e-5 * float(theirs[0].detach().abs().max())


def test_exact_adam_moves_idle_rows_like_dense_adam_and_lazy_does_not(backend):
    """Row 1 gets its last gradient at step 100: dense Adam keeps moving it on its first moment."""
    exact, ours, theirs = run_pair(300)
    before_flush = ours[0].detach()[1].clone()
    exact.flush()
    moved = (ours[0].detach()[1] - before_flush).abs().max()
    assert float(moved) > 0  # the pending idle steps were applied by the flush
    torch.testing.assert_close(ours[0].detach()[1], theirs[0].detach()[1], rtol=0, atol=1e-6)


def test_exact_adam_resumes_exactly_from_a_saved_state(backend):
    exact, ours, _ = run_pair(1000)
    exact.flush()
    torch.manual_seed(0)
    weight, bias = torch.randn(N_ROWS, WIDTH), torch.randn(N_ROWS)
    straight = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    first = RowSparseOptimizer(straight, "adam", lr=0.01)
    resumed_params = None
    second = None
    for step, (rows, values) in enumerate(gradient_schedule(1000), start=1):
        if step == 600:  # checkpoint mid-run (with rows pending), reload into a fresh optimizer
            buffer = io.BytesIO()
            # the optimizer's state_dict flushes, so it comes before the raw parameters are read
            torch.save({"optim": first.state_dict(), "params": [p.detach().clone() for p in straight]}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer)
            resumed_params = [p.requires_grad_() for p in saved["params"]]
            second = RowSparseOptimizer(resumed_params, "adam", lr=0.01)
            second.load_state_dict(saved["optim"])
            assert second.state[resumed_params[0]]["last_step"].dtype == torch.long
        for params, optimizer in [(straight, first)] + ([(resumed_params, second)] if second else []):
            params[0].grad = sparse_grad(rows, values, weight.shape)
            params[1].grad = sparse_grad(rows, values[:, 0], bias.shape)
            optimizer.step()
    first.flush()
    second.flush()
    for a, b, c in zip(straight, resumed_params, ours):
        assert torch.equal(a.detach(), b.detach())
        # the mid-run flush only regroups float sums: the same result up to rounding
        torch.testing.assert_close(a.detach(), c.detach(), rtol=0, atol=1e-6)


def test_the_horizon_sums_enough_idle_steps():
    assert 200 < exact_adam_horizon(0.9, 0.999) < 400
    assert exact_adam_horizon(0.99, 0.999) > exact_adam_horizon(0.9, 0.999)
    assert exact_adam_horizon(0.999, 0.99) == 2**62  # no decay: every idle step counts


def test_reading_the_model_flushes_pending_steps(backend):
    config = Config(optimizer="adam", d_hidden=16, k=2).replace()
    assert config.sparse_update == "exact"
    torch.manual_seed(0)
    model = build_mlp(20, 3, 16, 3, k=2, unified=True, sparse_grad=True)
    optimizer = build_optimizer(config, model)
    row_sparse = optimizer.optimizers[-1]
    for _ in range(5):
        torch.nn.functional.cross_entropy(model(torch.rand(4, 20)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()

    def pending():
        return sum(int((s["last_step"] < s["step"]).sum()) for s in row_sparse.state.values())
    assert pending() > 0  # unified k=2 of 16: most rows idle in the last step
    model.state_dict()
    assert pending() == 0
    model(torch.rand(4, 20)).sum().backward()  # a training forward/backward leaves no flush
    optimizer.step()
    optimizer.zero_grad()
    assert pending() > 0
    model.eval()
    with torch.no_grad():
        model(torch.rand(4, 20))
    assert pending() == 0


def test_sparse_update_values_and_the_old_booleans():
    assert Config().sparse_update == "exact"
    for value in ("dense", "exact", "lazy"):
        assert validate({"sparse_update": value}).sparse_update == value
    for old, new in ((True, "lazy"), (False, "dense")):
        with pytest.warns(FutureWarning, match=f"read as {new}"):
            assert validate({"sparse_update": old}).sparse_update == new
    # old run keys stay: false was the default (dense), true was the lazy update
    assert run_key(Config(sparse_update="dense")) == "44136fa355b3678a"
    assert run_key(Config(sparse_update="lazy")) == "98a6dd7a21c6de5a"
    assert run_key(Config()) not in ("44136fa355b3678a", "98a6dd7a21c6de5a")


def test_bad_sparse_update_is_one_line_and_exit_2():
    result = CliRunner().invoke(main, ["train", "--set", "sparse_update=sometimes", "--set", "n_epoch=1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line]
    assert lines == ["meprop: error: sparse_update: must be one of exact, lazy, dense, got 'sometimes'"]
