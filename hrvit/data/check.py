"""`hrvit check-data`: validate a whole dataset before a multi-day run, one row per problem.

Every case is checked on its own (a bad case does not hide the next one): its files exist and open,
label and image share one grid, the image is at least one patch, labels lie in [0, num_classes)
(task: classify: the image-level target does, and the image is at least one IPS patch), no image file
holds NaN or Inf (hrvit/data/preflight.py, streamed and cached), and the image holds enough tissue
(Otsu foreground of a thumbnail; for task: classify only with ips.tissue_mask, which builds candidates
from it). Across cases: one kind of image (dimensionality and channels), at least one training case,
no image in two splits (unless data.allow_split_overlap) and an adaptive token budget
(patching.tokens) that the largest image can fill.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from hrvit.config import Config
from hrvit.data.datasets import (
    CaseSpec,
    check_label_given,
    check_labels,
    check_min_size,
    check_target,
    discover,
    open_case,
)
from hrvit.data.preflight import FileCache, check_finite, check_token_budget, overlap_message, split_overlaps
from hrvit.errors import ConfigError, DataError

THUMBNAIL = 512
"""Longest side of the slide thumbnail the tissue fraction is measured on."""
MAX_WHOLE_READ = 64 * 1024 * 1024
"""Images without a pyramid are read whole for the tissue check up to this many pixels."""


def _tissue_fraction(image) -> float | None:
    """Foreground fraction of a thumbnail (slides) or the whole image (small volumes/arrays); None if too big."""
    from hrvit.patching.scores import tissue_mask

    if hasattr(image, "thumbnail"):
        pixels = image.thumbnail(THUMBNAIL)
    elif math.prod(image.shape) <= MAX_WHOLE_READ:
        pixels = image.read((0,) * len(image.shape), image.shape)
    else:
        return None
    work = torch.from_numpy(np.ascontiguousarray(pixels))
    work = torch.nan_to_num(work, nan=0.0, posinf=0.0, neginf=0.0)  # NaN/Inf are reported apart; histc refuses them
    if float(work.max() - work.min()) < 1e-6:
        return 0.0  # blank: Otsu has nothing to separate
    return float(tissue_mask(work).float().mean())


def check_case(cfg: Config, spec: CaseSpec, min_tissue: float,
               cache: FileCache | None = None) -> tuple[list[str], tuple[int, int] | None, tuple[int, ...] | None]:
    """Problems of one case, and its (ndim, channels) and image shape when it opens."""
    missing = [str(p) for p in [*spec.image, spec.label] if p is not None and not p.is_file()]
    if missing:
        return [f"file not found: {', '.join(missing)}"], None, None
    try:
        spec.nonfinite = cfg.data.nonfinite  # check_finite below: data.nonfinite=zero accepts NaN/Inf voxels
        case = open_case(spec, num_classes=cfg.data.num_classes, nonfinite="zero")  # NaN/Inf: check_finite's row
    except DataError as err:
        return [str(err)], None, None
    problems = []
    checks = (lambda: check_label_given(spec, cfg.eval.split), lambda: check_min_size(case, cfg.patching.patch_size),
              lambda: check_labels(case, cfg.data.num_classes))
    if cfg.task == "classify":
        checks = (lambda: check_target(spec, cfg.data.num_classes), lambda: check_min_size(case, cfg.ips.patch))
    checks = (*checks, lambda: check_finite(spec, cache))
    for check in checks:
        try:
            check()
        except DataError as err:
            problems.append(str(err))
    kind, shape = (len(case.image.shape), case.image.channels), tuple(case.image.shape)
    if cfg.task == "classify" and not cfg.ips.tissue_mask:  # candidates cover the whole image anyway
        return problems, kind, shape
    try:
        tissue = _tissue_fraction(case.image)
    except (DataError, OSError) as err:
        problems.append(f"{spec.image[0]}: cannot read pixels ({err})")
    else:
        if tissue is not None and tissue < min_tissue:
            problems.append(f"{spec.image[0]}: tissue fraction {tissue:.4f} is below {min_tissue}")
    return problems, kind, shape


def check_data(cfg: Config, min_tissue: float = 0.01) -> tuple[list[dict], int]:
    """(problems as rows {case, split, problem}, number of cases). Manifest-level errors raise DataError."""
    specs = discover(cfg.data.layout, root=cfg.data.root, manifest=cfg.data.manifest,
                     val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                     allow_outside_root=cfg.data.allow_outside_root, require_files=False)
    for spec in specs:
        spec.mpp = cfg.data.mpp
    rows, kinds, shapes = [], {}, []
    cache = FileCache()
    try:
        for spec in specs:
            problems, kind, shape = check_case(cfg, spec, min_tissue, cache)
            rows += [{"case": spec.id, "split": spec.split, "problem": p} for p in problems]
            if kind is not None:
                kinds[spec.id] = kind
                shapes.append((spec, shape))
        if not cfg.data.allow_split_overlap:
            rows += [{"case": o[2].id, "split": o[2].split, "problem": overlap_message(o)}
                     for o in split_overlaps(specs, cache)]
    finally:
        cache.save()
    try:
        check_token_budget(cfg, shapes)
    except ConfigError as err:
        rows.append({"case": "-", "split": "-", "problem": str(err)})
    if kinds:
        common, _ = Counter(kinds.values()).most_common(1)[0]
        for spec in specs:
            if kinds.get(spec.id, common) != common:
                ndim, channels = kinds[spec.id]
                rows.append({"case": spec.id, "split": spec.split,
                             "problem": f"{ndim}-D with {channels} channel(s); most cases are {common[0]}-D with "
                                        f"{common[1]} channel(s)"})
    if not any(s.split == "train" for s in specs):
        rows.append({"case": "-", "split": "-", "problem": "no case has split 'train'"})
    return rows, len(specs)


def format_table(rows: list[dict]) -> str:
    """A plain-text table (case | split | problem), one row per problem."""
    head = {"case": "case", "split": "split", "problem": "problem"}
    width = {k: max(len(str(r[k])) for r in [head, *rows]) for k in ("case", "split")}
    return "\n".join(f"{r['case']:<{width['case']}}  {r['split']:<{width['split']}}  {r['problem']}"
                     for r in [head, *rows])
