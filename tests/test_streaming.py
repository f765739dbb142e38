"""Streaming prediction and evaluation (issue 12, item 4): labels per token, painted tile by tile.

The reference in each test is computed here the way hrvit did before (logits upsampled to full resolution by
depatch, argmax, windows stitched in grid order into one array; Dice from whole arrays), so the streamed path is
compared with an independent computation, on real pyramidal TIFFs and a real (randomly initialised) model.
"""

import os
import threading
from types import SimpleNamespace

import numpy as np
import openslide
import pytest
import tifffile
import torch

from hrvit.config import PatchingConfig, load_config
from hrvit.data.datasets import Case, CaseSpec, open_case
from hrvit.data.sources import open_image
from hrvit.data.synthetic import SyntheticSlide
from hrvit.data.tiff import default_levels, write_pyramid, write_pyramid_from_array
from hrvit.data.windows import grid_starts, read_window, window_shape
from hrvit.models import build_model
from hrvit.patching import collate, depatch

K = 3


def reference_labels(model, case, window, patching, batch=2) -> np.ndarray:
    """Labels as hrvit computed them before streaming: K x window float logits per window (depatch, nearest),
    argmax, stitched in grid order (a later window overwrites an earlier one)."""
    shape = tuple(case.image.shape)
    win = window_shape(shape, window, patching.patch_size)
    pred = np.zeros(shape, np.uint8)
    starts = grid_starts(shape, win)
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, s, win, patching, with_label=False) for s in chunk])
        with torch.no_grad():
            logits = model(b["pixels"], b["boxes"], b["valid"], b["scale"]).float()
        for j, start in enumerate(chunk):
            full = depatch(logits[j], b["boxes"][j], b["valid"][j], win).argmax(0).numpy()
            region = tuple(slice(s, min(s + w, n)) for s, w, n in zip(start, win, shape))
            pred[region] = full[tuple(slice(0, r.stop - r.start) for r in region)]
    return pred


def small_model(p: int = 16, seed: int = 0, channels: int = 3):
    """A real ViT + UNETR decoder, randomly initialised (tests check that it predicts several classes)."""
    torch.manual_seed(seed)
    return build_model("nano", ndim=2, patch_size=p, in_chans=channels, num_classes=K, embed_dim=32, depth=4,
                       num_heads=2, decoder_channels=[16] * int(np.log2(p))).eval()


def write_case(folder, shape, seed=1, tile=64, mpp=None):
    """A synthetic slide of `shape` and its mask as real pyramidal TIFFs; the case opened as training opens it."""
    slide = SyntheticSlide(shape, seed=seed)
    h, w = slide.shape
    image = write_pyramid(folder / "slide.tiff", slide.shape, slide.image, channels=3, tile=tile, mpp=mpp)
    label = write_pyramid_from_array(folder / "slide_mask.tiff", slide.label(0, 0, 0, h, w), tile=tile, mpp=mpp)
    return open_case(CaseSpec("slide", [image], label, "val"), num_classes=K)


@pytest.fixture(scope="module")
def odd_case(tmp_path_factory):
    return write_case(tmp_path_factory.mktemp("odd"), (700, 500), mpp=(0.26, 0.25))


@pytest.mark.parametrize("mode, window", [("uniform", None), ("uniform", 256), ("adaptive", None),
                                          ("adaptive", 256)])
def test_streamed_labels_equal_argmax_after_depatch(odd_case, mode, window):
    """700 x 500 (not a multiple of p or of the window: edge tokens reach past the image, the last windows
    overlap the ones before): the labels painted from per-token argmax equal argmax of depatched logits,
    pixel for pixel, because depatch upsamples with nearest, which commutes with argmax."""
    from hrvit.engine.infer import predict_labels

    patching = PatchingConfig(mode=mode, patch_size=16, tokens=300 if mode == "adaptive" else None)
    model = small_model()
    want = reference_labels(model, odd_case, window, patching)
    assert len(np.unique(want)) > 1, "the random model predicts one class: the comparison would be weak"
    labels = predict_labels(model, odd_case, window=window, patching=patching, batch=2)
    assert np.array_equal(labels.full(), want)
    # strided reads (pyramid levels, pictures) are the full map sampled, any region of it too
    assert np.array_equal(labels.read((0, 0), (700, 500), step=4), want[::4, ::4])
    assert np.array_equal(labels.read((123, 77), (301, 211)), want[123:424, 77:288])
    # per token: p^2 bytes plus the index grid, far below the K x window float32 logits of depatch
    win = window_shape(odd_case.image.shape, window, 16)
    assert labels.nbytes < K * 4 * np.prod(win) * len(labels.windows) / 4


