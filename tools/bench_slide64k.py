"""A 64K^2 slide end to end: training, evaluation and prediction in bounded memory (a benchmark, not a test).

    python tools/bench_slide64k.py [--size 65536] [--cache data/bench64k] [--out runs/bench64k] [--steps 3]
                                   [--tokens 4096] [--threads 1]

Writes one synthetic slide of size^2 pixels and its label mask as tiled pyramidal TIFFs (hrvit.data.synthetic,
tile by tile; kept in --cache, so a second run skips it), then runs `hrvit train` (a few steps on the whole slide:
data.window=null, adaptive patching, one rank, nano preset), `hrvit eval` and `hrvit predict` as child processes.
Every stage, generation included, runs in its own process tree: its wall time and peak memory are printed, peak
memory both as the largest VmHWM of any one process of the tree (exact: the kernel's high-water mark) and as the
largest sum of the tree's resident memory seen by polling every 0.2 s (DataLoader workers included). Target: at
most 3 GB at every stage. Finally the prediction is opened with OpenSlide: dimensions and mpp must be the slide's.

The slide is both the training and the evaluation case (one slide; data.allow_split_overlap=true): this measures
memory and time, not generalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TARGET_GB = 3.0


def generate(cache: Path, size: int) -> tuple[Path, Path]:
    """The slide and its mask, written tile by tile (the .part names make an interrupted run start over)."""
    from hrvit.data.synthetic import SyntheticSlide
    from hrvit.data.tiff import write_pyramid

    slide = SyntheticSlide(size, seed=7)
    paths = []
    for name, fn, channels in [("slide", slide.image, 3), ("slide_mask", slide.label, 1)]:
        path = cache / f"{name}.tiff"
        if not path.exists():
            part = cache / f"{name}.part.tiff"
            write_pyramid(part, slide.shape, fn, channels=channels, tile=256, mpp=0.5)
            part.rename(path)
        paths.append(path)
    return paths[0], paths[1]


class Stage:
    """Run one command as a child process tree and record wall time and peak memory."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path):
        self.name, self.cmd, self.env, self.log = name, cmd, env, log
        self.hwm = 0  # bytes: largest VmHWM of any process of the tree
        self.tree = 0  # bytes: largest polled sum of the tree's RSS

    def _poll(self, proc: psutil.Process, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.hwm = max(self.hwm, int(line.split()[1]) * 1024)
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    pass
            self.tree = max(self.tree, total)
            stop.wait(0.2)

    def run(self) -> dict:
        tick = time.perf_counter()
        with open(self.log, "w") as out:
            child = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            stop = threading.Event()
            watcher = threading.Thread(target=self._poll, args=(psutil.Process(child.pid), stop), daemon=True)
            watcher.start()
            code = child.wait()
            stop.set()
            watcher.join()
        row = {"stage": self.name, "seconds": round(time.perf_counter() - tick, 1), "exit": code,
               "peak_process_gb": round(self.hwm / 2**30, 3), "peak_tree_gb": round(self.tree / 2**30, 3),
               "log": str(self.log)}
        print(json.dumps(row), flush=True)
        if code != 0:
            print(Path(self.log).read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"{self.name} failed with status {code}; see {self.log}")
        return row


def check_prediction(pred: Path, slide: Path) -> dict:
    """The prediction as OpenSlide (and so QuPath) sees it, against the slide."""
    import openslide

    a, b = openslide.OpenSlide(slide), openslide.OpenSlide(pred)
    found = {"dimensions": b.dimensions, "levels": b.level_count,
             "mpp": (b.properties.get("openslide.mpp-x"), b.properties.get("openslide.mpp-y")),
             "slide_dimensions": a.dimensions,
             "slide_mpp": (a.properties.get("openslide.mpp-x"), a.properties.get("openslide.mpp-y"))}
    ok = found["dimensions"] == found["slide_dimensions"] and all(
        x is not None and y is not None and abs(float(x) - float(y)) < 1e-6 for x, y in zip(found["mpp"],
                                                                                          found["slide_mpp"]))
    found["ok"] = ok
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--cache", type=Path, default=None, help="where the slide is kept (default data/bench<size>)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default runs/bench<size>)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--child-generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cache = (args.cache or REPO / "data" / f"bench{args.size}").resolve()
    out = (args.out or REPO / "runs" / f"bench{args.size}").resolve()
    if args.child_generate:
        generate(cache, args.size)
        return
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(args.threads), "HRVIT_CACHE_DIR": str(cache / "hrvit-cache")}
    env = {k: v for k, v in env.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    py = sys.executable
    rows = [Stage("generate", [py, __file__, "--child-generate", "--size", str(args.size), "--cache", str(cache)],
                  env, out / "generate.log").run()]
    if args.generate_only:
        return
    manifest = cache / "manifest.csv"
    manifest.write_text("id,image,label,split\ntrain,slide.tiff,slide_mask.tiff,train\nval,slide.tiff,slide_mask.tiff,val\n")
    run = out / "run"
    overrides = [f"data.manifest={manifest}", "data.window=null", "data.allow_split_overlap=true",
                 "data.workers=1", "patching.mode=adaptive", "patching.patch_size=16", f"patching.tokens={args.tokens}",
                 "model.preset=nano", "parallel.sp_size=1", "train.micro_batch=1", f"train.steps={args.steps}",
                 "train.warmup_steps=1", "train.log_every=1", f"train.ckpt_every={args.steps}", "eval.batch=1",
                 "eval.max_cases=0", f"output.dir={run}"]  # evaluation is its own stage below
    hrvit = [py, "-m", "hrvit"]
    rows.append(Stage("train", [*hrvit, "train", "launch/recipes/quickstart.yaml", *overrides], env,
                      out / "train.log").run())
    rows.append(Stage("eval", [*hrvit, "eval", str(run), "eval.max_cases=1"], env, out / "eval.log").run())
    pred_dir = out / "pred"
    rows.append(Stage("predict", [*hrvit, "predict", str(run), "--input", str(cache / "slide.tiff"), "--out",
                                  str(pred_dir)], env, out / "predict.log").run())
    check = check_prediction(pred_dir / "slide_pred.tiff", cache / "slide.tiff")
    evaluation = json.loads((run / "eval_val.json").read_text())
    print(f"\nslide {args.size}^2, {args.tokens} adaptive tokens, nano preset, {args.steps} steps, 1 rank, "
          f"{args.threads} torch thread(s)")
    print("| stage | wall s | peak one process (GB) | peak process tree (GB) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['peak_process_gb']} | {r['peak_tree_gb']} |")
    print(f"eval: mean Dice {evaluation.get('dice_mean')}, per class {evaluation.get('dice_per_class')}")
    print(f"prediction in OpenSlide: {check}")
    worst = max(max(r["peak_process_gb"], r["peak_tree_gb"]) for r in rows)
    print(f"largest peak {worst:.2f} GB: {'within' if worst <= TARGET_GB else 'ABOVE'} the {TARGET_GB} GB target")
    (out / "bench.json").write_text(json.dumps({"rows": rows, "openslide": check, "eval": evaluation}, indent=1))
    if not check["ok"] or worst > TARGET_GB:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
