"""The decoder's convolutions across token borders (hrvit.patching.neighbours, TokenRings): each token's ring is
the stitched window's (uniform tokens, exactly), a per-pixel reference's (adaptive leaves of several sizes,
anisotropic leaves, far from the origin), and after a short training run no seams are left on the token grid.
The same rings across SP ranks: tests/test_parallel.py (test_sp_model_matches_one_process)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hrvit.models.decoder as decoder
from hrvit.config import PatchingConfig
from hrvit.engine.losses import loss_from_sums, segmentation_sums
from hrvit.models.vit import build_model
from hrvit.parallel.shard import TokenRings
from hrvit.patching import patch_adaptive, patch_uniform
from hrvit.patching.neighbours import ring_index


def _reference(maps, boxes, valid):
    """Per token and ring pixel, in plain Python: the level-0 point at the pixel's centre, the valid token whose
    box holds it, and that token's map pixel under the point (nearest); 0 where no token holds it."""
    L, C, r = maps.shape[0], maps.shape[1], maps.shape[-1]
    D = boxes.shape[1] // 2
    out = torch.zeros(L, C, *(r + 2,) * D)
    bx = boxes.tolist()
    for i in range(L):
        if not valid[i]:
            continue
        start, size = bx[i][:D], bx[i][D:]
        for a in np.ndindex(*(r + 2,) * D):
            point = [s + (k - 1 + 0.5) * e / r for s, k, e in zip(start, a, size)]
            for j in range(L):
                sj, ej = bx[j][:D], bx[j][D:]
                if valid[j] and all(s <= q < s + e for s, q, e in zip(sj, point, ej)):
                    local = tuple(min(r - 1, int((q - s) * r / e)) for s, q, e in zip(sj, point, ej))
                    out[(i, slice(None), *a)] = maps[(j, slice(None), *local)]
                    break
    return out


