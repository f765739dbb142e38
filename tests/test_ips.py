"""Iterative patch selection: exact top-M with one head, bounded memory, masked padding, the MIL head."""

import gc
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import hrvit

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


def _patch_storages():
    """{address: patches' worth} of the storage of every live tensor of 3 x S x S float patches."""
    tensor = torch.Tensor
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() // (3 * S * S * 4)
            for t in gc.get_objects() if type(t) is tensor and t.shape[-3:] == (3, S, S)}


def test_memory_never_holds_more_than_m_plus_i_patches():
    """Counted from the tensors alive at each score call (not from select_patches' own figure); with `embed`,
    each candidate is embedded once and the kept ones' embeddings are reused, for the same selection."""
    model, image = _model(heads=4), _image(160, 160)
    boxes, shape = grid_boxes(image.shape[1:], S), image.shape[1:]
    embedded, runs = [], {}

    def embed(p):
        embedded.append(len(p))
        return model.embedder(p)

    for cached in (False, True):
        gc.collect()
        before, alive, reads = _patch_storages(), [], []  # the image (the reader's views) and older tensors
        score = model.score_embedded if cached else model.score

        def watched(x, b, score=score, before=before, alive=alive):
            alive.append(sum(n for ptr, n in _patch_storages().items() if ptr not in before))
            return score(x, b, shape)

        seq, stats = select_patches(_reader(image, reads), boxes, watched, memory=10, chunk=24, image_shape=shape,
                                    embed=embed if cached else None)
        assert stats.candidates == len(boxes) == 100 and stats.chunks == 5
        assert max(alive) == stats.peak_patches == 10 + 24 and max(reads) <= 24 and sum(reads) == 100
        assert len(seq) == 10 and seq.valid.all()
        runs[cached] = seq
    assert sum(embedded) == 100  # the 10 kept patches were not embedded again with every chunk
    assert torch.equal(runs[True].boxes, runs[False].boxes) and torch.equal(runs[True].pixels, runs[False].pixels)


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


# ---------------------------------------------------------------- task: classify, end to end

