"""Cutting a batch's token sequence across an SP group and putting model outputs back together."""

from __future__ import annotations

import math

import torch

from hrvit.errors import ConfigError
from hrvit.parallel import comm
from hrvit.patching import IGNORE_INDEX

_FILL = {"pixels": 0, "boxes": 0, "level": 0, "valid": False, "target": IGNORE_INDEX}
"""Padding per batch field: padded tokens are invalid, and their pixels never count."""


def token_order(valid: torch.Tensor, sp_size: int) -> torch.Tensor:
    """[B, L] positions of a padded sequence (L a multiple of sp_size) in the order the SP group holds
    them; rank r holds order[:, r * L/sp : (r + 1) * L/sp]. Real tokens come first (stable) and are dealt
    to the ranks in turn, so each rank holds the same number of real tokens as any other, up to one,
    wherever the padding lies (adaptive sequences end in it, windows at the image edge have it inside)."""
    batch, length = valid.shape
    first = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
    return first.view(batch, length // sp_size, sp_size).transpose(1, 2).reshape(batch, length)


def shard_batch(batch: dict, sp_size: int, sp_rank: int) -> dict:
    """This rank's share of the token fields of a collated batch, plus `key_valid`, the valid mask of the
    whole (padded) sequence in the order the group holds it, which every rank's attention needs, and
    `token_order` (see token_order), which gather_tokens needs to put outputs back in place.

    Attention and the per-token decoder do not depend on the order of the tokens, and the loss sums
    over them, so only gathered outputs need putting back.
    """
    length = batch["valid"].shape[1]
    if length < sp_size:
        raise ConfigError(f"parallel.sp_size: {sp_size} is more than the {length} token(s) of a window; "
                          "use a larger data.window or a smaller parallel.sp_size")
    padded = math.ceil(length / sp_size) * sp_size
    local = padded // sp_size

    def pad(t, fill):
        more = padded - length
        return torch.cat([t, t.new_full((t.shape[0], more, *t.shape[2:]), fill)], 1) if more else t

    valid = pad(batch["valid"], False)
    order = token_order(valid, sp_size)
    rows = torch.arange(order.shape[0], device=order.device)[:, None]
    mine = order[:, sp_rank * local:(sp_rank + 1) * local]
    out = dict(batch, key_valid=valid[rows, order], token_order=order)
    for key, fill in _FILL.items():
        if key in batch:
            out[key] = pad(batch[key], fill)[rows, mine]
    return out


def gather_tokens(local: torch.Tensor, group, order: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L/sp, ...] shares of the SP group -> [B, length, ...] in sequence order (padding dropped);
    `order` is the batch's token_order. No gradient."""
    held = torch.cat(comm.all_gather(local, group), dim=1)
    out = torch.empty_like(held)
    out[torch.arange(held.shape[0], device=held.device)[:, None], order.to(held.device)] = held
    return out[:, :length]


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

    def __call__(self, pixels, boxes, valid, scale):
        local = shard_batch({"pixels": pixels, "boxes": boxes, "valid": valid}, self.sp_size, self.sp_rank)
        logits = self.model(local["pixels"], local["boxes"], local["valid"], scale, local["key_valid"])
        return gather_tokens(logits, self.group, local["token_order"], valid.shape[1])
