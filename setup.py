"""Build script: pure-Python install everywhere; the CUDA extension only where it can be built.

``KDC_BUILD_CUDA``:
  * ``auto`` (default): build ``kdc_kernels._C`` when torch is a CUDA build, a CUDA toolkit
    (nvcc) is found and ``csrc/`` holds sources; otherwise install without it and say why.
  * ``1``: build it or fail loudly.
  * ``0``: never build it.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``9.0`` when no GPU is visible),
``MAX_JOBS`` the parallel compile jobs. Install with ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "kdc_kernels._C"


def _say(msg: str) -> None:
    print(f"kdc-kernels setup: {msg}", file=sys.stderr)


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line saying why not."""
    mode = os.environ.get("KDC_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KDC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        _say("KDC_BUILD_CUDA=0: not compiling the CUDA extension (the Triton and reference paths work without it)")
        return [], {}

    def skip(reason: str):
        if mode == "1":
            raise SystemExit(f"KDC_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"not compiling the CUDA extension: {reason} (set KDC_BUILD_CUDA=1 to require it)")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
                     + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return skip("csrc/ holds no CUDA sources yet")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable in the build environment (use pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        return skip("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    _say(f"compiling the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}")
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
