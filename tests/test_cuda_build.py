"""Build plumbing of the CUDA extension, checked without a GPU: when setup.py compiles it and what
it says when it does not, the build-info file beside the library, the torch-version mismatch
message at import, and the source list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from kdc_kernels import _build, _ext

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["auto", "1"])
def test_build_decision_reasons(mode):
    cases = [
        (False, "2.11.0", "12.8", "/usr/local/cuda", "no CUDA sources"),
        (True, None, None, None, "torch is not importable"),
        (True, "2.13.0+cpu", None, None, "CPU-only build"),
        (True, "2.11.0", "12.8", None, "no CUDA toolkit"),
    ]
    for has_sources, version, cuda, home, reason in cases:
        if mode == "1":
            with pytest.raises(SystemExit, match=f"KDC_BUILD_CUDA=1 but the CUDA extension cannot be built: .*{reason}"):
                _build.cuda_build_decision(mode, has_sources, version, cuda, home)
        else:
            build, message = _build.cuda_build_decision(mode, has_sources, version, cuda, home)
            assert not build and reason in message and "KDC_BUILD_CUDA=1" in message
    build, message = _build.cuda_build_decision(mode, True, "2.11.0", "12.8", "/usr/local/cuda")
    assert build and "torch 2.11.0 (CUDA 12.8)" in message
    assert _build.cuda_build_decision("0", True, "2.11.0", "12.8", "/usr/local/cuda")[0] is False


def _run_setup(mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KDC_BUILD_CUDA=mode, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch behaviour")
def test_setup_on_cpu_torch():
    auto = _run_setup("auto")
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip().splitlines()[-1] == "0.1.0"
    lines = [line for line in auto.stderr.splitlines() if line.startswith("kdc-kernels setup:")]
    assert lines == [f"kdc-kernels setup: not compiling the CUDA extension: torch {torch.__version__} is a "
                     "CPU-only build (set KDC_BUILD_CUDA=1 to require it)"]
    strict = _run_setup("1")
    assert strict.returncode != 0
    assert "KDC_BUILD_CUDA=1 but the CUDA extension cannot be built" in strict.stderr
    assert "CPU-only build" in strict.stderr
    bad = _run_setup("maybe")
    assert bad.returncode != 0 and "KDC_BUILD_CUDA must be auto, 0 or 1" in bad.stderr


def test_arch_list_default(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.arch_list(cuda_available=False) == "9.0"
    assert _build.arch_list(cuda_available=True) is None  # torch targets the visible GPUs
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert _build.arch_list(cuda_available=False) == "8.0;9.0"


def test_sources_are_unique_and_complete():
    sources = _build.sources(ROOT)
    names = {Path(s).name for s in sources}
    assert {"windowed_attention_fwd.cu", "windowed_attention_bwd.cu", "max_similarity.cu", "max_similarity_topk.cu",
            "windowed_attention_binding.cpp", "max_similarity_binding.cpp", "module.cpp"} <= names
    assert len({Path(s).stem for s in sources}) == len(sources)  # the CUDA emulation build names objects by stem


def test_build_mismatch_messages():
    info = {"torch": "2.11.0+cu128", "cuda": "12.8", "arch_list": "9.0"}
    assert _build.build_mismatch(info, "2.11.0+cu128", "12.8") is None
    assert _build.build_mismatch(None, "2.11.0+cu128", "12.8") is None
    msg = _build.build_mismatch(info, "2.12.0+cu130", "13.0")
    assert "built for torch 2.11.0+cu128 (CUDA 12.8)" in msg and "torch 2.12.0+cu130" in msg and "rebuild" in msg
    assert "CUDA 12.6" in _build.build_mismatch(dict(info, cuda="12.6"), "2.11.0+cu128", "12.8")


def test_import_explains_a_torch_mismatch(tmp_path, monkeypatch):
    """A prebuilt library whose build info names another torch is not loaded, and says why."""
    library = tmp_path / "kdc_kernels" / "_C.cpython-311-x86_64-linux-gnu.so"
    library.parent.mkdir()
    library.write_bytes(b"not a library: loading it would fail")
    _build.write_build_info(library.parent, {"torch": "0.0.1", "cuda": "11.0", "arch_list": "8.0"})
    spec = types.SimpleNamespace(origin=str(library))
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: spec)
    reason = _ext._load_prebuilt()
    assert "built for torch 0.0.1 (CUDA 11.0)" in reason and f"torch {torch.__version__}" in reason
    assert "KDC_BUILD_CUDA=1" in reason


def test_build_info_written_beside_the_library(tmp_path):
    """The build_ext subclass setup.py uses writes the build info beside the library, in the build
    folder and (in-place builds, as editable installs do) in the source package: checked on a tiny
    C extension built with plain setuptools."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.c").write_text(textwrap.dedent("""
        #include <Python.h>
        static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_tiny", NULL, -1, NULL};
        PyMODINIT_FUNC PyInit__tiny(void) { return PyModule_Create(&def); }
    """))
    (tmp_path / "setup.py").write_text(textwrap.dedent(f"""
        import importlib.util
        from setuptools import Extension, setup
        from setuptools.command.build_ext import build_ext
        spec = importlib.util.spec_from_file_location("b", {str(ROOT / "kdc_kernels" / "_build.py")!r})
        b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
        setup(name="pkg", version="0", packages=["pkg"],
              ext_modules=[Extension("pkg._tiny", ["pkg/tiny.c"])],
              cmdclass={{"build_ext": b.build_ext_with_info(build_ext, {{"torch": "x", "cuda": "y"}})}})
    """))
    for args in (["build_ext"], ["build_ext", "--inplace"]):
        proc = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    built = list((tmp_path / "build").rglob(_build.BUILD_INFO_NAME))
    assert len(built) == 1 and any(p.name.startswith("_tiny") for p in built[0].parent.iterdir())
    assert json.loads((pkg / _build.BUILD_INFO_NAME).read_text()) == {"torch": "x", "cuda": "y"}
    assert list(pkg.glob("_tiny*.so"))


