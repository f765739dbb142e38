"""UNETR-style conv decoder over the tokens' own maps, in 2-D and 3-D.

A token is a leaf of an adaptive tree, so tokens have no grid to share: the decoder treats
the B*L tokens as a flat batch of tiny images (1 -> 2 -> 4 -> ... -> p pixels per side).
Each 3^D convolution reads the one-pixel border of a token's map from the neighbouring tokens' maps
(TokenRings, hrvit.patching.neighbours): for uniform tokens that is the convolution over the stitched
window, so predictions have no seams on the token grid. Statistics stay per token (GroupNorm, no
BatchNorm), so a token's output depends only on its own state and its neighbours' maps. `depatch`
pastes the per-token logits back into the image.

Fuse blocks (`fuse`, config `model.decoder_fuse`): each stage joins the upsampled map with the skips
that enter there (and, at the finest stage, the pixel stem), then mixes them.
- "conv": two 3^D convs over the concatenation (the original UNETR-style block);
- "pointwise": a 1^D conv (+ norm, GELU) over the concatenation, then one 3^D conv;
- "add": one 3^D conv over the sum of the inputs. The upsampling (a transposed conv) and the skips (Linear
  projections of hidden states) are linear, so a 1^D mix of them without a nonlinearity in between would be
  absorbed into their own weights: summing them is that mix, without the concatenation.
In 3-D the first 3^D conv over the concatenation is ~70 % of the decoder's FLOPs (48 -> 16 channels x 27
taps per voxel at 8^3, nano): the decoder's forward FLOPs fall 2.65x with "pointwise" and 2.83x with "add".
"pointwise" and "add" also compute the same maps in CPU-friendly forms: transposed convs and 1^D convs as
matmuls (UpConv, PointwiseConv) and every map channels-last (channels_last_3d), where oneDNN's 3^D convs are
~2x faster; a skip projection's output is read voxel-major ([r^D, C], a learned layout: the same model up to
a permutation of its initialisation). "conv" keeps the original modules and layout: its checkpoints load as
before. Measured side by side on the 2-core CPU (tools/profile.py, nano, a 197 x 233 x 189 4-channel volume,
2048 tokens of 8^3): the decoder's backward, the largest part of the step, 4.16 -> 1.91 s with "add" (2.2x),
its forward 2.33 -> 1.48 s, the step 12.0 -> 8.3 s.
"conv" is the default: on the 3-D quick start (2 ranks, 200 steps) "add" trains 1.47x faster (4.13 against 2.81
samples/s) but reaches mean Dice 0.940 against 0.953, so the cheap fuse is a choice, not the default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hrvit.parallel.shard import TokenRings

SKIP_RESOLUTIONS = (8, 4, 2)
"""Side length at which the hidden states after d/4, d/2 and 3d/4 blocks enter (UNETR order)."""

FUSES = ("conv", "pointwise", "add")
"""How a stage mixes its inputs (module docstring)."""


class PointwiseConv(nn.Module):
    """A 1^D conv computed as a matmul over the channel axis: the same map, parameters and initialisation as
    `nn.Conv{2,3}d(c_in, c_out, 1)`, but on CPU oneDNN's 1x1x1 conv backward is several times slower than the
    matmul. Returns a channels-last [N, C, *S] map (no copy when the input is channels-last too)."""

    def __init__(self, ndim: int, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        conv = (nn.Conv2d if ndim == 2 else nn.Conv3d)(c_in, c_out, 1, bias=bias)
        self.weight, self.bias = conv.weight, conv.bias
        self.in_channels, self.out_channels = c_in, c_out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)


class UpConv(nn.Module):
    """`nn.ConvTranspose{2,3}d(c_in, c_out, 2, stride=2)` (same map, parameters and initialisation) as one matmul
    per voxel (each input voxel becomes a 2^D block of c_out channels) and one reshuffle into a channels-last map:
    on CPU oneDNN's transposed conv takes several times longer, forward and backward."""

    def __init__(self, ndim: int, c_in: int, c_out: int):
        super().__init__()
        up = (nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d)(c_in, c_out, 2, stride=2)
        self.weight, self.bias = up.weight, up.bias  # [c_in, c_out, 2, ...], [c_out]
        self.ndim, self.in_channels, self.out_channels = ndim, c_in, c_out

    def forward(self, x: Tensor) -> Tensor:
        n, _, *size = x.shape
        d, c = self.ndim, self.out_channels
        y = F.linear(x.flatten(2).transpose(1, 2), self.weight.flatten(1).t(), self.bias.repeat_interleave(2**d))
        y = y.view(n, *size, c, *(2,) * d)  # [n, *size, c, 2, ...] -> [n, size0, 2, size1, 2, ..., c]
        order = [0, *(k for i in range(d) for k in (1 + i, d + 2 + i)), d + 1]
        return y.permute(order).reshape(n, *(2 * v for v in size), c).movedim(-1, 1)


