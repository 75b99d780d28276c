"""Loads the compiled CUDA extension (``kdc_kernels._C``) if it is present.

Importing ``kdc_kernels`` never fails for lack of the extension: ``status()`` says whether it
loaded and, if not, why and how to build it.
"""

from __future__ import annotations

import importlib

import torch

BUILD_HINT = (
    "build it on a machine with a CUDA build of torch and nvcc: "
    "KDC_BUILD_CUDA=1 pip install --no-build-isolation -e ."
)

_state: dict = {"tried": False, "module": None, "reason": ""}


def _load() -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    if torch.version.cuda is None:
        _state["reason"] = f"torch {torch.__version__} is a CPU-only build; " + BUILD_HINT
        return
    try:
        _state["module"] = importlib.import_module("kdc_kernels._C")
    except ImportError as exc:  # not built, or built against another torch
        missing = isinstance(exc, ModuleNotFoundError) and exc.name == "kdc_kernels._C"
        _state["reason"] = ("not built; " + BUILD_HINT) if missing else f"failed to load ({exc}); " + BUILD_HINT


def status() -> tuple[bool, str]:
    """``(loaded, reason)``: reason says why it is not loaded (empty when it is)."""
    _load()
    return _state["module"] is not None, _state["reason"]


def has_op(op_name: str) -> bool:
    """Whether the loaded extension registered a CUDA kernel for ``kdc::<op_name>``."""
    loaded, _ = status()
    if not loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdc::{op_name}", "CUDA")
