"""Throughput and scaling studies: step time, tokens/s, model FLOPs and MFU, peak memory and time shares.

    python tools/profile.py RECIPE [key=value ...] [--sweep AXIS=v1,v2 ...] [--sweep-file FILE]
                            [--warmup N] [--steps N] [--out DIR] [--ranks N] [--compare AXIS=A,B]

Each configuration (the recipe + overrides + one value of every sweep axis; the sweep is the
cartesian product) builds the real model and DeepSpeed engine, trains `--warmup` steps, then
measures `--steps` steps on synthetic slides generated once per resolution and cached under
data/profile_cache/<size>/. Axes are config keys (`train.micro_batch`) or short names:
resolution (synthetic slide side; whole slides, data.window=null), volume (a synthetic 4-channel
BraTS-layout gzip NIfTI case of that shape, ZxYxX such as 197x233x189 or one side for a cube, whole volume,
written once under data/profile_cache/volume-<shape>/; use it with launch/recipes/quickstart3d.yaml), mode,
L, p, preset, sp, zero, micro_batch, ckpt, precision (fp32/bf16/fp16) and ranks (processes; driver mode only).

Per configuration it reports step time (median, p10, p90 over measured steps; a step is the
slowest rank's), samples/s and tokens/s (real tokens, global and per device), model FLOPs per
step (hrvit/engine/flops.py: matmuls and convolutions, forward + backward = 3 x forward),
achieved TFLOP/s per device and MFU against a peak table (H100, H200, A100, MI250X per GCD;
otherwise, CPU included, the best of a square matmul benchmark run on every rank at once
before the configuration), peak memory (torch.cuda.max_memory_allocated, or the process's
VmHWM on CPU; worst rank), and shares of step time: data (waiting for the batch: reading and
patching), forward (model + loss), backward, optimizer (engine.step) and communication
(DeepSpeed's comms logger, which makes each collective blocking; communication happens inside
forward/backward/optimizer, so that share overlaps the others). Rows go to DIR/results.jsonl
and DIR/results.csv, a rich table to the console, and PNG plots to DIR for the axes the sweep
has: step time vs resolution per patching mode (log-log), peak memory per rank vs SP size,
tokens/s vs ranks, and tokens/s per configuration. `--compare AXIS=A,B` adds the speed-up of B
over A (median step time of A / B) for every setting of the other axes and its geometric mean, and the
speed-up of every part (below).

Parts of the step (columns part_<name>_s: seconds per step, the mean over measured steps and ranks; they add
up to the step): data (waiting for the batch), to_device (the step's sequence-parallel cut and copy of the
batch to the device), encoder_forward, decoder_forward, loss, decoder_backward, encoder_backward and
optimizer. Forward parts are cut by hooks on the encoder and decoder modules. The backward is cut where the
gradient reaches the encoder's hidden states: the encoder's outputs pass through views whose gradient hooks
mark the time, so decoder_backward runs from the start of backward to the last of those marks and
encoder_backward is the rest (autograd runs the decoder's nodes, created later, first). Reduction hooks of
ZeRO fall in the part whose backward fires them. With --encoder-only, decoder_forward is 0 and
decoder_backward is the stand-in loss's backward.

example (the 3-D step on a BraTS-size volume, with and without the pointwise decoder fuse):
    python tools/profile.py launch/recipes/quickstart3d.yaml parallel.sp_size=1 train.micro_batch=1 L=2048 \
        volume=197x233x189 --sweep model.decoder_fuse=conv,pointwise --compare model.decoder_fuse=conv,pointwise

How configurations run (and why):
- Driver mode (started as one plain process): every configuration runs in fresh child processes
  (`--ranks` or the `ranks` axis of them, a process group on a free local port, each child its
  own session) under a time limit. An out-of-memory kill, a crash or a hang ends only that
  configuration: its row records status `oom`, `error` or `timeout` and the sweep goes on. Fresh
  processes also give every configuration clean allocator state and peak-memory counters.
- Launcher mode (started by deepspeed, srun or mpirun with more than one rank, e.g. across
  nodes): the ranks are given, so configurations run one after another in these processes. A
  failure every rank sees alike (a bad value, heads not divisible by sp, out of memory in a
  symmetric layout) is caught, the ranks agree through an all_reduce of a failure flag, the row
  is recorded and the sweep goes on. A failure on some ranks only leaves the others in a
  collective until parallel.timeout_s. A configuration running past `--timeout` is recorded as
  `timeout` and ends the sweep (a hung rank cannot be recovered in-process); sweeps that may
  hang belong in driver mode.
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
# this file's folder is sys.path[0]: left there, "profile" would shadow the standard library's (cProfile needs it)
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "tools"]

from hrvit.config import Config, load_config, parse_override, zero_stage  # noqa: E402
from hrvit.errors import ConfigError, HrvitError  # noqa: E402
from hrvit.parallel.dist import release_shm_buffers  # noqa: E402

MIB = 2**20
CACHE = REPO / "data" / "profile_cache"
ALIASES = {
    "mode": "patching.mode", "L": "patching.tokens", "p": "patching.patch_size", "preset": "model.preset",
    "sp": "parallel.sp_size", "ring": "parallel.ring", "zero": "deepspeed.overrides.zero_optimization.stage",
    "micro_batch": "train.micro_batch", "ckpt": "model.checkpoint_activations",
}
SPECIAL = ("resolution", "volume", "precision", "ranks")
PRECISIONS = {"fp32": {}, "bf16": {"bf16": {"enabled": True}}, "fp16": {"fp16": {"enabled": True}}}
PEAK_TFLOPS = [  # dense tensor-core peaks per device (MI250X: per GCD) from the vendors' data sheets
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("MI250X", {"bf16": 191.5, "fp16": 191.5, "tf32": 47.9, "fp32": 47.9}),
]
FIELDS = [
    "index", "label", "status", "error", "mode", "image_side", "patch_size", "seq_len", "tokens_real",
    "preset", "model", "embed_dim", "depth", "num_heads", "params_m", "world_size", "sp_size", "dp_size",
    "zero_stage", "micro_batch", "grad_accum", "checkpointing", "precision", "warmup", "steps",
    "step_time_median_s", "step_time_p10_s", "step_time_p90_s", "samples_per_s", "samples_per_s_per_device",
    "tokens_per_s", "tokens_per_s_per_device", "flops_per_step", "tflops_per_s_per_device",
    "peak_tflops_per_device", "peak_source", "mfu", "peak_mem_mib", "held_mem_mib", "peak_mem_mib_per_rank",
    "share_data", "share_forward", "share_backward", "share_optimizer", "share_comm", "comm_s_per_step",
    "part_data_s", "part_to_device_s", "part_encoder_forward_s", "part_decoder_forward_s", "part_loss_s",
    "part_decoder_backward_s", "part_encoder_backward_s", "part_optimizer_s",
    "axes", "overrides", "env",
]
"""Columns of results.csv, in order (JSONL rows carry the same keys; axes and env are nested there)."""
PARTS = ("data", "to_device", "encoder_forward", "decoder_forward", "loss", "decoder_backward", "encoder_backward",
         "optimizer")
"""The parts of a training step, in the order they run (module docstring)."""


# --- the sweep -----------------------------------------------------------------------------------

def parse_axis(text: str) -> tuple[str, list]:
    """'mode=uniform,adaptive' -> ('mode', ['uniform', 'adaptive']); values are read as YAML."""
    if "=" not in text or not text.split("=", 1)[1]:
        raise ConfigError(f"--sweep {text!r}: expected AXIS=v1,v2,... e.g. resolution=512,1024")
    key, raw = text.split("=", 1)
    return key.strip(), [parse_override(f"{key}={v}")[1] for v in raw.split(",")]


def sweep_points(axes: dict[str, list]) -> list[dict]:
    """The cartesian product of the axes, first axis slowest."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())] or [{}]


