"""Pixel sources: one image (slide, volume or array) or one label map, read by region.

Axis order is array order: (y, x) in 2-D, (z, y, x) in 3-D. A region is (start, size) in level-0
pixels and may stick out of the image: images read 0 there, labels IGNORE_INDEX.

- openslide speaks (x, y); it is converted here and nowhere else.
- NIfTI: hrvit's array is nibabel's data array with its axes reversed, hrvit = data.transpose(2, 1, 0),
  so hrvit (z, y, x) is nibabel (k, j, i) and voxel (z, y, x) sits at affine @ (x, y, z, 1).
  `write_nifti` applies the inverse, so predictions line up with the input's affine.
- Images come back float32 [C, *size]: 8-bit data scaled to [0, 1], 16-bit to [0, 1], floats as
  stored; volumes are normalised per channel (see VolumeSource). TIFFs other than 8-bit colour go to
  TiffSource (tifffile, real dtype): unsigned integers / (2^bits - 1), signed / 2^(bits - 1), floats as stored.

File handles are opened lazily and dropped when pickled, so sources travel to DataLoader workers.
"""

from __future__ import annotations

import functools
import gzip
import os
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from hrvit.data.tiff import check_tiff
from hrvit.errors import DataError
from hrvit.patching.sequence import IGNORE_INDEX

SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_NIFTI_ERRORS = (OSError, EOFError, zlib.error, ValueError, gzip.BadGzipFile)


def suffix(path) -> str:
    """Lower-case suffix, with .nii.gz kept whole."""
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _exists(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def _region(shape, start, size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    start, size = tuple(int(s) for s in start), tuple(int(s) for s in size)
    if len(start) != len(shape) or len(size) != len(shape) or min(size, default=0) < 0:
        raise ValueError(f"region start={start} size={size} does not fit a {len(shape)}-D image of shape {shape}")
    return start, size


def _clip(shape, start, size):
    """In-image part of a region: (lo, hi) in image coordinates and the slices it fills in the output."""
    lo = tuple(max(s, 0) for s in start)
    hi = tuple(min(s + n, d) for s, n, d in zip(start, size, shape))
    if any(h <= lo_ for lo_, h in zip(lo, hi)):
        return None
    return lo, hi, tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))


HUGE_BYTES = 64 << 20
"""Outputs of at least this many bytes are mapped with their pages faulted in at once (see _empty)."""


def _empty(shape, dtype=np.float32) -> np.ndarray:
    """np.empty, but an output of HUGE_BYTES or more is anonymous memory mapped with MAP_POPULATE (every page
    faulted in by the one mmap call; where that flag is missing, advised into 2 MB pages instead): filling a fresh
    8192^2 RGB float32 region faults 200k small pages one by one, which took 2-4 s on this machine against 1.4 s for
    the whole read in huge pages (the decode itself is 0.5 s). First touch in a fresh process, CPU time: 201 MB
    (8192^2 RGB uint8) 0.7 s through np.empty, 0.14 s in huge pages, 0.08 s populated; 805 MB (float32) 0.55 s in
    huge pages, 0.31 s populated. The memory goes when the array does."""
    import mmap

    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < HUGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    if hasattr(mmap, "MAP_POPULATE"):
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
            return np.frombuffer(buf, dtype).reshape(shape)
        except OSError:
            pass
    buf = mmap.mmap(-1, nbytes)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # kernel without THP: ordinary pages
        pass
    return np.frombuffer(buf, dtype).reshape(shape)


def _scale(dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 1 / 255
    if dtype == np.uint16:
        return 1 / 65535
    return 1.0


def _check_gz(img, path: Path) -> None:
    """Truncation check of a .nii.gz in O(1): the gzip trailer holds the uncompressed size. Only
    when it disagrees (truncated, or a multi-member gzip) is the file decompressed once to tell."""
    if suffix(path) != ".nii.gz":
        return
    # the voxels' offset as nibabel reads them (a loaded header's vox_offset reads 0: taking it made every check
    # disagree and decompress the whole file)
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    expected = offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return
    try:
        with gzip.open(path) as f:
            while f.read(1 << 24):
                pass
    except _NIFTI_ERRORS as e:
        raise DataError(f"{path}: NIfTI file is truncated or corrupt ({e})") from None


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, *_NIFTI_ERRORS) as e:
        raise DataError(f"{path}: not a readable NIfTI file ({e})") from None
    _check_gz(img, path)
    return img


