"""kdcnet: train, evaluate, ablate and make synthetic data from the command line.

    kdcnet train                                   # built-in synthetic data, preset "synthetic"
    kdcnet train --preset tvr --data-root ROOT     # real features in the MS-SL layout
    kdcnet train --ablate                          # full / no HSA / no DTA / no distillation / no refinement
    kdcnet train --resume RUN_DIR                  # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 8 -m kdcnet train --preset tvr --data-root ROOT --gather   # 8 GPUs
    kdcnet eval --run RUN_DIR --split test
    kdcnet make-synthetic --out DIR --collection NAME
    kdcnet prepare --preset tvr --data-root ROOT   # build the prepared caches now (training does it on first use)

Bad arguments, bad data, a bad checkpoint and a run folder in use by another process end with one
line on stderr and exit code 2 (see README, "Failure behaviour").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: worker threads that spin while they wait make every op several times
# slower when the cores are shared (a busy laptop, a CI runner: 3-4x measured on 2 cores); letting
# them sleep costs little otherwise. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import config as C  # noqa: E402  (no torch import; kept below the environment setting)

ABLATIONS = (
    ("full", ()),
    ("no HSA", ("model.hsa=false",)),
    ("no DTA", ("model.dta=false",)),
    ("no distillation", ("loss.distill=false",)),
    ("no refinement", ("loss.krd_window=1",)),
)
IMPLS = ("auto", "reference", "triton", "cuda")  # kdc_kernels._config.IMPL_CHOICES, without importing torch


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default unless its help already says it in words."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (``prog: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdcnet", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,prepare,make-synthetic}", required=True)

    t = sub.add_parser("train", help="train KDC-Net (default: built-in synthetic data), then evaluate on test",
                       description="Train KDC-Net, early-stop on validation SumR, evaluate the best checkpoint "
                                   "on the test split and print the results beside chance level.",
                       formatter_class=_Formatter)
    t.add_argument("--preset", choices=C.PRESETS, default=None,
                   help="hyper-parameter preset (default: synthetic)")
    t.add_argument("--data-root", metavar="ROOT", default=None,
                   help="folder holding <collection>/TextData and <collection>/FeatureData (MS-SL layout) "
                        "(default: the built-in synthetic collection, generated on first use)")
    t.add_argument("--collection", metavar="NAME", default=None, help="collection name (default: the preset's name)")
    t.add_argument("--visual-feature", metavar="NAME", default=None,
                   help="BigFile folder under FeatureData/ (default: the preset's folder - tvr i3d_resnet, "
                        "activitynet i3d, charades i3d_rgb_lgi - if present, else the only BigFile folder)")
    t.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's, 100 for real data)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="videos per batch, with all their captions; under torchrun per process "
                        "(default: the preset's, 128 for real data)")
    t.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N; under torchrun auto/cuda give each "
                                                  "process cuda:LOCAL_RANK (default: auto = cuda if available)")
    t.add_argument("--impl", choices=IMPLS, default=None,
                   help="kdc_kernels implementation of every op (default: KDC_IMPL or auto = fast paths on GPU)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    t.add_argument("--run-dir", metavar="DIR", default=None,
                   help="run folder (default: runs/<preset>-<time>, or runs/<preset>-ablation-<time> with --ablate)")
    t.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its last checkpoint, with its saved config "
                        "(only --device and --impl may change) (default: start a new run)")
    t.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override any config value, repeatable, applied after the flags above, e.g. "
                        "--set model.hsa=false --set train.lr=3e-4 (default: none)")
    t.add_argument("--ablate", action="store_true",
                   help="train and test five variants (full; no HSA; no DTA; no distillation; no refinement) "
                        "into subfolders of the run folder and print one table; re-running with the same "
                        "--run-dir continues an interrupted ablation")
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="tqdm progress bars (auto: only on a terminal)")
    t.add_argument("--gather", action="store_const", const=True, default=None,
                   help="under torchrun: gather query and video embeddings from every process so the ranking, "
                        "InfoNCE and distillation losses see the global batch (= --set train.gather=true) "
                        "(default: off, each process uses its own batch)")

    e = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split",
                       description="Evaluate the best checkpoint of a run folder on one split: recalls, SumR, "
                                   "chance level, per-M/V-bin table; writes RUN_DIR/<split>_metrics.json.",
                       formatter_class=_Formatter)
    e.add_argument("--run", "--run-dir", dest="run", metavar="RUN_DIR", required=True,
                   help="run folder written by kdcnet train (required; under torchrun spell it --run-dir, "
                        "as torchrun reads --run as its own --run-path)")
    e.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to evaluate")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint")
    e.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's device setting)")
    e.add_argument("--impl", choices=IMPLS, default=None, help="kdc_kernels implementation (default: the run's)")

    p = sub.add_parser("prepare", help="build the prepared caches of a collection's splits (training does it "
                                       "on first use)",
                       description="Read every video and caption of the splits a training run uses once, check it, "
                                   "and write it as training consumes it (binned, normalised, teacher on the frame "
                                   "grid, queries truncated) into contiguous arrays under data.cache_dir. A cache that "
                                   "matches the source files and settings is reused; one that does not is rebuilt. "
                                   "Pass the same preset, data flags and --set values as the training run.",
                       formatter_class=_Formatter)
    p.add_argument("--preset", choices=C.PRESETS, default=None, help="hyper-parameter preset (default: synthetic)")
    p.add_argument("--data-root", metavar="ROOT", default=None,
                   help="folder holding <collection>/ (default: the built-in synthetic collection)")
    p.add_argument("--collection", metavar="NAME", default=None, help="collection name (default: the preset's name)")
    p.add_argument("--visual-feature", metavar="NAME", default=None,
                   help="BigFile folder under FeatureData/ (default: as kdcnet train chooses it)")
    p.add_argument("--device", default=None,
                   help="the device training will use; with data.cache_dtype=auto it chooses float16 for cuda "
                        "(default: auto = cuda if available)")
    p.add_argument("--splits", metavar="SPLIT[,SPLIT]", default=None,
                   help="comma-separated splits (default: the ones training reads: train, data.val_split, "
                        "data.test_split)")
    p.add_argument("--set", dest="overrides", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="config overrides as for kdcnet train, e.g. --set data.cache_dir=/scratch/kdc "
                        "--set data.max_frames=64 (default: none)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="tqdm progress bars (auto: only on a terminal)")

    from .synthetic import add_make_synthetic_parser

    add_make_synthetic_parser(sub)
    return parser


# ------------------------------------------------------------------------------------- commands


def config_from_args(args) -> C.Config:
    """The preset, then the first-class flags, then every ``--set``."""
    cfg = C.preset(args.preset or "synthetic")
    flags = []
    for key, value in (("data.root", args.data_root), ("data.collection", args.collection),
                       ("data.visual_feature", args.visual_feature), ("train.epochs", args.epochs),
                       ("train.batch_size", args.batch_size), ("train.device", args.device),
                       ("model.impl", args.impl), ("train.seed", args.seed), ("train.gather", args.gather)):
        if value is not None:
            flags.append(f"{key}={value}")
    return C.apply_overrides(cfg, flags + list(args.overrides))


def _progress(args) -> bool | None:
    return {"auto": None, "on": True, "off": False}[args.progress]


def _say(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every process of a torchrun job runs the command)."""
    from .distributed import env_rank

    if env_rank() == 0:
        print(*args, **kwargs)


