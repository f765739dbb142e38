"""Whole-image prediction: cover the image with windows, run the model, stitch full-resolution labels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hrvit.config import PatchingConfig
from hrvit.data.datasets import Case
from hrvit.data.windows import grid_starts, read_window, window_shape
from hrvit.patching import collate, depatch, to_device


@torch.no_grad()
def predict_case(model: Callable, case: Case, *, window: int | None, patching: PatchingConfig,
                 batch: int, device=None) -> np.ndarray:
    """Label map (uint8, the image's full-resolution shape) predicted window by window; windows go to
    `device` (the model's) and logits come back to the CPU for stitching."""
    shape = tuple(case.image.shape)
    win = window_shape(shape, window, patching.patch_size)
    pred = np.zeros(shape, dtype=np.uint8)
    starts = grid_starts(shape, win)
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, s, win, patching, with_label=False) for s in chunk])
        on = to_device(b, device) if device is not None else b
        logits = model(on["pixels"], on["boxes"], on["valid"], on["image_shape"]).float().cpu()
        for j, start in enumerate(chunk):
            labels = depatch(logits[j], b["boxes"][j], b["valid"][j], win).argmax(0).to(torch.uint8).numpy()
            region = tuple(slice(s, min(s + w, n)) for s, w, n in zip(start, win, shape))
            pred[region] = labels[tuple(slice(0, r.stop - r.start) for r in region)]
    return pred


def read_truth(case: Case) -> np.ndarray:
    shape = tuple(case.label.shape)
    return case.label.read((0,) * len(shape), shape)
