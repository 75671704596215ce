"""``convert``: put meProp into an existing PyTorch model by swapping its layers in place."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .layers import MePropLinear, MePropLSTM, MePropLSTMCell


def _meprop_version(module: nn.Module, name: str, k: int, unified: bool) -> nn.Module | None:
    """The meProp layer standing in for ``module`` (sharing its parameters), or None if it has none."""
    kind = type(module)  # exact types: subclasses (e.g. attention's out_proj) may not call their forward
    factory = {"device": "meta"}  # no memory for parameters about to be replaced by the module's own
    if kind is nn.Linear:
        swapped: nn.Module = MePropLinear(module.in_features, module.out_features, k, unified,
                                          bias=module.bias is not None, **factory)
    elif kind is nn.LSTM:
        if module.num_layers != 1 or module.bidirectional or module.proj_size:
            raise ValueError(f"convert: {name} is a {module.num_layers}-layer"
                             f"{', bidirectional' if module.bidirectional else ''}"
                             f"{', projected' if module.proj_size else ''} LSTM; MePropLSTM is one layer, one "
                             "direction: build it from MePropLSTM layers, or pass it in exclude")
        swapped = MePropLSTM(module.input_size, module.hidden_size, k, unified, bias=module.bias,
                             batch_first=module.batch_first, **factory)
    elif kind is nn.LSTMCell:
        swapped = MePropLSTMCell(module.input_size, module.hidden_size, k, unified, bias=module.bias, **factory)
    else:
        return None
    for parameter_name, parameter in module.named_parameters(recurse=False):
        setattr(swapped, parameter_name, parameter)
    swapped.train(module.training)
    return swapped


def convert(model: nn.Module, k: int, unified: bool = False, exclude: Iterable[str] = ()) -> tuple[nn.Module, list[str]]:
    """Swap every ``nn.Linear``, ``nn.LSTM`` (one layer, one direction) and ``nn.LSTMCell`` of
    ``model`` for :class:`MePropLinear`, :class:`MePropLSTM` and :class:`MePropLSTMCell` with this
    ``k`` (per-example top-k, or ``unified``), in place.

    The new layers hold the old layers' own parameter tensors, so the forward is unchanged and an
    optimizer built before the call still updates them. ``exclude`` names modules (as in
    ``model.named_modules()``, e.g. the output layer, which the paper leaves dense) to leave
    alone. Returns the model and the names of the swapped modules. Hooks registered on a
    swapped module are not carried over.
    """
    exclude = set(exclude)
    names = {name for name, _ in model.named_modules()}
    if unknown := sorted(exclude - names):
        raise ValueError(f"convert: exclude names no module of the model: {', '.join(unknown)}")
    swapped_names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if name in exclude:
                continue
            replacement = _meprop_version(child, name, k, unified)
            if replacement is not None:
                setattr(parent, child_name, replacement)
                swapped_names.append(name)
    return model, swapped_names