def test_check_cuda_counts_tensor_core_instructions():
    """scripts/check_cuda.py attributes the mma instructions of a PTX file to its kernels and joins
    them with ptxas's registers and spills (what scripts/kernel_report.py reads)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_cuda
    finally:
        sys.path.pop(0)
    ptx = textwrap.dedent("""
        .func  (.param .b32 r) _Z4slowv()
        {
        }
        .visible .entry _Z2k1v(
        )
        {
            mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            @%p1 mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
            wmma.mma.sync.aligned.row.col.m16n16k16.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};
        }
        .visible .entry _Z2k2v(
        )
        {
            fma.rn.f32 %f1, %f2, %f3, %f4;
        }
    """)
    assert check_cuda.tensor_core_counts(ptx) == {"_Z2k1v": 3, "_Z2k2v": 0}
    output = ("ptxas info    : Function properties for _Z2k1v\n"
              "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
              "ptxas info    : Used 96 registers, used 1 barriers\n"
              "ptxas info    : Function properties for _Z2k2v\n"
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 32 registers\n")
    rows = check_cuda.kernel_rows(output, ptx)
    assert [r[1:] for r in rows] == [(96, 8, 4, 3), (32, 0, 0, 0)]
    assert [r[4] for r in check_cuda.kernel_rows(output, None)] == [None, None]


def test_bench_cuda_kernels_smoke():
    """benchmarks/bench_cuda_kernels.py runs without a GPU (tiny shapes, the impls that can run) and
    prints every row as a JSON line the moment it is measured."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cuda_kernels.py"), "--quick",
                           "--cases", "attn L=32,topk", "--impls", "cuda,reference"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    assert [(r["case"], r["impl"]) for r in rows] == [("attn L=32 fwd+bwd", "cuda"), ("attn L=32 fwd+bwd", "reference"),
                                                      ("topk TVR k=100", "cuda"), ("topk TVR k=100", "reference")]
    assert all(r["ms"] > 0 for r in rows if r["impl"] == "reference")
    if not torch.cuda.is_available():
        assert all("note" in r for r in rows if r["impl"] == "cuda")
