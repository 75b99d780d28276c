"""The Triton ``max_similarity`` / ``max_similarity_topk`` kernels against the reference.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest); with one, ``pytest -m gpu`` runs the same checks in fp32, fp16 and bf16. Every buffer the
launchers allocate is NaN-poisoned (``KDC_POISON_OUTPUTS=1``), so an element a kernel fails to write
fails the comparison. Shapes hit 1, odd sizes and one past the interpreter's blocks (16 queries,
64 clip columns, 32 features; 8 videos per dq step, 16 sorted queries per dc chunk); the GPU adds
shapes one past its larger blocks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kdc_kernels as K  # noqa: E402
from kdc_kernels import _backend, _config, _launch, testing  # noqa: E402
from kdc_kernels.ops.max_similarity import _triton as T  # noqa: E402
from kdc_kernels.ops.max_similarity import _triton_bwd as TB  # noqa: E402
from kdc_kernels.ops.max_similarity import _triton_topk as TK  # noqa: E402
from kdc_kernels.ops.max_similarity import max_similarity_ref, max_similarity_topk_ref  # noqa: E402

FP32_TOL = testing.TOLERANCE[torch.float32]
SHAPES = [(1, 1, 1, 1), (5, 7, 3, 8), (17, 9, 65, 33), (16, 65, 1, 32)]  # (Nq, Nv, L, D)
GPU_SHAPES = [(129, 33, 129, 65), (300, 257, 32, 384)]


def _targets():
    yield pytest.param(("cpu", torch.float32), id="cpu-fp32")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        yield pytest.param(("cuda", dtype), id=f"cuda-{str(dtype)[6:]}", marks=pytest.mark.gpu)


@pytest.fixture(params=list(_targets()))
def target(request):
    device, dtype = request.param
    if device == "cpu" and not _config.triton_interpret():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    return device, dtype


@pytest.fixture(autouse=True)
def _poison_launcher_buffers(monkeypatch):
    monkeypatch.setenv("KDC_POISON_OUTPUTS", "1")


def _inputs(shape, device, dtype, *, seed, lengths="ragged", noncontiguous=False, requires_grad=False):
    """(args in ``dtype``, the same values in fp32 before rounding) for max_similarity."""
    nq, nv, L, D = shape
    kw = dict(lengths=lengths, device=device, noncontiguous=noncontiguous, requires_grad=requires_grad, seed=seed)
    return (testing.similarity_inputs(nq, nv, L, D, dtype=dtype, **kw),
            testing.similarity_inputs(nq, nv, L, D, dtype=torch.float32, **kw))


def _shapes(device):
    return SHAPES + (GPU_SHAPES if device == "cuda" else [])


def _clip_scores(args, normalize):
    """Every clip's score ``[Nq, Nv, L]`` in fp64, ``-inf`` on padded clips (small shapes only)."""
    q, c = args["queries"].detach().double(), args["clips"].detach().double()
    if normalize:
        q, c = torch.nn.functional.normalize(q, dim=-1, eps=1e-12), torch.nn.functional.normalize(c, dim=-1, eps=1e-12)
    sim = torch.einsum("nd,vld->nvl", q, c)
    if args["lengths"] is not None:
        pad = torch.arange(c.shape[1], device=c.device)[None] >= args["lengths"][:, None]
        sim = sim.masked_fill(pad[None], float("-inf"))
    return sim


def _scale(ref: torch.Tensor) -> float:
    """Tolerances are for unit-scale outputs; raw (unnormalised) dots are larger."""
    return max(1.0, float(ref.detach().abs().max()))


def _check_index(index, ref_index, args, normalize, dtype):
    """Our argmax clip attains the max, and it is the reference's wherever the best clip leads the
    runner-up by more than rounding (other summation orders may swap near-ties; exact ties have
    their own test)."""
    sim = _clip_scores(args, normalize)
    tol = (1e-5 if dtype == torch.float32 else 1e-4) * _scale(sim.amax(dim=2))
    chosen = sim.gather(2, index[..., None]).squeeze(2)
    testing.assert_close(chosen, sim.amax(dim=2), tol, "score of the chosen clip")
    if sim.shape[2] >= 2:
        best, second = sim.topk(2, dim=2).values.unbind(2)
        clear = best - second > tol
    else:
        clear = torch.ones_like(index, dtype=torch.bool)
    differ = int((index != ref_index)[clear].sum())
    assert differ == 0, f"{differ} argmax clips differ from the reference away from near-ties"


