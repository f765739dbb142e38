"""The training run, top to bottom: check inputs, build, train, evaluate, summarise.

Everything random is seeded from the config: data windows by (seed, sample index), and the
torch generator (dropout, drop-path) by (seed, step, data-parallel rank) at every step. That is
why a run resumed from a checkpoint continues exactly like the uninterrupted run without saving
any generator state, and why the ranks of a sequence-parallel group, which share a data-parallel
rank, see the same samples and make the same random draws.

Under sequence parallelism (parallel.sp_size > 1) each rank of a group keeps a slice of every
sample's tokens (hrvit/parallel/shard.py); attention spans the group (hrvit/parallel/attention.py);
the loss is computed from sums added over the group, so it is the loss of the whole sequence.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hrvit.config import Config, deepspeed_config, to_yaml, zero_stage
from hrvit.data.datasets import CaseSpec, check_labels, check_min_size, discover, open_case
from hrvit.data.windows import StepSampler, TrainWindows
from hrvit.engine.infer import predict_case, read_truth
from hrvit.engine.log import RunLog
from hrvit.engine.losses import loss_from_sums, segmentation_sums
from hrvit.engine.metrics import dice_counts, summarize
from hrvit.engine.picture import read_for_picture, write_picture
from hrvit.errors import ConfigError, HrvitError
from hrvit.models import build_model
from hrvit.parallel.dist import init_distributed
from hrvit.parallel.shard import SequenceParallelForward, shard_batch, sum_over_group
from hrvit.parallel.topology import SequenceParallel, check_parallel, grad_sum_factor
from hrvit.patching import collate

CHECKPOINTS = "checkpoints"


def class_names(cfg: Config) -> list[str]:
    return cfg.data.class_names or [f"class{i}" if i else "background" for i in range(cfg.data.num_classes)]


def find_cases(cfg: Config) -> list[CaseSpec]:
    return discover(cfg.data.layout, root=cfg.data.root, manifest=cfg.data.manifest,
                    val_fraction=cfg.data.val_fraction, seed=cfg.train.seed)


def check_cases(cfg: Config, specs: list[CaseSpec]) -> tuple[int, int]:
    """Open every case, check geometry, size and label values; returns (ndim, channels)."""
    geometry = set()
    for spec in specs:
        case = open_case(spec, num_classes=cfg.data.num_classes)
        check_min_size(case, cfg.patching.patch_size)
        if case.label is not None:
            check_labels(case, cfg.data.num_classes)
        geometry.add((len(case.image.shape), case.image.channels))
    if len(geometry) != 1:
        raise ConfigError(f"data: cases differ in dimensionality/channels {sorted(geometry)}; one run needs one kind")
    if not any(s.split == "train" for s in specs):
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
    ckpt = run / CHECKPOINTS
    return ckpt if (ckpt / "latest").is_file() else None


def evaluate(cfg: Config, model, specs: list[CaseSpec], run: Path | None, step: int,
             sp: SequenceParallel | None = None) -> dict:
    """Full-resolution Dice of every evaluation case; every rank runs it (ZeRO-3 needs them in step).
    With `sp`, the ranks of each SP group run every window together and all get its whole prediction."""
    cases = [s for s in specs if s.split == cfg.eval.split][: cfg.eval.max_cases]
    per_case = {}
    was_training = model.training
    model.eval()
    forward = model if sp is None else SequenceParallelForward(model, sp.group, sp.size, sp.sp_rank)
    for i, spec in enumerate(cases):
        case = open_case(spec, num_classes=cfg.data.num_classes)
        pred = predict_case(forward, case, window=cfg.data.window, patching=cfg.patching,
                            batch=cfg.eval.batch)
        truth = read_truth(case)
        per_case[spec.id] = dice_counts(pred, truth, cfg.data.num_classes)
        if i == 0 and run is not None and cfg.output.picture and dist.get_rank() == 0:
            write_picture(run / "prediction.png", read_for_picture(case.image), truth, pred)
    model.train(was_training)
    result = summarize(per_case, class_names(cfg)) if per_case else {"dice_mean": None}
    result.update(step=step, cases=len(per_case), split=cfg.eval.split)
    return result


def train(cfg: Config) -> dict | None:
    """Run training as configured; returns the summary on rank 0."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, world = init_distributed(cfg.parallel.timeout_s)
    sp = cfg.parallel.sp_size
    check_parallel(sp, world)
    topo = SequenceParallel(sp) if sp > 1 else None  # collective: every rank, before any can fail
    dp_size, dp_rank = world // sp, rank // sp

    # Everything that can be wrong with the inputs is found before anything is written.
    specs = _on_rank0_then_share(lambda: find_cases(cfg))
    ndim, channels = _on_rank0_then_share(lambda: check_cases(cfg, specs))
    ds_config = deepspeed_config(cfg, dp_size)
    grad_factor = grad_sum_factor(ds_config, sp)
    run = prepare_run_dir(cfg)
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(run)
    elif cfg.train.resume is not None:
        resume_from = Path(cfg.train.resume)
        if not (resume_from / "latest").is_file():
            raise ConfigError(f"train.resume: {resume_from} is not a checkpoint folder (no 'latest' file)")

    torch.manual_seed(cfg.train.seed)
    model = build(cfg, ndim, channels)
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
        _, client = engine.load_checkpoint(str(resume_from))
        start_step = int(client["step"])
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(to_yaml(cfg))
        (run / "deepspeed.json").write_text(json.dumps(ds_config, indent=2))
    dist.barrier()

    t = cfg.train
    dataset = TrainWindows([s for s in specs if s.split == "train"], window=cfg.data.window,
                           patching=cfg.patching, seed=t.seed,
                           foreground_bias=cfg.data.foreground_bias, augment=cfg.data.augment)
    sampler = StepSampler(start_step=start_step, steps=t.steps, grad_accum=t.grad_accum,
                          micro_batch=t.micro_batch, dp_rank=dp_rank, dp_size=dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.workers,
                                         persistent_workers=cfg.data.workers > 0)
    log = RunLog(run, total=t.steps, start=start_step, enabled=rank == 0)
    log.info(f"hrvit: {world} rank(s) = {dp_size} data-parallel x {sp} sequence-parallel, "
             f"ZeRO-{zero_stage(ds_config)}, {ndim}-D, {channels} channel(s), "
             f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"steps {start_step}->{t.steps}, run folder {run}")

    batches = iter(loader)
    samples = tokens = 0
    train_time = 0.0
    window_loss = []
    for step in range(start_step, t.steps):
        torch.manual_seed(hash((t.seed, step, dp_rank)) % 2**63)
        tick = time.perf_counter()
        step_loss = 0.0
        for _ in range(t.grad_accum):
            batch = next(batches)
            samples += len(batch["meta"]) * dp_size
            tokens += int(batch["valid"].sum()) * dp_size
            if topo is not None:
                batch = shard_batch(batch, sp, topo.sp_rank)
            logits = engine(batch["pixels"], batch["boxes"], batch["valid"], batch["image_shape"],
                            batch.get("key_valid"))
            valid = batch["valid"]
            sums = segmentation_sums(logits[valid], batch["target"][valid])
            if topo is not None:
                sums = sum_over_group(sums, topo.group)  # every rank of the group: the whole sequence's loss
            loss = loss_from_sums(sums, t.dice_weight, t.ce_weight)
            engine.backward(loss * grad_factor if grad_factor != 1 else loss)
            engine.step()
            step_loss += loss.item() / t.grad_accum
        train_time += time.perf_counter() - tick
        if not math.isfinite(step_loss):
            raise HrvitError(f"train: loss became {step_loss} at step {step + 1}; lower train.lr or check the data")
        window_loss.append(step_loss)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            mean = torch.tensor(sum(window_loss) / len(window_loss))
            dist.all_reduce(mean)
            log.metrics({"step": done, "loss": round(mean.item() / world, 6), "lr": scheduler.get_last_lr()[0],
                         "samples_per_s": round(samples / train_time, 3),
                         "tokens_per_s": round(tokens / train_time, 1)})
            window_loss = []
        log.advance(done)
        if t.ckpt_every and done % t.ckpt_every == 0 and done != t.steps:
            engine.save_checkpoint(str(run / CHECKPOINTS), tag=f"step{done:07d}", client_state={"step": done})
        if cfg.eval.every and done % cfg.eval.every == 0 and done != t.steps:
            log.metrics({"step": done, "eval": evaluate(cfg, engine, specs, run, done, topo)})
    engine.save_checkpoint(str(run / CHECKPOINTS), tag=f"step{t.steps:07d}", client_state={"step": t.steps})
    log.info("hrvit: evaluating at full resolution")
    result = evaluate(cfg, engine, specs, run, t.steps, topo)
    log.metrics({"step": t.steps, "eval": result})
    summary = {
        "dice_mean": result.get("dice_mean"),
        "dice_per_class": result.get("dice_per_class"),
        "eval_cases": result.get("cases"),
        "steps": t.steps,
        "resumed_from_step": start_step,
        "samples_per_s": round(samples / train_time, 3) if train_time else None,
        "tokens_per_s": round(tokens / train_time, 1) if train_time else None,
        "train_seconds": round(train_time, 2),
        "world_size": world,
        "dp_size": dp_size,
        "sp_size": sp,
        "zero_stage": zero_stage(ds_config),
        "patching": cfg.patching.mode,
        "patch_size": cfg.patching.patch_size,
        "final_loss": log.last_loss,
    }
    log.close()
    if rank == 0:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(f"hrvit: mean Dice {summary['dice_mean']} over {summary['eval_cases']} held-out case(s); "
                 f"summary in {run / 'summary.json'}, picture in {run / 'prediction.png'}")
    dist.barrier()
    return summary if rank == 0 else None


def load_weights(run: Path, cfg: Config, ndim: int, channels: int):
    """The model with the fp32 weights of the run's latest checkpoint (any ZeRO stage), no engine needed."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise ConfigError(f"{run}: no checkpoint found (expected {run / CHECKPOINTS / 'latest'})")
    model = build(cfg, ndim, channels)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt)))
    return model.eval()
