"""The `hrvit` command: train, eval, predict, synth.

    hrvit train CONFIG [key=value ...]        train (one process, or under deepspeed/srun)
    hrvit train --resume RUN_DIR [key=value ...]   continue a run from its newest complete checkpoint
    hrvit check-data CONFIG [key=value ...]   validate every case of a dataset; table of problems
    hrvit eval RUN_DIR [key=value ...] [--checkpoint TAG]   full-resolution Dice (classify: accuracy) of a run
    hrvit predict RUN_DIR [key=value ...] --input ITEM... --out DIR [--checkpoint TAG] [--probabilities]
                                              predictions + overlays (+ per-class probability maps)
    hrvit synth {slides,volumes,megapixel} --out DIR    deterministic synthetic data
    hrvit patchify INPUT [--out overlay.png] [--json STATS]   adaptive tokens of one image: statistics (+ drawn)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hrvit.errors import PREEMPTED_EXIT, HrvitError

CHECKPOINT_HELP = ("checkpoint to use: a tag in RUN_DIR/checkpoints (e.g. step0000008) or a checkpoint folder; "
                   "default: the newest complete one")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrvit", description="Vision Transformers on gigapixel slides and 3-D volumes.")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true",
                   help="keep torch's and DeepSpeed's routine messages (deprecation warnings on every ZeRO-3 step, "
                        "scheduler notes), which hrvit otherwise hides")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a YAML recipe",
                       epilog=f"exit status {PREEMPTED_EXIT}: stopped by SIGTERM/SIGUSR1/SIGINT after a checkpoint; "
                              "requeue the job with --resume RUN_DIR")
    t.add_argument("config", nargs="?", help="YAML recipe, e.g. launch/recipes/quickstart.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 output.dir=runs/x")
    t.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue this run (its config.yaml, newest complete checkpoint); no CONFIG then")

    c = sub.add_parser("check-data", help="validate every case of a recipe's dataset; exit 1 if any problem")
    c.add_argument("config", help="YAML recipe")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.manifest=data/manifest.csv")
    c.add_argument("--min-tissue", type=float, default=0.01,
                   help="smallest tissue (foreground) fraction of an image (default 0.01)")

    e = sub.add_parser("eval", help="evaluate a trained run at full resolution")
    e.add_argument("run", type=Path, help="run folder (holds config.yaml and checkpoints/)")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.split=test")
    e.add_argument("--selection", choices=["top", "random"], default="top",
                   help="task: classify: give the model its top ips.memory patches (default) or as many drawn at "
                        "random, the baseline that shows what selection is worth (eval_SPLIT_random_selection.json)")
    e.add_argument("--checkpoint", default=None, metavar="TAG_OR_PATH", help=CHECKPOINT_HELP)

    r = sub.add_parser("predict", help="predict full-resolution labels for images")
    r.add_argument("run", type=Path, help="run folder (holds config.yaml and checkpoints/)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.batch=4 data.window=2048")
    r.add_argument("--input", nargs="+", required=True, metavar="ITEM",
                   help="images to predict, each a file (slide, NIfTI, PNG/npy), a folder (its image files; *_mask.* "
                        "skipped), a glob ('slides/*.svs'), a manifest (.csv/.json), or the channel files of one "
                        "multi-file volume joined with ';' ('t1.nii.gz;t1ce.nii.gz;t2.nii.gz;flair.nii.gz')")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--checkpoint", default=None, metavar="TAG_OR_PATH", help=CHECKPOINT_HELP)
    r.add_argument("--probabilities", action="store_true",
                   help="also write per-class probabilities: volumes NAME_prob.nii.gz (float32, x, y, z, class; the "
                        "input's affine), 2-D images one pyramidal TIFF per class NAME_prob_CLASS.tiff (uint8, "
                        "probability x 255)")

    s = sub.add_parser("synth", help="write deterministic synthetic data")
    s.add_argument("kind", choices=["slides", "volumes", "megapixel"],
                   help="slides: segmentation slides; volumes: BraTS-layout MRI; megapixel: recognition canvases "
                        "(label = shape of 3 small red targets among grey distractors) for task: classify")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--n", type=int, default=8, help="number of cases (default 8)")
    s.add_argument("--size", type=int, default=None,
                   help="slide or canvas edge in pixels (default 1024, at least 64) or volume edge in voxels "
                        "(default 64, at least 16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--family", default=None,
                   help="slides only: easy (default; classes background, tumour, gland, decided by local texture) or "
                        "context (background, tumour, benign: one lesion texture, tumour inside a slide-wide capsule "
                        "and benign outside it, so a 256^2 window alone cannot tell them apart)")

    a = sub.add_parser("patchify", help="adaptive patching of one image: token statistics, and leaf outlines with "
                                        "--out", description="Adaptive patching of one image. Always prints the "
                                        "token statistics; --json writes them too and --out draws the leaves. "
                                        "Without --out no picture is made (faster on a large image).")
    a.add_argument("input", type=Path, nargs="+",
                   help="an image (slide, NIfTI, PNG/npy); one file per channel for volumes")
    a.add_argument("--out", type=Path, default=None,
                   help="overlay PNG: leaf outlines coloured by level (default: none, statistics only)")
    a.add_argument("--json", type=Path, default=None, help="write the statistics here as JSON")
    a.add_argument("--config", type=Path, default=None, help="take the patching section of this recipe first")
    a.add_argument("--tokens", type=int, default=None, help="token budget L (default 1024 unless --threshold)")
    a.add_argument("--patch-size", type=int, default=None, help="base patch size p (default 16)")
    a.add_argument("--threshold", type=float, default=None, help="threshold mode: split while detail mass > T")
    a.add_argument("--scorer", choices=["edge", "variance"], default=None)
    a.add_argument("--tissue-mask", action="store_true", default=None, help="no small leaves outside tissue")
    a.add_argument("--min-leaf", type=int, default=None)
    a.add_argument("--max-leaf", type=int, default=None)
    a.add_argument("--max-edge", type=int, default=2048, help="longest side of the overlay (default 2048)")
    return p


def _run_config(run: Path, overrides: list[str]):
    from hrvit.config import load_config

    path = run / "config.yaml"
    if not path.is_file():
        raise HrvitError(f"{run}: not a run folder (no config.yaml)")
    return load_config(path, ["train.resume=auto", *overrides])


def cmd_train(args) -> int:
    from hrvit.config import load_config
    from hrvit.engine.trainer import Preempted, train

    if args.resume is not None:
        if args.config is not None and "=" not in args.config:
            raise HrvitError(f"train: give a recipe ({args.config}) or --resume RUN_DIR, not both")
        cfg = _run_config(args.resume, [f"output.dir={args.resume}", *filter(None, [args.config]), *args.overrides])
    elif args.config is None:
        raise HrvitError("train: a recipe (CONFIG) or --resume RUN_DIR is required")
    else:
        cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except Preempted:
        return PREEMPTED_EXIT
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        raise HrvitError(f"another rank died or stopped answering for parallel.timeout_s={cfg.parallel.timeout_s} s; "
                         f"this rank stops too ({str(err).strip().splitlines()[-1][:300]})") from None
    finally:  # preempted or failed runs too: every rank mapped the buffers at start-up
        from hrvit.parallel.dist import release_shm_buffers

        release_shm_buffers()
    return 0


def _lost_peer(err: RuntimeError) -> bool:
    """Whether a collective failed because a peer is gone (torch's DistError; gloo raises plain RuntimeErrors)."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, dist.DistError) or "/gloo/" in text and any(
        s in text for s in ("Timed out", "Connection closed", "Connection reset", "Broken pipe"))


