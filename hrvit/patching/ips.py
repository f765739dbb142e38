"""Iterative Patch Selection (IPS; Bergner et al., ICLR 2023): memory independent of image size.

Every candidate patch is scored without gradients, chunk by chunk: the `memory` best patches so
far plus one chunk of `chunk` new ones are scored together and the best `memory` are kept. They
share one buffer of memory + chunk patches (each chunk is copied in after the kept ones, the kept
ones are compacted in place), so while scoring the pixels of at most memory + chunk patches are
alive, whatever the number of candidates (a chunk just read exists beside the buffer until copied
in). Given `embed`, the kept patches' embeddings are kept too and only each new chunk is embedded.
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
"""(pixels [n, C, S, S] or, given `embed`, features [n, ...], boxes [n, 4]) -> scores [n], jointly over the n."""


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
    """Rows of the one pixel buffer scoring runs in: the most patches alive while scoring (memory + chunk at
    most; tests/test_ips.py checks it against the tensors actually alive)."""


@torch.no_grad()
def select_patches(read: Callable[[torch.Tensor], torch.Tensor], boxes: torch.Tensor, score: ScoreFn, *,
                   memory: int, chunk: int, image_shape, explore: float = 0.0, rng: np.random.Generator | None = None,
                   embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[PatchSequence, SelectionStats]:
    """Keep the best `memory` of the candidate `boxes` under `score`, reading `chunk` at a time.

    `explore` is the share of the memory filled with candidates drawn at random (training only),
    against the feedback loop of a model that only sees what it already likes. Fewer candidates
    than `memory` give a sequence padded with invalid tokens (valid=False), never bare zeros.
    `embed` (optional) maps pixels to per-patch features that do not depend on the other patches; `score`
    then gets those features instead of pixels, and the kept patches' features are reused from chunk to
    chunk instead of being recomputed (the embedding is the expensive part; reuse is exact in eval mode).
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

    # slots [0, k) of `buf` hold the kept patches (any order), each chunk is copied in after them
    buf = feats = None
    kept_idx, kept_score = torch.empty(0, dtype=torch.long), torch.empty(0)
    chunks = 0
    for first in range(0, len(order) if keep_n else 0, chunk):
        idx = order[first:first + chunk]
        k, end = len(kept_idx), len(kept_idx) + len(idx)
        pix = read(boxes[idx])
        if buf is None:
            buf = pix.new_empty(min(keep_n + chunk, len(order)), *pix.shape[1:])
        buf[k:end] = pix
        del pix  # the chunk lives on in the buffer only
        if embed is None:
            feats = buf
        else:
            new = embed(buf[k:end])
            if feats is None:
                feats = new.new_empty(len(buf), *new.shape[1:])
            feats[k:end] = new
            del new
        cand = torch.cat([kept_idx, idx])
        s = score(feats[:end], boxes[cand]).float().cpu()
        top = torch.topk(s, min(keep_n, end)).indices
        # compact in place: kept patches beyond the first len(top) slots fill the slots of the dropped ones
        m = len(top)
        in_top = torch.zeros(end, dtype=torch.bool)
        in_top[top] = True
        holes, movers = (~in_top[:m]).nonzero().squeeze(1), top[top >= m]
        for h, w in zip(holes.tolist(), movers.tolist()):
            buf[h] = buf[w]
        if feats is not buf:
            feats[holes.to(feats.device)] = feats[movers.to(feats.device)]
        cand[holes], s[holes] = cand[movers], s[movers]
        kept_idx, kept_score = cand[:m], s[:m]
        chunks += 1

    rank = torch.sort(kept_score, descending=True, stable=True).indices  # best first, as topk returns them
    kept_idx, kept_score = kept_idx[rank], kept_score[rank]
    pixels = None
    if buf is not None:
        pixels = buf.new_zeros(memory, *buf.shape[1:])
        torch.index_select(buf, 0, rank.to(buf.device), out=pixels[:len(rank)])
    peak = 0 if buf is None else len(buf)
    del buf, feats
    if n_random:
        rand_pix = read(boxes[random_idx])
        pixels = rand_pix.new_zeros(memory, *rand_pix.shape[1:]) if pixels is None else pixels
        pixels[len(kept_idx):len(kept_idx) + n_random] = rand_pix
        kept_idx = torch.cat([kept_idx, random_idx])
        kept_score = torch.cat([kept_score, torch.full((n_random,), float("nan"))])
    seq = _sequence(pixels, boxes[kept_idx], kept_score, tuple(int(v) for v in image_shape))
    return seq, SelectionStats(candidates=n, chunks=chunks, peak_patches=peak)


def _sequence(pixels, boxes, scores, image_shape) -> PatchSequence:
    """The selection as a sequence of len(pixels) tokens: the real ones first, the rest padding."""
    real, length = len(boxes), len(pixels)
    pad = length - real
    valid = torch.cat([torch.ones(real, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
    boxes = torch.cat([boxes, boxes.new_zeros(pad, 4)])
    scores = torch.cat([scores, torch.full((pad,), float("nan"))])
    return PatchSequence(pixels=pixels, boxes=boxes, level=torch.zeros(length, dtype=torch.long), valid=valid,
                         image_shape=image_shape, score=scores)


def candidate_count(image_shape, patch: int, stride: int | None = None) -> int:
    """How many grid candidates an image has (for planning memory/chunk sizes)."""
    stride = stride or patch
    return math.prod(len(range(0, int(s) - patch + 1, stride)) + ((int(s) - patch) % stride != 0)
                     for s in image_shape)
