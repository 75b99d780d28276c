"""One mutant run, shared by the mutation campaigns (``triton_mutations``, ``cuda_mutations``):
copy the repository (without .git and caches) to a temporary folder, apply a one-line edit, run
pytest there and report which tests failed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_mutant(label: str, path: str, old: str, new: str, pytest_args: list[str],
               timeout: float) -> tuple[str, list[str]]:
    """``(status, failed tests)``: ``killed`` (some test failed), ``SURVIVED``, ``not applicable``
    (``old`` is not in ``path`` exactly once) or ``killed (exit N, no test report)`` for a run that
    died (a crash, an abort); then the list holds the end of its output."""
    with tempfile.TemporaryDirectory(prefix=f"kdc-mutant-{label}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".cache", ".venv", "__pycache__", "runs"))
        target = copy / path
        text = target.read_text()
        if text.count(old) != 1:
            return "not applicable (the code changed)", []
        target.write_text(text.replace(old, new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *pytest_args]
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout)
        failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.MULTILINE)
        if proc.returncode not in (0, 1) and not failed:
            return f"killed (exit {proc.returncode}, no test report)", [proc.stdout[-400:] + proc.stderr[-400:]]
        return ("killed" if proc.returncode != 0 else "SURVIVED"), failed
