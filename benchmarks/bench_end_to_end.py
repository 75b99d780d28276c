"""End to end: KDC-Net training steps per second and test-split evaluation time at the ``tvr``
preset's shapes, ``--impl reference`` against ``--impl auto``, in one run on the same data.

Data: a TVR-shaped synthetic collection (``kdcnet make-synthetic``: visual features 3072-d, query
tokens 768-d, CLIP-like teacher 512-d, 64-128 frames and 5 captions per video, as TVR has), made
once per run in a temporary folder (``--work DIR`` keeps it there and reuses it when its options
match), then prepared (the prepared cache every training run reads; built afresh and timed, as the
first run over a collection pays it). Run folders and caches go under the same folder.

Per impl, in this order (reference, then auto), each the package's own code:

  train   ``kdcnet.trainer.train`` with the ``tvr`` preset (batches of 128 videos with their 640
          captions, d = 384, 4 heads, bf16 autocast on CUDA, the prepared split on the device when it
          fits), ``--epochs`` epochs, hard triplet negatives from the first epoch
          (``loss.hard_negative_start_epoch=0``: the steps of epochs 20-100 of a TVR run, most of
          it, rather than the random negatives of its first 20). The first epoch is the warm-up
          (Triton compiles, cuBLAS/cuDNN initialisation, placing the split on the GPU) and is
          reported apart; ``steps_per_s`` is the median of the later epochs' rates (the trainer's
          own per-epoch ``steps_per_s``: training steps only, synchronised at the epoch's end; a
          later epoch that meets a new batch shape, e.g. a shorter longest video, compiles again,
          and the median keeps one such epoch out), ``steps_per_s_all`` all later steps over
          their time; ``wall_s`` is the whole trainer call (checks, every epoch with its validation
          and checkpoints, the final test evaluation).
  eval    a full evaluation of the test split with the trained model (``kdcnet.evaluate.evaluate``:
          encode every video and query of both branches, score, fused and per-branch top-100
          ranking, recalls): ``seconds`` is the median of ``--eval-reps`` warm runs (synchronised);
          ``first_seconds`` is the trainer's own final test evaluation (the first at the test
          split's shapes: checkpoint load and any compiles included).

Every row is printed as a ``ROW {json}`` line the moment it is measured (a run cut by a time limit
keeps what it measured; an impl that fails gets an ``error`` row, the other still runs, and the
exit code is 1), then a markdown table with the ratios auto / reference; JSON and
markdown go to ``--out`` (``end_to_end.json``, ``end_to_end.md``) with the GPU, versions, commit,
what ``auto`` picks for each op, and the data shapes.

Sizes (videos train / val / test, epochs): default 2048 / 128 / 2179 (TVR's test split: 10,895
queries), 4 epochs; ``--quick`` 512 / 32 / 384, 4 epochs, sized to finish in about 100 s on an
H200 machine including data generation on its CPU (an estimate from this data's generation and
preparation times on a 2-core CPU, 24 s and 3 s; not yet run on a GPU); ``--quick`` also pins one
Triton configuration per kernel (``KDC_AUTOTUNE=0`` unless set). On a CPU (no GPU) it runs a smoke mode instead: a tiny
collection and model (d = 16), 2 epochs of 3 steps, both impls, in seconds (a test runs it; on CPU
tensors ``auto`` is the reference, so the two rows time the same code).

    python benchmarks/bench_end_to_end.py --quick --out gpu-results/bench
    python benchmarks/bench_end_to_end.py --work /scratch/e2e --out runs/e2e     # keep the data
    python benchmarks/bench_end_to_end.py --smoke                                 # tiny, any device
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Before torch loads OpenMP, as the kdcnet command does (see README, "CPU speed note").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kdcnet` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

IMPLS = ("reference", "auto")
# TVR's feature sizes (I3D+ResNet 3072, RoBERTa 768, CLIP ViT-B/32 512), frame counts after
# MS-SL's cap of 128, and 5 captions per video.
TVR_SHAPE = dict(min_frames=64, max_frames=128, visual_dim=3072, text_dim=768, teacher_dim=512,
                 min_captions=5, max_captions=5)
SMOKE_SHAPE = dict(min_frames=8, max_frames=24, visual_dim=48, text_dim=24, teacher_dim=16, latent_dim=8,
                   min_captions=2, max_captions=3)
SIZES = {  # videos per split and epochs (the first epoch is the warm-up)
    "full": dict(train=2048, val=128, test=2179, epochs=4),
    "quick": dict(train=512, val=32, test=384, epochs=4),
    "smoke": dict(train=24, val=8, test=8, epochs=2),
}
SMOKE_MODEL = ["model.d=16", "model.heads=2", "data.max_frames=16", "data.max_tokens=8", "train.batch_size=8"]
METRICS = ("R@1", "R@5", "R@10", "R@100", "SumR")
SUMMARY_COLUMNS = ["impl", "steps_per_s", "step_ms", "train_x_reference", "eval_s", "eval_x_reference", "SumR"]


def collection(work: Path, mode: str, sizes: dict, seed: int) -> tuple[Path, str, dict, dict]:
    """``(root, name, options, row)``: the synthetic collection under ``work``, made now or reused
    when ``SYNTHETIC.json`` there records the same options."""
    from kdcnet.synthetic import MARKER, make_synthetic

    total = sizes["train"] + sizes["val"] + sizes["test"]
    options = dict(SMOKE_SHAPE if mode == "smoke" else TVR_SHAPE, videos=total,
                   val_fraction=sizes["val"] / total, test_fraction=sizes["test"] / total)
    name = "e2e_smoke" if mode == "smoke" else "tvr_e2e"
    marker = work / name / MARKER
    row = {"stage": "generate", "videos": total, "train_videos": sizes["train"], "val_videos": sizes["val"],
           "test_videos": sizes["test"]}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("seed") == seed and all(info["config"].get(k) == v for k, v in options.items()):
            return work, name, options, dict(row, seconds=0.0, note=f"reused {work / name}")
    print(f"generating {total} videos ({sizes['train']} train, {sizes['val']} val, {sizes['test']} test) into "
          f"{work / name}", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    make_synthetic(work, name, seed=seed, overwrite=True, **options)
    seconds = time.perf_counter() - t0
    info = json.loads(marker.read_text())
    got = {split: info["splits"][split]["videos"] for split in ("train", "val", "test")}
    if got != {split: sizes[split] for split in got}:
        raise RuntimeError(f"the generator split {total} videos as {got}, expected {sizes}")
    gb = sum(f.stat().st_size for f in (work / name).rglob("*") if f.is_file()) / 1e9
    return work, name, options, dict(row, seconds=round(seconds, 2), cpu_s=round(time.process_time() - c0, 2),
                                     ms_per_video=round(1e3 * seconds / total, 2), gb=round(gb, 3),
                                     captions=sum(s["captions"] for s in info["splits"].values()))


def config(root: Path, name: str, impl: str, device: torch.device, epochs: int, cache: Path, mode: str):
    from kdcnet import config as C

    return C.apply_overrides(C.preset("tvr"), [
        f"data.root={root}", f"data.collection={name}", f"data.cache_dir={cache}", f"train.device={device}",
        f"model.impl={impl}", f"train.epochs={epochs}", "train.early_stop=0", "train.plots=false",
        "loss.hard_negative_start_epoch=0", *(SMOKE_MODEL if mode == "smoke" else [])])


def prepare(cfg) -> dict:
    """Build the prepared caches of the three splits (what the first run over a collection pays)."""
    from kdcnet.preflight import open_splits

    t0 = time.perf_counter()
    splits = open_splits(cfg)
    seconds = time.perf_counter() - t0
    opened = {id(s): s for s in (splits.train, splits.val, splits.test)}.values()
    nbytes = sum(s.prepared.nbytes for s in opened if s.prepared is not None)
    dtype = splits.train.prepared.dtype if splits.train.prepared is not None else None
    for s in opened:
        s.close()
    return {"stage": "prepare", "seconds": round(seconds, 2), "gb": round(nbytes / 1e9, 3), "cache_dtype": str(dtype)}


def train_row(impl: str, records: list[dict], wall: float) -> dict:
    """The training row of one impl from the trainer's per-epoch records (epoch 1 = warm-up)."""
    steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}] + records, records)]
    seconds = [n / r["steps_per_s"] for n, r in zip(steps, records)]
    rates = [r["steps_per_s"] for r in records[1:]]
    row = {"stage": "train", "impl": impl, "epochs": len(records), "steps_per_epoch": steps[0],
           "warmup_epoch_s": round(seconds[0], 3), "wall_s": round(wall, 2)}
    if rates:
        median = statistics.median(rates)
        row.update(steps_per_s=median, step_ms=1e3 / median, steps_per_s_all=sum(steps[1:]) / sum(seconds[1:]),
                   epoch_steps_per_s=[round(r, 3) for r in rates], measured_steps=sum(steps[1:]))
    row["loss"] = records[-1]["loss/total"]
    return row


