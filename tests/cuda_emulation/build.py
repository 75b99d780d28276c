"""Builds the CUDA emulation of the compiled extension (tests only): the real ``csrc/`` kernels and
bindings compiled for the CPU on top of ``tests/cuda_emulation`` (an emulated CUDA runtime), so
the CUDA path runs end to end on a machine without a GPU: torch.ops.kdc.cuda_* -> binding ->
launcher -> kernels. The bindings register under the CPU dispatch key (``KDC_CUDA_EMULATION``).
``include/`` stands in for the CUDA headers: the runtime API, the device language (fibers for
threads, see ``cuda_runtime.h``), fp16 / bf16, ``nvcuda::wmma`` (``mma.h``) and the PTX
instructions behind ``csrc/common/tensor_core.cuh`` (``kdc_emu_ptx.h``: ``mma.sync`` m16n8k16 with
the documented fragment layouts, ``ldmatrix`` with alignment and bounds checks; ``cp.async`` copies
are queued and land only at the ``cp.async.wait_group`` that covers them, see ``emu_runtime.cpp``).

The ``.cu`` sources are copied with three mechanical rewrites that plain C++ needs: kernel
launches ``k<<<grid, block, smem, stream>>>(args)`` become ``::emu::launcher(k, grid, block, smem,
stream)(args)``, the dynamic shared memory declaration becomes a pointer to the emulator's
per-block buffer, and static ``__shared__`` variables become ``static``.

``KDC_EMU_ASAN=1`` builds with AddressSanitizer (run python with
``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).

    python -m tests.cuda_emulation.build     # build (cached) and load; prints the library path
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+__align__\(\d+\)\s+float\s+(\w+)\[\];")


def rewrite_cuda(text: str) -> str:
    """The three rewrites from CUDA C++ to the emulator's plain C++."""
    text = _LAUNCH.sub(lambda m: f"::emu::launcher({m.group(1)}, {m.group(2)})(", text)
    text = _DYNAMIC_SMEM.sub(lambda m: f"float* {m.group(1)} = static_cast<float*>(::emu::dynamic_smem());", text)
    return re.sub(r"\b__shared__\b", "static", text)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def prepare_sources(out: Path) -> list[str]:
    """Copies csrc/ into out/csrc with the rewrites; returns the sources to compile."""
    sources = [str(HERE / "emu_runtime.cpp")]
    for path in sorted(CSRC.rglob("*")):
        if not path.is_file() or path.name == "module.cpp":  # the Python module init is not needed
            continue
        rel = path.relative_to(CSRC)
        if path.suffix in (".cu", ".cuh"):
            target = out / "csrc" / (str(rel) + (".cpp" if path.suffix == ".cu" else ""))
            _write_if_changed(target, rewrite_cuda(path.read_text()))
        else:
            target = out / "csrc" / rel
            _write_if_changed(target, path.read_text())
        if target.suffix == ".cpp":
            sources.append(str(target))
    return sources


def build(verbose: bool = False) -> str:
    """Compiles (or reuses) the emulated extension and loads it into this process; returns its path."""
    from torch.utils import cpp_extension

    asan = os.environ.get("KDC_EMU_ASAN", "") == "1"
    out = ROOT / ".cache" / ("cuda-emulation-asan" if asan else "cuda-emulation")
    sources = prepare_sources(out)
    flags = ["-DKDC_CUDA_EMULATION", "-O1", "-g0"]
    ldflags = []
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    (out / "build").mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="kdc_kernels_emulated" + ("_asan" if asan else ""),
        sources=sources,
        extra_include_paths=[str(HERE / "include"), str(out / "csrc")],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        build_directory=str(out / "build"),
        is_python_module=False,
        verbose=verbose,
    )


if __name__ == "__main__":
    print(build(verbose=True))
