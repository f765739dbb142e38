"""Pyramidal TIFF: write tile by tile (so a 64K^2 slide never sits in memory), check for truncation.

The files are what OpenSlide calls "generic-tiff": tiled, one IFD per level, each level half the
size of the previous one (ceil), so OpenSlide, QuPath and tifffile all open them. RGB is JPEG
(quality 90); single-channel labels are deflate (lossless). Level l pixel (y, x) covers level-0
pixels [y * 2^l, (y + 1) * 2^l) x [x * 2^l, (x + 1) * 2^l); the last row/column may stick out.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import tifffile

from hrvit.errors import DataError

TileFn = Callable[[int, int, int, int, int], np.ndarray]


def level_shapes(shape: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Shape of each level: ceil halving, never below one pixel."""
    return [(max(1, -(-shape[0] // 2**lv)), max(1, -(-shape[1] // 2**lv))) for lv in range(levels)]


def default_levels(shape: tuple[int, int], tile: int) -> int:
    """Enough levels that the smallest one fits in one tile."""
    levels = 1
    while max(level_shapes(shape, levels)[-1]) > tile:
        levels += 1
    return levels


def write_pyramid(
    path,
    shape: tuple[int, int],
    tile_fn: TileFn,
    *,
    channels: int,
    dtype=np.uint8,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = None,
    quality: int = 90,
    mpp: float | tuple[float, float] | None = None,
    workers: int | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF; tile_fn(level, y0, x0, h, w) -> [h, w] or [h, w, C] at that level.

    tile_fn runs in `workers` threads (default: CPU count, at most 8), so it must be thread-safe
    (pure functions of their arguments are); pass workers=1 otherwise.

    compression None picks JPEG for 3-channel uint8 (images) and deflate otherwise (labels must stay
    lossless). Tiles are requested in row-major order, one level after another; edge tiles are
    requested at their clipped size and zero-padded here.
    """
    path = Path(path)
    shape = (int(shape[0]), int(shape[1]))
    dtype = np.dtype(dtype)
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    levels = levels or default_levels(shape, tile)
    workers = workers or min(8, os.cpu_count() or 1)
    if compression is None:
        compression = "jpeg" if channels == 3 and dtype == np.uint8 else "zlib"
    args = {"level": quality} if compression == "jpeg" else None
    photometric = "rgb" if channels == 3 else "minisblack"
    bigtiff = shape[0] * shape[1] * channels * dtype.itemsize > 2**31
    extra = {}
    if mpp:
        mpp_y, mpp_x = (mpp, mpp) if np.ndim(mpp) == 0 else mpp  # (y, x), as every shape here
        extra = {"resolution": (1e4 / mpp_x, 1e4 / mpp_y), "resolutionunit": "CENTIMETER"}
    tile_shape = (tile, tile) if channels == 1 else (tile, tile, channels)

    def make(level: int, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
        t = np.asarray(tile_fn(level, y0, x0, th, tw))
        if t.shape[:2] != (th, tw) or t.size != th * tw * channels:
            raise ValueError(f"tile_fn returned {t.shape}, expected {(th, tw, channels)[: 2 + (channels > 1)]}")
        full = np.zeros(tile_shape, dtype)
        full[:th, :tw] = t.reshape(full[:th, :tw].shape)
        return full

    def tiles(level: int, h: int, w: int):
        """Tiles in row-major order, computed `workers` at a time with a short look-ahead."""
        grid = [(y0, x0) for y0 in range(0, h, tile) for x0 in range(0, w, tile)]
        todo = iter([(level, y0, x0, min(tile, h - y0), min(tile, w - x0)) for y0, x0 in grid])
        with ThreadPoolExecutor(workers) as pool:
            pending = deque(pool.submit(make, *a) for a in islice(todo, 2 * workers))
            while pending:
                done = pending.popleft().result()
                pending.extend(pool.submit(make, *a) for a in islice(todo, 1))
                yield done

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level, (h, w) in enumerate(level_shapes(shape, levels)):
            tw.write(
                tiles(level, h, w),
                shape=(h, w) if channels == 1 else (h, w, channels),
                dtype=dtype,
                tile=(tile, tile),
                photometric=photometric,
                compression=compression,
                compressionargs=args,
                subfiletype=0 if level == 0 else 1,
                metadata=None,
                **extra,
            )
    return path


def downsample2(a: np.ndarray, mode: str) -> np.ndarray:
    """Halve the first two axes (ceil): 'area' averages 2x2 blocks (edges replicated), 'nearest' keeps one pixel."""
    if mode == "nearest":
        return a[::2, ::2]
    h, w = a.shape[:2]
    pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a.astype(np.float32), pad, mode="edge")
    p = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2, *p.shape[2:]).mean(axis=(1, 3))
    return np.rint(p).astype(a.dtype) if np.issubdtype(a.dtype, np.integer) else p.astype(a.dtype)


def write_pyramid_from_array(path, array: np.ndarray, *, resample: str | None = None, **kw) -> Path:
    """Small arrays (predictions, test patterns): [H, W] label or [H, W, C] image, levels built here.

    resample: 'nearest' (default for 2-D arrays, i.e. labels) or 'area' (default for [H, W, C]).
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"expected [H, W] or [H, W, C], got {array.shape}")
    channels = 1 if array.ndim == 2 else array.shape[2]
    resample = resample or ("nearest" if array.ndim == 2 else "area")
    tile = kw.get("tile", 256)
    levels = kw.pop("levels", None) or default_levels(array.shape[:2], tile)
    pyramid = [array]
    for _ in range(levels - 1):
        pyramid.append(downsample2(pyramid[-1], resample))

    def tile_fn(level, y0, x0, h, w):
        return pyramid[level][y0 : y0 + h, x0 : x0 + w]

    return write_pyramid(path, array.shape[:2], tile_fn, channels=channels, dtype=array.dtype, levels=levels, **kw)


def write_label_pyramid(path, shape: tuple[int, int], sample: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                        tile: int = 256, mpp=None, workers: int | None = None) -> Path:
    """A label pyramid written tile by tile from sample(ys, xs) -> uint8 [len(ys), len(xs)], the labels at those
    level-0 rows and columns, so no level is ever held whole. Level l pixel (y, x) is the level-0 label at
    (y * 2^l, x * 2^l): nearest of the level above, the pyramid write_pyramid_from_array writes for labels."""

    def tile_fn(level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        f = 2**level
        return sample(np.arange(y0, y0 + h, dtype=np.int64) * f, np.arange(x0, x0 + w, dtype=np.int64) * f)

    return write_pyramid(path, shape, tile_fn, channels=1, dtype=np.uint8, tile=tile, mpp=mpp, workers=workers)


def check_tiff(path) -> None:
    """Parse every IFD and fail loudly on a truncated or corrupt file (tifffile only warns, openslide
    may open it and fail on the first read of a missing tile)."""
    path = Path(path)
    size = os.path.getsize(path)
    try:
        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            t = tf.tiff
            last = pages[-1]
            fh = tf.filehandle
            fh.seek(last.offset)
            (ntags,) = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))
            fh.seek(last.offset + t.tagnosize + ntags * t.tagsize)
            raw = fh.read(t.offsetsize)
    except (tifffile.TiffFileError, struct.error, OSError, ValueError, IndexError) as e:
        raise DataError(f"{path}: not a readable TIFF ({e})") from None
    (next_ifd,) = struct.unpack(t.offsetformat, raw) if len(raw) == t.offsetsize else (size,)
    end = max((o + n for p in pages for o, n in zip(p.dataoffsets, p.databytecounts)), default=0)
    if next_ifd >= size or end > size:
        raise DataError(f"{path}: TIFF is truncated ({size} bytes on disk; its directories or tiles point further)")


def check_pyramid(path, shapes) -> None:
    """DataError unless every level of a pyramid (`shapes`: (h, w) per level, level 0 first, as the file lists
    them) is a rounding (floor or ceil, as scanners and hrvit write them) of level 0 divided by one downsample,
    and no level is larger than the one before it. Otherwise a leaf would be read from a stretched or shifted
    region of that level without any error."""
    shapes = [(int(h), int(w)) for h, w in shapes]
    if not shapes:
        return
    h0, w0 = shapes[0]
    for i in range(1, len(shapes)):
        (h, w), (ph, pw) = shapes[i], shapes[i - 1]
        if h > ph or w > pw:
            raise DataError(f"{path}: pyramid level {i} is {h} x {w} (h x w), larger than level {i - 1} "
                            f"({ph} x {pw}); levels must shrink from level 0, the full-resolution image")
        # downsamples d with |level-0 size / d - level size| < 1 on each axis; empty intersection: no single d
        low = max(h0 / (h + 1), w0 / (w + 1))
        high = min(h0 / (h - 1) if h > 1 else np.inf, w0 / (w - 1) if w > 1 else np.inf)
        if low >= high:
            raise DataError(f"{path}: pyramid level {i} is {h} x {w} (h x w), which is not level 0 ({h0} x {w0}) "
                            f"scaled by one factor (downsample {h0 / h:.4g} in y but {w0 / w:.4g} in x); its pixels "
                            "would not line up with level 0")


def tiled_page_shapes(path) -> list[tuple[int, int]]:
    """(h, w) of the tiled top-level pages in file order: the levels OpenSlide's generic-tiff and Aperio readers
    take (it sorts them by size, so a misplaced or stretched level is only visible in file order)."""
    with tifffile.TiffFile(path) as tf:
        return [(p.imagelength, p.imagewidth) for p in tf.pages if p.is_tiled]
