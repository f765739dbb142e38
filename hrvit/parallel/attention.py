"""DeepSpeed-Ulysses attention for the encoder: each rank holds a slice of the tokens; an all-to-all
gives it every token of H/sp heads, the local attention runs with the key mask of the whole
sequence, and a second all-to-all returns the rank's own tokens with every head."""

from __future__ import annotations

from hrvit.models.vit import AttentionCore, local_attention


def ulysses_core(group) -> AttentionCore:
    """An attention core for ViTEncoder.set_attention_core that spans the SP `group`.

    q, k, v are [B, L/sp, H, Dh] (this rank's tokens); key_valid is [B, L] (all tokens, in
    rank order) or None. The sequence must already be padded to a multiple of the group size:
    DistributedAttention silently mixes tokens up otherwise.
    """
    from deepspeed.sequence.layer import DistributedAttention

    # scatter heads (dim 2), gather the sequence (dim 1); batch is dim 0
    attention = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def core(q, k, v, key_valid):
        # the extra argument after rotary_pos_emb reaches local_attention unchanged
        return attention(q.contiguous(), k.contiguous(), v.contiguous(), 0, None, key_valid)

    return core
