"""Windows the model sees: random training windows and the grid that covers a whole image.

Every random choice of training sample `k` comes from a generator seeded by (seed, k), and
`k` is a function of (step, micro-step, data-parallel rank, position), so the data order is
fixed by the config alone: a resumed run and an uninterrupted one read the same windows, and
ranks that share a data-parallel rank (a sequence-parallel group) read the same sample.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import torch

from hrvit.config import PatchingConfig
from hrvit.data.datasets import Case, CaseSpec, open_case
from hrvit.errors import DataError
from hrvit.patching import PatchSequence, patch_adaptive, patch_pyramid, patch_uniform

MAX_LABEL_SCAN = 64 * 1024 * 1024
"""Labels up to this many pixels are scanned once to centre windows on foreground."""
MAX_SUBSTITUTES = 10
"""With skip_bad, how many substitutes of one unreadable sample are tried before the run stops."""


def token_scale(scale: float, patch_size: int) -> float:
    """Case.scale rounded so that a token of p working pixels spans an even number of level-0 pixels: tree
    nodes then halve exactly down to the smallest leaf (the physical scale is off by at most 1/(p x scale))."""
    return 1.0 if scale == 1.0 else max(2, 2 * round(patch_size * scale / 2)) / patch_size


def window_shape(image_shape, window: int | None, patch_size: int, scale: float = 1.0) -> tuple[int, ...]:
    """The window edge per axis in level-0 pixels: `window` working pixels (token_scale level-0 pixels each),
    but never more than the image rounded up to a whole token."""
    s = token_scale(scale, patch_size)
    edge = round(patch_size * s)
    rounded = [math.ceil(n / edge) * edge for n in image_shape]
    if window is None:
        return tuple(rounded)
    return tuple(min(round(window * s), r) for r in rounded)


def working_patching(patching: PatchingConfig, scale: float) -> PatchingConfig:
    """The patching of a case read at data.mpp, in level-0 pixels: leaf limits times the token scale, and
    uniform tokens as a tree whose every leaf is one token (the pyramid reader then serves both modes)."""
    s = token_scale(scale, patching.patch_size)
    if s == 1.0:
        return patching
    edge = round(patching.patch_size * s)
    if patching.mode == "uniform":
        return replace(patching, mode="adaptive", tokens=None, threshold=-1.0, min_leaf=edge, max_leaf=edge)
    lo, hi = patching.min_leaf or patching.patch_size, patching.max_leaf
    return replace(patching, min_leaf=round(lo * s), max_leaf=None if hi is None else round(hi * s))


def grid_starts(image_shape, window, overlap: float = 0.0) -> list[tuple[int, ...]]:
    """Window origins that cover the image, in grid order (the first axis outermost), at a stride of
    window x (1 - overlap) per axis (at least 1 px); the last window on each axis is shifted inside it."""
    axes = []
    for size, w in zip(image_shape, window):
        stride = max(1, int(w * (1.0 - overlap)))
        starts = list(range(0, max(size - w, 0) + 1, stride))
        if starts[-1] + w < size:
            starts.append(size - w)
        axes.append(starts)
    return list(itertools.product(*axes))


def voxel_spacing(source) -> tuple[float, ...] | None:
    """Physical size of a voxel per axis in array order (z, y, x): the norms of the NIfTI affine's first three
    columns (nibabel's i, j, k), reversed; None (isotropic) for sources without an affine or with a degenerate one."""
    affine = getattr(source, "affine", None)
    if affine is None:
        return None
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)[::-1]
    return tuple(float(v) for v in spacing) if np.isfinite(spacing).all() and (spacing > 0).all() else None


