"""Adaptive patching: a quadtree (2-D) / octree (3-D) whose leaves become the tokens.

The tree (after the SC24 paper's adaptive patching, without its faults):

- Roots: a grid of squares (cubes) of edge R, the largest power-of-two multiple of p that fits the
  image's shortest side (capped by max_leaf), so any shape is covered; children entirely outside
  the image are never made, and a node that is mostly (> 1/2) outside is split first.
- Best-first: a heap keyed by detail mass (mean detail x in-image area / p^D) splits the most
  detailed node next, O(L log L); nodes at the minimum leaf size are never queued, so the split
  goes on with the next splittable node. Equal mass splits larger nodes first, so a blank image
  is refined evenly.
- Budget mode: exactly L tokens, real leaves then masked padding (fewer real leaves only when the
  image cannot be split further, or when the last split would overshoot L). Threshold mode:
  split while detail mass > threshold (variable length, `tokens` caps it).
- Leaves are emitted in Morton (Z) order of their corners: tree order, neighbours stay close.

Each leaf of edge S becomes one token of p^D pixels: the area (box-filter) mean over S/p blocks
for images, the pixel at each block's centre for labels (never interpolated). Two readers:
`patch_adaptive` for an image in memory (one area pooling pass, all leaves of one size gathered in
one indexing call), `patch_pyramid` for slides (the tree is built on a low-resolution level and
each leaf is read from the pyramid level whose downsample is the largest not above S/p; level 0 is
only read for base-size leaves). Everything is torch, so it runs on CPU and GPU alike.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hrvit.errors import ConfigError, DataError
from hrvit.patching.scores import Detail
from hrvit.patching.sequence import IGNORE_INDEX, PatchSequence

BASE_POOL = 4
"""In memory, the image is area-pooled once by this factor (one pass); larger leaves are cut from
that map and its halvings, smaller ones copied from the image."""
WORK_MAX = 2048
"""Pyramid-native: the working (score) map has at most this many pixels per side."""
READ_CHUNK = 1024
"""Pyramid-native: the working map is read in chunks of at most this many level pixels per side."""


@dataclass
class Leaves:
    """Leaves of one tree, in Morton order: start [n, D] and size [n] in level-0 pixels, detail [n]."""

    start: np.ndarray
    size: np.ndarray
    detail: np.ndarray

    def __len__(self) -> int:
        return len(self.size)


def leaf_limits(cfg) -> tuple[int, int, int | None]:
    """(p, min_leaf, max_leaf) from a PatchingConfig."""
    p = cfg.patch_size
    min_leaf, max_leaf = cfg.min_leaf or p, cfg.max_leaf
    if max_leaf is not None and max_leaf < min_leaf:
        raise ConfigError(f"patching.min_leaf: {min_leaf} is larger than patching.max_leaf ({max_leaf})")
    return p, min_leaf, max_leaf


def root_size(extent, p: int, min_leaf: int, max_leaf: int | None) -> int:
    """Edge of the root squares: the largest power-of-two multiple of p that fits the shortest side
    (at least min_leaf, at most max_leaf)."""
    shortest = min(extent)
    if shortest < p:
        raise DataError(f"image of shape {tuple(extent)} is smaller than one patch ({p} px)")
    root = max(min_leaf, p * 2 ** int(math.floor(math.log2(shortest / p))))
    return min(root, max_leaf) if max_leaf else root


def build_tree(extent, root: int, min_leaf: int, p: int, detail, tokens: int | None = None,
               threshold: float | None = None) -> Leaves:
    """Best-first quadtree/octree over an image of shape `extent` (level-0 pixels).

    detail(start, size) -> [0, 1]; a node's mass is its detail x its in-image area in base patches
    (p^D), so a large node with a little detail in it outranks a small plain one (with the edge
    score, mass adds up: a child never outweighs its parent). Budget mode (threshold None): at most
    `tokens` leaves, as many as the image allows. Threshold mode: split while mass > threshold (the same
    order, stopped there), at most `tokens` leaves.
    """
    extent = tuple(int(e) for e in extent)
    ndim = len(extent)
    roots = list(itertools.product(*[range(0, e, root) for e in extent]))
    cap = math.inf if tokens is None else tokens
    if len(roots) > cap:
        raise DataError(
            f"patching.tokens={tokens} is smaller than the {len(roots)} roots of {root} px needed to cover an image "
            f"of shape {extent}; raise patching.tokens or patching.max_leaf")
    offsets = list(itertools.product((0, 1), repeat=ndim))
    unit = float(p**ndim)
    heap: list = []
    leaves: list = []

    def add(start, size):
        d = detail(start, size)
        if size > min_leaf:
            inside = 1.0
            for s, e in zip(start, extent):
                if s + size > e:
                    inside *= (e - s) / size
            if inside < 0.5:
                heapq.heappush(heap, (-math.inf, -size, start, d))
                return
            mass = d * inside * (size**ndim / unit)
            if threshold is None or mass > threshold:
                heapq.heappush(heap, (-mass, -size, start, d))
                return
        leaves.append((start, size, d))

    for r in roots:
        add(r, root)
    count = len(roots)
    while heap and count < cap:
        entry = heapq.heappop(heap)
        size, start = -entry[1], entry[2]
        half = size // 2
        if ndim == 2:
            y, x = start
            kids = [(y, x)]
            if x + half < extent[1]:
                kids.append((y, x + half))
            if y + half < extent[0]:
                kids.append((y + half, x))
                if x + half < extent[1]:
                    kids.append((y + half, x + half))
        else:
            kids = [k for k in (tuple(s + o * half for s, o in zip(start, off)) for off in offsets)
                    if all(s < e for s, e in zip(k, extent))]
        if count + len(kids) - 1 > cap:
            leaves.append((start, size, entry[3]))
            continue
        count += len(kids) - 1
        for k in kids:
            add(k, half)
    leaves += [(start, -neg, d) for _, neg, start, d in heap]
    start = np.array([leaf[0] for leaf in leaves], np.int64).reshape(-1, ndim)
    size = np.array([leaf[1] for leaf in leaves], np.int64)
    order = np.argsort(morton(start // min_leaf), kind="stable")
    return Leaves(start[order], size[order], np.array([leaf[2] for leaf in leaves], np.float64)[order])


def morton(coords: np.ndarray) -> np.ndarray:
    """Z-order code of non-negative integer coordinates [n, D] (first axis most significant)."""
    coords = coords.astype(np.uint64)
    ndim = coords.shape[1]
    code = np.zeros(len(coords), np.uint64)
    bits = max(1, int(coords.max()).bit_length()) if len(coords) else 1
    for bit in range(bits):
        for a in range(ndim):
            code |= ((coords[:, a] >> np.uint64(bit)) & np.uint64(1)) << np.uint64(bit * ndim + ndim - 1 - a)
    return code


# ------------------------------------------------------------------ resampling


def area_pool(x: torch.Tensor, f: int, zero_outside: bool = True) -> torch.Tensor:
    """[C, *S] -> [C, *ceil(S / f)] block means. A block that sticks out of the image averages
    zeros there (zero_outside) or only its in-image pixels."""
    if f == 1:
        return x
    pool = F.avg_pool2d if x.ndim == 3 else F.avg_pool3d
    y = pool(x, f, ceil_mode=True)
    if zero_outside:
        for a, n in enumerate(x.shape[1:]):
            if n % f:
                y.narrow(a + 1, y.shape[a + 1] - 1, 1).mul_((n % f) / f)
    return y


def _pad_to(x: torch.Tensor, shape) -> torch.Tensor:
    extra = [t - s for s, t in zip(x.shape[1:], shape)]
    if not any(extra):
        return x
    return F.pad(x, [v for e in reversed(extra) for v in (0, e)])


def _blocks(src: torch.Tensor, starts: torch.Tensor, size: int) -> torch.Tensor:
    """src [C, *S] -> [n, C, size...]: the blocks at starts [n, D] (must lie inside src), one indexing call."""
    ndim = starts.shape[1]
    ar = torch.arange(size, device=src.device)
    index = []
    for a in range(ndim):
        shape = [len(starts)] + [1] * ndim
        shape[1 + a] = size
        index.append((starts[:, a, None] + ar).view(shape))
    return src[(slice(None), *index)].movedim(0, 1)


def nearest_labels(label: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, p: int) -> torch.Tensor:
    """label [*E] -> [n, p...]: the label at the centre of each of a leaf's p^D blocks (never
    interpolated), IGNORE_INDEX outside the image; all leaves in one indexing call."""
    extent = label.shape
    ndim = len(extent)
    step = (sizes // p)[:, None]
    offset = torch.arange(p, device=label.device)[None] * step + step // 2  # [n, p]
    index, keep = [], None
    for a in range(ndim):
        shape = [len(starts)] + [1] * ndim
        shape[1 + a] = p
        ia = (starts[:, a, None] + offset).view(shape)
        inside = ia < extent[a]
        keep = inside if keep is None else keep & inside
        index.append(ia.clamp(max=extent[a] - 1))
    out = label[tuple(index)].long()
    return torch.where(keep, out, torch.full_like(out, IGNORE_INDEX))


def _every(dim: int, first: int) -> tuple:
    """Index of every other element along `dim`, from `first`."""
    return (slice(None),) * dim + (slice(first, None, 2),)


def _cut_blocks(image: torch.Tensor, starts: np.ndarray, size: int, p: int) -> torch.Tensor:
    """Leaves of one small size cut from the image (0 outside it) and block-averaged to p: [n, C, p...].
    Copies only the leaves' own pixels, in chunks of about 16 MB."""
    c, *extent = image.shape
    ndim, f = len(extent), size // p
    chunk = max(1, (1 << 22) // (c * size**ndim))
    out = []
    for i in range(0, len(starts), chunk):
        views = []
        for st in starts[i:i + chunk].tolist():
            v = image[(slice(None), *[slice(s, s + size) for s in st])]
            if v.shape[1:] != (size,) * ndim:  # crossing the image edge
                v = F.pad(v, [x for n in reversed(v.shape[1:]) for x in (0, size - n)])
            views.append(v)
        block = torch.stack(views)
        for _ in range(int(math.log2(f))):  # strided adds: much faster here than avg_pool or mean
            for d in range(2, 2 + ndim):
                block = block[_every(d, 0)] + block[_every(d, 1)]
            block = block * (0.5**ndim)
        out.append(block)
    return torch.cat(out)


def resample(image: torch.Tensor, leaves: Leaves, p: int, base: torch.Tensor, base_factor: int) -> torch.Tensor:
    """Every leaf of an in-memory image [C, *E] area-resampled to p: [n, C, p...] (0 outside the image).

    Leaves of edge >= base_factor * p are cut from `base` (the image area-pooled by base_factor,
    zero outside) and its halvings, one indexing call per level; smaller ones (levels below
    log2(base_factor)) are copied from the image leaf by leaf and averaged per level.
    """
    c, ndim = image.shape[0], image.ndim - 1
    out = image.new_zeros((len(leaves), c, *(p,) * ndim))
    if not len(leaves):
        return out
    starts = torch.from_numpy(leaves.start).to(image.device)
    levels = np.log2(leaves.size // p).astype(np.int64)
    grid = [int((leaves.start[:, a] + leaves.size).max()) for a in range(ndim)]
    b = int(math.log2(base_factor))
    for k in range(b):
        sel = np.flatnonzero(levels == k)
        if len(sel):
            out[torch.from_numpy(sel).to(image.device)] = _cut_blocks(image, leaves.start[sel], p << k, p)
    if int(levels.max()) >= b:
        level_map = _pad_to(base, [g >> b for g in grid])
        for k in range(b, int(levels.max()) + 1):
            if k > b:
                level_map = area_pool(level_map, 2)
            sel = torch.from_numpy(np.flatnonzero(levels == k)).to(image.device)
            if len(sel):
                out[sel] = _blocks(level_map, starts[sel] >> k, p)
    return out


def to_sequence(leaves: Leaves, pixels: torch.Tensor, p: int, length: int | None, image_shape,
                target: torch.Tensor | None = None) -> PatchSequence:
    """Leaves and their token pixels (and targets) -> a PatchSequence padded to `length` tokens."""
    n = len(leaves)
    total = max(length or n, n)
    ndim = leaves.start.shape[1]
    extra = total - n
    device = pixels.device

    def pad(t, fill):
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)]) if extra else t

    boxes = np.concatenate([leaves.start, np.repeat(leaves.size[:, None], ndim, 1)], 1)
    seq = PatchSequence(
        pixels=pad(pixels, 0),
        boxes=pad(torch.from_numpy(boxes).to(device), 0),
        level=pad(torch.from_numpy(np.log2(leaves.size // p).astype(np.int64)).to(device), 0),
        valid=pad(torch.ones(n, dtype=torch.bool, device=device), False),
        image_shape=tuple(int(s) for s in image_shape),
        score=pad(torch.from_numpy(leaves.detail.astype(np.float32)).to(device), 0.0),
    )
    if target is not None:
        seq.target = pad(target, IGNORE_INDEX)
    return seq


def _sensitivity(cfg, rng) -> float:
    if rng is None or not cfg.jitter:
        return 1.0
    return float(math.exp(rng.uniform(-cfg.jitter, cfg.jitter)))


def _check_extent(extent, p):
    if len(extent) not in (2, 3):
        raise DataError(f"adaptive patching takes 2-D or 3-D images, got spatial shape {tuple(extent)}")
    if min(extent) < p:
        raise DataError(f"image of shape {tuple(extent)} is smaller than one patch ({p} px)")


# ------------------------------------------------------------------ the two readers


def patch_adaptive(image: torch.Tensor, cfg, target: torch.Tensor | None = None, rng=None,
                   image_shape=None) -> PatchSequence:
    """Adaptive tokens of an in-memory image [C, *E] (2-D or 3-D) as `cfg` (a PatchingConfig) says.

    target [*E] labels (optional); rng: np.random.Generator for jitter (training only);
    image_shape: the sequence's image_shape (default E; a window may be larger than its in-image part).
    Timings per stage land in seq.meta["seconds"].
    """
    tick = time.perf_counter()
    p, min_leaf, max_leaf = leaf_limits(cfg)
    extent = tuple(image.shape[1:])
    _check_extent(extent, p)
    if target is not None and tuple(target.shape) != extent:
        raise DataError(f"label shape {tuple(target.shape)} does not match image shape {extent}")
    w = max(1, min_leaf // 2)
    f = min(BASE_POOL, w)
    base = area_pool(image, f, zero_outside=False)  # the one pass over the whole image
    work = area_pool(base, w // f, zero_outside=False)
    detail = Detail(work, w, cfg.scorer, cfg.tissue_mask, _sensitivity(cfg, rng))
    if any(n % f for n in extent):  # tokens see zeros outside the image: rescale partial edge blocks
        base = base.clone()
        for a, n in enumerate(extent):
            if n % f:
                base.narrow(a + 1, base.shape[a + 1] - 1, 1).mul_((n % f) / f)
    t_scores = time.perf_counter()
    root = root_size(extent, p, min_leaf, max_leaf)
    leaves = build_tree(extent, root, min_leaf, p, detail.node, cfg.tokens, cfg.threshold)
    t_tree = time.perf_counter()
    pixels = resample(image, leaves, p, base, f)
    labels = None
    if target is not None:
        starts = torch.from_numpy(leaves.start).to(target.device)
        labels = nearest_labels(target, starts, torch.from_numpy(leaves.size).to(target.device), p)
    length = cfg.tokens if cfg.threshold is None else None
    seq = to_sequence(leaves, pixels, p, length, image_shape or extent, labels)
    done = time.perf_counter()
    seq.meta = {"real_tokens": len(leaves), "root": root, "working_pixel": w,
                "seconds": {"scores": t_scores - tick, "tree": t_tree - t_scores, "resample": done - t_tree,
                            "total": done - tick}}
    return seq


def _work_map(source, start, extent, w: float, counts: dict) -> torch.Tensor:
    """The region's working map (w level-0 px per pixel, in-image means) read chunk by chunk from the
    level whose downsample is the largest not above w, so no read exceeds READ_CHUNK^2 pixels."""
    level = source.best_level(w)
    ds = source.level_downsamples[level]
    shape = [math.ceil(e / w) for e in extent]
    out = torch.zeros(source.channels, *shape)
    step = max(1, int(READ_CHUNK * ds // w))
    for cy in range(0, shape[0], step):
        for cx in range(0, shape[1], step):
            hy, hx = min(step, shape[0] - cy), min(step, shape[1] - cx)
            y0, x0 = int(cy * w), int(cx * w)
            ly, lx = min(hy * w, extent[0] - y0), min(hx * w, extent[1] - x0)  # level-0 size inside
            size = (max(1, round(ly / ds)), max(1, round(lx / ds)))
            block = torch.from_numpy(source.read_level(level, (start[0] + y0, start[1] + x0), size))
            counts[level] = counts.get(level, 0) + size[0] * size[1]
            if tuple(block.shape[1:]) != (hy, hx):
                block = F.interpolate(block[None], size=(hy, hx), mode="area")[0]
            out[:, cy:cy + hy, cx:cx + hx] = block
    return out


def _read_leaves(source, start, extent, starts: np.ndarray, size: int, p: int, counts: dict) -> torch.Tensor:
    """Leaves of one size read from the level whose downsample is the largest not above size / p,
    resampled to p in one call: [n, C, p, p]. Outside the region reads as 0."""
    level = source.best_level(size / p)
    ds = source.level_downsamples[level]
    n = max(p, math.ceil(size / ds - 1e-6))
    blocks = []
    for y, x in starts.tolist():
        block = source.read_level(level, (start[0] + y, start[1] + x), (n, n))
        over_y, over_x = y + size - extent[0], x + size - extent[1]
        if over_y > 0 or over_x > 0:  # crossing the region's edge: zero outside, as in memory
            block = block.copy()
            if over_y > 0:
                block[:, n - int(over_y * n // size):] = 0
            if over_x > 0:
                block[:, :, n - int(over_x * n // size):] = 0
        blocks.append(block)
    counts[level] = counts.get(level, 0) + len(blocks) * n * n
    out = torch.from_numpy(np.stack(blocks))
    if n != p:
        out = F.interpolate(out, size=(p, p), mode="area")
    return out


def _read_labels(label, start, extent, starts: np.ndarray, size: int, p: int) -> torch.Tensor:
    """Leaves' labels by nearest sampling from the label pyramid (or level 0): [n, p, p] int64."""
    if hasattr(label, "read_level"):
        ok = [i for i, d in enumerate(label.level_downsamples) if d <= size / p * (1 + 1e-6)]
        level = max(ok, default=0)
        ds = label.level_downsamples[level]
    else:
        level, ds = None, 1.0
    n = max(p, math.ceil(size / ds - 1e-6))
    pick = ((np.arange(p) + 0.5) * n / p).astype(np.int64)
    out = np.empty((len(starts), p, p), np.int64)
    for i, (y, x) in enumerate(starts.tolist()):
        at = (start[0] + y, start[1] + x)
        block = label.read_level(level, at, (n, n)) if level is not None else label.read(at, (n, n))
        block = block[pick][:, pick]
        ys = y + (pick * size) // n  # level-0 row of each sample, relative to the region
        xs = x + (pick * size) // n
        block[ys >= extent[0]] = IGNORE_INDEX
        block[:, xs >= extent[1]] = IGNORE_INDEX
        out[i] = block
    return torch.from_numpy(out)


def patch_pyramid(source, cfg, start=(0, 0), shape=None, label=None, rng=None, image_shape=None) -> PatchSequence:
    """Adaptive tokens of a region of a pyramidal slide, never reading it whole at level 0.

    source: has level_downsamples, best_level(ds) and read_level(level, start_level0, size) -> [C, h, w]
    (hrvit.data.SlideSource); label: a label source (read_level when it has a pyramid, else read).
    The tree is built on a working map of at most WORK_MAX^2 pixels; each leaf of edge S is read from
    the level whose downsample is the largest not above S / p. seq.meta reports the pixels read per
    level and level0_fraction_read (level-0 pixels read / the region's pixels).
    """
    tick = time.perf_counter()
    p, min_leaf, max_leaf = leaf_limits(cfg)
    start = tuple(int(s) for s in start)
    extent = tuple(int(s) for s in (shape or source.shape))
    extent = tuple(min(e, s - a) for e, s, a in zip(extent, source.shape, start))
    _check_extent(extent, p)
    if len(extent) != 2:
        raise DataError("pyramid-native patching reads 2-D slides")
    w = max(1, min_leaf // 2)
    while max(extent) / w > WORK_MAX:
        w *= 2
    counts: dict = {}
    work = _work_map(source, start, extent, w, counts)
    detail = Detail(work, w, cfg.scorer, cfg.tissue_mask, _sensitivity(cfg, rng))
    del work
    t_scores = time.perf_counter()
    root = root_size(extent, p, min_leaf, max_leaf)
    leaves = build_tree(extent, root, min_leaf, p, detail.node, cfg.tokens, cfg.threshold)
    t_tree = time.perf_counter()
    pixels = torch.zeros(len(leaves), source.channels, p, p)
    labels = torch.full((len(leaves), p, p), IGNORE_INDEX, dtype=torch.long) if label is not None else None
    for size in np.unique(leaves.size):
        sel = np.flatnonzero(leaves.size == size)
        idx = torch.from_numpy(sel)
        pixels[idx] = _read_leaves(source, start, extent, leaves.start[sel], int(size), p, counts)
        if label is not None:
            labels[idx] = _read_labels(label, start, extent, leaves.start[sel], int(size), p)
    length = cfg.tokens if cfg.threshold is None else None
    seq = to_sequence(leaves, pixels, p, length, image_shape or extent, labels)
    done = time.perf_counter()
    area = math.prod(extent)
    seq.meta = {"real_tokens": len(leaves), "root": root, "working_pixel": w,
                "pixels_read": {int(k): int(v) for k, v in sorted(counts.items())},
                "level0_fraction_read": counts.get(0, 0) / area,
                "seconds": {"scores": t_scores - tick, "tree": t_tree - t_scores, "resample": done - t_tree,
                            "total": done - tick}}
    return seq