def point_overrides(point: dict) -> list[str]:
    """Config overrides (key=JSON value) that one sweep point stands for."""
    out = []
    for key, value in point.items():
        if key == "resolution":
            out += ["data.layout=manifest", f"data.manifest={json.dumps(str(CACHE / str(value) / 'manifest.csv'))}",
                    "data.window=null"]
        elif key == "volume":
            folder = CACHE / f"volume-{'x'.join(map(str, volume_shape(value)))}"
            out += ["data.layout=brats", f"data.root={json.dumps(str(folder))}", "data.window=null"]
        elif key == "precision":
            if value not in PRECISIONS:
                raise ConfigError(f"precision: {value!r} is not one of {', '.join(PRECISIONS)}")
            for section, setting in PRECISIONS[value].items():
                out.append(f"deepspeed.overrides.{section}.enabled={json.dumps(setting['enabled'])}")
        elif key != "ranks":
            out.append(f"{ALIASES.get(key, key)}={json.dumps(value)}")
    return out


def point_label(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "recipe"


def load_point(recipe: str, overrides: list[str], point: dict) -> Config:
    return load_config(recipe, [*overrides, *point_overrides(point)])


def synthetic_manifest(size: int) -> Path:
    """Two synthetic slides of size^2 (real pyramidal TIFFs, both for training), written once."""
    from hrvit.data.synthetic import make_slides

    if not isinstance(size, int) or size < 16:
        raise ConfigError(f"resolution: {size!r} must be an integer >= 16 (the synthetic slide side in pixels)")
    folder = CACHE / str(size)
    if not (folder / "manifest.csv").is_file():
        tmp = CACHE / f"{size}.tmp-{os.getpid()}"
        make_slides(tmp, n=2, size=size, seed=0, tile=min(256, size), val_fraction=0.0)
        tmp.rename(folder)  # atomic: a half-written cache is never used
    return folder / "manifest.csv"


def volume_shape(value) -> tuple[int, int, int]:
    """The `volume` axis value (ZxYxX, e.g. 197x233x189, or one side N for a cube) as (z, y, x)."""
    text = str(value).lower().replace("*", "x")
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) == 1:
        shape = shape * 3
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"volume: {value!r} must be ZxYxX (e.g. 197x233x189) or one side, each >= 8 voxels")
    return shape