def cmd_check_data(args) -> int:
    from hrvit.config import load_config
    from hrvit.data.check import check_data, format_table

    problems, cases = check_data(load_config(args.config, args.overrides), min_tissue=args.min_tissue)
    if problems:
        print(format_table(problems))
    print(f"{len({p['case'] for p in problems})} of {cases} case(s) with problems ({len(problems)} problem(s))")
    return 1 if problems else 0


def shape_text(shape) -> str:
    """An image's size as people read it, axes named: (450, 600) -> '600 x 450 (width x height)', a (z, y, x)
    volume (48, 64, 40) -> '40 x 64 x 48 (x, y, z)'; hrvit's arrays are (y, x) / (z, y, x)."""
    sizes = " x ".join(str(int(n)) for n in reversed(tuple(shape)))
    return f"{sizes} ({'width x height' if len(shape) == 2 else 'x, y, z'})"


def eval_file(split: str, selection: str = "top") -> str:
    """One file per split (an evaluation of the training split no longer overwrites the validation one)."""
    return f"eval_{split}.json" if selection == "top" else f"eval_{split}_random_selection.json"


def cmd_eval(args) -> int:
    from hrvit.engine import checkpoint
    from hrvit.engine.session import start
    from hrvit.engine.trainer import CHECKPOINTS, load_weights

    # evaluation needs no sequence parallelism: every rank runs whole windows, the cases shared among the ranks
    cfg = _run_config(args.run, [*args.overrides, "parallel.sp_size=1"])
    if args.selection == "random" and cfg.task != "classify":
        raise HrvitError("--selection random: only for task: classify runs (iterative patch selection)")
    # a missing or damaged checkpoint is found before the data are checked, which can take long
    ckpt = checkpoint.choose(args.run / CHECKPOINTS, args.checkpoint)
    checkpoint.check_files(ckpt, checkpoint.INFER_WITH)
    data = f"data.manifest={cfg.data.manifest}" if cfg.data.layout == "manifest" else f"data.root={cfg.data.root}"
    try:
        session = start(cfg)
        specs = session.check_data()
        model = load_weights(args.run, cfg, session.ndim, session.channels, session.device, ckpt=ckpt,
                             what=f"the cases of {data}", fix="; evaluate with the data of the run's own config.yaml")
        if cfg.eval.max_cases == 0:
            raise HrvitError("eval.max_cases=0 evaluates no case; give a count, or null for all")
        if not any(s.split == cfg.eval.split for s in specs):
            raise HrvitError(f"eval.split={cfg.eval.split!r}: no case of the data is in that split (their splits: "
                             f"{', '.join(sorted({s.split for s in specs}))})")
        extra = {} if args.selection == "top" else {"selection": args.selection}
        step = (checkpoint.read_meta(ckpt) or {}).get("step", -1)
        result = session.task.evaluate(session, model, specs, None, step, **extra)
    finally:
        from hrvit.parallel.dist import release_shm_buffers

        release_shm_buffers()
    out = args.run / eval_file(cfg.eval.split, args.selection)
    if session.rank == 0:
        out.write_text(json.dumps(result, indent=2))
        print(f"{session.task.score(result)} over {result['cases']} case(s) of split '{cfg.eval.split}' "
              f"on {session.world} rank(s), checkpoint {ckpt.name}; written to {out}")
    return 0


