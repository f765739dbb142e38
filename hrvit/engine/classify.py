"""The classification task (`task: classify`): one class per image by iterative patch selection.

The training loop (hrvit/engine/trainer.py) is shared with segmentation; `ClassifyTask` supplies
what differs. The loader hands out cases and targets only: selection needs the model of
the current step, so it runs in the training process. For every image of a micro-batch the
candidates (a grid over the image, or over its tissue) are read from the source `ips.chunk` at a
time and scored with no gradients in eval mode (hrvit/patching/ips.py); only the best `ips.memory`
are then embedded with gradients and classified. Memory therefore does not grow with the image.

Under ZeRO-3, ranks score different numbers of chunks, while ZeRO-3's per-module parameter gathers
must stay in step across ranks: selection and evaluation therefore use a whole local copy of the
model, refreshed from the shards with one gather per micro-batch.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from hrvit.config import Config
from hrvit.data.datasets import CaseSpec, check_min_size, check_target, open_case
from hrvit.data.sources import open_image
from hrvit.engine.metrics import classification_summary
from hrvit.engine.picture import read_for_picture
from hrvit.errors import DataError
from hrvit.models.mil import IPSClassifier, PatchNorm, build_ips_model, classification_loss
from hrvit.parallel import comm
from hrvit.patching.ips import grid_boxes, read_patches, select_patches
from hrvit.patching.scores import tissue_mask


def build_classifier(cfg: Config, channels: int) -> IPSClassifier:
    m = cfg.model
    model = build_ips_model(m.preset, patch_size=cfg.patching.patch_size, in_chans=channels, ips_patch=cfg.ips.patch,
                            num_classes=[cfg.data.num_classes], heads=cfg.ips.heads, positions=cfg.ips.positions,
                            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, drop_path=m.drop_path)
    if dist.is_initialized() and dist.get_world_size() > 1:
        for norm in model.modules():
            if isinstance(norm, PatchNorm):
                norm.reduce = _all_reduce_sum
    return model


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce(t)


def check_case(cfg: Config, spec: CaseSpec):
    """Open one case; it needs a 2-D image at least one IPS patch in size and a target in [0, num_classes)."""
    check_target(spec, cfg.data.num_classes)
    case = open_case(spec)
    if case.image.ndim != 2:
        raise DataError(f"{spec.image[0]}: task: classify takes 2-D images, this one has shape {case.image.shape}")
    check_min_size(case, cfg.ips.patch)
    return case


class CaseOrder(torch.utils.data.Dataset):
    """Sample index -> the case to classify: a seeded permutation of the training cases per epoch, so the
    data order is a pure function of (seed, index), as for segmentation windows. Selection needs the model
    of the current step, so the loader hands out cases, not pixels."""

    def __init__(self, specs: list[CaseSpec], seed: int, tokens_per_image: int):
        self.specs, self.seed, self.tokens_per_image = specs, seed, tokens_per_image

    def __len__(self) -> int:
        return len(self.specs)

    def case_of(self, index: int) -> CaseSpec:
        epoch, i = divmod(int(index), len(self.specs))
        return self.specs[int(np.random.default_rng((self.seed, epoch)).permutation(len(self.specs))[i])]

    def __getitem__(self, index: int) -> CaseSpec:
        return self.case_of(index)

    def collate(self, specs: list[CaseSpec]) -> dict:
        return {"specs": specs, "target": torch.tensor([s.target for s in specs]),
                "tokens": self.tokens_per_image * len(specs), "meta": [{"case": s.id} for s in specs]}


def make_dataset(cfg: Config, specs: list[CaseSpec]) -> CaseOrder:
    tokens = cfg.ips.memory * (cfg.ips.patch // cfg.patching.patch_size) ** 2
    return CaseOrder([s for s in specs if s.split == "train"], cfg.train.seed, tokens)


@functools.lru_cache(maxsize=16)
def candidates(image: tuple[str, ...], patch: int, stride: int | None, tissue: bool):
    """(source, candidate boxes) of an image; a few stay open, since opening a slide is not free."""
    source = open_image(image if len(image) > 1 else image[0])
    keep = _tissue(source) if tissue else None
    boxes = grid_boxes(source.shape, patch, stride, keep=keep)
    if len(boxes) == 0:
        raise DataError(f"{image[0]}: no candidate patch: the tissue mask (ips.tissue_mask) found no tissue")
    return source, boxes


def _tissue(source) -> np.ndarray:
    """Tissue mask at a low resolution (grid_boxes maps any resolution onto the image)."""
    return tissue_mask(torch.from_numpy(np.ascontiguousarray(read_for_picture(source)))).numpy()


def select(cfg: Config, model: IPSClassifier, specs: list[CaseSpec], *, explore: float, device) -> dict:
    """The selected patches of `specs` as a batch: pixels [B, M, C, S, S], boxes, valid, image_shape.
    Images of different sizes mix freely: each keeps its own shape for the position encoding."""
    seqs = []
    was_training = model.training
    model.eval()
    try:
        for spec in specs:
            source, boxes = candidates(tuple(map(str, spec.image)), cfg.ips.patch, cfg.ips.stride,
                                       cfg.ips.tissue_mask)
            shape = torch.tensor(source.shape, device=device)

            def score(emb, b, shape=shape):
                return model.score_embedded(emb, b.to(device), shape)

            seed = int(torch.randint(2**62, ())) if explore else 0  # the loop seeds torch per (step, rank)
            # each candidate is embedded once: the kept ones' embeddings are reused at every chunk
            seq, _ = select_patches(lambda b, s=source: read_patches(s, b), boxes, score, memory=cfg.ips.memory,
                                    chunk=cfg.ips.chunk, image_shape=source.shape, explore=explore,
                                    rng=np.random.default_rng(seed), embed=lambda p: model.embedder(p.to(device)))
            seqs.append(seq)
    finally:
        model.train(was_training)
    return {"pixels": torch.stack([s.pixels for s in seqs]).to(device),
            "boxes": torch.stack([s.boxes for s in seqs]).to(device),
            "valid": torch.stack([s.valid for s in seqs]).to(device),
            "image_shape": torch.tensor([s.image_shape for s in seqs], device=device)}


def selection_model(cfg: Config, engine) -> IPSClassifier:
    """The model to score candidates with (session.whole_model: under ZeRO-3 a whole local copy, whose forward
    passes need no collectives, as ranks score different numbers of chunks)."""
    from hrvit.engine.session import whole_model

    channels = getattr(engine, "module", engine).embedder.encoder.in_chans
    return whole_model(engine, lambda: build_classifier(cfg, channels))


def batch_loss(cfg: Config, engine, batch: dict) -> torch.Tensor:
    """Select the patches of the micro-batch's images with the current model, then the loss with gradients."""
    chosen = select(cfg, selection_model(cfg, engine), batch["specs"], explore=cfg.ips.explore, device=engine.device)
    logits = engine(chosen["pixels"], chosen["boxes"], chosen["valid"], chosen["image_shape"])
    return classification_loss(logits, batch["target"].to(engine.device)[:, None])