def synthetic_volume_root(value) -> Path:
    """One synthetic 4-channel case of `value`'s shape in the BraTS layout (gzip NIfTI, int16, non-identity
    affine, labels 0/1/2/4), written once; the folder is data.root for data.layout=brats. One case is a
    training case (assign_splits keeps a lone case for training)."""
    from hrvit.data.synthetic import make_volumes

    shape = volume_shape(value)
    folder = CACHE / f"volume-{'x'.join(map(str, shape))}"
    if not folder.is_dir():
        tmp = CACHE / f"volume-{'x'.join(map(str, shape))}.tmp-{os.getpid()}"
        make_volumes(tmp, n=1, shape=shape, seed=0)
        tmp.rename(folder)  # atomic: a half-written cache is never used
    return folder


# --- one configuration, in-process ---------------------------------------------------------------

def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


class PartClock:
    """Times inside one micro-batch from hooks: the encoder's forward start and end, the decoder's forward end,
    and the arrival of the loss's gradient at the encoder's hidden states (see the module docstring)."""

    def __init__(self, model):
        self.marks: dict[str, float] = {}
        self.grads: list[float] = []
        encoder = model.encoder if hasattr(model, "encoder") else model
        self.handles = [encoder.register_forward_pre_hook(lambda *_: self.mark("encoder_start")),
                        encoder.register_forward_hook(self._encoder_end)]
        if getattr(model, "decoder", None) is not None:
            self.handles.append(model.decoder.register_forward_hook(lambda *_: self.mark("decoder_end")))

    def reset(self) -> None:
        self.marks.clear()
        self.grads.clear()

    def mark(self, name: str) -> None:
        _sync()
        self.marks[name] = time.perf_counter()

    def _grad_arrived(self, grad):
        _sync()
        self.grads.append(time.perf_counter())
        return grad

    def _encoder_end(self, module, inputs, output):
        self.mark("encoder_end")
        hidden = list(output) if isinstance(output, (list, tuple)) else [output]
        views = []
        for h in hidden:  # a view's gradient is the decoder's (or the loss's) alone, not the later blocks'
            v = h.view_as(h)
            if v.requires_grad:
                v.register_hook(self._grad_arrived)
            views.append(v)
        return type(output)(views) if isinstance(output, (list, tuple)) else views[0]

    def split(self, start: float, forward_end: float, backward_end: float) -> dict[str, float]:
        """Seconds of each forward/backward part of the micro-batch whose forward began at `start`."""
        m = self.marks
        enc0, enc1 = m.get("encoder_start", start), m.get("encoder_end", start)
        dec1 = m.get("decoder_end", enc1)
        grad = max(self.grads) if self.grads else forward_end
        return {"to_device": enc0 - start, "encoder_forward": enc1 - enc0, "decoder_forward": dec1 - enc1,
                "loss": forward_end - dec1, "decoder_backward": grad - forward_end,
                "encoder_backward": backward_end - grad}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


_PEAKS: dict[str, float] = {}


def device_peak_tflops(precision: str) -> tuple[float, str]:
    """Peak dense TFLOP/s of this device: the table for known GPUs, else a measured matmul peak."""
    import torch

    kind = precision
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            kind = "tf32"
        for key, peaks in PEAK_TFLOPS:
            if key in name:
                return peaks[kind], f"table: {key} {kind} dense"
    if kind not in _PEAKS:
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
        _PEAKS[kind] = matmul_tflops(dtype)
    return _PEAKS[kind], f"measured: best {kind} matmul"


def matmul_tflops(dtype, n: int | None = None, repeat: int = 4) -> float:
    """Best TFLOP/s of an n x n matmul on this process's device and threads (after one warm-up)."""
    import torch

    gpu = torch.cuda.is_available()
    n = n or (8192 if gpu else 2048)
    device = "cuda" if gpu else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = math.inf
    for _ in range(repeat + 1):
        _sync()
        tick = time.perf_counter()
        a @ b
        _sync()
        best = min(best, time.perf_counter() - tick)
    return 2 * n**3 / best / 1e12


