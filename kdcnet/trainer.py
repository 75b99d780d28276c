"""Training: AdamW with linear warm-up then linear decay, grad-norm clipping, bf16 autocast on GPU,
early stopping on validation SumR, and a run folder that survives being killed.

Run folder (``--run-dir``, default ``runs/<preset>-<YYYYmmdd-HHMMSS>``; held by a
:class:`kdcnet.rundir.RunDir`, which owns it for one process at a time and writes every file
atomically):

| file | contents |
| --- | --- |
| ``config.json`` | the resolved config (dims read from the data filled in) |
| ``git_commit.txt`` | ``git describe --always --dirty`` of the source tree (or "unknown") |
| ``environment.txt`` | ``kdc_kernels.info.report()``: versions, devices, what each op runs on |
| ``train.log`` | the log |
| ``metrics.jsonl`` | one JSON line per epoch: each loss term, kd weight, lr, validation R@1/5/10/100 and SumR, steps/s, seconds |
| ``events.out.tfevents.*`` | TensorBoard events (when ``tensorboard`` is installed) |
| ``last.pt`` / ``best.pt`` | checkpoints after every epoch / at the best validation SumR |
| ``<split>_metrics.json`` | final evaluation of the best checkpoint |
| ``curves.png`` | each loss term and validation SumR per epoch (when matplotlib is installed) |
| ``<split>_mv_bins.png``, ``<split>_window_widths.png`` | recall per M/V bin; histogram of the learned DTA window widths |
| ``.lock`` | the lock of the process that owns the folder |

Before the first epoch, and before the run folder is created, :func:`train` checks everything it
can: the config (:func:`kdcnet.config.validate`), the device and the kdc_kernels implementation
and every split the run uses - train, validation and test - with the shapes of their HDF5
entries (see :mod:`kdcnet.preflight`). A bad value, file or checkpoint raises a ValueError
whose one-line message names it.

Checkpoints hold the model, optimizer, scheduler, the :class:`TrainState` (epoch, step,
early-stopping state, history), the torch/numpy/python RNG states and the config. The data order
of an epoch is a pure function of ``(seed, epoch)``, so ``--resume RUN_DIR`` after a kill at any
moment continues from the last checkpoint and, on CPU with a fixed seed, on the same machine and
thread count, ends with exactly the metrics and parameters of an uninterrupted run. A run killed before its first checkpoint starts
from scratch, with its saved config on ``--resume`` (the same run again) or with the given one on a
new ``kdcnet train --run-dir`` of the same folder; the abandoned attempt's metrics and ``best.pt``
are dropped.

Several processes (``torchrun --nproc_per_node N -m kdcnet train``; see :mod:`kdcnet.distributed`):
the encoders run under DistributedDataParallel, each process trains on its share of every step's
videos (``train.batch_size`` per process) and, with ``train.gather``, computes the losses of the
global batch from embeddings gathered from every rank. Rank 0 alone logs, shows progress and writes
the run folder; validation and test evaluation are sharded over the ranks. Checkpoints hold the
unwrapped model, so a run resumes on any number of processes: the data order of an epoch is a
function of ``(seed, epoch, number of processes)``, dropout draws of ``(seed, epoch, rank)``, and
the LR schedule continues at the same fraction of training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import config as C
from . import distributed as D
from . import evaluate as E
from . import plots
from .distributed import resolve_device
from .losses import LOSS_TERMS, embedding_losses, kd_weight
from .metrics import RECALL_KEYS
from .model import KDCNet
from .preflight import Splits, preflight, resolve_data
from .rundir import RunDir, default_run_dir

log = logging.getLogger("kdcnet")


# ---------------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_linear(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``ceil(warmup * total)`` steps, then linear decay to 0."""
    w = math.ceil(warmup * total_steps) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total_steps - step) / max(1, total_steps - w))

    return factor