def eval_row(impl: str, cfg, run_dir: Path, device: torch.device, reps: int, first_seconds: float) -> dict:
    """Warm full evaluations of the test split with the run's best checkpoint."""
    from kdcnet import evaluate as E
    from kdcnet.model import KDCNet
    from kdcnet.rundir import RunDir
    from kdcnet.trainer import load_weights

    with RunDir.open(run_dir, create=False) as run:
        ckpt = run.load_checkpoint("best.pt", map_location=device, need=("model",))
    model = KDCNet(cfg).to(device)
    load_weights(model, ckpt["model"], run_dir / "best.pt")
    del ckpt
    test = E.open_split(cfg, cfg.data.test_split)
    times = []
    try:
        for _ in range(reps):
            common.sync(device)
            t0 = time.perf_counter()
            result = E.evaluate(model, test, cfg, device)
            common.sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        test.close()
    return {"stage": "eval", "impl": impl, "seconds": statistics.median(times), "first_seconds": round(first_seconds, 3),
            "reps": reps, "eval_times_s": [round(t, 4) for t in times], "queries": result["num_queries"],
            "videos": result["num_videos"], **{k: result[k] for k in METRICS}}


def run_impl(impl: str, cfg, run_dir: Path, device: torch.device, reps: int, emit) -> None:
    from kdcnet import trainer

    records: list[dict] = []
    last = [time.perf_counter()]

    def on_epoch_end(epoch: int, record: dict) -> None:
        records.append(dict(record))
        last[0] = time.perf_counter()

    t0 = time.perf_counter()
    trainer.train(cfg, run_dir, progress=False, on_epoch_end=on_epoch_end)
    end = time.perf_counter()
    emit(train_row(impl, records, end - t0))
    run_cfg = trainer.resume_config(run_dir)  # the run's resolved config (feature sizes filled in)
    emit(eval_row(impl, run_cfg, run_dir, device, reps, end - last[0]))


