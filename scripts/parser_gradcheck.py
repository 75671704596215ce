"""The parser's meProp gradients at full size against the masked reference, on real transitions.

Usage: python scripts/parser_gradcheck.py [--config configs/parsing-ewt.yaml] [--set KEY=VALUE ...]
                                          [--minibatch 10000]

Builds the config's parser (seed 1) and a copy whose linear layers are dense (k=0) with hooks that
mask each layer's output gradient to that layer's per-example top-k (the independent reference),
runs one minibatch of random training transitions through both and prints, per parameter, the
largest difference of the gradients and the reference gradient's norm. The tests check the same on
small models; this checks the size and data of the reproduction runs.
"""

from __future__ import annotations

import argparse
import copy

import torch

from mnist_meprop.config import load_config
from mnist_meprop.layers import MePropLinear
from mnist_meprop.task import task_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/parsing-ewt.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--minibatch", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config, args.overrides)
    task = task_for(config)
    data = task.load_data(config)
    torch.manual_seed(config.seed)
    model = task.build_model(config, data)
    reference = copy.deepcopy(model)

    def mask_output_gradient(module: MePropLinear, inputs: tuple, out: torch.Tensor) -> None:
        def mask(grad: torch.Tensor) -> torch.Tensor:
            kept = grad.abs().topk(module.kept, dim=-1).indices
            return torch.zeros_like(grad).scatter_(-1, kept, grad.gather(-1, kept))
        if 0 < module.kept < out.shape[-1]:
            out.register_hook(mask)
    for layer in reference.modules():
        if isinstance(layer, MePropLinear):
            layer.kept, layer.k = layer.k, 0
            layer.register_forward_hook(mask_output_gradient)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(3))[:args.minibatch]
    x, y = data.train_x[order], data.train_y[order]
    for net in (model, reference):
        task.loss(net(x), y, "mean").backward()
    print(f"{config.activation}, k={config.k}, output_k={config.output_k}, minibatch {len(y)}:")
    for (name, ours), expected in zip(model.named_parameters(), reference.parameters()):
        grad = ours.grad.to_dense() if ours.grad.is_sparse else ours.grad
        print(f"  {name} {tuple(ours.shape)}: largest difference {float((grad - expected.grad).abs().max()):.3g}, "
              f"reference norm {float(expected.grad.norm()):.3g}")


if __name__ == "__main__":
    main()
