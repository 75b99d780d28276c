"""Readers of the MS-SL layout files: caption and moment lists, ``video2frames.txt``, BigFile
folders and HDF5 feature files, with errors that name the file, the line or key and what is wrong.

File layout and what each file holds: see :mod:`kdcnet.data`. Nothing here transforms features;
:class:`kdcnet.data.PRVRCollection` builds on these readers.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

SPLITS = ("train", "val", "test")
BIGFILE_FILES = ("feature.bin", "id.txt", "shape.txt", "video2frames.txt")


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

    def _dataset(self, key: str):
        try:
            return h5py.h5d.open(self.get().id, key.encode("utf-8"))
        except KeyError as e:          # absent, or a group
            what = "is not a dataset" if "not a dataset" in str(e) else "missing"
            raise _fail(self.path, f"key {key!r}", what) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of dataset ``key`` (metadata only: no values are read)."""
        return tuple(self._dataset(key).shape)

    def read(self, key: str, rows: int | None = None) -> np.ndarray:
        """Dataset ``key`` as float32 (its first ``rows`` rows if given). The low-level API costs a
        fraction of ``File[key][...]`` per small dataset, which matters at one read per item."""
        ds = self._dataset(key)
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

