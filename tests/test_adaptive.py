"""Adaptive patching: the PatchSequence invariants on random shapes and images (2-D quadtree, 3-D
octree), exact budgets, bad input, pyramid-native reads, flips, and the pipeline end to end."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, hrvit
from hypothesis import given, settings
from hypothesis import strategies as st

from hrvit.config import PatchingConfig, load_config
from hrvit.data import CaseSpec, SlideSource, make_slides, open_case, write_pyramid_from_array
from hrvit.data.windows import _flip, read_window
from hrvit.errors import ConfigError, DataError
from hrvit.patching import IGNORE_INDEX, collate, depatch, patch_adaptive, patch_pyramid
from hrvit.patching.adaptive import morton

RECIPE = "launch/recipes/quickstart.yaml"


def _image(shape, channels, seed):
    """Flat background, a few constant rectangles and one noisy patch: detail in some places only."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(channels, *shape)
    for _ in range(3):
        lo = [int(torch.randint(0, n, (1,), generator=g)) for n in shape]
        hi = [min(n, a + int(torch.randint(1, max(2, n // 2), (1,), generator=g))) for a, n in zip(lo, shape)]
        image[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])] = torch.rand(channels, *([1] * len(shape)),
                                                                                  generator=g)
    lo = [int(torch.randint(0, max(1, n - 4), (1,), generator=g)) for n in shape]
    region = (slice(None), *[slice(a, a + max(4, n // 4)) for a, n in zip(lo, shape)])
    image[region] += torch.rand(image[region].shape, generator=g)
    label = (image.mean(0) * 3).long().clamp(max=4) + 1  # values 1..5
    return image, label


def _reference_token(image, start, size, p):
    """Area mean of the box over p^D blocks, zeros outside the image (on any side): what token i must hold."""
    padded = F.pad(image, [size] * 2 * len(start))
    region = padded[(slice(None), *[slice(s + size, s + 2 * size) for s in start])]
    pool = F.avg_pool2d if len(start) == 2 else F.avg_pool3d
    return pool(region[None], size // p)[0]


def _check(shape, p, tokens, seed, min_leaf=None, max_leaf=None, channels=2):
    image, label = _image(shape, channels, seed)
    cfg = PatchingConfig(mode="adaptive", patch_size=p, tokens=tokens, min_leaf=min_leaf, max_leaf=max_leaf)
    seq = patch_adaptive(image, cfg, label)
    ndim, n = len(shape), seq.real_tokens
    assert len(seq) == tokens and seq.valid[:n].all() and not seq.valid[n:].any()
    assert (seq.pixels[n:] == 0).all() and (seq.target[n:] == IGNORE_INDEX).all()
    starts, sizes = seq.boxes[:n, :ndim], seq.boxes[:n, ndim]
    assert (seq.boxes[:n, ndim:] == sizes[:, None]).all()  # square / cubic leaves
    low = min_leaf or p
    assert (sizes >= low).all() and (max_leaf is None or (sizes <= max_leaf).all())
    assert ((sizes // p) & (sizes // p - 1) == 0).all() and (starts % sizes[:, None] == 0).all()
    assert torch.equal(seq.level[:n], torch.log2(sizes / p).long())
    # leaves tile the image: every in-image pixel exactly once; no leaf starts outside it
    assert (starts < torch.tensor(shape)).all()
    cover = torch.zeros([int((starts[:, a] + sizes).max()) for a in range(ndim)], dtype=torch.int)
    for st_, sz in zip(starts.tolist(), sizes.tolist()):
        cover[tuple(slice(s, s + sz) for s in st_)] += 1
    assert (cover[tuple(slice(0, s) for s in shape)] == 1).all()
    # budget: exactly L tokens; fewer real ones only when the image is fully split or one split short
    full = math.prod(math.ceil(s / low) for s in shape)
    assert n == full if tokens >= full else tokens - (2**ndim - 2) <= n <= tokens
    # token i is exactly leaf i (area mean, channel by channel); labels come from the source (majority per cell)
    for i in range(n):
        ref = _reference_token(image, starts[i].tolist(), int(sizes[i]), p)
        assert torch.allclose(seq.pixels[i], ref, atol=1e-5), i
    assert set(seq.target[:n].unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    # Morton (Z) order
    codes = morton((starts // low).numpy())
    assert (np.diff(codes.astype(np.float64)) > 0).all()
    # depatch(patch(x)) == x where leaves are base-size, for pixels and labels
    base = torch.zeros(shape, dtype=torch.bool)
    for st_, sz in zip(starts.tolist(), sizes.tolist()):
        if sz == p:
            base[tuple(slice(s, s + sz) for s in st_)] = True
    back = depatch(seq.pixels, seq.boxes, seq.valid, shape)
    assert torch.equal(back[:, base], image[:, base])
    labels = depatch(seq.target[:, None], seq.boxes, seq.valid, shape)[0]
    assert torch.equal(labels[base], label[base])
    return seq


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(8, 90), st.integers(8, 90)), p=st.sampled_from([4, 8]),
       extra=st.integers(0, 400), seed=st.integers(0, 10**6), min_mult=st.sampled_from([1, 1, 2]))
def test_quadtree_properties(shape, p, extra, seed, min_mult):
    if min(shape) < p:
        return
    min_leaf = p * min_mult
    root = max(min_leaf, p * 2 ** int(math.log2(min(shape) / p)))
    roots = math.prod(math.ceil(s / root) for s in shape)
    _check(shape, p, roots + extra, seed, min_leaf=min_leaf)


@settings(max_examples=12, deadline=None)
@given(shape=st.tuples(st.integers(4, 24), st.integers(4, 24), st.integers(4, 24)),
       extra=st.integers(0, 120), seed=st.integers(0, 10**6))
def test_octree_properties_channel_correct(shape, extra, seed):
    root = 4 * 2 ** int(math.log2(min(shape) / 4))
    roots = math.prod(math.ceil(s / root) for s in shape)
    _check(shape, 4, roots + extra, seed, channels=4)


def test_exact_budget_for_every_length_and_max_leaf():
    for tokens in [*range(1, 24), 37, 50, 64, 65, 90]:  # 64 = fully split
        assert len(_check((64, 64), 8, tokens, seed=1)) == tokens
    _check((100, 60), 4, 200, seed=2, max_leaf=16)


def test_detail_gets_the_small_leaves_and_threshold_mode_varies_length():
    image = torch.zeros(1, 128, 128)
    image[:, 70:100, 80:110] = torch.rand(30, 30, generator=torch.Generator().manual_seed(0))
    seq = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=8, tokens=40))
    small = seq.boxes[seq.valid & (seq.level == 0)]
    assert len(small) and (small[:, 0] >= 56).all() and (small[:, 1] >= 64).all()  # near the noise only
    few = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=8, threshold=4.0))
    many = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=8, threshold=0.5))
    assert few.valid.all() and many.valid.all() and 1 < len(few) < len(many)
    batch = collate([few, many])
    assert batch["valid"].sum(1).tolist() == [len(few), len(many)]


def test_tissue_mask_and_variance_scorer():
    g = torch.Generator().manual_seed(3)
    image = torch.full((3, 128, 128), 0.95)  # glass (left): near-white with grey, unsaturated blocks
    blocks = (torch.rand(1, 16, 8, generator=g) > 0.7).float()
    image[:, :, :64] -= 0.5 * blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
    image[:, :, 64:] = torch.tensor([0.93, 0.67, 0.8])[:, None, None]  # pink tissue (right) ...
    image[:, 40:80, 90:120] = torch.tensor([0.5, 0.3, 0.6])[:, None, None]  # ... with a purple blob
    for scorer in ("edge", "variance"):
        seqs = [patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=8, tokens=40, scorer=scorer,
                                                     tissue_mask=mask)) for mask in (False, True)]
        plain, masked = (s.boxes[s.valid] for s in seqs)
        assert (plain[:, 1] < 64).sum() > (masked[:, 1] < 64).sum(), scorer  # the mask moves leaves off the glass
        small = masked[masked[:, 2] == 8]
        assert len(small) and (small[:, 1] >= 80).all() and (small[:, 0] >= 32).all() and (small[:, 0] < 88).all()


def test_blank_image_is_refined_evenly_or_left_at_its_roots():
    blank = torch.full((3, 96, 64), 0.5)
    seq = patch_adaptive(blank, PatchingConfig(mode="adaptive", patch_size=8, tokens=30))
    assert seq.real_tokens >= 28 and (seq.score[seq.valid] == 0).all()
    sizes = seq.boxes[seq.valid, 2]
    assert sizes.max() <= 2 * sizes.min()  # breadth-first: no leaf more than one level above another
    roots = patch_adaptive(blank, PatchingConfig(mode="adaptive", patch_size=8, threshold=0.0))
    assert len(roots) == 2 and roots.valid.all()  # 2 x 1 roots of 64 px, no split


def test_bad_input_gives_one_clear_error():
    cfg = PatchingConfig(mode="adaptive", patch_size=16, tokens=64)
    with pytest.raises(DataError, match="smaller than one patch"):
        patch_adaptive(torch.rand(3, 12, 100), cfg)
    with pytest.raises(DataError, match="smaller than the 3 roots"):
        patch_adaptive(torch.rand(3, 64, 160), PatchingConfig(mode="adaptive", patch_size=16, tokens=2))
    nan = torch.rand(3, 64, 64)
    nan[0, 5, 7] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        patch_adaptive(nan, cfg)
    for bad in (float("inf"), -float("inf")):  # the range check (aminmax) sees infinities at either end too
        nan[0, 5, 7] = bad
        with pytest.raises(DataError, match="infinite"):
            patch_adaptive(nan, cfg)
    with pytest.raises(DataError, match="does not match"):
        patch_adaptive(torch.rand(3, 64, 64), cfg, torch.zeros(64, 60, dtype=torch.long))
    with pytest.raises(ConfigError, match="larger than patching.max_leaf"):
        load_config(RECIPE, ["patching.mode=adaptive", "patching.tokens=64", "patching.min_leaf=64",
                             "patching.max_leaf=32"])
    with pytest.raises(ConfigError, match="patching.tokens"):
        load_config(RECIPE, ["patching.mode=adaptive", "patching.tokens=null"])
    with pytest.raises(ConfigError, match="times a power of two"):
        load_config(RECIPE, ["patching.mode=adaptive", "patching.tokens=64", "patching.min_leaf=48"])


def test_jitter_is_seeded():
    image, _ = _image((64, 64), 3, seed=4)
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=40, jitter=1.0)

    def boxes(seed):
        return patch_adaptive(image, cfg, rng=np.random.default_rng(seed)).boxes

    assert torch.equal(boxes(1), boxes(1))
    assert any(not torch.equal(boxes(1), boxes(s)) for s in range(2, 8))
    assert torch.equal(patch_adaptive(image, cfg).boxes, patch_adaptive(image, cfg).boxes)  # no rng, no jitter


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    """One 2048^2 synthetic slide with its full pyramid (levels down to 256 px)."""
    manifest = make_slides(tmp_path_factory.mktemp("big"), n=1, size=2048, seed=11, tile=256)
    return manifest.parent / "slide_000.tiff", manifest.parent / "slide_000_mask.tiff"


def test_pyramid_native_reads_few_level0_pixels(big_slide):
    image, mask = big_slide
    source = SlideSource(image)
    case = open_case(CaseSpec("s", [image], mask, "train"), num_classes=3)
    cfg = PatchingConfig(mode="adaptive", patch_size=16, tokens=256)
    seq = patch_pyramid(source, cfg, label=case.label)
    assert len(seq) == 256 and seq.real_tokens == 256
    assert seq.meta["level0_fraction_read"] < 0.05 and max(seq.meta["pixels_read"]) == 3  # working map: level 3
    read = sum(seq.meta["pixels_read"].values())
    assert read < 0.05 * 2048**2  # every level together, the working map included
    # each leaf is read from the level whose downsample is the largest not above size / p: this pyramid halves
    # 2048 exactly down to level 3 (downsample 8), so level log2(size / p), at most 3, holding size / 2^level
    # pixels (worked out here, not asked of best_level); each level is rendered on its own, so the leaf's
    # colour matches the level-0 area mean, its pixels need not
    assert source.level_shapes == [(2048 >> k, 2048 >> k) for k in range(4)]
    full = torch.from_numpy(source.read((0, 0), (2048, 2048)))
    w = seq.meta["working_pixel"]
    expected = {min(3, int(math.log2(w))): (2048 // w) ** 2}  # the working map, w level-0 px a pixel
    for i in range(256):
        (y, x), size = seq.boxes[i, :2].tolist(), int(seq.boxes[i, 2])
        level = min(3, int(math.log2(size // 16)))
        n = size >> level
        direct = F.avg_pool2d(torch.from_numpy(source.read_level(level, (y, x), (n, n))), n // 16)
        assert torch.allclose(seq.pixels[i], direct, atol=1e-6)
        ref = full[:, y:y + size, x:x + size].sum((1, 2)) / size**2  # the leaf's level-0 mean, 0 outside
        assert (seq.pixels[i].mean((1, 2)) - ref).abs().max() < 0.05, (i, size)
        expected[level] = expected.get(level, 0) + n * n
    # no leaf read from another level; leaves are read in boxes they fill at least half of, never twice
    read, work = seq.meta["pixels_read"], min(3, int(math.log2(w)))
    assert set(read) == set(expected)
    for level, n in read.items():
        extra = (2048 // w) ** 2 if level == work else 0
        assert expected[level] <= n <= extra + min(2 * (expected[level] - extra), (2048 >> level) ** 2), level
    assert set(seq.target.unique().tolist()) <= {0, 1, 2}


def test_slide_without_levels_reads_level0_and_matches_memory(tmp_path):
    image, label = _image((300, 200), 3, seed=5)
    path = write_pyramid_from_array(tmp_path / "flat.tiff", (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy(),
                                    tile=64, levels=1)
    source = SlideSource(path)
    assert source.level_count == 1
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=100)
    seq = patch_pyramid(source, cfg)
    memory = patch_adaptive(torch.from_numpy(source.read((0, 0), (300, 200))), cfg)
    assert torch.equal(seq.boxes, memory.boxes)
    assert torch.allclose(seq.pixels, memory.pixels, atol=1e-5)
    assert list(seq.meta["pixels_read"]) == [0] and seq.meta["level0_fraction_read"] > 0.9


def test_read_window_and_flip_keep_tokens_on_their_leaves(slides, tmp_path):
    image, label = _image((150, 130), 3, seed=6)
    np.save(tmp_path / "image.npy", image.numpy())
    np.save(tmp_path / "label.npy", (label % 3).numpy().astype(np.uint8))
    case = open_case(CaseSpec("a", [tmp_path / "image.npy"], tmp_path / "label.npy", "train"), num_classes=3)
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=120)
    seq = read_window(case, (0, 0), (160, 160), cfg)  # a window reaching past the image
    assert seq.image_shape == (160, 160) and seq.meta["extent"] == (150, 130)
    flipped = _flip(seq, [0, 1])
    mirror = image.flip([1, 2])
    n = flipped.real_tokens
    for i in range(n):
        (y, x), size = flipped.boxes[i, :2].tolist(), int(flipped.boxes[i, 2])
        assert torch.allclose(flipped.pixels[i], _reference_token(mirror, (y, x), size, 8), atol=1e-5)
    assert (flipped.boxes[n:] == 0).all()
    # slides go pyramid-native through the same seam
    slide = open_case(CaseSpec("s", [slides.parent / "slide_000.tiff"], slides.parent / "slide_000_mask.tiff",
                               "train"), num_classes=3)
    seq = read_window(slide, (0, 0), (192, 192), cfg)
    assert "pixels_read" in seq.meta and len(seq) == 120 and seq.target is not None


def test_volume_octree_through_read_window(volumes):
    case_dir = sorted(p for p in volumes.iterdir() if p.is_dir())[0]
    name = case_dir.name
    spec = CaseSpec(name, [case_dir / f"{name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")],
                    case_dir / f"{name}_seg.nii.gz", "train", label_map={0: 0, 1: 1, 2: 2, 4: 3})
    case = open_case(spec, num_classes=4)
    seq = read_window(case, (0, 0, 0), (24, 24, 24), PatchingConfig(mode="adaptive", patch_size=4, tokens=80))
    assert seq.pixels.shape == (80, 4, 4, 4, 4) and seq.target.shape == (80, 4, 4, 4)
    full = torch.from_numpy(case.image.read((0, 0, 0), (24, 24, 24)))
    for i in range(seq.real_tokens):
        box = seq.boxes[i].tolist()
        assert torch.allclose(seq.pixels[i], _reference_token(full, box[:3], box[3], 4), atol=1e-5)
    assert set(seq.target.unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}


def test_training_and_patchify_through_the_cli(slides, tmp_path):
    run = tmp_path / "run"
    hrvit("train", RECIPE, *TINY, f"data.manifest={slides}", f"output.dir={run}", "train.steps=3",
          "data.window=null", "patching.mode=adaptive", "patching.tokens=96", "patching.jitter=0.3")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["patching"] == "adaptive" and summary["steps"] == 3 and summary["dice_mean"] is not None
    image = slides.parent / "slide_000.tiff"
    out, stats = tmp_path / "overlay.png", tmp_path / "stats.json"
    proc = hrvit("patchify", image, "--tokens", 64, "--patch-size", 8, "--out", out, "--json", stats)
    data = json.loads(stats.read_text())
    assert data["tokens"] == 64 and 62 <= data["real_tokens"] == sum(data["leaves_per_level"].values()) <= 64
    assert 0 < data["level0_fraction_read"] <= 1 and set(data["seconds"]) >= {"scores", "tree", "resample", "total"}
    assert out.stat().st_size > 0 and "real tokens" in proc.stdout
    bad = hrvit("patchify", image, "--tokens", 64, "--patch-size", 8, "--min-leaf", 32, "--max-leaf", 16,
                "--out", out, check=False)
    assert bad.returncode == 2 and "larger than patching.max_leaf" in bad.stderr and "Traceback" not in bad.stderr


def test_score_tables_keep_torch_arithmetic():
    """The detail scorer's faster pieces give torch's and numpy's own values bit for bit (so trees do not move):
    scores.gradient against torch.gradient (awkward 2-D and 3-D shapes, axes of length 2, float32 and float64),
    scores.integral against cumsum along every axis."""
    from hrvit.patching.scores import gradient, integral

    g = torch.Generator().manual_seed(0)
    for shape in [(2, 2), (2, 7), (5, 3), (64, 65), (3, 4, 5), (2, 9, 2), (17, 8, 20)]:
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(shape, generator=g, dtype=dtype).mul_(4).exp_().sub_(3)
            for axis in range(len(shape)):
                assert torch.equal(gradient(x, axis, torch.empty_like(x)), torch.gradient(x, dim=axis)[0])
            got = integral(x.float().numpy())
            want = x.float().numpy().cumsum(0, dtype=np.float64)
            for axis in range(1, len(shape)):
                want = want.cumsum(axis)
            np.testing.assert_array_equal(got[(slice(1, None),) * len(shape)], want)
            assert not got[0].any() and not got[(slice(None), 0)].any()
