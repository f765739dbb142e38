"""Adaptive whole-slide training against what users do today (uniform 256^2 windows, MONAI UNETR), at equal compute.

    python tools/study_baselines.py [--families easy context] [--sizes 1024 2048] [--budget 90] [--eval-every 30]
                                    [--methods adaptive windows unetr] [--jobs 2] [--out runs/study_baselines]

For each synthetic slide family and slide size it writes 8 slides (6 train, 2 held out; real pyramidal TIFFs, kept
in --out and reused) and trains three models, each in its own process (--jobs at a time) for the same budget of
*process CPU time*: one torch thread, the data read and patched in the training process, so the budget pays for
reading and patching too. On a shared machine wall-clock is unfair, so it is printed beside it.

  adaptive  hrvit, quick-start model (nano ViT + UNETR-style decoder, p = 16), whole slides (data.window null),
            adaptive patching with --tokens tokens at 1024^2, scaled with the slide's area (1024 at 2048^2; or with
            its edge: --token-scaling edge), one slide per step; predicted whole (one window), as `hrvit eval` does.
  windows   the same hrvit model, uniform patching of random 256^2 windows (256 tokens each, --window-batch per
            step, the same foreground bias and flips), predicted with overlapping windows (eval.overlap 0.5,
            Gaussian blending: hrvit.engine.infer.blend_bands).
  unetr     MONAI's UNETR (2-D: img_size 256, patch 16 and 12 transformer layers (both fixed by UNETR), hidden_size
            128, mlp_dim 512, 4 heads, feature_size 16, instance norm: 3.5 M parameters against nano's 1.2 M) trained
            on exactly the windows of `windows` (the same TrainWindows samples, depatched back to pixels) with
            monai.losses.DiceCELoss, predicted with monai.inferers.sliding_window_inference (overlap 0.5, Gaussian,
            sigma = window / 8 as hrvit's).

Every run uses AdamW with a 5 % warm-up and cosine decay over its budget (study_adaptive.set_lr; peak 2e-3 for
all three) and is scored with the same full-resolution Dice: hrvit.engine.metrics.dice_counts
against the level-0 labels, summed per case, then metrics.summarize (Dice per class; mean over the foreground
classes). Every --eval-every CPU seconds of budget the held-out slides are predicted again at full resolution
(not charged to the budget): adaptive as at the end, the windowed runs with --check-overlap (default 0, a quarter of
the windows of overlap 0.5; the end scores both, so the table shows how much the cheaper check under-reads). "Time to
mean Dice 0.8" is the budget spent at the first check that reached it (its resolution is --eval-every). Peak memory
is the run process's resident-set high-water mark (VmHWM: the interpreter, torch and, for unetr, monai included);
the JSON also has the RSS just before training.

MONAI is needed for the unetr runs only: pip install -e .[study]. Nothing is downloaded at run time.
Results: --out/results.json (with each run's curve of checks) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# tools/profile.py would shadow the standard library's profile module, which torch imports (cProfile)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

METHODS = ("adaptive", "windows", "unetr")
WINDOW = 256
OVERLAP = 0.5
TARGET = 0.8
MISSING_MONAI = ("tools/study_baselines.py: the unetr baseline needs MONAI, an optional extra for this study: "
                 "pip install -e .[study]   (or leave it out: --methods adaptive windows)")


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS) in MiB; None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MiB: VmHWM (of this program image only, unlike ru_maxrss,
    which a child inherits from the process that forked it), ru_maxrss where /proc is missing."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else float("nan")


def family_classes(family: str) -> list[str] | None:
    """Class names of a synthetic slide family (hrvit.data.synthetic.FAMILY_CLASSES), None for the quick start's."""
    from hrvit.data import synthetic

    table = getattr(synthetic, "FAMILY_CLASSES", None)
    if table is None:
        if family != "easy":
            raise SystemExit(f"tools/study_baselines.py: slide family {family!r} needs hrvit.data.synthetic with "
                             "families (FAMILY_CLASSES); this checkout has only the easy slides")
        return None
    if family not in table:
        raise SystemExit(f"tools/study_baselines.py: --families: unknown family {family!r} (known: {sorted(table)})")
    return list(table[family])


def write_slides(folder: Path, family: str, size: int, seed: int) -> Path:
    """8 slides of `family` (6 train, 2 held out) in `folder`, written once and reused."""
    from hrvit.data.synthetic import make_slides

    manifest = folder / "manifest.csv"
    if not manifest.exists():
        make_slides(folder, n=8, size=size, seed=seed, val_fraction=0.25, family=family)
    return manifest


