r"""Evaluation: encode every video and query of a split once per branch, rank all videos for every
query by the fused score, report R@1/5/10/100, SumR, the per-M/V-bin table and per-branch recalls.

Fused top-k, exact for the scores as computed. The fused score ``S = w * max_i cos(q_inh, F_inh[v, i]) + (1 - w) * max_j
cos(q_exp, F_exp[v, j])`` is a weighted sum of two separate maxima, which one max-similarity call
cannot express (concatenating the branch embeddings would take a single joint max over frames).
So :func:`fused_topk` walks the corpus in chunks of ``eval.video_chunk`` videos: per chunk it calls
``kdc_kernels.max_similarity`` once per branch (``[Nq, chunk]`` each, all queries at once), fuses
them and merges them into a running ``[Nq, k]`` best list with a stable sort of ``[kept, new]``
(``kdc_kernels``' ``merge_topk``: kept entries have lower video indices, so ties go to the lower
index, and NaN scores go last, the order of ``max_similarity_topk`` and
:func:`kdcnet.metrics.retrieval_metrics`). Memory is ``O(Nq * (k + chunk))`` and there is no loop
over queries. The merge is exact for the fused scores as computed; each chunk's scores come from
their own ``max_similarity`` calls, and a BLAS (or kernel) may round a dot product differently in
another block shape, so the ranking equals a sort of one full score matrix bit for bit when the
scores are exact in fp32, and otherwise up to that rounding (videos whose scores differ by ~1e-7
may swap). With ``fusion_weight`` 0 or 1 the fused score is one branch's score and
``kdc_kernels.max_similarity_topk`` ranks it directly; it also gives the per-branch recalls
reported beside the fused ones.

Several processes (torchrun): :func:`evaluate` gives each rank a contiguous run of the batches one
process would encode (the same batches, so the embeddings one process computes with the same
thread count), gathers the query embeddings, ranks each rank's videos with the methods above and
merges the per-rank top-k lists (:func:`sharded_topk`), ties to the lower global video index. The
merge loses nothing; the per-rank scoring runs in other blocks than one process's, so the result
equals the single-process one under the condition above (exact scores), and otherwise up to the
rounding of near-tied scores.

Non-finite embeddings (a diverged model, NaN/inf features) give NaN scores. NaN ranks last in
every path, and :func:`evaluate` logs one warning per call naming the split and the number of
queries with a NaN score (also stored as ``nan_queries`` in the result).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from kdc_kernels import max_similarity, max_similarity_topk
from kdc_kernels import merge_topk

from . import distributed as D
from . import metrics as M
from .config import Config
from .model import BRANCHES, KDCNet, length_mask
from .rundir import atomic_write, json_ready

log = logging.getLogger("kdcnet")


# ------------------------------------------------------------------------------------------ data


def data_location(cfg: Config) -> tuple[Path, str]:
    """``(root, collection)`` of ``cfg``; the built-in synthetic collection (generated on first
    use) when ``data.root`` is unset."""
    if cfg.data.root is None:
        if cfg.preset != "synthetic":
            raise ValueError(f"preset {cfg.preset!r} needs --data-root ROOT (the folder holding "
                             f"{cfg.collection}/TextData and {cfg.collection}/FeatureData)")
        from .synthetic import ensure_default_synthetic

        root, collection = ensure_default_synthetic()
        return Path(root), cfg.data.collection or collection
    return Path(cfg.data.root), cfg.collection


def open_split(cfg: Config, split: str, teacher: bool = False, prepare: bool = True):
    """The :class:`kdcnet.data.PRVRCollection` of one split as ``cfg`` describes it, with its
    prepared cache attached (built on first use) unless ``data.prepared`` is false or ``prepare``
    is (then :func:`attach_prepared` attaches it later)."""
    from .data import PRESET_VISUAL_FEATURE, PRVRCollection

    root, collection = data_location(cfg)
    visual = cfg.data.visual_feature or (PRESET_VISUAL_FEATURE.get(cfg.preset) if cfg.data.root else None)
    if visual is not None and not (root / collection / "FeatureData" / visual).is_dir() and not cfg.data.visual_feature:
        visual = None  # the preset's folder is absent: fall back to the only BigFile folder
    data = PRVRCollection(root, collection, split, visual_feature=visual, max_frames=cfg.data.max_frames,
                          max_tokens=cfg.data.max_tokens, teacher=teacher)
    return attach_prepared(cfg, data, split) if prepare else data


def attach_prepared(cfg: Config, data, split: str):
    """Attach the prepared cache of ``data`` (building it on first use) unless ``data.prepared`` is
    false; a cache that cannot be written falls back to the source files with a warning."""
    from .prepared import resolve_dtype

    if cfg.data.prepared:
        try:
            data.prepare(cfg.data.cache_dir, resolve_dtype(cfg.data.cache_dtype, cfg.train.device, cfg.train.bf16))
        except OSError as err:  # no room or no permission: slower, not wrong
            log.warning("%s; reading the %s split from its source files instead", err, split)
        except BaseException:
            data.close()
            raise
    return data


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when ``train.bf16``; a no-op context on the CPU."""
    if device.type == "cuda" and cfg.train.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_collection(model: KDCNet, collection, cfg: Config, device: torch.device, *, return_widths=False,
                      video_range: range | None = None, query_range: range | None = None):
    """Encode every video and every query of ``collection`` (or the rows in ``video_range`` /
    ``query_range``) once per branch.

    Returns ``(frames {branch: [Nv, L, d]}, lengths [Nv], queries {branch: [Nq, d]}, widths)``,
    where ``widths`` is ``{branch: 1-D tensor of every valid DTA sigma (frames)}`` (None for a
    branch without window) when ``return_widths``, else None. Rows follow ``collection.video_ids``
    and ``collection.cap_ids`` (from the start of each range); an empty range gives no entries
    in ``frames`` / ``queries``.
    """
    from .data import query_batches, video_batches

    model.eval()
    videos = range(len(collection.video_ids)) if video_range is None else video_range
    rows = range(len(collection.cap_ids)) if query_range is None else query_range
    lengths = torch.zeros(len(videos), dtype=torch.int64, device=device)
    frames: dict = {}
    queries: dict = {}
    widths = {name: [] for name in BRANCHES} if return_widths else None
    with autocast(cfg, device):
        for batch in video_batches(collection, cfg.eval.batch_size, video_subset=videos):
            batch = batch.to(device)
            out = model.encode_videos(batch, return_widths=return_widths)
            emb, sig = out if return_widths else (out, None)
            idx, L = batch.video_index.to(device) - videos.start, batch.videos.shape[1]
            lengths[idx] = batch.video_lengths
            for name in BRANCHES:
                if name not in frames:
                    frames[name] = torch.zeros(len(videos), cfg.data.max_frames, emb[name].shape[-1],
                                               dtype=emb[name].dtype, device=device)
                frames[name][idx, :L] = emb[name]
                if return_widths and sig[name] is not None:
                    valid = length_mask(batch.video_lengths, L)[:, None, :].expand_as(sig[name])
                    widths[name].append(sig[name][valid].float().cpu())
        for batch in query_batches(collection, 4 * cfg.eval.batch_size, query_subset=rows):
            batch = batch.to(device)
            emb = model.encode_queries(batch)
            idx = batch.query_index.to(device) - rows.start
            for name in BRANCHES:
                if name not in queries:
                    queries[name] = torch.zeros(len(rows), emb[name].shape[-1], dtype=emb[name].dtype, device=device)
                queries[name][idx] = emb[name]
    max_len = int(lengths.max()) if len(videos) else 0
    frames = {name: f[:, :max_len] for name, f in frames.items()}
    if return_widths:
        windowed = {name: branch.video.attn.window != "none" for name, branch in model.branches.items()}
        widths = {name: (torch.cat(w) if w else torch.empty(0)) if windowed[name] else None
                  for name, w in widths.items()}
    return frames, lengths, queries, widths


