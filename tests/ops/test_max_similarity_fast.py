"""The fast paths of ``max_similarity`` and ``max_similarity_topk`` against the reference: one list
of cases and one checker per op, every implementation in every run mode (tests/ops/run_modes.py:
``triton-interpreter``, ``cuda-emulated`` (slow), ``triton-gpu`` and ``cuda-gpu`` (gpu)).

Every buffer the launchers and bindings allocate is NaN-poisoned (``KDC_POISON_OUTPUTS=1``), so an
element a kernel fails to write fails the comparison. Shapes hit 1, odd sizes and one past the
blocks (interpreter: 16 queries, 64 clip columns, 32 features, 8 videos per dq step, 16 sorted
queries per dc chunk; CUDA: 32- and 64-clip tiles, 64 queries, D in several chunks; the GPU adds
shapes one past its larger blocks); ragged, full and absent lengths; non-contiguous inputs and
upstream gradients; zero vectors; and exact ties on data that makes them ties in every
implementation (``testing.with_argmax_ties``, ``testing.with_ties``: one-hot clips). Each case
says which dtypes each mode runs: every case runs in fp32 / fp16 / bf16 (or the dtypes it is
about) on both GPU modes; on the CPU a case written for one implementation's tiles runs in the
other implementation's CPU mode too, except where that costs seconds and adds no block edge of its
own (``CUDA_TILES``, ``TRITON_TILES``).

The checkers (:func:`check`, :func:`check_topk`):

* scores: fp32 within 1e-4 (TF32: 1e-3) of the reference; fp16/bf16 by the contract's rule
  (within twice the reference's own error in that dtype plus a floor, against the reference on
  the values before rounding) and within 1e-4 of the reference on the same rounded inputs (fp32
  math on both sides: only the summation order differs); scaled by ``max(1, max|ref|)``;
* indices: the reference's lowest argmax, except at near-ties (1e-5, TF32 1e-3) between clips that
  differ: identical clips always go to the lower index;
* gradients: the contract's formula in fp64 at *our* argmax (independent of how a near-tie went),
  within 1e-4 (fp32; TF32 1e-3) or the dtype's floor (one rounding of an fp32 sum);
* top-k: scores and the set of videos a valid top-k (near-ties may swap), in order, exact ties
  and identical videos lower index first.

Implementation-specific checks follow: Triton launch hooks, forced top-k splits, buffer sizes,
limits and implementation choice here; the CUDA bindings, top-k rounds and workspace hooks,
tensor-core launch counts and the CUDA kernels' excluded-position tests stay in test_cuda_ops.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kdc_kernels as K
from kdc_kernels import _backend, _config, _launch, testing
from kdc_kernels.ops.max_similarity import _triton as T
from kdc_kernels.ops.max_similarity import _triton_bwd as TB
from kdc_kernels.ops.max_similarity import _triton_topk as TK
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref
from tests.ops import launch_spy, run_modes

FP32_TOL = testing.TOLERANCE[torch.float32]
DTYPES = run_modes.DTYPES
LOW = ("fp32", "fp16", "bf16")
NORMALIZE = {True: "normalize", False: "raw"}


@pytest.fixture(autouse=True)
def _poison_launcher_buffers(monkeypatch):
    monkeypatch.setenv("KDC_POISON_OUTPUTS", "1")


# ------------------------------------------------------------------------------------ the cases
@dataclass(frozen=True)
class Case:
    """Queries [nq, D] and clips [nv, L, D]. ``ties``: None or ``"argmax"``
    (:func:`testing.with_argmax_ties`: repeated one-hot clips at lane / column / tile strides, every
    query pointing at one, a repeated video); ``pair``: two videos made identical one-hot copies
    (an exact top-k tie across splits); ``zero``: a query and a clip of norm 0; ``k``: top-k cases."""

    name: str
    nq: int
    nv: int
    L: int
    D: int
    k: int | None = None
    lengths: str | None = "ragged"
    ties: str | None = None
    pair: tuple | None = None
    noncontiguous: bool = False
    zero: bool = False
    normalize: tuple = (True, False)
    seed: int = 0
    interpreter: tuple = ("fp32",)
    emulated: tuple = ("fp32",)
    gpu: tuple = LOW

    def dtypes(self, mode: str) -> tuple:
        return {"triton-interpreter": self.interpreter, "cuda-emulated": self.emulated}.get(mode, self.gpu)

    def inputs(self, device, dtype) -> tuple[dict, dict]:
        """``(args in dtype, the same values in fp32 before rounding)``."""
        args = testing.similarity_inputs(self.nq, self.nv, self.L, self.D, lengths=self.lengths, device=device,
                                         noncontiguous=self.noncontiguous, seed=self.seed)
        queries, clips = args["queries"], args["clips"]
        if self.ties == "argmax":
            queries, clips = testing.with_argmax_ties(queries, clips, args["lengths"], seed=self.seed)
        if self.pair is not None:
            a, b = self.pair
            clips[a] = testing.one_hot_valued(clips[a])
            clips[b] = clips[a]
        if self.zero:
            queries[3] = 0  # norm below eps: the clamped branch of the normalisation
            clips[2, 0] = 0
        if self.noncontiguous:  # keep the factory's strides
            args["queries"].copy_(queries)
            args["clips"].copy_(clips)
        else:
            args.update(queries=queries, clips=clips)
        low = dict(args, queries=args["queries"].to(dtype), clips=args["clips"].to(dtype))
        return low, args

    def grad(self, device) -> torch.Tensor:
        """The upstream gradient of the scores (a transposed view for non-contiguous cases)."""
        g = testing.make_generator(self.seed + 100)
        if self.noncontiguous:
            return torch.randn(self.nv, self.nq, generator=g).to(device).t()
        return torch.randn(self.nq, self.nv, generator=g).to(device)


GPU_ONLY = dict(interpreter=(), emulated=())
ARGMAX_TIES = dict(ties="argmax", gpu=("fp32",))  # the CUDA cases' GPU dtypes: fp32, or their fp16 / bf16
# Written for one implementation's tiles, where the other's CPU mode would add seconds and no
# block edge of its own (the Triton tiles' edges: the plain cases' sizes and
# test_triton_boundaries.py's; the CUDA tiles': the tie cases' sizes).
CUDA_TILES = dict(interpreter=())
TRITON_TILES = dict(emulated=())
LOW_TIES = dict(ARGMAX_TIES, gpu=("fp16", "bf16"))
CASES = [
    # plain random data (near-ties resolved by the tolerance rules)
    Case("1x1x1x1", 1, 1, 1, 1, seed=0, **TRITON_TILES),
    Case("5x7x3x8", 5, 7, 3, 8, seed=1, **TRITON_TILES),
    Case("17x9x65x33", 17, 9, 65, 33, seed=2),
    Case("16x65x1x32", 16, 65, 1, 32, seed=3, **TRITON_TILES),
    Case("129x33x129x65", 129, 33, 129, 65, seed=4, **GPU_ONLY),
    Case("300x257x32x384", 300, 257, 32, 384, seed=5, **GPU_ONLY),
    Case("no-lengths", 6, 5, 7, 12, lengths=None, normalize=(True,), seed=3),
    Case("full-lengths", 6, 5, 7, 12, lengths="full", normalize=(True,), seed=3),
    Case("noncontiguous", 9, 6, 10, 24, noncontiguous=True, normalize=(True,), seed=5),
    Case("17x9x20x33-low", 17, 9, 20, 33, normalize=(True,), seed=40, interpreter=("fp16", "bf16"),
         emulated=("fp16", "bf16"), gpu=("fp16", "bf16")),
    # exact argmax ties on the kernels' lanes, columns and tiles: the CUDA tiles (32 / 64 clips,
    # 64 queries, D in chunks) and one past them
    Case("tiny", 1, 1, 1, 1, lengths=None, seed=2, **ARGMAX_TIES, **CUDA_TILES),
    Case("odd", 5, 3, 7, 9, seed=12, **ARGMAX_TIES, **CUDA_TILES),
    Case("L=32", 37, 9, 32, 40, seed=69, **ARGMAX_TIES, **CUDA_TILES),
    Case("tile", 64, 4, 64, 32, seed=128, **ARGMAX_TIES, **CUDA_TILES),
    Case("tile+1", 65, 5, 65, 33, seed=130, **ARGMAX_TIES),
    Case("long-D", 3, 2, 130, 300, lengths="full", seed=133, **ARGMAX_TIES, **CUDA_TILES),
    Case("many-videos", 20, 21, 5, 16, seed=25, **ARGMAX_TIES, **CUDA_TILES),
    Case("noncontiguous-zero-vectors", 33, 5, 20, 24, noncontiguous=True, zero=True, normalize=(True,), seed=22,
         **ARGMAX_TIES),
    # fp16 / bf16 on the CUDA tensor cores: clip tiles of 64 (several per video) and of 32 (L <= 32
    # or D > 256), 16-byte cp.async staging (D a multiple of 8, contiguous) or element by element
    Case("L70-D48", 65, 6, 70, 48, normalize=(True,), seed=21, emulated=LOW, **LOW_TIES, **CUDA_TILES),
    Case("L20-D20", 33, 7, 20, 20, normalize=(True,), seed=21, emulated=LOW, **LOW_TIES, **CUDA_TILES),
    Case("L130-D264", 20, 4, 130, 264, normalize=(True,), seed=21, emulated=LOW, **LOW_TIES, **CUDA_TILES),
    Case("L40-D32-noncontiguous", 40, 5, 40, 32, noncontiguous=True, normalize=(True,), seed=21, emulated=LOW,
         **LOW_TIES, **CUDA_TILES),
]
TOPK_CASES = [
    # k = 1, small, Nv, and past the Triton register path (K_PAD 256); random data (the emulation,
    # whose top-k takes about a second per 300 videos, runs the CUDA cases below instead)
    Case("9x40x5x16-k1", 9, 40, 5, 16, k=1, seed=41, **TRITON_TILES),
    Case("17x40x4x9-k5", 17, 40, 4, 9, k=5, seed=45, **TRITON_TILES),
    Case("6x37x3x8-k37", 6, 37, 3, 8, k=37, seed=74, **TRITON_TILES),
    Case("6x300x2x8-k130", 6, 300, 2, 8, k=130, seed=430, **TRITON_TILES),
    Case("17x9x20x33-k4-low", 17, 9, 20, 33, k=4, normalize=(True,), seed=40, interpreter=("fp16", "bf16"),
         emulated=("fp16", "bf16"), gpu=("fp16", "bf16")),
    # exact ties; the CUDA path's video splits (256 videos each): k = 1, k = Nv, k > 128, an odd
    # clip count, an identical pair across two splits
    Case("k=1", 3, 1, 1, 4, k=1, seed=2, **ARGMAX_TIES),
    Case("k=Nv", 7, 5, 9, 16, k=5, seed=10, **ARGMAX_TIES),
    Case("k>128", 33, 300, 6, 16, k=130, lengths=None, pair=(3, 257), seed=430, **ARGMAX_TIES, **CUDA_TILES),
    Case("k=1-splits", 20, 300, 4, 8, k=1, lengths=None, pair=(3, 257), seed=301, **ARGMAX_TIES, **CUDA_TILES),
    Case("L=33", 70, 40, 33, 24, k=40, seed=80, **ARGMAX_TIES, **CUDA_TILES),
    Case("k=Nv-splits", 5, 260, 3, 8, k=260, lengths=None, pair=(3, 257), seed=520, **ARGMAX_TIES),
    # fp16 / bf16 (CUDA: the tensor-core scoring; one split, three splits)
    Case("one-split", 40, 50, 20, 32, k=20, normalize=(True,), seed=32, emulated=("fp16", "bf16"), **LOW_TIES,
         **CUDA_TILES),
    Case("three-splits", 70, 300, 70, 24, k=130, normalize=(True,), seed=32, interpreter=(),
         emulated=("fp16", "bf16"), **LOW_TIES),
]
for _cases in (CASES, TOPK_CASES):
    assert len({c.name for c in _cases}) == len(_cases)


def matrix(cases, modes=run_modes.NAMES) -> list:
    """``(mode, case, dtype, normalize)`` for every mode and every dtype the case runs there."""
    out = []
    for mode in modes:
        for case in cases:
            for dt in case.dtypes(mode):
                for normalize in case.normalize:
                    out.append(pytest.param(mode, case, dt, normalize, marks=run_modes.MARKS[mode],
                                            id=f"{mode}-{case.name}-{dt}-{NORMALIZE[normalize]}"))
    return out


# --------------------------------------------------------------------------------- the checkers
def _leaves(args: dict) -> dict:
    """Detached copies (same strides) of queries and clips that require grad."""
    return {n: (t.detach().clone().requires_grad_(True) if n in ("queries", "clips") else t) for n, t in args.items()}


def _fp32(args: dict) -> dict:
    return {n: (t.detach().float() if n in ("queries", "clips") else t) for n, t in args.items()}


def _scale(t: torch.Tensor) -> float:
    """Tolerances are for unit-scale outputs; raw (unnormalised) dots and gradients are larger."""
    finite = t.detach()[torch.isfinite(t.detach())]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def _sims(args: dict, normalize: bool):
    """(n, v, l) -> the similarity in fp64, for the tie-aware index check."""
    return testing.similarity_at(args["queries"], args["clips"], normalize)


def grads_at_index(args: dict, index: torch.Tensor, grad: torch.Tensor, normalize: bool):
    """The contract's gradient in fp64 at a given argmax (testing.max_similarity_grads_at)."""
    return testing.max_similarity_grads_at(args["queries"], args["clips"], index, grad, normalize)


