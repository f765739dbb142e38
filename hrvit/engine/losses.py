"""Dice + cross-entropy for segmentation tokens; pixels labelled IGNORE_INDEX do not count.

The loss is computed from sums (cross-entropy sum, pixel count, per-class intersections and
denominators), so the ranks of a sequence-parallel group, each holding some of the tokens, can
add their sums and get exactly the loss of the whole sequence: Dice is not an average of
per-slice Dice scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrvit.patching import IGNORE_INDEX


def segmentation_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [N, K, *s], target [N, *s] -> [2 + 3K]: CE sum, pixel count, intersections, prob sums, label counts."""
    k = logits.shape[1]
    logits = logits.movedim(1, -1).reshape(-1, k).float()
    target = target.reshape(-1)
    keep = target != IGNORE_INDEX
    logits, target = logits[keep], target[keep]
    probs = logits.softmax(-1)
    onehot = F.one_hot(target, k).to(probs.dtype)
    ce = F.cross_entropy(logits, target, reduction="sum")
    count = torch.tensor([float(target.numel())], device=logits.device)
    return torch.cat([ce[None], count, (probs * onehot).sum(0), probs.sum(0), onehot.sum(0)])


def loss_from_sums(sums: torch.Tensor, dice_weight: float = 1.0, ce_weight: float = 1.0,
                   smooth: float = 1.0) -> torch.Tensor:
    """Weighted soft Dice (all classes) + mean cross-entropy from segmentation_sums (possibly summed over ranks)."""
    k = (sums.numel() - 2) // 3
    ce, count = sums[0], sums[1]
    inter, denom = sums[2:2 + k], sums[2 + k:2 + 2 * k] + sums[2 + 2 * k:]
    loss = sums.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * ce / count.clamp(min=1.0)
    if dice_weight:
        loss = loss + dice_weight * (1.0 - ((2 * inter + smooth) / (denom + smooth)).mean())
    return loss


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      ce_weight: float = 1.0, smooth: float = 1.0) -> torch.Tensor:
    """logits [N, K, *s], target [N, *s] -> weighted soft Dice (all classes) + cross-entropy."""
    return loss_from_sums(segmentation_sums(logits, target), dice_weight, ce_weight, smooth)
