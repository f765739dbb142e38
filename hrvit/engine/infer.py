"""Whole-image prediction without full-resolution float maps: labels per token, painted on demand.

The model's per-token logits [L, K, *p] are reduced to labels on the device (argmax over K) before anything
is upsampled. `depatch` upsamples with nearest, and argmax commutes with nearest upsampling (every output
pixel is a copy of one token pixel, ties included), so these labels are exactly those of argmax after
depatch, at p^D bytes per token instead of K x 4 bytes per image pixel.

A window's labels are kept as its tokens (`WindowLabels`); `LabelMap` answers "the label at these level-0
coordinates" for any region or strided grid (a pyramid level, a thumbnail), so prediction is written tile by
tile and evaluation counts Dice window by window, chunk by chunk. Overlapping windows: the last window of
the grid that covers a pixel decides it, as stitching in grid order did; each window therefore *owns* the part
of the image between its start and the next window's start on every axis.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hrvit.config import PatchingConfig
from hrvit.data.datasets import Case
from hrvit.data.windows import grid_starts, read_window, window_shape
from hrvit.engine.metrics import dice_counts
from hrvit.engine.picture import read_for_picture
from hrvit.errors import DataError
from hrvit.patching import collate, to_device

MAX_GRID_CELLS = 1 << 28
"""A window's token index grid (int32, one cell per `unit` pixels) may have at most this many cells (1 GiB)."""
CHUNK = 1024
"""Edge of the level-0 blocks evaluation counts at a time (labels are read as int64: 8 MiB per 1024^2)."""
BLOCK = 1 << 18
"""Pixels painted at a time (a gather over many small tokens holds a few int64 indices per pixel)."""
RECT_PIXELS = 64
"""Painting copies token rectangles when the tokens in a block average at least this many pixels there (a copy
costs about as much Python as gathering this many pixels one by one; measured on 2 CPU cores)."""
PICTURE_EDGE = 768
"""Slides larger than this are shown from a thumbnail of this edge (write_picture's largest panel edge)."""


@functools.lru_cache(maxsize=256)
def nearest_index(p: int, size: int) -> np.ndarray:
    """Source index in [0, p) of each of `size` output pixels, exactly as F.interpolate(mode='nearest') picks it
    (depatch upsamples with it), taken from torch itself rather than re-derived."""
    src = torch.arange(p, dtype=torch.float32).view(1, 1, p)
    return F.interpolate(src, size=size, mode="nearest").view(size).numpy().astype(np.int64)


