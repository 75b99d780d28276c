"""Synthetic PRVR data in the MS-SL layout: planted events, phrase-spread tokens, a CLIP-like teacher.

The generative story (all from one seed, see :class:`SyntheticConfig` for the knobs):

* **Events.** A vocabulary of ``vocab_size`` concept words with latent vectors ``w_v`` in
  ``R^latent_dim``. An event is a phrase of ``phrase_len`` distinct words; its latent is
  ``z = sum_p R_p w_{v_p} / sqrt(phrase_len)``, with fixed role maps
  ``R_p = sqrt(1 - role_mix^2) I + role_mix O_p`` (``O_p`` random orthogonal): a word means a bit
  more than itself depending on its place in the phrase, so a bag of tokens is not enough.
* **Videos.** ``n`` frames (uniform in ``[min_frames, max_frames]``), ``K`` captions (uniform in
  ``[min_captions, max_captions]``). Each caption has a moment whose moment-to-video ratio is
  drawn from ``Beta(ratio_alpha, ratio_beta)`` (length ``round(ratio * n)``, at least one frame),
  placed where it does not overlap earlier moments when there is room, anywhere otherwise. So a
  video is a sequence of segments each showing one event, with background between them (and, when
  moments cannot fit side by side, segments showing several events at once: the sum of their
  latents over the square root of their number).
  Student frame ``t``: ``A m_t + background * b + frame_noise * e_t`` where ``m_t`` is the
  frame's event latent (0 in background), ``A`` a fixed random map, ``b`` a per-video background
  direction and ``e_t`` an AR(1) noise along time (coefficient ``noise_smoothness``).
* **Captions.** Each caption describes its moment's event: the phrase's tokens are
  ``Q w_{v_p} + token_noise * noise`` (``Q`` another fixed map; the event is spread over
  consecutive tokens) placed among ``[min_filler, max_filler]`` filler tokens (a small shared
  vocabulary carrying no information). The caption text spells the same words.
* **Teacher.** A third map ``T`` into one joint space, as CLIP has: the teacher query is
  ``T z + teacher_noise * noise``, teacher frame ``T m_t + teacher_background * b' +
  teacher_noise * white noise`` on its own grid of ``round(teacher_frame_ratio * n)`` frames.
  It is cleaner than the student's features and zero-shot aligned, so it retrieves the right
  video far above chance by itself, but it sees only a ``teacher_coverage`` share of the latent
  space (on the default collection a trained student retrieves better than it does).
* **Unseen events** (``unseen_fraction > 0``; off by default). The last ``unseen_words`` words of
  the vocabulary never occur in a train or val caption; a fraction ``unseen_fraction`` of the test
  captions describe events made only of them. Their latents are projected onto the subspace the
  teacher sees (and rescaled), so the teacher knows them as CLIP knows concepts a PRVR training
  set never names, while the student meets them first at test time. The ground truth:
  ``TextData/<collection><split>.unseen.txt`` (cap_ids) and ``unseen_words`` in ``SYNTHETIC.json``.
  ``python -m kdcnet.synthetic unseen RUN...`` reports recall on the unseen and seen captions.

Maps produce vectors of about unit norm; noise levels are norms relative to that. Files are
written deterministically (same seed and options: byte-identical files), first into a temporary
folder that is renamed into place when complete, with ``SYNTHETIC.json`` recording the options.

Command line: ``kdcnet make-synthetic --out DIR --collection NAME [--videos N --seed S ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import h5py
import numpy as np

from .data import (caption_path, moments_path, teacher_query_path, teacher_video_path, text_feature_path)

log = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1          # bump when the generator's output changes (new default cache folder)
DEFAULT_COLLECTION = "synthetic"
VISUAL_FEATURE = "synthetic_visual"
MARKER = "SYNTHETIC.json"
DEFAULT_OPTIONS: dict = {}     # options of the default collection (SyntheticConfig's defaults)

_FILLER_WORDS = (
    "a the person someone man woman they he she then and after before is are was were in on at "
    "with from into out of to up down over near by his her their it this that there again still slowly "
    "quickly now also just both other another some while around behind next first last side front back"
).split()
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "so", "vi", "de", "pu", "ha", "ze", "go", "fi", "bo", "ly")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SyntheticConfig:
    """Every option of the generator (the command line exposes each as ``--name-with-dashes``)."""

    videos: int = _opt(900, "total number of videos over the three splits")
    val_fraction: float = _opt(0.167, "fraction of the videos in the val split")
    test_fraction: float = _opt(0.167, "fraction of the videos in the test split")
    min_frames: int = _opt(32, "fewest frames of a video (before bin-averaging)")
    max_frames: int = _opt(64, "most frames of a video (before bin-averaging)")
    min_captions: int = _opt(2, "fewest captions of a video")
    max_captions: int = _opt(5, "most captions of a video")
    visual_dim: int = _opt(256, "Dv, the student's video feature size")
    text_dim: int = _opt(128, "Dq, the student's token feature size")
    teacher_dim: int = _opt(64, "Dt, the teacher's feature size")
    latent_dim: int = _opt(32, "size of the latent event space")
    vocab_size: int = _opt(64, "concept words events are made of")
    phrase_len: int = _opt(3, "tokens (concept words) that spell one event")
    role_mix: float = _opt(0.3, "0..1: how much a word's meaning depends on its place in the phrase")
    min_filler: int = _opt(4, "fewest filler tokens of a caption")
    max_filler: int = _opt(14, "most filler tokens of a caption")
    ratio_alpha: float = _opt(1.3, "moment-to-video ratio ~ Beta(ratio_alpha, ratio_beta)")
    ratio_beta: float = _opt(3.0, "moment-to-video ratio ~ Beta(ratio_alpha, ratio_beta)")
    frame_noise: float = _opt(0.5, "norm of the student's frame noise (signal norm ~1)")
    noise_smoothness: float = _opt(0.8, "0..1: AR(1) coefficient of the frame noise along time")
    background: float = _opt(0.5, "norm of the per-video background in student frames")
    token_noise: float = _opt(0.5, "norm of the noise on each token")
    teacher_noise: float = _opt(0.6, "norm of the (white) noise on teacher frames and queries")
    teacher_coverage: float = _opt(0.35, "0..1: fraction of the latent event space the teacher sees")
    teacher_background: float = _opt(0.3, "norm of the per-video background in teacher frames")
    teacher_frame_ratio: float = _opt(1.0, "teacher frames per student frame (the loader maps them onto the student grid)")
    frame_seconds: float = _opt(1.5, "seconds per frame (for the moments file)")
    unseen_fraction: float = _opt(0.0, "0..1: fraction of the test captions about events made only of unseen words "
                                       "(never in a train or val caption; inside the teacher's view); 0: off")
    unseen_words: int = _opt(16, "vocabulary words reserved for the unseen events (used when unseen_fraction > 0)")

    def validate(self) -> "SyntheticConfig":
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, int):
                need(isinstance(value, int) and not isinstance(value, bool), f.name, "an int")
            else:
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value), f.name, "a finite number")
        for name in ("videos", "min_frames", "min_captions", "visual_dim", "text_dim", "teacher_dim",
                     "latent_dim", "vocab_size", "phrase_len"):
            need(getattr(self, name) >= 1, name, ">= 1")
        need(self.max_frames >= self.min_frames, "max_frames", f">= min_frames ({self.min_frames})")
        need(self.max_captions >= self.min_captions, "max_captions", f">= min_captions ({self.min_captions})")
        need(self.min_filler >= 0, "min_filler", ">= 0")
        need(self.max_filler >= self.min_filler, "max_filler", f">= min_filler ({self.min_filler})")
        need(self.phrase_len <= self.vocab_size, "phrase_len", f"<= vocab_size ({self.vocab_size})")
        for name in ("val_fraction", "test_fraction"):
            need(0 < getattr(self, name) < 1, name, "in (0, 1)")
        n_val, n_test = self.split_sizes()[1:]
        need(self.videos - n_val - n_test >= 1 and n_val >= 1 and n_test >= 1, "videos",
             "large enough for at least one video in each split at these fractions")
        need(0 < self.teacher_coverage <= 1, "teacher_coverage", "in (0, 1]")
        for name in ("role_mix", "noise_smoothness"):
            need(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        for name in ("ratio_alpha", "ratio_beta", "teacher_frame_ratio", "frame_seconds"):
            need(getattr(self, name) > 0, name, "> 0")
        for name in ("frame_noise", "background", "token_noise", "teacher_noise", "teacher_background"):
            need(getattr(self, name) >= 0, name, ">= 0")
        need(0 <= self.unseen_fraction <= 1, "unseen_fraction", "in [0, 1]")
        if self.unseen_fraction > 0:
            need(self.phrase_len <= self.unseen_words <= self.vocab_size - self.phrase_len, "unseen_words",
                 f"between phrase_len ({self.phrase_len}) and vocab_size - phrase_len ({self.vocab_size - self.phrase_len}) "
                 f"when unseen_fraction > 0")
        return self

    def split_sizes(self) -> tuple[int, int, int]:
        n_val = int(round(self.videos * self.val_fraction))
        n_test = int(round(self.videos * self.test_fraction))
        return self.videos - n_val - n_test, n_val, n_test


def unseen_path(root, collection: str, split: str) -> Path:
    """``TextData/<collection><split>.unseen.txt``: the cap_ids of the split's captions about unseen
    events, one per line (written with ``unseen_fraction > 0``; the ground truth of that variant)."""
    return Path(root) / collection / "TextData" / f"{collection}{split}.unseen.txt"


# --------------------------------------------------------------------------- generation

def _gauss(rng: np.random.Generator, shape, norm: float = 1.0) -> np.ndarray:
    """Gaussian with rows of expected norm ``norm`` (entries N(0, norm^2 / last dim))."""
    return rng.standard_normal(shape) * (norm / np.sqrt(shape[-1]))


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _word(v: int) -> str:
    s = len(_SYLLABLES)
    return _SYLLABLES[v % s] + _SYLLABLES[(v // s) % s] + _SYLLABLES[(v // (s * s)) % s] + (str(v // s ** 3) if v >= s ** 3 else "")


class _World:
    """The fixed maps and vocabularies shared by all videos of one seed."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        dz = cfg.latent_dim
        self.words = _gauss(rng, (cfg.vocab_size, dz))
        keep = np.sqrt(1 - cfg.role_mix ** 2)
        self.roles = np.stack([keep * np.eye(dz) + cfg.role_mix * _orthogonal(rng, dz) for _ in range(cfg.phrase_len)])
        # maps x [.., dz] -> x @ M [.., d_out]; entries N(0, 1/d_out) keep |x @ M| ~ |x|
        self.video_map = _gauss(rng, (dz, cfg.visual_dim))
        self.token_map = _gauss(rng, (dz, cfg.text_dim))
        # the teacher sees only a random subspace of the latent (rescaled to keep norms): clean but
        # incomplete, like a frozen image-text model that misses part of what the captions say
        r = max(1, int(round(cfg.teacher_coverage * dz)))
        basis = _orthogonal(rng, dz)[:, :r]
        self.teacher_map = (basis @ basis.T) @ _gauss(rng, (dz, cfg.teacher_dim)) * np.sqrt(dz / r)
        self.fillers = _gauss(rng, (len(_FILLER_WORDS), cfg.text_dim))
        # Unseen words (the last ``unseen_words`` of the vocabulary, only with unseen_fraction > 0):
        # never in a train or val caption, and inside the subspace the teacher sees, so the teacher
        # knows them as well as anything while the student meets them first at test time. Their
        # latents are the projections of their random draws, rescaled to the usual norm (no new draws).
        self.seen = np.arange(cfg.vocab_size)
        self.unseen = np.arange(0)
        if cfg.unseen_fraction > 0:
            self.seen, self.unseen = np.split(np.arange(cfg.vocab_size), [cfg.vocab_size - cfg.unseen_words])
            self.words[self.unseen] = self.words[self.unseen] @ (basis @ basis.T) * np.sqrt(dz / r)

    def event(self, phrase: np.ndarray) -> np.ndarray:
        return np.einsum("pij,pj->i", self.roles, self.words[phrase]) / np.sqrt(len(phrase))


