"""Implementation choice for every op, the reasons an implementation cannot run, and the op
table's record type.

Every op declares itself once, in its own folder, as an :class:`OpSpec` (its name, public
function, validation, reference, fast paths, a probe case, the compiled ops behind
``impl="cuda"``), and ``kdc_kernels.ops.OPS`` lists them. The public function validates its
arguments into a *case* (a dict of keyword arguments that every impl of the op takes) and calls
:func:`dispatch` with its spec; ``kdc_kernels.info`` and the compiled extension's op list
(``_ext.CUDA_OPS``) read the same table.

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
from dataclasses import dataclass
from typing import Any, Callable

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
    elif op_spec(op_name).cuda_ops and not _ext.has_op(op_name):
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


@dataclass(frozen=True)
class FastPath:
    """One fast implementation of an op: what its module provides."""

    run: Callable[..., Any]
    """``run(**case)``: the op on a validated case."""
    unsupported: Callable[..., "list[str]"]
    """``unsupported(**case)``: every reason it cannot run the case (shapes, dtypes, limits; the
    environment is :func:`why_not`'s business). Must work on meta tensors (``info``'s probes)."""


@dataclass(frozen=True)
class OpSpec:
    """One op, as its folder declares it (``ops/<op>/api.py``) and ``kdc_kernels.ops.OPS`` lists it."""

    name: str
    """The public name: ``kdc_kernels.<name>``, the key of ``AUTO_MEASURED``, the name in messages."""
    function: Callable[..., Any]
    """The public function."""
    validate: Callable[..., dict]
    """Takes the public function's arguments (all but ``impl``), checks them and returns the case:
    the keyword arguments that the reference and every fast path take."""
    reference: Callable[..., Any]
    """``reference(**case)``: the plain PyTorch oracle."""
    fast_paths: dict
    """impl name (``"triton"``, ``"cuda"``) -> a function returning its :class:`FastPath`. The
    function imports the impl's module: kernel modules are imported on first use, because Triton
    decides between compiled and interpreted kernels when a kernel module is imported, so the
    choice follows ``TRITON_INTERPRET`` at the first call, not at import of ``kdc_kernels``."""
    probe: Callable[[], dict]
    """A small valid fp32 case on the meta device: ``kdc_kernels.info`` asks every impl whether it
    could run it (and reports what ``auto`` picks)."""
    device_of: str
    """The case entry whose device is where the op runs."""
    is_empty: Callable[[dict], bool]
    """Whether the case is empty: the result is then the reference's (empty) one, as torch does,
    once the requested impl has been checked."""
    cuda_ops: tuple = ()
    """The compiled ops ``kdc::<name>`` behind ``impl="cuda"`` (all need a CUDA kernel in the
    loaded extension); empty when the extension provides no kernel for this op."""


def why_not(op, impl: str, device: torch.device, case: dict) -> list[str]:
    """Every reason ``impl`` cannot run the op ``op`` (an :class:`OpSpec`, or its name) on ``case``
    (the op's validated arguments) with tensors on ``device``; empty when it can."""
    spec = op if isinstance(op, OpSpec) else op_spec(op)
    if impl == "reference":
        return []
    reasons = triton_env_reasons(device) if impl == "triton" else cuda_env_reasons(device, spec.name)
    if impl == "triton" and not triton_available():
        return reasons  # the Triton modules cannot even be imported
    load = spec.fast_paths.get(impl)
    if load is None:
        reasons.append(f"the {impl} implementation of {spec.name} is not written yet")
    else:
        reasons.extend(load().unsupported(**case))
    return reasons


def op_spec(name: str) -> OpSpec:
    """The :class:`OpSpec` of the op called ``name`` in ``kdc_kernels.ops.OPS``."""
    from .ops import OPS

    for spec in OPS:
        if spec.name == name:
            return spec
    raise ValueError(f"no op named {name!r}; the ops are {[spec.name for spec in OPS]}")


def dispatch(spec: OpSpec, impl, case: dict):
    """Resolve the impl of ``spec``'s op for ``case`` (validated by ``spec.validate``) and run it."""
    device = case[spec.device_of].device

    def reasons(name: str) -> list[str]:
        return why_not(spec, name, device, case)

    if spec.is_empty(case):
        # torch's convention: empty in, empty out. The requested impl must still be able to run
        # here; the reference then builds the (autograd-connected) empty result.
        resolve(spec.name, impl, device, reasons)
        impl = "reference"
    chosen = resolve(spec.name, impl, device, reasons)
    if chosen == "reference":
        if device.type in ("cpu", "cuda"):
            # The contract fixes the compute precision (fp32) and the output dtypes: autocast must
            # not turn the reference's matmuls into bf16/fp16 ones (the fast paths are custom ops,
            # which autocast leaves alone).
            with torch.autocast(device_type=device.type, enabled=False):
                return spec.reference(**case)
        return spec.reference(**case)
    return spec.fast_paths[chosen]().run(**case)
