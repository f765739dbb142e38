"""3-D volumes as they come (issue 13): the decoded-volume cache, NaN/Inf voxels, BraTS region Dice and bad
volumes refused before a run writes anything. Fixtures are gzip NIfTI written here, with 5 mm slices and
non-identity affines, in the BraTS-2021 layout."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from conftest import RECIPE, TINY, hrvit

from hrvit.config import PatchingConfig, dice_regions, load_config
from hrvit.data.datasets import discover, open_case
from hrvit.data.sources import VOLUME_CACHE, VolumeSource
from hrvit.data.windows import TrainWindows
from hrvit.engine.metrics import dice_counts, summarize
from hrvit.engine.session import check_cases, find_cases
from hrvit.errors import ConfigError, DataError
from hrvit.patching import IGNORE_INDEX

CHANNELS = ("t1", "t1ce", "t2", "flair")
SHAPE = (40, 36, 12)  # nibabel (i, j, k): hrvit (z, y, x) = (12, 36, 40), 5 mm slices along z
AFFINE = np.array([[-0.9, 0.0, 0.0, 18.0], [0.0, 0.0, 5.0, -30.0], [0.0, 0.9, 0.0, -16.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Each test gets its own pre-flight scan cache and an empty decoded-volume cache, left as it found it."""
    monkeypatch.setenv("HRVIT_CACHE_DIR", str(tmp_path / "scan-cache"))
    budget = VOLUME_CACHE.budget
    VOLUME_CACHE.clear()
    yield
    VOLUME_CACHE.clear()
    VOLUME_CACHE.resize(budget)


