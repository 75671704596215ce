"""MePropLSTM: the gradient of every input and parameter equals an independent reference, the dense
backward (autograd) of an LSTM whose gate pre-activation gradients are masked to top-k per gate."""

import pytest
import torch
from torch import nn

from mnist_meprop import MePropLSTM, MePropLSTMCell, time_linear_backward
import mnist_meprop.lstm_ops as lstm_ops
from mnist_meprop.lstm_ops import meprop_lstm

T, N, I, H = 6, 3, 5, 8


def masking_hook(k: int, unified: bool):
    """Keep k entries of each gate's gradient: per example by |g|, or by the minibatch's sum of |g|."""
    def hook(grad):
        n, width = grad.shape
        per_gate = grad.reshape(n, 4, width // 4)
        scores = per_gate.abs().sum(0, keepdim=True).expand_as(per_gate) if unified else per_gate.abs()
        order = scores.argsort(dim=-1, descending=True)
        mask = torch.zeros_like(per_gate).scatter_(-1, order[..., :k], 1.0)
        return (per_gate * mask).reshape(n, width)
    return hook


def reference_lstm(x, h, c, w_ih, w_hh, b_ih, b_hh, k, unified, full_bias=False):
    """Plain autograd LSTM, time-major; a hook masks each step's gate pre-activation gradient."""
    outputs = []
    for t in range(x.shape[0]):
        linear = x[t] @ w_ih.t() + h @ w_hh.t()
        if full_bias:  # the bias sees the unmasked gradient: add it after the masking point
            if k:
                linear.register_hook(masking_hook(k, unified))
            a = linear + b_ih + b_hh
        else:
            a = linear + b_ih + b_hh
            if k:
                a.register_hook(masking_hook(k, unified))
        i, f, g, o = a.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outputs.append(h)
    return torch.stack(outputs), h, c


def leaves(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(T, N, I), (N, H), (N, H), (4 * H, I), (4 * H, H), (4 * H,), (4 * H,)]
    return [torch.randn(*shape, generator=generator, dtype=dtype).mul_(0.7).requires_grad_() for shape in shapes]


def gradients(outputs, tensors, seed=1):
    """Gradients of a random linear function of (output, h_T, c_T) with respect to ``tensors``."""
    generator = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs)
    return torch.autograd.grad(loss, tensors)


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """The compiled per-example BPTT (where it applies), or the step-by-step torch ops path."""
    if request.param == "torch":
        monkeypatch.setattr(lstm_ops, "cpu_kernels", lambda: None)
    elif lstm_ops.cpu_kernels() is None:
        pytest.skip("the C++ kernels are not built here")
    return request.param


@pytest.mark.parametrize("k,unified", [(0, False), (2, False), (3, True), (1, True), (7, False)])
@pytest.mark.parametrize("full_bias", [False, True])
def test_gradients_equal_the_dense_backward_of_the_masked_gate_gradients(k, unified, full_bias, backend):
    tensors = leaves()
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = tensors
    out, (h, c) = meprop_lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, k, unified,
                              bias_grad="full" if full_bias else "masked")
    expected_out = reference_lstm(*tensors, k, unified, full_bias)
    for ours, reference in zip((out, h, c), expected_out):
        torch.testing.assert_close(ours, reference)
    for ours, reference in zip(gradients((out, h, c), tensors), gradients(expected_out, tensors)):
        torch.testing.assert_close(ours, reference)


def test_the_reference_is_not_the_dense_gradient():
    """The masked reference differs from plain backprop, so the test above can tell them apart."""
    tensors = leaves()
    dense = gradients(reference_lstm(*tensors, 0, False), tensors)
    masked = gradients(reference_lstm(*tensors, 2, False), tensors)
    assert not torch.allclose(dense[3], masked[3])


@pytest.mark.parametrize("unified", [False, True])
def test_dropping_a_gate_or_the_recurrence_is_caught(unified, monkeypatch):
    """A selection over all 4H entries at once (not per gate) gives other gradients than the reference."""
    monkeypatch.setattr(lstm_ops, "cpu_kernels", lambda: None)  # the torch path, where the selection is

    def whole_width(da, k, unified, selection):
        scores = da.abs().sum(0, keepdim=True) if unified else da.abs()
        return scores.topk(4 * k, dim=-1).indices.expand(da.shape[0], 4 * k)
    monkeypatch.setattr(lstm_ops, "gate_selection", whole_width)
    tensors = leaves()
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = tensors
    ours = gradients(meprop_lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, 2, unified)[0:1], tensors)
    reference = gradients(reference_lstm(*tensors, 2, unified)[0:1], tensors)
    assert not torch.allclose(ours[4], reference[4])


def test_dense_path_equals_torch_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(I, H, dtype=torch.float64)
    ours = MePropLSTM(I, H, k=0, dtype=torch.float64)
    ours.load_state_dict(lstm.state_dict())
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    with time_linear_backward() as clock:  # inside the clock k=0 runs our own path, timed
        out, (h, c) = ours(x)
        (out.sum() + h.sum() + c.sum()).backward()
    assert clock.seconds > 0
    expected, (h_ref, c_ref) = lstm(x)
    torch.testing.assert_close(out, expected)
    grads_ref = torch.autograd.grad(expected.sum() + h_ref.sum() + c_ref.sum(), [x, *lstm.parameters()])
    torch.testing.assert_close(x.grad, grads_ref[0])
    for parameter, reference in zip(ours.parameters(), grads_ref[1:]):
        torch.testing.assert_close(parameter.grad, reference)


