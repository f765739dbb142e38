"""Dice + cross-entropy for segmentation tokens; pixels labelled IGNORE_INDEX do not count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hrvit.patching import IGNORE_INDEX


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0,
                      ce_weight: float = 1.0, smooth: float = 1.0) -> torch.Tensor:
    """logits [N, K, *s], target [N, *s] -> weighted soft Dice (all classes) + cross-entropy."""
    k = logits.shape[1]
    logits = logits.movedim(1, -1).reshape(-1, k).float()
    target = target.reshape(-1)
    keep = target != IGNORE_INDEX
    logits, target = logits[keep], target[keep]
    if target.numel() == 0:
        return logits.sum() * 0.0
    loss = logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits, target)
    if dice_weight:
        probs = logits.softmax(-1)
        onehot = F.one_hot(target, k).to(probs.dtype)
        inter = (probs * onehot).sum(0)
        denom = probs.sum(0) + onehot.sum(0)
        loss = loss + dice_weight * (1.0 - ((2 * inter + smooth) / (denom + smooth)).mean())
    return loss
