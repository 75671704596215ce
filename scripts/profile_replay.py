"""Where the bench's replayed linear backward spends its time: the MLP 784-d-d-10 with meProp.

Usage: python scripts/profile_replay.py [--d 2000] [--minibatch 50] [--k 20] [--per-example]
                                        [--threads 2] [--replays 500]

Builds the model ``meprop bench`` times (row-sparse gradients, unified top-k unless
``--per-example``), captures one real backward's layer inputs and output gradients, and replays
the linear layers' backward as the bench does. Prints (1) the replay's median time next to stock
PyTorch's dense replay, (2) the time spent inside each compiled-kernel call and in building the
row-sparse gradient tensors, per replay (each call wrapped in a timer), the rest being autograd's
engine and the Python ``backward`` of each layer, and (3) torch.profiler's operator table over the
replays (the kernels run inside ``_MePropLinearFunctionBackward`` without ATen operators of their
own).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mnist_meprop import bench, ops
from mnist_meprop.kernels import cpu_kernels
from mnist_meprop.model import build_mlp


class _TimedKernels:
    """The compiled kernels, each call adding its wall time to ``seconds[name]``."""

    def __init__(self, kernels, seconds: dict[str, float]) -> None:
        self._kernels, self._seconds = kernels, seconds

    def __getattr__(self, name: str):
        function = getattr(self._kernels, name)

        def timed(*args):
            start = time.perf_counter()
            result = function(*args)
            self._seconds[name] += time.perf_counter() - start
            return result
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2000)
    parser.add_argument("--minibatch", type=int, default=50)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--per-example", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replays", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the compiled CPU kernels are not available here")
    torch.manual_seed(0)
    x = torch.rand(args.minibatch, bench.D_INPUT)
    y = torch.randint(0, bench.N_CLASSES, (args.minibatch,))
    stamps = bench._Stamps(torch.device("cpu"))
    model = build_mlp(bench.D_INPUT, bench.N_CLASSES, args.d, 3, args.k, unified=not args.per_example,
                      sparse_grad=True)
    replay, _ = bench._linear_backward_replay(model, x, y, stamps)
    stock_replay, _ = bench._linear_backward_replay(bench._dense_mlp(args.d), x, y, stamps)
    replay(50)
    stock_replay(5)
    mode = "per-example" if args.per_example else "unified"
    print(f"d={args.d}, minibatch {args.minibatch}, {mode} k={args.k}, {args.threads} threads")
    print(f"replayed linear backward: meProp {replay(args.replays) * 1e6:.0f} us (median), "
          f"stock dense {stock_replay(20) * 1e6:.0f} us")

    seconds: dict[str, float] = defaultdict(float)
    timed = _TimedKernels(kernels, seconds)
    original_kernels, original_accumulate = ops.cpu_kernels, ops.accumulate_sparse

    def timed_accumulate(*accumulate_args) -> None:
        start = time.perf_counter()
        original_accumulate(*accumulate_args)
        seconds["row-sparse gradient tensors"] += time.perf_counter() - start
    ops.cpu_kernels, ops.accumulate_sparse = (lambda: timed), timed_accumulate
    try:
        median = replay(args.replays)
    finally:
        ops.cpu_kernels, ops.accumulate_sparse = original_kernels, original_accumulate
    parts = ", ".join(f"{name} {total / args.replays * 1e6:.0f} us" for name, total in seconds.items())
    print(f"with each call timed: replay {median * 1e6:.0f} us; per replay: {parts}")

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        replay(args.replays)
    print(f"torch.profiler over {args.replays} replays (the profiler adds its own cost):")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
