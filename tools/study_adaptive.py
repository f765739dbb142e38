"""Uniform vs adaptive patching, side by side, for the same wall-clock budget (the SC24 comparison).

    python tools/study_adaptive.py [--sizes 1024 2048] [--budget 150] [--tokens 1024] [--out runs/study_adaptive]

For each slide size it writes 8 synthetic slides (6 train, 2 held out; real pyramidal TIFFs) and
trains the quick-start model (nano ViT + UNETR decoder, p = 16, one sample per step, AdamW with
warm-up and cosine decay over the budget) on whole slides (data.window = null) twice: uniform
patching ((size / 16)^2 tokens) and adaptive patching (L tokens). Each run trains until its
wall-clock budget is spent, then predicts the held-out slides at full resolution. The table gives
tokens per image, the median step time (waiting for the batch, forward, backward, update; one
loader worker prepares the next slide meanwhile) and the training process's CPU time per step (less
sensitive to a shared machine), the per-step speed-ups, the steps done and the full-resolution mean
Dice over the foreground classes.

It uses hrvit's own pieces (TrainWindows, collate, the model, the loss, case_dice_counts: evaluation's own Dice) in one
process (one torch thread by default, plus one loader worker), not DeepSpeed, so that it measures
patching, not launching.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hrvit.config import load_config  # noqa: E402
from hrvit.data.datasets import open_case  # noqa: E402
from hrvit.data.synthetic import make_slides  # noqa: E402
from hrvit.data.windows import TrainWindows  # noqa: E402
from hrvit.engine.infer import case_dice_counts  # noqa: E402
from hrvit.engine.losses import segmentation_loss  # noqa: E402
from hrvit.engine.metrics import summarize  # noqa: E402
from hrvit.engine.session import class_names, find_cases, task_for  # noqa: E402
from hrvit.patching import collate  # noqa: E402


def study_config(manifest: Path, mode: str, tokens: int, seed: int, overrides: list[str] = ()):
    """The quick-start recipe's model on `manifest`, whole slides, one sample per step at peak lr 2e-3 (the figures in
    docs/performance.md were measured so; tools/study_baselines.py overrides the window and the classes)."""
    return load_config(REPO / "launch/recipes/quickstart.yaml",
                       [f"data.manifest={manifest}", "data.class_names=[background,tumour,gland]", "data.window=null",
                        f"patching.mode={mode}", f"patching.tokens={tokens}", "train.micro_batch=1", "train.lr=2e-3",
                        f"train.seed={seed}", *overrides])


def set_lr(opt: torch.optim.Optimizer, cfg, frac: float, lr: float | None = None) -> None:
    """Schedule by the fraction of the budget spent: 5 % linear warm-up, then cosine to train.min_lr_ratio."""
    low = cfg.train.min_lr_ratio
    scale = frac / 0.05 if frac < 0.05 else low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95))
    for group in opt.param_groups:
        group["lr"] = (lr or cfg.train.lr) * max(scale, 0.02)


def train_step(model, opt: torch.optim.Optimizer, cfg, batch: dict) -> int:
    """One update of hrvit's model on a collated batch (loss on the valid tokens); returns the real tokens."""
    logits = model(batch["pixels"], batch["boxes"], batch["valid"], batch["scale"])
    valid = batch["valid"]
    loss = segmentation_loss(logits[valid], batch["target"][valid], cfg.train.dice_weight, cfg.train.ce_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    return int(valid.sum())


def held_out_dice(model, cfg, specs, overlap: float = 0.0) -> dict:
    """Full-resolution Dice of the held-out (val) cases with evaluation's own code (summarize's dict)."""
    model.eval()
    per_case = {}
    for spec in [s for s in specs if s.split == "val"]:
        case = open_case(spec, num_classes=cfg.data.num_classes)
        per_case[spec.id], _ = case_dice_counts(model, case, window=cfg.data.window, patching=cfg.patching,
                                                batch=cfg.eval.batch if overlap else 1,
                                                num_classes=cfg.data.num_classes, overlap=overlap,
                                                blend=cfg.eval.blend)
    model.train()
    return summarize(per_case, class_names(cfg))


def run(manifest: Path, mode: str, tokens: int, budget: float, seed: int) -> dict:
    cfg = study_config(manifest, mode, tokens, seed)
    specs = find_cases(cfg)
    train = [s for s in specs if s.split == "train"]
    torch.manual_seed(seed)
    model = task_for(cfg).build_model(2, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    data = TrainWindows(train, window=None, patching=cfg.patching, seed=seed,
                        foreground_bias=cfg.data.foreground_bias, augment=True)
    # one loader worker reads and patches the next slide while the model trains, as data.workers=1 does
    batches = iter(torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate, num_workers=1,
                                               sampler=range(10**9)))
    step_times, cpu_times, real = [], [], []
    start = time.perf_counter()
    step = 0
    while (elapsed := time.perf_counter() - start) < budget:
        tick, cpu = time.perf_counter(), time.process_time()
        set_lr(opt, cfg, elapsed / budget)
        batch = next(batches)
        real.append(train_step(model, opt, cfg, batch))
        step_times.append(time.perf_counter() - tick)
        cpu_times.append(time.process_time() - cpu)
        step += 1
    tick = time.perf_counter()
    result = held_out_dice(model, cfg, specs)
    return {"mode": mode, "tokens": len(batch["valid"][0]), "real_tokens": statistics.mean(real), "steps": step,
            "step_s": statistics.median(step_times[1:] or step_times),
            "cpu_s": statistics.median(cpu_times[1:] or cpu_times), "dice": result["dice_mean"],
            "dice_per_class": result["dice_per_class"], "eval_s": time.perf_counter() - tick}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--budget", type=float, default=150.0, help="training seconds per run (default 150)")
    ap.add_argument("--tokens", type=int, default=1024, help="adaptive token budget L (default 1024)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study_adaptive")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steady timings on a shared machine; the loader worker "
                         "takes another core)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        folder = args.out / f"slides{size}"
        manifest = folder / "manifest.csv"
        if not manifest.exists():
            make_slides(folder, n=8, size=size, seed=args.seed, val_fraction=0.25)
        pair = {}
        for mode in ("uniform", "adaptive"):
            r = run(manifest, mode, args.tokens, args.budget, args.seed)
            pair[mode] = r
            print(json.dumps({"size": size, **r}), flush=True)
        pair["adaptive"]["speedup"] = pair["uniform"]["step_s"] / pair["adaptive"]["step_s"]
        pair["adaptive"]["cpu_speedup"] = pair["uniform"]["cpu_s"] / pair["adaptive"]["cpu_s"]
        rows.append((size, pair))
    (args.out / "results.json").write_text(json.dumps([{"size": s, **p} for s, p in rows], indent=2))
    print(f"\nuniform vs adaptive patching, p = 16, whole slides, {args.budget:.0f} s of training each, "
          f"{torch.get_num_threads()} threads\n")
    print("| slide | patching | tokens / image | step time (CPU time) | speed-up per step (by CPU time) "
          "| steps in budget | Dice (full res.) |")
    print("|---|---|---|---|---|---|---|")
    for size, pair in rows:
        for mode in ("uniform", "adaptive"):
            r = pair[mode]
            tokens = f"{r['tokens']}" if mode == "uniform" else f"{r['tokens']} ({r['real_tokens']:.0f} real)"
            speed = "1" if mode == "uniform" else f"{r['speedup']:.1f}x ({r['cpu_speedup']:.1f}x)"
            dice = "n/a" if r["dice"] is None else f"{r['dice']:.3f}"
            print(f"| {size}² | {mode} | {tokens} | {r['step_s']:.2f} s ({r['cpu_s']:.2f} s) | {speed} "
                  f"| {r['steps']} | {dice} |")


if __name__ == "__main__":
    main()
