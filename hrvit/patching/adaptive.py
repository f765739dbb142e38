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

Anisotropic and thin volumes (3-D, voxel spacing from the NIfTI affine): roots and splits per axis. Root edges are
p 2^k per axis, as large as fits the volume's physically shortest side (a cube in millimetres, as near as powers of
two allow; an axis thinner than p is one root thick); a node splits only along axes still larger than the minimum
leaf whose physical extent is more than half the longest such axis, so nodes tend to physical cubes and 5 mm
slices are not cut as finely as 0.9 mm pixels. With isotropic spacing this is the cubic tree above, bit for bit.

Each leaf of edge S becomes one token of p^D pixels: the area (box-filter) mean over S/p blocks
for images, the majority label of each block for labels (smallest label on ties, IGNORE_INDEX only
for a block wholly outside the image; never interpolated, so no value that is not in the source).
Two readers: `patch_adaptive` for an image in memory (one area pooling pass, all leaves of one size
gathered in one indexing call), `patch_pyramid` for slides (the tree is built on a low-resolution
level and each leaf is read from the level hrvit.data.sources.choose_level picks for S/p, several
leaves per read; level 0 is only read for base-size leaves). A single-level file gives the tokens
its decoded pixels give in memory, bit for bit; an 8-bit one is patched from its decoded bytes (StoredImage),
never from a float copy of the whole image. Everything is torch, so it runs on CPU and GPU alike.
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
from hrvit.patching.scores import Detail, populated
from hrvit.patching.sequence import IGNORE_INDEX, PatchSequence
from hrvit.patching.uniform import check_extent

BASE_POOL = 4
"""In memory, the image is area-pooled once by this factor (one pass); larger leaves are cut from
that map and its halvings, smaller ones copied from the image."""
WORK_MAX = 2048
"""Pyramid-native: the working (score) map has at most this many pixels per side."""
READ_CHUNK = 1024
"""Pyramid-native: the working map is read in chunks of at most this many level pixels per side, leaves
in boxes of about this size."""
WHOLE_MAX = 8192 * 8192
"""Pyramid-native: a region whose working map would come from level 0 is read whole (one decode, then
patched in memory) up to this many pixels (0.2 GB of 8-bit RGB, kept as decoded; 0.8 GB as float32 for other
dtypes)."""


@dataclass
class Leaves:
    """Leaves of one tree, in Morton order: start [n, D] and size [n] (the longest edge) in level-0 pixels,
    detail [n]; edges [n, D] per axis (default: cubic, every edge = size)."""

    start: np.ndarray
    size: np.ndarray
    detail: np.ndarray
    edges: np.ndarray | None = None

    def __post_init__(self):
        if self.edges is None:
            self.edges = np.repeat(self.size[:, None], self.start.shape[1], 1)

    @property
    def cubic(self) -> bool:
        return bool((self.edges == self.size[:, None]).all())

    def __len__(self) -> int:
        return len(self.size)


@dataclass
class StoredImage:
    """A 2-D image as its file stores it, raw uint8 [h, w, C], and the factor its reader scales it by (read_level's
    float32 pixels are float32(v) x float32(scale)). patch_pyramid hands a single-level file's region to
    patch_adaptive this way: float32 is made only strip by strip for the working maps and leaf by leaf for the small
    leaves, each value converted exactly as the reader converts it, so the tokens and the tree are those of the float
    image bit for bit, without its float copy (4x the bytes: at 8192^2 RGB, filling it cost more than decoding the
    JPEG tiles, and pooling it from memory more than pooling strips that stay in cache)."""

    raw: torch.Tensor
    scale: float

    def __post_init__(self):
        self.scale = float(np.float32(self.scale))  # the float32 factor the reader multiplies by

    @property
    def shape(self) -> tuple[int, ...]:
        h, w, c = self.raw.shape
        return (c, h, w)

    ndim = 3
    device = torch.device("cpu")

    def floats(self) -> torch.Tensor:
        """The whole image as the reader gives it, float32 [C, h, w] (only where a caller needs every pixel)."""
        return torch.mul(self.raw.permute(2, 0, 1), self.scale).contiguous()


def leaf_limits(cfg) -> tuple[int, int, int | None]:
    """(p, min_leaf, max_leaf) from a PatchingConfig."""
    p = cfg.patch_size
    min_leaf, max_leaf = cfg.min_leaf or p, cfg.max_leaf
    if max_leaf is not None and max_leaf < min_leaf:
        raise ConfigError(f"patching.min_leaf: {min_leaf} is larger than patching.max_leaf ({max_leaf})")
    return p, min_leaf, max_leaf


def root_size(extent, p: int, min_leaf: int, max_leaf: int | None) -> int:
    """Edge of the root squares: the largest power-of-two multiple of min_leaf that fits the shortest side
    (at least min_leaf, at most max_leaf), so that nodes halve exactly down to min_leaf (which data.mpp
    makes any even number of level-0 pixels)."""
    shortest = min(extent)
    if shortest < p:
        raise DataError(f"image of shape {tuple(extent)} is smaller than one patch ({p} px)")
    root = min_leaf * 2 ** max(0, int(math.floor(math.log2(shortest / min_leaf))))
    return min(root, max_leaf) if max_leaf else root


