"""Everything a training run checks before its first epoch and before its run folder exists.

:func:`preflight` validates the config (:func:`kdcnet.config.validate`), asks kdc_kernels whether
the chosen implementation can run on the device (:func:`check_impl`) and opens every split the run
uses - train, validation and test - with the shapes of all their HDF5 entries checked
(:func:`open_splits`). Each failure is a ValueError (a :class:`kdcnet.data.DataError` for data)
whose one-line message names the flag, key, file or HDF5 key and what is wrong. Checks that need
the data's values (non-finite features) happen when a batch is loaded, not here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

from kdc_kernels import _backend

from . import config as C
from . import evaluate as E
from .data import DataError, teacher_query_path, teacher_video_path, text_feature_path

log = logging.getLogger("kdcnet")

MODEL_OPS = ("windowed_attention", "max_similarity", "max_similarity_topk")  # the kdc_kernels ops KDCNet calls


def check_impl(impl: str | None, device: torch.device) -> None:
    """ValueError when the kdc_kernels implementation ``impl`` (None: ``KDC_IMPL``) cannot run the
    model's ops on ``device`` (e.g. ``triton`` on the CPU without the interpreter, ``cuda`` without
    the compiled extension): said before the run starts, not at its first forward pass."""
    name = _backend.normalize_impl(impl)
    if name in ("auto", "reference"):
        return
    reasons: list[str] = []
    for op in MODEL_OPS:
        found = _backend.triton_env_reasons(device) if name == "triton" else _backend.cuda_env_reasons(device, op)
        reasons += [r for r in found if r not in reasons]
    if reasons:
        source = f"--impl {name}" if impl is not None else f"KDC_IMPL={name}"
        raise ValueError(f"{source} cannot run on {device}: {'; '.join(reasons)}")


def check_feature_shapes(data) -> None:
    """Every query feature entry of ``data``'s captions is ``[n_tokens >= 1, Dq]`` and, when the
    teacher is loaded, every teacher entry ``[n >= 1, Dt]`` (videos) / ``[1, Dt]`` (captions):
    from the HDF5 metadata alone (no feature is read), so a bad entry of the test split is found
    before training rather than after it. Raises :class:`kdcnet.data.DataError` naming the file
    and the key."""

    def check(path, keys, ok, want):
        try:
            f = h5py.File(path, "r")
        except OSError as err:
            raise DataError(f"{path}: cannot be opened as HDF5 ({err})") from None
        with f:
            for key in keys:
                try:
                    shape = h5py.h5d.open(f.id, key.encode("utf-8")).shape
                except KeyError:
                    raise DataError(f"{path}: key {key!r}: not a dataset") from None
                if not ok(shape):
                    raise DataError(f"{path}: key {key!r}: expected {want}, got {shape}")

    dq = data.text_dim
    check(text_feature_path(data.root, data.collection), data.cap_ids,
          lambda s: len(s) == 2 and s[0] >= 1 and s[1] == dq, f"[n_tokens >= 1, {dq}]")
    if data.has_teacher:
        dt = data.teacher_dim
        check(teacher_video_path(data.root, data.collection), data.video_ids,
              lambda s: len(s) == 2 and s[0] >= 1 and s[1] == dt, f"[n_frames >= 1, {dt}]")
        check(teacher_query_path(data.root, data.collection), data.cap_ids,
              lambda s: s in ((dt,), (1, dt)), f"[1, {dt}]")


@dataclass
class Splits:
    """The collections a run uses: training, validation (early stopping) and test (final evaluation)."""

    train: object
    val: object
    test: object


def open_splits(cfg: C.Config) -> Splits:
    """Open and check every split the run uses (see :func:`check_feature_shapes`), then attach
    their prepared caches (built on first use: only once every split has passed its checks); a
    split named twice (e.g. ``data.val_split=test``) is opened once."""
    opened = {("train", cfg.loss.distill): E.open_split(cfg, "train", teacher=cfg.loss.distill, prepare=False)}
    for split in (cfg.data.val_split, cfg.data.test_split):
        opened.setdefault((split, False), E.open_split(cfg, split, prepare=False))
    train_set = opened[("train", cfg.loss.distill)]
    for data in opened.values():
        if data.text_dim != train_set.text_dim:  # one file, but each split reads the size from its first caption
            raise DataError(f"{text_feature_path(data.root, data.collection)}: key {data.cap_ids[0]!r}: "
                            f"{data.text_dim} features per token, but the train split's have {train_set.text_dim}")
        check_feature_shapes(data)
    for (split, _), data in opened.items():
        E.attach_prepared(cfg, data, split)
    return Splits(train_set, opened[(cfg.data.val_split, False)], opened[(cfg.data.test_split, False)])


def resolve_data(cfg: C.Config, train_set) -> C.Config:
    """Record the resolved data (root, collection, feature folder, dims) in ``cfg`` (in place) and
    switch distillation off without a teacher; ValueError when a set dim disagrees with the data."""
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
    return cfg


def preflight(cfg: C.Config, device: torch.device) -> Splits:
    """Every check that needs no run folder: the config, the implementation on ``device`` and every
    split the run uses. Returns the opened splits."""
    C.validate(cfg)
    check_impl(cfg.model.impl, device)
    return open_splits(cfg)