def test_meprop_lstm_is_a_drop_in_nn_lstm():
    torch.manual_seed(3)
    lstm = nn.LSTM(I, H, batch_first=True)
    ours = MePropLSTM(I, H, k=3, batch_first=True)
    assert list(ours.state_dict()) == list(lstm.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in lstm.parameters()]
    ours.load_state_dict(lstm.state_dict())
    x = torch.randn(N, T, I)
    state = (torch.randn(1, N, H), torch.randn(1, N, H))
    expected, (h_ref, c_ref) = lstm(x, state)
    out, (h, c) = ours(x, state)
    assert out.shape == (N, T, H) and h.shape == c.shape == (1, N, H)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close((h, c), (h_ref, c_ref))
    unbatched, (h1, c1) = ours(x[0])
    torch.testing.assert_close(unbatched, lstm(x[0])[0])
    assert h1.shape == (1, H)
    # same initialisation as nn.LSTM: uniform(-1/sqrt(H), 1/sqrt(H))
    torch.manual_seed(5)
    reference = nn.LSTM(I, H)
    torch.manual_seed(5)
    torch.testing.assert_close(MePropLSTM(I, H, k=3).state_dict(), reference.state_dict())


@pytest.mark.parametrize("unified", [False, True])
def test_layer_backward_equals_the_masked_reference(unified, backend):
    torch.manual_seed(4)
    layer = MePropLSTM(I, H, k=2, unified=unified, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    (out ** 2).sum().backward()
    zeros = torch.zeros(N, H, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x_ref = x.detach().clone().requires_grad_()
    reference, _, _ = reference_lstm(x_ref, zeros, zeros, *params, 2, unified)
    (reference ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for parameter, expected in zip(layer.parameters(), params):
        torch.testing.assert_close(parameter.grad, expected.grad)


def test_cell_is_one_step_of_the_lstm():
    torch.manual_seed(6)
    cell = MePropLSTMCell(I, H, k=2, dtype=torch.float64)
    assert list(cell.state_dict()) == list(nn.LSTMCell(I, H).state_dict())
    x = torch.randn(N, I, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(N, H, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64))
    h, c = cell(x, state)
    torch.testing.assert_close((h, c), nn.LSTMCell.forward(cell, x, state))
    (h.sum() + (c ** 2).sum()).backward()
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    x_ref = x.detach().clone().requires_grad_()
    _, h_ref, c_ref = reference_lstm(x_ref.unsqueeze(0), *state, *params, 2, False)
    (h_ref.sum() + (c_ref ** 2).sum()).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for parameter, expected in zip(cell.parameters(), params):
        torch.testing.assert_close(parameter.grad, expected.grad)


def test_bad_choices_are_errors():
    with pytest.raises(ValueError, match="selection"):
        MePropLSTM(I, H, k=2, selection="best")
    with pytest.raises(ValueError, match="bias_grad"):
        MePropLSTMCell(I, H, k=2, bias_grad="half")


@pytest.mark.parametrize("bias_grad", ["masked", "full"])
def test_sparse_grad_gives_row_sparse_gradients_equal_to_the_reference(bias_grad):
    if lstm_ops.cpu_kernels() is None:
        pytest.skip("row-sparse LSTM gradients come from the C++ kernels")
    torch.manual_seed(7)
    layer = MePropLSTM(I, H, k=2, sparse_grad=True, bias_grad=bias_grad, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    (out ** 2).sum().backward()
    assert layer.weight_ih_l0.grad.is_sparse and layer.weight_hh_l0.grad.is_sparse
    assert layer.bias_ih_l0.grad.is_sparse == (bias_grad == "masked")
    touched = layer.weight_hh_l0.grad.coalesce()._indices()[0]
    assert len(touched) < 4 * H  # only gate rows kept at some step
    zeros = torch.zeros(N, H, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x_ref = x.detach().clone().requires_grad_()
    reference, _, _ = reference_lstm(x_ref, zeros, zeros, *params, 2, False, full_bias=bias_grad == "full")
    (reference ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for parameter, expected in zip(layer.parameters(), params):
        grad = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
        torch.testing.assert_close(grad, expected.grad)


def test_lstm_bench_times_every_model_against_stock():
    from mnist_meprop.bench_lstm import lstm_markdown, run_lstm_bench

    records = run_lstm_bench(ks=(4,), d_hidden=32, words=5, rounds=3, steps=2, warmup=1)
    assert [(r.model, r.k) for r in records] == [("stock", 0), ("ours_k0", 0), ("meprop", 4)]
    stock, ours, meprop = records
    assert stock.step_speedup is None and stock.lstm_linear_backward_us is None
    assert ours.lstm_linear_backward_us > 0 and meprop.flop_limit == 8.0
    assert meprop.lstm_linear_backward_speedup_vs_ours_k0 > 0 and meprop.lstm_backward_speedup > 0
    assert "LSTM linear bwd vs ours_k0" in lstm_markdown(records)
