"""The meProp linear map as an autograd function, and the clock that times its backward.

Forward is the ordinary ``y = x W^T + b``. Backward keeps only ``k`` entries of the output
gradient ``dy`` (the rest are treated as zero) and computes ``dx``, ``dW`` and ``db`` from
that masked ``dy``. Every linear layer of the model, the dense baseline included, runs its
backward through :func:`meprop_linear`, so the "linear backward" time of the paper is
measured through the same code path for meProp and for the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

SELECTIONS = ("topk", "random")


class LinearBackwardClock:
    """Sums the wall time spent inside the backward of :func:`meprop_linear`."""

    def __init__(self) -> None:
        self.seconds = 0.0


_active_clock: LinearBackwardClock | None = None


@contextmanager
def time_linear_backward() -> Iterator[LinearBackwardClock]:
    """Within the block, every meProp/linear backward adds its wall time to the clock.

    CPU autograd runs the backward on the calling thread, so the time is exactly the
    compute (and top-k selection) of the linear layers' backward.
    """
    global _active_clock
    previous, _active_clock = _active_clock, LinearBackwardClock()
    try:
        yield _active_clock
    finally:
        _active_clock = previous


def is_meprop_active(k: int, out_features: int) -> bool:
    """True when ``k`` really sparsifies the gradient; ``k <= 0`` or ``k >= d`` is dense."""
    return 0 < k < out_features


def select_indices(dy: torch.Tensor, k: int, unified: bool, selection: str) -> torch.Tensor:
    """Pick the ``k`` output coordinates of a 2-D gradient ``dy`` ``[N, out]`` to keep.

    Returns ``[k]`` indices shared by all rows when ``unified`` (top-k of the column sums
    of ``|dy|``), else ``[N, k]`` indices, one set per row. ``selection="random"`` draws
    the indices uniformly at random from torch's global generator instead.
    """
    n_rows, out_features = dy.shape
    if selection == "topk":
        scores = dy.abs().sum(dim=0) if unified else dy.abs()
        return scores.topk(k, dim=-1, sorted=False).indices
    if selection == "random":
        if unified:
            return torch.randperm(out_features, device=dy.device)[:k]
        return torch.rand(n_rows, out_features, device=dy.device).topk(k, dim=-1, sorted=False).indices
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")


class _MePropLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, k, unified, selection):  # type: ignore[override]
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_dw else None, weight if needs_dx else None)
        ctx.k, ctx.unified, ctx.selection = k, unified, selection
        ctx.has_bias = bias is not None
        ctx.weight_shape = weight.shape
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        clock = _active_clock
        start = time.perf_counter() if clock is not None else 0.0
        x, weight = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        out_features = dy.shape[-1]
        dy2 = dy.reshape(-1, out_features)
        if is_meprop_active(ctx.k, out_features):
            grads = _sparse_backward(dy2, x, weight, ctx.weight_shape, ctx.k, ctx.unified, ctx.selection,
                                     needs_dx, needs_dw, needs_db)
        else:
            grads = _dense_backward(dy2, x, weight, needs_dx, needs_dw, needs_db)
        dx, dw, db = grads
        if dx is not None:
            dx = dx.reshape(*dy.shape[:-1], dx.shape[-1])
        if clock is not None:
            clock.seconds += time.perf_counter() - start
        return dx, dw, (db if ctx.has_bias else None), None, None, None


def _dense_backward(dy2, x, weight, needs_dx, needs_dw, needs_db):
    """The backward of ``F.linear``: the same two matmuls and sum torch itself runs."""
    dx = dy2.mm(weight) if needs_dx else None
    dw = dy2.t().mm(x.reshape(-1, x.shape[-1])) if needs_dw else None
    db = dy2.sum(dim=0) if needs_db else None
    return dx, dw, db


def _sparse_backward(dy2, x, weight, weight_shape, k, unified, selection, needs_dx, needs_dw, needs_db):
    """Backward from ``dy`` with all but ``k`` entries per row (or per batch) zeroed."""
    indices = select_indices(dy2, k, unified, selection)
    if unified:
        # One index set: the kept columns of dy form a dense [N, k] block.
        dy_kept = dy2.index_select(1, indices)
        dx = dy_kept.mm(weight.index_select(0, indices)) if needs_dx else None
        dw = db = None
        if needs_dw:
            dw = dy2.new_zeros(weight_shape)
            dw.index_copy_(0, indices, dy_kept.t().mm(x.reshape(-1, x.shape[-1])))
        if needs_db:
            db = dy2.new_zeros(dy2.shape[1])
            db.index_copy_(0, indices, dy_kept.sum(dim=0))
        return dx, dw, db
    masked = torch.zeros_like(dy2).scatter_(1, indices, dy2.gather(1, indices))
    return _dense_backward(masked, x, weight, needs_dx, needs_dw, needs_db)


def meprop_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    unified: bool = True,
    selection: str = "topk",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward keeps only ``k`` entries of ``dy``.

    ``weight`` is ``[out, in]`` as in ``torch.nn.Linear``; ``x`` is ``[..., in]``. Every
    leading dimension of ``x`` counts as examples. With ``unified=False`` each example keeps
    its own top-``k`` entries of ``|dy|``; with ``unified=True`` all examples keep the same
    ``k`` coordinates, those with the largest sum of ``|dy|`` over the batch.
    ``selection="random"`` picks ``k`` random coordinates instead (the paper's ablation).
    ``k <= 0`` or ``k >= out`` is ordinary backprop.

    The gradients of ``x``, ``weight`` *and* ``bias`` are the dense gradients of the
    masked ``dy``: the bias, too, uses the masked ``dy``, so only the ``k`` selected rows
    of ``[weight | bias]`` receive a gradient. (The paper's original GPU code used the full
    ``dy`` for the bias; the masked one keeps the update row-sparse.)
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return _MePropLinearFunction.apply(x, weight, bias, int(k), bool(unified), selection)