def _grads_at(args, index, normalize, grad):
    """The reference's backward at a given argmax: autograd of <q^_n, c^_{v, index[n, v]}>, for runs
    where ours took the other clip of a near-tie."""
    q, c = args["queries"], args["clips"]
    qn, cn = q.float(), c.float()
    if normalize:
        qn, cn = torch.nn.functional.normalize(qn, dim=-1, eps=1e-12), torch.nn.functional.normalize(cn, dim=-1, eps=1e-12)
    chosen = cn[torch.arange(c.shape[0], device=c.device)[None, :], index]
    return torch.autograd.grad(torch.einsum("nd,nvd->nv", qn, chosen), [q, c], grad)


def _grads(fn, args, normalize, grad):
    score = fn(**args, normalize=normalize)
    return torch.autograd.grad(score, [args["queries"], args["clips"]], grad)


def _triton_max_similarity(**kw):
    return K.max_similarity(**kw, impl="triton")


# ------------------------------------------------------------------------------------------------
# max_similarity: forward and backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("shape_id", range(len(SHAPES) + len(GPU_SHAPES)))
def test_forward_and_gradients_match_reference(target, shape_id, normalize):
    device, dtype = target
    shapes = _shapes(device)
    if shape_id >= len(shapes):
        pytest.skip("GPU-only shape")
    shape = shapes[shape_id]
    args, args32 = _inputs(shape, device, dtype, seed=shape_id, requires_grad=True)
    score, index = K.max_similarity(**args, normalize=normalize, return_index=True, impl="triton")
    assert score.dtype == torch.float32 and index.dtype == torch.int64 and score.shape == (shape[0], shape[1])
    ref, ref_index = max_similarity_ref(**args, normalize=normalize, return_index=True)
    ref32 = max_similarity_ref(**args32, normalize=normalize)
    testing.check_fast_path(score, ref32, ref, dtype=dtype, name="score")
    _check_index(index, ref_index, args, normalize, dtype)

    grad = torch.randn(shape[0], shape[1], generator=testing.make_generator(shape_id + 100)).to(device)
    dq, dc = _grads(_triton_max_similarity, args, normalize, grad)
    if torch.equal(index, ref_index):
        (ref_dq, ref_dc), (ref32_dq, ref32_dc) = (_grads(max_similarity_ref, a, normalize, grad) for a in (args, args32))
    else:  # a near-tie went the other way (checked above): the same formula at our argmax
        (ref_dq, ref_dc), (ref32_dq, ref32_dc) = (_grads_at(a, index, normalize, grad) for a in (args, args32))
    assert dq.dtype == dtype and dc.dtype == dtype
    testing.check_fast_path(dq, ref32_dq, ref_dq, dtype=dtype, name="d queries")
    testing.check_fast_path(dc, ref32_dc, ref_dc, dtype=dtype, name="d clips")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs_on_the_interpreter(dtype):
    """fp16/bf16 loads, the fp32 math and the low-precision stores of dq/dc under the interpreter
    (the GPU tests repeat this at larger sizes)."""
    if not _config.triton_interpret():
        pytest.skip("interpreter run (the GPU targets cover low precision there)")
    shape = (17, 9, 20, 33)
    args, args32 = _inputs(shape, "cpu", dtype, seed=40, requires_grad=True)
    score, index = K.max_similarity(**args, return_index=True, impl="triton")
    ref, ref_index = max_similarity_ref(**args, return_index=True)
    testing.check_fast_path(score, max_similarity_ref(**args32), ref, dtype=dtype, name="score")
    _check_index(index, ref_index, args, True, dtype)
    grad = torch.randn(17, 9, generator=testing.make_generator(41))
    got = _grads(_triton_max_similarity, args, True, grad)
    assert got[0].dtype == got[1].dtype == dtype
    want = _grads(max_similarity_ref, args, True, grad) if torch.equal(index, ref_index) else \
        _grads_at(args, index, True, grad)
    want32 = _grads(max_similarity_ref, args32, True, grad)
    for g, w, w32, name in zip(got, want, want32, ("d queries", "d clips")):
        testing.check_fast_path(g, w32, w, dtype=dtype, name=name)
    scores, videos = K.max_similarity_topk(**args, k=4, impl="triton")
    _check_topk(scores, videos, args, 4, True, dtype)


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def test_clip_gradient_buckets_span_chunks_and_feature_blocks(device):
    """The clip gradient sums each clip's queries along a list of queries sorted by argmax clip:
    here one clip is the argmax of 100 queries (its bucket spans two chunks of the interpreter's 64
    sorted queries, three of the GPU's 32), other clips of that video are picked by nobody (zero
    rows), and D = 72 spans two feature blocks. fp32 (IEEE dots on the GPU)."""
    if device == "cpu" and not _config.triton_interpret():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    args, args32 = _inputs((150, 3, 5, 72), device, torch.float32, seed=50, requires_grad=True)
    noise = (0.05 * torch.randn(100, 72, generator=testing.make_generator(51))).to(device)
    with torch.no_grad():
        for a in (args, args32):
            a["queries"][:100] = a["clips"][0, 2] + noise
    score, index = K.max_similarity(**args, return_index=True, impl="triton")
    assert int((index[:, 0] == 2).sum()) >= 100
    grad = torch.randn(150, 3, generator=testing.make_generator(52)).to(device)
    for normalize in (True, False):
        got = _grads(_triton_max_similarity, args, normalize, grad)
        want = _grads(max_similarity_ref, args32, normalize, grad)
        for g, w, name in zip(got, want, ("d queries", "d clips")):
            testing.check_fast_path(g, w, name=f"{name} (normalize={normalize})")


