"""Dataset layouts -> a list of cases; opening and validating a case.

Layouts:
- "manifest": CSV (columns image, label, split; optional id; optional target = image-level class
  for task classify) or JSON (a list of {"image", "label",
  "split", "id"}); image may hold several paths separated by ';' (or a JSON list), one per channel.
  Paths are relative to the manifest's folder and must stay inside it (no '..' or absolute path
  leading out) unless allow_outside_root: a manifest from elsewhere cannot make a run read any file.
  Rows without a split get one from assign_splits.
- "paip": a folder of <case>.(svs|tif|tiff) slides with <case>_mask.tif(f) whole-tumour masks
  (PAIP-2019 style; <case>_whole.tif is accepted too). Splits from assign_splits.
- "brats": <root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS-2021); channels in that order.
  BraTS labels {0, 1, 2, 4} are mapped to classes {0, 1, 2, 3} automatically (CaseSpec.label_map).

In "paip" and "brats", a folder without any label files is an unlabelled (test) set; some missing
labels among labelled cases is an error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hrvit.data.sources import LabelSource, Source, open_image, open_label, suffix
from hrvit.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
LAYOUTS = ("manifest", "paip", "brats")
BRATS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 4: 3}
BRATS_CHANNELS = ("t1", "t1ce", "t2", "flair")


@dataclass
class CaseSpec:
    id: str
    image: list[Path]  # one path, or one per channel (BraTS)
    label: Path | None
    split: str  # "train" | "val" | "test"
    label_map: dict[int, int] | None = None  # raw stored value -> class, applied on reading
    target: int | None = None  # image-level class (task: classify), from a manifest's 'target' column
    nonfinite: str = "error"  # NaN/Inf voxels: "error" (refused by preflight.check_finite) or "zero" (read as 0)
    mpp: float | None = None  # working resolution (data.mpp) in microns per pixel; None = level-0 pixels


@dataclass
class Case:
    spec: CaseSpec
    image: Source
    label: LabelSource | None
    scale: float = 1.0  # level-0 pixels per working pixel (physical_scale); boxes stay in level-0 pixels


def physical_scale(image: Source, mpp: float | None) -> float:
    """Level-0 pixels per working pixel for data.mpp = `mpp` (1.0 without it). DataError when the image is not a
    2-D slide, has no resolution tags, or is coarser than `mpp`."""
    if mpp is None:
        return 1.0
    own = getattr(image, "mpp", None)
    if image.ndim != 2:
        raise DataError(f"{image.path}: data.mpp sets the resolution of 2-D slides; this is a {image.ndim}-D image")
    if not own or not hasattr(image, "read_level"):
        raise DataError(f"{image.path}: data.mpp={mpp:g} needs the slide's resolution, but the file has no "
                        "resolution tags (openslide.mpp-x or TIFF XResolution in centimetres or inches); add them "
                        "or leave data.mpp unset")
    if own > mpp * 1.01:
        raise DataError(f"{image.path}: scanned at {own:g} microns per pixel, coarser than data.mpp={mpp:g}; hrvit "
                        f"does not upsample slides: set data.mpp to {own:g} or more")
    return max(1.0, mpp / own)


def assign_splits(ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic train/val split: a seeded permutation of the sorted ids; at least one of each when possible."""
    ids = sorted(ids)
    n_val = round(val_fraction * len(ids))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in order[:n_val]}
    return {i: "val" if i in val else "train" for i in ids}


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(suffix(path))] if suffix(path) else name


def _missing(specs: list[CaseSpec], where: Path) -> None:
    missing = [p for s in specs for p in [*s.image, s.label] if p is not None and not p.is_file()]
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{where}: {len(missing)} file(s) not found: {', '.join(map(str, missing[:10]))}{more}")


