"""pycocotools' COCOeval (bbox) for all images and classes at once, and a COCO results writer.

``coco_evaluate`` follows COCOeval's evaluateImg / accumulate / summarize detail for detail:
IoU thresholds .50:.05:.95, 101 recall points, area ranges all / small / medium / large =
[0, 1e10], [0, 32²], [32², 96²], [96², 1e10] pixels² (both ends inclusive), maxDets 1 / 10 / 100.
Per image and class the 100 best detections given (by score, ties in the given order) are matched,
per IoU threshold and area range, greedily in score order to the free ground truth of highest
IoU (the later one on ties), a ground truth not ignored in the range before an ignored one.
Ignored are crowd ground truths (IoU with them = intersection / detection area; they take any
number of detections) and, per range, ground truths whose area lies outside it; a detection
matched to an ignored one, or unmatched with its own area outside the range, counts neither
way. AR1 / AR10 read the first 1 / 10 of those per image and class. A (class, range) without
a positive is -1 and left out of the means, as in pycocotools.
"""

import json
import logging
from pathlib import Path

import numpy as np
import torch

from utils.fileio import atomic_write_text
from utils.matching import greedy_match, preference_order

__all__ = [
    "AREA_RANGES",
    "COCO_STATS_NAMES",
    "MAX_DETS",
    "coco_evaluate",
    "image_ranks",
    "iou_thresholds",
    "write_coco_results",
]

logger = logging.getLogger(__name__)

AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
MAX_DETS = (1, 10, 100)
COCO_STATS_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
_FIRST_THRESHOLD = 0.5


def iou_thresholds() -> np.ndarray:
    """``[10]`` IoU thresholds built exactly as pycocotools' Params does."""
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


def recall_points() -> np.ndarray:
    """``[101]`` recall points built exactly as pycocotools' Params does."""
    return np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _outside(area: np.ndarray, area_range: tuple[float, float]) -> np.ndarray:
    return (area < area_range[0]) | (area > area_range[1])


def _match(det_key, pair_det, pair_gt, rank, value, crowd, gt_ignored):
    """evaluateImg's matching for one area range -> (matched, matched to ignored) ``[T, D]``.

    Pairs ``[P]`` by detection (score order within each group); ``value`` the IoU (crowd IoU
    for crowd ground truths), ``crowd`` / ``gt_ignored`` ``[G]`` bool.
    """
    keep = (value >= _FIRST_THRESHOLD) & (rank[pair_det] < MAX_DETS[-1])
    order = preference_order(keep, pair_det, gt_ignored[pair_gt], -value, -pair_gt)
    thresholds = np.minimum(iou_thresholds(), 1 - 1e-10)
    sorted_pairs = (pair_det[order], pair_gt[order], value[order], crowd[pair_gt[order]])
    det_gt = greedy_match(*sorted_pairs, det_key, thresholds, len(crowd))
    return det_gt >= 0, np.append(gt_ignored, False)[det_gt]  # -1 (no match) reads False


def _curve(matched: np.ndarray, ignored: np.ndarray, num_positives: int):
    """accumulate for one (class, range, maxDet): ``[T, n]`` flags in score order ->
    (precision at the recall points ``[T, R]``, final recall ``[T]``)."""
    num_thresholds, num = matched.shape
    points = recall_points()
    if num == 0:
        return np.zeros((num_thresholds, len(points))), np.zeros(num_thresholds)
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)  # [T, n]
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)  # [T, n]
    recall = tp / num_positives
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # envelope
    out = np.zeros((num_thresholds, len(points)))
    for t in range(num_thresholds):
        index = np.searchsorted(recall[t], points, side="left")  # [R]
        out[t] = np.where(index < num, precision[t, np.minimum(index, num - 1)], 0.0)
    return out, recall[:, -1]


