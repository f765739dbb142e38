"""The training run, top to bottom: check inputs, build, train, evaluate, summarise.

Everything random is seeded from the config: data windows by (seed, sample index), and the
torch generator (dropout, drop-path) by (seed, step, data-parallel rank) at every step. That is
why a run resumed from a checkpoint continues exactly like the uninterrupted run without saving
any generator state, and why the ranks of a sequence-parallel group, which share a data-parallel
rank, see the same samples and make the same random draws.

Under sequence parallelism (parallel.sp_size > 1) each rank of a group keeps a slice of every
sample's tokens (hrvit/parallel/shard.py); attention spans the group (hrvit/parallel/attention.py);
the loss is computed from sums added over the group, so it is the loss of the whole sequence.

Long runs (docs: README "Running for days"): checkpoints are atomic (hrvit/engine/checkpoint.py);
SIGTERM/SIGUSR1 make every rank finish its step, checkpoint and raise Preempted; SIGUSR2
checkpoints and goes on; a step whose loss is not finite on any rank is skipped on all of them. The
ranks agree on all three through one small all-reduce per step. Everything segmentation-specific
lives in find_cases/check_cases, make_dataset, batch_loss, evaluate and summary_fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hrvit.config import REPO_ROOT, Config, deepspeed_config, to_yaml, zero_stage
from hrvit.data.datasets import CaseSpec, check_labels, check_min_size, discover, open_case
from hrvit.data.windows import StepSampler, TrainWindows
from hrvit.engine import checkpoint, classify
from hrvit.engine.infer import predict_case, read_truth
from hrvit.engine.log import RunLog
from hrvit.engine.losses import loss_from_sums, segmentation_sums
from hrvit.engine.metrics import dice_counts, summarize
from hrvit.engine.picture import read_for_picture, write_picture
from hrvit.errors import ConfigError, DataError, HrvitError
from hrvit.models import build_model
from hrvit.parallel.dist import init_distributed
from hrvit.parallel.shard import SequenceParallelForward, shard_batch, sum_over_group
from hrvit.parallel.topology import SequenceParallel, check_parallel, grad_sum_factor
from hrvit.patching import collate, to_device

CHECKPOINTS = "checkpoints"
SKIPPED = "skipped_samples.jsonl"


class Preempted(Exception):
    """Raised on every rank once the checkpoint after SIGTERM/SIGUSR1 is complete; `hrvit train` then exits
    with cli.PREEMPTED_EXIT so a job script can requeue."""


def class_names(cfg: Config) -> list[str]:
    return cfg.data.class_names or [f"class{i}" if i else "background" for i in range(cfg.data.num_classes)]


def find_cases(cfg: Config) -> list[CaseSpec]:
    return discover(cfg.data.layout, root=cfg.data.root, manifest=cfg.data.manifest,
                    val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                    allow_outside_root=cfg.data.allow_outside_root)


def check_case(cfg: Config, spec: CaseSpec):
    """Open one case and check its size and label values (DataError naming the file)."""
    if cfg.task == "classify":
        return classify.check_case(cfg, spec)
    case = open_case(spec, num_classes=cfg.data.num_classes)
    check_min_size(case, cfg.patching.patch_size)
    if case.label is not None:
        check_labels(case, cfg.data.num_classes)
    return case


def check_cases(cfg: Config, specs: list[CaseSpec], bad: list | None = None) -> tuple[int, int]:
    """Open every case, check geometry, size and label values; returns (ndim, channels).
    With `bad` (a list), failing cases are appended to it as (spec, message) instead of raising."""
    geometry = set()
    for spec in specs:
        try:
            case = check_case(cfg, spec)
        except DataError as err:
            if bad is None:
                raise
            bad.append((spec, str(err)))
            continue
        geometry.add((len(case.image.shape), case.image.channels))
    bad_ids = {spec.id for spec, _ in bad or []}
    if not geometry:
        raise DataError(f"data: none of the {len(specs)} case(s) is readable; run hrvit check-data")
    if len(geometry) != 1:
        raise ConfigError(f"data: cases differ in dimensionality/channels {sorted(geometry)}; one run needs one kind")
    if not any(s.split == "train" and s.id not in bad_ids for s in specs):
        raise ConfigError("data: no case has split 'train'")
    return geometry.pop()


def _on_rank0_then_share(fn):
    """Run `fn` on rank 0 only and give every rank its result or its error (no rank is left waiting)."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except HrvitError as err:
            box[1] = (type(err), str(err))
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1][0](box[1][1])
    return box[0]


