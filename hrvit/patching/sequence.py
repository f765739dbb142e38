"""`PatchSequence`: the one contract between patchers and the model (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -1
"""Target value for pixels outside the image (edge tokens); losses and metrics skip it."""


@dataclass
class PatchSequence:
    """One sample as a sequence of tokens; axis order is array order, (y, x) or (z, y, x).

    pixels [L, C, *p]; boxes [L, 2*D] (start..., size...) in level-0 pixels; level [L] =
    log2(size / p); valid [L] False for padding; target [L, *p] (optional, IGNORE_INDEX
    outside the image); score [L] (optional); image_shape: full-resolution spatial shape; scale: level-0
    pixels per working pixel (data.mpp / the slide's microns per pixel; 1 without data.mpp), which the model
    divides boxes by so that position and size are physical.
    """

    pixels: torch.Tensor
    boxes: torch.Tensor
    level: torch.Tensor
    valid: torch.Tensor
    image_shape: tuple[int, ...]
    target: torch.Tensor | None = None
    score: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)
    scale: float = 1.0

    @property
    def ndim(self) -> int:
        return len(self.image_shape)

    @property
    def patch_size(self) -> int:
        return int(self.pixels.shape[-1])

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(self.valid.sum())


def collate(samples: list[PatchSequence]) -> dict:
    """Stack samples into a batch dict, padding every sequence to the longest with invalid tokens."""
    length = max(len(s) for s in samples)

    def pad(t: torch.Tensor, fill) -> torch.Tensor:
        extra = length - t.shape[0]
        if extra == 0:
            return t
        return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)])

    batch = {
        "pixels": torch.stack([pad(s.pixels, 0) for s in samples]),
        "boxes": torch.stack([pad(s.boxes, 0) for s in samples]),
        "level": torch.stack([pad(s.level, 0) for s in samples]),
        "valid": torch.stack([pad(s.valid, False) for s in samples]),
        "image_shape": torch.tensor([s.image_shape for s in samples], dtype=torch.long),
        "scale": torch.tensor([s.scale for s in samples], dtype=torch.float32),
        "meta": [s.meta for s in samples],
    }
    if all(s.target is not None for s in samples):
        batch["target"] = torch.stack([pad(s.target, IGNORE_INDEX) for s in samples])
    return batch


def to_device(batch: dict, device) -> dict:
    """The collated batch with every tensor on `device` (a no-op on CPU); other fields as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