def _grad_floor(mode: run_modes.RunMode, dtype: torch.dtype) -> float:
    """Gradients: fp32 sums (TF32 dots on a GPU where allowed) or one rounding to fp16 / bf16."""
    if dtype == torch.float32:
        return testing.TF32_TOLERANCE if mode.tf32 else FP32_TOL
    return testing.TOLERANCE[dtype]


def check(mode: run_modes.RunMode, args: dict, args32: dict, normalize: bool, grad: torch.Tensor) -> None:
    """Scores, indices and both gradients of ``mode`` against the reference (module docstring)."""
    dtype = args["queries"].dtype
    x = _leaves(args)
    score, index = mode.max_similarity(**x, normalize=normalize, return_index=True)
    nq, nv = args["queries"].shape[0], args["clips"].shape[0]
    assert score.dtype == torch.float32 and index.dtype == torch.int64 and score.shape == index.shape == (nq, nv)
    same = _fp32(args)  # the same (rounded) values in fp32
    ref, ref_index = max_similarity_ref(**same, normalize=normalize, return_index=True)
    scale = _scale(ref)
    if dtype == torch.float32:
        testing.check_fast_path(score, ref, tf32=mode.tf32, name="score")
    else:
        ref32 = max_similarity_ref(**args32, normalize=normalize)  # the values before rounding
        testing.check_fast_path(score, ref32, ref, dtype=dtype, name="score")
        testing.assert_close(score, ref, 1e-4 * scale, "score (the same inputs, fp32 math on both sides)")
    tie_tol = (testing.TF32_TOLERANCE if mode.tf32 and dtype == torch.float32 else 1e-5) * scale
    testing.assert_argmax_valid(index, ref_index, _sims(same, normalize), same["clips"], tie_tol)
    gq, gc = torch.autograd.grad(score, [x["queries"], x["clips"]], grad)
    assert gq.dtype == gc.dtype == dtype
    floor = _grad_floor(mode, dtype)
    for got, want, name in zip((gq, gc), grads_at_index(same, index, grad, normalize), ("d queries", "d clips")):
        testing.assert_close(got.float(), want, floor * _scale(want), name)


