"""Implementation choice for every op, and the reasons an implementation cannot run.

Rules (the op contract):

* ``impl=None`` means ``KDC_IMPL`` (default ``"auto"``).
* ``auto``: CUDA tensors -> ``cuda`` if the compiled extension is loaded and supports the case,
  else ``triton`` if it can run, else ``reference``; CPU tensors -> ``reference``. ``auto`` never
  picks the Triton interpreter.
* An explicit impl that cannot run raises ``NotImplementedError`` listing every reason. There is
  no silent fallback for explicit requests.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Callable

import torch

from . import _config, _ext

WhyNot = Callable[[str], "list[str]"]


def normalize_impl(impl) -> str:
    """Validate the ``impl`` keyword and apply ``KDC_IMPL`` when it is ``None``."""
    if impl is None:
        return _config.default_impl()
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a str or None, got {type(impl).__name__}")
    value = impl.strip().lower()
    if value not in _config.IMPL_CHOICES:
        raise ValueError(f"impl must be one of {_config.IMPL_CHOICES} or None, got {impl!r}")
    return value


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_env_reasons(device: torch.device) -> list[str]:
    """Why Triton kernels cannot run on ``device`` in this process (empty when they can)."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (pip install triton)")
    if device.type == "cpu":
        if not _config.triton_interpret():
            reasons.append(
                "the tensors are on the CPU: Triton kernels run there only under the interpreter; "
                "set TRITON_INTERPRET=1 before importing kdc_kernels (slow: for tests only)"
            )
    elif device.type != "cuda":
        reasons.append(f"Triton kernels need CUDA (or CPU under TRITON_INTERPRET=1) tensors, got {device.type}")
    elif not torch.cuda.is_available():
        reasons.append("CUDA is not available to torch")
    return reasons


def cuda_env_reasons(device: torch.device, op_name: str) -> list[str]:
    """Why the compiled CUDA kernels cannot run ``op_name`` on ``device`` (empty when they can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the CUDA kernels need CUDA tensors, got {device.type} tensors")
    loaded, why = _ext.status()
    if not loaded:
        reasons.append(f"the compiled extension is not loaded: {why}")
    elif not _ext.has_op(op_name):
        reasons.append(f"the compiled extension has no CUDA kernel for kdc::{op_name} (rebuild it)")
    return reasons


def resolve(op_name: str, impl, device: torch.device, why_not: WhyNot) -> str:
    """Return the impl that runs ``op_name`` for tensors on ``device``.

    ``why_not(name)`` returns the list of reasons ``name`` cannot run this case (empty: it can).
    """
    requested = normalize_impl(impl)
    if requested == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if not why_not(candidate):
                    return candidate
        return "reference"
    reasons = why_not(requested)
    if reasons:
        listed = "\n  - ".join(reasons)
        raise NotImplementedError(f"{op_name}(impl={requested!r}) cannot run this call:\n  - {listed}")
    return requested


def auto_choice(op_name: str, device_type: str, why_not_for_device: Callable[[torch.device], WhyNot]) -> str:
    """What ``auto`` would pick for a typical call on ``device_type`` (used by ``info``)."""
    device = torch.device(device_type)
    return resolve(op_name, "auto", device, why_not_for_device(device))


def impl_module(package: str, impl: str):
    """``<package>._<impl>`` (e.g. ``kdc_kernels.ops.max_similarity._triton``), or None if absent.

    Imported lazily: Triton decides between compiled and interpreted kernels when a kernel module
    is imported, so the choice follows ``TRITON_INTERPRET`` at the first call, not at import of
    ``kdc_kernels``.
    """
    name = f"{package}._{impl}"
    if importlib.util.find_spec(name) is None:
        return None
    _import(name)
    return sys.modules[name]


@torch.compiler.assume_constant_result
def _import(name: str) -> bool:
    """Import ``name``. torch.compile cannot trace ``importlib.import_module``; marked like this,
    the import runs eagerly while the caller is traced (fullgraph compile of the ops works)."""
    importlib.import_module(name)
    return True


def fast_path(op_name: str, package: str, impl: str):
    """``(run, unsupported)`` functions of ``impl`` for ``op_name``; either is None if missing."""
    if impl == "triton" and not triton_available():
        return None, None
    module = impl_module(package, impl)
    if module is None:
        return None, None
    return getattr(module, f"{op_name}_{impl}", None), getattr(module, f"{op_name}_unsupported", None)


def why_not(op_name: str, package: str, impl: str, device: torch.device, case: dict) -> list[str]:
    """Every reason ``impl`` cannot run ``op_name`` on ``case`` (the op's validated arguments)."""
    if impl == "reference":
        return []
    reasons = triton_env_reasons(device) if impl == "triton" else cuda_env_reasons(device, op_name)
    if impl == "triton" and not triton_available():
        return reasons
    run, unsupported = fast_path(op_name, package, impl)
    if run is None:
        reasons.append(f"the {impl} implementation of {op_name} is not written yet")
    elif unsupported is not None:
        reasons.extend(unsupported(**case))
    return reasons


def dispatch(op_name: str, package: str, impl, device: torch.device, case: dict, reference: Callable):
    """Resolve the impl for ``case`` and run it."""
    chosen = resolve(op_name, impl, device, lambda name: why_not(op_name, package, name, device, case))
    if chosen == "reference":
        if device.type in ("cpu", "cuda"):
            # The contract fixes the compute precision (fp32) and the output dtypes: autocast must
            # not turn the reference's matmuls into bf16/fp16 ones (the fast paths are custom ops,
            # which autocast leaves alone).
            with torch.autocast(device_type=device.type, enabled=False):
                return reference(**case)
        return reference(**case)
    run, _ = fast_path(op_name, package, chosen)
    return run(**case)
