"""UNETR-style conv decoder that runs on every token by itself, in 2-D and 3-D.

A token is a leaf of an adaptive tree, so tokens have no grid to share: the decoder treats
the B*L tokens as a flat batch of tiny images (1 -> 2 -> 4 -> ... -> p pixels per side).
Nothing here may mix tokens: no BatchNorm (GroupNorm statistics are per token), no reshape
across the token axis. `depatch` pastes the per-token logits back into the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

SKIP_RESOLUTIONS = (8, 4, 2)
"""Side length at which the hidden states after d/4, d/2 and 3d/4 blocks enter (UNETR order)."""


class ConvNormAct(nn.Sequential):
    """conv3x3 + GroupNorm + GELU; GroupNorm because its statistics stay inside one token."""

    def __init__(self, ndim: int, c_in: int, c_out: int):
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        super().__init__(
            conv(c_in, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(8, c_out), c_out),
            nn.GELU(),
        )


class UNETRDecoder(nn.Module):
    """Per-token decoder: last hidden state as a 1-pixel map, upsampled x2 per stage to p,
    with the earlier hidden states projected to 2, 4, 8 pixels and a pixel stem at p as skips.

    `channels[s]` is the width at side 2**s (the last entry repeats for finer stages).
    """

    def __init__(
        self,
        *,
        ndim: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        num_classes: int,
        channels: Sequence[int] = (64, 32, 16, 16),
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim={ndim}: the decoder is 2-D or 3-D")
        stages = int(math.log2(patch_size))
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"patch_size={patch_size} must be a power of two")
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(
                f"decoder channels={tuple(channels)} must be positive widths"
            )
        self.ndim, self.patch_size = ndim, patch_size
        self.channels = tuple(int(c) for c in channels)
        width = [
            self.channels[min(s, len(self.channels) - 1)] for s in range(stages + 1)
        ]
        up = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d

        self.bottleneck = nn.Linear(
            embed_dim, width[0]
        )  # a 1x1 conv on the 1-pixel map
        # small patches cannot hold an 8-pixel skip: it joins the finest stage instead
        self.skip_res = tuple(min(r, patch_size) for r in SKIP_RESOLUTIONS)
        self.skips = nn.ModuleList(
            nn.Linear(embed_dim, width[int(math.log2(r))] * r**ndim)
            for r in self.skip_res
        )
        self.stem = ConvNormAct(ndim, in_chans, width[stages])
        self.ups = nn.ModuleList(
            up(width[s - 1], width[s], 2, stride=2) for s in range(1, stages + 1)
        )
        fuse = []
        for s in range(1, stages + 1):
            inputs = 1 + self.skip_res.count(2**s) + (s == stages)
            fuse.append(
                nn.Sequential(
                    ConvNormAct(ndim, inputs * width[s], width[s]),
                    ConvNormAct(ndim, width[s], width[s]),
                )
            )
        self.fuse = nn.ModuleList(fuse)
        self.head = conv(width[stages], num_classes, 1)

    def forward(self, hidden: Sequence[Tensor], pixels: Tensor) -> Tensor:
        """hidden: 4 x [B, L, dim] (after d/4, d/2, 3d/4, d blocks); pixels [B, L, C, *P] -> [B, L, K, *P]."""
        if len(hidden) != 4:
            raise ValueError(f"UNETRDecoder needs 4 hidden states, got {len(hidden)}")
        B, L = pixels.shape[:2]
        n, d = B * L, self.ndim
        flat = [h.reshape(n, h.shape[-1]) for h in hidden]
        x = self.bottleneck(flat[3]).view(n, -1, *(1,) * d)
        skips: dict[int, list[Tensor]] = {}
        for h, r, proj in zip(flat[:3], self.skip_res, self.skips):
            skips.setdefault(r, []).append(proj(h).view(n, -1, *(r,) * d))
        for s, (up, fuse) in enumerate(zip(self.ups, self.fuse), start=1):
            parts = [up(x), *skips.get(2**s, [])]
            if 2**s == self.patch_size:
                stem_in = pixels.reshape(n, *pixels.shape[2:]).to(x.dtype)
                parts.append(self.stem(stem_in))
            x = fuse(torch.cat(parts, 1))
        out = self.head(x)
        return out.view(B, L, *out.shape[1:])