def check_topk(mode: run_modes.RunMode, args: dict, k: int, normalize: bool, result=None) -> tuple:
    """A valid top-k in order, equal to the reference's except where scores are near-tied; exact
    ties and identical videos lower index first. ``result``: ``(scores, videos)`` already computed
    (default: ``mode`` runs it). Returns them."""
    dtype = args["queries"].dtype
    scores, videos = result if result is not None else mode.max_similarity_topk(**args, k=k, normalize=normalize)
    assert scores.shape == videos.shape == (args["queries"].shape[0], k)
    assert scores.dtype == torch.float32 and videos.dtype == torch.int64
    same = _fp32(args)
    ref_s, ref_v = max_similarity_topk_ref(**same, k=k, normalize=normalize)
    full = max_similarity_ref(**same, normalize=normalize)
    tol = (testing.TF32_TOLERANCE if mode.tf32 else FP32_TOL) if dtype == torch.float32 else 1e-5
    lengths, clips = args["lengths"], args["clips"]

    def same_video(a: int, b: int) -> bool:
        return (lengths is None or int(lengths[a]) == int(lengths[b])) and torch.equal(clips[a], clips[b])

    testing.assert_topk_valid(scores, videos, ref_s, ref_v, full, same_video, tol * _scale(ref_s))
    return scores, videos


