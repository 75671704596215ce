"""The meProp LSTM as an autograd function: back-propagation through time keeping, at every time
step, only the top-k entries of each gate's pre-activation gradient.

A one-layer LSTM computes, per time step, the gate pre-activations ``a = x W_ih^T + b_ih +
h W_hh^T + b_hh`` (``[N, 4H]``, gates in torch's order i, f, g, o) and from them the new cell and
hidden state. meProp treats ``a`` as the output of a linear layer: its gradient ``da`` keeps, for
each of the four gates, the ``k`` of its ``H`` entries largest in magnitude (per example, or
shared by the minibatch with ``unified``) and the rest is zero. Everything that follows from
``da`` is the dense gradient of that masked ``da``: ``dx``, ``dW_ih``, ``dW_hh``, the biases and
the gradient flowing to the previous hidden state, which therefore gathers only ``4k`` rows of
``W_hh`` per example. The cell-state path (``dc``) is elementwise and untouched.
"""

from __future__ import annotations

import time

import torch
from torch.autograd.function import once_differentiable

from . import ops
from .kernels import cpu_kernels
from .ops import BIAS_GRADS, SELECTIONS, accumulate_sparse, is_meprop_active, values_to_dense

GATES = 4


def gate_selection(da: torch.Tensor, k: int, unified: bool, selection: str) -> torch.Tensor:
    """Indices into the ``4H`` gate pre-activations kept for each example: ``[N, 4k]``.

    Each gate (i, f, g, o) keeps ``k`` of its ``H`` entries: the largest ``|da|`` of the example
    (per-example), the largest sum of ``|da|`` over the minibatch (``unified``, the same for every
    example), or ``k`` at random (``selection="random"``).
    """
    n, width = da.shape
    hidden = width // GATES
    per_gate = da.view(n, GATES, hidden)
    if selection == "topk":
        scores = per_gate.abs().sum(dim=0, keepdim=True) if unified else per_gate.abs()
    elif selection == "random":
        scores = torch.rand(1 if unified else n, GATES, hidden, device=da.device)
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    chosen = scores.topk(k, dim=-1, sorted=False).indices  # [1 or N, 4, k], within each gate
    chosen = chosen + torch.arange(GATES, device=da.device).view(1, GATES, 1) * hidden
    return chosen.reshape(chosen.shape[0], GATES * k).expand(n, GATES * k)