def _read_manifest(manifest: Path) -> list[dict]:
    if not manifest.is_file():
        from hrvit.config import where_looked

        raise DataError(f"{manifest}: manifest not found{where_looked(manifest)}")
    try:
        if suffix(manifest) == ".json":
            rows = json.loads(manifest.read_text(encoding="utf-8-sig"))
            rows = rows.get("cases", rows) if isinstance(rows, dict) else rows
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise DataError(f'{manifest}: expected a JSON list of {{"image": ..., "label": ..., "split": ...}}')
            return rows
        with open(manifest, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            # 'image, label, split' (spaces after the commas) means the columns image, label and split
            rows = [{(k or "").strip(): v.strip() if isinstance(v, str) else v for k, v in row.items()}
                    for row in reader]
            columns = [name.strip() for name in reader.fieldnames or []]
            if rows and "image" not in columns:
                raise DataError(f"{manifest}: CSV needs an 'image' column, found {columns}")
            return rows
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{manifest}: cannot parse manifest ({e})") from None


def _inside(base: Path, relative: str, manifest: Path, n: int, allow_outside: bool) -> Path:
    """`relative` resolved against the manifest's folder; DataError if it leads outside that folder."""
    path = base / relative
    if not allow_outside and not path.resolve().is_relative_to(base.resolve()):
        raise DataError(f"{manifest}: case {n} path {relative!r} resolves outside the dataset root {base.resolve()}; "
                        "move the file under it or set data.allow_outside_root=true")
    return path


def _from_manifest(manifest: Path, val_fraction: float, seed: int, allow_outside: bool = False) -> list[CaseSpec]:
    base = manifest.parent
    specs, unsplit = [], []
    for n, row in enumerate(_read_manifest(manifest), start=1):
        image = row.get("image") or ""
        parts = image if isinstance(image, list) else [p.strip() for p in str(image).split(";") if p.strip()]
        if not parts:
            raise DataError(f"{manifest}: case {n} has no image")
        label = str(row.get("label") or "").strip()
        split = str(row.get("split") or "").strip().lower()
        if split and split not in SPLITS:
            raise DataError(f"{manifest}: case {n} has split {split!r}; expected one of {', '.join(SPLITS)}")
        images = [_inside(base, p, manifest, n, allow_outside) for p in parts]
        case_id = str(row.get("id") or "").strip() or _stem(images[0])
        target = str(row.get("target") if row.get("target") is not None else "").strip()
        if target and not target.lstrip("-").isdigit():
            raise DataError(f"{manifest}: case {n} has target {target!r}; expected an integer class")
        specs.append(CaseSpec(case_id, images, _inside(base, label, manifest, n, allow_outside) if label else None,
                              split,
                              target=int(target) if target else None))
        if not split:
            unsplit.append(case_id)
    ids = [s.id for s in specs]
    if dup := sorted({i for i in ids if ids.count(i) > 1}):
        raise DataError(f"{manifest}: duplicate case ids {dup[:10]}; add an 'id' column")
    splits = assign_splits(unsplit, val_fraction, seed)
    for s in specs:
        s.split = s.split or splits[s.id]
    return specs


def _labels_all_or_none(specs: list[CaseSpec]) -> list[CaseSpec]:
    """Unlabelled folder -> test set; partly labelled -> name the missing labels."""
    if not any(s.label.is_file() for s in specs):
        for s in specs:
            s.label, s.split = None, "test"
    return specs


def _from_paip(root: Path, val_fraction: float, seed: int) -> list[CaseSpec]:
    specs = []
    for p in sorted(root.iterdir()):
        if suffix(p) not in (".svs", ".tif", ".tiff") or p.stem.endswith(("_mask", "_whole", "_viable")):
            continue
        masks = [root / f"{p.stem}{tag}{ext}" for tag in ("_mask", "_whole") for ext in (".tif", ".tiff")]
        label = next((m for m in masks if m.is_file()), masks[0])
        specs.append(CaseSpec(p.stem, [p], label, ""))
    specs = _labels_all_or_none(specs)
    splits = assign_splits([s.id for s in specs], val_fraction, seed)
    for s in specs:
        s.split = s.split or splits[s.id]
    return specs


def _from_brats(root: Path, val_fraction: float, seed: int) -> list[CaseSpec]:
    specs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        images = [d / f"{d.name}_{c}.nii.gz" for c in BRATS_CHANNELS]
        specs.append(CaseSpec(d.name, images, d / f"{d.name}_seg.nii.gz", "", dict(BRATS_LABEL_MAP)))
    specs = _labels_all_or_none(specs)
    splits = assign_splits([s.id for s in specs], val_fraction, seed)
    for s in specs:
        s.split = s.split or splits[s.id]
    return specs


def discover(
    layout: str,
    root: Path | None = None,
    manifest: Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    allow_outside_root: bool = False,
    require_files: bool = True,
) -> list[CaseSpec]:
    """List the cases of a dataset; every listed file exists (else DataError naming up to 10 of them)
    unless require_files is False (check-data reports missing files per case instead)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"data.layout: unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "manifest":
        if manifest is None:
            if root is None:
                raise ConfigError("data.manifest: the manifest layout needs a manifest (or a root with manifest.csv)")
            found = [Path(root) / f for f in ("manifest.csv", "manifest.json") if (Path(root) / f).is_file()]
            manifest = found[0] if found else Path(root) / "manifest.csv"
        where = Path(manifest)
        specs = _from_manifest(where, val_fraction, seed, allow_outside_root)
    else:
        if root is None:
            raise ConfigError(f"data.root: the {layout} layout needs a root folder")
        where = Path(root)
        if not where.is_dir():
            from hrvit.config import where_looked

            raise DataError(f"{where}: dataset folder not found{where_looked(where)}")
        specs = (_from_paip if layout == "paip" else _from_brats)(where, val_fraction, seed)
    if not specs:
        expected = {
            "manifest": "at least one row",
            "paip": "<case>.svs|.tif|.tiff slides with <case>_mask.tif masks",
            "brats": "<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz folders",
        }[layout]
        raise DataError(f"{where}: no cases found (layout {layout!r} expects {expected})")
    if require_files:
        _missing(specs, where)
    return specs


def _level_hint(image, shape) -> str:
    """The likeliest cause of a mask at another size, when its shape is one of the image's reduced levels: it was
    exported from the slide's thumbnail or a pyramid level, which hrvit would otherwise silently misplace."""
    shapes = [tuple(s) for s in getattr(image, "level_shapes", [])]
    if tuple(shape) not in shapes[1:]:
        return ""
    i = shapes.index(tuple(shape), 1)
    return (f"; it is the size of level {i} of the image (downsample {image.level_downsamples[i]:g}); "
            "label masks must be at level-0 resolution")


def open_case(spec: CaseSpec, num_classes: int | None = None, label_map: dict[int, int] | None = None,
              cache_gb: float = 0, nonfinite: str | None = None) -> Case:
    """Open image and label and check they share one grid; labels are read through label_map
    (argument, else spec.label_map) and checked against num_classes on every read. NIfTI volumes are decoded
    into this process's cache of `cache_gb` GB (data.cache_gb; 0 = read through the file every time); NaN/Inf
    voxels are handled as `nonfinite` says (else spec.nonfinite)."""
    image = open_image(spec.image, cache=cache_gb, nonfinite=nonfinite or spec.nonfinite)
    label = None
    if spec.label is not None:
        label = open_label(spec.label, cache=cache_gb)
        lmap = label_map if label_map is not None else spec.label_map
        label.label_map = None if lmap is None else {int(k): int(v) for k, v in lmap.items()}
        label.num_classes = num_classes
        if tuple(label.shape) != tuple(image.shape):
            raise DataError(
                f"{spec.label}: label shape {tuple(label.shape)} does not match image shape "
                f"{tuple(image.shape)} of {spec.image[0]}{_level_hint(image, label.shape)}"
            )
        affine = getattr(image, "affine", None)
        label_affine = getattr(label, "affine", affine)
        if affine is not None and not np.allclose(label_affine, affine, atol=1e-3):
            raise DataError(f"{spec.label}: label affine does not match the affine of {spec.image[0]} (largest "
                            f"difference {float(np.abs(label_affine - affine).max()):.4g}); expected the label "
                            "on the image's voxel grid")
    return Case(spec, image, label, physical_scale(image, spec.mpp))


def check_label_given(spec: CaseSpec, eval_split: str) -> None:
    """A segmentation case that is trained or evaluated on needs a label map (task: segment)."""
    if spec.label is None and spec.split in ("train", eval_split):
        raise DataError(f"{spec.image[0]}: {spec.split} case {spec.id} has no label; task: segment trains and "
                        "evaluates on label maps (a 'label' column in the manifest)")


def check_target(spec: CaseSpec, num_classes: int) -> None:
    """An image-level class (task: classify) must be given and lie in [0, num_classes)."""
    if spec.target is None:
        raise DataError(f"{spec.image[0]}: case {spec.id} has no target; task: classify needs a 'target' column "
                        "in the manifest")
    if not 0 <= spec.target < num_classes:
        raise DataError(f"{spec.image[0]}: case {spec.id} has target {spec.target}, outside the "
                        f"data.num_classes={num_classes} classes (0..{num_classes - 1})")


def check_labels(case: Case, num_classes: int) -> None:
    """Scan the whole label map region by region; DataError if a value is outside [0, num_classes) after mapping."""
    label = case.label
    if label is None:
        return
    raw = label.values()
    if raw.size and raw.dtype.kind == "f" and not np.array_equal(raw, np.rint(raw)):
        raise DataError(f"{label.path}: label values must be integers, found {raw[raw != np.rint(raw)][:5].tolist()}")
    raw = raw.astype(np.int64)
    lmap = label.label_map
    if lmap is not None:
        unmapped = [v for v in raw.tolist() if v not in lmap]
        if unmapped:
            raise DataError(f"{label.path}: label values {unmapped[:10]} are not in label_map {lmap}")
        raw = np.array([lmap[v] for v in raw.tolist()], np.int64)
    bad = raw[(raw < 0) | (raw >= num_classes)]
    if bad.size:
        raise DataError(f"{label.path}: label values {bad[:10].tolist()} are outside [0, {num_classes}) "
                        f"(num_classes={num_classes})")


def check_min_size(case: Case, patch_size: int | tuple[int, ...]) -> None:
    """DataError if the image is smaller than one patch in any spatial dimension (a volume: in every dimension; a
    thin scan is one patch thick, padded, as hrvit.patching.uniform.check_extent says)."""
    shape = tuple(case.image.shape)
    ps = (patch_size,) * len(shape) if isinstance(patch_size, int) else tuple(patch_size)
    small = [d < p for d, p in zip(shape, ps)]
    if all(small) if len(shape) == 3 else any(small):
        raise DataError(f"{case.spec.image[0]}: image shape {shape} is smaller than the patch size {ps}")
