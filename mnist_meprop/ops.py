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

from .kernels import cpu_kernels

SELECTIONS = ("topk", "random")
BIAS_GRADS = ("masked", "full")


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


class TopkCounter:
    """How often each output unit was among an example's selected k (meSimp's activeness).

    ``counts[j]`` is the number of counted examples whose selection included unit ``j``;
    ``examples`` is the number of examples counted. In unified mode every example counts the
    shared set; when a layer's backward is dense (``k >= out``) every unit counts.
    """

    def __init__(self, out_features: int, device: torch.device | str | None = None) -> None:
        self.counts = torch.zeros(out_features, dtype=torch.float64, device=device)
        self.examples = 0

    def record(self, indices: torch.Tensor, n_examples: int) -> None:
        """``indices``: ``[n_examples, k]`` per-example sets, or ``[k]`` shared by all examples."""
        hits = torch.bincount(indices.reshape(-1), minlength=len(self.counts)).to(self.counts.dtype)
        self.counts += hits if indices.dim() == 2 else hits * n_examples
        self.examples += n_examples

    def record_all(self, n_examples: int) -> None:
        self.counts += n_examples
        self.examples += n_examples


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
    def forward(ctx, x, weight, bias, k, unified, selection, sparse_grad, counter, full_bias):  # type: ignore[override]
        needs_dx, needs_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_dw else None, weight if needs_dx else None)
        ctx.k, ctx.unified, ctx.selection, ctx.counter = k, unified, selection, counter
        ctx.full_bias = full_bias
        # Row-sparse gradients are written straight into .grad (see meprop_linear's docstring).
        ctx.sparse_params = (weight, bias) if sparse_grad and is_meprop_active(k, weight.shape[0]) else None
        ctx.has_bias = bias is not None
        ctx.weight_shape = weight.shape
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        clock = _active_clock
        if clock is not None and dy.is_cuda:
            torch.cuda.synchronize(dy.device)  # time the GPU work, not just its launch
        start = time.perf_counter() if clock is not None else 0.0
        x, weight = ctx.saved_tensors
        needs_dx, needs_dw, needs_db = ctx.needs_input_grad[:3]
        out_features, in_features = ctx.weight_shape
        dy2 = dy.reshape(-1, out_features)
        x2 = x.reshape(-1, in_features) if x is not None else None
        if is_meprop_active(ctx.k, out_features):
            dx, rows, w_values, b_values = _row_sparse_backward(
                dy2, x2, weight, ctx.k, ctx.unified, ctx.selection, needs_dx, needs_dw, ctx.counter)
            full_db = dy2.sum(dim=0) if needs_db and ctx.full_bias else None
            if ctx.sparse_params is not None:
                weight_param, bias_param = ctx.sparse_params
                if needs_dw:
                    accumulate_sparse(weight_param, rows, w_values)
                if needs_db and not ctx.full_bias:
                    accumulate_sparse(bias_param, rows, b_values)
                dw, db = None, full_db
            else:
                dw = values_to_dense(rows, w_values, ctx.weight_shape) if needs_dw else None
                db = full_db if ctx.full_bias else (values_to_dense(rows, b_values, (out_features,)) if needs_db else None)
        else:
            dx, dw, db = _dense_backward(dy2, x2, weight, needs_dx, needs_dw)
            db = db if needs_db else None
        if dx is not None:
            dx = dx.reshape(*dy.shape[:-1], in_features)
        if clock is not None:
            if dy.is_cuda:
                torch.cuda.synchronize(dy.device)
            clock.seconds += time.perf_counter() - start
        return dx, dw, (db if ctx.has_bias else None), None, None, None, None, None, None