def measure(cfg: Config, warmup: int, steps: int, encoder_only: bool) -> dict:
    """Build the engine for `cfg` (hrvit's own set-up), run warm-up then measured steps of hrvit's own
    training step, timing its parts; returns this rank's raw figures."""
    import torch
    from deepspeed.comm import comm as ds_comm

    from hrvit.data.windows import StepSampler
    from hrvit.engine.flops import train_step_flops
    from hrvit.engine.memory import PeakMemory
    from hrvit.engine.session import precision as precision_of
    from hrvit.engine.session import start
    from hrvit.parallel import comm
    from hrvit.patching import collate

    if cfg.task != "segment":
        raise ConfigError(f"task: {cfg.task!r}; tools/profile.py measures segmentation training (task: segment)")
    session = start(cfg)
    session.check_data()
    precision = precision_of(session.ds_config)
    comm.barrier()  # every rank benchmarks at once, as they will compute
    peak_tflops, peak_source = device_peak_tflops(precision)
    torch.manual_seed(cfg.train.seed)
    model = session.build_model()
    net = model.encoder if encoder_only else model
    engine, _ = session.engine_for(net)
    t = cfg.train
    dataset = session.task.make_dataset(session.specs)
    sampler = StepSampler(start_step=0, steps=warmup + steps, grad_accum=t.grad_accum, micro_batch=t.micro_batch,
                          dp_rank=session.dp_rank, dp_size=session.dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0)
    memory = PeakMemory()
    clock = PartClock(net)
    batches = iter(loader)
    records, held = [], 0
    for step in range(warmup + steps):
        if step == warmup:
            comm.barrier()
            held = memory.reset()
            ds_comm.comms_logger.comms_dict.clear()
            ds_comm.configure(enabled=True, prof_all=True, verbose=False)
        rec = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
        rec.update({f"part_{k}": 0.0 for k in PARTS})
        rec.update(samples=0, tokens=0, flops=0, seq_len=0, side=0)
        _sync()
        start_time = time.perf_counter()
        for _ in range(t.grad_accum):
            tick = time.perf_counter()
            batch = next(batches)
            rec["samples"] += len(batch["meta"])
            rec["tokens"] += int(batch["valid"].sum())
            rec["seq_len"] = batch["valid"].shape[1]
            rec["side"] = max(int(s) for s in batch["image_shape"][0])
            rec["flops"] += train_step_flops(net, batch["valid"].shape[1], len(batch["meta"]))
            _sync()
            tock = time.perf_counter()
            rec["data"] += tock - tick
            forward_start = tock
            clock.reset()
            loss = encoder_loss(session, batch) if encoder_only else session.loss(batch)  # shard, copy, forward
            _sync()
            tick = time.perf_counter()
            rec["forward"] += tick - tock
            session.backward(loss)
            _sync()
            tock = time.perf_counter()
            rec["backward"] += tock - tick
            for part, seconds in clock.split(forward_start, forward_end=tick, backward_end=tock).items():
                rec[f"part_{part}"] += seconds
            engine.step()
            _sync()
            rec["optimizer"] += time.perf_counter() - tock
        rec["part_data"], rec["part_optimizer"] = rec["data"], rec["optimizer"]
        rec["total"] = time.perf_counter() - start_time
        if step >= warmup:
            records.append(rec)
    ds_comm.configure(enabled=False)
    clock.remove()
    comm_ms = sum(sum(entry[1]) for sizes in ds_comm.comms_logger.comms_dict.values() for entry in sizes.values())
    encoder = model.encoder
    return {
        "records": records, "peak": memory.peak(), "held": held, "comm_s": comm_ms / 1e3,
        "peak_tflops": peak_tflops, "peak_source": peak_source, "precision": precision,
        "zero_stage": zero_stage(session.ds_config), "dp_size": session.dp_size, "sp_rank": session.sp_rank,
        "params_m": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in net.parameters()) / 1e6,
        "model": {"embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": encoder.num_heads},
    }


def encoder_loss(session, batch: dict):
    """--encoder-only: a stand-in loss on the encoder's last hidden state (the decoder is not built), through the
    same sharding and device copy as the training step."""
    from hrvit.engine.segment import local_batch

    batch = local_batch(session, batch)
    out = session.engine(batch["pixels"], batch["boxes"], batch["valid"], batch["scale"], batch.get("key_valid"))
    return out[-1].float().square().mean()