def _place(rng: np.random.Generator, occupied: np.ndarray, length: int) -> int:
    """A start for a moment of ``length`` frames: uniform over the free stretches if any, else anywhere."""
    n = occupied.shape[0]
    csum = np.concatenate([[0], np.cumsum(occupied)])
    starts = np.arange(n - length + 1)
    free = starts[csum[starts + length] == csum[starts]]
    return int(rng.choice(free if free.size else starts))


def _smooth_noise(rng: np.random.Generator, n: int, dim: int, rho: float, norm: float) -> np.ndarray:
    """Stationary AR(1) noise along time: e_0 = u_0, e_t = rho e_{t-1} + sqrt(1 - rho^2) u_t."""
    out = _gauss(rng, (n, dim), norm)
    c = np.sqrt(1 - rho ** 2)
    out[1:] *= c
    for t in range(1, n):
        out[t] += rho * out[t - 1]
    return out


def _video(cfg: SyntheticConfig, world: _World, rng: np.random.Generator, vid: str, split: str) -> dict:
    """Everything about one video of ``split``: frames, teacher frames, captions, tokens, moments."""
    n = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    k = int(rng.integers(cfg.min_captions, cfg.max_captions + 1))
    occupied = np.zeros(n, dtype=np.int64)
    active = np.zeros((n, k))
    caps = []
    for c in range(k):
        ratio = rng.beta(cfg.ratio_alpha, cfg.ratio_beta)
        length = int(min(max(round(ratio * n), 1), n))
        start = _place(rng, occupied > 0, length)
        occupied[start:start + length] += 1
        active[start:start + length, c] = 1.0
        unseen = False
        if cfg.unseen_fraction > 0:       # (no extra draws when off: the default data stays byte-identical)
            unseen = split == "test" and bool(rng.random() < cfg.unseen_fraction)
            phrase = rng.choice(world.unseen if unseen else world.seen, size=cfg.phrase_len, replace=False)
        else:
            phrase = rng.choice(cfg.vocab_size, size=cfg.phrase_len, replace=False)
        n_fill = int(rng.integers(cfg.min_filler, cfg.max_filler + 1))
        fill = rng.integers(0, len(_FILLER_WORDS), size=n_fill)
        at = int(rng.integers(0, n_fill + 1))
        tokens = np.concatenate([world.fillers[fill[:at]], world.words[phrase] @ world.token_map,
                                 world.fillers[fill[at:]]])
        tokens = tokens + _gauss(rng, tokens.shape, cfg.token_noise)
        words = [_FILLER_WORDS[f] for f in fill[:at]] + [_word(int(v)) for v in phrase] + [_FILLER_WORDS[f] for f in fill[at:]]
        z = world.event(phrase)
        teacher_q = z @ world.teacher_map + _gauss(rng, (cfg.teacher_dim,), cfg.teacher_noise)
        caps.append(dict(cap_id=f"{vid}#enc#{c}", text=" ".join(words), tokens=tokens,
                         teacher=teacher_q[None], z=z, start=start, end=start + length, unseen=unseen))
    latents = np.stack([c["z"] for c in caps])                             # [k, dz]
    frame_z = active @ latents / np.sqrt(np.maximum(active.sum(1, keepdims=True), 1.0))   # [n, dz]
    frames = (frame_z @ world.video_map + cfg.background * _gauss(rng, (cfg.visual_dim,))
              + _smooth_noise(rng, n, cfg.visual_dim, cfg.noise_smoothness, cfg.frame_noise))
    n_t = max(1, int(round(cfg.teacher_frame_ratio * n)))
    nearest = ((np.arange(n_t) + 0.5) * n / n_t).astype(np.int64)           # student frame under each teacher frame's centre
    teacher = (frame_z[nearest] @ world.teacher_map + cfg.teacher_background * _gauss(rng, (cfg.teacher_dim,))
               + _gauss(rng, (n_t, cfg.teacher_dim), cfg.teacher_noise))
    return dict(vid=vid, frames=frames.astype(np.float32), teacher=teacher.astype(np.float32), caps=caps, n=n)