def read_window(case: Case, start, shape, patching: PatchingConfig, with_label: bool = True,
                rng: np.random.Generator | None = None) -> PatchSequence:
    """Read one window of a case and cut it into tokens as `patching` says; boxes are relative
    to the window. This is the one place where a tokenizer is chosen. `rng` drives any random
    part of the tokenizer (training only).

    Adaptive: the tree covers the window's in-image part (a window may reach past the image);
    `image_shape` stays the window, as with uniform tokens, so depatch and stitching work alike.
    Slides are read pyramid-natively (the tree on a low-resolution level, each leaf from its own
    level: faster than reading the window whole even at 1024^2), other images whole. A volume's octree is
    built per axis from its voxel spacing (voxel_spacing: 5 mm slices are not split like 0.9 mm pixels).
    """
    origin = tuple(int(s) for s in start)
    scale = token_scale(case.scale, patching.patch_size)
    patching = working_patching(patching, case.scale)
    if patching.mode == "adaptive":
        inside = tuple(max(0, min(w, n - s)) for s, w, n in zip(origin, shape, case.image.shape))
        label_source = case.label if with_label else None
        try:
            if hasattr(case.image, "read_level"):
                seq = patch_pyramid(case.image, patching, origin, inside, label_source, rng, image_shape=shape)
            else:
                image = torch.from_numpy(np.ascontiguousarray(case.image.read(origin, inside)))
                label = None if label_source is None else torch.from_numpy(label_source.read(origin, inside))
                seq = patch_adaptive(image, patching, label, rng, image_shape=shape, spacing=voxel_spacing(case.image))
        except DataError as err:
            raise DataError(f"{case.spec.image[0]}: {err}") from None
        seq.meta.update(case=case.spec.id, origin=origin, extent=inside)
        if scale != 1.0:  # level and scale in working pixels, boxes in level-0 pixels
            size = seq.boxes[:, len(origin):].amax(-1).clamp(min=1).double()
            seq.level = torch.where(seq.valid, torch.log2(size / (patching.patch_size * scale)).round().long(), 0)
            seq.scale = scale
        return seq
    image = torch.from_numpy(np.ascontiguousarray(case.image.read(start, shape)))
    label = None
    if with_label and case.label is not None:
        label = torch.from_numpy(np.ascontiguousarray(case.label.read(start, shape)))
    seq = patch_uniform(image, patching.patch_size, label)
    seq.meta = {"case": case.spec.id, "origin": origin}
    return seq


