"""Pre-flight checks of a dataset's image files, run before a run builds or writes anything.

- Empty volumes: a NIfTI image file whose voxels are all 0 (a failed export) is refused; integer files are
  read only until their first nonzero voxel.
- Non-finite pixels/voxels (NaN, +-Inf): every image file is scanned, streamed (raw byte chunks for
  uncompressed data, one decoded tile/strip at a time for compressed TIFF, gzip slabs for NIfTI), so a
  gigapixel image never sits in memory. Integer files (uint8 slides, uint16 volumes) cannot hold NaN
  and are skipped from their header alone. Otherwise one NaN makes every loss NaN: training would
  skip its steps, or adaptive patching would fail only when that case is drawn.
- Split overlap: the same file (same resolved path) or byte-identical files in two splits would
  score a model on images it trained on. Contents are hashed only among files of equal size.
- Token budget: with adaptive patching in budget mode, a budget above the most leaves an image (or
  window) can have only pads every sample with empty tokens.

Scan counts and hashes are cached per file, keyed by (absolute path, size, mtime), in one small JSON
file (`cache_path()`), so a second run over the same data costs a stat per file. A cache that cannot
be read or written is ignored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np

from hrvit.data.sources import NIFTI_SUFFIXES, TIFF_SUFFIXES, suffix
from hrvit.errors import ConfigError, DataError

CHUNK_BYTES = 32 << 20
"""Bytes read (or decompressed) at a time while scanning; bounds the scan's memory."""
QUICK_BYTES = 1 << 16
"""Bytes from the start and the end of a file hashed first; the whole file is hashed only on a match."""
CACHE_FILE = "preflight.json"


def cache_path() -> Path:
    """$HRVIT_CACHE_DIR/preflight.json, else $XDG_CACHE_HOME/hrvit/..., else ~/.cache/hrvit/..."""
    if os.environ.get("HRVIT_CACHE_DIR"):
        return Path(os.environ["HRVIT_CACHE_DIR"]) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hrvit" / CACHE_FILE