# --- one run (in its own process) -----------------------------------------------------------------------------------


def run_one(job: dict) -> dict:
    """Train one method for job['budget'] CPU seconds, evaluating every job['eval_every'] budget seconds."""
    import torch

    torch.set_num_threads(job["threads"])
    from study_adaptive import held_out_dice, set_lr, study_config, train_step

    from hrvit.data.windows import TrainWindows
    from hrvit.engine.session import find_cases, task_for
    from hrvit.patching import collate

    method, size, seed = job["method"], job["size"], job["seed"]
    names = job["classes"]
    overrides = [] if names is None else [f"data.num_classes={len(names)}", f"data.class_names=[{','.join(names)}]"]
    if method == "adaptive":
        growth = (size / 1024) ** (2 if job["token_scaling"] == "area" else 1)
        tokens = max(16, round(job["tokens"] * growth))
        cfg = study_config(job["manifest"], "adaptive", tokens, seed, overrides)
        per_step = 1
    else:
        tokens = (WINDOW // 16) ** 2
        cfg = study_config(job["manifest"], "uniform", tokens, seed,
                           [*overrides, f"data.window={WINDOW}", f"eval.overlap={OVERLAP}", "eval.blend=gaussian"])
        per_step = job["window_batch"]
    specs = find_cases(cfg)
    data = TrainWindows([s for s in specs if s.split == "train"], window=cfg.data.window, patching=cfg.patching,
                        seed=seed, foreground_bias=cfg.data.foreground_bias, augment=True)
    torch.manual_seed(seed)
    lr = cfg.train.lr
    if method == "unetr":
        model, unetr_step, evaluate, lr = unetr_parts(cfg, specs, job)
    else:
        model = task_for(cfg).build_model(2, 3)

        def evaluate(overlap: float):
            return held_out_dice(model, cfg, specs, overlap=overlap if method == "windows" else 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)

    def step_fn(batch):
        if method == "unetr":
            unetr_step(opt, batch)
        else:
            train_step(model, opt, cfg, batch)
    parameters = sum(p.numel() for p in model.parameters())
    rss_before = rss_mb()
    budget, every, check = job["budget"], job["eval_every"], job["check_overlap"]
    windowed = method != "adaptive"
    spent = wall = 0.0
    cpu_steps, wall_steps, curve = [], [], []
    next_eval = every if every else float("inf")
    step = 0
    model.train()
    while spent < budget:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        set_lr(opt, cfg, spent / budget, lr)
        batch = collate([data[step * per_step + j] for j in range(per_step)])
        step_fn(batch)
        cpu_steps.append(time.process_time() - cpu0)
        wall_steps.append(time.perf_counter() - wall0)
        spent += cpu_steps[-1]
        wall += wall_steps[-1]
        step += 1
        if spent >= next_eval and spent < budget:
            curve.append(score(evaluate, check if windowed else 0.0, spent, wall, step))
            print(f"  {job['family']} {size} {method}: {spent:.0f} s CPU, step {step}, "
                  f"mean Dice {curve[-1]['dice_mean']}", flush=True)
            next_eval += every
    if every and windowed and check != OVERLAP:  # the checks' predictor at the end too: how far it is from the final
        curve.append(score(evaluate, check, spent, wall, step))
    final = score(evaluate, OVERLAP if windowed else 0.0, spent, wall, step)
    curve.append(final)
    reached = next((c for c in curve if c["dice_mean"] is not None and c["dice_mean"] >= TARGET), None)
    check_final = curve[-2]["dice_mean"] if len(curve) > 1 and curve[-2]["step"] == step else None
    return {
        "family": job["family"], "size": size, "method": method, "parameters": parameters,
        "tokens_per_sample": tokens, "samples_per_step": per_step, "lr": lr, "steps": step,
        "budget_cpu_s": budget, "train_cpu_s": spent, "train_wall_s": wall,
        "step_cpu_s": statistics.median(cpu_steps[1:] or cpu_steps),
        "step_wall_s": statistics.median(wall_steps[1:] or wall_steps),
        "dice_mean": final["dice_mean"], "dice_per_class": final["dice_per_class"],
        "dice_mean_check_predictor": check_final,
        "eval_cpu_s": final["eval_cpu_s"], "eval_wall_s": final["eval_wall_s"],
        "time_to_target_cpu_s": None if reached is None else reached["cpu_s"],
        "time_to_target_wall_s": None if reached is None else reached["wall_s"],
        "curve": curve, "rss_before_train_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def score(evaluate, overlap: float, spent: float, wall: float, step: int) -> dict:
    """Held-out Dice now (evaluate(overlap)), with the budget spent so far and what the evaluation cost."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = evaluate(overlap)
    return {"cpu_s": round(spent, 2), "wall_s": round(wall, 2), "step": step, "overlap": overlap,
            "dice_mean": result["dice_mean"],
            "dice_per_class": result["dice_per_class"], "eval_cpu_s": round(time.process_time() - cpu0, 2),
            "eval_wall_s": round(time.perf_counter() - wall0, 2)}


def unetr_parts(cfg, specs, job):
    """MONAI UNETR, its training step on hrvit's window batches (depatched to pixels) and its sliding-window
    evaluation, scored with hrvit's dice_counts."""
    import numpy as np
    import torch

    try:
        from monai.inferers import sliding_window_inference
        from monai.losses import DiceCELoss
        from monai.networks.nets import UNETR
    except ImportError:
        raise SystemExit(MISSING_MONAI) from None
    from hrvit.data.datasets import open_case
    from hrvit.engine.infer import chunks
    from hrvit.engine.metrics import dice_counts, summarize
    from hrvit.engine.session import class_names
    from hrvit.patching import depatch

    k = cfg.data.num_classes
    model = UNETR(in_channels=3, out_channels=k, img_size=(WINDOW, WINDOW), feature_size=16, hidden_size=128,
                  mlp_dim=512, num_heads=4, proj_type="conv", norm_name="instance", spatial_dims=2)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=cfg.train.dice_weight,
                         lambda_ce=cfg.train.ce_weight)

    def to_pixels(batch):
        shape = (WINDOW, WINDOW)
        images, targets = [], []
        for j in range(len(batch["pixels"])):
            boxes, valid = batch["boxes"][j], batch["valid"][j]
            images.append(depatch(batch["pixels"][j], boxes, valid, shape))
            targets.append(depatch(batch["target"][j][:, None], boxes, valid, shape))
        return torch.stack(images), torch.stack(targets).long()

    def step(opt, batch):
        images, targets = to_pixels(batch)
        loss = loss_fn(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()

    @torch.no_grad()
    def evaluate(overlap: float):
        model.eval()
        per_case = {}
        for spec in [s for s in specs if s.split == "val"]:
            case = open_case(spec, num_classes=k)
            shape = tuple(case.image.shape)
            image = torch.from_numpy(case.image.read((0, 0), shape))[None]
            logits = sliding_window_inference(image, roi_size=(WINDOW, WINDOW), sw_batch_size=cfg.eval.batch,
                                              predictor=model, overlap=overlap, mode="gaussian", sigma_scale=0.125)
            labels = logits[0].argmax(0).to(torch.uint8).numpy()
            del logits, image
            counts = np.zeros((3, k), np.int64)
            for start, size in chunks((0, 0), shape):
                block = labels[start[0]:start[0] + size[0], start[1]:start[1] + size[1]]
                counts += dice_counts(block, case.label.read(start, size), k)
            per_case[spec.id] = counts
        model.train()
        return summarize(per_case, class_names(cfg))

    return model, step, evaluate, job["unetr_lr"]


# --- the study ------------------------------------------------------------------------------------------------------


def fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def table(rows: list[dict], args) -> str:
    names = []
    for r in rows:
        names += [n for n in list(r["dice_per_class"])[1:] if n not in names]
    checks = (f"checked every {args.eval_every:.0f} s of budget at full resolution (windowed runs: overlap "
              f"{args.check_overlap:g} at the checks)" if args.eval_every else "checked at the end only")
    lines = [f"adaptive whole slides vs 256² windows vs MONAI UNETR, {args.budget:.0f} s of process CPU time each "
             f"({args.threads} torch thread{'s' if args.threads > 1 else ''}, data read in-process), "
             f"Dice at full resolution on 2 held-out slides (windowed runs: overlap {OVERLAP:g}), "
             f"time to mean Dice {TARGET} {checks}", "",
             "| family | slide | method | tokens × samples / step | steps | step CPU (wall) | mean Dice | "
             + " | ".join(f"{n} Dice" for n in names) + f" | CPU s to Dice {TARGET} (wall) | peak RSS |",
             "|---|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        reach = ("not reached" if r["time_to_target_cpu_s"] is None
                 else f"{r['time_to_target_cpu_s']:.0f} s ({r['time_to_target_wall_s']:.0f} s)")
        per = " | ".join(fmt(r["dice_per_class"].get(n)) for n in names)
        lines.append(f"| {r['family']} | {r['size']}² | {r['method']} | {r['tokens_per_sample']} × "
                     f"{r['samples_per_step']} | {r['steps']} | {r['step_cpu_s']:.3f} s ({r['step_wall_s']:.3f} s) | "
                     f"{fmt(r['dice_mean'])} | {per} | {reach} | {r['peak_rss_mb']:.0f} MiB |")
    notes = [f"{r['family']} {r['size']}² {r['method']}: {r['dice_mean_check_predictor']:.3f}" for r in rows
             if r.get("dice_mean_check_predictor") is not None]
    if notes:
        lines += ["", f"mean Dice at the end with the checks' predictor (overlap {args.check_overlap:g}): "
                  + "; ".join(notes)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["easy", "context"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budget", type=float, default=90.0, help="process CPU seconds of training per run (default 90)")
    ap.add_argument("--eval-every", type=float, default=30.0,
                    help="CPU seconds of budget between evaluations on the held-out slides (0: only at the end)")
    ap.add_argument("--tokens", type=int, default=256, help="adaptive tokens per slide at 1024², scaled with area")
    ap.add_argument("--token-scaling", choices=["area", "edge"], default="area",
                    help="adaptive tokens grow with the slide's area (default) or its edge")
    ap.add_argument("--check-overlap", type=float, default=0.0,
                    help="overlap of the windowed runs' predictor at the periodic checks (default 0: a quarter of "
                         "the windows; the final Dice always uses 0.5, and the checks' predictor is scored at the "
                         "end too, to show the difference)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, each one process (default 2: the 2 cores)")
    ap.add_argument("--window-batch", type=int, default=1, help="256² windows per step for windows and unetr")
    ap.add_argument("--unetr-lr", type=float, default=2e-3,
                    help="UNETR's peak learning rate (default 2e-3, as hrvit's runs here; in a 40 s check on 512² easy "
                         "slides 5e-4, 1e-3, 2e-3 and 4e-3 gave mean Dice 0.67, 0.77, 0.83 and 0.84)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study_baselines")
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, in a child process
    args = ap.parse_args()
    if args.job:
        job = json.loads(Path(args.job).read_text())
        Path(job["result"]).write_text(json.dumps(run_one(job)))
        return
    if "unetr" in args.methods:
        try:
            import monai  # noqa: F401
        except ImportError:
            raise SystemExit(MISSING_MONAI) from None
    args.out.mkdir(parents=True, exist_ok=True)
    classes = {f: family_classes(f) for f in args.families}
    start = time.perf_counter()
    jobs = []
    for family in args.families:
        for size in args.sizes:
            folder = args.out / f"{family}{size}"
            tick = time.perf_counter()
            manifest = write_slides(folder, family, size, args.seed)
            print(f"{family} {size}²: slides ready in {time.perf_counter() - tick:.0f} s", flush=True)
            for method in args.methods:
                job = {"family": family, "size": size, "method": method, "manifest": str(manifest),
                       "classes": classes[family], "budget": args.budget, "eval_every": args.eval_every,
                       "check_overlap": args.check_overlap, "tokens": args.tokens,
                       "token_scaling": args.token_scaling, "window_batch": args.window_batch,
                       "unetr_lr": args.unetr_lr, "threads": args.threads, "seed": args.seed,
                       "result": str(folder / f"{method}.json")}
                path = folder / f"{method}.job.json"
                path.write_text(json.dumps(job))
                jobs.append(path)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running: list[tuple[Path, subprocess.Popen]] = []
    rows: dict[Path, dict] = {}
    queue = list(jobs)
    while queue or running:
        while queue and len(running) < args.jobs:
            path = queue.pop(0)
            running.append((path, subprocess.Popen([sys.executable, __file__, "--job", str(path)], env=env)))
        time.sleep(0.5)
        for path, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((path, proc))
            if proc.returncode:
                for _, other in running:
                    other.terminate()
                raise SystemExit(f"tools/study_baselines.py: the run {path} failed (exit status {proc.returncode})")
            r = json.loads(Path(json.loads(path.read_text())["result"]).read_text())
            rows[path] = r
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    ordered = [rows[p] for p in jobs]
    (args.out / "results.json").write_text(json.dumps(ordered, indent=2))
    print(f"\nwhole study: {time.perf_counter() - start:.0f} s wall, {args.jobs} run(s) at a time\n")
    print(table(ordered, args))


if __name__ == "__main__":
    main()
