"""kdcnet fails safe: a bad checkpoint, a busy run folder, a run killed before its first checkpoint
and everything checkable before the first epoch end with one line naming what is wrong (exit 2),
leave no run folder behind when the run never started, and never mix two runs in one folder.

Mutations of the code under test that these tests catch (each applied alone, tests run, reverted):

| mutation | caught by |
| --- | --- |
| ``atomic_write`` uses the shared name ``.<name>.tmp`` | test_atomic_writes_use_unique_temporary_names |
| ``RunDir`` takes no ``flock`` | test_a_busy_run_folder_..., test_two_trainings_started_together_on_one_folder |
| ``RunDir`` leaves stale ``.*.tmp`` files | test_a_run_killed_before_its_first_checkpoint_... (both) |
| ``preflight.open_splits`` skips ``check_feature_shapes`` | test_every_split_is_checked_before_training (4 HDF5 cases) |
| ``load_weights`` skips its key/shape comparison | test_bad_*_checkpoint_* (missing/unexpected weight, other width) |
| ``validate`` skips the finite check / the hsa_scales bound | test_bad_settings_... (inf/nan cases / hsa_scales=40) |
| ``preflight.preflight`` skips ``check_impl`` | test_bad_settings_...[--impl cuda], test_triton_on_the_cpu_... |
| ``HierarchicalSemanticAggregation`` without the shift clamp | test_phrase_scales_up_to_max_tokens_... (3 cases) |
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F

from kdcnet import cli, preflight, rundir
from kdcnet import config as C
from kdcnet import trainer
from kdcnet.data import caption_path, moments_path, teacher_video_path, text_feature_path, video_of
from kdcnet.model import HierarchicalSemanticAggregation

from .conftest import NAME
from .test_cli import TINY_SETS
from .test_trainer import VOLATILE, tiny_train_config

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _cli(argv, capsys) -> tuple[int, str]:
    """``kdcnet ARGV`` in this process: (exit code, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _history(run):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_argv(root, run, *extra):
    return ["train", "--data-root", root, "--collection", NAME, "--epochs", "1", "--batch-size", "2", "--device", "cpu",
            "--run-dir", run, *TINY_SETS, *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    """A finished 1-epoch run folder (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    trainer.train(tiny_train_config(tiny_root, epochs=1), run, progress=False, console=False)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


# ------------------------------------------------------------------------------- bad checkpoints


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _edit(change):
    def corrupt(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        change(ckpt)
        torch.save(ckpt, path)
    return corrupt


def _other_width(ckpt):  # the state dict of a model of another width
    ckpt["model"] = {k: torch.zeros(*(2 * n if n == 16 else n for n in v.shape)) for k, v in ckpt["model"].items()}


BAD_CHECKPOINTS = {
    "truncated": (_truncate, "cannot be read as a checkpoint, truncated or corrupt"),
    "empty": (lambda p: p.write_bytes(b""), "empty file (0 bytes), not a checkpoint"),
    "garbage": (lambda p: p.write_bytes(b"this is not a checkpoint\n" * 20), "cannot be read as a checkpoint"),
    "not a dict": (lambda p: torch.save([1, 2, 3], p), "not a kdcnet checkpoint (a list, expected a dict)"),
    "no model entry": (_edit(lambda c: c.pop("model")), "not a kdcnet checkpoint (no model entry)"),
    "missing weight": (_edit(lambda c: c["model"].pop(next(iter(c["model"])))),
                       "the checkpoint's model does not match the config (missing "),
    "unexpected weight": (_edit(lambda c: c["model"].update(extra=torch.zeros(2))),
                          "does not match the config (unexpected extra"),
    "other width": (_edit(_other_width), "does not match the config (shape of "),
}
RESUME_ONLY = {
    "foreign optimizer state": (_edit(lambda c: c.update(optimizer={"state": {}, "param_groups": [{"params": [0]}]})),
                                "its optimizer state does not fit this run"),
    "foreign training state": (_edit(lambda c: c.update(state={"epoch": 0})), "its training state does not fit this run"),
}


@pytest.mark.parametrize("case", [*BAD_CHECKPOINTS, *RESUME_ONLY])
def test_bad_last_checkpoint_on_resume_is_one_line_and_touches_nothing(run_copy, case, capsys):
    corrupt, message = {**BAD_CHECKPOINTS, **RESUME_ONLY}[case]
    corrupt(run_copy / "last.pt")
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    code, err = _cli(["train", "--resume", run_copy], capsys)
    assert code == 2
    _one_line(err, f"kdcnet train: error: {run_copy / 'last.pt'}: ", message)
    after = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert after == before  # the log, metrics and checkpoints of a refused resume are untouched


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_best_checkpoint_on_eval_is_one_line(run_copy, case, capsys):
    corrupt, message = BAD_CHECKPOINTS[case]
    corrupt(run_copy / "best.pt")
    code, err = _cli(["eval", "--run", run_copy], capsys)
    assert code == 2
    _one_line(err, f"kdcnet eval: error: {run_copy / 'best.pt'}: ", message)
    assert _cli(["eval", "--run", run_copy, "--checkpoint", "last"], capsys)[0] == 0  # the other one still works


def test_bad_checkpoint_exits_2_from_the_command_line(run_copy):
    (run_copy / "last.pt").write_bytes(b"\x80\x04garbage")
    done = subprocess.run([sys.executable, "-m", "kdcnet", "train", "--resume", str(run_copy)], capture_output=True,
                          text=True, timeout=100, env=_env())
    assert done.returncode == 2
    _one_line(done.stderr, str(run_copy / "last.pt"), "cannot be read as a checkpoint")


# ------------------------------------------------------------------------- one owner per folder

_HOLDER = """
import sys, time
from kdcnet.rundir import RunDir
owners = [RunDir.open(folder, create=True) for folder in sys.argv[1:]]
for owner in owners:
    owner.__enter__()
print("locked", flush=True)
time.sleep(100)
"""


def test_a_busy_run_folder_is_refused_and_a_killed_owner_does_not_keep_it(tiny_root, run_copy, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(fresh), str(run_copy)], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        pid = holder.pid
        for argv, flag, folder in ((_train_argv(tiny_root, fresh), "--run-dir", fresh),
                                   (["train", "--resume", run_copy], "--resume", run_copy),
                                   (["eval", "--run", run_copy], "--run", run_copy)):
            code, err = _cli(argv, capsys)
            assert code == 2
            _one_line(err, f"{flag} {folder} is in use by another kdcnet process (pid ", "choose another folder")
        assert f"(pid {pid} on " in _cli(_train_argv(tiny_root, fresh), capsys)[1]
        assert {p.name for p in fresh.iterdir()} == {".lock"}  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the locks with the killed processes: the folders are free again
    assert _cli(_train_argv(tiny_root, fresh), capsys)[0] == 0
    assert _cli(["train", "--resume", run_copy], capsys)[0] == 0


def test_two_trainings_started_together_on_one_folder(tiny_root, tmp_path):
    """The reproducer of the issue: two runs with different seeds on one --run-dir. One trains, the
    other is refused (busy, or the folder already holds the first's run); nothing is mixed."""
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "kdcnet", *map(str, _train_argv(tiny_root, run, "--seed", seed))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
             for seed in (1, 2)]
    results = [(p.wait(timeout=100), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [code for code, _ in results].index(0) + 1  # its seed
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another kdcnet process" in refused or "already holds a run" in refused, refused
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == winner
    for name in ("last.pt", "best.pt"):
        assert torch.load(run / name, map_location="cpu", weights_only=False)["config"]["train"]["seed"] == winner
    assert [h["epoch"] for h in _history(run)] == [0]
    assert not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------------- atomic writes


def test_atomic_writes_use_unique_temporary_names(tmp_path):
    target = tmp_path / "last.pt"
    names = []

    def outer(f):  # a second writer of the same file starts while the first is half-way
        names.extend(p.name for p in tmp_path.glob(".*.tmp"))
        rundir.atomic_write(target, b"inner")
        f.write(b"outer")

    rundir.atomic_write(target, outer)
    assert target.read_bytes() == b"outer" and not list(tmp_path.glob(".*.tmp"))
    assert len(names) == 1 and names[0].startswith(f".last.pt.{os.getpid()}.") and names[0] != ".last.pt.tmp"

    def fails(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_write(target, fails)
    assert target.read_bytes() == b"outer" and not list(tmp_path.glob(".*.tmp"))  # old file kept, no temp left


# ------------------------------------------------------------------ killed before the first checkpoint


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight_run(tiny_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    trainer.train(tiny_train_config(tiny_root, epochs=2), run, progress=False, console=False)
    return run


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "rerun"])
def test_a_run_killed_before_its_first_checkpoint_starts_from_scratch(tiny_root, straight_run, tmp_path, monkeypatch,
                                                                     resume):
    run = tmp_path / "run"
    save = rundir.RunDir.save_checkpoint

    def die_before_last(self, name, ckpt):  # best.pt is written, the process dies before last.pt
        if name == "last.pt":
            raise Killed
        save(self, name, ckpt)

    monkeypatch.setattr(rundir.RunDir, "save_checkpoint", die_before_last)
    with pytest.raises(Killed):
        trainer.train(tiny_train_config(tiny_root, epochs=2), run, progress=False, console=False)
    monkeypatch.undo()
    assert (run / "config.json").is_file() and (run / "best.pt").is_file() and not (run / "last.pt").exists()
    # what a SIGKILL at that moment leaves besides: temporary files and (older code) a metrics line
    (run / ".best.pt.tmp").write_bytes(b"half a checkpoint")
    (run / ".last.pt.12345.0badc0de.tmp").write_bytes(b"half a checkpoint")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "step": 3}) + "\n")

    if resume:
        result = trainer.train(trainer.resume_config(run), run, resume=True, progress=False, console=False)
    else:
        result = trainer.train(tiny_train_config(tiny_root, epochs=2), run, progress=False, console=False)
    assert [h["epoch"] for h in _history(run)] == [0, 1]
    assert _history(run) == _history(straight_run)  # exactly the uninterrupted run
    assert result["SumR"] == json.loads((straight_run / "test_metrics.json").read_text())["SumR"]
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(r / name, map_location="cpu", weights_only=False)["model"] for r in (straight_run, run))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(run.glob(".*.tmp"))
    if resume:
        assert "starting from scratch with its config" in (run / "train.log").read_text()


