"""Cutting a batch's token sequence across an SP group and putting model outputs back together."""

from __future__ import annotations

import math

import torch

from hrvit.errors import ConfigError
from hrvit.parallel import comm
from hrvit.patching import IGNORE_INDEX

_FILL = {"pixels": 0, "boxes": 0, "level": 0, "valid": False, "target": IGNORE_INDEX}
"""Padding per batch field: padded tokens are invalid, and their pixels never count."""


def shard_batch(batch: dict, sp_size: int, sp_rank: int) -> dict:
    """This rank's slice of the token fields of a collated batch, plus `key_valid`, the valid mask
    of the whole (padded) sequence that every rank's attention needs.

    The sequence is padded with invalid tokens to a multiple of sp_size and cut into sp_size
    consecutive slices; rank r keeps slice r (the order DistributedAttention gathers in).
    """
    length = batch["valid"].shape[1]
    if length < sp_size:
        raise ConfigError(f"parallel.sp_size: {sp_size} is more than the {length} token(s) of a window; "
                          "use a larger data.window or a smaller parallel.sp_size")
    padded = math.ceil(length / sp_size) * sp_size
    local = padded // sp_size
    start = sp_rank * local
    out = dict(batch)
    for key, fill in _FILL.items():
        if key not in batch:
            continue
        t = batch[key]
        if padded > length:
            t = torch.cat([t, t.new_full((t.shape[0], padded - length, *t.shape[2:]), fill)], dim=1)
        if key == "valid":
            out["key_valid"] = t
        out[key] = t[:, start:start + local]
    return out


def gather_tokens(local: torch.Tensor, group, length: int) -> torch.Tensor:
    """[B, L/sp, ...] slices of the SP group -> [B, length, ...] (padding dropped); no gradient."""
    return torch.cat(comm.all_gather(local, group), dim=1)[:, :length]


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward passes the gradient through unchanged. That is the exact
    gradient when every rank of the group computes the same function of the sum (as the loss
    does): each rank's upstream gradient is then already the gradient of the whole loss."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(), group=group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    return _SumOverGroup.apply(x, group)


class SequenceParallelForward:
    """Calls a segmentation model the way a single process would (whole windows in, per-token
    logits of every token out) while the SP group runs it together: each rank feeds its slice of
    the tokens and the logits are gathered. Every rank of the group must call it with the same
    batch (evaluation does)."""

    def __init__(self, model, group, sp_size: int, sp_rank: int):
        self.model, self.group, self.sp_size, self.sp_rank = model, group, sp_size, sp_rank

    def __call__(self, pixels, boxes, valid, image_shape):
        local = shard_batch({"pixels": pixels, "boxes": boxes, "valid": valid}, self.sp_size, self.sp_rank)
        logits = self.model(local["pixels"], local["boxes"], local["valid"], image_shape, local["key_valid"])
        return gather_tokens(logits, self.group, valid.shape[1])
