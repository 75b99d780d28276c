"""The run folder: one owner at a time, its log, config, checkpoints and metrics, written atomically.

A :class:`RunDir` is what the trainer, the evaluation and the ablation hold instead of a path:

| file | written by |
| --- | --- |
| ``.lock`` | :meth:`RunDir.open`: an OS file lock (``flock``) held while a process owns the folder |
| ``config.json``, ``git_commit.txt``, ``environment.txt`` | :meth:`RunDir.write_metadata` |
| ``train.log``, ``events.out.tfevents.*`` | :meth:`RunDir.open_log` (TensorBoard when installed) |
| ``metrics.jsonl`` | :meth:`RunDir.write_metrics`: the whole history, rewritten atomically per epoch |
| ``last.pt``, ``best.pt`` | :meth:`RunDir.save_checkpoint` / :meth:`RunDir.load_checkpoint` |
| anything else (``<split>_metrics.json``, ``ablation.json``) | :meth:`RunDir.write` |

Ownership. :meth:`RunDir.open` takes an exclusive, non-blocking ``flock`` on ``.lock``; a second
process (a second training, a resume, an evaluation) on the same folder is refused with a
ValueError naming the folder and the holder. The kernel releases the lock when its process ends,
however it ends (SIGKILL included), so a killed run never leaves the folder stuck; the ``.lock``
file itself stays (deleting it would let two processes lock two different files). Under torchrun
only rank 0 locks and writes; every rank learns whether it got the lock, and the other ranks'
write methods do nothing.

Atomic writes. :func:`atomic_write` writes a temporary file with a name unique to the process
and the call (``.<name>.<pid>.<random>.tmp``, so concurrent writers never share one), flushes it
to disk and renames it over the target: a kill at any moment leaves the old or the new file,
never a torn one. A killed writer can leave its temporary file behind; the next owner of the
folder removes every ``.*.tmp`` when it takes the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch

from . import config as C
from . import distributed as D

log = logging.getLogger("kdcnet")

LOCK_NAME = ".lock"
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "state", "rng", "config")


# ------------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (text as UTF-8, bytes, or a function that writes to a binary file) to
    ``path`` atomically: a uniquely named temporary file in the same folder, flushed to disk,
    then ``os.replace``. The temporary file is removed when writing fails. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the ``.*.tmp`` files a killed writer left in ``folder``; return them."""
    stale = sorted(folder.glob(".*.tmp"))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


# ------------------------------------------------------------------------------------- naming


def default_run_dir(cfg: C.Config, kind: str = "") -> Path:
    """``runs/<preset>[-<kind>]-<YYYYmmdd-HHMMSS>`` by rank 0's clock (the same on every rank)."""
    stamp = D.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / "-".join(part for part in (cfg.preset, kind, stamp) if part)


def source_commit() -> str:
    """``git describe --always --dirty`` of the tree this package was loaded from, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def json_ready(x):
    """``x`` with NaN floats replaced by None (strict JSON)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)) and math.isnan(x):
        return None
    return x


# --------------------------------------------------------------------------------- the folder


