"""CPU smoke run of benchmarks/bench_end_to_end.py: a tiny collection trained and evaluated with
both impls through kdcnet's trainer and evaluation, every row printed as it is measured, the files
it writes, the temporary folder removed, a kept collection reused, and a run cut part-way keeping
what it measured."""

from __future__ import annotations

import json
import math
import tempfile

import pytest

from benchmarks import bench_end_to_end as bench


def _rows(out) -> list[dict]:
    return [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]


def test_smoke_run_both_impls(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    md = bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    printed = _rows(out)
    assert f"work folder {tmp_path / 'tmp'}/kdc-e2e-" in out
    data = json.loads((tmp_path / "out" / "end_to_end.json").read_text())
    rows = data["results"]
    assert printed == json.loads(json.dumps(rows)), "every row is printed as a ROW line"
    assert [(r["stage"], r.get("impl")) for r in rows] == [
        ("generate", None), ("prepare", None), ("train", "reference"), ("eval", "reference"),
        ("train", "auto"), ("eval", "auto")]
    gen = rows[0]
    assert (gen["train_videos"], gen["val_videos"], gen["test_videos"]) == (24, 8, 8) and gen["seconds"] > 0
    train = {r["impl"]: r for r in rows if r["stage"] == "train"}
    evals = {r["impl"]: r for r in rows if r["stage"] == "eval"}
    for r in train.values():
        # 24 videos in batches of 8: 3 steps per epoch; the first epoch is the warm-up
        assert (r["epochs"], r["steps_per_epoch"], r["measured_steps"]) == (2, 3, 3)
        assert r["steps_per_s"] > 0 and r["steps_per_s_all"] > 0 and r["warmup_epoch_s"] > 0
        assert math.isclose(r["step_ms"], 1e3 / r["steps_per_s"]) and math.isfinite(r["loss"])
    for r in evals.values():
        assert r["seconds"] > 0 and r["first_seconds"] > 0 and len(r["eval_times_s"]) == r["reps"] == 3
        assert r["videos"] == 8 and r["queries"] > 0
        assert all(0 <= r[k] <= 100 for k in ("R@1", "R@5", "R@10", "R@100")) and r["R@100"] == 100.0
    assert evals["reference"].keys() == evals["auto"].keys()
    summary = {r["impl"]: r for r in data["summary"]}
    assert summary["reference"]["train_x_reference"] == summary["reference"]["eval_x_reference"] == 1.0
    assert math.isclose(summary["auto"]["train_x_reference"],
                        train["auto"]["steps_per_s"] / train["reference"]["steps_per_s"])
    assert math.isclose(summary["auto"]["eval_x_reference"], evals["reference"]["seconds"] / evals["auto"]["seconds"])
    env = data["environment"]
    assert env["mode"] == "smoke" and env["gpu"] is None and env["torch"] and not env["interrupted"]
    assert env["data"]["visual_dim"] == 48 and env["data"]["test_videos"] == 8
    assert env["model"]["d"] == 16 and env["model"]["batch_videos"] == 8 and not env["model"]["bf16_autocast"]
    assert set(env["auto_picks"]) == {"windowed_attention", "max_similarity", "max_similarity_topk"}
    assert "| auto |" in md.read_text() and "train_x_reference" in md.read_text()
    assert not list((tmp_path / "tmp").glob("kdc-e2e-*"))  # the temporary work folder is gone


def test_kept_collection_is_reused(tmp_path, capsys):
    args = ["--smoke", "--device", "cpu", "--impls", "reference", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    bench.main(args)
    assert "reused" not in _rows(capsys.readouterr().out)[0].get("note", "")
    made = (tmp_path / "work" / "e2e_smoke" / "SYNTHETIC.json").stat().st_mtime_ns
    bench.main(args)
    rows = _rows(capsys.readouterr().out)
    assert rows[0]["stage"] == "generate" and rows[0]["note"].startswith("reused")
    assert (tmp_path / "work" / "e2e_smoke" / "SYNTHETIC.json").stat().st_mtime_ns == made
    assert [r["impl"] for r in rows if r["stage"] in ("train", "eval")] == ["reference", "reference"]


def test_a_cut_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """The GPU suite stops a stage at its limit with SIGINT: the rows measured so far are printed
    and written, the run says it was interrupted and exits with 130."""
    real = bench.run_impl

    def cut_at_auto(impl, *args, **kwargs):
        if impl == "auto":
            raise KeyboardInterrupt
        return real(impl, *args, **kwargs)

    monkeypatch.setattr(bench, "run_impl", cut_at_auto)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--smoke", "--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 130
    data = json.loads((tmp_path / "out" / "end_to_end.json").read_text())
    assert data["environment"]["interrupted"] is True
    assert [(r["stage"], r.get("impl")) for r in data["results"]][-2:] == [("train", "reference"), ("eval", "reference")]
    assert [r["impl"] for r in data["summary"]] == ["reference"]
    assert "interrupted" in capsys.readouterr().out


def test_a_failing_impl_is_reported_and_the_other_still_runs(tmp_path, monkeypatch, capsys):
    real = bench.run_impl

    def reference_fails(impl, *args, **kwargs):
        if impl == "reference":
            raise RuntimeError("Triton compile failed\nsecond line")
        return real(impl, *args, **kwargs)

    monkeypatch.setattr(bench, "run_impl", reference_fails)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--smoke", "--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert stop.value.code == 1
    data = json.loads((tmp_path / "out" / "end_to_end.json").read_text())
    assert data["environment"]["failed"] == ["reference"] and not data["environment"]["interrupted"]
    stages = [(r["stage"], r.get("impl")) for r in data["results"]]
    assert stages[2:] == [("error", "reference"), ("train", "auto"), ("eval", "auto")]
    assert data["results"][2]["error"] == "RuntimeError: Triton compile failed"
    # no reference to compare with: the ratios are absent, not made up
    assert [(r["impl"], r["train_x_reference"], r["eval_x_reference"]) for r in data["summary"]] == [("auto", None, None)]
    assert "Traceback" in capsys.readouterr().err
