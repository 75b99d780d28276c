"""Argument checks shared by the ops: each failure names the argument, what was expected and
what was received."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def value_checks_enabled() -> bool:
    """Data-dependent checks read tensor values (a device sync); skipped while compiling."""
    from . import _config

    return not torch.compiler.is_compiling() and not _config.skip_value_checks()


def tensor(name: str, x, layout: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """``x`` must be a non-empty tensor of rank ``len(layout)`` and one of ``dtypes``.

    ``layout`` is the docstring shape, e.g. ``"[B, H, L, D]"``.
    """
    ndim = layout.count(",") + 1
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)} {layout}")
    return x


def same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")


def same_dtype(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")


def shape(name: str, x: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}")


def lengths(name: str, lengths, batch: int, max_len: int, ref: torch.Tensor, batch_dim: str) -> torch.Tensor | None:
    """Validate ``lengths`` ([batch] integers in [1, max_len]) and return it as an int64 tensor.

    A list/tuple of ints is accepted and put on ``ref``'s device.
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"{name} must hold integers, got {list(lengths)!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64, device=ref.device)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [{batch_dim}] or None, got {type(lengths).__name__}")
    if lengths.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch_dim}] = ({batch},), got {tuple(lengths.shape)}")
    same_device(name, lengths, "the inputs", ref)
    if value_checks_enabled():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > max_len:
            bad = lo if lo < 1 else hi
            raise ValueError(f"{name} must lie in [1, {max_len}], got a value of {bad}")
    return lengths.to(torch.int64)


def positive_float(name: str, value, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
