"""Early training loss of per-example top-k meProp, from an independent reference implementation.

The model is plain ``nn.Linear`` layers; meProp is an autograd hook on each hidden layer's
output that keeps the top-k entries of ``dy`` per example (none of mnist_meprop's layers,
ops or kernels are used, only its data loading). It prints the mean training loss per 1,000
steps and the dev accuracy after them, to tell whether a training instability comes from the
method at a setting or from our implementation of it.

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

SETTINGS = [(0, "adagrad", 0.1), (10, "adagrad", 0.1), (0, "adagrad", 0.01), (10, "adagrad", 0.01),
            (0, "adam", 0.001), (20, "adam", 0.001), (0, "adam", 0.0001), (20, "adam", 0.0001),
            (100, "adam", 0.001), (160, "adam", 0.001)]


def keep_top_k(k: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        kept = grad.abs().topk(k, dim=1).indices
        return torch.zeros_like(grad).scatter_(1, kept, grad.gather(1, kept))
    return hook


def early_loss(data, k: int, optimizer: str, lr: float, steps: int, minibatch: int) -> tuple[list[float], float]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))
    opt = (torch.optim.Adagrad(model.parameters(), lr=lr, eps=1e-6) if optimizer == "adagrad"
           else torch.optim.Adam(model.parameters(), lr=lr))
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        for x, y in iterate_minibatches(data.train_x, data.train_y, minibatch, torch.Generator().manual_seed(epoch)):
            h1 = model[0](x)
            h2 = model[2](model[1](h1))
            if k:
                h1.register_hook(keep_top_k(k))
                h2.register_hook(keep_top_k(k))
            loss = F.cross_entropy(model[4](model[3](h2)), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    with torch.no_grad():
        dev = 100.0 * float((model(data.dev_x).argmax(1) == data.dev_y).float().mean())
    return [sum(losses[i:i + 1000]) / len(losses[i:i + 1000]) for i in range(0, steps, 1000)], dev


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
    for k, optimizer, lr in SETTINGS:
        chunks, dev = early_loss(data, k, optimizer, lr, args.steps, args.minibatch)
        print(f"{optimizer:8s} lr {lr:<7g} k={k:<4d} mean loss per 1000 steps "
              f"{', '.join(f'{c:.3f}' for c in chunks)}; dev {dev:.2f}%", flush=True)


if __name__ == "__main__":
    main()
