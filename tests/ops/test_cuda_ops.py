"""The CUDA kernels (csrc/) beyond what the per-op fast-path files check: the compiled bindings
and their error paths, the kernels that run (tensor cores or not, ``KDC_CUDA_NO_TENSOR_CORES``),
the top-k merge rounds and query chunks (``KDC_TOPK_ROUND_SPLITS``, ``KDC_TOPK_WORKSPACE_BYTES``),
reads of views, the excluded-position rules at the CUDA tiles' edges, the fakes and the messages
without the extension. The comparisons of the CUDA path with the reference (every case, dtype and
gradient, ties, non-contiguous inputs, deterministic mode, opcheck, torch.compile) are in
``test_windowed_attention_fast.py`` and ``test_max_similarity_fast.py``, in the run modes
``cuda-emulated`` and ``cuda-gpu`` beside the Triton ones.

Every test here runs in the two CUDA run modes of tests/ops/run_modes.py:

* ``cuda-gpu`` (``@pytest.mark.gpu``): the compiled extension on a CUDA device, through the public
  API with ``impl="cuda"``. Fails (not skips) when the extension is not loaded on a GPU machine.
* ``cuda-emulated`` (``@pytest.mark.slow``): the same csrc/ kernels and bindings compiled for the
  CPU on top of an emulated CUDA runtime (tests/cuda_emulation: fibers for threads, real barrier
  and warp-shuffle semantics, NaN-filled shared memory, hardware launch limits), called through the
  ``_cuda.py`` wrappers on CPU tensors. It runs the CUDA path's logic everywhere; timing, memory
  model and hardware arithmetic details are only exercised by ``cuda-gpu``.

Contract v2 (excluded means excluded): NaN / inf in padded positions, in keys and values beyond
a query's cutoff window (the tile that holds them included), a sequence or video of length 0, a
tiny sigma (1e-23) and empty inputs are tested through the ``_cuda.py`` wrappers directly, so they
check the kernels whatever the public API accepts.

Deliberate mutations of the tensor-core kernels, each applied alone to csrc/, the emulation
rebuilt, and the emulated tests run with ``-x`` (the first test that failed is named; the
mutation was then reverted). The campaign ran on this file alone, before its reference
comparisons moved to the per-op files; the tests it named that moved are given under their new
names (``wa <id>`` = test_windowed_attention_fast.py::test_matches_reference[cuda-emulated-<id>],
``ms <id>`` and ``ms topk <id>`` = test_max_similarity_fast.py::test_matches_reference /
test_topk_matches_reference[cuda-emulated-<id>]; the rest are tests of this file), the same
shape, input seed and dtype, checked by the op's one checker (stricter for fp16 / bf16 than the old
one; the upstream gradient is now drawn from the case's seed). The mutations marked ``*`` were
re-run after the move (``python -m tests.ops.cuda_mutations``, which records their exact edits: it
runs ``pytest -x -m slow -k cuda-emulated`` on test_windowed_attention_fast.py,
test_max_similarity_fast.py and this file, in that order), and the test named is the first that
failed in that run (2-core CPU machine); the others were not re-run:

=====  ====================================================================  =========================================
#      mutation                                                              first killed by
=====  ====================================================================  =========================================
M1*    fwd: per-warp window skipping drops the first tile a warp needs       wa L33-low-tables-fp16
M2*    fwd: block key range one key short (off-by-one tile edge)             wa window_edges_w1-bf16
M3*    K B-fragment: the two 8-column halves swapped (fragment layout)       wa odd-fp16
M4     P as A operand: rows g / g+8 swapped in the second half (layout)      wa block-fp16
M5     non-finite V tile multiplied on tensor cores anyway (0 * NaN)         test_windowed_attention_beyond_cutoff_may_hold_nan[cuda-emulated-long-bf16]
M6*    fwd: cp.async.wait_group 2 instead of 1 (tile used before it lands)   wa tiny-bf16
M7     fwd: next K tile staged into the buffer in use                        wa 3-blocks-fp16
M8     bwd (one kernel): delta not summed over the 4 lanes of a row          wa block-fp16
M9     bwd dkdv: query block skipped when its window ends at the key block   wa window_edges_w1-bf16
M10    bwd dkdv: bias diagonals shifted by one                               wa 3-blocks-fp16
M11    bias table: the clamped end bin misses its last diagonal              wa window_edges_w64-bf16
M12*   staging: one row past the length loaded (length mask)                 wa bias-only-bf16
M13    16-byte cp.async for D not a multiple of 8 (reads past D)             test_head_dim_slices_are_read_exactly[cuda-emulated-bf16]
M14*   max-sim: ties go to the last clip (>= instead of >)                   ms L70-D48-fp16-normalize
M15*   max-sim: one padded clip scored (off-by-one length mask)              ms 17x9x20x33-low-fp16-normalize
M16*   max-sim: quad reduction misses the lanes 2 apart                      ms 17x9x20x33-low-fp16-normalize
M17*   max-sim: next clip tile staged into the buffer in use                 ms L70-D48-fp16-normalize
M18    bwd dq: K tile with NaN multiplied on tensor cores (0 * NaN)          test_windowed_attention_beyond_cutoff_may_hold_nan[cuda-emulated-long-bf16]
M19*   top-k: scores written one video off in the split slab                 ms topk 17x9x20x33-k4-low-fp16-normalize
M20    bwd dq: delta summed over the quad one tile early                     wa 3-blocks-fp16
M21    max-sim epilogue: accumulator element mapped to the wrong clip        ms L70-D48-fp16-normalize
M22    fwd: output not rescaled when the running max grows                   wa 3-blocks-fp16
M23    logit: 0 * inf on the diagonal for a tiny sigma                       test_windowed_attention_tiny_sigma[cuda-emulated-long-1e-23-fp32]
M24    d sigma: 0 / 0 when sigma^3 underflows                                test_windowed_attention_tiny_sigma[cuda-emulated-long-1e-23-fp32]
M25    packing: L <= 20 put in 16-row slots (rows dropped)                   test_sanitizer_windowed_attention[cuda-emulated]
M26    max-sim: wait before committing the next tile's copies                ms L70-D48-fp16-normalize
M27*   top-k: rows sorted as if 8 warps ran (half never written)             ms topk 17x9x20x33-k4-low-fp16-normalize
M28    bias partial tables indexed with R instead of min(R, L - 1)           wa R>L-bf16 (the process aborts: heap
                                                                             overflow; scripts/emulated_sanitizer.sh)
M29    keys step: a query's validity ignored                                 survived: equivalent (padded query rows
                                                                             are zero-filled, so their P dO and dS Q
                                                                             terms are exactly 0)
M30    bwd dkdv: the block's keys masked one short                           wa 3-blocks-fp16
=====  ====================================================================  =========================================

The tests named ``*sanitizer*`` are a small subset for ``compute-sanitizer --tool memcheck``:
``compute-sanitizer --tool memcheck python -m pytest -m gpu -k sanitizer tests/ops/test_cuda_ops.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _ext, testing
from kdc_kernels.ops.max_similarity import _cuda as ms_cuda
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref
from kdc_kernels.ops.windowed_attention import _cuda as wa_cuda
from kdc_kernels.ops.windowed_attention import windowed_attention_ref
from tests.ops import run_modes
from tests.ops import test_max_similarity_fast as ms_fast
from tests.ops import test_windowed_attention_fast as wa_fast

ATTN_GRADS = ("q", "k", "v", "rel_bias", "sigma")


# --- backends ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=run_modes.CUDA_MODES)
def backend(request) -> run_modes.RunMode:
    """The CUDA path in its two run modes (tests/ops/run_modes.py): ``cuda-gpu`` (the public API
    with impl="cuda") and ``cuda-emulated`` (the _cuda.py wrappers after the public API's own
    validation, on the CPU emulation)."""
    return run_modes.RunMode(request.param).prepare()


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every output the bindings allocate starts as NaN (-1 for indices)."""
    monkeypatch.setenv("KDC_POISON_OUTPUTS", "1")


