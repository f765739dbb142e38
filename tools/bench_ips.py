"""Memory and time of one IPS training step as the number of candidate patches grows.

    python tools/bench_ips.py                                # 1k..64k candidates, M=32, I=256
    python tools/bench_ips.py --candidates 1000 4000 --baseline-max 4000

For each candidate count a synthetic megapixel canvas with that many grid cells is written once as a
pyramidal TIFF (data/bench_ips/, cached) and one training step runs in a fresh process: selection
(every candidate read lazily from the slide through openslide and scored without gradients, `--chunk`
at a time), then the top `--memory` patches embedded with gradients, the loss, backward and an AdamW
step. The baseline ("no selection") embeds every candidate with gradients in one pass, as a MIL
model without IPS must; it runs up to --baseline-max candidates. Memory is the process's peak
during the step minus what it held before (VmHWM on CPU, the allocator's peak on a GPU), so torch's
own footprint does not hide the growth. One warm-up step runs first.
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


def canvas(candidates: int, patch: int, cache: Path) -> Path:
    """A square canvas whose grid of `patch`-sized cells has about `candidates` cells (written once)."""
    from hrvit.data.synthetic import MegapixelCanvas
    from hrvit.data.tiff import write_pyramid

    side = math.ceil(math.sqrt(candidates)) * patch
    path = cache / f"canvas_{side}.tiff"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        c = MegapixelCanvas(side, seed=1, label=2, cell=patch)
        tmp = path.with_suffix(".tmp.tiff")
        write_pyramid(tmp, c.shape, c.image, channels=3, tile=256)
        tmp.rename(path)
    return path


def worker(args) -> None:
    import torch

    from hrvit.data.sources import open_image
    from hrvit.engine.memory import PeakMemory
    from hrvit.models.mil import build_ips_model, classification_loss
    from hrvit.patching.ips import grid_boxes, read_patches, select_patches

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = open_image(args.slide)
    boxes = grid_boxes(source.shape, args.patch)[: args.n]
    model = build_ips_model(args.preset, patch_size=args.p, in_chans=3, ips_patch=args.patch, num_classes=[4],
                            heads=args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = torch.tensor(source.shape)
    target = torch.tensor([[2]])

    read_seconds = [0.0]

    def read(b):
        tick = time.perf_counter()
        out = read_patches(source, b)
        read_seconds[0] += time.perf_counter() - tick
        return out

    def step():
        if args.baseline:  # every candidate with gradients
            pixels, chosen, valid = read(boxes)[None], boxes[None], torch.ones(1, len(boxes), dtype=torch.bool)
            stats = {"peak_patches": len(boxes)}
        else:
            model.eval()
            seq, s = select_patches(read, boxes, lambda p, b: model.score(p, b, shape), memory=args.memory,
                                    chunk=args.chunk, image_shape=source.shape)
            model.train()
            pixels, chosen, valid = seq.pixels[None], seq.boxes[None], seq.valid[None]
            stats = {"peak_patches": s.peak_patches}
        loss = classification_loss(model(pixels, chosen, valid, shape[None]), target)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        return stats

    step()  # warm-up: optimizer state and gradients exist before the measured step
    memory = PeakMemory()
    held = memory.reset()
    read_seconds[0] = 0.0
    tick = time.perf_counter()
    stats = step()
    seconds = time.perf_counter() - tick
    peak = memory.peak()
    print(json.dumps({"candidates": len(boxes), "baseline": args.baseline, "seconds": round(seconds, 3),
                      "read_seconds": round(read_seconds[0], 3),
                      "step_mib": round((peak - held) / MIB, 1), "peak_mib": round(peak / MIB, 1),
                      "held_mib": round(held / MIB, 1), **stats, "image": list(source.shape)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, nargs="+", default=[1000, 4000, 16000, 64000])
    ap.add_argument("--memory", type=int, default=32, help="M, patches kept (default 32)")
    ap.add_argument("--chunk", type=int, default=256, help="I, candidates scored at a time (default 256)")
    ap.add_argument("--patch", type=int, default=32, help="candidate patch side in pixels (default 32)")
    ap.add_argument("--p", type=int, default=16, help="encoder token side (default 16)")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--baseline-max", type=int, default=16000,
                    help="largest candidate count the no-selection baseline runs at (default 16000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "bench_ips")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON lines here too")
    # worker mode (one measured step in this process)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.slide:
        return worker(args)

    rows = []
    for n in args.candidates:
        slide = canvas(n, args.patch, args.cache)
        for baseline in (False, True):
            if baseline and n > args.baseline_max:
                continue
            cmd = [sys.executable, __file__, "--slide", str(slide), "--n", str(n), "--memory", str(args.memory),
                   "--chunk", str(args.chunk), "--patch", str(args.patch), "--p", str(args.p), "--preset",
                   args.preset, "--heads", str(args.heads), "--threads", str(args.threads)]
            proc = subprocess.run(cmd + (["--baseline"] if baseline else []), capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode:
                row = {"candidates": n, "baseline": baseline, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ips = [r for r in rows if not r["baseline"] and "step_mib" in r]
    base = [r for r in rows if r["baseline"] and "step_mib" in r]
    print("\n| candidates | IPS step memory (MiB) | IPS peak process memory (MiB) | IPS step time (s) (reading) | "
          "most patches held | no selection: step memory (MiB) | no selection: step time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in ips:
        b = next((x for x in base if x["candidates"] == r["candidates"]), None)
        print(f"| {r['candidates']:,} | {r['step_mib']:,.0f} | {r['peak_mib']:,.0f} | {r['seconds']:.2f} "
              f"({r['read_seconds']:.2f}) | {r['peak_patches']} | "
              + (f"{b['step_mib']:,.0f} | {b['seconds']:.2f} |" if b else "not run | |"))
    if len(ips) > 1:
        lo, hi = ips[0], ips[-1]
        print(f"\nIPS step memory, largest / smallest candidate count: {hi['step_mib'] / lo['step_mib']:.2f}x "
              f"(peak process memory {hi['peak_mib'] / lo['peak_mib']:.2f}x); "
              f"step time per 1k candidates: {1000 * lo['seconds'] / lo['candidates']:.3f} s at "
              f"{lo['candidates']:,}, {1000 * hi['seconds'] / hi['candidates']:.3f} s at {hi['candidates']:,}")


if __name__ == "__main__":
    main()
