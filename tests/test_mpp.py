"""data.mpp: slides scanned at 20x and 40x are cut at one physical scale and give the same tokens, positions and
model output; the level that suits is read; slides without resolution tags are refused. Fixtures are real
pyramidal TIFFs written here (lossless, so a 40x slide's level 1 is exactly the 20x slide's level 0)."""

import json

import numpy as np
import pytest
import tifffile
import torch
from conftest import PY, run
from PIL import Image

from hrvit.config import PatchingConfig
from hrvit.data import CaseSpec, open_case, write_pyramid_from_array
from hrvit.data.windows import read_window, window_shape
from hrvit.errors import DataError
from hrvit.models.vit import build_model
from hrvit.patching import collate

H, W = 600, 808  # 20x level-0 size: not a power of two, nor a multiple of the tile


def _content() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    blob = ((y - 300) ** 2 + (x - 420) ** 2 < 150**2) | ((y - 120) ** 2 / 3 + (x - 150) ** 2 < 60**2)
    rgb = np.stack([128 + 90 * np.sin(x / 11) * np.cos(y / 17), 128 + 80 * np.sin((x + y) / 23),
                    128 + 60 * np.cos(x / 7 + y / 13)], -1)
    rgb[blob] = rgb[blob] * 0.4 + np.array([150, 40, 120]) * 0.6
    return rgb.clip(0, 255).astype(np.uint8), blob.astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """The same tissue scanned at 0.5 um/px (20x) and 0.25 um/px (40x, each pixel twice per axis), with masks."""
    out = tmp_path_factory.mktemp("mpp")
    rgb, label = _content()
    big = rgb.repeat(2, 0).repeat(2, 1)
    paths = {}
    for name, image, mask, mpp, levels in (("x20", rgb, label, 0.5, 3),
                                           ("x40", big, label.repeat(2, 0).repeat(2, 1), 0.25, 4)):
        paths[name] = (write_pyramid_from_array(out / f"{name}.tiff", image, tile=128, compression="zlib", mpp=mpp,
                                                levels=levels),
                       write_pyramid_from_array(out / f"{name}_mask.tiff", mask, tile=128, mpp=mpp, levels=levels))
    png = out / "plain.png"
    Image.fromarray(rgb).save(png)
    Image.fromarray(label).save(out / "plain_mask.png")
    paths["png"] = (png, out / "plain_mask.png")
    return paths


def _in_box_order(seq):
    key = seq.boxes[:, 0] * 10**6 + seq.boxes[:, 1] + (~seq.valid).long() * 10**12
    order = torch.argsort(key)
    seq.pixels, seq.boxes, seq.level, seq.valid, seq.target = (t[order] for t in (
        seq.pixels, seq.boxes, seq.level, seq.valid, seq.target))
    return seq


def _case(paths, mpp=0.5):
    image, label = paths
    return open_case(CaseSpec("c", [image], label, "train", mpp=mpp), num_classes=2)


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_20x_and_40x_give_the_same_tokens_and_model_output(slides, mode):
    patching = PatchingConfig(mode=mode, patch_size=16, tokens=64 if mode == "adaptive" else None)
    c20, c40 = _case(slides["x20"]), _case(slides["x40"])
    assert (c20.scale, c40.scale) == (1.0, 2.0)
    assert window_shape(c40.image.shape, 256, 16, c40.scale) == (512, 512)
    seqs = []
    for case, origin in ((c20, (200, 240)), (c40, (400, 480))):
        win = window_shape(case.image.shape, 256, 16, case.scale)
        seqs.append(read_window(case, origin, win, patching))
    a, b = (_in_box_order(x) for x in seqs)  # uniform tokens come in row order from one reader, Z-order from the other
    assert b.scale == 2.0 and a.scale == 1.0
    assert a.real_tokens == b.real_tokens > 16
    torch.testing.assert_close(b.boxes[b.valid] // 2, a.boxes[a.valid], rtol=0, atol=0)
    torch.testing.assert_close(b.pixels, a.pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.target, a.target, rtol=0, atol=0)
    torch.testing.assert_close(b.level, a.level, rtol=0, atol=0)
    if mode == "adaptive":
        assert 0 not in b.meta["pixels_read"], b.meta["pixels_read"]  # 40x: every leaf read from level 1 or coarser
    torch.manual_seed(0)
    model = build_model("nano", ndim=2, patch_size=16, in_chans=3, num_classes=2).eval()
    with torch.no_grad():
        out = [model(x["pixels"], x["boxes"], x["valid"], x["scale"]) for x in (collate([a]), collate([b]))]
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)