@pytest.mark.parametrize("mode,case,dtype,normalize", matrix(CASES), indirect=["mode"])
def test_matches_reference(mode, case, dtype, normalize):
    args, args32 = case.inputs(mode.device, DTYPES[dtype])
    check(mode, args, args32, normalize, case.grad(mode.device))


@pytest.mark.parametrize("mode,case,dtype,normalize", matrix(TOPK_CASES), indirect=["mode"])
def test_topk_matches_reference(mode, case, dtype, normalize):
    args, _ = case.inputs(mode.device, DTYPES[dtype])
    check_topk(mode, args, case.k, normalize)


def test_grads_at_index_is_the_reference_backward():
    """The gradient checker's formula at the reference's argmax is the reference's backward."""
    args = testing.similarity_inputs(6, 5, 7, 12, seed=30, requires_grad=True)
    grad = torch.randn(6, 5, generator=testing.make_generator(31))
    for normalize in (True, False):
        score, ref_index = max_similarity_ref(**args, normalize=normalize, return_index=True)
        want = torch.autograd.grad(score, [args["queries"], args["clips"]], grad)
        for got, w in zip(grads_at_index(args, ref_index, grad, normalize), want):
            testing.assert_close(got, w, 1e-6, "gradient at the reference argmax")


def test_clip_gradient_buckets_span_chunks_and_feature_blocks(mode):
    """The clip gradient sums each clip's queries: here one clip is the argmax of 100 queries (in
    Triton's backward its bucket of sorted queries spans two chunks of the interpreter's 64, three
    of the GPU's 32), other clips of that video are picked by nobody (zero rows), and D = 72 spans
    two feature blocks. fp32 (IEEE dots on the GPU)."""
    case = Case("buckets", 150, 3, 5, 72, seed=50)
    args, args32 = case.inputs(mode.device, torch.float32)
    noise = (0.05 * torch.randn(100, 72, generator=testing.make_generator(51))).to(mode.device)
    args["queries"][:100] = args["clips"][0, 2] + noise
    with torch.no_grad():
        _, index = mode.max_similarity(**args, return_index=True)
    assert int((index[:, 0] == 2).sum()) >= 100
    for normalize in (True, False):
        check(mode, args, args, normalize, torch.randn(150, 3, generator=testing.make_generator(52)).to(mode.device))


