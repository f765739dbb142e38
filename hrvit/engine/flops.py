"""Model FLOPs of a training step, from the architecture (no profiler, no hooks), for MFU.

Convention (the one of the PaLM paper's MFU and torchtitan's logs, so figures compare):
- a multiply-add is 2 FLOPs; only matrix products and convolutions are counted (norms,
  activations, softmax and the Fourier features are a few per cent and left out);
- attention counts QK^T and AV over the whole sequence as it is computed, padding included,
  i.e. 4 * L^2 * dim per block and sample;
- a training step is 3 x the forward (backward = 2 x forward: gradients of activations and of
  weights). Activation checkpointing recomputes the forward, but that is not model work, so
  it does not change these figures (MFU falls instead).

`train_step_flops(model, seq_len, samples)` is what a training loop divides by its step time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

BACKWARD_FACTOR = 3
"""Forward + backward = 3 x forward."""


def encoder_forward_flops(seq_len: int, *, embed_dim: int, depth: int, mlp_hidden: int, ndim: int,
                          patch_size: int, in_chans: int, box_features: int) -> int:
    """Forward FLOPs of ViTEncoder on one sample of `seq_len` tokens."""
    L, d = seq_len, embed_dim
    embed = 2 * L * d * (in_chans * patch_size**ndim + box_features)  # pixel conv + box Linear
    linear = 2 * L * d * (3 * d + d + 2 * mlp_hidden)  # qkv, proj, fc1, fc2
    attention = 4 * L * L * d  # QK^T and AV
    return embed + depth * (linear + attention)


def decoder_forward_flops(*, ndim: int, patch_size: int, in_chans: int, embed_dim: int, num_classes: int,
                          channels: Sequence[int], skip_res: Sequence[int], fuse: str = "conv") -> int:
    """Forward FLOPs of UNETRDecoder per token (it decodes every token on its own, so it is linear in L);
    `fuse` is the decoder's fuse kind: "conv" (two 3^D convs per stage), "pointwise" (1^D then 3^D) or "add"
    (one 3^D conv over the sum of the inputs; the sum itself is not counted)."""
    stages = int(math.log2(patch_size))
    width = [channels[min(s, len(channels) - 1)] for s in range(stages + 1)]
    k3, fine = 3**ndim, patch_size**ndim
    flops = 2 * embed_dim * width[0]  # bottleneck
    flops += sum(2 * embed_dim * width[int(math.log2(r))] * r**ndim for r in skip_res)
    for s in range(1, stages + 1):
        pixels = 2 ** (s * ndim)
        inputs = 1 + list(skip_res).count(2**s) + (s == stages)
        flops += 2 * pixels * width[s - 1] * width[s]  # transposed conv, kernel 2 stride 2
        mix = {"conv": k3, "pointwise": 1, "add": 0}[fuse]  # the fuse stage's conv over the concatenation
        flops += 2 * pixels * inputs * width[s] * width[s] * mix + 2 * pixels * width[s] * width[s] * k3
    flops += 2 * fine * in_chans * width[-1] * k3  # pixel stem
    flops += 2 * fine * width[-1] * num_classes  # 1x1 head
    return flops


def forward_flops(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per sample of a Segmenter (encoder + decoder) or a bare ViTEncoder, read
    from the modules' shapes, which are intact under ZeRO-3 partitioning."""
    encoder = getattr(model, "encoder", model)
    flops = encoder_forward_flops(
        seq_len, embed_dim=encoder.embed_dim, depth=encoder.depth, mlp_hidden=encoder.blocks[0].mlp.fc1.out_features,
        ndim=encoder.ndim, patch_size=encoder.patch_size, in_chans=encoder.in_chans,
        box_features=encoder.box_embed.proj.in_features)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        flops += seq_len * decoder_forward_flops(
            ndim=decoder.ndim, patch_size=decoder.patch_size, in_chans=decoder.stem[0].in_channels,
            embed_dim=decoder.bottleneck.in_features, num_classes=decoder.head.out_channels,
            channels=decoder.channels, skip_res=decoder.skip_res, fuse=decoder.fuse_kind)
    return flops


def train_step_flops(model: nn.Module, seq_len: int, samples: int) -> int:
    """Model FLOPs of forward + backward over `samples` sequences of `seq_len` tokens (padding included)."""
    return BACKWARD_FACTOR * samples * forward_flops(model, seq_len)
