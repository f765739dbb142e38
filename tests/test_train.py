"""End to end with real processes: DeepSpeed training, eval, predict, and bad input (resume: test_reliability)."""

import json
import shutil

import numpy as np
import openslide
import pytest
from conftest import RECIPE, TINY, hrvit

from hrvit.data import open_label


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_rank_zero2_training_loss_falls(trained):
    losses = _losses(trained)
    assert sorted(losses) == list(range(1, 17))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (14, 15, 16)])
    assert last < 0.85 * first, losses
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == 16
    assert summary["patching"] == "uniform" and summary["samples_per_s"] > 0 and summary["tokens_per_s"] > 0
    # 16 tiny steps learn the background (0.956 measured; a model predicting noise scores about 1/3), not yet
    # the small tumour and gland regions: Dice itself is checked against hand counts below
    assert summary["dice_per_class"]["background"] > 0.9 and summary["dice_mean"] is not None
    assert set(summary["dice_per_class"]) == {"background", "tumour", "gland"}
    assert (trained / "prediction.png").stat().st_size > 0
    assert (trained / "config.yaml").is_file() and (trained / "deepspeed.json").is_file()


def test_eval_on_one_and_two_ranks_and_predict_slide(trained, slides, tmp_path):
    """Evaluation shares its cases among the data-parallel ranks (1 each of the 2 held-out slides here) and adds
    their Dice counts: `hrvit eval` in one process reproduces the Dice that training's 2-rank evaluation computed
    from the same final weights, and `hrvit eval` on 2 ranks reproduces the one-process Dice of every case."""
    proc = hrvit("eval", trained)
    assert "mean Dice" in proc.stdout and "on 1 rank(s)" in proc.stdout
    one = json.loads((trained / "eval_val.json").read_text())
    summary = json.loads((trained / "summary.json").read_text())
    assert one["cases"] == summary["eval_cases"] == 2
    assert one["step"] == summary["steps"] == 16 and one["dice_mean_foreground"] == one["dice_mean"] is not None
    assert one["dice_per_class"].keys() == summary["dice_per_class"].keys()
    for name, value in summary["dice_per_class"].items():
        assert one["dice_per_class"][name] == pytest.approx(value, abs=1e-6), name
    proc = hrvit("eval", trained, "eval.split=train", "eval.max_cases=1")
    train_split = json.loads((trained / "eval_train.json").read_text())
    assert train_split["split"] == "train" and train_split["cases"] == 1 and train_split["step"] == 16
    assert json.loads((trained / "eval_val.json").read_text()) == one  # the validation result is kept
    proc = hrvit("eval", trained, ranks=2)
    two = json.loads((trained / "eval_val.json").read_text())
    assert "on 2 rank(s)" in proc.stdout and two["dice_per_case"].keys() == one["dice_per_case"].keys()
    for case, per_class in one["dice_per_case"].items():
        for name, value in per_class.items():
            assert two["dice_per_case"][case][name] == pytest.approx(value, abs=1e-6), (case, name)

    # many images at once: a file, a glob, a folder (masks skipped) and the manifest (the same slides named twice
    # count once), and an override
    images = [p for p in sorted(slides.parent.glob("*.tiff")) if not p.name.endswith("_mask.tiff")]
    out = tmp_path / "pred"
    proc = hrvit("predict", trained, "eval.batch=4", "--input", images[0], str(slides.parent / "slide_00[01].tiff"),
                 slides.parent, slides, "--out", out)
    assert f"predicting {len(images)} image(s)" in proc.stdout, proc.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{p.stem}_{kind}" for p in images for kind in ("overlay.png", "pred.tiff")), written
    pred = open_label(out / f"{images[0].stem}_pred.tiff")
    assert pred.shape == openslide_shape(images[0])
    values = pred.read((0, 0), pred.shape)
    assert set(np.unique(values).tolist()) <= {0, 1, 2}


def test_dice_from_counts_against_hand_counts():
    """Full-resolution Dice: ignored pixels do not count, a class absent from prediction and truth is no score,
    and dice_mean averages the foreground classes over cases."""
    from hrvit.engine.metrics import dice_counts, summarize
    from hrvit.patching import IGNORE_INDEX

    truth = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE_INDEX]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    counts = dice_counts(pred, truth, 4)
    # per class (intersection, predicted, true) over the 7 counted pixels
    assert counts.T.tolist() == [[2, 3, 3], [2, 3, 2], [1, 1, 2], [0, 0, 0]]
    result = summarize({"a": counts, "b": dice_counts(truth.clip(0), truth.clip(0), 4)}, ["bg", "x", "y", "z"])
    assert result["dice_per_case"]["a"] == {"bg": round(4 / 6, 6), "x": 0.8, "y": round(2 / 3, 6), "z": None}
    assert result["dice_per_class"]["x"] == 0.9 and result["dice_per_class"]["y"] == round((2 / 3 + 1) / 2, 6)
    assert result["dice_mean"] == round((0.9 + (2 / 3 + 1) / 2) / 2, 6)