def write_case(root, name, seed, *, nan=0, dtype=np.int16, empty=None, four_d=None, shape_of=None, affine_of=None,
               seg_affine=None):
    """One BraTS-layout case: a bright ellipsoid with a tumour of labels 1, 2 and 4 (BraTS values). nan: NaN voxels
    in t2 (then float32); empty: a channel that is all zeros; four_d: a channel stored as (i, j, k, 2); shape_of /
    affine_of: a channel on another grid; seg_affine: the label's affine."""
    rng = np.random.default_rng(seed)
    case = root / name
    case.mkdir(parents=True)
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    head = i**2 + j**2 + k**2 < 0.9
    c = rng.uniform(-0.2, 0.2, 3)
    r = np.sqrt((i - c[0]) ** 2 + (j - c[1]) ** 2 + (k - c[2]) ** 2)
    seg = (np.where(r < 0.2, 4, np.where(r < 0.35, 1, np.where(r < 0.55, 2, 0))) * head).astype(np.uint8)
    for m, ch in enumerate(CHANNELS):
        volume = (300 + 100 * m + 200 * (seg > 0) + rng.normal(0, 20, SHAPE)) * head
        volume = volume.astype(np.float32 if (nan and ch == "t2") else dtype)
        if nan and ch == "t2":
            volume.flat[rng.choice(volume.size, nan, replace=False)] = np.nan
        if ch == empty:
            volume = np.zeros_like(volume)
        if ch == four_d:
            volume = np.stack([volume, volume], -1)
        if ch == shape_of:
            volume = volume[:-2]
        nib.save(nib.Nifti1Image(volume, AFFINE * (1.1 if ch == affine_of else 1.0)), case / f"{name}_{ch}.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE if seg_affine is None else seg_affine), case / f"{name}_seg.nii.gz")
    return case


def brats(root, n=3, **bad):
    """n cases, the last one made bad as `bad` says."""
    for c in range(n):
        write_case(root, f"BraTS2021_{c:05d}", c, **(bad if c == n - 1 else {}))
    return root


# --- the decoded-volume cache -------------------------------------------------------------------------------------


def test_cached_reads_equal_file_reads_and_evict_least_recently_used(tmp_path):
    """A cached case reads exactly what the file gives (inside, across the edge, with 5 mm slices); the budget keeps
    the most recently used cases and evicts the oldest; a rewritten file is decoded again, not served stale."""
    root = brats(tmp_path / "b", n=3)
    specs = discover("brats", root=root)
    plain = [open_case(s, num_classes=4) for s in specs]
    per_case = sum(np.prod(SHAPE) * 2 for _ in CHANNELS) + np.prod(SHAPE)  # int16 channels + uint8 label
    cached = [open_case(s, num_classes=4, cache_gb=2 * per_case / 2**30) for s in specs]  # room for two cases
    for a, b in zip(plain, cached):
        for start, size in (((0, 0, 0), (12, 36, 40)), ((3, 5, 7), (6, 20, 16)), ((-2, 30, 35), (8, 10, 10))):
            np.testing.assert_array_equal(b.image.read(start, size), a.image.read(start, size))
            np.testing.assert_array_equal(b.label.read(start, size), a.label.read(start, size))
    assert VOLUME_CACHE.misses == 15 and VOLUME_CACHE.nbytes <= VOLUME_CACHE.budget
    kept = {key[0] for key in VOLUME_CACHE._items}
    assert not any(specs[0].id in k for k in kept) and any(specs[2].id in k for k in kept)  # oldest case evicted
    cached[2].image.read((0, 0, 0), (4, 4, 4))
    assert VOLUME_CACHE.misses == 15  # still in memory
    t1 = specs[2].image[0]
    data = np.asanyarray(nib.load(t1).dataobj) + 7
    nib.save(nib.Nifti1Image(data, AFFINE), t1)
    again = open_case(specs[2], num_classes=4, cache_gb=1)
    assert again.image.read((0, 0, 0), (12, 36, 40))[0].std() > 0 and VOLUME_CACHE.misses == 16


def test_training_windows_decode_each_case_once(tmp_path):
    """With data.cache_gb, every file of a case is decompressed once however many windows are drawn from it (the
    foreground scan of the label included); without it, nothing is kept."""
    specs = discover("brats", root=brats(tmp_path / "b", n=2), val_fraction=0.0)
    patching = PatchingConfig(mode="uniform", patch_size=8)
    for cache_gb, misses in ((0, 0), (1.0, 10)):
        VOLUME_CACHE.clear()
        dataset = TrainWindows(specs, window=16, patching=patching, seed=0, foreground_bias=0.5, augment=True,
                               cache_gb=cache_gb)
        for k in range(12):
            seq = dataset[k]
            assert seq.pixels.shape[1:3] == (4, 8) and seq.target is not None
        assert VOLUME_CACHE.misses == misses and len(VOLUME_CACHE._items) == misses


# --- NaN/Inf voxels ----------------------------------------------------------------------------------------------


def test_nonfinite_voxels_refused_on_read_or_read_as_zero(tmp_path):
    """Read directly (as `hrvit predict` does), a volume with NaNs raises one DataError naming the file and the
    count, cached or not; with nonfinite="zero" those voxels read as 0 and everything else is finite."""
    case = write_case(tmp_path, "c", 0, nan=37)
    paths = [case / f"c_{ch}.nii.gz" for ch in CHANNELS]
    for cache in (False, True):
        zero = VolumeSource(paths, cache=cache, nonfinite="zero").read((0, 0, 0), (12, 36, 40))
        raw = np.asanyarray(nib.load(paths[2]).dataobj).transpose(2, 1, 0)
        assert np.isfinite(zero).all() and (zero[2][np.isnan(raw)] == 0).all()
        assert abs(zero[2][raw > 0].mean()) < 0.05  # normalised over the finite voxels only
        # after the zeroed copy was cached, a reader with the default option still meets the NaNs
        with pytest.raises(DataError, match=r"c_t2\.nii\.gz: 37 non-finite voxel\(s\).*data\.nonfinite=zero"):
            VolumeSource(paths, cache=cache).read((0, 0, 0), (12, 36, 40))


# --- region Dice -------------------------------------------------------------------------------------------------


def test_region_counts_are_counts_of_the_union_and_add_up_by_block():
    """A region's counts are those of the union of its classes (here brute-forced), which per-class counts cannot
    give: a tumour voxel predicted as another tumour class is right for WT and wrong for every class. Counts of
    blocks add up to the whole's."""
    rng = np.random.default_rng(0)
    truth = rng.integers(IGNORE_INDEX, 4, (10, 30, 30))
    pred = np.where(rng.random(truth.shape) < 0.3, rng.integers(0, 4, truth.shape), truth.clip(0))
    regions = dice_regions(load_config(RECIPE, ["data.layout=brats", "data.root=.", "data.num_classes=4",
                                                "data.class_names=null"]).data)
    assert regions == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    counts = dice_counts(pred, truth, 4, list(regions.values()))
    assert counts.shape == (3, 7)
    np.testing.assert_array_equal(counts[:, :4], dice_counts(pred, truth, 4))
    kept = truth != IGNORE_INDEX
    for r, members in enumerate(regions.values()):
        p, t = np.isin(pred, members) & kept, np.isin(truth, members) & kept
        assert counts[:, 4 + r].tolist() == [(p & t).sum(), p.sum(), t.sum()]
    blocks = sum(dice_counts(pred[z:z + 3], truth[z:z + 3], 4, list(regions.values())) for z in range(0, 10, 3))
    np.testing.assert_array_equal(blocks, counts)
    swapped = dice_counts(np.array([1, 2, 0]), np.array([2, 1, 0]), 4, list(regions.values()))
    result = summarize({"a": swapped}, ["bg", "NCR", "ED", "ET"], list(regions))
    assert result["dice_per_class"]["NCR"] == 0 and result["dice_per_region"]["WT"] == 1.0
    assert result["dice_per_region_per_case"] == {"a": {"WT": 1.0, "TC": 0.0, "ET": None}}


@pytest.mark.parametrize("override, message", [
    ("data.regions={WT: [1, 2, 5]}", r"data\.regions\.WT: classes \[5\] are outside \[0, 4\)"),
    ("data.regions={TC: []}", r"data\.regions\.TC: \[\]; expected a non-empty list"),
    ("data.regions={ET: three}", r"data\.regions\.ET: 'three'; expected a non-empty list"),
    ("data.num_classes=3", r"data\.regions\.WT: classes \[3\] are outside \[0, 3\).*brats layout's default"),
])
def test_bad_regions_are_refused_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, ["data.layout=brats", "data.root=.", "data.num_classes=4", "data.class_names=null",
                             override])