@dataclass
class WindowLabels:
    """The labels one window predicted, as its tokens: boxes [n, 2D] (image coordinates), labels [n, *p] uint8,
    and a grid of token indices (-1: no token) with one cell per `unit` pixels from `origin`."""

    origin: tuple[int, ...]
    own_lo: tuple[int, ...]
    own_hi: tuple[int, ...]
    boxes: np.ndarray
    labels: np.ndarray
    unit: int
    grid: np.ndarray

    @classmethod
    def from_tokens(cls, origin, own_lo, own_hi, boxes: np.ndarray, labels: np.ndarray) -> WindowLabels:
        """`boxes` relative to the window (valid tokens only), as the patchers give them."""
        ndim = boxes.shape[1] // 2
        boxes = boxes.astype(np.int64)
        unit = int(np.gcd.reduce(boxes.ravel())) if len(boxes) else 1
        unit = max(unit, 1)
        reach = (boxes[:, :ndim] + boxes[:, ndim:]).max(0) if len(boxes) else np.ones(ndim, np.int64)
        cells = [max(1, -(-int(r) // unit)) for r in reach]
        if math.prod(cells) > MAX_GRID_CELLS:
            raise DataError(f"window at {tuple(origin)}: token boxes share no common unit larger than {unit} px, "
                            f"so its index grid would need {math.prod(cells)} cells")
        grid = np.full(cells, -1, np.int32)
        lo, size = boxes[:, :ndim] // unit, boxes[:, ndim:] // unit
        for shape in np.unique(size, axis=0):  # tokens of one size at once
            group = np.flatnonzero((size == shape).all(1))
            if len(group) <= 64:
                for t in group:
                    grid[tuple(slice(a, a + s) for a, s in zip(lo[t], shape))] = t
                continue
            offsets = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, ndim)
            step = max(1, (1 << 22) // len(offsets))
            for first in range(0, len(group), step):
                part = group[first:first + step]
                index = lo[part][:, None, :] + offsets[None]  # [n, cells, D]
                grid[tuple(index[..., i] for i in range(ndim))] = part[:, None]
        absolute = boxes.copy()
        absolute[:, :ndim] += np.asarray(origin, np.int64)
        return cls(tuple(origin), tuple(own_lo), tuple(own_hi), absolute, labels, unit, grid)

    @property
    def nbytes(self) -> int:
        return self.boxes.nbytes + self.labels.nbytes + self.grid.nbytes

    def paint(self, out: np.ndarray, coords: list[np.ndarray]) -> None:
        """out[...] = labels at the image coordinates coords[i] (1-D per axis, sorted); pixels no token
        covers get 0, as depatch's fill did. Tokens of RECT_PIXELS or more pixels in `out` on average (adaptive
        leaves, mostly) are copied rectangle by rectangle; smaller ones are gathered pixel by pixel."""
        ndim = len(coords)
        cells, inverse = zip(*[np.unique((c - o) // self.unit, return_inverse=True)
                               for c, o in zip(coords, self.origin)])
        outside = [(c < 0) | (c >= n) for c, n in zip(cells, self.grid.shape)]
        cell_tok = self.grid[np.ix_(*[np.clip(c, 0, n - 1) for c, n in zip(cells, self.grid.shape)])]
        if any(o.any() for o in outside):
            cell_tok = np.where(np.logical_or.reduce(np.ix_(*outside)), -1, cell_tok)
        p = self.labels.shape[1]
        present = np.unique(cell_tok)  # tokens looked up per grid cell, not per pixel
        if len(present) * RECT_PIXELS <= out.size:
            if present[0] < 0:
                out[...] = 0
            for t in present[present >= 0]:
                box = self.boxes[t]
                region, src = [], []
                for i in range(ndim):
                    a, b = np.searchsorted(coords[i], [box[i], box[i] + box[ndim + i]])
                    region.append(slice(int(a), int(b)))
                    src.append(nearest_index(p, int(box[ndim + i]))[coords[i][a:b] - box[i]])
                out[tuple(region)] = self.labels[t][np.ix_(*src)]
            return
        tok = cell_tok[np.ix_(*inverse)]
        t = np.maximum(tok, 0)
        src = []
        for i in range(ndim):
            shape = [1] * ndim
            shape[i] = -1
            local = coords[i].reshape(shape) - self.boxes[t, i]
            size = self.boxes[t, ndim + i]
            index = np.empty(t.shape, np.int64)
            for s in np.unique(size):
                m = size == s
                index[m] = nearest_index(p, int(s))[np.clip(local[m], 0, int(s) - 1)]
            src.append(index)
        out[...] = np.where(tok >= 0, self.labels[(t, *src)], 0)


class LabelMap:
    """The predicted labels of one image, kept as its windows' tokens; read any region or strided grid."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.windows: list[WindowLabels] = []

    def add(self, window: WindowLabels) -> None:
        self.windows.append(window)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.windows)

    def sample(self, coords: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """uint8 labels at the grid coords[0] x coords[1] x ... of level-0 image coordinates (sorted, inside).
        With `out`, only the parts these windows decide are written into it (the rest is left as it is)."""
        coords = [np.asarray(c, np.int64) for c in coords]
        out = np.zeros([len(c) for c in coords], np.uint8) if out is None else out
        edge = max(1, int(round(BLOCK ** (1 / len(coords)))))
        for w in self.windows:
            parts = [np.flatnonzero((c >= lo) & (c < hi)) for c, lo, hi in zip(coords, w.own_lo, w.own_hi)]
            if any(len(q) == 0 for q in parts):
                continue
            # sorted coords: the window's part is contiguous; painted in blocks, so a pixel-by-pixel gather
            # never needs more than BLOCK pixels of int64 indices
            for start in itertools.product(*[range(int(q[0]), int(q[-1]) + 1, edge) for q in parts]):
                region = tuple(slice(a, min(a + edge, int(q[-1]) + 1)) for a, q in zip(start, parts))
                w.paint(out[region], [c[r] for c, r in zip(coords, region)])
        return out

    def read(self, start, size, step: int = 1) -> np.ndarray:
        """Labels of the region [start, start + size) of the image (clipped to it), every `step` pixels."""
        return self.sample([np.arange(s, min(s + n, dim), step) for s, n, dim in zip(start, size, self.shape)])

    def full(self) -> np.ndarray:
        """The whole label map (small images and volumes only)."""
        return self.read((0,) * len(self.shape), self.shape)


def _own(starts_axis: list[int], size: int) -> dict[int, tuple[int, int]]:
    """Per axis: the part of the image each window start decides (last window in grid order wins)."""
    ordered = sorted(set(starts_axis))
    return {s: (s, ordered[i + 1] if i + 1 < len(ordered) else size) for i, s in enumerate(ordered)}


@torch.no_grad()
def predict_windows(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                    device=None) -> Iterator[WindowLabels]:
    """Windows of the grid covering the image, in grid order, each as its tokens' labels. The window goes to
    `device` (the model's), argmax over the classes runs there, and only uint8 labels come back."""
    shape = tuple(case.image.shape)
    win = window_shape(shape, window, patching.patch_size)
    starts = grid_starts(shape, win)
    own = [_own([s[i] for s in starts], shape[i]) for i in range(len(shape))]
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, s, win, patching, with_label=False) for s in chunk])
        on = to_device(b, device) if device is not None else b
        logits = model(on["pixels"], on["boxes"], on["valid"], on["image_shape"])
        labels = logits.argmax(2).to(torch.uint8).cpu().numpy()  # [B, L, *p]: argmax before any upsampling
        del logits, on
        for j, start in enumerate(chunk):
            keep = b["valid"][j].numpy().astype(bool)
            lo = tuple(own[i][start[i]][0] for i in range(len(shape)))
            hi = tuple(own[i][start[i]][1] for i in range(len(shape)))
            yield WindowLabels.from_tokens(start, lo, hi, b["boxes"][j].numpy()[keep], labels[j][keep])


def predict_labels(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                   device=None) -> LabelMap:
    """Every window's labels of one image, as a LabelMap (bytes: about p^D per token)."""
    labels = LabelMap(tuple(case.image.shape))
    for w in predict_windows(model, case, window=window, patching=patching, batch=batch, device=device):
        labels.add(w)
    return labels


def chunks(lo, hi, edge: int | None = None) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(start, size) blocks covering [lo, hi): 2-D blocks of edge^2 (default CHUNK), or slabs of about edge^2
    voxels in 3-D."""
    edge = edge or CHUNK
    ndim = len(lo)
    steps = [edge] * ndim
    if ndim == 3:
        steps = [max(1, edge * edge // max(1, (hi[1] - lo[1]) * (hi[2] - lo[2]))), hi[1] - lo[1], hi[2] - lo[2]]
    axes = [range(a, b, max(1, s)) for a, b, s in zip(lo, hi, steps)]
    for start in itertools.product(*axes):
        yield start, tuple(min(s + st, b) - s for s, st, b in zip(start, steps, hi))


def case_dice_counts(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                     num_classes: int, device=None, picture: list[np.ndarray] | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Dice counts of one case, window by window: each window's labels are counted against the truth of the
    part it decides, then dropped. With `picture` (level-0 coordinates per axis, picture_grid), the labels at
    that coarse grid are collected on the way and returned too."""
    counts = np.zeros((3, num_classes), np.int64)
    small = None if picture is None else np.zeros([len(c) for c in picture], np.uint8)
    for w in predict_windows(model, case, window=window, patching=patching, batch=batch, device=device):
        single = LabelMap(tuple(case.image.shape))
        single.add(w)
        for start, size in chunks(w.own_lo, w.own_hi):
            counts += dice_counts(single.read(start, size), case.label.read(start, size), num_classes)
        if small is not None:
            single.sample(picture, out=small)
    return counts, small


def picture_image(source) -> np.ndarray:
    """The image for a picture: a slide's thumbnail when it is larger than PICTURE_EDGE (read_for_picture would
    read up to 16 Mpx whole as float32: 200 MB for a 4096^2 slide), else read_for_picture."""
    if hasattr(source, "thumbnail") and max(source.shape) > PICTURE_EDGE:
        return source.thumbnail(PICTURE_EDGE)
    return read_for_picture(source)


def picture_grid(shape, picture_shape) -> list[np.ndarray]:
    """Level-0 coordinates of each pixel of a picture of `picture_shape` (the image's own shape: identity)."""
    return [np.arange(n) if n == s else (np.arange(n) * s) // n for s, n in zip(shape, picture_shape)]


def truth_on_grid(case: Case, coords: list[np.ndarray]) -> np.ndarray:
    """The truth at a (coarse) grid of level-0 coordinates, for pictures: from the smallest pyramid level that
    is at least as fine as the grid when the label has levels, else read whole (small images)."""
    label = case.label
    shape = tuple(label.shape)
    if all(len(c) == s for c, s in zip(coords, shape)):
        return label.read((0,) * len(shape), shape)
    if hasattr(label, "read_level") and len(shape) == 2:
        step = min(s / len(c) for s, c in zip(shape, coords))
        level = max([i for i, d in enumerate(label.level_downsamples) if d <= step] or [0])
        ds = label.level_downsamples[level]
        small = label.read_level(level, (0, 0), label.level_shapes[level])
        index = [np.minimum((c / ds).astype(np.int64), n - 1) for c, n in zip(coords, small.shape)]
        return small[np.ix_(*index)]
    return label.read((0,) * len(shape), shape)[np.ix_(*coords)]
