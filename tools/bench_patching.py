"""Adaptive-patching speed and memory on one CPU core: the figures of the adaptive-patching issues.

    python tools/bench_patching.py [--cache data/bench] [--repeat 5] [--skip-64k] [--file-only]

- an in-memory 8192^2 RGB image (a synthetic slide, float32) into L = 10201 and L = 16384 tokens:
  scores + tree + resampling; the tree alone, given the score tables, at L = 16384;
- a 240x240x155 4-channel volume into 4096 octree tokens (p = 8);
- pyramid-native: a synthetic 16384^2 slide (real pyramidal TIFF) into L = 4096 tokens, and a
  65536^2 one, each in a fresh process so its peak memory (VmHWM, torch's ~0.5 GB included) is its
  own; time, pixels read per level and the share of level-0 pixels read;
- a file against memory (--file-only runs just this): the 8192^2 image as a single-level tiled JPEG TIFF
  into L = 10201 tokens of p = 8, side by side in one run: `hrvit patchify` on the file (a subprocess,
  one thread; statistics only, as the reference makes no picture, and again with --out, the overlay PNG; its
  start-up measured alone too), patch_pyramid on the file in this process, the decode
  alone (open_image(file).read_level, float32, the reader the CLI used to patch through: tifffile for a generic
  8-bit RGB TIFF; openslide's own decode is shown beside it), the decode to the stored bytes alone (read_stored,
  what patch_pyramid reads a single-level file with now), patch_adaptive on the float image alone, and an
  SC24-style reference written from the paper's description (below), which decodes the file with read_level as
  before; its ratio is given end to end and without the decode (against the in-memory patching, which starts
  from the same float image, and against patch_pyramid less its own decode to bytes).
  The reference's edge map is Canny (OpenCV, `pip install opencv-python-headless`, one thread) when cv2 imports,
  else a Sobel stand-in; the table says which ran.

Times are the best of --repeat runs (the machine may be shared). Test images are generated once into
--cache (the 64K^2 slide takes minutes); hrvit.data.synthetic makes them, so they are the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

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


def timed(fn, repeat):
    """(best wall seconds, best CPU seconds, last result) of `repeat` runs. CPU time is this process's user + system
    time plus that of children it waited for (os.times), so a subprocess counts too: on a shared machine it moves far
    less than wall time (one thread here, so CPU time is the work done)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t0, w0 = os.times(), time.perf_counter()
        out = fn()
        t1, w1 = os.times(), time.perf_counter()
        walls.append(w1 - w0)
        cpus.append(sum(t1[:4]) - sum(t0[:4]))
    return min(walls), min(cpus), out


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


