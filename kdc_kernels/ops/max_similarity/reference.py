r"""Plain PyTorch oracle for ``max_similarity`` and ``max_similarity_topk``.

::

    q^ = q / max(|q|, 1e-12),  c^ = c / max(|c|, 1e-12)          (if normalize)
    score[n, v] = max over l < lengths[v] of <q^_n, c^_{v,l}>     float32 [Nq, Nv]
    index[n, v] = the lowest l attaining it                       int64   [Nq, Nv]
    topk:  per query, the k best videos by score, descending, ties -> lower video index,
           NaN scores last (below -inf), in video order among themselves

Ties are equal *computed* scores. Equal vectors at different positions need not compute equal
scores: a BLAS may sum the same dot product in another order at another position of a block, in
another block shape or with another thread count (x86 CPUs do, by the last bits), and every fast
path has its own order. So two copies of a random clip are not a tie in general, and a result
depends on the rounding of the implementation that computed it. Ties are ties in every
implementation when every dot product is exact in fp32, e.g. small-integer vectors (norms a power
of two for ``normalize=True``; ``kdc_kernels.testing.sign_valued``) or one-hot clips
(``testing.one_hot_valued``); that is how the tests check the tie rules.

Memory stays bounded: the ``[Nq, Nv, L]`` similarity tensor is only ever built in blocks of about
``KDC_REF_BLOCK_ELEMS`` (default ``_CHUNK_ELEMS``) fp32 values (queries x videos x clips), so a
20k x 5k x 128 x 384 problem fits a 24 GB CPU machine. The gradient of ``score[n, v]`` flows only
to ``q_n`` and ``c_{v, index[n, v]}`` (through the normalisation when it is on): autograd runs
through a gather of the argmax clip, so ties send the gradient to the lowest index, by the same
rule as the fast paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _config

# fp32 elements of one [queries, videos, L] similarity block.
_CHUNK_ELEMS = 1 << 24
_NORM_EPS = 1e-12


def _prepare(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    # fp32 math for fp32/fp16/bf16; fp64 (accepted by the reference only, for gradcheck) stays fp64.
    x = x.double() if x.dtype == torch.float64 else x.float()
    return F.normalize(x, dim=-1, eps=_NORM_EPS) if normalize else x


def _block_elems() -> int:
    """fp32 values per similarity block: ``KDC_REF_BLOCK_ELEMS``, else ``_CHUNK_ELEMS``."""
    return _config.reference_block_elems(_CHUNK_ELEMS)


def _chunk_sizes(nq: int, nv: int, L: int) -> tuple[int, int]:
    """Query and video chunk sizes whose [cq, cv, L] block holds about _block_elems() values."""
    elems = _block_elems()
    cv = max(1, min(nv, elems // (L * max(1, min(nq, 256)))))
    cq = max(1, min(nq, elems // (L * cv)))
    return cq, cv


def _dots(qn: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``qn [cq, D] @ rows [n, D].T``. With ``KDC_REF_REORDER=1`` (a test hook) every other element
    (by row + column parity) is summed as two partial sums split at a feature that depends on the
    block's shape: equal vectors at neighbouring positions or in differently shaped blocks then
    round differently on every machine, as some BLAS builds do on their own. Exact-arithmetic
    data gives the same values either way."""
    sim = qn @ rows.T
    d = qn.shape[1]
    if d < 2 or not _config.reference_reorder():
        return sim
    split = 1 + (3 * qn.shape[0] + 5 * rows.shape[0]) % (d - 1)
    other = qn[:, split:] @ rows[:, split:].T + qn[:, :split] @ rows[:, :split].T
    parity = (torch.arange(qn.shape[0], device=qn.device)[:, None]
              + torch.arange(rows.shape[0], device=qn.device)[None, :]) % 2 == 1
    return torch.where(parity, other, sim)


