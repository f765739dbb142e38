"""Slides as files: the same tokens from a file as from its decoded pixels, majority labels, masks without a
pyramid decoded once. Every fixture is a real TIFF written here and read back through openslide / tifffile."""

import json
import math

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from test_adaptive import _check, _image
from test_data import SCANNER, _scanner_tiff

from hrvit.config import PatchingConfig
from hrvit.data import SlideSource, open_image, open_label, write_pyramid_from_array
from hrvit.patching import IGNORE_INDEX, patch_adaptive, patch_pyramid
from hrvit.patching.overlay import LEVEL_COLOURS


def _stripes(shape) -> np.ndarray:
    """Labels whose majority is class 1 in every cell of 4 px or more, while a cell's centre (an even offset) always
    lands on 0 or 2: centre sampling never shows class 1 there. A 9 x 9 block of class 3 and a 1-px line of 4."""
    h, w = shape
    x = np.arange(w)
    label = np.broadcast_to(np.where(x % 2 == 1, 1, np.where(x % 4 == 0, 0, 2)), (h, w)).astype(np.uint8).copy()
    label[h // 3:h // 3 + 9, w // 2:w // 2 + 9] = 3
    label[:, w // 5] = 4
    return label


def majority_reference(label: np.ndarray, boxes, p: int) -> np.ndarray:
    """Slow and plain: per leaf and per cell, np.bincount of the in-image labels, the first (smallest) most frequent
    one; IGNORE_INDEX for a cell wholly outside the image."""
    out = np.full((len(boxes), p, p), IGNORE_INDEX, np.int64)
    for i, (y, x, size, _) in enumerate(boxes.tolist()):
        f = size // p
        for a in range(p):
            for b in range(p):
                cell = label[y + a * f:y + (a + 1) * f, x + b * f:x + (b + 1) * f]
                if cell.size:
                    out[i, a, b] = np.bincount(cell.ravel().astype(np.int64)).argmax()
    return out


def _tiff(path, array, compression="zlib", tile=(64, 64)):
    rgb = array.ndim == 3
    tifffile.imwrite(path, array, tile=tile, compression=compression, photometric="rgb" if rgb else "minisblack",
                     metadata=None)
    return path


# (301, 203) is the size whose file path differed in 34 of 299 leaves; the others are not multiples of anything
SIZES = [(301, 203), (257, 513), (1000, 37), (999, 1001)]


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("p,min_mult", [(8, 1), (4, 2)])
def test_file_and_memory_give_the_same_tree_tokens_and_labels(tmp_path, shape, p, min_mult):
    """A single-level tiled TIFF through SlideSource gives the tree, tokens and majority labels that patch_adaptive
    gives on the decoded pixels, whether the region is read whole or chunk by chunk (whole_max=0: working map
    pooled chunk by chunk, leaves cut from tile-aligned boxes)."""
    image, _ = _image(shape, 3, seed=sum(shape) + p)
    rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    source = SlideSource(_tiff(tmp_path / "image.tiff", rgb))
    label_array = _stripes(shape)
    label = open_label(_tiff(tmp_path / "label.tiff", label_array))
    assert source.level_count == 1 and source.shape == shape
    cfg = PatchingConfig(mode="adaptive", patch_size=p, tokens=300, min_leaf=p * min_mult)
    decoded = torch.from_numpy(source.read((0, 0), shape))
    memory = patch_adaptive(decoded, cfg, torch.from_numpy(label_array.astype(np.int64)))
    n = memory.real_tokens
    np.testing.assert_array_equal(memory.target[:n].numpy(), majority_reference(label_array, memory.boxes[:n], p))
    for whole_max in (None, 0):
        seq = patch_pyramid(source, cfg, label=label, **({} if whole_max is None else {"whole_max": whole_max}))
        assert torch.equal(seq.boxes, memory.boxes), whole_max
        assert torch.allclose(seq.pixels, memory.pixels, atol=1e-5), whole_max
        assert torch.equal(seq.target, memory.target), whole_max


def test_jpeg_file_matches_its_decoded_pixels(tmp_path):
    """JPEG is lossy, so the reference is the decoded image: still the same tree and tokens, both read modes."""
    image, _ = _image((301, 203), 3, seed=7)
    rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    source = SlideSource(_tiff(tmp_path / "image.tiff", rgb, compression="jpeg"))
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=299)
    memory = patch_adaptive(torch.from_numpy(source.read((0, 0), (301, 203))), cfg)
    for seq in (patch_pyramid(source, cfg), patch_pyramid(source, cfg, whole_max=0)):
        assert torch.equal(seq.boxes, memory.boxes) and torch.allclose(seq.pixels, memory.pixels, atol=1e-5)


@pytest.mark.parametrize("shape", [(13, 31, 7), (33, 9, 17), (5, 40, 23)])
def test_octree_on_awkward_volumes(shape):
    """No 3-D file path exists (volumes are read whole): the in-memory octree keeps its invariants (leaves tile the
    volume, none starts outside it, tokens are exact area means, majority labels) on sizes that divide nothing."""
    roots = math.prod(-(-s // 4) for s in shape)  # the shortest side is under 8: roots of 4 px
    seq = _check(shape, 4, roots + 50, seed=sum(shape), channels=2)
    image, label = _image(shape, 2, sum(shape))
    for i in range(seq.real_tokens):  # majority per cell, against a plain loop
        (z, y, x), size = seq.boxes[i, :3].tolist(), int(seq.boxes[i, 3])
        f = size // 4
        for c in np.ndindex(4, 4, 4):
            cell = label[z + c[0] * f:z + (c[0] + 1) * f, y + c[1] * f:y + (c[1] + 1) * f,
                         x + c[2] * f:x + (c[2] + 1) * f]
            want = int(torch.bincount(cell.reshape(-1)).argmax()) if cell.numel() else IGNORE_INDEX
            assert int(seq.target[i][c]) == want, (i, c)


def test_majority_labels_keep_a_class_centre_sampling_loses():
    """Class 1 holds half of every cell of 4 px or more and never its centre: majority labels show it in every such
    cell; ties go to the smaller label; values never leave the source's; IGNORE_INDEX only for cells wholly outside."""
    shape = (200, 136)
    label = torch.from_numpy(_stripes(shape).astype(np.int64))
    image = torch.zeros(1, *shape)
    image[0, 60:140, 30:90] = torch.rand(80, 60, generator=torch.Generator().manual_seed(0))
    seq = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=8, tokens=60), label)
    n = seq.real_tokens
    want = majority_reference(label.numpy(), seq.boxes[:n], 8)
    np.testing.assert_array_equal(seq.target[:n].numpy(), want)
    sizes = seq.boxes[:n, 2]
    big = sizes >= 32
    assert big.any() and (sizes == 8).any()
    inside = seq.target[:n][big] != IGNORE_INDEX
    assert (seq.target[:n][big][inside] != 0).float().mean() > 0.9  # class 1 (or 3, 4) wins, not the centre's 0/2
    assert set(seq.target[:n].unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    # a leaf crossing the image edge: its cells partly inside take the inside's label, wholly outside ones -100
    edge = ((seq.boxes[:n, 0] + sizes > shape[0]) | (seq.boxes[:n, 1] + sizes > shape[1])).nonzero()[:, 0]
    assert len(edge) and (seq.target[edge] == IGNORE_INDEX).any() and (seq.target[edge] != IGNORE_INDEX).any()


def test_mask_without_pyramid_decodes_each_tile_once(tmp_path):
    """A single-level mask in 48 x 48 tiles (straddling leaves) next to a floor-rounded 5-level slide: every leaf's
    majority labels (the reference loop on the mask's level-0 pixels), and each of the mask's 2646 tiles decoded
    exactly once (TiffLabel's own count), where leaf-by-leaf S x S reads decoded 3045 (L = 1024: 3481)."""
    h, w = SCANNER
    y, x = np.mgrid[0:h, 0:w]
    mask = ((x // 97 + y // 61) % 3).astype(np.uint8)
    mask[:, ::7] = 3  # thin class
    label = open_label(_tiff(tmp_path / "mask.tiff", mask, tile=(48, 48)))
    assert label.level_shapes == [SCANNER] and label.level_downsamples == [1.0] and label.tiles_decoded == 0
    src = open_image(_scanner_tiff(tmp_path / "floor2.tiff", [2, 2, 2, 2], math.floor))
    seq = patch_pyramid(src, PatchingConfig(mode="adaptive", patch_size=16, tokens=256), label=label)
    assert src.level_count == 5 and max(seq.meta["pixels_read"]) > 1  # the image is read from its levels
    n = seq.real_tokens
    np.testing.assert_array_equal(seq.target[:n].numpy(), majority_reference(mask, seq.boxes[:n], 16))
    assert label.tiles_decoded == -(-h // 48) * -(-w // 48) == 2646


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_generic_rgb_tiff_is_decoded_by_tifffile_with_openslides_values(tmp_path, compression):
    """A generic 8-bit RGB tiled TIFF is decoded by tifffile (about 3x openslide's speed) wherever openslide's
    level coordinates are whole pixels, with openslide's exact values: lossless tiles and JPEG tiles alike (both
    decoders are libjpeg-turbo), inside, across and outside the image edge, at level 0 and at exact levels; a
    start that falls between level pixels stays with openslide."""
    image, _ = _image((512, 768), 3, seed=11)
    rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    path = write_pyramid_from_array(tmp_path / "rgb.tif", rgb, tile=128, compression=compression)
    fast, plain = open_image(path), SlideSource(path, tifffile=False)
    assert isinstance(fast, SlideSource) and fast.tiles is not None and plain.tiles is None
    assert fast.level_shapes == plain.level_shapes and len(fast.level_shapes) >= 3
    reads = [(0, (0, 0), (512, 768)), (0, (-30, 700), (100, 120)), (0, (500, 760), (40, 40)),
             (1, (64, 128), (200, 300)), (2, (0, 0), fast.level_shapes[2]), (2, (-8, 600), (50, 50))]
    for level, start, size in reads:
        np.testing.assert_array_equal(fast.read_level(level, start, size), plain.read_level(level, start, size),
                                      err_msg=f"level {level} at {start}")
    decoded = fast.tiles.tiles_decoded
    assert decoded >= 24  # level 0 alone has 4 x 6 tiles
    np.testing.assert_array_equal(fast.read_level(1, (1, 3), (20, 20)), plain.read_level(1, (1, 3), (20, 20)))
    assert fast.tiles.tiles_decoded == decoded


def test_patchify_draws_on_what_it_read_without_a_second_decode(tmp_path):
    """`hrvit patchify` on a single-level file decodes every tile once: the overlay is drawn on the overview
    patch_pyramid made from the decoded region (seq.meta["picture"], asked for), not on a thumbnail decoded again
    (which doubled the CLI's time on an 8192^2 TIFF). With a 16-tile cache a second pass would decode them all again."""
    from hrvit.data.sources import TiffSource
    from hrvit.patching.overlay import patchify

    a = np.random.default_rng(5).integers(0, 65536, (600, 800), dtype=np.uint16)
    path = tmp_path / "flat16.tif"
    tifffile.imwrite(path, a, tile=(64, 64), photometric="minisblack", compression="zlib", metadata=None)
    source = TiffSource(path, cache_bytes=0)
    assert source.cache_tiles == 16
    stats = patchify(source, PatchingConfig(mode="adaptive", patch_size=8, tokens=128), tmp_path / "o.png", 400)
    assert stats["real_tokens"] > 100 and (tmp_path / "o.png").stat().st_size > 0
    assert source.tiles_decoded == 10 * 13  # each tile of the file once
    legend = json.loads(Image.open(tmp_path / "o.png").text["hrvit-legend"])  # what each outline colour means
    levels = sorted(map(int, stats["leaves_per_level"]))
    assert list(legend.items()) == [(f"{8 << lv} px leaves", LEVEL_COLOURS[lv].tolist()) for lv in levels]
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=128)
    seq = patch_pyramid(source, cfg, picture=400)
    assert "picture" not in patch_pyramid(source, cfg).meta  # only on request: training holds nothing more
    expected = a.reshape(300, 2, 400, 2).mean((1, 3)) / 65535
    np.testing.assert_allclose(seq.meta["picture"][0], expected, rtol=1e-5)


def test_patchify_cli_without_out_prints_and_writes_statistics_only(tmp_path):
    """`hrvit patchify FILE --json S` without --out (the benchmark's like-for-like row against the SC24-style
    reference, which makes no picture): exit 0, the statistics on stdout (flushed although the command skips the
    interpreter's teardown) and in S, equal to those of patchify drawing the overlay in this process, and no PNG."""
    from conftest import hrvit

    from hrvit.patching.overlay import patchify

    rgb = (np.random.default_rng(7).random((203, 301, 3)) * 255).astype(np.uint8)
    rgb[50:150, 80:220] = 200  # a flat block: coarse leaves there
    path = tmp_path / "flat.tiff"
    write_pyramid_from_array(path, rgb, tile=64, levels=1)
    out = tmp_path / "cli"
    proc = hrvit("patchify", path, "--tokens", 96, "--patch-size", 8, "--json", out / "stats.json")
    stats = json.loads((out / "stats.json").read_text())
    assert proc.stdout.startswith(f"{stats['real_tokens']} real tokens of 96 ") and "overlay" not in proc.stdout
    assert "overlay" not in stats["seconds"] and not list(tmp_path.rglob("*.png"))
    drawn = patchify(open_image(path), PatchingConfig(mode="adaptive", patch_size=8, tokens=96), tmp_path / "o.png")
    assert "overlay" in drawn["seconds"] and (tmp_path / "o.png").stat().st_size > 0
    for key in ("tokens", "real_tokens", "image_shape", "leaves_per_level", "area_fraction_per_level"):
        assert stats[key] == drawn[key], key
    assert len(stats["leaves_per_level"]) > 1


class _CountingSlide(SlideSource):
    """A SlideSource that counts its float reads of level 0 (instrumentation of the source, not of the patcher)."""

    float_reads = 0

    def read_level(self, level, start, size):
        self.float_reads += level == 0
        return super().read_level(level, start, size)


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_single_level_file_patched_from_bytes_is_bit_identical(tmp_path, compression):
    """A single-level 8-bit file is patched from its decoded bytes (read_stored), never from a float copy of the
    image, and gives exactly (torch.equal, not allclose) the tree, tokens, scores, labels and overview that
    patch_adaptive gives on read_level's float pixels: awkward sizes, working-map pools of 4 and 2 (p = 8; p = 4)
    and of 1 (p = 2: the bytes converted whole), both scorers, a tissue mask, an overview finer than the working
    map."""
    for shape in ((301, 203), (203, 301)) if compression == "jpeg" else ((301, 203),):
        image, _ = _image(shape, 3, seed=sum(shape))
        rgb = (image.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        path = _tiff(tmp_path / f"{shape[0]}.tiff", rgb, compression=compression)
        label_array = _stripes(shape)
        label = open_label(_tiff(tmp_path / f"{shape[0]}-label.tiff", label_array))
        decoded = torch.from_numpy(SlideSource(path).read((0, 0), shape))
        for p, scorer, picture in ((8, "edge", 100), (4, "variance", 250), (2, "edge", 100)):
            cfg = PatchingConfig(mode="adaptive", patch_size=p, tokens=299, scorer=scorer,
                                 tissue_mask=scorer == "variance")
            labels = (torch.from_numpy(label_array.astype(np.int64)), label) if p == 8 else (None, None)
            memory = patch_adaptive(decoded, cfg, labels[0], picture=picture)
            source = _CountingSlide(path)
            seq = patch_pyramid(source, cfg, label=labels[1], picture=picture)
            assert source.float_reads == 0, (shape, p)
            for field in ("boxes", "pixels", "score", "target", "level", "valid"):
                assert torch.equal(getattr(seq, field), getattr(memory, field)) if p == 8 or field != "target" \
                    else seq.target is memory.target is None, (shape, p, field)
            np.testing.assert_array_equal(seq.meta["picture"], memory.meta["picture"])


def test_read_stored_is_what_read_level_scales(tmp_path):
    """read_stored gives the stored values ([h, w, C], file dtype, 0 outside the image) and the factor read_level
    multiplies them by, bit for bit: 8-bit RGB through SlideSource's tifffile path, 16-bit greyscale through
    TiffSource, regions inside and sticking out of the image."""
    from hrvit.data.sources import TiffSource

    rgb = np.random.default_rng(3).integers(0, 256, (150, 97, 3), dtype=np.uint8)
    grey = np.random.default_rng(4).integers(0, 65536, (150, 97), dtype=np.uint16)
    rgb_source = SlideSource(_tiff(tmp_path / "rgb.tiff", rgb, "jpeg"))
    for source, dtype in ((rgb_source, np.uint8), (TiffSource(_tiff(tmp_path / "g.tif", grey)), np.uint16)):
        for start, size in (((0, 0), (150, 97)), ((13, 70), (64, 40)), ((-5, 90), (20, 20))):
            stored, scale = source.read_stored(0, start, size)
            assert stored.shape == (*size, source.channels) and stored.dtype == dtype
            floats = np.multiply(stored.transpose(2, 0, 1), np.float32(scale), dtype=np.float32)
            np.testing.assert_array_equal(floats, source.read_level(0, start, size))
    assert SlideSource(tmp_path / "rgb.tiff", tifffile=False).read_stored(0, (0, 0), (8, 8)) is None  # openslide


@pytest.mark.parametrize("shape", [(67, 130, 3), (130, 67, 2), (5, 9, 1), (64, 64, 3)])
def test_stored_working_maps_equal_torch_pooling(monkeypatch, shape):
    """The working maps pooled strip by strip from bytes (strided float32 adds in avg_pool2d's order, torch's own
    pooling for blocks the edge cuts) equal working_maps on the float image bit for bit, for pools of 2 and 4 and
    a further pooling after them, with several strips (STRIP_ROWS 8) and one."""
    from hrvit.patching import adaptive

    raw = torch.from_numpy(np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8))
    image = adaptive.StoredImage(raw, 1 / 255)
    for rows in (8, 64):
        monkeypatch.setattr(adaptive, "STRIP_ROWS", rows)
        for w in (2, 4, 8, 12):
            want = adaptive.working_maps(image.floats(), w)
            got = adaptive.stored_working_maps(image, w)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (rows, w)
