#!/usr/bin/env python3
"""Compile check of the CUDA sources, for CI machines without a GPU.

* Every ``csrc/**/*.cu`` file is compiled torch-free with ``nvcc -c -std=c++17 -arch=sm_90`` and
  ``-arch=sm_80`` (``--arch`` to change), with ``-Xptxas -v``: a syntax or template error fails the
  check, and the registers, spills and tensor-core instructions (``mma.sync`` / ``wmma.mma`` in the
  kernel's PTX, kept with ``-keep``) of every kernel are printed (spills are flagged). Every arch
  after the first also gets the defines torch's CUDAExtension adds (``-D__CUDA_NO_HALF_OPERATORS__``
  ...), so both the plain compile and the one setup.py runs are covered.
* Every ``csrc/**/*.cpp`` binding is syntax-checked (``g++ -fsyntax-only``) against the installed
  torch's headers and the CUDA headers. A CPU-only torch wheel lacks one generated CUDA header
  (``c10/cuda/impl/cuda_cmake_macros.h``); an empty stand-in is supplied in a temporary folder.

A check that cannot run is a failure, not a pass: without nvcc (or g++, torch or the CUDA headers
for the bindings) the script says what is missing and how to install it, and exits 1, as it does
when a compile fails. On a machine that cannot run it, skip it explicitly: ``KDC_SKIP_CUDA_CHECK=1``
skips the whole check (exit 0, saying so), ``--no-bindings`` the binding check alone.

    python scripts/check_cuda.py                 # both checks, sm_90 and sm_80
    python scripts/check_cuda.py --arch sm_90 --no-bindings
    KDC_SKIP_CUDA_CHECK=1 python scripts/check_cuda.py   # a machine without the CUDA toolkit
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC_FLAGS = ["-std=c++17", "-O3", "-Xptxas", "-v"]
# What torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS).
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]


SKIP_VARIABLE = "KDC_SKIP_CUDA_CHECK"
NVCC_MISSING = (
    "nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin and on PATH): the CUDA "
    "compile check cannot run. Install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or e.g. "
    "`conda install -c nvidia cuda-nvcc`) and set CUDA_HOME, or skip the check explicitly with "
    f"{SKIP_VARIABLE}=1"
)


def skip_requested() -> bool:
    """``KDC_SKIP_CUDA_CHECK``: 1 / true / yes / on skips the check; unset, empty or 0 runs it."""
    raw = os.environ.get(SKIP_VARIABLE, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise SystemExit(f"check_cuda: environment variable {SKIP_VARIABLE} must be 0 or 1, got {raw!r}")


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(name: str) -> str:
    """kdc::wattn::window_attn_fwd_kernel<__nv_bfloat16, 64, 64, 128>(kdc::...) -> without the arguments."""
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("kdc::", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def ptxas_report(output: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, spill store bytes, spill load bytes) from ``-Xptxas -v`` output."""
    return [row[:4] for row in kernel_rows(output, None)]


def keep_dir(out_dir: Path, source: Path, arch: str) -> Path:
    """Where compile_cu keeps nvcc's intermediate files (the PTX among them) for one source and arch."""
    return out_dir / f"{source.stem}.{arch}.keep"


def compile_cu(nvcc: str, source: Path, arch: str, torch_defines: bool, out_dir: Path) -> tuple[bool, str, float]:
    """nvcc -c of one .cu file: (ok, compiler output incl. -Xptxas -v, seconds). The object is
    ``out_dir/<stem>.<arch>.o``; the PTX stays in ``keep_dir(out_dir, source, arch)/<stem>.ptx``."""
    t0 = time.perf_counter()
    obj = out_dir / f"{source.stem}.{arch}.o"
    keep = keep_dir(out_dir, source, arch)
    keep.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-c", f"-arch={arch}", *NVCC_FLAGS, *(TORCH_NVCC_DEFINES if torch_defines else []), f"-I{CSRC}",
           "-keep", f"-keep-dir={keep}", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr, time.perf_counter() - t0


_TENSOR_CORE_PTX = re.compile(r"^\s*(?:@%\w+\s+)?(?:mma\.sync|wmma\.mma\.sync|wgmma\.mma_async)\b", re.MULTILINE)


def tensor_core_counts(ptx: str) -> dict[str, int]:
    """Tensor-core instructions (mma.sync, wmma.mma.sync, wgmma.mma_async) in each kernel (.entry)
    of a PTX file, by mangled name. (mma.sync m16n8k16 becomes one HMMA in SASS.)"""
    counts, pieces = {}, re.split(r"^\.(?:visible\s+)?\.entry\s+", ptx, flags=re.MULTILINE)
    for piece in pieces[1:]:
        name = re.match(r"(\w+)", piece).group(1)
        body = piece.split("\n.func", 1)[0].split("\n.entry", 1)[0]
        counts[name] = len(_TENSOR_CORE_PTX.findall(body))
    return counts


def kernel_rows(output: str, ptx: str | None) -> list[tuple[str, int, int, int, int | None]]:
    """(kernel, registers, spill store bytes, spill load bytes, tensor-core instructions or None
    without PTX) for every function of one compile."""
    rows, current, spills = [], None, (0, 0)
    for line in output.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            spills = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            rows.append((current, int(m.group(1)), *spills))
            current, spills = None, (0, 0)
    counts = tensor_core_counts(ptx) if ptx is not None else {}
    names = _demangle([r[0] for r in rows])
    return [(_short(names[r[0]]), r[1], r[2], r[3], counts.get(r[0]) if ptx is not None else None) for r in rows]