@pytest.mark.parametrize("shape, p, r", [((40, 56), 8, 8), ((40, 56), 8, 2), ((12, 16, 20), 4, 4)])
def test_uniform_rings_are_the_stitched_window_padded(shape, p, r):
    """Tokens of a uniform grid: each token's ring'd map is the window's map (tokens at r pixels each) padded by
    one zero pixel, cut around the token."""
    image = torch.rand(3, *shape)
    seq = patch_uniform(image, p)
    window = F.interpolate(image[None], scale_factor=r / p, mode="area")[0] if r != p else image
    maps = torch.stack([window[(slice(None), *[slice(s * r // p, s * r // p + r) for s in b[:len(shape)]])]
                        for b in seq.boxes.tolist()])
    ringed = TokenRings(seq.boxes[None], seq.valid[None], [r])(maps)
    padded = F.pad(window, (1,) * 2 * len(shape))
    for i, b in enumerate(seq.boxes.tolist()):
        cut = padded[(slice(None), *[slice(s * r // p, s * r // p + r + 2) for s in b[:len(shape)]])]
        torch.testing.assert_close(ringed[i], cut, rtol=0, atol=0)


@pytest.mark.parametrize("shape, origin", [((45, 70), 0), ((20, 24, 36), 0), ((45, 70), 65_536 + 24)])
def test_adaptive_rings_match_the_reference(shape, origin):
    """Leaves of several sizes (and, in 3-D, of several shapes per axis), in any order, anywhere on a slide:
    every ring pixel is the map pixel the per-pixel reference finds; padding tokens get zeros."""
    torch.manual_seed(0)
    image = torch.rand(2, *shape) * (torch.arange(shape[-1]) > shape[-1] // 2)  # detail on one side: mixed sizes
    cfg = PatchingConfig(mode="adaptive", patch_size=4, tokens=40 if len(shape) == 2 else 30)
    seq = patch_adaptive(image, cfg)
    assert len(set(seq.boxes[seq.valid, len(shape):].flatten().tolist())) > 1  # leaves of several sizes
    boxes = seq.boxes.clone()
    boxes[:, :len(shape)] += origin
    order = torch.randperm(len(boxes))
    boxes, valid = boxes[order], seq.valid[order]
    for r in (2, 4):
        maps = torch.randn(len(boxes), 3, *(r,) * len(shape))
        ringed = TokenRings(boxes[None], valid[None], [r])(maps)
        torch.testing.assert_close(ringed, _reference(maps, boxes, valid), rtol=0, atol=0)
        assert (ring_index(boxes, valid, r)[~valid] == -1).all()


def test_plans_of_a_sequence_seen_again_are_looked_up_and_bounded():
    """Whole-slide training meets the same trees again: the second TokenRings of the same boxes reuses the plans
    (and rings alike); other boxes get their own; the oldest plans leave when the byte limit is reached."""
    from hrvit.parallel.shard import _PLANS, _RecentPlans

    seq = patch_uniform(torch.rand(3, 40, 56), 8)
    maps = torch.randn(len(seq.boxes), 2, 4, 4)
    first = TokenRings(seq.boxes[None], seq.valid[None], [4])
    again = TokenRings(seq.boxes[None].clone(), seq.valid[None].clone(), [4])
    fewer = seq.valid.clone()
    fewer[5] = False
    other = TokenRings(seq.boxes[None], fewer[None], [4])
    assert again.plans is first.plans and other.plans is not first.plans
    assert torch.equal(again(maps), first(maps)) and not torch.equal(other(maps), first(maps))
    size = _PLANS._bytes(first.plans)
    small = _RecentPlans(limit=4 * size)
    for k in range(6):
        small.put(k, first.plans)
    assert small.held <= 4 * size and small.get(0) is None and small.get(5) is first.plans


def _shapes(rng, n=64):
    """A large disk or square of class 1 on class 0, both noisy: labels constant across many token borders."""
    y, x = np.mgrid[:n, :n]
    label = np.zeros((n, n), np.int64)
    for _ in range(2):
        cy, cx, r = rng.integers(0, n), rng.integers(0, n), rng.integers(12, 26)
        label[((y - cy) ** 2 + (x - cx) ** 2 < r * r) if rng.random() < 0.5 else
              ((abs(y - cy) < r) & (abs(x - cx) < r))] = 1
    colour = np.where(label[None] == 1, np.array([0.65, 0.35, 0.6])[:, None, None],
                      np.array([0.78, 0.7, 0.75])[:, None, None])
    return torch.tensor(colour + 0.5 * rng.normal(size=(3, n, n)), dtype=torch.float32), torch.tensor(label)


def _border_and_inner_errors(p=8, steps=40):
    """Train the nano model on 64^2 windows of p-pixel tokens for `steps` steps, predict 16 held-out windows; the
    share of wrong pixels on token-border rows/columns and elsewhere, among pixels 3 px or more from a class
    edge (window edges excluded)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("nano", ndim=2, patch_size=p, in_chans=3, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(steps):
        seqs = [patch_uniform(image, p, label) for image, label in (_shapes(rng) for _ in range(4))]
        batch = {k: torch.stack([getattr(s, k) for s in seqs]) for k in ("pixels", "boxes", "valid", "target")}
        logits = model(batch["pixels"], batch["boxes"], batch["valid"], torch.ones(4))
        v = batch["valid"]
        loss = loss_from_sums(segmentation_sums(logits[v], batch["target"][v]), 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    rng = np.random.default_rng(1000)
    wrong = np.zeros(2)
    count = np.zeros(2)
    yy, xx = np.mgrid[:64, :64]
    on_border = (yy % p == 0) | (yy % p == p - 1) | (xx % p == 0) | (xx % p == p - 1)
    window_edge = (yy == 0) | (yy == 63) | (xx == 0) | (xx == 63)
    with torch.no_grad():
        for _ in range(16):
            image, label = _shapes(rng)
            seq = patch_uniform(image, p)
            tokens = model(seq.pixels[None], seq.boxes[None], seq.valid[None], torch.ones(1))[0].argmax(1)
            pred = np.zeros((64, 64), np.int64)
            for i, (y, x, _, _) in enumerate(seq.boxes.tolist()):
                pred[y:y + p, x:x + p] = tokens[i].numpy()
            t = label[None, None].float()
            inside = (F.max_pool2d(t, 7, 1, 3) == -F.max_pool2d(-t, 7, 1, 3))[0, 0].numpy() & ~window_edge
            for k, where in enumerate((on_border & inside, ~on_border & inside)):
                wrong[k] += (pred != label.numpy())[where].sum()
                count[k] += where.sum()
    return wrong / count


class _ZeroRings:
    """The decoder before the rings: every token's border padded with zeros."""

    def __init__(self, *args):
        pass

    def __call__(self, x):
        return F.pad(x, (1,) * 2 * (x.dim() - 2))


@pytest.mark.slow
def test_no_seams_on_the_token_grid():
    """On windows whose label is constant across many token borders, wrong pixels on token-border rows and
    columns are at most 1.5x as frequent as elsewhere after a short training run. Measured 0.96x; the same run
    with each token decoded alone (zero borders, the previous decoder) gives 5.2x: `python tests/test_neighbours.py`
    prints both."""
    border, inner = _border_and_inner_errors()
    assert inner > 0 and border <= 1.5 * inner, (border, inner)


if __name__ == "__main__":
    for name in ("rings", "zero borders"):
        if name == "zero borders":
            decoder.TokenRings = _ZeroRings
        border, inner = _border_and_inner_errors()
        print(f"{name}: wrong on token-border rows/columns {border:.4f}, elsewhere {inner:.4f}, "
              f"ratio {border / inner:.2f}")
