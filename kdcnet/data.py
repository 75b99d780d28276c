"""PRVR features in the MS-SL layout: reading, checking and batching.

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
:class:`PRVRCollection` is opened; per-item shapes are checked when an item is read.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch

PRESET_VISUAL_FEATURE = {"tvr": "i3d_resnet", "activitynet": "i3d", "charades": "i3d_rgb_lgi"}
SPLITS = ("train", "val", "test")
BIGFILE_FILES = ("feature.bin", "id.txt", "shape.txt", "video2frames.txt")
_EPS = 1e-12


class DataError(ValueError):
    """Malformed input data; the message names the file, the line or key, and what is wrong."""


def _fail(path, where: str | None, what: str) -> DataError:
    loc = f"{path}" if where is None else f"{path}: {where}"
    return DataError(f"{loc}: {what}")


@dataclass(frozen=True)
class Moment:
    """A captioned moment, in seconds."""

    start: float
    end: float
    duration: float

    @property
    def ratio(self) -> float:
        """Moment-to-video ratio ``(end - start) / duration``, clipped to ``[0, 1]``."""
        return min(max((self.end - self.start) / self.duration, 0.0), 1.0)


# --------------------------------------------------------------------------- file names

def caption_path(root, collection: str, split: str) -> Path:
    return Path(root) / collection / "TextData" / f"{collection}{split}.caption.txt"


def moments_path(root, collection: str, split: str) -> Path:
    return Path(root) / collection / "TextData" / f"{collection}{split}.moments.txt"


def text_feature_path(root, collection: str) -> Path:
    return Path(root) / collection / "TextData" / f"roberta_{collection}_query_feat.hdf5"


def teacher_query_path(root, collection: str) -> Path:
    return Path(root) / collection / "TextData" / f"clip_ViT_B_32_{collection}_query_feat.hdf5"


def teacher_video_path(root, collection: str) -> Path:
    return Path(root) / collection / "FeatureData" / f"new_clip_vit_32_{collection}_vid_features.hdf5"


# --------------------------------------------------------------------------- numerics

def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by ``max(|row|, 1e-12)``, float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def bin_edges(n: int, max_frames: int) -> np.ndarray:
    """Edges ``[m + 1]`` of the ``m = min(n, max_frames)`` bins: bin k is ``[edges[k], edges[k+1])``."""
    m = min(n, max_frames)
    return (np.arange(m + 1, dtype=np.int64) * n) // m


def interval_means(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``out[k] = mean(x[lo[k]:hi[k]])`` (float64 prefix sums; intervals non-empty, may overlap)."""
    csum = np.zeros((x.shape[0] + 1, x.shape[1]), dtype=np.float64)
    np.cumsum(x, axis=0, dtype=np.float64, out=csum[1:])
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


# --------------------------------------------------------------------------- text files

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, f"byte {e.start}", "not valid UTF-8 text") from None
    except OSError as e:
        raise _fail(path, None, f"cannot be read ({e.strerror or e})") from None


