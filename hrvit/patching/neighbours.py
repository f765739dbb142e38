"""Which token lies next to which: the decoder's convolutions across token borders.

The decoder turns every token into an r^D feature map at each stage (r = 2, 4, ..., p). A 3^D convolution at
the edge of a map needs the one-pixel ring around it; without it every token is decoded alone and the
predictions show seams on the token grid. `ring_index` says, for every ring pixel of every token, which token
covers that place and which of its r^D pixels lies there (nearest), so the ring is one gather from the maps of
the whole sequence. For uniform tokens that is exactly the convolution over the stitched window; next to a
leaf of another size, the neighbour's map is sampled at this token's own pixel spacing. Where no token lies
(outside the window, padding) the ring is zero, as at the image border. Works for any tokens that do not
overlap: uniform patches, quadtree/octree leaves, anisotropic leaves, in any order.
"""

from __future__ import annotations

import torch


def locate(points: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """points [Q, D] (level-0 coordinates), boxes [L, 2D] (start..., size...) -> [Q] index of the valid token
    whose box holds each point, -1 where none.

    Tokens are grouped by (size, start mod size); within a group the boxes are cells of one lattice, so a point
    is found by one sorted lookup of its cell. The cost grows with Q and the number of distinct leaf sizes, not
    with the window's extent (a whole 64K^2 slide costs what a 1024^2 window does)."""
    D = boxes.shape[1] // 2
    found = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    held = torch.nonzero(valid).squeeze(1)
    if held.numel() == 0 or points.numel() == 0:
        return found
    start, size = boxes[held, :D].long(), boxes[held, D:].long().clamp(min=1)
    groups, group_of, members_per = torch.unique(torch.cat([size, start % size], 1), dim=0, return_inverse=True,
                                                 return_counts=True)
    todo = torch.arange(points.shape[0], device=points.device)
    for g in torch.argsort(members_per, descending=True).tolist():  # most points are found by the first groups
        if todo.numel() == 0:
            break
        members = torch.nonzero(group_of == g).squeeze(1)
        edge, phase = groups[g, :D], groups[g, D:]
        cells = torch.div(start[members] - phase, edge, rounding_mode="floor")
        wanted = torch.floor((points[todo] - phase) / edge).long()
        lo, hi = cells.amin(0), cells.amax(0)
        span = hi - lo + 1
        inside = ((wanted >= lo) & (wanted <= hi)).all(1)
        strides = torch.cumprod(torch.cat([span.new_ones(1), span.flip(0)[:-1]]), 0).flip(0)
        have = ((cells - lo) * strides).sum(1)
        want = ((wanted - lo).clamp(min=0) * strides).sum(1)
        order = torch.argsort(have)
        at = torch.searchsorted(have[order], want).clamp(max=len(order) - 1)
        hit = inside & (have[order][at] == want)
        found[todo[hit]] = held[members[order[at[hit]]]]
        todo = todo[~hit]
    return found


def ring_index(boxes: torch.Tensor, valid: torch.Tensor, r: int) -> torch.Tensor:
    """boxes [L, 2D], valid [L] -> [L, (r + 2)^D]: for each pixel of each token's map with its one-pixel ring,
    the index into the sequence's maps flattened as [L * r^D] of the pixel that lies there; -1 for zero
    (padding tokens, and ring pixels where no token lies). The centre r^D is the token's own map."""
    L, D = boxes.shape[0], boxes.shape[1] // 2
    device = boxes.device
    coords = torch.stack(torch.meshgrid(*[torch.arange(-1, r + 1, device=device)] * D, indexing="ij"), -1)
    coords = coords.reshape(-1, D)
    ring = ((coords < 0) | (coords >= r)).any(1)
    own = torch.zeros(len(coords), dtype=torch.long, device=device)
    for d in range(D):
        own = own * r + coords[:, d].clamp(0, r - 1)
    index = torch.arange(L, device=device)[:, None] * r**D + own[None]
    start = boxes[:, :D].to(torch.float64)
    size = boxes[:, D:].to(torch.float64).clamp(min=1)
    centres = coords[ring].to(torch.float64) + 0.5  # ring pixel centres, in the token's own pixels
    points = start[:, None] + centres[None] * (size[:, None] / r)  # [L, ring, D] level-0 coordinates
    owner = locate(points.reshape(-1, D), boxes, valid).view(L, -1)
    j = owner.clamp(min=0)
    local = torch.floor((points - start[j]) * (r / size[j])).long().clamp(0, r - 1)
    offset = torch.zeros_like(j)
    for d in range(D):
        offset = offset * r + local[..., d]
    index[:, ring] = torch.where(owner >= 0, j * r**D + offset, -1)
    index[~valid.to(device)] = -1
    return index