# --------------------------------------------------------------------------------------- ranking


@torch.no_grad()
def fused_topk(queries: dict, frames: dict, lengths: torch.Tensor, weight: float, k: int, *,
               video_chunk: int = 1024, impl=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``S = w * s_inh + (1 - w) * s_exp`` over all videos, exact for the scores as
    computed chunk by chunk (see the module doc).

    Returns ``(scores float32 [Nq, k], video indices int64 [Nq, k])``, descending, ties to the
    lower video index, NaN scores last.
    """
    inh, exp = queries["inheritance"], queries["exploration"]
    nv = frames["inheritance"].shape[0]
    if weight in (0.0, 1.0):
        name = "inheritance" if weight == 1.0 else "exploration"
        return max_similarity_topk(queries[name], frames[name], lengths, k, impl=impl)
    best_s = torch.empty(inh.shape[0], 0, dtype=torch.float32, device=inh.device)
    best_i = torch.empty(inh.shape[0], 0, dtype=torch.int64, device=inh.device)
    for v0 in range(0, nv, video_chunk):
        v1 = min(nv, v0 + video_chunk)
        a = max_similarity(inh, frames["inheritance"][v0:v1], lengths[v0:v1], impl=impl)
        b = max_similarity(exp, frames["exploration"][v0:v1], lengths[v0:v1], impl=impl)
        ids = torch.arange(v0, v1, device=inh.device).expand(inh.shape[0], -1)
        best_s, best_i = merge_topk(best_s, best_i, weight * a + (1.0 - weight) * b, ids, k)
    return best_s, best_i


def nonfinite_queries(queries: dict, frames: dict, lengths: torch.Tensor, branches) -> int:
    """How many queries get a NaN score in the ``branches`` ranked: those whose embedding is not
    finite, or all of them when some video has a non-finite valid frame embedding (normalising
    a vector that holds NaN or inf gives NaN, and the max over frames keeps it). ``frames`` holds
    this rank's videos and ``queries`` every query; under torch.distributed every rank must call
    it (one small all-gather) and gets the same count."""
    nq = next(iter(queries.values())).shape[0]
    bad = torch.zeros(nq, dtype=torch.bool, device=lengths.device)
    bad_videos = 0
    for name in branches:
        bad |= ~torch.isfinite(queries[name]).all(dim=1)
        f = frames.get(name)
        if f is not None and f.numel():
            valid = torch.arange(f.shape[1], device=f.device)[None, :] < lengths[:, None]
            bad_videos += int((~torch.isfinite(f).all(dim=2) & valid).any())
    if D.current().size > 1:
        bad_videos = sum(n for (n,) in D.all_gather_sizes(bad_videos))
    return nq if bad_videos else int(bad.sum())


def moment_ratios(collection) -> list[float] | None:
    """M/V ratio of every caption (NaN when it has no moment), or None without a moments file."""
    if not collection.moments:
        return None
    return [m.ratio if m is not None else math.nan for m in map(collection.moments.get, collection.cap_ids)]


def sharded_topk(topk, num_queries: int, num_videos: int, k: int, batch_size: int, device: torch.device):
    """The top-k ``(scores, video indices) [Nq, k]`` over all ``num_videos`` videos, ties to the
    lower index, NaN last, exact for the per-rank scores, from ``topk(k') -> (scores, indices)``
    that ranks this rank's videos, the
    :func:`kdcnet.distributed.batch_shard` of ``batch_size`` (indices within the shard). On one
    process that shard is every video and this is ``topk(k)``."""
    world = D.current()
    shard = D.batch_shard(num_videos, batch_size, world.rank, world.size)
    kk = min(k, len(shard))
    if kk:
        scores, top = topk(kk)
        top = top + shard.start
    else:
        scores = torch.empty(num_queries, 0, device=device)
        top = torch.empty(num_queries, 0, dtype=torch.int64, device=device)
    return D.merge_topk_across_ranks(scores, top, k, D.shard_counts(num_videos, batch_size, k))


def evaluate(model: KDCNet, collection, cfg: Config, device: torch.device, *, branches: bool = True,
             return_widths: bool = False):
    """Rank every video of ``collection`` for every query; return the metrics dict:
    ``R@1, R@5, R@10, R@100, SumR, num_queries, num_videos, chance_SumR, nan_queries`` (queries
    with a NaN score: they rank those videos last, and a warning names the split), ``mv_bins``
    (None without a moments file) and, with ``branches``, ``branches`` (each branch's recalls on
    its own). With ``return_widths`` also the DTA window widths: ``(metrics, widths)``.

    Under ``torch.distributed`` (a process group exists, e.g. under torchrun) every rank must call
    it: each encodes its share of the videos and queries (:func:`kdcnet.distributed.batch_shard`:
    runs of the batches one process would encode, so the same embeddings), the queries are
    gathered, each rank ranks its videos, and the top-k lists are merged
    (:func:`kdcnet.distributed.merge_topk_across_ranks`); every rank returns the same result: the
    single-process one when the scores are exact, else up to the rounding of near-tied scores
    (module doc). Memory per rank: its videos' frames, all query embeddings and ``O(Nq * k)``."""
    nv, nq = len(collection.video_ids), len(collection.cap_ids)
    if nv == 0 or nq == 0:
        raise ValueError(f"split {collection.split!r} of {collection.collection!r} has {nv} videos and {nq} "
                         f"captions: nothing to evaluate")
    world = D.current()
    video_range = D.batch_shard(nv, cfg.eval.batch_size, world.rank, world.size)
    query_range = D.batch_shard(nq, 4 * cfg.eval.batch_size, world.rank, world.size)
    frames, lengths, queries, widths = encode_collection(model, collection, cfg, device, return_widths=return_widths,
                                                         video_range=video_range, query_range=query_range)
    if world.size > 1:
        queries = {name: D.all_gather_rows(queries.get(name)) for name in BRANCHES}
        if return_widths:
            widths = {name: None if w is None else D.all_gather_rows(w) for name, w in widths.items()}
    k = min(cfg.eval.k, nv)  # eval.k >= 100, so every recall below is exact
    targets = torch.as_tensor(collection.cap_video, dtype=torch.int64, device=device)
    impl = cfg.model.impl
    used = {name for name, w in (("inheritance", cfg.model.fusion_weight), ("exploration", 1 - cfg.model.fusion_weight))
            if w != 0} | (set(BRANCHES) if branches else set())
    nan_queries = nonfinite_queries(queries, frames, lengths, used)
    if nan_queries and world.is_main:
        log.warning(f"split {collection.split!r}: {nan_queries} of {nq} queries have NaN scores (non-finite query "
                    f"or video embeddings, e.g. a diverged model or NaN/inf features); NaN scores rank last")

    def ranks(topk):
        top = sharded_topk(topk, nq, nv, k, cfg.eval.batch_size, device)[1]
        return M.ranks_from_topk(top, targets, nv)

    fused = ranks(lambda kk: fused_topk(queries, frames, lengths, cfg.model.fusion_weight, kk,
                                        video_chunk=cfg.eval.video_chunk, impl=impl))
    result = {**M.recalls_from_ranks(fused), "num_queries": nq, "num_videos": nv,
              "chance_SumR": M.chance_metrics(nv)["SumR"], "nan_queries": nan_queries}
    ratios = moment_ratios(collection)
    result["mv_bins"] = M.mv_bin_table(fused.cpu(), ratios) if ratios is not None else None
    if branches:
        result["branches"] = {}
        for name in BRANCHES:
            per_branch = ranks(lambda kk: max_similarity_topk(queries[name], frames[name], lengths, kk, impl=impl))
            result["branches"][name] = M.recalls_from_ranks(per_branch)
    if return_widths:
        return result, widths
    return result


# -------------------------------------------------------------------------------------- reporting


def results_table(result: dict, label: str = "KDC-Net") -> str:
    """The fused recalls with chance level (and each branch) beside them, as a text table."""
    chance = M.chance_metrics(result["num_videos"])
    rows = [{"": label, **{key: result[key] for key in (*M.RECALL_KEYS, "SumR")}}]
    for name, rec in (result.get("branches") or {}).items():
        rows.append({"": f"  {name} branch only", **rec})
    rows.append({"": "chance (random ranking)", **chance})
    return M.format_table(rows, ["", *M.RECALL_KEYS, "SumR"])


def bins_table(result: dict) -> str | None:
    if not result.get("mv_bins"):
        return None
    return M.format_table(result["mv_bins"], ["bin", "num_queries", *M.RECALL_KEYS, "SumR"])


def report(result: dict, split: str, out=print) -> None:
    out(f"{split}: {result['num_queries']} queries, {result['num_videos']} videos")
    out(results_table(result))
    table = bins_table(result)
    if table:
        out("by moment-to-video ratio (M/V):")
        out(table)


def save_metrics(result: dict, run_dir: str | os.PathLike, split: str) -> Path:
    """``<run_dir>/<split>_metrics.json`` (strict JSON, NaN as null), written atomically."""
    return atomic_write(Path(run_dir) / f"{split}_metrics.json", json.dumps(json_ready(result), indent=2) + "\n")