def read_captions(path: Path) -> dict[str, str]:
    """``cap_id -> caption`` in file order; blank lines are skipped."""
    captions: dict[str, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise _fail(path, f"line {lineno}", f"expected '<cap_id> <caption>', got {line.strip()!r}")
        cap_id, text = parts
        if "#" not in cap_id or cap_id.startswith("#"):
            raise _fail(path, f"line {lineno}",
                        f"cap_id {cap_id!r} is not of the form <video_id>#enc#<k> (the video id is the part before the first '#')")
        if cap_id in captions:
            raise _fail(path, f"line {lineno}", f"duplicate cap_id {cap_id!r}")
        captions[cap_id] = text
    return captions


def video_of(cap_id: str) -> str:
    """The video id of a caption id: the part before the first ``#``."""
    return cap_id.split("#", 1)[0]


def read_moments(path: Path) -> dict[str, Moment]:
    """``cap_id -> Moment`` from ``<cap_id> <start_s> <end_s> <duration_s>`` lines."""
    moments: dict[str, Moment] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"line {lineno}"
        if len(parts) != 4:
            raise _fail(path, where, f"expected '<cap_id> <start_s> <end_s> <duration_s>', got {line.strip()!r}")
        try:
            start, end, duration = (float(p) for p in parts[1:])
        except ValueError:
            raise _fail(path, where, f"start, end and duration must be numbers, got {parts[1:]}") from None
        if not all(math.isfinite(v) for v in (start, end, duration)):
            raise _fail(path, where, f"start, end and duration must be finite, got {parts[1:]}")
        if duration <= 0 or start < 0 or end < start:
            raise _fail(path, where, f"need 0 <= start <= end and duration > 0, got start={start} end={end} duration={duration}")
        if parts[0] in moments:
            raise _fail(path, where, f"duplicate cap_id {parts[0]!r}")
        moments[parts[0]] = Moment(start, end, duration)
    return moments


# video2frames.txt: a Python dict literal {'video_id': ['frame_id', ...], ...}, read with a small
# scanner (never eval): one big line or many, '' or "" strings (optionally u''), trailing commas.
_STR = r"""[uU]?(?:'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""
_STR_RE = re.compile(_STR)
_LIST_RE = re.compile(r"\[\s*(?:%s\s*,\s*)*(?:%s\s*)?\]" % (_STR, _STR))
_WS_RE = re.compile(r"\s*")


def _decode_str(token: str) -> str:
    if "\\" in token or token[0] in "uU":
        return ast.literal_eval(token)
    return token[1:-1]


def _plain_list(text: str, pos: int) -> tuple[list[str] | None, int]:
    """Fast path for the common list ``['f1', 'f2', ...]`` (one quote kind, no escapes, no commas
    or brackets inside ids) using only C-level string methods; ``(None, pos)`` when it does not
    apply, and the regex scanner decides."""
    if not text.startswith("[", pos):
        return None, pos
    end = text.find("]", pos)
    if end < 0:
        return None, pos
    body = text[pos + 1:end]
    if not body.strip():
        return [], end + 1
    quote = body.lstrip()[0]
    if quote not in "'\"" or "\\" in body or ("'" if quote == '"' else '"') in body:
        return None, pos
    items = [s.strip() for s in body.split(",")]
    if len(items) > 1 and not items[-1]:
        items.pop()                                                   # trailing comma
    joined = ",".join(items)
    # every item is quote...quote with no quote inside: k items, 2k quotes, k-1 quote-comma-quote joints
    if (min(map(len, items)) < 2 or not (joined.startswith(quote) and joined.endswith(quote))
            or joined.count(quote) != 2 * len(items) or joined.count(quote + "," + quote) != len(items) - 1):
        return None, pos
    return [s[1:-1] for s in items], end + 1


def parse_video2frames(text: str, path="video2frames.txt") -> dict[str, list[str]]:
    """Parse the dict literal of ``video2frames.txt`` safely; errors name the line."""

    def fail(pos: int, what: str) -> DataError:
        line = text.count("\n", 0, pos) + 1
        snippet = text[pos:pos + 40].split("\n", 1)[0]
        return _fail(path, f"line {line}", f"{what}, found {snippet!r}" if snippet else f"{what}, found the end of the file")

    def skip(pos: int) -> int:
        return _WS_RE.match(text, pos).end()

    pos = skip(0)
    if not text.startswith("{", pos):
        raise fail(pos, "expected a dict literal {'video_id': ['frame_id', ...], ...} starting with '{'")
    pos = skip(pos + 1)
    out: dict[str, list[str]] = {}
    while not text.startswith("}", pos):
        m = _STR_RE.match(text, pos)
        if m is None:
            raise fail(pos, "expected a quoted video id or '}'")
        key = _decode_str(m.group())
        if key in out:
            raise fail(pos, f"duplicate video id {key!r}")
        pos = skip(m.end())
        if not text.startswith(":", pos):
            raise fail(pos, f"expected ':' after video id {key!r}")
        pos = skip(pos + 1)
        frames, end = _plain_list(text, pos)
        if frames is None:
            m = _LIST_RE.match(text, pos)
            if m is None:
                raise fail(pos, f"expected a list of quoted frame ids for video {key!r}")
            frames, end = [_decode_str(s) for s in _STR_RE.findall(text, m.start(), m.end())], m.end()
        out[key] = frames
        pos = skip(end)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
        elif not text.startswith("}", pos):
            raise fail(pos, f"expected ',' or '}}' after the frames of video {key!r}")
    pos = skip(pos + 1)
    if pos != len(text):
        raise fail(pos, "unexpected text after the closing '}'")
    return out


# --------------------------------------------------------------------------- BigFile

@dataclass(frozen=True)
class _BigFileIndex:
    folder: Path
    num_rows: int
    dim: int
    row_of: dict            # frame id -> row
    video2frames: dict      # video id -> [frame id, ...]


def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _bigfile_index(folder: Path) -> _BigFileIndex:
    """The parsed index of a BigFile folder, cached per process while its files are unchanged."""
    missing = [name for name in BIGFILE_FILES if not (folder / name).is_file()]
    if missing:
        raise _fail(folder, None, f"not a complete BigFile folder: missing {', '.join(missing)} "
                                  f"(expected {', '.join(BIGFILE_FILES)})")
    stamp = tuple(_file_stamp(folder / name) for name in BIGFILE_FILES)
    return _parse_bigfile(folder.resolve(), stamp)


@functools.lru_cache(maxsize=2)     # the splits of a collection share one folder; real indexes are large
def _parse_bigfile(folder: Path, stamp: tuple) -> _BigFileIndex:
    shape_file = folder / "shape.txt"
    shape_text = _read_text(shape_file)
    parts = shape_text.split()
    try:
        num_rows, dim = (int(p) for p in parts)
        if num_rows <= 0 or dim <= 0:
            raise ValueError
    except ValueError:
        raise _fail(shape_file, "line 1", f"expected two positive integers 'N D', got {shape_text.strip()!r}") from None

    feature_file = folder / "feature.bin"
    size = dict(zip(BIGFILE_FILES, stamp))["feature.bin"][1]
    if size != num_rows * dim * 4:
        raise _fail(feature_file, None, f"size is {size} bytes but shape.txt says {num_rows} x {dim} float32 "
                                        f"= {num_rows * dim * 4} bytes (truncated or wrong shape.txt)")

    id_file = folder / "id.txt"
    ids = _read_text(id_file).split()
    if len(ids) != num_rows:
        raise _fail(id_file, None, f"holds {len(ids)} frame ids but shape.txt says N = {num_rows} rows")
    row_of = {frame: row for row, frame in enumerate(ids)}
    if len(row_of) != num_rows:
        seen: set = set()
        dup = next(f for f in ids if f in seen or seen.add(f))
        raise _fail(id_file, f"frame id {dup!r}", "appears more than once")

    v2f_file = folder / "video2frames.txt"
    video2frames = parse_video2frames(_read_text(v2f_file), v2f_file)
    return _BigFileIndex(folder, num_rows, dim, row_of, video2frames)


def _bigfile_folders(feature_root: Path) -> list[str]:
    return sorted(d.name for d in feature_root.iterdir()
                  if d.is_dir() and any((d / name).exists() for name in BIGFILE_FILES))


# --------------------------------------------------------------------------- HDF5, per process

class _H5:
    """An HDF5 file opened lazily once per process (a handle inherited through fork is not reused)."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None
        self._pid = None

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._pid = None

    def get(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = _open_h5(self.path)
            self._pid = os.getpid()
        return self._file

    def read(self, key: str, rows: int | None = None) -> np.ndarray:
        """Dataset ``key`` as float32 (its first ``rows`` rows if given). The low-level API costs a
        fraction of ``File[key][...]`` per small dataset, which matters at one read per item."""
        try:
            ds = h5py.h5d.open(self.get().id, key.encode("utf-8"))
        except KeyError as e:          # absent, or a group
            what = "is not a dataset" if "not a dataset" in str(e) else "missing"
            raise _fail(self.path, f"key {key!r}", what) from None
        shape = ds.shape
        memory_space = file_space = h5py.h5s.ALL
        if rows is not None and len(shape) == 2 and shape[0] > rows:
            shape = (rows, shape[1])
            file_space = ds.get_space()
            file_space.select_hyperslab((0, 0), shape)
            memory_space = h5py.h5s.create_simple(shape)
        out = np.empty(shape, dtype=np.float32)
        if out.size:
            try:
                ds.read(memory_space, file_space, out, mtype=h5py.h5t.NATIVE_FLOAT)
            except (OSError, TypeError, ValueError) as e:
                raise _fail(self.path, f"key {key!r}", f"cannot be read as float32 ({e})") from None
        return out

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, None, f"cannot be opened as HDF5 ({e})") from None


def _check_keys(h5: _H5, wanted: Sequence[str], kind: str, owner: dict[str, str] | None = None) -> None:
    keys = set(h5.get().keys())
    for key in wanted:
        if key not in keys:
            extra = f" (caption {owner[key]!r})" if owner and key in owner else ""
            raise _fail(h5.path, f"key {key!r}", f"missing: no {kind} for it{extra}")


def _dim_of(h5: _H5, key: str, layouts: Sequence[int]) -> int:
    ds = h5.get()[key]
    if not isinstance(ds, h5py.Dataset) or ds.ndim not in layouts or ds.shape[-1] == 0:
        shape = getattr(ds, "shape", "a group")
        raise _fail(h5.path, f"key {key!r}", f"expected a float array with {' or '.join(map(str, layouts))} dims, got {shape}")
    return int(ds.shape[-1])


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
            Each process (e.g. each DataLoader worker) has its own.

    Attributes: ``video_ids`` (videos with a caption in this split, sorted), ``cap_ids`` (file
    order), ``cap_video`` / ``video_caps`` (caption -> video index, video -> caption indices),
    ``captions``, ``moments`` (empty without a moments file), ``visual_dim``, ``text_dim``,
    ``teacher_dim`` / ``has_teacher``.

    Example:
        >>> data = PRVRCollection(root, "synthetic", "train")
        >>> data.video(0).shape                        # (frames <= max_frames, Dv)
        >>> data.query(data.video_caps[0][0]).shape    # (tokens <= max_tokens, Dq)
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
        """Close the HDF5 files and drop the memory map (reading again reopens them)."""
        for h5 in (self._text, self._teacher_video, self._teacher_query):
            if h5 is not None:
                h5.close()
        self._features = self._features_pid = None

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
        cache when there (read-only: callers that keep it must copy)."""
        x = self._cache.get((kind, i))
        if x is None:
            if kind.startswith("teacher") and not self.has_teacher:
                raise RuntimeError(f"collection {self.collection!r} ({self.split}) was opened without teacher features")
            x = getattr(self, "_load_" + kind)(i)
            if self._cached_bytes + x.nbytes <= self.cache_bytes:
                x.flags.writeable = False
                self._cache[(kind, i)] = x
                self._cached_bytes += x.nbytes
        return x

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
        return l2_normalize(bin_average(x, self.max_frames))

    def _load_query(self, j: int) -> np.ndarray:
        key = self.cap_ids[j]
        x = self._text.read(key, rows=self.max_tokens)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.text_dim:
            raise _fail(self._text.path, f"key {key!r}", f"expected [n_tokens >= 1, {self.text_dim}], got {x.shape}")
        return l2_normalize(x[:self.max_tokens])

    def _load_teacher_video(self, i: int) -> np.ndarray:
        key = self.video_ids[i]
        x = self._teacher_video.read(key)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.teacher_dim:
            raise _fail(self._teacher_video.path, f"key {key!r}", f"expected [n_frames >= 1, {self.teacher_dim}], got {x.shape}")
        return l2_normalize(resample_to_grid(x, self.num_frames(i), self.max_frames))

    def _load_teacher_query(self, j: int) -> np.ndarray:
        key = self.cap_ids[j]
        x = self._teacher_query.read(key)
        if x.shape not in ((self.teacher_dim,), (1, self.teacher_dim)):
            raise _fail(self._teacher_query.path, f"key {key!r}", f"expected [1, {self.teacher_dim}], got {x.shape}")
        return l2_normalize(x.reshape(-1))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_features"] = state["_features_pid"] = None
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state

    def __repr__(self) -> str:
        return (f"PRVRCollection({self.collection!r}, split={self.split!r}, videos={len(self.video_ids)}, "
                f"queries={len(self.cap_ids)}, Dv={self.visual_dim}, Dq={self.text_dim}, Dt={self.teacher_dim})")


# --------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """Padded tensors of B videos and Nq queries (CPU; :meth:`to` returns a moved copy).

    ``query_video[j]`` is the batch position (``0..B-1``) of query j's video. In
    :func:`query_batches` (no videos in the batch) it is the index into ``collection.video_ids``,
    i.e. the position in the concatenation of :func:`video_batches`.
    """

    videos: torch.Tensor                    # [B, L, Dv] float32, zero-padded
    video_lengths: torch.Tensor             # [B] int64
    queries: torch.Tensor                   # [Nq, Lq, Dq] float32, zero-padded
    query_lengths: torch.Tensor             # [Nq] int64
    query_video: torch.Tensor               # [Nq] int64
    teacher_videos: torch.Tensor | None     # [B, L, Dt]
    teacher_queries: torch.Tensor | None    # [Nq, Dt]
    video_index: torch.Tensor               # [B] int64, into collection.video_ids
    query_index: torch.Tensor               # [Nq] int64, into collection.cap_ids

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=non_blocking)
                 for f in fields(self)}
        return replace(self, **moved)


def _pad(arrays: list[np.ndarray], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, dim]`` arrays into a zero-padded ``[len, max n_i, dim]`` tensor and lengths."""
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    out = np.zeros((len(arrays), int(lengths.max(initial=0)), dim), dtype=np.float32)
    for k, a in enumerate(arrays):
        out[k, :a.shape[0]] = a
    return torch.from_numpy(out), torch.from_numpy(lengths)


def _make_batch(data: PRVRCollection, videos: Sequence[int], queries: Sequence[int], query_video: Sequence[int]) -> Batch:
    v, v_len = _pad([data._item("video", i) for i in videos], data.visual_dim)
    q, q_len = _pad([data._item("query", j) for j in queries], data.text_dim)
    tv = tq = None
    if data.has_teacher:
        tv, _ = _pad([data._item("teacher_video", i) for i in videos], data.teacher_dim)
        tq = torch.from_numpy(np.stack([data._item("teacher_query", j) for j in queries]) if len(queries)
                              else np.zeros((0, data.teacher_dim), dtype=np.float32))
    return Batch(
        videos=v, video_lengths=v_len, queries=q, query_lengths=q_len,
        query_video=torch.as_tensor(np.asarray(query_video, dtype=np.int64)),
        teacher_videos=tv, teacher_queries=tq,
        video_index=torch.as_tensor(np.asarray(videos, dtype=np.int64)),
        query_index=torch.as_tensor(np.asarray(queries, dtype=np.int64)),
    )


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _subset(data: PRVRCollection, subset, queries: bool = False) -> np.ndarray:
    n, name = (len(data.cap_ids), "query_subset") if queries else (len(data.video_ids), "video_subset")
    if subset is None:
        return np.arange(n, dtype=np.int64)
    idx = np.asarray(subset, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} must hold {'query' if queries else 'video'} indices in [0, {n}), "
                         f"got values in [{idx.min()}, {idx.max()}]")
    return idx