def cmd_train(args) -> int:
    from . import trainer
    from .distributed import session
    from .rundir import default_run_dir

    if args.resume:
        fixed = [f"--{name.replace('_', '-')}" for name in ("preset", "data_root", "collection", "visual_feature",
                                                            "epochs", "batch_size", "seed", "run_dir", "gather")
                 if getattr(args, name) is not None] + (["--set"] if args.overrides else []) + \
                (["--ablate"] if args.ablate else [])
        if fixed:
            raise ValueError(f"--resume continues a run with its saved config; drop {', '.join(fixed)} "
                             f"(only --device and --impl may change)")
        cfg = trainer.resume_config(args.resume, device=args.device, impl=args.impl)
        with session(cfg.train.device):
            trainer.train(cfg, args.resume, resume=True, progress=_progress(args))
        _say(f"run folder: {args.resume}")
        return 0
    cfg = config_from_args(args)
    with session(cfg.train.device):
        if args.ablate:
            return run_ablation(cfg, args.run_dir, _progress(args))
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
        trainer.train(cfg, run_dir, progress=_progress(args))
    _say(f"run folder: {run_dir}")
    return 0


def run_ablation(cfg: C.Config, run_dir: str | None, progress: bool | None) -> int:
    """Train every variant of :data:`ABLATIONS` into ``run_dir/<variant>`` and print one table.
    A variant with a finished test evaluation is reused; one with a checkpoint is resumed. Every
    variant's config and the data are checked before the folder is created; the folder is owned
    (locked) for the whole ablation, each variant's subfolder by its training."""
    from . import metrics as M
    from . import trainer
    from .distributed import resolve_device
    from .preflight import preflight
    from .rundir import RunDir, default_run_dir, json_ready

    variants = [(name, overrides, C.apply_overrides(cfg, list(overrides))) for name, overrides in ABLATIONS]
    preflight(cfg, resolve_device(cfg.train.device))
    root = Path(run_dir) if run_dir else default_run_dir(cfg, "ablation")
    rows = []
    with RunDir.open(root, create=True) as ablation:
        for name, overrides, variant in variants:
            folder = root / name.replace(" ", "-")
            done = folder / f"{cfg.data.test_split}_metrics.json"
            t0 = time.perf_counter()
            _say(f"== {name} ({' '.join(overrides) or 'all components'}) -> {folder}", flush=True)
            if done.is_file():
                result = json.loads(done.read_text())
            elif (folder / "last.pt").is_file():
                result = trainer.train(trainer.resume_config(folder), folder, resume=True, progress=progress,
                                       console=False)
            else:
                result = trainer.train(variant, folder, progress=progress, console=False)
            rows.append({"variant": name, "overrides": " ".join(overrides) or "-",
                         **{k: result[k] for k in (*M.RECALL_KEYS, "SumR")},
                         "minutes": (time.perf_counter() - t0) / 60})
        chance = {"variant": "chance", "overrides": "-", **M.chance_metrics(result["num_videos"])}
        table = M.format_table(rows + [chance], ["variant", "overrides", *M.RECALL_KEYS, "SumR", "minutes"])
        header = (f"ablation on {cfg.collection} ({cfg.preset} preset), {cfg.data.test_split} split: "
                  f"{result['num_queries']} queries, {result['num_videos']} videos")
        _say(header)
        _say(table)
        ablation.write("ablation.json", json.dumps(json_ready({"header": header, "rows": rows + [chance]}), indent=2) + "\n")
        ablation.write("ablation.txt", header + "\n" + table + "\n")
    _say(f"saved {root / 'ablation.txt'}")
    return 0