@pytest.mark.parametrize("which", ["queries", "clips"])
def test_gradient_of_one_input(mode, which):
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        args, _ = Case("one", 7, 5, 6, 16, seed=7).inputs(mode.device, dtype)
        same = _fp32(args)
        grad = torch.randn(7, 5, generator=testing.make_generator(8)).to(mode.device)
        x = dict(args, **{which: args[which].clone().requires_grad_(True)})
        score, index = mode.max_similarity(**x, return_index=True)
        (got,) = torch.autograd.grad(score, [x[which]], grad)
        want = grads_at_index(same, index, grad, True)[0 if which == "queries" else 1]
        floor = _grad_floor(mode, dtype)
        assert got.dtype == dtype
        testing.assert_close(got.float(), want, floor * _scale(want), f"d {which}")


def test_exact_ties_go_to_the_lowest_clip(mode):
    """testing.with_ties copies a one-hot clip src onto a later clip dst (src < dst) in every even
    video (exact ties in any summation order): dst never wins; scores, other indices and the
    gradients follow the checker."""
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        args, args32 = Case("ties", 11, 8, 9, 16, seed=9).inputs(mode.device, dtype)
        args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=9)
        args32["clips"] = testing.with_ties(args32["clips"], args32["lengths"], seed=9)
        with torch.no_grad():
            _, index = mode.max_similarity(**args, return_index=True)
        c = args["clips"]
        for v in range(0, c.shape[0], 2):
            n = int(args["lengths"][v])
            same = [(a, b) for a in range(n) for b in range(a + 1, n) if torch.equal(c[v, a], c[v, b])]
            assert same or n < 2, f"video {v} holds no tie"
            for src, dst in same:
                assert not (index[:, v] == dst).any(), f"video {v}: tie between clips {src} and {dst} went to {dst}"
        check(mode, args, args32, True, torch.randn(11, 8, generator=testing.make_generator(10)).to(mode.device))


def test_topk_exact_ties_go_to_the_lower_video(mode):
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        args, _ = Case("ties", 8, 23, 6, 16, seed=14).inputs(mode.device, dtype)
        args["lengths"][-1] = args["lengths"][1]
        args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=14)  # video 22 == video 1
        for k in (23, 7):
            scores, videos = check_topk(mode, args, k, True)
            pos = {int(v): j for j, v in enumerate(videos[0])}
            if 22 in pos:
                assert pos.get(1) == pos[22] - 1, f"the copy (video 22) must follow video 1: {videos[0].tolist()}"
        scores, videos = mode.max_similarity_topk(**args, k=23)
        pos_1 = (videos == 1).float().argmax(dim=1)
        pos_22 = (videos == 22).float().argmax(dim=1)
        assert torch.equal(pos_22, pos_1 + 1), "an exact tie must list the lower video first"


# Each CPU mode runs the case written for it (Triton: > 16 queries, > 8 videos per dq step, D > 32;
# CUDA: > 64 queries, L > 32 clips); a GPU runs both.
DETERMINISM = [Case("33x20x12x40", 33, 20, 12, 40, seed=11, emulated=()),
               Case("70x12x40x32", 70, 12, 40, 32, seed=23, ties="argmax", interpreter=(), gpu=("fp32", "bf16"))]