def summary(rows: list[dict]) -> list[dict]:
    """One row per impl: steps/s, eval seconds, and each as a ratio to the reference (> 1: faster)."""
    train = {r["impl"]: r for r in rows if r.get("stage") == "train" and r.get("steps_per_s")}
    evals = {r["impl"]: r for r in rows if r.get("stage") == "eval"}
    out = []
    for impl in IMPLS:
        t, e = train.get(impl), evals.get(impl)
        if not t and not e:
            continue
        ref_t, ref_e = train.get("reference"), evals.get("reference")
        out.append({"impl": impl, "steps_per_s": t and t["steps_per_s"], "step_ms": t and t["step_ms"],
                    "train_x_reference": t["steps_per_s"] / ref_t["steps_per_s"] if t and ref_t else None,
                    "eval_s": e and e["seconds"],
                    "eval_x_reference": ref_e["seconds"] / e["seconds"] if e and ref_e else None,
                    "SumR": e and e["SumR"]})
    return out


def write(out: Path, env: dict, rows: list[dict], table: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end.json").write_text(json.dumps({"environment": env, "results": rows, "summary": table},
                                                    indent=2, default=str))
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    header = "\n".join(f"- {k}: {v}" for k, v in env.items() if v is not None)
    md = out / "end_to_end.md"
    md.write_text(f"# end to end: tvr preset, reference vs auto\n\n{header}\n\n"
                  f"## auto / reference (x_reference > 1: auto faster)\n\n{common.markdown_table(table, SUMMARY_COLUMNS)}\n\n"
                  f"## rows\n\n{common.markdown_table(rows, cols, floatfmt='.4g')}\n")
    return md


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller collection (512/32/384 videos): about 100 s on an H200 machine; "
                             "also KDC_AUTOTUNE=0 unless set")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny collection and model, 2 epochs (what a CPU runs by itself)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available; cpu runs the smoke mode)")
    parser.add_argument("--out", default="runs/bench", help="output folder (end_to_end.json, end_to_end.md)")
    parser.add_argument("--work", default=None,
                        help="folder for the synthetic collection, prepared caches and run folders; kept and "
                             "reused next time (default: a temporary folder, removed at the end)")
    parser.add_argument("--train-videos", type=int, default=None, help="training videos (default: by mode)")
    parser.add_argument("--test-videos", type=int, default=None, help="test videos (default: by mode)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per impl, the first a warm-up (>= 2)")
    parser.add_argument("--eval-reps", type=int, default=3, help="timed warm evaluations per impl")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, in order (default: reference,auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic collection")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    mode = "smoke" if args.smoke or device.type != "cuda" else "quick" if args.quick else "full"
    if args.quick:
        os.environ.setdefault("KDC_AUTOTUNE", "0")  # one pinned Triton configuration per kernel: no tuning runs
    sizes = dict(SIZES[mode])
    sizes.update({k: v for k, v in (("train", args.train_videos), ("test", args.test_videos),
                                    ("epochs", args.epochs)) if v is not None})
    if sizes["epochs"] < 2:
        parser.error("--epochs must be >= 2 (the first epoch is the warm-up)")
    if args.eval_reps < 1 or min(sizes["train"], sizes["test"]) < 1:
        parser.error("--eval-reps, --train-videos and --test-videos must be >= 1")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not impls or any(i not in ("reference", "auto", "triton", "cuda") for i in impls):
        parser.error(f"--impls: expected a comma-separated list of reference, auto, triton, cuda; got {args.impls!r}")

    from kdc_kernels import _ext, info

    env = common.environment(device)
    env.update(mode=mode, auto_picks=info.auto_choices(device.type), extension=_ext.status()[0],
               KDC_AUTOTUNE=os.environ.get("KDC_AUTOTUNE"), KDC_DETERMINISTIC=os.environ.get("KDC_DETERMINISTIC"),
               cpus=os.cpu_count())
    temp = args.work is None
    work = Path(tempfile.mkdtemp(prefix="kdc-e2e-") if temp else args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        common.print_rows([row])

    print(f"end to end on {device} ({env.get('gpu') or env.get('cpu')}), {mode} mode, impls {', '.join(impls)}; "
          f"work folder {work}", flush=True)
    interrupted, failed = False, []
    try:
        root, name, options, gen = collection(work, mode, sizes, args.seed)
        emit(gen)
        first = config(root, name, impls[0], device, sizes["epochs"], work / "prepared", mode)
        env.update(data={**options, **{f"{s}_videos": sizes[s] for s in ("train", "val", "test")},
                         "command": "kdcnet make-synthetic --out DIR --collection " + name + " " + " ".join(
                             f"--{k.replace('_', '-')} {v}" for k, v in options.items())},
                   model=dict(preset="tvr", d=first.model.d, heads=first.model.heads,
                              batch_videos=first.train.batch_size, max_frames=first.data.max_frames,
                              max_tokens=first.data.max_tokens, epochs=sizes["epochs"], warmup_epochs=1,
                              negatives="hard from the first epoch (loss.hard_negative_start_epoch=0)",
                              bf16_autocast=device.type == "cuda" and first.train.bf16))
        shutil.rmtree(work / "prepared", ignore_errors=True)  # built afresh: what a first run pays
        print("preparing the train, val and test splits", flush=True)
        emit(prepare(first))
        for impl in impls:
            print(f"== --impl {impl}: {sizes['epochs']} epochs (the first a warm-up), then {args.eval_reps} "
                  f"evaluations of the test split", flush=True)
            cfg = config(root, name, impl, device, sizes["epochs"], work / "prepared", mode)
            shutil.rmtree(work / "runs" / impl, ignore_errors=True)  # this benchmark's run folder of the last time
            try:
                run_impl(impl, cfg, work / "runs" / impl, device, args.eval_reps, emit)
            except Exception as err:  # noqa: BLE001 - reported, and the other impl still runs
                traceback.print_exc()
                failed.append(impl)
                emit({"stage": "error", "impl": impl,
                      "error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing what was measured", flush=True)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    env["interrupted"], env["failed"] = interrupted, failed
    table = summary(rows)
    md = write(Path(args.out), env, rows, table)
    print(common.markdown_table(table, SUMMARY_COLUMNS))
    if interrupted or failed:
        sys.exit(130 if interrupted else 1)
    return md


if __name__ == "__main__":
    main()
