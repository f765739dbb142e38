"""The README's worked example, run as written, and the rule it teaches: recipe paths are relative to the recipe.

The example's files and commands are the fenced blocks after `<!-- worked-example: NAME -->` markers in README.md;
the test writes the images and masks the manifest names (disks and squares, 64 x 64) and runs the commands in a
fresh folder, so a README edit that breaks the example breaks this test.
"""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrvit.config import load_config, to_yaml
from hrvit.data.datasets import discover
from hrvit.errors import DataError

REPO = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!-- worked-example: (\S+) -->\s*```[a-z]*\n(.*?)```", re.S)


def example_blocks() -> dict[str, str]:
    """NAME -> the text of the fenced block that follows its marker in README.md."""
    return dict(MARKER.findall((REPO / "README.md").read_text(encoding="utf-8")))


def example_commands(block: str) -> list[list[str]]:
    """One argument list per command line of a bash block (comments dropped)."""
    lines = [line.split(" #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def write_shapes(manifest: Path, seed: int = 0) -> None:
    """The images and masks a manifest names: a purple disk (class 1) and a green square (class 2) on pink noise,
    as 8-bit RGB PNGs and greyscale class-index PNGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        mask = np.zeros((64, 64), np.uint8)
        cy, cx = rng.integers(14, 50, 2)
        r = rng.integers(7, 12)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        sy, sx = rng.integers(2, 44, 2)
        s = rng.integers(10, 18)
        square = np.zeros((64, 64), bool)
        square[sy:sy + s, sx:sx + s] = True
        mask[square & (mask == 0)] = 2
        image = rng.normal((225, 195, 225), 12, (64, 64, 3))
        for cls, colour in ((1, (120, 60, 150)), (2, (50, 140, 80))):
            image[mask == cls] = rng.normal(colour, 15, (int((mask == cls).sum()), 3))
        for key, array in (("image", image.clip(0, 255).astype(np.uint8)), ("label", mask)):
            if row.get(key):
                path = manifest.parent / row[key]
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


def test_readme_has_the_worked_example():
    """The markers the README test reads are there: a manifest, a recipe and the commands."""
    blocks = example_blocks()
    assert {"commands"} < set(blocks) and any(n.endswith(".csv") for n in blocks) and any(
        n.endswith(".yaml") for n in blocks), sorted(blocks)
    commands = example_commands(blocks["commands"])
    assert [c[:2] for c in commands if c[0] == "hrvit"][-3:] == [["hrvit", "train"], ["hrvit", "eval"],
                                                                 ["hrvit", "predict"]]


@pytest.mark.slow
def test_readme_worked_example_runs(tmp_path):
    """Write the README's manifest and recipe, make the images they name, run the README's commands from a fresh
    folder: training, evaluation and prediction succeed and their outputs are what the README says."""
    blocks = example_blocks()
    for name, text in blocks.items():
        if name != "commands":
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
    manifest = next(tmp_path / n for n in blocks if n.endswith(".csv"))
    write_shapes(manifest)
    # one torch thread, as the other process tests: on 2 shared cores more threads only spin
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    outputs = []
    for args in example_commands(blocks["commands"]):
        assert args[0] == "hrvit", f"the worked example runs hrvit commands only, not {args}"
        proc = subprocess.run([sys.executable, "-m", "hrvit", *args[1:]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{shlex.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                     f"{proc.stderr[-3000:]}"
        outputs.append(args)
    train = next(a for a in outputs if a[1] == "train")
    run = tmp_path / load_config(tmp_path / train[2]).output.dir
    summary = json.loads((run / "summary.json").read_text())
    result = json.loads((run / "eval_val.json").read_text())
    assert result["cases"] == 2 and 0.0 <= result["dice_mean"] <= 1.0
    assert result["dice_mean"] == pytest.approx(summary["dice_mean"], abs=1e-6)  # eval reproduces the run's own
    assert result["dice_per_class"]["background"] > 0.9 and result["dice_mean"] > 0.7  # README: about 0.98
    # the resolved config names the manifest by its absolute path: eval and predict work from any folder
    assert load_config(run / "config.yaml").data.manifest == str(manifest)
    predict = next(a for a in outputs if a[1] == "predict")
    out = tmp_path / predict[predict.index("--out") + 1]
    images = [a for a in predict[predict.index("--input") + 1:] if not a.startswith("-")][:2]
    for image in images:
        stem = Path(image).stem
        labels = np.asarray(Image.open(out / f"{stem}_pred.png"))
        assert labels.shape == (64, 64) and set(np.unique(labels).tolist()) <= {0, 1, 2}
        truth = np.asarray(Image.open(tmp_path / "shapes" / "masks" / f"{stem}.png"))
        assert (labels == truth).mean() > 0.9
        assert Image.open(out / f"{stem}_overlay.png").size[0] >= 64


def _recipe(folder: Path, manifest: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(f"data:\n  manifest: {manifest}\n  window: 64\npatching:\n  patch_size: 8\n{extra}")
    return path


def test_recipe_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    """A recipe in another folder than the current one finds its manifest next to itself; the same key given on
    the command line is relative to the current folder; output.dir stays relative to the current folder."""
    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    (data / "manifest.csv").write_text("image,label,split\nimages/a.png,masks/a.png,train\n"
                                       "images/b.png,masks/b.png,val\n")
    write_shapes(data / "manifest.csv")
    recipe = _recipe(tmp_path / "project" / "recipes", "../data/manifest.csv",
                     "output:\n  dir: runs/x\ndeepspeed:\n  config: ds_configs/zero2.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(recipe, elsewhere))
    assert cfg.data.manifest == str(data / "manifest.csv")
    assert [s.id for s in discover("manifest", manifest=cfg.data.manifest)] == ["a", "b"]
    assert cfg.output.dir == "runs/x"  # a run folder: relative to where the command runs
    assert cfg.deepspeed.config == str(REPO / "ds_configs" / "zero2.json")  # shipped configs: found from anywhere
    # on the command line a path is relative to the current folder
    (elsewhere / "m.csv").write_text((data / "manifest.csv").read_text())
    assert load_config(recipe, ["data.manifest=m.csv"]).data.manifest == str(elsewhere / "m.csv")
    # the resolved config reproduces itself when read back from the run folder
    (elsewhere / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(elsewhere / "config.yaml") == cfg


def test_missing_manifest_names_the_path_as_written_and_where_hrvit_looked(tmp_path, monkeypatch):
    """A manifest found nowhere: the message gives the path as written, the recipe, and each folder looked in."""
    recipe = _recipe(tmp_path / "recipes", "data/missing.csv")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("recipes/recipe.yaml")
    with pytest.raises(DataError) as err:
        discover("manifest", manifest=cfg.data.manifest)
    text = str(err.value)
    assert "'data/missing.csv'" in text and str(recipe.relative_to(tmp_path)) in text
    assert f"{tmp_path / 'recipes'} (the recipe's folder)" in text and f"{tmp_path} (the current folder)" in text


def test_missing_deepspeed_config_names_where_it_looked(tmp_path, monkeypatch):
    """deepspeed.config is looked for next to the recipe, among hrvit's shipped JSONs and in the current folder."""
    from hrvit.errors import ConfigError

    _recipe(tmp_path / "r", "m.csv", "deepspeed:\n  config: my_zero.json\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("r/recipe.yaml")
    text = str(err.value)
    assert text.startswith("deepspeed.config: my_zero.json not found")
    assert all(f"{folder} (" in text for folder in (tmp_path / "r", REPO, tmp_path))


def test_recipes_written_relative_to_the_current_folder_still_work_with_a_warning(tmp_path, monkeypatch, capsys):
    """Recipes (and run folders) written before the rule named paths relative to where the command ran: such a
    path is still used when it exists only there, and a warning says how to write it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.csv").write_text("image,label,split\n")
    _recipe(tmp_path / "recipes", "data/m.csv")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("recipes/recipe.yaml")
    assert cfg.data.manifest == str(tmp_path / "data" / "m.csv")
    assert "relative to the current folder" in capsys.readouterr().err


def test_launch_recipes_find_their_data_from_any_folder(tmp_path, monkeypatch):
    """The shipped recipes name the repository's data folder relative to themselves, so they work from anywhere."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "launch/recipes/quickstart.yaml")
    assert cfg.data.manifest == str(REPO / "data/context2d/manifest.csv")
    assert load_config(REPO / "launch/recipes/quickstart3d.yaml").data.root == str(REPO / "data/synth3d")


def test_every_config_key_is_documented_in_docs_config():
    """docs/config.md holds tools/config_reference.py's table, with a meaning for every key."""
    import runpy

    # by path: tools/ on sys.path would let tools/profile.py shadow the standard library's profile module
    table = runpy.run_path(str(REPO / "tools/config_reference.py"))["reference"]()
    assert all(not row.endswith("|  |") for row in table.splitlines()), "a config key has no docstring"
    assert table in (REPO / "docs/config.md").read_text(encoding="utf-8"), \
        "docs/config.md is stale: paste the output of python tools/config_reference.py into it"


def test_links_between_the_readme_and_docs_lead_somewhere():
    """Every relative Markdown link in README.md and docs/*.md names a file that exists (the README now points
    into docs/ for everything but the quick start, the commands and the worked example)."""
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to {target}, which is missing"
