"""The run modes of the fast paths, shared by the per-op fast-path test files
(``test_windowed_attention_fast.py``, ``test_max_similarity_fast.py``) and ``test_cuda_ops.py``.

==================  ======  ======  =============================================================
mode                impl    device  how it runs
==================  ======  ======  =============================================================
triton-interpreter  triton  cpu     the Triton kernels on the CPU interpreter (``TRITON_INTERPRET=1``,
                                    set by tests/conftest.py without a GPU); skipped when it is off
cuda-emulated       cuda    cpu     the csrc/ kernels and bindings compiled for the CPU on top of an
                                    emulated CUDA runtime (tests/cuda_emulation), called through the
                                    ``_cuda.py`` wrappers after the public API's own validation (the
                                    public API sends CPU tensors to the CPU impls only); ``slow``
triton-gpu          triton  cuda    the public API with ``impl="triton"``; ``gpu``
cuda-gpu            cuda    cuda    the public API with ``impl="cuda"``; ``gpu`` (fails, not skips,
                                    when the extension is not loaded on a GPU machine)
==================  ======  ======  =============================================================

A test takes the fixture ``mode`` (tests/ops/conftest.py: every mode), or narrows it with
``@pytest.mark.parametrize("mode", TRITON_MODES, indirect=True)`` (or ``CUDA_MODES``, or
:func:`params`).
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _config, testing

NAMES = ("triton-interpreter", "cuda-emulated", "triton-gpu", "cuda-gpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_interp = pytest.mark.skipif(not _config.triton_interpret(),
                             reason="the Triton interpreter is off (a GPU is present): the GPU modes cover this")
MARKS = {
    "triton-interpreter": (_interp,),
    "cuda-emulated": (pytest.mark.slow,),
    "triton-gpu": (pytest.mark.gpu,),
    "cuda-gpu": (pytest.mark.gpu,),
}


def params(*names: str) -> list:
    """``pytest.param`` of each named mode (default: all) with its marks, for ``indirect=True``."""
    return [pytest.param(n, marks=MARKS[n], id=n) for n in (names or NAMES)]


ALL_MODES = params()
TRITON_MODES = params("triton-interpreter", "triton-gpu")
CUDA_MODES = params("cuda-emulated", "cuda-gpu")


@functools.lru_cache(maxsize=1)
def build_emulation() -> str:
    """Compile (cached in .cache/cuda-emulation) and load the CUDA emulation; its library path."""
    from tests.cuda_emulation.build import build

    return build()


def emulation_tools_missing() -> str | None:
    """Why the emulation cannot be built here (a missing build tool), or None."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "the CUDA emulation is built with ninja, which is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "the CUDA emulation needs a C++ compiler (c++ / $CXX), none found"
    return None


class RunMode:
    """One implementation in one run mode: the ops as that mode calls them."""

    def __init__(self, name: str):
        if name not in NAMES:
            raise ValueError(f"mode must be one of {NAMES}, got {name!r}")
        self.name = name
        self.impl, where = name.split("-", 1)
        self.device = torch.device("cuda" if where == "gpu" else "cpu")
        self.emulated = where == "emulated"
        self.interpreted = where == "interpreter"
        self.gpu = where == "gpu"

    def __repr__(self) -> str:
        return f"RunMode({self.name!r})"

    @property
    def tf32(self) -> bool:
        """Whether fp32 results are checked at the TF32 tolerance: the Triton kernels on a GPU where
        the precision rule allows TF32 dots (the CUDA kernels' fp32 path never uses TF32)."""
        return self.impl == "triton" and self.gpu and testing.tf32_enabled(self.device)

    def prepare(self) -> "RunMode":
        """Skip (a build tool missing) or fail (the extension not loaded on a GPU machine) early;
        build the emulation once."""
        if self.emulated:
            missing = emulation_tools_missing()
            if missing:
                pytest.skip(missing)
            build_emulation()  # any other build error fails the test
        elif self.impl == "cuda":
            from kdc_kernels import _ext

            loaded, why = _ext.status()
            if not loaded:
                pytest.fail(f"the CUDA extension is not loaded on this GPU machine: {why}")
            missing = [op for op in _ext.CUDA_OPS if not _ext.has_op(op)]
            if missing:
                pytest.fail(f"the CUDA extension has no kernels for {missing}: rebuild it")
        return self

    # --- the ops -----------------------------------------------------------------------------

    def windowed_attention(self, q, k, v, rel_bias=None, sigma=None, lengths=None, *, scale=None, cutoff=None):
        if self.emulated:
            from kdc_kernels.ops.windowed_attention import _cuda, api

            return _cuda.windowed_attention_cuda(**api._validate(q, k, v, rel_bias, sigma, lengths, scale, cutoff))
        return K.windowed_attention(q, k, v, rel_bias, sigma, lengths, scale=scale, cutoff=cutoff, impl=self.impl)

    def windowed_attention_fwd_op(self):
        """The registered forward op ``(q, k, v, rel_bias, sigma, lengths, scale, cutoff) -> (out,
        lse)``, with autograd."""
        if self.impl == "triton":
            from kdc_kernels.ops.windowed_attention import _triton  # noqa: F401  (registers the op)

            return torch.ops.kdc_triton.windowed_attention_fwd
        from kdc_kernels.ops.windowed_attention import _cuda  # noqa: F401

        return torch.ops.kdc.cuda_windowed_attention_fwd

    def max_similarity(self, queries, clips, lengths=None, *, normalize=True, return_index=False):
        if self.emulated:
            from kdc_kernels.ops.max_similarity import _cuda, api

            return _cuda.max_similarity_cuda(**api._validate(queries, clips, lengths), normalize=normalize,
                                             return_index=return_index)
        return K.max_similarity(queries, clips, lengths, normalize=normalize, return_index=return_index,
                                impl=self.impl)

    def max_similarity_topk(self, queries, clips, lengths=None, k=100, *, normalize=True):
        if self.emulated:
            from kdc_kernels.ops.max_similarity import _cuda, api

            return _cuda.max_similarity_topk_cuda(**api._validate(queries, clips, lengths), k=k, normalize=normalize)
        return K.max_similarity_topk(queries, clips, lengths, k, normalize=normalize, impl=self.impl)
