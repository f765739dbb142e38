"""tools/gpu_check.sh and tools/gpu_report.py on a CPU: the script parses, refuses without a GPU (exit 2, one
line, nothing written), and the summary renders a fake result into the Markdown tables."""

import importlib.util
import json
import os
import subprocess

from conftest import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_report", REPO / "tools" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_report)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_refuses_without_gpu(tmp_path):
    """No CUDA device visible (hidden even on a GPU machine): exit 2, the one-line reason, no folder."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "gpu_check: error: no CUDA GPU visible (torch.cuda.is_available() is False; nvidia-smi "), lines
    assert lines[0].endswith("this script measures hrvit on a GPU; run it on a GPU node")
    assert proc.stdout == "" and not any(tmp_path.iterdir())  # neither DIR nor a working folder


def test_classify_sdpa():
    flash = gpu_report.classify_sdpa(["aten::_scaled_dot_product_flash_attention", "aten::linear"],
                                     ["void pytorch_flash::flash_fwd_kernel<...>"])
    assert flash["backend"] == "flash" and flash["agree"]
    eff = gpu_report.classify_sdpa(["aten::_scaled_dot_product_efficient_attention"], ["fmha_cutlassF_bf16_aligned"])
    assert eff["backend"] == "memory-efficient" and eff["agree"]
    cudnn = gpu_report.classify_sdpa(["aten::_scaled_dot_product_cudnn_attention"], ["cudnn_generated_sdpa_fprop"])
    assert cudnn["backend"] == "cuDNN"
    assert gpu_report.classify_sdpa(["aten::bmm", "aten::_softmax"], ["ampere_bf16_gemm"])["backend"] == "math"
    cpu = gpu_report.classify_sdpa(["aten::_scaled_dot_product_flash_attention_for_cpu_backward"], [])
    assert cpu["backend"] == "flash" and not cpu["agree"]  # no kernel names to confirm it


def _fake_work(work):
    """A WORK folder as the script leaves it: steps, a training summary, profile rows, memory rows, SDPA rows."""
    (work / "logs").mkdir(parents=True)
    (work / "versions.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.6.0", "cuda": "12.4"}))
    (work / "logs" / "train_bf16.gpumem").write_text("10\n2048\n512\n")
    (work / "logs" / "profile.log").write_text("".join(f"line {i}\n" for i in range(30)))
    for name, rc, secs in (("train_bf16", 0, 41.5), ("profile", 124, 200.0)):
        gpu_report.record(work, name, rc, secs, 150, f"python something {name}")
    (work / "runs" / "bf16").mkdir(parents=True)
    (work / "runs" / "bf16" / "summary.json").write_text(json.dumps(
        {"dice_mean": 0.8123, "steps": 40, "samples_per_s": 55.2, "tokens_per_s": 14131.0}))
    (work / "profile").mkdir()
    ok = {"label": "resolution=8192 mode=adaptive", "status": "ok", "error": "", "seq_len": 4096,
          "step_time_median_s": 0.05, "step_time_p10_s": 0.04, "step_time_p90_s": 0.06, "tokens_per_s": 81920.0,
          "tflops_per_s_per_device": 12.5, "mfu": 0.0126, "peak_mem_mib": 3000.0, "share_data": 0.3}
    oom = {"label": "resolution=8192 mode=uniform", "status": "oom", "error": "CUDA out of memory | really"}
    (work / "profile" / "results.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps(oom) + "\n")
    (work / "memsp_16384_sp2.json").write_text(json.dumps(
        {"rows": [{"sp": 2, "tokens": 16384, "tokens_per_rank": 8192, "held": 100 * 2**20, "peak": 612 * 2**20,
                   "seconds": 0.2}]}))  # as memory_sp.py --json writes it: bytes
    (work / "sdpa.json").write_text(json.dumps({"flags": {"flash": True, "math": True}, "rows": [
        {"preset": "nano", "head_dim": 32, "tokens": 4096, "batch": 2, "mask": "key padding",
         "backend": "memory-efficient", "sdpa_ops": ["aten::_scaled_dot_product_efficient_attention"],
         "kernels": ["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]}]}))


def test_summary_json_and_markdown(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    _fake_work(work)
    result = gpu_report.summarize(work, out, total_s=500.0, budget_s=480)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert json.loads((out / "gpu_check.json").read_text()) == result
    steps = {s["name"]: s for s in result["steps"]}
    assert steps["train_bf16"]["gpu_mem_peak_mib"] == 2048 and steps["profile"]["status"] == "timeout"
    assert len(steps["profile"]["log_tail"]) == gpu_report.TAIL_LINES
    assert any("over the 8-minute budget" in w for w in result["warnings"])
    assert result["memory_sp"][0]["activation_mib"] == 512.0
    md = (out / "gpu_check.md").read_text()
    assert "| bf16 | 0 | 40 | 0.812 | 55.2 | 14,131 | 41.5 |" in md
    row = "| resolution=8192 mode=adaptive | ok | 4,096 | 0.050 (0.040–0.060) | 81,920 | 12.50 | 1.3 % | 3,000 | 30 |"
    assert row in md
    assert "oom: CUDA out of memory \\| really" in md  # a pipe inside a cell is escaped
    assert "| 16,384 | 2 | 8,192 | 100 | 612 | 512 | 0.20 |" in md
    assert "| nano | 32 | 4,096 × 2 | key padding | memory-efficient | _scaled_dot_product_efficient_attention |" in md
    assert "`profile` (timeout, exit 124)" in md and "line 29" in md
