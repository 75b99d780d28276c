"""Benchmark the training input: batches per second at TVR shapes for every way kdcnet can read them,
beside the model's training step on the same machine, and which of the two bounds training.

Collection: by default the TVR-shaped synthetic one (``kdcnet make-synthetic --videos 800
--min-frames 64 --max-frames 128 --visual-dim 3072 --text-dim 768 --teacher-dim 512
--min-captions 5 --max-captions 5``: 532 training videos of 64-128 frames, 1.2 GB), generated once
into ``--work``; ``--data-root ROOT --collection NAME`` measures real data instead. Batches are the
``tvr`` preset's: 128 videos with all their captions, 128 frames at most, 30 tokens; only full
batches are timed (``drop_last``), over ``--epochs`` epochs.

Paths (one row each; ``ratio`` is batches/s over the old path's, measured in the same run):

  old, cold / warm       the unprepared path (``data.prepared=false``, item cache off as at TVR
                         scale, where ~20 GB never fit it): files read, frames binned and
                         normalised, one HDF5 read per caption, every epoch; cold = its files
                         dropped from the page cache first (``posix_fadvise``, this process's
                         files only), warm = read again
  prepare                building the prepared cache from cold source files (what the first run
                         over a collection pays)
  prepared, cold / warm  ``train_batches`` over the prepared memory maps, fresh memory per batch
  loader                 the trainer's path, :func:`kdcnet.loader.epoch_batches`: recycled memory
                         and a prefetch thread on the CPU; page-locked memory and copies one batch
                         ahead on a GPU; ``prefetch=0``: the same in the calling thread
  loader, busy step      the same while the consumer waits a simulated step as long as one batch
                         takes to load (a GPU step leaves the host idle): overlapped loading keeps
                         the rate, loading in the calling thread halves it
  (the loader and on-device rows are timed after one untimed epoch: buffers allocated, split placed)
  on-device              ``data.on_device=true``: the split held on the device, gathered there
  model step             ``kdcnet.trainer.train_step`` of the preset's model on one batch, same device

Each timed path's first batch is checked against the old path's (equal, or its float16 rounding)
before it is timed. ``batches_per_s`` is over all timed epochs, ``epoch_median_per_s`` the median
of the per-epoch rates; ``cpu_ms`` is CPU time per batch (all threads of this process): on a shared
machine it says what a batch costs when the wall-clock rates say what the machine gave.

Usage:
    python benchmarks/bench_input_pipeline.py [--out DIR] [--epochs 3] [--device cpu|cuda]
    python benchmarks/bench_input_pipeline.py --smoke          # small collection, seconds (CPU test)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP, as the kdcnet command does: spinning worker threads would steal the
# loading thread's core on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `kdcnet` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from kdcnet import config as C  # noqa: E402
from kdcnet import distributed as D  # noqa: E402
from kdcnet.data import PRVRCollection, train_batches  # noqa: E402
from kdcnet.loader import epoch_batches  # noqa: E402

TVR = dict(videos=800, min_frames=64, max_frames=128, visual_dim=3072, text_dim=768, teacher_dim=512,
           min_captions=5, max_captions=5)
SMOKE = dict(videos=40, min_frames=8, max_frames=24, visual_dim=48, text_dim=24, teacher_dim=16, latent_dim=8,
             min_captions=2, max_captions=3)
COLUMNS = ["path", "dtype", "batches", "seconds", "batches_per_s", "epoch_median_per_s", "cpu_ms", "ratio", "note"]
FEATURES = ("videos", "queries", "teacher_videos", "teacher_queries")


def evict(paths) -> None:
    """Drop ``paths`` from the page cache (pages another process keeps mapped stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check_batch(got, want, dtype: str, what: str) -> None:
    """``got`` (any device) holds ``want``'s values, or their float16 rounding."""
    got, want = got.to("cpu"), want.to("cpu")
    for name in ("video_lengths", "query_lengths", "query_video", "video_index", "query_index", *FEATURES):
        a, b = getattr(want, name), getattr(got, name)
        if a is None and b is None:
            continue
        if dtype == "float16" and name in FEATURES:
            a = a.half().float()
        if a.shape != b.shape or not torch.equal(a, b):
            raise AssertionError(f"{what}: {name} differs from the old path's batch")


def timed(batches_of_epoch, epochs: int, device: torch.device, step_s: float = 0.0, warmup: int = 0) -> dict:
    """Wall and CPU seconds to consume ``epochs`` epochs of ``batches_of_epoch(epoch)`` after
    ``warmup`` untimed ones; with ``step_s`` the consumer sleeps that long per batch (a step on an
    accelerator)."""
    for epoch in range(warmup):
        with contextlib.closing(batches_of_epoch(epoch)) as batches:
            for _ in batches:
                pass
    n, rates = 0, []
    wall, cpu = time.perf_counter(), time.process_time()
    for epoch in range(epochs):
        t0, n0 = time.perf_counter(), n
        with contextlib.closing(batches_of_epoch(epoch)) as batches:
            for _ in batches:
                n += 1
                if step_s:
                    time.sleep(step_s)
        common.sync(device)
        rates.append((n - n0) / (time.perf_counter() - t0))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"batches": n, "seconds": round(wall, 3), "batches_per_s": n / wall,
            "epoch_median_per_s": statistics.median(rates), "cpu_ms": 1e3 * cpu / max(n, 1)}


