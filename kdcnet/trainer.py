"""Training: AdamW with linear warm-up then linear decay, grad-norm clipping, bf16 autocast on GPU,
early stopping on validation SumR, and a run folder that survives being killed.

Run folder (``--run-dir``, default ``runs/<preset>-<YYYYmmdd-HHMMSS>``):

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

Checkpoints hold the model, optimizer, scheduler, epoch, step, torch/numpy/python RNG states,
early-stopping state and history, and are written atomically (temp file, then ``os.replace``).
The data order of an epoch is a pure function of ``(seed, epoch)``, so ``--resume RUN_DIR`` after
a kill at any moment continues from the last checkpoint and, on CPU with a fixed seed, ends with
exactly the metrics and parameters of an uninterrupted run.

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
import datetime
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
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

log = logging.getLogger("kdcnet")


# ---------------------------------------------------------------------------------- environment


def source_commit() -> str:
    """``git describe --always --dirty`` of the tree this package was loaded from, or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def default_run_dir(cfg: C.Config, kind: str = "") -> Path:
    """``runs/<preset>[-<kind>]-<YYYYmmdd-HHMMSS>`` by rank 0's clock (the same on every rank)."""
    stamp = D.broadcast_object(datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / "-".join(part for part in (cfg.preset, kind, stamp) if part)


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


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, flush to disk, then ``os.replace``: a kill
    at any moment leaves either the old or the new file, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


class RunLog:
    """The run's log file, ``metrics.jsonl`` and optional TensorBoard events."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(self.handler)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir))
        except ImportError:
            self.tb = None
            log.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def rewrite_metrics(self, history: list[dict]) -> None:
        tmp = self.run_dir / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(E.json_ready(h)) + "\n" for h in history))
        os.replace(tmp, self.run_dir / "metrics.jsonl")

    def epoch(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(E.json_ready(record)) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step") and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["epoch"] + 1)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        log.removeHandler(self.handler)
        self.handler.close()


# ---------------------------------------------------------------------------------------- train


def _progress(iterable, total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


def _prepare_run(cfg: C.Config, run_dir: Path, train_set, write: bool = True) -> C.Config:
    """Record the resolved data (root, collection, feature folder, dims) in ``cfg``, switch
    distillation off without a teacher, write the run-folder metadata files (when ``write``)."""
    cfg.data.root = str(Path(train_set.root).resolve())
    cfg.data.collection, cfg.data.visual_feature = train_set.collection, train_set.visual_feature
    m = cfg.model
    for key, value in (("visual_dim", train_set.visual_dim), ("text_dim", train_set.text_dim)):
        if getattr(m, key) not in (None, value):
            raise ValueError(f"model.{key} = {getattr(m, key)} but the data has {value}")
        setattr(m, key, value)
    if cfg.loss.distill and not train_set.has_teacher:
        log.warning("no CLIP teacher features in %s: distillation is off (loss.distill=false)", train_set.collection)
        cfg.loss.distill = False
    if not write:
        return cfg
    C.save(cfg, run_dir / "config.json")
    (run_dir / "git_commit.txt").write_text(source_commit() + "\n")
    from kdc_kernels.info import report

    (run_dir / "environment.txt").write_text(report() + "\n")
    return cfg


def train(cfg: C.Config, run_dir: str | os.PathLike | None = None, *, resume: bool = False,
          progress: bool | None = None, console: bool = True,
          on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``cfg`` into ``run_dir``, evaluate the best checkpoint on the test split, return the
    test metrics dict (also saved as ``<test_split>_metrics.json``).

    ``resume=True`` continues the run in ``run_dir`` from its ``last.pt`` (``cfg`` must be the
    run's ``config.json``; see :func:`resume_config`). ``on_epoch_end(epoch, record)`` is called
    after each epoch's checkpoint is written. ``progress``: tqdm bars (None: only on a terminal).

    Under torchrun every process calls it (the process group is created here when none exists);
    rank 0 alone logs, shows progress and writes ``run_dir`` (which every rank must be able to
    read: a shared filesystem across machines). Every rank returns the test metrics.
    """
    C.validate(cfg)
    with D.session(cfg.train.device) as world, console_logging(console):
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
        if resume and not (run_dir / "last.pt").is_file():
            raise ValueError(f"--resume {run_dir}: no last.pt checkpoint there")
        if not resume and (run_dir / "last.pt").exists():
            raise ValueError(f"--run-dir {run_dir} already holds a run (last.pt); resume it with --resume {run_dir} "
                             f"or choose another folder")
        device = resolve_device(cfg.train.device)
        train_set = E.open_split(cfg, "train", teacher=cfg.loss.distill)  # bad data fails before the run folder
        val_set = E.open_split(cfg, cfg.data.val_split)
        runlog = None
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            runlog = RunLog(run_dir)
        threads = torch.get_num_threads()
        try:
            if cfg.train.threads:
                torch.set_num_threads(cfg.train.threads)
            with cpu_determinism(device):
                return _train(cfg, run_dir, resume, device, world, train_set, val_set, runlog, progress, on_epoch_end)
        finally:
            torch.set_num_threads(threads)
            if runlog is not None:
                runlog.close()


def _train(cfg, run_dir, resume, device, world, train_set, val_set, runlog, progress, on_epoch_end) -> dict:
    t = cfg.train
    seed_everything(t.seed)
    if not resume:
        cfg = _prepare_run(cfg, run_dir, train_set, write=world.is_main)
    log.info("run folder %s; device %s; %s: %d train videos / %d captions, %d val videos / %d captions",
             run_dir, device, train_set.collection, len(train_set.video_ids), len(train_set.cap_ids),
             len(val_set.video_ids), len(val_set.cap_ids))
    if world.size > 1:
        log.info("%d processes, %d videos per process and step (%d per step); losses over the %s batch",
                 world.size, t.batch_size, world.size * t.batch_size, "global" if t.gather else "per-process")
    model = KDCNet(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = D.steps_per_epoch(len(train_set.video_ids), t.batch_size, world)
    schedule = warmup_linear(t.epochs * steps_per_epoch, t.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = {"epoch": -1, "step": 0, "best_sumr": -math.inf, "best_epoch": -1, "bad_epochs": 0,
             "stopped": False, "history": []}
    if resume:
        ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        position = (state["epoch"] + 1) * steps_per_epoch
        if scheduler.last_epoch != position:  # saved with another number of processes: same fraction of training
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=position - 1)
        if runlog is not None:
            runlog.rewrite_metrics(state["history"])
        log.info("resumed from %s after epoch %d (step %d)", run_dir / "last.pt", state["epoch"] + 1, state["step"])
    else:
        log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    encoder = wrap_encoders(model, device)

    for epoch in range(state["epoch"] + 1, t.epochs):
        if state["stopped"]:
            break
        record = _train_epoch(model, encoder, optimizer, scheduler, train_set, val_set, cfg, device, world, epoch,
                              state, steps_per_epoch, progress)
        improved = record["val/SumR"] > state["best_sumr"]
        if improved:
            state.update(best_sumr=record["val/SumR"], best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = t.early_stop > 0 and state["bad_epochs"] >= t.early_stop
        state["epoch"] = epoch
        state["history"].append(record)
        if world.is_main:
            runlog.epoch(record)
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state, "rng": rng_state(),
                    "config": C.to_dict(cfg)}
            if improved:
                atomic_save(ckpt, run_dir / "best.pt")
            atomic_save(ckpt, run_dir / "last.pt")
        D.barrier()  # every rank may read the checkpoints from here on
        log.info("epoch %d/%d  loss %.4f  val SumR %.2f (best %.2f at epoch %d)  %.1f steps/s  %.1fs",
                 epoch + 1, t.epochs, record["loss/total"], record["val/SumR"], state["best_sumr"],
                 state["best_epoch"] + 1, record["steps_per_s"], record["seconds"])
        if state["stopped"]:
            log.info("early stop: no validation SumR gain for %d epochs", t.early_stop)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    if cfg.train.plots and world.is_main:
        plots.training_curves(state["history"], run_dir / "curves.png")
    return evaluate_checkpoint(cfg, run_dir, cfg.data.test_split, device, model=model)


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
                generator: torch.Generator | None = None) -> dict:
    """The loss terms of one step: of this process's ``batch`` or, with ``train.gather`` under
    several processes, of the global batch (every rank's embeddings gathered; the same on every rank)."""
    frames, queries = encoder(batch)
    if cfg.train.gather and D.current().size > 1:
        batch, frames, queries = D.gather_batch(batch, frames, queries)
    return embedding_losses(model, batch, frames, queries, cfg.loss, kd_lambda, generator=generator)


def train_step(model: KDCNet, encoder, batch, optimizer, scheduler, cfg: C.Config, kd_lambda: float,
               generator: torch.Generator | None = None) -> dict:
    """One optimisation step on ``batch`` (on the model's device): the losses under autocast,
    backward, grad-norm clipping, optimizer and scheduler steps. Returns the loss terms."""
    with E.autocast(cfg, batch.video_lengths.device):
        terms = step_losses(model, encoder, batch, cfg, kd_lambda, generator)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    return terms


def _train_epoch(model, encoder, optimizer, scheduler, train_set, val_set, cfg, device, world, epoch, state,
                 steps_per_epoch, progress) -> dict:
    from .loader import epoch_batches

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
            terms = train_step(model, encoder, batch, optimizer, scheduler, cfg, lam, generator)
            for key in sums:
                sums[key] += terms[key].detach().float()
            steps += 1
    state["step"] += steps
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # steps/s of finished work, not of queued kernels
    train_seconds = time.perf_counter() - t0
    means = dict(zip(sums, D.mean_over_ranks(torch.stack(list(sums.values()))).unbind()))
    val = E.evaluate(model, val_set, cfg, device, branches=False)
    record = {"epoch": epoch, "step": state["step"], "lr": optimizer.param_groups[0]["lr"], "kd_weight": lam}
    record.update({f"loss/{key}": float(value) / max(1, steps) for key, value in means.items()})
    record.update({f"val/{key}": val[key] for key in (*RECALL_KEYS, "SumR")})
    record.update(steps_per_s=steps / max(train_seconds, 1e-9), seconds=time.perf_counter() - t0)
    return record


# ------------------------------------------------------------------------------------ evaluation


def load_model(cfg: C.Config, run_dir: Path, device: torch.device, checkpoint: str = "best.pt") -> KDCNet:
    path = run_dir / checkpoint
    if not path.is_file():
        raise ValueError(f"{run_dir}: no checkpoint {checkpoint}; is this a run folder of kdcnet train?")
    model = KDCNet(cfg).to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=False)["model"])
    return model