def edges_canny(image: torch.Tensor) -> np.ndarray | None:
    """The reference's edge map as the paper makes it, when OpenCV is installed (None otherwise): the grey image
    (channel mean) in 8 bits, a 5 x 5 Gaussian blur (Canny's first step; cv2.Canny itself does not smooth), then
    cv2.Canny with thresholds 100 and 200; uint8, nonzero on edges. The grey image is made 64 rows at a time in
    numpy (0.17 s at 8192^2 here, against 0.6 s for torch's mean over the whole image), so the reference pays no
    more than it must for starting from read_level's float32 image."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    x = image.numpy()
    grey = np.empty(x.shape[1:], np.uint8)
    acc = np.empty((64, x.shape[2]), np.float32)
    for y in range(0, x.shape[1], 64):
        a = acc[:min(64, x.shape[1] - y)]
        np.add(x[0, y:y + 64], x[1, y:y + 64], out=a)
        for c in range(2, x.shape[0]):
            a += x[c, y:y + 64]
        a *= np.float32(255 / x.shape[0])
        grey[y:y + 64] = np.rint(a, out=a)
    return cv2.Canny(cv2.GaussianBlur(grey, (5, 5), 0), 100, 200)


def edges_sobel(image: torch.Tensor) -> torch.Tensor:
    """The reference's edge map without OpenCV (and without scikit-image), instead of Canny: Sobel gradient
    magnitude of the grey image (channel mean), thresholded at 0.25 of the image's range per pixel."""
    grey = image.mean(0)
    g = F.pad(grey[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    smooth_y = g[:-2] + 2 * g[1:-1] + g[2:]  # separable 3 x 3 Sobel, by slices (conv2d is 10x slower here)
    smooth_x = g[:, :-2] + 2 * g[:, 1:-1] + g[:, 2:]
    gx, gy = smooth_y[:, 2:] - smooth_y[:, :-2], smooth_x[2:] - smooth_x[:-2]
    span = float(grey.max() - grey.min()) or 1.0
    return (gx.hypot_(gy) > 8 * 0.25 * span).numpy()


def sc24_reference(image: torch.Tensor, p: int, tokens: int) -> np.ndarray:
    """SC24-style adaptive patching as the paper describes it (written here, not its code): an edge map (Canny when
    OpenCV is installed, else Sobel), then best-first: repeatedly split the leaf with the most edge pixels into
    four, each child's count summed from the edge map over its region, until `tokens` leaves; then every leaf
    area-resampled to p x p. Square images with a power-of-two side only (the benchmark's). Returns [n, C, p, p]."""
    import heapq

    edges = edges_canny(image)
    if edges is None:
        edges = edges_sobel(image)
    side = image.shape[1]
    heap = [(-int(edges.sum()), 0, 0, side)]
    leaves = []
    while heap and len(heap) + len(leaves) < tokens - 2:
        count, y, x, size = heapq.heappop(heap)
        if size <= p:
            leaves.append((y, x, size))
            continue
        half = size // 2
        for cy, cx in ((y, x), (y, x + half), (y + half, x), (y + half, x + half)):
            heapq.heappush(heap, (-np.count_nonzero(edges[cy:cy + half, cx:cx + half]), cy, cx, half))
    leaves += [(y, x, size) for _, y, x, size in heap]
    x_np = image.numpy()
    out = np.empty((len(leaves), image.shape[0], p, p), np.float32)
    for i, (y, x, size) in enumerate(leaves):
        f = size // p
        out[i] = x_np[:, y:y + size, x:x + size].reshape(-1, p, f, p, f).mean((2, 4))
    return out


def file_vs_memory(cache: Path, repeat: int) -> list[tuple]:
    """The 8192^2 image as a single-level tiled TIFF: the CLI, patch_pyramid, decode, in-memory patching and the
    SC24-style reference, side by side (one thread each); wall time and CPU time (in brackets), each the best of
    `repeat`, and every ratio in both."""
    import tempfile

    from hrvit.data import SlideSource, open_image, write_pyramid_from_array

    path = cache / "flat8192.tiff"
    if not path.exists():
        rgb = (image_8k(cache) * 255).round().byte().permute(1, 2, 0).numpy()
        write_pyramid_from_array(path.with_suffix(".part"), rgb, tile=256, levels=1)
        path.with_suffix(".part").rename(path)
    tokens, p = 10201, 8
    cfg = PatchingConfig(mode="adaptive", patch_size=p, tokens=tokens)
    source = open_image(path)
    reader = "tifffile" if getattr(source, "tiles", None) is not None else "openslide"
    decode = timed(lambda: torch.from_numpy(open_image(path).read_level(0, (0, 0), source.shape)), repeat)
    image = decode[2]
    stored = timed(lambda: open_image(path).read_stored(0, (0, 0), source.shape)[1], repeat)
    opens = SlideSource(path, tifffile=False)
    decode_openslide = timed(lambda: opens.read_level(0, (0, 0), source.shape).shape, repeat)
    memory = timed(lambda: patch_adaptive(image, cfg).real_tokens, repeat)
    pyramid = timed(lambda: patch_pyramid(open_image(path), cfg), repeat)
    seq = pyramid[2]
    reference = timed(lambda: sc24_reference(image, p, tokens), max(1, repeat // 2))
    try:
        import cv2

        edge_map = f"Canny (OpenCV {cv2.__version__}: grey, 5 x 5 Gaussian blur, thresholds 100/200)"
    except ImportError:
        edge_map = "Sobel (OpenCV absent: a stand-in for Canny)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    exe = Path(sys.executable).with_name("hrvit")
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(exe), "patchify", str(path), "--tokens", str(tokens), "--patch-size", str(p),
                   "--json", f"{tmp}/stats.json"]
        cli = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True), repeat)
        stages = json.loads(Path(f"{tmp}/stats.json").read_text())["seconds"]
        drawn = timed(lambda: subprocess.run(command + ["--out", f"{tmp}/overlay.png"], env=env, check=True,
                                             capture_output=True), repeat)
        drawn_stages = json.loads(Path(f"{tmp}/stats.json").read_text())["seconds"]
    # python and the modules `hrvit patchify` imports, ended the way the CLI ends (os._exit: no interpreter teardown),
    # so that "without start-up" takes off no more than the CLI pays
    startup = timed(lambda: subprocess.run([sys.executable, "-c", "import os, hrvit.cli, hrvit.config, hrvit.data, "
                                            "hrvit.patching.overlay, torch, openslide; os._exit(0)"], env=env,
                                           check=True), repeat)
    print("$ OMP_NUM_THREADS=1 " + " ".join(command[:7]) + " --json stats.json [--out overlay.png]", flush=True)

    def both(f, digits=2):  # one figure as "wall (CPU)"
        return f"{f(0):.{digits}f} ({f(1):.{digits}f})"

    base = [decode[i] + memory[i] for i in (0, 1)]
    cli_own = [cli[i] - startup[i] for i in (0, 1)]
    drawn_own = [drawn[i] - startup[i] for i in (0, 1)]
    ref = [decode[i] + reference[i] for i in (0, 1)]
    return [
        (f"8192^2 single-level JPEG TIFF -> L={tokens} (p={p}; {seq.real_tokens} real): decode alone, float32 "
         f"(read_level; open_image: {type(source).__name__} through {reader})", both(lambda i: decode[i]) + " s",
         "-", f"openslide's own decode of the same file: {both(lambda i: decode_openslide[i])} s"),
        ("decode to the stored bytes alone (read_stored: uint8, what patch_pyramid reads a single-level file with)",
         both(lambda i: stored[i]) + " s", "-", ""),
        ("in-memory patching alone (patch_adaptive on the float32 image)", both(lambda i: memory[i]) + " s", "-", ""),
        ("patch_pyramid on the file", f"{both(lambda i: pyramid[i])} s = {both(lambda i: pyramid[i] / base[i])} x "
         "(decode + in-memory)", "<= 1.5 x",
         "stages (wall): " + ", ".join(f"{k} {v:.2f}" for k, v in seq.meta["seconds"].items())),
        ("`hrvit patchify` on the file (subprocess; statistics only, no --out: the tree, as the reference makes)",
         f"{both(lambda i: cli[i])} s = {both(lambda i: cli[i] / base[i])} x (decode + in-memory); "
         f"{both(lambda i: cli_own[i])} s without start-up = {both(lambda i: cli_own[i] / base[i])} x", "<= 1.5 x",
         f"start-up (python + imports, measured alone) {both(lambda i: startup[i])} s; its stages (wall): "
         + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())),
        ("`hrvit patchify --out overlay.png` on the file (the same, plus the 2048^2 overlay PNG)",
         f"{both(lambda i: drawn[i])} s; {both(lambda i: drawn_own[i])} s without start-up = "
         f"{both(lambda i: drawn_own[i] / base[i])} x (decode + in-memory)", "-",
         "overlay drawn on the overview patch_pyramid made (no second decode); stages (wall): "
         + ", ".join(f"{k} {v:.2f}" for k, v in drawn_stages.items())),
        (f"SC24-style reference on the file (read_level decode + {edge_map} + best-first by edge count + area "
         f"resample; {len(reference[2])} leaves)", f"{both(lambda i: ref[i])} s ({both(lambda i: reference[i])} s "
         f"after the decode) = {both(lambda i: ref[i] / pyramid[i], 1)} x patch_pyramid, "
         f"{both(lambda i: ref[i] / cli_own[i], 1)} x the CLI without start-up, {both(lambda i: ref[i] / cli[i], 1)} x "
         f"the CLI with it; {both(lambda i: ref[i] / drawn_own[i], 1)} x the CLI with --out, without start-up",
         ">= 3 x",
         f"without the decode: {both(lambda i: reference[i] / memory[i], 1)} x the in-memory patching (both from "
         f"the float32 image), {both(lambda i: reference[i] / max(pyramid[i] - stored[i], 1e-9), 1)} x "
         "patch_pyramid less its decode to bytes"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=REPO / "data" / "bench")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-64k", action="store_true", help="leave out the 65536^2 slide (minutes to generate)")
    ap.add_argument("--file-only", action="store_true", help="only the single-level TIFF against memory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=4096, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.repeat)
    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = file_vs_memory(args.cache, args.repeat)
    if args.file_only:
        cases = []
    else:
        rows += in_memory(args.cache, args.repeat)
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

    print(f"\nadaptive patching, one CPU core (torch threads 1), best of {args.repeat} (pyramid-native: as marked); "
          "the file rows: wall s (CPU s)\n")
    print("| what | measured | target | notes |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
