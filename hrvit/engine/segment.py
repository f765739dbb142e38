"""The segmentation task (`task: segment`): per-pixel labels from windows or whole images.

The training loop (hrvit/engine/trainer.py) is shared with classification; this task supplies the
dataset (random windows, hrvit/data/windows.py), the model (ViT encoder + UNETR decoder), the loss
of one micro-batch and the full-resolution evaluation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hrvit.config import Config, dice_regions
from hrvit.data.datasets import CaseSpec, check_label_given, check_labels, check_min_size, open_case
from hrvit.data.preflight import FileCache, count_nonfinite
from hrvit.data.windows import TrainWindows
from hrvit.engine.infer import case_dice_counts, picture_grid, picture_image, truth_on_grid
from hrvit.engine.losses import loss_from_sums, segmentation_sums
from hrvit.engine.metrics import summarize
from hrvit.engine.picture import write_picture
from hrvit.models import build_model
from hrvit.parallel import comm
from hrvit.parallel.shard import SequenceParallelForward, shard_batch, sum_over_group
from hrvit.patching import to_device


def local_batch(session, batch: dict) -> dict:
    """This rank's part of a collated batch on its device: under SP each rank cuts its slice of the tokens
    first and copies only that, so the whole sequence never sits on every rank's device."""
    if session.sp is not None:
        batch = shard_batch(batch, session.sp.size, session.sp.sp_rank)
    return to_device(batch, session.device)


