"""ViT encoder for adaptive tokens, the Segmenter around it, presets and timm weight loading.

Tokens are leaves of a quadtree/octree, not cells of a grid: each carries its own box, so
position comes from the box (Fourier features of centre and scale), not a learned grid
table, and the model is permutation-equivariant over tokens. Blocks have timm's layout, so timm
ViT checkpoints load by name. Attention's softmax step is a swappable callable (`core`)
in the [B, L, H, Dh] layout of DeepSpeed-Ulysses, which is where sequence parallelism
plugs in (hrvit/parallel); this file knows nothing about process groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hrvit.config import where_looked
from hrvit.errors import ConfigError, DataError
from hrvit.models.decoder import FUSES, UNETRDecoder

AttentionCore = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
"""core(q, k, v, key_valid) -> out, all [B, L, H, Dh]; key_valid [B, L] bool (True = real
token) or None when every key is real. Under sequence parallelism q, k, v hold the local
tokens and key_valid the mask of the full sequence."""


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None
) -> Tensor:
    """Single-device attention core: SDPA where padding keys get zero weight."""
    mask = None
    if key_valid is not None:
        # a sample with no real key would softmax over nothing (NaN); let it see all keys instead
        key_valid = key_valid | ~key_valid.any(-1, keepdim=True)
        mask = key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


class TokenAttention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj), so timm checkpoints load; the softmax
    step is the swappable `self.core`, which takes the key mask [B, L_full] bool (True = real token)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.core: AttentionCore = local_attention

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        return self.proj(self.core(q, k, v, key_valid).reshape(B, N, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth, laid out as timm's ViT Block (norm1, attn, norm2, mlp) so
    its checkpoints load by name; hrvit's own code, which keeps timm (and the torchvision and torch._dynamo it
    imports, ~3 s per process) out of every rank's start-up. tests/test_models.py checks it equals timm's Block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor, key_valid: Tensor | None = None) -> Tensor:
        x = x + self._drop(self.attn(self.norm1(x), key_valid))
        return x + self._drop(self.mlp(self.norm2(x)))

    def _drop(self, x: Tensor) -> Tensor:
        """Stochastic depth: in training, each sample's residual branch is dropped with probability drop_path and
        the kept ones scaled by 1 / (1 - drop_path)."""
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class TokenEmbed(nn.Module):
    """Embeds each token's own p^D pixels with timm's PatchEmbed conv (kernel = stride = p,
    so the weights load from timm): on one p-sized token it gives one 1x1 output."""

    def __init__(self, ndim: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.proj = conv(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, pixels: Tensor) -> Tensor:  # [B, L, C, *P] -> [B, L, dim]
        # called as a module (not F.linear on its weight) so ZeRO-3 gathers the weight
        B, L = pixels.shape[:2]
        x = pixels.reshape(B * L, *pixels.shape[2:]).to(self.proj.weight.dtype)
        return self.proj(x).view(B, L, -1)


POSITION_EXTENT = 2.0**16
"""Working pixels that segmentation positions are measured against (BoxEmbed's extent): positions stay
distinct in every Fourier term up to 2^17 pixels per axis, beyond that in the linear term."""


class BoxEmbed(nn.Module):
    """Position from the token's box: centre / extent and size / extent per axis and log2(size / p) (tree
    level), as Fourier features + a Linear. Continuous, so it works for any image size, tree depth and
    token order. `extent` is what positions are measured against: a fixed length for segmentation (so the
    same structure at the same place in a window is encoded alike on slides of any size), the image shape
    for the IPS classifier's whole-image positions."""

    LEVEL_SCALE = 16.0  # log2(size / p) / 16 stays in [0, 1) for leaves up to 2^16 * p

    def __init__(self, ndim: int, patch_size: int, dim: int, num_freqs: int = 16):
        super().__init__()
        self.ndim, self.patch_size, self.num_freqs = ndim, patch_size, num_freqs
        self.proj = nn.Linear(3 * ndim * (2 * num_freqs + 1), dim)

    def forward(self, boxes: Tensor, extent: Tensor | float) -> Tensor:
        """boxes [B, L, 2D] (start..., size...), extent [B, D] (or a number) -> [B, L, dim]."""
        # float32 whatever the model dtype: bf16 cannot tell neighbouring tokens of a big slide apart
        start, size = boxes.float().split(self.ndim, dim=-1)
        size = size.clamp(min=1.0)  # padding boxes are all zeros
        shape = torch.as_tensor(extent, dtype=torch.float32, device=boxes.device).clamp(min=1.0)
        shape = shape[:, None, :] if shape.dim() == 2 else shape
        feats = torch.cat(
            [
                (start + size / 2) / shape,
                size / shape,
                torch.log2(size / self.patch_size) / self.LEVEL_SCALE,
            ],
            -1,
        )
        freqs = math.pi * torch.exp2(
            torch.arange(self.num_freqs, device=boxes.device, dtype=torch.float32)
        )
        angles = feats[..., None] * freqs
        fourier = torch.cat([feats[..., None], angles.sin(), angles.cos()], -1).flatten(
            -2
        )
        return self.proj(fourier.to(self.proj.weight.dtype))


