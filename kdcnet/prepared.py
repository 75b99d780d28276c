r"""The prepared cache: one split's features exactly as training consumes them, in contiguous arrays.

Reading a split from the MS-SL files costs per-item work every epoch: bin-averaging each video to
``max_frames``, mapping the teacher onto its frame grid, an L2 norm per frame and token, one HDF5
read per caption. The prepared cache does that work once. :func:`prepare_split` reads every item
of a :class:`kdcnet.data.PRVRCollection` through the same code as the unprepared path (so a float32
cache holds bit-identical values), checks every value is finite, and packs the items into one
array per kind:

=====================  ======================  ==============================================
file                   shape                   rows
=====================  ======================  ==============================================
``videos.npy``         ``[Rv + 1, Dv]``        video ``i``: ``video_offsets[i]:video_offsets[i+1]``
``teacher_videos.npy`` ``[Rv + 1, Dt]``        on the same offsets (the teacher's frame grid)
``queries.npy``        ``[Rq + 1, Dq]``        caption ``j``: ``query_offsets[j]:query_offsets[j+1]``
``teacher_queries.npy````[Nq, Dt]``            caption ``j``: row ``j``
``video_offsets.npy``  ``[Nv + 1]`` int64
``query_offsets.npy``  ``[Nq + 1]`` int64
``index.json``         the key, shapes, dtype, size and build time
=====================  ======================  ==============================================

The last row of ``videos``, ``teacher_videos`` and ``queries`` is zero: a padded position of a batch
gathers it, so one gather (``array[index]`` on the host, ``index_select`` on a device) writes a
whole zero-padded ``[B, L, D]`` tensor with no loop over items (:meth:`PreparedSplit.batch`).

**Key.** A cache folder ``<cache_dir>/<collection>-<split>-<digest>`` is named by the settings that
change its content (data root, collection, split, feature folder, ``max_frames``, ``max_tokens``,
whether the teacher is included, dtype, :data:`FORMAT_VERSION`), and its ``index.json`` records the
identity (path, size, modification time) of every source file (:meth:`PRVRCollection.source_files`).
A cache whose settings or sources differ is rebuilt in place; bump :data:`FORMAT_VERSION` whenever the
preparation code changes what it writes.

**Atomic.** A build writes into a temporary folder beside the final one (files flushed to disk),
then renames it into place; a killed build leaves only the temporary folder, which the next
build removes. Builds of one folder are serialised with an OS file lock (``fcntl.flock``, released
by the kernel when a process dies), so concurrent runs (or the ranks of a torchrun job) build once.

**dtype.** ``float32`` caches hold the unprepared path's values bit for bit. ``float16`` halves the
size: every value is the round-to-nearest float16 of the float32 one. The features are L2-normalised
(every value in ``[-1, 1]``, far inside float16's range), so the rounding error is at most ``2^-11``
of a value (``2^-25`` absolute below float16's normal range, ``2^-14``): 8 times below the ``2^-8``
relative rounding that bf16 autocast applies to the same inputs in the first layer on a GPU, which
is where ``auto`` picks it (:func:`resolve_dtype`). A batch holds float16 until
:meth:`kdcnet.batches.Batch.to` turns it into float32 (exactly) on the training device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("kdcnet")

FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_PADDED = ("videos", "teacher_videos", "queries")   # arrays with a trailing zero row


def cache_root(cache_dir=None) -> Path:
    """Where prepared caches live: ``cache_dir``, else ``$KDC_CACHE_DIR/prepared`` (default
    ``~/.cache/kdcnet/prepared``)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    base = os.environ.get("KDC_CACHE_DIR", "").strip() or "~/.cache/kdcnet"
    return Path(base).expanduser() / "prepared"


def resolve_dtype(cache_dtype: str, device: str = "auto", bf16: bool = True) -> str:
    """The storage dtype of ``data.cache_dtype``: ``auto`` is float16 where training runs on a GPU
    under bf16 autocast (the float16 rounding is far below autocast's, see the module doc), else
    float32 (batches bit-identical to the unprepared path)."""
    if cache_dtype != "auto":
        return cache_dtype
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "float16" if gpu and bf16 else "float32"


# ------------------------------------------------------------------------------------------ key


def _key(collection, dtype: str) -> dict:
    settings = {"format": FORMAT_VERSION, "root": str(Path(collection.root).resolve()),
                "collection": collection.collection, "split": collection.split,
                "visual_feature": collection.visual_feature, "max_frames": collection.max_frames,
                "max_tokens": collection.max_tokens, "teacher": collection.has_teacher, "dtype": dtype}
    sources = []
    for path in collection.source_files():
        st = path.stat()
        sources.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return {"settings": settings, "sources": sources}