def _block_max(qn: torch.Tensor, cn: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and lowest argmax over clips for one block: qn [cq, D], cn [cv, L, D], valid [cv, L]."""
    cv, L, D = cn.shape
    sim = _dots(qn, cn.reshape(cv * L, D)).view(qn.shape[0], cv, L)
    if valid is not None:
        sim.masked_fill_(~valid[None], float("-inf"))
    # torch.max returns the first maximal index on ties (documented); the tests check it.
    best, index = sim.max(dim=-1)
    return best, index


def _max_and_index(qn: torch.Tensor, cn: torch.Tensor, lengths: torch.Tensor | None):
    nq, (nv, L, _) = qn.shape[0], cn.shape
    valid = None if lengths is None else torch.arange(L, device=cn.device)[None] < lengths[:, None]
    score = torch.empty(nq, nv, dtype=qn.dtype, device=qn.device)
    index = torch.empty(nq, nv, dtype=torch.int64, device=qn.device)
    cq, cv = _chunk_sizes(nq, nv, L)
    for v0 in range(0, nv, cv):
        v1 = min(nv, v0 + cv)
        block_valid = None if valid is None else valid[v0:v1]
        for q0 in range(0, nq, cq):
            q1 = min(nq, q0 + cq)
            score[q0:q1, v0:v1], index[q0:q1, v0:v1] = _block_max(qn[q0:q1], cn[v0:v1], block_valid)
    return score, index


def max_similarity_ref(
    queries: torch.Tensor,
    clips: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    normalize: bool = True,
    return_index: bool = False,
):
    """Reference clip-level max-similarity on already-validated inputs.

    Args:
        queries: ``[Nq, D]``.
        clips: ``[Nv, L, D]``.
        lengths: ``[Nv]`` integers in ``[0, L]`` or None (a video of length 0 scores -inf, index 0).
        normalize: L2-normalise queries and clips first.
        return_index: also return the argmax clip index.

    Returns:
        ``score`` float32 ``[Nq, Nv]``, or ``(score, index)`` with index int64 ``[Nq, Nv]``.

    Example:
        >>> s = max_similarity_ref(torch.randn(5, 8), torch.randn(3, 4, 8), torch.tensor([4, 1, 2]))
        >>> s.shape
        torch.Size([5, 3])
    """
    with torch.no_grad():
        score, index = _max_and_index(_prepare(queries, normalize), _prepare(clips, normalize), lengths)
    if torch.is_grad_enabled() and (queries.requires_grad or clips.requires_grad):
        # Re-score the winning clip with autograd: the gradient reaches only q_n and c_{v, l*}.
        # Padded clips may hold anything (NaN too): they are replaced first (torch.where, so
        # their gradient is exactly 0), and a video of length 0 keeps its -inf score and sends
        # no gradient to the padded clip 0 its index points at.
        if lengths is not None:
            valid = torch.arange(clips.shape[1], device=clips.device)[None] < lengths[:, None]
            clips = torch.where(valid[..., None], clips, 0.0)
        qn, cn = _prepare(queries, normalize), _prepare(clips, normalize)
        nv = cn.shape[0]
        video = torch.arange(nv, device=cn.device)
        rows = []
        cq = max(1, _block_elems() // max(1, nv * cn.shape[-1]))
        for q0 in range(0, max(1, qn.shape[0]), cq):  # at least one (maybe empty) block
            q1 = min(qn.shape[0], q0 + cq)
            chosen = cn[video[None, :], index[q0:q1]]  # [cq, Nv, D]
            rows.append(torch.einsum("nd,nvd->nv", qn[q0:q1], chosen))
        rescored = torch.cat(rows, dim=0)
        score = rescored if lengths is None else torch.where(lengths[None, :] > 0, rescored, score)
    return (score, index) if return_index else score


def max_similarity_topk_ref(
    queries: torch.Tensor,
    clips: torch.Tensor,
    lengths: torch.Tensor | None = None,
    k: int = 100,
    *,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference corpus-scale top-k on already-validated inputs (no autograd).

    Streams over the videos in blocks and keeps a running ``[Nq, k]`` best list, so peak extra
    memory is ``O(Nq * k)`` plus one block.

    Returns:
        ``(scores float32 [Nq, k], video indices int64 [Nq, k])``, descending score, ties (equal
        computed scores) to the lower video index, NaN scores last (below ``-inf``), in video order.

    Example:
        >>> s, i = max_similarity_topk_ref(torch.randn(5, 8), torch.randn(30, 4, 8), k=3)
        >>> s.shape, i.shape
        (torch.Size([5, 3]), torch.Size([5, 3]))
    """
    with torch.no_grad():
        qn, cn = _prepare(queries, normalize), _prepare(clips, normalize)
        nq, (nv, L, _) = qn.shape[0], cn.shape
        valid = None if lengths is None else torch.arange(L, device=cn.device)[None] < lengths[:, None]
        best_s = torch.empty(nq, 0, dtype=qn.dtype, device=qn.device)
        best_i = torch.empty(nq, 0, dtype=torch.int64, device=qn.device)
        cq, cv = _chunk_sizes(nq, nv, L)
        for v0 in range(0, nv, cv):
            v1 = min(nv, v0 + cv)
            block_valid = None if valid is None else valid[v0:v1]
            block = torch.cat([_block_max(qn[q0 : q0 + cq], cn[v0:v1], block_valid)[0]
                               for q0 in range(0, max(1, nq), cq)])
            ids = torch.arange(v0, v1, device=qn.device).expand(nq, -1)
            best_s, best_i = merge_topk(best_s, best_i, block, ids, k)
    return best_s, best_i


def merge_topk(best_s: torch.Tensor, best_i: torch.Tensor, new_s: torch.Tensor, new_i: torch.Tensor, k: int):
    """Merge a running top-k ``(best_s, best_i) [Nq, <=k]`` with candidates ``(new_s, new_i) [Nq, n]``
    whose video indices all exceed the kept ones: the k best, descending, ties (equal scores) to
    the lower index, NaN scores last (below ``-inf``), in index order among themselves.

    Kept entries come first and hold the lower indices, so a stable ascending sort of
    ``-[kept, new]`` breaks every tie towards the lower video index; torch sorts NaN after every
    number in ascending order (a descending sort would put NaN first). Exact for the scores as
    given. Used to stream a corpus in blocks (and by ``kdcnet`` for fused scores and for merging
    per-rank lists in order).
    """
    cand_s, cand_i = torch.cat([best_s, new_s], dim=1), torch.cat([best_i, new_i], dim=1)
    order = torch.sort(cand_s.neg(), dim=1, stable=True).indices[:, :k]
    return cand_s.gather(1, order), cand_i.gather(1, order)