def test_grads_at_an_argmax_is_the_reference_backward():
    """The fallback above (used where a near-tie went the other way) is the reference's formula."""
    args, _ = _inputs((6, 5, 7, 12), "cpu", torch.float32, seed=30, requires_grad=True)
    grad = torch.randn(6, 5, generator=testing.make_generator(31))
    for normalize in (True, False):
        _, ref_index = max_similarity_ref(**args, normalize=normalize, return_index=True)
        for got, want in zip(_grads_at(args, ref_index, normalize, grad), _grads(max_similarity_ref, args, normalize, grad)):
            testing.assert_close(got, want, 1e-6, "gradient at the reference argmax")


@pytest.mark.parametrize("lengths", [None, "full"])
def test_without_ragged_lengths(target, lengths):
    device, dtype = target
    args, args32 = _inputs((6, 5, 7, 12), device, dtype, seed=3, lengths=lengths, requires_grad=True)
    score, index = K.max_similarity(**args, return_index=True, impl="triton")
    ref, ref_index = max_similarity_ref(**args, return_index=True)
    testing.check_fast_path(score, max_similarity_ref(**args32), ref, dtype=dtype, name="score")
    _check_index(index, ref_index, args, True, dtype)
    grad = torch.rand(6, 5, generator=testing.make_generator(4)).to(device)
    for got, want, want32, name in zip(_grads(_triton_max_similarity, args, True, grad),
                                       _grads(max_similarity_ref, args, True, grad),
                                       _grads(max_similarity_ref, args32, True, grad), ("d queries", "d clips")):
        testing.check_fast_path(got, want32, want, dtype=dtype, name=name)


