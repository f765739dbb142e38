"""The quick-look PNG people open first: titled panels, a legend, the image as the eye sees it, volumes as
three orthogonal planes through the structure."""

import json

import numpy as np
from PIL import Image

from hrvit.engine.picture import MIN_PLANE_EDGE, PALETTE, TITLE, write_picture


def test_slide_picture_has_titles_a_legend_and_the_unstretched_image(tmp_path):
    """A dim purple RGB image (8-bit values as read) keeps its colours (a percentile stretch turned such slides
    black and white); the legend names the classes present with their colours, in the PNG and its text chunks."""
    image = np.empty((3, 40, 60), np.float32)
    image[:] = np.array([0.5, 0.2, 0.5])[:, None, None]
    image[:, :20] = np.array([0.3, 0.1, 0.3])[:, None, None]
    truth = np.zeros((40, 60), np.int64)
    truth[5:15, 5:15] = 2
    pred = np.zeros((40, 60), np.int64)
    pred[5:15, 5:15] = 2
    pred[30:35, 40:50] = 1
    path = write_picture(tmp_path / "p.png", image, truth, pred, ["background", "tumour", "gland"])
    png = Image.open(path)
    assert json.loads(png.text["hrvit-panels"]) == ["image", "ground truth", "prediction"]
    assert json.loads(png.text["hrvit-legend"]) == {"tumour": PALETTE[1].tolist(), "gland": PALETTE[2].tolist()}
    pixels = np.asarray(png.convert("RGB"))
    assert pixels[TITLE + 30, 30].tolist() == [128, 51, 128] and pixels[TITLE + 2, 2].tolist() == [77, 26, 77]
    assert (pixels[:TITLE] < 128).any(), "a title is drawn above the panels"
    legend_row = pixels[-TITLE:]
    assert (np.abs(legend_row.astype(int) - PALETTE[1]).sum(-1) == 0).any(), "a tumour swatch in the legend"


def test_volume_picture_shows_three_enlarged_planes_through_the_structure(tmp_path):
    """A (12, 20, 16) MRI-like volume with a predicted blob off centre: axial, coronal and sagittal planes through
    the blob's centre, each at least MIN_PLANE_EDGE px on its longer side (it was one unlabelled 20 x 16 slice)."""
    rng = np.random.default_rng(0)
    image = rng.normal(300.0, 50.0, (1, 12, 20, 16)).astype(np.float32)
    pred = np.zeros((12, 20, 16), np.int64)
    pred[2:5, 12:17, 3:8] = 1
    path = write_picture(tmp_path / "v.png", image, None, pred)
    png = Image.open(path)
    assert json.loads(png.text["hrvit-panels"]) == ["image z = 3", "prediction z = 3", "image y = 14",
                                                    "prediction y = 14", "image x = 5", "prediction x = 5"]
    assert json.loads(png.text["hrvit-legend"]) == {"class 1": PALETTE[1].tolist()}
    # planes enlarged by whole factors to a longer side >= 256: axial 20 x 16 (x13), coronal 12 x 16 (x16),
    # sagittal 12 x 20 (x13); rows are stacked with an 8 px gap, the legend row below
    assert MIN_PLANE_EDGE == 256 and png.width == 2 * 20 * 13 + 8  # the sagittal row is the widest
    assert png.height == (260 + TITLE) + (192 + TITLE) + (156 + TITLE) + 2 * 8 + TITLE + 4
