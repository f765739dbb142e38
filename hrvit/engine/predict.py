"""`hrvit predict`: full-resolution labels for new images, in the input's own format, plus a PNG overlay.

Slides get a tiled label pyramid written tile by tile from the tokens' labels (never a full-resolution array),
with the slide's microns per pixel, so OpenSlide and QuPath open it over the slide; volumes a NIfTI file with
the input's affine; other images a PNG. Every file is written under a temporary name and renamed. With
eval.overlap > 0 the windows overlap and their probabilities are blended (hrvit/engine/infer.py blend_bands);
`--probabilities` adds per-class probability maps (probability_files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hrvit.config import Config, check_writable_dir
from hrvit.data.datasets import BRATS_LABEL_MAP, Case, CaseSpec, physical_scale
from hrvit.data.sources import (
    NIFTI_SUFFIXES,
    PICTURE_SUFFIXES,
    SLIDE_SUFFIXES,
    TIFF_SUFFIXES,
    SlideSource,
    VolumeSource,
    open_image,
    suffix,
    write_nifti,
)
from hrvit.data.tiff import write_label_pyramid
from hrvit.engine.infer import DenseLabels, LabelMap, picture_grid, picture_image, predict_dense, predict_labels
from hrvit.engine.picture import write_picture
from hrvit.engine.trainer import load_weights
from hrvit.errors import DataError


def _stem(path: Path) -> str:
    return path.name[: -len(suffix(path))] if suffix(path) else path.stem


def _stored_values(cfg: Config, pred: np.ndarray) -> np.ndarray:
    """Classes back to the label values the dataset stores (BraTS: 3 -> 4)."""
    if cfg.data.layout != "brats":
        return pred
    lut = np.zeros(max(BRATS_LABEL_MAP.values()) + 1, np.uint8)
    for stored, cls in BRATS_LABEL_MAP.items():
        lut[cls] = stored
    return lut[pred]


IMAGE_SUFFIXES = (*SLIDE_SUFFIXES, *TIFF_SUFFIXES, *NIFTI_SUFFIXES, *PICTURE_SUFFIXES, ".npy")


def expand_inputs(items: list[str]) -> list[list[Path]]:
    """`hrvit predict --input` items -> images (each a list of channel files): a file; channel files of one
    image joined with ';' (as in manifests); a folder (its image files, not recursive, skipping `*_mask.*` and
    earlier `*_pred.*` outputs); a glob such as 'slides/*.svs'; a manifest (.csv/.json: its image column, paths
    relative to it). The same file named twice counts once; two different files with one name are refused,
    since their predictions would overwrite each other."""
    from glob import glob

    from hrvit.data.datasets import discover

    def images_in(paths) -> list[list[Path]]:
        keep = [p for p in sorted(paths) if p.is_file() and suffix(p) in IMAGE_SUFFIXES
                and not _stem(p).endswith(("_mask", "_pred"))]
        return [[p] for p in keep]

    images: list[list[Path]] = []
    for item in items:
        path = Path(item)
        if ";" in item:
            found = [[Path(p.strip()) for p in item.split(";") if p.strip()]]
        elif path.is_dir():
            found = images_in(path.iterdir())
        elif any(c in item for c in "*?["):
            found = images_in(Path(p) for p in glob(item))
        elif suffix(path) in (".csv", ".json"):
            found = [spec.image for spec in discover("manifest", manifest=path, allow_outside_root=True)]
        else:
            found = [[path]]
        if not found:
            raise DataError(f"--input {item}: no image found there (looked for {', '.join(IMAGE_SUFFIXES)})")
        for paths in found:
            if missing := [p for p in paths if not p.is_file()]:
                raise DataError(f"--input {item}: {missing[0]} not found")
        images += found
    unique = list({tuple(p.resolve() for p in paths): paths for paths in images}.values())
    names: dict[str, Path] = {}
    for paths in unique:
        if (other := names.setdefault(_stem(paths[0]), paths[0])) != paths[0]:
            raise DataError(f"--input: {other} and {paths[0]} would both be written as {_stem(paths[0])}_pred.*; "
                            "predict them into different --out folders")
    return unique


def predict_files(run: Path, cfg: Config, inputs: list[list[Path]], out: Path, ckpt: str | Path | None = None,
                  probabilities: bool = False) -> list[Path]:
    """Predict each input (one path, or one per channel) with the run's newest complete checkpoint, or `ckpt`
    (a tag or folder, see checkpoint.choose), and write prediction and overlay (with `probabilities`, also the
    probability maps) into `out`; the model runs on the accelerator when there is one. Every input is opened and
    checked against the model before anything is loaded or written."""
    check_writable_dir(out, "--out")
    sources = [open_image(paths if len(paths) > 1 else paths[0], cache=cfg.data.cache_gb,
                          nonfinite=cfg.data.nonfinite) for paths in inputs]
    for source in sources:  # data.mpp: every slide has resolution tags fine enough, before anything is written
        physical_scale(source, cfg.data.mpp)
    if not sources:
        return []
    first = sources[0]
    join = "; give the channel files of one volume as one --input item joined with ';'"
    hint = join if len(inputs[0]) == 1 and suffix(inputs[0][0]) in NIFTI_SUFFIXES else ""
    model = load_weights(run, cfg, len(first.shape), first.channels, ckpt=ckpt, what=str(inputs[0][0]), fix=hint)
    for paths, source in zip(inputs, sources):
        if source.channels != model.encoder.in_chans or len(source.shape) != model.encoder.ndim:
            hint = join if source.channels < model.encoder.in_chans and suffix(paths[0]) in NIFTI_SUFFIXES else ""
            raise DataError(f"{paths[0]}: {len(source.shape)}-D image with {source.channels} channel(s), "
                            f"but the model of {run} takes {model.encoder.ndim}-D images with "
                            f"{model.encoder.in_chans} channel(s){hint}")
    written = []
    for i, (paths, source) in enumerate(zip(inputs, sources)):
        written += predict_image(model, cfg, paths, source, out, probabilities=probabilities,
                                 what=f"predict {i + 1}/{len(inputs)} {_stem(paths[0])}")
    return written


def predict_image(model, cfg: Config, paths: list[Path], source, out: Path, probabilities: bool = False,
                  what: str | None = None) -> list[Path]:
    """One image: labels (windows blended when eval.overlap > 0), written with the overlay PNG, and with
    `probabilities` the per-class probability maps (probability_files). Progress lines every eval.progress_s."""
    case = Case(CaseSpec(_stem(paths[0]), list(paths), None, "test", mpp=cfg.data.mpp), source, None,
                physical_scale(source, cfg.data.mpp))
    run = dict(window=cfg.data.window, patching=cfg.patching, batch=cfg.eval.batch,
               device=next(model.parameters()).device, progress_s=cfg.eval.progress_s, what=what)
    probs = None
    if probabilities:
        labels, probs = predict_dense(model, case, overlap=cfg.eval.overlap, blend=cfg.eval.blend, probabilities=True,
                                      quantize=len(source.shape) == 2, **run)
    else:
        labels = predict_labels(model, case, overlap=cfg.eval.overlap, blend=cfg.eval.blend, **run)
    written = _write_outputs(cfg, out, _stem(paths[0]), source, labels)
    if probs is not None:
        written += _write_probabilities(cfg, out, _stem(paths[0]), source, probs)
    return written


def probability_files(cfg: Config, name: str, source) -> list[str]:
    """File names of the probability maps: a volume's one 4-D NIfTI NAME_prob.nii.gz (float32, x, y, z, class:
    the input's axes and affine, classes last); a 2-D image's one pyramidal TIFF per class, NAME_prob_CLASS.tiff
    (uint8 round(p x 255), single channel, deflate: the label pyramid's layout, levels by nearest, and the slide's
    microns per pixel)."""
    from hrvit.engine.session import class_names

    if len(source.shape) == 3:
        return [f"{name}_prob.nii.gz"]
    safe = ["".join(c if c.isalnum() or c in "-_" else "_" for c in n) for n in class_names(cfg)]
    return [f"{name}_prob_{n}.tiff" for n in safe]


def _write_probabilities(cfg: Config, out: Path, name: str, source, probs: DenseLabels) -> list[Path]:
    """The probability maps of probability_files, each written under a temporary name and renamed; TIFFs tile by
    tile from the (memory-mapped) quantised probabilities."""
    names = probability_files(cfg, name, source)
    if len(source.shape) == 3:
        import nibabel as nib

        affine = np.asarray(getattr(source, "affine", np.eye(4)), np.float64)  # .npy volumes: voxel coordinates

        def nifti(tmp):
            data = np.ascontiguousarray(probs.full().transpose(3, 2, 1, 0), np.float32)  # [K, z, y, x] -> x, y, z, K
            img = nib.Nifti1Image(data, affine)
            img.set_data_dtype(np.float32)
            img.header.set_xyzt_units("mm")
            nib.save(img, tmp)

        return [_atomic(out / names[0], nifti)]
    mpp = slide_mpp(source) if hasattr(source, "read_level") else None
    plane = probs.array
    return [_atomic(out / file, lambda tmp, k=k: write_label_pyramid(
        tmp, source.shape, lambda ys, xs, k=k: np.asarray(plane[k][np.ix_(ys, xs)]), mpp=mpp))
        for k, file in enumerate(names)]


def _write_outputs(cfg: Config, out: Path, name: str, source, labels: LabelMap | DenseLabels) -> list[Path]:
    """The prediction in the input's own format and the overlay PNG, each complete or not there at all."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(source, "read_level"):  # slides (OpenSlide or tifffile): a label pyramid over the slide
        target = _atomic(out / f"{name}_pred.tiff", lambda tmp: write_label_pyramid(
            tmp, source.shape, lambda ys, xs: labels.sample([ys, xs]), mpp=slide_mpp(source)))
    elif isinstance(source, VolumeSource):
        pred = _stored_values(cfg, labels.full())
        target = _atomic(out / f"{name}_pred.nii.gz", lambda tmp: write_nifti(tmp, pred, source.affine, np.uint8))
    else:
        from PIL import Image

        target = _atomic(out / f"{name}_pred.png", lambda tmp: Image.fromarray(labels.full()).save(tmp))
    image = picture_image(source)
    small = labels.sample(picture_grid(source.shape, image.shape[1:]))
    from hrvit.engine.session import class_names

    return [target, _atomic(out / f"{name}_overlay.png",
                            lambda tmp: write_picture(tmp, image, None, small, class_names(cfg)))]


def slide_mpp(source) -> tuple[float, float] | None:
    """(y, x) microns per pixel of a slide (as OpenSlide reads them, else the source's own), so the prediction
    opens at the same scale."""
    if isinstance(source, SlideSource):
        props = source._slide.properties
        x, y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
    else:
        x = y = getattr(source, "mpp", None)
    if not x and not y:
        return None
    return float(y or x), float(x or y)


def _atomic(target: Path, write) -> Path:
    """write(tmp) to a hidden name beside `target`, then rename: a failure never leaves a half-written file
    under the real name (the temporary one is removed). The name keeps target's suffixes, which pick the
    format."""
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