class RunDir:
    """A run folder owned by this process (see the module doc). Use :meth:`open`."""

    def __init__(self, path: str | os.PathLike, *, main: bool = True, flag: str = "--run-dir") -> None:
        self.path = Path(path)
        self.main = main  # the process that writes (rank 0)
        self.flag = flag  # how the command line names the folder, for messages
        self._lock_fd: int | None = None
        self._handler: logging.Handler | None = None
        self._tb = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ ownership

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | os.PathLike, *, create: bool, flag: str = "--run-dir") -> Iterator["RunDir"]:
        """Own the folder ``path`` for the duration (created first when ``create``; otherwise it
        must exist). Raises ValueError, on every rank, when another process owns it."""
        run = cls(path, main=D.current().is_main, flag=flag)
        error = None
        if run.main:
            try:
                run._acquire(create)
            except ValueError as err:
                error = str(err)
        error = D.broadcast_object(error)
        if error is not None:
            run.close()
            raise ValueError(error)
        try:
            yield run
        finally:
            run.close()

    def _acquire(self, create: bool) -> None:
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise ValueError(f"{self.flag} {self.path}: no such folder")
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl
        except ImportError:  # no flock on this platform (Windows): run unguarded, say so
            log.warning("no file locks on this platform: nothing stops a second process from using %s", self.path)
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ValueError(f"{self.flag} {self.path} is in use by another kdcnet process"
                             f"{f' ({holder})' if holder else ''}; wait for it to end or choose another folder") from None
        except OSError as err:  # a filesystem without locks (some network mounts): run unguarded, say so
            log.warning("cannot lock %s (%s): nothing stops a second process from using this run folder",
                        lock, err.strerror or err)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n".encode())
        self._lock_fd = fd
        for p in remove_stale_temporaries(self.path):
            log.info("removed %s, left by a process killed while writing it", p.name)

    def close(self) -> None:
        """Close the log and release the folder (the kernel drops the lock with the descriptor)."""
        self.close_log()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ files

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write(self, name: str, content: str | bytes | Callable[[BinaryIO], None]) -> Path:
        """:func:`atomic_write` of ``name`` (rank 0 only; elsewhere nothing is written)."""
        path = self.path / name
        if self.main:
            atomic_write(path, content)
        return path

    def remove(self, *names: str) -> None:
        if self.main:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()

    def write_metadata(self, cfg: C.Config) -> None:
        """``config.json`` (the resolved config), ``git_commit.txt`` and ``environment.txt``."""
        if not self.main:
            return
        self.write("config.json", json.dumps(C.to_dict(cfg), indent=2) + "\n")
        self.write("git_commit.txt", source_commit() + "\n")
        from kdc_kernels.info import report

        self.write("environment.txt", report() + "\n")

    def write_metrics(self, history: list[dict]) -> None:
        """``metrics.jsonl``: one JSON line per finished epoch, the whole history at once (a kill
        never leaves a torn line, a rerun never appends to an abandoned attempt)."""
        self.write("metrics.jsonl", "".join(json.dumps(json_ready(h)) + "\n" for h in history))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, name: str, ckpt: dict) -> None:
        self.write(name, lambda f: torch.save(ckpt, f))

    def load_checkpoint(self, name: str, map_location="cpu", need: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
        """The checkpoint ``name`` as a dict holding at least the keys ``need``; a missing, empty,
        truncated or foreign file raises a one-line ValueError naming it and what is wrong."""
        path = self.path / name
        if not path.is_file():
            raise ValueError(f"{self.flag} {self.path}: no checkpoint {name}; is this a run folder of kdcnet train?")
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint")
        try:
            # weights_only=False: the checkpoint holds Python and numpy RNG states; only load run
            # folders you trust, as for any pickle
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as err:  # torch.load raises many types (EOFError, UnpicklingError, RuntimeError, ...)
            first = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")  # torch's advice omitted
            raise ValueError(f"{path}: cannot be read as a checkpoint, truncated or corrupt "
                             f"({size} bytes; {type(err).__name__}: {first})") from None
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: not a kdcnet checkpoint (a {type(ckpt).__name__}, expected a dict)")
        missing = [key for key in need if key not in ckpt]
        if missing:
            raise ValueError(f"{path}: not a kdcnet checkpoint (no {', '.join(missing)} entry)")
        if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
            raise ValueError(f"{path}: its 'model' entry is not a state dict of tensors")
        return ckpt

    # ------------------------------------------------------------------ log

    def open_log(self) -> None:
        """Append kdcnet's log to ``train.log``; TensorBoard events when ``tensorboard`` is installed."""
        if not self.main or self._handler is not None:
            return
        self._handler = logging.FileHandler(self.path / "train.log")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(self._handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path))
        except ImportError:
            log.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def log_scalars(self, record: dict, step: int) -> None:
        """The finite numbers of ``record`` as TensorBoard scalars at ``step`` (when enabled)."""
        if self._tb is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close_log(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