# --------------------------------------------------------------------------- writing the layout

def write_bigfile(folder: Path, videos: list[tuple[str, np.ndarray]]) -> None:
    """``FeatureData/<feature>/`` from ``(video_id, frames [n, D])`` pairs, rows in the given order."""
    folder.mkdir(parents=True, exist_ok=True)
    dim = videos[0][1].shape[1]
    frame_ids = [[f"{vid}_{t}" for t in range(x.shape[0])] for vid, x in videos]
    with open(folder / "feature.bin", "wb") as f:
        for _, x in videos:
            f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
    rows = sum(x.shape[0] for _, x in videos)
    (folder / "shape.txt").write_text(f"{rows} {dim}\n")
    (folder / "id.txt").write_text(" ".join(f for ids in frame_ids for f in ids) + "\n")
    entries = [f"{vid!r}: {ids!r}" for (vid, _), ids in zip(videos, frame_ids)]
    (folder / "video2frames.txt").write_text("{" + ",\n ".join(entries) + "}\n")


def write_hdf5(path: Path, items: list[tuple[str, np.ndarray]]) -> None:
    """An HDF5 file of float32 datasets, written deterministically (no timestamps, fixed order).

    The low-level API writes the same bytes as ``create_dataset(..., track_times=False)`` at
    about twice the speed, which matters for thousands of small datasets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", libver="earliest") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_obj_track_times(False)
        for key, x in items:
            x = np.ascontiguousarray(x, dtype="<f4")
            ds = h5py.h5d.create(f.id, key.encode("utf-8"), h5py.h5t.IEEE_F32LE, h5py.h5s.create_simple(x.shape), dcpl=dcpl)
            ds.write(h5py.h5s.ALL, h5py.h5s.ALL, x)


def _write_collection(base: Path, collection: str, cfg: SyntheticConfig, seed: int) -> dict:
    root = base.parent
    world_rng, split_rng, video_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    world = _World(cfg, world_rng)
    vids = [f"syn{i:05d}" for i in range(cfg.videos)]
    n_train, n_val, _ = cfg.split_sizes()
    perm = split_rng.permutation(cfg.videos)
    split_of = np.empty(cfg.videos, dtype=object)
    split_of[perm[:n_train]], split_of[perm[n_train:n_train + n_val]], split_of[perm[n_train + n_val:]] = "train", "val", "test"
    gens = np.random.SeedSequence(int(video_rng.integers(2 ** 63))).spawn(cfg.videos)
    videos = [_video(cfg, world, np.random.default_rng(g), vid, split)
              for vid, g, split in zip(vids, gens, split_of)]

    (base / "TextData").mkdir(parents=True)
    (base / "FeatureData").mkdir(parents=True)
    counts = {}
    for split in ("train", "val", "test"):
        mine = [v for v, s in zip(videos, split_of) if s == split]
        caps = [c for v in mine for c in v["caps"]]
        caption_path(root, collection, split).write_text("".join(f"{c['cap_id']} {c['text']}\n" for c in caps))
        moments_path(root, collection, split).write_text("".join(
            f"{c['cap_id']} {c['start'] * cfg.frame_seconds:.3f} {c['end'] * cfg.frame_seconds:.3f} "
            f"{v['n'] * cfg.frame_seconds:.3f}\n" for v in mine for c in v["caps"]))
        counts[split] = {"videos": len(mine), "captions": len(caps)}
        if cfg.unseen_fraction > 0:
            unseen_path(root, collection, split).write_text("".join(f"{c['cap_id']}\n" for c in caps if c["unseen"]))
            counts[split]["unseen_captions"] = sum(c["unseen"] for c in caps)
    write_bigfile(base / "FeatureData" / VISUAL_FEATURE, [(v["vid"], v["frames"]) for v in videos])
    all_caps = [c for v in videos for c in v["caps"]]
    write_hdf5(text_feature_path(root, collection), [(c["cap_id"], c["tokens"]) for c in all_caps])
    write_hdf5(teacher_query_path(root, collection), [(c["cap_id"], c["teacher"]) for c in all_caps])
    write_hdf5(teacher_video_path(root, collection), [(v["vid"], v["teacher"]) for v in videos])
    info = {"generator_version": SYNTHETIC_VERSION, "seed": seed, "collection": collection,
            "visual_feature": VISUAL_FEATURE, "splits": counts, "config": asdict(cfg)}
    if cfg.unseen_fraction > 0:
        info["unseen_words"] = [_word(int(v)) for v in world.unseen]
    (base / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def make_synthetic(out_dir, collection: str = DEFAULT_COLLECTION, *, seed: int = 0, overwrite: bool = False,
                   **options) -> Path:
    """Write a synthetic collection ``<out_dir>/<collection>/`` in the MS-SL layout; return ``out_dir``.

    Args:
        out_dir: the data root (what :class:`kdcnet.data.PRVRCollection` takes as ``root``).
        collection: collection name (file names are built from it).
        seed: everything is drawn from it; same seed and options give byte-identical files.
        overwrite: replace an existing ``<out_dir>/<collection>/`` (else it is an error).
        **options: fields of :class:`SyntheticConfig`, e.g. ``videos=900``, ``visual_dim=256``.

    The collection is written into a temporary folder beside it and renamed into place when
    complete, so an interrupted run never leaves a half collection behind.

    Example:
        >>> root = make_synthetic("/tmp/prvr", "toy", seed=1, videos=60)
        >>> PRVRCollection(root, "toy", "train")
    """
    if not isinstance(collection, str) or not collection or os.sep in collection or collection in (".", ".."):
        raise ValueError(f"collection must be a plain folder name, got {collection!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"make_synthetic got unknown options {unknown}; known: {sorted(known)}")
    cfg = SyntheticConfig(**options).validate()
    root = Path(out_dir).expanduser()
    target = root / collection
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True / --force to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{collection}.partial-", dir=root))
    try:
        t0 = time.perf_counter()
        _write_collection(tmp / collection, collection, cfg, seed)
        if target.exists() and overwrite:      # move the old one aside first, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{collection}.old-", dir=root))
            os.replace(target, old / collection)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp / collection, target)
        except OSError:
            if target.exists():                # another process finished the same collection first
                raise FileExistsError(f"{target} was created by another process meanwhile") from None
            raise
        log.info("wrote synthetic collection %s in %.1f s", target, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# --------------------------------------------------------------------------- default cache

def default_synthetic_root() -> Path:
    """Where ``kdcnet train`` keeps its built-in data: ``$KDC_CACHE_DIR`` (default ``~/.cache/kdcnet``)
    ``/synthetic-v<generator version>``, so a changed generator never reuses stale files."""
    cache = os.environ.get("KDC_CACHE_DIR", "").strip() or "~/.cache/kdcnet"
    return Path(cache).expanduser() / f"synthetic-v{SYNTHETIC_VERSION}"


def ensure_default_synthetic() -> tuple[Path, str]:
    """The default collection's ``(root, collection)``, generated (seconds) if it is not there yet.

    A collection counts as present only when its ``SYNTHETIC.json`` marker (written last, inside
    the temporary folder) records this generator version and the default options; anything else
    under that name is regenerated. A concurrent generator that finishes first wins.
    """
    root = default_synthetic_root()
    target = root / DEFAULT_COLLECTION
    want = {"generator_version": SYNTHETIC_VERSION, "seed": 0,
            "config": asdict(SyntheticConfig(**DEFAULT_OPTIONS))}
    try:
        info = json.loads((target / MARKER).read_text())
        current = all(info.get(k) == v for k, v in want.items())
    except (OSError, ValueError):
        current = False
    if not current:
        if target.exists():
            log.warning("%s is incomplete or from other generator settings; regenerating it", target)
        try:
            make_synthetic(root, DEFAULT_COLLECTION, seed=0, overwrite=target.exists(), **DEFAULT_OPTIONS)
        except FileExistsError:            # another process generated it meanwhile
            pass
    return root, DEFAULT_COLLECTION


# --------------------------------------------------------------------------- command line

def add_make_synthetic_parser(subparsers) -> argparse.ArgumentParser:
    """Mount ``make-synthetic`` on an argparse subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "make-synthetic", help="write a synthetic PRVR collection in the MS-SL layout",
        description="Write a synthetic PRVR collection (planted events, phrase-spread tokens, a CLIP-like "
                    "teacher, moments) in the MS-SL layout that real TVR / ActivityNet / Charades features use.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=default_synthetic_root(), help="data root to write <collection>/ into")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, help="collection name (file names are built from it)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed: same seed and options, same files")
    p.add_argument("--force", action="store_true", help="replace an existing collection of that name")
    for f in fields(SyntheticConfig):
        kind = int if isinstance(f.default, int) else float
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default, help=f.metadata["help"])
    return p


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run_make_synthetic(args: argparse.Namespace) -> int:
    """Run ``make-synthetic`` from parsed arguments; prints what it wrote. Bad options raise ValueError."""
    options = {f.name: getattr(args, f.name) for f in fields(SyntheticConfig)}
    t0 = time.perf_counter()
    root = make_synthetic(args.out, args.collection, seed=args.seed, overwrite=args.force, **options)
    info = json.loads((root / args.collection / MARKER).read_text())
    splits = ", ".join(f"{s} {c['videos']} videos / {c['captions']} captions" for s, c in info["splits"].items())
    if fraction := info["config"].get("unseen_fraction"):
        splits += f"; {info['splits']['test'].get('unseen_captions', 0)} test captions about unseen events " \
                  f"(unseen_fraction {fraction}; cap_ids in {unseen_path(root, args.collection, 'test').name})"
    print(f"wrote {root / args.collection} in {time.perf_counter() - t0:.1f} s: {splits}; "
          f"Dv={info['config']['visual_dim']} Dq={info['config']['text_dim']} Dt={info['config']['teacher_dim']}")
    print(f"train on it: kdcnet train --data-root {root} --collection {args.collection}")
    return 0


