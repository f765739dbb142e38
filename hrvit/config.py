"""Typed run configuration: YAML files plus dotted overrides, validated before anything runs.

A run is described by one `Config`. `load_config(path, overrides)` reads a YAML recipe,
applies `section.key=value` overrides (values parsed as YAML), rejects unknown keys with the
closest valid one suggested, checks every type and the combinations that cannot work, and
returns the config. `to_yaml(cfg)` writes the resolved form that reproduces the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from hrvit.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DataConfig:
    layout: Literal["manifest", "paip", "brats"] = "manifest"
    """How cases are found: a manifest file (CSV/JSON), a PAIP-2019 folder or a BraTS-2021 folder."""
    manifest: str | None = None
    """Manifest path (layout=manifest): in a recipe relative to the recipe's folder, on the command line to the
    current folder (docs/data.md); image/label paths inside it are relative to the manifest's folder."""
    root: str | None = None
    """Dataset folder (layout=paip or brats; with layout=manifest, a folder holding manifest.csv/.json); relative
    like data.manifest."""
    num_classes: int = 3
    """Label classes including background (0); labels must lie in [0, num_classes)."""
    class_names: list[str] | None = None
    """Optional names for reports, one per class."""
    window: int | None = 256
    """Edge of the square/cubic window the model sees, in level-0 pixels (in working pixels of data.mpp when
    that is set); null = the whole image."""
    mpp: float | None = None
    """Working resolution of 2-D slides in microns per pixel (e.g. 0.5 for 20x): every slide is cut at this
    physical scale whatever its scanner magnification (a token of patch_size working pixels covers
    patch_size x mpp microns; data.window and patching.min_leaf/max_leaf count working pixels), read from the
    pyramid level that suits. Slides need resolution tags (openslide.mpp-x or TIFF XResolution) and a
    resolution at least this fine. Predictions and Dice stay at level-0 resolution. null = level-0 pixels."""
    foreground_bias: float = 0.5
    """Probability that a training window is centred on a labelled (non-zero) pixel."""
    augment: bool = True
    """Random flips of training windows (seeded per sample)."""
    val_fraction: float = 0.2
    """Share of cases held out for evaluation when the layout has no split."""
    workers: int = 0
    """DataLoader worker processes per rank (0 = read in the training process)."""
    skip_bad_samples: bool = False
    """Skip cases and samples that cannot be read (listed in skipped_samples.jsonl in the run folder, counted in
    summary.json) instead of stopping the run; the substitute sample is drawn deterministically."""
    allow_outside_root: bool = False
    """Let manifest paths lead outside the manifest's folder ('..' or absolute paths)."""
    allow_split_overlap: bool = False
    """Accept the same image file (or identical pixels) in two splits; otherwise that is an error, since the
    validation Dice would then be measured on training data."""
    cache_gb: float = 2.0
    """Decoded NIfTI volumes kept in memory per process, in GB (0 = off): each case's channels and label are
    decompressed once, then training windows and evaluation read from memory, the least recently used files evicted
    beyond the budget. A .nii.gz cannot seek, so without it every window decompresses its files up to the window (a
    BraTS case, 4 int16 channels and a uint8 label: 80 MB decoded, 0.3-0.5 s of CPU per window on 2 cores).
    Every data-loader worker (data.workers) is its own process with its own cache: memory per rank is up to
    (workers + 1) x cache_gb."""
    nonfinite: Literal["error", "zero"] = "error"
    """NaN/Inf voxels of an image: 'error' refuses the case before a run starts (naming the file and how many
    voxels); 'zero' reads them as 0, which volume normalisation treats as background (outside the head), and
    summary.json counts them per case (`nonfinite_voxels`)."""
    regions: dict | None = None
    """Dice regions scored next to the classes: region name -> the classes (after any label mapping) whose union
    it is, e.g. {WT: [1, 2, 3], TC: [1, 3], ET: [3]}. null = the layout's default: BraTS gets these three (raw
    labels 1 NCR, 2 ED, 4 ET are classes 1, 2, 3: whole tumour = all, tumour core = NCR + ET, enhancing tumour =
    ET); other layouts none. {} = no regions."""


