"""Config: YAML + dotted overrides, typo suggestions, type and combination errors, DeepSpeed derivation."""

import json

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


def test_every_option_is_documented_in_the_readme():
    """The README's config reference is tools/config_reference.py's output, with a meaning for every key."""
    import pathlib
    import runpy

    # by path: tools/ on sys.path would let tools/profile.py shadow the standard library's profile module
    table = runpy.run_path("tools/config_reference.py")["reference"]()
    assert all(not row.endswith("|  |") for row in table.splitlines()), "a config key has no docstring"
    readme = pathlib.Path("README.md").read_text()
    assert table in readme, "README config reference is stale: run tools/config_reference.py"