def check_encoder_config(
    *,
    ndim: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    drop_path: float = 0.0,
) -> None:
    """Raise ConfigError naming the offending value; shared by ViTEncoder and build_model."""
    if ndim not in (2, 3):
        raise ConfigError(f"ndim={ndim}: images are 2-D (slides) or 3-D (volumes)")
    if not (
        isinstance(patch_size, int)
        and patch_size >= 4
        and patch_size & (patch_size - 1) == 0
    ):
        raise ConfigError(
            f"patch_size={patch_size} must be a power of two >= 4 (the decoder doubles 1 -> p)"
        )
    if in_chans < 1:
        raise ConfigError(f"in_chans={in_chans} must be >= 1")
    if depth < 4 or depth % 4:
        raise ConfigError(
            f"depth={depth} must be a positive multiple of 4 (the decoder taps blocks d/4, d/2, 3d/4, d)"
        )
    if num_heads < 1 or embed_dim < 1 or embed_dim % num_heads:
        raise ConfigError(
            f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}"
        )
    if not 0.0 <= drop_path < 1.0:
        raise ConfigError(f"drop_path={drop_path} must be in [0, 1)")


class ViTEncoder(nn.Module):
    """ViT blocks (timm's layout) over adaptive tokens; returns the hidden states after d/4, d/2, 3d/4
    and d blocks (the last after the final norm), each [B, L, dim]. No cls token."""

    def __init__(
        self,
        *,
        ndim: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        checkpoint_activations: bool = False,
        box_freqs: int = 16,
    ):
        super().__init__()
        check_encoder_config(
            ndim=ndim,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            drop_path=drop_path,
        )
        self.ndim, self.patch_size, self.in_chans = ndim, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.grad_checkpointing = checkpoint_activations
        self.out_indices = tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4))

        self.patch_embed = TokenEmbed(ndim, patch_size, in_chans, embed_dim)
        self.box_embed = BoxEmbed(ndim, patch_size, embed_dim, box_freqs)
        # stochastic depth grows with depth, as in timm
        drop = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(_init_linear)

    def set_attention_core(self, core: AttentionCore) -> None:
        """Swap the softmax step of every block (e.g. for DeepSpeed-Ulysses attention)."""
        for blk in self.blocks:
            blk.attn.core = core

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self,
        pixels: Tensor,
        boxes: Tensor,
        valid: Tensor,
        scale: Tensor,
        key_valid: Tensor | None = None,
    ) -> list[Tensor]:
        """pixels [B, L, C, *P], boxes [B, L, 2D] (level-0 pixels), valid [B, L], scale [B] -> 4 x [B, L, dim].

        scale: level-0 pixels per working pixel (PatchSequence.scale); boxes / scale are measured against
        POSITION_EXTENT working pixels, a constant, so a token's code depends on where it lies in its window
        and how large it is physically, not on the size of the slide. key_valid (default: valid) is the key
        mask of the full sequence; it differs from valid only under sequence parallelism, where this rank
        holds a slice of the tokens.
        """
        expected = (self.in_chans, *(self.patch_size,) * self.ndim)
        if tuple(pixels.shape[2:]) != expected:
            raise ValueError(f"pixels {tuple(pixels.shape)}: expected [B, L, {', '.join(map(str, expected))}]")
        working = boxes.float() / scale.to(boxes.device, torch.float32).view(-1, *(1,) * (boxes.dim() - 1))
        x = self.patch_embed(pixels) + self.box_embed(working, POSITION_EXTENT)
        x = torch.where(
            valid[..., None], x, 0.0
        )  # padding stays finite whatever garbage it holds
        key_valid = valid if key_valid is None else key_valid
        if bool(key_valid.all()):
            key_valid = None  # no mask lets SDPA pick its fastest (flash) kernel
        hidden = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, key_valid, use_reentrant=False)
            else:
                x = blk(x, key_valid)
            if i in self.out_indices:
                hidden.append(self.norm(x) if i == self.depth - 1 else x)
        return hidden


