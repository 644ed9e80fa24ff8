"""Object counts and instance matching against ground-truth labels (docs/stardist.md, the MPT paper's Table 6).

All matching is done by ``stardist.matching`` (pure numpy/scipy; importing it does not load
TensorFlow): a predicted and a true object match when their IoU is at least the threshold, with an
optimal one-to-one assignment. At each IoU threshold:

* precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
* **AP = TP / (TP + FP + FN)**: StarDist's "accuracy", the average-precision definition used by
  the StarDist paper and the 2018 Data Science Bowl at a single IoU threshold (``Matching.accuracy``);
* **mean AP** = the arithmetic mean of AP at IoU 0.5, 0.7 and 0.9. This is what the MPT paper's
  Table 6 reports: its "Mean AP" column is exactly the mean of its three AP columns (blur:
  (0.7010 + 0.5623 + 0.2194) / 3 = 0.4942; sharp: (0.8021 + 0.7192 + 0.3518) / 3 = 0.6244).

Over several images the counts are pooled (TP, FP, FN summed, then the ratios taken), as
``stardist.matching.matching_dataset(..., by_image=False)`` does, so big crowded images weigh more
than nearly empty ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: The IoU thresholds of the paper's Table 6.
IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.9)
#: Thresholds for an AP-vs-IoU curve.
IOU_CURVE: tuple[float, ...] = tuple(float(round(t, 2)) for t in np.arange(0.5, 0.951, 0.05))


@dataclass(frozen=True)
class MatchScores:
    """Matching of predicted to true objects at one IoU threshold (counts pooled over images)."""

    iou: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    precision: float
    recall: float
    f1: float
    #: TP / (TP + FP + FN); NaN (undefined) when there are no true and no predicted objects.
    ap: float
    #: Mean IoU of the matched pairs (0 when nothing matched).
    mean_matched_iou: float

    @classmethod
    def from_counts(cls, iou: float, tp: int, fp: int, fn: int, matched_iou_sum: float = 0.0) -> MatchScores:
        # With no true and no predicted objects every score is 0/0: undefined (NaN, shown as
        # "undefined"), not 0.0, which would read as a total failure. Otherwise an empty
        # denominator (e.g. precision with no predictions) keeps the usual 0.0.
        nothing = tp + fp + fn == 0

        def ratio(num: float, den: float) -> float:
            if nothing:
                return float("nan")
            return float(num) / den if den > 0 else 0.0

        return cls(
            iou=float(iou), tp=int(tp), fp=int(fp), fn=int(fn), n_true=int(tp + fn), n_pred=int(tp + fp),
            precision=ratio(tp, tp + fp), recall=ratio(tp, tp + fn), f1=ratio(2 * tp, 2 * tp + fp + fn),
            ap=ratio(tp, tp + fp + fn), mean_matched_iou=float(matched_iou_sum) / tp if tp > 0 else 0.0,
        )


@dataclass(frozen=True)
class MatchingReport:
    """Scores at several IoU thresholds; ``mean_ap`` is the mean of AP at :data:`IOU_THRESHOLDS`."""

    scores: tuple[MatchScores, ...]

    def at(self, iou: float) -> MatchScores:
        for s in self.scores:
            if math.isclose(s.iou, iou, abs_tol=1e-9):
                return s
        raise KeyError(f"no matching scores at IoU {iou}; have {[s.iou for s in self.scores]}")

    @property
    def mean_ap(self) -> float:
        """Mean of AP at IoU 0.5, 0.7, 0.9 (the paper's Table 6 'Mean AP')."""
        return float(np.mean([self.at(t).ap for t in IOU_THRESHOLDS]))

    def as_row(self, thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict[str, float | int]:
        """Flat dict for a table: ``ap@0.5``, ``precision@0.5``, ..., ``mean_ap``."""
        row: dict[str, float | int] = {}
        for t in thresholds:
            s = self.at(t)
            for key in ("ap", "precision", "recall", "f1", "tp", "fp", "fn"):
                row[f"{key}@{t:g}"] = getattr(s, key)
        if all(any(math.isclose(s.iou, t) for s in self.scores) for t in IOU_THRESHOLDS):
            row["mean_ap"] = self.mean_ap
        return row

    def as_dict(self) -> dict:
        return {"scores": [asdict(s) for s in self.scores]}


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be an integer label image, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} has negative labels; 0 is background and objects are positive ids")
    return arr


def count_objects(labels: np.ndarray) -> int:
    """Number of distinct non-zero labels (objects) in a label image or stack."""
    arr = _check_labels(labels, "labels")
    ids = np.unique(arr)
    return int(np.count_nonzero(ids))


def _pair_counts(y_true: np.ndarray, y_pred: np.ndarray, thresholds: Sequence[float]) -> list[tuple[int, int, int, float]]:
    """(tp, fp, fn, sum of matched IoUs) per threshold for one image pair, via ``stardist.matching``."""
    from stardist.matching import matching

    y_true = _check_labels(y_true, "ground-truth labels")
    y_pred = _check_labels(y_pred, "predicted labels")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"ground-truth labels {y_true.shape} and predicted labels {y_pred.shape} differ in shape")
    results = matching(y_true, y_pred, thresh=[float(t) for t in thresholds])
    if not isinstance(results, (list, tuple)):  # one threshold gives one object
        results = [results]
    return [(int(r.tp), int(r.fp), int(r.fn), float(r.mean_matched_score) * int(r.tp)) for r in results]