def _class_counts(values: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Sums of ``values`` ``[T, n]`` (bool) over the runs of equal sorted ``label`` ``[n]``
    -> ``[T, num_classes]`` float64 (exact: integer counts)."""
    running = np.zeros((len(values), values.shape[1] + 1), np.int64)
    np.cumsum(values, axis=1, out=running[:, 1:])
    bounds = np.searchsorted(label, np.arange(num_classes + 1))
    return (running[:, bounds[1:]] - running[:, bounds[:-1]]).astype(np.float64)


def _accumulate(flags, rank, class_rows, positives, precision, recall, area):
    """Fill ``precision[:, :, k, area]`` (maxDets 100) and ``recall[:, k, area, m]`` for every
    class k with positives in the range and every maxDet m; ``class_rows``: detection indices
    of each class in score order (ties by image, then given order, as accumulate's mergesort).
    The final recall is a count, so only maxDets 100 needs the running sums."""
    order = np.concatenate([np.zeros(0, np.int64), *class_rows])  # [D] by class, score
    label = np.repeat(np.arange(len(class_rows)), [len(rows) for rows in class_rows])  # [D]
    rank = rank[order]  # [D]
    keep = order if rank.max(initial=0) < MAX_DETS[-1] else order[rank < MAX_DETS[-1]]
    label = label[rank < MAX_DETS[-1]]
    rank = rank[rank < MAX_DETS[-1]]
    matched, ignored = flags[0][:, keep], flags[1][:, keep]  # [T, n] by class, score
    valid = positives > 0
    for m, max_det in enumerate(MAX_DETS[:-1]):
        first = rank < max_det
        found = _class_counts(matched[:, first] & ~ignored[:, first], label[first], len(valid))
        recall[:, valid, area, m] = found[:, valid] / positives[valid]
    bounds = np.searchsorted(label, np.arange(len(class_rows) + 1))
    for k in np.flatnonzero(valid):
        lo, hi = bounds[k], bounds[k + 1]
        curve = _curve(matched[:, lo:hi], ignored[:, lo:hi], int(positives[k]))
        precision[:, :, k, area], recall[:, k, area, -1] = curve


def _summarize(precision: np.ndarray, recall: np.ndarray) -> list[float]:
    """COCOeval.summarize's 12 numbers from precision ``[T, R, K, A]`` (maxDets 100) and recall
    ``[T, K, A, M]``: the mean over entries > -1, or -1 where there are none."""

    def mean(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    thresholds = iou_thresholds()
    t50, t75 = np.where(thresholds == 0.5)[0], np.where(thresholds == 0.75)[0]
    return [
        mean(precision[:, :, :, 0]),
        mean(precision[t50][:, :, :, 0]),
        mean(precision[t75][:, :, :, 0]),
        *(mean(precision[:, :, :, a]) for a in (1, 2, 3)),
        *(mean(recall[:, :, 0, m]) for m in range(len(MAX_DETS))),
        *(mean(recall[:, :, a, -1]) for a in (1, 2, 3)),
    ]


def coco_evaluate(groups, overlaps, gt, det_area, class_rows, *, areas_known: bool) -> dict:
    """COCOeval (bbox) on grouped rows -> precision, recall and the 12 stats.

    ``groups`` = (det_key ``[D]``, pair_det ``[P]``, pair_gt ``[P]``, rank ``[D]``): detections
    grouped by (class, image) in score order, their pairs with the ground truths of the same
    group and their rank in the group; ``overlaps`` = (IoU, intersection / detection area)
    ``[P]``; ``gt`` = (crowd ``[G]`` bool, area ``[G]`` px², class ``[G]`` int);
    ``det_area`` ``[D]`` px²; ``class_rows`` as in ``_accumulate``. Without ``areas_known``
    only the range "all" is evaluated and the six per-size stats are NaN.
    Returns ``{"precision": [T, R, K, 4], "recall": [T, K, 4, 3], "stats": [12]}`` (COCOeval's
    ``eval`` arrays; precision only for maxDets 100, the one the stats read).
    """
    det_key, pair_det, pair_gt, rank = groups
    crowd, gt_area, gt_class = gt
    value = np.where(crowd[pair_gt], overlaps[1], overlaps[0])
    shape = (len(iou_thresholds()), len(class_rows), len(AREA_RANGES), len(MAX_DETS))
    precision = np.full((shape[0], len(recall_points()), *shape[1:3]), -1.0)
    recall = np.full(shape, -1.0)
    for area, area_range in enumerate(AREA_RANGES if areas_known else AREA_RANGES[:1]):
        gt_ignored = crowd | _outside(gt_area, area_range)
        matched, ignored = _match(det_key, pair_det, pair_gt, rank, value, crowd, gt_ignored)
        ignored |= ~matched & _outside(det_area, area_range)[None, :]
        positives = np.bincount(gt_class[~gt_ignored], minlength=len(class_rows))
        _accumulate((matched, ignored), rank, class_rows, positives, precision, recall, area)
    stats = _summarize(precision, recall)
    if not areas_known:
        stats = [s if i in (0, 1, 2, 6, 7, 8) else float("nan") for i, s in enumerate(stats)]
    return {"precision": precision, "recall": recall, "stats": stats}


def image_ranks(scores: np.ndarray, det_image: np.ndarray) -> np.ndarray:
    """``[D]`` each detection's rank among its image's by descending score, ties in the given
    order: COCO keeps the ``MAX_DETS[-1]`` best of each image (rank below it)."""
    order = np.lexsort((-scores, det_image))  # stable: ties keep the given order
    sorted_images = det_image[order]
    starts = np.searchsorted(sorted_images, sorted_images, side="left")  # [D] run starts
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order)) - starts
    return ranks


def write_coco_results(records, category_ids, path: str | Path) -> int:
    """Write detections as a COCO results JSON list; returns the number written.

    ``records``: ``(image_id, (height, width), detections [K, 6])`` with normalised xyxy boxes
    (x1, y1, x2, y2, score, class); ``category_ids``: class index -> COCO category id (a list
    or a dict; a negative id leaves the class out). Each row becomes ``{"image_id",
    "category_id", "bbox": [x, y, w, h], "score"}`` in pixels of the original image,
    ``x = x1 W``, ``w = (x2 - x1) W`` (the evaluator's pixel area ``w h``), numbers in full
    precision so that pycocotools sees what the evaluator saw: each image's ``MAX_DETS[-1]``
    best (by score, ties in the given order), as COCO scores.
    """
    results = []
    for image_id, (height, width), dets in records:
        key = image_id if isinstance(image_id, str) else int(image_id)  # JSON has no numpy
        rows = torch.as_tensor(dets).detach().cpu().reshape(-1, 6)
        best = torch.argsort(rows[:, 4], descending=True, stable=True)[: MAX_DETS[-1]]
        rows = rows[best.sort().values]  # the image's best, in the given order
        scores = rows[:, 4].tolist()  # float32 scores read back exactly as float64
        boxes = rows[:, :4].double()
        scale = boxes.new_tensor([width, height])
        xy, wh = boxes[:, :2] * scale, (boxes[:, 2:] - boxes[:, :2]) * scale
        for (x, y), (w, h), score, label in zip(
            xy.tolist(), wh.tolist(), scores, rows[:, 5].long().tolist(), strict=True
        ):
            if int(category_ids[label]) < 0:  # a class the COCO file does not have
                continue
            results.append(
                {"image_id": key, "category_id": int(category_ids[label]), "bbox": [x, y, w, h],
                 "score": score}
            )  # fmt: skip
    atomic_write_text(path, json.dumps(results))
    logger.info("wrote %d COCO detections to %s", len(results), path)
    return len(results)
