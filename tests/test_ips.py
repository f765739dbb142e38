"""Iterative patch selection: exact top-M with one head, bounded memory, masked padding, the MIL head."""

import numpy as np
import pytest
import torch

from hrvit.errors import ConfigError, DataError
from hrvit.models.mil import build_ips_model
from hrvit.patching.ips import candidate_count, grid_boxes, read_patches, select_patches

S = 16


def _model(heads=1, positions=True):
    torch.manual_seed(0)
    return build_ips_model("nano", patch_size=8, in_chans=3, ips_patch=S, num_classes=[4], heads=heads,
                           positions=positions, embed_dim=32, depth=4, num_heads=2).eval()


def _image(h=128, w=96, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _reader(image, log):
    def read(boxes):
        log.append(len(boxes))
        return torch.stack([image[:, y:y + S, x:x + S] for y, x, _, _ in boxes.tolist()])
    return read


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_single_head_chunked_selection_is_the_global_top_m(chunk):
    model, image = _model(heads=1), _image()
    boxes = grid_boxes(image.shape[1:], S)
    with torch.no_grad():
        every = model.score(_reader(image, [])(boxes), boxes, image.shape[1:])
    seq, _ = select_patches(_reader(image, []), boxes, lambda p, b: model.score(p, b, image.shape[1:]),
                            memory=7, chunk=chunk, image_shape=image.shape[1:])
    assert set(map(tuple, seq.boxes.tolist())) == set(map(tuple, boxes[every.topk(7).indices].tolist()))
    for i, (y, x, _, _) in enumerate(seq.boxes.tolist()):
        assert torch.equal(seq.pixels[i], image[:, y:y + S, x:x + S])  # pixels travel with their box


def test_memory_never_holds_more_than_m_plus_i_patches():
    model, image = _model(heads=4), _image(256, 256)
    boxes = grid_boxes(image.shape[1:], S)
    reads = []
    seq, stats = select_patches(_reader(image, reads), boxes, lambda p, b: model.score(p, b, image.shape[1:]),
                                memory=10, chunk=24, image_shape=image.shape[1:])
    assert stats.candidates == len(boxes) == 256 and stats.chunks == 11
    assert stats.peak_patches <= 10 + 24 and max(reads) <= 24 and sum(reads) == 256
    assert len(seq) == 10 and seq.valid.all()


def test_fewer_candidates_than_m_are_padded_and_ignored_by_the_head():
    model, image = _model(heads=2), _image(32, 48)
    boxes = grid_boxes(image.shape[1:], S)
    assert len(boxes) == 6
    seq, _ = select_patches(_reader(image, []), boxes, lambda p, b: model.score(p, b, image.shape[1:]),
                            memory=9, chunk=4, image_shape=image.shape[1:])
    assert len(seq) == 9 and seq.valid.tolist() == [True] * 6 + [False] * 3
    shape = torch.tensor([image.shape[1:]])
    with torch.no_grad():
        ref = model(seq.pixels[None], seq.boxes[None], seq.valid[None], shape)[0]
        garbage = seq.pixels.clone()
        garbage[6:] = torch.randn_like(garbage[6:]) * 100
        boxes_g = seq.boxes.clone()
        boxes_g[6:] = 7
        out = model(garbage[None], boxes_g[None], seq.valid[None], shape)[0]
        alone = model(seq.pixels[None, :6], seq.boxes[None, :6], seq.valid[None, :6], shape)[0]
    assert torch.allclose(ref, out, atol=1e-5) and torch.allclose(ref, alone, atol=1e-5)


def test_exploration_mixes_in_seeded_random_picks():
    model, image = _model(), _image()
    boxes = grid_boxes(image.shape[1:], S)

    def pick(seed):
        return select_patches(_reader(image, []), boxes, lambda p, b: model.score(p, b, image.shape[1:]),
                              memory=8, chunk=10, image_shape=image.shape[1:], explore=0.5,
                              rng=np.random.default_rng(seed))[0]

    a, b, c = pick(1), pick(1), pick(2)
    assert torch.equal(a.boxes, b.boxes) and not torch.equal(a.boxes, c.boxes)
    assert torch.isnan(a.score).sum() == 4  # four random picks carry no score
    assert len(set(map(tuple, a.boxes.tolist()))) == 8  # no patch twice


def test_grid_candidates_and_bad_input():
    assert len(grid_boxes((40, 40), 16)) == 9 == candidate_count((40, 40), 16)  # last row shifted inside
    assert (grid_boxes((40, 40), 16)[:, :2].max(0).values == 24).all()
    keep = np.zeros((4, 4), bool)
    keep[:2] = True
    assert (grid_boxes((64, 64), 16, keep=keep)[:, 0] < 32).all()
    with pytest.raises(DataError, match="smaller than one IPS patch"):
        grid_boxes((8, 64), 16)
    image = _image()
    with pytest.raises(ConfigError, match="chunk \\(0\\) must both be >= 1"):
        select_patches(_reader(image, []), grid_boxes((32, 32), 16), lambda p, b: p.sum((1, 2, 3)),
                       memory=2, chunk=0, image_shape=(32, 32))
    with pytest.raises(DataError, match="no candidate patches"):
        select_patches(_reader(image, []), torch.empty(0, 4, dtype=torch.long), lambda p, b: p.sum((1, 2, 3)),
                       memory=2, chunk=2, image_shape=(32, 32))


def test_patches_are_read_from_a_real_slide(tmp_path):
    from hrvit.data import open_image
    from hrvit.data.synthetic import make_megapixel

    manifest = make_megapixel(tmp_path, n=1, size=256, seed=1)
    source = open_image(manifest.parent / "canvas_000.tiff")
    boxes = grid_boxes(source.shape, 32)
    patches = read_patches(source, boxes[:3])
    assert patches.shape == (3, 3, 32, 32)
    assert torch.equal(patches[1], torch.from_numpy(source.read(boxes[1, :2].tolist(), (32, 32))))


def test_mil_head_errors_name_the_value():
    with pytest.raises(ConfigError, match="ips.heads: 5 does not divide"):
        build_ips_model("nano", patch_size=8, in_chans=3, ips_patch=16, num_classes=[2], heads=5)
    with pytest.raises(ConfigError, match="ips.patch: 20 must be a multiple"):
        build_ips_model("nano", patch_size=8, in_chans=3, ips_patch=20, num_classes=[2])
