"""Faults injected into real runs: preemption signals, kill -9 mid-save, a lost rank, NaN losses,
corrupt slides, a bad dataset, and checkpoints that do not fit the config."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import PY, RECIPE, REPO, TINY, TRAINED, free_port, hrvit

from hrvit.data import write_pyramid_from_array
from hrvit.data.datasets import discover
from hrvit.data.windows import TrainWindows
from hrvit.engine.checkpoint import COMPLETE, find_latest
from hrvit.errors import DataError

PREEMPTED = 75


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _rows(run) if "loss" in r}


PORTS = []
"""Master ports of the multi-rank runs started here: runs killed with -9 cannot remove their /dev/shm buffers."""


@pytest.fixture(autouse=True, scope="module")
def _release_shm():
    yield
    from hrvit.parallel.dist import release_shm_buffers

    for port in PORTS:
        release_shm_buffers(port)


def _start(*args, ranks=1, env=None):
    """Popen of the real command (as conftest.hrvit runs it), for tests that signal or kill it."""
    if ranks == 1:
        cmd = [PY, "-m", "hrvit", *map(str, args)]
    else:
        PORTS.append(free_port())
        cmd = [str(Path(PY).parent / "deepspeed"), "--num_accelerators", str(ranks), "--master_port", str(PORTS[-1]),
               "--module", "hrvit", *map(str, args)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_step(proc, run, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if (run / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in _rows(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _rank(proc, local_rank):
    """The training process of one rank under the deepspeed launcher."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        if f"--local_rank={local_rank}" in " ".join(child.cmdline()) and "hrvit" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"rank {local_rank} not found")


def _weights(ckpt):
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def test_sigterm_on_one_rank_then_resume_equals_the_uninterrupted_run(trained, slides, tmp_path):
    """The `trained` run again under the deepspeed launcher, with SIGTERM reaching only rank 1: both ranks stop
    after the same step, checkpoint, exit 75; --resume then reproduces the uninterrupted loss curve and final
    weights bit for bit."""
    run = tmp_path / "preempted"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", *TRAINED, ranks=2)
    _wait_for_step(proc, run, 3)
    _rank(proc, 1).send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == PREEMPTED, out[-3000:]
    stopped = find_latest(run / "checkpoints")
    assert stopped is not None and (stopped / COMPLETE).is_file() and "stopping (resume: hrvit train --resume" in out
    step = json.loads((stopped / COMPLETE).read_text())["step"]
    assert 3 <= step < 16 and not (run / "summary.json").exists()

    with open(run / "metrics.jsonl", "a") as f:  # as if the killed run had logged a step past its checkpoint
        f.write(json.dumps({"step": step + 1, "loss": -1.0}) + "\n")
    hrvit("train", "--resume", run, ranks=2)
    logged = [r["step"] for r in _rows(run) if "loss" in r]
    assert logged == list(range(1, 17))  # the step past the checkpoint was dropped, and redone
    assert _losses(run) == _losses(trained)  # every step, identical to the last printed digit
    final, straight = _weights(run / "checkpoints/step0000016"), _weights(trained / "checkpoints/step0000016")
    assert all(torch.equal(final[k], straight[k]) for k in straight)
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == step
    env = json.loads((run / "environment.json").read_text())
    assert env["resumed_from_step"] == step and env["torch"] == torch.__version__ and "git_commit" in env


