"""convert(): a user's model gets meProp layers in place, with its weights, the same forward and the
backward of the masked reference."""

import copy

import pytest
import torch
from torch import nn
from test_lstm import masking_hook, reference_lstm

from mnist_meprop import MePropLinear, MePropLSTM, convert


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)).double()


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(20, 5)
        self.lstm = nn.LSTM(5, 8, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, words):
        return self.out(self.lstm(self.embed(words))[0])


def per_example_mask(k):
    def hook(grad):
        kept = grad.abs().topk(k, dim=-1).indices
        return torch.zeros_like(grad).scatter_(-1, kept, grad.gather(-1, kept))
    return hook


def test_converted_mlp_keeps_its_weights_forward_and_gets_the_masked_backward():
    original = mlp()
    reference = copy.deepcopy(original)
    weight = original[0].weight
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1)
    model, swapped = convert(original, k=3, exclude=["4"])
    assert swapped == ["0", "2"]
    assert isinstance(model[0], MePropLinear) and type(model[4]) is nn.Linear
    assert model[0].weight is weight  # the same tensors: an optimizer made before still updates them
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x))
    model(x).pow(2).sum().backward()
    def mask_output_gradient(module, args, out):
        out.register_hook(per_example_mask(3))
    hooks = [reference[i].register_forward_hook(mask_output_gradient) for i in (0, 2)]
    reference(x).pow(2).sum().backward()
    for hook in hooks:
        hook.remove()
    for ours, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, expected.grad)
    dense = copy.deepcopy(mlp())
    dense(x).pow(2).sum().backward()
    assert not torch.allclose(dense[0].weight.grad, model[0].weight.grad)  # meProp changed the gradient
    optimizer.step()
    assert not torch.equal(weight, reference[0].weight)


def test_converted_lstm_model_matches_the_masked_reference():
    model = Tagger().double()
    reference = copy.deepcopy(model)
    _, swapped = convert(model, k=2, exclude=["out"])
    assert swapped == ["lstm"] and isinstance(model.lstm, MePropLSTM) and type(model.out) is nn.Linear
    assert model.lstm.batch_first
    words = torch.randint(0, 20, (3, 6))
    torch.testing.assert_close(model(words), reference(words))
    model(words).pow(2).sum().backward()
    x = reference.embed(words).transpose(0, 1)
    zeros = torch.zeros(3, 8, dtype=torch.float64)
    lstm = reference.lstm
    out, _, _ = reference_lstm(x, zeros, zeros, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0,
                               lstm.bias_hh_l0, 2, False)
    reference.out(out.transpose(0, 1)).pow(2).sum().backward()
    for (name, ours), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, expected.grad, msg=name)


def test_convert_refuses_what_it_cannot_swap_and_unknown_names():
    with pytest.raises(ValueError, match="2-layer"):
        convert(nn.Sequential(nn.LSTM(4, 4, num_layers=2)), k=2)
    model, swapped = convert(nn.Sequential(nn.LSTM(4, 4, num_layers=2), nn.Linear(4, 2)), k=1, exclude=["0"])
    assert swapped == ["1"]
    with pytest.raises(ValueError, match="outt"):
        convert(Tagger(), k=2, exclude=["outt"])


def test_masking_hook_is_the_reference_used_here():
    grad = torch.tensor([[1.0, -5.0, 2.0, 0.5, 3.0, -1.0, 0.1, 4.0]])
    # 4 gates of 2 units: each keeps its larger |entry|
    assert masking_hook(1, False)(grad).abs().tolist() == [[0.0, 5.0, 2.0, 0.0, 3.0, 0.0, 0.0, 4.0]]
