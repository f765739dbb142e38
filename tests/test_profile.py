"""tools/profile.py: a real 2-rank sweep with a failing configuration, driver mode's timeout, bad input,
and the analytic FLOP count against DeepSpeed's flops profiler."""

import csv
import json
import subprocess
import time

import pytest
import torch
from conftest import PY, REPO, run
from PIL import Image

from hrvit.engine.flops import forward_flops, train_step_flops
from hrvit.models import build_model

TOOL = REPO / "tools" / "profile.py"
TINY = ["parallel.sp_size=1", "model.embed_dim=32", "model.depth=4", "model.num_heads=2",
        "model.decoder_channels=[16,16,16]", "p=8", "mode=uniform", "train.micro_batch=2"]


def profile(*args, ranks: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tools/profile.py as one process (driver mode) or on `ranks` launched processes (in-process mode; a
    successful run must have removed its /dev/shm buffers, see conftest.run)."""
    return run([PY, TOOL, *args], ranks=ranks, timeout=timeout, check=False)


def test_flops_match_deepspeed_profiler():
    """The analytic forward count is within the README's 2 % of DeepSpeed's profiler (encoder and whole model),
    and below it: the profiler also counts norms, activations and softmax, which the convention leaves out."""
    from deepspeed.profiling.flops_profiler import get_model_profile

    torch.manual_seed(0)
    model = build_model("nano", ndim=2, patch_size=16, in_chans=3, num_classes=3)
    L = 256
    args = [torch.rand(1, L, 3, 16, 16), torch.randint(0, 512, (1, L, 4)), torch.ones(1, L, dtype=torch.bool),
            torch.ones(1)]  # scale [B]: the encoder's physical scale of each sample
    for net in (model.encoder, model):
        counted, _, _ = get_model_profile(net, args=args, print_profile=False, as_string=False, warm_up=0)
        ours = forward_flops(net, L)
        assert 0 < 1 - ours / counted < 0.02, (type(net).__name__, ours, counted)
    assert train_step_flops(model, L, samples=4) == 3 * 4 * forward_flops(model, L)


@pytest.mark.slow
def test_two_rank_sweep_records_rows_plots_and_a_failure(tmp_path):
    """sp=3 cannot run on 2 ranks: recorded as an error, and the two configurations after it still run."""
    out = tmp_path / "prof"
    proc = profile("launch/recipes/quickstart.yaml", *TINY, "resolution=64", "--sweep", "sp=3,1,2",
                   "--warmup", 1, "--steps", 2, "--out", out, "--compare", "sp=1,2", ranks=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["error", "ok", "ok"]
    assert "parallel.sp_size" in rows[0]["error"]
    for row in rows[1:]:
        assert row["world_size"] == 2 and row["seq_len"] == 64 and row["steps"] == 2
        assert row["dp_size"] * row["sp_size"] == 2
        assert row["step_time_p10_s"] <= row["step_time_median_s"] <= row["step_time_p90_s"]
        assert 0 < row["mfu"] < 1 and row["flops_per_step"] > 0 and row["peak_mem_mib"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * row["tokens_per_s_per_device"], rel=0.01)
        assert abs(sum(row[f"share_{k}"] for k in ("data", "forward", "backward", "optimizer")) - 1) < 0.05
        parts = sum(row[f"part_{k}_s"] for k in ("data", "to_device", "encoder_forward", "decoder_forward", "loss",
                                                 "decoder_backward", "encoder_backward", "optimizer"))
        assert row["part_decoder_backward_s"] > 0 and parts <= row["step_time_p90_s"] * 1.05
        assert row["env"]["world_size"] == 2 and row["env"]["git_commit"]
    assert rows[2]["share_comm"] > 0  # the Ulysses all-to-alls, seen by DeepSpeed's comms logger
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    for row in table[1:]:
        assert all(row[k] != "" for k in row if k != "error"), row
    for png in ("memory_vs_sp.png", "tokens_per_config.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    assert json.loads((out / "compare.json").read_text())["geomean"] > 0
    assert "geometric mean" in proc.stdout


@pytest.mark.slow
def test_driver_mode_stops_a_hung_configuration(tmp_path):
    """Driver mode runs each configuration in a child; one past --timeout is recorded and the sweep ends normally."""
    out = tmp_path / "prof"
    proc = profile("launch/recipes/quickstart.yaml", *TINY, "resolution=64", "--timeout", 1, "--steps", 50,
                   "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert row["status"] == "timeout" and "--timeout 1" in row["error"]


def test_bad_input_is_one_clear_error(tmp_path):
    proc = profile("launch/recipes/quickstart.yaml", "--sweep", "model.presett=nano,tiny", "--out", tmp_path)
    assert proc.returncode == 2 and "model.presett" in proc.stderr and "Traceback" not in proc.stderr
    proc = profile("launch/recipes/quickstart.yaml", "--sweep", "resolution", "--out", tmp_path)
    assert proc.returncode == 2 and "--sweep 'resolution'" in proc.stderr
    proc = profile("launch/recipes/quickstart3d.yaml", "volume=64x64", "--out", tmp_path)
    assert proc.returncode == 2 and "volume: '64x64'" in proc.stderr and "Traceback" not in proc.stderr


def _tool():
    """tools/profile.py as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hrvit_profile_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_part_clock_cuts_the_step_at_the_encoder_without_changing_gradients():
    """The part-by-part figures come from hooks: the forward is cut at the encoder's start and end and the
    decoder's end, the backward where the gradient reaches the encoder's hidden states. The hooks must not change
    the step: gradients with the clock equal those without it."""
    tool = _tool()
    torch.manual_seed(0)
    model = build_model("nano", ndim=3, patch_size=4, in_chans=2, num_classes=3, embed_dim=32, depth=4,
                        num_heads=2, decoder_channels=[16, 8])
    L = 6
    args = [torch.randn(1, L, 2, 4, 4, 4), torch.cat([torch.randint(0, 8, (1, L, 3)) * 4,
                                                       torch.full((1, L, 3), 4)], -1),
            torch.ones(1, L, dtype=torch.bool), torch.ones(1)]

    def grads():
        model.zero_grad()
        start = time.perf_counter()
        loss = model(*args).square().mean()
        forward_end = time.perf_counter()
        loss.backward()
        return start, forward_end, time.perf_counter(), [p.grad.clone() for p in model.parameters()]

    *_, plain = grads()
    clock = tool.PartClock(model)
    start, forward_end, backward_end, timed = grads()
    for a, b in zip(plain, timed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    m = clock.marks
    assert start <= m["encoder_start"] <= m["encoder_end"] <= m["decoder_end"] <= forward_end
    assert len(clock.grads) == 4  # one mark per hidden state the decoder reads
    assert forward_end <= max(clock.grads) <= backward_end
    parts = clock.split(start, forward_end, backward_end)
    assert set(parts) == set(tool.PARTS) - {"data", "optimizer"}
    assert all(v >= 0 for v in parts.values()) and parts["decoder_backward"] > 0
    assert sum(parts.values()) == pytest.approx(backward_end - start)
    assert {f"part_{k}_s" for k in tool.PARTS} <= set(tool.FIELDS)
    clock.remove()
    clock.reset()
    grads()
    assert not clock.marks and not clock.grads


def test_volume_axis_writes_one_brats_size_training_case_once(tmp_path, monkeypatch):
    """`volume=ZxYxX` is a 4-channel BraTS-layout gzip NIfTI case written once under the cache and read as the
    one training case; bad shapes are one ConfigError naming the axis."""
    import nibabel as nib

    from hrvit.data.datasets import discover
    from hrvit.errors import ConfigError

    tool = _tool()
    monkeypatch.setattr(tool, "CACHE", tmp_path)
    assert tool.volume_shape("197x233x189") == (197, 233, 189) and tool.volume_shape(24) == (24, 24, 24)
    for bad in ("12x12", "axbxc", "4x64x64"):
        with pytest.raises(ConfigError, match="volume"):
            tool.volume_shape(bad)
    root = tool.synthetic_volume_root("12x20x16")
    assert tool.synthetic_volume_root("12x20x16") == root  # cached: written once
    (spec,) = discover("brats", root)
    assert spec.split == "train" and len(spec.image) == 4
    img = nib.load(spec.image[0])
    assert str(spec.image[0]).endswith(".nii.gz") and img.shape == (16, 20, 12)  # nibabel (x, y, z)
    overrides = tool.point_overrides({"volume": "12x20x16"})
    assert "data.layout=brats" in overrides and f"data.root={json.dumps(str(root))}" in overrides