# --------------------------------------------------------------------------- the unseen-events variant

def unseen_report(run_dir, split: str = "test", checkpoint: str = "best.pt", device: str = "cpu") -> list[dict]:
    """Recalls of a run on a collection made with ``unseen_fraction > 0``, split by its ground truth:
    one row per (scorer, subset) for the fused score, each branch and the teacher on its own
    (zero-shot: max over frames of the teacher's cosine), over the ``unseen`` and ``seen`` test
    captions and ``all``. Scores every query against every video of the split at once (a synthetic
    collection is small)."""
    import torch

    from . import config as C
    from . import evaluate as E
    from . import metrics as M
    from .data import query_batches, video_batches
    from .model import BRANCHES, KDCNet

    run_dir = Path(run_dir)
    cfg = C.load(run_dir / "config.json")
    data = E.open_split(cfg, split, teacher=True)
    path = unseen_path(data.root, data.collection, split)
    if not path.is_file():
        raise ValueError(f"{path} is missing: {data.collection} was not made with --unseen-fraction > 0")
    unseen_ids = set(path.read_text().split())
    unseen = torch.tensor([c in unseen_ids for c in data.cap_ids])
    dev = torch.device(device)
    model = KDCNet(cfg).to(dev)
    model.load_state_dict(torch.load(run_dir / checkpoint, map_location=dev, weights_only=False)["model"])
    frames, lengths, queries, _ = E.encode_collection(model, data, cfg, dev)
    with torch.no_grad():
        branch = model.branch_scores(queries, frames, lengths)
    scorers = {"KDC-Net": model.fuse(branch), **{f"{name} branch": branch[name] for name in BRANCHES}}
    if data.has_teacher:
        from kdc_kernels import max_similarity

        videos, caps = next(video_batches(data, 10 ** 9)), next(query_batches(data, 10 ** 9))
        scorers["teacher (zero-shot)"] = max_similarity(caps.teacher_queries, videos.teacher_videos, videos.video_lengths)
    targets = torch.as_tensor(data.cap_video, dtype=torch.int64)
    rows = []
    for name, scores in scorers.items():
        ranks = M.ranks_from_scores(scores.cpu(), targets)
        for subset, keep in (("unseen", unseen), ("seen", ~unseen), ("all", torch.ones_like(unseen))):
            rows.append({"scorer": name, "captions": subset, "queries": int(keep.sum()),
                         **M.recalls_from_ranks(ranks[keep])})
    return rows


