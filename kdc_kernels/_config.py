"""Every ``KDC_*`` environment flag the package reads, in one place.

Flags are read when they are used (not cached at import), so a test or a notebook can change them
with ``os.environ`` / ``monkeypatch.setenv`` and see the effect on the next call.

| variable | values | effect |
| --- | --- | --- |
| ``KDC_IMPL`` | auto, reference, triton, cuda | default ``impl`` of every op |
| ``KDC_DETERMINISTIC`` | 0, 1 | bitwise run-to-run identical gradients on the fast paths |
| ``KDC_VALUE_CHECKS`` | auto, sync, async, off | data-dependent checks (lengths in range, sigma finite and > 0 on valid rows, mask is a 0/1 prefix): ``sync`` reads the values on the host and raises a ``ValueError`` naming the argument and the first bad entry (a device sync per check: the debug mode); ``async`` enqueues device-side asserts (no host sync; on a GPU a bad value ends in "device-side assert triggered", rerun with ``sync`` to see which); ``off`` trusts the data; ``auto`` (default): ``sync`` for CPU tensors (no device to wait for), ``async`` elsewhere |
| ``KDC_AUTOTUNE`` | 0, 1 (1) | 0: every Triton kernel runs its pinned launch configuration (one compile per case, no timing runs; kdc_kernels/_launch.py) |
| ``KDC_SKIP_VALUE_CHECKS`` | 0, 1 | older spelling of ``KDC_VALUE_CHECKS=off`` (``1`` wins over ``KDC_VALUE_CHECKS``) |
| ``TRITON_INTERPRET`` | 0, 1 | Triton's own flag: run Triton kernels on the CPU interpreter |
| ``KDC_POISON_OUTPUTS`` | 0, 1 | test hook: fast paths fill the outputs they allocate with NaN (integers with -1) before their kernels run, so an unwritten element fails a comparison (also read by the compiled extension) |
| ``KDC_TOPK_ROUND_SPLITS`` | 1..31 | test hook read by the compiled extension: video splits merged per round by the CUDA top-k (default 31) |
| ``KDC_REF_BLOCK_ELEMS`` | int >= 1 | fp32 values in one ``[queries, videos, clips]`` similarity block of the max-similarity reference (default 16777216 = 64 MiB): its memory bound, and an unusual block shape for tests |
| ``KDC_REF_REORDER`` | 0, 1 | test hook: the max-similarity reference sums dot products in an order that depends on the position in the block and on the block's shape, so a test that expects bit-identical scores from equal vectors at other positions or in other blocks fails on every machine, not only where a BLAS happens to round that way (exact-arithmetic data is unaffected) |
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


VALUE_CHECK_MODES = ("auto", "sync", "async", "off")


def value_check_mode(device_type: str) -> str:
    """How data-dependent argument checks run for tensors on ``device_type``: ``"sync"``,
    ``"async"`` or ``"off"`` (``KDC_VALUE_CHECKS``, default ``auto``: ``sync`` on the CPU, where
    reading a value costs no device synchronisation, ``async`` on every other device)."""
    if _flag("KDC_SKIP_VALUE_CHECKS"):
        return "off"
    raw = os.environ.get("KDC_VALUE_CHECKS", "").strip().lower() or "auto"
    if raw not in VALUE_CHECK_MODES:
        raise ValueError(f"environment variable KDC_VALUE_CHECKS must be one of {VALUE_CHECK_MODES}, got {raw!r}")
    if raw == "auto":
        return "sync" if device_type == "cpu" else "async"
    return raw


def fp32_dot_precision(device_type: str) -> str:
    """``"tf32"`` or ``"ieee"``: the precision of fp32 x fp32 dots in every kernel (the op
    contract's rule, the same for every op and impl).

    fp32 inputs compute in IEEE fp32 unless the user allowed TF32 the torch way:
    ``torch.backends.cuda.matmul.allow_tf32 = True``, ``torch.set_float32_matmul_precision("high")``
    (or ``"medium"``), or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``. CPU tensors
    (the Triton interpreter) always use IEEE. Read when a kernel launches, as torch reads it for
    its own matmuls.
    """
    import torch

    if device_type != "cuda":
        return "ieee"
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 reports both spellings through fp32_precision; reading the legacy flags after
    # the new API was used raises, so the new attribute is read first.
    precision = getattr(matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision
    tf32 = matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


def autotune() -> bool:
    """``KDC_AUTOTUNE`` (default 1): autotune the Triton kernels' launch configurations on the GPU;
    0 pins each kernel to its first configuration (as deterministic mode does)."""
    return os.environ.get("KDC_AUTOTUNE", "").strip() == "" or _flag("KDC_AUTOTUNE")


def triton_interpret() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


def poison_outputs() -> bool:
    """``KDC_POISON_OUTPUTS=1``: fill freshly allocated outputs with NaN / -1 (a test hook)."""
    return _flag("KDC_POISON_OUTPUTS")


def reference_block_elems(default: int) -> int:
    """``KDC_REF_BLOCK_ELEMS``: fp32 values per similarity block of the max-similarity reference."""
    raw = os.environ.get("KDC_REF_BLOCK_ELEMS", "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable KDC_REF_BLOCK_ELEMS must be an integer >= 1, got {raw!r}")
    return value


def reference_reorder() -> bool:
    """``KDC_REF_REORDER=1``: position- and shape-dependent summation order in the max-similarity
    reference (a test hook)."""
    return _flag("KDC_REF_REORDER")
