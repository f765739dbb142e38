"""The "context" synthetic slide family: real pyramids, deterministic, labels equal at every level, and labels that
no single window decides (the same window pixels occur as tumour inside the capsule and as benign outside it)."""

from __future__ import annotations

import hashlib

import numpy as np
import openslide
import pytest

from hrvit.cli import main
from hrvit.data import SlideSource, open_image, open_label
from hrvit.data.synthetic import (
    CONTEXT_PERIOD,
    FAMILY_CLASSES,
    SLIDE_CLASSES,
    SyntheticSlide,
    make_slides,
    slide_seed,
)
from hrvit.data.tiff import downsample2
from hrvit.errors import ConfigError

SIZE = (640, 1000)  # non-square, not a multiple of the tile: catches (x, y) mix-ups and edge tiles
WINDOW = 256


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return make_slides(tmp_path_factory.mktemp("context"), n=1, size=SIZE, seed=0, tile=128, family="context")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_family_classes_and_bad_family():
    assert FAMILY_CLASSES["easy"] == SLIDE_CLASSES == ("background", "tumour", "gland")
    assert FAMILY_CLASSES["context"] == ("background", "tumour", "benign")
    with pytest.raises(ConfigError, match="family: unknown synthetic slide family 'hard'; expected one of easy, "
                                          "context"):
        SyntheticSlide(256, 0, family="hard")


def test_context_pyramid_read_back_with_labels_equal_at_every_level(context):
    """openslide reads the RGB pyramid (each level the band-limited downsample of level 0); every level of the
    label pyramid equals the generator at that level; each lesion keeps its class at every level it is visible."""
    image, mask = context.parent / "slide_000.tiff", context.parent / "slide_000_mask.tiff"
    assert openslide.OpenSlide.detect_format(str(image)) == "generic-tiff"
    src, lab = open_image(image), open_label(mask)
    assert isinstance(src, SlideSource) and src.shape == SIZE and lab.shape == SIZE and src.level_count == 4
    gen = SyntheticSlide(SIZE, slide_seed(0, 0), family="context")
    down = src.read_level(0, (0, 0), SIZE).transpose(1, 2, 0)
    for level in range(src.level_count):
        shape = src.level_shapes[level]
        truth = gen.label(level, 0, 0, *shape)
        np.testing.assert_array_equal(lab.read_level(level, (0, 0), shape), truth)
        got = src.read_level(level, (0, 0), shape).transpose(1, 2, 0)
        if level:
            down = downsample2(down, "area")
            assert np.abs(got - down).mean() < 0.04, level
        for y, x, r, _, cls in gen.lesions:
            if r / 2**level >= 2:  # the lesion covers its centre pixel's neighbourhood at this level
                i, j = int(y / 2**level), int(x / 2**level)
                assert truth[i, j] == cls, (level, y, x)
        if level == 0:
            # twins: same shape, so tumour and benign cover exactly the same number of pixels
            counts = np.bincount(truth.ravel(), minlength=3)
            assert set(np.unique(truth)) == {0, 1, 2} and counts[1] == counts[2] > 0.01 * truth.size
            assert {c for *_, c in gen.lesions} == {1, 2}


def test_context_deterministic_by_seed_through_the_cli(tmp_path, capsys):
    """`hrvit synth slides --family context` writes the same bytes as the API for the same seed (twice the same
    generator), another seed gives another slide, and an unknown family is refused before anything is written."""
    out = tmp_path / "cli"
    assert main(["synth", "slides", "--family", "context", "--out", str(out), "--n", "1", "--size", "384",
                 "--seed", "7"]) == 0
    api = make_slides(tmp_path / "api", n=1, size=384, seed=7, family="context")
    other = make_slides(tmp_path / "other", n=1, size=384, seed=8, family="context")
    for name in ("slide_000.tiff", "slide_000_mask.tiff", "manifest.csv"):
        assert _sha(out / name) == _sha(api.parent / name)
    assert _sha(out / "slide_000.tiff") != _sha(other.parent / "slide_000.tiff")
    assert _sha(out / "slide_000_mask.tiff") != _sha(other.parent / "slide_000_mask.tiff")
    capsys.readouterr()
    assert main(["synth", "slides", "--family", "hard", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "hrvit synth: error: --family: unknown slide family 'hard'; expected one of easy, context"
    assert not (tmp_path / "bad").exists()
    assert main(["synth", "volumes", "--family", "context", "--out", str(tmp_path / "bad")]) == 2
    assert "--family: applies to synthetic slides only, not volumes" in capsys.readouterr().err


def _twin_windows(slide: SyntheticSlide):
    """For each twin pair (tumour, benign): the level-0 WINDOW^2 windows centred on the two lesions, as (tumour
    labels, benign labels) when their pixels are identical, else None."""
    H, W = slide.shape
    out = []
    for a, b in zip(slide.lesions[::2], slide.lesions[1::2]):
        assert (a[2:4], a[4], b[4]) == (b[2:4], 1, 2)  # same radius and texture key, tumour then benign
        dy, dx = int(b[0] - a[0]), int(b[1] - a[1])
        assert dy % CONTEXT_PERIOD == 0 and dx % CONTEXT_PERIOD == 0
        y0, x0 = int(a[0]) - WINDOW // 2, int(a[1]) - WINDOW // 2
        inside = (0 <= min(y0, y0 + dy, x0, x0 + dx) and max(y0, y0 + dy) + WINDOW <= H
                  and max(x0, x0 + dx) + WINDOW <= W)
        same = inside and np.array_equal(slide.image(0, y0, x0, WINDOW, WINDOW),
                                         slide.image(0, y0 + dy, x0 + dx, WINDOW, WINDOW))
        out.append((slide.label(0, y0, x0, WINDOW, WINDOW), slide.label(0, y0 + dy, x0 + dx, WINDOW, WINDOW))
                   if same else None)
    return out


def test_a_single_window_cannot_decide_the_labels():
    """Twin lesions sit a multiple of CONTEXT_PERIOD apart in a stroma with that period and carry their texture in
    lesion-local coordinates, so a 256^2 window around a tumour (inside the capsule) and the same window around its
    benign twin (outside) have identical pixels and different labels: no function of one window's pixels gets both
    right. On 2048^2 slides most pairs have such a window centred on them; on 1024^2 slides (the capsule only a
    couple of windows across, so most windows also hold a piece of it or another lesion) a few do."""
    for size, seeds in ((2048, range(2)), (1024, range(1))):
        pairs = [w for seed in seeds for w in _twin_windows(SyntheticSlide(size, slide_seed(0, seed), "context"))]
        same = [w for w in pairs if w is not None]
        assert len(pairs) >= 2 and len(same) >= (0.75 * len(pairs) if size == 2048 else 1), (size, len(same))
        for tumour, benign in same:
            assert (tumour == 1).sum() > 0.02 * tumour.size and not (tumour == 2).any()
            np.testing.assert_array_equal(np.where(tumour == 1, 2, tumour), benign)  # same shape, other class
