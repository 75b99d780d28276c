"""Build script: pure-Python install everywhere; the CUDA extension only where it can be built.

``KDC_BUILD_CUDA``:
  * ``auto`` (default): build ``kdc_kernels._C`` when torch is a CUDA build, a CUDA toolkit
    (nvcc) is found and ``csrc/`` holds sources; otherwise install without it and say why (one line).
  * ``1``: build it or fail loudly.
  * ``0``: never build it.
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``9.0`` when no GPU is visible),
``MAX_JOBS`` the parallel compile jobs (ninja). Install with ``pip install --no-build-isolation -e .``.
Beside the library the build writes ``_C_build.json`` (the torch / CUDA versions and architectures
it was built for): importing under another torch then explains the mismatch instead of crashing.
The sources, flags and build-info logic live in ``kdc_kernels/_build.py`` (which the package
also reads to check the build info at import).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"kdc-kernels setup: {msg}", file=sys.stderr)


def _load_build_module():
    """kdc_kernels/_build.py, loaded from its path (importing the package would need torch)."""
    spec = importlib.util.spec_from_file_location("_kdc_build", os.path.join(ROOT, "kdc_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line saying why not."""
    build = _load_build_module()
    mode = build.build_mode()
    if mode == "0":
        _say(build.cuda_build_decision(mode, True, None, None, None)[1])
        return [], {}
    has_sources = bool(build.sources(ROOT))
    torch_version = torch_cuda = cuda_home = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME

        torch_version, torch_cuda, cuda_home = torch.__version__, torch.version.cuda, CUDA_HOME
    except ImportError:
        pass
    ok, message = build.cuda_build_decision(mode, has_sources, torch_version, torch_cuda, cuda_home)
    if not ok:
        _say(message)
        return [], {}

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = build.arch_list(torch.cuda.is_available())
    if archs is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    _say(f"{message}, TORCH_CUDA_ARCH_LIST={archs or 'visible GPUs'}, MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}")
    info = build.build_info(torch, archs, build.source_root() or None)

    ext = CUDAExtension(
        name=build.EXT_NAME,
        sources=build.sources(ROOT),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS)},
    )
    return [ext], {"build_ext": build.build_ext_with_info(BuildExtension, info).with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