def isotropic(spacing) -> bool:
    """True for no spacing or the same spacing on every axis (to 1e-6 relative)."""
    return spacing is None or max(spacing) - min(spacing) <= 1e-6 * max(spacing)


def root_edges(extent, p: int, min_leaf: int, max_leaf: int | None, spacing=None) -> tuple[int, ...]:
    """Root edge per axis: the largest min_leaf 2^k whose physical length (edge x spacing) fits the physically
    shortest side of the image (min_leaf itself where none does: an axis thinner than that is one root thick), at
    most max_leaf. With isotropic spacing every axis gets root_size's edge (an image thinner than p aside)."""
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(extent)
    if isotropic(spacing):
        spacing = (1.0,) * len(extent)
    shortest = min(e * s for e, s in zip(extent, spacing)) * (1 + 1e-9)
    edges = []
    for s in spacing:
        edge = min_leaf
        while 2 * edge * s <= shortest:
            edge *= 2
        edges.append(min(edge, max_leaf) if max_leaf else edge)
    return tuple(edges)


def build_tree(extent, root, min_leaf: int, p: int, detail, tokens: int | None = None,
               threshold: float | None = None, spacing=None) -> Leaves:
    """Best-first quadtree/octree over an image of shape `extent` (level-0 pixels).

    detail(start, size) -> [0, 1]; a node's mass is its detail x its in-image area in base patches
    (p^D), so a large node with a little detail in it outranks a small plain one (with the edge
    score, mass adds up: a child never outweighs its parent). Budget mode (threshold None): at most
    `tokens` leaves, as many as the image allows. Threshold mode: split while mass > threshold (the same
    order, stopped there), at most `tokens` leaves.

    root: an edge (cubic tree) or one edge per axis (then detail(start, edges) takes per-axis edges, nodes split
    per axis as `split_axes` says with `spacing`, and the leaves carry their edges).
    """
    if not isinstance(root, int):
        return _build_tree_axes(extent, tuple(int(r) for r in root), min_leaf, p, detail, tokens, threshold,
                                spacing)
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


def split_axes(edges, min_leaf: int, spacing) -> tuple[int, ...]:
    """Axes a node of these edges splits along: those still larger than min_leaf whose physical extent (edge x
    spacing) is more than half the longest of them. Isotropic cubes split along every axis (the cubic tree); a
    node of 16 x 64 x 64 voxels of 5 x 0.9 x 0.9 mm (80 x 58 x 58 mm) too, but 16 x 256 x 256 (80 x 230 x 230 mm)
    only in-plane."""
    can = [a for a, e in enumerate(edges) if e > min_leaf]
    if not can:
        return ()
    longest = max(edges[a] * spacing[a] for a in can)
    return tuple(a for a in can if 2 * edges[a] * spacing[a] > longest)


