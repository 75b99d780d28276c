"""Argument checks shared by the ops: each failure names the argument, what was expected and
what was received.

Shape, dtype and device checks read only metadata and always run. Checks of tensor *values*
(lengths in range, a mask that is a 0/1 prefix, sigma finite and > 0) go through
:func:`require`, which never synchronises with the device on the default path
(``KDC_VALUE_CHECKS``, see ``_config.value_check_mode``):

* ``sync`` (default for CPU tensors, the debug mode elsewhere): the values are read on the host;
  a bad one raises ``ValueError`` naming the argument and the first offending entry.
* ``async`` (default for GPU tensors): a device-side assert is enqueued (``torch._assert_async``);
  the host never waits. On the CPU it raises a ``RuntimeError`` with the message at once.
* ``off``: the data is trusted.
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the public ops accept: fp64 runs on the reference (the fast paths say how to convert).
OP_DTYPES = FLOAT_DTYPES + (torch.float64,)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def value_mode(ref: torch.Tensor) -> str:
    """``"sync"``, ``"async"`` or ``"off"`` for checks of tensors on ``ref``'s device. Inside
    ``torch.compile`` a host read would break the graph, so ``sync`` becomes ``async`` there."""
    from . import _config

    mode = _config.value_check_mode(ref.device.type)
    if mode == "sync" and torch.compiler.is_compiling():
        return "async"
    return mode


def require(ok: torch.Tensor, message: str, explain: Callable[[], str], mode: str) -> None:
    """Check that every element of the bool tensor ``ok`` is true.

    ``message`` (static text, no data) is the device-side assert's; ``explain()`` builds the full
    ``ValueError`` text in ``sync`` mode, where reading values is allowed.
    """
    if mode == "off" or ok.numel() == 0:
        return
    if mode == "async":
        torch._assert_async(ok.all(), f"{message} (set KDC_VALUE_CHECKS=sync for the first bad entry)")
        return
    if not bool(ok.all()):
        raise ValueError(explain())


def first_false(ok: torch.Tensor) -> tuple[int, ...]:
    """Index of the first false element of ``ok`` (reads values: ``sync`` mode only)."""
    return tuple(int(i) for i in (~ok).nonzero()[0])


def tensor(name: str, x, layout: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
           may_be_empty: Sequence[str] = ()) -> torch.Tensor:
    """``x`` must be a tensor of rank ``len(layout)`` and one of ``dtypes``, with every dim >= 1
    except those named in ``may_be_empty`` (as torch ops, a zero-size batch is fine).

    ``layout`` is the docstring shape, e.g. ``"[B, H, L, D]"``.
    """
    dims = [d.strip() for d in layout.strip("[]").split(",")]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != len(dims):
        raise ValueError(f"{name} must be a {len(dims)}-D tensor {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        hint = " (convert with .float())" if x.dtype.is_floating_point else ""
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}{hint}")
    for dim, size in zip(dims, x.shape):
        if size == 0 and dim not in may_be_empty:
            raise ValueError(f"{name} must have {dim} >= 1 in {layout}, got shape {tuple(x.shape)}")
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
    """Validate ``lengths`` ([batch] integers in [0, max_len]) and return it as an int64 tensor.

    A list/tuple of ints is accepted and put on ``ref``'s device (a host-to-device copy).
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
        hint = " (a float mask? pass it as mask=)" if lengths.dtype.is_floating_point else ""
        raise TypeError(f"{name} must have an integer dtype, got {lengths.dtype}{hint}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch_dim}] = ({batch},), got {tuple(lengths.shape)}")
    same_device(name, lengths, "the inputs", ref)
    ok = (lengths >= 0) & (lengths <= max_len)

    def explain():
        at = first_false(ok)[0]
        return f"{name} must lie in [0, {max_len}], got {int(lengths[at])} at index {at}"

    require(ok, f"{name} must lie in [0, {max_len}]", explain, value_mode(ref))
    return lengths.to(torch.int64)


def mask_lengths(name: str, mask, batch: int, max_len: int, ref: torch.Tensor, batch_dim: str) -> torch.Tensor:
    """The int64 ``[batch]`` lengths of a prefix mask ``[batch, max_len]`` (bool, or 0/1 of any
    integer or float dtype; true/1 = valid), as PRVR codebases build ``video_mask`` /
    ``query_mask``. A mask that is not a prefix (a valid position after a padded one) or holds
    a value other than 0/1 fails the value check (see :func:`require`)."""
    layout = f"[{batch_dim}, L]"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool or 0/1 torch.Tensor {layout} or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in _INT_DTYPES and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be bool or a 0/1 integer/float tensor, got {mask.dtype}")
    if mask.dim() != 2 or tuple(mask.shape) != (batch, max_len):
        raise ValueError(f"{name} must have shape {layout} = ({batch}, {max_len}), got {tuple(mask.shape)}")
    same_device(name, mask, "the inputs", ref)
    valid = mask if mask.dtype == torch.bool else mask != 0
    n = valid.sum(1, dtype=torch.int64)
    prefix = torch.arange(max_len, device=mask.device)[None, :] < n[:, None]
    row_ok = (valid == prefix).all(1)
    if mask.dtype != torch.bool:
        row_ok = row_ok & ((mask == 0) | (mask == 1)).all(1)

    def explain():
        row = first_false(row_ok)[0]
        values = mask[row]
        odd = ((values != 0) & (values != 1)).nonzero()
        if mask.dtype != torch.bool and odd.numel():
            col = int(odd[0])
            return f"{name} must hold only 0 and 1 (or bool; 1 = valid), got {values[col].item()} at [{row}, {col}]"
        shown = valid[row].int().tolist()
        text = "".join(map(str, shown[:64])) + ("..." if len(shown) > 64 else "")
        return (f"{name} must be a prefix mask (valid positions first, then padding) {layout}; row {row} "
                f"is not: {text}")

    require(row_ok, f"{name} must be a 0/1 prefix mask", explain, value_mode(ref))
    return n


def lengths_or_mask(lengths_value, mask, batch: int, max_len: int, ref: torch.Tensor,
                    batch_dim: str) -> torch.Tensor | None:
    """``lengths=`` or ``mask=`` (not both) as int64 lengths ``[batch]``, or None (all valid)."""
    if mask is not None:
        if lengths_value is not None:
            raise ValueError("pass lengths or mask, not both (mask is converted to lengths: the prefix it marks valid)")
        return mask_lengths("mask", mask, batch, max_len, ref, batch_dim)
    return lengths("lengths", lengths_value, batch, max_len, ref, batch_dim)


def positive_float(name: str, value, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got {type(value).__name__}")
    value = float(value)
    if not (value > 0.0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
