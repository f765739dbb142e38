"""Image-level recognition from selected patches: a patch embedder and a cross-attention MIL head.

`PatchEmbedder` turns each IPS patch (S x S pixels) into one vector with any hrvit encoder preset:
the patch is cut into (S/p)^2 tokens, encoded, and the final hidden states are averaged. Patches
never see each other here, which is what lets IPS score them in independent chunks.

`CrossAttentionMIL` aggregates a set of patch embeddings with one learned query per task
(multi-head cross-attention, then an MLP per task). Its attention weights, averaged over heads and
tasks, are the patch scores IPS ranks by. Padding patches (valid=False) get no attention.

The head normalises embeddings with `PatchNorm` (batch statistics over real patches), not a
per-vector LayerNorm: patches of one slide share most of their embedding (background, the same
intra-patch token positions), and what tells a lesion from glass is a few per cent of each vector.
LayerNorm keeps that common part, so attention starts uniform and the signal of 3 target patches
among 256 is diluted 85-fold: on synthetic megapixel canvases the loss stayed at ln 4 for 150 steps
even with every patch given. Removing the mean over patches makes the target patches stand out at
once (loss 0.002 after 120 steps, same data). In eval mode (IPS scoring) the running statistics
are used, so a patch's score does not depend on the chunk it is scored with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hrvit.errors import ConfigError
from hrvit.models.vit import PRESETS, BoxEmbed, ViTEncoder


class PatchEmbedder(nn.Module):
    """[n, C, S, S] patches -> [n, dim]: a ViT over each patch's own p x p tokens, mean-pooled."""

    def __init__(self, encoder: ViTEncoder, patch: int):
        super().__init__()
        p = encoder.patch_size
        if patch % p:
            raise ConfigError(f"ips.patch: {patch} must be a multiple of patching.patch_size ({p})")
        self.encoder, self.patch, self.grid = encoder, patch, patch // p
        ys, xs = torch.meshgrid(torch.arange(self.grid) * p, torch.arange(self.grid) * p, indexing="ij")
        boxes = torch.stack([ys.ravel(), xs.ravel(), torch.full_like(ys.ravel(), p), torch.full_like(xs.ravel(), p)], 1)
        self.register_buffer("boxes", boxes, persistent=False)

    def forward(self, patches: Tensor) -> Tensor:
        n, c = patches.shape[:2]
        p, g = self.encoder.patch_size, self.grid
        tokens = patches.reshape(n, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, c, p, p)
        valid = torch.ones(n, g * g, dtype=torch.bool, device=patches.device)
        scale = torch.ones(n, device=patches.device)
        hidden = self.encoder(tokens, self.boxes.expand(n, -1, -1), valid, scale)[-1]
        return hidden.mean(1)