# --- bad volumes, end to end -------------------------------------------------------------------------------------

BAD = {
    "four_d": ({"four_d": "t1ce"}, r"_t1ce\.nii\.gz: expected a 3-D volume \(one channel per file\), got shape "
                                   r"\(40, 36, 12, 2\)"),
    "channel_shape": ({"shape_of": "t2"}, r"_t2\.nii\.gz: shape \(38, 36, 12\) does not match the shape "
                                          r"\(40, 36, 12\) of .*_t1\.nii\.gz"),
    "channel_affine": ({"affine_of": "flair"}, r"_flair\.nii\.gz: affine does not match the affine of "
                                               r".*_t1\.nii\.gz"),
    "label_affine": ({"seg_affine": np.diag([1.0, 1.0, 5.0, 1.0])},
                     r"_seg\.nii\.gz: label affine does not match the affine of .*_t1\.nii\.gz.*image's voxel grid"),
    "empty": ({"empty": "t1"}, r"_t1\.nii\.gz: every voxel is 0 \(an empty volume\)"),
    "nan": ({"nan": 5}, r"_t2\.nii\.gz: 5 non-finite value\(s\) \(NaN or Inf\).*data\.nonfinite=zero"),
}


def _config(root, run, *more):
    return [*TINY, "data.layout=brats", f"data.root={root}", "data.num_classes=4", "data.class_names=null",
            f"output.dir={run}", *more]


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_volume_is_refused_by_the_pre_run_checks(tmp_path, kind):
    """Each bad volume of one case is refused by the checks `hrvit train`, `eval` and `check-data` run before
    anything is built (Session.check_data -> check_cases), naming the file and what was expected."""
    bad, message = BAD[kind]
    cfg = load_config(RECIPE, _config(brats(tmp_path / "b", **bad), tmp_path / "run"))
    with pytest.raises(DataError, match=message) as err:
        check_cases(cfg, find_cases(cfg))
    assert "BraTS2021_00002" in str(err.value)