class FileCache:
    """Per-file facts (non-finite count, content hash) valid while the file's size and mtime stay the same."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_path()
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def get(self, path: Path, key: str):
        name, size, mtime = self._stamp(path)
        entry = self.entries.get(name)
        if isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime:
            return entry.get(key)
        return None

    def put(self, path: Path, key: str, value) -> None:
        name, size, mtime = self._stamp(path)
        entry = self.entries.get(name)
        if not (isinstance(entry, dict) and entry.get("size") == size and entry.get("mtime_ns") == mtime):
            entry = self.entries[name] = {"size": size, "mtime_ns": mtime}
        entry[key] = value
        self.dirty = True

    def save(self) -> None:
        """Write the cache (merged with what another process wrote meanwhile); never raises."""
        if not self.dirty:
            return
        try:
            try:
                on_disk = json.loads(self.path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            merged = {k: v for k, v in (on_disk if isinstance(on_disk, dict) else {}).items() if os.path.exists(k)}
            merged.update(self.entries)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            pass


# ------------------------------------------------------------------ non-finite values


def _count(values: np.ndarray) -> int:
    return int(values.size - np.count_nonzero(np.isfinite(values)))


def _chunks_of(f, dtype: np.dtype, nbytes: int, chunk: int = CHUNK_BYTES):
    """The next `nbytes` bytes of `f` as arrays of `dtype`, `chunk` bytes at a time."""
    step = max(dtype.itemsize, chunk // dtype.itemsize * dtype.itemsize)
    while nbytes > 0:
        data = f.read(min(step, nbytes))
        if not data:
            raise EOFError(f"file ends {nbytes} bytes before its image data does")
        usable = len(data) // dtype.itemsize * dtype.itemsize
        yield np.frombuffer(data[:usable], dtype)
        nbytes -= len(data)


def _count_stream(f, dtype: np.dtype, nbytes: int) -> int:
    """Non-finite values among the next `nbytes` bytes of `f` read as `dtype`, CHUNK_BYTES at a time."""
    return sum(_count(v) for v in _chunks_of(f, dtype, nbytes))


def _scan_nifti(path: Path, full: bool) -> dict:
    """{"nonfinite": count, "empty": whether every voxel is 0} of a NIfTI file, streamed. Integer data cannot hold
    NaN: with full=False it is read only until its first nonzero voxel (and "nonfinite" is 0)."""
    import nibabel as nib

    img = nib.load(path)
    header = img.header
    dtype = header.get_data_dtype()
    is_float = dtype.kind in "fc"
    nbytes = math.prod(int(d) for d in header.get_data_shape()) * dtype.itemsize
    # where the voxels start as nibabel reads them: a header's vox_offset of 0 means 352 in a .nii file (reading from
    # 0 took the header's bytes for voxels and missed the last 88 float32 voxels)
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    bad, nonzero = 0, False
    opener = gzip.open if suffix(path) == ".nii.gz" else open
    with opener(path, "rb") as f:
        f.seek(offset)  # gzip: decompresses the (small) header part
        # integer data stops at its first nonzero voxel, usually in the first slices: small steps read little
        for values in _chunks_of(f, dtype, nbytes, CHUNK_BYTES if is_float or full else 1 << 20):
            nonzero = nonzero or bool(np.any(values != 0))  # NaN counts as nonzero: it is reported as NaN
            if is_float:
                bad += _count(values)
            elif nonzero and not full:
                break
    return {"nonfinite": bad, "empty": not nonzero}


def _nonfinite_nifti(path: Path) -> int:
    import nibabel as nib

    if nib.load(path).header.get_data_dtype().kind not in "fc":
        return 0
    return _scan_nifti(path, full=True)["nonfinite"]


def _nonfinite_tiff(path: Path) -> int:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]  # level 0; reduced levels are never read as pixels
        dtype = page.dtype
        if dtype is None or dtype.kind not in "fc":
            return 0
        if page.compression == 1 and not page.is_tiled and page.bitspersample == 8 * dtype.itemsize:
            raw = dtype.newbyteorder(tf.byteorder)  # uncompressed strips: no padding, stream the bytes
            bad = 0
            with open(path, "rb") as f:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    f.seek(offset)
                    bad += _count_stream(f, raw, int(count))
            return bad
        depth, height, width = page.imagedepth, page.imagelength, page.imagewidth
        bad = 0
        for segment, index, _ in page.segments(maxworkers=min(4, os.cpu_count() or 1), buffersize=CHUNK_BYTES):
            if segment is not None:  # edge tiles are padded past the image: count the in-image part only
                bad += _count(segment[: depth - index[1], : height - index[2], : width - index[3]])
        return bad


def _nonfinite_npy(path: Path) -> int:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype.kind not in "fc":
        return 0
    flat = np.ravel(array, order="K")  # a view of the memory map: pages are read chunk by chunk
    step = max(1, CHUNK_BYTES // array.dtype.itemsize)
    return sum(_count(flat[i:i + step]) for i in range(0, flat.size, step))


def count_nonfinite(path, cache: FileCache | None = None) -> int:
    """Number of NaN/Inf values in one image file's level-0 pixels (0 for integer data, read from the header
    alone); DataError when the file cannot be read to its end. Cached per (absolute path, size, mtime)."""
    path = Path(path)
    kind = suffix(path)
    scan = {**dict.fromkeys(NIFTI_SUFFIXES, _nonfinite_nifti), **dict.fromkeys(TIFF_SUFFIXES, _nonfinite_tiff),
            ".npy": _nonfinite_npy}.get(kind)
    if scan is None:  # openslide slides and PNG/JPEG/BMP pictures are 8- or 16-bit integers
        return 0
    cached = cache.get(path, "nonfinite") if cache is not None else None
    if cached is not None:
        return int(cached)
    try:
        bad = scan(path)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read its pixels to check them for NaN/Inf ({e})") from None
    except Exception as e:  # tifffile/nibabel codecs raise many types for corrupt data
        raise DataError(f"{path}: cannot read its pixels to check them for NaN/Inf ({type(e).__name__}: {e})") from None
    if cache is not None:
        cache.put(path, "nonfinite", bad)
    return bad


def empty_volume(path, cache: FileCache | None = None) -> bool:
    """Whether a NIfTI image file holds only zeros (False for other formats); read until its first nonzero voxel
    (integer data) or whole (float data, which also caches its non-finite count). Cached like count_nonfinite."""
    path = Path(path)
    if suffix(path) not in NIFTI_SUFFIXES:
        return False
    cached = cache.get(path, "empty") if cache is not None else None
    if cached is not None:
        return bool(cached)
    try:
        import nibabel as nib

        facts = _scan_nifti(path, full=nib.load(path).header.get_data_dtype().kind in "fc")
    except Exception as e:  # nibabel/gzip raise many types for corrupt data
        raise DataError(f"{path}: cannot read its voxels to check them ({type(e).__name__}: {e})") from None
    if cache is not None:
        cache.put(path, "empty", facts["empty"])
        if facts["nonfinite"]:
            cache.put(path, "nonfinite", facts["nonfinite"])
    return facts["empty"]


def check_finite(spec, cache: FileCache | None = None, nonfinite: str | None = None) -> int:
    """DataError naming the first image file of a case (the very channel's file) that holds NaN or Inf, unless
    `nonfinite` (else spec.nonfinite, data.nonfinite) is "zero": then returns how many voxels will read as 0.
    DataError too for a NIfTI image file that is all zeros (an empty volume: a failed export)."""
    policy = nonfinite or getattr(spec, "nonfinite", "error")
    total = 0
    for path in spec.image:
        bad = count_nonfinite(path, cache)
        if bad and policy != "zero":
            raise DataError(
                f"{path}: {bad} non-finite value(s) (NaN or Inf) in the image of case {spec.id}; every loss on "
                "them is NaN; replace them with finite values (e.g. numpy.nan_to_num) or remove the case, or set "
                "data.nonfinite=zero to read them as 0")
        total += bad
        if empty_volume(path, cache):
            raise DataError(f"{path}: every voxel is 0 (an empty volume) in the image of case {spec.id}; expected "
                            "an image: export it again or remove the case")
    return total


# ------------------------------------------------------------------ the same image in two splits


def _hash(path: Path, quick: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if quick:
            h.update(f.read(QUICK_BYTES))
            f.seek(max(0, os.path.getsize(path) - QUICK_BYTES))
            h.update(f.read(QUICK_BYTES))
        else:
            while block := f.read(CHUNK_BYTES):
                h.update(block)
    return h.hexdigest()


def _content_hash(path: Path, cache: FileCache | None) -> str:
    cached = cache.get(path, "blake2b") if cache is not None else None
    if cached is None:
        cached = _hash(path, quick=False)
        if cache is not None:
            cache.put(path, "blake2b", cached)
    return cached


def split_overlaps(specs, cache: FileCache | None = None) -> list[tuple]:
    """(spec_a, file_a, spec_b, file_b, how) for every image file of a case that is also an image file of a case
    in another split: the same file (resolved path), or byte-identical content (hashed only for equal sizes)."""
    files = [(s, Path(p)) for s in specs for p in s.image if Path(p).is_file()]
    by_key: dict = {}
    for s, p in files:
        by_key.setdefault(("path", str(p.resolve())), []).append((s, p))
    groups: dict = {}
    for key, members in list(by_key.items()):
        groups.setdefault(os.path.getsize(members[0][1]), []).append(key)
    for keys in groups.values():  # files of equal size: hash the ends, then (on a match) the whole file
        if len(keys) < 2 or len({s.split for k in keys for s, _ in by_key[k]}) < 2:
            continue
        quick: dict = {}
        for k in keys:
            quick.setdefault(_hash(by_key[k][0][1], quick=True), []).append(k)
        for same_ends in quick.values():
            if len(same_ends) < 2:
                continue
            full: dict = {}
            for k in same_ends:
                full.setdefault(_content_hash(by_key[k][0][1], cache), []).append(k)
            for merged in full.values():
                for k in merged[1:]:
                    by_key[merged[0]] += by_key.pop(k)
    found = []
    for members in by_key.values():
        first = {}
        for s, p in members:
            for split, (s0, p0) in first.items():
                if split != s.split:
                    same = Path(p0).resolve() == Path(p).resolve()
                    found.append((s0, p0, s, p, "the same file" if same else "byte-identical files"))
                    break
            first.setdefault(s.split, (s, p))
    return found


def overlap_message(overlap: tuple) -> str:
    a, pa, b, pb, how = overlap
    scored = "its score would be measured on training data" if "train" in (a.split, b.split) else \
        "the same image would count in both"
    return (f"case {a.id} ({a.split}: {pa}) and case {b.id} ({b.split}: {pb}) are {how}, so the {b.split} split "
            f"holds an image of the {a.split} split and {scored}; remove one of them, or set "
            "data.allow_split_overlap=true to accept it")


# ------------------------------------------------------------------ adaptive token budget


def max_leaves(shape, patching, window: int | None) -> tuple[int, tuple[int, ...], int]:
    """(most leaves, extent, smallest leaf edge) of one image under adaptive patching: every leaf at the
    smallest edge (patching.min_leaf, else patch_size), ceil(extent / edge) per axis. The tree covers the
    window's in-image part (data.window), or the whole image when the window is null."""
    leaf = patching.min_leaf or patching.patch_size
    extent = tuple(int(n) if window is None else min(int(window), int(n)) for n in shape)
    return math.prod(math.ceil(e / leaf) for e in extent), extent, leaf


def check_token_budget(cfg, shapes: list[tuple[object, tuple[int, ...]]]) -> None:
    """ConfigError when patching.tokens (adaptive, budget mode) exceeds the most leaves of even the largest
    image: every sample would be padded with empty tokens (and memory with them). shapes: (spec, shape)."""
    pc = cfg.patching
    if cfg.task == "classify" or pc.mode != "adaptive" or pc.threshold is not None or pc.tokens is None or not shapes:
        return
    best = max(((max_leaves(shape, pc, cfg.data.window), spec) for spec, shape in shapes), key=lambda t: t[0][0])
    (most, extent, leaf), spec = best
    if pc.tokens > most:
        where = "whole image" if cfg.data.window is None else f"data.window={cfg.data.window} inside the image"
        raise ConfigError(
            f"patching.tokens: {pc.tokens} is more than the {most} leaves the largest image can have "
            f"({spec.image[0]}, extent {extent} ({where}) in leaves of {leaf} px, the smallest leaf "
            f"(patching.{'min_leaf' if pc.min_leaf else 'patch_size'})); every sample would be padded with "
            f"empty tokens; set patching.tokens to at most {most}")
