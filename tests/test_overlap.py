"""Overlapping windowed inference with blending (issue 13 item 6), probability maps and progress (issue 17).

The references here are computed independently of hrvit's blending: window origins, Gaussian weights and a
full-size accumulator are written out in the test, and the model runs on each window as evaluation runs it.
Inputs are real files (PIL PNG, pyramidal TIFF, gzip NIfTI with a rotated affine and 5 mm slices).
"""

import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from conftest import hrvit
from PIL import Image

from hrvit.config import PatchingConfig, load_config
from hrvit.data.datasets import CaseSpec, open_case
from hrvit.data.sources import open_image
from hrvit.data.tiff import write_pyramid
from hrvit.errors import ConfigError
from hrvit.models import build_model
from hrvit.patching import collate, depatch

K = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one intra-op thread is ~5x faster than two on a shared 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(ndim=2, p=8, channels=1, seed=0):
    """A real ViT + UNETR decoder, randomly initialised."""
    torch.manual_seed(seed)
    return build_model("nano", ndim=ndim, patch_size=p, in_chans=channels, num_classes=K, embed_dim=32, depth=4,
                       num_heads=2, decoder_channels=[16] * int(np.log2(p))).eval()


class BorderModel(torch.nn.Module):
    """Segments a constant-label image the way windowed models fail at their borders: class 1 wins near the
    window's border (3 exp(-d) of the distance d to it, in pixels) and where the pixel is brighter than 0.9
    (10 % of a uniform noise image) — position-dependent logits without training."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, pixels, boxes, valid, scale):
        p = pixels.shape[-1]
        offsets = torch.arange(p)
        ys = boxes[..., 0, None] + offsets  # [B, L, p]: pixel rows within the window
        xs = boxes[..., 1, None] + offsets
        dy = torch.minimum(ys, self.window - 1 - ys).float()
        dx = torch.minimum(xs, self.window - 1 - xs).float()
        d = torch.minimum(dy[..., :, None], dx[..., None, :])
        wrong = 3 * torch.exp(-d) + 4 * (pixels[:, :, 0] - 0.9)
        return torch.stack([torch.zeros_like(wrong), wrong], dim=2)


def png_case(folder, image: np.ndarray, label: np.ndarray, name="img"):
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(label).save(folder / f"{name}_mask.png")
    return open_case(CaseSpec(name, [folder / f"{name}.png"], folder / f"{name}_mask.png", "val"), num_classes=K)


AFFINE = np.array([[0.0, -0.9, 0.0, 80.0], [0.9, 0.0, 0.0, -40.0], [0.0, 0.0, 5.0, 12.0], [0.0, 0.0, 0.0, 1.0]])
"""Rotated 90 degrees in-plane, 0.9 mm pixels, 5 mm slices, shifted."""


def nifti_case(folder, shape_xyz=(36, 28, 12), seed=0):
    """A gzip NIfTI volume (and label) of shape_xyz (x, y, z on disk) with AFFINE."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100, 20, shape_xyz).astype(np.float32)
    label = (rng.random(shape_xyz) < 0.3).astype(np.uint8)
    nib.save(nib.Nifti1Image(image, AFFINE), folder / "vol.nii.gz")
    nib.save(nib.Nifti1Image(label, AFFINE), folder / "vol_seg.nii.gz")
    return open_case(CaseSpec("vol", [folder / "vol.nii.gz"], folder / "vol_seg.nii.gz", "val"), num_classes=K)


def axis_starts(size: int, w: int, overlap: float) -> list[int]:
    stride = max(1, int(w * (1 - overlap)))
    starts = list(range(0, max(size - w, 0) + 1, stride))
    return starts + [size - w] if starts[-1] + w < size else starts


def gaussian(w: int) -> np.ndarray:
    t = np.arange(w) + 0.5 - w / 2
    return np.exp(-0.5 * (t / (w / 8)) ** 2).astype(np.float32)


