"""Public ``max_similarity`` and ``max_similarity_topk``: validation, impl choice, dispatch, and the
ops' entries in the op table (``MAX_SIMILARITY``, ``MAX_SIMILARITY_TOPK``, listed in
``kdc_kernels.ops.OPS``)."""

from __future__ import annotations

import numbers

import torch

from ... import _backend, _checks
from .reference import max_similarity_ref, max_similarity_topk_ref
from .reference import merge_topk as _merge_topk


def _validate(queries, clips, lengths, mask=None) -> dict:
    _checks.tensor("queries", queries, "[Nq, D]", _checks.OP_DTYPES, ("Nq",))
    _checks.tensor("clips", clips, "[Nv, L, D]", _checks.OP_DTYPES, ("Nv",))
    _checks.same_device("clips", clips, "queries", queries)
    _checks.same_dtype("clips", clips, "queries", queries)
    if clips.shape[2] != queries.shape[1]:
        raise ValueError(
            f"clips must have the embedding size D of queries ({queries.shape[1]}) in [Nv, L, D], "
            f"got clips of shape {tuple(clips.shape)}"
        )
    lengths = _checks.lengths_or_mask(lengths, mask, clips.shape[0], clips.shape[1], queries, "Nv")
    return dict(queries=queries, clips=clips, lengths=lengths)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def max_similarity(
    queries: torch.Tensor,
    clips: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    return_index: bool = False,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
):
    r"""Clip-level max-similarity: the best-matching clip of every video for every query.

    ::

        score[n, v] = max over l < lengths[v] of <q^_n, c^_{v,l}>   (q^, c^ L2-normalised if normalize)
        index[n, v] = the lowest l attaining it

    Args:
        queries: ``[Nq, D]``, fp32 / fp16 / bf16 (fp64: reference only). ``Nq`` may be 0.
        clips: ``[Nv, L, D]``, same dtype and device as queries. ``Nv`` may be 0.
        lengths: ``[Nv]`` integers in ``[0, L]`` (valid clips of each video; a list of ints works
            too), or None (all L). A video of length 0 scores ``-inf`` with index 0 and gets no
            gradient.
        normalize: L2-normalise queries and clips first (``x / max(|x|, 1e-12)``).
        return_index: also return the argmax clip of each (query, video).
        mask: instead of ``lengths``: ``[Nv, L]`` bool or 0/1 (true = valid), a prefix per video,
            as PRVR codebases pass ``video_mask``. Not both.
        impl: ``None`` (= ``KDC_IMPL``, default ``"auto"``), ``"auto"``, ``"reference"``,
            ``"triton"`` or ``"cuda"``.

    Returns:
        ``score`` float32 ``[Nq, Nv]``, or ``(score, index)`` with index int64 ``[Nq, Nv]``.
        The gradient of ``score[n, v]`` flows only to ``queries[n]`` and ``clips[v, index[n, v]]``.
        Padded clips may hold anything (NaN too) and never change a score, an index or a
        gradient; NaN in a valid clip or a query gives undefined scores (not checked).

    Example:
        >>> q, c = torch.randn(10, 64), torch.randn(4, 32, 64)
        >>> score, index = max_similarity(q, c, torch.tensor([32, 5, 1, 17]), return_index=True)
        >>> score.shape, index.dtype
        (torch.Size([10, 4]), torch.int64)
    """
    case = _max_similarity_case(queries, clips, lengths, normalize=normalize, return_index=return_index, mask=mask)
    return _backend.dispatch(MAX_SIMILARITY, impl, case)