def test_sigusr2_checkpoints_and_goes_on(slides, tmp_path):
    run = tmp_path / "usr2"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=100000")
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGUSR2)
    deadline = time.time() + 60
    while find_latest(run / "checkpoints") is None:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    saved = json.loads((find_latest(run / "checkpoints") / COMPLETE).read_text())["step"]
    _wait_for_step(proc, run, saved + 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == PREEMPTED
    assert json.loads((find_latest(run / "checkpoints") / COMPLETE).read_text())["step"] > saved + 2


def test_ctrl_c_checkpoints_and_exits_like_sigterm(slides, tmp_path):
    run = tmp_path / "int"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=100000")
    _wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED and "SIGINT: checkpoint at step" in out, out[-3000:]
    assert f"stopping (resume: hrvit train --resume {run})" in out and "Traceback" not in out
    assert (find_latest(run / "checkpoints") / COMPLETE).is_file()


@pytest.mark.parametrize("second", [False, True])
def test_a_step_that_does_not_end_exits_after_the_grace_period_or_a_second_signal(slides, tmp_path, second):
    """Step 4 takes an hour: SIGTERM, then train.stop_grace_s (or a second SIGTERM) ends the run with status 75,
    and the step-3 checkpoint is the latest complete one."""
    run = tmp_path / "slow"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=100000",
                  "train.ckpt_every=1", f"train.stop_grace_s={60 if second else 2}", env={"HRVIT_FAULT_SLOW_STEP": "4"})
    deadline = time.time() + 240
    while (latest := find_latest(run / "checkpoints")) is None or latest.name != "step0000003":
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)  # inside step 4
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    if second:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == PREEMPTED and time.time() - start < 10, out[-3000:]
    why = "a second stop signal (SIGTERM)" if second else "did not end within train.stop_grace_s=2.0 s"
    assert why in out and "the last complete one is intact" in out and "Traceback" not in out, out[-3000:]
    assert find_latest(run / "checkpoints").name == "step0000003"


def test_kill_9_while_saving_leaves_the_previous_checkpoint(slides, tmp_path):
    """Then, on the finished run: another model is refused, another world size is refused with the
    universal-checkpoint recipe, and that recipe resumes it on 2 ranks."""
    run = tmp_path / "killed"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=6",
                  "train.ckpt_every=2", env={"HRVIT_FAULT_SAVE_HANG": "4"})
    deadline = time.time() + 240
    while "hanging inside the step-4 save" not in (line := proc.stdout.readline()):
        assert line and time.time() < deadline, "the save hook was not reached"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = run / "checkpoints"
    assert (ckpt / ".tmp-step0000004").is_dir() and not (ckpt / ".tmp-step0000004" / COMPLETE).exists()
    assert (ckpt / "latest").read_text() == "step0000002" and find_latest(ckpt) == ckpt / "step0000002"

    # resumed as the sbatch scripts resume: a config with train.resume=auto
    hrvit("train", run / "config.yaml", f"output.dir={run}", "train.resume=auto")
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 2
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step0000002", "step0000004", "step0000006"]

    proc = hrvit("train", "--resume", run, "model.embed_dim=64", check=False)
    assert proc.returncode == 2 and "different model" in proc.stderr and "embed_dim: checkpoint 32, config 64" \
        in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = hrvit("train", "--resume", run, ranks=2, check=False)
    assert proc.returncode != 0 and "world_size: checkpoint 1, now 2" in proc.stderr, proc.stderr[-2000:]
    assert "ds_to_universal" in proc.stderr and "load_universal: true" in proc.stderr

    # the conversion the message gives, then a 2-rank resume from it
    universal = ckpt / "step0000006_universal"
    subprocess.run([PY, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", ckpt / "step0000006",
                    "--output_folder", universal], check=True, capture_output=True, timeout=300)
    hrvit("train", "--resume", run, f"train.resume={universal}", "train.steps=8",
          "deepspeed.overrides={checkpoint: {load_universal: true}}", ranks=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from_step"] == 6 and set(_losses(run)) >= {7, 8}


def test_a_killed_rank_stops_the_job_within_the_timeout(slides, tmp_path):
    run = tmp_path / "lost"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=100000",
                  "parallel.timeout_s=20", ranks=2)
    _wait_for_step(proc, run, 2)
    _rank(proc, 1).kill()
    start = time.time()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode not in (0, None) and time.time() - start < 60
    assert "another rank died or stopped answering for parallel.timeout_s=20 s" in out, out[-3000:]


