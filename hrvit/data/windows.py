"""Windows the model sees: random training windows and the grid that covers a whole image.

Every random choice of training sample `k` comes from a generator seeded by (seed, k), and
`k` is a function of (step, micro-step, data-parallel rank, position), so the data order is
fixed by the config alone: a resumed run and an uninterrupted one read the same windows, and
ranks that share a data-parallel rank (a sequence-parallel group) read the same sample.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from hrvit.config import PatchingConfig
from hrvit.data.datasets import Case, CaseSpec, open_case
from hrvit.patching import PatchSequence, patch_uniform

MAX_LABEL_SCAN = 64 * 1024 * 1024
"""Labels up to this many pixels are scanned once to centre windows on foreground."""


def window_shape(image_shape, window: int | None, patch_size: int) -> tuple[int, ...]:
    """The window edge per axis: `window`, but never more than the image rounded up to p."""
    rounded = [math.ceil(s / patch_size) * patch_size for s in image_shape]
    if window is None:
        return tuple(rounded)
    return tuple(min(window, r) for r in rounded)


def grid_starts(image_shape, window) -> list[tuple[int, ...]]:
    """Window origins that cover the image; the last window on each axis is shifted inside it."""
    axes = []
    for size, w in zip(image_shape, window):
        starts = list(range(0, max(size - w, 0) + 1, w))
        if starts[-1] + w < size:
            starts.append(size - w)
        axes.append(starts)
    return list(itertools.product(*axes))


def read_window(case: Case, start, shape, patching: PatchingConfig, with_label: bool = True,
                rng: np.random.Generator | None = None) -> PatchSequence:
    """Read one window of a case and cut it into tokens as `patching` says; boxes are relative
    to the window. This is the one place where a tokenizer is chosen. `rng` drives any random
    part of the tokenizer (training only)."""
    image = torch.from_numpy(np.ascontiguousarray(case.image.read(start, shape)))
    label = None
    if with_label and case.label is not None:
        label = torch.from_numpy(np.ascontiguousarray(case.label.read(start, shape)))
    seq = patch_uniform(image, patching.patch_size, label)
    seq.meta = {"case": case.spec.id, "origin": tuple(int(s) for s in start)}
    return seq


class TrainWindows(torch.utils.data.Dataset):
    """Training sample k -> a random window of a random training case, deterministic in (seed, k)."""

    def __init__(self, specs: list[CaseSpec], *, window: int | None, patching: PatchingConfig, seed: int,
                 foreground_bias: float, augment: bool, label_map: dict | None = None):
        self.specs = specs
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
        # Opened lazily so each DataLoader worker holds its own file handles.
        if i not in self._cases:
            self._cases[i] = open_case(self.specs[i], label_map=self.label_map)
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

    def __getitem__(self, k: int) -> PatchSequence:
        rng = np.random.default_rng([self.seed, int(k)])
        i = int(rng.integers(len(self.specs)))
        case = self._case(i)
        shape = case.image.shape
        win = window_shape(shape, self.window, self.patching.patch_size)
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
    """Mirror a uniform window along `axes` (token pixels, targets and boxes together)."""
    if not axes:
        return seq
    ndim = seq.ndim
    pixel_axes = [2 + a for a in axes]
    seq.pixels = seq.pixels.flip(pixel_axes)
    if seq.target is not None:
        seq.target = seq.target.flip([1 + a for a in axes])
    boxes = seq.boxes.clone()
    for a in axes:
        extent = math.ceil(seq.image_shape[a] / seq.patch_size) * seq.patch_size
        boxes[:, a] = extent - seq.boxes[:, a] - seq.boxes[:, ndim + a]
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

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            for micro in range(self.grad_accum):
                base = ((step * self.grad_accum + micro) * self.dp_size + self.dp_rank) * self.micro_batch
                yield list(range(base, base + self.micro_batch))