def _dense_backward(dy2, x2, weight, needs_dx, needs_dw):
    """``(dx or None, dW or None, db)`` of a linear layer from the whole ``dy``: the CPU kernel
    (its own loops for narrow layers, where MKL's small GEMMs use two threads poorly), else two mm."""
    kernels = cpu_kernels() if dy2.device.type == "cpu" else None
    if kernels is not None:
        dx, dw, db = kernels.dense_backward(dy2.contiguous(), x2.contiguous() if needs_dw else None,
                                            weight.contiguous() if needs_dx else None, needs_dx, needs_dw)
        return (dx if needs_dx else None), (dw if needs_dw else None), db
    return (dy2.mm(weight) if needs_dx else None), (dy2.t().mm(x2) if needs_dw else None), dy2.sum(dim=0)


# A dense layer narrow enough for the kernel's own dense backward (at most kernels.NARROW_OUT wide
# and kernels.NARROW_ROWS rows; above, MKL is faster) takes it, through this module's autograd node
# instead of torch's, when its rows x in x out are at least NARROW_LAYER_WORK multiply-adds.
# Forward + backward of a 10-wide layer against F.linear's, 2 threads, interleaved (AMD EPYC VM):
# 1.33x faster at 50 x 2000 (the output layer of a 2000-wide MLP at minibatch 50), 1.52x at
# 200 x 500, 1.10x at 50 x 500, but 0.88x at 10 x 2000 and 0.97x at 10 x 500, where the Python
# node costs more than it saves.
NARROW_LAYER_WORK = 1 << 19


def _narrow_layer_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or weight.dtype != torch.float32 or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or weight.requires_grad):
        return False
    kernels = cpu_kernels()
    out_features, in_features = weight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    return (kernels is not None and out_features <= kernels.NARROW_OUT and rows <= kernels.NARROW_ROWS
            and rows * in_features * out_features >= NARROW_LAYER_WORK)


def values_to_dense(rows: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A dense tensor of ``shape``: ``values`` at ``rows``, zero elsewhere (this zero-fills)."""
    return values.new_zeros(shape).index_copy_(0, rows, values)


def accumulate_sparse(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``param.grad += `` the row-sparse gradient, as a sparse COO tensor (what backward() would do)."""
    grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape, is_coalesced=True,
                                   check_invariants=False)
    param.grad = grad if param.grad is None else param.grad + grad


def _row_sparse_backward(dy2, x2, weight, k, unified, selection, needs_dx, needs_dw, counter=None):
    """``dx`` and the row-sparse ``dW``/``db`` of a linear layer from ``dy`` masked to k entries.

    Returns ``(dx or None, rows, weight rows, bias rows)``; rows are sorted and unique. No work
    proportional to ``out x in`` is done: unified mode multiplies the ``[N, k]`` block of kept
    columns; per-example mode touches only each example's own k rows. A ``counter`` records the
    selected indices.
    """
    kernels = cpu_kernels() if dy2.device.type == "cpu" else None
    if unified and kernels is not None and selection == "topk":  # one call instead of half a dozen ops
        dx, rows, w_values, b_values = kernels.unified_backward(
            dy2.contiguous(), x2.contiguous() if needs_dw else None, weight.contiguous() if needs_dx else None,
            k, needs_dx, needs_dw)
        if counter is not None:
            counter.record(rows, dy2.shape[0])
        return dx, rows, w_values, b_values
    if unified:
        rows = select_indices(dy2, k, True, selection).sort().values
        if counter is not None:
            counter.record(rows, dy2.shape[0])
        dy_kept = dy2.index_select(1, rows)
        dx = dy_kept.mm(weight.index_select(0, rows)) if needs_dx else None
        w_values = dy_kept.t().mm(x2) if needs_dw else None
        return dx, rows, w_values, dy_kept.sum(dim=0)
    if kernels is not None:
        given = None
        if selection != "topk" or counter is not None:  # the kernel picks top-k itself unless given the sets
            given = select_indices(dy2, k, False, selection).sort(dim=1).values
            if counter is not None:
                counter.record(given, dy2.shape[0])
        dx, rows, w_values, b_values = kernels.per_example_backward(
            dy2.contiguous(), x2.contiguous() if needs_dw else None, weight if needs_dx else None,
            given, k, needs_dx, needs_dw)
        return (dx if needs_dx else None), rows, (w_values if needs_dw else None), b_values
    indices = select_indices(dy2, k, False, selection)
    if counter is not None:
        counter.record(indices, dy2.shape[0])
    kept = dy2.gather(1, indices)
    n_rows, in_features = dy2.shape[0], (x2.shape[1] if x2 is not None else weight.shape[1])
    dx = None
    if needs_dx:
        picked = weight.index_select(0, indices.reshape(-1)).view(n_rows, k, in_features)
        dx = torch.bmm(kept.unsqueeze(1), picked).squeeze(1)
    rows, slot = torch.unique(indices, sorted=True, return_inverse=True)
    slot = slot.reshape(-1)
    b_values = kept.new_zeros(len(rows)).index_add_(0, slot, kept.reshape(-1))
    w_values = None
    if needs_dw:
        outer = (kept.unsqueeze(2) * x2.unsqueeze(1)).reshape(-1, in_features)
        w_values = kept.new_zeros(len(rows), in_features).index_add_(0, slot, outer)
    return dx, rows, w_values, b_values


