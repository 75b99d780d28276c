"""``scripts/check_cuda.py`` fails when it cannot run (no nvcc, no binding toolchain) and passes
without compiling anything only when told to skip (``KDC_SKIP_CUDA_CHECK=1``). No compiler runs
here: the tools are hidden by monkeypatching the script's finders."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_cuda.py"


@pytest.fixture
def check_cuda(monkeypatch):
    """The script as a module, with no nvcc to find and the skip variable unset."""
    spec = importlib.util.spec_from_file_location("check_cuda_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("KDC_SKIP_CUDA_CHECK", raising=False)
    monkeypatch.setattr(module, "find_nvcc", lambda: None)
    monkeypatch.setattr(module, "compile_cu", _must_not_run)
    monkeypatch.setattr(module, "check_binding", _must_not_run)
    return module


def _must_not_run(*args, **kwargs):
    raise AssertionError("nothing may be compiled in this test")


def test_missing_nvcc_fails_and_says_how_to_fix_it(check_cuda, capsys):
    assert check_cuda.main(["--no-bindings"]) == 1
    out = capsys.readouterr().out
    assert "FAIL check_cuda: nvcc not found" in out
    assert "CUDA_HOME" in out and "KDC_SKIP_CUDA_CHECK=1" in out
    assert out.rstrip().endswith("check_cuda: FAILED")


def test_missing_binding_toolchain_fails(check_cuda, capsys, monkeypatch, tmp_path):
    """nvcc is there (a stand-in; no sources to compile), the binding toolchain is not."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 0.0'\n")
    nvcc.chmod(0o755)
    (tmp_path / "csrc").mkdir()
    monkeypatch.setattr(check_cuda, "find_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(check_cuda, "CSRC", tmp_path / "csrc")
    monkeypatch.setattr(check_cuda, "binding_command", lambda: (None, "no C++ compiler (g++) found", None))
    assert check_cuda.main(["--no-bindings"]) == 0  # the rest of the check passes
    assert check_cuda.main([]) == 1
    out = capsys.readouterr().out
    assert "the binding syntax check cannot run: no C++ compiler (g++) found" in out and "--no-bindings" in out


@pytest.mark.parametrize("value", ["1", "true"])
def test_skip_variable_skips_everything(check_cuda, capsys, monkeypatch, value):
    monkeypatch.setenv("KDC_SKIP_CUDA_CHECK", value)
    monkeypatch.setattr(check_cuda, "find_nvcc", _must_not_run)
    monkeypatch.setattr(check_cuda, "binding_command", _must_not_run)
    assert check_cuda.main([]) == 0
    assert "SKIPPED (KDC_SKIP_CUDA_CHECK=1)" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", ""])
def test_skip_variable_off_still_checks(check_cuda, monkeypatch, value):
    monkeypatch.setenv("KDC_SKIP_CUDA_CHECK", value)
    assert check_cuda.main(["--no-bindings"]) == 1


def test_skip_variable_is_validated_and_the_script_honours_it_end_to_end():
    env = dict(os.environ, KDC_SKIP_CUDA_CHECK="maybe")
    bad = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode != 0 and "KDC_SKIP_CUDA_CHECK must be 0 or 1, got 'maybe'" in bad.stderr
    env["KDC_SKIP_CUDA_CHECK"] = "1"
    skipped = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert skipped.returncode == 0 and "SKIPPED" in skipped.stdout
