"""One set-up and one training step, shared by `hrvit train`, `hrvit eval`, tools/profile.py and
tools/memory_sp.py, so a fix to either lands everywhere at once.

`start(cfg)` joins the process group, lays out the sequence-parallel x data-parallel ranks and
checks the precision against the hardware; `Session.check_data()` finds and checks the cases;
`Session.engine_for(model)` applies sequence parallelism to the model and builds the DeepSpeed
engine; `Session.loss(batch)` is the loss of one micro-batch (the task's: for segmentation this
rank's shard of the tokens, copied to the device, and the loss of the whole sequence);
`Session.backward(loss)` scales it for DeepSpeed's gradient reduction.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hrvit.config import Config, deepspeed_config, precision_of
from hrvit.data.datasets import CaseSpec, discover
from hrvit.data.preflight import FileCache, check_finite, check_token_budget, overlap_message, split_overlaps
from hrvit.errors import ConfigError, DataError, HrvitError
from hrvit.parallel import comm
from hrvit.parallel.dist import init_distributed
from hrvit.parallel.topology import SequenceParallel, check_parallel, grad_sum_factor


def class_names(cfg: Config) -> list[str]:
    return cfg.data.class_names or [f"class{i}" if i else "background" for i in range(cfg.data.num_classes)]


def find_cases(cfg: Config) -> list[CaseSpec]:
    specs = discover(cfg.data.layout, root=cfg.data.root, manifest=cfg.data.manifest,
                     val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                     allow_outside_root=cfg.data.allow_outside_root)
    for spec in specs:
        spec.mpp = cfg.data.mpp
    return specs


def task_for(cfg: Config):
    """The task object (segment or classify): dataset, model, loss, evaluation and summary of `cfg.task`."""
    if cfg.task == "classify":
        from hrvit.engine.classify import ClassifyTask

        return ClassifyTask(cfg)
    from hrvit.engine.segment import SegmentTask

    return SegmentTask(cfg)


def check_cases(cfg: Config, specs: list[CaseSpec], bad: list | None = None) -> tuple[int, int]:
    """Open every case, check geometry, size, label values and image pixels (no NaN/Inf), then across cases: one
    kind of image, a training case, no image in two splits (unless data.allow_split_overlap) and an adaptive token
    budget the images can fill; returns (ndim, channels).
    With `bad` (a list), failing cases are appended to it as (spec, message) instead of raising."""
    task = task_for(cfg)
    geometry, shapes = set(), []
    cache = FileCache()  # pixel scans and hashes of unchanged files are not repeated
    try:
        for spec in specs:
            try:
                case = task.check_case(spec)
                check_finite(spec, cache, cfg.data.nonfinite)
            except DataError as err:
                if bad is None:
                    raise
                bad.append((spec, str(err)))
                continue
            geometry.add((len(case.image.shape), case.image.channels))
            shapes.append((spec, tuple(case.image.shape)))
        bad_ids = {spec.id for spec, _ in bad or []}
        if not geometry:
            raise DataError(f"data: none of the {len(specs)} case(s) is readable; run hrvit check-data")
        if len(geometry) != 1:
            raise ConfigError(f"data: cases differ in dimensionality/channels {sorted(geometry)}; "
                              "one run needs one kind")
        if not any(s.split == "train" and s.id not in bad_ids for s in specs):
            raise ConfigError("data: no case has split 'train'")
        if not cfg.data.allow_split_overlap:
            overlaps = split_overlaps([s for s in specs if s.id not in bad_ids], cache)
            if overlaps:
                more = f" ({len(overlaps) - 1} more such pair(s): run hrvit check-data)" if len(overlaps) > 1 else ""
                raise DataError(f"data: {overlap_message(overlaps[0])}{more}")
        check_token_budget(cfg, shapes)
    finally:
        cache.save()
    return geometry.pop()


def on_rank0_then_share(fn):
    """Run `fn` on rank 0 only and give every rank its result or its error (no rank is left waiting)."""
    result, error = None, None
    if torch.distributed.get_rank() == 0:
        try:
            result = fn()
        except HrvitError as err:
            error = (type(err), str(err))
    result, error = comm.broadcast_object((result, error))
    if error is not None:
        raise error[0](error[1])
    return result


def precision(ds_config: dict) -> str:
    """'bf16', 'fp16' or 'fp32', as the DeepSpeed config asks."""
    return precision_of(ds_config)


def parameter_count(model) -> int:
    """Parameters of the whole model, also under ZeRO-3, where each rank holds a shard and `numel()` is 0."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def native_cpu_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (x86 avx512_bf16/amx_bf16, Arm bf16). Without it torch emulates
    bf16 matrix products, measured about 10x slower than fp32 (issue 17). `cpuinfo`: /proc/cpuinfo's text."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # unknown (not Linux): say nothing rather than something wrong
    flags = {f for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for f in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_slow_bf16(ds_config: dict) -> None:
    """One line on stderr when bf16 is asked of a CPU that only emulates it."""
    from deepspeed.accelerator import get_accelerator

    if precision(ds_config) == "bf16" and get_accelerator().device_name() == "cpu" and not native_cpu_bf16():
        print("hrvit: warning: bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16 flag in /proc/cpuinfo) is "
              "emulated, about 10x slower than fp32; consider train.precision=fp32", file=sys.stderr, flush=True)


def check_precision(ds_config: dict) -> None:
    """ConfigError for a precision this hardware or DeepSpeed cannot train in, before anything is built."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    bf16, fp16 = ds_config.get("bf16", {}), ds_config.get("fp16", {})
    if bf16.get("enabled") and fp16.get("enabled"):
        raise ConfigError("deepspeed: bf16.enabled and fp16.enabled are both true; choose one precision")
    if bf16.get("enabled") and not acc.is_bf16_supported():
        raise ConfigError(f"deepspeed: bf16.enabled=true, but this {acc.device_name()} device has no bf16 "
                          "support (NVIDIA: Ampere or newer); use fp16 with dynamic loss scaling, or fp32")
    if fp16.get("enabled") and not acc.is_fp16_supported():
        raise ConfigError(f"deepspeed: fp16.enabled=true, but the {acc.device_name()} accelerator does not train "
                          "in fp16; use bf16 or fp32")
    if fp16.get("enabled") and fp16.get("loss_scale", 0) == 1:
        raise ConfigError("deepspeed: fp16.loss_scale=1 trains fp16 without loss scaling, where small gradients "
                          "underflow to zero; set fp16.loss_scale=0 (dynamic) or a static power of two such as 1024")


@dataclass
class Session:
    """This process's place in the job and what every entry point builds from a config."""

    cfg: Config
    rank: int
    world: int
    sp: SequenceParallel | None
    ds_config: dict
    task: object
    engine: object = None
    ndim: int | None = None
    channels: int | None = None
    specs: list[CaseSpec] = field(default_factory=list)

    @property
    def sp_size(self) -> int:
        return self.sp.size if self.sp is not None else 1

    @property
    def sp_rank(self) -> int:
        return self.sp.sp_rank if self.sp is not None else 0

    @property
    def dp_size(self) -> int:
        return self.world // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def device(self) -> torch.device:
        from deepspeed.accelerator import get_accelerator

        return self.engine.device if self.engine is not None else torch.device(
            get_accelerator().current_device_name())

    def check_data(self, bad: list | None = None) -> list[CaseSpec]:
        """Find and check the cases on rank 0 (every rank gets the answer or the error); sets ndim, channels
        and specs (without the cases in `bad`, when bad cases are skipped)."""
        cfg = self.cfg
        specs = on_rank0_then_share(lambda: find_cases(cfg))
        self.ndim, self.channels, dropped = on_rank0_then_share(
            lambda: (*check_cases(cfg, specs, bad), bad))
        if bad is not None:
            bad[:] = dropped
        bad_ids = {spec.id for spec, _ in dropped or []}
        self.specs = [s for s in specs if s.id not in bad_ids]
        return self.specs

    def build_model(self):
        """The task's model for the checked data, with sequence parallelism applied when the run has it."""
        return self.parallelize(self.task.build_model(self.ndim, self.channels))

    def parallelize(self, model):
        """Give the encoder attention over this rank's SP group (Ulysses, ring or both) and the decoder its
        neighbours' border pixels from the group (a no-op without SP)."""
        if self.sp is not None:
            from hrvit.parallel.attention import sequence_parallel_core

            check_parallel(self.sp.size, self.world, model.encoder.num_heads, self.sp.ring)
            model.encoder.set_attention_core(sequence_parallel_core(self.sp))
            if hasattr(model, "decoder"):
                model.decoder.set_group(self.sp.group)
        return model

    def engine_for(self, model):
        """The DeepSpeed engine (and its LR scheduler) training `model`; the model must be parallelized."""
        import deepspeed

        self.engine, _, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, mpu=self.sp)
        return self.engine, scheduler

    def loss(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch (under SP: of the whole sequence, on every rank of the group)."""
        return self.task.loss(self, batch)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through DeepSpeed, scaled so its reduction over the ranks gives the true gradient."""
        factor = grad_sum_factor(self.ds_config, self.sp_size)
        self.engine.backward(loss * factor if factor != 1 else loss)


_replicas: dict[int, torch.nn.Module] = {}


def whole_model(engine, build):
    """The model to run outside training's lock-step: a plain model as it is, the engine's module, or under
    ZeRO-3 a whole local copy (made by `build()` once, refreshed by one gather of the shards, the same on every
    rank), since ZeRO-3's per-module gathers need every rank to run the same forward passes."""
    module = getattr(engine, "module", engine)
    if module is engine or engine.zero_optimization_stage() != 3:
        return module
    import deepspeed

    replica = _replicas.get(id(module))
    if replica is None:
        replica = _replicas[id(module)] = build().to(engine.device)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        for mine, full in zip(replica.parameters(), params):
            mine.copy_(full)
        for mine, full in zip(replica.buffers(), module.buffers()):
            mine.copy_(full)
    return replica


def start(cfg: Config) -> Session:
    """Join the process group, lay out SP x DP, derive the DeepSpeed config and check its precision.
    Collective: every rank calls it at the same point."""
    rank, world = init_distributed(cfg.parallel.timeout_s)
    sp, ring = cfg.parallel.sp_size, cfg.parallel.ring
    check_parallel(sp, world, ring=ring)
    topo = SequenceParallel(sp, ring) if sp > 1 else None  # collective: every rank, before any can fail
    ds_config = deepspeed_config(cfg, world // sp)
    check_precision(ds_config)
    if rank == 0:
        warn_slow_bf16(ds_config)
    grad_sum_factor(ds_config, sp)  # refuses settings that scale gradients wrongly under SP
    return Session(cfg=cfg, rank=rank, world=world, sp=topo, ds_config=ds_config, task=task_for(cfg))