def _init_linear(m: nn.Module) -> None:
    """timm's ViT init for Linear layers (truncated normal, std 0.02, zero bias)."""
    if isinstance(m, nn.Linear):
        _trunc_normal(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def _trunc_normal(w: Tensor, std: float, a: float = -2.0, b: float = 2.0) -> None:
    """Normal(0, std) truncated to [a, b], drawn by inverting the normal CDF on a uniform sample: the draw timm
    makes, so a seed gives the weights it gave when the blocks were timm's (torch's trunc_normal_ draws
    differently)."""
    cdf = [(1 + math.erf(x / std / math.sqrt(2))) / 2 for x in (a, b)]
    w.uniform_(2 * cdf[0] - 1, 2 * cdf[1] - 1).erfinv_().mul_(std * math.sqrt(2)).clamp_(a, b)


class Segmenter(nn.Module):
    """Encoder + decoder over the tokens' maps: batch fields in, per-token logits [B, L, K, *P] out."""

    def __init__(self, encoder: ViTEncoder, decoder: UNETRDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(
        self,
        pixels: Tensor,
        boxes: Tensor,
        valid: Tensor,
        scale: Tensor,
        key_valid: Tensor | None = None,
    ) -> Tensor:
        return self.decoder(self.encoder(pixels, boxes, valid, scale, key_valid), pixels, boxes, valid)


PRESETS: dict[str, dict] = {
    # nano: for tests and the CPU quickstart
    "nano": {
        "embed_dim": 128,
        "depth": 4,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "decoder_channels": (64, 32, 16, 16),
    },
    "tiny": {
        "embed_dim": 192,
        "depth": 12,
        "num_heads": 3,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "decoder_channels": (128, 64, 32, 16),
    },
    "small": {
        "embed_dim": 384,
        "depth": 12,
        "num_heads": 6,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "decoder_channels": (192, 96, 48, 24),
    },
    "base": {
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "decoder_channels": (256, 128, 64, 32),
    },
}
"""Named model sizes (timm's ViT-Ti/S/B widths, so their checkpoints load); decoder_channels
are the decoder widths at side 1, 2, 4, 8 (the last repeats for finer stages)."""


def build_model(
    preset: str,
    *,
    ndim: int,
    patch_size: int,
    in_chans: int,
    num_classes: int,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    drop_path: float = 0.0,
    checkpoint_activations: bool = False,
    decoder_channels: Sequence[int] | None = None,
    decoder_fuse: str = "conv",
) -> Segmenter:
    """A Segmenter from a named preset; any argument left None takes the preset's value (decoder_fuse: how
    decoder stages mix their inputs, see hrvit.models.decoder)."""
    if preset not in PRESETS:
        raise ConfigError(
            f"unknown model preset {preset!r}; valid: {', '.join(PRESETS)}"
        )
    cfg = PRESETS[preset]
    embed_dim = cfg["embed_dim"] if embed_dim is None else embed_dim
    depth = cfg["depth"] if depth is None else depth
    num_heads = cfg["num_heads"] if num_heads is None else num_heads
    channels = tuple(
        cfg["decoder_channels"] if decoder_channels is None else decoder_channels
    )
    # ViTEncoder checks its own arguments; only the decoder's are checked here.
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes} must be >= 1")
    if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
        raise ConfigError(
            f"decoder_channels={channels} must be a non-empty list of positive widths"
        )
    if decoder_fuse not in FUSES:
        raise ConfigError(f"decoder_fuse={decoder_fuse!r} must be one of {', '.join(FUSES)}")
    encoder = ViTEncoder(
        ndim=ndim,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"],
        drop_path=drop_path,
        checkpoint_activations=checkpoint_activations,
    )
    decoder = UNETRDecoder(
        ndim=ndim,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        num_classes=num_classes,
        channels=channels,
        fuse=decoder_fuse,
    )
    return Segmenter(encoder, decoder)


# --- timm checkpoints -------------------------------------------------------------------

_NO_COUNTERPART = {
    "cls_token": "no cls token: every token is a region of the image",
    "reg_token": "no register tokens",
    "pos_embed": "grid position table; position comes from each token's box here",
    "head.": "classifier head; the decoder replaces it",
    "fc_norm.": "pooled-feature norm of the classifier",
}


@dataclass
class LoadReport:
    """What load_timm_checkpoint did: loaded keys, skipped checkpoint keys (with why), and
    encoder keys the checkpoint did not provide (they keep their fresh initialisation)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        lines += [f"  skipped {k}: {why}" for k, why in self.skipped.items()]
        if self.missing:
            lines.append(
                f"  kept initialised (not in checkpoint): {', '.join(self.missing)}"
            )
        return "\n".join(lines)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise DataError(f"timm checkpoint {path} does not exist{where_looked(path)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as e:
        raise DataError(
            f"{path}: reading .safetensors needs the safetensors package ({e})"
        ) from e
    except Exception as e:  # any unreadable file is the user's to fix
        raise DataError(f"cannot read timm checkpoint {path}: {e}") from e
    for wrapper in (
        "state_dict",
        "model",
        "module",
    ):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise DataError(
            f"timm checkpoint {path} holds a {type(state).__name__}, not a state dict"
        )
    return {
        k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)
    }


def load_timm_checkpoint(encoder: ViTEncoder, path: str | Path) -> LoadReport:
    """Load a local timm ViT state dict (.pth/.bin/.pt or .safetensors) into `encoder`.

    Blocks, final norm and (2-D encoders only) the patch embedding load by name; cls token,
    grid position table and heads are skipped; box_embed always starts fresh. A shape that
    differs (preset, patch size, in_chans) is a ConfigError naming the key and both shapes.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = encoder.state_dict()
    report = LoadReport(str(path))
    take = {}
    embed = state.get("patch_embed.proj.weight")
    embed_fits = embed is None or embed.ndim == own["patch_embed.proj.weight"].ndim
    for key, value in state.items():
        if key not in own:
            why = next(
                (w for prefix, w in _NO_COUNTERPART.items() if key.startswith(prefix)),
                "no counterpart in ViTEncoder",
            )
            report.skipped[key] = why
        elif key.startswith("patch_embed.") and not embed_fits:
            report.skipped[key] = (
                f"{embed.ndim - 2}-D patch embedding cannot load into a {encoder.ndim}-D encoder"
            )
        elif value.shape != own[key].shape:
            raise ConfigError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} "
                "in the encoder (check preset, patch_size and in_chans)"
            )
        else:
            take[key] = value
    if not take:
        raise DataError(
            f"{path}: no tensor matches a ViTEncoder parameter; is it a timm ViT checkpoint?"
        )
    encoder.load_state_dict(take, strict=False)
    report.loaded = sorted(take)
    report.missing = [k for k in own if k not in take]
    return report