@dataclass
class PatchingConfig:
    mode: Literal["uniform", "adaptive"] = "uniform"
    """Tokenizer: 'uniform' (a grid of base-size patches) or 'adaptive' (quadtree/octree leaves, small where
    the image is detailed, each resampled to p). With adaptive, set data.window to null so the tree covers the
    whole image; a window gives adaptive patching inside each window."""
    patch_size: int = 16
    """Base patch size p (a power of two >= 4); every token is p x p (x p) pixels."""
    tokens: int | None = None
    """Adaptive: tokens per sample L. Budget mode (no threshold): exactly L, real leaves then masked padding.
    Threshold mode: at most L leaves (null = no cap)."""
    threshold: float | None = None
    """Adaptive: null = budget mode; a value >= 0 = threshold mode: split while a node's detail mass (mean
    detail in [0, 1] x its area in p-sized patches) exceeds it (variable length)."""
    min_leaf: int | None = None
    """Adaptive: smallest leaf edge in level-0 pixels, a power-of-two multiple of p (null = p)."""
    max_leaf: int | None = None
    """Adaptive: largest leaf edge, a power-of-two multiple of p (null = the largest that fits the image's
    shortest side)."""
    scorer: Literal["edge", "variance"] = "edge"
    """Adaptive: detail score, 'edge' (gradient-magnitude edge density) or 'variance' (intensity standard
    deviation)."""
    tissue_mask: bool = False
    """Adaptive: zero the detail outside tissue (Otsu on saturation for RGB, on intensity otherwise), so
    background gets no small leaves."""
    jitter: float = 0.0
    """Adaptive, training only: the scorer's thresholds are multiplied by exp(U(-jitter, jitter)) per sample
    (seeded augmentation)."""


@dataclass
class ModelConfig:
    preset: str = "nano"
    """Encoder preset: nano, tiny, small, base (see hrvit.models.PRESETS)."""
    embed_dim: int | None = None
    """Override the preset's width."""
    depth: int | None = None
    """Override the preset's number of blocks (a multiple of 4: the decoder taps d/4..d)."""
    num_heads: int | None = None
    """Override the preset's attention heads."""
    decoder_channels: list[int] | None = None
    """Override the decoder widths, one per upsampling stage."""
    decoder_fuse: Literal["conv", "pointwise", "add"] = "conv"
    """How each decoder stage mixes the upsampled map with its skips: `conv` (two 3^D convs over their
    concatenation), `pointwise` (a 1^D conv, then one 3^D conv) or `add` (one 3^D conv over their sum). In 3-D
    `add` makes the decoder's backward 2.2x cheaper and the 3-D quick start 1.47x faster, at 0.940 instead of
    0.953 mean Dice there (docs/performance.md)."""
    drop_path: float = 0.0
    """Stochastic depth rate."""
    checkpoint_activations: bool = False
    """Recompute block activations in backward to save memory."""
    init_from: str | None = None
    """A local timm ViT checkpoint (.pth/.bin/.safetensors) to initialise the encoder; relative like data.manifest."""


@dataclass
class ParallelConfig:
    sp_size: int = 1
    """Sequence-parallel group size (1 = off): the Ulysses degree times `ring`."""
    ring: int = 1
    """Ring-attention degree inside each SP group (divides sp_size). Ulysses needs sp_size / ring to divide the
    heads; ring attention has no head limit, so e.g. the tiny preset (3 heads) runs SP 4 as ring 4."""
    timeout_s: int = 300
    """Collective timeout: a lost rank stops the job after this many seconds instead of hanging."""
    zero_stage: int | None = None
    """ZeRO stage 0-3, written into the DeepSpeed config over deepspeed.config's stage (null = the JSON's);
    deepspeed.overrides setting another stage is an error."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the run."""
    micro_batch: int = 4
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up then cosine decay)."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 50
    """Linear warm-up steps (a run shorter than that warms up over its first half)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    dice_weight: float = 1.0
    """Weight of the soft Dice term of the loss."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term of the loss."""
    seed: int = 0
    """Seed for the model, the data order and every random transform."""
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    """Training precision, written into the DeepSpeed config (null = as deepspeed.config says; the shipped JSONs
    train fp32). A JSON or deepspeed.overrides that enables another precision is an error."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl and the log."""
    ckpt_every: int = 0
    """Steps between checkpoints (0 = only at the end)."""
    resume: str | None = None
    """'auto' (latest complete checkpoint in output.dir, if any) or a checkpoint folder to resume from (a
    run's checkpoints/ folder or one step folder in it), relative to the current folder."""
    keep_last: int = 3
    """Complete checkpoints kept in output.dir/checkpoints; older ones are deleted (0 = keep all)."""
    max_bad_steps: int = 5
    """Steps in a row with a non-finite loss or gradients that are skipped (no update) before the run stops."""
    stop_grace_s: float = 90.0
    """After SIGTERM/SIGUSR1/SIGINT, seconds the running step and its checkpoint may take; past them (or on a
    second such signal) the run exits at once (status 75) and resumes from its last complete checkpoint. Keep
    it below the scheduler's warning time (launch/*.sbatch: 120 s)."""