def _scaled_tol(tol: float, ref: torch.Tensor) -> float:
    """An absolute tolerance for outputs of unit scale, scaled up for larger ones (gradients)."""
    return tol * max(1.0, float(ref.detach().abs().max()))


def _leaves(args: dict, dtype=None) -> dict:
    """Detached copies (same strides) of the float inputs, requiring grad; ``dtype`` converts q/k/v
    (or queries/clips)."""
    out = {}
    for name, t in args.items():
        if t is None or not t.is_floating_point():
            out[name] = t
            continue
        t = t.detach().clone()
        if dtype is not None and name in ("q", "k", "v", "queries", "clips"):
            t = t.to(dtype)
        out[name] = t.requires_grad_(True)
    return out



# --- windowed_attention --------------------------------------------------------------------------


def _attention_args(backend, B, H, L, D, R, sigma, lengths, *, dtype=torch.float32, noncontiguous=False, seed=0):
    return testing.attention_inputs(B, H, L, D, R=R, sigma=sigma, lengths=lengths, dtype=dtype,
                                    device=backend.device, noncontiguous=noncontiguous, seed=seed)



def _sliced(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as the first columns of a wider tensor whose other columns hold NaN: a view whose row
    strides allow 16-byte copies while its last dimension does not."""
    wide = torch.full((*t.shape[:-1], width), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_dim_slices_are_read_exactly(backend, dtype):
    """Inputs that are views of wider tensors (x[..., :20] of x [..., 24]): the columns past D hold
    NaN and are never read. The same results, bitwise, as the contiguous copies."""
    B, H, L, D = 2, 2, 40, 20
    args = _attention_args(backend, B, H, L, D, 2, True, "ragged", dtype=dtype, seed=7)
    grad_out = torch.randn(B, H, L, D, device=backend.device).to(dtype)
    results = []
    for make in (lambda t: _sliced(t, 24), lambda t: t.contiguous()):
        x = {n: (make(t).detach().requires_grad_(True) if n in ("q", "k", "v") else t) for n, t in args.items()}
        out = wa_cuda.windowed_attention_cuda(**x, cutoff=2.0)
        grads = torch.autograd.grad(out, [x["q"], x["k"], x["v"]], make(grad_out))
        results.append((out, *grads))
    for a, b, name in zip(results[0], results[1], ("out", "grad q", "grad k", "grad v")):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
    sim = testing.similarity_inputs(9, 4, 20, D, dtype=dtype, device=backend.device, seed=8)
    views = dict(sim, queries=_sliced(sim["queries"], 24), clips=_sliced(sim["clips"], 24))
    for fn, kw in ((ms_cuda.max_similarity_cuda, dict(return_index=True)), (ms_cuda.max_similarity_topk_cuda, dict(k=2))):
        got, want = fn(**views, **kw), fn(**sim, **kw)
        for a, b in zip(got, want):
            assert torch.equal(a, b), fn.__name__


def _bad_attention_calls(device) -> list[tuple[str, tuple, str]]:
    """(what, arguments of kdc::cuda_windowed_attention_fwd, message pattern): one bad argument each."""
    q = torch.randn(1, 2, 4, 8, device=device)
    cpu = torch.randn(1, 2, 4, 8)
    sigma = torch.rand(1, 2, 4, device=device) + 0.5
    return [
        ("D > 256", (torch.randn(1, 1, 4, 300, device=device),) * 3 + (None, None, None, 0.1, None), "D <= 256"),
        ("D = 0", (torch.randn(1, 1, 4, 0, device=device),) * 3 + (None, None, None, 0.1, None), "1 <= D"),
        ("rel_bias even", (q, q, q, torch.zeros(2, 4, device=device), None, None, 0.1, None), "rel_bias must have shape"),
        ("rel_bias rank", (q, q, q, torch.zeros(5, device=device), None, None, 0.1, None), "rel_bias must be a 2-D"),
        ("k dtype", (q, q.half(), q, None, None, None, 0.1, None), "k must have the same dtype"),
        ("v shape", (q, q, q[:, :, :3], None, None, None, 0.1, None), "v must have shape"),
        ("q rank", (q[0], q[0], q[0], None, None, None, 0.1, None), "q must be a 4-D"),
        ("q int", (q.long(), q.long(), q.long(), None, None, None, 0.1, None), "q must have dtype"),
        ("cutoff without sigma", (q, q, q, None, None, None, 0.1, 2.0), "cutoff needs sigma"),
        ("cutoff <= 0", (q, q, q, None, sigma, None, 0.1, -1.0), "cutoff must be a finite number > 0"),
        ("scale inf", (q, q, q, None, None, None, math.inf, None), "scale must be finite"),
        ("sigma shape", (q, q, q, None, sigma[:, :1], None, 0.1, None), "sigma must have shape"),
        ("sigma int", (q, q, q, None, sigma.long(), None, 0.1, None), "sigma must have dtype"),
        ("lengths float", (q, q, q, None, None, torch.ones(1, device=device), 0.1, None), "integer dtype"),
        ("lengths shape", (q, q, q, None, None, torch.ones(3, dtype=torch.long, device=device), 0.1, None),
         "lengths must have shape"),
        ("lengths rank", (q, q, q, None, None, torch.ones(1, 1, dtype=torch.long, device=device), 0.1, None),
         "lengths must be a 1-D"),
    ] + ([] if device.type == "cpu" else [
        ("k on the CPU", (q, cpu, q, None, None, None, 0.1, None), "k must be on the same device"),
        ("all on the CPU", (cpu, cpu, cpu, None, None, None, 0.1, None), "q must be a CUDA tensor"),
        ("lengths on the CPU", (q, q, q, None, None, torch.ones(1, dtype=torch.long), 0.1, None),
         "lengths must be on the same device"),
    ])


def _bad_similarity_calls(device) -> list[tuple[str, str, tuple, str]]:
    """(what, op, arguments, message pattern) of kdc::cuda_max_similarity_fwd / _topk: one bad argument each."""
    q = torch.randn(4, 8, device=device)
    c = torch.randn(2, 3, 8, device=device)
    return [
        ("D mismatch", "fwd", (q, torch.randn(2, 3, 5, device=device), None, True), "embedding size D"),
        ("k > Nv", "topk", (q, c, None, 3, True), "k must lie in"),
        ("k = 0", "topk", (q, c, None, 0, True), "k must lie in"),
        ("lengths shape", "fwd", (q, c, torch.tensor([1, 2, 3], device=device), True), "lengths must have shape"),
        ("lengths bool", "fwd", (q, c, torch.tensor([True, False], device=device), True), "integer dtype"),
        ("clips dtype", "fwd", (q, c.half(), None, True), "clips must have the same dtype"),
        ("clips rank", "topk", (q, c[0], None, 1, True), "clips must be a 3-D"),
        ("queries rank", "fwd", (q[0], c, None, True), "queries must be a 2-D"),
        ("queries int", "fwd", (q.long(), c.long(), None, True), "queries must have dtype"),
        ("L = 0", "fwd", (q, c[:, :0], None, True), "L >= 1 and D >= 1"),
    ] + ([] if device.type == "cpu" else [
        ("clips on the CPU", "fwd", (q, c.cpu(), None, True), "clips must be on the same device"),
        ("all on the CPU", "topk", (q.cpu(), c.cpu(), None, 1, True), "queries must be a CUDA tensor"),
    ])


def _op(name: str, kernel: bool):
    return getattr(torch.ops.kdc, name + (_ext.KERNEL_SUFFIX if kernel else ""))


@pytest.mark.parametrize("kernel", [False, True], ids=["public-op", "kernel-op"])
def test_windowed_attention_binding_errors(backend, kernel):
    """Every bad argument is refused with an error naming it: by the public op's Python checks, and
    by the compiled binding's own checks for direct calls of the private op (on the GPU in a child
    process: see test_compiled_errors_do_not_crash_gpu)."""
    if kernel and not backend.emulated:
        pytest.skip("checked in a child process by test_compiled_errors_do_not_crash_gpu")
    for what, args, pattern in _bad_attention_calls(backend.device):
        with pytest.raises(RuntimeError, match=pattern):
            _op("cuda_windowed_attention_fwd", kernel)(*args)
    q = torch.randn(1, 2, 4, 8, device=backend.device)
    out, lse = _op("cuda_windowed_attention_fwd", kernel)(q, q, q, None, None, None, 0.1, None)
    with pytest.raises(RuntimeError, match="lse must be the forward's float32 output"):
        _op("cuda_windowed_attention_bwd", kernel)(out, q, q, q, None, None, None, out, lse.half(), 0.1, None)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        _op("cuda_windowed_attention_bwd", kernel)(out[:, :1], q, q, q, None, None, None, out, lse, 0.1, None)


def test_sanitizer_windowed_attention(backend):
    """Every attention kernel once: SIMT fp32, tensor-core long (fwd, dq, dkdv) and packed (fwd and
    the one-kernel backward), with cp.async (D = 40) and element-wise staging (D = 20)."""
    for dtype, L, D in ((torch.float32, 67, 40), (torch.bfloat16, 67, 40), (torch.float16, 20, 20)):
        args = _leaves(_attention_args(backend, 2, 2, L, D, 3, True, "ragged", seed=15), dtype)
        out = backend.windowed_attention(**args, cutoff=2.0)
        out.backward(torch.randn_like(out))
        assert torch.isfinite(out).all() and torch.isfinite(args["q"].grad).all()

# --- max_similarity ------------------------------------------------------------------------------


def _similarity_args(backend, nq, nv, L, D, lengths, *, dtype=torch.float32, noncontiguous=False, seed=0):
    args = testing.similarity_inputs(nq, nv, L, D, lengths=lengths, dtype=dtype, device=backend.device,
                                     noncontiguous=noncontiguous, seed=seed)
    queries, clips = testing.with_argmax_ties(args["queries"], args["clips"], args["lengths"], seed=seed)
    if noncontiguous:  # keep the strides of the factory
        args["queries"].copy_(queries)
        args["clips"].copy_(clips)
    else:
        args.update(queries=queries, clips=clips)
    return args



@pytest.mark.parametrize("kernel", [False, True], ids=["public-op", "kernel-op"])
def test_max_similarity_binding_errors(backend, kernel):
    if kernel and not backend.emulated:
        pytest.skip("checked in a child process by test_compiled_errors_do_not_crash_gpu")
    for what, op, args, pattern in _bad_similarity_calls(backend.device):
        with pytest.raises(RuntimeError, match=pattern):
            _op(f"cuda_max_similarity_{op}", kernel)(*args)
    q, c = torch.randn(4, 8, device=backend.device), torch.randn(2, 3, 8, device=backend.device)
    score, index, qn, cn = _op("cuda_max_similarity_fwd", kernel)(q, c, None, True)
    bwd = _op("cuda_max_similarity_bwd", kernel)
    with pytest.raises(RuntimeError, match="index must be the forward's int64 index"):
        bwd(score, q, c, None, index.int(), qn, cn, True)
    with pytest.raises(RuntimeError, match="grad_score must have shape"):
        bwd(score.t(), q, c, None, index, qn, cn, True)
    with pytest.raises(RuntimeError, match="query_norms / clip_norms must hold"):
        bwd(score, q, c, None, index, qn[:2], cn, True)


def test_sanitizer_max_similarity(backend):
    for dtype in (torch.float32, torch.bfloat16):
        args = _leaves(_similarity_args(backend, 67, 5, 33, 40, "ragged", seed=25), dtype)
        score = backend.max_similarity(**args)
        score.backward(torch.randn_like(score))
        assert torch.isfinite(score).all() and torch.isfinite(args["clips"].grad).all()

# --- max_similarity_topk -------------------------------------------------------------------------


@pytest.mark.parametrize("round_splits, workspace", [(1, None), (2, None), (1, 4096)],
                         ids=["3-rounds", "2-rounds", "3-rounds-query-chunks"])
def test_max_similarity_topk_rounds_and_chunks(backend, monkeypatch, round_splits, workspace):
    """The merge rounds (ping-pong between the output and the running list) and query chunks that
    large corpora need, forced on a small problem with the test hooks."""
    monkeypatch.setenv("KDC_TOPK_ROUND_SPLITS", str(round_splits))
    if workspace is not None:
        monkeypatch.setenv("KDC_TOPK_WORKSPACE_BYTES", str(workspace))
    args = _similarity_args(backend, 70, 530, 3, 8, None, seed=31)
    args["clips"][9] = testing.one_hot_valued(args["clips"][9])  # exact tie in any summation order
    args["clips"][520] = args["clips"][9]
    ms_fast.check_topk(backend, args, 50, True)



def test_sanitizer_topk(backend):
    for dtype in (torch.float32, torch.bfloat16):
        args = _similarity_args(backend, 33, 270, 5, 24, "ragged", dtype=dtype, seed=33)
        scores, videos = backend.max_similarity_topk(**args, k=140)
        assert torch.isfinite(scores).all() and int(videos.min()) >= 0


# --- which kernels run ---------------------------------------------------------------------------


def _tensor_core_launches() -> int:
    """Kernels launched with 128-thread blocks so far on the emulation: the tensor-core kernels."""
    import ctypes

    lib = ctypes.CDLL(run_modes.build_emulation())
    lib.kdc_emu_launches.restype = ctypes.c_uint64
    lib.kdc_emu_launches.argtypes = [ctypes.c_uint]
    return int(lib.kdc_emu_launches(128))


def test_tensor_core_kernels_run_where_expected(backend, monkeypatch):
    """bf16 / fp16 attention (D <= 128) and max-sim / top-k (D <= 512) run the tensor-core kernels;
    fp32, D > 128 attention and KDC_CUDA_NO_TENSOR_CORES=1 run the SIMT / WMMA ones (emulation:
    the launch log tells them apart by block size)."""
    if not backend.emulated:
        pytest.skip("the launch log is an emulation hook")

    def attention(dtype, L, D, **kw):
        args = _leaves(_attention_args(backend, 2, 2, L, D, 2, True, "ragged", seed=L), dtype)
        out = wa_cuda.windowed_attention_cuda(**args, **kw)
        out.backward(torch.ones_like(out))

    def similarity(dtype, D, topk=False):
        args = testing.similarity_inputs(9, 5, 20, D, dtype=dtype, seed=D)
        if topk:
            ms_cuda.max_similarity_topk_cuda(**args, k=2)
        else:
            args = _leaves(args)
            ms_cuda.max_similarity_cuda(**args).sum().backward()

    cases = [
        ("attention bf16 packed", lambda: attention(torch.bfloat16, 20, 16), 2),  # forward, backward
        ("attention fp16 long", lambda: attention(torch.float16, 70, 64, cutoff=2.0), 3),  # fwd, dq, dkdv
        ("attention fp32", lambda: attention(torch.float32, 20, 16), 0),
        ("attention bf16 D=130", lambda: attention(torch.bfloat16, 20, 130), 0),
        ("max-sim bf16", lambda: similarity(torch.bfloat16, 24), 1),
        ("max-sim fp32", lambda: similarity(torch.float32, 24), 0),
        ("top-k fp16", lambda: similarity(torch.float16, 24, topk=True), 1),
        ("top-k fp32", lambda: similarity(torch.float32, 24, topk=True), 0),
    ]
    for what, run, expected in cases:
        before = _tensor_core_launches()
        run()
        assert _tensor_core_launches() - before == expected, what
    monkeypatch.setenv("KDC_CUDA_NO_TENSOR_CORES", "1")
    for what, run, expected in cases:
        before = _tensor_core_launches()
        run()
        assert _tensor_core_launches() == before, f"{what} with KDC_CUDA_NO_TENSOR_CORES=1"


def test_fallback_kernels_without_tensor_cores(backend, monkeypatch):
    """KDC_CUDA_NO_TENSOR_CORES=1 (the fallback if a tensor-core kernel misbehaves on some GPU): the
    SIMT attention and WMMA max-sim kernels still match the reference for bf16."""
    monkeypatch.setenv("KDC_CUDA_NO_TENSOR_CORES", "1")
    for L in (20, 70):
        args = _attention_args(backend, 2, 2, L, 32, 3, True, "ragged", dtype=torch.bfloat16, seed=L)
        dout = torch.randn(2, 2, L, 32, generator=testing.make_generator(L)).to(backend.device, torch.bfloat16)
        wa_fast.check(backend, args, dout, cutoff=2.0)
    case = ms_fast.Case("fallback", 33, 5, 40, 32, ties="argmax", seed=3)
    args, args32 = case.inputs(backend.device, torch.bfloat16)
    ms_fast.check(backend, args, args32, True, case.grad(backend.device))
    score = backend.max_similarity(**args)
    testing.assert_close(score, max_similarity_ref(**ms_fast._fp32(args)), 1e-5, "score (fp32 math on the same inputs)")
    ms_fast.check_topk(backend, args, 3, True)


# --- contract v2: excluded means excluded, lengths 0, tiny sigma, empty inputs -------------------
# These call the _cuda.py wrappers directly on both backends: they test the kernels, whatever the
# public API accepts. Expected values come from the reference on clean inputs (the excluded
# positions replaced by finite values) and on the sequences / videos of non-zero length.

_POISON = (float("nan"), float("inf"), float("-inf"))


def _poison_where(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with NaN, inf and -inf (cycling) at every position where ``where`` is true."""
    t = t.detach().clone()
    values = torch.tensor(_POISON, dtype=t.dtype, device=t.device)
    idx = where.nonzero(as_tuple=True)
    t[idx] = values[torch.arange(idx[0].numel(), device=t.device) % 3]
    return t


