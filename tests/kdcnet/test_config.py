"""Presets, ``--set`` overrides (types, errors) and the JSON round trip of the config."""

from __future__ import annotations

import json

import pytest

from kdcnet import config as C


@pytest.mark.parametrize("name, lr, margin, dropout", [
    ("tvr", 3e-4, 0.1, 0.2), ("activitynet", 2.5e-4, 0.2, 0.25), ("charades", 2.4e-4, 0.2, 0.15)])
def test_real_data_presets_follow_the_published_setup(name, lr, margin, dropout):
    cfg = C.preset(name)
    assert (cfg.train.lr, cfg.loss.margin, cfg.model.dropout) == (lr, margin, dropout)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.early_stop) == (128, 100, 10)
    assert (cfg.train.warmup, cfg.train.grad_clip) == (0.01, 1.0)
    assert (cfg.model.d, cfg.model.fusion_weight, cfg.loss.nce_weight, cfg.loss.kd_weight) == (384, 0.7, 0.04, 0.1)
    assert cfg.collection == name


def test_synthetic_preset_is_small_and_unknown_presets_fail():
    cfg = C.preset("synthetic")
    assert cfg.model.d < 384 and cfg.train.epochs < 100
    with pytest.raises(ValueError, match="unknown preset 'msrvtt'.*synthetic, tvr"):
        C.preset("msrvtt")


def test_overrides_convert_to_the_field_types():
    cfg = C.apply_overrides(C.preset("tvr"), [
        "model.hsa=false", "model.d=256", "train.lr=1e-3", "model.hsa_scales=1,3", "model.cutoff=3",
        "model.impl=none", "data.visual_feature=resnet", "loss.krd_window=5", "train.threads=2"])
    assert cfg.model.hsa is False and cfg.model.d == 256 and cfg.train.lr == 1e-3
    assert cfg.model.hsa_scales == (1, 3) and cfg.model.cutoff == 3.0 and cfg.model.impl is None
    assert cfg.data.visual_feature == "resnet" and cfg.loss.krd_window == 5 and cfg.train.threads == 2
    again = C.apply_overrides(cfg, ["model.cutoff=none", "model.hsa=yes"])
    assert again.model.cutoff is None and again.model.hsa is True
    assert cfg.model.cutoff == 3.0, "overrides must not modify their input"


@pytest.mark.parametrize("item, message", [
    ("model.foo=1", r"--set model.foo: unknown key; model has d, heads"),
    ("modl.d=1", r"--set modl.d: expected section.key with section one of data, model"),
    ("model.d", r"--set model.d: expected section.key=value"),
    ("model.d=abc", r"--set model.d=abc: expected an integer"),
    ("model.hsa=maybe", r"--set model.hsa=maybe: expected true or false"),
    ("train.lr=fast", r"--set train.lr=fast: expected a number"),
    ("model.cutoff=wide", r"--set model.cutoff=wide: expected a number or none"),
    ("model.window=wide", r"model.window must be one of \('adaptive', 'fixed', 'none'\), got 'wide'"),
    ("loss.krd_window=2", r"loss.krd_window must be an odd int >= 1, got 2"),
    ("model.d=102", r"model.d must be divisible by model.heads \(4\), got 102"),
    ("model.fusion_weight=1.5", r"model.fusion_weight must be in \[0, 1\], got 1.5"),
    ("model.impl=fast", r"model.impl must be one of"),
    ("train.device=tpu", r"train.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("train.lr=inf", r"train.lr must be a finite number, got inf"),
    ("train.weight_decay=nan", r"train.weight_decay must be a finite number, got nan"),
    ("model.sigma_min=-inf", r"model.sigma_min must be a finite number, got -inf"),
    ("model.cutoff=inf", r"model.cutoff must be a finite number, got inf"),
    ("loss.margin=inf", r"loss.margin must be a finite number, got inf"),
    ("model.hsa_scales=1,31", r"model.hsa_scales must be phrase widths no longer than a query "
                              r"\(data.max_tokens = 30 tokens\), got \(1, 31\)"),
    ("train.seed=-1", r"train.seed \(--seed\) must be an int in \[0, 2\*\*64 - 1\], got -1"),
    (f"train.seed={2**64}", rf"train.seed \(--seed\) must be an int in \[0, 2\*\*64 - 1\], got {2**64}"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        C.apply_overrides(C.preset("synthetic"), [item])


def test_limits_that_are_allowed():
    cfg = C.apply_overrides(C.preset("synthetic"), ["model.hsa_scales=1,30", f"train.seed={2**64 - 1}"])
    assert cfg.model.hsa_scales == (1, 30) and cfg.train.seed == 2**64 - 1
    # phrase widths matter only with HSA on; the bound follows data.max_tokens
    assert C.apply_overrides(C.preset("synthetic"), ["model.hsa=false", "model.hsa_scales=40"]).model.hsa_scales == (40,)
    assert C.apply_overrides(C.preset("synthetic"), ["data.max_tokens=40", "model.hsa_scales=40"]).data.max_tokens == 40


def test_cutoff_needs_a_window():
    with pytest.raises(ValueError, match="model.cutoff must be none when there is no window"):
        C.apply_overrides(C.preset("synthetic"), ["model.cutoff=3", "model.dta=false"])


def test_json_round_trip_and_load_errors(tmp_path):
    cfg = C.apply_overrides(C.preset("activitynet"), ["model.hsa_scales=2,4", "model.visual_dim=1024",
                                                      "data.root=/data", "model.cutoff=2.5"])
    C.save(cfg, tmp_path / "config.json")
    assert C.load(tmp_path / "config.json") == cfg
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model"]["bogus"] = 1
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bad.json: unknown config key model.bogus"):
        C.load(tmp_path / "bad.json")
    raw["model"].pop("bogus")
    raw["model"]["d"] = "wide"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="config key model.d must be int, got 'wide'"):
        C.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        C.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="no such config file"):
        C.load(tmp_path / "missing.json")
