"""Loads the compiled CUDA extension (``kdc_kernels._C``) if it is present.

Importing ``kdc_kernels`` never fails for lack of the extension: ``status()`` says whether it
loaded and, if not, why and how to build it. A library built against another torch is not loaded
(its build-info file says which torch it was built for; loading it could fail on missing symbols
or worse): the reason says so. With ``KDC_JIT=1`` and a source checkout (editable install), the
extension is compiled on first use with ``torch.utils.cpp_extension.load`` into a versioned cache
folder (one per torch, CUDA, architectures and sources) when no usable prebuilt one is found.

The library registers CUDA kernels for the ``kdc::cuda_*`` ops whose schemas, fake
implementations and autograd are declared in Python (``kdc_kernels/ops/*/_cuda.py``), so tracing,
fake tensors and ``opcheck`` work whether or not it is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

import torch

from . import _build, _config

BUILD_HINT = (
    "build it on a machine with a CUDA build of torch and nvcc: "
    "KDC_BUILD_CUDA=1 pip install --no-build-isolation -e . (or set KDC_JIT=1 in a source checkout)"
)

# The compiled ops behind each public op (all must have a CUDA kernel for the op to run on CUDA).
CUDA_OPS = {
    "windowed_attention": ("cuda_windowed_attention_fwd", "cuda_windowed_attention_bwd"),
    "max_similarity": ("cuda_max_similarity_fwd", "cuda_max_similarity_bwd"),
    "max_similarity_topk": ("cuda_max_similarity_topk",),
}

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


def _load_jit() -> str | None:
    """Compiles (or reuses the cached build of) the extension from ``csrc/``; returns why not."""
    root = _build.source_root()
    if root is None:
        return "KDC_JIT=1 needs the source tree (csrc/ beside the kdc_kernels package): use an editable install"
    try:
        from torch.utils import cpp_extension

        archs = _build.arch_list(torch.cuda.is_available())
        build_dir = _build.jit_build_dir(torch, archs, root)
        build_dir.mkdir(parents=True, exist_ok=True)
        if archs is not None:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        path = cpp_extension.load(
            name="kdc_kernels_jit",
            sources=[str(root / s) for s in _build.sources(root)],
            extra_include_paths=[str(root / "csrc")],
            extra_cflags=_build.CXX_FLAGS,
            extra_cuda_cflags=_build.NVCC_FLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - a failed build must not break importing the package
        return f"KDC_JIT=1 build failed ({type(exc).__name__}: {exc})"
    info = _build.build_info(torch, archs, root)
    _build.write_build_info(build_dir, info)
    _state.update(info=info, path=str(path))
    return None


def _load() -> None:
    if _state["tried"]:
        return
    _state["tried"] = True
    if torch.version.cuda is None:
        _state["reason"] = f"torch {torch.__version__} is a CPU-only build; " + BUILD_HINT
        return
    reason = _load_prebuilt()
    if reason is not None and _config.jit_build():
        jit_reason = _load_jit()
        reason = None if jit_reason is None else f"{reason}; {jit_reason}"
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


def has_op(op_name: str) -> bool:
    """Whether the loaded extension registered CUDA kernels for every compiled op behind the public
    op ``op_name`` (``CUDA_OPS``; ``kdc::<op_name>`` itself for other names)."""
    loaded, _ = status()
    if not loaded:
        return False
    return all(_has_cuda_kernel(f"kdc::{name}") for name in CUDA_OPS.get(op_name, (op_name,)))
