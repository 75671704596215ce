"""How much denormal Adam moments slow a dense Adam step, with and without flushing them to zero.

Usage: python scripts/denormal_adam.py [--threads N]

A [500, 784] weight (the paper's first layer) with torch's fused Adam; 40% of its moments are set
to 1e-39 (a denormal float32) before every step, where its gradient is zero, as for units that
stopped getting gradients. Prints the best of 30 steps for normal and denormal moments, with
flushing off and on (``torch.set_flush_denormal``).
"""

from __future__ import annotations

import argparse
import time

import torch


def best_step_us(denormal: bool) -> float:
    torch.manual_seed(0)
    weight = torch.randn(500, 784, requires_grad=True)
    adam = torch.optim.Adam([weight], lr=1e-3, fused=True)
    weight.grad = torch.zeros(500, 784)
    adam.step()
    state = adam.state[weight]
    mask = torch.rand(500, 784) < 0.4
    weight.grad = torch.randn(500, 784) * ~mask
    best = float("inf")
    for _ in range(30):
        if denormal:
            state["exp_avg"][mask] = 1e-39
            state["exp_avg_sq"][mask] = 1e-39
        start = time.perf_counter()
        adam.step()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    threads = parser.parse_args().threads
    torch.set_num_threads(threads)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        print(f"threads {threads}, flush denormals {'on ' if flush else 'off'}: normal moments "
              f"{best_step_us(False):.0f} us, 40% denormal moments {best_step_us(True):.0f} us")


if __name__ == "__main__":
    main()
