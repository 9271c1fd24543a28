"""Grouping and greedy matching shared by the VOC and COCO metrics (numpy, host only).

Rows are grouped by (class, image) with a stable order; ``pairs`` lists every (detection, ground
truth) pair of a group and ``greedy_match`` runs the sequential greedy assignment of all groups
at once, one step per detection rank.
"""

import itertools

import numpy as np

from utils.boxes import box_iou_elementwise_np

__all__ = [
    "first_per_run",
    "greedy_match",
    "group_order",
    "overlaps",
    "pairs",
    "preference_order",
    "stable_argsort",
]


def stable_argsort(values: np.ndarray, upper: int) -> np.ndarray:
    """Stable argsort of integers in ``[0, upper)`` (numpy radix-sorts 16-bit integers)."""
    return np.argsort(values.astype(np.uint16 if upper <= 2**16 else np.int64), kind="stable")


def group_order(rows: np.ndarray, image: np.ndarray, class_column: int, num_images: int):
    """Stable order by (class, image) -> (order ``[M]``, group key ``[M]`` sorted, int64)."""
    order = stable_argsort(image, num_images)
    labels = rows[order, class_column].astype(np.int64)
    order = order[stable_argsort(labels, labels.max(initial=0) + 1)]
    key = rows[order, class_column].astype(np.int64) * max(num_images, 1) + image[order]  # [M]
    return order, key


def pairs(det_key: np.ndarray, gt_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, ground truth) pair sharing a key -> (det index ``[P]``, gt index ``[P]``).

    ``gt_key`` must be sorted; pairs come out by detection, then ground-truth index.
    """
    start = np.searchsorted(gt_key, det_key, side="left")  # [D]
    count = np.searchsorted(gt_key, det_key, side="right") - start  # [D]
    pair_det = np.repeat(np.arange(len(det_key)), count)  # [P]
    offset = np.arange(len(pair_det)) - np.repeat(np.cumsum(count) - count, count)  # [P]
    return pair_det, np.repeat(start, count) + offset


def overlaps(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paired ``[P, 4]`` xyxy boxes -> (IoU ``[P]``, intersection / detection area ``[P]``).

    The second is pycocotools' overlap with an ``iscrowd`` ground truth.
    """
    wh = np.minimum(det_boxes[:, 2:], gt_boxes[:, 2:]) - np.maximum(
        det_boxes[:, :2], gt_boxes[:, :2]
    )
    inter = np.prod(np.clip(wh, 0, None), axis=-1)  # [P]
    det_area = np.prod(np.clip(det_boxes[:, 2:] - det_boxes[:, :2], 0, None), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crowd = np.where(inter > 0, inter / det_area, 0.0)
    return box_iou_elementwise_np(det_boxes, gt_boxes), crowd


def first_per_run(sorted_ids: np.ndarray) -> np.ndarray:
    """Start index ``[m]`` of each run of equal values in sorted non-negative ids ``[P]``."""
    return np.flatnonzero(np.diff(sorted_ids, prepend=-1))


def greedy_match(pair_det, pair_gt, pair_value, reusable, det_key, thresholds, num_gts):
    """Sequential greedy matching, one step per detection rank instead of per detection.

    Pairs ``[P]`` are sorted by detection, then by preference (most preferred first); detection
    indices follow processing order within each group (equal ``det_key`` ``[D]``, sorted). A
    detection takes its first pair with ``pair_value >= threshold`` whose ground truth is still
    free or ``reusable``; the k-th candidate detections of all groups never compete for a ground
    truth, so each step handles all of them at once. Returns matched gt ``[T, D]`` or -1.

    Example, thresholds (0.5, 0.75), one group (an image and class) with objects g0, g1 and
    detections d0, d1, d2 in score order, pairs by preference (IoU):
    d0: (g0 .8), (g1 .6); d1: (g0 .7), (g1 .65); d2: (g1 .9).
    Step 0, d0: g0 at both thresholds (free, .8 passes both). Step 1, d1: g0 is taken, so g1 at
    0.5, nothing at 0.75 (.65 < .75). Step 2, d2: g1 is taken at 0.5 (nothing), free at 0.75.
    Result ``[[0, 1, -1], [0, -1, 1]]``. The first detection of every other group runs in
    step 0 with d0, its second in step 1, and so on: a loop over ranks, not over detections.
    """
    det_gt = np.full((len(thresholds), len(det_key)), -1, dtype=np.int64)
    if len(pair_det) == 0:
        return det_gt
    candidates = pair_det[first_per_run(pair_det)]  # [m]
    step = np.arange(len(candidates)) - np.searchsorted(det_key[candidates], det_key[candidates])
    pair_step = np.repeat(step, np.diff(np.r_[first_per_run(pair_det), len(pair_det)]))
    order = np.argsort(pair_step, kind="stable")  # keeps detection and preference order
    pair_det, pair_gt, pair_value = pair_det[order], pair_gt[order], pair_value[order]
    reusable, bounds = reusable[order], np.searchsorted(pair_step[order], np.arange(step.max() + 2))
    taken = np.zeros((len(thresholds), num_gts), dtype=bool)
    for lo, hi in itertools.pairwise(bounds):
        gts, firsts = pair_gt[lo:hi], first_per_run(pair_det[lo:hi])
        free = reusable[lo:hi] | ~taken[:, gts]  # [T, n]
        ok = free & (pair_value[lo:hi][None, :] >= thresholds[:, None])  # [T, n]
        pick = np.minimum.reduceat(np.where(ok, np.arange(hi - lo), hi - lo), firsts, axis=1)
        hit = pick < hi - lo  # [T, m]
        pick = np.minimum(pick, hi - lo - 1)
        det_gt[:, pair_det[lo:hi][firsts]] = np.where(hit, gts[pick], -1)
        rows, cols = np.nonzero(hit & ~reusable[lo:hi][pick])
        taken[rows, gts[pick[rows, cols]]] = True
    return det_gt


def preference_order(keep, pair_det, *keys) -> np.ndarray:
    """Indices of the kept pairs ``[P]`` by detection, then by ``keys`` (most significant first)."""
    kept = np.flatnonzero(keep)
    return kept[np.lexsort([key[kept] for key in reversed((pair_det, *keys))])]
