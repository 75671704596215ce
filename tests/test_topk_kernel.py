"""The compiled per-example top-k selection against a stable sort (the first entries among ties).

The kernel's radix select has special paths (rows with at most k nonzero entries, a vectorised
compaction in blocks of 16, a second-level histogram); each case below reaches one of them.
"""

import pytest
import torch

from mnist_meprop.kernels import cpu_kernels

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the compiled CPU kernels are not available")


def reference_topk(row: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest |row|, the first ones among equal magnitudes, in increasing order."""
    order = sorted(range(len(row)), key=lambda j: (-abs(row[j].item()), j))
    return sorted(order[:k])


def kernel_topk(row: torch.Tensor, k: int) -> list[int]:
    """The rows the kernel keeps for a single example: its top-k selection."""
    _, rows, _, bias_values = kernels.per_example_backward(row.reshape(1, -1).contiguous(), None, None, None, k,
                                                           False, False)
    torch.testing.assert_close(bias_values, row[rows])  # each kept row's bias gradient is its dy
    return rows.tolist()


def make_row(case: str, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn(width, generator=generator, dtype=torch.float64)
    if case == "relu_zeros":  # half the entries exactly zero, as behind a ReLU
        row[torch.rand(width, generator=generator) < 0.5] = 0
    elif case == "few_nonzero":  # fewer nonzero entries than k: they, then the first zeros
        row.zero_()
        row[torch.randperm(width, generator=generator)[:5]] = 1.5
    elif case == "ties":  # magnitudes from a small set, both signs: ties at the threshold
        row = torch.randint(1, 4, (width,), generator=generator).double()
        row *= torch.where(torch.rand(width, generator=generator) < 0.5, -1.0, 1.0)
    elif case == "close":  # values within one float bin: the second-level histogram decides
        row = 1 + torch.rand(width, generator=generator, dtype=torch.float64) * 1e-3
    elif case == "wide_range":  # magnitudes over 60 orders, with denormals
        row = row * torch.pow(10.0, torch.randint(-40, 20, (width,), generator=generator).double())
    return row.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["gaussian", "relu_zeros", "few_nonzero", "ties", "close", "wide_range"])
@pytest.mark.parametrize("width,k", [(500, 20), (37, 10), (16, 15), (33, 1)])
def test_kernel_topk_equals_a_stable_sort(dtype, case, width, k):
    for seed in range(3):
        row = make_row(case, width, dtype, seed)
        assert kernel_topk(row, k) == reference_topk(row, k), (case, width, k, seed)


def test_kernel_topk_per_example_over_a_minibatch():
    """Each example's own top-k: the kept rows are the union, and each row's bias gradient sums
    the dy of the examples that kept it."""
    generator = torch.Generator().manual_seed(0)
    dy = torch.randn(50, 300, generator=generator)
    dy[dy.abs() < 0.5] = 0
    k = 20
    keep = torch.zeros_like(dy, dtype=torch.bool)
    for i, row in enumerate(dy):
        keep[i, reference_topk(row, k)] = True
    _, rows, _, bias_values = kernels.per_example_backward(dy, None, None, None, k, False, False)
    assert rows.tolist() == keep.any(0).nonzero().flatten().tolist()
    torch.testing.assert_close(bias_values, (dy * keep).sum(0)[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width_in", [784, 300, 100])
def test_kernel_gradients_equal_the_dense_backward_of_the_masked_dy(dtype, width_in):
    """dW rows, bias and dx at sizes that use the kernel's column blocks and their tails."""
    generator = torch.Generator().manual_seed(1)
    n, out, k = 50, 200, 20
    x = torch.randn(n, width_in, generator=generator, dtype=dtype)
    weight = torch.randn(out, width_in, generator=generator, dtype=dtype)
    dy = torch.randn(n, out, generator=generator, dtype=dtype)
    keep = torch.zeros_like(dy, dtype=torch.bool)
    for i, row in enumerate(dy):
        keep[i, reference_topk(row, k)] = True
    masked = dy * keep
    dx, rows, weight_values, bias_values = kernels.per_example_backward(dy, x, weight, None, k, True, True)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(dx, masked @ weight, **tolerance)
    torch.testing.assert_close(weight_values, (masked.t() @ x)[rows], **tolerance)
    torch.testing.assert_close(bias_values, masked.sum(0)[rows], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,width_in,out,k", [(50, 784, 500, 30), (7, 37, 20, 5), (3, 100, 40, 39), (50, 2000, 2000, 20),
                                              (5, 64, 10, 4)])
def test_kernel_unified_backward_equals_the_dense_backward_of_the_masked_dy(dtype, n, width_in, out, k):
    """Unified top-k: the k columns with the largest sum of |dy| (first ones among equal sums),
    here with some dead units (all-zero columns) as behind a ReLU."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(n, width_in, generator=generator, dtype=dtype)
    weight = torch.randn(out, width_in, generator=generator, dtype=dtype)
    dy = torch.randn(n, out, generator=generator, dtype=dtype)
    dy[:, ::3] = 0
    kept = reference_topk(dy.abs().sum(0), k)
    masked = torch.zeros_like(dy)
    masked[:, kept] = dy[:, kept]
    dx, rows, weight_values, bias_values = kernels.unified_backward(dy, x, weight, k, True, True)
    assert rows.tolist() == kept
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(dx, masked @ weight, **tolerance)
    torch.testing.assert_close(weight_values, (masked.t() @ x)[rows], **tolerance)
    torch.testing.assert_close(bias_values, masked.sum(0)[rows], **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,width_in,out", [(50, 2000, 10), (10, 500, 10), (7, 37, 3), (1, 64, 1), (513, 100, 10),
                                            (9, 130, 32), (9, 130, 33), (4, 300, 200)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_kernel_dense_backward_equals_torchs(dtype, n, width_in, out, needs):
    """The dense backward: narrow layers through the kernel's own tiles (rows past a multiple of 4,
    columns past a multiple of 64), the rest (wider than 32, more than 512 rows) through mm."""
    needs_dx, needs_dw = needs
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, width_in, generator=generator, dtype=dtype)
    weight = torch.randn(out, width_in, generator=generator, dtype=dtype)
    dy = torch.randn(n, out, generator=generator, dtype=dtype)
    dx, dw, db = kernels.dense_backward(dy, x if needs_dw else None, weight if needs_dx else None, needs_dx, needs_dw)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    assert (dx is not None) == needs_dx and (dw is not None) == needs_dw
    if needs_dx:
        torch.testing.assert_close(dx, dy @ weight, **tolerance)
    if needs_dw:
        torch.testing.assert_close(dw, dy.t() @ x, **tolerance)
    torch.testing.assert_close(db, dy.sum(0), **tolerance)