def binding_command() -> tuple[list[str] | None, str, tempfile.TemporaryDirectory | None]:
    """(g++ command prefix, why not, temporary shim folder) for the binding syntax check."""
    gxx = shutil.which(os.environ.get("CXX", "g++"))
    if gxx is None:
        return None, "no C++ compiler (g++) found", None
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "torch is not importable", None
    cuda_include = None
    nvcc = find_nvcc()
    if nvcc is not None:
        cuda_include = Path(nvcc).resolve().parent.parent / "include"
    if cuda_include is None or not (cuda_include / "cuda_runtime_api.h").is_file():
        return None, "no CUDA headers (cuda_runtime_api.h) found", None
    shim = None
    flags = []
    torch_includes = cpp_extension.include_paths()
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in torch_includes):
        shim = tempfile.TemporaryDirectory(prefix="kdc-shim-")
        header = Path(shim.name) / "c10/cuda/impl/cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n")  # generated by CUDA builds of torch; empty is enough to parse
        flags.append(f"-I{shim.name}")
    std = "-std=c++20" if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 10) else "-std=c++17"
    cmd = [gxx, std, "-fsyntax-only", "-Wall", *flags, f"-I{CSRC}"]
    cmd += [f"-isystem{p}" for p in torch_includes]
    cmd += [f"-isystem{cuda_include}", f"-isystem{sysconfig.get_paths()['include']}"]
    return cmd, "", shim


def check_binding(cmd: list[str], source: Path) -> tuple[bool, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], help="GPU architectures (default: sm_90 sm_80)")
    parser.add_argument("--no-bindings", action="store_true", help="skip the g++ syntax check of the torch bindings")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles")
    args = parser.parse_args(argv)

    if skip_requested():
        print(f"check_cuda: SKIPPED ({SKIP_VARIABLE}=1): no CUDA source was compiled or checked")
        return 0
    failed = False
    nvcc = find_nvcc()
    cu_files = sorted(CSRC.rglob("*.cu"))
    with futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool, \
            tempfile.TemporaryDirectory(prefix="kdc-nvcc-") as out_dir:
        if nvcc is None:
            failed = True
            print(f"FAIL check_cuda: {NVCC_MISSING}")
        else:
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            print(f"check_cuda: {nvcc} ({version[-1] if version else '?'}): {len(cu_files)} files x {args.arch}")
            jobs = {pool.submit(compile_cu, nvcc, f, arch, n > 0, Path(out_dir)): (f, arch)
                    for f in cu_files for n, arch in enumerate(args.arch)}
            for job in futures.as_completed(jobs):
                source, arch = jobs[job]
                ok, output, seconds = job.result()
                rel = source.relative_to(ROOT)
                if not ok:
                    failed = True
                    print(f"FAIL {rel} [{arch}] ({seconds:.1f} s): {' '.join(NVCC_FLAGS)}\n{output}")
                    continue
                ptx_file = keep_dir(Path(out_dir), source, arch) / f"{source.stem}.ptx"
                rows = kernel_rows(output, ptx_file.read_text() if ptx_file.is_file() else None)
                spilling = [r for r in rows if r[2] or r[3]]
                with_tc = [r for r in rows if r[4]]
                label = arch + (" + torch defines" if args.arch.index(arch) > 0 else "")
                print(f"ok   {rel} [{label}] ({seconds:.1f} s): {len(rows)} kernels, max {max((r[1] for r in rows), default=0)} "
                      f"registers, {len(spilling)} spilling, {len(with_tc)} with tensor-core instructions")
                for name, regs, stores, loads, tc in rows:
                    flag = "  SPILL" if stores or loads else ""
                    tc_text = "   ?" if tc is None else f"{tc:4d}"
                    print(f"       {regs:4d} regs  {stores:4d}/{loads:<4d} B spill st/ld  {tc_text} mma  {name}{flag}")
                warnings = [line for line in output.splitlines() if "warning" in line.lower()]
                for line in warnings:
                    print(f"       {line}")

        if args.no_bindings:
            print("check_cuda: binding syntax check skipped (--no-bindings)")
        else:
            cmd, why, shim = binding_command()
            if cmd is None:
                failed = True
                print(f"FAIL check_cuda: the binding syntax check cannot run: {why} (install what is missing, pass "
                      f"--no-bindings to skip this part, or set {SKIP_VARIABLE}=1 to skip the whole check)")
            else:
                cpp_files = sorted(CSRC.rglob("*.cpp"))
                jobs = {pool.submit(check_binding, cmd, f): f for f in cpp_files}
                for job in futures.as_completed(jobs):
                    ok, output, seconds = job.result()
                    rel = jobs[job].relative_to(ROOT)
                    print(f"{'ok  ' if ok else 'FAIL'} {rel} [g++ -fsyntax-only against torch headers] ({seconds:.1f} s)")
                    if not ok or output.strip():
                        print(output)
                    failed |= not ok
                if shim is not None:
                    shim.cleanup()
    print("check_cuda: " + ("FAILED" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
