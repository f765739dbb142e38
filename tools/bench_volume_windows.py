"""Training-window reads from BraTS-size gzip NIfTI cases, without and with the decoded-volume cache.

Writes `--cases` BraTS-2021-layout cases (4 channels t1/t1ce/t2/flair, 240 x 240 x 155 int16, a non-identity
affine with 1 mm voxels, a seg label with BraTS values {0, 1, 2, 4}) to a temporary folder, then draws random
`--window`^3 training windows exactly as `hrvit train` does (TrainWindows: a seeded random case, a window
centred on tumour half the time, uniform tokens, random flips), first with data.cache_gb=0 (every window
decompresses the case's five files from their start: .nii.gz cannot seek), then with the cache on, in the same
run, and prints per second, side by side with their ratio: window reads (the window's image and label, as
read_window reads them) and whole training samples (read, tokens and flips). torch runs one thread, as in a
data-loader worker (data.workers > 0); in the training process itself (data.workers=0) torch's thread pool
competes with the reads on a small machine (measured 2x slower reads, 3x slower samples on 2 cores).

    python tools/bench_volume_windows.py                    # 4 cases, 8 windows uncached, 400 cached
    python tools/bench_volume_windows.py --cases 8 --after 1000 --json bench.json

Samples with the cache are given twice: over all windows (each case decoded once on its first window, which
costs what an uncached window does) and in steady state (after every case has been decoded once), which is what
a long run sees when the training cases fit data.cache_gb. A run whose cases do not fit decodes a case again whenever it
was evicted: with N training cases and room for M, about 1 - M/N of the windows (random cases) miss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hrvit.config import PatchingConfig  # noqa: E402
from hrvit.data.datasets import discover  # noqa: E402
from hrvit.data.sources import VOLUME_CACHE  # noqa: E402
from hrvit.data.windows import TrainWindows  # noqa: E402

SHAPE = (240, 240, 155)  # nibabel (i, j, k), as BraTS 2021 stores it
AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def write_cases(root: Path, n: int, seed: int = 0) -> None:
    """BraTS-layout cases with a head-like ellipsoid of smooth tissue plus noise (so gzip compresses about as
    much as on real scans) and a tumour of three nested labels."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in SHAPE], indexing="ij")
    head = (i / 0.75) ** 2 + (j / 0.9) ** 2 + (k / 0.85) ** 2 < 1
    for c in range(n):
        case = root / f"BraTS2021_{c:05d}"
        case.mkdir(parents=True)
        centre = rng.uniform(-0.3, 0.3, 3)
        r = np.sqrt((i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2)
        seg = np.where(r < 0.08, 4, np.where(r < 0.14, 1, np.where(r < 0.25, 2, 0))).astype(np.uint8) * head
        for m, name in enumerate(("t1", "t1ce", "t2", "flair")):
            tissue = 600 + 200 * np.sin(3 * i + m) * np.cos(2 * j) + 150 * k + 300 * (seg > 0) * (m + 1) / 4
            noise = rng.normal(0, 25, SHAPE).astype(np.float32)
            volume = np.where(head, tissue + noise, 0).clip(0, 32767).astype(np.int16)
            nib.save(nib.Nifti1Image(volume, AFFINE), case / f"{case.name}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(seg, AFFINE), case / f"{case.name}_seg.nii.gz")


def measure(specs, window: int, cache_gb: float, first: int, count: int) -> dict:
    """Training samples `first`..`first + count` with data.cache_gb=`cache_gb`: samples per second (the whole
    TrainWindows sample: read, tokens, flips) over all of them and over those whose case had been read before
    (steady; None when no case was drawn twice), and window reads per second of wall-clock and of this process's
    CPU time (the same window's image and label read again from the case, as read_window reads them)."""
    VOLUME_CACHE.clear()
    dataset = TrainWindows(specs, window=window, patching=PatchingConfig(mode="uniform", patch_size=16), seed=0,
                           foreground_bias=0.5, augment=True, cache_gb=cache_gb)
    seen, samples, reads = set(), [], []
    for k in range(first, first + count):
        tick = time.perf_counter()
        seq = dataset[k]
        samples.append((time.perf_counter() - tick, seq.meta["case"] in seen))
        seen.add(seq.meta["case"])
        assert seq.pixels.shape[1] == 4 and seq.target is not None
        case = dataset._case(next(i for i, s in enumerate(specs) if s.id == seq.meta["case"]))
        tick, cpu = time.perf_counter(), time.process_time()
        case.image.read(seq.meta["origin"], seq.image_shape)
        case.label.read(seq.meta["origin"], seq.image_shape)
        reads.append((time.perf_counter() - tick, time.process_time() - cpu))
    warm = [t for t, again in samples if again]
    return {"samples_per_s": len(samples) / sum(t for t, _ in samples),
            "steady_samples_per_s": len(warm) / sum(warm) if warm else None,
            "reads_per_s": len(reads) / sum(t for t, _ in reads),
            "median_reads_per_s": 1 / float(np.median([t for t, _ in reads])),
            "reads_per_cpu_s": len(reads) / max(sum(c for _, c in reads), 1e-9),
            "median_reads_per_cpu_s": 1 / max(float(np.median([c for _, c in reads])), 1e-9)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--before", type=int, default=8, help="windows read without the cache")
    ap.add_argument("--after", type=int, default=400, help="windows read with the cache")
    ap.add_argument("--cache-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1, as in a data-loader worker: torch gives each worker one thread)")
    ap.add_argument("--dir", type=Path, default=None, help="write the cases here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "brats"
        tick = time.perf_counter()
        write_cases(root, args.cases)
        print(f"wrote {args.cases} BraTS-size cases (4 x {SHAPE} int16 + seg, gzip) in "
              f"{time.perf_counter() - tick:.1f} s", flush=True)
        specs = discover("brats", root=root, val_fraction=0.0)
        before = measure(specs, args.window, 0, 0, args.before)
        after = measure(specs, args.window, args.cache_gb, args.before, args.after)
    result = {"cases": args.cases, "window": args.window, "threads": args.threads, "windows_before": args.before,
              "windows_after": args.after, "cache_gb": args.cache_gb,
              "before": {k: round(v, 3) for k, v in before.items() if v is not None},
              "after": {k: round(v, 2) for k, v in after.items() if v is not None},
              "read_ratio": round(after["reads_per_s"] / before["reads_per_s"], 1),
              "read_cpu_ratio": round(after["reads_per_cpu_s"] / before["reads_per_cpu_s"], 1),
              "median_read_ratio": round(after["median_reads_per_s"] / before["median_reads_per_s"], 1),
              "median_read_cpu_ratio": round(after["median_reads_per_cpu_s"] / before["median_reads_per_cpu_s"], 1),
              "sample_ratio": round(after["samples_per_s"] / before["samples_per_s"], 1)}
    if after["steady_samples_per_s"]:
        result["steady_sample_ratio"] = round(after["steady_samples_per_s"] / before["samples_per_s"], 1)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{args.window}^3 training windows of {args.cases} BraTS-size 4-channel gzip cases, per second "
          f"(torch threads {args.threads}; load average {result['load_average'][0]} on {os.cpu_count()} cores):")
    print(f"  {'':30s} {'cache off':>10s} {'cache on':>10s} {'ratio':>7s}")
    print(f"  {'window reads (image + label)':30s} {before['reads_per_s']:10.2f} {after['reads_per_s']:10.1f} "
          f"{result['read_ratio']:6.0f}x")
    print(f"  {'  1 / median read time':30s} {before['median_reads_per_s']:10.2f} "
          f"{after['median_reads_per_s']:10.1f} {result['median_read_ratio']:6.0f}x   (robust to other processes' "
          "bursts)")
    print(f"  {'  per CPU-second of this process':30s} {before['reads_per_cpu_s']:10.2f} "
          f"{after['reads_per_cpu_s']:10.1f} {result['read_cpu_ratio']:6.0f}x   (less sensitive to a shared "
          "machine's load)")
    print(f"  {'  1 / median CPU time of a read':30s} {before['median_reads_per_cpu_s']:10.2f} "
          f"{after['median_reads_per_cpu_s']:10.1f} {result['median_read_cpu_ratio']:6.0f}x")
    print(f"  {'training samples, all':30s} {before['samples_per_s']:10.2f} {after['samples_per_s']:10.1f} "
          f"{result['sample_ratio']:6.0f}x   (each case's first decode included)")
    if after["steady_samples_per_s"]:
        print(f"  {'training samples, steady':30s} {before['samples_per_s']:10.2f} "
              f"{after['steady_samples_per_s']:10.1f} {result['steady_sample_ratio']:6.0f}x   (tokens and flips "
              "included: the rest of a sample's cost)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