def test_noncontiguous_inputs(target):
    device, dtype = target
    args, args32 = _inputs((9, 6, 10, 24), device, dtype, seed=5, noncontiguous=True, requires_grad=True)
    assert not args["queries"].is_contiguous() and not args["clips"].is_contiguous()
    score, index = K.max_similarity(**args, return_index=True, impl="triton")
    ref, ref_index = max_similarity_ref(**args, return_index=True)
    testing.check_fast_path(score, max_similarity_ref(**args32), ref, dtype=dtype, name="score")
    _check_index(index, ref_index, args, True, dtype)
    # a non-contiguous upstream gradient too (the transpose of a [Nv, Nq] tensor)
    grad = torch.randn(6, 9, generator=testing.make_generator(6)).to(device).t()
    for got, want, want32, name in zip(_grads(_triton_max_similarity, args, True, grad),
                                       _grads(max_similarity_ref, args, True, grad),
                                       _grads(max_similarity_ref, args32, True, grad), ("d queries", "d clips")):
        testing.check_fast_path(got, want32, want, dtype=dtype, name=name)


@pytest.mark.parametrize("which", ["queries", "clips"])
def test_gradient_of_one_input(target, which):
    device, dtype = target
    args, args32 = _inputs((7, 5, 6, 16), device, dtype, seed=7)
    for a in (args, args32):
        a[which].requires_grad_(True)
    grad = torch.randn(7, 5, generator=testing.make_generator(8)).to(device)
    (got,) = torch.autograd.grad(K.max_similarity(**args, impl="triton"), [args[which]], grad)
    (want,) = torch.autograd.grad(max_similarity_ref(**args), [args[which]], grad)
    (want32,) = torch.autograd.grad(max_similarity_ref(**args32), [args32[which]], grad)
    testing.check_fast_path(got, want32, want, dtype=dtype, name=f"d {which}")


def test_exact_ties_go_to_the_lowest_clip(target):
    device, dtype = target
    args, _ = _inputs((11, 8, 9, 16), device, dtype, seed=9, requires_grad=True)
    clips = testing.with_ties(args["clips"], args["lengths"], seed=9).requires_grad_(True)
    args["clips"] = clips
    score, index = K.max_similarity(**args, return_index=True, impl="triton")
    ref, ref_index = max_similarity_ref(**args, return_index=True)
    testing.assert_close(score.detach(), ref.detach(), FP32_TOL if dtype == torch.float32 else testing.TOLERANCE[dtype], "score")
    # with_ties copies clip src onto dst (src < dst) in every even video: dst can never win
    c = clips.detach()
    for v in range(0, c.shape[0], 2):
        n = int(args["lengths"][v])
        same = [(a, b) for a in range(n) for b in range(a + 1, n) if torch.equal(c[v, a], c[v, b])]
        for src, dst in same:
            assert not (index[:, v] == dst).any(), f"video {v}: tie between clips {src} and {dst} went to {dst}"
    # the copies are one-hot (exact in any order); other clips may differ only at near-ties
    _check_index(index, ref_index, args, True, dtype)
    grad = torch.randn(11, 8, generator=testing.make_generator(10)).to(device)
    (dc,) = torch.autograd.grad(K.max_similarity(**args, impl="triton"), [clips], grad)
    (ref_dc,) = torch.autograd.grad(max_similarity_ref(**args), [clips], grad)
    testing.assert_close(dc.float(), ref_dc.float(), FP32_TOL if dtype == torch.float32 else 2 * testing.TOLERANCE[dtype],
                         "d clips (ties)")


@pytest.mark.parametrize("how", ["KDC_DETERMINISTIC", "torch.use_deterministic_algorithms"])
def test_deterministic_mode_gives_bitwise_identical_gradients(target, monkeypatch, how):
    device, dtype = target
    if how == "KDC_DETERMINISTIC":
        monkeypatch.setenv("KDC_DETERMINISTIC", "1")
    else:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert _config.deterministic()
        args, args32 = _inputs((33, 20, 12, 40), device, dtype, seed=11, requires_grad=True)
        grad = torch.randn(33, 20, generator=testing.make_generator(12)).to(device)
        first = _grads(_triton_max_similarity, args, True, grad)
        for _ in range(2):
            again = _grads(_triton_max_similarity, args, True, grad)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), "gradients changed between runs"
        for got, want, want32, name in zip(first, _grads(max_similarity_ref, args, True, grad),
                                           _grads(max_similarity_ref, args32, True, grad), ("d queries", "d clips")):
            testing.check_fast_path(got, want32, want, dtype=dtype, name=name)
    finally:
        if how != "KDC_DETERMINISTIC":
            torch.use_deterministic_algorithms(previous)


