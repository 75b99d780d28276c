"""Implementation choice for every op, and the reasons an implementation cannot run.

Rules (the op contract):

* ``impl=None`` means ``KDC_IMPL`` (default ``"auto"``).
* ``auto``: CPU tensors -> ``reference``. CUDA tensors -> per op, the fast path that the recorded GPU
  measurements show fastest for that GPU generation (``AUTO_MEASURED``; evidence in
  ``benchmarks/RESULTS.md``), ``triton`` for every op and GPU generation without such a measurement;
  then the other fast path if the preferred one cannot run the case, then ``reference``. ``auto`` never
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


# Looked up once, at import: torch.compile cannot trace importlib's finders.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

# What ``auto`` picks on CUDA tensors, per (op, compute capability major), from same-run GPU
# measurements of both fast paths (the table and its evidence: benchmarks/RESULTS.md, "auto").
# Ops and GPU generations not listed here get Triton.
AUTO_MEASURED: dict[tuple[str, int], str] = {}


def triton_available() -> bool:
    return _TRITON_AVAILABLE


@torch.compiler.assume_constant_result
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def auto_preference(op_name: str, device: torch.device) -> tuple[str, ...]:
    """The order in which ``auto`` tries the impls for ``op_name`` on ``device``."""
    if device.type != "cuda":
        return ("reference",)
    first = "triton"
    if AUTO_MEASURED and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        first = AUTO_MEASURED.get((op_name, _capability_major(index)), "triton")
    second = "cuda" if first == "triton" else "triton"
    return (first, second, "reference")


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
        for candidate in auto_preference(op_name, device):
            if candidate == "reference" or not why_not(candidate):
                return candidate
        return "reference"
    reasons = why_not(requested)
    if reasons:
        listed = "\n  - ".join(reasons)
        raise NotImplementedError(f"{op_name}(impl={requested!r}) cannot run this call:\n  - {listed}")
    return requested


def impl_module(package: str, impl: str):
    """``<package>._<impl>`` (e.g. ``kdc_kernels.ops.max_similarity._triton``), or None if absent.

    Imported lazily: Triton decides between compiled and interpreted kernels when a kernel module
    is imported, so the choice follows ``TRITON_INTERPRET`` at the first call, not at import of
    ``kdc_kernels``.
    """
    name = f"{package}._{impl}"
    return sys.modules[name] if _import(name) else None


@torch.compiler.assume_constant_result
def _import(name: str) -> bool:
    """Import ``name`` if such a module exists; whether it does. torch.compile cannot trace
    importlib; marked like this, the import runs eagerly while the caller is traced (fullgraph
    compile of the ops works)."""
    if name in sys.modules:
        return True
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but a dependency of it is missing: a real error
            raise
        return False
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