def test_resume_of_a_folder_that_is_no_run_creates_nothing(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="no last.pt checkpoint there"):
        trainer.train(tiny_train_config(tiny_root), tmp_path / "nothing", resume=True, console=False)
    assert not (tmp_path / "nothing").exists()


# --------------------------------------------------------------------- checked before the first epoch


def _caption(root, split, line=1):
    return caption_path(root, NAME, split).read_text().splitlines()[line].split()[0]


def _empty_test_captions(root):
    caption_path(root, NAME, "test").write_text("")


def _bad_test_moment(root):
    with open(moments_path(root, NAME, "test"), "a") as f:
        f.write(f"{_caption(root, 'test')}x 3.0 1.0 10.0\n")


def _replace_query(split, shape, line=1):
    def corrupt(root):
        with h5py.File(text_feature_path(root, NAME), "a") as f:
            key = _caption(root, split, line)
            del f[key]
            f[key] = torch.zeros(shape).numpy()
    return corrupt


def _wrong_shaped_teacher_video(root):
    with h5py.File(teacher_video_path(root, NAME), "a") as f:
        key = video_of(_caption(root, "train"))
        del f[key]
        f[key] = torch.zeros(0, 8).numpy()


DATA_FAULTS = {
    "empty test caption file": (_empty_test_captions, [f"{NAME}test.caption.txt", "holds no captions"]),
    "bad test moments line": (_bad_test_moment, [f"{NAME}test.moments.txt", "need 0 <= start <= end"]),
    "wrong-shaped test query entry": (_replace_query("test", (3, 17)),
                                      [f"roberta_{NAME}_query_feat.hdf5: key ", "expected [n_tokens >= 1, 16], got (3, 17)"]),
    "empty test query entry": (_replace_query("test", (0, 16)), ["expected [n_tokens >= 1, 16], got (0, 16)"]),
    "wrong-shaped val query entry": (_replace_query("val", (16,)), ["expected [n_tokens >= 1, 16], got (16,)"]),
    "test queries of another size": (_replace_query("test", (4, 17), line=0),
                                     ["17 features per token, but the train split's have 16"]),
    "wrong-shaped teacher video entry": (_wrong_shaped_teacher_video, [f"new_clip_vit_32_{NAME}_vid_features.hdf5",
                                                                       "expected [n_frames >= 1, 8], got (0, 8)"]),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_every_split_is_checked_before_training(tiny_copy, tmp_path, fault, capsys, monkeypatch):
    corrupt, fragments = DATA_FAULTS[fault]
    corrupt(tiny_copy)
    epochs = []
    monkeypatch.setattr(trainer, "_train_epoch", lambda loop, epoch: epochs.append(epoch))
    run = tmp_path / "run"
    code, err = _cli(_train_argv(tiny_copy, run), capsys)
    assert code == 2 and epochs == []  # found before the first epoch
    _one_line(err, "kdcnet train: error: ", *fragments)
    assert not run.exists()
    if fault == "empty test caption file":
        assert _cli(["train", "--ablate", *_train_argv(tiny_copy, run)[1:]], capsys)[0] == 2
        assert not run.exists()


BAD_SETTINGS = {
    "--seed -1": (["--seed", "-1"], "train.seed (--seed) must be an int in [0, 2**64 - 1], got -1"),
    "--seed 2**70": (["--seed", str(2**70)], f"train.seed (--seed) must be an int in [0, 2**64 - 1], got {2**70}"),
    "train.lr=inf": (["--set", "train.lr=inf"], "train.lr must be a finite number, got inf"),
    "train.lr=nan": (["--set", "train.lr=nan"], "train.lr must be a finite number, got nan"),
    "model.sigma_min=inf": (["--set", "model.sigma_min=inf"], "model.sigma_min must be a finite number, got inf"),
    "model.hsa_scales=40": (["--set", "model.hsa_scales=40"],
                            "model.hsa_scales must be phrase widths no longer than a query (data.max_tokens = 8 tokens), "
                            "got (40,)"),
    "--impl cuda on the CPU": (["--impl", "cuda"], "--impl cuda cannot run on cpu: the CUDA kernels need CUDA tensors"),
    "model.visual_dim": (["--set", "model.visual_dim=7"], "model.visual_dim = 7 but the data has 24"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_are_one_line_and_leave_no_run_folder(tiny_root, tmp_path, case, capsys):
    extra, message = BAD_SETTINGS[case]
    run = tmp_path / "run"
    code, err = _cli(_train_argv(tiny_root, run, *extra), capsys)
    assert code == 2
    _one_line(err, "kdcnet train: error: " + message)
    assert not run.exists()


def test_triton_on_the_cpu_without_the_interpreter_is_refused_before_the_run(tiny_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, err = _cli(_train_argv(tiny_root, tmp_path / "run", "--impl", "triton"), capsys)
    assert code == 2
    _one_line(err, "--impl triton cannot run on cpu: ", "TRITON_INTERPRET=1")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("KDC_IMPL", "triton")
    code, err = _cli(_train_argv(tiny_root, tmp_path / "run"), capsys)
    assert code == 2
    _one_line(err, "KDC_IMPL=triton cannot run on cpu")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    preflight.check_impl("triton", torch.device("cpu"))  # the interpreter runs Triton kernels on the CPU


@pytest.mark.parametrize("k, length", [(8, 3), (8, 1), (5, 2), (4, 1), (7, 7), (3, 5)])
def test_phrase_scales_up_to_max_tokens_run_on_queries_of_any_length(k, length):
    """A phrase wider than every query of a batch is all zero padding outside the query, as a
    zero-padded ('same') Conv1d computes it, instead of a shape error."""
    hsa = HierarchicalSemanticAggregation(6, (k,))
    torch.nn.init.normal_(hsa.convs[0].bias)
    x = torch.randn(2, length, 6)
    conv = hsa.convs[0]
    phrase = F.relu(F.conv1d(F.pad(x.transpose(1, 2), ((k - 1) // 2, k // 2)), conv.weight, conv.bias)).transpose(1, 2)
    got = hsa(x, torch.ones(2, length, dtype=torch.bool))
    torch.testing.assert_close(got, x + phrase)  # one scale: its gate weight is 1


def test_training_with_the_widest_phrase_scale(tiny_root, tmp_path):
    cfg = tiny_train_config(tiny_root, epochs=1)
    cfg = C.apply_overrides(cfg, [f"model.hsa_scales=1,{cfg.data.max_tokens}"])
    result = trainer.train(cfg, tmp_path / "run", progress=False, console=False)
    assert result["num_videos"] == 3