IPS_RECIPE = "launch/recipes/ips_quickstart.yaml"
IPS_TINY = ["model.embed_dim=32", "model.num_heads=2", "ips.memory=8", "ips.chunk=16", "ips.heads=2",
            "train.micro_batch=2", "train.warmup_steps=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    """Twelve 256^2 megapixel canvases (64 candidates of 32^2 each) as pyramidal TIFFs, with a manifest."""
    from hrvit.data.synthetic import make_megapixel

    return make_megapixel(tmp_path_factory.mktemp("canvases"), n=12, size=256, seed=1)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_zero2_classifier_trains_and_loss_falls(canvases, tmp_path):
    run = tmp_path / "run"
    hrvit("train", IPS_RECIPE, *IPS_TINY, f"data.manifest={canvases}", f"output.dir={run}", "train.steps=24",
          "train.lr=3e-3", ranks=2)
    losses = [r["loss"] for r in _rows(run) if "loss" in r]
    assert len(losses) == 24 and np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["eval_cases"] == 3
    assert 0 <= summary["accuracy"] <= 1 and 0 <= summary["balanced_accuracy"] <= 1
    assert summary["tokens_per_s"] > 0 and (run / "prediction.png").stat().st_size > 0
    for selection, name in (("top", "eval_val.json"), ("random", "eval_val_random_selection.json")):
        out = hrvit("eval", run, "--selection", selection)
        result = json.loads((run / name).read_text())
        assert result["selection"] == selection and result["cases"] == 3 and 0 <= result["accuracy"] <= 1, out.stdout
    assert json.loads((run / "eval_val.json").read_text())["accuracy"] == summary["accuracy"]


def test_zero3_matches_zero2_and_more_memory_than_candidates_is_masked(canvases, tmp_path):
    """ips.memory=80 > 64 candidates: padded, masked patches; ZeRO-3 (selection by a gathered copy of the
    model) follows the ZeRO-2 run step for step."""
    losses = {}
    for stage in (2, 3):
        run = tmp_path / f"zero{stage}"
        hrvit("train", IPS_RECIPE, *IPS_TINY, f"data.manifest={canvases}", f"output.dir={run}", "train.steps=4",
              "ips.memory=80", "ips.explore=0.25", f"deepspeed.config=ds_configs/zero{stage}.json")
        losses[stage] = [r["loss"] for r in _rows(run) if "loss" in r]
    assert np.allclose(losses[2], losses[3], rtol=0, atol=1e-5), losses


def test_classify_bad_input_is_one_clear_error(canvases, tmp_path):
    bad = tmp_path / "manifest.csv"
    rows = canvases.read_text().splitlines()
    bad.write_text("\n".join([rows[0], rows[1].replace(",0,", ",7,"), *rows[2:]]) + "\n")
    for path in canvases.parent.glob("*.tiff"):
        shutil.copy(path, tmp_path / path.name)
    out = hrvit("train", IPS_RECIPE, *IPS_TINY, f"data.manifest={bad}", f"output.dir={tmp_path / 'r1'}",
                check=False)
    assert out.returncode == 2 and "canvas_000" in out.stderr and "target 7" in out.stderr, out.stderr
    assert not (tmp_path / "r1").exists()
    out = hrvit("train", IPS_RECIPE, f"data.manifest={canvases}", "ips.chunk=0", check=False)
    assert out.returncode == 2 and "ips.chunk: 0 must be >= 1" in out.stderr, out.stderr
    out = hrvit("train", IPS_RECIPE, f"data.manifest={canvases}", "ips.patch=24", check=False)
    assert out.returncode == 2 and "ips.patch: 24 must be a multiple of patching.patch_size (16)" in out.stderr


def test_blank_slide_has_no_tissue_candidates(tmp_path):
    from hrvit.data.tiff import write_pyramid_from_array
    from hrvit.engine.classify import candidates

    blank = write_pyramid_from_array(tmp_path / "glass.tiff", np.full((256, 256, 3), 240, np.uint8))
    with pytest.raises(DataError, match="glass.tiff: no candidate patch: the tissue mask"):
        candidates((str(blank),), 32, None, True)
    assert len(candidates((str(blank),), 32, None, False)[1]) == 64


def test_images_of_mixed_sizes_share_a_batch(tmp_path):
    """Every image gives M patches of the same size, whatever its own size; each keeps its shape."""
    from hrvit.config import load_config
    from hrvit.data.datasets import CaseSpec
    from hrvit.data.synthetic import make_megapixel
    from hrvit.engine.classify import build_classifier, select

    small = make_megapixel(tmp_path / "a", n=1, size=128, seed=2).parent / "canvas_000.tiff"
    large = make_megapixel(tmp_path / "b", n=1, size=384, seed=3).parent / "canvas_000.tiff"
    cfg = load_config(IPS_RECIPE, ["data.manifest=x.csv", *IPS_TINY])
    model = build_classifier(cfg, 3)
    specs = [CaseSpec(id=p.parent.name, image=[p], label=None, split="train", target=1) for p in (small, large)]
    batch = select(cfg, model, specs, explore=0.0, device=torch.device("cpu"))
    assert batch["pixels"].shape == (2, 8, 3, 32, 32)
    assert batch["image_shape"].tolist() == [[128, 128], [384, 384]]
    assert batch["valid"].all()
    logits = model(batch["pixels"], batch["boxes"], batch["valid"], batch["image_shape"])[0]
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


def test_megapixel_label_is_the_shape_of_the_red_targets_only():
    from hrvit.data.synthetic import MegapixelCanvas

    def draw(label, seed=4):
        return MegapixelCanvas(256, seed, label=label).image(0, 0, 0, 256, 256).astype(int)

    a, b = draw(0), draw(3)
    assert np.array_equal(a, draw(0))  # deterministic by seed
    red = (a[..., 0] - a[..., 1] > 100) | (b[..., 0] - b[..., 1] > 100)
    assert 0 < red.mean() < 0.02  # a few small targets
    assert np.array_equal(a[~red], b[~red])  # the label changes the targets and nothing else
    assert not np.array_equal(a[red], b[red])  # disk vs ring


def test_classification_metrics():
    from hrvit.engine.metrics import binary_auc, classification_summary

    truth = np.array([0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.6, 0.4, 0.7, 0.9])  # one of the six (pos, neg) pairs is out of order
    assert binary_auc(positive, truth) == pytest.approx(5 / 6)
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # ties count half
    assert binary_auc(positive, np.ones(5, int)) is None
    probs = np.stack([1 - positive, positive], 1)
    out = classification_summary(probs, truth, ["normal", "tumour"])
    assert out["accuracy"] == pytest.approx(0.6) and out["auc"] == pytest.approx(5 / 6)
    assert out["recall_per_class"] == {"normal": 0.5, "tumour": pytest.approx(2 / 3)}
    assert out["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert classification_summary(np.eye(3)[[0, 1, 2]], np.array([0, 1, 1]), ["a", "b", "c"])["auc"] is None
