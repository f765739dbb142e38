"""hrvit.data on real files: pyramids through openslide, labels by tile, NIfTI, layouts, bad input."""

from __future__ import annotations

import gzip
import json
import math
import pickle
import shutil

import nibabel as nib
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from hrvit.data import (
    ArraySource,
    CaseSpec,
    SlideSource,
    SyntheticSlide,
    VolumeSource,
    check_labels,
    check_min_size,
    discover,
    make_slides,
    make_volumes,
    open_case,
    open_image,
    open_label,
    write_nifti,
    write_pyramid_from_array,
)
from hrvit.data.synthetic import slide_seed
from hrvit.data.tiff import downsample2
from hrvit.errors import ConfigError, DataError
from hrvit.patching.sequence import IGNORE_INDEX

SIZE = (640, 1000)  # non-square, not a multiple of the tile: catches (x, y) mix-ups and edge tiles


@pytest.fixture(scope="module")
def wsi(tmp_path_factory):
    out = tmp_path_factory.mktemp("wsi")
    return make_slides(out, n=3, size=SIZE, seed=0, tile=128)


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return make_volumes(tmp_path_factory.mktemp("brats"), n=2, shape=(40, 48, 56), seed=0)


def full(source: SlideSource, level: int = 0) -> np.ndarray:
    return source.read_level(level, (0, 0), source.level_shapes[level])


# --- wsi ---------------------------------------------------------------------------------------


