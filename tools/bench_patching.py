"""Adaptive-patching speed and memory on one CPU core: the figures of the adaptive-patching issue.

    python tools/bench_patching.py [--cache data/bench] [--repeat 5] [--skip-64k]

- an in-memory 8192^2 RGB image (a synthetic slide, float32) into L = 10201 and L = 16384 tokens:
  scores + tree + resampling; the tree alone, given the score tables, at L = 16384;
- a 240x240x155 4-channel volume into 4096 octree tokens (p = 8);
- pyramid-native: a synthetic 16384^2 slide (real pyramidal TIFF) into L = 4096 tokens, and a
  65536^2 one, each in a fresh process so its peak memory (VmHWM, torch's ~0.5 GB included) is its
  own; time, pixels read per level and the share of level-0 pixels read.

Times are the best of --repeat runs (the machine may be shared). Test images are generated once into
--cache (the 64K^2 slide takes minutes); hrvit.data.synthetic makes them, so they are the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hrvit.config import PatchingConfig  # noqa: E402
from hrvit.patching.adaptive import area_pool, build_tree, patch_adaptive, patch_pyramid, root_size  # noqa: E402
from hrvit.patching.scores import Detail  # noqa: E402


def best(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        tick = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tick)
    return min(times), out


def image_8k(cache: Path) -> torch.Tensor:
    from hrvit.data.synthetic import SyntheticSlide

    path = cache / "slide8192.npy"
    if not path.exists():
        slide = SyntheticSlide(8192, seed=1)
        rows = [np.concatenate([slide.image(0, y, x, 1024, 1024) for x in range(0, 8192, 1024)], 1)
                for y in range(0, 8192, 1024)]
        np.save(path, np.concatenate(rows, 0))
    return torch.from_numpy(np.load(path)).permute(2, 0, 1).float().div_(255).contiguous()


def volume(cache: Path) -> torch.Tensor:
    from hrvit.data.synthetic import synthetic_volume

    path = cache / "volume240.npy"
    if not path.exists():
        image, _ = synthetic_volume((155, 240, 240), seed=1)
        np.save(path, image)
    x = torch.from_numpy(np.load(path))
    return (x - x.mean((1, 2, 3), keepdim=True)) / x.std((1, 2, 3), keepdim=True)


def slide(cache: Path, size: int) -> Path:
    from hrvit.data.synthetic import SyntheticSlide
    from hrvit.data.tiff import write_pyramid

    path = cache / f"slide{size}.tiff"
    if not path.exists():
        tick = time.perf_counter()
        s = SyntheticSlide(size, seed=2)
        write_pyramid(path.with_suffix(".part"), s.shape, s.image, channels=3, tile=256, mpp=0.5)
        path.with_suffix(".part").rename(path)
        print(f"generated {path} in {time.perf_counter() - tick:.0f} s", flush=True)
    return path


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, tokens: int, repeat: int) -> None:
    """One pyramid-native measurement in this (fresh) process; prints JSON."""
    from hrvit.data import SlideSource

    torch.set_num_threads(1)
    base_rss = peak_mb()
    cfg = PatchingConfig(mode="adaptive", patch_size=16, tokens=tokens)
    seconds, seq = best(lambda: patch_pyramid(SlideSource(path), cfg), repeat)
    print(json.dumps({"seconds": seconds, "stages": seq.meta["seconds"], "real_tokens": seq.real_tokens,
                      "pixels_read": seq.meta["pixels_read"], "level0_fraction_read": seq.meta["level0_fraction_read"],
                      "peak_mb": peak_mb(), "start_mb": base_rss}))


def run_child(path: Path, tokens: int, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), "--tokens", str(tokens),
                          "--repeat", str(repeat)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_memory(cache: Path, repeat: int) -> list[tuple]:
    rows = []
    x = image_8k(cache)
    for tokens, target in ((10201, 0.5), (16384, 0.6)):
        cfg = PatchingConfig(mode="adaptive", patch_size=16, tokens=tokens)
        seconds, seq = best(lambda c=cfg: patch_adaptive(x, c), repeat)
        stages = ", ".join(f"{k} {v:.3f}" for k, v in seq.meta["seconds"].items() if k != "total")
        rows.append((f"8192^2 RGB in memory -> L={tokens} (p=16; {seq.real_tokens} real)", f"{seconds:.3f} s",
                     f"<= {target} s", f"last run: {stages}"))
    detail = Detail(area_pool(area_pool(x, 4, False), 2, False), 8)
    root = root_size((8192, 8192), 16, 16, None)
    seconds, _ = best(lambda: build_tree((8192, 8192), root, 16, 16, detail.node, 16384), repeat)
    rows.append(("tree alone, given the score tables, L=16384", f"{seconds:.3f} s", "<= 0.15 s", ""))
    v = volume(cache)
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=4096)
    seconds, seq = best(lambda: patch_adaptive(v, cfg), repeat)
    rows.append((f"240x240x155 x4 volume -> 4096 octree tokens (p=8; {seq.real_tokens} real)", f"{seconds:.3f} s",
                 "<= 1 s", ""))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-64k", action="store_true", help="leave out the 65536^2 slide (minutes to generate)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.repeat)
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = in_memory(args.cache, args.repeat)
    cases = [(16384, 4096, 3), (16384, 16384, 3)] + ([] if args.skip_64k else [(65536, 4096, 1)])
    for size, tokens, runs in cases:
        r = run_child(slide(args.cache, size), tokens, runs)
        read = sum(r["pixels_read"].values())
        rows.append((f"{size}^2 slide, pyramid-native -> L={tokens} (p=16; {r['real_tokens']} real; best of {runs})",
                     f"{r['seconds']:.2f} s, level-0 read {100 * r['level0_fraction_read']:.2f} %, "
                     f"all levels {read / size**2 * 100:.2f} % of level 0, peak {r['peak_mb']:.0f} MB "
                     f"(start {r['start_mb']:.0f} MB)",
                     {4096: "<= 5 %, < 1 GB", 16384: "-"}[tokens] if size == 16384 else "< 2 GB",
                     "pixels read per level: " + ", ".join(f"{k}: {v}" for k, v in r["pixels_read"].items())))

    print(f"\nadaptive patching, one CPU core (torch threads 1), best of {args.repeat} (pyramid-native: as marked)\n")
    print("| what | measured | target | notes |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