@pytest.mark.parametrize("how", ["KDC_DETERMINISTIC", "torch.use_deterministic_algorithms"])
def test_deterministic_mode(mode, monkeypatch, how):
    """Deterministic mode: repeated runs (three on a GPU) give bitwise identical scores, indices and
    gradients (and top-k lists on a GPU), which match the reference (checked on a GPU, and once on
    the interpreter). Triton: the launch policy gives every kernel the op launches its pinned
    config without timing anything (on the interpreter too, where the launch itself ignores
    configs: tests/ops/launch_spy.py), and outside deterministic mode the same spy sees autotuning
    (the control)."""
    monkeypatch.delenv("KDC_AUTOTUNE", raising=False)  # pinned by deterministic mode alone
    if how == "KDC_DETERMINISTIC":
        monkeypatch.setenv("KDC_DETERMINISTIC", "1")
    else:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert _config.deterministic()
        spy = launch_spy.record(monkeypatch) if mode.impl == "triton" else None
        cases = [c for c in DETERMINISM if c.dtypes(mode.name)]
        for case in cases if how == "KDC_DETERMINISTIC" else cases[:1]:
            for dtype in (DTYPES[dt] for dt in case.dtypes(mode.name)):
                args, args32 = case.inputs(mode.device, dtype)
                grad = case.grad(mode.device)
                runs = []
                for _ in range(3 if mode.gpu else 2):  # on a CPU the repeats cannot differ: the spy checks pinning
                    x = _leaves(args)
                    score, index = mode.max_similarity(**x, return_index=True)
                    runs.append((score, index, *torch.autograd.grad(score, [x["queries"], x["clips"]], grad)))
                for again in runs[1:]:
                    for a, b, name in zip(runs[0], again, ("score", "index", "d queries", "d clips")):
                        assert torch.equal(a, b), f"{name} changed between runs"
                if mode.gpu or (mode.interpreted and how == "KDC_DETERMINISTIC"):
                    check(mode, args, args32, True, grad)
                top = [mode.max_similarity_topk(**args, k=5) for _ in range(2 if mode.gpu else 1)]
                assert all(torch.equal(a, b) for a, b in zip(top[0], top[-1])), "top-k changed between runs"
        if spy is not None:
            spy.assert_pinned()
    finally:
        if how != "KDC_DETERMINISTIC":
            torch.use_deterministic_algorithms(previous)
    if spy is not None and mode.interpreted and how == "KDC_DETERMINISTIC":  # the control (a GPU would autotune)
        monkeypatch.delenv("KDC_DETERMINISTIC", raising=False)
        assert not _config.deterministic()
        spy.clear()
        args, _ = DETERMINISM[0].inputs(mode.device, torch.float32)
        with torch.no_grad():
            mode.max_similarity(**args)
        mode.max_similarity_topk(**args, k=5)
        spy.assert_autotuned()


# ---------------------------------------------------------------- torch.library and compile
def test_opcheck(mode):
    args, _ = Case("opcheck", 5, 7, 3, 8, seed=17).inputs(mode.device, torch.float32)
    q, c, lengths = args["queries"], args["clips"], args["lengths"]
    grad = torch.randn(5, 7, generator=testing.make_generator(18)).to(mode.device)
    if mode.impl == "triton":
        fwd, bwd, topk = T.max_similarity_fwd_op, T.max_similarity_bwd_op, TK.max_similarity_topk_op
    else:
        from kdc_kernels.ops.max_similarity import _cuda  # noqa: F401  (registers the ops)

        fwd, bwd = torch.ops.kdc.cuda_max_similarity_fwd.default, torch.ops.kdc.cuda_max_similarity_bwd.default
        topk = torch.ops.kdc.cuda_max_similarity_topk.default
    leaves = _leaves(args)
    torch.library.opcheck(fwd, (leaves["queries"], leaves["clips"], lengths, True))
    torch.library.opcheck(fwd, (leaves["queries"], leaves["clips"], None, False))
    for normalize in (True, False) if mode.impl == "triton" else (True,):
        score, index, qn, cn = fwd(q, c, lengths, normalize)
        if mode.impl == "triton":
            torch.library.opcheck(bwd, (grad, q, c, score, index, qn, cn, normalize, normalize, True))
        else:
            torch.library.opcheck(bwd, (grad, q, c, lengths, index, qn, cn, normalize))
    torch.library.opcheck(topk, (q, c, lengths, 3, True))