class PatchNorm(nn.BatchNorm1d):
    """BatchNorm over the real patches of a batch ([B, M, dim]; padding patches take no part).

    Training normalises with the statistics of this process's real patches; the running statistics
    (used in eval mode, i.e. for scoring) are updated from the sums of all processes when `reduce`
    (an all-reduce SUM over the data-parallel ranks, set by the engine) is given, so every rank scores
    alike and a checkpoint evaluates as the run did."""

    reduce: Callable[[Tensor], Tensor] | None = None

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        if not self.training:
            return self._normalise(x, self.running_mean, self.running_var)
        real = x[valid].float()
        with torch.no_grad():  # [sum, sum of squares, count], added over the ranks
            sums = torch.cat([real.sum(0), (real * real).sum(0), real.new_tensor([len(real)])])
            if self.reduce is not None:
                sums = self.reduce(sums)
            dim = x.shape[-1]
            n = sums[-1]
            if n >= 2:
                mean = sums[:dim] / n
                var = (sums[dim:2 * dim] - n * mean * mean).clamp(min=0) / (n - 1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
                self.num_batches_tracked += 1
        if len(real) < 2:  # one patch has no batch statistics of its own
            return self._normalise(x, self.running_mean, self.running_var)
        out = torch.zeros_like(x)
        out[valid] = self._normalise(real, real.mean(0), real.var(0, unbiased=False)).to(x.dtype)
        return out

    def _normalise(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class CrossAttentionMIL(nn.Module):
    """One learned query per task attends over the patch embeddings; an MLP per task classifies."""

    def __init__(self, dim: int, num_classes: list[int], num_heads: int = 8, positions: bool = True,
                 mlp_ratio: float = 2.0, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"ips.heads: {num_heads} does not divide the embedding width {dim}")
        if not num_classes or min(num_classes) < 2:
            raise ConfigError(f"classification tasks need >= 2 classes each, got {num_classes}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.queries = nn.Parameter(torch.randn(len(num_classes), dim) * 0.02)
        self.norm = PatchNorm(dim)
        self.pos = BoxEmbed(2, 1, dim) if positions else None
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        hidden = int(dim * mlp_ratio)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(hidden, c)) for c in num_classes)

    def attention(self, emb: Tensor, boxes: Tensor, image_shape: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Attention weights [B, heads, tasks, M] and values [B, heads, M, head_dim]."""
        b, m, d = emb.shape
        x = self.norm(emb, valid)
        if self.pos is not None:
            x = x + self.pos(boxes, image_shape)
        k = self.k(x).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        q = self.q(self.queries).view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # [heads, T, hd]
        logits = torch.einsum("htd,bhmd->bhtm", q, k) * self.head_dim**-0.5
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        return logits.softmax(-1), v

    def forward(self, emb: Tensor, boxes: Tensor, image_shape: Tensor, valid: Tensor) -> list[Tensor]:
        weights, v = self.attention(emb, boxes, image_shape, valid)
        pooled = torch.einsum("bhtm,bhmd->bthd", weights, v).flatten(2)  # [B, T, dim]
        pooled = self.proj(pooled)
        return [head(pooled[:, t]) for t, head in enumerate(self.heads)]

    def scores(self, emb: Tensor, boxes: Tensor, image_shape: Tensor, valid: Tensor) -> Tensor:
        """[B, M]: attention weight of each patch, averaged over heads and tasks (IPS ranks by it)."""
        return self.attention(emb, boxes, image_shape, valid)[0].mean((1, 2))


class IPSClassifier(nn.Module):
    """Patch embedder + cross-attention head; `score` ranks candidates, `forward` classifies a selection."""

    def __init__(self, embedder: PatchEmbedder, head: CrossAttentionMIL):
        super().__init__()
        self.embedder, self.head = embedder, head

    def score(self, patches: Tensor, boxes: Tensor, image_shape) -> Tensor:
        """Scores [n] of one image's n patches, jointly (the head's softmax runs over all n)."""
        return self.score_embedded(self.embedder(patches), boxes, image_shape)

    def score_embedded(self, emb: Tensor, boxes: Tensor, image_shape) -> Tensor:
        """`score` from the patches' embeddings [n, dim], which IPS keeps from chunk to chunk: a patch's
        embedding does not depend on the other patches, its score does (softmax over the n)."""
        shape = torch.as_tensor(image_shape, device=emb.device).view(1, 2)
        valid = torch.ones(1, len(emb), dtype=torch.bool, device=emb.device)
        return self.head.scores(emb[None], boxes[None], shape, valid)[0]

    def forward(self, pixels: Tensor, boxes: Tensor, valid: Tensor, image_shape: Tensor) -> list[Tensor]:
        """pixels [B, M, C, S, S] of the selected patches -> logits per task, each [B, classes]."""
        b, m = pixels.shape[:2]
        emb = self.embedder(pixels.flatten(0, 1)).view(b, m, -1)
        emb = torch.where(valid[..., None], emb, torch.zeros_like(emb))
        return self.head(emb, boxes, image_shape, valid)


def build_ips_model(preset: str, *, patch_size: int, in_chans: int, ips_patch: int, num_classes: list[int],
                    heads: int = 8, positions: bool = True, embed_dim: int | None = None, depth: int | None = None,
                    num_heads: int | None = None, drop_path: float = 0.0) -> IPSClassifier:
    """An IPS classifier whose patch embedder is the named encoder preset (None = preset value)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; valid: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    encoder = ViTEncoder(ndim=2, patch_size=patch_size, in_chans=in_chans,
                         embed_dim=embed_dim or cfg["embed_dim"], depth=depth or cfg["depth"],
                         num_heads=num_heads or cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                         qkv_bias=cfg["qkv_bias"], drop_path=drop_path)
    head = CrossAttentionMIL(encoder.embed_dim, num_classes, num_heads=heads, positions=positions)
    return IPSClassifier(PatchEmbedder(encoder, ips_patch), head)


def classification_loss(logits: list[Tensor], targets: Tensor) -> Tensor:
    """Mean cross-entropy over tasks; targets [B, tasks]."""
    return sum(F.cross_entropy(lg, targets[:, t]) for t, lg in enumerate(logits)) / len(logits)
