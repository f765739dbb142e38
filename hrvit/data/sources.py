"""Pixel sources: one image (slide, volume or array) or one label map, read by region.

Axis order is array order: (y, x) in 2-D, (z, y, x) in 3-D. A region is (start, size) in level-0
pixels and may stick out of the image: images read 0 there, labels IGNORE_INDEX.

- openslide speaks (x, y); it is converted here and nowhere else.
- NIfTI: hrvit's array is nibabel's data array with its axes reversed, hrvit = data.transpose(2, 1, 0),
  so hrvit (z, y, x) is nibabel (k, j, i) and voxel (z, y, x) sits at affine @ (x, y, z, 1).
  `write_nifti` applies the inverse, so predictions line up with the input's affine.
- Images come back float32 [C, *size]: 8-bit data scaled to [0, 1], 16-bit to [0, 1], floats as
  stored; volumes are normalised per channel (see VolumeSource).

File handles are opened lazily and dropped when pickled, so sources travel to DataLoader workers.
"""

from __future__ import annotations

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
    expected = int(img.header.get_data_offset()) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
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
    """A whole-slide image through openslide: pyramid levels, RGB, read by region at any level."""

    def __init__(self, path):
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
        if h == 0 or w == 0:
            return np.zeros((3, h, w), np.float32)
        try:
            rgba = np.asarray(self._slide.read_region((x, y), level, (w, h)))
        except openslide.OpenSlideError as e:
            raise DataError(f"{self.path}: openslide failed reading level {level} at (y={y}, x={x}) ({e})") from None
        out = rgba[..., :3].transpose(2, 0, 1).astype(np.float32) * (1 / 255)
        alpha = rgba[..., 3]
        if alpha.min() < 255:  # outside the slide (or transparent): 0, not black-with-garbage
            out *= alpha * (1 / 255)
        return out

    def best_level(self, downsample: float) -> int:
        """The level whose downsample is the largest one not above `downsample`."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(ok, default=0)

    def thumbnail(self, max_size: int) -> np.ndarray:
        """[3, h, w] float32 with max(h, w) <= max_size, read from the smallest level still >= max_size."""
        from PIL import Image

        big = [i for i, s in enumerate(self.level_shapes) if max(s) >= max_size]
        level = max(big, default=0)
        h, w = self.level_shapes[level]
        img = self.read_level(level, (0, 0), (h, w))
        f = max(h, w) / max_size
        if f <= 1:
            return img
        th, tw = max(1, round(h / f)), max(1, round(w / f))
        return np.stack([np.asarray(Image.fromarray(c).resize((tw, th), Image.BOX)) for c in img])


class VolumeSource(Source):
    """NIfTI volume(s) through nibabel proxies: one file per channel, or one 4-D file.

    Each channel is normalised as (x - mean) / std over its nonzero voxels (zeros, i.e. outside the
    skull-stripped head, stay 0); the stats come once, lazily, from a strided subsample, so a read
    touches only its region. cache=True keeps decoded channels in memory (fast random crops from
    .nii.gz, which otherwise decompresses from the file start on every read).
    """

    def __init__(self, paths, cache: bool = False):
        self.paths = [_exists(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.path = self.paths[0]
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
            if s[:3] != shapes[0][:3] or not np.allclose(im.affine, imgs[0].affine, atol=1e-3):
                raise DataError(
                    f"{p}: shape {s[:3]} / affine does not match {self.path} (shape {shapes[0][:3]}); "
                    "all channels of a case must share one grid"
                )
        self.shape = tuple(int(d) for d in reversed(shapes[0][:3]))
        self.affine = np.asarray(imgs[0].affine, np.float64)
        self.cache = cache
        self._stats = None
        self._h = imgs

    @property
    def _imgs(self):
        if getattr(self, "_h", None) is None:
            import nibabel as nib

            self._h = [nib.load(p) for p in self.paths]
        return self._h

    def _raw(self, c: int, index) -> np.ndarray:
        """Channel c of nibabel data[index] (index in nibabel (i, j, k) order) as float32."""
        imgs = self._imgs
        if len(imgs) == 1 and self.channels > 1:
            img, tail = imgs[0], (c,)
        else:
            img, tail = imgs[c], (0,) if len(imgs[c].shape) == 4 else ()
        try:
            if not self.cache:
                return np.asarray(img.dataobj[(*index, *tail)], np.float32)
            store = self.__dict__.setdefault("_hcache", {})
            if c not in store:
                store[c] = np.asarray(img.dataobj[(slice(None),) * 3 + tail], np.float32)
            return store[c][index]
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

    def _read_inside(self, lo, hi):
        stats = self.stats()
        index = tuple(slice(a, b) for a, b in zip(reversed(lo), reversed(hi)))
        out = np.empty((self.channels, *(b - a for a, b in zip(lo, hi))), np.float32)
        for c in range(self.channels):
            v = self._raw(c, index).transpose(2, 1, 0)
            out[c] = np.where(v != 0, (v - stats[c, 0]) / stats[c, 1], 0)
        return out


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


class TiffLabel(LabelSource):
    """Single-channel (tiled or stripped, maybe pyramidal) TIFF: decodes only the tiles a region touches."""

    def __init__(self, path, cache_tiles: int = 64):
        self.path = _exists(path)
        check_tiff(self.path)
        self.cache_tiles = cache_tiles
        levels = self._levels
        self.shape = levels[0]["shape"]
        self.level_shapes = [lv["shape"] for lv in levels]
        self.level_downsamples = [self.shape[0] / lv["shape"][0] for lv in levels]

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
                chunk = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip or h, w)
                levels.append(
                    dict(
                        shape=(h, w),
                        chunk=chunk,
                        cols=-(-w // chunk[1]),
                        offsets=page.dataoffsets,
                        counts=page.databytecounts,
                        decode=page.decode,
                        jpegtables=page.jpegtables,
                        dtype=page.dtype,
                    )
                )
            self._h = levels
            self._hfile = tf  # decode closures refer to its pages
            self._hfd = os.open(self.path, os.O_RDONLY)
            self._hcache = OrderedDict()
            self._hlock = threading.Lock()
        return self._h

    def _tile(self, level: int, r: int, c: int) -> np.ndarray:
        lv = self._levels[level]
        key = (level, r, c)
        with self._hlock:
            hit = self._hcache.get(key)
            if hit is not None:
                self._hcache.move_to_end(key)
                return hit
        index = r * lv["cols"] + c
        off, n = int(lv["offsets"][index]), int(lv["counts"][index])
        th = min(lv["chunk"][0], lv["shape"][0] - r * lv["chunk"][0])
        if n == 0:
            tile = np.zeros((th, lv["chunk"][1]), lv["dtype"])
        else:
            data = os.pread(self._hfd, n, off)
            try:
                seg = lv["decode"](data, index, jpegtables=lv["jpegtables"])[0]
            except Exception as e:  # codec errors come in many types
                raise DataError(f"{self.path}: cannot decode tile {index} of level {level} ({e})") from None
            tile = seg.reshape(seg.shape[-3], seg.shape[-2])
        with self._hlock:
            self._hcache[key] = tile
            while len(self._hcache) > self.cache_tiles:
                self._hcache.popitem(last=False)
        return tile

    def _read_level_inside(self, level, lo, hi) -> np.ndarray:
        lv = self._levels[level]
        (th, tw), dtype = lv["chunk"], lv["dtype"]
        out = np.empty((hi[0] - lo[0], hi[1] - lo[1]), dtype)
        for r in range(lo[0] // th, (hi[0] - 1) // th + 1):
            for c in range(lo[1] // tw, (hi[1] - 1) // tw + 1):
                t = self._tile(level, r, c)
                y0, y1 = max(lo[0], r * th), min(hi[0], (r + 1) * th)
                x0, x1 = max(lo[1], c * tw), min(hi[1], (c + 1) * tw)
                part = t[y0 - r * th : y1 - r * th, x0 - c * tw : x1 - c * tw]
                out[y0 - lo[0] : y1 - lo[0], x0 - lo[1] : x1 - lo[1]] = part
        return out

    def _read_inside(self, lo, hi):
        return self._read_level_inside(0, lo, hi)

    def _chunks(self, size: int = 2048):
        th, tw = self._levels[0]["chunk"]
        size_y, size_x = max(th, size // th * th), max(tw, size // tw * tw)  # tile-aligned blocks
        for y in range(0, self.shape[0], size_y):
            for x in range(0, self.shape[1], size_x):
                yield (y, x), (min(y + size_y, self.shape[0]), min(x + size_x, self.shape[1]))

    def read_level(self, level: int, start_level0, size_at_level) -> np.ndarray:
        """int64 [h, w] from a pyramid level (labels there are nearest-sampled); start in level-0 pixels."""
        ds = self.level_downsamples[level]
        start = (int(start_level0[0] // ds), int(start_level0[1] // ds))
        start, size = _region((0, 0), start, size_at_level)
        out = np.full(size, IGNORE_INDEX, np.int64)
        clip = _clip(self.level_shapes[level], start, size)
        if clip:
            lo, hi, where = clip
            out[where] = self.classes(self._read_level_inside(level, lo, hi))
        return out

    def __del__(self):
        if getattr(self, "_h", None) is not None:
            os.close(self._hfd)
            self._hfile.close()


class NiftiLabel(LabelSource):
    """3-D NIfTI label through a nibabel proxy, same axis convention as VolumeSource."""

    def __init__(self, path):
        self.path = _exists(path)
        img = _load_nifti(self.path)
        s = img.shape
        if not (len(s) == 3 or (len(s) == 4 and s[3] == 1)):
            raise DataError(f"{self.path}: a label volume must be 3-D, got shape {s}")
        self.shape = tuple(int(d) for d in reversed(s[:3]))
        self.affine = np.asarray(img.affine, np.float64)
        self._h = img

    def _chunks(self, size: int = 8192):
        return super()._chunks(size)  # big slabs: each read of a .nii.gz decompresses from the start

    def _read_inside(self, lo, hi):
        import nibabel as nib

        if getattr(self, "_h", None) is None:
            self._h = nib.load(self.path)
        img = self._h
        index = tuple(slice(a, b) for a, b in zip(reversed(lo), reversed(hi))) + ((0,) if len(img.shape) == 4 else ())
        try:
            return np.asarray(img.dataobj[index]).transpose(2, 1, 0)
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


def open_image(path_or_paths, cache: bool = False) -> Source:
    """Open an image by suffix: slides via openslide, .nii(.gz) (or one per channel) via nibabel, else arrays."""
    if isinstance(path_or_paths, (list, tuple)):
        paths = [Path(p) for p in path_or_paths]
        if len(paths) == 1:
            return open_image(paths[0], cache)
        if not paths or any(suffix(p) not in NIFTI_SUFFIXES for p in paths):
            names = ", ".join(map(str, paths))
            raise DataError(f"{names}: several files per image must all be NIfTI (one per channel)")
        return VolumeSource(paths, cache=cache)
    path = _exists(path_or_paths)
    kind = suffix(path)
    if kind in NIFTI_SUFFIXES:
        return VolumeSource([path], cache=cache)
    if kind in SLIDE_SUFFIXES:
        return SlideSource(path)
    if kind in TIFF_SUFFIXES:
        import openslide

        check_tiff(path)
        return SlideSource(path) if openslide.OpenSlide.detect_format(str(path)) else ArraySource(path)
    if kind in PICTURE_SUFFIXES + (".npy",):
        return ArraySource(path)
    raise DataError(
        f"{path}: unsupported image suffix {kind!r}; expected one of "
        f"{', '.join(SLIDE_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + PICTURE_SUFFIXES + ('.npy',))}"
    )


def open_label(path) -> LabelSource:
    """Open a label map by suffix: TIFF (read by tile), NIfTI (proxy), PNG or .npy."""
    path = _exists(path)
    kind = suffix(path)
    if kind in TIFF_SUFFIXES:
        return TiffLabel(path)
    if kind in NIFTI_SUFFIXES:
        return NiftiLabel(path)
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
