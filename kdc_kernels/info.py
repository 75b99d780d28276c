"""``python -m kdc_kernels.info``: versions, devices, what loads, and what ``auto`` would pick."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _backend, _config, _ext
from .ops import OPS


def auto_choices(device_type: str) -> dict[str, str]:
    """What ``impl="auto"`` picks for each op of the op table for fp32 tensors on ``device_type``
    (asked with each op's probe case)."""
    device = torch.device(device_type)
    return {
        spec.name: _backend.resolve(spec.name, "auto", device,
                                    lambda impl, spec=spec: _backend.why_not(spec, impl, device, spec.probe()))
        for spec in OPS
    }


def report() -> str:
    """The environment report as text (also saved into training run folders)."""
    lines = [f"kdc_kernels {__version__}", f"python {sys.version.split()[0]} ({platform.platform()})"]
    lines.append(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"Triton interpreter (TRITON_INTERPRET): {'on' if _config.triton_interpret() else 'off'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("CUDA devices: none visible")
    loaded, why = _ext.status()
    built = _ext.build_info() or {}
    built_for = ", ".join(f"{k} {built[k]}" for k in ("torch", "cuda", "arch_list") if k in built)
    lines.append("compiled extension: " + (f"loaded ({built_for or 'no build info'})" if loaded else f"not loaded ({why})"))
    lines.append(f"KDC_IMPL default: {_config.default_impl()}; deterministic: {_config.deterministic()}")
    lines.append("auto picks (fp32 tensors):")
    for device_type in ("cpu", "cuda"):
        picks = auto_choices(device_type)
        for spec in OPS:
            impl = picks[spec.name]
            lines.append(f"  {device_type:<4} {spec.name:<20} -> {impl}")
            if device_type == "cuda" and impl != "cuda":
                device = torch.device("cuda")
                for fast in ("cuda", "triton") if impl == "reference" else ("cuda",):
                    why = _backend.why_not(spec, fast, device, spec.probe())
                    lines.append(f"       not {fast}: " + "; ".join(why))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