def _build_tree_axes(extent, root: tuple[int, ...], min_leaf: int, p: int, detail, tokens, threshold,
                     spacing) -> Leaves:
    """build_tree with per-axis roots and splits: the same best-first order, mass and budget; a node splits
    along split_axes (plus, when it is mostly outside the image, the axes it sticks out along), into 2, 4 or 8
    children; children wholly outside are never made."""
    extent = tuple(int(e) for e in extent)
    ndim = len(extent)
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    roots = list(itertools.product(*[range(0, e, r) for e, r in zip(extent, root)]))
    cap = math.inf if tokens is None else tokens
    if len(roots) > cap:
        raise DataError(
            f"patching.tokens={tokens} is smaller than the {len(roots)} roots of "
            f"{root[0] if len(set(root)) == 1 else 'x'.join(map(str, root))} px "
            f"needed to cover an image of shape {extent}; raise patching.tokens or patching.max_leaf")
    unit = float(p**ndim)
    heap: list = []
    leaves: list = []

    def add(start, edges):
        d = detail(start, edges)
        axes = split_axes(edges, min_leaf, spacing)
        if axes:
            inside = 1.0
            for s, n, e in zip(start, edges, extent):
                if s + n > e:
                    inside *= (e - s) / n
            if inside < 0.5:
                out = [a for a in range(ndim) if start[a] + edges[a] > extent[a] and edges[a] > min_leaf]
                axes = tuple(sorted(set(axes) | set(out)))
                heapq.heappush(heap, (-math.inf, -math.prod(edges), start, edges, axes, d))
                return
            mass = d * inside * (math.prod(edges) / unit)
            if threshold is None or mass > threshold:
                heapq.heappush(heap, (-mass, -math.prod(edges), start, edges, axes, d))
                return
        leaves.append((start, edges, d))

    for r in roots:
        add(r, root)
    count = len(roots)
    while heap and count < cap:
        _, _, start, edges, axes, d = heapq.heappop(heap)
        half = tuple(e // 2 if a in axes else e for a, e in enumerate(edges))
        steps = [(0, half[a]) if a in axes else (0,) for a in range(ndim)]
        kids = [k for k in (tuple(s + o for s, o in zip(start, off)) for off in itertools.product(*steps))
                if all(s < e for s, e in zip(k, extent))]
        if count + len(kids) - 1 > cap:
            leaves.append((start, edges, d))
            continue
        count += len(kids) - 1
        for k in kids:
            add(k, half)
    leaves += [(entry[2], entry[3], entry[5]) for entry in heap]
    start = np.array([leaf[0] for leaf in leaves], np.int64).reshape(-1, ndim)
    edges = np.array([leaf[1] for leaf in leaves], np.int64).reshape(-1, ndim)
    order = np.argsort(morton(start // min_leaf), kind="stable")
    return Leaves(start[order], edges.max(1)[order], np.array([leaf[2] for leaf in leaves], np.float64)[order],
                  edges[order])


def _detail_axes(detail: Detail):
    """node(start, edges) -> detail in [0, 1] of a box with per-axis edges, from a Detail's summed-area tables
    (Detail.node takes one edge for every axis); the same clipping and scorers."""
    inv, shape, tables, ceil = 1.0 / detail.w, detail.shape, detail.tables, math.ceil
    corners = [(c, (-1) ** (len(shape) - sum(c))) for c in itertools.product((0, 1), repeat=len(shape))]

    def bounds(start, edges):
        lo, hi = [], []
        for s, e, n in zip(start, edges, shape):
            a, b = min(int(s * inv), n - 1), min(ceil((s + e) * inv), n)
            lo.append(a)
            hi.append(b if b > a else a + 1)
        return lo, hi

    def box(t, lo, hi):
        return sum(sign * t.item(*[b if c else a for c, a, b in zip(corner, lo, hi)]) for corner, sign in corners)

    if len(shape) == 3:  # written out: this runs once per tree node
        (nz, ny, nx), (lz, ly, lx) = shape, [n - 1 for n in shape]

        def bounds(start, edges):
            (z, y, x), (ez, ey, ex) = start, edges
            a, b, e = min(int(z * inv), lz), min(int(y * inv), ly), min(int(x * inv), lx)
            c, d, f = min(ceil((z + ez) * inv), nz), min(ceil((y + ey) * inv), ny), min(ceil((x + ex) * inv), nx)
            return (a, b, e), (c if c > a else a + 1, d if d > b else b + 1, f if f > e else e + 1)

        def box(t, lo, hi):
            (a, b, e), (c, d, f) = lo, hi
            return (t.item(c, d, f) - t.item(a, d, f) - t.item(c, b, f) - t.item(c, d, e)
                    + t.item(a, b, f) + t.item(a, d, e) + t.item(c, b, e) - t.item(a, b, e))

    if detail.scorer == "edge":
        def node(start, edges):
            lo, hi = bounds(start, edges)
            return box(tables[0], lo, hi) / math.prod(b - a for a, b in zip(lo, hi))
        return node
    mask = tables[2] if len(tables) == 3 else None

    def node(start, edges):
        lo, hi = bounds(start, edges)
        n = math.prod(b - a for a, b in zip(lo, hi))
        mean = box(tables[0], lo, hi) / n
        value = min(math.sqrt(max(box(tables[1], lo, hi) / n - mean * mean, 0.0)) / detail.t, 1.0)
        return value * box(mask, lo, hi) / n if mask is not None else value
    return node


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


def _blocks(src: torch.Tensor, starts: torch.Tensor, size) -> torch.Tensor:
    """src [C, *S] -> [n, C, *size]: the blocks at starts [n, D] (must lie inside src), one indexing call; size is
    one edge or one per axis."""
    ndim = starts.shape[1]
    sizes = (size,) * ndim if isinstance(size, int) else tuple(size)
    index = []
    for a in range(ndim):
        shape = [len(starts)] + [1] * ndim
        shape[1 + a] = sizes[a]
        index.append((starts[:, a, None] + torch.arange(sizes[a], device=src.device)).view(shape))
    return src[(slice(None), *index)].movedim(0, 1)


def mode_pool(blocks: torch.Tensor, p: int) -> torch.Tensor:
    """Labels [n, *size] (each side a multiple of p) -> [n, p...]: every cell takes the most frequent label
    among the pixels it covers, the smallest one on ties; IGNORE_INDEX only where the whole cell is
    IGNORE_INDEX. Vectorised over leaves and cells: one counting pass per distinct label."""
    n, *size = blocks.shape
    factors = [s // p for s in size]
    if all(f == 1 for f in factors):
        return blocks.long()
    cells = blocks.reshape(n, *[v for f in factors for v in (p, f)])
    axes = tuple(range(2, 2 * len(size) + 1, 2))
    best = torch.full((n, *(p,) * len(size)), IGNORE_INDEX, dtype=torch.long, device=blocks.device)
    top = torch.zeros(best.shape, dtype=torch.int32, device=blocks.device)
    flat = blocks.reshape(-1).long()
    low, high = (int(flat.min()), int(flat.max())) if flat.numel() else (0, 0)
    present = torch.bincount(flat - low).nonzero()[:, 0] + low if high - low < 1 << 20 else torch.unique(flat)
    for value in present.tolist():  # ascending: a later label must count more to win, so ties go to the smaller
        if value == IGNORE_INDEX:
            continue
        count = (cells == value).sum(axes, dtype=torch.int32)
        win = count > top
        best.masked_fill_(win, value)
        top = torch.where(win, count, top)
    return best


def leaf_labels(label: torch.Tensor, leaves: Leaves, p: int) -> torch.Tensor:
    """Majority labels of every leaf of an in-memory label map [*E]: [n, p...], IGNORE_INDEX outside the
    image; the leaves of one size go through mode_pool in chunks of about 16M pixels, one indexing call each."""
    ndim = label.ndim
    grid = [int((leaves.start[:, a] + leaves.edges[:, a]).max()) for a in range(ndim)]
    small = label.numel() == 0 or (int(label.min()) >= -(2**15) and int(label.max()) < 2**15)
    padded = torch.full(grid, IGNORE_INDEX, dtype=torch.int16 if small else torch.long, device=label.device)
    padded[tuple(slice(0, e) for e in label.shape)] = label
    out = torch.empty((len(leaves), *(p,) * ndim), dtype=torch.long, device=label.device)
    starts = torch.from_numpy(leaves.start).to(label.device)
    for edges in np.unique(leaves.edges, axis=0).tolist():  # per-axis edges: anisotropic leaves pool per axis
        sel = np.flatnonzero((leaves.edges == edges).all(1))
        chunk = max(1, (1 << 24) // math.prod(edges))
        for i in range(0, len(sel), chunk):
            part = torch.from_numpy(sel[i:i + chunk]).to(label.device)
            out[part] = mode_pool(_blocks(padded[None], starts[part], edges)[:, 0], p)
    return out


def _every(dim: int, first: int) -> tuple:
    """Index of every other element along `dim`, from `first`."""
    return (slice(None),) * dim + (slice(first, None, 2),)


def _cut_blocks(image: torch.Tensor, starts: np.ndarray, size: int, p: int) -> torch.Tensor:
    """Leaves of one small size cut from the image (0 outside it) and block-averaged to p: [n, C, p...].
    Copies only the leaves' own pixels, in chunks of about 16 MB."""
    c, *extent = image.shape
    ndim, f = len(extent), size // p
    chunk = max(1, (1 << 22) // (c * size**ndim))
    stored = isinstance(image, StoredImage)
    out = []
    for i in range(0, len(starts), chunk):
        views = []
        for st in starts[i:i + chunk].tolist():
            if stored:  # raw [h, w, C]: cut as stored, converted below as the reader converts
                v = image.raw[st[0]:st[0] + size, st[1]:st[1] + size]
                if v.shape[:2] != (size, size):
                    v = F.pad(v, (0, 0, 0, size - v.shape[1], 0, size - v.shape[0]))
            else:
                v = image[(slice(None), *[slice(s, s + size) for s in st])]
                if v.shape[1:] != (size,) * ndim:  # crossing the image edge
                    v = F.pad(v, [x for n in reversed(v.shape[1:]) for x in (0, size - n)])
            views.append(v)
        block = torch.stack(views)
        if stored:
            block = torch.mul(block.permute(0, 3, 1, 2), image.scale)
        for _ in range(int(math.log2(f))):  # strided adds: much faster here than avg_pool or mean
            for d in range(2, 2 + ndim):
                block = block[_every(d, 0)] + block[_every(d, 1)]
            block = block * (0.5**ndim)
        out.append(block)
    return torch.cat(out)


def resample(image: torch.Tensor, leaves: Leaves, p: int, base: torch.Tensor, base_factor: int) -> torch.Tensor:
    """Every leaf of an in-memory image [C, *E] (or a StoredImage) area-resampled to p: [n, C, p...] (0 outside
    the image).

    Leaves of edge >= base_factor * p are cut from `base` (the image area-pooled by base_factor,
    zero outside) and its halvings, one indexing call per level; smaller ones (levels below
    log2(base_factor)) are copied from the image leaf by leaf and averaged per level.
    """
    c, ndim = image.shape[0], image.ndim - 1
    out = base.new_zeros((len(leaves), c, *(p,) * ndim))
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


def _cut_clipped(src: torch.Tensor, starts: torch.Tensor, size) -> torch.Tensor:
    """src [C, *S] -> [n, C, *size]: the blocks at starts [n, D] (inside src), zeros where one reaches past src."""
    ndim = starts.shape[1]
    index, keep = [], torch.ones((len(starts), *(1,) * ndim), dtype=torch.bool, device=src.device)
    for a in range(ndim):
        shape = [len(starts)] + [1] * ndim
        shape[1 + a] = size[a]
        i = (starts[:, a, None] + torch.arange(size[a], device=src.device)).view(shape)
        keep = keep & (i < src.shape[1 + a])
        index.append(i.clamp(max=src.shape[1 + a] - 1))
    return src[(slice(None), *index)].movedim(0, 1).masked_fill_(~keep[:, None], 0.0)


def resample_axes(image: torch.Tensor, leaves: Leaves, p: int) -> torch.Tensor:
    """Every leaf of an in-memory image [C, *E] area-resampled to p per axis: [n, C, p...] (0 outside the image).

    For leaves with per-axis edges (anisotropic trees): each edge is p 2^k, so a token pixel is the mean of
    2^k_a voxels along each axis a (area average by integer factors; never upsampled). The leaves of one edge
    tuple are cut from the finest map made so far that divides it (the image at first) and pooled, when they
    cover less than half of that map; otherwise that map is pooled whole (zeros outside, as area_pool) into theirs,
    kept for larger leaves, and they are cut from it. One indexing call per edge tuple; no padded copy of the image.
    """
    c, ndim = image.shape[0], image.ndim - 1
    out = image.new_zeros((len(leaves), c, *(p,) * ndim))
    if not len(leaves):
        return out
    shifts = np.log2(leaves.edges // p).astype(np.int64)
    maps = {(0,) * ndim: image}
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    starts = torch.from_numpy(leaves.start).to(image.device)
    for k in sorted({tuple(row) for row in shifts.tolist()}):
        sel = torch.from_numpy(np.flatnonzero((shifts == k).all(1))).to(image.device)
        parent = max((m for m in maps if all(a <= b for a, b in zip(m, k))), key=sum)
        src, f = maps[parent], [1 << (b - a) for a, b in zip(parent, k)]
        at = starts[sel] >> torch.tensor(parent, device=image.device)
        if 2 * len(sel) * p**ndim * math.prod(f) < src[0].numel():
            blocks = _cut_clipped(src, at, [p * g for g in f])
            out[sel] = pool(blocks.flatten(0, 1), f).view(len(sel), c, *(p,) * ndim)
            continue
        y = pool(src, f, ceil_mode=True)  # a block cut by the image edge: the mean of its in-image part ...
        for a, (n, g) in enumerate(zip(src.shape[1:], f)):
            if n % g:
                y.narrow(a + 1, y.shape[a + 1] - 1, 1).mul_((n % g) / g)  # ... times its share: zeros outside
        maps[k] = y
        out[sel] = _cut_clipped(y, starts[sel] >> torch.tensor(k, device=image.device), (p,) * ndim)
    return out


def to_sequence(leaves: Leaves, pixels: torch.Tensor, p: int, length: int | None, image_shape,
                target: torch.Tensor | None = None) -> PatchSequence:
    """Leaves and their token pixels (and targets) -> a PatchSequence padded to `length` tokens."""
    n = len(leaves)
    total = max(length or n, n)
    extra = total - n
    device = pixels.device

    def pad(t, fill):
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)]) if extra else t

    boxes = np.concatenate([leaves.start, leaves.edges], 1)
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


STRIP_ROWS = 16
"""A StoredImage is converted to float32 and pooled this many rows at a time (8192 x 3 floats: 1.5 MB, in cache)."""


def stored_working_maps(image: StoredImage, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """working_maps(image.floats(), w), bit for bit, without the float image. Strip by strip (STRIP_ROWS rows, so
    the strip stays in cache): the raw values are converted as the reader converts them, and each f x f block is
    summed by strided adds in the order torch's avg_pool2d adds (row by row, left to right, in float32), then
    divided by f^2 as it divides. Blocks cut by the image edge go through avg_pool2d itself. f = gcd(BASE_POOL, w)
    must be > 1 (else base is the image)."""
    f = math.gcd(BASE_POOL, w)
    raw = image.raw.numpy()
    h, wd, c = raw.shape
    hf, wf = h // f * f, wd // f * f
    scale = np.float32(image.scale)
    base = populated((c, -(-h // f), -(-wd // f)))
    step = max(f, STRIP_ROWS // f * f)
    buf = np.empty((step, wf, c), np.float32)

    def edge_pool(rows, cols):  # torch's own pooling of a region whose blocks the image edge cuts
        x = torch.mul(torch.from_numpy(raw[rows, cols]).permute(2, 0, 1), image.scale).contiguous()
        return area_pool(x, f, zero_outside=False).numpy()

    for r in range(0, hf, step):
        n = min(step, hf - r) // f
        x = np.multiply(raw[r:r + n * f, :wf], scale, out=buf[:n * f], dtype=np.float32)
        x = x.reshape(n, f, wf // f, f, c).transpose(4, 0, 1, 2, 3)  # [C, n, i, cols, j]: term (i, j) of each block
        acc = base[:, r // f:r // f + n, :wf // f]
        np.copyto(acc, x[:, :, 0, :, 0])
        for i in range(f):
            for j in range(f):
                if i or j:
                    acc += x[:, :, i, :, j]
        acc /= np.float32(f * f)
        if wf < wd:
            base[:, r // f:r // f + n, wf // f:] = edge_pool(slice(r, r + n * f), slice(wf, wd))
    if hf < h:
        base[:, hf // f:] = edge_pool(slice(hf, h), slice(0, wd))
    base = torch.from_numpy(base)
    return base, area_pool(base, w // f, zero_outside=False)


def working_maps(image: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, work): in-image block means of the image over gcd(BASE_POOL, w) pixels, then of base over the
    rest of w. The slide path pools each chunk it reads with this same function, so both paths score the
    same map whatever the image size (no chunk is stretched over the grid)."""
    base = area_pool(image, math.gcd(BASE_POOL, w), zero_outside=False)
    return base, area_pool(base, w // math.gcd(BASE_POOL, w), zero_outside=False)


def _picture(maps, max_edge: int) -> np.ndarray:
    """An overview of the image for drawing leaves on (seq.meta["picture"]), from maps the patching already made
    (`maps`: the image and its pooled maps, finest first), so a file is not decoded a second time: the coarsest
    map still >= max_edge on its longest side, area-pooled to fit; [C, *E'] float32."""
    src = maps[0]
    for m in maps[1:]:
        if max(m.shape[1:]) >= max_edge:
            src = m
    return area_pool(src, -(-max(src.shape[1:]) // max_edge), zero_outside=False).cpu().numpy()


def _sensitivity(cfg, rng) -> float:
    if rng is None or not cfg.jitter:
        return 1.0
    return float(math.exp(rng.uniform(-cfg.jitter, cfg.jitter)))


def _check_extent(extent, p):
    if len(extent) not in (2, 3):
        raise DataError(f"adaptive patching takes 2-D or 3-D images, got spatial shape {tuple(extent)}")
    check_extent(extent, p)


# ------------------------------------------------------------------ the two readers


def patch_adaptive(image: torch.Tensor, cfg, target: torch.Tensor | None = None, rng=None,
                   image_shape=None, picture: int = 0, spacing=None) -> PatchSequence:
    """Adaptive tokens of an in-memory image [C, *E] (2-D or 3-D) as `cfg` (a PatchingConfig) says.

    target [*E] labels (optional); rng: np.random.Generator for jitter (training only);
    image_shape: the sequence's image_shape (default E; a window may be larger than its in-image part);
    picture > 0: also an overview of the image, at most that many pixels per side, in seq.meta["picture"]
    (see _picture; off by default, so training holds nothing more). Timings per stage land in seq.meta["seconds"].
    spacing: physical size of a pixel per axis (array order; for NIfTI the affine's column norms, reversed).
    Isotropic (or None): the cubic tree. Otherwise, or when a 3-D axis is thinner than the root, roots and
    splits per axis (root_edges, split_axes) and leaves with per-axis edges, each still resampled to p^D.
    image may also be a StoredImage (2-D, no spacing): the same tokens, without a float copy of the image.
    """
    tick = time.perf_counter()
    p, min_leaf, max_leaf = leaf_limits(cfg)
    extent = tuple(image.shape[1:])
    _check_extent(extent, p)
    if target is not None and tuple(target.shape) != extent:
        raise DataError(f"label shape {tuple(target.shape)} does not match image shape {extent}")
    w = max(1, min_leaf // 2)
    f = math.gcd(BASE_POOL, w)
    if isinstance(image, StoredImage) and (f == 1 or not isotropic(spacing)):
        image = image.floats()  # base would be the image itself, or the leaves need resample_axes
    if isinstance(image, StoredImage):
        base, work = stored_working_maps(image, w)
        if picture and max(base.shape[1:]) < picture:
            overview = _picture((image.floats(), base, work), picture)
        else:  # _picture takes a pooled map whenever one is large enough
            overview = _picture((base, base, work), picture) if picture else None
    else:
        base, work = working_maps(image, w)  # the one pass over the whole image
        overview = _picture((image, base, work), picture) if picture else None
    detail = Detail(work, w, cfg.scorer, cfg.tissue_mask, _sensitivity(cfg, rng))
    if any(n % f for n in extent):  # tokens see zeros outside the image: rescale partial edge blocks
        base = base.clone()
        for a, n in enumerate(extent):
            if n % f:
                base.narrow(a + 1, base.shape[a + 1] - 1, 1).mul_((n % f) / f)
    t_scores = time.perf_counter()
    edges = root_edges(extent, p, min_leaf, max_leaf, spacing)
    if isotropic(spacing):  # the cubic tree (2-D and isotropic volumes, as before)
        root = edges[0]
        leaves = build_tree(extent, root, min_leaf, p, detail.node, cfg.tokens, cfg.threshold)
    else:
        root = edges
        leaves = build_tree(extent, root, min_leaf, p, _detail_axes(detail), cfg.tokens, cfg.threshold, spacing)
    t_tree = time.perf_counter()
    pixels = resample(image, leaves, p, base, f) if leaves.cubic else resample_axes(image, leaves, p)
    labels = None if target is None else leaf_labels(target, leaves, p)
    length = cfg.tokens if cfg.threshold is None else None
    seq = to_sequence(leaves, pixels, p, length, image_shape or extent, labels)
    done = time.perf_counter()
    seq.meta = {"real_tokens": len(leaves), "root": root, "working_pixel": w,
                "seconds": {"scores": t_scores - tick, "tree": t_tree - t_scores, "resample": done - t_tree,
                            "total": done - tick}}
    if overview is not None:
        seq.meta["picture"] = overview
    return seq


def _axis_downsamples(source, level: int) -> tuple[float, float]:
    """(y, x) level-0 pixels per pixel of `level`: per axis, since scanners round each axis on its own."""
    return tuple(a / b for a, b in zip(source.level_shapes[0], source.level_shapes[level]))


def _work_map(source, start, extent, w: int, level: int, counts: dict) -> torch.Tensor:
    """The region's working map (w level-0 px per pixel) from `level`, read in chunks of at most
    READ_CHUNK^2 level pixels, each pooled by working_maps as in memory (at level 0 the map is the
    in-memory one, bit for bit). A level rounded down may lack the last working pixel's share of
    the image: it repeats its neighbour."""
    ds = _axis_downsamples(source, level)
    k = max(1, round(w / math.sqrt(ds[0] * ds[1])))  # level pixels per working pixel
    shape = [math.ceil(e / w) for e in extent]
    out = torch.zeros(source.channels, *shape)
    step = max(1, READ_CHUNK // k)
    for cy in range(0, shape[0], step):
        for cx in range(0, shape[1], step):
            hy, hx = min(step, shape[0] - cy), min(step, shape[1] - cx)
            y0, x0 = cy * w, cx * w
            size = [max(1, min(h * k, round((e - o) / d))) for h, e, o, d in zip((hy, hx), extent, (y0, x0), ds)]
            block = torch.from_numpy(source.read_level(level, (start[0] + y0, start[1] + x0), size))
            counts[level] = counts.get(level, 0) + size[0] * size[1]
            block = working_maps(block, k)[1][:, :hy, :hx]
            if tuple(block.shape[1:]) != (hy, hx):
                block = F.pad(block[None], (0, hx - block.shape[2], 0, hy - block.shape[1]), mode="replicate")[0]
            out[:, cy:cy + hy, cx:cx + hx] = block
    return out


def _overview(source, start, extent, work: torch.Tensor, picture: int, counts: dict) -> np.ndarray:
    """patch_pyramid's overview: the working map when it has at least `picture` pixels per side (large slides:
    free), else the region read once from the level choose_level picks for about `picture` pixels per side (small
    slides keep their detail; a few million pixels at most, reported apart as picture_read: pixels_read is the
    patching's cost)."""
    if max(work.shape[1:]) >= picture:
        return _picture((work,), picture)
    level = source.best_level(max(extent) / picture)
    size = [max(1, math.ceil(e / d)) for e, d in zip(extent, _axis_downsamples(source, level))]
    counts[level] = counts.get(level, 0) + size[0] * size[1]
    return _picture((torch.from_numpy(source.read_level(level, start, size)),), picture)


def _read_at_level(read, origin, extent, starts: np.ndarray, sizes: np.ndarray, ds, p: int, cells, fill):
    """The pixels of leaves (level-0 starts relative to the region at `origin`, edges `sizes`) at one level,
    as blocks of cells(S) = (ny, nx) level pixels; level pixels past the region's edge are set to `fill`.

    Tile-once: leaves of at most Q level-0 px (Q = p 2^k, about READ_CHUNK level px) lie in one cell of a
    Q-grid; the bounding box of a Q-cell's leaves is read in one call when they fill half of it or more
    (each tile of it decoded once, not once per leaf it touches), else leaf by leaf; larger leaves are
    read alone (they cover whole Q-cells). Yields (indices into starts, blocks [m, ..., ny, nx]) per size
    and read. read(start_level0, size_at_level) -> array [..., h, w]."""
    q = p * 2 ** max(0, round(math.log2(READ_CHUNK * min(ds) / p)))
    keys = np.where(sizes[:, None] <= q, starts // q, -1 - np.arange(len(sizes))[:, None])
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        n = np.array([cells(int(s)) for s in sizes[members]])  # [m, 2]
        corner = starts[members].min(0)
        offset = np.rint((starts[members] - corner) / np.array(ds)).astype(np.int64)
        box = (offset + n).max(0)
        whole = len(members) > 1 and 2 * int((n[:, 0] * n[:, 1]).sum()) >= int(box.prod())
        block = read((origin[0] + corner[0], origin[1] + corner[1]), tuple(box)) if whole else None
        for size in np.unique(sizes[members]):
            sub = np.flatnonzero(sizes[members] == size)
            ny, nx = n[sub[0]]
            if whole:
                parts = [block[..., y:y + ny, x:x + nx] for y, x in offset[sub].tolist()]
            else:
                parts = [read((origin[0] + y, origin[1] + x), (ny, nx)) for y, x in starts[members[sub]].tolist()]
            stack = np.stack(parts)
            for axis, (nn, lim) in enumerate(((ny, extent[0]), (nx, extent[1]))):
                # level pixel r covers level-0 from start + r S / n: past the region once r >= (edge - start) n / S
                keep = -(-(lim - starts[members[sub], axis]) * nn // int(size))
                past = np.arange(nn)[None] >= keep[:, None]
                if past.any():
                    shape = [len(sub)] + [1] * (stack.ndim - 1)
                    shape[stack.ndim - 2 + axis] = nn
                    stack = np.where(past.reshape(shape), fill, stack)
            yield members[sub], stack


def patch_pyramid(source, cfg, start=(0, 0), shape=None, label=None, rng=None, image_shape=None,
                  whole_max: int = WHOLE_MAX, picture: int = 0) -> PatchSequence:
    """Adaptive tokens of a region of a slide; level 0 is read whole only for a small region without a coarser level.

    source: has level_shapes, best_level(ds) and read_level(level, start_level0, size) -> [C, h, w]
    (hrvit.data.SlideSource); label: a label source (read_level/best_level when it has a pyramid).
    When the working map would come from level 0 anyway (no coarser level) and the region has at most
    `whole_max` pixels, the region is read once and patched in memory (patch_adaptive: the same tokens
    as the decoded image gives; 8-bit data as its stored bytes, a StoredImage, when the source has read_stored:
    about half the time of patching read_level's float32 copy at 8192^2). Otherwise the tree is built on a
    working map of at most WORK_MAX^2 pixels and each leaf of edge S is read from the level choose_level picks
    for S / p, tile-once (_read_at_level); its labels are the majority of the label level pixels under each of
    its p x p cells. seq.meta reports the image pixels read per level and level0_fraction_read (level-0 pixels read /
    the region's pixels); picture > 0 adds seq.meta["picture"], an overview of the region at most that many pixels
    per side made from the pixels already read (the decoded region or the working map), for overlays.
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
    area = math.prod(extent)
    counts: dict = {}
    level = source.best_level(w)
    if level == 0 and area <= whole_max:
        bytes_ = hasattr(source, "read_stored") and np.dtype(getattr(source, "dtype", np.uint8)) == np.uint8
        stored = source.read_stored(0, start, extent) if bytes_ else None
        if stored is not None and stored[0].dtype == np.uint8:  # the decoded bytes: floats only where needed
            image = StoredImage(torch.from_numpy(stored[0]), stored[1])
        else:
            image = torch.from_numpy(source.read_level(0, start, extent))
        target = None if label is None else torch.from_numpy(label.read(start, extent))
        read = time.perf_counter() - tick
        seq = patch_adaptive(image, cfg, target, rng, image_shape or extent, picture)
        seq.meta.update(pixels_read={0: area}, level0_fraction_read=1.0)
        seq.meta["seconds"] = {k: v + read if k in ("scores", "total") else v for k, v in seq.meta["seconds"].items()}
        return seq
    work = _work_map(source, start, extent, w, level, counts)
    picture_read: dict = {}
    overview = _overview(source, start, extent, work, picture, picture_read) if picture else None
    detail = Detail(work, w, cfg.scorer, cfg.tissue_mask, _sensitivity(cfg, rng))
    del work
    t_scores = time.perf_counter()
    root = root_size(extent, p, min_leaf, max_leaf)
    leaves = build_tree(extent, root, min_leaf, p, detail.node, cfg.tokens, cfg.threshold)
    t_tree = time.perf_counter()
    pixels = torch.zeros(len(leaves), source.channels, p, p)
    image_levels = np.array([source.best_level(s / p) for s in leaves.size.tolist()])
    for lv in np.unique(image_levels).tolist():
        ds = _axis_downsamples(source, lv)
        sel = np.flatnonzero(image_levels == lv)

        def read(at, size, lv=lv):
            counts[lv] = counts.get(lv, 0) + size[0] * size[1]
            return source.read_level(lv, at, size)

        def cells(s, ds=ds):
            return tuple(max(p, round(s / d)) for d in ds)

        for idx, stack in _read_at_level(read, start, extent, leaves.start[sel], leaves.size[sel], ds, p, cells, 0.0):
            out = torch.from_numpy(stack)
            pixels[torch.from_numpy(sel[idx])] = out if out.shape[-2:] == (p, p) else F.interpolate(out, (p, p),
                                                                                                   mode="area")
    labels = None if label is None else _read_labels(label, start, extent, leaves, p)
    length = cfg.tokens if cfg.threshold is None else None
    seq = to_sequence(leaves, pixels, p, length, image_shape or extent, labels)
    done = time.perf_counter()
    seq.meta = {"real_tokens": len(leaves), "root": root, "working_pixel": w,
                "pixels_read": {int(k): int(v) for k, v in sorted(counts.items())},
                "level0_fraction_read": counts.get(0, 0) / area,
                "seconds": {"scores": t_scores - tick, "tree": t_tree - t_scores, "resample": done - t_tree,
                            "total": done - tick}}
    if overview is not None:
        seq.meta.update(picture=overview, picture_read=picture_read)
    return seq


def _read_labels(label, start, extent, leaves: Leaves, p: int) -> torch.Tensor:
    """Majority labels of the leaves [n, p, p]: from the label level choose_level picks for S / p (level 0
    without a pyramid), whole cells of c x c level pixels per token pixel, read tile-once."""
    out = torch.empty((len(leaves), p, p), dtype=torch.long)
    if hasattr(label, "best_level"):
        levels = np.array([label.best_level(s / p) for s in leaves.size.tolist()])
    else:
        levels = np.zeros(len(leaves), np.int64)
    for lv in np.unique(levels).tolist():
        sel = np.flatnonzero(levels == lv)
        ds = _axis_downsamples(label, lv) if hasattr(label, "best_level") else (1.0, 1.0)

        def read(at, size, lv=lv):
            return label.read_level(lv, at, size) if hasattr(label, "best_level") else label.read(at, size)

        def cells(s, ds=ds):
            return tuple(p * max(1, round(s / p / d)) for d in ds)

        for idx, stack in _read_at_level(read, start, extent, leaves.start[sel], leaves.size[sel], ds, p, cells,
                                         IGNORE_INDEX):
            out[torch.from_numpy(sel[idx])] = mode_pool(torch.from_numpy(stack), p)
    return out