def teacher_report(root, collection: str, split: str = "test", windows=(1, 3, 5), max_frames: int = 64) -> list[dict]:
    """How the temporal-continuity refinement (``loss.krd_window``) changes what the teacher teaches,
    on one split of a collection with teacher features: per box window w, the teacher's own
    zero-shot retrieval with the refined features (``T[q, v] = max_i t~_i``, the objective-aligned
    target), its SumR on the shortest moments (M/V <= 0.2) and, for the segment-aware target
    ``softmax_i(t~_i / 0.2)`` over the positive video, the mean probability mass (percent) inside
    the captioned moment (needs the moments file)."""
    import torch
    import torch.nn.functional as F

    from kdc_kernels import max_similarity

    from . import metrics as M
    from .data import PRVRCollection, query_batches, video_batches
    from .losses import refine_teacher_frames

    data = PRVRCollection(root, collection, split, max_frames=max_frames)
    if not data.has_teacher:
        raise ValueError(f"{collection} has no teacher features")
    videos, caps = next(video_batches(data, 10 ** 9)), next(query_batches(data, 10 ** 9))
    cq = F.normalize(caps.teacher_queries, dim=-1)
    lengths, pos = videos.video_lengths, caps.query_video
    moments = [data.moments.get(c) for c in data.cap_ids]
    short = torch.tensor([m is not None and m.ratio <= 0.2 for m in moments])
    rows = []
    for w in windows:
        refined = refine_teacher_frames(videos.teacher_videos, lengths, w)
        ranks = M.ranks_from_scores(max_similarity(cq, refined, lengths, normalize=False), pos)
        curve = torch.einsum("nd,nld->nl", cq, refined[pos])
        valid = torch.arange(curve.shape[1])[None, :] < lengths[pos][:, None]
        target = torch.softmax((curve / 0.2).masked_fill(~valid, float("-inf")), dim=1)
        inside = []
        for n, m in enumerate(moments):
            if m is not None:   # moment [start, end) in seconds -> frames on the (binned) grid
                n_frames, total = int(lengths[pos[n]]), max(m.duration, 1e-9)
                lo, hi = int(n_frames * m.start / total), max(int(n_frames * m.start / total) + 1,
                                                              round(n_frames * m.end / total))
                inside.append(float(target[n, lo:hi].sum()))
        row = {"krd_window": w, **M.recalls_from_ranks(ranks)}
        row["SumR M/V<=0.2"] = M.recalls_from_ranks(ranks[short])["SumR"] if bool(short.any()) else float("nan")
        row["target % in moment"] = 100 * sum(inside) / len(inside) if inside else float("nan")
        rows.append(row)
    return rows


