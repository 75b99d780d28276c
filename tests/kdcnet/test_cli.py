"""The kdcnet command line: help lists every option with its default, bad input ends with one
line on stderr and exit code 2, and train / eval / resume work end to end on a tiny collection."""

from __future__ import annotations

import argparse
import json

import pytest

from kdcnet import cli, synthetic

from .conftest import NAME, TINY_READ

TINY_SETS = ["--set", f"data.max_frames={TINY_READ['max_frames']}", "--set", f"data.max_tokens={TINY_READ['max_tokens']}",
             "--set", "model.d=16", "--set", "model.heads=2", "--set", "train.plots=false",
             "--set", "eval.video_chunk=2"]


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_impl_choices_are_the_packages():
    """The CLI keeps its own list so that ``kdcnet --help`` never imports torch; it must be the
    package's list."""
    from kdc_kernels import _config

    assert cli.IMPLS == _config.IMPL_CHOICES


def test_help_lists_every_option_with_its_default(capsys):
    parser = cli.build_parser()
    subs = _subparsers(parser)
    assert set(subs) == {"train", "eval", "prepare", "make-synthetic"}
    for name, sub in subs.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.option_strings[-1] in text, (name, action.option_strings)
                shown = sub.formatter_class(name)._get_help_string(action)
                assert "(default:" in shown or action.required or "%(default)" in shown, (name, action.dest, shown)
    for option in ("--epochs", "--batch-size", "--device", "--impl", "--seed", "--run-dir", "--resume", "--set",
                   "--preset", "--data-root", "--collection", "--visual-feature", "--ablate"):
        assert option in subs["train"].format_help()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and "train" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    (["train", "--preset", "msrvtt"], "argument --preset: invalid choice: 'msrvtt'"),
    (["train", "--impl", "fast"], "argument --impl: invalid choice"),
    (["fly"], "argument"),
    (["eval"], "the following arguments are required: --run"),
    (["train", "--set", "model.foo=1"], "--set model.foo: unknown key"),
    (["train", "--set", "model.d=abc"], "--set model.d=abc: expected an integer"),
    (["train", "--epochs", "0"], "train.epochs must be an int >= 1, got 0"),
    (["train", "--preset", "tvr"], "preset 'tvr' needs --data-root ROOT"),
    (["train", "--resume", "somewhere", "--epochs", "3"], "--resume continues a run with its saved config; drop --epochs"),
    (["eval", "--run", "/nonexistent/run"], "--run /nonexistent/run: no config.json there"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_bad_data_gives_one_line(tmp_path, capsys):
    assert cli.main(["train", "--data-root", str(tmp_path), "--collection", "nothing", "--run-dir",
                     str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing" in err and err.startswith("kdcnet train: error:")


def test_train_without_arguments_uses_the_default_synthetic_collection(tiny_root, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_default():
        calls.append(1)
        return tiny_root, NAME

    monkeypatch.setattr(synthetic, "ensure_default_synthetic", fake_default)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--epochs", "1", "--device", "cpu", *TINY_SETS]) == 0
    out = capsys.readouterr().out
    assert calls and "chance (random ranking)" in out and "KDC-Net" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("synthetic-") and (run / "test_metrics.json").is_file()


def test_train_resume_and_eval(tiny_root, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data-root", str(tiny_root), "--collection", NAME, "--epochs", "1", "--seed", "3",
            "--run-dir", str(run), "--device", "cpu", *TINY_SETS]
    assert cli.main(base) == 0
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 3
    assert cli.main(["train", "--resume", str(run)]) == 0  # already finished: evaluates again
    assert cli.main(base) == 2 and "already holds a run" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(run), "--split", "val", "--checkpoint", "last"]) == 0
    saved = json.loads((run / "val_metrics.json").read_text())
    assert {"R@1", "R@5", "R@10", "R@100", "SumR", "num_queries", "num_videos", "chance_SumR", "mv_bins"} <= set(saved)
    assert saved["num_videos"] == 3


def test_make_synthetic_is_mounted(tmp_path, capsys):
    assert cli.main(["make-synthetic", "--out", str(tmp_path), "--collection", "mini", "--videos", "12",
                     "--min-frames", "4", "--max-frames", "8"]) == 0
    assert (tmp_path / "mini" / "TextData").is_dir()
    assert cli.main(["make-synthetic", "--out", str(tmp_path), "--collection", "mini", "--videos", "12"]) == 2


def test_ablation_trains_every_variant_and_continues(tiny_root, tmp_path, capsys):
    run = tmp_path / "ablation"
    argv = ["train", "--ablate", "--data-root", str(tiny_root), "--collection", NAME, "--epochs", "1", "--device", "cpu",
            "--run-dir", str(run), *TINY_SETS]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "ablation.json").read_text())
    assert [row["variant"] for row in saved["rows"]] == [name for name, _ in cli.ABLATIONS] + ["chance"]
    assert (run / "ablation.txt").read_text().strip() in out
    for name, _ in cli.ABLATIONS:
        assert (run / name.replace(" ", "-") / "test_metrics.json").is_file()
    (run / "no-DTA" / "test_metrics.json").unlink()  # as if killed after its last checkpoint
    assert cli.main(argv) == 0  # finished variants are reused, the interrupted one resumed
    again = json.loads((run / "ablation.json").read_text())
    assert [row["SumR"] for row in again["rows"]] == [row["SumR"] for row in saved["rows"]]
