"""Attention across the ranks of an SP group: DeepSpeed-Ulysses, ring attention, and both at once.

Ulysses: each rank holds a slice of the tokens; an all-to-all gives it every token of H/U heads, the
inner attention runs with the key mask of the whole sequence, and a second all-to-all returns the
rank's own tokens with every head. Its degree U must divide the heads.

Ring: each rank holds one consecutive block of the sequence with every head; key/value blocks travel
around the ring and each rank folds them into its queries' output with online-softmax rescaling, so no
rank ever holds more than its own block and one visiting block. No head limit.

Ulysses x ring (USP, Fang & Zhao 2024): the SP group of U x R ranks is R Ulysses groups of U consecutive
ranks; after the Ulysses all-to-all the ranks with the same place in their Ulysses group hold the R
consecutive blocks of the sequence and run ring attention among themselves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hrvit.models.vit import AttentionCore, local_attention
from hrvit.parallel import comm

SCORE_ELEMENTS = 1 << 24
"""Attention scores computed at once (64 MiB in fp32): queries are taken in chunks of this many scores
against one key block, so ring attention's memory stays linear in the sequence length."""


def ulysses_core(group, inner: AttentionCore = local_attention) -> AttentionCore:
    """An attention core for ViTEncoder.set_attention_core that spans the Ulysses `group`.

    q, k, v are [B, L/U, H, Dh] (this rank's tokens); key_valid is [B, L] (all tokens, in rank order) or
    None. The sequence must already be padded to a multiple of the group size: DistributedAttention
    silently mixes tokens up otherwise. `inner` gets [B, L, H/U, Dh] (ring attention: [B, L/R, ...]).
    """
    from deepspeed.sequence.layer import DistributedAttention

    # scatter heads (dim 2), gather the sequence (dim 1); batch is dim 0
    attention = DistributedAttention(inner, group, scatter_idx=2, gather_idx=1)

    def core(q, k, v, key_valid):
        # the extra argument after rotary_pos_emb reaches `inner` unchanged
        return attention(q.contiguous(), k.contiguous(), v.contiguous(), 0, None, key_valid)

    return core


def ring_core(group) -> AttentionCore:
    """An attention core over the ring `group`: q, k, v are [B, n, H, Dh], this rank's block of the R
    consecutive blocks of the sequence (block = rank in the group); key_valid [B, R * n] or None."""
    size = dist.get_world_size(group)

    def core(q, k, v, key_valid):
        batch, n = q.shape[:2]
        blocks = None
        if key_valid is not None:
            # a sample with no real key would softmax over nothing (NaN); it sees all keys, as in local_attention
            blocks = (key_valid | ~key_valid.any(-1, keepdim=True)).view(batch, size, n)
        out = _RingAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), blocks, group)
        return out.transpose(1, 2)

    return core


def sequence_parallel_core(sp) -> AttentionCore:
    """The attention core for a SequenceParallel layout: Ulysses, ring, or Ulysses over ring."""
    if sp.ring == 1:
        return ulysses_core(sp.ulysses_group)
    ring = ring_core(sp.ring_group)
    return ring if sp.ulysses == 1 else ulysses_core(sp.ulysses_group, ring)


