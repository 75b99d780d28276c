"""Input factories, the tolerance table and comparison helpers shared by tests and benchmarks.

Every fast path is checked against the reference with these, on fresh random inputs.
"""

from __future__ import annotations

import torch

# Max abs error allowed against an fp32 reference for outputs of roughly unit scale.
# fp16/bf16: the contract says "within 2x the reference's own error in that dtype, plus a small
# atol"; compare_low_precision() implements that rule, these are the floors.
TOLERANCE = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
TF32_TOLERANCE = 1e-3


def tf32_enabled(device) -> bool:
    """Whether fp32 dots on ``device`` may use TF32 (the package's rule: only when the user allowed
    it the torch way), i.e. whether fp32 results are checked at ``TF32_TOLERANCE``."""
    from . import _config

    return _config.fp32_dot_precision(torch.device(device).type) == "tf32"


def prefix_mask(lengths: torch.Tensor, max_len: int, dtype=torch.bool) -> torch.Tensor:
    """``[N, max_len]`` mask, true/1 for ``l < lengths[n]``, as PRVR codebases build ``video_mask``."""
    return (torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]).to(dtype)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def ragged_lengths(batch: int, max_len: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Random lengths in [1, max_len] that include 1 and max_len whenever batch >= 2."""
    g = make_generator(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    if batch >= 2:
        lengths[0], lengths[-1] = max_len, 1
    return lengths.to(device)


def _randn(shape, dtype, device, g, noncontiguous: bool) -> torch.Tensor:
    if noncontiguous:
        # Build with the last two dims swapped, then transpose back: same shape, other strides.
        swapped = list(shape[:-2]) + [shape[-1], shape[-2]] if len(shape) >= 2 else list(shape)
        x = torch.randn(swapped, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return x.transpose(-1, -2) if len(shape) >= 2 else x
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def attention_inputs(
    B: int, H: int, L: int, D: int, *, R: int | None = 2, sigma: bool = True, lengths: str | None = "ragged",
    dtype=torch.float32, device="cpu", noncontiguous: bool = False, requires_grad: bool = False, seed: int = 0,
) -> dict:
    """Random arguments for ``windowed_attention`` (kwargs dict: q, k, v, rel_bias, sigma, lengths).

    ``lengths``: ``"ragged"`` (includes 1 and L), ``"full"`` (all L, passed explicitly) or None.
    sigma is drawn in [0.5, L/2 + 1] so both narrow and wide windows occur.
    """
    g = make_generator(seed)
    q, k, v = (_randn((B, H, L, D), dtype, device, g, noncontiguous) for _ in range(3))
    args = dict(q=q, k=k, v=v, rel_bias=None, sigma=None, lengths=None)
    if R is not None:
        args["rel_bias"] = (0.5 * torch.randn(H, 2 * R + 1, generator=g)).to(device)
    if sigma:
        args["sigma"] = (0.5 + torch.rand(B, H, L, generator=g) * (L / 2 + 0.5)).to(device)
    if lengths == "ragged":
        args["lengths"] = ragged_lengths(B, L, seed, device)
    elif lengths == "full":
        args["lengths"] = torch.full((B,), L, dtype=torch.int64, device=device)
    if requires_grad:
        for name in ("q", "k", "v", "rel_bias", "sigma"):
            if args[name] is not None:
                args[name].requires_grad_(True)
    return args


def similarity_inputs(
    nq: int, nv: int, L: int, D: int, *, lengths: str | None = "ragged", dtype=torch.float32, device="cpu",
    noncontiguous: bool = False, requires_grad: bool = False, seed: int = 0,
) -> dict:
    """Random arguments for ``max_similarity`` (kwargs dict: queries, clips, lengths)."""
    g = make_generator(seed)
    queries = _randn((nq, D), dtype, device, g, noncontiguous)
    clips = _randn((nv, L, D), dtype, device, g, noncontiguous)
    lens = None
    if lengths == "ragged":
        lens = ragged_lengths(nv, L, seed, device)
    elif lengths == "full":
        lens = torch.full((nv,), L, dtype=torch.int64, device=device)
    if requires_grad:
        queries.requires_grad_(True)
        clips.requires_grad_(True)
    return dict(queries=queries, clips=clips, lengths=lens)


def integer_valued(x: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """``x`` rounded to integers in [-levels, levels] (same dtype). Dot products of such vectors are
    exact in fp32 whatever the summation order, so built-in ties stay ties in every implementation."""
    return x.float().mul(levels / 2).round().clamp(-levels, levels).to(x.dtype)


def sign_valued(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` replaced by the signs of its entries (+1 for 0) on its first ``m`` features and
    0 on the rest, ``m`` the largest power of 4 <= D (all of them when D is 1, 4, 16, 64, 256, ...).

    Every such vector has norm ``sqrt(m)``, a power of two, so L2 normalisation is exact, and every
    dot product, raw or normalised, is exact in fp32 (fp16/bf16 too) whatever the summation order,
    block shape, position in a block or thread count. Every implementation and tiling then computes
    bit-identical scores, and equal scores are ties everywhere: the data for bitwise claims across
    block shapes, chunks, shards and impls. Scores take few distinct values, so exact ties abound.
    """
    m = 1
    while 4 * m <= x.shape[-1]:
        m *= 4
    signs = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    signs[..., m:] = 0
    return signs


def one_hot_valued(x: torch.Tensor) -> torch.Tensor:
    """Each vector of ``x [..., D]`` replaced by a one-hot one: at the position of its largest
    magnitude, with its sign, and a power of two near its norm as the magnitude (zero vectors stay
    zero). Already one-hot vectors of that form are kept.

    The dot product of such a vector with *any* vector is a single exact product plus zeros, and its
    normalisation is exact, so identical one-hot vectors score bit-identically against random
    queries in every implementation, summation order and position: ties that are ties on every
    machine, without making the queries special.
    """
    norm = x.float().norm(dim=-1, keepdim=True)
    scale = torch.where(norm > 0, torch.exp2(torch.round(torch.log2(norm.clamp_min(1e-30)))), torch.zeros_like(norm))
    at = x.abs().argmax(dim=-1, keepdim=True)
    sign = torch.where(x.gather(-1, at) < 0, -1.0, 1.0)
    return torch.zeros_like(x).scatter_(-1, at, (sign * scale).to(x.dtype))


def with_ties(clips: torch.Tensor, lengths: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """Copy of ``clips [Nv, L, D]`` in which some videos repeat a clip (exact max ties) and some
    videos equal each other (exact top-k ties).

    In every even video one valid clip is made :func:`one_hot_valued` and copied onto a later valid
    clip; with Nv >= 3 video 1 is made of one-hot clips and copied onto the last video (a top-k tie
    when their lengths are equal). One-hot clips score exactly against any query, so these ties
    are ties in every implementation and summation order (the BLAS of a CPU may round the same
    dot product differently at another position or in another block shape, so copies of random
    vectors are not ties there).
    """
    clips = clips.detach().clone()
    nv, L, _ = clips.shape
    g = make_generator(seed)
    for v in range(0, nv, 2):
        n = L if lengths is None else int(lengths[v])
        if n >= 2:
            src, dst = sorted(torch.randperm(n, generator=g)[:2].tolist())
            clips[v, src] = one_hot_valued(clips[v, src])
            clips[v, dst] = clips[v, src]
    if nv >= 3:
        clips[1] = one_hot_valued(clips[1])
        clips[nv - 1] = clips[1]
    return clips


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "output") -> None:
    """Max-abs-error check that fails on NaN, shape or dtype mismatch and names what differed."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        raise AssertionError(f"{name}: {int(torch.isnan(actual).sum())} NaN element(s) (unwritten output?)")
    a, e = actual.detach().double(), expected.detach().double()
    diff = torch.where(a == e, 0.0, (a - e).abs())  # equal infinities (a -inf score) match
    diff = torch.where(torch.isnan(a) & torch.isnan(e), 0.0, diff.nan_to_num(nan=float("inf")))
    err = float(diff.max()) if diff.numel() else 0.0
    if not err <= atol:
        where = tuple(int(i) for i in torch.nonzero(diff > atol)[0])
        raise AssertionError(f"{name}: max abs error {err:.3g} > {atol:.3g} (first at {where})")


def assert_topk_equivalent(scores: torch.Tensor, videos: torch.Tensor, full_scores: torch.Tensor, atol: float,
                           name: str = "top-k") -> None:
    """``(scores, videos) [Nq, k]`` is a correct top-k of ``full_scores [Nq, Nv]`` up to ``atol``.

    Exact equality of the indices is the right check when both sides compute bit-identical scores;
    when they differ by rounding (another dtype, another summation order), two videos closer than
    ``atol`` may swap. This accepts exactly that: the scores match the true k best values, every
    returned video is distinct and really has (within ``atol``) the score reported for it.
    """
    k = scores.shape[1]
    expected = torch.sort(full_scores.double(), dim=1, descending=True).values[:, :k]
    assert_close(scores, expected, atol, f"{name} scores")
    if videos.dtype != torch.int64 or int(videos.min()) < 0 or int(videos.max()) >= full_scores.shape[1]:
        raise AssertionError(f"{name}: video indices must be int64 in [0, {full_scores.shape[1]}), "
                             f"got {videos.dtype} in [{int(videos.min())}, {int(videos.max())}]")
    if (torch.sort(videos, dim=1).values.diff(dim=1) == 0).any():
        raise AssertionError(f"{name}: a query lists the same video twice")
    assert_close(full_scores.double().gather(1, videos), scores.double(), atol, f"{name} score of each returned video")


def compare_low_precision(actual: torch.Tensor, ref_low: torch.Tensor, ref_fp32: torch.Tensor,
                          name: str = "output", atol: float | None = None) -> None:
    """The contract's rule for fp16/bf16: error against the fp32 reference within 2x the
    reference's own error in that dtype, plus a small atol."""
    own = max_abs_err(ref_low, ref_fp32)
    floor = TOLERANCE.get(actual.dtype, 1e-4) if atol is None else atol
    assert_close(actual.float(), ref_fp32.float(), 2 * own + floor, name)


def check_fast_path(actual: torch.Tensor, ref_fp32: torch.Tensor, ref_low: torch.Tensor | None = None, *,
                    dtype: torch.dtype = torch.float32, tf32: bool = False, name: str = "output") -> None:
    """A fast path's output or gradient against the reference, by the contract's rule.

    ``dtype`` is the precision of the inputs: fp32 -> max abs error <= 1e-4 (1e-3 when the GPU
    used TF32) against ``ref_fp32``; fp16/bf16 -> :func:`compare_low_precision` with ``ref_low``
    (the reference run on the same low-precision inputs). The tolerance is scaled by
    ``max(1, max|ref_fp32|)``: gradients such as d sigma or a bias-table sum are not unit scale.
    """
    finite = ref_fp32.detach()[torch.isfinite(ref_fp32.detach())]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if dtype == torch.float32:
        atol = (TF32_TOLERANCE if tf32 else TOLERANCE[torch.float32]) * scale
        assert_close(actual.detach().float(), ref_fp32.detach().float(), atol, name)
    else:
        if ref_low is None:
            raise ValueError(f"{name}: a {dtype} comparison needs the reference run in {dtype} (ref_low)")
        compare_low_precision(actual.detach(), ref_low.detach(), ref_fp32.detach(), name, atol=TOLERANCE[dtype] * scale)


def with_argmax_ties(queries: torch.Tensor, clips: torch.Tensor, lengths: torch.Tensor | None = None,
                     strides=(1, 16, 33, 64), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``queries [Nq, D]`` and ``clips [Nv, L, D]`` with exact ties placed where kernels
    meet them: in every video a random clip ``src`` is repeated at ``src + s`` for each stride
    (1 / 33: another lane of a 16- or 32-wide tile; 16: the same lane, a later column; 64: a later
    tile), every query points along one
    repeated clip (so the tie is its maximum), and, with Nv >= 4, the last video repeats video 1
    with the same length (a top-k tie). The lowest index must win every tie. The repeated clips and
    video 1 are :func:`one_hot_valued`, so every one of these ties is exact in every implementation
    and summation order, against the (random) queries too."""
    queries, clips = queries.detach().clone(), clips.detach().clone()
    nv, L, _ = clips.shape
    g = make_generator(seed)
    if nv >= 4:
        clips[1] = one_hot_valued(clips[1])
    sources = []
    for v in range(nv):
        n = L if lengths is None else int(lengths[v])
        src = int(torch.randint(0, n, (1,), generator=g))
        clips[v, src] = one_hot_valued(clips[v, src])
        for s in strides:
            if src + s < n:
                clips[v, src + s] = clips[v, src]
        sources.append(src)
    if nv >= 4 and (lengths is None or int(lengths[1]) == int(lengths[nv - 1])):
        clips[nv - 1] = clips[1]
    for n in range(queries.shape[0]):
        v = n % nv
        noise = (0.05 * torch.randn(queries.shape[1], generator=g)).to(device=queries.device, dtype=queries.dtype)
        queries[n] = clips[v, sources[v]] + noise
    return queries, clips


def assert_argmax_valid(index: torch.Tensor, ref_index: torch.Tensor, sims_at, clips: torch.Tensor,
                        atol: float, name: str = "index") -> None:
    """``index`` equals the reference's lowest argmax, except at genuine near-ties: where the two
    clips differ (so no tie rule applies) and ``sims_at(n, v, l)`` (the reference similarity) of
    both is within ``atol``. A tie between identical clips must go to the lower index."""
    if index.shape != ref_index.shape or index.dtype != ref_index.dtype:
        raise AssertionError(f"{name}: {tuple(index.shape)} {index.dtype} != {tuple(ref_index.shape)} {ref_index.dtype}")
    for n, v in (index != ref_index).nonzero().tolist():
        got, want = int(index[n, v]), int(ref_index[n, v])
        if got < 0 or got >= clips.shape[1]:
            raise AssertionError(f"{name}[{n}, {v}] = {got} is not a clip index")
        if torch.equal(clips[v, got], clips[v, want]):
            raise AssertionError(f"{name}[{n}, {v}] = {got}: identical clips {want} and {got} tie; the lower must win")
        gap = abs(float(sims_at(n, v, got)) - float(sims_at(n, v, want)))
        if gap > atol:
            raise AssertionError(f"{name}[{n}, {v}] = {got}, reference {want}: similarities differ by {gap:.3g} > {atol:.3g}")


def assert_topk_valid(scores: torch.Tensor, videos: torch.Tensor, ref_scores: torch.Tensor, ref_videos: torch.Tensor,
                      full_scores: torch.Tensor, same_video, atol: float) -> None:
    """A top-k result against the reference: scores close; every returned video's reference score
    matches its returned score; the returned set is a top-k of ``full_scores [Nq, Nv]`` up to
    ``atol``; order descending with exact ties (and identical videos, ``same_video(a, b)``) broken
    towards the lower video index; indices equal to the reference wherever scores are not near-tied."""
    assert_close(scores, ref_scores, atol, "scores")
    assert_topk_equivalent(scores, videos, full_scores, atol)
    nq, k = videos.shape
    for n in range(nq):
        row_v = videos[n].tolist()
        for t in range(k - 1):
            a, b = float(scores[n, t]), float(scores[n, t + 1])
            if a < b or (a == b and row_v[t] > row_v[t + 1]):
                raise AssertionError(f"row {n}: positions {t}, {t + 1} out of order: ({a}, {row_v[t]}) then ({b}, {row_v[t + 1]})")
        for t in range(k):
            got, want = row_v[t], int(ref_videos[n, t])
            if got == want:
                continue
            if same_video(got, want):
                raise AssertionError(f"videos[{n}, {t}] = {got}, reference {want}: identical videos tie; the lower must come first")
            if abs(float(full_scores[n, got]) - float(full_scores[n, want])) > atol:
                raise AssertionError(f"videos[{n}, {t}] = {got}, reference {want}: not a near-tie")


def similarity_at(queries: torch.Tensor, clips: torch.Tensor, normalize: bool = True):
    """``sims_at(n, v, l)``: the similarity of query n and clip l of video v in fp64 (normalised
    with the reference's eps when ``normalize``), for :func:`assert_argmax_valid`."""
    q, c = queries.detach().double(), clips.detach().double()
    if normalize:
        q, c = torch.nn.functional.normalize(q, dim=-1, eps=1e-12), torch.nn.functional.normalize(c, dim=-1, eps=1e-12)
    return lambda n, v, l: float(q[n] @ c[v, l])


def max_similarity_grads_at(queries: torch.Tensor, clips: torch.Tensor, index: torch.Tensor, grad: torch.Tensor,
                            normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d queries, d clips)`` of ``max_similarity`` in fp64 for a given argmax ``index [Nq, Nv]``:
    ``d score[n, v]`` reaches only ``q_n`` and ``c_{v, index[n, v]}`` (through the normalisation).
    The contract's gradient at a fast path's own argmax, so a check does not depend on which way a
    near-tie went (at the reference's argmax it is the reference's backward)."""
    q = queries.detach().double().requires_grad_(True)
    c = clips.detach().double().requires_grad_(True)
    qn = torch.nn.functional.normalize(q, dim=-1, eps=1e-12) if normalize else q
    cn = torch.nn.functional.normalize(c, dim=-1, eps=1e-12) if normalize else c
    chosen = cn[torch.arange(c.shape[0], device=c.device)[None, :], index]  # [Nq, Nv, D]
    return torch.autograd.grad(torch.einsum("nd,nvd->nv", qn, chosen), [q, c], grad.double())