def test_adaptive_leaves_upsampled_exactly_like_depatch():
    """Leaves larger than p (boxes of 16..128 px from p = 8 tokens) and random logits with many near-ties:
    painting from the per-token argmax equals argmax after depatch on the whole window."""
    from hrvit.engine.infer import LabelMap, WindowLabels

    gen = torch.Generator().manual_seed(3)
    boxes = torch.tensor([[0, 0, 128, 128], [0, 128, 64, 64], [64, 128, 64, 64], [128, 0, 16, 16],
                          [128, 16, 16, 16], [144, 0, 16, 32], [128, 32, 32, 160]])
    logits = torch.randint(0, 3, (len(boxes), K, 8, 8), generator=gen).float()  # integer logits: ties
    valid = torch.ones(len(boxes), dtype=torch.bool)
    want = depatch(logits, boxes, valid, (160, 192)).argmax(0).numpy()
    labels = LabelMap((160, 192))
    labels.add(WindowLabels.from_tokens((0, 0), (0, 0), (160, 192), boxes.numpy(), logits.argmax(1).byte().numpy()))
    assert np.array_equal(labels.full(), want)


def test_volume_tokens_upsampled_exactly_like_depatch():
    """3-D: boxes of 4..16 voxels from p = 4 tokens, one not cubic, and a gap no token covers (label 0, as
    depatch's fill)."""
    from hrvit.engine.infer import LabelMap, WindowLabels

    gen = torch.Generator().manual_seed(5)
    boxes = torch.tensor([[0, 0, 0, 16, 16, 16], [0, 16, 0, 8, 8, 8], [8, 16, 0, 8, 4, 8], [0, 0, 16, 4, 4, 4],
                          [4, 0, 16, 12, 8, 4]])
    logits = torch.randn(len(boxes), K, 4, 4, 4, generator=gen)
    valid = torch.ones(len(boxes), dtype=torch.bool)
    want = depatch(logits, boxes, valid, (16, 24, 20)).argmax(0).numpy()
    labels = LabelMap((16, 24, 20))
    labels.add(WindowLabels.from_tokens((0, 0, 0), (0, 0, 0), (16, 24, 20), boxes.numpy(),
                                        logits.argmax(1).byte().numpy()))
    covered = depatch(torch.ones(len(boxes), 1, 4, 4, 4), boxes, valid, (16, 24, 20))[0].numpy() > 0
    assert np.array_equal(labels.full(), want) and not covered.all() and (want[~covered] == 0).all()


def _peak_rss_growth(fn) -> int:
    """Bytes by which the process's resident high-water mark (VmHWM, the kernel's count: torch and numpy
    alike) rose while fn() ran, after resetting it to the current RSS (clear_refs 5)."""
    def read(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = read("VmRSS:")
    fn()
    return read("VmHWM:") - start


@pytest.fixture(scope="module")
def large_slide(tmp_path_factory):
    """An 8192^2 RGB pyramid of random-coloured 96-px blocks (cheap to write; edges for the quadtree)."""
    def tile(level, y0, x0, h, w):
        f = 2**level
        ys, xs = (np.arange(y0, y0 + h) * f) // 96, (np.arange(x0, x0 + w) * f) // 96
        key = (ys[:, None] * 7919 + xs[None, :] * 104729) % 251
        return np.stack([key, (key * 3) % 256, (key * 7) % 256], -1).astype(np.uint8)

    path = write_pyramid(tmp_path_factory.mktemp("large") / "big.tiff", (8192, 8192), tile, channels=3, mpp=0.5)
    return Case(CaseSpec("big", [path], None, "test"), open_image(path), None)


def test_prediction_of_an_8192_slide_stays_far_below_the_float_canvas(large_slide, tmp_path):
    """Whole-slide prediction (data.window null, 512 adaptive tokens) of an 8192^2 slide, label pyramid and
    overlay written: the process's peak resident memory (the kernel's high-water mark, torch included) grows by
    less than an eighth of the K x H x W float32 canvas that depatch allocated (805 MB)."""
    from hrvit.engine.infer import predict_labels
    from hrvit.engine.predict import _write_outputs

    cfg = load_config("launch/recipes/quickstart.yaml", ["patching.patch_size=16", "patching.tokens=512"])
    model = small_model()
    torch.set_num_threads(1)
    written = []

    def run():
        labels = predict_labels(model, large_slide, window=None, patching=cfg.patching, batch=1)
        written.extend(_write_outputs(cfg, tmp_path, "big", large_slide.image, labels))

    run()  # warm-up: first-call allocations of torch, openslide and tifffile are not the prediction's
    for p in written:
        p.unlink()
    growth = _peak_rss_growth(run)
    h, w = large_slide.image.shape
    assert growth < K * h * w * 4 / 8, f"peak grew by {growth / 1e6:.1f} MB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big_overlay.png", "big_pred.tiff"]
    assert openslide.OpenSlide(tmp_path / "big_pred.tiff").dimensions == (8192, 8192)