def test_position_code_does_not_depend_on_the_slide_size(slides):
    """A whole-slide window (data.window null) of a small and of a large slide: the same token box gets the same
    code (image_shape, which differs, no longer enters the position)."""
    torch.manual_seed(0)
    model = build_model("nano", ndim=2, patch_size=16, in_chans=3, num_classes=2).eval()
    boxes = torch.tensor([[[32, 48, 16, 16], [0, 0, 64, 64]]])
    with torch.no_grad():
        codes = [model.encoder.box_embed(boxes.float(), 2.0**16) for _ in range(2)]
        small = collate([read_window(_case(slides["x20"], None), (0, 0), (608, 816), PatchingConfig(patch_size=16))])
        large = collate([read_window(_case(slides["x40"], None), (0, 0), (1200, 1616), PatchingConfig(patch_size=16))])
    torch.testing.assert_close(codes[0], codes[1])
    first = [model.encoder.box_embed(x["boxes"][:, :1].float() / x["scale"].view(-1, 1, 1), 2.0**16)
             for x in (small, large)]
    torch.testing.assert_close(first[0], first[1])  # token 0 of both is the same box at (0, 0)


def test_a_scanner_rounded_magnification_uses_the_nearest_even_token(slides, tmp_path):
    """0.2525 um/px (a 40x scanner's calibration) at data.mpp=0.5: 31.7 level-0 pixels per token round to 32, and
    the tokens come from level 1."""
    image, label = slides["x40"]
    with tifffile.TiffFile(image) as tf:
        pages = [page.asarray() for page in tf.pages]
    path = tmp_path / "odd.tiff"
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(pages):
            tw.write(level, tile=(128, 128), photometric="rgb", compression="zlib", subfiletype=int(i > 0),
                     metadata=None, resolution=(1e4 / 0.2525 / 2**i,) * 2, resolutionunit="CENTIMETER")
    case = open_case(CaseSpec("c", [path], None, "test", mpp=0.5))
    assert case.scale == pytest.approx(0.5 / 0.2525)
    seq = read_window(case, (0, 0), window_shape(case.image.shape, 128, 16, case.scale),
                      PatchingConfig(mode="adaptive", patch_size=16, tokens=40))
    assert seq.scale == 2.0 and int(seq.boxes[seq.valid, 2:].min()) == 32
    assert 0 not in seq.meta["pixels_read"]


def test_missing_resolution_and_too_coarse_slides_are_refused(slides):
    with pytest.raises(DataError, match=r"plain\.png: data\.mpp=0\.5 needs the slide's resolution"):
        _case(slides["png"])
    with pytest.raises(DataError, match=r"x20\.tiff: scanned at 0\.5 microns per pixel, coarser than data\.mpp=0\.25"):
        _case(slides["x20"], mpp=0.25)


def _manifest(folder, rows):
    path = folder / "manifest.csv"
    path.write_text("image,label,split\n" + "".join(f"{i},{m},{s}\n" for i, m, s in rows))
    return path


def test_mixed_magnifications_train_evaluate_and_predict_at_level_0(slides, tmp_path):
    """hrvit train with data.mpp on a 20x and a 40x slide; prediction of the 40x slide is a label pyramid with the
    slide's own geometry and resolution."""
    rows = [(slides["x20"][0], slides["x20"][1], "train"), (slides["x40"][0], slides["x40"][1], "val")]
    manifest = _manifest(tmp_path, rows)
    common = [f"data.manifest={manifest}", "data.mpp=0.5", "data.num_classes=2", "data.class_names=null",
              "data.window=128", "parallel.sp_size=1", "data.allow_outside_root=true", "patching.mode=adaptive",
              "patching.tokens=32", "train.steps=3", "train.micro_batch=2", "train.warmup_steps=1", "eval.batch=4",
              "output.picture=false"]
    out = tmp_path / "run"
    run([PY, "-m", "hrvit", "train", "launch/recipes/quickstart.yaml", *common, f"output.dir={out}"])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["dice_mean"] <= 1.0
    pred = tmp_path / "pred"
    run([PY, "-m", "hrvit", "predict", out, "--input", slides["x40"][0], "--out", pred])
    written = sorted(pred.glob("*.tif*"))
    assert written, list(pred.iterdir())
    with tifffile.TiffFile(written[0]) as tf:
        assert tf.pages[0].shape[:2] == (2 * H, 2 * W)
        x_res = tf.pages[0].tags["XResolution"].value
        assert 1e4 * x_res[1] / x_res[0] == pytest.approx(0.25, rel=1e-3)