def build(cfg: Config, ndim: int, channels: int):
    if cfg.task == "classify":
        return classify.build_classifier(cfg, channels)
    return build_model(cfg.model.preset, ndim=ndim, patch_size=cfg.patching.patch_size, in_chans=channels,
                       num_classes=cfg.data.num_classes, embed_dim=cfg.model.embed_dim, depth=cfg.model.depth,
                       num_heads=cfg.model.num_heads, drop_path=cfg.model.drop_path,
                       checkpoint_activations=cfg.model.checkpoint_activations,
                       decoder_channels=cfg.model.decoder_channels)


def prepare_run_dir(cfg: Config) -> Path:
    """Refuse to mix two runs in one folder; a resume continues the run that is there."""
    run = Path(cfg.output.dir)
    if (run / "metrics.jsonl").exists() and cfg.train.resume is None:
        raise ConfigError(f"output.dir: {run} already holds a run; set train.resume=auto to continue it "
                          "or choose another output.dir")
    return run


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    return checkpoint.find_latest(run / CHECKPOINTS)


def resume_checkpoint(cfg: Config, run: Path) -> Path | None:
    """The checkpoint train.resume names: 'auto' -> the run's newest complete one (or none), else a
    checkpoints/ folder (its newest complete one) or one step folder."""
    if cfg.train.resume is None:
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(run)
    path = Path(cfg.train.resume)
    found = checkpoint.find_latest(path) if (path / checkpoint.LATEST).is_file() else path
    if found is None or not found.is_dir() or not any(found.iterdir()):
        raise ConfigError(f"train.resume: {path} holds no complete checkpoint (a run's checkpoints/ folder "
                          "or one step folder in it)")
    return found


def _forget_after(path: Path, step: int) -> None:
    """Drop the JSON lines of steps after `step` (written before a crash, about to be redone) and a line cut
    short by the crash, atomically."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def environment(world: int) -> dict:
    """What reproduces the run besides config.yaml: versions, git commit, command line, host."""
    import deepspeed
    import numpy
    import timm

    from hrvit import __version__

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"hrvit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "timm": timm.__version__, "numpy": numpy.__version__,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "argv": sys.argv, "host": platform.node(), "world_size": world,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def checkpoint_meta(cfg: Config, model, ndim: int, channels: int, world: int, ds_config: dict) -> dict:
    """What a checkpoint must match to be resumed: the model's shape, and the topology (ZeRO shards)."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.state_dict().items())
    m = cfg.model
    return {"model": {"preset": m.preset, "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
                      "decoder_channels": m.decoder_channels, "patch_size": cfg.patching.patch_size,
                      "num_classes": cfg.data.num_classes, "ndim": ndim, "channels": channels,
                      "parameter_shapes": hashlib.sha1(shapes.encode()).hexdigest()[:16]},
            "topology": {"world_size": world, "sp_size": cfg.parallel.sp_size, "zero_stage": zero_stage(ds_config)}}


