"""The GPU suite: one prepared command for a fresh, offline GPU machine (``make gpu-suite``).

Stages, each under its own time limit and all under one budget (``--budget``, default 480 s, so
that a whole run fits in 9 minutes with room to spare):

=================== ====== ===================================================================
stage               limit  what
=================== ====== ===================================================================
environment          30 s  GPU, driver, Python, torch, CUDA, triton, numpy, nvcc, commit
build               180 s  the CUDA extension: editable install, ninja, all cores, sm_90
extension            60 s  the extension loads and has every op's kernels
pytest-gpu          200 s  ``pytest -m gpu`` in parallel (xdist), a per-test timeout, one
                           pinned Triton configuration per case (``KDC_AUTOTUNE=0``)
memcheck             90 s  ``compute-sanitizer --tool memcheck`` on the ``sanitizer`` tests,
                           caching allocator off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``)
bench-max-similarity 100 s ``bench_max_similarity.py --quick``
bench-windowed-attention 120 s ``bench_windowed_attention.py --quick``
bench-cuda-kernels   75 s  ``bench_cuda_kernels.py --quick`` (CUDA beside Triton)
bench-end-to-end    110 s  ``bench_end_to_end.py --quick``: KDC-Net training steps/s and test
                           evaluation time, ``tvr`` preset shapes, reference vs auto
                           (``KDC_AUTOTUNE=0``; makes its TVR-shaped data on the CPU first)
=================== ====== ===================================================================

A stage that reaches its limit is interrupted gracefully: SIGINT to its whole process group
(pytest then writes its report; the benchmarks have printed every row as it was measured), SIGTERM
15 s later, SIGKILL 5 s after that. Its status says so, and everything it measured is kept.
A stage whose turn comes with less than 10 s of budget left is reported as skipped.

Output (``--out``, default ``$OUT`` or ``./gpu-results``), at most 8 files:
``summary.md`` (environment, stage table, test failures, memcheck, every benchmark figure, the
op contract's speed targets with met / not met), ``suite.json`` (the same as data, every result
row), ``logs.tar.gz`` (every stage's log, the JUnit XML) and the benchmarks' plots.
The last lines printed are the stage table and the targets.

``--dry-run`` runs the same plumbing without a GPU (fake stages with fake figures, short limits,
one stage cut by its limit): what CI checks in well under a minute.

    make gpu-suite                                   # or: bash benchmarks/gpu_suite.sh
    KDC_COMMIT=$(git rev-parse HEAD) OUT=/tmp/r python3 benchmarks/gpu_suite.py --budget 420
    python3 benchmarks/gpu_suite.py --dry-run --out /tmp/dry
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import targets  # noqa: E402  (plain Python: no torch import in the driver)

GRACE_INT_S = 15
GRACE_TERM_S = 5
MIN_STAGE_S = 10


@dataclass
class Stage:
    name: str
    limit_s: int
    argv: list[str]
    env: dict = field(default_factory=dict)
    kind: str = "shell"  # shell | pytest | bench
    needs: str | None = None  # a stage that must have passed first


@dataclass
class Result:
    name: str
    status: str
    seconds: float
    limit_s: int
    log: str


def _run_stage(stage: Stage, limit: int, log_path: Path) -> tuple[str, float]:
    """Run ``stage`` for at most ``limit`` seconds; (status, seconds)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **stage.env)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(stage.argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(stage.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start: {exc}\n")
            return f"FAILED (cannot start: {exc.strerror})", 0.0
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGINT, GRACE_INT_S), (signal.SIGTERM, GRACE_TERM_S), (signal.SIGKILL, 30)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    seconds = time.monotonic() - t0
    if rc is None:
        return f"CUT at its {limit} s limit", seconds
    return ("ok" if rc == 0 else f"FAILED (exit {rc})"), seconds


# ------------------------------------------------------------------------------------- stages
_ENV_SCRIPT = r"""
import json, os, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
def run(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
info["gpu"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                   "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "none (no nvidia-smi)"
nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
info["nvcc"] = run([nvcc, "--version"]).splitlines()[-1] if nvcc else "not found"
for mod in ("torch", "triton", "numpy", "pytest", "xdist", "pytest_timeout"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "installed")
    except Exception as exc:
        info[mod] = f"not importable ({type(exc).__name__})"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
except Exception:
    pass
print("ENV " + json.dumps(info))
"""


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.access(Path(home) / "bin" / name, os.X_OK):
            return str(Path(home) / "bin" / name)
    return None


def _has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


def real_stages(python: str, work: Path) -> list[Stage]:
    """The stages on a GPU machine. Build and tests go through ``make install`` / ``make gpu-test``
    (what a developer runs there: the given interpreter as it is, offline) where make exists."""
    cpus = os.cpu_count() or 4
    build_env = dict(KDC_BUILD_CUDA="1", MAX_JOBS=str(cpus), TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    pytest_args = ["-p", "no:cacheprovider", "-q", "-rfE"]
    if _has_module(python, "pytest_timeout"):
        pytest_args += ["--timeout", "150"]
    junit = f"--junitxml={work / 'pytest-gpu.xml'}"
    workers = min(16, cpus)
    tests_env = dict(KDC_AUTOTUNE="0")
    if shutil.which("make"):
        build = ["make", "install", f"PYTHON={python}"]
        tests = ["make", "gpu-test", f"PYTHON={python}", f"GPU_WORKERS={workers}",
                 "PYTEST_ARGS=" + " ".join(pytest_args + [junit])]
    else:
        build = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-e", "."]
        parallel = ["-n", str(workers)] if _has_module(python, "xdist") else []
        tests = [python, "-m", "pytest", "-m", "gpu"] + parallel + pytest_args + [junit]
    stages = [
        Stage("environment", 30, [python, "-c", _ENV_SCRIPT]),
        Stage("build", 180, build, build_env),
        Stage("extension", 60, [python, "-c", _EXT_SCRIPT], needs="build"),
        Stage("pytest-gpu", 200, tests, tests_env, kind="pytest"),
    ]
    pytest = [python, "-m", "pytest"] + pytest_args
    sanitizer = _find_tool("compute-sanitizer")
    if sanitizer:
        stages.append(Stage("memcheck", 90, [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
                                             "--report-api-errors", "no", "--print-limit", "20"]
                            + [a for a in pytest if a != "-q"]
                            + ["-m", "gpu", "-k", "sanitizer", f"--junitxml={work / 'memcheck.xml'}"],
                            dict(tests_env, PYTORCH_NO_CUDA_MEMORY_CACHING="1"), kind="pytest", needs="build"))
    else:
        stages.append(Stage("memcheck", 0, [], kind="pytest"))  # reported as "compute-sanitizer not found"
    for name, limit in (("bench_max_similarity", 100), ("bench_windowed_attention", 120), ("bench_cuda_kernels", 75)):
        stages.append(Stage(name.replace("_", "-"), limit,
                            [python, f"benchmarks/{name}.py", "--quick", "--out", str(work / "bench")], kind="bench"))
    stages.append(Stage("bench-end-to-end", 110, [python, "benchmarks/bench_end_to_end.py", "--quick", "--out",
                                                  str(work / "bench")], dict(KDC_AUTOTUNE="0"), kind="bench"))
    return stages


_EXT_SCRIPT = r"""
from kdc_kernels import _ext, info
print(info.report())
ok, why = _ext.status()
assert ok, why
print("build info:", _ext.build_info())
missing = [op for op in _ext.CUDA_OPS if not _ext.has_op(op)]
assert not missing, f"no CUDA kernels for {missing}"
"""


def dry_stages(python: str, work: Path) -> list[Stage]:
    """The same stages with fake commands and short limits (no GPU, no build): plumbing only."""
    me = [python, str(Path(__file__).resolve()), "--fake-stage"]
    names = ["environment", "build", "extension", "pytest-gpu", "memcheck", "bench-max-similarity",
             "bench-windowed-attention", "bench-cuda-kernels", "bench-end-to-end"]
    stages = []
    for n in names:
        kind = "pytest" if n in ("pytest-gpu", "memcheck") else "bench" if n.startswith("bench") else "shell"
        # the environment stage is the real one, made to last at least 2 s: how long the budget
        # leaves after it must not depend on how fast this machine imports torch
        argv = [python, "-c", _ENV_SCRIPT + "\nimport time\ntime.sleep(2.0)\n"] if n == "environment" \
            else me + [n, str(work)]
        stages.append(Stage(n, 4 if n == "bench-windowed-attention" else 20, argv, kind=kind,
                            needs="build" if n in ("extension", "memcheck") else None))
    return stages


def fake_stage(name: str, work: Path) -> int:
    """What a dry-run stage prints: plausible output in the real formats, made-up figures."""
    if name == "pytest-gpu":
        (work / "pytest-gpu.xml").write_text(
            '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
            '<testcase classname="tests.fake" name="test_ok"/><testcase classname="tests.fake" name="test_skip">'
            '<skipped message="dry run"/></testcase><testcase classname="tests.fake" name="test_bad">'
            '<failure message="AssertionError: dry-run failure">trace</failure></testcase></testsuite></testsuites>')
        print("FAILED tests/fake.py::test_bad - AssertionError: dry-run failure")
        print("1 failed, 1 passed, 1 skipped in 0.01s")
        return 1
    if name == "memcheck":
        print("1 passed in 0.01s\n========= ERROR SUMMARY: 0 errors")
        return 0
    if name.startswith("bench"):
        for row in targets.fake_rows(name):
            print("ROW " + json.dumps(row), flush=True)
        if name == "bench-windowed-attention":  # a stage that overruns its limit: cut, rows kept
            print("(dry run: sleeping past the limit)", flush=True)
            time.sleep(120)
        return 0
    print(f"dry run: {name} ok")
    return 0


# ------------------------------------------------------------------------------------ summary
def _pytest_report(xml_path: Path, log: str) -> dict:
    rep = {"counts": None, "failures": []}
    if xml_path.is_file():
        try:
            root = ET.parse(xml_path).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            rep["counts"] = counts
            for case in root.iter("testcase"):
                for bad in list(case.findall("failure")) + list(case.findall("error")):
                    msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
                    rep["failures"].append(f"{case.get('classname')}::{case.get('name')} - {msg}")
        except ET.ParseError as exc:
            rep["xml_error"] = str(exc)
    lines = [ln for ln in log.splitlines() if ln.startswith(("FAILED", "ERROR")) or " passed" in ln or " failed" in ln
             or "ERROR SUMMARY" in ln or "Segmentation fault" in ln or "node down" in ln]
    rep["log_lines"] = lines[-40:]
    return rep


def _rows(log: str) -> list[dict]:
    rows = []
    for line in log.splitlines():
        if line.startswith("ROW "):
            try:
                rows.append(json.loads(line[4:]))
            except json.JSONDecodeError:
                pass
    return rows


def _env(log: str) -> dict:
    for line in log.splitlines():
        if line.startswith("ENV "):
            return json.loads(line[4:])
    return {}


def _commit() -> str:
    if os.environ.get("KDC_COMMIT"):
        return os.environ["KDC_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (no KDC_COMMIT given and no git checkout)"


def _table(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_summary(out: Path, work: Path, results: list[Result], budget: int, total: float, dry: bool) -> str:
    logs = {r.name: (Path(r.log).read_text(errors="replace") if r.log and Path(r.log).is_file() else "") for r in results}
    env = _env(logs.get("environment", ""))
    bench_rows = {r.name: _rows(logs[r.name]) for r in results if r.name.startswith("bench")}
    all_rows = [dict(row, bench=name) for name, rows in bench_rows.items() for row in rows]
    target_rows = targets.evaluate(all_rows)
    tests = {r.name: _pytest_report(work / f"{r.name}.xml", logs[r.name]) for r in results
             if r.name in ("pytest-gpu", "memcheck")}
    commit = _commit()
    stage_table = _table([[r.name, r.status, f"{r.seconds:.0f}", r.limit_s] for r in results]
                         + [["total", "", f"{total:.0f}", budget]], ["stage", "status", "seconds", "limit s"])
    target_table = _table([[t["target"], t["measured"], t["predicted"], t["met"]] for t in target_rows],
                          ["target (op contract)", "measured", "roofline prediction", "met?"])
    md = ["# GPU suite" + (" (dry run: fake stages, fake figures)" if dry else ""), "",
          f"Commit {commit}; {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; budget {budget} s.", ""]
    md += [_table([[k, v] for k, v in env.items()], ["environment", "value"]), "", "## Stages", "", stage_table, ""]
    for name, rep in tests.items():
        md += [f"## {name}", ""]
        if rep["counts"]:
            c = rep["counts"]
            md.append(f"{c['tests']} tests: {c['tests'] - c['failures'] - c['errors'] - c['skipped']} passed, "
                      f"{c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped (JUnit XML).")
        md += ["", "```"] + (rep["failures"][:60] or ["(no failures in the JUnit report)"]) + ["```", "", "```"]
        md += rep["log_lines"][-20:] + ["```", ""]
    md += ["## Speed targets", "", target_table, ""]
    for name, rows in bench_rows.items():
        md += [f"## {name}", "", targets.rows_table(rows) if rows else "(no rows measured)", ""]
    text = "\n".join(md)
    (out / "summary.md").write_text(text)
    (out / "suite.json").write_text(json.dumps(dict(
        commit=commit, dry_run=dry, budget_s=budget, total_s=round(total, 1), environment=env,
        stages=[dict(name=r.name, status=r.status, seconds=round(r.seconds, 1), limit_s=r.limit_s) for r in results],
        tests=tests, targets=target_rows, rows=all_rows), indent=1, default=str))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for r in results:
            if r.log and Path(r.log).is_file():
                tar.add(r.log, arcname=f"logs/{Path(r.log).name}")
        for xml in work.glob("*.xml"):
            tar.add(xml, arcname=f"logs/{xml.name}")
        bench_dir = work / "bench"
        if bench_dir.is_dir():
            for f in bench_dir.iterdir():
                if f.suffix in (".json", ".md"):
                    tar.add(f, arcname=f"logs/bench/{f.name}")
    plots = sorted((work / "bench").glob("*.png")) if (work / "bench").is_dir() else []
    for png in plots[:8 - 3]:
        shutil.copy(png, out / png.name)
    return stage_table + "\n\n" + target_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results", help="results folder (at most 8 files)")
    parser.add_argument("--budget", type=int, default=int(os.environ.get("SUITE_BUDGET_S", 480)),
                        help="seconds for the whole suite (default 480, or SUITE_BUDGET_S)")
    parser.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                        help="interpreter with CUDA torch, triton and pytest (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="fake stages, no GPU: checks the plumbing")
    parser.add_argument("--only", default=None, help="comma-separated stages to run (default: all)")
    parser.add_argument("--limits", default=None, metavar="STAGE=S,...",
                        help="override stage time limits, e.g. pytest-gpu=120,memcheck=60")
    parser.add_argument("--fake-stage", nargs=2, metavar=("NAME", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fake_stage:
        return fake_stage(args.fake_stage[0], Path(args.fake_stage[1]))

    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # a results folder holds one run
        if old.is_file() and old.name in ("summary.md", "suite.json", "logs.tar.gz") or old.suffix == ".png":
            old.unlink()
    work = Path(tempfile.mkdtemp(prefix="kdc-gpu-suite-"))
    (work / "bench").mkdir()
    stages = (dry_stages if args.dry_run else real_stages)(args.python, work)
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {s.name for s in stages}
        if unknown:
            parser.error(f"--only: unknown stage(s) {sorted(unknown)}; stages: {[s.name for s in stages]}")
        stages = [s for s in stages if s.name in keep]
    for item in filter(None, (args.limits or "").split(",")):
        name, _, seconds = item.partition("=")
        match = [s for s in stages if s.name == name]
        if not match or not seconds.isdigit():
            parser.error(f"--limits: expected STAGE=SECONDS with a stage of {[s.name for s in stages]}, got {item!r}")
        match[0].limit_s = int(seconds)
    results: list[Result] = []
    interrupted = False
    try:
        for stage in stages:
            left = args.budget - (time.monotonic() - start)
            log = work / f"{stage.name}.log"
            passed = {r.name for r in results if r.status == "ok"}
            if not stage.argv:
                results.append(Result(stage.name, "skipped (compute-sanitizer not found)", 0, 0, ""))
            elif stage.needs and stage.needs not in passed and any(r.name == stage.needs for r in results):
                results.append(Result(stage.name, f"skipped ({stage.needs} did not pass)", 0, stage.limit_s, ""))
            elif left < MIN_STAGE_S + GRACE_INT_S:
                results.append(Result(stage.name, "skipped (suite budget spent)", 0, stage.limit_s, ""))
            else:
                limit = int(min(stage.limit_s, left - GRACE_INT_S))
                print(f"=== {stage.name} (limit {limit} s)", flush=True)
                status, seconds = _run_stage(stage, limit, log)
                results.append(Result(stage.name, status, seconds, limit, str(log)))
                tail = log.read_text(errors="replace").splitlines()[-3:]
                print(f"    {status}, {seconds:.0f} s" + "".join(f"\n    | {t[:160]}" for t in tail), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the summary of what ran", flush=True)
    total = time.monotonic() - start
    tables = write_summary(out, work, results, args.budget, total, args.dry_run)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nResults in {out}: {' '.join(sorted(p.name for p in out.iterdir()))}\n")
    print(tables)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
