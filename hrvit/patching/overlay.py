"""Seeing a tree: leaf boundaries drawn over the image (a mid-plane montage for volumes), and token statistics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from hrvit.patching.adaptive import patch_adaptive, patch_pyramid
from hrvit.patching.sequence import PatchSequence

LEVEL_COLOURS = np.array([[230, 25, 75], [245, 130, 48], [255, 225, 25], [60, 180, 75], [70, 240, 240],
                          [0, 130, 200], [145, 30, 180], [240, 50, 230], [128, 128, 128]], np.uint8)
"""Outline colour of a leaf of level l = log2(size / p): red for base-size leaves, then orange, yellow, ..."""
MIN_EDGE = 512
"""Pictures smaller than this are enlarged (nearest) before the outlines are drawn."""
LEGEND = 16
"""Height of the legend row under a picture, in pixels."""
PNG_SAVE = {"format": "PNG", "compress_level": 1, "compress_type": 3}
"""How patchify saves its overlay: zlib level 1 with the run-length strategy (zlib's Z_RLE = 3). On the 2048^2
overlay of an 8192^2 slide: 0.33 s and 4.7 MB, against 0.45 s and 5.1 MB for level 1's default strategy and 1 s
for level 6 (outlines on flat tissue are runs)."""


def save_with_legend(path: Path, picture: np.ndarray, legend: dict[str, list[int]], text: dict | None = None,
                     **save) -> Path:
    """Save an RGB picture [h, w, 3] with a legend row under it (a swatch and a name per entry); the legend and
    `text` also go into the PNG's text chunks ('hrvit-legend': {name: [r, g, b]}, and each key of `text`), so
    tools and tests can read what the colours mean."""
    import json

    from PIL import Image, ImageDraw, PngImagePlugin

    sheet = Image.new("RGB", (picture.shape[1], picture.shape[0] + LEGEND + 4), "white")
    sheet.paste(Image.fromarray(picture), (0, 0))
    draw, x, y = ImageDraw.Draw(sheet), 3, picture.shape[0] + 2
    for name, colour in legend.items():
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(colour), outline="black")
        draw.text((x + 14, y + 1), name, fill="black")
        x += 14 + int(draw.textlength(name)) + 12
    info = PngImagePlugin.PngInfo()
    for key, value in {"hrvit-legend": legend, **(text or {})}.items():
        info.add_text(key, json.dumps(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, pnginfo=info, **save)
    return path


def leaf_stats(seq: PatchSequence) -> dict:
    """Token counts, leaves per level and the share of the image area each level covers."""
    ndim = seq.ndim
    keep = seq.valid
    levels = seq.level[keep].tolist()
    sizes = seq.boxes[keep, ndim:].double()
    area = sizes.prod(1)
    total = float(np.prod(seq.image_shape))
    per_level, fraction = {}, {}
    for lv in sorted(set(levels)):
        sel = seq.level[keep] == lv
        per_level[str(lv)] = int(sel.sum())
        fraction[str(lv)] = round(float(area[sel].sum()) / total, 6)
    return {"tokens": len(seq), "real_tokens": seq.real_tokens, "patch_size": seq.patch_size,
            "image_shape": list(seq.image_shape), "leaves_per_level": per_level, "area_fraction_per_level": fraction}


def to_rgb(image: np.ndarray) -> np.ndarray:
    """[C, h, w] float -> [h, w, 3] uint8, stretched to the 1st-99th percentile of its values (estimated on about
    a million of them, evenly strided: the exact sort of a 2048^2 overview took a third of a second)."""
    chans = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    step = max(1, int(np.sqrt(chans.size / 1e6)))
    lo, hi = np.percentile(chans[:, ::step, ::step], (1, 99))
    x = np.subtract(chans, lo, dtype=np.float32)
    x *= np.float32(255 / max(hi - lo, 1e-6))
    np.clip(x, 0, 255, out=x)
    out = np.empty((*x.shape[1:], 3), np.uint8)
    for c in range(3):
        out[..., c] = x[c]  # truncation toward zero, as astype did
    return out


def draw_leaves(rgb: np.ndarray, starts: np.ndarray, sizes: np.ndarray, levels: np.ndarray,
                scale: float) -> np.ndarray:
    """Outline each leaf (level-0 box `starts` [n, 2], `sizes` [n]) on an RGB picture drawn at `scale`
    picture pixels per level-0 pixel, coloured by level; finer leaves are drawn last (on top). One vectorised pass per
    level (leaves of a level share a colour, so their order does not matter): a loop over the 10201 leaves of an
    8192^2 slide took 0.15 s."""
    out = rgb.copy()
    h, w = out.shape[:2]
    starts, sizes, levels = np.asarray(starts, np.int64), np.asarray(sizes, np.int64), np.asarray(levels)
    for level in np.unique(levels)[::-1]:
        sel = levels == level
        y0, x0 = (starts[sel, 0] * scale).astype(np.int64), (starts[sel, 1] * scale).astype(np.int64)
        y1 = np.minimum(h, ((starts[sel, 0] + sizes[sel]) * scale).astype(np.int64)) - 1
        x1 = np.minimum(w, ((starts[sel, 1] + sizes[sel]) * scale).astype(np.int64)) - 1
        inside = (y0 < h) & (x0 < w)
        y0, x0, y1, x1 = y0[inside], x0[inside], y1[inside], x1[inside]
        ys, xs = _runs(y0, y1), _runs(x0, x1)  # (start, offsets, owner) of each leaf's rows / columns
        rows = [np.repeat(y0, xs[2]), np.repeat(np.maximum(y1, y0), xs[2])]
        cols = [np.repeat(x0, ys[2]), np.repeat(np.maximum(x1, x0), ys[2])]
        colour = LEVEL_COLOURS[min(int(level), len(LEVEL_COLOURS) - 1)]
        out[np.concatenate(rows), np.tile(xs[0] + xs[1], 2)] = colour
        out[np.tile(ys[0] + ys[1], 2), np.concatenate(cols)] = colour
    return out


def _runs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integers a[i]..b[i] of every i, concatenated: (a repeated per integer, offset from a, count per i)."""
    count = np.maximum(b - a + 1, 0)
    first = np.repeat(np.cumsum(count) - count, count)
    return np.repeat(a, count), np.arange(int(count.sum())) - first, count


def overlay(picture: np.ndarray, seq: PatchSequence) -> np.ndarray:
    """Leaf outlines over `picture` ([C, *S'] float: the image, or a thumbnail of it for slides).

    2-D: one panel. 3-D: the three mid-planes (axial z, coronal y, sagittal x) side by side, each
    with the leaves that cut it.
    """
    keep = seq.valid.numpy()
    boxes, levels = seq.boxes.numpy()[keep], seq.level.numpy()[keep]
    ndim = seq.ndim
    starts, sizes = boxes[:, :ndim], boxes[:, ndim]
    scale = picture.shape[1] / seq.image_shape[0]

    def panel(plane, starts, sizes, levels):  # small pictures are enlarged so that outlines stay visible
        rgb = to_rgb(plane)
        f = max(1, MIN_EDGE // max(rgb.shape[:2]))
        rgb = np.repeat(np.repeat(rgb, f, 0), f, 1)
        return draw_leaves(rgb, starts, sizes, levels, scale * f)

    if ndim == 2:
        return panel(picture, starts, sizes, levels)
    panels = []
    for axis in range(3):
        mid = seq.image_shape[axis] // 2
        cut = (starts[:, axis] <= mid) & (mid < starts[:, axis] + sizes)
        other = [a for a in range(3) if a != axis]
        plane = np.take(picture, int(mid * scale), axis=1 + axis)
        panels.append(panel(plane, starts[cut][:, other], sizes[cut], levels[cut]))
    height = max(p.shape[0] for p in panels)
    gap = np.full((height, 8, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)


def patchify(source, cfg, out: Path | None, max_edge: int = 2048) -> dict:
    """Adaptive tokens of a whole image (a hrvit.data source) as `cfg` says; writes the overlay PNG to
    `out` (None: no picture is made at all, only the tree and its statistics) and returns the statistics. Slides are
    patched pyramid-natively and drawn on the overview patch_pyramid makes from the pixels it read (asking the file
    for a thumbnail would decode level 0 a second time)."""
    shape = tuple(source.shape)
    draw = out is not None
    if hasattr(source, "read_level"):
        seq = patch_pyramid(source, cfg, picture=max_edge if draw else 0)
        picture, read_seconds = seq.meta.pop("picture", None), 0.0
    else:
        tick = time.perf_counter()
        image = torch.from_numpy(source.read((0,) * len(shape), shape))
        read_seconds = time.perf_counter() - tick
        seq = patch_adaptive(image, cfg)
        seq.meta.update(pixels_read={0: int(np.prod(shape))}, level0_fraction_read=1.0)
        stride = max(1, -(-max(shape) // max_edge))
        picture = image[(slice(None), *[slice(None, None, stride)] * len(shape))].numpy() if draw else None
    seconds = {"read": read_seconds, **seq.meta["seconds"]}
    if draw:
        tick = time.perf_counter()
        p = seq.patch_size
        legend = {f"{p << lv} px leaves": LEVEL_COLOURS[min(lv, len(LEVEL_COLOURS) - 1)].tolist()
                  for lv in sorted(set(seq.level[seq.valid].tolist()))}
        save_with_legend(out, overlay(picture, seq), legend, **PNG_SAVE)
        seconds["overlay"] = time.perf_counter() - tick
    return {**leaf_stats(seq), "seconds": {k: round(v, 4) for k, v in seconds.items()},
            "pixels_read": seq.meta["pixels_read"], "level0_fraction_read": seq.meta["level0_fraction_read"]}
