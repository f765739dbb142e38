"""Settings (train.precision, parallel.zero_stage) and metrics for plotting (logging.csv, logging.tensorboard)."""

import csv
import importlib.util
import json

import pytest
from conftest import RECIPE, TINY, hrvit

from hrvit.config import deepspeed_config, load_config
from hrvit.errors import ConfigError

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _ds(*overrides):
    return deepspeed_config(load_config(RECIPE, ["data.manifest=unused.csv", *overrides]), 1)


def test_precision_and_zero_stage_write_the_deepspeed_config():
    """The keys replace the JSON file's choice and keep its other settings; null leaves the JSON as it is."""
    assert _ds()["zero_optimization"]["stage"] == 2 and not _ds()["bf16"]["enabled"]
    ds = _ds("train.precision=bf16", "parallel.zero_stage=3")
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_scatter"] is True
    ds = _ds("train.precision=fp16", "deepspeed.overrides.fp16.initial_scale_power=8")
    assert ds["fp16"] == {"enabled": True, "initial_scale_power": 8} and not ds["bf16"]["enabled"]


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=bf16", "deepspeed.overrides.fp16.enabled=true"],
     "train.precision: bf16 conflicts with deepspeed.overrides.fp16.enabled=true"),
    (["train.precision=fp32", "deepspeed.overrides.bf16.enabled=true"],
     "train.precision: fp32 conflicts with deepspeed.overrides.bf16.enabled=true"),
    (["parallel.zero_stage=3", "deepspeed.overrides.zero_optimization.stage=1"],
     "parallel.zero_stage: 3 conflicts with deepspeed.overrides.zero_optimization.stage=1"),
    (["parallel.zero_stage=4"], "parallel.zero_stage: 4 must be 0, 1, 2 or 3"),
])
def test_conflicting_settings_name_both_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _ds(*overrides)


def test_a_json_that_enables_another_precision_is_a_conflict(tmp_path):
    (tmp_path / "fp16.json").write_text(json.dumps({"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"bf16 conflicts with fp16\.enabled=true in deepspeed\.config \(fp16\.json"):
        _ds("train.precision=bf16", f"deepspeed.config={tmp_path / 'fp16.json'}")


@pytest.mark.skipif(HAVE_TENSORBOARD, reason="the tensorboard package is installed")
def test_deepspeed_tensorboard_monitor_without_the_package_names_the_extra():
    """DeepSpeed itself would raise ImportError with a traceback when the engine starts."""
    with pytest.raises(ConfigError, match=r"tensorboard\.enabled=true needs the 'tensorboard' package.*"
                                          r"pip install 'hrvit\[tensorboard\]'"):
        _ds("deepspeed.overrides.tensorboard.enabled=true")


def test_native_bf16_is_read_from_the_cpu_flags():
    """bf16 without these flags is emulated (about 10x slower), which start() warns about."""
    from hrvit.engine.session import native_cpu_bf16

    assert not native_cpu_bf16("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert native_cpu_bf16("flags\t\t: fpu avx512f avx512_bf16\n") and native_cpu_bf16("flags\t: amx_bf16 amx_tile\n")
    assert native_cpu_bf16("Features\t: fp asimd bf16 i8mm\n")


REFUSED = [(["logging.tensorboard=true"], "pip install 'hrvit[tensorboard]'")] if not HAVE_TENSORBOARD else \
    [(["train.precision=bf16", "deepspeed.overrides.fp16.enabled=true"],
      "train.precision: bf16 conflicts with deepspeed.overrides.fp16.enabled=true")]
"""One refused run through the CLI (exit 2, no run folder); the other conflicts are checked in process above."""


@pytest.mark.parametrize("overrides, message", REFUSED)
def test_refused_settings_exit_2_before_a_run_folder_exists(slides, tmp_path, overrides, message):
    run = tmp_path / "run"
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()


def test_zero3_run_logs_csv_reports_precision_and_parameters_and_warns_when_extended(slides, tmp_path):
    """One tiny 1-rank ZeRO-3 run (set by parallel.zero_stage) with logging.csv (and TensorBoard when installed):
    the CSV holds loss and Dice rows, summary.json the precision and the whole model's parameter count (ZeRO-3
    shards parameters, so numel() alone would count 0), no picture is announced with output.picture=false, and
    extending the finished run with more steps says what happens to the learning rate."""
    run = tmp_path / "run"
    extra = ["logging.tensorboard=true"] if HAVE_TENSORBOARD else []
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=4",
                 "eval.every=2", "eval.max_cases=1", "output.picture=false", "parallel.zero_stage=3",
                 "train.precision=fp32", "logging.csv=true", *extra)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["zero_stage"] == 3 and summary["precision"] == "fp32" and summary["parameters"] > 10_000
    assert f"{summary['parameters'] / 1e6:.2f}M parameters" in proc.stdout and "0.00M parameters" not in proc.stdout
    assert "picture" not in proc.stdout and not (run / "prediction.png").exists()
    noise = ("is deprecated", "before it has started", "built successfully")  # routine messages, hidden
    assert not any(n in proc.stdout + proc.stderr for n in noise), proc.stderr[-2000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]  # plain lines in a log file
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"], proc.stdout
    assert all("elapsed 0:" in line and " ETA " in line for line in progress) and "ETA 0:00:00" in progress[-1]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {(int(r["step"]), r["name"]) for r in rows}
    assert {(s, "train/loss") for s in range(1, 5)} <= names and {(2, "eval/dice_mean"), (4, "eval/dice_mean")} <= names
    assert {(4, "train/lr"), (4, "train/samples_per_s")} <= names
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows if r["name"] == "eval/dice_mean")
    if HAVE_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert {"train/loss", "eval/dice_mean"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    proc = hrvit("train", "--resume", run, "train.steps=6")
    warning = next(line for line in proc.stdout.splitlines() if "learning-rate schedule differs" in line)
    assert "train.steps 4 -> 6" in warning and "step count (4)" in warning and "for step 5 becomes" in warning
    with open(run / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["name"] == "train/loss"]
    assert steps == [1, 2, 3, 4, 5, 6]