@torch.no_grad()
def evaluate(cfg: Config, engine, specs: list[CaseSpec], run: Path | None, class_names: list[str],
             selection: str = "top") -> dict:
    """Accuracy, balanced accuracy and (two classes) AUC over the evaluation split, its cases shared among
    the ranks. `engine` may be a DeepSpeed engine or a plain model. selection="random" gives the model M
    patches drawn at random instead of its top M: the baseline that shows what selection is worth."""
    cases = [s for s in specs if s.split == cfg.eval.split][: cfg.eval.max_cases]
    rank, world = dist.get_rank(), dist.get_world_size()
    model = selection_model(cfg, engine)
    device = next(model.parameters()).device
    was_training = model.training
    rows = []
    for i, spec in enumerate(cases[rank::world]):
        if selection == "random":
            torch.manual_seed(hash((cfg.train.seed, "random-selection", rank, i)) % 2**63)
        chosen = select(cfg, model, [spec], explore=1.0 if selection == "random" else 0.0, device=device)
        model.eval()
        logits = model(chosen["pixels"], chosen["boxes"], chosen["valid"], chosen["image_shape"])[0]
        keep = chosen["valid"][0]
        rows.append((spec.id, logits.float().softmax(-1)[0].tolist(), chosen["boxes"][0][keep].tolist()))
    model.train(was_training)
    rows = [r for part in comm.all_gather_object(rows) for r in part]
    by_id = {s.id: s for s in cases}
    rows.sort(key=lambda r: [s.id for s in cases].index(r[0]))
    if not rows:
        return {"accuracy": None, "cases": 0}
    probs = np.array([r[1] for r in rows])
    truth = np.array([by_id[r[0]].target for r in rows])
    result = classification_summary(probs, truth, class_names)
    result.update(cases=len(rows), split=cfg.eval.split, selection=selection,
                  per_case={r[0]: {"target": by_id[r[0]].target, "predicted": int(np.argmax(r[1]))} for r in rows})
    if run is not None and cfg.output.picture and rank == 0:
        write_picture(run / "prediction.png", by_id[rows[0][0]], cfg, rows[0][2], rows[0][1], class_names)
    return result