class Signals:
    """SIGTERM/SIGUSR1 ask for checkpoint-and-exit, SIGUSR2 for a checkpoint; the loop polls `wanted()`."""

    STOP, SAVE = 0, 1

    def __init__(self):
        self.flags = [0.0, 0.0]
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.flags[self.SAVE if signum == signal.SIGUSR2 else self.STOP] = 1.0
        self.received = signal.Signals(signum).name

    def wanted(self, bad_step: bool) -> tuple[bool, bool, bool]:
        """(stop, save, bad) agreed by all ranks: true if any rank got the signal or saw a bad step."""
        flags = torch.tensor([*self.flags, float(bad_step)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.flags[self.SAVE] = 0.0
        return bool(flags[0]), bool(flags[1]), bool(flags[2])


def _fault_nan(done: int, rank: int) -> bool:
    """Test hook: HRVIT_FAULT_NAN_STEP=N[,M...] makes rank 0's loss NaN at steps N, M, ..."""
    return rank == 0 and str(done) in os.environ.get("HRVIT_FAULT_NAN_STEP", "").split(",")


@contextlib.contextmanager
def name_lost_workers(workers: int, sampler: StepSampler, dataset: TrainWindows, fetched: list[int]):
    """A data-loader worker killed without a Python error (signal, out of memory) surfaces anywhere in the loop
    as RuntimeError (or a broken queue); turn it into a DataError naming the samples that were being read:
    those of the next 2 x workers micro-batches (DataLoader's prefetch)."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as err:
        if workers == 0 or isinstance(err, RuntimeError) and "DataLoader worker" not in str(err):
            raise
        ks = [k for p in range(fetched[0], fetched[0] + 2 * workers)
              if sampler.start_step + p // sampler.grad_accum < sampler.steps
              for k in sampler.indices(sampler.start_step + p // sampler.grad_accum, p % sampler.grad_accum)]
        case_of = getattr(dataset, "case_of", None)
        cases = f" (cases {', '.join(sorted({case_of(k).id for k in ks}))})" if case_of else ""
        raise DataError(f"a data-loader worker died while samples {ks}{cases} were being read "
                        f"({type(err).__name__}: {err.args[0] if err.args else ''}); run hrvit check-data, or "
                        "give the workers more memory") from None


def all_agree_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce): all ranks then skip, or none."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def evaluate(cfg: Config, model, specs: list[CaseSpec], run: Path | None, step: int,
             sp: SequenceParallel | None = None) -> dict:
    """Full-resolution Dice of every evaluation case; every rank runs it (ZeRO-3 needs them in step).
    With `sp`, the ranks of each SP group run every window together and all get its whole prediction.
    classify: accuracy, balanced accuracy and AUC of the evaluation cases instead."""
    if cfg.task == "classify":
        return {**classify.evaluate(cfg, model, specs, run, class_names(cfg)), "step": step}
    cases = [s for s in specs if s.split == cfg.eval.split][: cfg.eval.max_cases]
    per_case = {}
    was_training = model.training
    model.eval()
    forward = model if sp is None else SequenceParallelForward(model, sp.group, sp.size, sp.sp_rank)
    for i, spec in enumerate(cases):
        case = open_case(spec, num_classes=cfg.data.num_classes)
        pred = predict_case(forward, case, window=cfg.data.window, patching=cfg.patching,
                            batch=cfg.eval.batch, device=getattr(model, "device", None))
        truth = read_truth(case)
        per_case[spec.id] = dice_counts(pred, truth, cfg.data.num_classes)
        if i == 0 and run is not None and cfg.output.picture and dist.get_rank() == 0:
            write_picture(run / "prediction.png", read_for_picture(case.image), truth, pred)
    model.train(was_training)
    result = summarize(per_case, class_names(cfg)) if per_case else {"dice_mean": None}
    result.update(step=step, cases=len(per_case), split=cfg.eval.split)
    return result


def make_dataset(cfg: Config, specs: list[CaseSpec]) -> TrainWindows | classify.CaseOrder:
    """The training samples: random windows of the training cases (classify: the cases themselves)."""
    if cfg.task == "classify":
        return classify.make_dataset(cfg, specs)
    return TrainWindows([s for s in specs if s.split == "train"], window=cfg.data.window, patching=cfg.patching,
                        seed=cfg.train.seed, foreground_bias=cfg.data.foreground_bias, augment=cfg.data.augment,
                        skip_bad=cfg.data.skip_bad_samples)


def batch_loss(cfg: Config, engine, batch: dict, topo: SequenceParallel | None) -> torch.Tensor:
    """The loss of one micro-batch (segmentation under SP: of the whole sequence, on every rank of the group)."""
    if cfg.task == "classify":
        return classify.batch_loss(cfg, engine, batch)
    batch = to_device(batch, engine.device)
    if topo is not None:
        batch = shard_batch(batch, topo.size, topo.sp_rank)
    logits = engine(batch["pixels"], batch["boxes"], batch["valid"], batch["image_shape"], batch.get("key_valid"))
    valid = batch["valid"]
    sums = segmentation_sums(logits[valid], batch["target"][valid])
    if topo is not None:
        sums = sum_over_group(sums, topo.group)
    return loss_from_sums(sums, cfg.train.dice_weight, cfg.train.ce_weight)


def summary_fields(cfg: Config, result: dict) -> dict:
    """The task's part of summary.json, from the final evaluation."""
    if cfg.task == "classify":
        return classify.summary_fields(cfg, result)
    return {"dice_mean": result.get("dice_mean"), "dice_per_class": result.get("dice_per_class"),
            "eval_cases": result.get("cases"), "patching": cfg.patching.mode, "patch_size": cfg.patching.patch_size}


def train(cfg: Config) -> dict | None:
    """Run training as configured; returns the summary on rank 0. Raises Preempted after a signal."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    signals = Signals()  # before anything slow: a signal during set-up is kept, not fatal
    rank, world = init_distributed(cfg.parallel.timeout_s)
    sp = cfg.parallel.sp_size
    check_parallel(sp, world)
    topo = SequenceParallel(sp) if sp > 1 else None  # collective: every rank, before any can fail
    dp_size, dp_rank = world // sp, rank // sp

    # Everything that can be wrong with the inputs is found before anything is written.
    specs = _on_rank0_then_share(lambda: find_cases(cfg))
    bad_cases = [] if cfg.data.skip_bad_samples else None
    ndim, channels, bad_cases = _on_rank0_then_share(lambda: (*check_cases(cfg, specs, bad_cases), bad_cases))
    bad_ids = {spec.id for spec, _ in bad_cases or []}
    specs = [s for s in specs if s.id not in bad_ids]
    ds_config = deepspeed_config(cfg, dp_size)
    grad_factor = grad_sum_factor(ds_config, sp)
    run = prepare_run_dir(cfg)
    resume_from = resume_checkpoint(cfg, run)

    torch.manual_seed(cfg.train.seed)
    model = build(cfg, ndim, channels)
    meta = checkpoint_meta(cfg, model, ndim, channels, world, ds_config)
    if resume_from is not None:
        universal = bool(ds_config.get("checkpoint", {}).get("load_universal"))
        _on_rank0_then_share(lambda: checkpoint.check_compatible(resume_from, meta, universal))
    if cfg.model.init_from:
        from hrvit.models import load_timm_checkpoint
        load_timm_checkpoint(model.encoder, cfg.model.init_from)
    if topo is not None:
        from hrvit.parallel.attention import ulysses_core

        check_parallel(sp, world, model.encoder.num_heads)
        model.encoder.set_attention_core(ulysses_core(topo.group))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        mpu=topo)

    start_step = 0
    if resume_from is not None:
        _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name)
        start_step = int(client["step"])
    t = cfg.train
    if start_step > t.steps:
        raise ConfigError(f"train.steps: {t.steps} is below the step of the checkpoint resumed ({start_step})")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", SKIPPED):
            _forget_after(run / name, start_step)
        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
        (run / "environment.json").write_text(json.dumps(
            {**environment(world), "resumed_from_step": start_step}, indent=2))
        if bad_cases:
            with open(run / SKIPPED, "a") as f:
                f.writelines(json.dumps({"step": start_step, "case": spec.id, "path": str(spec.image[0]),
                                         "error": msg, "dropped": True}) + "\n" for spec, msg in bad_cases)
    dist.barrier()

    dataset = make_dataset(cfg, specs)
    sampler = StepSampler(start_step=start_step, steps=t.steps, grad_accum=t.grad_accum,
                          micro_batch=t.micro_batch, dp_rank=dp_rank, dp_size=dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=getattr(dataset, "collate", collate),
                                         num_workers=cfg.data.workers,
                                         persistent_workers=cfg.data.workers > 0)
    log = RunLog(run, total=t.steps, start=start_step, enabled=rank == 0)
    log.info(f"hrvit: {world} rank(s) = {dp_size} data-parallel x {sp} sequence-parallel, "
             f"ZeRO-{zero_stage(ds_config)}, {ndim}-D, {channels} channel(s), "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"steps {start_step}->{t.steps}, run folder {run}"
             + (f", resumed from {resume_from}" if resume_from else ""))
    for spec, msg in bad_cases or []:
        log.info(f"hrvit: skipping case {spec.id}: {msg}")

    def next_batch(step: int, micro: int) -> dict:
        batch = next(batches)
        fetched[0] += 1
        skipped = [m for meta in batch["meta"] for m in meta.get("skipped", [])]
        if skipped and rank % sp == 0:  # one rank per SP group: the group shares its samples
            with open(run / SKIPPED, "a") as f:
                f.writelines(json.dumps({"step": step + 1, "rank": rank, **m}) + "\n" for m in skipped)
        counts["skipped_samples"] += len(skipped) if rank % sp == 0 else 0
        return batch

    batches = iter(loader)
    fetched = [0]
    counts = {"samples": 0, "tokens": 0, "skipped_samples": 0, "bad_steps": 0}
    train_time = 0.0
    window_loss = []
    bad_in_a_row = 0
    lost_workers = name_lost_workers(cfg.data.workers, sampler, dataset, fetched)
    with lost_workers:
        for step in range(start_step, t.steps):
            torch.manual_seed(hash((t.seed, step, dp_rank)) % 2**63)
            tick = time.perf_counter()
            done = step + 1
            step_loss, finite = 0.0, True
            for micro in range(t.grad_accum):
                batch = next_batch(step, micro)
                counts["samples"] += len(batch["meta"]) * dp_size
                counts["tokens"] += (batch["tokens"] if "tokens" in batch else int(batch["valid"].sum())) * dp_size
                loss = batch_loss(cfg, engine, batch, topo)
                if _fault_nan(done, rank) and micro == 0:
                    loss = loss * float("nan")
                if not all_agree_finite(loss):
                    finite = False
                    if t.grad_accum == 1:
                        break  # no backward, no optimizer or scheduler step: the step is skipped on every rank
                # with accumulation the NaN goes through backward: ZeRO-1/2 then drop the whole step themselves
                engine.backward(loss * grad_factor if grad_factor != 1 else loss)
                engine.step()
                step_loss += loss.item() / t.grad_accum
            if not finite and t.grad_accum > 1 and engine.was_step_applied():
                raise HrvitError(f"train: step {done} had a non-finite loss and DeepSpeed applied it (with "
                                 "train.grad_accum > 1 only ZeRO-1/2 in fp32/fp16 drop such steps); resume from the "
                                 "last checkpoint with a lower train.lr, or check the data")
            # DeepSpeed itself skips an update whose gradient norm is not finite (ZeRO-1/2): a bad step too
            stop, save, bad = signals.wanted(not finite or not engine.was_step_applied())
            train_time += time.perf_counter() - tick
            if bad:
                counts["bad_steps"] += 1
                bad_in_a_row += 1
                log.metrics({"step": done, "skipped_step": "non-finite loss or gradients", "in_a_row": bad_in_a_row})
                if bad_in_a_row >= t.max_bad_steps:
                    raise HrvitError(f"train: {bad_in_a_row} steps in a row (to step {done}) had a non-finite loss or "
                                     f"gradients (train.max_bad_steps={t.max_bad_steps}); lower train.lr or check the "
                                     "data, then resume from the last checkpoint")
            else:
                bad_in_a_row = 0
                window_loss.append(step_loss)
            if window_loss and (done % t.log_every == 0 or done == t.steps):
                mean = torch.tensor(sum(window_loss) / len(window_loss))
                dist.all_reduce(mean)
                log.metrics({"step": done, "loss": round(mean.item() / world, 6), "lr": scheduler.get_last_lr()[0],
                             "samples_per_s": round(counts["samples"] / train_time, 3),
                             "tokens_per_s": round(counts["tokens"] / train_time, 1)})
                window_loss = []
            log.advance(done)
            if stop or save or (t.ckpt_every and done % t.ckpt_every == 0 and done != t.steps):
                checkpoint.save(engine, run / CHECKPOINTS, done, meta, t.keep_last)
            if stop:
                log.info(f"hrvit: {signals.received or 'a signal on another rank'}: checkpoint at step {done} written; "
                         f"stopping (resume: hrvit train --resume {run})")
                log.close()
                raise Preempted(done)
            if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
                log.metrics({"step": done, "eval": evaluate(cfg, engine, specs, run, done, topo)})
    checkpoint.save(engine, run / CHECKPOINTS, t.steps, meta, t.keep_last)
    log.info("hrvit: evaluating" + (" at full resolution" if cfg.task == "segment" else ""))
    result = evaluate(cfg, engine, specs, run, t.steps, topo)
    log.metrics({"step": t.steps, "eval": result})
    totals = torch.tensor([counts["skipped_samples"]], dtype=torch.float64)
    dist.all_reduce(totals)
    summary = {
        **summary_fields(cfg, result),
        "steps": t.steps,
        "resumed_from_step": start_step,
        "samples_per_s": round(counts["samples"] / train_time, 3) if train_time else None,
        "tokens_per_s": round(counts["tokens"] / train_time, 1) if train_time else None,
        "train_seconds": round(train_time, 2),
        "world_size": world,
        "dp_size": dp_size,
        "sp_size": sp,
        "zero_stage": zero_stage(ds_config),
        "bad_steps": counts["bad_steps"],
        "skipped_samples": int(totals.item()),
        "dropped_cases": sorted(bad_ids),
        "final_loss": log.last_loss,
    }
    log.close()
    if rank == 0:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
        score = (f"accuracy {summary['accuracy']}" if cfg.task == "classify" else f"mean Dice {summary['dice_mean']}")
        log.info(f"hrvit: {score} over {summary['eval_cases']} held-out case(s); "
                 f"summary in {run / 'summary.json'}, picture in {run / 'prediction.png'}")
    dist.barrier()
    return summary if rank == 0 else None


def load_weights(run: Path, cfg: Config, ndim: int, channels: int):
    """The model with the fp32 weights of the run's latest complete checkpoint (any ZeRO stage), no engine needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"{run}: no complete checkpoint found in {run / CHECKPOINTS}")
    model = build(cfg, ndim, channels)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    return model.eval()
