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

Overlapping windows with blending (eval.overlap > 0): windows at a stride of window x (1 - overlap); each
window's softmax probabilities are depatched to its pixels, weighted (Gaussian, sigma = window / 8 per axis,
peaking at the window centre; or a linear tent, or constant) and summed; a pixel's label is the argmax of the
sum. Windows come in grid order (the first axis outermost), so only the band of rows (2-D) / slabs (3-D) that
the current row of windows covers is accumulated: K x window x (the other axes) float32, whatever the image's
height. Rows that no later window reaches are turned into labels (and probabilities) and handed on
(`blend_bands`); `DenseLabels` keeps them for prediction (a uint8 memmap in a temporary file for large images),
evaluation counts Dice band by band and keeps nothing.
"""

from __future__ import annotations

import functools
import itertools
import math
import tempfile
import time
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
from hrvit.parallel.dist import is_main
from hrvit.patching import collate, depatch, to_device

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
MEMMAP_BYTES = 256 << 20
"""DenseLabels (and predicted probabilities) larger than this live in a memory-mapped temporary file."""


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


class Progress:
    """Plain progress lines on rank 0 ('case X: windows 12/48, 3.1 s elapsed, ETA 9.3 s'): one at least every
    `every_s` seconds and one when the last window is done; silent when every_s is None or on other ranks."""

    def __init__(self, what: str, total: int, every_s: float | None):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()
        self.on = every_s is not None and is_main()

    def update(self, done: int) -> None:
        if not self.on:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"{self.what}: windows {done}/{self.total}, {elapsed:.1f} s elapsed, ETA {eta:.1f} s", flush=True)


@torch.no_grad()
def predict_windows(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                    device=None, progress_s: float | None = None, what: str | None = None) -> Iterator[WindowLabels]:
    """Windows of the grid covering the image, in grid order, each as its tokens' labels. The window goes to
    `device` (the model's), argmax over the classes runs there, and only uint8 labels come back."""
    shape = tuple(case.image.shape)
    win = window_shape(shape, window, patching.patch_size, case.scale)
    starts = grid_starts(shape, win)
    own = [_own([s[i] for s in starts], shape[i]) for i in range(len(shape))]
    progress = Progress(what or f"case {case.spec.id}", len(starts), progress_s)
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, s, win, patching, with_label=False) for s in chunk])
        on = to_device(b, device) if device is not None else b
        logits = model(on["pixels"], on["boxes"], on["valid"], on["scale"])
        labels = logits.argmax(2).to(torch.uint8).cpu().numpy()  # [B, L, *p]: argmax before any upsampling
        del logits, on
        for j, start in enumerate(chunk):
            keep = b["valid"][j].numpy().astype(bool)
            lo = tuple(own[i][start[i]][0] for i in range(len(shape)))
            hi = tuple(own[i][start[i]][1] for i in range(len(shape)))
            yield WindowLabels.from_tokens(start, lo, hi, b["boxes"][j].numpy()[keep], labels[j][keep])
        progress.update(first + len(chunk))


def predict_labels(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                   device=None, overlap: float = 0.0, blend: str = "gaussian", progress_s: float | None = None,
                   what: str | None = None) -> LabelMap | DenseLabels:
    """Every window's labels of one image, as a LabelMap (bytes: about p^D per token); with overlap > 0 the
    blended labels as DenseLabels (blend_bands)."""
    if overlap > 0:
        labels, _ = predict_dense(model, case, window=window, patching=patching, batch=batch, overlap=overlap,
                                  blend=blend, device=device, progress_s=progress_s, what=what)
        return labels
    labels = LabelMap(tuple(case.image.shape))
    for w in predict_windows(model, case, window=window, patching=patching, batch=batch, device=device,
                             progress_s=progress_s, what=what):
        labels.add(w)
    return labels


def predict_dense(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                  overlap: float, blend: str = "gaussian", device=None, probabilities: bool = False,
                  quantize: bool = False, progress_s: float | None = None, what: str | None = None
                  ) -> tuple[DenseLabels, DenseLabels | None]:
    """Labels (and with `probabilities`, per-class probabilities [K, *shape]: float32, or uint8 round(p x 255)
    with `quantize`) of one image from blend_bands, stored band by band (memory-mapped when large). Whole images
    (window None) are one window."""
    shape = tuple(case.image.shape)
    labels, probs = DenseLabels(shape), None
    for band in blend_bands(model, case, window=window, patching=patching, batch=batch, overlap=overlap, blend=blend,
                            device=device, probabilities=probabilities, progress_s=progress_s, what=what):
        labels.put(band.lo, band.labels)
        if probabilities:
            if probs is None:
                probs = DenseLabels(shape, np.uint8 if quantize else np.float32, channels=len(band.probabilities))
            p = band.probabilities
            probs.put(band.lo, np.rint(p * 255).astype(np.uint8) if quantize else p)
    return labels, probs


