"""Peak memory per rank of one training step at a long sequence, for several SP sizes.

    python tools/memory_sp.py                        # 16,384 tokens, SP = 1, 2, 4 (Ulysses), nano preset
    python tools/memory_sp.py --sp 1 2 4 1x2 1x4 2x2   # UxR: Ulysses U x ring R (1x4 = ring attention over 4)
    python tools/memory_sp.py --tokens 65536 --sp 1 2 4 8 --preset base --checkpoint

Each SP size runs as its own group of processes (gloo on CPU, NCCL on GPUs; `--backend gloo` lets
the ranks share one GPU): hrvit's own set-up and training step (hrvit/engine/session.py, as
`hrvit train` runs them): the DeepSpeed engine of the recipe launch/recipes/quickstart.yaml with
Ulysses attention, one window of `--tokens` uniform tokens that each rank shards before copying
its slice to the device, one forward + backward of the Dice + CE loss. Activation memory = peak
during the step minus what the process held just before it (parameters, gradients, optimizer state,
inputs): process RSS on CPU (VmHWM, reset through /proc/self/clear_refs),
torch.cuda.max_memory_allocated on GPU. A warm-up step (with an optimizer step) runs first so
gradients, optimizer state and kernels are allocated before the measured one.

The last column extrapolates linearly to the sequence that fits a memory budget (--budget-gib):
attention runs through SDPA without a mask here, whose fused kernels keep memory linear in the
sequence length, and ring attention computes its scores in chunks of hrvit.parallel.attention.SCORE_ELEMENTS,
so activation memory per token is constant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20


def worker(args) -> None:
    """One rank: hrvit's own set-up (tools and `hrvit train` share it) and its training step on one window."""
    import torch

    from hrvit.config import load_config
    from hrvit.engine.memory import PeakMemory
    from hrvit.engine.session import start
    from hrvit.parallel import comm

    world = int(os.environ["WORLD_SIZE"])
    ring = args.ring
    precision = {"fp32": [], "bf16": ["deepspeed.overrides.bf16.enabled=true"],
                 "fp16": ["deepspeed.overrides.fp16.enabled=true"]}[args.precision]
    cfg = load_config(REPO / "launch/recipes/quickstart.yaml", [
        f"model.preset={args.preset}", f"patching.patch_size={args.patch}", "patching.mode=uniform",
        f"parallel.sp_size={world}", f"parallel.ring={ring}",
        f"model.checkpoint_activations={str(args.checkpoint).lower()}",
        "train.micro_batch=1", "parallel.timeout_s=600", *precision])
    session = start(cfg)
    gpu = session.device.type == "cuda"
    if not gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    engine, _ = session.engine_for(session.parallelize(session.task.build_model(2, 3)))
    rows, cols = grid(args.tokens)
    p, length = args.patch, rows * cols
    ys, xs = torch.meshgrid(torch.arange(rows) * p, torch.arange(cols) * p, indexing="ij")
    batch = {  # the whole window on the CPU, as the loader gives it; the step shards it and copies this rank's part
        "pixels": torch.rand(1, length, 3, p, p),
        "boxes": torch.cat([ys.reshape(1, -1, 1), xs.reshape(1, -1, 1), torch.full((1, length, 2), p)], -1),
        "valid": torch.ones(1, length, dtype=torch.bool),
        "target": torch.randint(0, 3, (1, length, p, p)),
        "image_shape": torch.tensor([[rows * p, cols * p]]),
        "scale": torch.ones(1),
    }
    session.backward(session.loss(batch))  # warm-up: gradients, optimizer state, kernels, buffers
    engine.step()
    comm.barrier()
    memory = PeakMemory(gpu)
    held = memory.reset()
    tick = time.perf_counter()
    session.backward(session.loss(batch))  # the measured forward + backward
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    peak = memory.peak()
    rows = comm.all_gather_object({"held": held, "peak": peak, "seconds": seconds})
    if session.rank == 0:
        worst = max(rows, key=lambda r: r["peak"] - r["held"])
        print("RESULT " + json.dumps({"sp": world, "ring": ring, "tokens": length,
                                      "tokens_per_rank": math.ceil(length / world),
                                      "device": "gpu" if gpu else "cpu", "precision": args.precision,
                                      "backend": str(torch.distributed.get_backend()), **worst}), flush=True)
    comm.barrier()
    torch.distributed.destroy_process_group()


