"""Measure the CI accuracy guard's cases (tests/data/accuracy_guard.yaml) over several seeds.

Prints, per case, the test accuracy of each seed and its spread; the floors in the YAML are set
from these by hand (lowest value minus a margin larger than the spread). Usage:
``python scripts/accuracy_guard_floors.py [--seeds 5] [--case NAME ...]``.

``--sabotage signed-topk|no-dx|no-zero-grad`` breaks the code on purpose (top-k by signed value
instead of magnitude; meProp layers pass no gradient down; gradients never zeroed) and reports,
for seed 1, which cases then fall below their floors: the guard must catch each of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import yaml

from mnist_meprop import ops
from mnist_meprop.config import validate
from mnist_meprop.data import load_data
from mnist_meprop.train import train_run

GUARD = Path(__file__).resolve().parent.parent / "tests" / "data" / "accuracy_guard.yaml"


def sabotage(kind: str) -> None:
    """Break one thing the guard must notice."""
    if kind == "signed-topk":
        os.environ["MEPROP_KERNELS"] = "torch"  # the compiled kernel picks its own top-k by magnitude

        def signed(dy: torch.Tensor, k: int, unified: bool, selection: str) -> torch.Tensor:
            scores = dy.sum(dim=0) if unified else dy
            return scores.topk(k, dim=-1, sorted=False).indices
        ops.select_indices = signed
    elif kind == "no-dx":
        real = ops._row_sparse_backward

        def no_dx(*args, **kwargs):
            dx, rows, w_values, b_values = real(*args, **kwargs)
            return (None if dx is None else torch.zeros_like(dx)), rows, w_values, b_values
        ops._row_sparse_backward = no_dx
    elif kind == "no-zero-grad":
        from mnist_meprop.optim import OptimizerGroup
        OptimizerGroup.zero_grad = lambda self, set_to_none=True: None
    else:
        raise SystemExit(f"--sabotage: expected signed-topk, no-dx or no-zero-grad, got {kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--case", action="append", help="only these cases (default: all)")
    parser.add_argument("--sabotage", help="signed-topk, no-dx or no-zero-grad: seed 1 of each case against its floor")
    args = parser.parse_args()
    spec = yaml.safe_load(GUARD.read_text(encoding="utf-8"))
    if args.sabotage:
        sabotage(args.sabotage)
        args.seeds = 1
    data = load_data(validate(spec["base"]))
    for name, case in spec["cases"].items():
        if args.case and name not in args.case:
            continue
        tests = []
        for seed in range(1, args.seeds + 1):
            config = validate({**spec["base"], **case["set"], "seed": seed})
            tests.append(train_run(config, data, lambda _line: None).test_acc)
        if args.sabotage:
            floor = case.get("floor")
            verdict = "no floor yet" if floor is None else ("CAUGHT (below floor)" if tests[0] < floor else "passes")
            print(f"{args.sabotage} / {name}: seed 1 test {tests[0]:.2f}, floor {floor}: {verdict}", flush=True)
            continue
        print(f"{name}: {', '.join(f'{t:.2f}' for t in tests)}  min {min(tests):.2f}  "
              f"mean {statistics.fmean(tests):.2f}  spread {max(tests) - min(tests):.2f}", flush=True)


if __name__ == "__main__":
    main()