def test_poison_hook_fills_every_launcher_buffer(monkeypatch):
    """The NaN poisoning the other tests rely on really happens (before the kernels write)."""
    seen = {}
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: seen.setdefault(name, t.clone()))
    args, _ = _inputs((5, 7, 3, 8), "cpu", torch.float32, seed=13)
    saved = T._max_sim_fwd(args["queries"], args["clips"], args["lengths"], True)
    TB._max_sim_bwd(torch.ones(5, 7), args["queries"], args["clips"], *saved, True, True, True)
    assert {"score", "index", "dq", "dc", "query_norms", "clip_norms", "argmax_buckets"} <= set(seen)
    for name, t in seen.items():
        assert (t.isnan().all() if t.is_floating_point() else (t == -1).all()), f"{name} was not poisoned"


# ------------------------------------------------------------------------------------------------
# max_similarity_topk
# ------------------------------------------------------------------------------------------------

TOPK_CASES = [  # (Nq, Nv, L, D, k): k = 1, small, Nv, and past the register path (K_PAD 256)
    (9, 40, 5, 16, 1),
    (17, 40, 4, 9, 5),
    (6, 37, 3, 8, 37),
    (6, 300, 2, 8, 130),
]


def _check_topk(scores, videos, args, k, normalize, dtype):
    assert scores.shape == videos.shape == (args["queries"].shape[0], k)
    assert scores.dtype == torch.float32 and videos.dtype == torch.int64
    ref_s, ref_v = max_similarity_topk_ref(**args, k=k, normalize=normalize)
    full = max_similarity_ref(**args, normalize=normalize).detach()
    tol = (FP32_TOL if dtype == torch.float32 else 1e-3) * _scale(ref_s)
    testing.assert_topk_equivalent(scores, videos, full, tol)
    if dtype == torch.float32 and scores.device.type == "cpu":
        # equal to the reference's list except where two videos' scores are within rounding (the
        # interpreter's and torch's GEMMs sum in other orders); identical videos in lower-first order
        lengths, clips = args["lengths"], args["clips"].detach()

        def same_video(a, b):
            return (lengths is None or int(lengths[a]) == int(lengths[b])) and torch.equal(clips[a], clips[b])

        testing.assert_topk_valid(scores, videos, ref_s, ref_v, full, same_video, tol)


@pytest.mark.parametrize("splits", [None, 3], ids=["default-splits", "3-splits"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "x".join(map(str, c)))
def test_topk_matches_reference(target, monkeypatch, case, normalize, splits):
    device, dtype = target
    nq, nv, L, D, k = case
    if splits is not None:
        if TK._topk_kpad(k) > TK._TOPK_REGISTER_MAX:
            pytest.skip("splits only exist on the register path")
        monkeypatch.setattr(_launch.hooks, "topk_splits", splits)
    args, _ = _inputs((nq, nv, L, D), device, dtype, seed=nv + k)
    scores, videos = K.max_similarity_topk(**args, k=k, normalize=normalize, impl="triton")
    _check_topk(scores, videos, args, k, normalize, dtype)


def test_topk_exact_ties_go_to_the_lower_video(target):
    device, dtype = target
    args, _ = _inputs((8, 23, 6, 16), device, dtype, seed=14)
    args["lengths"][-1] = args["lengths"][1]
    args["clips"] = testing.with_ties(args["clips"], args["lengths"], seed=14)  # video 22 == video 1
    for k in (23, 7):
        scores, videos = K.max_similarity_topk(**args, k=k, impl="triton")
        _check_topk(scores, videos, args, k, True, dtype)
        pos = {int(v): j for j, v in enumerate(videos[0])}
        if 22 in pos:
            assert pos.get(1) == pos[22] - 1, f"the copy (video 22) must follow video 1: {videos[0].tolist()}"
    scores, videos = K.max_similarity_topk(**args, k=23, impl="triton")
    pos_1 = (videos == 1).float().argmax(dim=1)
    pos_22 = (videos == 22).float().argmax(dim=1)
    assert torch.equal(pos_22, pos_1 + 1), "an exact tie must list the lower video first"


@pytest.mark.parametrize("k", [5, 130], ids=["register-path", "chunked-path"])
def test_topk_allocates_no_nq_by_nv_buffer(monkeypatch, k):
    if not _config.triton_interpret():
        pytest.skip("CPU interpreter run (the GPU test below measures the allocator)")
    nq, nv, L, D = 12, 1100, 3, 8  # Nv > 4 * K_PAD: the chunked path takes several chunks
    buffers = []
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: buffers.append((name, tuple(t.shape), t.numel())))
    args, _ = _inputs((nq, nv, L, D), "cpu", torch.float32, seed=15)
    scores, videos = K.max_similarity_topk(**args, k=k, impl="triton")
    _check_topk(scores, videos, args, k, True, torch.float32)
    assert {"topk_scores", "topk_videos", "clip_norms"} <= {b[0] for b in buffers}
    largest = max(buffers, key=lambda b: b[2])
    assert largest[2] < nq * nv, f"{largest[0]} {largest[1]} is as large as an [Nq, Nv] score matrix"
    # O(Nq * k) apart from the [Nv, L] norm table: a bound that does not grow with Nv
    k_pad = TK._topk_kpad(k)
    assert sum(b[2] for b in buffers if b[0] != "clip_norms") <= 8 * nq * k_pad, buffers