def evaluate_checkpoint(cfg: C.Config, run_dir: Path, split: str, device: torch.device, *, model: KDCNet | None = None,
                        checkpoint: str = "best.pt", out=print) -> dict:
    """Load ``checkpoint`` of ``run_dir`` (into ``model`` if given), evaluate ``split``, print the
    table, save ``<split>_metrics.json`` and the M/V-bin and window-width plots; return the metrics.
    Under several processes every rank calls it (sharded evaluation) and rank 0 prints and writes."""
    if model is None:
        model = load_model(cfg, run_dir, device, checkpoint)
    elif (run_dir / checkpoint).is_file():
        model.load_state_dict(torch.load(run_dir / checkpoint, map_location=device, weights_only=False)["model"])
    dataset = E.open_split(cfg, split)
    result, widths = E.evaluate(model, dataset, cfg, device, return_widths=True)
    result["window_widths"] = {name: None if w is None else {"median": float(w.median()), "mean": float(w.mean())}
                               for name, w in widths.items()}
    if not D.current().is_main:
        return result
    path = E.save_metrics(result, run_dir, split)
    E.report(result, split, out)
    log.info("saved %s", path)
    if cfg.train.plots:
        plots.bin_recall(result["mv_bins"], run_dir / f"{split}_mv_bins.png")
        plots.window_widths(widths, run_dir / f"{split}_window_widths.png")
    return result


def resume_config(run_dir: str | os.PathLike, device: str | None = None, impl: str | None = None) -> C.Config:
    """The saved config of a run folder, with the runtime-only settings (device, impl) replaced."""
    cfg = C.load(Path(run_dir) / "config.json")
    if device is not None:
        cfg.train.device = device
    if impl is not None:
        cfg.model.impl = impl
    return C.validate(cfg)