class TrainWindows(torch.utils.data.Dataset):
    """Training sample k -> a random window of a random training case, deterministic in (seed, k)."""

    def __init__(self, specs: list[CaseSpec], *, window: int | None, patching: PatchingConfig, seed: int,
                 foreground_bias: float, augment: bool, label_map: dict | None = None, skip_bad: bool = False,
                 cache_gb: float = 0, nonfinite: str = "error"):
        self.specs = specs
        self.cache_gb = cache_gb  # per process: each DataLoader worker decodes into its own cache
        self.nonfinite = nonfinite
        self.skip_bad = skip_bad
        self.window = window
        self.patching = patching
        self.seed = seed
        self.foreground_bias = foreground_bias
        self.augment = augment
        self.label_map = label_map
        self._cases: dict[int, Case] = {}
        self._foreground: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return 2**62

    def _case(self, i: int) -> Case:
        # Opened lazily so each DataLoader worker holds its own file handles (and decoded-volume cache).
        if i not in self._cases:
            self._cases[i] = open_case(self.specs[i], label_map=self.label_map, cache_gb=self.cache_gb,
                                       nonfinite=self.nonfinite)
        return self._cases[i]

    def _foreground_points(self, i: int) -> np.ndarray | None:
        if i not in self._foreground:
            case = self._case(i)
            points = None
            if case.label is not None and math.prod(case.label.shape) <= MAX_LABEL_SCAN:
                label = case.label.read((0,) * len(case.label.shape), case.label.shape)
                points = np.argwhere(label > 0)
                if len(points) > 100_000:
                    points = points[np.random.default_rng(0).choice(len(points), 100_000, replace=False)]
                points = points if len(points) else None
            self._foreground[i] = points
        return self._foreground[i]

    def case_of(self, k: int) -> CaseSpec:
        """The case training sample `k` reads (before any substitution), for error messages."""
        return self.specs[int(np.random.default_rng([self.seed, int(k)]).integers(len(self.specs)))]

    def __getitem__(self, k: int) -> PatchSequence:
        """Sample `k`; an unreadable one (DataError/OSError) stops the run naming it, or with skip_bad is
        replaced by a substitute drawn from (seed, k, attempt) (still deterministic) and listed in
        meta['skipped']. Other exceptions are bugs: re-raised with the sample named."""
        skipped = []
        for attempt in range(MAX_SUBSTITUTES + 1):
            rng = np.random.default_rng([self.seed, int(k)] + ([attempt] if attempt else []))
            i = int(rng.integers(len(self.specs)))
            spec = self.specs[i]
            try:
                seq = self._sample(i, rng)
            except (DataError, OSError) as err:
                what = f"training sample {k} (case {spec.id}, {spec.image[0]})"
                if not self.skip_bad:
                    raise DataError(f"{what}: {err}; set data.skip_bad_samples=true to skip such samples") from err
                skipped.append({"sample": int(k), "case": spec.id, "path": str(spec.image[0]), "error": str(err)})
                continue
            except Exception as err:
                err.add_note(f"hrvit: while reading training sample {k} (case {spec.id}, {spec.image[0]})")
                raise
            seq.meta["skipped"] = skipped
            return seq
        raise DataError(f"training sample {k}: {MAX_SUBSTITUTES} substitutes in a row were unreadable too "
                        f"(last: {skipped[-1]['path']}: {skipped[-1]['error']}); run hrvit check-data")

    def _sample(self, i: int, rng: np.random.Generator) -> PatchSequence:
        case = self._case(i)
        shape = case.image.shape
        win = window_shape(shape, self.window, self.patching.patch_size, case.scale)
        high = [max(s - w, 0) for s, w in zip(shape, win)]
        points = self._foreground_points(i) if self.foreground_bias > 0 else None
        if points is not None and rng.random() < self.foreground_bias:
            centre = points[rng.integers(len(points))]
            start = [int(np.clip(c - w // 2, 0, h)) for c, w, h in zip(centre, win, high)]
        else:
            start = [int(rng.integers(h + 1)) for h in high]
        seq = read_window(case, start, win, self.patching, rng=rng)
        if self.augment:
            seq = _flip(seq, [d for d in range(len(shape)) if rng.random() < 0.5])
        return seq


def _flip(seq: PatchSequence, axes: list[int]) -> PatchSequence:
    """Mirror a window along `axes` (token pixels, targets and boxes together) about the extent
    its tokens were cut from: the window rounded up to p (uniform), or its in-image part
    (adaptive; a leaf that reached past the image edge then starts before 0). Padding stays put."""
    if not axes:
        return seq
    ndim = seq.ndim
    seq.pixels = seq.pixels.flip([2 + a for a in axes])
    if seq.target is not None:
        seq.target = seq.target.flip([1 + a for a in axes])
    extent = seq.meta.get("extent") or [math.ceil(s / seq.patch_size) * seq.patch_size for s in seq.image_shape]
    boxes = seq.boxes.clone()
    for a in axes:
        mirrored = extent[a] - seq.boxes[:, a] - seq.boxes[:, ndim + a]
        boxes[:, a] = torch.where(seq.valid, mirrored, seq.boxes[:, a])
    seq.boxes = boxes
    return seq


class StepSampler(torch.utils.data.Sampler):
    """Yields the micro-batches of sample indices of one data-parallel rank, from `start_step` on."""

    def __init__(self, *, start_step: int, steps: int, grad_accum: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.start_step, self.steps = start_step, steps
        self.grad_accum, self.micro_batch = grad_accum, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.grad_accum

    def indices(self, step: int, micro: int) -> list[int]:
        base = ((step * self.grad_accum + micro) * self.dp_size + self.dp_rank) * self.micro_batch
        return list(range(base, base + self.micro_batch))

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                yield self.indices(step, micro)