def axis_weights(size: int, blend: str) -> np.ndarray:
    """Weights of a window's pixels along one axis of `size` pixels (float32, all > 0): 'gaussian' exp(-t^2 /
    2 sigma^2) with sigma = size / 8 and t the distance of the pixel centre from the window centre (about 3e-4 at
    the border), 'linear' a tent falling from 1 at the centre to 1 / size at the border, 'constant' ones. A
    window's weight is the product over its axes, so the summed weight of a pixel is the product of per-axis
    sums."""
    t = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    if blend == "gaussian":
        w = np.exp(-0.5 * (t / (size / 8)) ** 2)
    elif blend == "linear":
        w = 1.0 - np.abs(t) / (size / 2)
    elif blend == "constant":
        w = np.ones(size)
    else:
        raise ValueError(f"blend: {blend!r} is not gaussian, linear or constant")
    return w.astype(np.float32)


@dataclass
class Band:
    """Finished rows [lo, hi) of the first axis (2-D: rows; 3-D: slabs), the whole extent of the other axes:
    labels uint8 [hi - lo, ...] and, when asked for, probabilities float32 [K, hi - lo, ...]."""

    lo: int
    hi: int
    labels: np.ndarray
    probabilities: np.ndarray | None = None


def _outer(vectors: list[np.ndarray]) -> np.ndarray:
    """The product of per-axis vectors as one D-dimensional array (float32, multiplied from the first axis on)."""
    out = vectors[0]
    for v in vectors[1:]:
        out = out[..., None] * v
    return out


@torch.no_grad()
def blend_bands(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig, batch: int,
                overlap: float, blend: str = "gaussian", device=None, probabilities: bool = False,
                progress_s: float | None = None, what: str | None = None) -> Iterator[Band]:
    """Overlapping windows (stride window x (1 - overlap)) blended: each window's softmax probabilities, depatched
    (nearest) to its pixels and weighted (axis_weights), are added into an accumulator that spans only the band of
    first-axis rows the current row of windows covers; when the grid moves on, the rows no later window reaches
    are yielded as a Band: labels = argmax of the weighted sum, probabilities = the sum divided by the summed
    weights. The whole image is covered, in order, by the yielded bands.

    overlap 0 (only useful for probabilities): each window counts with weight 1 on the part it decides (the
    last window of the grid, as `predict_windows`) and 0 elsewhere, so probabilities are the deciding window's.
    Softmax, depatch and weighting run on `device`; the band is a numpy array on the host."""
    shape = tuple(int(n) for n in case.image.shape)
    ndim = len(shape)
    win = window_shape(shape, window, patching.patch_size, case.scale)
    starts = grid_starts(shape, win, overlap)
    if overlap > 0:
        vectors = [axis_weights(w, blend) for w in win]
        fixed = torch.from_numpy(_outer(vectors))

        def axis_weight(i: int, start: int) -> np.ndarray:
            return vectors[i]
    else:
        own = [_own([st[i] for st in starts], shape[i]) for i in range(ndim)]
        fixed = None

        def axis_weight(i: int, start: int) -> np.ndarray:
            lo, hi = own[i][start]
            w = np.zeros(win[i], np.float32)
            w[lo - start:hi - start] = 1
            return w
    # summed weight per pixel = product of per-axis sums (the grid is a product of per-axis starts)
    sums = [np.zeros(n, np.float32) for n in shape]
    for i in range(ndim):
        for start in sorted({st[i] for st in starts}):
            end = min(start + win[i], shape[i])
            sums[i][start:end] += axis_weight(i, start)[:end - start]
    acc = None
    band_lo = 0
    progress = Progress(what or f"case {case.spec.id}", len(starts), progress_s)

    def finish(hi: int) -> Band:
        """Rows [band_lo, hi) as a Band (labels argmaxed a block at a time: int64 indices stay small)."""
        n = hi - band_lo
        part = acc[:, :n]
        labels = np.empty(part.shape[1:], np.uint8)
        rows = max(1, BLOCK // max(1, math.prod(shape[1:])))
        for a in range(0, n, rows):
            labels[a:a + rows] = part[:, a:a + rows].argmax(0)
        probs = None
        if probabilities:
            probs = part / _outer([sums[0][band_lo:hi], *sums[1:]])[None]
        return Band(band_lo, hi, labels, probs)

    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, st, win, patching, with_label=False) for st in chunk])
        on = to_device(b, device) if device is not None else b
        logits = model(on["pixels"], on["boxes"], on["valid"], on["scale"])
        probs = torch.softmax(logits.float(), dim=2)  # [B, L, K, *p]
        del logits
        if acc is None:  # K x (the band: one window's extent on the first axis) x the other axes
            acc = np.zeros((probs.shape[2], min(win[0], shape[0]), *shape[1:]), np.float32)
        for j, start in enumerate(chunk):
            if start[0] > band_lo:  # a new row of windows: the rows above it are final
                yield finish(start[0])
                carry = band_lo + acc.shape[1] - start[0]
                acc[:, :carry] = acc[:, start[0] - band_lo:].copy()
                acc[:, carry:] = 0
                band_lo = start[0]
            dense = depatch(probs[j], on["boxes"][j], on["valid"][j], win)  # [K, *win] on the model's device
            if fixed is not None:
                weight = fixed = fixed.to(dense.device)  # moved once
            else:
                weight = torch.from_numpy(_outer([axis_weight(i, start[i]) for i in range(ndim)])).to(dense.device)
            dense = dense * weight
            inside = [min(w, n - st) for w, n, st in zip(win, shape, start)]
            part = dense[(slice(None), *[slice(0, m) for m in inside])].cpu().numpy()
            region = (slice(None), slice(start[0] - band_lo, start[0] - band_lo + inside[0]),
                      *[slice(st, st + m) for st, m in zip(start[1:], inside[1:])])
            acc[region] += part
            del dense, part
        del probs, on
        progress.update(first + len(chunk))
    yield finish(shape[0])