@pytest.mark.gpu
@pytest.mark.parametrize("k", [100, 1000])
def test_topk_peak_memory_is_far_below_a_score_matrix(k):
    nq, nv, L, D = 2048, 60_000, 8, 64
    args, _ = _inputs((nq, nv, L, D), "cuda", torch.bfloat16, seed=16, lengths=None)
    K.max_similarity_topk(**args, k=k, impl="triton")  # compile + autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    scores, videos = K.max_similarity_topk(**args, k=k, impl="triton")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < nq * nv * 4 / 4, f"peak extra memory {peak / 2**20:.1f} MiB vs [Nq, Nv] fp32 {nq * nv * 4 / 2**20:.1f} MiB"
    assert videos.shape == (nq, k)


def test_topk_k_above_the_limit_is_refused():
    meta = dict(queries=torch.empty(4, 8, device="meta"), clips=torch.empty(5000, 2, 8, device="meta"),
                lengths=None, normalize=True)
    assert T.max_similarity_topk_unsupported(**meta, k=TK._TOPK_MAX_K) == []
    reasons = T.max_similarity_topk_unsupported(**meta, k=TK._TOPK_MAX_K + 1)
    assert len(reasons) == 1 and str(TK._TOPK_MAX_K) in reasons[0]
    if _config.triton_interpret():
        q, c = torch.randn(2, 4), torch.randn(TK._TOPK_MAX_K + 1, 1, 4)
        with pytest.raises(NotImplementedError, match="4096"):
            K.max_similarity_topk(q, c, k=TK._TOPK_MAX_K + 1, impl="triton")


# ------------------------------------------------------------------------------------------------
# torch.library registration, torch.compile, implementation choice
# ------------------------------------------------------------------------------------------------


def test_opcheck(target):
    device, dtype = target
    args, _ = _inputs((5, 7, 3, 8), device, dtype, seed=17, requires_grad=True)
    q, c, lengths = args["queries"], args["clips"], args["lengths"]
    torch.library.opcheck(T.max_similarity_fwd_op, (q, c, lengths, True))
    torch.library.opcheck(T.max_similarity_fwd_op, (q, c, None, False))
    saved = T.max_similarity_fwd_op(q.detach(), c.detach(), lengths, True)
    grad = torch.randn(5, 7, generator=testing.make_generator(18)).to(device)
    torch.library.opcheck(T.max_similarity_bwd_op, (grad, q.detach(), c.detach(), *saved, True, True, True))
    raw = T.max_similarity_fwd_op(q.detach(), c.detach(), lengths, False)
    torch.library.opcheck(T.max_similarity_bwd_op, (grad, q.detach(), c.detach(), *raw, False, False, True))
    torch.library.opcheck(TK.max_similarity_topk_op, (q.detach(), c.detach(), lengths, 3, True))