def choose_level(level_shapes, downsample: float) -> int:
    """The coarsest level (fewest pixels) that is at least as fine as `downsample` asks: one whose size on
    every axis is >= floor(level-0 size / downsample), the size a level made for that downsample has when
    the scanner rounds down (ceil-rounded levels are a pixel larger and pass too). Comparing downsamples
    instead fails on real files: floor rounding makes a 2^k level's downsample 2^k + a bit (2.0004, ...,
    1025.25 for 4 px of a 4101-px axis), so the level made for the request would be refused. Level 0 for
    downsamples below 1."""
    base, downsample = level_shapes[0], max(float(downsample), 1.0)
    ok = [i for i, shape in enumerate(level_shapes)
          if all(n >= int(b // downsample) for n, b in zip(shape, base))]
    return min(ok, key=lambda i: (int(np.prod(level_shapes[i])), i))


def _thumbnail_plan(level_shapes, max_size: int) -> tuple[int, tuple[int, int] | None]:
    """(level, (h, w) of the thumbnail, or None when that level already fits): the smallest level still >= max_size
    on its longest side is read, so the thumbnail is a box filter of real pixels, not of a coarser level."""
    big = [i for i, s in enumerate(level_shapes) if max(s) >= max_size]
    level = max(big, default=0)
    h, w = level_shapes[level]
    f = max(h, w) / max_size
    return level, (None if f <= 1 else (max(1, round(h / f)), max(1, round(w / f))))


class Source:
    """One image at level 0; subclasses implement _read_inside for regions inside the image."""

    path: Path
    shape: tuple[int, ...]
    channels: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, start, size) -> np.ndarray:
        """float32 [C, *size]; 0 outside the image."""
        start, size = _region(self.shape, start, size)
        out = np.zeros((self.channels, *size), np.float32)
        clip = _clip(self.shape, start, size)
        if clip:
            lo, hi, where = clip
            out[(slice(None), *where)] = self._read_inside(lo, hi)
        return out

    def _read_inside(self, lo, hi) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_h")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, shape={self.shape}, channels={self.channels})"


class SlideSource(Source):
    """A whole-slide image through openslide: pyramid levels, RGB, read by region at any level.

    A generic 8-bit RGB tiled TIFF (.tif/.tiff that openslide reads as "generic-tiff", levels the same in tifffile)
    is decoded through tifffile instead (`tiles`, a TiffSource) at level 0 and at levels whose downsample is an
    exact integer on both axes: there openslide's level coordinates are whole pixels, so the values are openslide's
    (exact for lossless codecs; for JPEG tiles measured equal, both decoders being libjpeg-turbo) at about 3x the
    speed (8192^2 JPEG TIFF on one core: 1.5 s against 4.5 s). Other levels, and every other format, go through
    openslide. tifffile=False keeps openslide for everything."""

    def __init__(self, path, tifffile: bool = True):
        import openslide

        self.path = _exists(path)
        if suffix(self.path) in TIFF_SUFFIXES + (".svs",):
            check_tiff(self.path)  # openslide may open a truncated TIFF and fail only on reading
        try:
            slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as e:
            raise DataError(f"{self.path}: openslide cannot open it ({e})") from None
        self.level_count = slide.level_count
        self.level_shapes = [(h, w) for w, h in slide.level_dimensions]
        self.level_downsamples = [float(d) for d in slide.level_downsamples]
        self.shape = self.level_shapes[0]
        self.channels = 3
        mpp = slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self._h = slide
        self.tiles = self._tile_reader(slide) if tifffile else None

    def _tile_reader(self, slide) -> TiffSource | None:
        """A TiffSource over this file when tifffile gives openslide's pixels: generic TIFF, 3 x uint8 RGB (or
        JPEG-coded YCbCr, which both decoders convert to RGB), tiled, the same level sizes; else None."""
        import tifffile

        if suffix(self.path) not in TIFF_SUFFIXES or slide.properties.get("openslide.vendor") != "generic-tiff":
            return None
        try:
            tiles = TiffSource(self.path)
        except DataError:
            return None
        page = tiles._hfile.pages[0]
        colour = page.photometric == tifffile.PHOTOMETRIC.RGB or (
            page.photometric == tifffile.PHOTOMETRIC.YCBCR and page.compression == tifffile.COMPRESSION.JPEG)
        if not (colour and page.is_tiled and tiles.channels == 3 and tiles.dtype == np.uint8
                and tiles.level_shapes == self.level_shapes):
            return None
        return tiles

    def _tiles_for(self, level: int, y: int, x: int):
        """self.tiles when it reads this (level, level-0 start) exactly as openslide does, else None."""
        if self.tiles is None:
            return None
        if level == 0:
            return self.tiles
        (h0, w0), (hl, wl) = self.shape, self.level_shapes[level]
        d = h0 // hl
        exact = d * hl == h0 and d * wl == w0 and y % d == 0 and x % d == 0
        return self.tiles if exact else None

    @property
    def _slide(self):
        if getattr(self, "_h", None) is None:
            import openslide

            self._h = openslide.OpenSlide(self.path)
        return self._h

    def read(self, start, size) -> np.ndarray:
        return self.read_level(0, start, size)

    def read_level(self, level: int, start_level0, size_at_level) -> np.ndarray:
        """float32 [3, h, w] from `level`; start in level-0 (y, x), size in that level's pixels."""
        import openslide

        (y, x), (h, w) = _region((0, 0), start_level0, size_at_level)
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        tiles = self._tiles_for(level, y, x)
        if tiles is not None:
            return tiles.read_level(level, (y, x), (h, w))
        out = _empty((3, h, w))
        # level 0 in blocks of 2048^2 (level-0 offsets are exact there): a small RGBA buffer, and each channel
        # scaled straight into `out` (numpy's astype of the transposed RGBA costs 10x the decode at 8192^2)
        step = 2048 if level == 0 else max(h, w)
        for oy in range(0, h, step):
            for ox in range(0, w, step):
                hh, ww = min(step, h - oy), min(step, w - ox)
                try:
                    rgba = np.asarray(self._slide.read_region((x + ox, y + oy), level, (ww, hh)))
                except openslide.OpenSlideError as e:
                    self._h = None  # an openslide handle fails every read after its first error: reopen next time
                    raise DataError(f"{self.path}: openslide failed reading level {level} at "
                                    f"(y={y + oy}, x={x + ox}) ({e})") from None
                part = out[:, oy:oy + hh, ox:ox + ww]
                for c in range(3):
                    np.multiply(rgba[..., c], np.float32(1 / 255), out=part[c], dtype=np.float32)
                alpha = rgba[..., 3]
                if alpha.min() < 255:  # outside the slide (or transparent): 0, not black-with-garbage
                    part *= alpha * np.float32(1 / 255)
        return out

    def read_stored(self, level: int, start_level0, size_at_level) -> tuple[np.ndarray, float] | None:
        """TiffSource.read_stored where tifffile reads this region (the same pixels read_level gives); None where
        openslide would (its RGBA is not stored values)."""
        (y, x), _ = _region((0, 0), start_level0, size_at_level)
        tiles = self._tiles_for(level, y, x) if 0 <= level < self.level_count else None
        return None if tiles is None else tiles.read_stored(level, (y, x), size_at_level)

    def best_level(self, downsample: float) -> int:
        """choose_level on this slide's level sizes."""
        return choose_level(self.level_shapes, downsample)

    def thumbnail(self, max_size: int) -> np.ndarray:
        """[3, h, w] float32 with max(h, w) <= max_size, read from the smallest level still >= max_size."""
        import openslide
        from PIL import Image

        level, small = _thumbnail_plan(self.level_shapes, max_size)
        h, w = self.level_shapes[level]
        if small is None:
            return self.read_level(level, (0, 0), (h, w))
        th, tw = small
        try:  # box-filtered in 8 bits: a float32 copy of the level would cost more than its decode
            rgba = self._slide.read_region((0, 0), level, (w, h)).resize((tw, th), Image.BOX)
        except openslide.OpenSlideError as e:
            self._h = None
            raise DataError(f"{self.path}: openslide failed reading level {level} ({e})") from None
        return np.asarray(rgba)[..., :3].transpose(2, 0, 1) * np.float32(1 / 255)


NONFINITE = ("error", "zero")
"""What a volume read does with NaN/Inf voxels: raise DataError naming the file and the count, or read them as 0."""


class DecodedVolumes:
    """This process's decoded NIfTI arrays (image channels and labels), least recently used evicted beyond a
    budget in bytes. A .nii.gz cannot seek: without it every window read decompresses each file from its start up
    to the window (0.3-0.5 s for a BraTS case). Arrays are kept in the file's own dtype, in (z, y, x) order (int16
    for BraTS: 71 MB per 4-channel case, half of float32, so twice the cases fit). Keys carry the file's size and
    mtime, so a rewritten file is decoded again.
    Each process (every DataLoader worker) holds its own."""

    def __init__(self, budget: float = 0):
        self.budget = budget
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def resize(self, budget: float) -> None:
        """Set the budget (bytes; 0 = off) and evict down to it."""
        with self._lock:
            self.budget = budget
            self._evict()

    def _evict(self) -> None:
        while self._items and self.nbytes > self.budget:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        """Drop every array and zero the counts."""
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = 0

    def get(self, path: Path, part, load) -> np.ndarray:
        """The decoded array `part` of `path`, from memory or from `load()` (kept if it fits the budget)."""
        st = os.stat(path)
        key = (_resolved(str(path)), st.st_size, st.st_mtime_ns, part)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        array = load()
        with self._lock:
            self.misses += 1
            if 0 < array.nbytes <= self.budget and key not in self._items:
                array.flags.writeable = False  # shared by every reader of the file: views only
                self._items[key] = array
                self.nbytes += array.nbytes
                self._evict()
        return array


@functools.lru_cache(maxsize=1 << 14)
def _resolved(path: str) -> str:
    """The absolute path a cache key names (resolving costs ~0.3 ms, every read would pay it)."""
    return str(Path(path).resolve())


VOLUME_CACHE = DecodedVolumes()
"""The process's cache of decoded volumes; its budget is the last one a source was opened with (data.cache_gb)."""


def use_volume_cache(cache: bool | float) -> bool:
    """Apply a source's `cache` argument to VOLUME_CACHE; returns whether the source uses it. A positive number is
    the budget in GB (the process's budget becomes it); True keeps the current budget (unbounded if none was set);
    False, None or 0: this source reads through its file and leaves the cache as it is."""
    if not cache:
        return False
    if cache is True:
        if VOLUME_CACHE.budget <= 0:
            VOLUME_CACHE.resize(float("inf"))
        return True
    budget = float(cache) * 2**30
    if budget != VOLUME_CACHE.budget:
        VOLUME_CACHE.resize(budget)
    return True


def _nonfinite_error(path: Path, where: str) -> DataError:
    """The message for NaN/Inf voxels met on reading, with the whole file's count (preflight's streamed scan)."""
    from hrvit.data.preflight import count_nonfinite

    return DataError(f"{path}: {count_nonfinite(path)} non-finite voxel(s) (NaN or Inf){where}; expected finite "
                     "values: replace them (e.g. numpy.nan_to_num), or set data.nonfinite=zero to read them as 0")


def _decoded(img, tail: tuple = ()) -> np.ndarray:
    """One whole channel of a NIfTI data array in hrvit's (z, y, x) order, C-contiguous (a window is then a few
    contiguous runs), in the file's dtype when it has no scaling (else float32)."""
    data = np.asanyarray(img.dataobj[(slice(None),) * 3 + tail])
    return np.ascontiguousarray(data.transpose(2, 1, 0), np.float32 if data.dtype == np.float64 else data.dtype)


class VolumeSource(Source):
    """NIfTI volume(s) through nibabel proxies: one file per channel, or one 4-D file.

    Each channel is normalised as (x - mean) / std over its nonzero voxels (zeros, i.e. outside the
    skull-stripped head, stay 0); the stats come once, lazily, from a strided subsample, so a read
    touches only its region. `cache` (GB, or True) reads each channel whole once into this process's
    VOLUME_CACHE (fast random crops from .nii.gz, which otherwise decompresses from the file start on
    every read). NaN/Inf voxels raise DataError (nonfinite="error") or read as 0 (nonfinite="zero").
    """

    def __init__(self, paths, cache: bool | float = False, nonfinite: str = "error"):
        self.paths = [_exists(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.path = self.paths[0]
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite: {nonfinite!r} is not one of {NONFINITE}")
        imgs = [_load_nifti(p) for p in self.paths]
        shapes = [tuple(im.shape) for im in imgs]
        if len(imgs) == 1 and len(shapes[0]) == 4:
            self.channels = shapes[0][3]
        else:
            for p, s in zip(self.paths, shapes):
                if not (len(s) == 3 or (len(s) == 4 and s[3] == 1)):
                    raise DataError(f"{p}: expected a 3-D volume (one channel per file), got shape {s}")
            self.channels = len(imgs)
        for p, s, im in zip(self.paths[1:], shapes[1:], imgs[1:]):
            if s[:3] != shapes[0][:3]:
                raise DataError(f"{p}: shape {s[:3]} does not match the shape {shapes[0][:3]} of {self.path}; "
                                "all channels of a case must share one grid")
            if not np.allclose(im.affine, imgs[0].affine, atol=1e-3):
                raise DataError(f"{p}: affine does not match the affine of {self.path} (largest difference "
                                f"{float(np.abs(im.affine - imgs[0].affine).max()):.4g}); all channels of a case "
                                "must share one grid")
        self.shape = tuple(int(d) for d in reversed(shapes[0][:3]))
        self.affine = np.asarray(imgs[0].affine, np.float64)
        self.cache = use_volume_cache(cache)
        self.nonfinite = nonfinite
        self._float = [im.get_data_dtype().kind in "fc" for im in imgs]  # integer files hold no NaN
        self._stats = None
        self._h = imgs

    @property
    def _imgs(self):
        if getattr(self, "_h", None) is None:
            import nibabel as nib

            self._h = [nib.load(p) for p in self.paths]
        return self._h

    def _finite(self, v: np.ndarray, path: Path, where: str) -> np.ndarray:
        """v with NaN/Inf handled as self.nonfinite says (float data only)."""
        if v.dtype.kind != "f" or np.isfinite(v).all():
            return v
        if self.nonfinite == "error":
            raise _nonfinite_error(path, where)
        return np.where(np.isfinite(v), v, 0).astype(v.dtype)

    def _channel(self, c: int):
        """(nibabel image, index tail, file number) of channel c."""
        imgs = self._imgs
        if len(imgs) == 1 and self.channels > 1:
            return imgs[0], (c,), 0
        return imgs[c], (0,) if len(imgs[c].shape) == 4 else (), c

    def _whole(self, c: int) -> np.ndarray:
        """Channel c decoded whole, (z, y, x), from VOLUME_CACHE (decoded on a miss). Float files are keyed with
        the NaN/Inf option too, so an 'error' reader never gets another reader's zeroed copy."""
        img, tail, f = self._channel(c)
        path = self.paths[f]
        part = (*tail, self.nonfinite) if self._float[f] else tail
        return VOLUME_CACHE.get(path, part, lambda: self._finite(_decoded(img, tail), path, ""))

    def _raw(self, c: int, index) -> np.ndarray:
        """Channel c of nibabel data[index] (index in nibabel (i, j, k) order) as float32."""
        img, tail, f = self._channel(c)
        try:
            if not self.cache:
                v = np.asarray(img.dataobj[(*index, *tail)], np.float32)
                return self._finite(v, self.paths[f], "") if self._float[f] else v
            return np.asarray(self._whole(c)[index[::-1]], np.float32).transpose(2, 1, 0)  # (z, y, x) in memory
        except _NIFTI_ERRORS as e:
            raise DataError(f"{img.get_filename()}: cannot read NIfTI data, truncated or corrupt? ({e})") from None

    def stats(self) -> np.ndarray:
        """[C, 2] (mean, std) over nonzero voxels of a strided subsample (about 2M voxels)."""
        if self._stats is None:
            step = max(1, round((np.prod(self.shape) / 2e6) ** (1 / 3)))
            rows = []
            for c in range(self.channels):
                v = self._raw(c, (slice(None, None, step),) * 3)
                v = v[v != 0]
                mean, std = (float(v.mean()), float(v.std())) if v.size else (0.0, 1.0)
                rows.append((mean, std if std > 1e-6 else 1.0))
            self._stats = np.array(rows, np.float32)
        return self._stats

    def read(self, start, size) -> np.ndarray:
        """float32 [C, *size]; 0 outside the image (a region inside it is normalised straight into the output)."""
        start, size = _region(self.shape, start, size)
        if all(s >= 0 and s + n <= d for s, n, d in zip(start, size, self.shape)) and min(size) > 0:
            return self._read_inside(start, tuple(s + n for s, n in zip(start, size)))
        return super().read(start, size)

    def _read_inside(self, lo, hi):
        stats = self.stats()
        index = tuple(slice(a, b) for a, b in zip(reversed(lo), reversed(hi)))
        out = np.empty((self.channels, *(b - a for a, b in zip(lo, hi))), np.float32)
        for c in range(self.channels):
            v = self._window(c, lo, hi)
            o = out[c]
            if v is None:  # read through the file
                v = self._raw(c, index).transpose(2, 1, 0)
            np.subtract(v, stats[c, 0], out=o, dtype=np.float32)
            np.divide(o, stats[c, 1], out=o)
            np.multiply(o, v != 0, out=o)  # zeros (outside the head) stay 0; v is finite here
            o += 0.0  # -0.0 -> 0.0: bit for bit the values np.where gave
        return out

    def _window(self, c: int, lo, hi) -> np.ndarray | None:
        """Channel c's (z, y, x) region [lo, hi) as stored (a view of the decoded array), or None without cache."""
        if not self.cache:
            return None
        try:
            whole = self._whole(c)
        except _NIFTI_ERRORS as e:
            raise DataError(f"{self.paths[self._channel(c)[2]]}: cannot read NIfTI data, truncated or corrupt? "
                            f"({e})") from None
        return whole[tuple(slice(a, b) for a, b in zip(lo, hi))]


def _load_picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "1", "LA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("L" if im.mode in ("1", "LA") else "RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _load_tiff(path: Path) -> np.ndarray:
    import tifffile

    check_tiff(path)
    try:
        return tifffile.imread(path, key=0)
    except Exception as e:  # tifffile raises many types for corrupt data
        raise DataError(f"{path}: not a readable TIFF ({e})") from None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from None


class ArraySource(Source):
    """Small images held whole (PNG/JPEG/plain TIFF) or memory-mapped (.npy).

    PNG/JPEG/TIFF: [H, W] gray or [H, W, 3|4] RGB(A, alpha dropped). .npy must be channels-first:
    [H, W], [C, H, W] or [C, D, H, W].
    """

    def __init__(self, path):
        self.path = _exists(path)
        a = self._array
        self.channels, self.shape = a.shape[0], tuple(int(d) for d in a.shape[1:])
        self.scale = _scale(a.dtype)

    @property
    def _array(self) -> np.ndarray:
        if getattr(self, "_h", None) is None:
            self._h = self._load()
        return self._h

    def _load(self) -> np.ndarray:
        kind = suffix(self.path)
        if kind == ".npy":
            a = _load_npy(self.path)
            if a.ndim == 2:
                a = a[None]
            if a.ndim not in (3, 4) or a.shape[0] > 16:
                raise DataError(
                    f"{self.path}: .npy images must be channels-first [H, W], [C, H, W] or [C, D, H, W] "
                    f"with C <= 16, got shape {a.shape}"
                )
            return a
        a = _load_tiff(self.path) if kind in TIFF_SUFFIXES else _load_picture(self.path)
        if a.ndim == 2:
            return a[None]
        if a.ndim == 3 and a.shape[2] in (1, 3, 4):
            return np.ascontiguousarray(a[..., :3].transpose(2, 0, 1))
        if a.ndim == 3 and a.shape[0] in (1, 3, 4):
            return a[:3]
        raise DataError(f"{self.path}: expected a [H, W] or [H, W, 3] image, got shape {a.shape}")

    def _read_inside(self, lo, hi):
        part = self._array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
        return part.astype(np.float32) * self.scale if self.scale != 1 else part.astype(np.float32)


MAX_TIFF_CHANNELS = 16
"""A TIFF image with more channels than this is refused (the same bound as .npy images): past it the pages are
far more likely a z-stack or time series than channels of one 2-D image."""


def _value_scale(dtype, bits: int) -> float:
    """Factor that maps stored values to the documented range: unsigned integers of `bits` bits to [0, 1]
    (8-bit /255, 12-bit /4095, 16-bit /65535), signed ones to [-1, 1) (int16 /32768), floats as stored."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ub":
        return 1 / (2**bits - 1)
    if dtype.kind == "i":
        return 1 / 2 ** (bits - 1)
    return 1.0


def _tile_planes(page) -> list[dict]:
    """One TIFF page's chunks (tiles or strips) as planes of channels: one plane holding every sample when they
    are interleaved (contig), one plane per sample when planar (separate; chunk index base + r * cols + c)."""
    planar = page.planarconfig == 2 and page.samplesperpixel > 1
    n = len(page.dataoffsets) // (page.samplesperpixel if planar else 1)
    common = dict(offsets=page.dataoffsets, counts=page.databytecounts, decode=page.decode,
                  jpegtables=page.jpegtables)
    if planar:
        return [dict(common, base=s * n, channels=1) for s in range(page.samplesperpixel)]
    return [dict(common, base=0, channels=page.samplesperpixel)]


def _tile_level(pages) -> dict:
    """One pyramid level of a TIFF (its pages side by side as channels) for _TiffTiles."""
    page = pages[0]
    h, w = page.imagelength, page.imagewidth
    chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (min(page.rowsperstrip or h, h), w)
    planes = [pl for p in pages for pl in _tile_planes(p)]
    return dict(shape=(h, w), chunk=chunk, cols=-(-w // chunk[1]), dtype=page.dtype, planes=planes,
                channels=sum(pl["channels"] for pl in planes), bits=int(page.bitspersample))


class _TiffTiles:
    """Chunks of a TIFF decoded on demand, shared by TiffSource and TiffLabel: a region reads only the tiles
    (or strips) it touches, each with os.pread (no shared file position, so loader threads may read at once) and
    tifffile's own decoder, and keeps the last `cache_tiles` in an LRU cache, so neighbouring leaves decode a tile
    once. Subclasses provide path, cache_tiles, tiles_decoded (a counter: the cost of the reads so far) and
    `_levels` (a list of _tile_level dicts, opened lazily through _open_tiles); a chunk that does not decode is
    a DataError naming the file, the level and the tile."""

    def _open_tiles(self, tf, levels: list[dict]) -> list[dict]:
        self._hfile = tf  # decode closures refer to its pages
        self._hfd = os.open(self.path, os.O_RDONLY)
        self._hcache = OrderedDict()
        self._hlock = threading.Lock()
        self._h = levels
        return levels

    def _cache_size(self, cache_bytes: int) -> int:
        """Decoded level-0 chunks that fit in cache_bytes (at least 16): sized in bytes, not a count, so tiles on
        the border of two reads stay until the second whatever the tile size and channel count."""
        lv = self._levels[0]
        chunk = lv["channels"] * lv["chunk"][0] * lv["chunk"][1] * np.dtype(lv["dtype"]).itemsize
        return max(16, cache_bytes // max(1, chunk))

    def _tile(self, level: int, plane: int, r: int, c: int) -> np.ndarray:
        """[channels, chunk_h, chunk_w] of chunk (r, c) of one plane, in the file's dtype."""
        lv = self._levels[level]
        key = (level, plane, r, c)
        with self._hlock:
            hit = self._hcache.get(key)
            if hit is not None:
                self._hcache.move_to_end(key)
                return hit
        pl = lv["planes"][plane]
        index = pl["base"] + r * lv["cols"] + c
        off, n = int(pl["offsets"][index]), int(pl["counts"][index])
        if n == 0:  # a chunk the writer left out: zeros, as tifffile reads it
            tile = np.zeros((pl["channels"], *lv["chunk"]), lv["dtype"])
        else:
            data = os.pread(self._hfd, n, off)
            self.tiles_decoded += 1
            try:
                seg = pl["decode"](data, index, jpegtables=pl["jpegtables"])[0]
                tile = seg.reshape(seg.shape[-3], seg.shape[-2], pl["channels"]).transpose(2, 0, 1)
            except Exception as e:  # codec errors come in many types
                th, tw = lv["chunk"]
                raise DataError(f"{self.path}: corrupt data in level {level}, tile row {r}, column {c} (level "
                                f"pixels y={r * th}, x={c * tw}, {n} bytes at offset {off}) ({e})") from None
        with self._hlock:
            self._hcache[key] = tile
            while len(self._hcache) > self.cache_tiles:
                self._hcache.popitem(last=False)
        return tile

    def _tile_parts(self, level: int, lo, hi):
        """(channel slice, the decoded chunk's part [C, h, w] (a view), its (rows, cols) slices in the box) for every
        chunk the in-level box [lo, hi) touches."""
        lv = self._levels[level]
        th, tw = lv["chunk"]
        for r in range(lo[0] // th, (hi[0] - 1) // th + 1):
            for c in range(lo[1] // tw, (hi[1] - 1) // tw + 1):
                y0, y1 = max(lo[0], r * th), min(hi[0], (r + 1) * th)
                x0, x1 = max(lo[1], c * tw), min(hi[1], (c + 1) * tw)
                ch = 0
                for plane, pl in enumerate(lv["planes"]):
                    part = self._tile(level, plane, r, c)[:, y0 - r * th:y1 - r * th, x0 - c * tw:x1 - c * tw]
                    yield slice(ch, ch + pl["channels"]), part, (slice(y0 - lo[0], y1 - lo[0]),
                                                                  slice(x0 - lo[1], x1 - lo[1]))
                    ch += pl["channels"]

    def _read_tiles(self, level: int, lo, hi, out: np.ndarray | None = None, scale: float | None = None) -> np.ndarray:
        """[C, h, w] of the in-level box [lo, hi) from the chunks it touches: in the file's dtype, or, given `out`
        (float32 [C, h, w]) and `scale`, each chunk scaled straight into `out` (no image-sized temporaries: at
        8192^2 RGB those cost more than the decode)."""
        lv = self._levels[level]
        if out is None:
            out = np.empty((lv["channels"], hi[0] - lo[0], hi[1] - lo[1]), lv["dtype"])
        for channels, part, (ys, xs) in self._tile_parts(level, lo, hi):
            if scale is None:
                out[channels, ys, xs] = part
            else:
                np.multiply(part, np.float32(scale), out=out[channels, ys, xs], dtype=np.float32)
        return out

    def _read_tiles_hwc(self, level: int, lo, hi, out: np.ndarray) -> np.ndarray:
        """The in-level box [lo, hi) copied as stored into `out` ([h, w, C], the file's dtype): the layout the
        chunks decode to, so each tile row is copied whole (no transposed copy, no float conversion)."""
        for channels, part, (ys, xs) in self._tile_parts(level, lo, hi):
            out[ys, xs, channels] = part.transpose(1, 2, 0)
        return out

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            os.close(self._hfd)
            self._hfile.close()


def is_rgb8_tiff(path) -> bool:
    """True for an 8-bit colour TIFF (RGB/YCbCr/palette, the scanners' kind), which OpenSlide reads as it is;
    every other TIFF (16-bit, float, greyscale, 2 or more than 4 channels) goes to TiffSource."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        colour = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR,
                                      tifffile.PHOTOMETRIC.PALETTE)
        return bool(colour and page.dtype == np.uint8 and len(tf.series[0].levels[0].pages) == 1)


class TiffSource(_TiffTiles, Source):
    """A TIFF that is not 8-bit colour (uint16, int16, float32, greyscale, 2 or more channels) through tifffile,
    with its real dtype and value range; OpenSlide would hand it over as 8-bit RGBA (a 12-bit greyscale slide
    kept 256 of its 4096 levels) or refuse it (32-bit floats).

    - Levels: the first series' pyramid as tifffile sees it (reduced pages after the main one, or SubIFDs);
      the same level_shapes / level_downsamples / best_level / read_level / thumbnail as SlideSource, so
      patch_pyramid reads it natively. Levels that do not line up with level 0 are refused when opened.
    - Channels: the samples of a page (interleaved or planar) times the pages of the series (one page per
      channel, as ImageJ and OME write fluorescence), at most MAX_TIFF_CHANNELS.
    - Values: unsigned integers / (2^bits - 1) (8-bit /255, 16-bit /65535), signed / 2^(bits - 1), floats as
      stored (see _value_scale).
    - Only the tiles or strips a read touches are decoded (_TiffTiles); 3-D (tiled-depth) TIFFs are refused.
    """

    def __init__(self, path, cache_bytes: int = 64 << 20):
        self.path = _exists(path)
        check_tiff(self.path)
        levels = self._levels
        first = levels[0]
        self.level_count = len(levels)
        self.level_shapes = [lv["shape"] for lv in levels]
        self.shape = self.level_shapes[0]
        h0, w0 = self.shape
        self.level_downsamples = [(h0 / h + w0 / w) / 2 for h, w in self.level_shapes]  # as openslide and TiffLabel
        self.channels, self.dtype = first["channels"], np.dtype(first["dtype"])
        self.scale = _value_scale(self.dtype, first["bits"])
        self.cache_tiles = self._cache_size(cache_bytes)
        self.tiles_decoded = 0
        self.mpp = self._mpp()

    @property
    def _levels(self) -> list[dict]:
        if getattr(self, "_h", None) is None:
            import tifffile

            tf = tifffile.TiffFile(self.path)
            try:
                levels = self._pyramid(tf)
            except BaseException:
                tf.close()
                raise
            self._open_tiles(tf, levels)
        return self._h

    def _pyramid(self, tf) -> list[dict]:
        """Levels of the first series, checked: 2-D, at most MAX_TIFF_CHANNELS, one dtype, and a pyramid whose
        levels line up (the reduced pages as the file lists them, so a misplaced one is not silently dropped)."""
        from hrvit.data.tiff import check_pyramid

        series = tf.series[0]
        axes = series.axes.replace("Y", "").replace("X", "").replace("S", "")
        if len(axes) > 1 or (axes and axes not in "CIQ") or series.keyframe.imagedepth > 1:
            raise DataError(f"{self.path}: TIFF axes {series.axes} (shape {series.shape}) are not a 2-D image; "
                            "hrvit reads 2-D TIFFs whose channels are samples or pages")
        levels = [_tile_level([p.aspage() if hasattr(p, "aspage") else p for p in lv.pages]) for lv in series.levels]
        first = levels[0]
        if first["channels"] > MAX_TIFF_CHANNELS:
            raise DataError(f"{self.path}: {first['channels']} channels (TIFF axes {series.axes}, shape "
                            f"{series.shape}); hrvit reads images of at most {MAX_TIFF_CHANNELS} channels")
        if first["dtype"] is None:
            raise DataError(f"{self.path}: TIFF sample format of page 0 is not supported by tifffile")
        for i, lv in enumerate(levels[1:], 1):
            if (lv["channels"], lv["dtype"], lv["bits"]) != (first["channels"], first["dtype"], first["bits"]):
                raise DataError(f"{self.path}: pyramid level {i} holds {lv['channels']} x {lv['dtype']} samples, "
                                f"level 0 {first['channels']} x {first['dtype']}")
        pages = list(tf.pages)
        listed = [first["shape"]]
        if len(series.levels[0].pages) == 1 and not pages[0].subifds:  # reduced pages in file order
            for p in pages[1:]:
                if not p.is_reduced:
                    break
                listed.append((p.imagelength, p.imagewidth))
        check_pyramid(self.path, listed)
        check_pyramid(self.path, [lv["shape"] for lv in levels])
        return levels

    def _mpp(self) -> float | None:
        """Microns per level-0 pixel along x from the resolution tags (None when absent or unitless)."""
        page = self._levels and self._hfile.pages[0]
        try:
            xres, unit = page.resolution[0], int(page.resolutionunit)
        except (AttributeError, TypeError, IndexError, ValueError):
            return None
        per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
        return per_unit / xres if per_unit and xres > 0 else None

    def read(self, start, size) -> np.ndarray:
        return self.read_level(0, start, size)

    def _read_inside(self, lo, hi) -> np.ndarray:
        return self._read_tiles(0, lo, hi, _empty((self.channels, *(b - a for a, b in zip(lo, hi)))), self.scale)

    def _level_clip(self, level: int, start_level0, size_at_level):
        """((h, w), the in-level clip of the region or None) for read_level and read_stored."""
        (y, x), (h, w) = _region((0, 0), start_level0, size_at_level)
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        (h0, w0), (hl, wl) = self.shape, self.level_shapes[level]
        start = (int(y // (h0 / hl)), int(x // (w0 / wl)))
        return (h, w), _clip(self.level_shapes[level], start, (h, w))

    def read_stored(self, level: int, start_level0, size_at_level) -> tuple[np.ndarray, float]:
        """The region read_level reads, as the file stores it: ([h, w, C] in the file's dtype, 0 outside, the
        factor read_level multiplies it by). read_level's float32 pixels are exactly np.multiply(stored,
        np.float32(factor), dtype=np.float32) (channels first); a caller that needs floats only here and there
        (patch_pyramid on a single-level file) converts just those and skips a float copy of the whole image."""
        (h, w), clip = self._level_clip(level, start_level0, size_at_level)
        out = _empty((h, w, self.channels), self.dtype)
        if clip is None or tuple(b - a for a, b in zip(clip[0], clip[1])) != (h, w):
            out.fill(0)
        if clip:
            lo, hi, where = clip
            self._read_tiles_hwc(level, lo, hi, out[where])
        return out, self.scale

    def read_level(self, level: int, start_level0, size_at_level) -> np.ndarray:
        """float32 [C, h, w] from `level`; start in level-0 (y, x), floor-divided by the level's downsample on
        each axis (level-0 size / level size, as TiffLabel does), size in that level's pixels; 0 outside."""
        (h, w), clip = self._level_clip(level, start_level0, size_at_level)
        out = _empty((self.channels, h, w))
        if clip is None or tuple(b - a for a, b in zip(clip[0], clip[1])) != (h, w):
            out.fill(0)
        if clip:
            lo, hi, where = clip
            self._read_tiles(level, lo, hi, out[(slice(None), *where)], self.scale)
        return out

    def best_level(self, downsample: float) -> int:
        """choose_level on this file's level sizes: one level choice for every pyramid."""
        return choose_level(self.level_shapes, downsample)

    def thumbnail(self, max_size: int) -> np.ndarray:
        """As SlideSource.thumbnail: [C, h, w] float32 with max(h, w) <= max_size, box-filtered (area mean) from
        the smallest level still >= max_size."""
        import torch

        level, small = _thumbnail_plan(self.level_shapes, max_size)
        image = self.read_level(level, (0, 0), self.level_shapes[level])
        if small is None:
            return image
        return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(image)[None], small)[0].numpy()


class LabelSource:
    """A label map read by region: int64 [*size], IGNORE_INDEX outside the image.

    label_map (raw -> class) and num_classes are set by open_case; a read that meets a raw value
    missing from label_map, or a class outside [0, num_classes), raises DataError (never silently
    wrong). values() scans the whole map chunk by chunk for validation.
    """

    path: Path
    shape: tuple[int, ...]
    label_map: dict[int, int] | None = None
    num_classes: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, start, size) -> np.ndarray:
        start, size = _region(self.shape, start, size)
        out = np.full(size, IGNORE_INDEX, np.int64)
        clip = _clip(self.shape, start, size)
        if clip:
            lo, hi, where = clip
            out[where] = self.classes(self._read_inside(lo, hi))
        return out

    def classes(self, raw: np.ndarray) -> np.ndarray:
        """Raw stored values -> int64 classes (label_map applied), checked."""
        if raw.dtype.kind == "f":
            if not np.array_equal(raw, np.rint(raw)):
                bad = np.unique(raw[raw != np.rint(raw)])[:5]
                raise DataError(f"{self.path}: label values must be integers, found {bad.tolist()}")
        lab = raw.astype(np.int64)
        if self.label_map is not None:
            keys = np.array(sorted(self.label_map), np.int64)
            vals = np.array([self.label_map[k] for k in keys], np.int64)
            idx = np.clip(np.searchsorted(keys, lab), 0, len(keys) - 1)
            ok = keys[idx] == lab
            if not ok.all():
                bad = np.unique(lab[~ok])[:10].tolist()
                raise DataError(f"{self.path}: label values {bad} are not in label_map {self.label_map}")
            lab = vals[idx]
        if self.num_classes is not None and lab.size and (lab.min() < 0 or lab.max() >= self.num_classes):
            bad = np.unique(lab[(lab < 0) | (lab >= self.num_classes)])[:10].tolist()
            raise DataError(f"{self.path}: label values {bad} are outside [0, {self.num_classes}) "
                            f"(num_classes={self.num_classes})")
        return lab

    def values(self) -> np.ndarray:
        """Sorted distinct raw values of the whole map, scanned chunk by chunk (never all at once)."""
        counts = np.zeros(256, np.int64)
        other: set = set()
        for lo, hi in self._chunks():
            raw = self._read_inside(lo, hi)
            if raw.dtype == np.uint8:
                counts += np.bincount(raw.ravel(), minlength=256)
            else:
                other.update(np.unique(raw).tolist())
        return np.array(sorted(set(np.flatnonzero(counts).tolist()) | other))

    def _chunks(self, size: int = 2048):
        """In-image boxes covering the map: 2-D blocks, or z-slabs of a volume."""
        if self.ndim == 3:
            step = max(1, (size * size) // max(1, self.shape[1] * self.shape[2]))
            for z in range(0, self.shape[0], step):
                yield (z, 0, 0), (min(z + step, self.shape[0]), *self.shape[1:])
            return
        for y in range(0, self.shape[0], size):
            for x in range(0, self.shape[1], size):
                yield (y, x), (min(y + size, self.shape[0]), min(x + size, self.shape[1]))

    def _read_inside(self, lo, hi) -> np.ndarray:
        raise NotImplementedError

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_h")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, shape={self.shape})"


class TiffLabel(_TiffTiles, LabelSource):
    """Single-channel (tiled or stripped, maybe pyramidal) TIFF: decodes only the tiles a region touches
    (_TiffTiles, the reader TiffSource uses), each once while it stays in a cache of cache_bytes."""

    def __init__(self, path, cache_bytes: int = 64 << 20):
        self.path = _exists(path)
        check_tiff(self.path)
        self.tiles_decoded = 0  # tiles (strips) decoded so far: the cost of reading this mask
        levels = self._levels
        self.cache_tiles = self._cache_size(cache_bytes)
        self.shape = levels[0]["shape"]
        self.level_shapes = [lv["shape"] for lv in levels]
        self.level_downsamples = [float(np.mean(self.axis_downsamples(i))) for i in range(len(levels))]

    def axis_downsamples(self, level: int) -> tuple[float, ...]:
        """(y, x) downsample of a level: level-0 size / level size per axis (they differ on rounded levels)."""
        return tuple(a / b for a, b in zip(self.shape, self.level_shapes[level]))

    def best_level(self, downsample: float) -> int:
        """choose_level on this mask's level sizes."""
        return choose_level(self.level_shapes, downsample)

    @property
    def _levels(self) -> list[dict]:
        if getattr(self, "_h", None) is None:
            import tifffile

            tf = tifffile.TiffFile(self.path)
            levels = []
            for i, page in enumerate(tf.pages):
                integer = page.dtype is not None and page.dtype.kind in "uib"
                if page.samplesperpixel != 1 or not integer or page.imagedepth != 1:
                    if i == 0:
                        tf.close()
                        raise DataError(
                            f"{self.path}: a label TIFF must hold one integer channel, got "
                            f"{page.samplesperpixel} samples of {page.dtype}"
                        )
                    break
                h, w = page.imagelength, page.imagewidth
                if i and not (levels[-1]["shape"][0] > h and levels[-1]["shape"][1] > w):
                    break  # not a reduced level of this pyramid (thumbnail, macro, ...)
                levels.append(_tile_level([page]))
            self._open_tiles(tf, levels)
        return self._h

    def _read_level_inside(self, level, lo, hi) -> np.ndarray:
        return self._read_tiles(level, lo, hi)[0]

    def _read_inside(self, lo, hi):
        return self._read_level_inside(0, lo, hi)

    def _chunks(self, size: int = 2048):
        th, tw = self._levels[0]["chunk"]
        size_y, size_x = max(th, size // th * th), max(tw, size // tw * tw)  # tile-aligned blocks
        for y in range(0, self.shape[0], size_y):
            for x in range(0, self.shape[1], size_x):
                yield (y, x), (min(y + size_y, self.shape[0]), min(x + size_x, self.shape[1]))

    def read_level(self, level: int, start_level0, size_at_level) -> np.ndarray:
        """int64 [h, w] from a pyramid level (as its writer downsampled it); start in level-0 pixels."""
        start = tuple(int(s // d) for s, d in zip(start_level0, self.axis_downsamples(level)))
        start, size = _region((0, 0), start, size_at_level)
        out = np.full(size, IGNORE_INDEX, np.int64)
        clip = _clip(self.level_shapes[level], start, size)
        if clip:
            lo, hi, where = clip
            out[where] = self.classes(self._read_level_inside(level, lo, hi))
        return out


class NiftiLabel(LabelSource):
    """3-D NIfTI label through a nibabel proxy, same axis convention as VolumeSource; `cache` (GB, or True) reads it
    whole once into VOLUME_CACHE, as VolumeSource does."""

    def __init__(self, path, cache: bool | float = False):
        self.path = _exists(path)
        self.cache = use_volume_cache(cache)
        img = _load_nifti(self.path)
        s = img.shape
        if not (len(s) == 3 or (len(s) == 4 and s[3] == 1)):
            raise DataError(f"{self.path}: a label volume must be 3-D, got shape {s}")
        self.shape = tuple(int(d) for d in reversed(s[:3]))
        self.affine = np.asarray(img.affine, np.float64)
        self._h = img

    def _chunks(self, size: int = 8192):
        return super()._chunks(size)  # big slabs: each read of a .nii.gz decompresses from the start

    def classes(self, raw: np.ndarray) -> np.ndarray:
        """As LabelSource.classes, through a lookup table for integer data of a small range (a training window's
        label in a fraction of the time); anything out of place goes the checked way, for its message."""
        if raw.dtype.kind not in "ui" or not raw.size:
            return super().classes(raw)
        low, high = int(raw.min()), int(raw.max())
        if high - low >= 1 << 16:
            return super().classes(raw)
        values = np.arange(low, high + 1)
        lut = values if self.label_map is None else np.array([self.label_map.get(v, -1) for v in values.tolist()])
        wrong = (lut == -1) if self.label_map is not None else np.zeros(len(lut), bool)
        if self.num_classes is not None:
            wrong |= (lut < 0) | (lut >= self.num_classes)
        if any((raw == low + i).any() for i in np.flatnonzero(wrong)):  # only values in the range that are wrong
            return super().classes(raw)
        return np.take(lut.astype(np.int64), raw - low if low else raw)

    def read(self, start, size) -> np.ndarray:
        start, size = _region(self.shape, start, size)
        if all(s >= 0 and s + n <= d for s, n, d in zip(start, size, self.shape)) and min(size) > 0:
            return self.classes(self._read_inside(start, tuple(s + n for s, n in zip(start, size))))
        return super().read(start, size)

    def _read_inside(self, lo, hi):
        import nibabel as nib

        if getattr(self, "_h", None) is None:
            self._h = nib.load(self.path)
        img = self._h
        tail = (0,) if len(img.shape) == 4 else ()
        index = tuple(slice(a, b) for a, b in zip(reversed(lo), reversed(hi)))
        try:
            if getattr(self, "cache", False):
                return VOLUME_CACHE.get(self.path, tail, lambda: _decoded(img, tail))[index[::-1]]
            return np.asarray(img.dataobj[index + tail]).transpose(2, 1, 0)
        except _NIFTI_ERRORS as e:
            raise DataError(f"{self.path}: cannot read NIfTI data, truncated or corrupt? ({e})") from None


class ArrayLabel(LabelSource):
    """PNG (gray or palette indices) or .npy ([H, W] / [D, H, W]) label, held whole or memory-mapped."""

    def __init__(self, path):
        self.path = _exists(path)
        a = self._array
        self.shape = tuple(int(d) for d in a.shape)

    @property
    def _array(self):
        if getattr(self, "_h", None) is None:
            if suffix(self.path) == ".npy":
                a = _load_npy(self.path)
            else:
                from PIL import Image

                try:
                    with Image.open(self.path) as im:
                        a = np.asarray(im)  # palette images give their indices
                except OSError as e:
                    raise DataError(f"{self.path}: not a readable image ({e})") from None
            if a.ndim not in (2, 3) or a.dtype.kind not in "uifb":
                raise DataError(f"{self.path}: a label must be [H, W] or [D, H, W] numbers, got {a.dtype} {a.shape}")
            self._h = a
        return self._h

    def _read_inside(self, lo, hi):
        return np.asarray(self._array[tuple(slice(a, b) for a, b in zip(lo, hi))])


def _slide(path: Path) -> SlideSource:
    """SlideSource with its pyramid checked: OpenSlide sorts levels by size and takes any aspect ratio, so a
    stretched level, or a reduced page larger than the main image (which would become level 0), is checked on
    the tiled pages in file order (TIFF-based slides) and on OpenSlide's levels."""
    from hrvit.data.tiff import check_pyramid, tiled_page_shapes

    if suffix(path) in TIFF_SUFFIXES + (".svs",):
        check_tiff(path)
        check_pyramid(path, tiled_page_shapes(path))
    source = SlideSource(path)
    check_pyramid(path, source.level_shapes)
    return source


def open_image(path_or_paths, cache: bool | float = False, nonfinite: str = "error") -> Source:
    """Open an image by suffix: slides via openslide, .nii(.gz) (or one per channel) via nibabel, else arrays.
    `cache` and `nonfinite` apply to NIfTI volumes (see VolumeSource).

    TIFF: 8-bit colour (RGB/YCbCr/palette) goes to OpenSlide when it recognises the file (tiled) and is read
    whole otherwise; every other TIFF (16-bit, float, greyscale, 2 or more channels) to TiffSource (tifffile,
    real dtype, tile by tile, pyramid)."""
    if isinstance(path_or_paths, (list, tuple)):
        paths = [Path(p) for p in path_or_paths]
        if len(paths) == 1:
            return open_image(paths[0], cache, nonfinite)
        if not paths or any(suffix(p) not in NIFTI_SUFFIXES for p in paths):
            names = ", ".join(map(str, paths))
            raise DataError(f"{names}: several files per image must all be NIfTI (one per channel)")
        return VolumeSource(paths, cache=cache, nonfinite=nonfinite)
    path = _exists(path_or_paths)
    kind = suffix(path)
    if kind in NIFTI_SUFFIXES:
        return VolumeSource([path], cache=cache, nonfinite=nonfinite)
    if kind in SLIDE_SUFFIXES:
        return _slide(path)
    if kind in TIFF_SUFFIXES:
        import openslide

        check_tiff(path)
        if not is_rgb8_tiff(path):
            return TiffSource(path)  # 16-bit, float, greyscale, multi-channel: real dtype and values
        return _slide(path) if openslide.OpenSlide.detect_format(str(path)) else ArraySource(path)
    if kind in PICTURE_SUFFIXES + (".npy",):
        return ArraySource(path)
    raise DataError(
        f"{path}: unsupported image suffix {kind!r}; expected one of "
        f"{', '.join(SLIDE_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + PICTURE_SUFFIXES + ('.npy',))}"
    )


def open_label(path, cache: bool | float = False) -> LabelSource:
    """Open a label map by suffix: TIFF (read by tile), NIfTI (proxy; `cache` as for VolumeSource), PNG or .npy."""
    path = _exists(path)
    kind = suffix(path)
    if kind in TIFF_SUFFIXES:
        return TiffLabel(path)
    if kind in NIFTI_SUFFIXES:
        return NiftiLabel(path, cache)
    if kind in (".png", ".npy", ".bmp"):
        return ArrayLabel(path)
    if kind in (".jpg", ".jpeg"):
        raise DataError(f"{path}: JPEG is lossy and cannot hold labels; use PNG, TIFF, NIfTI or .npy")
    raise DataError(f"{path}: unsupported label suffix {kind!r}; expected .tif, .tiff, .nii, .nii.gz, .png or .npy")


def write_nifti(path, array: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write an hrvit (z, y, x) array as NIfTI with the inverse of the reading convention."""
    import nibabel as nib

    array = np.asarray(array)
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.asarray(affine, np.float64))
    img.set_data_dtype(dtype or array.dtype)
    img.header.set_xyzt_units("mm")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return Path(path)