def cmd_prepare(args) -> int:
    from . import evaluate as E

    flags = [f"{key}={value}" for key, value in (
        ("data.root", args.data_root), ("data.collection", args.collection),
        ("data.visual_feature", args.visual_feature), ("train.device", args.device)) if value is not None]
    cfg = C.apply_overrides(C.preset(args.preset or "synthetic"), flags + list(args.overrides))
    if not cfg.data.prepared:
        raise ValueError("--set data.prepared=false: there is nothing to prepare")
    from .prepared import resolve_dtype

    splits = args.splits.split(",") if args.splits else ["train", cfg.data.val_split, cfg.data.test_split]
    unprepared = C.apply_overrides(cfg, ["data.prepared=false"])  # opened so, then prepared with --progress
    for split in dict.fromkeys(s.strip() for s in splits):
        if split not in ("train", "val", "test"):
            raise ValueError(f"--splits: expected train, val or test, got {split!r}")
        t0 = time.perf_counter()
        with E.open_split(unprepared, split, teacher=split == "train" and cfg.loss.distill) as data:
            data.prepare(cfg.data.cache_dir, resolve_dtype(cfg.data.cache_dtype, cfg.train.device, cfg.train.bf16),
                         progress=_progress(args))
            store = data.prepared
            _say(f"{split}: {len(data.video_ids)} videos, {len(data.cap_ids)} captions, "
                 f"{store.nbytes / 1e9:.3f} GB {store.dtype} in {store.folder} "
                 f"({'built' if store.built else 'up to date'}, {time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_eval(args) -> int:
    from . import evaluate as E
    from . import trainer
    from .distributed import session
    from .preflight import check_impl
    from .rundir import RunDir

    run = Path(args.run)
    if not (run / "config.json").is_file():
        raise ValueError(f"--run {run}: no config.json there; is it a folder written by kdcnet train?")
    cfg = trainer.resume_config(run, device=args.device, impl=args.impl)
    with session(cfg.train.device):  # under torchrun: sharded evaluation
        device = trainer.resolve_device(cfg.train.device)
        check_impl(cfg.model.impl, device)
        dataset = E.open_split(cfg, args.split)
        with RunDir.open(run, create=False, flag="--run") as folder:
            trainer.evaluate_checkpoint(cfg, folder, args.split, device, dataset=dataset,
                                        checkpoint=f"{args.checkpoint}.pt")
    _say(f"saved {run / f'{args.split}_metrics.json'}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .trainer import console_logging

    try:
        with console_logging():
            if args.command == "train":
                return cmd_train(args)
            if args.command == "eval":
                return cmd_eval(args)
            if args.command == "prepare":
                return cmd_prepare(args)
            from .synthetic import run_make_synthetic

            return run_make_synthetic(args)
    except (ValueError, NotImplementedError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"kdcnet {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdcnet: interrupted; continue a training run with kdcnet train --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