def _query_chunks(queries: int, keys: int, heads: int, batch: int) -> list[slice]:
    step = max(1, SCORE_ELEMENTS // max(1, keys * heads * batch))
    return [slice(i, min(i + step, queries)) for i in range(0, queries, step)]


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 scores [B, H, q, k] with masked keys at -inf."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s.masked_fill_(~mask[:, None, None, :], float("-inf"))
    return s


def _fused(q: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash-attention kernels (which return the log-sum-exp ring attention needs)
    serve this block; elsewhere the chunked torch code below does the same arithmetic."""
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    return None if mask is None else \
        torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None]


def block_forward(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q against one key/value block: fp32 output [B, H, n, Dh] and log-sum-exp [B, H, n]
    (-inf, with output 0, for rows whose keys in this block are all masked)."""
    if _fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_additive(mask, q.dtype), scale=scale)
        if mask is not None:  # the kernel gives lse 0 where a whole block is masked
            lse = lse.masked_fill(~mask.any(-1)[:, None, None], float("-inf"))
        return out.float(), lse
    batch, heads, n, dh = q.shape
    out = torch.empty(batch, heads, n, dh, device=q.device)
    lse = torch.empty(batch, heads, n, device=q.device)
    for c in _query_chunks(n, k.shape[2], heads, batch):
        s = _scores(q[:, :, c], k, mask, scale)
        lse[..., c] = torch.logsumexp(s, -1)
        finite = torch.where(torch.isinf(lse[..., c]), torch.zeros_like(lse[..., c]), lse[..., c])
        out[:, :, c] = s.sub_(finite[..., None]).exp_() @ v.float()  # in place: the scores are the largest tensor
    return out, lse


def block_backward(dout, q, k, v, out, lse, mask, scale: float):
    """Gradients of the whole attention's output with respect to q and this block's k, v, given the whole
    output and log-sum-exp (as flash attention's backward takes them): fp32 (dq, dk, dv)."""
    if _fused(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, False, attn_mask=_additive(mask, q.dtype), scale=scale)
        return dq.float(), dk.float(), dv.float()
    batch, heads, n, _ = q.shape
    qf, do, kf, vf = q.float(), dout.float(), k.float(), v.float()
    delta = (do * out.float()).sum(-1)  # rowsum(dO * O): the softmax backward's correction term
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for c in _query_chunks(n, k.shape[2], heads, batch):
        p = _scores(qf[:, :, c], kf, mask, scale).sub_(lse[..., c, None]).exp_()
        dv += p.transpose(-1, -2) @ do[:, :, c]
        ds = (do[:, :, c] @ vf.transpose(-1, -2)).sub_(delta[..., c, None]).mul_(p)
        dq[:, :, c] = (ds @ kf) * scale
        dk += (ds.transpose(-1, -2) @ qf[:, :, c]) * scale
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """Bidirectional softmax attention of this rank's queries against every block of the ring.

    Forward: R steps; at step t the rank holds the key/value block of rank (me - t) mod R, sends it on
    while computing with it, and merges the block's output into its own by log-sum-exp (online softmax).
    Backward takes each block's gradients from the whole output and log-sum-exp (as flash attention does);
    each block's key/value gradients travel around the ring with the block and one last step brings them
    home. Saved: q, k, v, output and log-sum-exp, all of this rank's size.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_valid, group):
        # q, k, v: [B, H, n, Dh]; key_valid: [B, R, n] bool (block j's mask at [:, j]) or None
        size, me = dist.get_world_size(group), dist.get_rank(group)
        scale = q.shape[-1] ** -0.5
        out = lse = None
        kv = torch.stack([k, v])
        for step in range(size):
            wait = comm.ring_shift(kv, group) if step < size - 1 else None
            mask = None if key_valid is None else key_valid[:, (me - step) % size]
            block_out, block_lse = block_forward(q, kv[0], kv[1], mask, scale)
            if out is None:
                out, lse = block_out, block_lse
            else:
                new = torch.logaddexp(lse, block_lse)
                finite = torch.where(torch.isinf(new), torch.zeros_like(new), new)
                out = out * torch.exp(lse - finite)[..., None] + block_out * torch.exp(block_lse - finite)[..., None]
                lse = new
            if wait is not None:
                kv = wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, key_valid)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, key_valid = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        size, me = dist.get_world_size(group), dist.get_rank(group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, device=q.device)
        # block j's keys and values, and their gradients so far, travel together
        block = torch.stack([k.float(), v.float(), torch.zeros(k.shape, device=k.device),
                             torch.zeros(v.shape, device=v.device)])
        for step in range(size):
            mask = None if key_valid is None else key_valid[:, (me - step) % size]
            kb, vb = block[0].to(k.dtype), block[1].to(v.dtype)
            gq, gk, gv = block_backward(dout, q, kb, vb, out, lse, mask, scale)
            dq += gq
            block[2] += gk
            block[3] += gv
            block = comm.ring_shift(block if step < size - 1 else block[2:], group)()
        dk, dv = block  # after R shifts each block's gradients are back on the rank that owns it
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None
