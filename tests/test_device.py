"""Device selection; the CUDA parts run only where torch sees a GPU."""

import pytest
import torch
from click.testing import CliRunner
from test_layers import dense_grads, make_inputs, reference_mask

from mnist_meprop import meprop_linear
from mnist_meprop.cli import main
from mnist_meprop.config import Config, resolve_device
from mnist_meprop.data import load_data
from mnist_meprop.optim import RowSparseOptimizer
from mnist_meprop.train import train_run

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")


def test_auto_picks_what_is_there():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_one_line_error():
    result = CliRunner().invoke(main, ["train", "--set", "device=cuda", "--set", "n_epoch=1"])
    assert result.exit_code == 2
    assert "device: cuda requested" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@needs_gpu
@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_gradients_on_gpu_match_the_reference(unified, sparse_grad):
    x, weight, bias, dy = make_inputs((8, 12), d_out=16)
    leaves = [t.detach().cuda().requires_grad_() for t in (x, weight, bias)]
    meprop_linear(*leaves, k=5, unified=unified, sparse_grad=sparse_grad).backward(dy.cuda())
    want = dense_grads(x, weight, bias, reference_mask(dy, 5, unified))
    for got, expected in zip(leaves, want):
        grad = got.grad.to_dense() if got.grad.is_sparse else got.grad
        torch.testing.assert_close(grad.cpu(), expected, rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd"])
def test_row_sparse_update_on_gpu_matches_cpu(kind):
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        param = torch.randn(10, 6, device=device, requires_grad=True)
        optimizer = RowSparseOptimizer([param], kind, lr=0.1)
        rows = torch.tensor([1, 4, 7], device=device)
        param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.ones(3, 6, device=device), (10, 6))
        optimizer.step()
        results.append(param.detach().cpu())
    torch.testing.assert_close(results[0], results[1])


@needs_gpu
def test_training_runs_on_gpu():
    config = Config(dataset="sample", dev_size=100, train_limit=300, test_limit=100, n_epoch=2, d_hidden=32,
                    k=8, device="cuda").replace()
    result = train_run(config, load_data(config), lambda line: None)
    assert result.test_acc > 30