def meprop_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    unified: bool = True,
    selection: str = "topk",
    sparse_grad: bool = False,
    counter: TopkCounter | None = None,
    bias_grad: str = "masked",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward keeps only ``k`` entries of ``dy``.

    ``weight`` is ``[out, in]`` as in ``torch.nn.Linear``; ``x`` is ``[..., in]``. Every
    leading dimension of ``x`` counts as examples. With ``unified=False`` each example keeps
    its own top-``k`` entries of ``|dy|``; with ``unified=True`` all examples keep the same
    ``k`` coordinates, those with the largest sum of ``|dy|`` over the batch.
    ``selection="random"`` picks ``k`` random coordinates instead (the paper's ablation).
    ``k <= 0`` or ``k >= out`` is ordinary backprop (``F.linear`` itself, except inside
    :func:`time_linear_backward`, where it runs the same timed path as meProp, and for a large
    enough narrow layer on the CPU, whose dense backward the compiled kernel does faster).

    The gradients of ``x``, ``weight`` *and* ``bias`` are the dense gradients of the
    masked ``dy``: with ``bias_grad="masked"`` (the default) the bias, too, uses the masked
    ``dy``, so only the ``k`` selected rows of ``[weight | bias]`` receive a gradient and the
    update stays row-sparse. ``bias_grad="full"`` is what both of the authors' programs do: top-k
    applies to the matmul only and the bias gets the full ``dy`` (a dense bias gradient).

    ``sparse_grad=True`` gives ``weight`` and ``bias`` sparse COO gradients holding just the
    selected rows, so the backward does no ``out x in`` work; use it with an optimizer that
    accepts them (see :mod:`mnist_meprop.optim`). To spare autograd's per-tensor overhead,
    these gradients are added to ``weight.grad`` / ``bias.grad`` by the backward itself, as
    ``loss.backward()`` would, so ``torch.autograd.grad`` and tensor hooks do not see them.
    With ``False`` (the default) they are ordinary dense tensors through autograd, for any
    optimizer and any autograd use.

    A ``counter`` (:class:`TopkCounter`) records which units each example selected, for meSimp;
    with a dense backward every unit counts, recorded at the forward.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if bias_grad not in BIAS_GRADS:
        raise ValueError(f"bias_grad must be one of {BIAS_GRADS}, got {bias_grad!r}")
    active = is_meprop_active(int(k), weight.shape[0])
    if counter is not None and not active and torch.is_grad_enabled():
        counter.record_all(x.numel() // x.shape[-1])
    if _active_clock is None and not active and not _narrow_layer_pays(x, weight):
        return F.linear(x, weight, bias)  # plain backprop: torch's own path, as fast as nn.Linear
    return _MePropLinearFunction.apply(x, weight, bias, int(k), bool(unified), selection, bool(sparse_grad),
                                       counter, bias_grad == "full")