class SegmentTask:
    name = "segment"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check_case(self, spec: CaseSpec):
        """Open one case and check its size and label values (DataError naming the file); a training or
        evaluated case must have a label."""
        check_label_given(spec, self.cfg.eval.split)
        spec.nonfinite = self.cfg.data.nonfinite  # the pre-flight scan (check_finite) that follows reads it
        case = open_case(spec, num_classes=self.cfg.data.num_classes)
        check_min_size(case, self.cfg.patching.patch_size)
        if case.label is not None:
            check_labels(case, self.cfg.data.num_classes)
        return case

    def build_model(self, ndim: int, channels: int):
        cfg, m = self.cfg, self.cfg.model
        return build_model(m.preset, ndim=ndim, patch_size=cfg.patching.patch_size, in_chans=channels,
                           num_classes=cfg.data.num_classes, embed_dim=m.embed_dim, depth=m.depth,
                           num_heads=m.num_heads, drop_path=m.drop_path,
                           checkpoint_activations=m.checkpoint_activations, decoder_channels=m.decoder_channels,
                           decoder_fuse=m.decoder_fuse)

    def make_dataset(self, specs: list[CaseSpec]) -> TrainWindows:
        """Random windows of the training cases (NIfTI volumes decoded once into each loader process's cache)."""
        cfg = self.cfg
        return TrainWindows([s for s in specs if s.split == "train"], window=cfg.data.window, patching=cfg.patching,
                            seed=cfg.train.seed, foreground_bias=cfg.data.foreground_bias, augment=cfg.data.augment,
                            skip_bad=cfg.data.skip_bad_samples, cache_gb=cfg.data.cache_gb,
                            nonfinite=cfg.data.nonfinite)

    @staticmethod
    def tokens(batch: dict) -> int:
        return int(batch["valid"].sum())

    def loss(self, session, batch: dict) -> torch.Tensor:
        """Dice + CE of one micro-batch; under SP the loss sums are added over the group, so every rank gets
        the loss of the whole sequence."""
        sp = session.sp
        batch = local_batch(session, batch)
        logits = session.engine(batch["pixels"], batch["boxes"], batch["valid"], batch["scale"],
                                batch.get("key_valid"))
        valid = batch["valid"]
        sums = segmentation_sums(logits[valid], batch["target"][valid])
        if sp is not None:
            sums = sum_over_group(sums, sp.group)
        return loss_from_sums(sums, self.cfg.train.dice_weight, self.cfg.train.ce_weight)

    @torch.no_grad()
    def evaluate(self, session, model, specs: list[CaseSpec], run: Path | None, step: int) -> dict:
        """Full-resolution Dice of the evaluation cases, shared among the data-parallel groups (Dice counts are
        summed, so the result equals one process's). Counts are taken window by window against the truth read
        block by block (hrvit/engine/infer.py), so no full-resolution map is held. With SP, the ranks of a group
        run every window together.
        `model` is the engine or a plain model; under ZeRO-3 a whole local copy runs (session.whole_model)."""
        from hrvit.engine.session import class_names, whole_model

        cfg = self.cfg
        cases = [s for s in specs if s.split == cfg.eval.split][: cfg.eval.max_cases]
        net = whole_model(model, session.build_model)
        device = next(net.parameters()).device
        sp = session.sp
        forward = net if sp is None else SequenceParallelForward(net, sp.group, sp.size, sp.sp_rank)
        was_training = net.training
        net.eval()
        names = dice_regions(cfg.data)
        regions = list(names.values())  # counts [3, K + R]: the classes', then the regions' (unions of classes)
        self._specs = specs
        mine = {}
        for i in range(session.dp_rank, len(cases), session.dp_size):
            spec = cases[i]
            case = open_case(spec, num_classes=cfg.data.num_classes, cache_gb=cfg.data.cache_gb,
                             nonfinite=cfg.data.nonfinite)
            picture = i == 0 and run is not None and cfg.output.picture and session.rank == 0
            image = picture_image(case.image) if picture else None
            grid = picture_grid(case.image.shape, image.shape[1:]) if picture else None
            mine[spec.id], small = case_dice_counts(forward, case, window=cfg.data.window, patching=cfg.patching,
                                                    batch=cfg.eval.batch, num_classes=cfg.data.num_classes,
                                                    device=device, picture=grid, regions=regions,
                                                    overlap=cfg.eval.overlap, blend=cfg.eval.blend,
                                                    progress_s=cfg.eval.progress_s)
            if picture:
                write_picture(run / "prediction.png", image, truth_on_grid(case, grid), small, class_names(cfg))
        net.train(was_training)
        found = {}
        for part in comm.all_gather_object(mine if session.sp_rank == 0 else {}):
            found.update(part)
        per_case = {s.id: found[s.id] for s in cases}
        result = summarize(per_case, class_names(cfg), list(names)) if per_case else \
            dict.fromkeys(("dice_mean_foreground", "dice_mean"))
        result.update(step=step, cases=len(per_case), split=cfg.eval.split)
        return result

    def summary_fields(self, result: dict) -> dict:
        """The task's part of summary.json, from the final evaluation."""
        return {"dice_mean_foreground": result.get("dice_mean_foreground"), "dice_mean": result.get("dice_mean"),
                "dice_per_class": result.get("dice_per_class"),
                **{k: result[k] for k in ("dice_mean_regions", "dice_per_region", "dice_per_region_per_case")
                   if k in result},
                **self.nonfinite_fields(),
                "eval_cases": result.get("cases"), "patching": self.cfg.patching.mode,
                "patch_size": self.cfg.patching.patch_size}

    def nonfinite_fields(self) -> dict:
        """With data.nonfinite=zero: how many NaN/Inf voxels were read as 0, per case of the run (cases with
        none left out) and in all; counted by the pre-flight scan (cached per file, so no image is read again)."""
        if self.cfg.data.nonfinite != "zero":
            return {}
        cache = FileCache()
        counts = {s.id: sum(count_nonfinite(p, cache) for p in s.image) for s in getattr(self, "_specs", [])}
        cache.save()
        return {"nonfinite_voxels": {case: n for case, n in counts.items() if n},
                "nonfinite_voxels_total": sum(counts.values())}

    @staticmethod
    def score(result: dict) -> str:
        """One line for people, from an evaluation result or summary.json."""
        regions = f"; per region {result['dice_per_region']}" if result.get("dice_per_region") else ""
        return f"mean Dice {result['dice_mean']}; per class {result.get('dice_per_class')}{regions}"