def test_prediction_tiff_opens_in_openslide_with_the_slides_geometry(odd_case, tmp_path):
    """The label pyramid of a 700 x 500 slide with mpp (y 0.26, x 0.25): OpenSlide reads the slide's level-0 size
    and mpp, the levels are nearest samples of level 0, every level's pixels equal the predicted labels, and no
    temporary file is left."""
    from hrvit.engine.infer import predict_labels
    from hrvit.engine.predict import _write_outputs

    cfg = load_config("launch/recipes/quickstart.yaml", ["patching.patch_size=16", "patching.tokens=300"])
    model = small_model()
    labels = predict_labels(model, odd_case, window=None, patching=cfg.patching, batch=1)
    _write_outputs(cfg, tmp_path, "slide", odd_case.image, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide_overlay.png", "slide_pred.tiff"]
    path = tmp_path / "slide_pred.tiff"
    slide, pred = openslide.OpenSlide(odd_case.image.path), openslide.OpenSlide(path)
    assert pred.dimensions == slide.dimensions == (500, 700)
    assert float(pred.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert float(pred.properties["openslide.mpp-y"]) == pytest.approx(0.26)
    assert pred.level_count == default_levels((700, 500), 256)
    full = labels.full()
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == pred.level_count
        for level, page in enumerate(tf.pages):
            assert page.is_tiled and np.array_equal(page.asarray(), full[:: 2**level, :: 2**level])


def test_failed_prediction_leaves_nothing_in_the_output_folder(odd_case, tmp_path):
    """A write that fails half-way (a label sampler that raises after some tiles) leaves no file behind."""
    from hrvit.engine.infer import predict_labels
    from hrvit.engine.predict import _write_outputs

    cfg = load_config("launch/recipes/quickstart.yaml", ["patching.patch_size=16", "patching.tokens=300"])
    labels = predict_labels(small_model(), odd_case, window=None, patching=cfg.patching, batch=1)
    calls, lock = [0], threading.Lock()
    real = labels.sample

    def failing(coords):
        with lock:
            calls[0] += 1
            if calls[0] > 3:
                raise OSError("disk full")
        return real(coords)

    labels.sample = failing
    with pytest.raises(OSError, match="disk full"):
        _write_outputs(cfg, tmp_path, "slide", odd_case.image, labels)
    assert calls[0] > 3 and os.listdir(tmp_path) == []


@pytest.fixture
def one_process_group(tmp_path):
    """A one-rank gloo group, as `hrvit eval` on one rank has (evaluation gathers its counts through it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode, window", [("uniform", 256), ("adaptive", None)])
def test_evaluation_dice_equals_full_array_dice(odd_case, tmp_path, one_process_group, mode, window, monkeypatch):
    """SegmentTask.evaluate (counts per window against truth read block by block) gives the Dice of whole arrays:
    the reference labels and the whole mask read with tifffile, Dice per class computed here. Counting never
    reads the whole mask."""
    from hrvit.engine.segment import SegmentTask

    overrides = ["data.num_classes=3", "patching.patch_size=16", f"patching.mode={mode}", "patching.tokens=300",
                 f"data.window={window if window else 'null'}", "eval.batch=2", "parallel.sp_size=1"]
    cfg = load_config("launch/recipes/quickstart.yaml", overrides)
    model = small_model()
    torch.set_num_threads(1)
    want_pred = reference_labels(model, odd_case, window, cfg.patching)
    truth = tifffile.imread(odd_case.label.path, key=0).astype(np.int64)
    want = {}
    for k, name in enumerate(cfg.data.class_names):
        p, t = want_pred == k, truth == k
        want[name] = round(2 * (p & t).sum() / (p.sum() + t.sum()), 6) if p.sum() + t.sum() else None

    import hrvit.engine.infer

    monkeypatch.setattr(hrvit.engine.infer, "CHUNK", 128)
    reads = []
    real_open = __import__("hrvit.engine.segment", fromlist=["open_case"]).open_case

    def open_and_record(spec, **kw):
        case = real_open(spec, **kw)
        read = case.label.read

        def recorded(start, size):
            reads.append(tuple(size))
            return read(start, size)

        case.label.read = recorded
        return case

    session = SimpleNamespace(dp_rank=0, dp_size=1, sp=None, sp_rank=0, rank=0, build_model=None)
    import hrvit.engine.segment as segment

    spec = odd_case.spec
    original, segment.open_case = segment.open_case, open_and_record
    try:
        result = SegmentTask(cfg).evaluate(session, model, [spec], tmp_path, step=0)
    finally:
        segment.open_case = original
    assert result["cases"] == 1
    assert result["dice_per_class"] == want
    assert (tmp_path / "prediction.png").stat().st_size > 0
    # counting reads blocks (128^2 here) of the windows' own parts; only the picture of a slide this small
    # (read whole, as before) covers all of it
    assert sum(np.prod(s) == 700 * 500 for s in reads) == 1 and max(sorted(map(np.prod, reads))[:-1]) <= 128**2
    assert sum(np.prod(s) for s in reads) == 2 * 700 * 500  # every pixel counted once, plus the picture


def test_prediction_of_a_16_bit_slide_is_a_label_pyramid(tmp_path):
    """A tiled uint16 greyscale slide (read by tifffile, not OpenSlide) with a resolution tag is predicted into a
    label pyramid at its size and scale, like an RGB slide, not into a full-resolution PNG."""
    from hrvit.engine.infer import predict_labels
    from hrvit.engine.predict import _write_outputs

    image = np.random.default_rng(0).integers(0, 4096, (700, 500)).astype(np.uint16)
    path = tmp_path / "grey16.tif"
    tifffile.imwrite(path, image, tile=(256, 256), resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit=3)
    case = Case(CaseSpec("grey16", [path], None, "test"), open_image(path), None)
    assert case.image.channels == 1
    cfg = load_config("launch/recipes/quickstart.yaml", ["patching.patch_size=16", "patching.tokens=300"])
    labels = predict_labels(small_model(channels=1), case, window=None, patching=cfg.patching, batch=1)
    out = tmp_path / "out"
    _write_outputs(cfg, out, "grey16", case.image, labels)
    assert sorted(p.name for p in out.iterdir()) == ["grey16_overlay.png", "grey16_pred.tiff"]
    pred = openslide.OpenSlide(out / "grey16_pred.tiff")
    assert pred.dimensions == (500, 700) and float(pred.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_predict_inputs_expand_and_clashing_names_are_refused(tmp_path):
    """--input items: a folder gives its images (masks, earlier predictions and other files skipped), ';' joins
    the channel files of one image, nothing found or a missing file is one DataError naming the item, and two
    different files that would write the same output name are refused."""
    from hrvit.engine.predict import expand_inputs
    from hrvit.errors import DataError

    for name in ("a.tif", "a_mask.tif", "a_pred.tif", "b.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert expand_inputs([str(tmp_path)]) == [[tmp_path / "a.tif"], [tmp_path / "b.nii.gz"]]
    assert expand_inputs([f"{tmp_path / 'b.nii.gz'};{tmp_path / 'a.tif'}", str(tmp_path / "a.tif")]) == [
        [tmp_path / "b.nii.gz", tmp_path / "a.tif"], [tmp_path / "a.tif"]]
    with pytest.raises(DataError, match="no image found"):
        expand_inputs([str(tmp_path / "*.svs")])
    with pytest.raises(DataError, match="c.tif not found"):
        expand_inputs([str(tmp_path / "c.tif")])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.tif").write_bytes(b"x")
    with pytest.raises(DataError, match="would both be written as a_pred"):
        expand_inputs([str(tmp_path / "a.tif"), str(tmp_path / "other")])
