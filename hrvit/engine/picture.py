"""A quick-look PNG: image | ground truth | prediction, for 2-D images and mid-slices of volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)
"""Class colours (class 0, background, is black); classes beyond 8 reuse the colours."""

MAX_PIXELS_READ = 16 * 1024 * 1024


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """[C, h, w] float -> [h, w, 3] uint8, stretching each channel to its 1st-99th percentile."""
    if image.shape[0] >= 3:
        chans = image[:3]
    else:
        chans = np.repeat(image[:1], 3, axis=0)
    lo, hi = np.percentile(chans, 1), np.percentile(chans, 99)
    scaled = np.clip((chans - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled.transpose(1, 2, 0) * 255).astype(np.uint8)


def _overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Tint labelled pixels with their class colour; background (0) shows the image as it is."""
    colour = PALETTE[labels.astype(np.int64) % len(PALETTE)]
    tinted = (0.35 * rgb + 0.65 * colour).astype(np.uint8)
    return np.where((labels > 0)[..., None], tinted, rgb)


def write_picture(path: Path, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray,
                  max_edge: int = 768) -> Path:
    """Save panels side by side; 3-D inputs show the middle slice along z. `image` is [C, *S]."""
    if image.ndim == 4:
        z = image.shape[1] // 2
        image, pred = image[:, z], pred[z]
        truth = truth[z] if truth is not None else None
    stride = max(1, int(np.ceil(max(pred.shape) / max_edge)))
    image, pred = image[:, ::stride, ::stride], pred[::stride, ::stride]
    rgb = _to_rgb(image)
    panels = [rgb]
    if truth is not None:
        truth = np.where(truth[::stride, ::stride] < 0, 0, truth[::stride, ::stride])
        panels.append(_overlay(rgb, truth))
    panels.append(_overlay(rgb, pred))
    gap = np.full((rgb.shape[0], 8, 3), 255, np.uint8)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(path)
    return path


def read_for_picture(source) -> np.ndarray:
    """The whole image when small, otherwise a strided read of it, as [C, *S] float."""
    shape = tuple(source.shape)
    if int(np.prod(shape)) <= MAX_PIXELS_READ or not hasattr(source, "thumbnail"):
        return source.read((0,) * len(shape), shape)
    return source.thumbnail(2048)
