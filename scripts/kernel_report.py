#!/usr/bin/env python3
"""What a CPU machine can prove about the GPU kernels: compile every one for sm_90 and read it.

* Triton: every kernel of kdc_kernels in every configuration its launcher can pick. The ops'
  launchers run at the op contract's target shapes (PRVR training, TVR test set, corpus, long
  videos) on CPU tensors that are never computed on: every kernel launch is recorded instead of
  run, the launch policy offers every GPU config, and each launch is specialised as Triton's JIT
  does it for those arguments (strides equal to 1, sizes divisible by 16, aligned pointers). Each
  distinct launch is compiled with Triton's own compiler for ``GPUTarget("cuda", 90, 32)`` and
  the ptxas shipped with it (no GPU needed). bf16 and IEEE fp32 take every config; fp16 and fp32
  with TF32 dots (the same code with another element type / input precision) take each kernel's
  pinned config, to keep the run within about two minutes on two cores (``--all``: every config).
* CUDA: every ``csrc/**/*.cu`` compiled for sm_90 the way ``scripts/check_cuda.py`` does (its
  functions are reused), one row per kernel instantiation.

One row per kernel x dtype x config: ``kernel, impl ("triton"|"cuda"), op, stage, dtype, config,
registers, spill_bytes`` (ptxas' spill stores; ``spill_load_bytes`` beside it) and
``tensor_core_instructions`` (HGMMA + HMMA in the SASS, from nvdisasm / cuobjdump; the kind,
``wgmma`` or ``mma``, in ``tensor_core_kind``), plus ``shared_bytes`` and whether the row must
use tensor cores (``needs_tensor_cores``: fp16/bf16 attention forward/backward, max-sim forward
and top-k, the kernels whose dots take the input tiles). ``dtype`` is the op's input dtype.

``--check`` exits 1 when a Triton row spills or fails to compile, a row that needs tensor cores
has none, or a Triton kernel of the package is never launched by the report (what
tests/test_kernel_report.py asserts on every commit). A table goes to stdout, the rows to
``--json PATH``. Nothing is cached: Triton compiles afresh (TRITON_ALWAYS_COMPILE) into a
temporary cache folder.

    python scripts/kernel_report.py --json /tmp/kernel_report.json
    python scripts/kernel_report.py --only "max_sim" --dtypes bf16 --no-cuda
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

DTYPES = ("fp32", "bf16", "fp16")
TC_PATTERN = re.compile(r"\b(HGMMA|HMMA)\.")


@dataclass(frozen=True)
class TritonCase:
    """One Triton launch as the JIT would compile it: the kernel, its specialised signature,
    constexprs and attributes (divisibility, == 1) as Triton derives them from the arguments."""

    module: str
    kernel: str
    op: str
    stage: str
    dtype: str
    config: str
    signature: tuple  # (name, type)
    constexprs: tuple  # (path, value)
    attrs: tuple  # (path, attributes)
    options: tuple  # (name, value) of the compile options (num_warps, num_stages, ...)
    needs_tensor_cores: bool = False


@dataclass
class Row:
    kernel: str
    impl: str
    op: str
    stage: str
    dtype: str
    config: str
    registers: int | None = None
    spill_bytes: int | None = None
    spill_load_bytes: int | None = None
    tensor_core_instructions: int | None = None
    tensor_core_kind: str = "none"
    shared_bytes: int | None = None
    needs_tensor_cores: bool = False
    compile_seconds: float | None = None
    error: str | None = None
    problems: list = field(default_factory=list)


# ------------------------------------------------------------------------- the Triton cases
# The cases are what the launchers really launch: each op runs at the op contract's target shapes
# on CPU tensors (torch.empty; nothing is computed) while JITFunction.run records every launch
# instead of running it, and the launch policy tries every GPU config instead of one. Each
# recorded launch is specialised as Triton's JIT does it for those arguments (strides equal to 1,
# sizes divisible by 16, aligned pointers), so the report compiles the code a GPU would run.

# kernel name -> (stage, uses tl.dot on its input tiles: must use tensor cores in fp16/bf16)
KERNELS = {
    "_window_attn_fwd_kernel": ("fwd", True),
    "_window_attn_bwd_q_kernel": ("bwd_q", True),
    "_window_attn_bwd_kv_kernel": ("bwd_kv", True),
    "_window_attn_bias_reduce_kernel": ("bias_reduce", False),
    "_row_norms_kernel": ("norms", False),
    "_max_sim_fwd_kernel": ("fwd", True),
    "_max_sim_bwd_kernel": ("bwd", False),
    "_topk_partial_kernel": ("topk", True),
    "_topk_merge_kernel": ("merge", False),
}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _attention_calls(dtype):
    """(label, callable) of every windowed_attention launch path at the target shapes."""
    import torch

    from kdc_kernels.ops.windowed_attention import _triton as W

    calls = []
    # PRVR training (B = 256, H = 8, D = 64, L = 32 / 64 / 128; D = 128 takes the tiled backward
    # at L = 128) and long videos with a cutoff (B = 2, L = 4096)
    for B, L, D, cutoff in ((256, 32, 64, None), (256, 64, 64, None), (256, 128, 64, None), (256, 128, 128, None),
                            (2, 4096, 64, 3.0)):
        def call(B=B, L=L, D=D, cutoff=cutoff):
            H, R = 8, 32
            q, k, v, dout, out = (torch.empty(B, H, L, D, dtype=dtype) for _ in range(5))
            bias, sigma = torch.empty(H, 2 * R + 1), torch.empty(B, H, L)
            lengths = torch.full((B,), L, dtype=torch.int64)
            lse = torch.empty(B, H, L)
            W._window_attn_fwd(q, k, v, bias, sigma, lengths, D**-0.5, cutoff)
            W._window_attn_bwd(dout, q, k, v, out, lse, bias, sigma, lengths, D**-0.5, cutoff, True, True)
        calls.append((f"B={B} L={L} D={D}" + (f" cutoff={cutoff:g}" if cutoff else ""), call))
    return calls


def _similarity_calls(dtype):
    import torch

    from kdc_kernels.ops.max_similarity import _triton as T
    from kdc_kernels.ops.max_similarity import _triton_bwd as TB
    from kdc_kernels.ops.max_similarity import _triton_topk as TK

    def inputs(nq, nv, L, D):
        return torch.empty(nq, D, dtype=dtype), torch.empty(nv, L, D, dtype=dtype), torch.full((nv,), L)

    def train():  # 640 x 128 x 128 x 384, forward and backward
        q, c, lengths = inputs(640, 128, 128, 384)
        score, index, qn, cn = T._max_sim_fwd(q, c, lengths, True)
        TB._max_sim_bwd(torch.empty(640, 128), q, c, score, index, qn, cn, True, True, True)

    def tvr_scores():  # the TVR test set, scores only
        T._max_sim_fwd(*inputs(10_895, 2_179, 128, 384), True)

    def long_videos():  # L = 4096 frames (the backward's limit): the forward's loop over clip chunks
        q, c, lengths = inputs(640, 16, 4096, 384)
        score, index, qn, cn = T._max_sim_fwd(q, c, lengths, True)
        TB._max_sim_bwd(torch.empty(640, 16), q, c, score, index, qn, cn, True, True, True)

    calls = [("max_similarity", "train 640x128x128x384", train),
             ("max_similarity", "TVR 10895x2179x128x384", tvr_scores),
             ("max_similarity", "long videos 640x16x4096x384", long_videos)]
    # top-k: the TVR test set and the corpus (L = 32, D = 512) at k = 100; small k (K_PAD 32, the
    # largest of the small-k configs); the chunked path of large k (k = 1000: three chunks, so
    # every merge variant; k = 4096, the largest list, one chunk)
    for nq, nv, L, D, k in ((10_895, 2_179, 128, 384, 100), (10_000, 100_000, 32, 512, 100),
                            (10_895, 2_179, 128, 384, 20),
                            (10_895, 10_000, 128, 384, 1000), (10_895, 10_000, 128, 384, 4096)):
        calls.append(("max_similarity_topk", f"{nq}x{nv}x{L}x{D} k={k}",
                      lambda a=inputs(nq, nv, L, D), k=k: TK._max_sim_topk(*a, k, True)))
    return calls


def capture_cases(dtypes=DTYPES, everything: bool = False) -> list[TritonCase]:
    """Run every launcher at the target shapes with launches recorded, not run (see above).
    fp16 and fp32 with TF32 dots take each kernel's pinned config only unless ``everything``."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from kdc_kernels import _config, _launch

    backend = make_backend(GPUTarget("cuda", 90, 32))
    cases, seen = [], set()
    context = {}

    def record(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        stage, dots = KERNELS.get(self.__name__, ("other", False))
        if self.__name__ == "_window_attn_bwd_kv_kernel" and constexprs.get((self.arg_names.index("FUSED"),)):
            stage = "bwd"  # the fused backward: every gradient of whole sequences
        key = (self.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)
        if key in seen:
            return None
        seen.add(key)
        names = self.arg_names
        meta = {names[p[0]]: v for p, v in constexprs.items()  # the flags every case sets alike are left out
                if names[p[0]].isupper() and names[p[0]] not in ("DOT_FP32", "NORMALIZE")
                and not names[p[0]].startswith(("HAS_", "NEED_", "COUNT_"))}
        config = " ".join(f"{k}={v}" for k, v in meta.items()) + f" w{options.num_warps} s{options.num_stages}"
        cases.append(TritonCase(
            self.module, self.__name__, context["op"], stage, context["dtype"], f"{config} ({context['shape']})",
            tuple(signature.items()), tuple(constexprs.items()), tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()),
            tuple((k, v) for k, v in options.__dict__.items() if k in ("num_warps", "num_stages", "num_ctas")),
            needs_tensor_cores=dots and context["dtype"] != "fp32"))
        return None

    def every_config(kernel, configs, interpret, key, launch, device):
        for config in configs if context["all_configs"] else configs[:1]:
            launch(config)

    # The tensors live on the CPU, but the launches are compiled for a GPU: the fp32 precision
    # rule (IEEE, or TF32 when allowed the torch way) is applied as it is for CUDA tensors.
    rule = _config.fp32_dot_precision
    saved = JITFunction.run, _launch.run, rule, torch.backends.cuda.matmul.allow_tf32
    JITFunction.run, _launch.run = record, every_config
    _config.fp32_dot_precision = lambda device_type: rule("cuda")
    try:
        for dtype_name in dtypes:
            dtype = getattr(torch, DTYPE_NAMES[dtype_name])
            for tf32 in ((False, True) if dtype_name == "fp32" else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                context["all_configs"] = everything or (dtype_name != "fp16" and not tf32)
                for label, call in _attention_calls(dtype):
                    context.update(op="windowed_attention", dtype=dtype_name, shape=label + (" tf32" if tf32 else ""))
                    call()
                for op, label, call in _similarity_calls(dtype):
                    context.update(op=op, dtype=dtype_name, shape=label + (" tf32" if tf32 else ""))
                    call()
    finally:
        JITFunction.run, _launch.run, _config.fp32_dot_precision, torch.backends.cuda.matmul.allow_tf32 = saved
    del triton
    return cases


def triton_kernels() -> dict[str, set[str]]:
    """Every Triton kernel (a JITFunction) defined by the op modules, per module."""
    import importlib

    import triton

    out = {}
    for name in ("kdc_kernels.ops.windowed_attention._triton_kernels", "kdc_kernels.ops.max_similarity._triton",
                 "kdc_kernels.ops.max_similarity._triton_bwd", "kdc_kernels.ops.max_similarity._triton_topk"):
        module = importlib.import_module(name)
        out[name] = {k for k, v in vars(module).items()
                     if isinstance(v, triton.runtime.JITFunction) and k.endswith("_kernel") and v.__module__ == name}
    return out


# ---------------------------------------------------------------------------- compiling
def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_numbers(log: str) -> tuple[int | None, int, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0)


def _tensor_core_counts(sass: str) -> tuple[int, str]:
    found = TC_PATTERN.findall(sass)
    kinds = sorted({"wgmma" if f == "HGMMA" else "mma" for f in found})
    return len(found), "+".join(kinds) or "none"


def compile_triton(case: TritonCase) -> Row:
    """Compile one case for sm_90 and read ptxas' report and the SASS."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(case.kernel, "triton", case.op, case.stage, case.dtype, case.config,
              needs_tensor_cores=case.needs_tensor_cores)
    kernel = getattr(importlib.import_module(case.module), case.kernel)
    attrs = {k: [list(a) for a in v] for k, v in case.attrs}
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, dict(case.signature), dict(case.constexprs), attrs),
                                      target=GPUTarget("cuda", 90, 32), options=dict(case.options))
    except Exception as exc:  # reported as a row: a config that does not compile is a finding
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        return row
    row.compile_seconds = round(time.perf_counter() - t0, 2)
    row.registers, row.spill_bytes, row.spill_load_bytes = _ptxas_numbers(log.getvalue())
    row.shared_bytes = compiled.metadata.shared
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_nvidia_tool("nvdisasm"), f.name], capture_output=True, text=True).stdout
    row.tensor_core_instructions, row.tensor_core_kind = _tensor_core_counts(sass)
    return row


def _cuda_meta(source: Path, name: str) -> tuple[str, str, str, str]:
    """(op, stage, dtype, config) of a CUDA kernel from its file and demangled name."""
    op = "max_similarity_topk" if "topk" in source.stem else source.parent.name
    base = name.split("<")[0].split("::")[-1]
    stage = next((s for s in ("topk", "merge", "fwd", "bwd", "reduce", "prep", "norm") if s in base), "other")
    args = name[name.index("<") + 1:name.rindex(">")] if "<" in name else ""
    first = args.split(",")[0].strip()
    dtype = {"bf16": "bf16", "__nv_bfloat16": "bf16", "fp16": "fp16", "__half": "fp16", "half": "fp16"}.get(first, "fp32")
    return op, stage, dtype, args or "-"


def cuda_rows(jobs: int) -> tuple[list[Row], str | None]:
    """Rows of every CUDA kernel (nvcc -arch=sm_90 as check_cuda does), or why there are none."""
    import check_cuda

    nvcc = check_cuda.find_nvcc()
    if nvcc is None:
        return [], "nvcc not found: the CUDA kernels are not in this report (install the CUDA toolkit or set CUDA_HOME)"
    demangle = getattr(check_cuda, "_demangle", lambda names: {n: n for n in names})
    short = getattr(check_cuda, "_short", lambda n: n)
    sources = sorted(check_cuda.CSRC.rglob("*.cu"))
    rows = []

    def one(source: Path) -> list[Row]:
        with tempfile.TemporaryDirectory(prefix="kdc-report-") as tmp:
            ok, output, seconds = check_cuda.compile_cu(nvcc, source, "sm_90", False, Path(tmp))
            rel = str(source.relative_to(ROOT))
            if not ok:
                return [Row(rel, "cuda", _cuda_meta(source, "")[0], "-", "-", "-", error=output.strip()[-300:])]
            objects = list(Path(tmp).glob("*.o"))
            sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(objects[0])], capture_output=True,
                                  text=True).stdout if objects else ""
        per_function, current = {}, None
        for line in sass.splitlines():
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                current = m.group(1)
                per_function[current] = []
            elif current is not None:
                per_function[current].append(line)
        names = demangle(list(per_function))
        counts = {short(names[k]): _tensor_core_counts("\n".join(v)) for k, v in per_function.items()}
        out = []
        for name, regs, stores, loads in check_cuda.ptxas_report(output):
            op, stage, dtype, config = _cuda_meta(source, name)
            tc, kind = counts.get(name, (None, "none"))
            out.append(Row(name, "cuda", op, stage, dtype, config, registers=regs, spill_bytes=stores,
                           spill_load_bytes=loads, tensor_core_instructions=tc, tensor_core_kind=kind,
                           compile_seconds=round(seconds, 1)))
        return out

    with futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for part in pool.map(one, sources):
            rows += part
    return rows, None


# ------------------------------------------------------------------------------ checking
def check(rows: list[Row]) -> list[str]:
    """Every problem: a Triton config that spills or fails to compile, a row that needs tensor
    cores and has none. Also stored in each row's ``problems``."""
    problems = []
    for r in rows:
        if r.impl != "triton":
            continue
        if r.error:
            r.problems.append(f"does not compile: {r.error}")
        elif r.spill_bytes or r.spill_load_bytes:
            r.problems.append(f"spills {r.spill_bytes} B (stores) / {r.spill_load_bytes} B (loads)")
        if r.needs_tensor_cores and not r.error and not r.tensor_core_instructions:
            r.problems.append("uses no tensor-core instruction")
        problems += [f"{r.kernel} [{r.dtype}] {r.config}: {p}" for p in r.problems]
    return problems


def table(rows: list[Row]) -> str:
    head = f"{'impl':6} {'op':20} {'stage':11} {'kernel':34} {'dtype':5} {'regs':>4} {'spill':>6} {'TC':>4} " \
           f"{'kind':9} {'smem':>6}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = "  <-- " + "; ".join(r.problems) if r.problems else ""
        if r.error and not r.problems:
            flag = f"  <-- {r.error}"
        lines.append(f"{r.impl:6} {r.op:20} {r.stage:11} {r.kernel[:34]:34} {r.dtype:5} {r.registers or '-':>4} "
                     f"{r.spill_bytes if r.spill_bytes is not None else '-':>6} "
                     f"{r.tensor_core_instructions if r.tensor_core_instructions is not None else '-':>4} "
                     f"{r.tensor_core_kind:9} {r.shared_bytes if r.shared_bytes is not None else '-':>6}  "
                     f"{r.config}{flag}")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    env = dict(target="sm_90", triton=triton.__version__, python=sys.version.split()[0])
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the environment) here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles")
    parser.add_argument("--only", metavar="REGEX", help="only Triton kernels whose name matches")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"input dtypes (default {','.join(DTYPES)})")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels")
    parser.add_argument("--all", action="store_true",
                        help="every config in fp16 and fp32-with-TF32 too (default: their pinned config)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a Triton config spills or a row that needs tensor cores has none")
    args = parser.parse_args(argv)
    if "kdc_kernels.ops.windowed_attention._triton" in sys.modules:
        parser.error("run the report in a fresh process: the kernels must be defined for the compiler")
    # The kernels must be defined for the compiler, not the interpreter; the log of ptxas is what
    # tells registers and spills, so every kernel is compiled afresh.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

    t0 = time.perf_counter()
    cases = capture_cases(tuple(args.dtypes.split(",")), args.all)
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.kernel)]
    covered = {(c.module, c.kernel) for c in cases}
    uncovered = [f"{m}.{k}" for m, ks in triton_kernels().items() for k in sorted(ks) if (m, k) not in covered]
    with tempfile.TemporaryDirectory(prefix="kdc-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        context = multiprocessing.get_context("fork")
        with futures.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
            rows = list(pool.map(compile_triton, cases, chunksize=1))
    note = None
    if not args.no_cuda:
        more, note = cuda_rows(args.jobs)
        rows += more
    problems = check(rows)
    if not args.only and args.dtypes == ",".join(DTYPES):
        problems += [f"{name}: a Triton kernel the report does not compile" for name in uncovered]
    print(table(rows))
    print(f"\n{len(rows)} rows ({sum(r.impl == 'triton' for r in rows)} Triton configs, "
          f"{sum(r.impl == 'cuda' for r in rows)} CUDA kernels) in {time.perf_counter() - t0:.0f} s")
    if note:
        print(f"kernel_report: {note}")
    for p in problems:
        print(f"PROBLEM {p}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(environment=environment(), cuda_note=note, problems=problems,
                                        rows=[asdict(r) for r in rows]), indent=1))
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
