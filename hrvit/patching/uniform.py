"""Uniform patching: a raster grid of base-size patches, and `depatch` back to full resolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hrvit.errors import DataError
from hrvit.patching.sequence import IGNORE_INDEX, PatchSequence


def check_extent(shape, p: int) -> None:
    """DataError unless an image of this spatial shape can be patched with base size p: a 2-D image must be at
    least p on every axis; a volume on one axis at least (a thin scan, e.g. 12 slices with p = 16, is one patch
    thick, padded past its end with zeros and IGNORE_INDEX, as edge patches are)."""
    shape = tuple(int(s) for s in shape)
    if min(shape) < 1 or (max(shape) if len(shape) == 3 else min(shape)) < p:
        raise DataError(f"image of shape {shape} is smaller than one patch ({p} px)")


def patch_uniform(image: torch.Tensor, patch_size: int, target: torch.Tensor | None = None) -> PatchSequence:
    """Cut `image` [C, *S] into a raster grid of p-sized tokens (S need not divide by p).

    Edge tokens that reach past the image keep their full p-sized box; the part outside is
    zero in `pixels` and IGNORE_INDEX in `target`, so it never counts as data. A volume thinner
    than p along an axis (check_extent) is one token thick there, padded the same way.
    """
    p = patch_size
    shape = tuple(image.shape[1:])
    ndim = len(shape)
    check_extent(shape, p)
    grid = [math.ceil(s / p) for s in shape]
    pad = [g * p - s for g, s in zip(grid, shape)]
    flat_pad = [v for amount in reversed(pad) for v in (0, amount)]
    pixels = _blocks(F.pad(image, flat_pad), p)
    tokens = pixels.shape[0]
    starts = torch.stack(torch.meshgrid(*[torch.arange(g) * p for g in grid], indexing="ij"), -1).reshape(-1, ndim)
    boxes = torch.cat([starts, torch.full_like(starts, p)], dim=1)
    seq = PatchSequence(
        pixels=pixels,
        boxes=boxes.long(),
        level=torch.zeros(tokens, dtype=torch.long),
        valid=torch.ones(tokens, dtype=torch.bool),
        image_shape=shape,
    )
    if target is not None:
        if tuple(target.shape) != shape:
            raise DataError(f"label shape {tuple(target.shape)} does not match image shape {shape}")
        seq.target = _blocks(F.pad(target.long()[None], flat_pad, value=IGNORE_INDEX), p)[:, 0]
    return seq


def _blocks(x: torch.Tensor, p: int) -> torch.Tensor:
    """[C, *S] with S divisible by p -> [n, C, p, ...] in raster (C-order) block order."""
    c, *shape = x.shape
    ndim = len(shape)
    grid = [s // p for s in shape]
    view = x.reshape(c, *[v for g in grid for v in (g, p)])
    # axes: c, g0, p0, g1, p1, ... -> g0, g1, ..., c, p0, p1, ...
    order = [1 + 2 * i for i in range(ndim)] + [0] + [2 + 2 * i for i in range(ndim)]
    return view.permute(order).reshape(-1, c, *([p] * ndim))


def depatch(values: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, image_shape,
            fill: float = 0.0) -> torch.Tensor:
    """Token maps [L, K, *p] back to a full-resolution [K, *image_shape] map.

    Each valid token is resized (nearest) from p to its box size and written at its box;
    tokens of one size are handled together. Pixels no valid token covers keep `fill`.
    """
    ndim = len(image_shape)
    k = values.shape[1]
    keep = valid.bool()
    values, boxes = values[keep], boxes[keep].long()
    reach = [int((boxes[:, i] + boxes[:, ndim + i]).max()) if len(boxes) else 0 for i in range(ndim)]
    canvas_shape = [max(s, r) for s, r in zip(image_shape, reach)]
    canvas = values.new_full((k, *canvas_shape), fill)
    for size in torch.unique(boxes[:, ndim:], dim=0):
        group = (boxes[:, ndim:] == size).all(dim=1)
        block = values[group]
        size_list = [int(s) for s in size]
        if list(block.shape[2:]) != size_list:
            block = F.interpolate(block.float(), size=size_list, mode="nearest").to(values.dtype)
        _scatter_blocks(canvas, block, boxes[group, :ndim])
    return canvas[(slice(None), *[slice(0, s) for s in image_shape])]


def _scatter_blocks(canvas: torch.Tensor, blocks: torch.Tensor, starts: torch.Tensor) -> None:
    """Write blocks [n, K, *s] into canvas [K, *S] at `starts` [n, D] with one indexed assignment."""
    ndim = starts.shape[1]
    size = blocks.shape[2:]
    offsets = torch.meshgrid(*[torch.arange(s, device=starts.device) for s in size], indexing="ij")
    index = [starts[:, i].view(-1, *([1] * ndim)) + offsets[i] for i in range(ndim)]  # each [n, *s]
    moved = blocks.movedim(1, -1)  # [n, *s, K]
    canvas.movedim(0, -1)[tuple(index)] = moved