def grid(tokens: int) -> tuple[int, int]:
    """The most nearly square rows x cols window of exactly `tokens` tokens (32768 -> 128 x 256)."""
    rows = next(r for r in range(math.isqrt(tokens), 0, -1) if tokens % r == 0)
    return rows, tokens // rows


def layout(text: str) -> tuple[int, int]:
    """'4' -> SP 4 as Ulysses 4; '2x2' -> Ulysses 2 x ring 2 (SP 4); '1x4' -> ring 4. Returns (sp, ring)."""
    u, _, r = text.partition("x")
    try:
        u, r = int(u), int(r or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an SP size such as 4, or Ulysses x ring such as 2x2") from None
    if u < 1 or r < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: degrees must be >= 1")
    return u * r, r


def launch(args, sp: int, ring: int) -> dict:
    """Start `sp` processes of this script as one group and return rank 0's measurement."""
    from hrvit.parallel.env import free_port

    port = str(free_port())
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(sp),
            "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}  # big tensors freed to the OS at once
    base.setdefault("DS_ACCELERATOR", "cpu" if not _has_gpu() else base.get("DS_ACCELERATOR", "cuda"))
    if args.backend == "gloo":
        base["HRVIT_DIST_BACKEND"] = "gloo"  # several ranks may then share one GPU (NCCL refuses that)
    argv = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--preset", args.preset,
            "--patch", str(args.patch), "--precision", args.precision, "--ring", str(ring)]
    argv += ["--checkpoint"] if args.checkpoint else []
    procs = [subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for r in range(sp)]
    outs = [p.communicate()[0] for p in procs]
    from hrvit.parallel.dist import release_shm_buffers

    release_shm_buffers(port)
    if any(p.returncode for p in procs):
        raise SystemExit(f"SP={sp} (ring {ring}): a worker failed (exit codes {[p.returncode for p in procs]})")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384,
                    help="sequence length (default 16384), laid out as the most nearly square window")
    ap.add_argument("--sp", type=layout, nargs="+", default=[(1, 1), (2, 1), (4, 1)],
                    help="SP layouts to measure: an SP size (Ulysses), or UxR for Ulysses U x ring R, e.g. 2x2 "
                         "or 1x4 (default 1 2 4)")
    ap.add_argument("--preset", default="nano", help="model preset (default nano)")
    ap.add_argument("--patch", type=int, default=16, help="patch size p (default 16)")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing on")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="training precision")
    ap.add_argument("--backend", choices=["default", "gloo"], default="default",
                    help="process-group backend: the accelerator's (NCCL on GPUs, gloo on CPU), or gloo, which lets "
                         "the ranks of an SP size share one GPU, so per-rank memory can be measured on one GPU")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--budget-gib", type=float, default=64.0, help="memory budget per rank for the last column")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ring", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.tokens < 1:
        ap.error(f"--tokens {args.tokens}: must be >= 1")
    command = "python tools/memory_sp.py " + " ".join(sys.argv[1:])
    results = [launch(args, sp, ring) for sp, ring in args.sp]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "preset": args.preset, "patch": args.patch,
                                         "checkpointing": args.checkpoint, "rows": results}, indent=2))
    base = next((r for r in results if r["sp"] == 1), results[0])
    base_act = base["peak"] - base["held"]
    budget = args.budget_gib * 2**30
    print(f"\n{command}\n{args.preset} preset, p = {args.patch}, {args.tokens} tokens, "
          f"checkpointing {'on' if args.checkpoint else 'off'}, {results[0]['device']}; per rank, worst rank\n")
    print(f"| SP (Ulysses x ring) | tokens/rank | held before (MiB) | peak (MiB) | activation (MiB) "
          f"| vs SP={base['sp']} "
          f"| step (s) | sequence that fits {args.budget_gib:g} GiB (tokens/rank) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        act = r["peak"] - r["held"]
        per_token = act / r["tokens"]  # activation bytes per token of the whole sequence at this SP
        fits = int((budget - r["held"]) / per_token) if per_token > 0 else 0
        print(f"| {r['sp']} ({r['sp'] // r['ring']} x {r['ring']}) | {r['tokens_per_rank']} "
              f"| {r['held'] / MIB:.0f} | {r['peak'] / MIB:.0f} "
              f"| {act / MIB:.0f} | {act / base_act:.2f}x | {r['seconds']:.1f} "
              f"| {fits:,} ({fits // r['sp']:,}) |")


if __name__ == "__main__":
    from hrvit.parallel.dist import leave

    main()
    leave(0)