def match_labels(
    y_true: np.ndarray, y_pred: np.ndarray, thresholds: Sequence[float] = IOU_THRESHOLDS
) -> MatchingReport:
    """Match one predicted label image (or stack, matched as one volume) to its ground truth."""
    counts = _pair_counts(y_true, y_pred, thresholds)
    return MatchingReport(tuple(MatchScores.from_counts(t, *c) for t, c in zip(thresholds, counts)))


def match_dataset(
    y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> MatchingReport:
    """Match a list of image pairs; TP, FP, FN are pooled over images before the ratios are taken."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"got {len(y_true)} ground-truth and {len(y_pred)} predicted label images")
    if not y_true:
        raise ValueError("match_dataset needs at least one image pair")
    totals = np.zeros((len(thresholds), 4), dtype=np.float64)
    for t, p in zip(y_true, y_pred):
        totals += np.asarray(_pair_counts(t, p, thresholds), dtype=np.float64)
    return MatchingReport(
        tuple(MatchScores.from_counts(th, int(tp), int(fp), int(fn), s) for th, (tp, fp, fn, s) in zip(thresholds, totals))
    )


def pool_counts(per_image: Sequence[MatchingReport]) -> MatchingReport:
    """Pool reports already computed per image (same thresholds) into one dataset-level report."""
    if not per_image:
        raise ValueError("pool_counts needs at least one report")
    thresholds = [s.iou for s in per_image[0].scores]
    pooled = []
    for i, th in enumerate(thresholds):
        tp = sum(r.scores[i].tp for r in per_image)
        fp = sum(r.scores[i].fp for r in per_image)
        fn = sum(r.scores[i].fn for r in per_image)
        s = sum(r.scores[i].mean_matched_iou * r.scores[i].tp for r in per_image)
        pooled.append(MatchScores.from_counts(th, tp, fp, fn, s))
    return MatchingReport(tuple(pooled))


def gap_recovered(value: float, blurred: float, sharp: float, min_gap: float = 1e-6) -> float:
    """Fraction of the blurred-to-sharp gap that a method recovers: ``(value - blurred) / (sharp - blurred)``.

    1 means the method does as well as the sharp image, 0 as badly as the blurred input, negative
    worse than the input. NaN when the gap is smaller than ``min_gap`` (blur did not hurt, so there
    is nothing to recover).
    """
    gap = sharp - blurred
    if not np.isfinite(gap) or abs(gap) < min_gap:
        return float("nan")
    return float((value - blurred) / gap)