def _folder_name(key: dict) -> str:
    s = key["settings"]
    digest = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", s["collection"])
    return f"{name}-{s['split']}-{digest}"


def _why_stale(index: dict | None, key: dict) -> str | None:
    """None when ``index`` (a cache's index.json) matches ``key``, else what differs."""
    if index is None:
        return "no prepared cache yet"
    if index.get("key", {}).get("settings") != key["settings"]:
        return "it was written with other settings"
    old = {p: (size, mtime) for p, size, mtime in index["key"].get("sources", [])}
    for path, size, mtime in key["sources"]:
        if old.get(path) != (size, mtime):
            return f"{path} changed since it was prepared"
    if len(old) != len(key["sources"]):
        return "its source files differ"
    return None


# --------------------------------------------------------------------------------------- arrays


class PreparedSplit:
    """The prepared arrays of one split: read-only memory maps of the cache files, or tensors held
    on a device after :meth:`to`. Offsets stay NumPy arrays in host memory (batch plans are
    computed there). Built and opened by :func:`prepare_split`."""

    def __init__(self, folder: Path, index: dict, arrays: dict, video_offsets: np.ndarray,
                 query_offsets: np.ndarray, device: torch.device | None = None):
        self.folder = folder
        self.index = index
        self.arrays = arrays                     # name -> np.ndarray (memory map) or torch.Tensor (device)
        self.video_offsets = video_offsets
        self.query_offsets = query_offsets
        self.device = device                     # None: host memory maps
        self.built = False                       # whether prepare_split built it (else it was up to date)

    @property
    def dtype(self) -> str:
        return self.index["key"]["settings"]["dtype"]

    @property
    def has_teacher(self) -> bool:
        return "teacher_videos" in self.arrays

    @property
    def nbytes(self) -> int:
        """Bytes of the feature arrays (what holding them on a device takes)."""
        return int(sum(a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
                       for a in self.arrays.values()))

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: Path, key: dict, collection) -> tuple["PreparedSplit | None", str | None]:
        """``(split, None)`` when ``folder`` holds a complete cache matching ``key`` and
        ``collection``, else ``(None, reason)``."""
        try:
            index = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError):
            index = None
        try:
            reason = _why_stale(index, key)
            if reason is not None:
                return None, reason
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r").view(np.ndarray)
                      for name in index["arrays"]}
            voff = np.load(folder / "video_offsets.npy")
            qoff = np.load(folder / "query_offsets.npy")
            for name, spec in index["arrays"].items():
                if list(arrays[name].shape) != spec["shape"] or str(arrays[name].dtype) != spec["dtype"]:
                    return None, f"{name}.npy is {arrays[name].shape} {arrays[name].dtype}, index.json says {spec}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return None, f"it cannot be read ({type(e).__name__}: {e})"
        want_v = np.minimum(np.diff(collection._offsets), collection.max_frames)
        if (len(voff) != len(collection.video_ids) + 1 or len(qoff) != len(collection.cap_ids) + 1
                or not np.array_equal(np.diff(voff), want_v) or voff[-1] + 1 != len(arrays["videos"])
                or qoff[-1] + 1 != len(arrays["queries"])):
            return None, "its offsets do not match the collection"
        return cls(folder, index, arrays, voff, qoff), None

    def to(self, device) -> "PreparedSplit":
        """The same arrays as tensors on ``device`` (copied in chunks of at most 256 MiB; on the CPU
        they are read into memory). Offsets stay on the host."""
        device = torch.device(device)
        arrays = {}
        for name, a in self.arrays.items():
            a = a if isinstance(a, np.ndarray) else a.cpu().numpy()
            out = torch.empty(a.shape, dtype=_TORCH_DTYPES[a.dtype.name], device=device)
            step = max(1, (256 << 20) // max(1, a[:1].nbytes))
            for start in range(0, len(a), step):
                out[start:start + step].copy_(torch.from_numpy(np.array(a[start:start + step])))
            arrays[name] = out
        return PreparedSplit(self.folder, self.index, arrays, self.video_offsets, self.query_offsets, device)

    def __getstate__(self):
        return {"folder": self.folder, "index": self.index, "video_offsets": self.video_offsets,
                "query_offsets": self.query_offsets}

    def __setstate__(self, state):
        arrays = {name: np.load(state["folder"] / f"{name}.npy", mmap_mode="r").view(np.ndarray)
                  for name in state["index"]["arrays"]}
        self.__init__(state["folder"], state["index"], arrays, state["video_offsets"], state["query_offsets"])

    # ----------------------------------------------------------------- reading

    def item(self, kind: str, i: int) -> np.ndarray:
        """One item as :meth:`PRVRCollection.video` & co. return it (float32, read-only)."""
        name = {"video": "videos", "teacher_video": "teacher_videos", "query": "queries",
                "teacher_query": "teacher_queries"}[kind]
        a = self.arrays[name]
        if kind == "teacher_query":
            x = a[i]
        else:
            off = self.query_offsets if kind == "query" else self.video_offsets
            x = a[off[i]:off[i + 1]]
        x = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
        x = x.astype(np.float32) if x.dtype != np.float32 else x
        x.flags.writeable = False
        return x

    def _gather(self, name: str, index: np.ndarray, pin_memory: bool, buffers: "BufferRing | None") -> torch.Tensor:
        """``array[index]``: rows of ``name`` at ``index`` (any shape) -> ``[*index.shape, D]``."""
        a = self.arrays[name]
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                idx = torch.from_numpy(index.reshape(-1)).to(a.device, non_blocking=True)
                return a.index_select(0, idx).view(*index.shape, a.shape[1])
            a = a.numpy()                  # held on the CPU: gathered like the memory maps
        shape = (index.size, a.shape[1])
        if pin_memory:   # page-locked (torch recycles these blocks), for an asynchronous copy to the GPU
            out = torch.empty(shape, dtype=_TORCH_DTYPES[a.dtype.name], pin_memory=True)
        elif buffers is not None:
            out = buffers.take(name, shape, a.dtype)
        else:            # NumPy puts large arrays on huge pages: far fewer page faults than torch.empty
            out = torch.from_numpy(np.empty(shape, dtype=a.dtype))
        # One thread, no OpenMP team: on a busy machine a team's barrier waits for descheduled
        # workers, and the loading thread must not compete with the step's threads. "clip" makes
        # NumPy write straight into `out` (the indices are in range by construction).
        np.take(a, index.reshape(-1), axis=0, out=out.numpy(), mode="clip")
        return out.view(*index.shape, shape[1])

    def _padded(self, name: str, offsets: np.ndarray, items: np.ndarray, pin_memory: bool, buffers):
        """Items ``items`` of ``name`` zero-padded to the longest: ``([n, L, D], lengths [n])``."""
        starts = offsets[items]
        lengths = offsets[items + 1] - starts
        pos = np.arange(int(lengths.max(initial=0)), dtype=np.int64)
        index = np.where(pos < lengths[:, None], starts[:, None] + pos, len(self.arrays[name]) - 1)
        return self._gather(name, index, pin_memory, buffers), lengths

    def batch(self, videos: np.ndarray, queries: np.ndarray, query_video: np.ndarray, pin_memory: bool = False,
              buffers: "BufferRing | None" = None):
        """The :class:`kdcnet.batches.Batch` of ``videos`` and ``queries`` (int64 index arrays):
        one gather per tensor, in the cache's dtype, on the arrays' device; on the host into fresh
        memory, page-locked memory (``pin_memory``) or the next slot of ``buffers``."""
        from .batches import Batch

        if buffers is not None:
            buffers.advance()
        v, v_len = self._padded("videos", self.video_offsets, videos, pin_memory, buffers)
        q, q_len = self._padded("queries", self.query_offsets, queries, pin_memory, buffers)
        tv = tq = None
        if self.has_teacher:
            tv, _ = self._padded("teacher_videos", self.video_offsets, videos, pin_memory, buffers)
            tq = self._gather("teacher_queries", queries, pin_memory, buffers)
        ints = [torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
                for x in (v_len, q_len, query_video, videos, queries)]
        if self.device is not None:
            ints = [x.to(self.device, non_blocking=True) for x in ints]
        return Batch(videos=v, video_lengths=ints[0], queries=q, query_lengths=ints[1], query_video=ints[2],
                     teacher_videos=tv, teacher_queries=tq, video_index=ints[3], query_index=ints[4])


class BufferRing:
    """Host memory recycled over consecutive batches: batch ``n`` is written into slot
    ``n % slots``, so its feature tensors stay valid only until ``slots - 1`` more batches have
    been made. Writing into memory that is already mapped skips the page faults and the kernel's
    zeroing of fresh memory, about a third of a host batch's cost (see the input benchmark).

    Safe for a consumer that drops each batch before it asks for the next one when at most
    ``slots - 2`` batches wait in a queue between producer and consumer (:mod:`kdcnet.loader`)."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        self.slots = slots
        self._slots: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self._made = 0
        self._slot = self._slots[0]

    def advance(self) -> None:
        """Move to the next batch's slot."""
        self._slot = self._slots[self._made % len(self._slots)]
        self._made += 1

    def take(self, name: str, shape: tuple[int, int], dtype) -> torch.Tensor:
        """A ``[rows, D]`` tensor of the current slot (its buffer grows when too small)."""
        buf = self._slot.get(name)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
            buf = self._slot[name] = torch.from_numpy(np.empty((max(shape[0], 1), shape[1]), dtype=dtype))
        return buf[:shape[0]]


# ---------------------------------------------------------------------------------------- build


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive OS lock on ``path`` for the duration (released by the kernel if we die)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, renames stay atomic
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _build(collection, folder: Path, key: dict, progress: bool | None) -> None:
    """Read every item of ``collection`` (checked) into a new cache, then rename it to ``folder``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    dtype = DTYPES[key["settings"]["dtype"]]
    nv, nq = len(collection.video_ids), len(collection.cap_ids)
    vlen = np.minimum(np.diff(collection._offsets), collection.max_frames)
    # token counts from the HDF5 metadata; a bad entry is reported by the item read below
    qlen = np.array([min(shape[0], collection.max_tokens) if len(shape) == 2 else 0
                     for shape in map(collection._text.shape, collection.cap_ids)], dtype=np.int64)
    voff, qoff = _offsets(vlen), _offsets(qlen)
    shapes = {"videos": (int(voff[-1]) + 1, collection.visual_dim), "queries": (int(qoff[-1]) + 1, collection.text_dim)}
    if collection.has_teacher:
        shapes.update(teacher_videos=(int(voff[-1]) + 1, collection.teacher_dim),
                      teacher_queries=(nq, collection.teacher_dim))

    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        out = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
               for name, shape in shapes.items()}
        disable = not os.isatty(2) if progress is None else not progress
        with tqdm(total=nv + nq, desc=f"preparing {collection.collection} {collection.split}", leave=False,
                  disable=disable, dynamic_ncols=True, unit="item") as bar:
            for i in range(nv):
                out["videos"][voff[i]:voff[i + 1]] = collection.read_item("video", i)
                if collection.has_teacher:
                    out["teacher_videos"][voff[i]:voff[i + 1]] = collection.read_item("teacher_video", i)
                bar.update()
            for j in range(nq):
                x = collection.read_item("query", j)
                if len(x) != qlen[j]:  # pragma: no cover - the HDF5 shape and the read disagree
                    raise RuntimeError(f"{collection._text.path}: key {collection.cap_ids[j]!r}: read {len(x)} tokens, "
                                       f"its shape says {qlen[j]}")
                out["queries"][qoff[j]:qoff[j + 1]] = x
                if collection.has_teacher:
                    out["teacher_queries"][j] = collection.read_item("teacher_query", j)
                bar.update()
        for name in _PADDED:
            if name in out:
                out[name][-1] = 0
        for name, a in out.items():
            a.flush()
            _fsync(tmp / f"{name}.npy")
        del out
        np.save(tmp / "video_offsets.npy", voff)
        np.save(tmp / "query_offsets.npy", qoff)
        nbytes = sum((tmp / f"{name}.npy").stat().st_size for name in shapes)
        index = {"key": key, "arrays": {name: {"shape": list(shape), "dtype": np.dtype(dtype).name}
                                        for name, shape in shapes.items()},
                 "videos": nv, "queries": nq, "bytes": nbytes, "build_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "index.json").write_text(json.dumps(index, indent=1) + "\n")
        for name in ("video_offsets.npy", "query_offsets.npy", "index.json"):
            _fsync(tmp / name)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s %s in %.1f s: %d videos, %d captions, %.2f GB (%s) in %s", collection.collection,
             collection.split, time.perf_counter() - t0, nv, nq, nbytes / 1e9, np.dtype(dtype).name, folder)


def prepare_split(collection, cache_dir=None, dtype: str = "float32", progress: bool | None = None) -> PreparedSplit:
    """The :class:`PreparedSplit` of ``collection``: opened when the cache exists and matches the
    source files and settings, else built first (see the module doc). Raises
    :class:`kdcnet.data.DataError` for a bad item (naming the file and the video or caption id)
    and OSError when the cache folder cannot be written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    root = cache_root(cache_dir)
    key = _key(collection, dtype)
    folder = root / _folder_name(key)
    split, reason = PreparedSplit.open(folder, key, collection)
    if split is not None:
        return split
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{root}: cannot create the prepared-cache folder ({e.strerror or e}); "
                      f"choose another with --set data.cache_dir=DIR") from None
    with _locked(root / f".{folder.name}.lock"):
        split, reason = PreparedSplit.open(folder, key, collection)   # built by another process meanwhile?
        if split is None:
            for stale in root.glob(f".{folder.name}.building-*"):    # left by a killed build
                shutil.rmtree(stale, ignore_errors=True)
            log.info("preparing %s %s (%s) into %s", collection.collection, collection.split, reason, folder)
            _build(collection, folder, key, progress)
            split, reason = PreparedSplit.open(folder, key, collection)
            if split is None:  # pragma: no cover - a build that cannot be read back is a bug
                raise RuntimeError(f"{folder}: the prepared cache just written cannot be opened: {reason}")
            split.built = True
    return split
