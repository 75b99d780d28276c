"""Loads the compiled CUDA extension (``kdc_kernels._C``) if it is present.

Importing ``kdc_kernels`` never fails for lack of the extension: ``status()`` says whether it
loaded and, if not, why and how to build it. A library built against another torch is not loaded
(its build-info file says which torch it was built for; loading it could fail on missing symbols
or worse): the reason says so. The extension is built at install time only (``setup.py``).

The ``kdc::cuda_*`` ops are declared in Python (``kdc_kernels/ops/*/_cuda.py``: schema, fake
implementation, autograd), so tracing, fake tensors and ``opcheck`` work whether or not the library
is built. Each has a Python kernel that checks its arguments (``check_*`` below: shapes, dtypes,
devices, the kernels' limits) and then calls the private op ``kdc::cuda_*_kernel`` with the same
schema, which is what the library implements. Bad arguments are therefore reported by Python
before any compiled code runs; the library repeats the checks (``TORCH_CHECK``) for direct calls
of the private ops.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

from . import _build

BUILD_HINT = (
    "build it on a machine with a CUDA build of torch and nvcc: "
    "KDC_BUILD_CUDA=1 pip install --no-build-isolation -e ."
)

KERNEL_SUFFIX = "_kernel"  # kdc::<compiled op><suffix>: the private op the library implements

_state: dict = {"tried": False, "loaded": False, "reason": "", "info": None, "path": None}


def _load_prebuilt() -> str | None:
    """Imports ``kdc_kernels._C`` if present and built for this torch; returns why not (None: loaded)."""
    spec = importlib.util.find_spec("kdc_kernels._C")
    if spec is None or spec.origin is None:
        return "not built; " + BUILD_HINT
    info = _build.read_build_info(Path(spec.origin).parent)
    mismatch = _build.build_mismatch(info, torch.__version__, torch.version.cuda)
    if mismatch is not None:
        return f"the compiled library {spec.origin} is not loaded: {mismatch}; " + BUILD_HINT
    try:
        importlib.import_module("kdc_kernels._C")
    except ImportError as exc:  # e.g. a library without build info, built against another torch
        return f"failed to load {spec.origin} ({exc}); " + BUILD_HINT
    _state.update(info=info, path=spec.origin)
    return None


def _load() -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    if torch.version.cuda is None:
        _state["reason"] = f"torch {torch.__version__} is a CPU-only build; " + BUILD_HINT
        return
    reason = _load_prebuilt()
    _state["loaded"] = reason is None
    _state["reason"] = reason or ""


def status() -> tuple[bool, str]:
    """``(loaded, reason)``: reason says why it is not loaded (empty when it is)."""
    _load()
    return _state["loaded"], _state["reason"]


def build_info() -> dict | None:
    """What the loaded extension was built for (torch, CUDA, architectures), or None."""
    _load()
    return dict(_state["info"]) if _state["loaded"] and _state["info"] else None


def _has_cuda_kernel(qualname: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
    except RuntimeError:  # the operator does not exist at all
        return False


def __getattr__(name: str):
    """``CUDA_OPS``: public op name -> the compiled ops behind its ``impl="cuda"``, for every op of
    the op table (``kdc_kernels.ops.OPS``) that the extension provides (read from the table when
    asked for: the table imports the ops, which import this module)."""
    if name == "CUDA_OPS":
        from .ops import OPS

        return {spec.name: spec.cuda_ops for spec in OPS if spec.cuda_ops}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def has_op(op_name: str) -> bool:
    """Whether the loaded extension registered CUDA kernels for every compiled op behind the public
    op ``op_name`` (its spec's ``cuda_ops``; False for an op the extension does not provide)."""
    from ._backend import op_spec

    names = op_spec(op_name).cuda_ops
    loaded, _ = status()
    return loaded and bool(names) and all(_has_cuda_kernel(f"kdc::{name}{KERNEL_SUFFIX}") for name in names)


# --- argument checks of the compiled ops -----------------------------------------------------------


class OpArgumentError(ValueError, RuntimeError):
    """A bad argument of a ``kdc::cuda_*`` op: a ValueError, and a RuntimeError as torch's own ops
    raise (and as the library's ``TORCH_CHECK`` does for the private ops)."""


def fail(*parts) -> None:
    raise OpArgumentError("".join(str(p) for p in parts))


def runs_on(t: torch.Tensor, kernel_op: str) -> bool:
    """Whether the compiled kernels of ``kernel_op`` can take ``t``'s device: a CUDA tensor, or a CPU
    tensor when a CPU build of the kernels is registered (the tests' CUDA emulation)."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and torch._C._dispatch_has_kernel_for_dispatch_key(kernel_op, "CPU")


def check_tensor(t, name: str, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        fail(name, " must be a tensor ", layout, ", got ", type(t).__name__)
    if t.dim() != rank:
        fail(name, " must be a ", rank, "-D tensor ", layout, ", got shape ", list(t.shape))
    return t


def check_floating(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(name, " must have dtype float32, float16 or bfloat16, got ", t.dtype)


def check_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, kernel_op: str) -> None:
    if t.device != ref.device:
        fail(name, " must be on the same device as ", ref_name, " (", ref.device, "), got ", t.device)
    if not runs_on(t, kernel_op):
        fail(name, " must be a CUDA tensor, got a tensor on ", t.device)


def check_like(t, name: str, ref: torch.Tensor, ref_name: str, layout: str, kernel_op: str) -> None:
    """``t`` has the rank, device, dtype and shape of ``ref``."""
    check_tensor(t, name, ref.dim(), layout)
    check_device(t, name, ref, ref_name, kernel_op)
    if t.dtype != ref.dtype:
        fail(name, " must have the same dtype as ", ref_name, " (", ref.dtype, "), got ", t.dtype)
    if t.shape != ref.shape:
        fail(name, " must have shape ", layout, " = ", list(ref.shape), ", got ", list(t.shape))


def check_lengths(lengths, n: int, dim: str, ref: torch.Tensor, kernel_op: str) -> None:
    """Optional ``[n]`` integer tensor (its values are the caller's business: the kernels clamp
    them to ``[0, L]``)."""
    if lengths is None:
        return
    check_tensor(lengths, "lengths", 1, f"[{dim}]")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        fail("lengths must have an integer dtype, got ", lengths.dtype)
    if lengths.shape[0] != n:
        fail("lengths must have shape [", dim, "] = (", n, ",), got ", list(lengths.shape))
    check_device(lengths, "lengths", ref, "the inputs", kernel_op)


def check_below_2_31(value: int, what: str) -> None:
    if value >= 2**31:
        fail(what, " must be below 2^31, got ", value)