@dataclass
class EvalConfig:
    every: int = 0
    """Steps between evaluations (0 = only at the end)."""
    split: str = "val"
    """Which cases to evaluate."""
    batch: int = 8
    """Windows per forward pass at evaluation."""
    max_cases: int | None = None
    """Evaluate at most this many cases (null = all)."""
    overlap: float = 0.0
    """Windowed evaluation and prediction (data.window set): neighbouring windows overlap by this fraction of the
    window (stride = window x (1 - overlap)), and their class probabilities are blended (eval.blend); 0 = windows
    side by side, the last one deciding where the grid's edge windows overlap (the labels are then exact per-token
    argmaxes). In [0, 1); 0.5 is a common choice: ~4x (2-D) / ~8x (3-D) the windows, no seams at window borders."""
    blend: Literal["gaussian", "linear", "constant"] = "gaussian"
    """How overlapping windows' probabilities are weighted (eval.overlap > 0): 'gaussian' (sigma = window / 8 on
    each axis, peak at the window centre), 'linear' (a tent from the centre to the border) or 'constant'."""
    progress_s: float = 10.0
    """Seconds between progress lines (windows done/total, elapsed, ETA) during evaluation and prediction, printed
    by rank 0; a line also ends every case (0: a line after every batch of windows)."""


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, summary.json, checkpoints, pictures. A relative path is relative
    to the current folder (not the recipe's), like train.resume: runs are written where you work."""
    picture: bool = True
    """Write a PNG (image | truth | prediction) of the first evaluated case."""


@dataclass
class LoggingConfig:
    """Metrics for plotting, written by rank 0 at every logged step (train.log_every) and evaluation."""

    csv: bool = False
    """Append step,time,name,value rows to RUN/metrics.csv (names: train/loss, train/lr, train/samples_per_s,
    train/tokens_per_s, eval/dice_mean, eval/dice_CLASS for each class, ...; classify: eval/accuracy, ...)."""
    tensorboard: bool = False
    """Write the same scalars as TensorBoard events into RUN/tensorboard (needs pip install 'hrvit[tensorboard]';
    view with tensorboard --logdir RUN/tensorboard)."""


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (ZeRO stage, precision); relative like data.manifest, and hrvit's shipped ds_configs/*.json
    are found by that name from any folder."""
    overrides: dict = field(default_factory=dict)
    """Merged into the JSON (nested dicts merge key by key)."""


@dataclass
class IPSConfig:
    """Iterative patch selection (task: classify): candidates are a grid of `patch`-sized squares."""

    patch: int = 64
    """Side of a candidate patch in level-0 pixels (a multiple of patching.patch_size: the encoder cuts each
    patch into (patch / patching.patch_size)^2 tokens)."""
    stride: int | None = None
    """Step of the candidate grid (null = patch: no overlap)."""
    memory: int = 32
    """M: patches kept per image and trained on with gradients. Images with fewer candidates are padded with
    masked patches."""
    chunk: int = 256
    """I: candidates read and scored at a time (no gradients); memory holds at most M + I patches."""
    explore: float = 0.0
    """Share of M filled with random candidates while training (0 = pure top-M); evaluation never explores."""
    heads: int = 8
    """Attention heads of the cross-attention aggregator (1 makes chunked selection exactly the global top-M)."""
    positions: bool = True
    """Add a position encoding of each patch's box to the aggregator's keys and values."""
    tissue_mask: bool = False
    """Candidates only where an Otsu tissue mask of a low-resolution level is set (slides: skips glass)."""


@dataclass
class Config:
    task: Literal["segment", "classify"] = "segment"
    """segment: per-pixel labels (ViT encoder + UNETR decoder). classify: one class per image from the
    manifest's `target` column, by iterative patch selection (`ips` section) and a cross-attention head."""
    data: DataConfig = field(default_factory=DataConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    ips: IPSConfig = field(default_factory=IPSConfig)


# ---------------------------------------------------------------- building from dicts


def _suggest(name: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, get_args(tp)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {'a number' if tp is float else 'a string'}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key '{full}'{_suggest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads '3e-4' as a string; accept it as the number the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults), apply overrides, validate, return the Config."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _resolve_inputs(tree, path.parent.absolute(), f"the recipe {path}")
    for text in overrides:
        key, value = parse_override(text)
        single: dict = {}
        _set_dotted(single, key, value)
        _resolve_inputs(single, None, "the command line")
        node = single
        for part in key.split("."):
            node = node[part]
        _set_dotted(tree, key, node)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


BRATS_REGIONS = {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
"""BraTS Dice regions over hrvit's BraTS classes (raw labels 1 NCR, 2 ED, 4 ET -> classes 1, 2, 3)."""


def dice_regions(data: DataConfig) -> dict[str, list[int]]:
    """The Dice regions of a run: data.regions, or the layout's default when it is null (BraTS: BRATS_REGIONS)."""
    if data.regions is not None:
        return {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in data.regions.items()}
    return {k: list(v) for k, v in BRATS_REGIONS.items()} if data.layout == "brats" else {}


def _validate_regions(data: DataConfig, need) -> None:
    default = "" if data.regions is not None else \
        f" (the {data.layout} layout's default; set data.regions to change it)"
    for name, classes in dice_regions(data).items():
        need(isinstance(classes, list) and len(classes) > 0 and all(
            isinstance(c, int) and not isinstance(c, bool) for c in classes),
            f"data.regions.{name}: {classes!r}; expected a non-empty list of class numbers")
        bad = [c for c in classes if not 0 <= c < data.num_classes]
        need(not bad, f"data.regions.{name}: classes {bad} are outside [0, {data.num_classes}) "
             f"(data.num_classes={data.num_classes}){default}")
        need(len(set(classes)) == len(classes), f"data.regions.{name}: {classes} names a class twice")


def _validate_ips(ips: IPSConfig, p: int, need) -> None:
    need(ips.patch >= p and ips.patch % p == 0,
         f"ips.patch: {ips.patch} must be a multiple of patching.patch_size ({p})")
    need(ips.stride is None or ips.stride >= 1, f"ips.stride: {ips.stride} must be >= 1")
    need(ips.memory >= 1, f"ips.memory: {ips.memory} must be >= 1")
    need(ips.chunk >= 1, f"ips.chunk: {ips.chunk} must be >= 1 (candidates scored at a time)")
    need(0.0 <= ips.explore < 1.0, f"ips.explore: {ips.explore} must lie in [0, 1)")
    need(ips.heads >= 1, f"ips.heads: {ips.heads} must be >= 1")


def validate(cfg: Config) -> None:
    """Reject values and combinations that cannot work, naming the key."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    p = cfg.patching.patch_size
    need(p >= 4 and p & (p - 1) == 0, f"patching.patch_size: {p} must be a power of two >= 4")
    w = cfg.data.window
    need(w is None or (w >= p and w % p == 0),
         f"data.window: {w} must be a multiple of patching.patch_size ({p})")
    _validate_adaptive(cfg.patching, need)
    if cfg.task == "classify":
        _validate_ips(cfg.ips, p, need)
        need(cfg.parallel.sp_size == 1, f"parallel.sp_size: {cfg.parallel.sp_size}; task: classify trains on "
             "ips.memory patches per image, which need no sequence parallelism (use 1)")
        need(cfg.data.layout == "manifest", f"data.layout: {cfg.data.layout!r}; task: classify reads image-level "
             "targets from a manifest ('manifest')")
    need(cfg.data.mpp is None or cfg.data.mpp > 0, f"data.mpp: {cfg.data.mpp} must be > 0 (microns per pixel)")
    need(cfg.data.mpp is None or cfg.task == "segment", "data.mpp: the working resolution applies to task: "
         "segment (IPS reads its patches at level 0)")
    need(cfg.data.num_classes >= 2, f"data.num_classes: {cfg.data.num_classes} must be >= 2")
    names = cfg.data.class_names
    need(names is None or len(names) == cfg.data.num_classes,
         f"data.class_names: {len(names or [])} names given for data.num_classes={cfg.data.num_classes}")
    need(0.0 <= cfg.data.foreground_bias <= 1.0, "data.foreground_bias: must lie in [0, 1]")
    need(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction: must lie in [0, 1)")
    need(cfg.data.workers >= 0, "data.workers: must be >= 0")
    need(cfg.data.cache_gb >= 0, f"data.cache_gb: {cfg.data.cache_gb} must be >= 0 (0 = no cache)")
    _validate_regions(cfg.data, need)
    if cfg.data.layout == "manifest":
        need(cfg.data.manifest is not None, "data.manifest: required when data.layout is 'manifest'")
    else:
        need(cfg.data.root is not None, f"data.root: required when data.layout is '{cfg.data.layout}'")
    t = cfg.train
    for key in ("steps", "micro_batch", "grad_accum", "log_every"):
        need(getattr(t, key) >= 1, f"train.{key}: {getattr(t, key)} must be >= 1")
    need(t.lr > 0, f"train.lr: {t.lr} must be > 0")
    need(t.warmup_steps >= 0, f"train.warmup_steps: {t.warmup_steps} must be >= 0")
    need(t.ckpt_every >= 0, "train.ckpt_every: must be >= 0")
    need(t.keep_last >= 0, f"train.keep_last: {t.keep_last} must be >= 0")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps: {t.max_bad_steps} must be >= 1")
    need(t.stop_grace_s > 0, f"train.stop_grace_s: {t.stop_grace_s} must be > 0")
    need(t.dice_weight >= 0 and t.ce_weight >= 0 and t.dice_weight + t.ce_weight > 0,
         "train.dice_weight/train.ce_weight: must be >= 0 and not both 0")
    need(cfg.parallel.sp_size >= 1, f"parallel.sp_size: {cfg.parallel.sp_size} must be >= 1")
    need(cfg.parallel.ring >= 1, f"parallel.ring: {cfg.parallel.ring} must be >= 1")
    pc, sp = cfg.patching, cfg.parallel.sp_size
    tokens = pc.tokens if pc.mode == "adaptive" and pc.threshold is None else \
        (cfg.data.window // pc.patch_size) ** 2 if pc.mode == "uniform" and cfg.data.window else None
    need(tokens is None or tokens >= sp, f"parallel.sp_size: {sp} is more than the {tokens} tokens of a sample "
         f"({'patching.tokens' if pc.mode == 'adaptive' else 'data.window / patching.patch_size, squared'}): every "
         "rank of an SP group needs at least one token")
    if cfg.parallel.sp_size > 1 or cfg.parallel.ring > 1:  # heads are known before any rank starts
        from hrvit.models.vit import PRESETS
        from hrvit.parallel.topology import check_heads

        preset = PRESETS.get(cfg.model.preset, {})
        check_heads(cfg.parallel.sp_size, cfg.parallel.ring, cfg.model.num_heads or preset.get("num_heads"))
    need(cfg.parallel.timeout_s >= 1, "parallel.timeout_s: must be >= 1")
    z = cfg.parallel.zero_stage
    need(z is None or 0 <= z <= 3, f"parallel.zero_stage: {z} must be 0, 1, 2 or 3 (or null: the JSON's)")
    need(cfg.eval.every >= 0, "eval.every: must be >= 0")
    need(cfg.eval.batch >= 1, "eval.batch: must be >= 1")
    need(0.0 <= cfg.eval.overlap < 1.0, f"eval.overlap: {cfg.eval.overlap} must lie in [0, 1) (a fraction of the "
         "window)")
    need(cfg.eval.overlap == 0 or cfg.data.window is not None, f"eval.overlap: {cfg.eval.overlap} needs windows, "
         "but data.window is null (whole images: nothing to overlap); set data.window or eval.overlap=0")
    need(cfg.eval.progress_s >= 0, f"eval.progress_s: {cfg.eval.progress_s} must be >= 0")
    need(cfg.eval.split in ("train", "val", "test"), f"eval.split: {cfg.eval.split!r} is not train, val or test")
    need(cfg.model.drop_path >= 0, "model.drop_path: must be >= 0")
    for key in ("embed_dim", "depth", "num_heads"):
        v = getattr(cfg.model, key)
        need(v is None or v >= 1, f"model.{key}: {v} must be >= 1")
    ds_path = resolve_path(cfg.deepspeed.config)
    written = _LOOKED.get(str(ds_path), (None, cfg.deepspeed.config))[1]
    need(ds_path.is_file(), f"deepspeed.config: {written} not found{where_looked(ds_path, key=False)}; hrvit ships "
         "ds_configs/zero1.json, zero2.json, zero3.json and zero3_offload.json")
    check_writable_dir(cfg.output.dir, "output.dir")


def patching_config(values: dict) -> PatchingConfig:
    """The patching section alone (for tools such as `hrvit patchify`), built and validated."""
    cfg = _build(PatchingConfig, values, "patching.")

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    p = cfg.patch_size
    need(p >= 4 and p & (p - 1) == 0, f"patching.patch_size: {p} must be a power of two >= 4")
    _validate_adaptive(cfg, need)
    return cfg


def _validate_adaptive(a: PatchingConfig, need) -> None:
    if a.mode != "adaptive":
        return
    p = a.patch_size
    need(a.tokens is not None or a.threshold is not None,
         "patching.tokens: adaptive patching needs a token budget (or patching.threshold)")
    need(a.tokens is None or a.tokens >= 1, f"patching.tokens: {a.tokens} must be >= 1")
    need(a.threshold is None or a.threshold >= 0.0, f"patching.threshold: {a.threshold} must be >= 0")
    for key in ("min_leaf", "max_leaf"):
        v = getattr(a, key)
        need(v is None or (v >= p and v % p == 0 and (v // p) & (v // p - 1) == 0),
             f"patching.{key}: {v} must be patching.patch_size ({p}) times a power of two")
    need(a.min_leaf is None or a.max_leaf is None or a.min_leaf <= a.max_leaf,
         f"patching.min_leaf: {a.min_leaf} is larger than patching.max_leaf ({a.max_leaf})")
    need(0.0 <= a.jitter <= 3.0, f"patching.jitter: {a.jitter} must lie in [0, 3]")


def check_writable_dir(path: str | Path, what: str) -> Path:
    """`path` as a folder this process can create or write into, or a ConfigError naming `what` (the key or
    option): empty, an existing file, under a file, or in a folder without write permission."""
    if str(path).strip() == "":
        raise ConfigError(f"{what}: empty; give a folder path")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}: {path} is a file, not a folder")
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what}: {path} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot write into {existing} (permission denied); choose another folder")
    return path


def resolve_path(path: str | Path) -> Path:
    """A path as given, or relative to the repository when it does not exist as given."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return path


INPUT_PATHS = ("data.manifest", "data.root", "model.init_from", "deepspeed.config")
"""Keys naming input files or folders. A relative path written in a recipe is relative to the recipe's folder;
given on the command line (key=value), to the current folder. load_config makes them absolute, so the run's
config.yaml names the files it used. output.dir and train.resume name run folders: those stay relative to the
current folder, where runs are written."""

_LOOKED: dict[str, tuple[str, str, str]] = {}
"""Resolved path -> (key, path as written, where it was looked for), for inputs found nowhere (for messages)."""


def _folder_list(places: list[tuple[Path, str]]) -> str:
    seen, parts = set(), []
    for folder, what in places:
        if str(folder) not in seen:
            seen.add(str(folder))
            parts.append(f"{folder} ({what})")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _resolve_input(key: str, written: Any, base: Path | None, origin: str) -> Any:
    """The absolute path an input key's value names (see INPUT_PATHS). In a recipe: the recipe's folder, then, for
    recipes written before this rule, the current folder (with a warning); on the command line: the current
    folder. deepspeed.config also finds hrvit's shipped JSONs (ds_configs/) from anywhere. A path found nowhere
    becomes the first place looked, and where_looked() tells the error message where that was."""
    if not isinstance(written, str) or not written.strip():
        return written
    path = Path(os.path.expanduser(written))
    if path.is_absolute():
        return os.path.normpath(path)
    cwd, shipped = (Path.cwd(), "the current folder"), (REPO_ROOT, "hrvit's shipped DeepSpeed configs")
    if base is not None:
        places = [(base, "the recipe's folder"), *([shipped] if key == "deepspeed.config" else []), cwd]
    else:
        places = [cwd, *([shipped] if key == "deepspeed.config" else [])]
    for folder, _ in places:
        found = folder / path
        if found.exists():
            if base is not None and folder is cwd[0] and folder != base and os.environ.get("RANK", "0") == "0":
                print(f"hrvit: warning: {key}: {written} is not in the recipe's folder {base}; using "
                      f"{os.path.normpath(found)}, relative to the current folder. Paths in a recipe are relative "
                      "to the recipe's folder: write it so (or as an absolute path)", file=sys.stderr, flush=True)
            return os.path.normpath(found)
    chosen = os.path.normpath(places[0][0] / path)
    _LOOKED[chosen] = (key, written, f"in {origin}; looked in {_folder_list(places)}")
    return chosen


def _resolve_inputs(tree: dict, base: Path | None, origin: str) -> None:
    """Replace the INPUT_PATHS values present in a (partial) config tree by absolute paths, in place."""
    for dotted in INPUT_PATHS:
        section, name = dotted.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            node[name] = _resolve_input(dotted, node[name], base, origin)


def where_looked(path: str | Path, key: bool = True) -> str:
    """For a not-found message: " (data.manifest: 'x.csv' as written in the recipe r.yaml; looked in /a (the
    recipe's folder) and /b (the current folder))" for an input load_config resolved but found nowhere; else ''."""
    entry = _LOOKED.get(os.path.normpath(os.path.abspath(path)))
    if entry is None:
        return ""
    name, written, where = entry
    return f" ({name}: {written!r} as written {where})" if key else f" (as written {where})"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- DeepSpeed JSON

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed dict: the JSON file, its overrides, and what hrvit derives from `train`.

    Batch sizes are derived once here (micro-batch x accumulation x data-parallel size);
    a JSON or override that sets them differently is an error rather than a silent winner.
    """
    path = resolve_path(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config: {path} holds a JSON {type(ds).__name__}; expected an object "
                          '({"zero_optimization": {...}, ...})')
    ds = _merge(ds, cfg.deepspeed.overrides)
    check_deepspeed_keys(ds, f"{path.name} with deepspeed.overrides")
    ds = _apply_settings(cfg, ds, path.name)
    check_monitor_packages(ds)
    t = cfg.train
    derived = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_size,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"deepspeed: {key}={ds[key]} in {path.name}/overrides conflicts with the value {value} "
                f"derived from train.micro_batch={t.micro_batch}, train.grad_accum={t.grad_accum} and "
                f"{dp_size} data-parallel ranks; remove it from the DeepSpeed config")
        ds[key] = value
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    ds.setdefault("optimizer", {
        "type": "AdamW",
        "params": {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay,
                   **({} if offload else {"torch_adam": True})},
    })
    ds.setdefault("scheduler", {
        "type": "WarmupCosineLR",
        "params": {"total_num_steps": t.steps, "warmup_num_steps": max(1, min(t.warmup_steps, t.steps // 2)),
                   "warmup_type": "linear",
                   "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio},
    })
    if t.grad_clip > 0:
        ds.setdefault("gradient_clipping", t.grad_clip)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def precision_of(ds: dict) -> str:
    """'bf16', 'fp16' or 'fp32', as a DeepSpeed dict asks (bf16 first, as DeepSpeed reads it)."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"


def _apply_settings(cfg: Config, ds: dict, json_name: str) -> dict:
    """Write train.precision and parallel.zero_stage into the DeepSpeed dict. They replace what the JSON file
    says, but a JSON or override that *enables* another precision, or an override naming another ZeRO stage, is
    an explicit contrary choice: a ConfigError naming both keys, not a silent winner."""
    overrides = cfg.deepspeed.overrides
    want = cfg.train.precision
    if want is not None:
        for name in ("bf16", "fp16"):
            given = overrides.get(name, {}).get("enabled") if isinstance(overrides.get(name), dict) else None
            if name != want and ds.get(name, {}).get("enabled") or name == want and given is False:
                where = (f"deepspeed.overrides.{name}.enabled={str(given).lower()}" if given is not None
                         else f"{name}.enabled=true in deepspeed.config ({json_name})")
                raise ConfigError(f"train.precision: {want} conflicts with {where}; set the precision in one place "
                                  "(remove it from the DeepSpeed config, or set train.precision=null)")
        for name in ("bf16", "fp16"):
            if name == want or name in ds:
                ds[name] = {**ds.get(name, {}), "enabled": name == want}
    stage = cfg.parallel.zero_stage
    if stage is not None:
        given = (overrides.get("zero_optimization") or {}).get("stage")
        if given is not None and given != stage:
            raise ConfigError(f"parallel.zero_stage: {stage} conflicts with deepspeed.overrides.zero_optimization."
                              f"stage={given}; set the stage in one place")
        ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": stage}
    return ds


MONITOR_PACKAGES = {"tensorboard": ("tensorboard", "pip install 'hrvit[tensorboard]'"),
                    "wandb": ("wandb", "pip install wandb"), "comet": ("comet_ml", "pip install comet_ml")}
"""DeepSpeed monitor sections and the package each imports when enabled (at engine start, as a traceback)."""


def check_monitor_packages(ds: dict, key: str = "deepspeed: {section}.enabled=true") -> None:
    """A monitor enabled without its package (a DeepSpeed section of `ds`, or hrvit's logging.tensorboard given as
    {"tensorboard": {"enabled": True}} with its own `key`) is one ConfigError naming what to install."""
    import importlib.util

    for section, (module, install) in MONITOR_PACKAGES.items():
        on = isinstance(ds.get(section), dict) and ds[section].get("enabled")
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key.format(section=section)} needs the '{module}' package, which is not "
                              f"installed: {install}")


_DS_SECTIONS = {"zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
                "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
                "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config")}
"""Sections DeepSpeed checks with a pydantic model that forbids unknown keys (at engine start, as a traceback)."""


def check_deepspeed_keys(ds: dict, where: str) -> None:
    """Refuse a key DeepSpeed would ignore (a misspelt top-level section: DeepSpeed reads the keys it knows and
    drops the rest, so `zero_optimisation` would silently train ZeRO-0) or reject later with a traceback (a
    misspelt key inside zero_optimization, fp16 or bf16), naming it and the closest valid key."""
    import importlib

    known = _deepspeed_top_keys()
    for key in ds:
        if key not in known and not _in_deepspeed_source(key):
            raise ConfigError(f"deepspeed: unknown key '{key}' in {where}{_suggest(key, sorted(known), '')}")
    from pydantic import BaseModel, ValidationError

    for section, (module, name) in _DS_SECTIONS.items():
        if not isinstance(ds.get(section), dict):
            continue
        model = getattr(importlib.import_module(module), name)
        try:
            model(**ds[section])
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(part) for part in first["loc"]]
            if first["type"] != "extra_forbidden":
                raise ConfigError(f"deepspeed: {section}.{'.'.join(loc)} in {where}: {first['msg']} "
                                  f"(got {first.get('input')!r})") from None
            for part in loc[:-1]:  # the model of the nested section holding the unknown key
                field = model.model_fields.get(part)
                inner = getattr(field, "annotation", None) if field else None
                model = next((t for t in (inner, *get_args(inner)) if isinstance(t, type)
                              and issubclass(t, BaseModel)), model)
            valid = sorted({*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)})
            prefix = f"{section}.{'.'.join(loc[:-1])}." if len(loc) > 1 else f"{section}."
            raise ConfigError(f"deepspeed: unknown key '{prefix}{loc[-1]}' in {where}"
                              f"{_suggest(loc[-1], valid, prefix)}") from None


@functools.cache
def _deepspeed_top_keys() -> frozenset[str]:
    """Key names DeepSpeed defines as constants (its config is read key by key, with no schema of its own)."""
    import sys

    import deepspeed.runtime.config  # noqa: F401  (imports the modules that define the config keys)

    return frozenset(v for name, mod in list(sys.modules.items()) if name.startswith("deepspeed") and mod
                     for k, v in vars(mod).items() if k.isupper() and isinstance(v, str) and v.isidentifier())


@functools.cache
def _deepspeed_source() -> str:
    import deepspeed

    root = Path(deepspeed.__file__).parent
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*.py") if "ops" not in p.parts)


def _in_deepspeed_source(key: str) -> bool:
    """Whether DeepSpeed's code names `key` as a string at all (tensorboard, wandb, ... are not constants)."""
    text = _deepspeed_source()
    return f'"{key}"' in text or f"'{key}'" in text


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