def test_eval_and_predict_refuse_to_evaluate_nothing_or_write_into_a_file(trained, slides, tmp_path):
    for args, message in [(["eval.max_cases=0"], "eval.max_cases=0 evaluates no case"),
                          (["eval.split=test"], "eval.split='test': no case of the data is in that split")]:
        proc = hrvit("eval", trained, *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    out = tmp_path / "file"
    out.write_text("")
    image = slides.parent / "slide_000.tiff"
    proc = hrvit("predict", trained, "--input", image, "--out", out / "pred", check=False)
    assert proc.returncode == 2 and f"--out: {out / 'pred'} lies under {out}, which is a file" in proc.stderr


def test_fp16_loss_scale_overflows_are_not_bad_steps(slides, tmp_path):
    """An initial loss scale of 2^32 overflows every early fp16 step: DeepSpeed skips them while it backs the
    scale off, which is normal, so they are counted as overflow_steps and never stop the run, even with
    train.max_bad_steps=2 (the CPU accelerator trains fp16 where mkldnn supports it)."""
    run = tmp_path / "run"
    hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=3",
          "train.max_bad_steps=2", "eval.max_cases=0", "output.picture=false", "deepspeed.overrides.fp16.enabled=true",
          "deepspeed.overrides.fp16.initial_scale_power=32")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "fp16" and summary["overflow_steps"] == 3 and summary["bad_steps"] == 0


@pytest.mark.parametrize("ds, message", [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "choose one precision"),
    ({"fp16": {"enabled": True, "loss_scale": 1}}, "fp16.loss_scale=1 trains fp16 without loss scaling"),
])
def test_precisions_that_cannot_train_are_refused(ds, message):
    """Checked by hrvit.engine.session.start before anything is built (a ConfigError: exit status 2)."""
    from hrvit.engine.session import check_precision
    from hrvit.errors import ConfigError

    check_precision({"bf16": {"enabled": True}})
    check_precision({"fp16": {"enabled": True, "loss_scale": 0}})
    with pytest.raises(ConfigError, match=message):
        check_precision(ds)


def openslide_shape(path):
    width, height = openslide.OpenSlide(path).dimensions
    return (height, width)


@pytest.mark.parametrize("override, message", [
    ("data.manifest={missing}", "missing.csv"),
    ("data.num_classes=2 data.class_names=null", "outside [0, 2)"),
    ("data.window=256 patching.patch_size=256", "is smaller than the patch size (256, 256)"),
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("DS_ACCELERATOR=cuda", "backend NCCL needs GPUs, but torch sees none"),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(slides, tmp_path, override, message):
    run = tmp_path / "run"
    overrides = override.format(missing=tmp_path / "missing.csv").split()
    env = dict(o.split("=", 1) for o in overrides if o.split("=")[0].isupper())  # an environment variable
    overrides = [o for o in overrides if o.split("=")[0] not in env]
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", *overrides, check=False,
                 env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


@pytest.mark.parametrize("fault, message", [
    ("truncated", "slide_001.tiff"),
    ("geometry", "does not match image shape"),
    ("no label column", "train case slide_000 has no label; task: segment trains and evaluates on label maps"),
])
def test_corrupt_or_mismatched_files_exit_2_and_write_nothing(slides, tmp_path, fault, message):
    data = tmp_path / "data"
    shutil.copytree(slides.parent, data)
    if fault == "truncated":
        path = data / "slide_001.tiff"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fault == "geometry":
        from hrvit.data import write_pyramid_from_array
        write_pyramid_from_array(data / "slide_001_mask.tiff", np.zeros((192, 160), np.uint8), tile=64)
    else:  # a spreadsheet's export: spaces after the commas, and the label column left out
        rows = [line.split(",") for line in (data / "manifest.csv").read_text().splitlines()]
        (data / "manifest.csv").write_text("\n".join(f"{r[0]}, {r[2]}" for r in rows) + "\n")
    run = tmp_path / "run"
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={data / 'manifest.csv'}", f"output.dir={run}", check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()
