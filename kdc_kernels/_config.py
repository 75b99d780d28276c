"""Every ``KDC_*`` environment flag the package reads, in one place.

Flags are read when they are used (not cached at import), so a test or a notebook can change them
with ``os.environ`` / ``monkeypatch.setenv`` and see the effect on the next call.

| variable | values | effect |
| --- | --- | --- |
| ``KDC_IMPL`` | auto, reference, triton, cuda | default ``impl`` of every op |
| ``KDC_DETERMINISTIC`` | 0, 1 | bitwise run-to-run identical gradients on the fast paths |
| ``KDC_AUTOTUNE`` | 0, 1 (1) | 0: every Triton kernel runs its pinned launch configuration (one compile per case, no timing runs; kdc_kernels/_launch.py) |
| ``KDC_SKIP_VALUE_CHECKS`` | 0, 1 | skip data-dependent checks (lengths range, sigma > 0) that need a device sync |
| ``KDC_JIT`` | 0, 1 | build the CUDA extension on first use (editable installs) |
| ``TRITON_INTERPRET`` | 0, 1 | Triton's own flag: run Triton kernels on the CPU interpreter |
| ``KDC_POISON_OUTPUTS`` | 0, 1 | test hook: fast paths fill the outputs they allocate with NaN (integers with -1) before their kernels run, so an unwritten element fails a comparison (also read by the compiled extension) |
| ``KDC_TOPK_ROUND_SPLITS`` | 1..31 | test hook read by the compiled extension: video splits merged per round by the CUDA top-k (default 31) |
| ``KDC_TOPK_WORKSPACE_BYTES`` | bytes | test hook read by the compiled extension: workspace bound of the CUDA top-k (default 256 MiB; smaller forces query chunks) |
"""

from __future__ import annotations

import os

IMPLS = ("reference", "triton", "cuda")
IMPL_CHOICES = ("auto",) + IMPLS

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {name} must be 0 or 1, got {raw!r}")


def default_impl() -> str:
    """The impl used when an op is called with ``impl=None`` (``KDC_IMPL``, default ``auto``)."""
    raw = os.environ.get("KDC_IMPL", "").strip().lower() or "auto"
    if raw not in IMPL_CHOICES:
        raise ValueError(f"environment variable KDC_IMPL must be one of {IMPL_CHOICES}, got {raw!r}")
    return raw


def deterministic() -> bool:
    """``KDC_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``."""
    import torch

    return _flag("KDC_DETERMINISTIC") or torch.are_deterministic_algorithms_enabled()


def autotune() -> bool:
    """``KDC_AUTOTUNE`` (default 1): autotune the Triton kernels' launch configurations on the GPU;
    0 pins each kernel to its first configuration (as deterministic mode does)."""
    return os.environ.get("KDC_AUTOTUNE", "").strip() == "" or _flag("KDC_AUTOTUNE")


def skip_value_checks() -> bool:
    """``KDC_SKIP_VALUE_CHECKS=1``: trust lengths/sigma values (saves one device sync per call)."""
    return _flag("KDC_SKIP_VALUE_CHECKS")


def triton_interpret() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


def jit_build() -> bool:
    """``KDC_JIT=1``: compile the CUDA extension on first use."""
    return _flag("KDC_JIT")


def poison_outputs() -> bool:
    """``KDC_POISON_OUTPUTS=1``: fill freshly allocated outputs with NaN / -1 (a test hook)."""
    return _flag("KDC_POISON_OUTPUTS")
