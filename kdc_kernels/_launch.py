"""The Triton launch policy: which configuration every Triton kernel of the package runs with,
and the launchers' test hooks. Every ``_triton.py`` launcher goes through :func:`run`.

A kernel has a list of GPU configurations (constexpr meta-parameters plus ``num_warps`` and
``num_stages``; the first is the *pinned* one) and one interpreter configuration:

| situation | configuration launched |
| --- | --- |
| the kernel runs on the Triton interpreter (``TRITON_INTERPRET=1`` when it was defined) | its interpreter config |
| ``KDC_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)`` | the pinned config |
| ``KDC_AUTOTUNE=0`` | the pinned config (one compile per kernel and case: what the GPU tests use) |
| otherwise | the fastest config, timed once per bucketed key and cached for the process |

Keys are built by the launchers from the sizes that change the best config (e.g. B * H, Nq, Nv,
L), each rounded up to a power of two by :func:`bucket`, so a training run with ragged batch
sizes or video lengths tunes a handful of times, not once per shape. Pinning matters for
determinism: every config reduces in its own order, so only one fixed config gives bitwise
identical results from one process to the next.

Test hooks (one way each):

* ``KDC_POISON_OUTPUTS=1`` (the same variable the compiled extension reads): every buffer a
  launcher allocates through :func:`new_buffer` starts as NaN (integers: -1), so an element a
  kernel forgets to write fails the comparison with the reference.
* :data:`hooks` (module state; tests set its fields with ``monkeypatch.setattr``): ``on_alloc``
  is told about every buffer, ``visit_log`` collects the tile visits of the attention kernels,
  ``native_dots`` feeds the dots the inputs' dtype on the interpreter (fp16 only: the
  interpreter's bf16 arithmetic is wrong), ``topk_splits`` forces the video splits of the top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import _config

Config = dict  # constexpr meta-parameters + "num_warps" + "num_stages"


@dataclass
class Hooks:
    """Test hooks of the Triton launchers (see the module docstring)."""

    on_alloc: Optional[Callable[[str, torch.Tensor], None]] = None
    visit_log: Optional[list] = None
    native_dots: bool = False
    topk_splits: Optional[int] = None


hooks = Hooks()


def new_buffer(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a Triton launcher allocates comes from here, so the hooks see all of them."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _config.poison_outputs():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    if hooks.on_alloc is not None:
        hooks.on_alloc(name, t)
    return t


def device_helper(fn):
    """Decorator of the device functions kernels call (``@triton.jit`` on a GPU, inlined by the
    compiler). Under the CPU interpreter they stay plain Python: the interpreter re-patches
    ``triton.language`` on every jit-function call (milliseconds each), which would dominate the
    test time. Decided at import, as Triton itself decides."""
    import triton

    return fn if _config.triton_interpret() else triton.jit(fn)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1 for n <= 1): an autotuning key component."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Host-side integer helpers for grids and tile sizes: plain Python (triton.cdiv and
# triton.next_power_of_2 are constexpr functions, several microseconds per host call).
next_pow2 = bucket


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs on the Triton interpreter (Triton decides when it is defined)."""
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)


def mode() -> str:
    """``"pinned"`` (deterministic mode or ``KDC_AUTOTUNE=0``) or ``"autotune"`` (GPU launches)."""
    return "pinned" if _config.deterministic() or not _config.autotune() else "autotune"


_TUNED: dict = {}  # (kernel, device index, *key) -> the fastest config, for the process


def choose(kernel, configs: Sequence[Config], interpret: Config, key: tuple, launch: Callable[[Config], object],
           device: torch.device) -> Config:
    """The config ``kernel`` runs with for ``key`` (see the module docstring). ``launch(config)``
    must run everything the config decides (it is timed once per config when autotuning), and
    must be safe to repeat: it overwrites its outputs."""
    if interpreted(kernel):
        return interpret
    if len(configs) == 1 or mode() == "pinned":
        return configs[0]
    full_key = (kernel, device.index, *key)
    best = _TUNED.get(full_key)
    if best is None:
        best = _TUNED[full_key] = _autotune(configs, launch)
    return best


def run(kernel, configs: Sequence[Config], interpret: Config, key: tuple, launch: Callable[[Config], object],
        device: torch.device):
    """``launch(config)`` with the config :func:`choose` picks; returns what ``launch`` returns."""
    return launch(choose(kernel, configs, interpret, key, launch, device))


def _autotune(configs: Sequence[Config], launch: Callable[[Config], object]) -> Config:
    """The fastest config by ``triton.testing.do_bench``; configs that fail to compile (out of
    shared memory or registers) are skipped, as Triton's own autotuner does."""
    import triton
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    timings = []
    for config in configs:
        try:
            ms = triton.testing.do_bench(lambda: launch(config), warmup=10, rep=40, return_mode="median")
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            ms = float("inf")
        timings.append(ms)
    best = min(range(len(configs)), key=lambda i: timings[i])
    if timings[best] == float("inf"):
        raise RuntimeError(f"no launch configuration of this kernel compiles on this GPU: {list(configs)}")
    return configs[best]


def launch_options(config: Config) -> tuple[dict, dict]:
    """``(constexpr meta-parameters, {num_warps, num_stages})`` of a config."""
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return meta, {k: config[k] for k in ("num_warps", "num_stages") if k in config}