@contextlib.contextmanager
def console_logging(enabled: bool = True):
    """Show kdcnet's log on stderr for the duration (no-op when a console handler is attached).
    Under torchrun only rank 0 logs; the other ranks keep only errors."""
    main = D.env_rank() == 0
    attached = any(type(h) is logging.StreamHandler for h in log.handlers)
    handler = None
    if enabled and main and not attached:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if main else logging.ERROR)
    log.propagate = False
    try:
        yield
    finally:
        if handler is not None:
            log.removeHandler(handler)


@contextlib.contextmanager
def cpu_determinism(device: torch.device):
    """torch's deterministic algorithms while training on the CPU: with several threads some CPU
    kernels (e.g. index_put with accumulation, in the max-similarity reference's backward) otherwise
    differ from run to run, which would break the equality of resumed and uninterrupted runs. No
    measurable cost on the CPU; GPUs are left alone (bit-exact resume is promised on CPU only)."""
    if device.type != "cpu":
        yield
        return
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# ---------------------------------------------------------------------------------------- train


@dataclass
class TrainState:
    """Where training stands after ``epoch`` (-1: none yet); saved in every checkpoint as a dict."""

    epoch: int = -1
    step: int = 0
    best_sumr: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"expected the entries {sorted(names)}, got {got}")
        return cls(**raw)


@dataclass
class Loop:
    """Everything one training run works with, built once by :func:`train`."""

    cfg: C.Config
    device: torch.device
    world: D.World
    data: Splits
    model: KDCNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: Callable[[int], float]
    steps_per_epoch: int
    progress: bool | None
    on_epoch_end: Callable[[int, dict], None] | None
    run: RunDir | None = None
    encoder: torch.nn.Module | None = None  # both encoders, under DDP with several processes (see wrap_encoders)
    state: TrainState = field(default_factory=TrainState)


