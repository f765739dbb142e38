"""`hrvit predict`: full-resolution labels for new images, in the input's own format, plus a PNG overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hrvit.config import Config, check_writable_dir
from hrvit.data.datasets import BRATS_LABEL_MAP, Case, CaseSpec
from hrvit.data.sources import SlideSource, VolumeSource, open_image, suffix, write_nifti
from hrvit.data.tiff import write_pyramid_from_array
from hrvit.engine.infer import predict_case
from hrvit.engine.picture import read_for_picture, write_picture
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


def predict_files(run: Path, cfg: Config, inputs: list[list[Path]], out: Path, ckpt: str | Path | None = None
                  ) -> list[Path]:
    """Predict each input (one path, or one per channel) with the run's newest complete checkpoint, or `ckpt`
    (a tag or folder, see checkpoint.choose), and write prediction and overlay into `out`; the model runs on the
    accelerator when there is one. Every input is opened and checked against the model before anything is
    loaded or written."""
    check_writable_dir(out, "--out")
    sources = [open_image(paths if len(paths) > 1 else paths[0]) for paths in inputs]
    if not sources:
        return []
    first = sources[0]
    model = load_weights(run, cfg, len(first.shape), first.channels, ckpt=ckpt, what=str(inputs[0][0]))
    for paths, source in zip(inputs, sources):
        if source.channels != model.encoder.in_chans or len(source.shape) != model.encoder.ndim:
            raise DataError(f"{paths[0]}: {len(source.shape)}-D image with {source.channels} channel(s), "
                            f"but the model of {run} takes {model.encoder.ndim}-D images with "
                            f"{model.encoder.in_chans} channel(s)")
    written = []
    for paths, source in zip(inputs, sources):
        case = Case(CaseSpec(_stem(paths[0]), list(paths), None, "test"), source, None)
        pred = predict_case(model, case, window=cfg.data.window, patching=cfg.patching,
                            batch=cfg.eval.batch, device=next(model.parameters()).device)
        out.mkdir(parents=True, exist_ok=True)
        name = _stem(paths[0])
        if isinstance(source, SlideSource):
            target = write_pyramid_from_array(out / f"{name}_pred.tiff", pred)
        elif isinstance(source, VolumeSource):
            target = write_nifti(out / f"{name}_pred.nii.gz", _stored_values(cfg, pred), source.affine, np.uint8)
        else:
            from PIL import Image

            target = out / f"{name}_pred.png"
            Image.fromarray(pred).save(target)
        written += [target, write_picture(out / f"{name}_overlay.png", read_for_picture(source), None, pred)]
    return written