def max_similarity_topk(
    queries: torch.Tensor,
    clips: torch.Tensor,
    lengths: torch.Tensor | None = None,
    k: int = 100,
    *,
    normalize: bool = True,
    mask: torch.Tensor | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Corpus-scale retrieval: the k best videos of every query by clip-level max-similarity.

    Same score as :func:`max_similarity`; returns per query the k best videos in descending score,
    ties broken towards the lower video index. No autograd. Peak extra memory is ``O(Nq * k)`` plus
    a bounded working block: the ``[Nq, Nv, L]`` tensor is never built (nor ``[Nq, Nv]`` on the
    fast paths).

    Args:
        queries: ``[Nq, D]``; clips: ``[Nv, L, D]``; lengths: ``[Nv]`` or None (or ``mask``
            ``[Nv, L]``); as in max_similarity. A video of length 0 scores ``-inf``: it ranks
            after every video with a finite score.
        k: number of videos to return, ``1 <= k <= Nv``.
        normalize: L2-normalise queries and clips first.
        impl: as in :func:`max_similarity`.

    Returns:
        ``(scores float32 [Nq, k], video indices int64 [Nq, k])``.

    Example:
        >>> q, c = torch.randn(10, 64), torch.randn(500, 32, 64)
        >>> scores, videos = max_similarity_topk(q, c, k=5)
        >>> videos.shape
        torch.Size([10, 5])
    """
    case = _topk_case(queries, clips, lengths, k, normalize=normalize, mask=mask)
    return _backend.dispatch(MAX_SIMILARITY_TOPK, impl, case)


def merge_topk(best_scores: torch.Tensor, best_indices: torch.Tensor, new_scores: torch.Tensor,
               new_indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a running top-k list with a block of candidates, for streaming a corpus in blocks.

    The rule :func:`max_similarity_topk` ranks by, for scores computed elsewhere (a fused score of
    two branches, the lists of several ranks): the k best, descending, ties (equal scores) to the
    lower index, NaN scores last (below ``-inf``) in index order. Exact for the scores as given.

    Args:
        best_scores, best_indices: the running list ``[Nq, m]`` (``m`` may be 0), float / int64.
        new_scores, new_indices: candidates ``[Nq, n]`` whose indices all exceed the kept ones
            (blocks visited in index order); the same dtypes and device as the running list.
        k: the length kept, ``>= 1`` (the result has ``min(k, m + n)`` columns).

    Returns:
        ``(scores [Nq, min(k, m + n)], indices [Nq, min(k, m + n)])``.

    Example:
        >>> s, i = torch.empty(2, 0), torch.empty(2, 0, dtype=torch.int64)
        >>> for v0 in range(0, 10, 4):
        ...     block = torch.rand(2, min(4, 10 - v0))
        ...     ids = torch.arange(v0, v0 + block.shape[1]).expand(2, -1)
        ...     s, i = merge_topk(s, i, block, ids, k=3)
        >>> i.shape
        torch.Size([2, 3])
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    named = {"best_scores": best_scores, "best_indices": best_indices,
             "new_scores": new_scores, "new_indices": new_indices}
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [Nq, n], got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [Nq, n], got shape {tuple(x.shape)}")
        _checks.same_device(name, x, "best_scores", best_scores)
    for scores_name, index_name in (("best_scores", "best_indices"), ("new_scores", "new_indices")):
        _checks.shape(index_name, named[index_name], named[scores_name].shape, f"{scores_name}.shape")
        if not named[scores_name].dtype.is_floating_point:
            raise TypeError(f"{scores_name} must be a floating tensor, got {named[scores_name].dtype}")
        if named[index_name].dtype != torch.int64:
            raise TypeError(f"{index_name} must have dtype torch.int64, got {named[index_name].dtype}")
    if new_scores.shape[0] != best_scores.shape[0]:
        raise ValueError(f"new_scores must have Nq = {best_scores.shape[0]} rows as best_scores, "
                         f"got shape {tuple(new_scores.shape)}")
    _checks.same_dtype("new_scores", new_scores, "best_scores", best_scores)
    return _merge_topk(best_scores, best_indices, new_scores, new_indices, k)


def _max_similarity_case(queries, clips, lengths=None, *, normalize=True, return_index=False, mask=None) -> dict:
    """The validated case of a :func:`max_similarity` call (its arguments but ``impl``)."""
    case = _validate(queries, clips, lengths, mask)
    case.update(normalize=_bool("normalize", normalize), return_index=_bool("return_index", return_index))
    return case


def _topk_case(queries, clips, lengths=None, k=100, *, normalize=True, mask=None) -> dict:
    """The validated case of a :func:`max_similarity_topk` call (its arguments but ``impl``)."""
    case = _validate(queries, clips, lengths, mask)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    nv = clips.shape[0]
    if not 1 <= int(k) <= nv:
        raise ValueError(f"k must lie in [1, Nv] = [1, {nv}], got {k}")
    case.update(k=int(k), normalize=_bool("normalize", normalize))
    return case


def _is_empty(case: dict) -> bool:
    return case["queries"].shape[0] == 0 or case["clips"].shape[0] == 0


def _probe(**options) -> dict:
    """A small fp32 case on the meta device (nothing is allocated)."""
    return dict(queries=torch.empty(8, 32, device="meta"), clips=torch.empty(4, 16, 32, device="meta"), lengths=None,
                **options)


def _load_triton() -> _backend.FastPath:
    from . import _triton

    return _backend.FastPath(run=_triton.max_similarity_triton, unsupported=_triton.max_similarity_unsupported)


def _load_cuda() -> _backend.FastPath:
    from . import _cuda

    return _backend.FastPath(run=_cuda.max_similarity_cuda, unsupported=_cuda.max_similarity_unsupported)


def _load_topk_triton() -> _backend.FastPath:
    from . import _triton_topk

    return _backend.FastPath(run=_triton_topk.max_similarity_topk_triton,
                             unsupported=_triton_topk.max_similarity_topk_unsupported)


def _load_topk_cuda() -> _backend.FastPath:
    from . import _cuda

    return _backend.FastPath(run=_cuda.max_similarity_topk_cuda, unsupported=_cuda.max_similarity_topk_unsupported)


MAX_SIMILARITY = _backend.OpSpec(
    name="max_similarity",
    function=max_similarity,
    validate=_max_similarity_case,
    reference=max_similarity_ref,
    fast_paths={"triton": _load_triton, "cuda": _load_cuda},
    probe=lambda: _probe(normalize=True, return_index=False),
    device_of="queries",
    is_empty=_is_empty,
    cuda_ops=("cuda_max_similarity_fwd", "cuda_max_similarity_bwd"),
)

MAX_SIMILARITY_TOPK = _backend.OpSpec(
    name="max_similarity_topk",
    function=max_similarity_topk,
    validate=_topk_case,
    reference=max_similarity_topk_ref,
    fast_paths={"triton": _load_topk_triton, "cuda": _load_topk_cuda},
    probe=lambda: _probe(k=2, normalize=True),
    device_of="queries",
    is_empty=_is_empty,
    cuda_ops=("cuda_max_similarity_topk",),
)
