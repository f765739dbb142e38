"""A quick-look PNG: image | ground truth | prediction, titled, with a legend of the class colours; 2-D
images as one row, volumes as three enlarged orthogonal planes through the predicted structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hrvit.patching.overlay import save_with_legend

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)
"""Class colours (class 0, background, is black); classes beyond 8 reuse the colours."""

MAX_PIXELS_READ = 16 * 1024 * 1024
MIN_PLANE_EDGE = 256
"""Volume planes are enlarged (nearest, by a whole factor) until their longer side is at least this."""
TITLE = 16
"""Height of the title bar above each panel and of the legend row, in pixels."""


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """[C, h, w] float -> [h, w, 3] uint8. RGB in [0, 1] (8-bit colour as read) is shown as it is, as the eye sees
    the slide; anything else (MRI, 16-bit, one channel) is stretched to its 1st-99th percentile."""
    chans = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    if image.shape[0] == 3 and chans.size and chans.min() >= 0 and chans.max() <= 1:
        return (chans.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    lo, hi = np.percentile(chans, 1), np.percentile(chans, 99)
    scaled = np.clip((chans - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled.transpose(1, 2, 0) * 255).astype(np.uint8)


def _overlay(rgb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Tint labelled pixels with their class colour; background (0) shows the image as it is."""
    colour = PALETTE[labels.astype(np.int64) % len(PALETTE)]
    tinted = (0.35 * rgb + 0.65 * colour).astype(np.uint8)
    return np.where((labels > 0)[..., None], tinted, rgb)


def _planes(image: np.ndarray, truth, pred: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]]:
    """(name, image [C, h, w], truth, pred) per plane: the 2-D image itself, or for a volume [C, z, y, x] the axial,
    coronal and sagittal planes through the centre of the predicted foreground (of the truth when nothing is
    predicted, else the middle), each enlarged so its longer side is at least MIN_PLANE_EDGE."""
    if image.ndim == 3:
        return [("", image, truth, pred)]
    fg = np.argwhere(pred > 0)
    if not len(fg) and truth is not None:
        fg = np.argwhere(truth > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(pred.shape) // 2
    out = []
    for axis, name in enumerate(("z", "y", "x")):
        index = [slice(None)] * 3
        index[axis] = int(centre[axis])
        cut = tuple(index)
        plane = (image[(slice(None), *cut)], None if truth is None else truth[cut], pred[cut])
        f = max(1, -(-MIN_PLANE_EDGE // max(plane[2].shape)))
        big = [None if a is None else a.repeat(f, -2).repeat(f, -1) for a in plane]
        out.append((f"{name} = {centre[axis]}", *big))
    return out


def _titled(panel: np.ndarray, title: str) -> Image.Image:
    img = Image.new("RGB", (panel.shape[1], panel.shape[0] + TITLE), "white")
    img.paste(Image.fromarray(panel), (0, TITLE))
    ImageDraw.Draw(img).text((3, 2), title, fill="black")
    return img


def write_picture(path: Path, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray,
                  names: list[str] | None = None, max_edge: int = 768) -> Path:
    """Save titled panels (image, ground truth when given, prediction) and a legend of the classes present; a
    volume ([C, z, y, x]) gives one row per orthogonal plane. The legend and the panel titles are also in the
    PNG's text chunks ('hrvit-legend': {class: [r, g, b]}, 'hrvit-panels'), for tools and tests."""
    truth = None if truth is None else np.where(truth < 0, 0, truth)
    rows, titles = [], []
    for plane, img, tru, prd in _planes(image, truth, pred):
        stride = max(1, int(np.ceil(max(prd.shape) / max_edge)))
        img, prd = img[:, ::stride, ::stride], prd[::stride, ::stride]
        rgb = _to_rgb(img)
        panels = [("image", rgb)]
        if tru is not None:
            panels.append(("ground truth", _overlay(rgb, tru[::stride, ::stride])))
        panels.append(("prediction", _overlay(rgb, prd)))
        named = [(f"{title} {plane}".strip(), p) for title, p in panels]
        titles += [t for t, _ in named]
        rows.append([_titled(p, t) for t, p in named])
    classes = sorted({int(v) for a in (pred, truth) if a is not None for v in np.unique(a)} - {0})
    names = names or [f"class {k}" for k in range(max(classes, default=0) + 1)]
    legend = {names[k] if k < len(names) else f"class {k}": PALETTE[k % len(PALETTE)].tolist() for k in classes}
    gap = 8
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1)
    sheet = Image.new("RGB", (width, height), "white")
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            sheet.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    return save_with_legend(path, np.asarray(sheet), legend, {"hrvit-panels": titles})


def read_for_picture(source) -> np.ndarray:
    """The whole image when small, otherwise a strided read of it, as [C, *S] float."""
    shape = tuple(source.shape)
    if int(np.prod(shape)) <= MAX_PIXELS_READ or not hasattr(source, "thumbnail"):
        return source.read((0,) * len(shape), shape)
    return source.thumbnail(2048)
