"""Row-sparse gradients (compiled kernels and PyTorch ops), row-sparse updates, and the benchmark."""

import pytest
import torch
from test_layers import dense_grads, make_inputs, reference_mask

from mnist_meprop import meprop_linear
from mnist_meprop.bench import (MachineRates, as_dicts, flop_limit, linear_backward_bound, markdown_table,
                                run_bench, speedup_plot)
from mnist_meprop.config import Config
from mnist_meprop.kernels import cpu_kernels
from mnist_meprop.model import build_mlp
from mnist_meprop.optim import RowSparseOptimizer, build_optimizer, stock_optimizer


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """Run the test with the compiled CPU kernels and with the PyTorch fallback."""
    if request.param == "cpp":
        monkeypatch.setenv("MEPROP_KERNELS", "auto")
        if cpu_kernels() is None:
            pytest.skip("the CPU kernels could not be built here")
    else:
        monkeypatch.setenv("MEPROP_KERNELS", "torch")
    return request.param


def sparse_grads(x, weight, bias, dy, k, unified, selection="topk"):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, bias)]
    meprop_linear(*leaves, k=k, unified=unified, selection=selection, sparse_grad=True).backward(dy)
    return leaves


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("shape, k", [((8, 12), 3), ((1, 12), 1), ((2, 3, 12), 15)])
def test_sparse_gradients_match_the_masked_reference(backend, unified, shape, k):
    x, weight, bias, dy = make_inputs(shape, d_out=16)
    got_x, got_w, got_b = sparse_grads(x, weight, bias, dy, k, unified)
    assert got_w.grad.is_sparse and got_b.grad.is_sparse
    want = dense_grads(x, weight, bias, reference_mask(dy, k, unified))
    torch.testing.assert_close(got_x.grad, want[0])
    torch.testing.assert_close(got_w.grad.to_dense(), want[1])
    torch.testing.assert_close(got_b.grad.to_dense(), want[2])
    rows = got_w.grad._indices()[0]
    assert bool((rows[1:] > rows[:-1]).all())
    assert len(rows) <= (k if unified else min(16, k * dy[..., 0].numel()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, d_in, d_out, k", [(600, 517, 600, 5), (300, 200, 40, 8)],
                         ids=["column-blocked", "row-by-row"])
def test_per_example_kernel_sums_match_the_masked_reference(dtype, n, d_in, d_out, k):
    """Inputs and weights above 1 MB, each read by several kept rows, are summed in packed blocks of
    32 columns (the parser's minibatch of 10,000); 517 columns leave a short last block. Smaller
    ones row by row. Both against the dense backward of the masked dy."""
    if cpu_kernels() is None:
        pytest.skip("the CPU kernels could not be built here")
    x, weight, bias, dy = make_inputs((n, d_in), d_out=d_out, dtype=dtype)
    got_x, got_w, got_b = sparse_grads(x, weight, bias, dy, k, unified=False)
    want = dense_grads(x, weight, bias, reference_mask(dy, k, unified=False))
    scale = 1e-5 if dtype == torch.float32 else 1e-12
    for got, expected in zip((got_x.grad, got_w.grad.to_dense(), got_b.grad.to_dense()), want):
        torch.testing.assert_close(got, expected, rtol=scale * 10, atol=scale * float(expected.abs().max()))


def test_dense_gradients_agree_between_backends(monkeypatch):
    x, weight, bias, dy = make_inputs((10, 30), d_out=40)
    results = []
    for mode in ("auto", "torch"):
        monkeypatch.setenv("MEPROP_KERNELS", mode)
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        meprop_linear(*leaves, k=6, unified=False).backward(dy)
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_gradients_accumulate_over_two_backward_calls(backend):
    x, weight, bias, dy = make_inputs((6, 10), d_out=20)
    w = weight.detach().clone().requires_grad_()
    for _ in range(2):
        meprop_linear(x.detach(), w, None, k=4, unified=False, sparse_grad=True).backward(dy)
    want = dense_grads(x.detach(), weight, None, reference_mask(dy, 4, False))[1] * 2
    torch.testing.assert_close(w.grad.to_dense(), want)


def test_random_selection_with_kernels_keeps_k_entries(backend):
    n, d_out, k = 5, 25, 3
    w = torch.randn(d_out, n, requires_grad=True)
    dy = torch.randn(n, d_out)
    meprop_linear(torch.eye(n), w, None, k=k, unified=False, selection="random", sparse_grad=True).backward(dy)
    masked = w.grad.to_dense().t()
    assert torch.equal((masked != 0).sum(dim=1), torch.full((n,), k))
    torch.testing.assert_close(masked[masked != 0], dy[masked != 0])


def dense_reference_step(kind, param, grad, state, lr, step):
    """One dense update of the rows of ``grad`` that are non-zero, by the textbook formulas."""
    rows = (grad != 0).reshape(grad.shape[0], -1).any(dim=1)
    g = grad[rows]
    if kind == "sgd":
        param[rows] -= lr * g
    elif kind == "adagrad":
        state["sum"][rows] += g * g
        param[rows] -= lr * g / (state["sum"][rows].sqrt() + 1e-6)
    else:
        state["m"][rows] = 0.9 * state["m"][rows] + 0.1 * g
        state["v"][rows] = 0.999 * state["v"][rows] + 0.001 * g * g
        m_hat = state["m"][rows] / (1 - 0.9 ** step)
        v_hat = state["v"][rows] / (1 - 0.999 ** step)
        param[rows] -= lr * m_hat / (v_hat.sqrt() + 1e-8)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("shape", [(12, 7), (12,)], ids=["weight", "bias"])
def test_row_sparse_update_matches_the_lazy_reference(backend, kind, shape):
    torch.manual_seed(0)
    param = torch.randn(*shape, requires_grad=True)
    reference = param.detach().clone()
    state = {"sum": torch.zeros(shape), "m": torch.zeros(shape), "v": torch.zeros(shape)}
    optimizer = RowSparseOptimizer([param], kind, lr=0.05, adam_update="lazy")
    for step in range(1, 4):
        rows = torch.tensor(sorted(torch.randperm(12)[:4].tolist()))
        values = torch.randn(4, *shape[1:])
        param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=True)
        optimizer.step()
        dense = torch.zeros(shape)
        dense[rows] = values
        dense_reference_step(kind, reference, dense, state, 0.05, step)
    torch.testing.assert_close(param.detach(), reference)


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_sparse_update_equals_dense_update_for_sgd_and_adagrad(kind):
    results = []
    for sparse_update in ("dense", "exact", "lazy"):
        config = Config(optimizer=kind, d_hidden=16, k=4, sparse_update=sparse_update).replace()
        torch.manual_seed(0)
        model = build_mlp(20, 3, 16, 3, k=4, sparse_grad=True)
        optimizer = build_optimizer(config, model)
        for step in range(3):
            x, y = torch.rand(5, 20), torch.tensor([0, 1, 2, 1, 0])
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for row_sparse in results[1:]:
        for dense, sparse in zip(results[0], row_sparse):
            torch.testing.assert_close(sparse, dense)