def test_nan_loss_on_one_rank_is_skipped_on_both_and_counted(slides, tmp_path):
    run = tmp_path / "nan"
    hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=5", "eval.max_cases=0",
          ranks=2, env={"HRVIT_FAULT_NAN_STEP": "3"})
    rows = _rows(run)
    assert [r["step"] for r in rows if "skipped_step" in r] == [3] and set(_losses(run)) == {1, 2, 4, 5}
    assert json.loads((run / "summary.json").read_text())["bad_steps"] == 1


def test_non_finite_steps_in_a_row_stop_the_run_with_one_message(slides, tmp_path):
    """With accumulation the NaN goes through backward and DeepSpeed drops the step; two in a row stop the run."""
    run = tmp_path / "nans"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=6",
                  "train.max_bad_steps=2", "train.grad_accum=2", env={"HRVIT_FAULT_NAN_STEP": "2,3"})
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 2 and "2 steps in a row (to step 3)" in out and "Traceback" not in out, out[-3000:]
    # nothing to resume: the folder is marked FAILED, and the next run into it replaces the failed one
    assert "2 steps in a row" in (run / "FAILED").read_text() and find_latest(run / "checkpoints") is None
    hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=2", "eval.max_cases=0")
    assert not (run / "FAILED").exists() and [r["step"] for r in _rows(run) if "loss" in r] == [1, 2]


