"""PRVR features in the MS-SL layout: one split of a collection, as training and evaluation read it.

Layout of one collection (``<root>/<collection>/``; any collection name, dims read from the files)::

    TextData/<collection>{train,val,test}.caption.txt       <cap_id> <caption>   (cap_id = <video_id>#enc#<k>)
    TextData/roberta_<collection>_query_feat.hdf5            cap_id -> float [n_tokens, Dq]
    TextData/clip_ViT_B_32_<collection>_query_feat.hdf5      cap_id -> float [1, Dt]       (teacher, optional)
    TextData/<collection><split>.moments.txt                 <cap_id> <start_s> <end_s> <duration_s>  (optional)
    FeatureData/<feature>/feature.bin                        float32 rows, N x D, row-major
    FeatureData/<feature>/id.txt                             N frame ids, whitespace separated, in row order
    FeatureData/<feature>/shape.txt                          "N D"
    FeatureData/<feature>/video2frames.txt                   {video_id: [frame_id, ...], ...} (a dict literal)
    FeatureData/new_clip_vit_32_<collection>_vid_features.hdf5   video_id -> float [n, Dt]  (teacher, optional)

What the loader returns:

* **video** ``[m, Dv]``: the video's ``n`` frames (rows of ``feature.bin`` in the order
  ``video2frames.txt`` lists them) averaged into ``m = min(n, max_frames)`` contiguous bins, bin
  ``k`` covering frames ``[k*n // m, (k+1)*n // m)`` (so with ``n <= max_frames`` every frame is
  kept as it is; otherwise the bins hold ``floor(n/m)`` or ``ceil(n/m)`` frames), then each frame
  L2-normalised (``x / max(|x|, 1e-12)``).
* **teacher video** ``[m, Dt]``: on the same grid. Frame ``i`` of ``n`` covers the time span
  ``[i/n, (i+1)/n)`` of the video; output frame ``k`` covers ``[lo_k/n, hi_k/n)`` of the student
  grid. The teacher's ``n_t`` frames are laid over the same time axis and output frame ``k`` is
  the mean of the teacher frames whose span overlaps it: ``[floor(lo_k*n_t/n), ceil(hi_k*n_t/n))``.
  With ``n_t == n`` these are exactly the student's bins; with fewer teacher frames it is a
  nearest-frame mapping (averaging the two neighbours at a boundary). Then L2-normalised.
* **query** ``[min(n_tokens, max_tokens), Dq]``: the first ``max_tokens`` tokens, each L2-normalised.
* **teacher query** ``[Dt]``: the one row, L2-normalised.

Every malformed input raises :class:`DataError` naming the file, the line or key and what is
wrong. Cheap structural checks (files present, ``shape.txt``, ``feature.bin`` size, ``id.txt``
count, ``video2frames.txt`` syntax and frame ids, HDF5 keys of the split) run when a
:class:`PRVRCollection` is opened; per-item shapes, and values (NaN or inf anywhere in an item
that the model reads), are checked when an item is read, so a bad entry is reported naming the
file and the video or caption id before it can reach a batch.

The concerns live in four modules (the public names of all are importable from here):

* :mod:`kdcnet.readers`: the file readers (captions, moments, ``video2frames.txt``, BigFile, HDF5).
* this module: :class:`PRVRCollection` and the feature transforms above.
* :mod:`kdcnet.prepared`: the prepared cache, every item as returned above packed into contiguous
  arrays, built on first use; :meth:`PRVRCollection.prepare` attaches it.
* :mod:`kdcnet.batches`: :class:`Batch` and the batch iterators, which read the prepared arrays
  with vectorised gathers when a collection has them; :mod:`kdcnet.loader` runs them ahead of the
  training step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .readers import (BIGFILE_FILES, SPLITS, DataError, Moment, _bigfile_folders, _bigfile_index,  # noqa: F401
                      _check_keys, _dim_of, _fail, _H5, caption_path, moments_path, parse_video2frames,
                      read_captions, read_moments, teacher_query_path, teacher_video_path, text_feature_path,
                      video_of)

PRESET_VISUAL_FEATURE = {"tvr": "i3d_resnet", "activitynet": "i3d", "charades": "i3d_rgb_lgi"}
_EPS = 1e-12


# --------------------------------------------------------------------------- numerics

def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by ``max(|row|, 1e-12)``, float32."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):     # non-finite input is reported by the item check
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def bin_edges(n: int, max_frames: int) -> np.ndarray:
    """Edges ``[m + 1]`` of the ``m = min(n, max_frames)`` bins: bin k is ``[edges[k], edges[k+1])``."""
    m = min(n, max_frames)
    return (np.arange(m + 1, dtype=np.int64) * n) // m


def interval_means(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``out[k] = mean(x[lo[k]:hi[k]])`` (float64 prefix sums; intervals non-empty, may overlap)."""
    csum = np.zeros((x.shape[0] + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
    with np.errstate(invalid="ignore", over="ignore"):
        return ((csum[hi] - csum[lo]) / (hi - lo)[:, None]).astype(np.float32)


def bin_average(x: np.ndarray, max_frames: int) -> np.ndarray:
    """Uniform bin-averaging of ``x [n, D]`` to ``min(n, max_frames)`` rows (see the module doc)."""
    if x.shape[0] <= max_frames:
        return np.asarray(x, dtype=np.float32)
    edges = bin_edges(x.shape[0], max_frames)
    return interval_means(x, edges[:-1], edges[1:])


def resample_to_grid(x: np.ndarray, n: int, max_frames: int) -> np.ndarray:
    """Map ``x [n_t, D]`` onto the grid that :func:`bin_average` gives a video of ``n`` frames."""
    n_t = x.shape[0]
    edges = bin_edges(n, max_frames)
    lo = (edges[:-1] * n_t) // n
    hi = -((-edges[1:] * n_t) // n)
    return interval_means(x, lo, hi)


def _first_bad_row(x: np.ndarray) -> int | None:
    """Index of the first row of ``x`` holding a NaN or an infinity, None when every value is finite.
    One pass over ``x``; the rows are searched only when something is wrong."""
    if np.isfinite(x).all():
        return None
    return int(np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))[0])


def _bad_value(x: np.ndarray) -> str:
    bad = x[~np.isfinite(x)]
    return "NaN" if np.isnan(bad).any() else "an infinity"


# --------------------------------------------------------------------------- the collection

class PRVRCollection:
    """One split of an MS-SL layout collection: ``<root>/<collection>/{TextData,FeatureData}``.

    Args:
        root: folder holding ``<collection>/``.
        collection: collection name (file names are built from it).
        split: ``"train"``, ``"val"`` or ``"test"``.
        visual_feature: folder under ``FeatureData/``; None picks the preset's folder for
            ``tvr`` / ``activitynet`` / ``charades`` when present, else the only BigFile folder.
        max_frames: videos longer than this are bin-averaged down to it.
        max_tokens: queries are truncated to their first ``max_tokens`` tokens.
        teacher: load the CLIP teacher features when both teacher files exist.
        cache_bytes: keep up to this many bytes of loaded items (videos, queries, teacher
            features, as returned) in memory so later epochs skip the files; 0 disables it.
            Each process (e.g. each DataLoader worker) has its own. Unused once :meth:`prepare`
            has attached the prepared arrays.

    Attributes: ``video_ids`` (videos with a caption in this split, sorted), ``cap_ids`` (file
    order), ``cap_video`` / ``video_caps`` (caption -> video index, video -> caption indices),
    ``captions``, ``moments`` (empty without a moments file), ``visual_dim``, ``text_dim``,
    ``teacher_dim`` / ``has_teacher``, ``prepared`` (the :class:`kdcnet.prepared.PreparedSplit`
    that items and batches are read from, None until :meth:`prepare`).

    Example:
        >>> data = PRVRCollection(root, "synthetic", "train")
        >>> data.video(0).shape                        # (frames <= max_frames, Dv)
        >>> data.query(data.video_caps[0][0]).shape    # (tokens <= max_tokens, Dq)
        >>> data.prepare()                             # build or open the prepared cache: fast batches
    """

    def __init__(self, root, collection: str, split: str, visual_feature: str | None = None,
                 max_frames: int = 128, max_tokens: int = 30, teacher: bool = True, cache_bytes: int = 1 << 30):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name, value, low in (("max_frames", max_frames, 1), ("max_tokens", max_tokens, 1), ("cache_bytes", cache_bytes, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.root = Path(root)
        self.collection = collection
        self.split = split
        self.max_frames = max_frames
        self.max_tokens = max_tokens
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._cached_bytes = 0
        self._text = self._teacher_video = self._teacher_query = None
        self._features = self._features_pid = None
        self.prepared = None
        try:
            self._open(visual_feature, teacher)
        except BaseException:
            self.close()          # do not keep files open (and locked for writing) after a failed open
            raise

    def _open(self, visual_feature: str | None, teacher: bool) -> None:
        root, collection, split = self.root, self.collection, self.split

        base = self.root / collection
        text_root, feature_root = base / "TextData", base / "FeatureData"
        missing = [str(p) for p in (base, text_root, feature_root) if not p.is_dir()]
        if missing:
            raise _fail(missing[0], None, f"folder missing; expected the MS-SL layout {base}/TextData and {base}/FeatureData")

        cap_file = caption_path(root, collection, split)
        if not cap_file.is_file():
            found = sorted(p.name for p in text_root.glob("*.caption.txt"))
            raise _fail(cap_file, None, f"caption file missing (expected {collection}{{train,val,test}}.caption.txt; "
                                        f"found {found or 'none'})")
        self.captions = read_captions(cap_file)
        if not self.captions:
            raise _fail(cap_file, None, "holds no captions")
        self.cap_ids = list(self.captions)
        self.video_ids = sorted({video_of(c) for c in self.cap_ids})
        vindex = {v: i for i, v in enumerate(self.video_ids)}
        self.cap_video = [vindex[video_of(c)] for c in self.cap_ids]
        self.video_caps: list[list[int]] = [[] for _ in self.video_ids]
        for j, i in enumerate(self.cap_video):
            self.video_caps[i].append(j)
        # The same as arrays, for vectorised batch plans: captions grouped by video (file order
        # within a video) and the start of each video's group.
        self.cap_video_index = np.asarray(self.cap_video, dtype=np.int64)
        self.caps_by_video = np.argsort(self.cap_video_index, kind="stable")
        self.caps_start = np.zeros(len(self.video_ids) + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.cap_video_index, minlength=len(self.video_ids)), out=self.caps_start[1:])

        mom_file = moments_path(root, collection, split)
        self.moments = read_moments(mom_file) if mom_file.is_file() else {}

        self._open_visual(feature_root, visual_feature)
        first_cap = {}
        for c in self.cap_ids:
            first_cap.setdefault(video_of(c), c)
        self._resolve_frames(first_cap)

        text_file = text_feature_path(root, collection)
        if not text_file.is_file():
            raise _fail(text_file, None, "query feature file missing (expected roberta_<collection>_query_feat.hdf5 in TextData/)")
        self._text = _H5(text_file)
        _check_keys(self._text, self.cap_ids, "query features")
        self.text_dim = _dim_of(self._text, self.cap_ids[0], (2,))

        self._open_teacher(teacher, first_cap)

    def close(self) -> None:
        """Close the HDF5 files and drop the memory map of ``feature.bin`` (reading again reopens
        them). The prepared arrays stay: read-only maps, released with the collection."""
        for h5 in (self._text, self._teacher_video, self._teacher_query):
            if h5 is not None:
                h5.close()
        self._features = self._features_pid = None

    def source_files(self) -> list[Path]:
        """Every file whose content this split's items are computed from (the prepared cache's key)."""
        files = [caption_path(self.root, self.collection, self.split),
                 *(self._bigfile.folder / name for name in BIGFILE_FILES), self._text.path]
        if self.has_teacher:
            files += [self._teacher_video.path, self._teacher_query.path]
        return files

    def prepare(self, cache_dir=None, dtype: str = "float32", progress: bool | None = None) -> "PRVRCollection":
        """Attach the prepared cache of this split (:mod:`kdcnet.prepared`): open it when it matches
        the source files and settings, else build it (every item read and checked once). From then
        on items and batches come from its arrays. Returns ``self``.

        Args:
            cache_dir: folder holding prepared caches (default: ``$KDC_CACHE_DIR/prepared``).
            dtype: ``"float32"`` (batches bit-identical to the unprepared ones) or ``"float16"``
                (half the size; every value the float16 rounding of the float32 one).
            progress: tqdm bar while building (None: only on a terminal).
        """
        from .prepared import prepare_split

        self.prepared = prepare_split(self, cache_dir=cache_dir, dtype=dtype, progress=progress)
        return self

    def __enter__(self) -> "PRVRCollection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- opening

    def _open_visual(self, feature_root: Path, visual_feature: str | None) -> None:
        folders = _bigfile_folders(feature_root)
        if visual_feature is None:
            preset = PRESET_VISUAL_FEATURE.get(self.collection)
            if preset in folders:
                visual_feature = preset
            elif len(folders) == 1:
                visual_feature = folders[0]
            else:
                raise _fail(feature_root, None, f"cannot choose the video features: BigFile folders {folders or 'none'} "
                                                f"(expected one, or name it with visual_feature)")
        folder = feature_root / visual_feature
        if not folder.is_dir():
            raise _fail(folder, None, f"feature folder missing (expected {', '.join(BIGFILE_FILES)} in it; "
                                      f"BigFile folders found: {folders or 'none'})")
        self.visual_feature = visual_feature
        self._bigfile = _bigfile_index(folder)
        self.visual_dim = self._bigfile.dim

    def _resolve_frames(self, first_cap: dict[str, str]) -> None:
        """Rows of every video of the split, checked against video2frames.txt and id.txt."""
        index = self._bigfile
        v2f_file = index.folder / "video2frames.txt"
        rows, offsets = [], [0]
        for vid in self.video_ids:
            frames = index.video2frames.get(vid)
            if frames is None:
                raise _fail(v2f_file, f"video {vid!r}",
                            f"no features for the video of caption {first_cap[vid]!r} (the video id is not a key)")
            if not frames:
                raise _fail(v2f_file, f"video {vid!r}", f"lists no frames (caption {first_cap[vid]!r} needs them)")
            try:
                rows.extend(map(index.row_of.__getitem__, frames))
            except KeyError as e:
                raise _fail(v2f_file, f"video {vid!r}", f"frame id {e.args[0]!r} is not in {index.folder / 'id.txt'}") from None
            offsets.append(len(rows))
        self._rows = np.asarray(rows, dtype=np.int64)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    def _open_teacher(self, teacher: bool, first_cap: dict[str, str]) -> None:
        self.teacher_dim = None
        self.has_teacher = False
        if not teacher:
            return
        vfile, qfile = teacher_video_path(self.root, self.collection), teacher_query_path(self.root, self.collection)
        present = [p.is_file() for p in (vfile, qfile)]
        if not any(present):
            return
        if not all(present):
            have, lack = (vfile, qfile) if present[0] else (qfile, vfile)
            raise _fail(lack, None, f"teacher file missing while {have.name} exists (provide both, or open with teacher=False)")
        self._teacher_video, self._teacher_query = _H5(vfile), _H5(qfile)
        _check_keys(self._teacher_video, self.video_ids, "teacher video features", first_cap)
        _check_keys(self._teacher_query, self.cap_ids, "teacher query features")
        dv = _dim_of(self._teacher_video, self.video_ids[0], (2,))
        dq = _dim_of(self._teacher_query, self.cap_ids[0], (1, 2))
        if dv != dq:
            raise _fail(qfile, f"key {self.cap_ids[0]!r}", f"teacher query dim {dq} differs from the teacher video dim {dv} in {vfile}")
        self.teacher_dim = dv
        self.has_teacher = True

    # ----------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def num_queries(self) -> int:
        return len(self.cap_ids)

    def _feature_map(self) -> np.ndarray:
        if self._features is None or self._features_pid != os.getpid():
            self._features = np.memmap(self._bigfile.folder / "feature.bin", dtype=np.float32, mode="r",
                                       shape=(self._bigfile.num_rows, self._bigfile.dim))
            self._features_pid = os.getpid()
        return self._features

    def num_frames(self, i: int) -> int:
        """Frames of video ``i`` before bin-averaging."""
        return int(self._offsets[i + 1] - self._offsets[i])

    def video_length(self, i: int) -> int:
        """Frames of video ``i`` after bin-averaging (``len(video(i))``)."""
        return min(self.num_frames(i), self.max_frames)

    def _item(self, kind: str, i: int) -> np.ndarray:
        """Item ``i`` of ``kind`` ("video", "query", "teacher_video", "teacher_query"), from the
        prepared arrays or the item cache when there (read-only: callers that keep it must copy)."""
        if kind.startswith("teacher") and not self.has_teacher:
            raise RuntimeError(f"collection {self.collection!r} ({self.split}) was opened without teacher features")
        if self.prepared is not None:
            return self.prepared.item(kind, i)
        x = self._cache.get((kind, i))
        if x is None:
            x = self.read_item(kind, i)
            if self._cached_bytes + x.nbytes <= self.cache_bytes:
                x.flags.writeable = False
                self._cache[(kind, i)] = x
                self._cached_bytes += x.nbytes
        return x

    def read_item(self, kind: str, i: int) -> np.ndarray:
        """Item ``i`` of ``kind`` read from the source files and checked (shape, finite values),
        bypassing the item cache and the prepared arrays: what both are filled with."""
        if kind.startswith("teacher") and not self.has_teacher:
            raise RuntimeError(f"collection {self.collection!r} ({self.split}) was opened without teacher features")
        return getattr(self, "_load_" + kind)(i)

    def video(self, i: int) -> np.ndarray:
        """float32 ``[m, Dv]``: video ``i`` bin-averaged to ``m <= max_frames`` frames, each L2-normalised."""
        return self._item("video", i).copy()

    def query(self, j: int) -> np.ndarray:
        """float32 ``[n <= max_tokens, Dq]``: the first tokens of caption ``j``, each L2-normalised."""
        return self._item("query", j).copy()

    def teacher_video(self, i: int) -> np.ndarray:
        """float32 ``[m, Dt]`` on the grid of :meth:`video` (same ``m``), each frame L2-normalised."""
        return self._item("teacher_video", i).copy()

    def teacher_query(self, j: int) -> np.ndarray:
        """float32 ``[Dt]``: the teacher's sentence feature of caption ``j``, L2-normalised."""
        return self._item("teacher_query", j).copy()

    def _load_video(self, i: int) -> np.ndarray:
        rows = self._rows[self._offsets[i]:self._offsets[i + 1]]
        mm = self._feature_map()
        if rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            x = np.asarray(mm[rows[0]:rows[-1] + 1])     # a slice of the map: no fancy-index gather
        else:
            x = mm[rows]
        out = l2_normalize(bin_average(x, self.max_frames))
        if _first_bad_row(out) is not None:
            self._nonfinite_video(i, x)
        return out

    def _nonfinite_video(self, i: int, raw: np.ndarray):
        vid, index = self.video_ids[i], self._bigfile
        row = _first_bad_row(raw)
        if row is None:        # finite but so large that the norm overflows float32
            raise _fail(index.folder / "feature.bin", f"video {vid!r}", "values too large: the frame norms overflow float32")
        frame = index.video2frames[vid][row]
        raise _fail(index.folder / "feature.bin", f"video {vid!r}, frame {frame!r} (row {index.row_of[frame]})",
                    f"{_bad_value(raw[row])} in the features")

    def _load_query(self, j: int) -> np.ndarray:
        key = self.cap_ids[j]
        x = self._text.read(key, rows=self.max_tokens)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.text_dim:
            raise _fail(self._text.path, f"key {key!r}", f"expected [n_tokens >= 1, {self.text_dim}], got {x.shape}")
        return self._checked(l2_normalize(x[:self.max_tokens]), x[:self.max_tokens], self._text.path, key, "token")

    def _load_teacher_video(self, i: int) -> np.ndarray:
        key = self.video_ids[i]
        x = self._teacher_video.read(key)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.teacher_dim:
            raise _fail(self._teacher_video.path, f"key {key!r}", f"expected [n_frames >= 1, {self.teacher_dim}], got {x.shape}")
        out = l2_normalize(resample_to_grid(x, self.num_frames(i), self.max_frames))
        return self._checked(out, x, self._teacher_video.path, key, "frame")

    def _load_teacher_query(self, j: int) -> np.ndarray:
        key = self.cap_ids[j]
        x = self._teacher_query.read(key)
        if x.shape not in ((self.teacher_dim,), (1, self.teacher_dim)):
            raise _fail(self._teacher_query.path, f"key {key!r}", f"expected [1, {self.teacher_dim}], got {x.shape}")
        return self._checked(l2_normalize(x.reshape(-1)), x.reshape(1, -1), self._teacher_query.path, key, "row")

    @staticmethod
    def _checked(out: np.ndarray, raw: np.ndarray, path: Path, key: str, unit: str) -> np.ndarray:
        """``out`` when every value is finite, else a DataError naming the file, the key and the
        first bad row of ``raw`` (the entry as read, of which ``out`` is computed)."""
        if np.isfinite(out).all():
            return out
        row = _first_bad_row(raw)
        if row is None:
            raise _fail(path, f"key {key!r}", "values too large: the norms overflow float32")
        raise _fail(path, f"key {key!r}", f"{_bad_value(raw[row])} in {unit} {row}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = state["_features_pid"] = None
        state["_cache"], state["_cached_bytes"] = {}, 0
        state.pop("_buffer_ring", None)      # the loader's recycled batch memory (kdcnet.loader)
        return state

    def __repr__(self) -> str:
        prepared = "" if self.prepared is None else f", prepared={self.prepared.folder}"
        return (f"PRVRCollection({self.collection!r}, split={self.split!r}, videos={len(self.video_ids)}, "
                f"queries={len(self.cap_ids)}, Dv={self.visual_dim}, Dq={self.text_dim}, Dt={self.teacher_dim}{prepared})")


# The batch iterators, re-exported: ``from kdcnet.data import train_batches`` keeps working.
from .batches import (Batch, num_train_batches, query_batches, train_batches, video_batches)  # noqa: E402,F401