def num_train_batches(collection: PRVRCollection, batch_size: int, drop_last: bool = False, video_subset=None) -> int:
    """Number of batches :func:`train_batches` yields with these arguments."""
    _check_batch_size(batch_size)
    n = len(_subset(collection, video_subset))
    return n // batch_size if drop_last else -(-n // batch_size)


def train_batches(collection: PRVRCollection, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  drop_last: bool = False, video_subset=None) -> Iterator[Batch]:
    """Batches of ``batch_size`` videos with **all** their captions, each video once per epoch.

    The video order is ``np.random.default_rng((seed, epoch)).permutation`` of the videos (or of
    ``video_subset``) when ``shuffle``, else their index order; queries follow their videos in
    caption-file order.

    Example:
        >>> for batch in train_batches(data, 128, seed=0, epoch=3):
        ...     batch.videos.shape, batch.queries.shape    # [B, L, Dv], [Nq, Lq, Dq]
    """
    _check_batch_size(batch_size)
    order = _subset(collection, video_subset)
    if shuffle:
        order = order[np.random.default_rng((seed, epoch)).permutation(len(order))]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        videos = order[start:start + batch_size].tolist()
        queries, query_video = [], []
        for pos, i in enumerate(videos):
            queries.extend(collection.video_caps[i])
            query_video.extend([pos] * len(collection.video_caps[i]))
        yield _make_batch(collection, videos, queries, query_video)


def video_batches(collection: PRVRCollection, batch_size: int, video_subset=None) -> Iterator[Batch]:
    """Videos in index order (or ``video_subset`` order), ``batch_size`` at a time, no queries."""
    _check_batch_size(batch_size)
    order = _subset(collection, video_subset).tolist()
    for start in range(0, len(order), batch_size):
        yield _make_batch(collection, order[start:start + batch_size], [], [])


def query_batches(collection: PRVRCollection, batch_size: int, query_subset=None) -> Iterator[Batch]:
    """Queries in caption-file order (or ``query_subset`` order), ``batch_size`` at a time, no
    videos; ``query_video`` indexes ``video_ids``."""
    _check_batch_size(batch_size)
    order = _subset(collection, query_subset, queries=True).tolist()
    for start in range(0, len(order), batch_size):
        queries = order[start:start + batch_size]
        yield _make_batch(collection, [], queries, [collection.cap_video[j] for j in queries])
