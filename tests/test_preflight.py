"""Pre-flight data checks (hrvit/data/preflight.py): NaN/Inf pixels, one image in two splits, and an adaptive
token budget no image can fill are refused before a run builds or writes anything, by `hrvit train`/`eval`
(Session.check_data) and reported by `hrvit check-data`."""

import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
from conftest import RECIPE, TINY, hrvit
from PIL import Image

from hrvit.config import load_config
from hrvit.data import write_pyramid_from_array
from hrvit.data.check import check_data
from hrvit.data.preflight import FileCache, cache_path, count_nonfinite
from hrvit.engine.session import check_cases, find_cases
from hrvit.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test gets its own scan cache, so no test is answered by another's (or the user's) cache."""
    monkeypatch.setenv("HRVIT_CACHE_DIR", str(tmp_path / "cache"))


def _with_nonfinite(array: np.ndarray) -> np.ndarray:
    """A copy with one NaN and one Inf, away from the first tile."""
    out = array.astype(np.float32)
    out.flat[out.size - 3] = np.nan
    out.flat[out.size // 2 + 7] = np.inf
    return out


def _nifti(path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _float_slides(root, n=3, nan_case=None) -> str:
    """Float32 2-D images (plain TIFF, which hrvit reads with tifffile) with PNG labels and a manifest
    (train, train, val); case `nan_case` holds one NaN and one Inf."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.random((64, 64), dtype=np.float32)
        label = (image > 0.5).astype(np.uint8)
        if i == nan_case:
            image = _with_nonfinite(image)
        tifffile.imwrite(root / f"img{i}.tif", image)
        Image.fromarray(label).save(root / f"lab{i}.png")
        rows.append({"id": f"case{i}", "image": f"img{i}.tif", "label": f"lab{i}.png",
                     "split": "val" if i == n - 1 else "train"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return str(root / "manifest.csv")


def test_nonfinite_count_streams_every_reader_and_is_cached(tmp_path, monkeypatch):
    """NaN/Inf are counted in float TIFF (one strip, tiles with padded edges), NIfTI and .npy; integer files are
    skipped; an unchanged file (same path, size, mtime) is answered from the cache, a touched one is rescanned."""
    rng = np.random.default_rng(1)
    image = _with_nonfinite(rng.random((100, 90)))
    tifffile.imwrite(tmp_path / "strip.tif", image)
    write_pyramid_from_array(tmp_path / "tiled.tif", image, tile=64)  # deflate tiles, edge tiles padded
    np.save(tmp_path / "array.npy", image[None])
    _nifti(tmp_path / "vol.nii.gz", _with_nonfinite(rng.random((20, 24, 18))))
    _nifti(tmp_path / "vol.nii", _with_nonfinite(rng.random((20, 24, 18))))
    _nifti(tmp_path / "int.nii.gz", np.zeros((8, 8, 8), np.uint16))
    write_pyramid_from_array(tmp_path / "rgb.tif", np.zeros((64, 64, 3), np.uint8), tile=64)
    cache = FileCache()
    for name in ("strip.tif", "tiled.tif", "array.npy", "vol.nii.gz", "vol.nii"):
        assert count_nonfinite(tmp_path / name, cache) == 2, name
    assert count_nonfinite(tmp_path / "int.nii.gz", cache) == 0
    assert count_nonfinite(tmp_path / "rgb.tif", cache) == 0
    cache.save()
    assert cache_path() == tmp_path / "cache" / "preflight.json" and cache_path().is_file()

    strip = tmp_path / "strip.tif"
    stat = strip.stat()
    tifffile.imwrite(strip, np.nan_to_num(image, posinf=0))  # same size; restore the mtime: the cache answers
    os.utime(strip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert count_nonfinite(strip, FileCache()) == 2
    os.utime(strip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert count_nonfinite(strip, FileCache()) == 0

    monkeypatch.setenv("HRVIT_CACHE_DIR", str(strip))  # a file, so the cache folder cannot be made
    unwritable = FileCache()
    assert count_nonfinite(tmp_path / "vol.nii", unwritable) == 2
    unwritable.save()  # silently skipped


def test_nan_in_one_channel_of_a_validation_case_names_that_file(tmp_path):
    """A NaN in the second channel file of a validation volume is refused before training, naming that file and
    the count; `check-data` lists it as a row (instead of crashing in torch.histc)."""
    rng = np.random.default_rng(2)
    rows = []
    for i, split in enumerate(("train", "train", "val")):
        for ch in "ab":
            volume = rng.random((24, 24, 24)).astype(np.float32) + 0.5
            _nifti(tmp_path / f"c{i}_{ch}.nii.gz", _with_nonfinite(volume) if (i, ch) == (2, "b") else volume)
        _nifti(tmp_path / f"c{i}_seg.nii.gz", (rng.random((24, 24, 24)) > 0.5).astype(np.uint8))
        rows.append(f"c{i},c{i}_a.nii.gz;c{i}_b.nii.gz,c{i}_seg.nii.gz,{split}")
    (tmp_path / "manifest.csv").write_text("id,image,label,split\n" + "\n".join(rows) + "\n")
    cfg = load_config(RECIPE, [*TINY, f"data.manifest={tmp_path / 'manifest.csv'}", "data.num_classes=2",
                               "data.class_names=null"])
    with pytest.raises(DataError, match=r"c2_b\.nii\.gz: 2 non-finite value\(s\) \(NaN or Inf\).* case c2"):
        check_cases(cfg, find_cases(cfg))
    rows, cases = check_data(cfg)
    assert cases == 3
    assert [(r["case"], r["split"]) for r in rows] == [("c2", "val")]
    assert "c2_b.nii.gz: 2 non-finite" in rows[0]["problem"]


def test_train_refuses_nan_image_before_writing(tmp_path):
    """End to end: `hrvit train` on float TIFFs with a NaN stops with one line naming the file and the count,
    exit status 2, and no run folder."""
    manifest = _float_slides(tmp_path / "data", nan_case=1)
    run = tmp_path / "run"
    proc = hrvit("train", RECIPE, *TINY, f"data.manifest={manifest}", f"output.dir={run}", "data.num_classes=2",
                 "data.class_names=null", "train.steps=2", check=False,
                 env={"HRVIT_CACHE_DIR": str(tmp_path / "cache")})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hrvit train: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "img1.tif: 2 non-finite value(s)" in lines[0], proc.stderr[-3000:]
    assert not run.exists()


def test_same_image_in_two_splits_is_refused(slides, tmp_path):
    """The same slide under a second id in the validation split is refused (same file or byte-identical copy),
    naming both ids and files, unless data.allow_split_overlap=true."""
    root = tmp_path / "slides"
    shutil.copytree(slides.parent, root)
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = next(r for r in rows if r["split"] == "train")
    shutil.copyfile(root / train["image"], root / "copy.tif")
    for extra, how in ((train["image"], "the same file"), ("copy.tif", "byte-identical files")):
        with open(root / "overlap.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["id", *rows[0]])
            writer.writeheader()
            writer.writerows([*rows, {**train, "id": "again", "image": extra, "split": "val"}])
        overrides = [*TINY, f"data.manifest={root / 'overlap.csv'}"]
        cfg = load_config(RECIPE, overrides)
        train_id = find_cases(cfg)[rows.index(train)].id
        with pytest.raises(DataError) as err:
            check_cases(cfg, find_cases(cfg))
        message = str(err.value)
        assert f"case {train_id} (train: " in message and "case again (val: " in message and how in message
        assert extra in message and "data.allow_split_overlap=true" in message
        assert any(r["case"] == "again" and how in r["problem"] for r in check_data(cfg)[0])
    cfg = load_config(RECIPE, [*overrides, "data.allow_split_overlap=true"])
    assert check_cases(cfg, find_cases(cfg)) == (2, 3)


def test_token_budget_above_the_most_leaves_is_refused(volumes):
    """patching.tokens above the most leaves a 24^3 volume can have ((24/8)^3 = 27 at patch 8; 8 inside a 16^3
    window) is a ConfigError naming the key, the value, the image and the maximum; the maximum itself passes."""
    base = [*TINY, "data.layout=brats", f"data.root={volumes}", "data.num_classes=4", "data.class_names=null",
            "patching.mode=adaptive", "patching.patch_size=8"]
    for extra, most in ((["data.window=null"], 27), (["data.window=16"], 8),
                        (["data.window=null", "patching.min_leaf=16"], 8)):
        cfg = load_config(RECIPE, [*base, *extra, "patching.tokens=100000"])
        specs = find_cases(cfg)
        with pytest.raises(ConfigError, match=rf"patching.tokens: 100000 is more than the {most} leaves .*"
                                              rf"{specs[0].id}_t1\.nii\.gz.* at most {most}$"):
            check_cases(cfg, specs)
        cfg = load_config(RECIPE, [*base, *extra, f"patching.tokens={most}"])
        assert check_cases(cfg, specs) == (3, 4)
    rows, _ = check_data(load_config(RECIPE, [*base, "data.window=null", "patching.tokens=100000"]))
    assert [r["case"] for r in rows] == ["-"] and "patching.tokens: 100000" in rows[0]["problem"]
