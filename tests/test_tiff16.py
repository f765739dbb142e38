"""TIFFs that are not 8-bit RGB (16-bit, float, greyscale, many channels) read with their real values through
TiffSource, and the bad TIFFs a scanner or a pipeline can produce (levels that disagree, a mask at another size,
a corrupt tile in the middle), each refused with one DataError naming the file. Fixtures are written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from hrvit.config import PatchingConfig
from hrvit.data import CaseSpec, SlideSource, open_case, open_image, write_pyramid_from_array
from hrvit.data.sources import MAX_TIFF_CHANNELS, TiffSource
from hrvit.data.windows import TrainWindows
from hrvit.errors import DataError
from hrvit.patching import patch_pyramid
from tests.conftest import hrvit


def _write(path, levels, tile=64, subifds=False, **kw):
    """A tiled TIFF pyramid: levels[0] the image, the others reduced pages (or SubIFDs of the first page)."""
    kw = {"photometric": "minisblack", "compression": "zlib", "metadata": None, **kw}
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            extra = {"subifds": len(levels) - 1} if subifds and i == 0 else {}
            tw.write(lv, tile=(tile, tile), subfiletype=int(i > 0), **kw, **extra)
    return path


def _floor_levels(a, factors):
    """Level f of `a` at floor(size / f), by subsampling (what each level stores is then known exactly)."""
    h, w = a.shape[:2]
    return [a[: h // f * f : f, : w // f * f : f] for f in factors]


def _all(src, level=0):
    return src.read_level(level, (0, 0), src.level_shapes[level])


def test_uint16_grey_keeps_all_4096_levels(tmp_path):
    """12-bit detail in a 16-bit tiled TIFF: every one of 4096 grey levels comes back, value / 65535.
    OpenSlide (today's reader of any tiled TIFF) hands it over as 8-bit RGB: 256 levels and 3 channels."""
    grey = np.round(np.linspace(0, 65535, 4096)).astype(np.uint16)
    a = np.random.default_rng(0).permutation(np.resize(grey, 150 * 101)).reshape(150, 101)
    src = open_image(_write(tmp_path / "g16.tif", [a], tile=32))
    assert isinstance(src, TiffSource) and src.channels == 1 and src.shape == (150, 101)
    got = src.read((0, 0), (150, 101))
    assert got.dtype == np.float32 and got.shape == (1, 150, 101)
    np.testing.assert_array_equal(np.rint(got[0] * 65535).astype(np.uint16), a)
    np.testing.assert_allclose(got[0], a / 65535, rtol=1e-6, atol=0)
    assert len(np.unique(got)) == 4096
    np.testing.assert_allclose(src.read((-5, 90), (20, 20))[0, 5:, :11], a[:15, 90:] / 65535, rtol=1e-6)
    assert not src.read((-5, 90), (20, 20))[0, :5].any()  # outside the image reads 0


@pytest.mark.parametrize("subifds", [False, True], ids=["pages", "subifds"])
def test_uint16_pyramid_every_level(tmp_path, subifds):
    """A scanner-like uint16 pyramid (odd size, floor-rounded levels, reduced pages or SubIFDs): each level reads
    what the file stores there, leaves are read through patch_pyramid from the coarse levels, and best_level uses
    the shared level rule. OpenSlide reads these as 8-bit (and does not see SubIFD levels at all)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (1001, 1503), dtype=np.uint16)
    levels = _floor_levels(a, [1, 2, 4, 8])
    src = open_image(_write(tmp_path / "p16.tif", levels, tile=128, subifds=subifds))
    assert isinstance(src, TiffSource) and src.level_shapes == [lv.shape for lv in levels]
    for i, lv in enumerate(levels):
        np.testing.assert_allclose(_all(src, i)[0], lv / 65535, rtol=1e-6, atol=0)
    f = 1503 / 375  # level 2 along x: level-0 start (y, x) maps to floor(y / dy), floor(x / dx)
    np.testing.assert_allclose(src.read_level(2, (400, 800), (30, 40))[0],
                               levels[2][int(400 // (1001 / 250)):][:30, int(800 // f):][:, :40] / 65535, rtol=1e-6)
    assert [src.best_level(d) for d in (1, 2, 4.01, 8, 100)] == [0, 1, 2, 3, 3]
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=256)
    seq = patch_pyramid(src, cfg)
    assert seq.pixels.shape[1] == 1 and seq.real_tokens > 100
    assert set(seq.meta["pixels_read"]) - {0}, "no leaf was read from a reduced level"
    assert float(seq.pixels[seq.valid].max()) > 0.9  # values in [0, 1], not [0, 1/256]


def test_float32_tiled_values_as_stored(tmp_path):
    """32-bit float samples (which OpenSlide cannot read at all) come back as stored, negative and > 1 too."""
    a = np.random.default_rng(2).normal(0, 100, (200, 300)).astype(np.float32)
    src = open_image(_write(tmp_path / "f32.tif", _floor_levels(a, [1, 2]), tile=64))
    assert isinstance(src, TiffSource) and src.channels == 1 and src.scale == 1.0
    np.testing.assert_array_equal(src.read((0, 0), (200, 300))[0], a)
    np.testing.assert_array_equal(_all(src, 1)[0], a[::2, ::2])


def test_grey_uint8_to_tifffile_rgb_uint8_stays_on_openslide(tmp_path):
    """Greyscale 8-bit tiled TIFF: one channel, /255 (OpenSlide would make it 3 identical channels); an 8-bit
    RGB tiled TIFF is still the scanners' kind and goes to OpenSlide (SlideSource) as before."""
    grey = np.random.default_rng(3).integers(0, 256, (130, 170), dtype=np.uint8)
    src = open_image(_write(tmp_path / "g8.tif", [grey]))
    assert isinstance(src, TiffSource) and src.channels == 1
    np.testing.assert_allclose(src.read((0, 0), (130, 170))[0], grey / 255, rtol=1e-6)
    rgb = np.random.default_rng(4).integers(0, 256, (130, 170, 3), dtype=np.uint8)
    src = open_image(write_pyramid_from_array(tmp_path / "rgb.tif", rgb, tile=64, compression="zlib"))
    assert isinstance(src, SlideSource) and src.channels == 3
    np.testing.assert_allclose(src.read((0, 0), (130, 170)), rgb.transpose(2, 0, 1) / 255, atol=1e-6)


@pytest.mark.parametrize("layout", ["planar", "pages", "interleaved"])
def test_five_channel_fluorescence_is_read_and_too_many_channels_refused(tmp_path, layout):
    """C > 3: a 5-channel uint16 image (one plane per channel, one page per channel, or interleaved samples) has
    channels = 5 with each channel's own values; more than MAX_TIFF_CHANNELS is refused naming file and count."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 65536, (5, 90, 110), dtype=np.uint16)
    path = tmp_path / f"{layout}.tif"
    if layout == "interleaved":
        tifffile.imwrite(path, a.transpose(1, 2, 0), tile=(32, 32), photometric="minisblack", planarconfig="contig",
                         metadata=None)
    else:
        tifffile.imwrite(path, a, tile=(32, 32), photometric="minisblack", metadata=None,
                         planarconfig="separate" if layout == "planar" else None)
    src = open_image(path)
    assert isinstance(src, TiffSource) and src.channels == 5
    np.testing.assert_allclose(src.read((10, 20), (50, 60)), a[:, 10:60, 20:80] / 65535, rtol=1e-6)
    n = MAX_TIFF_CHANNELS + 4
    tifffile.imwrite(tmp_path / "many.tif", np.zeros((n, 40, 40), np.uint16), tile=(16, 16),
                     photometric="minisblack", planarconfig="separate", metadata=None)
    with pytest.raises(DataError, match=rf"many\.tif: {n} channels .*at most {MAX_TIFF_CHANNELS}"):
        open_image(tmp_path / "many.tif")


def test_patchify_cli_on_a_16_bit_slide(tmp_path):
    """`hrvit patchify` end to end on a 12-bit-in-16 pyramid whose only structure (a checkerboard of +-50 grey
    levels around 2176) lies below the 8-bit step: the overlay shows it and the tree splits there. Through
    OpenSlide the image is one flat 8-bit value and the overlay black."""
    h, w = 700, 900
    a = np.full((h, w), 2176, np.uint16)
    y, x = np.mgrid[200:400, 300:600]
    a[200:400, 300:600] += (((y // 8 + x // 8) % 2) * 100 - 50).astype(np.uint16)
    image = _write(tmp_path / "dark16.tif", _floor_levels(a, [1, 2, 4]), tile=128)
    out, stats = tmp_path / "overlay.png", tmp_path / "stats.json"
    proc = hrvit("patchify", image, "--tokens", 64, "--patch-size", 8, "--out", out, "--json", stats)
    data = json.loads(stats.read_text())
    assert data["image_shape"] == [h, w] and data["real_tokens"] > 32
    assert "a 900 x 700 (width x height) image" in proc.stdout, proc.stdout
    picture = np.asarray(Image.open(out).convert("L"))[220:380, 320:580]
    bright = float((picture > 200).mean())
    assert 0.2 < bright < 0.8, bright  # the checkerboard, stretched to black and white


def test_pyramid_levels_that_disagree_are_refused(tmp_path):
    """A level stretched against level 0 (other aspect ratio, beyond rounding) or larger than the level before
    it: one DataError at open naming the file and the level, for TiffSource and OpenSlide slides alike (OpenSlide
    itself sorts levels by size and takes any aspect ratio, so the larger page would silently become level 0)."""
    grey = np.random.default_rng(6).integers(0, 65536, (600, 800), dtype=np.uint16)
    rgb = np.random.default_rng(7).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    for name, a, kw in (("g", grey, {}), ("rgb", rgb, {"photometric": "rgb", "compression": "jpeg"})):
        stretched = _write(tmp_path / f"{name}_aspect.tif", [a, a[::2, ::3]], tile=128, **kw)
        with pytest.raises(DataError, match=rf"{name}_aspect\.tif: pyramid level 1 is 300 x 267 .*one factor"):
            open_image(stretched)
        larger = _write(tmp_path / f"{name}_larger.tif", [a, a[::2, ::2], a[:400, :500]], tile=128, **kw)
        with pytest.raises(DataError, match=rf"{name}_larger\.tif: pyramid level 2 is 400 x 500 .*larger than level 1"):
            open_image(larger)
        fine = _write(tmp_path / f"{name}_fine.tif", _floor_levels(a[:599, :799], [1, 2, 4]), tile=128, **kw)
        assert open_image(fine).level_shapes == [(599, 799), (299, 399), (149, 199)]


def test_mask_of_another_size_is_refused_also_at_level_1_size(tmp_path):
    """Masks must be at level-0 size: against a rounded-down uint16 pyramid, a mask 1 px short and a mask written
    at level-1 resolution are both refused at open, naming the mask, both sizes and the image."""
    a = np.random.default_rng(8).integers(0, 65536, (601, 803), dtype=np.uint16)
    image = _write(tmp_path / "img.tif", _floor_levels(a, [1, 2]), tile=128)
    for name, shape in (("short", (601, 802)), ("level1", (300, 401))):
        write_pyramid_from_array(tmp_path / f"{name}_mask.tif", np.zeros(shape, np.uint8), tile=128)
        with pytest.raises(DataError, match=rf"{name}_mask\.tif: label shape \({shape[0]}, {shape[1]}\) does not "
                                            r"match image shape \(601, 803\) of .*img\.tif"):
            open_case(CaseSpec("x", [image], tmp_path / f"{name}_mask.tif", "train"))


def test_mask_at_a_level_size_is_named_as_such(tmp_path):
    """A mask exported at a reduced level's size (a common export mistake) is refused with that cause named: which
    level of the image it matches and its downsample; a mask of any other wrong size gets no such hint."""
    a = np.random.default_rng(8).integers(0, 65536, (601, 803), dtype=np.uint16)
    image = _write(tmp_path / "img.tif", _floor_levels(a, [1, 2, 4]), tile=128)
    for name, shape, hint in (("level2", (150, 200), "level 2 of the image (downsample 4.0"),
                              ("level1", (300, 401), "level 1 of the image (downsample 2.00"),
                              ("odd", (300, 402), None)):
        write_pyramid_from_array(tmp_path / f"{name}_mask.tif", np.zeros(shape, np.uint8), tile=128)
        with pytest.raises(DataError) as err:
            open_case(CaseSpec("x", [image], tmp_path / f"{name}_mask.tif", "train"))
        message = str(err.value)
        assert f"{name}_mask.tif: label shape ({shape[0]}, {shape[1]}) does not match" in message
        if hint:
            assert f"it is the size of {hint}" in message and "label masks must be at level-0 resolution" in message
        else:
            assert "it is the size of level" not in message


def test_thumbnail_of_a_16_bit_pyramid(tmp_path):
    """TiffSource.thumbnail is a box filter of the smallest level still >= the size asked, in real values (it went
    through OpenSlide's reader before and failed on any TIFF larger than the thumbnail)."""
    a = np.random.default_rng(10).integers(0, 65536, (600, 800), dtype=np.uint16)
    src = open_image(_write(tmp_path / "t16.tif", _floor_levels(a, [1, 2]), tile=128))
    thumb = src.thumbnail(100)  # level 1 (400 px wide) box-filtered by 4
    assert thumb.shape == (1, 75, 100)
    expected = a[::2, ::2].astype(np.float64).reshape(75, 4, 100, 4).mean((1, 3)) / 65535
    np.testing.assert_allclose(thumb[0], expected, rtol=1e-5)
    np.testing.assert_array_equal(src.thumbnail(1000), _all(src, 0))


def test_openslide_handle_recovers_after_a_corrupt_tile(tmp_path):
    """One corrupt JPEG tile in the middle of an RGB slide: a read touching it is a DataError naming the file; a read
    elsewhere afterwards still works, through openslide (whose handle fails every read after its first error, so it
    is reopened) and through tifffile alike. Without that, skip_bad_samples skipped every later sample of the slide."""
    rgb = np.random.default_rng(12).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    path = _write(tmp_path / "badrgb.tif", [rgb], tile=128, photometric="rgb", compression="jpeg")
    good = open_image(path).read((0, 0), (128, 512))
    _corrupt_tile(path, 1, 2)
    for src in (SlideSource(path, tifffile=False), open_image(path)):
        with pytest.raises(DataError, match=r"badrgb\.tif: "):
            src.read((100, 200), (100, 100))
        np.testing.assert_array_equal(src.read((0, 0), (128, 512)), good)
        with pytest.raises(DataError, match=r"badrgb\.tif: "):
            src.read((200, 300), (20, 20))
        np.testing.assert_array_equal(src.read((384, 0), (128, 128)), open_image(path).read((384, 0), (128, 128)))


def _corrupt_tile(path, row, col):
    """Overwrite the compressed bytes of level-0 tile (row, col) with zeros (its size and offset stay right, so the
    file still parses and check_tiff passes: only decoding that tile fails)."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        index = row * -(-page.imagewidth // page.tilewidth) + col
        off, n = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    data[off + 4 : off + n] = bytes(n - 4)
    path.write_bytes(bytes(data))


def test_corrupt_tile_in_the_middle_names_file_level_tile_and_is_skipped(tmp_path):
    """A tile whose bytes are damaged in the middle of a tiled 16-bit slide opens fine; reading it is one DataError
    naming the file, the level and the tile position, and with skip_bad the training sample that touches it is
    replaced (and listed), without it the error names the sample."""
    a = np.random.default_rng(9).integers(0, 65536, (512, 512), dtype=np.uint16)
    path = _write(tmp_path / "bad16.tif", _floor_levels(a, [1, 2]), tile=128)
    _corrupt_tile(path, 1, 2)
    write_pyramid_from_array(tmp_path / "mask.tif", (a > 32768).astype(np.uint8), tile=128)
    src = open_image(path)
    np.testing.assert_allclose(src.read((0, 0), (128, 512))[0], a[:128] / 65535, rtol=1e-6)  # row 0 is fine
    with pytest.raises(DataError, match=r"bad16\.tif: corrupt data in level 0, tile row 1, column 2 .*y=128, x=256"):
        src.read((100, 200), (100, 100))
    specs = [CaseSpec("bad", [path], tmp_path / "mask.tif", "train")]
    patching = PatchingConfig(patch_size=8)

    def windows(skip):
        return TrainWindows(specs, window=128, patching=patching, seed=0, foreground_bias=0.0, augment=False,
                            skip_bad=skip)

    skipped = [s for k in range(12) for s in windows(True)[k].meta["skipped"]]
    assert skipped and all("tile row 1, column 2" in s["error"] and s["path"].endswith("bad16.tif")
                           for s in skipped)
    k = skipped[0]["sample"]
    with pytest.raises(DataError, match=rf"training sample {k} \(case bad, .*bad16\.tif\): .*level 0, tile row 1"):
        windows(False)[k]