def test_dense_update_path_matches_stock_optimizer_on_dense_gradients():
    config = Config(optimizer="adam", d_hidden=16, k=4, sparse_update="dense").replace()
    torch.manual_seed(0)
    sparse_model = build_mlp(20, 3, 16, 3, k=4, sparse_grad=True)
    torch.manual_seed(0)
    dense_model = build_mlp(20, 3, 16, 3, k=4, sparse_grad=False)
    optimizers = [build_optimizer(config, sparse_model), stock_optimizer("adam", dense_model.parameters(), config.lr)]
    for _ in range(3):
        x, y = torch.rand(5, 20), torch.tensor([0, 1, 2, 1, 0])
        for model, optimizer in zip((sparse_model, dense_model), optimizers):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(sparse_model.parameters(), dense_model.parameters()):
        torch.testing.assert_close(a, b)


def test_optimizer_state_round_trips_for_checkpoints():
    config = Config(optimizer="adam", d_hidden=16, k=4, sparse_update="lazy").replace()
    model = build_mlp(20, 3, 16, 3, k=4, sparse_grad=True)
    optimizer = build_optimizer(config, model)
    torch.nn.functional.cross_entropy(model(torch.rand(4, 20)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    state = optimizer.state_dict()
    fresh = build_optimizer(config, model)
    fresh.load_state_dict(state)
    assert len(fresh.optimizers) == 2
    assert fresh.optimizers[1].state_dict()["state"][0]["step"] == 1


def test_flop_limit_matches_the_paper():
    assert flop_limit(784, 500, 10, 20) == pytest.approx(1_804_000 / (3568 * 20 + 20000))
    assert round(flop_limit(784, 500, 10, 10)) == 32


def test_quick_bench_produces_every_target_row(tmp_path):
    records = run_bench(quick=True, repeats=5, warmup=1, rounds=3, log=lambda line: None)
    rows = as_dicts(records)
    keys = {(r["d_hidden"], r["minibatch"], r["mode"], r["k"]) for r in rows}
    for target in [(500, 10, "per_example", 20), (500, 50, "unified", 30), (500, 200, "per_example", 20),
                   (2000, 50, "unified", 20)]:
        assert target in keys
        assert (target[0], target[1], "dense", 0) in keys and (target[0], target[1], "ours_k0", 0) in keys
    for row in rows:
        assert row["step_us"] > 0 and row["linear_backward_us"] > 0 and row["rounds"] == 3
        # every setting, not only the first, trains our models through the fused engine
        assert row["engine"] == ("stock" if row["mode"] == "dense" else "fused" if cpu_kernels() else "autograd")
        if row["mode"] != "dense":
            assert row["linear_backward_speedup"] > 0 and row["step_speedup"] > 0
            assert row["step_speedup_spread"] >= 0
        if row["mode"] in ("unified", "per_example"):
            assert row["flop_limit"] > 1 and row["bound_speedup"] > 1 and row["percent_of_bound"] > 0
            assert row["step_speedup_vs_engine_dense"] > 0 and row["bound_binding"] in ("bytes", "flops")
            rows_cap = row["k"] if row["mode"] == "unified" else min(row["d_hidden"], row["k"] * row["minibatch"])
            assert all(0 < touched <= rows_cap for touched in row["touched_rows"][:2])
    assert "% of bound" in markdown_table(records)
    assert speedup_plot(records, tmp_path / "speedup.png").stat().st_size > 0


def test_the_bound_follows_bytes_at_small_minibatch_and_flops_at_large_width():
    rates = MachineRates(gemm_flops=50e9, bandwidth=10e9)
    small = linear_backward_bound(500, 10, 20, False, [200, 180, 10], rates)
    assert small.binding == "bytes" and small.dense_s > small.meprop_s
    wide = linear_backward_bound(2000, 50, 20, True, None, rates)
    assert wide.binding == "flops"
    # unified touches k rows, per-example at most minibatch * k: fewer touched rows, a higher bound
    assert (linear_backward_bound(500, 10, 20, False, [40, 40, 10], rates).speedup
            > linear_backward_bound(500, 10, 20, False, [200, 200, 10], rates).speedup)
    # FLOPs alone (infinite bandwidth) give the FLOP limit of the backward
    flops_only = linear_backward_bound(500, 10, 20, True, None, MachineRates(50e9, float("inf")))
    assert flops_only.speedup == pytest.approx(flop_limit(784, 500, 10, 20))


def test_quick_bench_with_adagrad_replays_after_training_steps():
    """The linear-backward replay is timed between training steps that update the weights in
    place; with torch's AdaGrad (which records that in the tensors' versions) it must still run."""
    records = run_bench(quick=True, repeats=5, warmup=8, rounds=3, optimizer="adagrad", log=lambda line: None)
    assert all(row["linear_backward_us"] > 0 for row in as_dicts(records))
