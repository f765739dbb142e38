"""Peak memory per rank of one training step at a long sequence, for several SP sizes.

    python tools/memory_sp.py                        # 16,384 tokens, SP = 1, 2, 4, nano preset
    python tools/memory_sp.py --tokens 65536 --sp 1 2 4 8 --preset base --checkpoint

Each SP size runs as its own group of processes (gloo on CPU, NCCL on GPUs): the model with
Ulysses attention, one window of `--tokens` uniform tokens sharded over the group, one
forward + backward of the Dice + CE loss. Activation memory = peak during the step minus what
the process held just before it (parameters, gradients, inputs): process RSS on CPU (VmHWM,
reset through /proc/self/clear_refs), torch.cuda.max_memory_allocated on GPU. A warm-up step
runs first so gradients and kernels are allocated before the measured one.

The last column extrapolates linearly to the sequence that fits a memory budget (--budget-gib):
attention runs through SDPA without a mask here, whose fused kernels keep memory linear in the
sequence length, so activation memory per token is constant.
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
    import torch
    import torch.distributed as dist

    from hrvit.engine.losses import loss_from_sums, segmentation_sums
    from hrvit.engine.memory import PeakMemory
    from hrvit.models import build_model
    from hrvit.parallel.attention import ulysses_core
    from hrvit.parallel.dist import init_distributed
    from hrvit.parallel.shard import shard_batch, sum_over_group
    from hrvit.parallel.topology import SequenceParallel

    rank, world = init_distributed(600)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    if not gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    sp = SequenceParallel(world) if world > 1 else None
    torch.manual_seed(0)
    model = build_model(args.preset, ndim=2, patch_size=args.patch, in_chans=3, num_classes=3,
                        checkpoint_activations=args.checkpoint).to(device)
    if sp is not None:
        model.encoder.set_attention_core(ulysses_core(sp.group))
    side = math.isqrt(args.tokens)
    p, length = args.patch, side * side
    ys, xs = torch.meshgrid(torch.arange(side) * p, torch.arange(side) * p, indexing="ij")
    batch = {
        "pixels": torch.rand(1, length, 3, p, p),
        "boxes": torch.cat([ys.reshape(1, -1, 1), xs.reshape(1, -1, 1), torch.full((1, length, 2), p)], -1),
        "valid": torch.ones(1, length, dtype=torch.bool),
        "target": torch.randint(0, 3, (1, length, p, p)),
    }
    if sp is not None:
        batch = shard_batch(batch, sp.size, sp.sp_rank)
    batch = {k: v.to(device) for k, v in batch.items()}
    shape = torch.tensor([[side * p, side * p]], device=device)

    def step():
        logits = model(batch["pixels"], batch["boxes"], batch["valid"], shape, batch.get("key_valid"))
        sums = segmentation_sums(logits.flatten(0, 1), batch["target"].flatten(0, 1))
        if sp is not None:
            sums = sum_over_group(sums, sp.group)
        loss_from_sums(sums).backward()

    step()  # warm-up: gradients, kernels, communication buffers
    for q in model.parameters():
        q.grad.zero_()
    dist.barrier()
    memory = PeakMemory(gpu)
    held = memory.reset()
    tick = time.perf_counter()
    step()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tick
    peak = memory.peak()
    rows = [None] * world
    dist.all_gather_object(rows, {"held": held, "peak": peak, "seconds": seconds})
    if rank == 0:
        worst = max(rows, key=lambda r: r["peak"] - r["held"])
        print("RESULT " + json.dumps({"sp": world, "tokens": length, "tokens_per_rank": math.ceil(length / world),
                                      "device": "gpu" if gpu else "cpu", **worst}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def launch(args, sp: int) -> dict:
    """Start `sp` processes of this script as one group and return rank 0's measurement."""
    from hrvit.parallel.env import free_port

    port = str(free_port())
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(sp),
            "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}  # big tensors freed to the OS at once
    base.setdefault("DS_ACCELERATOR", "cpu" if not _has_gpu() else base.get("DS_ACCELERATOR", "cuda"))
    argv = [sys.executable, __file__, "--worker", "--tokens", str(args.tokens), "--preset", args.preset,
            "--patch", str(args.patch)] + (["--checkpoint"] if args.checkpoint else [])
    procs = [subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for r in range(sp)]
    outs = [p.communicate()[0] for p in procs]
    from hrvit.parallel.dist import release_shm_buffers

    release_shm_buffers(port)
    if any(p.returncode for p in procs):
        raise SystemExit(f"SP={sp}: a worker failed (exit codes {[p.returncode for p in procs]})")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="sequence length (a square number; default 16384)")
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4], help="SP sizes to measure (default 1 2 4)")
    ap.add_argument("--preset", default="nano", help="model preset (default nano)")
    ap.add_argument("--patch", type=int, default=16, help="patch size p (default 16)")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing on")
    ap.add_argument("--budget-gib", type=float, default=64.0, help="memory budget per rank for the last column")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if math.isqrt(args.tokens) ** 2 != args.tokens:
        raise SystemExit(f"--tokens {args.tokens}: use a square number (a square window of tokens)")
    command = "python tools/memory_sp.py " + " ".join(sys.argv[1:])
    results = [launch(args, sp) for sp in args.sp]
    base = next((r for r in results if r["sp"] == 1), results[0])
    base_act = base["peak"] - base["held"]
    budget = args.budget_gib * 2**30
    print(f"\n{command}\n{args.preset} preset, p = {args.patch}, {args.tokens} tokens, "
          f"checkpointing {'on' if args.checkpoint else 'off'}, {results[0]['device']}; per rank, worst rank\n")
    print(f"| SP | tokens/rank | held before (MiB) | peak (MiB) | activation (MiB) | vs SP={base['sp']} "
          f"| step (s) | sequence that fits {args.budget_gib:g} GiB (tokens/rank) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        act = r["peak"] - r["held"]
        per_token = act / r["tokens"]  # activation bytes per token of the whole sequence at this SP
        fits = int((budget - r["held"]) / per_token) if per_token > 0 else 0
        print(f"| {r['sp']} | {r['tokens_per_rank']} | {r['held'] / MIB:.0f} | {r['peak'] / MIB:.0f} "
              f"| {act / MIB:.0f} | {act / base_act:.2f}x | {r['seconds']:.1f} "
              f"| {fits:,} ({fits // r['sp']:,}) |")


if __name__ == "__main__":
    main()