def brute_force(model, case, window: int, p: int, overlap: float, batch: int):
    """Every window's Gaussian-weighted softmax added into one full-size array (and the weights into another):
    labels = argmax of the sum, probabilities = sum / weights."""
    from hrvit.data.windows import read_window

    shape = tuple(case.image.shape)
    win = [min(window, -(-n // p) * p) for n in shape]
    grid = np.meshgrid(*[axis_starts(n, w, overlap) for n, w in zip(shape, win)], indexing="ij")
    starts = list(zip(*[g.ravel().tolist() for g in grid]))
    weight = gaussian(win[0])
    for w in win[1:]:
        weight = weight[..., None] * gaussian(w)
    acc = np.zeros((K, *shape), np.float32)
    total = np.zeros(shape, np.float64)
    patching = PatchingConfig(mode="uniform", patch_size=p)
    for first in range(0, len(starts), batch):
        chunk = starts[first:first + batch]
        b = collate([read_window(case, s, win, patching, with_label=False) for s in chunk])
        with torch.no_grad():
            probs = torch.softmax(model(b["pixels"], b["boxes"], b["valid"], b["scale"]).float(), 2)
        for j, start in enumerate(chunk):
            dense = (depatch(probs[j], b["boxes"][j], b["valid"][j], win) * torch.from_numpy(weight)).numpy()
            region = tuple(slice(s, min(s + w, n)) for s, w, n in zip(start, win, shape))
            inside = tuple(slice(0, r.stop - r.start) for r in region)
            acc[(slice(None), *region)] += dense[(slice(None), *inside)]
            total[region] += weight[inside]
    return acc.argmax(0), acc / total


@pytest.fixture(scope="module")
def png2d(tmp_path_factory):
    """A 100 x 120 (height x width) RGB PNG with a 3-class mask."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)
    label = (rng.random((100, 120)) * K).astype(np.uint8)
    return png_case(tmp_path_factory.mktemp("png"), image, label)


def test_blended_labels_equal_a_full_canvas_reference_2d_and_3d(png2d, tmp_path):
    """(c) The band-by-band blending (only the rows still covered are held) gives the labels and probabilities
    of accumulating every window into one full-size array, in 2-D (100 x 120, window 32, overlap 0.5: last
    windows shifted inside) and 3-D (a rotated 5 mm NIfTI, window 16, overlap 0.25)."""
    from hrvit.engine.infer import case_dice_counts, predict_dense
    from hrvit.engine.metrics import dice_counts

    for case, model, window, p, overlap in [(png2d, small_model(channels=3), 32, 8, 0.5),
                                            (nifti_case(tmp_path), small_model(ndim=3, p=4), 16, 4, 0.25)]:
        want, want_probs = brute_force(model, case, window, p, overlap, batch=3)
        assert len(np.unique(want)) > 1, "the random model predicts one class: the comparison would be weak"
        labels, probs = predict_dense(model, case, window=window, patching=PatchingConfig(patch_size=p), batch=3,
                                      overlap=overlap, blend="gaussian", probabilities=True)
        assert np.array_equal(labels.full(), want)
        np.testing.assert_allclose(probs.full(), want_probs, rtol=1e-5, atol=1e-6)
        ndim = len(case.image.shape)
        assert np.array_equal(labels.read((5,) * ndim, case.image.shape, step=3), want[(slice(5, None, 3),) * ndim])
        # evaluation counts the same blended labels band by band (classes, then a region of classes 1 and 2)
        counts, _ = case_dice_counts(model, case, window=window, patching=PatchingConfig(patch_size=p), batch=3,
                                     num_classes=K, overlap=overlap, regions=[[1, 2]])
        truth = case.label.read((0,) * ndim, case.label.shape)
        assert np.array_equal(counts, dice_counts(want, truth, K, [[1, 2]]))


def test_overlap_zero_reproduces_the_token_labels_and_dice(png2d):
    """(b) eval.overlap = 0 keeps today's path: labels per token, the last grid window deciding (here the grid's
    last windows overlap the ones before); Dice counts equal those of today's labels; probabilities at overlap 0
    are the deciding window's, so their argmax is the same labels."""
    from hrvit.engine.infer import LabelMap, case_dice_counts, predict_dense, predict_labels, predict_windows
    from hrvit.engine.metrics import dice_counts

    model = small_model(channels=3)
    patching = PatchingConfig(patch_size=8)
    today = LabelMap(png2d.image.shape)
    for w in predict_windows(model, png2d, window=32, patching=patching, batch=4):
        today.add(w)
    labels = predict_labels(model, png2d, window=32, patching=patching, batch=4, overlap=0.0)
    assert isinstance(labels, LabelMap) and np.array_equal(labels.full(), today.full())
    counts, _ = case_dice_counts(model, png2d, window=32, patching=patching, batch=4, num_classes=K, overlap=0.0)
    truth = png2d.label.read((0, 0), png2d.label.shape)
    assert np.array_equal(counts, dice_counts(today.full(), truth, K))
    dense, probs = predict_dense(model, png2d, window=32, patching=patching, batch=4, overlap=0.0,
                                 probabilities=True)
    assert np.array_equal(dense.full(), today.full()) and np.array_equal(probs.full().argmax(0), today.full())


def test_blending_removes_the_window_seam(tmp_path):
    """(a) A constant-label noise image and a model that fails near window borders: with overlap 0 the wrong
    pixels pile up on the rows/columns at window borders; with overlap 0.5 and Gaussian blending the share of
    wrong pixels there is at most 1.5x that elsewhere (measured on the interior borders of both grids); Dice of
    the blended labels is higher. Evaluation's own Dice counts (case_dice_counts) are used."""
    from hrvit.engine.infer import case_dice_counts, predict_labels

    rng = np.random.default_rng(2)
    case = png_case(tmp_path, rng.integers(0, 256, (256, 256), dtype=np.uint8), np.zeros((256, 256), np.uint8))
    window, patching = 64, PatchingConfig(patch_size=8)
    model = BorderModel(window)

    def borders(stride):  # rows/columns on either side of an interior window border of a grid of this stride
        lines = np.zeros(256, bool)
        for border in range(stride, 256, stride):
            lines[border - 1:border + 1] = True
        return lines[:, None] | lines[None, :]

    shares = {}
    for overlap, stride in ((0.0, 64), (0.5, 32)):
        wrong = predict_labels(model, case, window=window, patching=patching, batch=8, overlap=overlap).full() != 0
        seam = borders(stride)
        shares[overlap] = wrong[seam].mean(), wrong[~seam].mean(), wrong[borders(64)].mean()
        counts, _ = case_dice_counts(model, case, window=window, patching=patching, batch=8, num_classes=2,
                                     overlap=overlap)
        assert counts[1, 0] == (~wrong).sum()  # predicted background pixels, as counted by evaluation
    (seam, rest, _), (seam_blended, rest_blended, old_seam) = shares[0.0], shares[0.5]
    assert rest > 0.05 and seam > 3 * rest, shares  # the seam exists without overlap
    assert old_seam <= 1.5 * rest_blended, shares  # blended: none where the seams of overlap 0 were
    assert seam_blended <= 1.5 * rest_blended, shares


def test_streaming_memory_does_not_grow_with_image_height(tmp_path):
    """(d) What blending holds at its peak (numpy allocations, traced by tracemalloc, not hrvit's own count) is
    the band of window rows: the same for a 128- and a 1024-row image of one width, and far below one full-size
    K-class float32 map of the tall image."""
    from hrvit.engine.infer import blend_bands

    peaks = {}
    for height in (128, 1024):
        rng = np.random.default_rng(3)
        case = png_case(tmp_path, rng.integers(0, 256, (height, 96), dtype=np.uint8),
                        np.zeros((height, 96), np.uint8), name=f"h{height}")
        model = BorderModel(32)
        tracemalloc.start()
        rows = 0
        for band in blend_bands(model, case, window=32, patching=PatchingConfig(patch_size=8), batch=4,
                                overlap=0.5, probabilities=True):
            rows += band.hi - band.lo
        peaks[height] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert rows == height
    full_map = 2 * 1024 * 96 * 4
    assert peaks[1024] < 1.25 * peaks[128] + 64 * 1024, peaks
    assert peaks[1024] < full_map / 2, (peaks, full_map)


def test_probability_maps_of_a_slide_and_a_volume(tmp_path):
    """`predict_image` with probabilities: a tiled slide gets one uint8 pyramid per class beside its label
    pyramid (same shape and levels; argmax of the probabilities is the label wherever the quantised top value is
    unique); a volume a float32 (x, y, z, class) NIfTI with the input's affine whose argmax is the label NIfTI."""
    from hrvit.engine.predict import predict_image

    rng = np.random.default_rng(4)
    slide = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    path = write_pyramid(tmp_path / "slide.tiff", (96, 80), lambda lv, y, x, h, w: slide[:h, :w], channels=3,
                         tile=32)
    cfg = load_config("launch/recipes/quickstart.yaml", ["data.window=32", "patching.mode=uniform",
                                                         "patching.patch_size=8", "eval.overlap=0.5",
                                                         f"output.dir={tmp_path / 'run'}"])
    out = tmp_path / "pred"
    written = predict_image(small_model(channels=3), cfg, [path], open_image(path), out, probabilities=True)
    names = sorted(p.name for p in written)
    assert names == sorted(["slide_pred.tiff", "slide_overlay.png", "slide_prob_background.tiff",
                            "slide_prob_tumour.tiff", "slide_prob_benign.tiff"]), names
    with tifffile.TiffFile(out / "slide_pred.tiff") as tf:
        labels = tf.pages[0].asarray()
        levels = [pg.shape for pg in tf.pages]
    planes = []
    for name in ("background", "tumour", "benign"):
        with tifffile.TiffFile(out / f"slide_prob_{name}.tiff") as tf:
            assert [pg.shape for pg in tf.pages] == levels and tf.pages[0].dtype == np.uint8
            planes.append(tf.pages[0].asarray())
    planes = np.stack(planes)
    assert labels.shape == (96, 80) and len(np.unique(labels)) > 1
    assert np.all(np.abs(planes.astype(int).sum(0) - 255) <= 2)
    top = np.sort(planes, 0)
    unique = top[-1] > top[-2]
    assert unique.mean() > 0.9 and np.array_equal(planes.argmax(0)[unique], labels[unique])

    volume = nifti_case(tmp_path)
    cfg3 = load_config("launch/recipes/quickstart.yaml", ["data.window=16", "patching.mode=uniform",
                                                          "patching.patch_size=4", "eval.overlap=0.5",
                                                          f"output.dir={tmp_path / 'run'}"])
    source = open_image(tmp_path / "vol.nii.gz")
    predict_image(small_model(ndim=3, p=4), cfg3, [tmp_path / "vol.nii.gz"], source, out, probabilities=True)
    prob = nib.load(out / "vol_prob.nii.gz")
    pred = nib.load(out / "vol_pred.nii.gz")
    assert prob.shape == (36, 28, 12, K) and prob.get_data_dtype() == np.float32
    np.testing.assert_allclose(prob.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(pred.affine, AFFINE, atol=1e-6)
    data = np.asarray(prob.dataobj)
    assert np.allclose(data.sum(-1), 1, atol=1e-5)
    assert np.array_equal(data.argmax(-1), np.asarray(pred.dataobj)) and len(np.unique(data.argmax(-1))) > 1
    assert volume.image.shape == (12, 28, 36)


def test_progress_lines_during_evaluation(png2d, capsys):
    """A plain line per batch of windows (eval.progress_s = 0) with windows done/total, elapsed and ETA; the last
    says all windows are done."""
    from hrvit.engine.infer import case_dice_counts

    for overlap in (0.0, 0.5):
        case_dice_counts(BorderModel(32), png2d, window=32, patching=PatchingConfig(patch_size=8), batch=4,
                         num_classes=K, overlap=overlap, progress_s=0)
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("case img: windows")]
        total = {0.0: 16, 0.5: 42}[overlap]  # (4 x 4) and (6 x 7) windows of 32 over 100 x 120
        assert len(lines) == -(-total // 4) and lines[-1].startswith(f"case img: windows {total}/{total}, ")
        assert all("s elapsed, ETA" in line for line in lines), lines


@pytest.mark.parametrize("overrides, key", [
    (["eval.overlap=1.0"], "eval.overlap: 1.0 must lie in [0, 1)"),
    (["eval.overlap=-0.1"], "eval.overlap: -0.1 must lie in [0, 1)"),
    (["eval.overlap=0.5", "data.window=null"], "eval.overlap: 0.5 needs windows, but data.window is null"),
    (["eval.blend=cosine"], "eval.blend: 'cosine' is not one of")])
def test_bad_overlap_settings_are_config_errors(overrides, key, tmp_path):
    """Caught at config load, naming the key (the CLI turns ConfigError into one message and exit status 2)."""
    import re

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("launch/recipes/quickstart.yaml", [*overrides, f"output.dir={tmp_path}"])


def test_predict_cli_blends_writes_probabilities_and_reports_progress(trained, slides, tmp_path):
    """The real command: `hrvit predict RUN eval.overlap=0.5 eval.progress_s=0 --probabilities` prints progress
    lines (windows done/total, elapsed, ETA) and writes one probability pyramid per class next to the labels."""
    image = sorted(p for p in slides.parent.glob("*.tiff") if not p.name.endswith("_mask.tiff"))[0]
    proc = hrvit("predict", trained, "eval.overlap=0.5", "eval.progress_s=0", "--probabilities", "--input", image,
                 "--out", tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(f"predict 1/1 {image.stem}: windows")]
    assert lines and "s elapsed, ETA" in lines[-1], proc.stdout
    total = lines[-1].split("windows ")[1].split(",")[0]
    assert total.split("/")[0] == total.split("/")[1]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([f"{image.stem}_pred.tiff", f"{image.stem}_overlay.png",
                              *[f"{image.stem}_prob_{c}.tiff" for c in ("background", "tumour", "gland")]]), written
