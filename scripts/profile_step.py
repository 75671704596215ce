"""Where a training step's time goes: torch.profiler over fused steps of the paper's MLP.

Usage: python scripts/profile_step.py [--d 500] [--minibatch 10] [--k 20] [--unified] [--threads 2]
                                      [--steps 2000] [--optimizer adam]

Trains the MLP 784-d-d-10 through the fused engine (``engine: fused``) on the bundled sample's
digits, warms up for 300 steps, then profiles ``--steps`` steps and prints (1) the engine's own
phase timers (mean µs per step) and (2) torch.profiler's table of the ATen operators the C++
step calls, by self CPU time. The compiled kernels' own loops (top-k, row sums, the exact
update) run inside the step without ATen operators of their own: their time is what the step
totals leave after the operators listed. Denormals are flushed, as in the end-to-end runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mnist_meprop.config import validate
from mnist_meprop.data import bundled_sample_dir, load_idx_folder
from mnist_meprop.engine import PHASE_NAMES, FusedMLPStep
from mnist_meprop.kernels import set_flush_denormal
from mnist_meprop.model import build_mlp
from mnist_meprop.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=500)
    parser.add_argument("--minibatch", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--unified", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--optimizer", choices=("adam", "adagrad"), default="adam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_flush_denormal(True)
    images, labels, _, _ = load_idx_folder(bundled_sample_dir())
    x_all = images.reshape(len(images), -1).float().div_(255)
    y_all = labels.long()
    config = validate({"optimizer": args.optimizer, "d_hidden": args.d, "k": args.k, "unified": args.unified,
                       "engine": "fused"})
    torch.manual_seed(0)
    model = build_mlp(784, 10, args.d, 3, args.k, unified=args.unified, sparse_grad=True)
    step = FusedMLPStep(config, model, build_optimizer(config, model))
    n = args.minibatch
    batches = [(x_all[i * n:(i + 1) * n], y_all[i * n:(i + 1) * n]) for i in range(len(x_all) // n)]
    for i in range(300):
        step.step(*batches[i % len(batches)])
    phases = dict.fromkeys(PHASE_NAMES, 0.0)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for i in range(args.steps):
            _, _, seconds = step.step(*batches[(300 + i) % len(batches)])
            for name in PHASE_NAMES:
                phases[name] += seconds[name]
        wall = time.perf_counter() - start
    print(f"# fused step, d={args.d}, minibatch {n}, {'unified' if args.unified else 'per-example'} k={args.k}, "
          f"{args.optimizer}, {args.threads} threads, {args.steps} steps (profiler on)\n")
    print(f"step (wall, Python call included): {wall / args.steps * 1e6:.1f} µs")
    for name in PHASE_NAMES:
        print(f"  {name}: {phases[name] / args.steps * 1e6:.1f} µs")
    print()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
