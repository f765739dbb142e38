"""Iterative Patch Selection (IPS; Bergner et al., ICLR 2023): memory independent of image size.

Every candidate patch is scored without gradients, chunk by chunk: the `memory` best patches so
far plus one chunk of `chunk` new ones are scored together and the best `memory` are kept, so
never more than memory + chunk patch tensors exist at once, whatever the number of candidates.
Only the selected patches are then embedded with gradients. Patches are read lazily from the
source (a slide is never loaded whole) and keep their boxes, so the head can use positions.

With a single attention head the score order of a patch does not depend on which other patches
are scored with it (softmax is monotonic in the logit), so chunked selection returns exactly the
global top-`memory`; several heads average differently normalised softmaxes, so it is close.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hrvit.errors import ConfigError, DataError
from hrvit.patching.sequence import PatchSequence

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(pixels [n, C, S, S], boxes [n, 4]) -> scores [n], computed jointly over the n patches."""


def grid_boxes(image_shape, patch: int, stride: int | None = None, keep: np.ndarray | None = None) -> torch.Tensor:
    """Boxes [N, 4] = (y, x, patch, patch) of a grid of candidates inside the image.

    The last row/column is shifted inside the image so every candidate holds only image pixels.
    `keep` is an optional boolean mask over the image (any resolution, e.g. a low-resolution
    tissue mask); a candidate is kept when the mask is true at its centre.
    """
    stride = stride or patch
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < patch or w < patch:
        raise DataError(f"image of shape {(h, w)} is smaller than one IPS patch ({patch} px)")

    def starts(n):
        s = list(range(0, n - patch + 1, stride))
        return s + [n - patch] if s[-1] != n - patch else s

    ys, xs = np.meshgrid(starts(h), starts(w), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    if keep is not None:
        my = np.minimum(((ys + patch / 2) * keep.shape[0] / h).astype(int), keep.shape[0] - 1)
        mx = np.minimum(((xs + patch / 2) * keep.shape[1] / w).astype(int), keep.shape[1] - 1)
        inside = keep[my, mx]
        ys, xs = ys[inside], xs[inside]
    boxes = np.stack([ys, xs, np.full_like(ys, patch), np.full_like(xs, patch)], 1)
    return torch.from_numpy(boxes).long()


def read_patches(source, boxes: torch.Tensor) -> torch.Tensor:
    """Pixels [n, C, S, S] of the boxes, read one region at a time from a hrvit Source."""
    size = int(boxes[0, 2]) if len(boxes) else 0
    out = torch.empty(len(boxes), source.channels, size, size)
    for i, (y, x, _, _) in enumerate(boxes.tolist()):
        out[i] = torch.from_numpy(np.ascontiguousarray(source.read((y, x), (size, size))))
    return out


@dataclass
class SelectionStats:
    candidates: int
    chunks: int
    peak_patches: int
    """Most patch tensors held at once during selection (bounded by memory + chunk)."""


@torch.no_grad()
def select_patches(read: Callable[[torch.Tensor], torch.Tensor], boxes: torch.Tensor, score: ScoreFn, *,
                   memory: int, chunk: int, image_shape, explore: float = 0.0,
                   rng: np.random.Generator | None = None) -> tuple[PatchSequence, SelectionStats]:
    """Keep the best `memory` of the candidate `boxes` under `score`, reading `chunk` at a time.

    `explore` is the share of the memory filled with candidates drawn at random (training only),
    against the feedback loop of a model that only sees what it already likes. Fewer candidates
    than `memory` give a sequence padded with invalid tokens (valid=False), never bare zeros.
    """
    if memory < 1 or chunk < 1:
        raise ConfigError(f"ips: memory ({memory}) and chunk ({chunk}) must both be >= 1")
    if not 0.0 <= explore <= 1.0:
        raise ConfigError(f"ips.explore: {explore} must lie in [0, 1]")
    n = len(boxes)
    if n == 0:
        raise DataError("ips: the image has no candidate patches (no tissue?)")
    order = torch.arange(n)
    random_idx = torch.empty(0, dtype=torch.long)
    n_random = min(round(explore * memory), n) if explore else 0
    if n_random:
        rng = rng or np.random.default_rng()
        random_idx = torch.from_numpy(rng.choice(n, n_random, replace=False)).long()
        mask = torch.ones(n, dtype=torch.bool)
        mask[random_idx] = False
        order = order[mask]
    keep_n = min(memory - n_random, len(order))

    mem_idx = torch.empty(0, dtype=torch.long)
    mem_pix = None
    mem_score = torch.empty(0)
    peak, chunks = 0, 0
    for first in range(0, len(order) if keep_n else 0, chunk):
        idx = order[first:first + chunk]
        pix = read(boxes[idx])
        cand_idx = torch.cat([mem_idx, idx])
        cand_pix = pix if mem_pix is None else torch.cat([mem_pix, pix])
        peak = max(peak, len(cand_pix))
        s = score(cand_pix, boxes[cand_idx]).float()
        top = torch.topk(s, min(keep_n, len(s))).indices
        mem_idx, mem_pix, mem_score = cand_idx[top], cand_pix[top], s[top]
        chunks += 1
    if n_random:
        rand_pix = read(boxes[random_idx])
        peak = max(peak, len(rand_pix) + len(mem_idx))
        mem_idx = torch.cat([mem_idx, random_idx])
        mem_pix = rand_pix if mem_pix is None else torch.cat([mem_pix, rand_pix])
        mem_score = torch.cat([mem_score, torch.full((n_random,), float("nan"))])
    seq = _padded(mem_pix, boxes[mem_idx], mem_score, memory, tuple(int(v) for v in image_shape))
    return seq, SelectionStats(candidates=n, chunks=chunks, peak_patches=peak)


def _padded(pixels, boxes, scores, length: int, image_shape) -> PatchSequence:
    real = len(boxes)
    pad = length - real
    valid = torch.cat([torch.ones(real, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    if pad:
        pixels = torch.cat([pixels, pixels.new_zeros(pad, *pixels.shape[1:])])
        boxes = torch.cat([boxes, boxes.new_zeros(pad, 4)])
        scores = torch.cat([scores, torch.full((pad,), float("nan"))])
    return PatchSequence(pixels=pixels, boxes=boxes, level=torch.zeros(length, dtype=torch.long), valid=valid,
                         image_shape=image_shape, score=scores)


def candidate_count(image_shape, patch: int, stride: int | None = None) -> int:
    """How many grid candidates an image has (for planning memory/chunk sizes)."""
    stride = stride or patch
    return math.prod(len(range(0, int(s) - patch + 1, stride)) + ((int(s) - patch) % stride != 0)
                     for s in image_shape)
