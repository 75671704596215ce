"""meProp gradients against an independent reference: the dense backward of the masked ``dy``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_meprop import MePropLinear, meprop_linear, time_linear_backward
from mnist_meprop.kernels import cpu_kernels


def reference_mask(dy: torch.Tensor, k: int, unified: bool) -> torch.Tensor:
    """``dy`` with all but its k largest-magnitude entries zeroed, by sorting (not torch.topk)."""
    flat = dy.reshape(-1, dy.shape[-1])
    if unified:
        keep = flat.abs().sum(dim=0).argsort(descending=True)[:k]
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[:, keep] = True
    else:
        order = flat.abs().argsort(dim=1, descending=True)[:, :k]
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter(1, order, True)
    return (flat * mask).reshape(dy.shape)


def meprop_grads(x, weight, bias, dy, k, unified, selection="topk"):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, weight, bias)]
    meprop_linear(*leaves, k=k, unified=unified, selection=selection).backward(dy)
    return [t.grad if t is not None else None for t in leaves]


def dense_grads(x, weight, bias, dy):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, weight, bias)]
    F.linear(*leaves).backward(dy)
    return [t.grad if t is not None else None for t in leaves]


def make_inputs(shape, d_out, seed=0, bias=True, x_grad=True, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_(x_grad)
    weight = torch.randn(d_out, shape[-1], generator=generator, dtype=dtype).requires_grad_()
    b = torch.randn(d_out, generator=generator, dtype=dtype).requires_grad_() if bias else None
    dy = torch.randn(*shape[:-1], d_out, generator=generator, dtype=dtype)
    return x, weight, b, dy


def assert_grads_close(actual, expected):
    for got, want in zip(actual, expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("shape", [(8, 12), (1, 12), (3, 5, 12)], ids=["batch", "batch1", "3d"])
@pytest.mark.parametrize("k", [1, 7, 15], ids=["k1", "k7", "k=d-1"])
def test_gradients_match_dense_backward_of_masked_dy(unified, shape, k):
    x, weight, bias, dy = make_inputs(shape, d_out=16)
    got = meprop_grads(x, weight, bias, dy, k, unified)
    want = dense_grads(x, weight, bias, reference_mask(dy, k, unified))
    assert_grads_close(got, want)


@pytest.mark.parametrize("unified", [False, True])
def test_only_k_rows_of_weight_and_bias_get_gradient(unified):
    x, weight, bias, dy = make_inputs((6, 10), d_out=20)
    _, dw, db = meprop_grads(x, weight, bias, dy, k=3, unified=unified)
    touched = (dw != 0).any(dim=1)
    assert torch.equal(touched, db != 0)
    if unified:
        assert int(touched.sum()) == 3
    else:
        assert 3 <= int(touched.sum()) <= 18


@pytest.mark.parametrize("k", [0, -1, 16, 50])
@pytest.mark.parametrize("unified", [False, True])
def test_k_off_range_is_ordinary_backprop(k, unified):
    x, weight, bias, dy = make_inputs((4, 9), d_out=16)
    assert_grads_close(meprop_grads(x, weight, bias, dy, k, unified), dense_grads(x, weight, bias, dy))


@pytest.mark.parametrize("x_grad,bias", [(True, True), (False, True), (True, False)])
def test_a_large_narrow_dense_layer_is_ordinary_backprop(x_grad, bias):
    """k=0 on a layer narrow and large enough for the kernel's dense backward (the 10-wide output
    layer of a 2000-wide MLP at minibatch 50, as a 3-d input): torch's gradients."""
    x, weight, b, dy = make_inputs((5, 10, 2000), d_out=10, bias=bias, x_grad=x_grad)
    if cpu_kernels() is not None:  # it goes through the kernel's node, not torch's AddmmBackward
        assert "MePropLinear" in type(meprop_linear(x, weight, b, k=0).grad_fn).__name__
    got = meprop_grads(x, weight, b, dy, 0, False)
    expected = dense_grads(x, weight, b, dy)
    for actual, want in zip(got, expected):
        if want is None:
            assert actual is None
        else:
            torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unified", [False, True])
def test_input_without_grad_and_no_bias(unified):
    x, weight, _, dy = make_inputs((5, 7), d_out=11, bias=False, x_grad=False)
    got = meprop_grads(x, weight, None, dy, k=4, unified=unified)
    assert got[0] is None
    want = dense_grads(x, weight, None, reference_mask(dy, 4, unified))
    assert_grads_close(got, want)


@pytest.mark.parametrize("unified", [False, True])
@pytest.mark.parametrize("k", [0, 2])
def test_gradcheck_float64(unified, k):
    x, weight, bias, _ = make_inputs((3, 4), d_out=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, w, b: meprop_linear(a, w, b, k=k, unified=unified), (x, weight, bias))


@pytest.mark.parametrize("unified", [False, True])
def test_random_selection_keeps_k_true_entries_and_is_seeded(unified):
    n, d_out, k = 6, 30, 4
    # With x = I, dW^T is exactly the masked dy, so the kept entries can be read off.
    x = torch.eye(n)
    weight = torch.randn(d_out, n, requires_grad=True)
    dy = torch.randn(n, d_out)

    def masked_dy(seed):
        torch.manual_seed(seed)
        w = weight.detach().clone().requires_grad_()
        meprop_linear(x, w, None, k=k, unified=unified, selection="random").backward(dy)
        return w.grad.t()

    first = masked_dy(1)
    kept = first != 0
    assert torch.equal(kept.sum(dim=1), torch.full((n,), k))
    torch.testing.assert_close(first[kept], dy[kept])
    if unified:
        assert (kept == kept[0]).all()
    assert torch.equal(first, masked_dy(1))
    assert not torch.equal(kept, masked_dy(2) != 0)
    assert not torch.equal(kept, reference_mask(dy, k, unified) != 0)


def test_layer_is_a_drop_in_for_nn_linear():
    torch.manual_seed(3)
    plain = nn.Linear(7, 5)
    torch.manual_seed(3)
    layer = MePropLinear(7, 5, k=2)
    assert layer.weight.shape == (5, 7)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(plain.state_dict())
    torch.testing.assert_close(layer.state_dict(), plain.state_dict())
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), plain(x))
    other = nn.Linear(7, 5)
    other.load_state_dict(layer.state_dict())
    assert "k=2" in repr(layer)


def test_layer_backward_uses_its_k_and_mode():
    torch.manual_seed(0)
    layer = MePropLinear(6, 10, k=3, unified=False)
    x, dy = torch.randn(4, 6), torch.randn(4, 10)
    layer(x).backward(dy)
    want = dense_grads(x, layer.weight, layer.bias, reference_mask(dy, 3, unified=False))
    assert_grads_close([layer.weight.grad, layer.bias.grad], want[1:])


def test_invalid_selection_is_rejected():
    with pytest.raises(ValueError, match="selection"):
        MePropLinear(3, 3, k=1, selection="bottomk")


def test_linear_backward_clock_counts_only_inside_the_block():
    x, weight, bias, dy = make_inputs((4, 8), d_out=8)
    meprop_linear(x, weight, bias, k=2).backward(dy)
    with time_linear_backward() as clock:
        meprop_linear(x, weight, bias, k=2).backward(dy)
        inside = clock.seconds
    meprop_linear(x, weight, bias, k=2).backward(dy)
    assert inside > 0
    assert clock.seconds == inside