class DenseLabels:
    """Labels of a whole image as one uint8 array (in memory, or memory-mapped from a temporary file when larger
    than MEMMAP_BYTES), filled band by band from `blend_bands`; LabelMap's reading interface."""

    def __init__(self, shape: tuple[int, ...], dtype=np.uint8, channels: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        full = self.shape if channels is None else (channels, *self.shape)
        self._file = None
        if math.prod(full) * np.dtype(dtype).itemsize > MEMMAP_BYTES:
            self._file = tempfile.TemporaryFile(prefix="hrvit-labels-")
            self.array = np.memmap(self._file, dtype=dtype, mode="w+", shape=full)
        else:
            self.array = np.zeros(full, dtype)

    def put(self, lo: int, values: np.ndarray) -> None:
        """Rows [lo, lo + len) of the first image axis (after the channel axis, if any)."""
        if self.array.ndim == len(self.shape):
            self.array[lo:lo + values.shape[0]] = values
        else:
            self.array[:, lo:lo + values.shape[1]] = values

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (0 when memory-mapped: the pages are the file's, reclaimable by the kernel)."""
        return 0 if self._file is not None else self.array.nbytes

    def sample(self, coords: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
        """Values at the grid coords[0] x coords[1] x ... (sorted, inside the image); with `out`, written into it."""
        coords = [np.asarray(c, np.int64) for c in coords]
        lead = () if self.array.ndim == len(self.shape) else (slice(None),)
        values = self.array[(*lead, *np.ix_(*coords))]
        if out is None:
            return np.asarray(values)
        out[...] = values
        return out

    def read(self, start, size, step: int = 1) -> np.ndarray:
        return self.sample([np.arange(s, min(s + n, dim), step) for s, n, dim in zip(start, size, self.shape)])

    def full(self) -> np.ndarray:
        return np.asarray(self.array)


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
                     num_classes: int, device=None, picture: list[np.ndarray] | None = None, overlap: float = 0.0,
                     blend: str = "gaussian", progress_s: float | None = None, regions=()
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Dice counts of one case, window by window: each window's labels are counted against the truth of the
    part it decides, then dropped (with overlap > 0: each finished band of blended labels, then dropped). With
    `picture` (level-0 coordinates per axis, picture_grid), the labels at that coarse grid are collected on the
    way and returned too. progress_s: seconds between progress lines (None: none). regions (lists of classes,
    data.regions): counts [3, K + R], the classes' then the regions' (metrics.dice_counts)."""
    counts = np.zeros((3, num_classes + len(regions)), np.int64)
    small = None if picture is None else np.zeros([len(c) for c in picture], np.uint8)
    if overlap > 0:
        shape = tuple(case.image.shape)
        for band in blend_bands(model, case, window=window, patching=patching, batch=batch, overlap=overlap,
                                blend=blend, device=device, progress_s=progress_s):
            for start, size in chunks((band.lo, *[0] * (len(shape) - 1)), (band.hi, *shape[1:])):
                mine = band.labels[tuple(slice(a - o, a - o + n) for a, n, o in zip(start, size, (band.lo, 0, 0)))]
                counts += dice_counts(mine, case.label.read(start, size), num_classes, regions)
            if small is not None:
                rows = np.flatnonzero((picture[0] >= band.lo) & (picture[0] < band.hi))
                if len(rows):
                    small[rows] = band.labels[np.ix_(picture[0][rows] - band.lo, *picture[1:])]
        return counts, small
    for w in predict_windows(model, case, window=window, patching=patching, batch=batch, device=device,
                             progress_s=progress_s):
        single = LabelMap(tuple(case.image.shape))
        single.add(w)
        for start, size in chunks(w.own_lo, w.own_hi):
            counts += dice_counts(single.read(start, size), case.label.read(start, size), num_classes, regions)
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
