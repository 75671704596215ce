"""The compiled CPU kernels (``csrc/meprop_cpu.cpp``), built on first use, with a PyTorch fallback.

``MEPROP_KERNELS=auto`` (default) builds the extension with torch's C++ toolchain the first time
it is needed (about half a minute, then cached) and uses PyTorch ops if that fails;
``cpp`` makes a failed build an error; ``torch`` never builds and always uses PyTorch ops.
The kernels are built with OpenMP, as torch is: ``at::parallel_for`` in code built without it
runs on the calling thread only.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from importlib import resources
from types import ModuleType

_MODES = ("auto", "cpp", "torch")
_state: dict[str, ModuleType | None] = {}


def kernel_mode() -> str:
    mode = os.environ.get("MEPROP_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MEPROP_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def cpu_kernels() -> ModuleType | None:
    """The compiled kernels module, or None when PyTorch ops are to be used instead."""
    mode = kernel_mode()
    if mode == "torch":
        return None
    if mode not in _state:
        _state[mode] = _build(required=(mode == "cpp"))
    return _state[mode]


def backend_name() -> str:
    """``cpp`` or ``torch``: which implementation the CPU meProp backward and updates use."""
    return "cpp" if cpu_kernels() is not None else "torch"


def _build(required: bool) -> ModuleType | None:
    source = str(resources.files("mnist_meprop") / "csrc" / "meprop_cpu.cpp")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA" notice
    try:
        from torch.utils import cpp_extension

        print("mnist_meprop: loading the CPU kernels (compiled on first use, about 30 s)", file=sys.stderr, flush=True)
        return cpp_extension.load(name="mnist_meprop_cpu_v37", sources=[source],
                                  extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512",
                                                "-fno-math-errno", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, unsupported platform...
        if required:
            raise RuntimeError(f"MEPROP_KERNELS=cpp but the CPU kernels did not build: {error}") from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"mnist_meprop: CPU kernels unavailable ({first_line}); using PyTorch ops", stacklevel=2)
        return None


def set_flush_denormal(on: bool) -> None:
    """Flush denormal floats to zero (or stop) on every CPU thread torch computes on.

    ``torch.set_flush_denormal`` changes the calling thread only, while torch's worker threads
    keep the mode they started with; the compiled kernels set it on each of them. Without them,
    only the calling thread is changed.
    """
    import torch

    kernels = cpu_kernels()
    if kernels is None or not kernels.set_flush_denormal_all_threads(on):
        torch.set_flush_denormal(on)


def flushes_denormals() -> bool:
    """Whether every CPU thread torch computes on flushes denormal floats to zero."""
    import torch

    denormals = torch.full((max(1, torch.get_num_threads()) << 20,), 1e-39)  # large enough for every thread
    return bool((denormals * 1.0 == 0).all())
