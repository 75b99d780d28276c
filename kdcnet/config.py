"""Dataclass configs, the presets, ``--set section.key=value`` overrides and JSON round trips.

A :class:`Config` has five sections: ``data``, ``model``, ``loss``, ``train`` and ``eval``. Every
choice that the paper leaves open is a field here (defaults marked in the field comments), so an
ablation is a ``--set`` away:

    >>> cfg = preset("synthetic")
    >>> cfg = apply_overrides(cfg, ["model.hsa=false", "loss.krd_window=1"])
    >>> cfg.model.hsa, cfg.loss.krd_window
    (False, 1)

Presets: ``synthetic`` (small and fast, the built-in default), ``tvr``, ``activitynet`` and
``charades`` (hyper-parameters of the published setups: lr, margin and dropout per dataset; batch
of 128 videos, 100 epochs, early stop after 10 epochs without a validation SumR gain, 1% linear
warm-up then linear decay, grad-norm clip 1.0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

IMPL_CHOICES = (None, "auto", "reference", "triton", "cuda")
WINDOW_CHOICES = ("adaptive", "fixed", "none")
KD_SCHEDULES = ("exponential", "linear", "constant")
CACHE_DTYPES = ("auto", "float32", "float16")
ON_DEVICE_CHOICES = ("auto", "true", "false")
PRESETS = ("synthetic", "tvr", "activitynet", "charades")


@dataclass
class DataConfig:
    root: str | None = None  # data root holding <collection>/; None: the built-in synthetic cache
    collection: str | None = None  # None: the preset's name
    visual_feature: str | None = None  # folder under FeatureData/; None: the preset's or the only one
    max_frames: int = 128  # frames per video after uniform bin-averaging
    max_tokens: int = 30  # tokens per query
    val_split: str = "val"  # split used for early stopping (e.g. "test" when a collection has no val)
    test_split: str = "test"  # split evaluated at the end of training
    prepared: bool = True  # read every split from its prepared cache (built on first use); false: the source files
    cache_dir: str | None = None  # folder of the prepared caches; None: $KDC_CACHE_DIR/prepared
    cache_dtype: str = "auto"  # auto (float16 on a GPU under bf16 autocast, else float32) | float32 | float16
    prefetch: int = 2  # training batches assembled ahead of the step in a background thread; 0: none
    on_device: str = "auto"  # auto | true | false: hold the prepared train split on the training device
    device_share: float = 0.5  # largest share of the free GPU memory the on-device train split may take


@dataclass
class ModelConfig:
    d: int = 384  # model width
    heads: int = 4  # heads of the DTA layer and of the text self-attention
    dropout: float = 0.2
    hsa: bool = True  # hierarchical semantic aggregation in the text encoder
    hsa_scales: tuple[int, ...] = (1, 2, 3)  # phrase scales (Conv1d kernel sizes)
    dta: bool = True  # dynamic temporal attention; false: plain attention (no window, no bias)
    rel_bias: bool = True  # relative position bias table in DTA
    max_rel_dist: int = 32  # R of the bias table
    window: str = "adaptive"  # adaptive | fixed | none
    sigma_min: float = 1.0  # smallest window width, in frames
    cutoff: float | None = None  # hard window truncation at cutoff * sigma; None: soft window only
    fusion_weight: float = 0.7  # S = w * s_inh + (1 - w) * s_exp
    impl: str | None = None  # kdc_kernels impl of every op; None: KDC_IMPL / auto (fast paths on GPU)
    visual_dim: int | None = None  # Dv, read from the data when None
    text_dim: int | None = None  # Dq, read from the data when None


@dataclass
class LossConfig:
    margin: float = 0.2  # triplet hinge margin
    hard_negatives: int = 20  # t2v negative sampled uniformly among this many hardest
    hard_negative_start_epoch: int = 20  # MS-SL: random negatives before this epoch (from 0), hard ones from it; 0: always hard
    nce_weight: float = 0.04  # weight of InfoNCE per branch
    distill: bool = True  # knowledge-refined distillation on the inheritance branch
    krd_window: int = 3  # temporal-continuity box window (odd); 1 = no refinement
    krd_segment: bool = True  # segment-aware frame-level KL
    krd_segment_reduction: str = "sum"  # sum (over queries) | mean
    krd_objective: bool = True  # objective-aligned score-level KL
    kd_temperature: float = 0.2
    kd_weight: float = 0.1  # lambda(0)
    kd_decay: float = 0.95  # lambda(e) = kd_weight * kd_decay^e (exponential schedule)
    kd_schedule: str = "exponential"  # exponential | linear (to 0 at the last epoch) | constant


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 128  # videos per batch (with all their captions); under torchrun per process
    lr: float = 3e-4
    weight_decay: float = 0.01  # AdamW
    warmup: float = 0.01  # fraction of all steps with linear warm-up, then linear decay to 0
    grad_clip: float = 1.0  # max grad norm; 0 disables clipping
    early_stop: int = 10  # epochs without validation SumR gain before stopping; 0 disables
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast on CUDA (never on CPU)
    threads: int | None = None  # torch CPU threads; None: torch's default
    plots: bool = True  # PNG plots in the run folder (needs matplotlib)
    gather: bool = False  # under torchrun: losses over the global batch (embeddings gathered from every rank)


@dataclass
class EvalConfig:
    batch_size: int = 256  # videos (or queries x 4) encoded per forward pass
    video_chunk: int = 1024  # videos scored per chunk when ranking (bounds memory)
    k: int = 100  # top-k kept per query (>= 100: R@100 needs it)


@dataclass
class Config:
    preset: str = "synthetic"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def collection(self) -> str:
        """The collection name (``data.collection``, defaulting to the preset's name)."""
        return self.data.collection or self.preset


SECTIONS = ("data", "model", "loss", "train", "eval")


def preset(name: str) -> Config:
    """A fresh :class:`Config` for one of :data:`PRESETS`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    if name == "synthetic":
        # Small and fast: about a minute on 2 CPU cores (data generation included), SumR far above chance.
        cfg.model.d = 64
        cfg.model.dropout = 0.0
        cfg.data.max_frames = 64
        cfg.train.epochs = 10
        cfg.train.batch_size = 32
        cfg.train.lr = 3e-3
        cfg.train.early_stop = 0
        cfg.train.warmup = 0.05
        cfg.loss.hard_negative_start_epoch = 2  # random negatives for the first 20% of epochs, as MS-SL (20 of 100)
    elif name == "tvr":
        cfg.train.lr, cfg.loss.margin, cfg.model.dropout = 3e-4, 0.1, 0.2
    elif name == "activitynet":
        cfg.train.lr, cfg.loss.margin, cfg.model.dropout = 2.5e-4, 0.2, 0.25
    else:  # charades
        cfg.train.lr, cfg.loss.margin, cfg.model.dropout = 2.4e-4, 0.2, 0.15
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, want: str, value) -> None:
    if not ok:
        raise ValueError(f"{key} must be {want}, got {value!r}")


SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes; numpy gets seed % 2**32


def _check_finite(cfg: Config) -> None:
    """Every float value (of any section) is finite: inf or NaN never reach the optimiser or the model."""
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        for name, value in dataclasses.asdict(section).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section_name}.{name} must be a finite number, got {value!r}")


def validate(cfg: Config) -> Config:
    """Raise ValueError naming the key for any out-of-range value; return ``cfg``."""
    _check(cfg.preset in PRESETS, "preset", f"one of {PRESETS}", cfg.preset)
    _check_finite(cfg)
    d, m, lo, t, e = cfg.data, cfg.model, cfg.loss, cfg.train, cfg.eval
    for key, value in (("data.max_frames", d.max_frames), ("data.max_tokens", d.max_tokens),
                       ("model.d", m.d), ("model.heads", m.heads), ("loss.hard_negatives", lo.hard_negatives),
                       ("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                       ("eval.batch_size", e.batch_size), ("eval.video_chunk", e.video_chunk)):
        _check(value >= 1, key, "an int >= 1", value)
    for key, value in (("data.val_split", d.val_split), ("data.test_split", d.test_split)):
        _check(value in ("train", "val", "test"), key, "train, val or test", value)
    _check(d.cache_dtype in CACHE_DTYPES, "data.cache_dtype", f"one of {CACHE_DTYPES}", d.cache_dtype)
    _check(d.prefetch >= 0, "data.prefetch", "an int >= 0 (0: no background loading)", d.prefetch)
    _check(d.on_device in ON_DEVICE_CHOICES, "data.on_device", f"one of {ON_DEVICE_CHOICES}", d.on_device)
    _check(d.on_device != "true" or d.prepared, "data.on_device", "auto or false with data.prepared=false "
           "(only a prepared split can be held on the device)", d.on_device)
    _check(0.0 < d.device_share <= 1.0, "data.device_share", "in (0, 1]", d.device_share)
    _check(e.k >= 100, "eval.k", "an int >= 100 (R@100 needs the top 100)", e.k)
    _check(m.d % m.heads == 0, "model.d", f"divisible by model.heads ({m.heads})", m.d)
    _check(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
    _check(len(m.hsa_scales) >= 1 and all(k >= 1 for k in m.hsa_scales), "model.hsa_scales",
           "a non-empty list of kernel sizes >= 1 (e.g. 1,2,3)", m.hsa_scales)
    _check(not m.hsa or max(m.hsa_scales) <= d.max_tokens, "model.hsa_scales",
           f"phrase widths no longer than a query (data.max_tokens = {d.max_tokens} tokens)", m.hsa_scales)
    _check(m.max_rel_dist >= 0, "model.max_rel_dist", "an int >= 0", m.max_rel_dist)
    _check(m.window in WINDOW_CHOICES, "model.window", f"one of {WINDOW_CHOICES}", m.window)
    _check(m.sigma_min > 0, "model.sigma_min", "> 0", m.sigma_min)
    _check(m.cutoff is None or m.cutoff > 0, "model.cutoff", "none or a number > 0", m.cutoff)
    _check(m.cutoff is None or (m.dta and m.window != "none"), "model.cutoff",
           "none when there is no window (model.dta=false or model.window=none)", m.cutoff)
    _check(0.0 <= m.fusion_weight <= 1.0, "model.fusion_weight", "in [0, 1]", m.fusion_weight)
    for key, value in (("model.visual_dim", m.visual_dim), ("model.text_dim", m.text_dim)):
        _check(value is None or value >= 1, key, "none or an int >= 1", value)
    _check(lo.margin >= 0, "loss.margin", ">= 0", lo.margin)
    _check(lo.nce_weight >= 0, "loss.nce_weight", ">= 0", lo.nce_weight)
    _check(lo.hard_negative_start_epoch >= 0, "loss.hard_negative_start_epoch", "an int >= 0 (0: hard negatives "
           "from the first epoch)", lo.hard_negative_start_epoch)
    _check(lo.krd_window >= 1 and lo.krd_window % 2 == 1, "loss.krd_window", "an odd int >= 1", lo.krd_window)
    _check(lo.krd_segment_reduction in ("sum", "mean"), "loss.krd_segment_reduction", "sum or mean",
           lo.krd_segment_reduction)
    _check(lo.kd_temperature > 0, "loss.kd_temperature", "> 0", lo.kd_temperature)
    _check(lo.kd_weight >= 0, "loss.kd_weight", ">= 0", lo.kd_weight)
    _check(0 < lo.kd_decay <= 1, "loss.kd_decay", "in (0, 1]", lo.kd_decay)
    _check(lo.kd_schedule in KD_SCHEDULES, "loss.kd_schedule", f"one of {KD_SCHEDULES}", lo.kd_schedule)
    _check(t.lr > 0, "train.lr", "> 0", t.lr)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(0 <= t.warmup < 1, "train.warmup", "in [0, 1)", t.warmup)
    _check(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    _check(t.early_stop >= 0, "train.early_stop", ">= 0 (0 disables early stopping)", t.early_stop)
    _check(SEED_RANGE[0] <= t.seed <= SEED_RANGE[1], "train.seed (--seed)", "an int in [0, 2**64 - 1]", t.seed)
    _check(m.impl in IMPL_CHOICES, "model.impl", f"one of {IMPL_CHOICES[1:]} or none", m.impl)
    _check(t.threads is None or t.threads >= 1, "train.threads", "none or an int >= 1", t.threads)
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "train.device", "auto, cpu, cuda or cuda:N",
           t.device)
    return cfg


# -------------------------------------------------------------------------------------- overrides


def _section_types(section) -> dict[str, object]:
    return typing.get_type_hints(type(section))


def _strip_optional(tp) -> tuple[object, bool]:
    """(inner type, whether None is allowed) of ``X | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(key: str, raw: str, tp):
    inner, optional = _strip_optional(tp)
    text = raw.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if inner is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if inner is str:
            return text
        if typing.get_origin(inner) is tuple:
            return tuple(int(part) for part in text.replace(" ", "").strip("()[]").split(",") if part)
    except ValueError:
        pass
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        inner, "a comma-separated list of integers")
    raise ValueError(f"--set {key}={raw}: expected {want}{' or none' if optional else ''}")