def summary_fields(cfg: Config, result: dict) -> dict:
    """The task's part of summary.json, from the final evaluation."""
    return {key: result.get(key) for key in ("accuracy", "balanced_accuracy", "auc", "recall_per_class")} | {
        "eval_cases": result.get("cases"), "ips_patch": cfg.ips.patch, "ips_memory": cfg.ips.memory}


def write_picture(path: Path, spec: CaseSpec, cfg: Config, boxes: list, probs: list, class_names: list[str]) -> None:
    """The image (downsampled) with the selected patches outlined and the predicted class written on it."""
    from PIL import Image, ImageDraw

    source, _ = candidates(tuple(map(str, spec.image)), cfg.ips.patch, cfg.ips.stride, cfg.ips.tissue_mask)
    thumb = read_for_picture(source)
    rgb = np.clip(np.moveaxis(thumb[:3] if thumb.shape[0] >= 3 else np.repeat(thumb[:1], 3, 0), 0, -1), 0, 1)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    f = img.width / source.shape[1]
    draw = ImageDraw.Draw(img)
    for y, x, h, w in boxes:
        draw.rectangle([x * f, y * f, (x + w) * f, (y + h) * f], outline=(255, 0, 255), width=2)
    k = int(np.argmax(probs))
    draw.rectangle([0, 0, img.width, 16], fill=(255, 255, 255))
    draw.text((4, 2), f"{spec.id}: predicted {class_names[k]} ({probs[k]:.2f}), truth {class_names[spec.target]}; "
                      f"{len(boxes)} selected patches outlined", fill=(0, 0, 0))
    img.save(path)


class ClassifyTask:
    """`task: classify` for the shared training loop (hrvit/engine/trainer.py) and `hrvit eval`."""

    name = "classify"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check_case(self, spec: CaseSpec):
        return check_case(self.cfg, spec)

    def build_model(self, ndim: int, channels: int) -> IPSClassifier:
        return build_classifier(self.cfg, channels)

    def make_dataset(self, specs: list[CaseSpec]) -> CaseOrder:
        return make_dataset(self.cfg, specs)

    @staticmethod
    def tokens(batch: dict) -> int:
        return batch["tokens"]

    def loss(self, session, batch: dict) -> torch.Tensor:
        return batch_loss(self.cfg, session.engine, batch)

    def evaluate(self, session, model, specs: list[CaseSpec], run: Path | None, step: int,
                 selection: str = "top") -> dict:
        from hrvit.engine.session import class_names

        return {**evaluate(self.cfg, model, specs, run, class_names(self.cfg), selection), "step": step}

    def summary_fields(self, result: dict) -> dict:
        return summary_fields(self.cfg, result)

    def score(self, result: dict) -> str:
        """One line for people, from an evaluation result or summary.json."""
        return (f"accuracy {result['accuracy']}, balanced accuracy {result.get('balanced_accuracy')} "
                f"({result.get('selection', 'top')} selection of {self.cfg.ips.memory} patches)")