def collection_for(args) -> tuple[Path, str]:
    if args.data_root:
        return Path(args.data_root), args.collection
    from kdcnet.synthetic import make_synthetic

    shape = SMOKE if args.smoke else TVR
    name = "smoke" if args.smoke else "tvr_shaped"
    root = Path(args.work)
    if not (root / name / "TextData").is_dir():
        print(f"generating the {name} collection into {root} (once)", flush=True)
        make_synthetic(root, name, seed=0, **shape)
    return root, name


def model_step_ms(cfg: C.Config, batch, device: torch.device, reps: int) -> float:
    from kdcnet import trainer
    from kdcnet.model import KDCNet

    torch.manual_seed(0)
    model = KDCNet(cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    encoder = trainer.wrap_encoders(model, device)
    batch = batch.to(device)
    return common.time_fn(lambda i: trainer.train_step(model, encoder, batch, optimizer, scheduler, cfg, 0.1),
                          device, warmup=1, reps=reps)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="real data: the folder holding <collection>/")
    parser.add_argument("--collection", default="tvr", help="collection name under --data-root")
    parser.add_argument("--work", default=None,
                        help="where the synthetic collection is kept (default: $KDC_CACHE_DIR/bench-input)")
    parser.add_argument("--smoke", action="store_true", help="a small collection and batches of 8: seconds, for tests")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per path (default 5; smoke 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="videos per batch (default 128; smoke 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step-reps", type=int, default=None,
                        help="timed model steps after one warm-up (default: 10 on a GPU, 1 on a CPU; 0: no step)")
    parser.add_argument("--dtypes", default="float32,float16", help="prepared-cache dtypes to measure")
    parser.add_argument("--out", default="runs/bench", help="output folder (JSON, markdown)")
    args = parser.parse_args(argv)
    args.work = args.work or str(Path(os.environ.get("KDC_CACHE_DIR", "~/.cache/kdcnet")).expanduser() / "bench-input")
    epochs = args.epochs or (1 if args.smoke else 5)
    batch_size = args.batch_size or (8 if args.smoke else 128)
    device = torch.device(args.device)

    root, name = collection_for(args)
    cfg = C.preset("synthetic" if args.smoke else "tvr")
    if args.smoke:
        cfg.model.d, cfg.model.heads, cfg.data.max_frames, cfg.data.max_tokens = 16, 2, 16, 8
    cfg.train.batch_size, cfg.train.device = batch_size, str(device)
    read = dict(max_frames=cfg.data.max_frames, max_tokens=cfg.data.max_tokens)
    cache = Path(tempfile.mkdtemp(prefix="prepared-", dir=args.work))   # a fresh cache: "prepare" builds
    env = common.environment(device)
    env.update(collection=f"{root / name}", batch_size=batch_size, epochs=epochs, cpus=os.cpu_count(),
               load_before=round(os.getloadavg()[0], 2))
    print(f"input pipeline on {device}: {root / name}, batches of {batch_size} videos, {epochs} epochs, "
          f"load average {env['load_before']} on {os.cpu_count()} CPUs", flush=True)
    rows: list[dict] = []

    def row(path, dtype, result=None, note="", **extra):
        r = {"path": path, "dtype": dtype, **(result or {}), "note": note, **extra}
        rows.append(r)
        common.print_rows([r])
        return r

    def plan(epoch):
        videos = D.epoch_videos(len(probe.video_ids), batch_size, 0, epoch, D.World())
        return videos[:len(videos) - len(videos) % batch_size]       # full batches only

    try:
        probe = PRVRCollection(root, name, "train", **read)
        sources = probe.source_files()
        want = next(train_batches(probe, batch_size, seed=0, epoch=0, shuffle=False, video_subset=plan(0)))
        probe.close()

        # ---- the old path
        def old_batches(epoch):
            return train_batches(old, batch_size, seed=0, epoch=0, shuffle=False, video_subset=plan(epoch))

        evict(sources)
        old = PRVRCollection(root, name, "train", cache_bytes=0, **read)
        cold = row("old, cold", "float32", timed(old_batches, 1, device))
        warm = row("old, warm", "float32", timed(old_batches, epochs, device))
        old.close()
        base = warm["batches_per_s"]
        for r in (cold, warm):
            r["ratio"] = r["batches_per_s"] / base

        for dtype in args.dtypes.split(","):
            # ---- preparation (source files dropped from the page cache first), then the maps cold and warm
            evict(sources)
            t0, c0 = time.perf_counter(), time.process_time()
            data = PRVRCollection(root, name, "train", **read).prepare(cache, dtype=dtype)
            store = data.prepared
            row("prepare", dtype, {"seconds": round(time.perf_counter() - t0, 3),
                                   "cpu_ms": 1e3 * (time.process_time() - c0)},
                note=f"sources cold; {store.nbytes / 1e9:.3f} GB on disk, {len(data.video_ids)} videos, "
                     f"{len(data.cap_ids)} captions",
                cache_bytes=store.nbytes)
            files = [store.folder / f"{k}.npy" for k in store.arrays]
            data.close()
            del data, store
            gc.collect()
            evict(files)
            data = PRVRCollection(root, name, "train", **read).prepare(cache, dtype=dtype)

            def prepared_batches(epoch):
                return train_batches(data, batch_size, seed=0, epoch=0, shuffle=False, video_subset=plan(epoch))

            check_batch(next(prepared_batches(0)), want, dtype, f"prepared {dtype}")
            evict(files)  # the check read the first batch's pages back
            for label, n in (("prepared, cold", 1), ("prepared, warm", epochs)):
                r = row(label, dtype, timed(prepared_batches, n, device))
                r["ratio"] = r["batches_per_s"] / base

            # ---- the trainer's path, in the calling thread and ahead of it, idle and busy consumer
            loaders = {}
            for prefetch in (0, 2):
                c = C.apply_overrides(cfg, [f"data.prefetch={prefetch}", "data.on_device=false"])

                def loader_batches(epoch, c=c):
                    return epoch_batches(data, c, device, plan(epoch))

                loaders[prefetch] = loader_batches
                check_batch(next(loader_batches(0)), want, dtype, f"loader {dtype}")
                r = row(f"loader, prefetch={prefetch}", dtype, timed(loader_batches, epochs, device, warmup=1))
                r["ratio"] = r["batches_per_s"] / base
            step_s = 1.0 / rows[-2]["batches_per_s"]        # as long as one batch takes in the calling thread
            for prefetch, loader_batches in loaders.items():
                r = row(f"loader, prefetch={prefetch}, busy step", dtype,
                        timed(loader_batches, epochs, device, step_s=step_s, warmup=1),
                        note=f"step {1e3 * step_s:.0f} ms (slept)")
                r["ratio"] = r["batches_per_s"] / base

            # ---- on the device
            c = C.apply_overrides(cfg, ["data.on_device=true", "data.device_share=0.9"])
            t0 = time.perf_counter()
            held = PRVRCollection(root, name, "train", **read).prepare(cache, dtype=dtype)
            try:
                epoch_batches(held, c, device, plan(0)).close()     # places the split
            except ValueError as e:
                row("on-device", dtype, note=f"skipped: {e}")
            else:
                moved = time.perf_counter() - t0

                def device_batches(epoch):
                    return epoch_batches(held, c, device, plan(epoch))

                check_batch(next(device_batches(0)), want, dtype, f"on-device {dtype}")
                r = row("on-device", dtype, timed(device_batches, epochs, device, warmup=1),
                        note=f"held in {moved:.1f} s")
                r["ratio"] = r["batches_per_s"] / base
            held.close()
            data.close()
            del data, held
            gc.collect()

        # ---- the model's step, on the same device
        reps = (10 if device.type == "cuda" else 1) if args.step_reps is None else args.step_reps
        if reps > 0:
            step_cfg = C.apply_overrides(cfg, [f"model.visual_dim={want.videos.shape[-1]}",
                                               f"model.text_dim={want.queries.shape[-1]}"])
            ms = model_step_ms(step_cfg, want, device, reps)
            row("model step", "float32", {"batches": 1, "seconds": ms / 1e3, "batches_per_s": 1e3 / ms},
                note=f"{cfg.preset} preset, d={cfg.model.d}, {device}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    env["load_after"] = round(os.getloadavg()[0], 2)
    dtype = "float16" if device.type == "cuda" and "float16" in args.dtypes else args.dtypes.split(",")[0]
    path = "on-device" if device.type == "cuda" else "loader, prefetch=2"
    feed = next((r for r in rows if r["path"] == path and r["dtype"] == dtype and r.get("batches_per_s")),
                next(r for r in rows if r["path"] == "loader, prefetch=2" and r["dtype"] == dtype))
    load = f"load average {env['load_before']} before, {env['load_after']} after, {os.cpu_count()} CPUs"
    if rows[-1]["path"] != "model step":
        verdict = (f"the trainer's input path ({feed['path']}, {dtype}) makes {feed['batches_per_s']:.1f} batches/s; "
                   f"the model step was not timed ({load})")
    else:
        step = rows[-1]["batches_per_s"]
        bound = "the model step (compute-bound)" if feed["batches_per_s"] >= step else "the input (input-bound)"
        verdict = (f"training here is bound by {bound}: the trainer's input path ({feed['path']}, {dtype}) makes "
                   f"{feed['batches_per_s']:.1f} batches/s, the model steps at {step:.2f}/s ({load})")
    print(verdict, flush=True)
    env["verdict"] = verdict
    out = common.write_results("input_pipeline", args.out, env, rows, COLUMNS)
    print(common.markdown_table(rows, COLUMNS))
    return out


if __name__ == "__main__":
    main()