def test_compile_fullgraph_matches_eager(mode):
    """torch.compile(fullgraph=True) of a step calling both ops (validation, dispatch, registered
    ops, autograd) gives bitwise the eager results and gradients (CPU: the aot_eager backend,
    dynamo capture, fake tensors and AOT autograd through the registered ops; a GPU: inductor)."""
    args, args32 = Case("compile", 6, 9, 5, 16, seed=19).inputs(mode.device, torch.float32)
    x, y = _leaves(args), _leaves(args)

    def step(queries, clips, lengths):
        score, index = mode.max_similarity(queries, clips, lengths, return_index=True)
        top_scores, top_videos = mode.max_similarity_topk(queries, clips, lengths, k=4)
        return score, index, top_scores, top_videos

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if mode.gpu else "aot_eager")
    with torch._inductor.config.patch(force_disable_caches=True):  # no stale artifact of another op schema
        got = compiled(**x)
    want = step(**y)
    for g, w, name in zip(got, want, ("score", "index", "top-k scores", "top-k videos")):
        assert torch.equal(g, w), f"compiled {name} differs from eager"
    grad = torch.randn(6, 9, generator=testing.make_generator(20)).to(mode.device)
    got_grads = torch.autograd.grad(got[0], [x["queries"], x["clips"]], grad)
    want_grads = torch.autograd.grad(want[0], [y["queries"], y["clips"]], grad)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w), "compiled gradients differ from eager"
    check(mode, args, args32, True, grad)


# ==================================================================================== Triton only
# Launch hooks, forced splits, buffer sizes and limits of kdc_kernels/ops/max_similarity/_triton*.py.


def test_poison_hook_fills_every_launcher_buffer(monkeypatch):
    """The NaN poisoning the other tests rely on really happens (before the kernels write)."""
    seen = {}
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: seen.setdefault(name, t.clone()))
    args = testing.similarity_inputs(5, 7, 3, 8, seed=13)
    saved = T._max_sim_fwd(args["queries"], args["clips"], args["lengths"], True)
    TB._max_sim_bwd(torch.ones(5, 7), args["queries"], args["clips"], *saved, True, True, True)
    assert {"score", "index", "dq", "dc", "query_norms", "clip_norms", "argmax_buckets"} <= set(seen)
    for name, t in seen.items():
        assert (t.isnan().all() if t.is_floating_point() else (t == -1).all()), f"{name} was not poisoned"


REGISTER_PATH = [c for c in TOPK_CASES if c.interpreter == ("fp32",) and TK._topk_kpad(c.k) <= TK._TOPK_REGISTER_MAX
                 and c.ties is None]


@pytest.mark.parametrize("mode,case,dtype,normalize", matrix(REGISTER_PATH, ("triton-interpreter", "triton-gpu")),
                         indirect=["mode"])
def test_topk_forced_splits(mode, case, dtype, normalize, monkeypatch):
    """The register path's video splits (three, forced with the topk_splits hook) merge into the
    same top-k."""
    monkeypatch.setattr(_launch.hooks, "topk_splits", 3)
    args, _ = case.inputs(mode.device, DTYPES[dtype])
    check_topk(mode, args, case.k, normalize)


@pytest.mark.parametrize("mode", run_modes.params("triton-interpreter"), indirect=True)
@pytest.mark.parametrize("k", [5, 130], ids=["register-path", "chunked-path"])
def test_topk_allocates_no_nq_by_nv_buffer(mode, monkeypatch, k):
    nq, nv, L, D = 12, 1100, 3, 8  # Nv > 4 * K_PAD: the chunked path takes several chunks
    buffers = []
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: buffers.append((name, tuple(t.shape), t.numel())))
    args, _ = Case("big", nq, nv, L, D, seed=15).inputs(mode.device, torch.float32)
    check_topk(mode, args, k, True)
    assert {"topk_scores", "topk_videos", "clip_norms"} <= {b[0] for b in buffers}
    largest = max(buffers, key=lambda b: b[2])
    assert largest[2] < nq * nv, f"{largest[0]} {largest[1]} is as large as an [Nq, Nv] score matrix"
    # O(Nq * k) apart from the [Nv, L] norm table: a bound that does not grow with Nv
    k_pad = TK._topk_kpad(k)
    assert sum(b[2] for b in buffers if b[0] != "clip_norms") <= 8 * nq * k_pad, buffers


