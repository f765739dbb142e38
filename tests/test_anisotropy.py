"""Anisotropic and thin volumes: an octree with roots and splits per axis, driven by the voxel spacing of the NIfTI
affine (5 mm slices are not cut as finely as 0.9 mm pixels); every leaf still resampled to p^3; thin scans (fewer
slices than p) patched one token thick, adaptive and uniform; real gzip NIfTI files with a rotated affine train
and predict through the CLI, and the prediction keeps the input's affine and voxel size."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hrvit

from hrvit.config import PatchingConfig
from hrvit.data import CaseSpec, open_case
from hrvit.data.windows import TrainWindows, _flip, read_window, voxel_spacing
from hrvit.errors import DataError
from hrvit.patching import IGNORE_INDEX, collate, patch_adaptive, patch_uniform
from hrvit.patching.adaptive import morton, root_edges, root_size, split_axes

SPACING = (5.0, 0.9, 0.9)
"""(z, y, x) mm: thick-slice MRI."""


def _volume(shape, seed=0, channels=1):
    """Smooth background, a bright ellipsoid (round in millimetres) with a noisy core, labels 0/1/2 by region."""
    g = torch.Generator().manual_seed(seed)
    mm = [torch.arange(n, dtype=torch.float32) * s for n, s in zip(shape, SPACING)]
    z, y, x = torch.meshgrid(*mm, indexing="ij")
    centre = [0.5 * n * s for n, s in zip(shape, SPACING)]
    r = torch.sqrt((z - centre[0]) ** 2 + (y - centre[1] * 0.8) ** 2 + (x - centre[2] * 1.1) ** 2)
    radius = 0.35 * min(n * s for n, s in zip(shape, SPACING)) + 20
    image = 0.2 + 0.1 * torch.sin(y / 40) + (r < radius).float() * 0.6
    core = r < radius / 2
    image = image + core * torch.rand(shape, generator=g) * 0.5
    label = (r < radius).long() + core.long()
    return image.expand(channels, *shape).clone(), label


def _reference_tokens(image, boxes, p):
    """Area mean of each box over its p^D cells (edge / p pixels per axis), zeros outside the image."""
    ndim = image.ndim - 1
    pad = int(boxes[:, ndim:].max())
    padded = F.pad(image, [pad] * 2 * ndim)
    pool = F.avg_pool2d if ndim == 2 else F.avg_pool3d
    out = []
    for box in boxes.tolist():
        start, edges = box[:ndim], box[ndim:]
        region = padded[(slice(None), *[slice(s + pad, s + pad + e) for s, e in zip(start, edges)])]
        out.append(pool(region[None], [e // p for e in edges])[0])
    return torch.stack(out)


def _reference_labels(label, boxes, p):
    """Majority per cell (smallest label on ties), IGNORE_INDEX for a cell wholly outside: np.bincount per cell."""
    out = np.full((len(boxes), p, p, p), IGNORE_INDEX, np.int64)
    lab = label.numpy()
    for i, box in enumerate(boxes.tolist()):
        start, edges = box[:3], box[3:]
        f = [e // p for e in edges]
        for c in np.ndindex(p, p, p):
            cell = lab[tuple(slice(s + k * n, s + (k + 1) * n) for s, k, n in zip(start, c, f))]
            if cell.size:
                out[(i, *c)] = np.bincount(cell.ravel()).argmax()
    return out


def _check_leaves(seq, shape, p, min_leaf, tokens=None):
    """Boxes p 2^k per axis and aligned to their edges, level = log2(longest edge / p), every valid box inside the
    volume at its start (it intersects it), leaves tiling the volume exactly once, Morton order, exact budget."""
    n, ndim = seq.real_tokens, len(shape)
    starts, edges = seq.boxes[:n, :ndim], seq.boxes[:n, ndim:]
    assert ((edges // p) & (edges // p - 1) == 0).all() and (edges >= min_leaf).all()
    assert (starts % edges == 0).all()
    assert torch.equal(seq.level[:n], torch.log2(edges.amax(1) / p).long())
    assert (starts < torch.tensor(shape)).all() and (starts >= 0).all()  # every real token intersects the volume
    cover = torch.zeros([int((starts[:, a] + edges[:, a]).max()) for a in range(ndim)], dtype=torch.int)
    for st, ed in zip(starts.tolist(), edges.tolist()):
        cover[tuple(slice(s, s + e) for s, e in zip(st, ed))] += 1
    assert (cover[tuple(slice(0, s) for s in shape)] == 1).all() and cover.max() == 1
    codes = morton((starts // min_leaf).numpy())
    assert (np.diff(codes.astype(np.float64)) > 0).all()
    if tokens is not None:
        full = math.prod(math.ceil(s / min_leaf) for s in shape)  # every leaf at min_leaf
        assert len(seq) == tokens and not seq.valid[n:].any()
        assert n == full if tokens >= full else tokens - 7 <= n <= tokens


@pytest.mark.parametrize("shape, p, tokens", [((20, 512, 512), 8, 1024), ((12, 256, 256), 16, 256),
                                              ((24, 256, 256), 8, 1024)])
def test_the_issue_volumes_patch_with_5mm_slices(shape, p, tokens):
    """The three volumes of the issue (one failed for 2048 roots, one was refused, one had 256 of 1023 leaves
    half outside along z) patch within budget; with 5 mm slices no leaf is cut as finely along z as in-plane."""
    image, label = _volume(shape)
    seq = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=p, tokens=tokens), label, spacing=SPACING)
    _check_leaves(seq, shape, p, p, tokens)
    n = seq.real_tokens
    edges = seq.boxes[:n, 3:].double()
    mm = edges * torch.tensor(SPACING, dtype=torch.float64)
    assert (edges[:, 0] <= edges[:, 1]).all() and (edges[:, 1] == edges[:, 2]).all()
    above = edges > p  # axes that could still split: their physical lengths within a factor 2 of each other
    longest = torch.where(above, mm, 0).amax(1)
    shortest = torch.where(above, mm, math.inf).amin(1)
    assert (shortest[above.any(1)] * 2 >= longest[above.any(1)]).all()
    z_out = seq.boxes[:n, 0] + seq.boxes[:n, 3] - shape[0]
    assert z_out.max() < p  # at most one minimal leaf's remainder past the last slice
    if shape == (24, 256, 256):
        assert z_out.max() <= 0  # 24 = 3 x 8: nothing sticks out any more
    large, small = edges.amax(1) == edges.amax(), edges.amax(1) == edges.amax(1).min()
    if not large.all():  # the detailed core gets the small leaves
        assert seq.score[:n][large].mean() < seq.score[:n][small].mean()


def test_tokens_are_per_axis_area_means_and_labels_majorities():
    """Token i is leaf i averaged over edge / p voxels per axis (zeros past the volume), labels the majority per
    cell (never a value not in the source; IGNORE_INDEX only for cells wholly outside)."""
    shape, p = (12, 72, 56), 4
    image, label = _volume(shape, seed=3, channels=2)
    label[2:5, 10:30, 7:9] = 3  # a thin structure, so majorities are not all one class
    seq = patch_adaptive(image, PatchingConfig(mode="adaptive", patch_size=p, tokens=150), label, spacing=SPACING)
    n = seq.real_tokens
    _check_leaves(seq, shape, p, p, 150)
    assert len(torch.unique(seq.boxes[:n, 3:], dim=0)) >= 3  # several non-cubic shapes, several levels
    assert (seq.boxes[:n, 3] < seq.boxes[:n, 4]).any()
    torch.testing.assert_close(seq.pixels[:n], _reference_tokens(image, seq.boxes[:n], p), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(seq.target[:n].numpy(), _reference_labels(label, seq.boxes[:n], p))
    assert (seq.pixels[n:] == 0).all() and (seq.target[n:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("shape, spacing, p, min_leaf, max_leaf, tokens, threshold", [
    ((7, 50, 33), (3.0, 1.0, 0.7), 4, None, None, 120, None),
    ((30, 41, 9), (0.8, 0.8, 4.0), 4, 8, 32, 30, None),
    ((5, 64, 64), (6.0, 1.0, 1.0), 8, None, None, None, 0.5),
    ((40, 100), (2.5, 1.0), 4, None, None, 90, None),
])
def test_per_axis_trees_on_awkward_shapes(shape, spacing, p, min_leaf, max_leaf, tokens, threshold):
    """Odd shapes, spacing on any axis, min/max leaf, threshold mode, and 2-D with anisotropic pixels: the same
    invariants, and tokens / labels equal to the plain references."""
    image, label = _volume(shape, seed=7, channels=2) if len(shape) == 3 else (None, None)
    if image is None:
        g = torch.Generator().manual_seed(7)
        image = torch.rand(2, *shape, generator=g) * (torch.arange(shape[1]) > shape[1] // 2)
        label = (image[0] * 3).long()
    cfg = PatchingConfig(mode="adaptive", patch_size=p, tokens=tokens, threshold=threshold, min_leaf=min_leaf,
                         max_leaf=max_leaf)
    seq = patch_adaptive(image, cfg, label, spacing=spacing)
    _check_leaves(seq, shape, p, min_leaf or p, tokens if threshold is None else None)
    n, ndim = seq.real_tokens, len(shape)
    assert max_leaf is None or (seq.boxes[:n, ndim:] <= max_leaf).all()
    torch.testing.assert_close(seq.pixels[:n], _reference_tokens(image, seq.boxes[:n], p), atol=1e-5, rtol=1e-5)
    assert set(seq.target[:n].unique().tolist()) <= set(label.unique().tolist()) | {IGNORE_INDEX}
    if ndim == 3:
        np.testing.assert_array_equal(seq.target[:n].numpy(), _reference_labels(label, seq.boxes[:n], p))


def test_isotropic_spacing_is_the_cubic_tree_bit_for_bit():
    """Same spacing on every axis (any value) gives exactly the tokens of no spacing: cubic roots and splits."""
    image, label = _volume((40, 72, 56), seed=1)
    cfg = PatchingConfig(mode="adaptive", patch_size=4, tokens=300)
    a = patch_adaptive(image, cfg, label)
    b = patch_adaptive(image, cfg, label, spacing=(1.3, 1.3, 1.3))
    for k in ("pixels", "boxes", "level", "valid", "target", "score"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert (a.boxes[:, 3:] == a.boxes[:, 3:4]).all()
    for extent, p, low, high in [((40, 72, 56), 4, 4, None), ((333, 97), 8, 16, None), ((64, 64, 64), 4, 8, 16)]:
        cubic = root_size(extent, p, low, high)
        assert root_edges(extent, p, low, high, (0.7,) * len(extent)) == (cubic,) * len(extent)


def test_roots_and_splits_follow_millimetres():
    assert root_edges((20, 512, 512), 8, 8, None, SPACING) == (16, 64, 64)  # 80 x 58 x 58 mm
    assert root_edges((12, 256, 256), 16, 16, None, SPACING) == (16, 64, 64)  # one root thick along z
    assert root_edges((12, 256, 256), 16, 16, 32, SPACING) == (16, 32, 32)  # max_leaf caps every axis
    assert split_axes((16, 64, 64), 8, SPACING) == (0, 1, 2)
    assert split_axes((16, 128, 128), 8, SPACING) == (0, 1, 2)  # 80 x 115 x 115 mm
    assert split_axes((16, 256, 256), 8, SPACING) == (1, 2)  # 80 x 230 x 230 mm: in-plane only
    assert split_axes((8, 32, 32), 8, SPACING) == (1, 2)  # z at the smallest leaf
    assert split_axes((8, 8, 8), 8, SPACING) == ()


def test_thin_volumes_pad_and_flat_images_are_still_refused():
    """Uniform tokens of a 12-slice volume with p = 16: one token thick, zeros / IGNORE_INDEX past the last slice.
    A 2-D image narrower than p stays an error, as does a volume smaller than p on every axis."""
    image, label = _volume((12, 40, 40), seed=2)
    seq = patch_uniform(image, 16, label)
    assert seq.pixels.shape == (9, 1, 16, 16, 16) and (seq.boxes[:, 0] == 0).all()
    assert (seq.pixels[:, :, 12:] == 0).all() and (seq.target[:, 12:] == IGNORE_INDEX).all()
    assert (seq.target[:, :12] != IGNORE_INDEX).any()
    with pytest.raises(DataError, match="smaller than one patch"):
        patch_uniform(torch.rand(1, 12, 100), 16)
    with pytest.raises(DataError, match="smaller than one patch"):
        patch_adaptive(torch.rand(1, 12, 12, 12), PatchingConfig(mode="adaptive", patch_size=16, tokens=8))


def _affine(spacing_zyx, angle=0.5):
    """A rotated (about the scanner's z) and shifted affine with voxel size spacing_zyx, in nibabel's (i, j, k) =
    hrvit's (x, y, z) columns."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, math.cos(0.2), -math.sin(0.2)],
                                                                    [0, math.sin(0.2), math.cos(0.2)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing_zyx[::-1])
    affine[:3, 3] = (-101.5, 37.25, -12.0)
    return affine


def _write_case(folder, name, shape, seed):
    """A gzip NIfTI image (int16) and label (uint8) with 5 mm slices, 0.9 mm pixels and a rotated affine."""
    image, label = _volume(shape, seed)
    affine = _affine(SPACING)
    paths = []
    for suffix, array in (("img", (image[0].numpy() * 1000).astype(np.int16)), ("seg", label.numpy().astype(np.uint8))):
        img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
        img.header.set_xyzt_units("mm")
        path = folder / f"{name}_{suffix}.nii.gz"
        nib.save(img, path)
        paths.append(path)
    return paths


def test_read_window_takes_the_spacing_from_the_affine(tmp_path):
    image_path, label_path = _write_case(tmp_path, "thin", (12, 64, 48), 4)
    case = open_case(CaseSpec("thin", [image_path], label_path, "train"), num_classes=3)
    assert np.allclose(voxel_spacing(case.image), SPACING)
    cfg = PatchingConfig(mode="adaptive", patch_size=8, tokens=40)
    seq = read_window(case, (0, 0, 0), (16, 64, 48), cfg)
    _check_leaves(seq, (12, 64, 48), 8, 8, 40)
    n = seq.real_tokens
    assert (seq.boxes[:n, 3] < seq.boxes[:n, 4]).any()  # in-plane leaves larger than along z: the 5 mm was seen
    whole = torch.from_numpy(case.image.read((0, 0, 0), (12, 64, 48)))
    torch.testing.assert_close(seq.pixels[:n], _reference_tokens(whole, seq.boxes[:n], 8), atol=1e-5, rtol=1e-5)
    flipped = _flip(seq, [0, 2])  # augmentation: mirrored boxes still hold their tokens, per axis
    torch.testing.assert_close(flipped.pixels[:n], _reference_tokens(whole.flip([1, 3]), flipped.boxes[:n], 8),
                               atol=1e-5, rtol=1e-5)
    assert voxel_spacing(object()) is None
    case.image.affine = np.diag([1.0, 1.0, 0.0, 1.0])  # degenerate: treated as isotropic
    assert voxel_spacing(case.image) is None


def test_uniform_windows_of_a_thin_volume_are_padded_along_z(tmp_path):
    """Uniform training windows of a 12-slice scan with p = 16 (flips included): 16 slices deep, 4 of them (past the
    end, or before the start once flipped) IGNORE_INDEX in the targets (the CLI run below trains on such windows)."""
    image_path, label_path = _write_case(tmp_path, "thin", (12, 64, 48), 6)
    spec = CaseSpec("thin", [image_path], label_path, "train")
    windows = TrainWindows([spec], window=32, patching=PatchingConfig(mode="uniform", patch_size=16), seed=0,
                           foreground_bias=0.5, augment=True)
    batch = collate([windows[k] for k in range(4)])
    assert batch["pixels"].shape == (4, 4, 1, 16, 16, 16) and (batch["boxes"][..., 3:] == 16).all()
    assert tuple(batch["image_shape"][0].tolist()) == (16, 32, 32)
    target = batch["target"]
    assert ((target == IGNORE_INDEX).sum((2, 3, 4)) == 4 * 16 * 16).all()  # 4 padded slices per token
    assert set(target.unique().tolist()) <= {IGNORE_INDEX, 0, 1, 2} and (target > 0).any()


def test_anisotropic_and_thin_volumes_train_and_predict_keeping_the_affine(tmp_path):
    """The issue's three shapes, gzip NIfTI with 5 mm slices and a rotated affine: two adaptive steps on whole
    volumes (each patched per axis from its affine), evaluation of the thin one, then prediction of each file; the
    predicted NIfTI has the input's shape, affine and voxel size exactly. (Uniform patching of the thin scan:
    test_uniform_windows_of_a_thin_volume_are_padded_along_z.)"""
    shapes = {"thin": (12, 256, 256), "slab": (20, 512, 512), "thick": (24, 256, 256)}
    rows = [dict(zip(("image", "label"), map(str, _write_case(tmp_path, name, shape, i))), split="train")
            for i, (name, shape) in enumerate(shapes.items())]
    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    small = ["model.preset=nano", "model.embed_dim=16", "model.depth=4", "model.num_heads=2",
             "model.decoder_channels=[4,4,4,4]", "parallel.sp_size=1", "data.layout=manifest", "data.root=null",
             "data.num_classes=3", "data.class_names=null", "patching.patch_size=16", "train.micro_batch=1",
             "train.warmup_steps=1", "train.log_every=1", "eval.split=train", "eval.max_cases=1", "eval.batch=1",
             "output.picture=false"]
    run = tmp_path / "run"
    hrvit("train", "launch/recipes/quickstart3d.yaml", *small, f"data.manifest={tmp_path / 'manifest.csv'}",
          "data.window=null", "patching.mode=adaptive", "patching.tokens=128", "train.steps=2", f"output.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dice_mean"] is not None
    inputs = [row["image"] for row in rows]
    hrvit("predict", run, "--input", *inputs, "--out", tmp_path / "pred")
    for path in inputs:
        ref = nib.load(path)
        pred = nib.load(tmp_path / "pred" / path.split("/")[-1].replace("_img.nii.gz", "_img_pred.nii.gz"))
        assert pred.shape == ref.shape
        np.testing.assert_array_equal(pred.affine, ref.affine)
        np.testing.assert_array_equal(pred.header.get_zooms(), ref.header.get_zooms())
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}
