"""How the CUDA extension is built: sources, compiler flags, architectures, the build-info file.

Used by ``setup.py`` (loaded from its file path, so it must not import the package or torch at
module level) and by :mod:`kdc_kernels._ext` (the build-info check at import).

The extension ``kdc_kernels._C`` is built from ``csrc/``: torch-free kernels (``*.cu``, compiled
by nvcc with ``NVCC_FLAGS``) and small torch bindings (``*.cpp``). Next to the library the build
writes ``_C_build.json`` (torch / CUDA versions and architectures it was built for) so that an
import under another torch explains the mismatch instead of failing on missing symbols.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

EXT_NAME = "kdc_kernels._C"
BUILD_INFO_NAME = "_C_build.json"
DEFAULT_ARCH_LIST = "9.0"  # H100/H200 when no GPU is visible at build time
# nvcc: the .cu files are torch-free C++17. No fast-math: expf/logf accuracy matters for the
# softmax and the LSE saved for the backward.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3"]  # the bindings use torch's own C++ standard (added by torch.utils.cpp_extension)


def source_root() -> Path | None:
    """The project root holding ``csrc/`` (a source checkout or editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "csrc").is_dir() else None


def sources(root: Path) -> list[str]:
    """Every ``.cu`` and ``.cpp`` file under ``root/csrc``, sorted, relative to ``root``.

    File names must be unique across folders: the CUDA emulation build of the tests
    (``tests/cuda_emulation``, ``torch.utils.cpp_extension.load``) names object files after the
    file name alone.
    """
    found = glob.glob(os.path.join("csrc", "**", "*.cu"), root_dir=root, recursive=True)
    found += glob.glob(os.path.join("csrc", "**", "*.cpp"), root_dir=root, recursive=True)
    stems = [os.path.splitext(os.path.basename(path))[0] for path in found]
    clashes = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clashes:
        raise SystemExit(f"csrc/ source file names must be unique (the CUDA emulation build needs it): {clashes}")
    return sorted(found)


def sources_hash(root: Path) -> str:
    """Hash of every file under ``csrc/`` (sources and headers), recorded in the build info."""
    digest = hashlib.sha256()
    for path in sorted((root / "csrc").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def arch_list(cuda_available: bool) -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` to build for: the variable if set, ``9.0`` when no GPU is visible,
    else None (torch.utils.cpp_extension then targets the visible GPUs)."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if value:
        return value
    return None if cuda_available else DEFAULT_ARCH_LIST


def build_mode() -> str:
    mode = os.environ.get("KDC_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KDC_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def cuda_build_decision(mode: str, has_sources: bool, torch_version: str | None, torch_cuda: str | None,
                        cuda_home: str | None) -> tuple[bool, str]:
    """Whether ``setup.py`` builds the extension, and the one line that says why (not).

    ``torch_version`` is None when torch is not importable. With ``mode == "1"`` every reason not
    to build raises ``SystemExit`` with that line instead.
    """
    if mode == "0":
        return False, "KDC_BUILD_CUDA=0: not compiling the CUDA extension (the Triton and reference paths work without it)"
    if not has_sources:
        reason = "csrc/ holds no CUDA sources"
    elif torch_version is None:
        reason = "torch is not importable in the build environment (install with pip install --no-build-isolation)"
    elif torch_cuda is None:
        reason = f"torch {torch_version} is a CPU-only build"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    else:
        return True, f"compiling the CUDA extension for torch {torch_version} (CUDA {torch_cuda})"
    if mode == "1":
        raise SystemExit(f"kdc-kernels setup: KDC_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, f"not compiling the CUDA extension: {reason} (set KDC_BUILD_CUDA=1 to require it)"


def build_info(torch_module, archs: str | None, root: Path | None = None) -> dict:
    """What the extension is being built against (written beside the library)."""
    info = {
        "torch": torch_module.__version__,
        "cuda": torch_module.version.cuda,
        "arch_list": archs or "visible GPUs",
        "python": platform.python_version(),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if root is not None:
        info["sources"] = sources_hash(root)
    return info


def write_build_info(directory: str | os.PathLike, info: dict) -> Path:
    path = Path(directory) / BUILD_INFO_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def read_build_info(directory: str | os.PathLike) -> dict | None:
    """The build-info beside a library, or None if absent or unreadable."""
    try:
        return json.loads((Path(directory) / BUILD_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_mismatch(info: dict | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a library built as ``info`` must not be loaded into this torch (None: it can)."""
    if info is None:
        return None  # no record (an older or hand-made build): try to load it
    built_torch, built_cuda = info.get("torch"), info.get("cuda")
    if built_torch != torch_version:
        return (f"it was built for torch {built_torch} (CUDA {built_cuda}) but torch {torch_version} "
                f"(CUDA {torch_cuda}) is running; rebuild it against this torch")
    if built_cuda != torch_cuda:
        return f"it was built for CUDA {built_cuda} but this torch uses CUDA {torch_cuda}; rebuild it"
    return None


def build_ext_with_info(base, info: dict):
    """``base`` (a setuptools ``build_ext``, e.g. torch's ``BuildExtension``) extended to write
    ``info`` as the build-info file beside the built library: in the build folder, and for in-place
    (editable) builds also in the source package, and to list it among the build outputs."""

    class BuildExtWithInfo(base):
        def _info_paths(self) -> list[tuple[str, str]]:
            """(file beside the library in the build folder, the same in the source package)."""
            paths = []
            for ext in self.extensions:
                fullname = self.get_ext_fullname(ext.name)
                built = os.path.join(self.build_lib, self.get_ext_filename(fullname))
                package_dir = self.get_finalized_command("build_py").get_package_dir(fullname.rpartition(".")[0])
                paths.append((os.path.join(os.path.dirname(built), BUILD_INFO_NAME),
                              os.path.join(package_dir, BUILD_INFO_NAME)))
            return paths

        def run(self):
            super().run()
            for built, inplace in self._info_paths():
                write_build_info(os.path.dirname(built), info)
                if self.inplace:
                    shutil.copyfile(built, inplace)

        def get_outputs(self):  # in-place builds list the build-folder files and map them (below)
            return super().get_outputs() + [built for built, _ in self._info_paths()]

        def get_output_mapping(self):
            mapping = dict(super().get_output_mapping())
            if self.inplace:
                mapping.update(dict(self._info_paths()))
            return mapping

    return BuildExtWithInfo