@pytest.mark.parametrize("mode", run_modes.params("triton-gpu"), indirect=True)
@pytest.mark.parametrize("k", [100, 1000])
def test_topk_peak_memory_is_far_below_a_score_matrix(mode, k):
    nq, nv, L, D = 2048, 60_000, 8, 64
    args = testing.similarity_inputs(nq, nv, L, D, lengths=None, dtype=torch.bfloat16, device="cuda", seed=16)
    K.max_similarity_topk(**args, k=k, impl="triton")  # compile + autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    scores, videos = K.max_similarity_topk(**args, k=k, impl="triton")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < nq * nv * 4 / 4, \
        f"peak extra memory {peak / 2**20:.1f} MiB vs [Nq, Nv] fp32 {nq * nv * 4 / 2**20:.1f} MiB"
    assert videos.shape == (nq, k)


def test_topk_k_above_the_limit_is_refused():
    meta = dict(queries=torch.empty(4, 8, device="meta"), clips=torch.empty(5000, 2, 8, device="meta"),
                lengths=None, normalize=True)
    assert TK.max_similarity_topk_unsupported(**meta, k=TK._TOPK_MAX_K) == []
    reasons = TK.max_similarity_topk_unsupported(**meta, k=TK._TOPK_MAX_K + 1)
    assert len(reasons) == 1 and str(TK._TOPK_MAX_K) in reasons[0]
    if _config.triton_interpret():
        q, c = torch.randn(2, 4), torch.randn(TK._TOPK_MAX_K + 1, 1, 4)
        with pytest.raises(NotImplementedError, match="4096"):
            K.max_similarity_topk(q, c, k=TK._TOPK_MAX_K + 1, impl="triton")


@pytest.mark.parametrize("mode", run_modes.TRITON_MODES, indirect=True)
def test_auto_picks_triton_on_cuda_and_the_reference_on_cpu(mode, monkeypatch):
    """impl=None (auto): what the model's training (max_similarity) and evaluation (topk) use."""
    launched = []
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: launched.append(name))
    for dtype in (torch.float32,) if not mode.gpu else (torch.float32, torch.float16, torch.bfloat16):
        launched.clear()
        args, args32 = Case("auto", 7, 12, 5, 16, seed=21).inputs(mode.device, dtype)
        x = _leaves(args)
        score = K.max_similarity(**x)
        top = K.max_similarity_topk(**args, k=3)
        triton_first = _backend.auto_preference("max_similarity", mode.device)[0] == "triton"
        assert bool(launched) == (mode.gpu and triton_first), \
            "auto must follow the measured preference on CUDA (Triton until measured) and never use the interpreter"
        testing.check_fast_path(score, max_similarity_ref(**args32), max_similarity_ref(**_fp32(args)), dtype=dtype,
                                name="score")
        check_topk(mode, args, 3, True, result=top)
    if mode.interpreted:  # KDC_IMPL=triton makes impl=None run the (interpreted) kernels
        launched.clear()
        monkeypatch.setenv("KDC_IMPL", "triton")
        score = K.max_similarity(**args)
        assert launched
        testing.assert_close(score, max_similarity_ref(**args), FP32_TOL, "score with KDC_IMPL=triton")


def test_size_limits_are_reasons_and_exotic_strides_are_compacted():
    """Inside a tile the kernels index in int32: inputs whose strides would overflow that are made
    contiguous first, and sizes no layout can fix are reasons (shape-only: meta tensors)."""
    q = torch.empty(200, 8, device="meta")
    assert T.max_similarity_unsupported(q, torch.empty(9, 3, 8, device="meta"), None, True, False) == []
    reasons = T.max_similarity_unsupported(q, torch.empty(2**24 + 1, 1, 8, device="meta"), None, True, False)
    assert len(reasons) == 1 and "Nv = 16777217" in reasons[0]
    assert TK.max_similarity_topk_unsupported(q, torch.empty(2**24 + 1, 1, 8, device="meta"), None, 5, True) == []
    long = torch.empty(3, T._MAX_BWD_L + 1, 8, device="meta")
    assert T.max_similarity_unsupported(q, long, None, True, False) == []  # no gradient: any L
    reasons = T.max_similarity_unsupported(q, long.requires_grad_(True), None, True, False)
    assert len(reasons) == 1 and f"L = {T._MAX_BWD_L + 1}" in reasons[0]
    wide = torch.empty_strided((4, 8), (2**30, 1), device="meta")
    assert T._int32_tiles(wide, (T._TILE_QUERIES, 8)).stride() == (8, 1)
    fine = torch.empty_strided((4, 8), (1, 4), device="meta")
    assert T._int32_tiles(fine, (T._TILE_QUERIES, 8)) is fine
