"""The Python half of tools/gpu_check.sh: versions, the SDPA kernel attention runs on, and the summary.

    python tools/gpu_report.py versions OUT.json            # torch, CUDA, cuDNN, NCCL, DeepSpeed, GPU, driver
    python tools/gpu_report.py sdpa OUT.json                # which SDPA kernel hrvit's attention uses (needs CUDA)
    python tools/gpu_report.py record WORK --name N --rc RC --seconds S --limit S --cmd "..."
    python tools/gpu_report.py summarize WORK DIR --total S  # WORK's results -> DIR/gpu_check.{json,md}

The shell script times and logs each step; everything that reads results or renders tables lives here, as
plain functions (collect, render_markdown) that a CPU test can call on a fake result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
BUDGET_S = 480
TAIL_LINES = 20
PRECISIONS = ("fp32", "bf16")
MEMSP_RE = re.compile(r"memsp_(\d+)(?:_sp(\d+))?\.json$")


# --- versions ----------------------------------------------------------------------------------------

def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict:
    """What produced the figures: library versions, the GPU and its driver, the commit."""
    import platform

    info: dict = {"python": platform.python_version(), "host": platform.node(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name in ("torch", "deepspeed", "timm", "numpy", "hrvit"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # a missing library is a finding, not a crash
            info[name] = f"not importable: {type(err).__name__}: {err}"[:200]
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        compute_capability=f"{props.major}.{props.minor}",
                        nccl=".".join(map(str, torch.cuda.nccl.version())))
    except Exception as err:
        info["torch_error"] = f"{type(err).__name__}: {err}"[:200]
    info["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).split("\n")[0] or None
    info["git_commit"] = _run(["git", "rev-parse", "--short", "HEAD"]) or None
    return info


# --- which SDPA kernel ---------------------------------------------------------------------------------

OP_PATTERNS = [  # aten ops the SDPA dispatcher chose (forward, backward, CPU variants) -> backend
    ("flash", r"flash_attention"), ("memory-efficient", r"efficient_attention"), ("cuDNN", r"cudnn_attention"),
    ("math", r"attention_math")]
KERNEL_PATTERNS = [("flash", "flash"), ("memory-efficient", r"fmha|efficient|mem_eff|cutlass[fb]"),
                   ("cuDNN", r"cudnn.*(sdpa|attn|attention|fmha)|(sdpa|attn|attention|fmha).*cudnn")]


def classify_sdpa(op_names: list[str], kernel_names: list[str]) -> dict:
    """The backend from the aten ops the dispatcher ran, cross-checked with the CUDA kernel names.

    Without a fused op or kernel, SDPA ran its math fallback (bmm + softmax), which keeps the whole
    L x L score matrix in memory."""
    aten = [n for n in op_names if n.startswith("aten::")]
    by_op = sorted({b for b, pattern in OP_PATTERNS for n in aten if re.search(pattern, n)})
    by_kernel = sorted({b for b, pattern in KERNEL_PATTERNS for k in kernel_names if re.search(pattern, k.lower())})
    fused = [b for b in by_op if b != "math"] or by_kernel
    math_ops = any(n in ("aten::bmm", "aten::_softmax", "aten::softmax") for n in op_names)
    backend = "/".join(fused) if fused else ("math" if ("math" in by_op or math_ops) else "unknown")
    return {"backend": backend, "by_op": by_op, "by_kernel": by_kernel,
            "agree": bool(by_op) and by_kernel == [b for b in by_op if b != "math"]}


class NeedsCuda(RuntimeError):
    pass


def detect_sdpa(presets=("nano", "base"), tokens: int = 4096, batch: int = 2, device: str = "cuda") -> dict:
    """Profile one forward + backward of hrvit's encoder in bf16 on CUDA, with and without a key-padding mask.

    The encoder drops the mask when every token is real (fused flash attention takes no mask); adaptive
    budget mode pads, and then SDPA gets a boolean mask, which flash attention cannot take. (device="cpu" only
    exercises this code on a machine without a GPU.)"""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from hrvit.models import build_model

    if device == "cuda" and not torch.cuda.is_available():
        raise NeedsCuda("gpu_report.py sdpa: needs CUDA (torch.cuda.is_available() is False): which SDPA kernel "
                        "runs is a question about a GPU")
    dev, p, side = torch.device(device), 16, math.isqrt(tokens)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    length = side * side
    ys, xs = torch.meshgrid(torch.arange(side) * p, torch.arange(side) * p, indexing="ij")
    boxes = torch.cat([ys.reshape(1, -1, 1), xs.reshape(1, -1, 1), torch.full((1, length, 2), p)], -1)
    boxes = boxes.expand(batch, -1, -1).to(dev)
    shape = torch.tensor([[side * p, side * p]] * batch, device=dev)
    flags = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in ("flash", "mem_efficient", "cudnn",
             "math") if hasattr(torch.backends.cuda, f"{name}_sdp_enabled")}
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        enc = build_model(preset, ndim=2, patch_size=p, in_chans=3, num_classes=3).encoder.to(dev, torch.bfloat16)
        pixels = torch.rand(batch, length, 3, p, p, device=dev, dtype=torch.bfloat16)
        for padded in (False, True):
            valid = torch.ones(batch, length, dtype=torch.bool, device=dev)
            if padded:
                valid[:, length - length // 4:] = False  # a quarter padding, as budget mode leaves on plain slides

            def step(valid=valid, enc=enc, pixels=pixels):
                enc(pixels, boxes, valid, shape)[-1].float().square().mean().backward()

            row = {"preset": preset, "head_dim": enc.embed_dim // enc.num_heads, "heads": enc.num_heads,
                   "tokens": length, "batch": batch, "mask": "key padding" if padded else "none", "dtype": "bf16"}
            try:
                step()  # warm-up: kernel selection and autotuning outside the profile
                sync()
                with profile(activities=activities) as prof:
                    step()
                    sync()
                events = prof.events()
                ops = sorted({e.name for e in events if e.name.startswith("aten::")})
                kernels = sorted({e.name for e in events if e.device_type == DeviceType.CUDA})
                attention_kernels = [k for k in kernels if any(re.search(pat, k.lower()) for _, pat in KERNEL_PATTERNS)]
                row.update(classify_sdpa(ops, kernels), sdpa_ops=[o for o in ops if "scaled_dot_product" in o],
                           kernels=attention_kernels[:6])
            except Exception as err:  # e.g. out of memory: recorded, the other rows still run
                row.update(backend="error", error=f"{type(err).__name__}: {err}"[:300])
            rows.append(row)
            enc.zero_grad(set_to_none=True)
        del enc, pixels
        if cuda:
            torch.cuda.empty_cache()
    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if cuda else "cpu", "flags": flags,
            "rows": rows}


# --- results -------------------------------------------------------------------------------------------

def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(errors="replace").rstrip("\n").splitlines()[-n:]
    except OSError:
        return []


def _json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def gpu_memory(path: Path) -> tuple[int | None, int | None]:
    """(first, highest) GPU memory in use, MiB, from nvidia-smi samples taken during a step (whole GPU)."""
    values = [int(v) for v in re.findall(r"^\s*(\d+)", path.read_text(), re.M)] if path.is_file() else []
    return (values[0], max(values)) if values else (None, None)


def record(work: Path, name: str, rc: int, seconds: float, limit: float, cmd: str, status: str | None = None) -> dict:
    """One step's line in WORK/steps.jsonl: exit status, time, the last log lines, GPU memory seen."""
    base, peak = gpu_memory(work / "logs" / f"{name}.gpumem")
    status = status or ("ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed")
    row = {"name": name, "status": status, "exit": rc, "seconds": round(seconds, 1), "limit_s": limit,
           "command": cmd, "gpu_mem_start_mib": base, "gpu_mem_peak_mib": peak,
           "log_tail": tail(work / "logs" / f"{name}.log")}
    with open(work / "steps.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _memsp_rows(data) -> list[dict]:
    """memory_sp.py --json rows (held and peak in bytes, worst rank) -> MiB rows."""
    out = []
    for r in (data or {}).get("rows", []):
        held, peak = (round(r[k] / MIB, 1) if isinstance(r.get(k), (int, float)) else None for k in ("held", "peak"))
        out.append({"sp": r.get("sp"), "tokens": r.get("tokens"), "tokens_per_rank": r.get("tokens_per_rank"),
                    "held_mib": held, "peak_mib": peak, "activation_mib": None if None in (held, peak) else
                    round(peak - held, 1), "seconds": r.get("seconds"), "device": r.get("device"),
                    "backend": r.get("backend"), "precision": r.get("precision")})
    return out


PROFILE_KEYS = ("label", "status", "error", "mode", "image_side", "seq_len", "tokens_real", "precision",
                "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "samples_per_s", "tokens_per_s",
                "tflops_per_s_per_device", "mfu", "peak_source", "peak_mem_mib", "share_data")


def collect(work: Path, total_s: float | None = None, budget_s: float = BUDGET_S) -> dict:
    """Everything the check measured, from WORK's files, as one dict (the JSON summary)."""
    steps = _jsonl(work / "steps.jsonl")
    by_name = {s["name"]: s for s in steps}
    training = []
    for prec in PRECISIONS:
        step = by_name.get(f"train_{prec}")
        if step is None:
            continue
        summary = _json(work / "runs" / prec / "summary.json", {})
        training.append({"precision": prec, "exit": step["exit"], "seconds": step["seconds"],
                         **{k: summary.get(k) for k in ("dice_mean", "dice_per_class", "steps", "samples_per_s",
                                                        "tokens_per_s", "world_size", "zero_stage")}})
    predict = None
    if "predict" in by_name:
        folder = work / "predict"
        files = sorted(folder.iterdir()) if folder.is_dir() else []
        step = by_name["predict"]
        predict = {"exit": step["exit"], "seconds": step["seconds"],
                   "outputs": {f.name: f.stat().st_size for f in files},
                   "outputs_ok": any(f.name.endswith("_pred.tiff") for f in files)
                   and any(f.name.endswith("_overlay.png") for f in files),
                   "gpu_mem_start_mib": step["gpu_mem_start_mib"], "gpu_mem_peak_mib": step["gpu_mem_peak_mib"]}
    rows = _jsonl(work / "profile" / "results.jsonl")
    profile = {"rows": [{k: r.get(k) for k in PROFILE_KEYS} for r in rows],
               "compare": _json(work / "profile" / "compare.json"),
               "device": (rows[0].get("env") or {}).get("device") if rows else None}
    memory = []
    found = [(m, path) for path in work.glob("memsp_*.json") if (m := MEMSP_RE.search(path.name))]
    for _, path in sorted(found, key=lambda t: [int(g or 0) for g in t[0].groups()]):  # by tokens, then SP
        memory += _memsp_rows(_json(path, {}))
    warnings = [f"step {s['name']}: {s['status']} (exit {s['exit']})" for s in steps if s["status"] != "ok"]
    if total_s is not None and total_s > budget_s:
        warnings.append(f"total wall time {total_s:.0f} s is over the {budget_s / 60:g}-minute budget")
    return {"versions": _json(work / "versions.json", {}), "total_s": None if total_s is None else round(total_s, 1),
            "budget_s": budget_s, "cpu_only": (work / "CPU_ONLY").exists(), "warnings": warnings, "steps": steps,
            "training": training, "predict": predict, "profile": profile, "memory_sp": memory,
            "sdpa": _json(work / "sdpa.json")}


# --- Markdown ------------------------------------------------------------------------------------------

def _f(value, fmt: str = "{:,.1f}", none: str = "–") -> str:
    return none if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def render_markdown(result: dict) -> str:
    """The summary as Markdown: a table per section, ready to paste into docs/performance.md."""
    v = result.get("versions") or {}
    lines = ["# hrvit GPU check", ""]
    if result.get("cpu_only"):
        lines += ["**Run on a CPU with GPU_CHECK_ALLOW_CPU=1 to test the script: the figures say nothing about "
                  "a GPU.**", ""]
    lines.append(f"{v.get('gpu', 'GPU ?')} ({_f(v.get('gpu_memory_gib'), '{} GiB')}, driver {v.get('driver') or '?'}),"
                 f" torch {v.get('torch', '?')}, CUDA {v.get('cuda') or '?'}, cuDNN {v.get('cudnn') or '?'}, "
                 f"NCCL {v.get('nccl') or '?'}, DeepSpeed {v.get('deepspeed', '?')}, Python {v.get('python', '?')}, "
                 f"commit {v.get('git_commit') or '?'}; {v.get('time', '')}.")
    total = result.get("total_s")
    lines += ["", f"Total wall time: {_f(total, '{:.0f} s')} (budget {result.get('budget_s', BUDGET_S):.0f} s)."
              + ("" if total is not None else " (still running or stopped early)")]
    for w in result.get("warnings", []):
        lines.append(f"- **warning**: {w}")
    lines += ["", "## Steps", ""]
    lines += _table(["step", "status", "exit", "seconds", "GPU MiB in use, start → peak (nvidia-smi)", "command"],
                    [[s["name"], s["status"], "–" if s["status"] == "skipped" else s["exit"], _f(s["seconds"]),
                      f"{_f(s.get('gpu_mem_start_mib'), '{:,}')} → {_f(s.get('gpu_mem_peak_mib'), '{:,}')}",
                      f"`{s['command']}`"] for s in result.get("steps", [])])
    if result.get("training"):
        lines += ["", "## Quick start on one GPU (1 process, ZeRO-2, adaptive patching, 256 tokens)", ""]
        lines += _table(["precision", "exit", "steps", "mean Dice", "samples/s", "tokens/s", "seconds"],
                        [[t["precision"], t["exit"], _f(t.get("steps"), "{}"), _f(t.get("dice_mean"), "{:.3f}"),
                          _f(t.get("samples_per_s"), "{:,.1f}"), _f(t.get("tokens_per_s"), "{:,.0f}"),
                          _f(t["seconds"])] for t in result["training"]])
    pr = result.get("predict")
    if pr:
        used = None if pr.get("gpu_mem_peak_mib") is None else pr["gpu_mem_peak_mib"] - (pr["gpu_mem_start_mib"] or 0)
        lines += ["", "## Prediction (`hrvit predict`)", ""]
        lines += _table(["exit", "seconds", "outputs", "label TIFF + overlay written", "GPU MiB used (nvidia-smi)"],
                        [[pr["exit"], _f(pr["seconds"]), ", ".join(pr["outputs"]) or "none",
                          "yes" if pr["outputs_ok"] else "no", _f(used, "{:,}")]])
    prof = result.get("profile") or {}
    if prof.get("rows"):
        lines += ["", "## Uniform vs adaptive patching (tools/profile.py, bf16, 1 GPU)", ""]
        lines += _table(["config", "status", "tokens", "step s (p10–p90)", "tokens/s", "TFLOP/s", "MFU",
                         "peak MiB", "data %"],
                        [[r["label"], r["status"] if r["status"] == "ok"
                          else f"{r['status']}: {(r['error'] or '')[:80]}",
                          _f(r.get("seq_len"), "{:,}"),
                          f"{_f(r.get('step_time_median_s'), '{:.3f}')} ({_f(r.get('step_time_p10_s'), '{:.3f}')}–"
                          f"{_f(r.get('step_time_p90_s'), '{:.3f}')})" if r["status"] == "ok" else "",
                          _f(r.get("tokens_per_s"), "{:,.0f}"), _f(r.get("tflops_per_s_per_device"), "{:,.2f}"),
                          _f(None if r.get("mfu") is None else 100 * r["mfu"], "{:.1f} %"),
                          _f(r.get("peak_mem_mib"), "{:,.0f}"),
                          _f(None if r.get("share_data") is None else 100 * r["share_data"], "{:.0f}")]
                         for r in prof["rows"]])
        cmp = prof.get("compare") or {}
        if cmp.get("geomean"):
            lines += ["", f"Speed-up of {cmp['axis']}={cmp['b']} over {cmp['a']}: "
                      + ", ".join(f"{k}: {s:.2f}x" for k, s in cmp.get("speedups", {}).items())
                      + f"; geometric mean **{cmp['geomean']:.2f}x**."]
    if result.get("memory_sp"):
        lines += ["", "## Peak memory per rank under sequence parallelism (tools/memory_sp.py, one GPU, gloo)", ""]
        lines += _table(["tokens", "SP", "tokens / rank", "held MiB", "peak MiB", "activation MiB", "step s"],
                        [[_f(r["tokens"], "{:,}"), r["sp"], _f(r["tokens_per_rank"], "{:,}"),
                          _f(r["held_mib"], "{:,.0f}"), _f(r["peak_mib"], "{:,.0f}"),
                          _f(r["activation_mib"], "{:,.0f}"), _f(r["seconds"], "{:.2f}")]
                         for r in result["memory_sp"]])
    sd = result.get("sdpa")
    if sd and sd.get("rows"):
        lines += ["", "## SDPA kernel of hrvit's attention (torch.profiler, bf16, forward + backward; enabled: "
                  + ", ".join(k for k, on in sd.get("flags", {}).items() if on) + ")", ""]
        lines += _table(["preset", "head dim", "tokens × batch", "key mask", "backend", "aten op", "kernels"],
                        [[r["preset"], r["head_dim"], f"{r['tokens']:,} × {r['batch']}", r["mask"], r["backend"],
                          ", ".join(o.replace("aten::", "") for o in r.get("sdpa_ops", [])) or r.get("error", ""),
                          ", ".join(k[:60] for k in r.get("kernels", [])[:3])] for r in sd["rows"]])
    failed = [s for s in result.get("steps", []) if s["status"] in ("failed", "timeout") and s.get("log_tail")]
    if failed:
        lines += ["", "## Last log lines of steps that did not succeed", ""]
        for s in failed:
            lines += [f"`{s['name']}` ({s['status']}, exit {s['exit']}):", "", "```", *s["log_tail"], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def summarize(work: Path, out: Path, total_s: float | None, budget_s: float) -> dict:
    """Write DIR/gpu_check.json and DIR/gpu_check.md (and copy two pictures): few files, for the device tool."""
    result = collect(work, total_s, budget_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_check.md").write_text(render_markdown(result))
    pictures = {"predict_overlay.png": next(iter(sorted((work / "predict").glob("*_overlay.png"))), None),
                "profile_step_time_vs_resolution.png": work / "profile" / "step_time_vs_resolution.png"}
    for name, src in pictures.items():
        if src is not None and src.is_file():
            shutil.copyfile(src, out / name)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("versions").add_argument("out", type=Path)
    s = sub.add_parser("sdpa")
    s.add_argument("out", type=Path)
    s.add_argument("--tokens", type=int, default=4096)
    s.add_argument("--batch", type=int, default=2)
    s.add_argument("--presets", nargs="+", default=["nano", "base"])
    r = sub.add_parser("record")
    r.add_argument("work", type=Path)
    for key, kind in (("name", str), ("rc", int), ("seconds", float), ("limit", float), ("cmd", str)):
        r.add_argument(f"--{key}", type=kind, required=True)
    r.add_argument("--status", help="instead of the one the exit status implies (skipped)")
    m = sub.add_parser("summarize")
    m.add_argument("work", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--total", type=float)
    m.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", BUDGET_S)))
    args = ap.parse_args(argv)
    if args.command == "versions":
        args.out.write_text(json.dumps(versions(), indent=2) + "\n")
    elif args.command == "sdpa":
        try:
            result = detect_sdpa(tuple(args.presets), args.tokens, args.batch)
        except NeedsCuda as err:
            print(err, file=sys.stderr)
            return 2
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        for row in result["rows"]:
            print(f"{row['preset']} (head dim {row['head_dim']}), mask {row['mask']}: {row['backend']} "
                  f"{row.get('sdpa_ops', '')} {row.get('kernels', row.get('error', ''))}")
    elif args.command == "record":
        record(args.work, args.name, args.rc, args.seconds, args.limit, args.cmd, args.status)
    else:
        summarize(args.work, args.out, args.total, args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
