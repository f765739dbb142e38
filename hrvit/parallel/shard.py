"""Cutting a batch's token sequence across an SP group and putting model outputs back together."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from hrvit.errors import ConfigError
from hrvit.parallel import comm
from hrvit.patching import IGNORE_INDEX
from hrvit.patching.neighbours import ring_index

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


class _GatherRows(torch.autograd.Function):
    """All-gather of equally long row blocks, rank-major; backward sums every rank's gradient of the whole
    gathered buffer and keeps this rank's block (each block is used by all ranks)."""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), dist.get_world_size(group)
        return torch.cat(comm.all_gather(rows, group))

    @staticmethod
    def backward(ctx, grad):
        total = comm.all_reduce(grad.contiguous().clone(), group=ctx.group)
        block = grad.shape[0] // ctx.size
        return total[ctx.rank * block:(ctx.rank + 1) * block], None


def _side_by_side(boxes: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of a batch (boxes [B, L, 2D], valid [B, L]) as one sequence [B * L, 2D], sample b moved along the
    first axis by b times a multiple of every leaf size there (so no leaf changes its phase) that clears the others
    by more than a leaf: one neighbour lookup serves the whole batch, and no sample sees another."""
    B, D = boxes.shape[0], boxes.shape[-1] // 2
    boxes = boxes.long()
    if B > 1 and bool(valid.any()):
        start, edge = boxes[..., 0][valid], boxes[..., D][valid].clamp(min=1)
        sizes = torch.unique(edge).tolist()
        step = math.lcm(*sizes)
        span = int((start + edge).max() - start.min()) + max(sizes)
        shift = torch.zeros_like(boxes)
        shift[..., 0] = torch.arange(B, device=boxes.device)[:, None] * (-(-span // step) * step)
        boxes = boxes + shift
    return boxes.reshape(-1, 2 * D), valid.reshape(-1)


class _RecentPlans:
    """The ring plans of recent sequences, up to `limit` bytes, newest kept. Training on whole slides meets every
    slide's tree again each epoch (and a few flipped variants of it), so the plan, about 8 % of a 2-rank CPU
    step, is mostly looked up; windows of a large slide rarely repeat and only cost the lookup (a digest of the
    boxes, copied to the host: a few KB, while the plans stay on the boxes' device)."""

    def __init__(self, limit: int = 256 * 2**20):
        self.limit, self.held, self.plans = limit, 0, OrderedDict()

    @staticmethod
    def _bytes(plans: dict) -> int:
        return sum(t.numel() * t.element_size() for pair in plans.values() for t in pair if t is not None)

    def get(self, key):
        if key in self.plans:
            self.plans.move_to_end(key)
            return self.plans[key]
        return None

    def put(self, key, plans: dict) -> None:
        size = self._bytes(plans)
        if size > self.limit // 4:
            return
        self.plans[key] = plans
        self.held += size
        while self.held > self.limit:
            self.held -= self._bytes(self.plans.popitem(last=False)[1])


_PLANS = _RecentPlans()


class TokenRings:
    """Pads every token's r^D decoder map with the one-pixel ring taken from its neighbours' maps
    (hrvit.patching.neighbours), so the decoder's convolutions see across token borders.

    boxes [B, n, 2D] and valid [B, n] are this process's tokens. With an SP `group`, the ranks hold the
    sequence's tokens in turn (shard_batch), so a ring pixel may lie in another rank's token: every rank
    plans the same exchange from the group's boxes, sends the map pixels others need (one all-gather of
    equal blocks per convolution; the gradient flows back the same way) and takes the rest from its own
    maps. Without a group this process holds every token and nothing is sent.
    """

    def __init__(self, boxes: torch.Tensor, valid: torch.Tensor, sides: Iterable[int], group=None):
        self.group, self.ndim = group, boxes.shape[-1] // 2
        rank, size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        if size > 1:
            boxes = torch.cat(comm.all_gather(boxes, group), 1)
            valid = torch.cat(comm.all_gather(valid.to(torch.uint8), group), 1).bool()
        key = (rank, size, tuple(sides), str(boxes.device), str(boxes.dtype), tuple(boxes.shape),
               hashlib.blake2b(boxes.cpu().numpy().tobytes() + valid.cpu().numpy().tobytes(), digest_size=16).digest())
        self.plans = _PLANS.get(key)
        if self.plans is None:
            self.plans = {r: self._plan(boxes, valid, r, rank, size) for r in sides}
            _PLANS.put(key, self.plans)

    @staticmethod
    def _plan(boxes, valid, r: int, rank: int, size: int):
        """(index into [own maps; gathered blocks; a zero row], this rank's block of pixels to send or None)."""
        B, total = valid.shape
        n, R = total // size, r ** (boxes.shape[-1] // 2)
        entry = ring_index(*_side_by_side(boxes, valid), r).view(B, total, -1)  # pixels of the whole group, flat
        held = (entry // R) % total  # the token a pixel belongs to, in the group's order

        def local(e):  # an entry's position in its own rank's maps [B * n * R]
            return ((e // (total * R)) * n + (e // R) % total % n) * R + e % R

        own_count = B * n * R
        mine = entry[:, rank * n:(rank + 1) * n]
        if size == 1:
            return torch.where(mine >= 0, local(mine), own_count).reshape(B * n, -1), None
        token_rank = (torch.arange(total, device=boxes.device) // n)[None, :, None]
        foreign = (entry >= 0) & (held // n != token_rank)
        needed = torch.unique(entry[foreign])
        owner = (needed // R) % total // n
        needed = needed[torch.argsort(owner * (B * total * R) + needed)]  # grouped by owner, sorted within
        owner = (needed // R) % total // n
        counts = torch.bincount(owner, minlength=size)
        block = int(counts.max()) if needed.numel() else 0
        if block == 0:
            return torch.where(mine >= 0, local(mine), own_count).reshape(B * n, -1), None
        first = torch.cumsum(counts, 0) - counts
        slot = owner * block + torch.arange(len(needed), device=needed.device) - first[owner]
        send = torch.zeros(block, dtype=torch.long, device=needed.device)
        send[:int(counts[rank])] = local(needed[owner == rank])
        key = owner * (B * total * R) + needed  # sorted
        mine_owner = torch.where(mine >= 0, (mine // R) % total // n, rank)
        at = torch.searchsorted(key, mine_owner * (B * total * R) + mine.clamp(min=0)).clamp(max=len(key) - 1)
        index = torch.where(mine < 0, own_count + size * block,
                            torch.where(mine_owner == rank, local(mine), own_count + slot[at]))
        return index.reshape(B * n, -1), send

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B * n, C, *(r,) * D] -> [B * n, C, *(r + 2,) * D]."""
        N, C, r = x.shape[0], x.shape[1], x.shape[-1]
        index, send = self.plans[r]
        flat = x.movedim(1, -1).reshape(-1, C)
        parts = [flat]
        if send is not None:
            parts.append(_GatherRows.apply(flat[send], self.group))
        parts.append(flat.new_zeros(1, C))
        ringed = torch.cat(parts)[index]  # [N, (r + 2)^D, C]
        return ringed.view(N, *(r + 2,) * self.ndim, C).movedim(-1, 1)
