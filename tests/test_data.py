"""hrvit.data on real files: pyramids through openslide, labels by tile, NIfTI, layouts, bad input."""

from __future__ import annotations

import gzip
import json
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
