"""The runnable examples run (at a small size) and their own checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KDC_IMPL="reference")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_port_msssl_agrees_at_a_small_size():
    out = _run("port_msssl.py", "--queries", "64", "--videos", "40", "--clips", "16", "--dim", "32", "--device", "cpu")
    assert "scores agree" in out and "gradients agree" in out and "recalls agree" in out, out
    assert "peak memory of the scores" in out