def summarize(cfg: Config, per_rank: list[dict], warmup: int, encoder_only: bool) -> dict:
    """One row from every rank's raw figures: a step lasts as long as its slowest rank."""
    world = len(per_rank)
    first = per_rank[0]
    n = len(first["records"])
    step_times = [max(r["records"][i]["total"] for r in per_rank) for i in range(n)]
    leaders = [r for r in per_rank if r["sp_rank"] == 0]  # one rank per data-parallel replica
    total = sum(step_times)

    def over_leaders(key):
        return sum(rec[key] for r in leaders for rec in r["records"])

    rank_time = sum(rec["total"] for r in per_rank for rec in r["records"])

    def share(key):
        return round(sum(rec[key] for r in per_rank for rec in r["records"]) / rank_time, 4)

    samples, tokens, flops = over_leaders("samples"), over_leaders("tokens"), over_leaders("flops")
    achieved = flops / total / world / 1e12
    peak_tflops = statistics.fmean(r["peak_tflops"] for r in per_rank)
    p10, p50, p90 = np.percentile(step_times, [10, 50, 90])
    c = cfg
    return {
        "status": "ok", "error": "",
        "mode": c.patching.mode, "image_side": first["records"][0]["side"], "patch_size": c.patching.patch_size,
        "seq_len": first["records"][0]["seq_len"],
        "tokens_real": round(tokens / samples, 1),
        "preset": c.model.preset, "model": "encoder" if encoder_only else "segmenter", **first["model"],
        "params_m": round(first["params_m"], 3), "world_size": world, "sp_size": c.parallel.sp_size,
        "dp_size": first["dp_size"], "zero_stage": first["zero_stage"], "micro_batch": c.train.micro_batch,
        "grad_accum": c.train.grad_accum, "checkpointing": c.model.checkpoint_activations,
        "precision": first["precision"], "warmup": warmup, "steps": n,
        "step_time_median_s": round(float(p50), 5), "step_time_p10_s": round(float(p10), 5),
        "step_time_p90_s": round(float(p90), 5),
        "samples_per_s": round(samples / total, 4), "samples_per_s_per_device": round(samples / total / world, 4),
        "tokens_per_s": round(tokens / total, 1), "tokens_per_s_per_device": round(tokens / total / world, 1),
        "flops_per_step": int(flops / n), "tflops_per_s_per_device": round(achieved, 5),
        "peak_tflops_per_device": round(peak_tflops, 5), "peak_source": first["peak_source"],
        "mfu": round(achieved / peak_tflops, 4),
        "peak_mem_mib": round(max(r["peak"] for r in per_rank) / MIB, 1),
        "held_mem_mib": round(max(r["held"] for r in per_rank) / MIB, 1),
        "peak_mem_mib_per_rank": [round(r["peak"] / MIB, 1) for r in per_rank],
        "share_data": share("data"), "share_forward": share("forward"), "share_backward": share("backward"),
        "share_optimizer": share("optimizer"),
        "share_comm": round(sum(r["comm_s"] for r in per_rank) / rank_time, 4),
        "comm_s_per_step": round(sum(r["comm_s"] for r in per_rank) / world / n, 5),
        **{f"part_{k}_s": round(sum(rec[f"part_{k}"] for r in per_rank for rec in r["records"]) / world / n, 5)
           for k in PARTS},
    }


def classify(err: BaseException) -> tuple[str, str]:
    """(status, one-line message) of a configuration's failure."""
    import torch

    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    oom = isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(err).lower()
    return ("oom" if oom else "error"), text[:500]


