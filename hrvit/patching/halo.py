"""Halo pixels: each token's pixels with a margin of `m` pixels (at the token's own scale) taken from its
neighbours, so the decoder's full-resolution convolutions see across token borders (the overlap-tile idea).

Leaves tile the window, so the margin of a token lies in its neighbours, whose pixels are already in the
sequence: every halo pixel is sampled (nearest) from the token that covers that place. One gather on the
pixels' device, for any patcher (uniform, adaptive, pyramid, anisotropic octree) and any token order; where no
token covers a place (outside the window, or padding) the halo is 0, as pixels outside the image are.
"""

from __future__ import annotations

import numpy as np
import torch

from hrvit.patching.sequence import PatchSequence


def _cell(start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The largest edge per axis that divides every token's start and size: the lookup grid's cell."""
    return np.gcd.reduce(np.concatenate([start, size]), axis=0).clip(min=1)


def halo_pixels(pixels: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, m: int) -> torch.Tensor:
    """pixels [L, C, *p] of tokens with boxes [L, 2D] (start..., size...) that tile a region -> [L, C, *(p + 2m)],
    the centre p^D of each being its own pixels."""
    if m <= 0:
        return pixels
    L, C = pixels.shape[:2]
    p, D = pixels.shape[-1], boxes.shape[1] // 2
    if not bool(valid.any()):
        return torch.nn.functional.pad(pixels, (m,) * 2 * D)
    device = pixels.device
    box = boxes[valid].cpu().numpy().astype(np.int64)
    start_np, size_np = box[:, :D], box[:, D:]
    cell = _cell(start_np, size_np)
    cells = np.ceil((start_np + size_np).max(0) / cell).astype(np.int64)  # grid shape per axis
    owner = torch.full((int(np.prod(cells)),), -1, dtype=torch.int64)
    index = torch.nonzero(valid.cpu()).squeeze(1)
    per_axis = size_np // cell
    for k in np.unique(per_axis, axis=0):  # paint each token's cells with its index, one size at a time
        sel = np.flatnonzero((per_axis == k).all(1))
        offsets = np.stack(np.meshgrid(*[np.arange(n) for n in k], indexing="ij"), -1).reshape(-1, D)
        at = start_np[sel, None, :] // cell + offsets[None]
        flat = np.ravel_multi_index(tuple(np.moveaxis(at, -1, 0)), tuple(cells))
        owner[torch.from_numpy(flat.reshape(-1))] = index[torch.from_numpy(sel)].repeat_interleave(len(offsets))
    owner = owner.to(device)
    start, size = boxes[:, :D].to(device, torch.float64), boxes[:, D:].to(device, torch.float64).clamp(min=1)
    ring = torch.arange(-m, p + m, device=device, dtype=torch.float64) + 0.5
    grid = torch.stack(torch.meshgrid(*[ring] * D, indexing="ij"), -1).reshape(-1, D)  # [P^D, D] in token pixels
    where = start[:, None, :] + grid[None] * (size[:, None, :] / p)  # [L, P^D, D] level-0 coordinates
    cell_t = torch.as_tensor(cell, device=device, dtype=torch.float64)
    at = torch.floor(where / cell_t).long()
    inside = ((at >= 0) & (at < torch.as_tensor(cells, device=device))).all(-1) & valid[:, None].to(device)
    flat = torch.zeros_like(at[..., 0])
    for d in range(D):
        flat = flat * int(cells[d]) + at[..., d].clamp(0, int(cells[d]) - 1)
    j = torch.where(inside, owner[flat], -1)
    jj = j.clamp(min=0)
    local = torch.floor((where - start[jj]) * (p / size[jj])).long().clamp(0, p - 1)
    offset = torch.zeros_like(jj)
    for d in range(D):
        offset = offset * p + local[..., d]
    flat_pixels = pixels.reshape(L, C, p**D).transpose(1, 2).reshape(L * p**D, C)
    out = flat_pixels[jj * p**D + offset] * (j >= 0)[..., None].to(pixels.dtype)  # [L, P^D, C]
    return out.transpose(1, 2).reshape(L, C, *(p + 2 * m,) * D)


def add_halo(seq: PatchSequence, m: int) -> PatchSequence:
    """The sequence with halo pixels (patching.halo = m); a no-op for m = 0."""
    if m > 0:
        seq.pixels = halo_pixels(seq.pixels, seq.boxes, seq.valid, m)
    return seq


def token_pixels(pixels: torch.Tensor, patch_size: int, ndim: int) -> torch.Tensor:
    """The tokens' own p^D pixels of halo'd pixels [..., C, *P] (the centre crop; pixels without halo as they are)."""
    m = (pixels.shape[-1] - patch_size) // 2
    if m == 0:
        return pixels
    return pixels[(Ellipsis, *[slice(m, m + patch_size)] * ndim)]