def set_value(cfg: Config, key: str, raw: str) -> None:
    """Set ``section.key`` of ``cfg`` from the string ``raw`` (converted to the field's type)."""
    section_name, dot, name = key.partition(".")
    if not dot or section_name not in SECTIONS:
        raise ValueError(f"--set {key}: expected section.key with section one of {', '.join(SECTIONS)}")
    section = getattr(cfg, section_name)
    types_ = _section_types(section)
    if name not in types_:
        raise ValueError(f"--set {key}: unknown key; {section_name} has {', '.join(types_)}")
    setattr(section, name, _convert(key, raw, types_[name]))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A copy of ``cfg`` with every ``section.key=value`` of ``overrides`` applied, validated."""
    cfg = from_dict(to_dict(cfg))
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item}: expected section.key=value")
        set_value(cfg, key.strip(), raw)
    return validate(cfg)


# ------------------------------------------------------------------------------------------- JSON


def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    out["model"]["hsa_scales"] = list(cfg.model.hsa_scales)
    return out


def from_dict(raw: dict) -> Config:
    """Inverse of :func:`to_dict`; unknown sections or keys raise ValueError naming them."""
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - set(SECTIONS) - {"preset"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {', '.join(SECTIONS)}")
    cfg = Config(preset=raw.get("preset", "synthetic"))
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        types_ = _section_types(section)
        for name, value in (raw.get(section_name) or {}).items():
            if name not in types_:
                raise ValueError(f"unknown config key {section_name}.{name}")
            setattr(section, name, _from_json(f"{section_name}.{name}", value, types_[name]))
    return validate(cfg)


def _from_json(key: str, value, tp):
    inner, optional = _strip_optional(tp)
    if value is None and optional:
        return None
    if typing.get_origin(inner) is tuple and isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (bool, int, float, str) and type(value) is inner:
        return value
    raise ValueError(f"config key {key} must be {getattr(inner, '__name__', inner)}"
                     f"{' or null' if optional else ''}, got {value!r}")


def save(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load(path: str | os.PathLike) -> Config:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    try:
        return from_dict(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