class _MePropLSTMFunction(torch.autograd.Function):
    """Forward and back-propagation through time of a one-layer LSTM, time-major ``x [T, N, I]``."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, k, unified, selection, full_bias, sparse_grad):  # type: ignore[override]
        steps = x.shape[0]
        hidden = w_hh.shape[1]
        pre = torch.matmul(x, w_ih.t())  # the input part of every step at once: [T, N, 4H]
        if b_ih is not None:
            pre = pre + (b_ih + b_hh)
        n = x.shape[1]
        # every step writes into these (few ops per step: the loop's cost is per op, not arithmetic)
        gates = x.new_empty(steps, n, GATES * hidden)  # i, f, g, o after their nonlinearities
        cs = x.new_empty(steps + 1, n, hidden)  # c_0 .. c_T
        tanh_cs = x.new_empty(steps, n, hidden)  # tanh(c_1) .. tanh(c_T), for the backward too
        out = x.new_empty(steps, n, hidden)
        cs[0] = c0
        h = h0
        for t in range(steps):
            step_gates = gates[t]
            a = torch.addmm(pre[t], h, w_hh.t())
            torch.sigmoid(a, out=step_gates)
            torch.tanh(a[:, 2 * hidden:3 * hidden], out=step_gates[:, 2 * hidden:3 * hidden])
            i, f, g, o = step_gates.split(hidden, dim=1)
            torch.addcmul(f * cs[t], i, g, out=cs[t + 1])
            torch.tanh(cs[t + 1], out=tanh_cs[t])
            h = torch.mul(o, tanh_cs[t], out=out[t])
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, cs, gates, tanh_cs)
        ctx.k, ctx.unified, ctx.selection, ctx.full_bias = k, unified, selection, full_bias
        ctx.has_bias = b_ih is not None
        # Row-sparse gradients are written straight into .grad, as meprop_linear does with sparse_grad.
        ctx.sparse_params = (w_ih, w_hh, b_ih, b_hh) if sparse_grad else None
        return out, h.clone(), cs[steps].clone()  # not views of the saved buffers

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_last, d_c_last):  # type: ignore[override]
        x, h0, w_ih, w_hh, out, cs, gates, tanh_cs = ctx.saved_tensors
        steps, n, hidden = out.shape
        d_out = d_out if d_out is not None else torch.zeros_like(out)
        dh = d_h_last if d_h_last is not None else torch.zeros_like(h0)
        dc = d_c_last if d_c_last is not None else torch.zeros_like(h0)
        previous_h = torch.cat((h0.unsqueeze(0), out[:-1]))
        kernels = cpu_kernels() if x.device.type == "cpu" else None
        start = time.perf_counter()
        if (is_meprop_active(ctx.k, hidden) and not ctx.unified and ctx.selection == "topk"
                and kernels is not None):
            # the whole sequence in one C++ call: each step costs what its 4k kept rows cost
            dx, dh, dc, rows, w_ih_values, w_hh_values, b_values, db_full = kernels.lstm_per_example_backward(
                gates, cs, tanh_cs, previous_h.contiguous(), x.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
                d_out.contiguous(), dh.contiguous(), dc.contiguous(), ctx.k, ctx.needs_input_grad[0])
            if ctx.sparse_params is not None:
                w_ih_param, w_hh_param, b_ih_param, b_hh_param = ctx.sparse_params
                accumulate_sparse(w_ih_param, rows, w_ih_values)
                accumulate_sparse(w_hh_param, rows, w_hh_values)
                if ctx.has_bias and not ctx.full_bias:
                    accumulate_sparse(b_ih_param, rows, b_values)
                    accumulate_sparse(b_hh_param, rows, b_values.clone())
                dw_ih = dw_hh = None
                db = db_full if ctx.has_bias and ctx.full_bias else None
            else:
                dw_ih = values_to_dense(rows, w_ih_values, w_ih.shape)
                dw_hh = values_to_dense(rows, w_hh_values, w_hh.shape)
                db = (db_full if ctx.full_bias else values_to_dense(rows, b_values, db_full.shape)) if ctx.has_bias else None
            linear_seconds = time.perf_counter() - start  # the gates' elementwise backward included
        else:
            dx, dh, dc, dw_ih, dw_hh, db, linear_seconds = _backward_through_time(
                ctx, x, w_ih, w_hh, cs, tanh_cs, gates, previous_h, d_out, dh, dc)
        if ops._active_clock is not None:
            ops._active_clock.seconds += linear_seconds
        return dx, dh, dc, dw_ih, dw_hh, db, (db.clone() if db is not None else None), None, None, None, None, None


def _backward_through_time(ctx, x, w_ih, w_hh, cs, tanh_cs, gates, previous_h, d_out, dh, dc):
    """BPTT step by step with torch ops (unified or random selection, dense k, other devices).
    Returns the gradients and the seconds spent in its linear parts."""
    steps, n, width = gates.shape
    hidden = width // GATES
    active = is_meprop_active(ctx.k, hidden)
    linear_seconds = 0.0
    d_pre = torch.empty_like(gates)  # the masked gate gradients, every step
    d_pre_full_sum = gates.new_zeros(width) if ctx.full_bias and active else None
    for t in range(steps - 1, -1, -1):
        i, f, g, o = gates[t].split(hidden, dim=1)
        dh = dh + d_out[t]
        tanh_c = tanh_cs[t]  # tanh(c_t), kept by the forward
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        da = torch.cat((dc * g * i * (1 - i), dc * cs[t] * f * (1 - f), dc * i * (1 - g * g),
                        dh * tanh_c * o * (1 - o)), dim=1)
        dc = dc * f
        start = time.perf_counter()
        if active:
            if d_pre_full_sum is not None:
                d_pre_full_sum += da.sum(dim=0)
            kept = gate_selection(da, ctx.k, ctx.unified, ctx.selection)
            values = da.gather(1, kept)
            d_pre[t].zero_().scatter_(1, kept, values)
            # the recurrence: only the 4k kept rows of W_hh (per example, or shared when unified)
            if ctx.unified:
                dh = values.mm(w_hh.index_select(0, kept[0]))
            else:
                dh = torch.bmm(values.unsqueeze(1), w_hh[kept]).squeeze(1)
        else:
            d_pre[t] = da
            dh = da.mm(w_hh)
        linear_seconds += time.perf_counter() - start
    start = time.perf_counter()
    flat = d_pre.reshape(steps * n, width)
    dx = torch.matmul(d_pre, w_ih) if ctx.needs_input_grad[0] else None
    dw_ih = flat.t().mm(x.reshape(steps * n, -1)) if ctx.needs_input_grad[3] else None
    dw_hh = flat.t().mm(previous_h.reshape(steps * n, hidden)) if ctx.needs_input_grad[4] else None
    db = None
    if ctx.has_bias:
        db = d_pre_full_sum if d_pre_full_sum is not None else flat.sum(dim=0)
    linear_seconds += time.perf_counter() - start
    return dx, dh, dc, dw_ih, dw_hh, db, linear_seconds


def meprop_lstm(x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, k: int, unified: bool = False,
                selection: str = "topk", bias_grad: str = "masked", sparse_grad: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A one-layer LSTM over time-major ``x [T, N, I]`` from ``hx = (h0, c0)`` (each ``[N, H]``),
    with torch's parameter layout (``w_ih [4H, I]``, ``w_hh [4H, H]``, gates i, f, g, o).

    Returns ``(output [T, N, H], (h_T, c_T))`` as ``torch.nn.LSTM`` does. The backward keeps ``k``
    entries of each gate's pre-activation gradient per time step (see the module docstring);
    ``k <= 0`` or ``k >= H`` is ordinary back-propagation through time, through the same code.
    ``bias_grad="full"`` gives the biases the gradient of the unmasked gates, as the authors' code.
    ``sparse_grad=True`` (per-example top-k on the CPU with the compiled kernels) adds the weights'
    and masked biases' gradients to their ``.grad`` as row-sparse COO tensors of the kept gate rows,
    as :func:`mnist_meprop.meprop_linear` does, so no weight-sized gradient is written; elsewhere
    the gradients are dense.
    """
    if bias_grad not in BIAS_GRADS:
        raise ValueError(f"bias_grad must be one of {BIAS_GRADS}, got {bias_grad!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    out, h, c = _MePropLSTMFunction.apply(x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, int(k), bool(unified),
                                          selection, bias_grad == "full", bool(sparse_grad))
    return out, (h, c)
