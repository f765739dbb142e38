"""Halo pixels (patching.halo): each token's margin comes from the token that covers that place, checked against
the image itself (uniform tokens: the padded image, exactly) and against a per-pixel reference on adaptive
leaves of several sizes, in 2-D and 3-D; the model takes halo'd pixels and still decodes p^D per token."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hrvit.config import PatchingConfig
from hrvit.models.vit import build_model
from hrvit.patching import patch_adaptive, patch_uniform
from hrvit.patching.halo import halo_pixels, token_pixels


def _reference(pixels, boxes, valid, m):
    """Per token and per halo pixel, in plain Python: the level-0 point at the pixel's centre, the valid token
    whose box holds it, and that token's pixel under the point (nearest); 0 where no token holds it."""
    L, C, p = pixels.shape[0], pixels.shape[1], pixels.shape[-1]
    D = boxes.shape[1] // 2
    out = torch.zeros(L, C, *(p + 2 * m,) * D)
    bx = boxes.tolist()
    for i in range(L):
        if not valid[i]:
            continue
        start, size = bx[i][:D], bx[i][D:]
        for a in np.ndindex(*(p + 2 * m,) * D):
            point = [s + (k - m + 0.5) * e / p for s, k, e in zip(start, a, size)]
            for j in range(L):
                sj, ej = bx[j][:D], bx[j][D:]
                if valid[j] and all(s <= q < s + e for s, q, e in zip(sj, point, ej)):
                    local = tuple(min(p - 1, int((q - s) * p / e)) for s, q, e in zip(sj, point, ej))
                    out[(i, slice(None), *a)] = pixels[(j, slice(None), *local)]
                    break
    return out


def test_uniform_halo_is_the_padded_image():
    image = torch.rand(3, 40, 56)
    seq = patch_uniform(image, 8)
    halo = halo_pixels(seq.pixels, seq.boxes, seq.valid, 3)
    padded = F.pad(image, (3, 3, 3, 3))
    for i, (y, x, _, _) in enumerate(seq.boxes.tolist()):
        torch.testing.assert_close(halo[i], padded[:, y:y + 14, x:x + 14], rtol=0, atol=0)
    torch.testing.assert_close(token_pixels(halo, 8, 2), seq.pixels, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(45, 70), (20, 24, 36)])
def test_adaptive_halo_matches_the_reference(shape):
    torch.manual_seed(0)
    image = torch.rand(2, *shape) * (torch.arange(shape[-1]) > shape[-1] // 2)  # detail on one side: mixed sizes
    cfg = PatchingConfig(mode="adaptive", patch_size=4, tokens=40 if len(shape) == 2 else 30)
    seq = patch_adaptive(image, cfg)
    assert len(set(seq.boxes[seq.valid, len(shape):].flatten().tolist())) > 1  # leaves of several sizes
    halo = halo_pixels(seq.pixels, seq.boxes, seq.valid, 2)
    torch.testing.assert_close(halo, _reference(seq.pixels, seq.boxes, seq.valid, 2), rtol=0, atol=0)
    assert not halo[~seq.valid].any()


def test_model_takes_halo_pixels_and_decodes_each_token_alone():
    torch.manual_seed(0)
    model = build_model("nano", ndim=2, patch_size=8, in_chans=3, num_classes=2).eval()
    seq = patch_uniform(torch.rand(3, 32, 32), 8)
    pixels = halo_pixels(seq.pixels, seq.boxes, seq.valid, 2)[None]
    boxes, valid, scale = seq.boxes[None], seq.valid[None], torch.ones(1)
    with torch.no_grad():
        out = model(pixels, boxes, valid, scale)
        assert out.shape == (1, 16, 2, 8, 8)
        changed = pixels.clone()
        changed[0, 5, :, :2] += 1.0  # token 5's halo only (its own pixels unchanged)
        again = model(changed, boxes, valid, scale)
    others = torch.ones(16, dtype=torch.bool)
    others[5] = False
    torch.testing.assert_close(again[0, others], out[0, others])  # each token is decoded from its own input
    assert (again[0, 5] - out[0, 5]).abs().max() > 1e-4  # and the halo reaches its decoder
    with pytest.raises(ValueError, match="8 \\+ 2 x halo"):
        model(pixels[..., :11, :11], boxes, valid, scale)