def cmd_predict(args) -> int:
    from hrvit.engine.predict import expand_inputs, predict_files

    cfg = _run_config(args.run, args.overrides)
    inputs = expand_inputs(args.input)
    print(f"predicting {len(inputs)} image(s) into {args.out}", flush=True)
    for path in predict_files(args.run, cfg, inputs, args.out, ckpt=args.checkpoint, probabilities=args.probabilities):
        print(f"wrote {path}")
    return 0


def cmd_synth(args) -> int:
    from hrvit.data.synthetic import FAMILY_CLASSES, make_megapixel, make_slides, make_volumes

    if args.n < 1:
        raise HrvitError(f"--n: {args.n} must be >= 1")
    smallest = {"slides": 64, "megapixel": 64, "volumes": 16}[args.kind]
    if args.size is not None and args.size < smallest:
        raise HrvitError(f"--size: {args.size} is too small for synthetic {args.kind} (at least {smallest})")
    if args.family is not None and args.kind != "slides":
        raise HrvitError(f"--family: applies to synthetic slides only, not {args.kind}")
    if args.family is not None and args.family not in FAMILY_CLASSES:
        raise HrvitError(f"--family: unknown slide family {args.family!r}; expected one of {', '.join(FAMILY_CLASSES)}")
    if args.kind == "slides":
        path = make_slides(args.out, n=args.n, size=args.size or 1024, seed=args.seed, family=args.family or "easy",
                           progress=lambda i, n: print(f"slide {i}/{n}", flush=True))
    elif args.kind == "megapixel":
        path = make_megapixel(args.out, n=args.n, size=args.size or 1024, seed=args.seed,
                              progress=lambda i, n: print(f"canvas {i}/{n}", flush=True) if i % 25 == 0 or i == n
                              else None)
    else:
        size = args.size or 64
        path = make_volumes(args.out, n=args.n, shape=(size, size, size), seed=args.seed)
    print(f"wrote {args.n} synthetic {args.kind} to {path}")
    return 0