def _attention_grads(fn, x: dict, grad_out: torch.Tensor, **kw):
    x = _leaves(x)
    out = fn(**x, **kw)
    names = [n for n in ATTN_GRADS if x.get(n) is not None]
    return out, dict(zip(names, torch.autograd.grad(out, [x[n] for n in names], grad_out)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cutoff", [None, 2.5], ids=["soft", "cutoff"])
def test_windowed_attention_padding_may_hold_nan(backend, cutoff, dtype):
    """NaN / inf in padded q, k, v, sigma rows and in the upstream gradient of padded rows change
    nothing; a sequence of length 0 outputs zeros and gets zero gradients."""
    B, H, L, D = 3, 2, 70, 16  # two 64-row blocks
    args = _attention_args(backend, B, H, L, D, 3, True, None, seed=41)
    if dtype != torch.float32:  # the same values in both runs: low-precision inputs
        args.update({n: args[n].to(dtype) for n in ("q", "k", "v")})
    lengths = torch.tensor([70, 33, 0], device=backend.device)
    pad = torch.arange(L, device=backend.device)[None, :] >= lengths[:, None]  # [B, L]
    dirty = dict(args, lengths=lengths)
    for name in ("q", "k", "v"):
        dirty[name] = _poison_where(args[name], pad[:, None, :, None].expand_as(args[name]))
    dirty["sigma"] = _poison_where(args["sigma"], pad[:, None, :].expand_as(args["sigma"]))
    grad_out = _poison_where(torch.randn(B, H, L, D, device=backend.device, dtype=dtype),
                             pad[:, None, :, None].expand(B, H, L, D))
    out, grads = _attention_grads(wa_cuda.windowed_attention_cuda, dirty, grad_out, cutoff=cutoff)

    keep = [0, 1]  # the clean inputs of the sequences of non-zero length
    clean = {n: (t[keep] if n in ("q", "k", "v", "sigma") else t) for n, t in args.items()}
    clean["lengths"] = lengths[keep]
    clean_grad = torch.nan_to_num(grad_out[keep]) * ~pad[keep, None, :, None]
    if dtype == torch.float32:
        ref, ref_grads = _attention_grads(windowed_attention_ref, clean, clean_grad, cutoff=cutoff)
        tol = testing.TOLERANCE[torch.float32]
    else:  # the CUDA path on clean inputs (checked against the reference by the other tests)
        ref, ref_grads = _attention_grads(wa_cuda.windowed_attention_cuda, clean, clean_grad, cutoff=cutoff)
        tol = 0.0  # padding is never read: bitwise the same
    testing.assert_close(out[keep], ref, tol, "out")
    assert torch.all(out[2] == 0)
    for name, want in ref_grads.items():
        got = grads[name]
        if name != "rel_bias":
            assert torch.all(got[2] == 0), f"grad {name} of the length-0 sequence"
            got = got[keep]
        testing.assert_close(got, want, _scaled_tol(tol, want), f"grad {name}")
    for name in ("q", "k", "v", "sigma"):
        padded = pad[:, None, :, None] if grads[name].dim() == 4 else pad[:, None, :]
        assert torch.all(grads[name].masked_select(padded.expand_as(grads[name])) == 0), f"padded grad {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", [70, 30], ids=["long", "packed"])
def test_windowed_attention_beyond_cutoff_may_hold_nan(backend, dtype, L):
    """A NaN / inf key and value beyond the cutoff window of a query never reach that query's
    output or gradients (0 * NaN through the excluded pairs), in the tile that holds it too."""
    B, H, D, cutoff = 1, 2, 16, 2.0
    args = _attention_args(backend, B, H, L, D, 2, True, None, seed=42)
    if dtype != torch.float32:
        args.update({n: args[n].to(dtype) for n in ("q", "k", "v")})
    args["sigma"] = torch.ones(B, H, L, device=backend.device)  # every window is |i - j| <= 2
    bad = {0: 63, 1: 64} if L > 64 else {0: 15, 1: 16}  # on each side of a block / warp boundary
    where = torch.zeros(B, H, L, D, dtype=torch.bool, device=backend.device)
    for h, j in bad.items():
        where[0, h, j] = True
    dirty = dict(args, k=_poison_where(args["k"], where), v=_poison_where(args["v"], where))
    grad_out = torch.randn(B, H, L, D, device=backend.device, dtype=dtype)
    out, grads = _attention_grads(wa_cuda.windowed_attention_cuda, dirty, grad_out, cutoff=cutoff)
    if dtype == torch.float32:
        ref, ref_grads = _attention_grads(windowed_attention_ref, args, grad_out, cutoff=cutoff)
    else:  # the CUDA path on the clean inputs: only summation order may differ (the select path)
        ref, ref_grads = _attention_grads(wa_cuda.windowed_attention_cuda, args, grad_out, cutoff=cutoff)
    tol = testing.TOLERANCE[dtype]
    for h, j in bad.items():
        dist = (torch.arange(L, device=backend.device) - j).abs()
        rows = dist > cutoff  # queries whose window excludes key j
        keys = dist > 2 * cutoff  # keys that no query using key j reaches
        testing.assert_close(out[0, h, rows], ref[0, h, rows], tol, f"out, head {h}")
        for name, mask in (("q", rows), ("sigma", rows), ("k", keys), ("v", keys)):
            want = ref_grads[name][0, h, mask]
            testing.assert_close(grads[name][0, h, mask], want, _scaled_tol(tol, want), f"grad {name}, head {h}")
        assert not torch.isfinite(out[0, h, j]).all(), "the query that uses the NaN key must see it"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sigma", [1e-23, 1e-10], ids=["1e-23", "1e-10"])
@pytest.mark.parametrize("L", [70, 20], ids=["long", "packed"])
def test_windowed_attention_tiny_sigma(backend, sigma, dtype, L):
    """Any finite sigma > 0 stays finite: a tiny window keeps only the diagonal, out = v and
    d v = d out, the other gradients vanish (d sigma exactly: no 0 / 0)."""
    B, H, D = 2, 2, 16
    args = _leaves(_attention_args(backend, B, H, L, D, 2, True, "ragged", seed=43), dtype)
    args = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    args["sigma"] = torch.full((B, H, L), sigma, device=backend.device)
    valid = (torch.arange(L, device=backend.device)[None, :] < args["lengths"][:, None])[:, None, :, None]
    grad_out = torch.randn(B, H, L, D, device=backend.device, dtype=dtype)
    for cutoff in (None, 3.0):
        out, grads = _attention_grads(wa_cuda.windowed_attention_cuda, args, grad_out, cutoff=cutoff)
        for name, t in [("out", out), *grads.items()]:
            assert torch.isfinite(t).all(), f"{name} not finite (sigma={sigma}, cutoff={cutoff})"
        assert torch.equal(out, args["v"] * valid), "out = v on valid rows, 0 on padded rows"
        assert torch.equal(grads["v"], grad_out * valid)
        assert torch.all(grads["sigma"] == 0)
        for name in ("q", "k"):
            assert float(grads[name].abs().max()) <= 2e-2, name  # only rounding of dP_ii - delta_i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("L", [20, 70], ids=["L20", "L70"])
def test_max_similarity_padding_may_hold_nan_and_empty_videos(backend, dtype, L):
    """NaN / inf in padded clips change nothing; a video of length 0 scores -inf with index 0, gets
    no gradient and never wins a top-k ranking."""
    nq, nv, D = 9, 6, 16
    args = testing.similarity_inputs(nq, nv, L, D, lengths=None, dtype=dtype, device=backend.device, seed=44)
    lengths = torch.tensor([L, 0, 7, 1, 0, L - 7], device=backend.device)
    pad = torch.arange(L, device=backend.device)[None, :] >= lengths[:, None]
    dirty = dict(args, lengths=lengths, clips=_poison_where(args["clips"], pad[..., None].expand(nv, L, D)))
    keep = [0, 2, 3, 5]
    clean = dict(queries=args["queries"], clips=args["clips"][keep], lengths=lengths[keep])
    grad = torch.randn(nq, nv, device=backend.device)
    for normalize in (True, False):
        x = _leaves(dirty)
        score, index = ms_cuda.max_similarity_cuda(**x, normalize=normalize, return_index=True)
        gq, gc = torch.autograd.grad(score, [x["queries"], x["clips"]], grad)
        y = _leaves(clean)
        ref, ref_index = max_similarity_ref(**y, normalize=normalize, return_index=True)
        rq, rc = torch.autograd.grad(ref, [y["queries"], y["clips"]], grad[:, keep])
        tol = testing.TOLERANCE[torch.float32] if dtype == torch.float32 else 1e-5  # fp32 math on both sides
        gtol = testing.TOLERANCE[dtype]
        testing.assert_close(score[:, keep], ref, tol, "score")
        assert torch.equal(index[:, keep], ref_index)
        assert torch.all(score[:, [1, 4]] == float("-inf")) and torch.all(index[:, [1, 4]] == 0)
        testing.assert_close(gq.float(), rq.float(), _scaled_tol(gtol, rq), "grad queries")
        testing.assert_close(gc[keep].float(), rc.float(), _scaled_tol(gtol, rc), "grad clips")
        assert torch.all(gc[[1, 4]] == 0) and torch.all(gc.masked_select(pad[..., None].expand_as(gc)) == 0)

        top_s, top_v = ms_cuda.max_similarity_topk_cuda(**dirty, k=4, normalize=normalize)
        ref_s, ref_v = max_similarity_topk_ref(**clean, k=4, normalize=normalize)
        testing.assert_close(top_s, ref_s, tol, "top-k scores")
        assert torch.equal(top_v, torch.tensor(keep, device=backend.device)[ref_v]), "top-k videos"
        top_s, top_v = ms_cuda.max_similarity_topk_cuda(**dirty, k=nv, normalize=normalize)
        assert torch.all(top_s[:, 4:] == float("-inf")) and torch.all(top_v[:, 4:] == torch.tensor([1, 4], device=backend.device))


def test_max_similarity_nan_in_a_valid_clip_propagates(backend):
    """A NaN in a valid clip gives a NaN score at the first NaN clip, as torch.max does."""
    args = testing.similarity_inputs(5, 3, 9, 8, lengths=None, device=backend.device, seed=45)
    args["clips"][1, 4, 2] = float("nan")
    args["clips"][1, 6, 0] = float("nan")
    score, index = ms_cuda.max_similarity_cuda(**args, normalize=True, return_index=True)
    ref, ref_index = max_similarity_ref(**args, normalize=True, return_index=True)
    assert torch.isnan(score[:, 1]).all() and torch.all(index[:, 1] == 4)
    assert torch.equal(index, ref_index)
    testing.assert_close(score[:, [0, 2]], ref[:, [0, 2]], testing.TOLERANCE[torch.float32], "score")


def test_empty_inputs(backend):
    """Zero-size B / H / L, Nq and Nv give empty outputs of the right shape and dtype (and empty or
    zero gradients), as torch ops do."""
    dev = backend.device
    for shape in ((0, 2, 5, 8), (2, 0, 5, 8), (2, 3, 0, 8)):
        q = torch.randn(shape, device=dev, requires_grad=True)
        sigma = torch.ones(shape[:3], device=dev, requires_grad=True)
        rel_bias = torch.randn(shape[1], 5, device=dev, requires_grad=True)
        out = wa_cuda.windowed_attention_cuda(q, q, q, rel_bias, sigma, None, None, 2.0)
        assert out.shape == shape and out.dtype == q.dtype
        gq, gb, gs = torch.autograd.grad(out, [q, rel_bias, sigma], torch.randn_like(out))
        assert gq.shape == shape and gs.shape == shape[:3] and torch.all(gb == 0)
    c = torch.randn(4, 6, 8, device=dev, requires_grad=True)
    for nq, nv in ((0, 4), (3, 0)):
        queries = torch.randn(nq, 8, device=dev, requires_grad=True)
        clips = c[:nv]
        score, index = ms_cuda.max_similarity_cuda(queries, clips, None, True, True)
        assert (score.shape, score.dtype, index.shape, index.dtype) == ((nq, nv), torch.float32, (nq, nv), torch.int64)
        gq, gc = torch.autograd.grad(score, [queries, c], torch.randn_like(score))
        assert gq.shape == (nq, 8) and torch.all(gq == 0) and torch.all(gc == 0)
    scores, videos = ms_cuda.max_similarity_topk_cuda(torch.randn(0, 8, device=dev), c.detach(), None, 2)
    assert (scores.shape, scores.dtype, videos.shape, videos.dtype) == ((0, 2), torch.float32, (0, 2), torch.int64)


_CHILD_CHECK = r"""
import re, sys, torch
from kdc_kernels import _ext
loaded, why = _ext.status()
assert loaded, why
from tests.ops import test_cuda_ops as t
device = torch.device("cuda")
calls = [(w, "cuda_windowed_attention_fwd", a, p) for w, a, p in t._bad_attention_calls(device)]
calls += [(w, f"cuda_max_similarity_{op}", a, p) for w, op, a, p in t._bad_similarity_calls(device)]
wrong = []
for what, op, args, pattern in calls:
    print("calling", op + _ext.KERNEL_SUFFIX, "with", what, flush=True)
    try:
        t._op(op, True)(*args)
        wrong.append(f"{what}: no error")
    except RuntimeError as exc:
        if not re.search(pattern, str(exc)):
            wrong.append(f"{what}: {str(exc)[:200]}")
print("\n".join(wrong) or "all refused")
sys.exit(1 if wrong else 0)
"""


@pytest.mark.gpu
def test_compiled_errors_do_not_crash_gpu():
    """The compiled bindings' own checks (direct calls of the private kdc::*_kernel ops) raise, in a
    child process: if throwing an error out of the compiled library kills the process on this
    machine, this test fails with the signal instead of taking the test worker down."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD_CHECK], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode >= 0, (f"the child process died with signal {-proc.returncode} while the compiled "
                                  f"library raised an error (the public ops check in Python first):\n{tail}")
    assert proc.returncode == 0, tail


# --- without a GPU or the extension --------------------------------------------------------------


def test_unsupported_reasons_on_meta_tensors():
    q = torch.empty(2, 2, 8, 300, device="meta")
    reasons = wa_cuda.windowed_attention_unsupported(q, q, q)
    assert any("D <= 256" in r for r in reasons)
    assert wa_cuda.windowed_attention_unsupported(q[..., :64], q[..., :64], q[..., :64]) == []
    queries = torch.empty(8, 4096, device="meta", requires_grad=True)
    clips = torch.empty(3, 5, 4096, device="meta")
    assert any("D <= 2048" in r for r in ms_cuda.max_similarity_unsupported(queries, clips))
    assert ms_cuda.max_similarity_topk_unsupported(queries.detach(), clips, k=2) == []


def test_fake_tensors_without_the_extension():
    """The ops exist with their fakes even where the library is not built."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16)
        out, lse = torch.ops.kdc.cuda_windowed_attention_fwd(q, q, q, torch.empty(3, 5), torch.empty(2, 3, 5),
                                                             None, 0.3, 2.0)
        grads = torch.ops.kdc.cuda_windowed_attention_bwd(out, q, q, q, None, torch.empty(2, 3, 5), None, out, lse,
                                                          0.3, 2.0)
        score, index, qn, cn = torch.ops.kdc.cuda_max_similarity_fwd(torch.empty(4, 8), torch.empty(3, 5, 8), None,
                                                                     True)
        scores, videos = torch.ops.kdc.cuda_max_similarity_topk(torch.empty(4, 8), torch.empty(3, 5, 8), None, 2,
                                                                False)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((2, 3, 5, 8), torch.bfloat16, (2, 3, 5), torch.float32)
    assert [tuple(g.shape) for g in grads] == [(2, 3, 5, 8)] * 3 + [(0,), (2, 3, 5)]
    assert (score.shape, index.dtype, qn.shape, cn.shape) == ((4, 3), torch.int64, (4,), (3, 5))
    assert (scores.shape, videos.dtype) == ((4, 2), torch.int64)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch message")
def test_cuda_impl_on_cpu_torch_names_the_reasons():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match="compiled extension is not loaded.*CPU-only"):
        K.windowed_attention(q, q, q, impl="cuda")
    assert not _ext.has_op("windowed_attention")
    assert math.isclose(float(K.windowed_attention(q, q, q).sum()), float(windowed_attention_ref(q, q, q).sum()))
