"""``python -m kdc_kernels.info``: versions, devices, what loads, and what ``auto`` would pick."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _backend, _config, _ext

# A typical valid call of each op, used to ask every impl whether it could run it.
_PROBES = {
    "windowed_attention": "kdc_kernels.ops.windowed_attention",
    "max_similarity": "kdc_kernels.ops.max_similarity",
    "max_similarity_topk": "kdc_kernels.ops.max_similarity",
}


def _probe_case(op_name: str, device: torch.device) -> dict:
    """Describe a small fp32 call on ``device`` without allocating on it."""
    meta = dict(device="meta")
    if op_name == "windowed_attention":
        q = torch.empty(2, 4, 32, 16, **meta)
        return dict(q=q, k=q, v=q, rel_bias=torch.empty(4, 9, **meta), sigma=torch.empty(2, 4, 32, **meta),
                    lengths=None, scale=None, cutoff=None)
    case = dict(queries=torch.empty(8, 32, **meta), clips=torch.empty(4, 16, 32, **meta), lengths=None,
                normalize=True)
    case.update(k=2) if op_name == "max_similarity_topk" else case.update(return_index=False)
    return case


def auto_choices(device_type: str) -> dict[str, str]:
    """What ``impl="auto"`` picks for each op for fp32 tensors on ``device_type``."""
    device = torch.device(device_type)
    return {
        op: _backend.resolve(op, "auto", device,
                             lambda name, op=op, pkg=pkg: _backend.why_not(op, pkg, name, device, _probe_case(op, device)))
        for op, pkg in _PROBES.items()
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
        for op, impl in auto_choices(device_type).items():
            lines.append(f"  {device_type:<4} {op:<20} -> {impl}")
            if device_type == "cuda" and impl != "cuda":
                device = torch.device("cuda")
                for fast in ("cuda", "triton") if impl == "reference" else ("cuda",):
                    why = _backend.why_not(op, _PROBES[op], fast, device, _probe_case(op, device))
                    lines.append(f"       not {fast}: " + "; ".join(why))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
