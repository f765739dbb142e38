"""Models: ViT encoder over adaptive tokens, per-token UNETR decoder, presets, timm loading."""

from hrvit.models.decoder import UNETRDecoder
from hrvit.models.vit import (
    PRESETS,
    AttentionCore,
    BoxEmbed,
    LoadReport,
    Segmenter,
    TokenAttention,
    ViTEncoder,
    build_model,
    load_timm_checkpoint,
    local_attention,
)

__all__ = [
    "PRESETS",
    "AttentionCore",
    "BoxEmbed",
    "LoadReport",
    "Segmenter",
    "TokenAttention",
    "UNETRDecoder",
    "ViTEncoder",
    "build_model",
    "load_timm_checkpoint",
    "local_attention",
]
