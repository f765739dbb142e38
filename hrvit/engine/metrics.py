"""Full-resolution Dice per case and class, from counts so that partial results add up."""

from __future__ import annotations

import warnings

import numpy as np

from hrvit.patching import IGNORE_INDEX


def dice_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int, regions=()) -> np.ndarray:
    """[3, K + R] array of (intersection, predicted, true) pixel counts per class, then per region, ignoring
    IGNORE_INDEX. A region (a list of classes, data.regions) is the union of its classes: its intersection counts
    pixels whose prediction and truth both lie in it, whatever the class inside it, which per-class counts cannot
    give; it is read off the K x K confusion matrix of the block.

    Counts add up over disjoint parts of an image, so evaluation sums them block by block. When every value is
    a class (or an ignored truth pixel), one bincount of the confusion matrix does it in a single pass."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    k = num_classes
    if not pred.size or (pred.min() >= 0 and pred.max() < k and truth.min() >= IGNORE_INDEX and truth.max() < k):
        index = truth.astype(np.int64) * k
        index += pred
        index += k  # ignored truth (-1) lands in the first k bins, which are dropped
        conf = np.bincount(index.ravel(), minlength=k * k + k)[k:].reshape(k, k)  # rows: truth, columns: prediction
        classes = np.stack([np.diagonal(conf), conf.sum(0), conf.sum(1)])
        if not len(regions):
            return classes
        return np.concatenate([classes, region_counts(conf, regions)], axis=1)
    keep = truth != IGNORE_INDEX
    pred, truth = pred[keep].astype(np.int64), truth[keep].astype(np.int64)
    inter = np.bincount(truth[pred == truth], minlength=k)[:k]
    classes = np.stack([inter, np.bincount(pred, minlength=k)[:k], np.bincount(truth, minlength=k)[:k]])
    if not len(regions):
        return classes
    rows = []
    for members in regions:
        p, t = np.isin(pred, members), np.isin(truth, members)
        rows.append([np.count_nonzero(p & t), np.count_nonzero(p), np.count_nonzero(t)])
    return np.concatenate([classes, np.array(rows, np.int64).T.reshape(3, len(regions))], axis=1)


def region_counts(confusion: np.ndarray, regions) -> np.ndarray:
    """[3, R] (intersection, predicted, true) of each region (a list of classes) from a K x K confusion matrix
    (rows: truth, columns: prediction)."""
    out = np.zeros((3, len(regions)), np.int64)
    for r, members in enumerate(regions):
        members = list(members)
        out[0, r] = confusion[np.ix_(members, members)].sum()
        out[1, r] = confusion[:, members].sum()
        out[2, r] = confusion[members, :].sum()
    return out


def dice_from_counts(counts: np.ndarray) -> np.ndarray:
    """Dice per class; NaN where a class is absent from both prediction and truth."""
    inter, predicted, true = counts
    denom = predicted + true
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)


def _mean_over_cases(table: np.ndarray, n: int) -> np.ndarray:
    with warnings.catch_warnings():  # absent from every case: no Dice, NaN (then None)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(table, axis=0) if len(table) else np.full(n, np.nan)


def summarize(per_case: dict[str, np.ndarray], class_names: list[str], region_names: list[str] = ()) -> dict:
    """Mean over cases of each class's Dice; `dice_mean_foreground` over the foreground classes (1..K-1), the
    figure papers report; `dice_mean` is the same number under its older name. Counts are [3, K + R] (dice_counts
    with regions): with `region_names`, the last R columns give each region's Dice per case
    (`dice_per_region_per_case`), its mean over cases (`dice_per_region`) and their mean (`dice_mean_regions`).
    A class or region absent from both prediction and truth of a case has no Dice there (skipped in the mean)."""
    k, r = len(class_names), len(region_names)
    table = np.array([dice_from_counts(c) for c in per_case.values()]).reshape(len(per_case), k + r)
    per_class = _mean_over_cases(table[:, :k], k)
    foreground = per_class[1:]
    mean = float(np.nanmean(foreground)) if np.isfinite(foreground).any() else float("nan")

    def clean(v):
        return None if not np.isfinite(v) else round(float(v), 6)

    result = {
        "dice_mean_foreground": clean(mean),
        "dice_mean": clean(mean),
        "dice_per_class": {name: clean(v) for name, v in zip(class_names, per_class)},
        "dice_per_case": {case: {name: clean(v) for name, v in zip(class_names, row[:k])}
                          for case, row in zip(per_case, table)},
    }
    if r:
        per_region = _mean_over_cases(table[:, k:], r)
        result.update(
            dice_mean_regions=clean(float(np.nanmean(per_region))) if np.isfinite(per_region).any() else None,
            dice_per_region={name: clean(v) for name, v in zip(region_names, per_region)},
            dice_per_region_per_case={case: {name: clean(v) for name, v in zip(region_names, row[k:])}
                                      for case, row in zip(per_case, table)})
    return result


def binary_auc(positive_score: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count half); None without both classes."""
    pos, neg = positive_score[truth == 1], positive_score[truth == 0]
    if not len(pos) or not len(neg):
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def classification_summary(probs: np.ndarray, truth: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy (mean recall over the classes present) and, for two classes, AUC."""
    pred = probs.argmax(1)
    recalls = {name: float((pred[truth == k] == k).mean()) for k, name in enumerate(class_names) if (truth == k).any()}
    return {
        "accuracy": round(float((pred == truth).mean()), 6) if len(truth) else None,
        "balanced_accuracy": round(float(np.mean(list(recalls.values()))), 6) if recalls else None,
        "auc": (round(a, 6) if (a := binary_auc(probs[:, 1], truth)) is not None else None)
        if len(class_names) == 2 else None,
        "recall_per_class": {name: round(v, 6) for name, v in recalls.items()},
    }