def environment(world: int) -> dict:
    """Versions, device, world size and commit, so a row says what produced it."""
    import deepspeed
    import torch

    import hrvit

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines()
                 if cpuinfo.exists() else []) if line.startswith("model name")]
        device = f"CPU {names[0] if names else platform.processor()} ({os.cpu_count()} cores)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"hrvit": hrvit.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "device": device, "world_size": world,
            "threads_per_rank": torch.get_num_threads(), "git_commit": commit, "host": socket.gethostname(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_in_process(recipe: str, overrides: list[str], points: list[tuple[int, dict]], args, sink) -> None:
    """Launcher mode (and each driver child): run `points` here, every rank in step; rank 0 hands rows to sink."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from hrvit.parallel import comm
    from hrvit.parallel.dist import init_distributed

    rank, world = init_distributed(args.timeout)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(world)
    for index, point in points:
        base = {"index": index, "label": point_label(point), "axes": point, "overrides": overrides,
                "warmup": args.warmup, "steps": args.steps, "world_size": world, "env": env}

        def on_timeout(base=base):
            if rank == 0:
                sink({**base, "status": "timeout",
                      "error": f"still running after --timeout {args.timeout} s; the sweep stops here"})
            sys.stdout.flush()
            os._exit(124)

        watchdog = threading.Timer(args.timeout, on_timeout)
        watchdog.daemon = True
        watchdog.start()
        status, error, raw, cfg = "ok", "", None, None
        try:
            if "ranks" in point and point["ranks"] != world:
                raise ConfigError(f"ranks: {point['ranks']} differs from the {world} launched ranks "
                                  "(the ranks axis needs driver mode: run tools/profile.py without a launcher)")
            cfg = load_point(recipe, overrides, point)
            raw = measure(cfg, args.warmup, args.steps, args.encoder_only)
        except Exception as err:  # recorded; the ranks agree below and go on with the next point
            status, error = classify(err)
        finally:
            watchdog.cancel()
        gc.collect()
        get_accelerator().empty_cache()
        failed = comm.reduce_values([0 if status == "ok" else 1])[0]
        gathered = comm.all_gather_object((status, error) if failed else raw)
        if rank != 0:
            continue
        if failed:
            status, error = next(((s, e) for s, e in gathered if s != "ok"))
            bad = [r for r, (s, _) in enumerate(gathered) if s != "ok"]
            sink({**base, "status": status, "error": f"rank(s) {bad}: {error}"})
        else:
            sink({**base, **summarize(cfg, gathered, args.warmup, args.encoder_only)})


# --- driver mode: one group of child processes per configuration ---------------------------------

def run_child(index: int, point: dict, recipe: str, overrides: list[str], args, out: Path) -> dict:
    """Run one configuration in `ranks` fresh processes; the row they wrote, or why there is none."""
    from hrvit.parallel.env import free_port

    ranks = int(point.get("ranks", args.ranks))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    row_path = logs / f"{index:03d}.row.json"
    row_path.unlink(missing_ok=True)
    spec = {"recipe": recipe, "overrides": overrides, "point": point, "index": index, "row": str(row_path)}
    spec_path = logs / f"{index:03d}.spec.json"
    spec_path.write_text(json.dumps(spec))
    argv = [sys.executable, __file__, "--worker", str(spec_path), "--warmup", str(args.warmup), "--steps",
            str(args.steps), "--timeout", str(args.timeout)] + (["--encoder-only"] if args.encoder_only else [])
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(ranks),
            "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    base.setdefault("OMP_NUM_THREADS", str(args.threads or max(1, (os.cpu_count() or 1) // ranks)))
    procs = []
    for r in range(ranks):
        with open(logs / f"{index:03d}.rank{r}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + args.timeout + 180  # start-up (imports, DeepSpeed's op build) is not the config's
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out or any(p.returncode for p in procs):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    release_shm_buffers(base["MASTER_PORT"])
    base_row = {"index": index, "label": point_label(point), "axes": point, "overrides": overrides,
                "warmup": args.warmup, "steps": args.steps, "world_size": ranks}
    if row_path.is_file():
        return {**base_row, **json.loads(row_path.read_text())}
    if timed_out:
        return {**base_row, "status": "timeout", "error": f"no result within --timeout {args.timeout} s (+180 s start)"}
    codes = [p.returncode for p in procs]
    if -signal.SIGKILL in codes:
        return {**base_row, "status": "oom", "error": f"killed by SIGKILL (exit codes {codes}): most likely the "
                                                      "out-of-memory killer"}
    tail = (logs / f"{index:03d}.rank0.log").read_text().strip().splitlines()[-1:] or [""]
    return {**base_row, "status": "error", "error": f"exit codes {codes}: {tail[0][:400]}"}


def worker(spec_path: str, args) -> None:
    spec = json.loads(Path(spec_path).read_text())

    def sink(row):
        Path(spec["row"]).write_text(json.dumps(row))

    run_in_process(spec["recipe"], spec["overrides"], [(spec["index"], spec["point"])], args, sink)


# --- reports ---------------------------------------------------------------------------------------

def write_tables(rows: list[dict], out: Path) -> None:
    with open(out / "results.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for row in rows:
            w.writerow(["" if row.get(k) is None else json.dumps(row[k]) if isinstance(row.get(k), (dict, list))
                        else row[k] for k in FIELDS])


def print_table(rows: list[dict], axes: list[str], console) -> None:
    from rich.table import Table

    table = Table(title="hrvit profile", show_lines=False)
    for name in [*axes, "status", "step s (p10-p90)", "samples/s", "tokens/s", "tok/s/dev", "TFLOP/s/dev", "MFU",
                 "peak MiB", "data/fwd/bwd/opt/comm %"]:
        table.add_column(name, justify="left" if name in axes or name == "status" else "right")
    for row in rows:
        cells = [str(row["axes"].get(a, "")) for a in axes]
        if row["status"] != "ok":
            table.add_row(*cells, f"[red]{row['status']}[/]", row["error"][:60], *[""] * 7)
            continue
        shares = "/".join(f"{100 * row[k]:.0f}" for k in ("share_data", "share_forward", "share_backward",
                                                          "share_optimizer", "share_comm"))
        table.add_row(*cells, "ok", f"{row['step_time_median_s']:.3f} ({row['step_time_p10_s']:.3f}-"
                      f"{row['step_time_p90_s']:.3f})", f"{row['samples_per_s']:.2f}", f"{row['tokens_per_s']:,.0f}",
                      f"{row['tokens_per_s_per_device']:,.0f}", f"{row['tflops_per_s_per_device']:.4f}",
                      f"{100 * row['mfu']:.1f}%", f"{row['peak_mem_mib']:,.0f}", shares)
    console.print(table)
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return
    parts = Table(title="time per step by part (s; mean over steps and ranks; * = the largest part)")
    for name in [*axes, *PARTS]:
        parts.add_column(name, justify="left" if name in axes else "right")
    for row in ok:
        seconds = [row.get(f"part_{k}_s", 0.0) for k in PARTS]
        top = max(range(len(PARTS)), key=lambda i: seconds[i])
        parts.add_row(*[str(row["axes"].get(a, "")) for a in axes],
                      *[f"{v:.3f}{'*' if i == top else ''}" for i, v in enumerate(seconds)])
    console.print(parts)


def compare(rows: list[dict], axis: str, a, b, console) -> dict:
    """Speed-up of b over a (median step time a / b) for every setting of the other axes, and the geomean."""
    from rich.table import Table

    groups: dict[str, dict] = {}
    by_row: dict[str, dict] = {}
    for row in rows:
        if row["status"] == "ok" and row["axes"].get(axis) in (a, b):
            rest = point_label({k: v for k, v in row["axes"].items() if k != axis})
            groups.setdefault(rest, {})[row["axes"][axis]] = row["step_time_median_s"]
            by_row.setdefault(rest, {})[row["axes"][axis]] = row
    pairs = {k: v for k, v in groups.items() if a in v and b in v}
    table = Table(title=f"speed-up of {axis}={b} over {axis}={a} (median step time {a} / {b})")
    for name in ("setting", f"{a} step s", f"{b} step s", "speed-up"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    speedups = {k: v[a] / v[b] for k, v in pairs.items()}
    for k, v in pairs.items():
        table.add_row(k, f"{v[a]:.3f}", f"{v[b]:.3f}", f"{speedups[k]:.2f}x")
    geomean = math.exp(statistics.fmean(math.log(s) for s in speedups.values())) if speedups else None
    if geomean is not None:
        table.add_row("[bold]geometric mean[/]", "", "", f"[bold]{geomean:.2f}x[/]")
    console.print(table)
    part_speedups = {}  # per setting: seconds of each part under a and b, and a / b
    for k in pairs:
        ra, rb = by_row[k][a], by_row[k][b]
        part_speedups[k] = {part: {"a_s": ra.get(f"part_{part}_s"), "b_s": rb.get(f"part_{part}_s"),
                                   "speedup": (ra[f"part_{part}_s"] / rb[f"part_{part}_s"]
                                               if ra.get(f"part_{part}_s") and rb.get(f"part_{part}_s") else None)}
                            for part in PARTS}
    if part_speedups:
        parts = Table(title=f"per part: seconds per step with {axis}={a} -> {b} (speed-up)")
        parts.add_column("setting")
        for part in PARTS:
            parts.add_column(part, justify="right")
        for k, v in part_speedups.items():
            parts.add_row(k, *[f"{v[p]['a_s']:.3f}->{v[p]['b_s']:.3f}" + (f" ({v[p]['speedup']:.2f}x)"
                                                                        if v[p]["speedup"] else "") for p in PARTS])
        console.print(parts)
    return {"axis": axis, "a": a, "b": b, "speedups": speedups, "geomean": geomean, "parts": part_speedups}


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The plots the sweep's axes allow; tokens/s per configuration always."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    written = []

    def lines(x_key, drop_axes, path, y_key, xlabel, ylabel, title, loglog=False):
        if len({r[x_key] for r in ok}) < 2:
            return
        series: dict[str, list] = {}
        for r in ok:
            name = point_label({k: v for k, v in r["axes"].items() if k not in drop_axes})
            series.setdefault(name, []).append((r[x_key], r[y_key]))
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if loglog:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / path, dpi=120)
        plt.close(fig)
        written.append(out / path)

    lines("image_side", {"resolution"}, "step_time_vs_resolution.png", "step_time_median_s", "image side (pixels)",
          "median step time (s)", "step time vs resolution", loglog=True)
    lines("sp_size", {"sp", "parallel.sp_size", "ranks"}, "memory_vs_sp.png", "peak_mem_mib",
          "sequence-parallel size", "peak memory per rank, worst rank (MiB)", "memory per rank vs SP")
    lines("world_size", {"ranks", "sp", "parallel.sp_size"}, "tokens_vs_ranks.png", "tokens_per_s", "ranks",
          "tokens/s (global)", "throughput vs ranks")
    if ok:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(ok) + 1.5))
        ax.barh([r["label"] for r in ok], [r["tokens_per_s"] for r in ok])
        ax.set(xlabel="tokens/s (global)", title="throughput per configuration")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "tokens_per_config.png", dpi=120)
        plt.close(fig)
        written.append(out / "tokens_per_config.png")
    return written


# --- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tools/profile.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="axes (AXIS in --sweep, --compare and overrides):\n"
               "  resolution   synthetic slide side in pixels; whole slides (data.window=null), cached under "
               "data/profile_cache/\n"
               "  volume       synthetic 4-channel BraTS-layout gzip NIfTI case, ZxYxX (e.g. 197x233x189) or one side;"
               " whole volume, cached under data/profile_cache/ (use the 3-D recipe)\n"
               + "".join(f"  {k:<12} {v}\n" for k, v in ALIASES.items())
               + "  precision    fp32, bf16 or fp16 (through deepspeed.overrides)\n"
               "  ranks        processes per configuration (driver mode only)\n"
               "  any config key section.key (e.g. data.workers)\n\n"
               "modes: run plainly, each configuration runs in --ranks child processes under --timeout (driver);\n"
               "under deepspeed/srun/mpirun with several ranks, configurations run in those processes in turn.\n\n"
               "example: python tools/profile.py launch/recipes/quickstart.yaml parallel.sp_size=1 train.micro_batch=1"
               " \\\n  --sweep resolution=512,1024 --sweep mode=uniform,adaptive L=1024"
               " --compare mode=uniform,adaptive")
    ap.add_argument("recipe", nargs="?", help="YAML recipe (launch/recipes/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value for every configuration (config keys or axis names)")
    ap.add_argument("--sweep", action="append", default=[], metavar="AXIS=V1,V2",
                    help="an axis of the sweep (repeatable; the sweep is the cartesian product)")
    ap.add_argument("--sweep-file", metavar="FILE",
                    help="YAML mapping AXIS: [values] (a scalar is a fixed override); combined with --sweep")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per configuration (default 5)")
    ap.add_argument("--out", default="runs/profile", help="folder for results and plots (default runs/profile)")
    ap.add_argument("--ranks", type=int, default=1, help="driver mode: processes per configuration (default 1)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per rank (default: cores / ranks in driver mode, unchanged under a launcher)")
    ap.add_argument("--timeout", type=int, default=900,
                    help="seconds a configuration may run before it is stopped and recorded as 'timeout' (default 900)")
    ap.add_argument("--compare", metavar="AXIS=A,B", help="print the speed-up of B over A per row and its geomean")
    ap.add_argument("--encoder-only", action="store_true",
                    help="measure the ViT encoder alone (no decoder; loss = mean square of the last hidden state)")
    ap.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return ap


def read_axes(args) -> dict[str, list]:
    axes: dict[str, list] = {}
    if args.sweep_file:
        path = Path(args.sweep_file)
        if not path.is_file():
            raise ConfigError(f"--sweep-file {path}: not found")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"--sweep-file {path}: expected a mapping AXIS: [values]")
        axes.update({str(k): v if isinstance(v, list) else [v] for k, v in tree.items()})
    for text in args.sweep:
        key, values = parse_axis(text)
        axes[key] = values
    return axes


def check_args(args) -> None:
    for key in ("warmup", "ranks", "timeout"):
        if getattr(args, key) < (0 if key == "warmup" else 1):
            raise ConfigError(f"--{key}: {getattr(args, key)} is too small")
    if args.steps < 1:
        raise ConfigError(f"--steps: {args.steps} must be >= 1")


def main() -> None:
    args = build_parser().parse_intermixed_args()
    if args.worker:
        worker(args.worker, args)
        return
    try:
        sweep(args)
    except HrvitError as err:
        print(f"tools/profile.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def sweep(args) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from hrvit.parallel.env import discover

    if not args.recipe:
        raise ConfigError("RECIPE: give a recipe, e.g. launch/recipes/quickstart.yaml")
    check_args(args)
    fixed = list(args.overrides)
    axes = read_axes(args)
    for text in list(fixed):  # axis names used as fixed overrides (mode=adaptive) become one-value axes
        key, value = parse_override(text)
        if key in ALIASES or key in SPECIAL:
            axes.setdefault(key, [value])
            fixed.remove(text)
    points = sweep_points(axes)
    problems = [_config_error(args.recipe, fixed, p) for p in points]
    if all(problems) and len(set(problems)) == 1:  # the sweep as a whole is wrong, not one configuration
        raise ConfigError(problems[0])
    comparison = parse_axis(args.compare) if args.compare else None
    if comparison and (comparison[0] not in axes or len(comparison[1]) != 2):
        raise ConfigError(f"--compare {args.compare}: needs AXIS=A,B with AXIS one of the sweep's axes "
                          f"({', '.join(axes) or 'none'})")
    launched = int(discover()["WORLD_SIZE"]) > 1
    if launched:
        from hrvit.parallel.dist import init_distributed

        rank0 = init_distributed(args.timeout)[0] == 0
    else:
        rank0 = True
    out = Path(args.out)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        for size in sorted({p["resolution"] for p in points if "resolution" in p}, key=str):
            console.log(f"synthetic slides {size}^2: {synthetic_manifest(size)}")
        for shape in sorted({p["volume"] for p in points if "volume" in p}, key=str):
            console.log(f"synthetic volume {shape}: {synthetic_volume_root(shape)}")
    if launched:
        from hrvit.parallel import comm

        comm.barrier()
        if rank0:
            release_shm_buffers(os.environ["MASTER_PORT"])  # every rank has mapped them by now
    rows: list[dict] = []
    with Progress(console=console, disable=not rank0) as progress:
        task = progress.add_task("sweep", total=len(points))

        def sink(row):
            rows.append(row)
            write_tables(rows, out)  # after every configuration: a killed sweep keeps what it measured
            figure = f"{row['step_time_median_s']:.3f} s/step" if row["status"] == "ok" else row["error"][:120]
            progress.console.log(f"[{len(rows)}/{len(points)}] {row['label']}: {row['status']} {figure}")
            progress.advance(task)

        if launched:
            run_in_process(args.recipe, fixed, list(enumerate(points)), args, sink)
        else:
            for index, point in enumerate(points):
                sink(run_child(index, point, args.recipe, fixed, args, out))
    if not rank0:
        return
    print_table(rows, list(axes), console)
    if comparison:
        result = compare(rows, comparison[0], *comparison[1], console)
        (out / "compare.json").write_text(json.dumps(result, indent=2))
    for path in plot(rows, out):
        console.log(f"plot: {path}")
    console.log(f"rows: {out / 'results.jsonl'}, {out / 'results.csv'}")


def _config_error(recipe: str, overrides: list[str], point: dict) -> str | None:
    """Why this configuration cannot load (bad values are recorded per row), or None."""
    try:
        load_point(recipe, overrides, point)
    except ConfigError as err:
        return str(err)
    return None


if __name__ == "__main__":
    from hrvit.parallel.dist import leave

    main()
    leave(0)