def test_slides_open_in_openslide_at_every_level(wsi):
    image = wsi.parent / "slide_000.tiff"
    assert openslide.OpenSlide.detect_format(str(image)) == "generic-tiff"
    src = open_image(image)
    assert isinstance(src, SlideSource) and src.shape == SIZE and src.channels == 3
    assert src.mpp == pytest.approx(0.5)
    assert [src.best_level(d) for d in (0.5, 1, 3.9, 4, 100)] == [0, 0, 1, 2, 3]
    h, w = SIZE
    expected = [(-(-h // 2**lv), -(-w // 2**lv)) for lv in range(src.level_count)]
    assert src.level_shapes == expected and src.level_count == 4  # down to one 128-px tile
    level0 = full(src).transpose(1, 2, 0)
    down = level0
    for level in range(1, src.level_count):
        down = downsample2(down, "area")
        got = full(src, level).transpose(1, 2, 0)
        assert got.shape == down.shape
        assert np.abs(got - down).mean() < 0.04, level  # texture band-limited per level


# --- pyramid level choice on files as scanners write them ---------------------------------------

SCANNER = (1999, 2999)  # (h, w): odd level-0 sizes


def _scanner_tiff(path, steps, rounding, shape=SCANNER):
    """A generic-tiff pyramid written directly with tifffile: JPEG tiles, one page per level, level l of size
    rounding(level-0 size / cumulative step) per axis (floor, as Aperio and most scanners do), each level a box
    resample of level 0."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / 37) * np.cos(y / 53), 128 + 90 * np.sin((x + y) / 91),
                    128 + 60 * np.cos(x / 13 + y / 29)], -1).clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for i, f in enumerate(np.cumprod([1, *steps])):
            size = (rounding(w / f), rounding(h / f))
            level = rgb if i == 0 else np.asarray(Image.fromarray(rgb).resize(size, Image.BOX))
            tw.write(level, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     subfiletype=int(i > 0), metadata=None)
    return path


@pytest.fixture(scope="module")
def scanner(tmp_path_factory):
    """Pyramids of a 2999 x 1999 slide: floor-rounded 2x and 4x steps (scanners), and hrvit's own ceil 2x."""
    out = tmp_path_factory.mktemp("scanner")
    h, w = SCANNER
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * y) % 251, (x // 5 + y // 7) % 256], -1).astype(np.uint8)
    return {"floor2": _scanner_tiff(out / "floor2.tiff", [2, 2, 2, 2], math.floor),
            "floor4": _scanner_tiff(out / "floor4.tiff", [4, 4], math.floor),
            "ceil2": write_pyramid_from_array(out / "ceil2.tiff", rgb, tile=256, compression="jpeg")}


def reference_level(shapes, downsample: float) -> int:
    """The documented rule from first principles: the coarsest level (fewest pixels) that one more pixel per axis
    would make finer than asked, i.e. level-0 size / (level size + 1) < the request on each axis (so a level
    rounded down from the request qualifies, one a pixel smaller does not); level 0 when none does."""
    (h0, w0) = shapes[0]
    ok = [i for i, (h, w) in enumerate(shapes) if h0 / (h + 1) < downsample and w0 / (w + 1) < downsample]
    return min(ok, key=lambda i: shapes[i][0] * shapes[i][1], default=0)


def _file_levels(path) -> list[tuple[int, int]]:
    with tifffile.TiffFile(path) as tf:
        return [page.shape[:2] for page in tf.pages]


@pytest.mark.parametrize("kind", ["floor2", "floor4", "ceil2"])
def test_best_level_is_the_coarsest_not_above_the_request(scanner, kind):
    """SlideSource (openslide) sees the file's levels and pixels, and best_level picks what the rule says for
    requests 1 % below a level's (and its nominal 2^k), at its nominal 2^k (inside the rounding of a floor-rounded
    level's size: that level), at and 1 % above its larger axis one, and between."""
    path = scanner[kind]
    shapes = _file_levels(path)
    src = open_image(path)
    assert isinstance(src, SlideSource) and src.level_shapes == shapes and src.shape == SCANNER
    for level, shape in enumerate(shapes):  # whole levels (level 0: its last, partial tiles)
        start = (0, 0) if level else (shape[0] - 300, shape[1] - 400)
        got = src.read_level(level, start, (shape[0] - start[0], shape[1] - start[1]))
        want = tifffile.imread(path, key=level)[start[0]:, start[1]:].transpose(2, 0, 1) / 255
        np.testing.assert_allclose(got, want, atol=1e-6)
    asks = {0.5, 1.0, 1e4}
    for h, w in shapes[1:]:
        lo, hi = sorted((SCANNER[0] / h, SCANNER[1] / w))
        nominal = 2 ** round(math.log2(lo))
        # 1 % is more than a pixel of any level here: beyond the rounding of level sizes
        asks |= {min(lo, nominal) * 0.99, nominal, hi, hi * 1.01, nominal * 1.5}
    for ask in sorted(asks):
        assert src.best_level(ask) == reference_level(shapes, ask), (kind, ask, shapes)
    for level in range(len(shapes)):  # each level is the one made for its nominal downsample
        assert src.best_level(float(np.cumprod([1, *{"floor4": [4, 4]}.get(kind, [2] * 4)])[level])) == level


def test_choose_level_on_deep_and_tiny_levels():
    """The rule on level sizes alone: a 4101 x 6151 slide floor-rounded by 2 (1024: 4 x 6 px, downsample 1025.25)
    and by 4 (Aperio-like), ceil-rounded (hrvit), down to 1-px levels; against reference_level and by name."""
    from hrvit.data.sources import choose_level

    h, w = 4101, 6151
    floor2 = [(h >> k, w >> k) for k in range(13)]
    floor4 = [(h // 4**k, w // 4**k) for k in range(6)]
    ceil2 = [(-(-h // 2**k), -(-w // 2**k)) for k in range(14)]
    assert floor2[10] == (4, 6) and choose_level(floor2, 1024) == 10 and choose_level(floor2, 2048) == 11
    assert choose_level(floor4, 1000) == 5 and choose_level(floor4, 800) == 4 and choose_level(floor4, 16) == 2
    assert choose_level(ceil2, 8192) == 13 and choose_level(floor2, 0.5) == 0 and choose_level(floor2, 1) == 0
    for shapes in (floor2, floor4, ceil2):
        for ask in [1, 1.5, 2, 3.99, 4, 4.01, 7, 8, 100, 512, 1000, 1024, 1030, 2048, 4096, 5000, 1e5]:
            assert choose_level(shapes, ask) == reference_level(shapes, ask), (shapes[:2], ask)


@pytest.mark.parametrize("kind", ["floor2", "floor4"])
def test_scanner_pyramid_leaves_are_read_at_their_nominal_level(scanner, kind):
    """A leaf of edge S comes from the level made for downsample S / p, rounding of level sizes aside."""
    from hrvit.config import PatchingConfig
    from hrvit.patching.adaptive import patch_pyramid

    src = open_image(scanner[kind])
    nominal = {round(d): i for i, d in enumerate(src.level_downsamples)}  # 1, 2, 4, ... -> level
    seq = patch_pyramid(src, PatchingConfig(mode="adaptive", patch_size=16, tokens=256))
    sizes = seq.boxes[: seq.real_tokens, 2].unique().tolist()
    want = {nominal[max(d for d in nominal if d <= s // 16)] for s in sizes}
    want.add(nominal[max(d for d in nominal if d <= seq.meta["working_pixel"])])
    assert set(seq.meta["pixels_read"]) == want, (seq.meta["pixels_read"], sizes)


def test_slide_labels_region_wise_equal_generator(wsi):
    mask = open_label(wsi.parent / "slide_001_mask.tiff")
    gen = SyntheticSlide(SIZE, slide_seed(0, 1))
    assert mask.shape == SIZE
    for y, x, h, w in [(0, 0, 640, 1000), (100, 300, 200, 333), (500, 900, 140, 100), (127, 127, 2, 2)]:
        np.testing.assert_array_equal(mask.read((y, x), (h, w)), gen.label(0, y, x, h, w))
    np.testing.assert_array_equal(mask.read_level(2, (0, 0), (160, 250)), gen.label(2, 0, 0, 160, 250))
    values = set()
    for i in range(3):
        values |= set(open_label(wsi.parent / f"slide_{i:03d}_mask.tiff").values().tolist())
    assert values == {0, 1, 2}
    lab = gen.label(0, 0, 0, *SIZE)
    assert 0.003 < (lab == 2).mean() < 0.04 and (lab == 1).mean() > 0.01


def test_slides_deterministic_by_seed(wsi, tmp_path):
    again = make_slides(tmp_path / "again", n=1, size=SIZE, seed=0, tile=128)
    other = make_slides(tmp_path / "other", n=1, size=SIZE, seed=1, tile=128)
    a, b, c = (full(open_image(m.parent / "slide_000.tiff")) for m in (wsi, again, other))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    la, lb = (open_label(m.parent / "slide_000_mask.tiff").read((0, 0), SIZE) for m in (wsi, again))
    assert np.array_equal(la, lb)
    assert wsi.read_text() == (wsi.parent / "manifest.csv").read_text()
    assert wsi.read_text().splitlines()[0] == "image,label,split"


def test_slide_read_is_y_x(tmp_path):
    h, w = 300, 500
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2, 0] = 255  # red: left half
    rgb[:100, :, 1] = 255  # green: top 100 rows
    src = open_image(write_pyramid_from_array(tmp_path / "p.tiff", rgb, tile=128, compression="zlib"))
    assert isinstance(src, SlideSource) and src.shape == (h, w)
    np.testing.assert_array_equal(src.read((0, 0), (h, w)), rgb.transpose(2, 0, 1) / 255)
    part = src.read((80, 230), (40, 30))  # 40 rows, 30 columns
    assert part.shape == (3, 40, 30)
    assert part[0, :, :20].min() == 1 and part[0, :, 20:].max() == 0
    assert part[1, :20].min() == 1 and part[1, 20:].max() == 0
    low = src.read_level(1, (0, 0), (150, 250))
    assert low[0, :, :124].min() > 0.99 and low[1, :49].min() > 0.99 and low[1, 51:].max() < 0.01
    assert src.thumbnail(100).shape == (3, 60, 100)


def test_outside_pads_image_zero_label_ignore(wsi, tmp_path):
    src = open_image(wsi.parent / "slide_000.tiff")
    out = src.read((-10, SIZE[1] - 20), (30, 40))
    assert out[:, :10].max() == 0 and out[:, :, 20:].max() == 0 and out[:, 10:, :20].min() > 0
    lab = open_label(wsi.parent / "slide_000_mask.tiff").read((-10, SIZE[1] - 20), (30, 40))
    assert (lab[:10] == IGNORE_INDEX).all() and (lab[:, 20:] == IGNORE_INDEX).all() and (lab[10:, :20] >= 0).all()
    np.save(tmp_path / "a.npy", np.ones((2, 4, 5), np.float32))
    arr = open_image(tmp_path / "a.npy").read((3, -1), (3, 3))
    assert arr.shape == (2, 3, 3) and arr[:, 0, 1:].min() == 1 and arr[:, 1:].max() == 0 and arr[:, :, 0].max() == 0


def test_sources_pickle(wsi):
    img, lab = open_image(wsi.parent / "slide_000.tiff"), open_label(wsi.parent / "slide_000_mask.tiff")
    a, b = img.read((10, 20), (50, 60)), lab.read((10, 20), (50, 60))
    img2, lab2 = pickle.loads(pickle.dumps(img)), pickle.loads(pickle.dumps(lab))
    assert np.array_equal(img2.read((10, 20), (50, 60)), a) and np.array_equal(lab2.read((10, 20), (50, 60)), b)


def test_label_tiff_in_strips_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (300, 200), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", lab, rowsperstrip=16, compression="zlib")
    Image.fromarray(lab).save(tmp_path / "l.png")
    np.save(tmp_path / "l.npy", lab)
    for name in ("s.tif", "l.png", "l.npy"):
        src = open_label(tmp_path / name)
        np.testing.assert_array_equal(src.read((33, 17), (100, 150)), lab[33:133, 17:167])
        assert src.values().tolist() == [0, 1, 2]
    rgb = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "i.png")
    src = open_image(tmp_path / "i.png")
    assert isinstance(src, ArraySource) and src.shape == (40, 30)
    np.testing.assert_allclose(src.read((0, 0), (40, 30)), rgb.transpose(2, 0, 1) / 255, atol=1e-6)
    tifffile.imwrite(tmp_path / "plain.tif", rgb, photometric="rgb")
    assert isinstance(open_image(tmp_path / "plain.tif"), ArraySource)


# --- brats --------------------------------------------------------------------------------------


def test_volumes_brats_layout(brats):
    case = brats / "BraTS2021_00000"
    names = sorted(p.name for p in case.iterdir())
    assert names == [f"BraTS2021_00000_{m}.nii.gz" for m in ("flair", "seg", "t1", "t1ce", "t2")]
    t1 = nib.load(case / "BraTS2021_00000_t1.nii.gz")
    assert t1.shape == (56, 48, 40)  # nibabel (i, j, k) = hrvit (x, y, z)
    assert np.allclose(np.abs(np.diag(t1.affine)[:3]), 1) and np.abs(t1.affine[:3, 3]).min() > 1
    seg_img = nib.load(case / "BraTS2021_00000_seg.nii.gz")
    np.testing.assert_array_equal(seg_img.affine, t1.affine)
    seg = np.asarray(seg_img.dataobj).transpose(2, 1, 0)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4} and {1, 2, 4} <= set(np.unique(seg).tolist())
    # nesting: enhancing touches only core/enhancing, core never touches background
    for axis in range(3):
        for shift in (1, -1):
            nb = np.roll(seg, shift, axis)
            assert not np.isin(nb[seg == 4], [0, 2]).any()
            assert not (nb[np.isin(seg, [1, 4])] == 0).any()
    specs = discover("brats", root=brats)
    assert [s.id for s in specs] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert [p.name.split("_")[-1] for p in specs[0].image] == ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    c = open_case(specs[0], num_classes=4)
    assert isinstance(c.image, VolumeSource) and c.image.channels == 4 and c.image.shape == (40, 48, 56)
    np.testing.assert_array_equal(c.image.affine, t1.affine)
    check_labels(c, 4)
    mapped = c.label.read((0, 0, 0), (40, 48, 56))
    np.testing.assert_array_equal(mapped, np.array([0, 1, 2, 0, 3])[seg])
    with pytest.raises(DataError, match=r"seg\.nii\.gz.*\[3\]"):
        check_labels(c, 3)


def test_volume_read_region_equals_full_slice(brats):
    src = open_image(sorted((brats / "BraTS2021_00001").glob("*_t[12]*.nii.gz")))
    whole = src.read((0, 0, 0), src.shape)
    raw = np.asarray(nib.load(src.paths[0]).dataobj, np.float32).transpose(2, 1, 0)
    v = whole[0][raw != 0]
    assert abs(v.mean()) < 1e-3 and abs(v.std() - 1) < 1e-3 and (whole[0][raw == 0] == 0).all()
    np.testing.assert_array_equal(src.read((5, 7, 9), (10, 20, 30)), whole[:, 5:15, 7:27, 9:39])
    out = src.read((-2, 40, 50), (4, 10, 10))
    assert out[:, :2].max() == 0 and out[:, :, 8:].max() == 0 and out[:, :, :, 6:].max() == 0
    np.testing.assert_array_equal(out[:, 2:, :8, :6], whole[:, :2, 40:, 50:])
    cached = VolumeSource(src.paths, cache=True)
    np.testing.assert_array_equal(cached.read((5, 7, 9), (10, 20, 30)), whole[:, 5:15, 7:27, 9:39])


def test_write_nifti_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    write_nifti(tmp_path / "a.nii.gz", a, affine)
    lab = open_label(tmp_path / "a.nii.gz")
    assert lab.shape == (2, 3, 4) and np.array_equal(lab.read((0, 0, 0), (2, 3, 4)), a)
    assert np.array_equal(nib.load(tmp_path / "a.nii.gz").affine, affine)
    assert (lab.read((1, 2, 3), (2, 2, 2))[1:] == IGNORE_INDEX).all()


# --- layouts --------------------------------------------------------------------------------------


def test_discover_manifest_csv_json_and_paip(wsi, tmp_path):
    specs = discover("manifest", manifest=wsi)
    assert [s.id for s in specs] == ["slide_000", "slide_001", "slide_002"]
    assert sorted(s.split for s in specs) == ["train", "train", "val"]
    assert specs[0].image == [wsi.parent / "slide_000.tiff"]
    assert discover("manifest", root=wsi.parent)[0].label == wsi.parent / "slide_000_mask.tiff"
    paip = discover("paip", root=wsi.parent, val_fraction=0.34, seed=3)
    assert [s.id for s in paip] == ["slide_000", "slide_001", "slide_002"]
    assert [s.split for s in paip] == [s.split for s in discover("paip", root=wsi.parent, val_fraction=0.34, seed=3)]
    assert all(s.label.name.endswith("_mask.tiff") for s in paip)

    d = tmp_path / "m"
    (d / "img").mkdir(parents=True)
    for name in ("a_t1.npy", "a_t2.npy", "b_t1.npy", "b_t2.npy"):
        np.save(d / "img" / name, np.zeros((8, 8), np.float32))
    (d / "m.csv").write_text("image,label,split\nimg/a_t1.npy;img/a_t2.npy,,test\nimg/b_t1.npy,,\n")
    specs = discover("manifest", manifest=d / "m.csv")
    assert specs[0].image == [d / "img/a_t1.npy", d / "img/a_t2.npy"] and specs[0].split == "test"
    assert specs[1].label is None and specs[1].split in ("train", "val")
    rows = [{"image": ["img/a_t1.npy", "img/a_t2.npy"], "split": "val"}, {"image": "img/b_t1.npy", "id": "b"}]
    (d / "m.json").write_text(json.dumps(rows))
    specs = discover("manifest", manifest=d / "m.json")
    assert [s.id for s in specs] == ["a_t1", "b"] and specs[0].split == "val" and len(specs[0].image) == 2


# --- bad input: one DataError naming the file ------------------------------------------------------


def test_missing_files(tmp_path, wsi):
    for call in (lambda: open_image(tmp_path / "nope.svs"), lambda: open_label(tmp_path / "nope.tif")):
        with pytest.raises(DataError, match="nope"):
            call()
    (tmp_path / "m.csv").write_text("image,label\nx1.tiff,x1_mask.tiff\nslide.tiff,\n")
    with pytest.raises(DataError, match=r"3 file\(s\) not found.*x1\.tiff.*x1_mask\.tiff.*slide\.tiff"):
        discover("manifest", manifest=tmp_path / "m.csv")
    with pytest.raises(DataError, match="unsupported image suffix"):
        (tmp_path / "a.xyz").write_text("x")
        open_image(tmp_path / "a.xyz")


def test_corrupt_and_truncated_files(tmp_path, wsi):
    data = (wsi.parent / "slide_000.tiff").read_bytes()
    bad = {"half.tiff": data[: len(data) // 2], "almost.tiff": data[:-100], "junk.svs": b"not a slide" * 100}
    for name, blob in bad.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match=name):
            open_image(tmp_path / name)
    mask = (wsi.parent / "slide_000_mask.tiff").read_bytes()
    (tmp_path / "mask.tiff").write_bytes(mask[: len(mask) // 2])
    with pytest.raises(DataError, match="mask.tiff.*truncated"):
        open_label(tmp_path / "mask.tiff")
    write_nifti(tmp_path / "v.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4))
    gz = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match="cut.nii.gz.*truncated"):
        open_image(tmp_path / "cut.nii.gz")
    with pytest.raises(DataError, match="cut.nii.gz.*truncated"):
        open_label(tmp_path / "cut.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"nonsense" * 10))
    with pytest.raises(DataError, match="bad.nii.gz"):
        open_image(tmp_path / "bad.nii.gz")
    np.save(tmp_path / "hwc.npy", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="hwc.npy.*channels-first"):
        open_image(tmp_path / "hwc.npy")


def test_label_geometry_and_values(tmp_path, wsi):
    img = wsi.parent / "slide_000.tiff"
    write_pyramid_from_array(tmp_path / "small_mask.tiff", np.zeros((640, 999), np.uint8), tile=128)
    with pytest.raises(DataError, match=r"small_mask\.tiff.*\(640, 999\).*\(640, 1000\).*slide_000\.tiff"):
        open_case(CaseSpec("x", [img], tmp_path / "small_mask.tiff", "train"))
    bad = np.zeros(SIZE, np.uint8)
    bad[600:, 900:] = 7
    write_pyramid_from_array(tmp_path / "bad_mask.tiff", bad, tile=128)
    case = open_case(CaseSpec("x", [img], tmp_path / "bad_mask.tiff", "train"), num_classes=3)
    with pytest.raises(DataError, match=r"bad_mask\.tiff.*\[7\].*\[0, 3\)"):
        check_labels(case, 3)
    case.label.read((0, 0), (100, 100))  # fine where the values are fine
    with pytest.raises(DataError, match=r"bad_mask\.tiff.*\[7\]"):
        case.label.read((590, 890), (20, 20))
    case = open_case(CaseSpec("x", [img], tmp_path / "bad_mask.tiff", "train"), label_map={0: 0, 1: 1})
    with pytest.raises(DataError, match=r"bad_mask\.tiff.*\[7\] are not in label_map"):
        check_labels(case, 3)
    case = open_case(discover("manifest", manifest=wsi)[0], num_classes=3)
    check_labels(case, 3)
    check_min_size(case, 640)
    with pytest.raises(DataError, match=r"slide_000\.tiff.*\(640, 1000\).*smaller than the patch size"):
        check_min_size(case, 1024)


def test_bad_layouts(tmp_path):
    (tmp_path / "empty.csv").write_text("image,label,split\n")
    with pytest.raises(DataError, match=r"empty\.csv: no cases found"):
        discover("manifest", manifest=tmp_path / "empty.csv")
    (tmp_path / "empty").mkdir()
    for layout in ("paip", "brats"):
        with pytest.raises(DataError, match=r"empty: no cases found"):
            discover(layout, root=tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown layout 'coco'"):
        discover("coco", root=tmp_path)
    (tmp_path / "bad.csv").write_text("image,split\na.png,training\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'training'"):
        discover("manifest", manifest=tmp_path / "bad.csv")


def test_unlabelled_folder_is_a_test_set(brats, tmp_path):
    for case in ("BraTS2021_00000", "BraTS2021_00001"):
        shutil.copytree(brats / case, tmp_path / case)
    (tmp_path / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"1 file\(s\) not found: .*BraTS2021_00001_seg\.nii\.gz"):
        discover("brats", root=tmp_path)
    (tmp_path / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    specs = discover("brats", root=tmp_path)
    assert [(s.label, s.split) for s in specs] == [(None, "test"), (None, "test")]
