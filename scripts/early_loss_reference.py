"""Early training loss of per-example top-k meProp, from an independent reference implementation.

The model is plain ``nn.Linear`` layers; meProp is an autograd hook on each hidden layer's
output that keeps the top-k entries of ``dy`` per example (none of mnist_meprop's layers,
ops or kernels are used, only its data loading). It prints the mean training loss per 1,000
steps, the dev accuracy after them and the weight norms of the three layers, to tell whether
a training instability comes from the method at a setting or from our implementation of it,
and where it starts (meProp on both hidden layers, or on one of them).

    python scripts/early_loss_reference.py --data-dir /usr/share/datasets/fashion-mnist
    python scripts/early_loss_reference.py --dataset sample --steps 700
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from mnist_meprop.config import validate
from mnist_meprop.data import iterate_minibatches, load_data

BOTH, FIRST, SECOND = (0, 1), (0,), (1,)  # which hidden layers keep only the top-k of dy
SETTINGS = [(0, "adagrad", 0.1, BOTH), (10, "adagrad", 0.1, BOTH), (0, "adagrad", 0.01, BOTH),
            (10, "adagrad", 0.01, BOTH), (0, "adam", 0.001, BOTH), (20, "adam", 0.001, BOTH),
            (0, "adam", 0.0001, BOTH), (20, "adam", 0.0001, BOTH), (100, "adam", 0.001, BOTH),
            (160, "adam", 0.001, BOTH), (20, "adam", 0.001, FIRST), (20, "adam", 0.001, SECOND),
            (0, "sgd", 0.1, BOTH), (20, "sgd", 0.1, BOTH)]
OPTIMIZERS = {"adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, eps=1e-6),
              "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
              "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr)}


def keep_top_k(k: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = grad.abs().topk(k, dim=1).indices
        return torch.zeros_like(grad).scatter_(1, kept, grad.gather(1, kept))
    return hook


def early_loss(data, k: int, optimizer: str, lr: float, masked: tuple[int, ...], steps: int,
               minibatch: int) -> tuple[list[float], float, list[float]]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))
    opt = OPTIMIZERS[optimizer](model.parameters(), lr)
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        for x, y in iterate_minibatches(data.train_x, data.train_y, minibatch, torch.Generator().manual_seed(epoch)):
            h1 = model[0](x)
            h2 = model[2](model[1](h1))
            for layer, output in enumerate((h1, h2)):
                if k and layer in masked:
                    output.register_hook(keep_top_k(k))
            loss = F.cross_entropy(model[4](model[3](h2)), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    with torch.no_grad():
        dev = 100.0 * float((model(data.dev_x).argmax(1) == data.dev_y).float().mean())
    norms = [float(layer.weight.norm()) for layer in model if isinstance(layer, nn.Linear)]
    return [sum(losses[i:i + 1000]) / len(losses[i:i + 1000]) for i in range(0, steps, 1000)], dev, norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="idx", choices=["idx", "sample"])
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minibatch", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    raw = {"dataset": args.dataset, "dev_size": 1000 if args.dataset == "sample" else 5000}
    if args.dataset == "idx":
        raw["data_dir"] = args.data_dir
    data = load_data(validate(raw))
    print(f"{args.dataset}, minibatch {args.minibatch}, {args.steps} steps, 784-500-500-10, seed 1, 1 thread")
    for k, optimizer, lr, masked in SETTINGS:
        chunks, dev, norms = early_loss(data, k, optimizer, lr, masked, args.steps, args.minibatch)
        where = "" if not k else {BOTH: " (both layers)", FIRST: " (1st layer)", SECOND: " (2nd layer)"}[masked]
        print(f"{optimizer:8s} lr {lr:<7g} k={k:<4d}{where:14s} mean loss per 1000 steps "
              f"{', '.join(f'{c:.3f}' for c in chunks)}; dev {dev:.2f}%; weight norms "
              f"{', '.join(f'{n:.1f}' for n in norms)}", flush=True)


if __name__ == "__main__":
    main()
