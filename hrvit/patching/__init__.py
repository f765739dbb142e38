"""Tokenizers that turn an image into a `PatchSequence`, and `depatch` back to full resolution."""

from hrvit.patching.adaptive import build_tree, patch_adaptive, patch_pyramid
from hrvit.patching.sequence import IGNORE_INDEX, PatchSequence, collate, to_device
from hrvit.patching.uniform import depatch, patch_uniform

__all__ = ["IGNORE_INDEX", "PatchSequence", "build_tree", "collate", "depatch", "patch_adaptive", "patch_pyramid",
           "patch_uniform", "to_device"]