def _copy(slides, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(slides.parent, data)
    return data


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_corrupt_slide_is_skipped_and_reported(slides, tmp_path):
    data = _copy(slides, tmp_path)
    _truncate(data / "slide_001.tiff")
    run = tmp_path / "run"
    hrvit("train", RECIPE, *TINY, f"data.manifest={data / 'manifest.csv'}", f"output.dir={run}", "train.steps=3",
          "data.skip_bad_samples=true")
    (row,) = [json.loads(line) for line in (run / "skipped_samples.jsonl").read_text().splitlines()]
    assert row["case"] == "slide_001" and row["path"].endswith("slide_001.tiff") and row["dropped"]
    assert json.loads((run / "summary.json").read_text())["dropped_cases"] == ["slide_001"]


def test_sample_unreadable_mid_run_is_substituted_or_named(slides, tmp_path):
    """A slide that breaks after the start (e.g. a failing disk): the sample is replaced deterministically and
    listed, or, without skipping, the error names the sample and the case."""
    data = _copy(slides, tmp_path)
    specs = [s for s in discover("manifest", manifest=data / "manifest.csv") if s.split == "train"]
    from hrvit.config import PatchingConfig

    def windows(skip):
        return TrainWindows(specs, window=64, patching=PatchingConfig(patch_size=8), seed=0, foreground_bias=0.5,
                            augment=True, skip_bad=skip)

    k = next(k for k in range(100) if windows(True).case_of(k).id == "slide_001")
    _truncate(data / "slide_001.tiff")
    seq = windows(True)[k]
    assert seq.meta["case"] != "slide_001" and seq.meta["skipped"][0]["case"] == "slide_001"
    assert windows(True)[k].pixels.equal(seq.pixels)  # the substitute is a function of (seed, k)
    with pytest.raises(DataError, match=f"training sample {k} \\(case slide_001, .*slide_001.tiff\\)"):
        windows(False)[k]


def test_check_data_lists_every_planted_problem(slides, tmp_path):
    data = _copy(slides, tmp_path)
    (data / "slide_000.tiff").unlink()
    _truncate(data / "slide_001.tiff")
    write_pyramid_from_array(data / "slide_002_mask.tiff", np.zeros((100, 100), np.uint8), tile=64)
    mask = np.zeros((192, 192), np.uint8)
    mask[:8, :8] = 7
    write_pyramid_from_array(data / "slide_003_mask.tiff", mask, tile=64)
    write_pyramid_from_array(data / "slide_004.tiff", np.full((192, 192, 3), 255, np.uint8), tile=64)
    proc = hrvit("check-data", RECIPE, *TINY, f"data.manifest={data / 'manifest.csv'}", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.startswith("slide_")}
    assert "file not found" in lines["slide_000"]
    assert "slide_001.tiff" in lines["slide_001"]
    assert "does not match image shape" in lines["slide_002"]
    assert "outside [0, 3)" in lines["slide_003"]
    assert "tissue fraction 0.0000" in lines["slide_004"]
    assert "slide_005" not in lines and "5 of 6 case(s) with problems" in proc.stdout

    clean = hrvit("check-data", RECIPE, *TINY, f"data.manifest={slides}")
    assert "0 of 6 case(s) with problems" in clean.stdout


def test_check_data_lists_training_cases_without_a_label(slides, tmp_path):
    from hrvit.config import load_config
    from hrvit.data.check import check_data

    data = _copy(slides, tmp_path)
    rows = [line.split(",") for line in (data / "manifest.csv").read_text().splitlines()]
    (data / "manifest.csv").write_text("\n".join(f"{r[0]},{r[2]}" for r in rows) + "\n")  # no label column
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={data / 'manifest.csv'}"])
    problems = {r["case"]: r["problem"] for r in check_data(cfg)[0]}
    assert "train case slide_000 has no label" in problems["slide_000"]
    assert sum("has no label" in p for p in problems.values()) == 6  # 4 training and 2 validation cases


def test_manifest_paths_stay_inside_the_dataset_root(slides, tmp_path):
    data = _copy(slides, tmp_path)
    (data / "sub").mkdir()
    (data / "sub" / "manifest.csv").write_text("image,label,split\n../slide_000.tiff,,train\n")
    with pytest.raises(DataError, match="resolves outside the dataset root .*data.allow_outside_root=true"):
        discover("manifest", manifest=data / "sub" / "manifest.csv")
    (spec,) = discover("manifest", manifest=data / "sub" / "manifest.csv", allow_outside_root=True)
    assert spec.image[0].resolve() == (data / "slide_000.tiff").resolve()


@pytest.mark.parametrize("script", ["launch/slurm.sbatch", "launch/frontier.sbatch"])
def test_sbatch_requeues_a_preempted_job_and_resumes_it(tmp_path, script):
    """With stand-ins for srun and scontrol: exit 75 -> `scontrol requeue JOB`, and the requeued job
    (SLURM_RESTART_COUNT=1) passes train.resume=auto; any other failure is the job's status."""
    calls = tmp_path / "calls"
    for name in ("srun", "scontrol", "module"):  # only the training step fails, with FAKE_RC
        (tmp_path / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n'
                                     'case "$*" in *"hrvit train"*) exit $FAKE_RC;; esac\n')
        (tmp_path / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1", "USER": "me", "HRVIT_VENV": str(REPO / ".venv")}
    for rc, status in ((75, 0), (1, 1)):
        calls.write_text("")
        proc = subprocess.run(["bash", script, RECIPE, "train.steps=5"], cwd=REPO, capture_output=True, text=True,
                              env={**env, "FAKE_RC": str(rc)})
        assert proc.returncode == status, proc.stderr
        run = [line for line in calls.read_text().splitlines() if "hrvit train" in line]
        assert len(run) == 1 and run[0].endswith(f"{RECIPE} train.steps=5 train.resume=auto"), calls.read_text()
        assert ("scontrol requeue 42" in calls.read_text()) == (rc == 75)


def test_a_dead_loader_worker_names_the_samples(slides, tmp_path):
    run = tmp_path / "worker"
    proc = _start("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=100000",
                  "data.workers=1")
    _wait_for_step(proc, run, 2)
    (worker,) = psutil.Process(proc.pid).children()
    worker.kill()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "a data-loader worker died while samples [" in out, out[-3000:]
    assert "(cases slide_" in out and "Traceback" not in out
