"""Detail scores for adaptive patching: a working-resolution map -> O(1) node scores.

A scorer turns the working map (the image area-averaged to `w` level-0 pixels per working pixel)
into summed-area tables (integral images), so the detail of any node, whatever its size, costs
2^D table lookups. Detail lies in [0, 1]:

- "edge": mean soft edge density, (|gradient| - low) / (high - low) clipped to [0, 1] per working
  pixel, the gradient taken on the map scaled by its global intensity range (all channels together,
  so a constant channel adds nothing and a blank image has no detail at all).
- "variance": min(std / t, 1) of the channel-mean intensity over the node, from the tables of x
  and x^2.

The tissue mask (Otsu on saturation for RGB, on the channel-mean magnitude otherwise, dilated by
one working pixel) zeroes detail outside tissue, so background never gets small leaves. Jitter
multiplies the scorer's thresholds by exp(U(-j, j)) from the caller's generator (augmentation).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hrvit.errors import DataError

EDGE_LOW, EDGE_HIGH = 0.1, 0.3
"""Gradient (in image ranges per working pixel) below which a working pixel is no edge at all and
above which it is fully edge, linear between (a soft form of Canny's two thresholds: texture
stays below EDGE_LOW, boundaries between tissues rise above it)."""
VARIANCE_T = 0.1
"""Standard deviation (in image ranges) at which a node counts as fully detailed."""
TISSUE_SATURATION_MAX = 0.1
"""Otsu on saturation may not put the tissue threshold above this: a slide that is all tissue
would otherwise lose half of it to the mask."""
SCORERS = ("edge", "variance")


POPULATE_BYTES = 8 << 20
"""populated() maps arrays of at least this many bytes with their pages faulted in at once."""


def populated(shape, dtype=np.float32) -> np.ndarray:
    """np.empty, but an array of POPULATE_BYTES or more is anonymous memory mapped with MAP_POPULATE: its pages are
    faulted in by the one mmap call instead of one fault per 4 kB page on first write, which in a fresh process (the
    CLI) cost about 3 ms per MB here. The memory goes when the array does."""
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes >= POPULATE_BYTES and hasattr(mmap, "MAP_POPULATE"):
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            return np.frombuffer(buf, dtype).reshape(shape)
        except OSError:
            pass
    return np.empty(shape, dtype)


def integral(x: np.ndarray) -> np.ndarray:
    """Summed-area table (float64) with a leading zero row/column per axis: box sum in 2^D lookups."""
    out = populated(tuple(s + 1 for s in x.shape), np.float64)
    for axis in range(x.ndim):
        out[(slice(None),) * axis + (0,)] = 0
    inner = out[tuple(slice(1, None) for _ in range(x.ndim))]
    np.copyto(inner, x)
    for i in range(1, len(inner)):  # the sums np.cumsum(axis=0) makes, one row at a time: 3x faster into a view
        np.add(inner[i - 1], inner[i], out=inner[i])
    for axis in range(1, x.ndim):
        np.cumsum(inner, axis=axis, out=inner)
    return out


def gradient(x: torch.Tensor, axis: int, out: torch.Tensor) -> torch.Tensor:
    """torch.gradient(x, dim=axis)[0] (unit spacing, edge_order 1: central differences / 2 inside, one-sided at
    both ends; the axis at least 2 long), the same values, written into `out`: 3x faster here than torch.gradient,
    which concatenates its parts into a new tensor."""
    n = x.shape[axis]
    inner = out.narrow(axis, 1, n - 2)
    torch.sub(x.narrow(axis, 2, n - 2), x.narrow(axis, 0, n - 2), out=inner).div_(2)
    torch.sub(x.narrow(axis, 1, 1), x.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    torch.sub(x.narrow(axis, n - 1, 1), x.narrow(axis, n - 2, 1), out=out.narrow(axis, n - 1, 1))
    return out


def otsu(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D tensor (the between-class-variance maximum of its histogram)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return lo
    hist = torch.histc(values.float(), bins, lo, hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)[:-1] + (hi - lo) / bins / 2
    w0 = hist.cumsum(0)
    m0 = (hist * centres).cumsum(0)
    total, mean = w0[-1], m0[-1]
    w1 = total - w0
    between = (mean * w0 - total * m0) ** 2 / (w0 * w1).clamp(min=1e-12)
    between[w1 <= 0] = 0
    return float(centres[int(between.argmax())])


def tissue_mask(work: torch.Tensor) -> torch.Tensor:
    """[C, *s] working map -> bool [*s]: Otsu foreground (saturation for RGB), dilated by one pixel."""
    if work.shape[0] == 3:
        top, bottom = work.amax(0), work.amin(0)
        value = (top - bottom) / top.clamp(min=1e-6)
        thr = min(otsu(value.flatten()), TISSUE_SATURATION_MAX)
    else:
        value = work.abs().mean(0)
        thr = otsu(value.flatten())
    mask = (value > thr).float()
    pool = F.max_pool2d if mask.ndim == 2 else F.max_pool3d
    return pool(mask[None], 3, stride=1, padding=1)[0] > 0


class Detail:
    """Node detail in O(1) from summed-area tables of a working map with `w` level-0 px per pixel.

    node(start, size) takes level-0 coordinates; the node is clipped to the map (outside the image
    counts as nothing) and covers at least one working pixel.
    """

    def __init__(self, work: torch.Tensor, w: float, scorer: str = "edge", tissue: bool = False,
                 sensitivity: float = 1.0):
        if scorer not in SCORERS:
            raise ValueError(f"scorer {scorer!r} is not one of {SCORERS}")
        work = work.float().cpu()  # small; the tables live on the CPU whatever device the image is on
        least, most = work.aminmax()  # NaN propagates: one pass checks the values and gives their range
        if not (math.isfinite(float(least)) and math.isfinite(float(most))):
            raise DataError("image contains NaN or infinite pixel values")
        self.w, self.scorer, self.shape = float(w), scorer, tuple(work.shape[1:])
        self.ndim = len(self.shape)
        span = float(most - least)
        scale = 1.0 / span if span > 1e-12 else 0.0
        mask = tissue_mask(work) if tissue else None
        self.tables = []
        if scorer == "edge":
            low, high = EDGE_LOW * sensitivity, EDGE_HIGH * sensitivity
            axes = tuple(a for a, n in enumerate(self.shape) if n > 1)  # a 1-pixel axis has no gradient
            square = torch.from_numpy(populated(self.shape)).zero_()
            g = torch.from_numpy(populated(self.shape))
            for channel in work:  # one channel at a time keeps the temporaries small
                for axis in axes:
                    square.addcmul_(*(gradient(channel, axis, g),) * 2)
            mag = square.sqrt_().mul_(scale / math.sqrt(work.shape[0]))
            dens = mag.sub_(low).div_(high - low).clamp_(0.0, 1.0)
            if mask is not None:
                dens.mul_(mask)
            self.tables.append(integral(dens.numpy()))
        else:
            self.t = VARIANCE_T * sensitivity
            lum = work.mean(0).double().mul_(scale).numpy()
            self.tables += [integral(lum), integral(lum * lum)]
            if mask is not None:
                self.tables.append(integral(mask.double().numpy()))
        self.node = self._make_node()

    def _make_node(self):
        """node(start, size) -> detail in [0, 1] of the node given in level-0 pixels (a closure
        specialised by dimension and scorer: it runs once per tree node)."""
        inv, shape, tables, ceil = 1.0 / self.w, self.shape, self.tables, math.ceil
        last = [n - 1 for n in shape]

        if self.ndim == 2:
            (ny, nx), (ly, lx) = shape, last

            def bounds(start, size):
                y, x = start
                a, b = min(int(y * inv), ly), min(int(x * inv), lx)
                c, d = min(ceil((y + size) * inv), ny), min(ceil((x + size) * inv), nx)
                return (a, b), (c if c > a else a + 1, d if d > b else b + 1)

            def box(t, lo, hi):
                (a, b), (c, d) = lo, hi
                return t.item(c, d) - t.item(a, d) - t.item(c, b) + t.item(a, b)
        else:
            (nz, ny, nx), (lz, ly, lx) = shape, last

            def bounds(start, size):
                z, y, x = start
                a, b, e = min(int(z * inv), lz), min(int(y * inv), ly), min(int(x * inv), lx)
                c = min(ceil((z + size) * inv), nz)
                d = min(ceil((y + size) * inv), ny)
                f = min(ceil((x + size) * inv), nx)
                return (a, b, e), (c if c > a else a + 1, d if d > b else b + 1, f if f > e else e + 1)

            def box(t, lo, hi):
                (a, b, e), (c, d, f) = lo, hi
                return (t.item(c, d, f) - t.item(a, d, f) - t.item(c, b, f) - t.item(c, d, e)
                        + t.item(a, b, f) + t.item(a, d, e) + t.item(c, b, e) - t.item(a, b, e))

        def volume(lo, hi):
            v = 1
            for a, b in zip(lo, hi):
                v *= b - a
            return v

        if self.scorer == "edge" and self.ndim == 2:  # bounds, box and volume inlined: the same arithmetic
            item = tables[0].item

            def node(start, size):
                y, x = start
                a, b = min(int(y * inv), ly), min(int(x * inv), lx)
                c, d = min(ceil((y + size) * inv), ny), min(ceil((x + size) * inv), nx)
                if c <= a:
                    c = a + 1
                if d <= b:
                    d = b + 1
                return (item(c, d) - item(a, d) - item(c, b) + item(a, b)) / ((c - a) * (d - b))
            return node

        if self.scorer == "edge":
            dens = tables[0]

            def node(start, size):
                lo, hi = bounds(start, size)
                return box(dens, lo, hi) / volume(lo, hi)
            return node

        lum, lum2, mask, t = tables[0], tables[1], tables[2] if len(tables) == 3 else None, self.t

        def node(start, size):
            lo, hi = bounds(start, size)
            n = volume(lo, hi)
            mean = box(lum, lo, hi) / n
            detail = min(math.sqrt(max(box(lum2, lo, hi) / n - mean * mean, 0.0)) / t, 1.0)
            return detail * box(mask, lo, hi) / n if mask is not None else detail
        return node
