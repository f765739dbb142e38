"""Config: YAML + dotted overrides, typo suggestions, type and combination errors, DeepSpeed derivation."""

import json
import re
import subprocess
import sys

import pytest

from hrvit.config import deepspeed_config, load_config, parse_override, to_yaml
from hrvit.errors import ConfigError

RECIPE = "launch/recipes/quickstart.yaml"


def test_recipe_loads_and_overrides_apply():
    cfg = load_config(RECIPE, ["train.lr=3e-4", "train.steps=7", "data.window=null", "output.dir=/tmp/x"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.data.window is None and cfg.output.dir == "/tmp/x"


def test_resolved_yaml_reproduces_the_config(tmp_path):
    cfg = load_config(RECIPE, ["train.steps=11", "deepspeed.overrides={bf16: {enabled: false}}"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian.lr=1", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("train.steps=0", "train.steps: 0 must be >= 1"),
    ("patching.patch_size=12", "patching.patch_size: 12 must be a power of two"),
    ("data.window=100", "data.window: 100 must be a multiple of patching.patch_size"),
    ("data.layout=folder", "data.layout: 'folder' is not one of"),
    ("data.augment=maybe", "data.augment: expected true or false"),
    ("data.class_names=[a,b]", "data.class_names: 2 names given for data.num_classes=3"),
    ("deepspeed.config=ds_configs/zero9.json", "deepspeed.config: ds_configs/zero9.json not found"),
    ("train.warmup_steps=-1", "train.warmup_steps: -1 must be >= 0"),
    ("train", "override 'train': expected key=value"),
    ("train.lr=.inf", "train.lr: inf is not a finite number"),
    ("data.foreground_bias=.nan", "data.foreground_bias: nan is not a finite number"),
    ("output.dir=", "output.dir: empty; give a folder path"),
    ("output.dir=README.md", "output.dir: README.md is a file, not a folder"),
    ("output.dir=README.md/run", "output.dir: README.md/run lies under"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, [override])
    assert expected in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  presett: tiny\n")
    with pytest.raises(ConfigError, match="unknown key 'model.presett' \\(did you mean 'model.preset'\\?\\)"):
        load_config(typo)


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_deepspeed_batch_sizes_are_derived_and_conflicts_rejected(tmp_path):
    cfg = load_config(RECIPE, ["train.micro_batch=3", "train.grad_accum=2", "deepspeed.config=ds_configs/zero3.json"])
    ds = deepspeed_config(cfg, dp_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    cfg.deepspeed.overrides = {"train_batch_size": 16}
    with pytest.raises(ConfigError, match="train_batch_size=16 .* conflicts with the value 24"):
        deepspeed_config(cfg, dp_size=4)
    broken = tmp_path / "ds.json"
    broken.write_text("{ not json")
    cfg = load_config(RECIPE, [f"deepspeed.config={broken}"])
    with pytest.raises(ConfigError, match="ds.json is not valid JSON"):
        deepspeed_config(cfg, dp_size=1)


def test_every_ds_config_is_valid_json():
    import pathlib
    for path in pathlib.Path("ds_configs").glob("*.json"):
        json.loads(path.read_text())


@pytest.mark.parametrize("overrides, expected", [
    ({"zero_optimisation": {"stage": 3}}, "unknown key 'zero_optimisation' in zero2.json with deepspeed.overrides "
     "(did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stagee": 3}}, "unknown key 'zero_optimization.stagee' .* (did you mean "
     "'zero_optimization.stage'?)"),
    ({"zero_optimization": {"offload_optimizer": {"devce": "cpu"}}}, "did you mean "
     "'zero_optimization.offload_optimizer.device'"),
    ({"fp16": {"enabld": True}}, "did you mean 'fp16.enabled'"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage in zero2.json with deepspeed.overrides: "),
])
def test_deepspeed_keys_deepspeed_would_ignore_or_reject_late_are_errors(overrides, expected):
    """DeepSpeed drops top-level keys it does not know (a misspelt ZeRO section trained ZeRO-0) and rejects a bad
    key inside zero_optimization/fp16/bf16 only when the engine starts, as a traceback."""
    cfg = load_config(RECIPE)
    cfg.deepspeed.overrides = overrides
    with pytest.raises(ConfigError) as err:
        deepspeed_config(cfg, dp_size=1)
    assert re.search(re.escape(expected).replace(re.escape(".*"), ".*"), str(err.value)), str(err.value)
    cfg.deepspeed.overrides = {"tensorboard": {"enabled": False}, "zero_optimization": {"overlap_comm": True},
                               "bf16": {"enabled": False}, "comms_logger": {"enabled": False}}
    deepspeed_config(cfg, dp_size=1)  # real keys, constants or not, pass


def test_a_deepspeed_json_that_is_not_an_object_is_refused(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json holds a JSON list; expected an object"):
        deepspeed_config(load_config(RECIPE, [f"deepspeed.config={path}"]), dp_size=1)


def test_manifest_header_spaces_and_byte_order_mark_are_read(tmp_path):
    from hrvit.data.datasets import discover

    for name in ("a.tiff", "a_mask.tiff"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "m.csv").write_text("\ufeffimage, label , split\na.tiff , a_mask.tiff, train\n", encoding="utf-8")
    (spec,) = discover("manifest", manifest=tmp_path / "m.csv")
    assert spec.image == [tmp_path / "a.tiff"] and spec.label == tmp_path / "a_mask.tiff" and spec.split == "train"


def test_synth_sizes_too_small_exit_2():
    proc = subprocess.run([sys.executable, "-m", "hrvit", "synth", "slides", "--out", "/nonexistent/x", "--size",
                           "-5"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--size: -5 is too small for synthetic slides (at least 64)" in proc.stderr
    assert "Traceback" not in proc.stderr
