"""Uniform patching and depatch: round trips and the PatchSequence invariants, on random shapes."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hrvit.patching import IGNORE_INDEX, collate, depatch, patch_uniform

shapes_2d = st.tuples(st.integers(8, 70), st.integers(8, 70))
shapes_3d = st.tuples(st.integers(4, 20), st.integers(4, 20), st.integers(4, 20))


def _check(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, *shape, generator=g)
    label = torch.randint(0, 3, shape, generator=g)
    seq = patch_uniform(image, p, label)
    ndim = len(shape)
    # token i holds exactly the pixels of box i (zeros / IGNORE outside the image)
    for i in range(len(seq)):
        start, size = seq.boxes[i, :ndim].tolist(), seq.boxes[i, ndim:].tolist()
        assert size == [p] * ndim and seq.level[i] == 0
        region = tuple(slice(s, min(s + z, n)) for s, z, n in zip(start, size, shape))
        inside = tuple(slice(0, r.stop - r.start) for r in region)
        assert torch.equal(seq.pixels[i][(slice(None), *inside)], image[(slice(None), *region)])
        assert torch.equal(seq.target[i][inside], label[region])
        outside = seq.pixels[i].clone()
        outside[(slice(None), *inside)] = 0
        assert (outside == 0).all()  # nothing but the box's own pixels in the token
    # boxes tile the padded image without overlap or gaps
    cover = torch.zeros([((n + p - 1) // p) * p for n in shape], dtype=torch.int)
    for box in seq.boxes.tolist():
        cover[tuple(slice(s, s + z) for s, z in zip(box[:ndim], box[ndim:]))] += 1
    assert (cover == 1).all()
    # labels only take source values, or IGNORE outside the image
    assert set(seq.target.unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    # depatch(patch(x)) == x
    assert torch.equal(depatch(seq.pixels, seq.boxes, seq.valid, shape), image)
    assert torch.equal(depatch(seq.target[:, None], seq.boxes, seq.valid, shape)[0], label)


@settings(max_examples=25, deadline=None)
@given(shape=shapes_2d, p=st.sampled_from([4, 8, 16]), seed=st.integers(0, 10**6))
def test_uniform_2d_properties(shape, p, seed):
    if min(shape) >= p:
        _check(shape, p, seed)


@settings(max_examples=15, deadline=None)
@given(shape=shapes_3d, p=st.sampled_from([4]), seed=st.integers(0, 10**6))
def test_uniform_3d_properties(shape, p, seed):
    _check(shape, p, seed)


def test_depatch_resizes_large_boxes_and_skips_padding():
    values = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    boxes = torch.tensor([[0, 0, 8, 8], [0, 8, 4, 4]])
    out = depatch(values, boxes, torch.tensor([True, False]), (8, 12), fill=-1)
    assert (out[0, :, :8] == 0).all() and (out[0, :, 8:] == -1).all()


def test_collate_pads_with_invalid_tokens():
    a = patch_uniform(torch.rand(1, 16, 16), 8, torch.zeros(16, 16, dtype=torch.long))
    b = patch_uniform(torch.rand(1, 16, 32), 8, torch.zeros(16, 32, dtype=torch.long))
    batch = collate([a, b])
    assert batch["pixels"].shape == (2, 8, 1, 8, 8)
    assert batch["valid"].sum(1).tolist() == [4, 8]
    assert (batch["target"][0, 4:] == IGNORE_INDEX).all()
    assert batch["image_shape"].tolist() == [[16, 16], [16, 32]]


def test_draw_leaves_matches_a_leaf_by_leaf_reference():
    """The vectorised outline drawing paints what outlining each leaf in turn (coarse levels first, finer on top)
    paints, on real adaptive leaves of an odd-sized image drawn at a non-integer scale."""
    from hrvit.config import PatchingConfig
    from hrvit.patching import patch_adaptive
    from hrvit.patching.overlay import LEVEL_COLOURS, draw_leaves

    torch.manual_seed(0)
    image = torch.rand(3, 203, 301) * (torch.arange(301) > 120)
    seq = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=4, tokens=150))
    keep = seq.valid.numpy()
    starts, sizes = seq.boxes.numpy()[keep, :2], seq.boxes.numpy()[keep, 2]
    levels = seq.level.numpy()[keep]
    assert len(np.unique(levels)) > 2
    scale = 0.37
    h, w = int(203 * scale) + 1, int(301 * scale) + 1
    rgb = np.zeros((h, w, 3), np.uint8)
    expected = rgb.copy()
    for level in sorted(np.unique(levels), reverse=True):
        colour = LEVEL_COLOURS[min(int(level), len(LEVEL_COLOURS) - 1)]
        for (y, x), s in zip(starts[levels == level], sizes[levels == level]):
            y0, x0 = int(y * scale), int(x * scale)
            y1, x1 = min(h, int((y + s) * scale)) - 1, min(w, int((x + s) * scale)) - 1
            if y0 >= h or x0 >= w:
                continue
            y1, x1 = max(y1, y0), max(x1, x0)
            expected[[y0, y1], x0:x1 + 1] = colour
            expected[y0:y1 + 1, [x0, x1]] = colour
    np.testing.assert_array_equal(draw_leaves(rgb, starts, sizes, levels, scale), expected)