def test_compile_fullgraph_matches_eager(target):
    device, dtype = target
    args, _ = _inputs((6, 9, 5, 16), device, dtype, seed=19, requires_grad=True)

    def step(queries, clips, lengths):
        score, index = K.max_similarity(queries, clips, lengths, return_index=True, impl="triton")
        top_scores, top_videos = K.max_similarity_topk(queries, clips, lengths, k=4, impl="triton")
        return score, index, top_scores, top_videos

    compiled = torch.compile(step, fullgraph=True)
    with torch._inductor.config.patch(force_disable_caches=True):  # no stale artifact of another op schema
        got = compiled(**args)
    want = step(**args)
    for g, w, name in zip(got, want, ("score", "index", "top-k scores", "top-k videos")):
        assert torch.equal(g, w), f"compiled {name} differs from eager"
    grad = torch.randn(6, 9, generator=testing.make_generator(20)).to(device)
    got_grads = torch.autograd.grad(got[0], [args["queries"], args["clips"]], grad)
    want_grads = torch.autograd.grad(want[0], [args["queries"], args["clips"]], grad)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w), "compiled gradients differ from eager"


def test_auto_picks_triton_on_cuda_and_the_reference_on_cpu(target, monkeypatch):
    """impl=None (auto): what the model's training (max_similarity) and evaluation (topk) use."""
    device, dtype = target
    launched = []
    monkeypatch.setattr(_launch.hooks, "on_alloc", lambda name, t: launched.append(name))
    args, args32 = _inputs((7, 12, 5, 16), device, dtype, seed=21, requires_grad=True)
    score = K.max_similarity(**args)
    scores, videos = K.max_similarity_topk(**args, k=3)
    triton_first = _backend.auto_preference("max_similarity", torch.device(device))[0] == "triton"
    assert bool(launched) == (device == "cuda" and triton_first), \
        "auto must follow the measured preference on CUDA (Triton until measured) and never use the interpreter"
    testing.check_fast_path(score, max_similarity_ref(**args32), max_similarity_ref(**args), dtype=dtype, name="score")
    _check_topk(scores, videos, args, 3, True, dtype)
    if device == "cpu":  # KDC_IMPL=triton makes impl=None run the (interpreted) kernels
        monkeypatch.setenv("KDC_IMPL", "triton")
        score = K.max_similarity(**args)
        assert launched
        testing.assert_close(score.detach(), max_similarity_ref(**args).detach(), FP32_TOL, "score with KDC_IMPL=triton")


def test_size_limits_are_reasons_and_exotic_strides_are_compacted():
    """Inside a tile the kernels index in int32: inputs whose strides would overflow that are made
    contiguous first, and sizes no layout can fix are reasons (shape-only: meta tensors)."""
    q = torch.empty(200, 8, device="meta")
    assert T.max_similarity_unsupported(q, torch.empty(9, 3, 8, device="meta"), None, True, False) == []
    reasons = T.max_similarity_unsupported(q, torch.empty(2**24 + 1, 1, 8, device="meta"), None, True, False)
    assert len(reasons) == 1 and "Nv = 16777217" in reasons[0]
    assert T.max_similarity_topk_unsupported(q, torch.empty(2**24 + 1, 1, 8, device="meta"), None, 5, True) == []
    long = torch.empty(3, T._MAX_BWD_L + 1, 8, device="meta")
    assert T.max_similarity_unsupported(q, long, None, True, False) == []  # no gradient: any L
    reasons = T.max_similarity_unsupported(q, long.requires_grad_(True), None, True, False)
    assert len(reasons) == 1 and f"L = {T._MAX_BWD_L + 1}" in reasons[0]
    wide = torch.empty_strided((4, 8), (2**30, 1), device="meta")
    assert T._int32_tiles(wide, (T._TILE_QUERIES, 8)).stride() == (8, 1)
    fine = torch.empty_strided((4, 8), (1, 4), device="meta")
    assert T._int32_tiles(fine, (T._TILE_QUERIES, 8)) is fine