def train(cfg: C.Config, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          progress: bool | None = None, console: bool = True,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``, evaluate the best checkpoint on the test split, return the
    test metrics dict (also saved as ``<test_split>_metrics.json``).

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt`` (``cfg`` must be the
    run's ``config.json``; see :func:`resume_config`), or starts it from scratch when it was killed
    before its first checkpoint. ``on_epoch_end(epoch, record)`` is called after each epoch's
    checkpoint is written. ``progress``: tqdm bars (None: only on a terminal).

    Raises ValueError (one line, naming the value, file or folder) for anything found wrong before
    the first epoch (see the module doc), when ``run_dir`` is owned by another process, holds a run
    already (without ``resume``), or its checkpoint cannot be loaded.

    Under torchrun every process calls it (the process group is created here when none exists);
    rank 0 alone logs, shows progress and writes ``run_dir`` (which every rank must be able to
    read: a shared filesystem across machines). Every rank returns the test metrics.
    """
    C.validate(cfg)
    with D.session(cfg.train.device) as world, console_logging(console):
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        if resume and not (run_dir / "last.pt").is_file() and not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume {run_dir}: no last.pt checkpoint there (and no config.json: "
                             f"not a run folder of kdcnet train)")
        device = resolve_device(cfg.train.device)
        data = preflight(cfg, device)  # everything checkable is checked before the run folder exists
        if not resume:
            cfg = resolve_data(cfg, data.train)
        threads = torch.get_num_threads()
        try:
            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            with cpu_determinism(device):
                loop = _build(cfg, device, world, data, progress, on_epoch_end)
                with RunDir.open(run_dir, create=not resume, flag="--resume" if resume else "--run-dir") as run:
                    loop.run = run
                    _start(loop, resume)
                    return _train(loop)
        finally:
            torch.set_num_threads(threads)


def _build(cfg: C.Config, device: torch.device, world: D.World, data: Splits, progress, on_epoch_end) -> Loop:
    """The seeded model, optimizer and LR schedule of a new run (a resume then loads its checkpoint)."""
    t = cfg.train
    seed_everything(t.seed)
    model = KDCNet(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = D.steps_per_epoch(len(data.train.video_ids), t.batch_size, world)
    schedule = warmup_linear(t.epochs * steps_per_epoch, t.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Loop(cfg, device, world, data, model, optimizer, scheduler, schedule, steps_per_epoch, progress,
                on_epoch_end)


def restore(path: Path, what: str, load: Callable[[], object]):
    """``load()``, with any failure to fit the checkpoint's ``what`` into this run turned into a
    one-line ValueError naming the file."""
    try:
        return load()
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: its {what} does not fit this run ({first})") from None


def load_weights(model: KDCNet, weights: dict, path: Path) -> None:
    """Load the state dict ``weights`` of checkpoint ``path`` into ``model``; ValueError naming the
    file and the first differences when they do not match (another config or model version)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {list(weights[k].shape)} in the file, {list(own[k].shape)} here"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if items]
        raise ValueError(f"{path}: the checkpoint's model does not match the config ({'; '.join(parts)})")
    restore(path, "model", lambda: model.load_state_dict(weights))


def _start(loop: Loop, resume: bool) -> None:
    """Under the folder's lock: continue from ``last.pt``, or start from scratch (writing the run's
    metadata and dropping what an attempt killed before its first checkpoint left)."""
    run, cfg, state = loop.run, loop.cfg, loop.state
    has_checkpoint = D.broadcast_object(run.has("last.pt"))  # rank 0 decides, holding the lock
    if has_checkpoint and not resume:
        raise ValueError(f"--run-dir {run.path} already holds a run (last.pt); resume it with --resume {run.path} "
                         f"or choose another folder")
    if has_checkpoint:
        path = run / "last.pt"
        ckpt = run.load_checkpoint("last.pt")
        load_weights(loop.model, ckpt["model"], path)
        restore(path, "optimizer state", lambda: loop.optimizer.load_state_dict(ckpt["optimizer"]))
        restore(path, "scheduler state", lambda: loop.scheduler.load_state_dict(ckpt["scheduler"]))
        loop.state = state = restore(path, "training state", lambda: TrainState.from_dict(ckpt["state"]))
        restore(path, "RNG state", lambda: set_rng_state(ckpt["rng"]))
        position = (state.epoch + 1) * loop.steps_per_epoch
        if loop.scheduler.last_epoch != position:  # saved with another number of processes: same fraction of training
            loop.scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, loop.schedule, last_epoch=position - 1)
    else:
        run.remove("best.pt")  # of an attempt killed before its first last.pt
        run.write_metadata(cfg)
    loop.encoder = wrap_encoders(loop.model, loop.device)
    run.open_log()  # only now: a refused start leaves the log untouched
    run.write_metrics(state.history)  # drops the lines of epochs after the checkpoint (or of an abandoned attempt)
    if has_checkpoint:
        log.info("resumed from %s after epoch %d (step %d)", run / "last.pt", state.epoch + 1, state.step)
    elif resume:
        log.info("%s has no checkpoint yet (killed during its first epoch): starting from scratch with its config",
                 run.path)


def _train(loop: Loop) -> dict:
    cfg, device, world, run, data, model = loop.cfg, loop.device, loop.world, loop.run, loop.data, loop.model
    t, state = cfg.train, loop.state
    log.info("run folder %s; device %s; %s: %d train videos / %d captions, %d val videos / %d captions",
             run.path, device, data.train.collection, len(data.train.video_ids), len(data.train.cap_ids),
             len(data.val.video_ids), len(data.val.cap_ids))
    if world.size > 1:
        log.info("%d processes, %d videos per process and step (%d per step); losses over the %s batch",
                 world.size, t.batch_size, world.size * t.batch_size, "global" if t.gather else "per-process")
    if state.epoch < 0:
        log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    for epoch in range(state.epoch + 1, t.epochs):
        if state.stopped:
            break
        record = _train_epoch(loop, epoch)
        improved = record["val/SumR"] > state.best_sumr
        if improved:
            state.best_sumr, state.best_epoch, state.bad_epochs = record["val/SumR"], epoch, 0
        else:
            state.bad_epochs += 1
        state.stopped = t.early_stop > 0 and state.bad_epochs >= t.early_stop
        state.epoch = epoch
        state.history.append(record)
        if run.main:
            ckpt = {"model": model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                    "scheduler": loop.scheduler.state_dict(), "state": state.to_dict(), "rng": rng_state(),
                    "config": C.to_dict(cfg)}
            if improved:
                run.save_checkpoint("best.pt", ckpt)
            run.save_checkpoint("last.pt", ckpt)
            run.write_metrics(state.history)  # after the checkpoint: never ahead of it
            run.log_scalars(record, epoch + 1)
        D.barrier()  # every rank may read the checkpoints from here on
        log.info("epoch %d/%d  loss %.4f  val SumR %.2f (best %.2f at epoch %d)  %.1f steps/s  %.1fs",
                 epoch + 1, t.epochs, record["loss/total"], record["val/SumR"], state.best_sumr,
                 state.best_epoch + 1, record["steps_per_s"], record["seconds"])
        if state.stopped:
            log.info("early stop: no validation SumR gain for %d epochs", t.early_stop)
        if loop.on_epoch_end is not None:
            loop.on_epoch_end(epoch, record)

    if cfg.train.plots and run.main:
        plots.training_curves(state.history, run / "curves.png")
    return evaluate_checkpoint(cfg, run, cfg.data.test_split, device, model=model, dataset=data.test)


def _progress(iterable, total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


class Encoders(torch.nn.Module):
    """Both encoders of ``model`` as one ``forward(batch) -> (frames, queries)``, the module that
    DistributedDataParallel wraps (its gradient hooks need the forward to go through it)."""

    def __init__(self, model: KDCNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.encode_videos(batch), self.model.encode_queries(batch)


def wrap_encoders(model: KDCNet, device: torch.device) -> torch.nn.Module:
    """:class:`Encoders` of ``model``, under DistributedDataParallel when there are several processes."""
    encoder = Encoders(model)
    if D.current().size == 1:
        return encoder
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)


def step_losses(model: KDCNet, encoder, batch, cfg: C.Config, kd_lambda: float,
                generator: torch.Generator | None = None, epoch: int | None = None) -> dict:
    """The loss terms of one step: of this process's ``batch`` or, with ``train.gather`` under
    several processes, of the global batch (every rank's embeddings gathered; the same on every rank)."""
    frames, queries = encoder(batch)
    if cfg.train.gather and D.current().size > 1:
        batch, frames, queries = D.gather_batch(batch, frames, queries)
    return embedding_losses(model, batch, frames, queries, cfg.loss, kd_lambda, generator=generator, epoch=epoch)


def train_step(model: KDCNet, encoder, batch, optimizer, scheduler, cfg: C.Config, kd_lambda: float,
               generator: torch.Generator | None = None, epoch: int | None = None) -> dict:
    """One optimisation step on ``batch`` (on the model's device): the losses under autocast,
    backward, grad-norm clipping, optimizer and scheduler steps. Returns the loss terms. ``epoch``
    (from 0) chooses random or hard triplet negatives (``loss.hard_negative_start_epoch``; None: hard)."""
    with E.autocast(cfg, batch.video_lengths.device):
        terms = step_losses(model, encoder, batch, cfg, kd_lambda, generator, epoch)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    return terms


def _train_epoch(loop: Loop, epoch: int) -> dict:
    from .loader import epoch_batches

    model, encoder, optimizer, scheduler = loop.model, loop.encoder, loop.optimizer, loop.scheduler
    train_set, val_set, cfg, device, world = loop.data.train, loop.data.val, loop.cfg, loop.device, loop.world
    state, steps_per_epoch, progress = loop.state, loop.steps_per_epoch, loop.progress

    t = cfg.train
    t0 = time.perf_counter()
    lam = kd_weight(cfg.loss, epoch, t.epochs)
    model.train()
    generator = None
    if world.size > 1:
        # Dropout draws per (seed, epoch, rank); hard negatives per (seed, epoch), the same on every
        # rank (a gathered global batch gets the same negatives everywhere). Neither depends on
        # the RNG state of a checkpoint, so a resume on any number of processes is well defined.
        torch.manual_seed(D.derived_seed(t.seed, epoch, world.rank))
        generator = torch.Generator().manual_seed(D.derived_seed(t.seed, epoch))
    sums = {key: torch.zeros((), device=device) for key in (*LOSS_TERMS, "total")}  # no per-step GPU sync
    steps = 0
    videos = D.epoch_videos(len(train_set.video_ids), t.batch_size, t.seed, epoch, world)
    batches = epoch_batches(train_set, cfg, device, videos)  # on `device`, made ahead of the step (kdcnet.loader)
    bars = progress if world.is_main else False
    with contextlib.closing(batches):  # stops the loading thread on an error or Ctrl-C
        for batch in _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{t.epochs}", bars):
            terms = train_step(model, encoder, batch, optimizer, scheduler, cfg, lam, generator, epoch)
            for key in sums:
                sums[key] += terms[key].detach().float()
            steps += 1
    state.step += steps
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # steps/s of finished work, not of queued kernels
    train_seconds = time.perf_counter() - t0
    means = dict(zip(sums, D.mean_over_ranks(torch.stack(list(sums.values()))).unbind()))
    val = E.evaluate(model, val_set, cfg, device, branches=False)
    record = {"epoch": epoch, "step": state.step, "lr": optimizer.param_groups[0]["lr"], "kd_weight": lam}
    record.update({f"loss/{key}": float(value) / max(1, steps) for key, value in means.items()})
    record.update({f"val/{key}": val[key] for key in (*RECALL_KEYS, "SumR")})
    record.update(steps_per_s=steps / max(train_seconds, 1e-9), seconds=time.perf_counter() - t0)
    return record


# ------------------------------------------------------------------------------------ evaluation


def evaluate_checkpoint(cfg: C.Config, run: RunDir, split: str, device: torch.device, *, model: KDCNet | None = None,
                        dataset=None, checkpoint: str = "best.pt", out=print) -> dict:
    """Load ``checkpoint`` of ``run`` (into ``model`` if given; a missing checkpoint then keeps
    ``model`` as it is), evaluate ``split`` (``dataset`` if given, else opened here), print the
    table, save ``<split>_metrics.json`` and the M/V-bin and window-width plots; return the metrics.
    A checkpoint that cannot be loaded raises a one-line ValueError naming it. Under several
    processes every rank calls it (sharded evaluation) and rank 0 prints and writes."""
    dataset = dataset if dataset is not None else E.open_split(cfg, split)
    if model is None or run.has(checkpoint):
        ckpt = run.load_checkpoint(checkpoint, map_location=device, need=("model",))
        model = model if model is not None else KDCNet(cfg).to(device)
        load_weights(model, ckpt["model"], run / checkpoint)
    result, widths = E.evaluate(model, dataset, cfg, device, return_widths=True)
    result["window_widths"] = {name: None if w is None else {"median": float(w.median()), "mean": float(w.mean())}
                               for name, w in widths.items()}
    if not run.main:
        return result
    path = E.save_metrics(result, run.path, split)
    E.report(result, split, out)
    log.info("saved %s", path)
    if cfg.train.plots:
        plots.bin_recall(result["mv_bins"], run / f"{split}_mv_bins.png")
        plots.window_widths(widths, run / f"{split}_window_widths.png")
    return result


def resume_config(run_dir: str | os.PathLike, device: str | None = None, impl: str | None = None) -> C.Config:
    """The saved config of a run folder, with the runtime-only settings (device, impl) replaced."""
    cfg = C.load(Path(run_dir) / "config.json")
    if device is not None:
        cfg.train.device = device
    if impl is not None:
        cfg.model.impl = impl
    return C.validate(cfg)