class ConvNormAct(nn.Sequential):
    """conv 3^D (or a 1^D PointwiseConv) + GroupNorm + GELU; GroupNorm because its statistics stay inside one
    token. Given `rings` (TokenRings), a 3^D conv reads its border from the neighbouring tokens' maps instead of
    zeros."""

    def __init__(self, ndim: int, c_in: int, c_out: int, kernel: int = 3):
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        super().__init__(
            conv(c_in, c_out, 3, bias=False) if kernel == 3 else PointwiseConv(ndim, c_in, c_out, False),
            nn.GroupNorm(math.gcd(8, c_out), c_out),
            nn.GELU(),
        )

    def forward(self, x: Tensor, rings: TokenRings | None = None) -> Tensor:
        """The conv runs unpadded on the map with its ring (zeros without `rings`); it is called as a module so
        ZeRO-3 gathers its weight."""
        if not isinstance(self[0], PointwiseConv):
            x = rings(x) if rings is not None else F.pad(x, (1,) * 2 * (x.dim() - 2))
        return self[2](self[1](self[0](x)))


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
        fuse: str = "conv",
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim={ndim}: the decoder is 2-D or 3-D")
        if fuse not in FUSES:
            raise ValueError(f"fuse={fuse!r}: expected one of {', '.join(FUSES)}")
        stages = int(math.log2(patch_size))
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"patch_size={patch_size} must be a power of two")
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(
                f"decoder channels={tuple(channels)} must be positive widths"
            )
        self.ndim, self.patch_size, self.fuse_kind = ndim, patch_size, fuse
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
        # "conv" keeps the original modules (old checkpoints, the reference); the others use the same maps
        # computed as matmuls, which oneDNN runs several times faster on CPU
        fast = fuse != "conv"
        self.ups = nn.ModuleList(
            UpConv(ndim, width[s - 1], width[s]) if fast else up(width[s - 1], width[s], 2, stride=2)
            for s in range(1, stages + 1)
        )
        blocks = []
        for s in range(1, stages + 1):
            inputs = 1 + self.skip_res.count(2**s) + (s == stages)
            kernel = {"conv": 3, "pointwise": 1, "add": 0}[fuse]  # of the conv over the concatenation; 0: none
            mix = [ConvNormAct(ndim, inputs * width[s], width[s], kernel)] if kernel else []
            blocks.append(nn.Sequential(*mix, ConvNormAct(ndim, width[s], width[s])))
        self.fuse = nn.ModuleList(blocks)
        self.head = PointwiseConv(ndim, width[stages], num_classes) if fast else conv(width[stages], num_classes, 1)

    def set_group(self, group) -> None:
        """Decode the tokens this rank holds of a sequence its SP `group` shares (their neighbours may lie on
        other ranks: TokenRings exchanges the border pixels)."""
        self.group = group

    def forward(self, hidden: Sequence[Tensor], pixels: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
        """hidden: 4 x [B, L, dim] (after d/4, d/2, 3d/4, d blocks); pixels [B, L, C, *P]; boxes [B, L, 2D] and
        valid [B, L] place the tokens, so every 3^D conv sees across token borders -> [B, L, K, *P]."""
        if len(hidden) != 4:
            raise ValueError(f"UNETRDecoder needs 4 hidden states, got {len(hidden)}")
        B, L = pixels.shape[:2]
        n, d = B * L, self.ndim
        rings = TokenRings(boxes, valid, [2**s for s in range(1, len(self.ups) + 1)], getattr(self, "group", None))
        flat = [h.reshape(n, h.shape[-1]) for h in hidden]
        x = self.bottleneck(flat[3]).view(n, -1, *(1,) * d)
        skips: dict[int, list[Tensor]] = {}
        last = self.fuse_kind != "conv"  # channels-last maps (module docstring)
        for h, r, proj in zip(flat[:3], self.skip_res, self.skips):
            skip = proj(h).view(n, *(r,) * d, -1).movedim(-1, 1) if last else proj(h).view(n, -1, *(r,) * d)
            skips.setdefault(r, []).append(skip)
        for s, (up, fuse) in enumerate(zip(self.ups, self.fuse), start=1):
            parts = [up(x), *skips.get(2**s, [])]
            if 2**s == self.patch_size:
                stem_in = pixels.reshape(n, *pixels.shape[2:]).to(x.dtype)
                if last:
                    stem_in = stem_in.contiguous(memory_format=torch.channels_last_3d if d == 3 else
                                                 torch.channels_last)
                parts.append(self.stem(stem_in, rings))
            x = functools.reduce(torch.add, parts) if self.fuse_kind == "add" else torch.cat(parts, 1)
            for block in fuse:
                x = block(x, rings)
        out = self.head(x).contiguous()
        return out.view(B, L, *out.shape[1:])