@pytest.mark.parametrize("kind", ["nan"])  # the other bad volumes: test_bad_volume_is_refused_by_the_pre_run_checks
def test_bad_volume_stops_hrvit_train_before_the_run_folder(tmp_path, kind):
    """End to end (the other kinds take the same path): one line naming the file, exit status 2, no run folder.
    ~5 s each on an idle machine."""
    bad, message = BAD[kind]
    run = tmp_path / "run"
    proc = hrvit("train", RECIPE, *_config(brats(tmp_path / "b", **bad), run, "train.steps=1"), check=False,
                 env={"HRVIT_CACHE_DIR": str(tmp_path / "scan-cache")})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("hrvit train: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and re.search(message, lines[0]) and "BraTS2021_00002" in lines[0], proc.stderr[-3000:]
    assert not run.exists()


def test_nan_voxels_read_as_zero_train_and_regions_are_scored(tmp_path):
    """data.nonfinite=zero trains on a BraTS folder with NaN voxels and counts them per case in summary.json;
    WT/TC/ET Dice per region, per case and their mean sit next to the per-class Dice in summary.json, in `hrvit
    eval`'s eval_val.json and its printed score; `hrvit predict` of a NaN volume with the default option is refused
    naming the file and the count. One short training run (~40 s on two shared cores)."""
    root = tmp_path / "b"
    for c in range(3):  # every case, so training windows meet NaNs too
        write_case(root, f"BraTS2021_{c:05d}", c, nan=11)
    run = tmp_path / "run"
    env = {"HRVIT_CACHE_DIR": str(tmp_path / "scan-cache")}
    hrvit("train", RECIPE, *_config(root, run, "data.class_names=[bg, NCR, ED, ET]", "train.steps=2",
                                    "data.nonfinite=zero", "output.picture=false"), env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nonfinite_voxels"] == {f"BraTS2021_{c:05d}": 11 for c in range(3)}
    assert summary["nonfinite_voxels_total"] == 33 and summary["bad_steps"] == 0 and np.isfinite(summary["final_loss"])
    assert set(summary["dice_per_region"]) == {"WT", "TC", "ET"} and set(summary["dice_per_class"]) == {
        "bg", "NCR", "ED", "ET"}
    assert len(summary["dice_per_region_per_case"]) == summary["eval_cases"] == 1
    proc = hrvit("eval", str(run), env=env)
    result = json.loads((run / "eval_val.json").read_text())
    assert result["dice_per_region"] == summary["dice_per_region"] and "per region {'WT'" in proc.stdout
    case = root / "BraTS2021_00002"
    channels = ";".join(str(case / f"BraTS2021_00002_{ch}.nii.gz") for ch in CHANNELS)
    proc = hrvit("predict", str(run), "data.nonfinite=error", "--input", channels, "--out", str(tmp_path / "pred"),
                 check=False, env=env)
    assert proc.returncode == 2 and "BraTS2021_00002_t2.nii.gz: 11 non-finite voxel(s)" in proc.stderr, proc.stderr
    # the channels of one case given as separate inputs: one message saying to join them; joined, the prediction
    # keeps the scan's affine and is written back in BraTS's stored values (4, not 3)
    proc = hrvit("predict", str(run), "data.nonfinite=zero", "--input", *channels.split(";"), "--out",
                 str(tmp_path / "sep"), check=False, env=env)
    assert proc.returncode == 2 and "joined with ';'" in proc.stderr, proc.stderr[-1000:]
    hrvit("predict", str(run), "data.nonfinite=zero", "--input", channels, "--out", str(tmp_path / "pred"), env=env)
    pred = nib.load(next((tmp_path / "pred").glob("*_pred.nii.gz")))
    ref = nib.load(channels.split(";")[0])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2, 4}
