"""Checkpoints checked before use: a damaged file is named with the previous complete checkpoint and how to use it,
and predict/eval compare the model's geometry with the input before any weights are read."""

import shutil
import struct
import zipfile

import torch
from conftest import hrvit

from hrvit.engine.checkpoint import damaged_file


def _copy(trained, tmp_path):
    """A copy of the shared trained run (checkpoints step0000008 and step0000016) that a test may damage."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _failed(proc, *parts):
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr[-3000:])


def test_resume_from_a_truncated_optimizer_file_names_it_and_offers_the_previous_checkpoint(trained, tmp_path):
    """Found by the size COMPLETE recorded, before DeepSpeed reads anything (torch's error named no file)."""
    run = _copy(trained, tmp_path)
    bad = run / "checkpoints" / "step0000016" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _truncate(bad)
    proc = hrvit("train", "--resume", run, ranks=2, check=False)
    _failed(proc, f"hrvit train: error: {bad} has ", "when it was saved (truncated",
            f"previous complete checkpoint is {run / 'checkpoints' / 'step0000008'}",
            f"train.resume={run / 'checkpoints' / 'step0000008'}")


def test_eval_of_a_truncated_checkpoint_offers_the_previous_one_and_predict_uses_it(trained, slides, tmp_path):
    run = _copy(trained, tmp_path)
    for old in run.glob("eval_*.json"):  # written by other tests' evaluations of the shared run
        old.unlink()
    bad = run / "checkpoints" / "step0000016" / "mp_rank_00_model_states.pt"
    _truncate(bad)
    previous = run / "checkpoints" / "step0000008"
    proc = hrvit("eval", run, check=False)
    _failed(proc, f"hrvit eval: error: {bad} ", f"checkpoint {bad.parent} cannot be loaded",
            f"previous complete checkpoint is {previous}: use it with --checkpoint {previous}")
    assert not (run / "eval_val.json").exists()

    image = next(p for p in sorted(slides.parent.glob("*.tiff")) if not p.name.endswith("_mask.tiff"))
    hrvit("predict", run, "--input", image, "--out", tmp_path / "pred", "--checkpoint", previous)
    assert any(p.name.endswith("_pred.tiff") for p in (tmp_path / "pred").iterdir())


def test_predict_checks_the_geometry_before_loading_weights(trained, volumes, tmp_path):
    """A 4-channel 3-D volume given to the 2-D RGB slide model: one line naming the input and what the model
    takes, nothing written."""
    case = sorted(p for p in volumes.iterdir() if p.is_dir())[0]
    inputs = [case / f"{case.name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    proc = hrvit("predict", trained, "--input", ";".join(map(str, inputs)), "--out", tmp_path / "pred", check=False)
    _failed(proc, f"hrvit predict: error: {inputs[0]}: 3-D image with 4 channel(s), but the model of "
            f"{trained / 'checkpoints' / 'step0000016'} takes 2-D images with 3 channel(s)")
    assert not (tmp_path / "pred").exists()


def test_a_corrupt_pickle_record_of_unchanged_size_is_found(tmp_path):
    """Overwritten bytes inside a torch file (same size, zip directory intact) fail the CRC of its pickle."""
    ckpt = tmp_path / "step0000001"
    ckpt.mkdir()
    path = ckpt / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(4)}, "step": 1}, path)
    assert damaged_file(ckpt) is None
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the record's bytes, after its local header
    data[start + 2:start + 10] = b"XXXXXXXX"
    path.write_bytes(data)
    bad, why = damaged_file(ckpt)
    assert bad == path and f"Bad CRC-32 for file '{info.filename}'" in why, why


def test_a_folder_holding_another_run_is_refused_before_the_data_checks(tmp_path):
    """check_run_dir (called before the minutes-long scans of a gigapixel slide): a folder with a run's metrics is
    refused unless resumed; one whose run failed before its first checkpoint (FAILED) may be reused."""
    import pytest

    from hrvit.config import load_config
    from hrvit.engine.trainer import FAILED, check_run_dir
    from hrvit.errors import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    cfg = load_config("launch/recipes/quickstart.yaml", [f"output.dir={run}"])
    with pytest.raises(ConfigError, match="already holds a run; set train.resume=auto"):
        check_run_dir(cfg)
    assert check_run_dir(load_config("launch/recipes/quickstart.yaml", [f"output.dir={run}", "train.resume=auto"]))
    (run / FAILED).write_text("error\n")
    assert check_run_dir(cfg) == run