def _report_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdcnet.synthetic",
                                     description="Reports on synthetic collections and the runs trained on them.")
    sub = parser.add_subparsers(dest="report", required=True)
    u = sub.add_parser("unseen", help="recall on the unseen and the seen test captions of runs trained on a "
                                      "collection made with kdcnet make-synthetic --unseen-fraction F")
    u.add_argument("runs", nargs="+", type=Path, help="run folders (e.g. the subfolders of a kdcnet train --ablate run)")
    u.add_argument("--split", default="test", choices=("val", "test"), help="split to evaluate (default: test)")
    t = sub.add_parser("teacher", help="the teacher's targets with each temporal-continuity window (loss.krd_window)")
    t.add_argument("--data-root", type=Path, default=None, help="data root (default: the built-in synthetic collection)")
    t.add_argument("--collection", default=DEFAULT_COLLECTION, help="collection name (default: synthetic)")
    t.add_argument("--split", default="test", choices=("train", "val", "test"), help="split (default: test)")
    t.add_argument("--windows", type=int, nargs="+", default=[1, 3, 5], help="box windows (default: 1 3 5)")
    t.add_argument("--max-frames", type=int, default=64, help="frames after bin-averaging (default: 64, the synthetic preset)")
    args = parser.parse_args(argv)
    from .metrics import RECALL_KEYS, format_table

    if args.report == "unseen":
        for run in args.runs:
            rows = unseen_report(run, args.split)
            print(f"{run} ({args.split} split):")
            print(format_table(rows, ["scorer", "captions", "queries", *RECALL_KEYS, "SumR"]))
        return 0
    root = args.data_root if args.data_root is not None else ensure_default_synthetic()[0]
    rows = teacher_report(root, args.collection, args.split, args.windows, args.max_frames)
    print(f"teacher targets on {args.collection} ({args.split} split):")
    print(format_table(rows, ["krd_window", *RECALL_KEYS, "SumR", "SumR M/V<=0.2", "target % in moment"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_report_main())