def cmd_patchify(args) -> int:
    from hrvit.config import load_config, patching_config, to_dict
    from hrvit.data.sources import open_image
    from hrvit.patching.overlay import patchify

    values = to_dict(load_config(args.config))["patching"] if args.config else {}
    options = {"tokens": args.tokens, "patch_size": args.patch_size, "threshold": args.threshold,
               "scorer": args.scorer, "tissue_mask": args.tissue_mask, "min_leaf": args.min_leaf,
               "max_leaf": args.max_leaf}
    values.update({k: v for k, v in options.items() if v is not None}, mode="adaptive")
    if values.get("tokens") is None and values.get("threshold") is None:
        values["tokens"] = 1024
    cfg = patching_config(values)
    source = open_image(args.input if len(args.input) > 1 else args.input[0])
    stats = {"input": [str(p) for p in args.input], **patchify(source, cfg, args.out, args.max_edge),
             "patching": to_dict(cfg)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(stats, indent=2))
    s = stats["seconds"]
    print(f"{stats['real_tokens']} real tokens of {stats['tokens']} for a {shape_text(source.shape)} image; "
          f"leaves per level {stats['leaves_per_level']}, area per level {stats['area_fraction_per_level']}; "
          f"level-0 fraction read {stats['level0_fraction_read']:.4f}; seconds: scores {s['scores']}, "
          f"tree {s['tree']}, resample {s['resample']}, total {s['total']}"
          + (f"; overlay {args.out} ({s['overlay']} s)" if args.out else "")
          + (f"; statistics {args.json}" if args.json else ""))
    return 0


def quiet_routine_noise() -> None:
    """Hide messages that say nothing about the run: torch's FutureWarning that DeepSpeed 0.19.8 calls
    `all_gather_into_tensor`/`reduce_scatter_tensor` (printed on every ZeRO-3 step) and DeepSpeed's note that the
    learning rate was read before the scheduler's first step (hrvit logs it at step 0 on purpose)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(lambda record: "before it has started" not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # DeepSpeed's op builder makes torch warn "No CUDA runtime is found" on every CPU start; it is expected there.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if not args.verbose:
        quiet_routine_noise()
    command = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "synth": cmd_synth,
               "patchify": cmd_patchify, "check-data": cmd_check_data}[args.command]
    try:
        code = command(args)
    except HrvitError as err:
        print(f"hrvit {args.command}: error: {err}", file=sys.stderr, flush=True)
        code = 2
    if argv is None and args.command == "patchify":
        exit_now(code)
    from hrvit.parallel.dist import leave

    return leave(code)


def exit_now(code: int) -> None:
    """End a one-shot command run from the shell without the interpreter's teardown: freeing torch's modules took
    0.7 s of CPU (1 s wall) after `hrvit patchify` had finished, as long as the patching of a 8192^2 file itself.
    Its output files are closed by now; only the standard streams need flushing. Not for in-process callers of main
    (argv given), whose interpreter goes on."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
