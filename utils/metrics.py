"""Detection AP as the VOC devkit and pycocotools compute it, streamed per batch and vectorised.

Inputs per image: detections ``[K, 6]`` = (x1, y1, x2, y2, score, class), sorted or not, and
ground truths ``[G, 6]`` = (x1, y1, x2, y2, class, difficult), normalised [0, 1] xyxy, torch
tensors on any device or numpy arrays (see ``utils.metrics_inputs``). IoU is continuous
(``utils.boxes``): in the VOC pixel frame (a VOC box (xmin, ymin, xmax, ymax) is ((xmin-1)/W,
(ymin-1)/H, xmax/W, ymax/H)) that is the devkit's +1 IoU, so the numbers are the devkit's. Only
floating point separates them: where the devkit's integer arithmetic gives an IoU of exactly
0.5, or two equal IoUs, normalised coordinates of a side that is not a power of two can land an
ulp either way; continuous detections never do.

VOC (IoU 0.5; VOC07 = 11-point at recall ``numpy.arange(0, 1.1, 0.1)``, the devkit's ``0:0.1:1``
in floating point, VOC12 = area under the monotone envelope) scores every detection given, as
the devkit and darknet's validate_detector do: per class, detections of the whole set by
descending score, ties in the order given (image, then row), as the devkit's stable Matlab
``sort`` reads them from the files ``write_voc_results`` writes. ``voc_matching="devkit"``
(default) is VOCevaldet.m: a detection goes to the ground truth of highest IoU among *all* of its
class in its image (first on ties); at IoU >= 0.5 it is ignored if that one is difficult, a true
positive if it is not yet detected, else a false positive (duplicate), even when another
undetected one overlaps it by >= 0.5. ``voc_matching="unmatched"`` takes the best among the not
yet detected instead (difficult ones are never detected); the two differ only where a detection
overlaps two objects of its class by >= 0.5. Difficult ground truths and crowd regions are not
positives and absorb the detections that match them.

COCO: pycocotools' COCOeval (bbox) detail for detail (``utils.coco_eval``) on each image's 100
best detections (all classes together, ties in the given order: what ``write_coco_results``
writes, so pycocotools' own per-class cap of 100 changes nothing); ``coco_stats`` holds
COCOeval.stats' 12 numbers in its order. Crowd regions and difficult ground truths are what
pycocotools calls ``iscrowd=1``. The area ranges need pixel sizes: ``image_sizes`` (and
``gt_areas``, else the pixel box's ``w h``); without ``image_sizes`` in every ``update`` the
six per-size entries (APs, APm, APl, ARs, ARm, ARl) are NaN and the others exact.

A class without positives gets NaN and is left out of every mean.
"""

import itertools
import math

import numpy as np

from utils.coco_eval import COCO_STATS_NAMES, MAX_DETS, coco_evaluate, image_ranks
from utils.matching import (
    first_per_run,
    greedy_match,
    group_order,
    overlaps,
    pairs,
    preference_order,
    stable_argsort,
)
from utils.metrics_inputs import check_rows, crowd_rows, gt_areas_px, image_sizes_px, stack_rows

__all__ = ["COCO_STATS_NAMES", "DetectionEvaluator", "evaluate_detections", "to_json"]

VOC_IOU_THRESHOLD = 0.5
VOC_MATCHING_RULES = ("devkit", "unmatched")


def _voc07_recall_points() -> np.ndarray:
    """``[11]`` thresholds as the devkit's ``0:0.1:1`` (0.30000000000000004, not 0.3, etc.)."""
    return np.arange(0, 1.1, 0.1)


class DetectionEvaluator:
    """Accumulates detections and ground truths over batches; ``compute`` returns every AP.

    Memory is the rows given (float32 for float32 input) and a few numbers per ground truth
    and image; nothing per class or per threshold until ``compute``.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        class_names: list[str] | None = None,
        voc_matching: str = "devkit",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"DetectionEvaluator: num_classes={num_classes}; need at least 1")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"DetectionEvaluator: {len(class_names)} class_names for num_classes="
                f"{num_classes}; pass one name per class"
            )
        if voc_matching not in VOC_MATCHING_RULES:
            raise ValueError(
                f"DetectionEvaluator: voc_matching={voc_matching!r}; use one of "
                f"{VOC_MATCHING_RULES}"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.voc_matching = voc_matching
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        self._detections: list[np.ndarray] = []  # [K, 6] per batch
        self._det_images: list[np.ndarray] = []  # [K]
        self._ground_truths: list[np.ndarray] = []  # [G, 6], crowd regions as difficult rows
        self._gt_images: list[np.ndarray] = []  # [G]
        self._gt_areas: list[np.ndarray] = []  # [G] pixels², NaN if unknown
        self._sizes: list[np.ndarray] = []  # [N, 2] (height, width) pixels, NaN if unknown
        self._num_images = 0

    def update(
        self,
        detections,
        ground_truths,
        *,
        image_sizes=None,
        gt_areas=None,
        crowd_boxes=None,
        crowd_labels=None,
    ) -> None:
        """Add one batch: lists over the same N images of detections ``[K, 6]`` and ground
        truths ``[G, 6]``. Optional, per image: ``image_sizes`` (height, width) in pixels of the
        original image; ``gt_areas`` ``[G]`` pixels² (COCO's ``area``; default the pixel box's
        ``w h``); ``crowd_boxes`` ``[K, 4]`` normalised xyxy with ``crowd_labels`` ``[K]``
        (COCO's ``iscrowd=1`` regions: never positives, absorb the detections on them)."""
        num = len(detections)
        if len(ground_truths) != num:
            raise ValueError(
                f"DetectionEvaluator.update: {num} detection entries but "
                f"{len(ground_truths)} ground-truth entries; pass one of each per image"
            )
        det_rows, det_counts = stack_rows(list(detections), "detections")
        gt_rows, gt_counts = stack_rows(list(ground_truths), "ground_truths")
        check_rows(det_rows, 5, self.num_classes, "detections")
        check_rows(gt_rows, 4, self.num_classes, "ground_truths")
        sizes = image_sizes_px(image_sizes, num)
        areas = gt_areas_px(gt_areas, gt_rows, gt_counts, sizes)
        crowd, crowd_counts = crowd_rows(crowd_boxes, crowd_labels, num, self.num_classes)
        image_ids = self._num_images + np.arange(num)
        self._detections.append(det_rows)
        self._det_images.append(np.repeat(image_ids, det_counts))
        self._ground_truths.append(np.concatenate([gt_rows.astype(np.float64), crowd]))
        gt_images = (np.repeat(image_ids, gt_counts), np.repeat(image_ids, crowd_counts))
        self._gt_images.append(np.concatenate(gt_images))
        self._gt_areas.append(np.concatenate([areas, np.zeros(len(crowd))]))  # crowd: unused
        self._sizes.append(sizes)
        self._num_images += num

    def compute(self) -> dict:
        """Every metric over the images seen so far; see ``evaluate_detections``."""
        detections = np.concatenate([np.zeros((0, 6)), *self._detections]).astype(np.float64)
        det_images = np.concatenate([np.zeros(0, np.int64), *self._det_images])
        ground_truths = np.concatenate([np.zeros((0, 6)), *self._ground_truths])
        gt_images = np.concatenate([np.zeros(0, np.int64), *self._gt_images])
        order = np.argsort(gt_images, kind="stable")  # crowd rows after the image's objects
        sizes = np.concatenate([np.zeros((0, 2)), *self._sizes])  # [N, 2]
        size = sizes[det_images]  # [D, 2] (height, width)
        det_areas = ((detections[:, 2] - detections[:, 0]) * size[:, 1]) * (
            (detections[:, 3] - detections[:, 1]) * size[:, 0]
        )  # pycocotools' w h of the pixel box
        gt_areas = np.concatenate([np.zeros(0), *self._gt_areas])[order]
        res = evaluate_detections(
            detections,
            det_images,
            ground_truths[order],
            gt_images[order],
            num_classes=self.num_classes,
            num_images=self._num_images,
            voc_matching=self.voc_matching,
            det_areas=det_areas if np.isfinite(sizes).all() else None,
            gt_areas=gt_areas,
        )
        res["class_names"] = self.class_names or [str(c) for c in range(self.num_classes)]
        return res


def _voc_matches(det_key, pair_det, pair_gt, iou, difficult, rule):
    """VOC matching at IoU 0.5 (see the module docstring) -> (true pos, false pos) ``[D]`` bool."""
    order = preference_order(iou >= VOC_IOU_THRESHOLD, pair_det, -iou, pair_gt)
    pair_det, pair_gt, iou = pair_det[order], pair_gt[order], iou[order]
    if rule == "unmatched":
        thresholds = np.array([VOC_IOU_THRESHOLD])
        reusable = difficult[pair_gt]  # difficult objects never become detected
        det_gt = greedy_match(pair_det, pair_gt, iou, reusable, det_key, thresholds, len(difficult))
        det_gt = det_gt[0]
    else:
        det_gt = np.full(len(det_key), -1, dtype=np.int64)
        firsts = first_per_run(pair_det)
        det_gt[pair_det[firsts]] = pair_gt[firsts]
    matched = det_gt >= 0
    counted = matched & ~np.append(difficult, False)[det_gt]  # -1 (no match) reads False
    if rule == "unmatched":
        return counted, ~matched
    # Detection indices follow score order within each image and class, so the first occurrence
    # of a ground truth is the detection that found it; later ones are duplicates.
    dets = np.flatnonzero(counted)
    _, first = np.unique(det_gt[dets], return_index=True)
    true_pos = np.zeros_like(counted)
    true_pos[dets[first]] = True
    return true_pos, ~matched | (counted & ~true_pos)


def _voc_curve(true_pos, false_pos, num_positives):
    """Devkit precision and recall ``[n]`` from per-detection flags ``[n]`` in score order."""
    tp = np.cumsum(true_pos, dtype=np.float64)
    fp = np.cumsum(false_pos, dtype=np.float64)
    return tp / np.maximum(tp + fp, np.finfo(np.float64).eps), tp / num_positives


def _voc07_ap(precision, recall) -> float:
    """11-point AP as VOC2007's VOCevaldet.m: the mean over t in the devkit's ``0:0.1:1`` of
    ``max(prec(rec >= t))``, 0 when no recall reaches t. (The devkit adds ``p / 11`` eleven
    times, which makes a perfect class 1.0000000000000002; the sum divided once stays in [0, 1].)
    """
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision from here on
    index = np.searchsorted(recall, _voc07_recall_points(), side="left")
    best = envelope[np.minimum(index, len(recall) - 1)] if len(recall) else np.zeros(11)
    return float(np.where(index < len(recall), best, 0.0).sum() / 11)


def _voc12_ap(precision, recall) -> float:
    """All-point AP: area under the monotone precision envelope (devkit VOCap.m)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]).sum())


def _sorted_detections(det: np.ndarray, det_image: np.ndarray, num_images: int):
    """Group order (class, image, score desc, given order) and each class's score order.

    Returns (order ``[D]``, group key ``[D]``, rank in group ``[D]``, class order ``[D]``); the
    class order indexes the group-ordered rows.
    """
    by_score = np.argsort(-det[:, 4], kind="stable")  # ties keep the given order
    order, det_key = group_order(det[by_score], det_image[by_score], 5, num_images)
    order = by_score[order]
    starts = first_per_run(det_key)  # [groups]
    rank = np.arange(len(det_key)) - np.repeat(starts, np.diff(np.r_[starts, len(det_key)]))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    labels = det[by_score, 5].astype(np.int64)
    class_order = position[by_score[stable_argsort(labels, labels.max(initial=0) + 1)]]
    return order, det_key, rank, class_order


def _mean(values: list[float]) -> float:
    """Mean over the finite entries; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _per_class(voc_flags, coco_precision, class_rows, positives) -> tuple[dict, list]:
    """Per-class AP lists (NaN without positives) and VOC (precision, recall) curves.

    ``voc_flags`` = (true pos, false pos) ``[D]``, ``coco_precision`` COCOeval's ``[T, R, K]``
    (area all, 100 detections), ``class_rows`` the detection indices of each class in score
    order, ``positives`` ``[C]``.
    """
    per_class = {k: [] for k in ("voc07", "voc12", "coco", "ap50_coco", "ap75_coco")}
    curves = []
    for k, (rows, num_positives) in enumerate(zip(class_rows, positives, strict=True)):
        precision, recall = _voc_curve(*(flags[rows] for flags in voc_flags), max(num_positives, 1))
        curves.append((precision, recall))
        coco = coco_precision[:, :, k].mean(axis=1)  # [T]
        values = (_voc07_ap(precision, recall), _voc12_ap(precision, recall), coco.mean())
        for key, value in zip(per_class, (*values, coco[0], coco[5]), strict=True):
            per_class[key].append(float(value) if num_positives > 0 else math.nan)
    return per_class, curves


def evaluate_detections(
    detections: np.ndarray,
    det_image: np.ndarray,
    ground_truths: np.ndarray,
    gt_image: np.ndarray,
    *,
    num_classes: int,
    num_images: int,
    voc_matching: str = "devkit",
    det_areas: np.ndarray | None = None,
    gt_areas: np.ndarray | None = None,
) -> dict:
    """All VOC and COCO metrics of a whole set.

    ``detections`` ``[D, 6]`` (x1, y1, x2, y2, score, class) and ``ground_truths`` ``[G, 6]``
    (x1, y1, x2, y2, class, difficult-or-crowd), float64 normalised xyxy, with the image index
    ``[D]`` / ``[G]`` (int64, in ``[0, num_images)``) of each row; rows in image order.
    ``det_areas`` ``[D]`` / ``gt_areas`` ``[G]``: pixels² for COCO's area ranges (both needed;
    without them only the range "all" is evaluated). Returns floats, per-class lists (NaN
    without ground truth), ``coco_stats`` (12), the VOC (precision, recall) curves and counts.
    """
    det_order, det_key, rank, class_order = _sorted_detections(detections, det_image, num_images)
    in_image_best = image_ranks(detections[:, 4], det_image)[det_order] < MAX_DETS[-1]
    coco_rank = np.where(in_image_best, rank, np.iinfo(np.int64).max)  # the rest: never read
    det = detections[det_order]
    gt_order, gt_key = group_order(ground_truths, gt_image, 4, num_images)
    gt = ground_truths[gt_order]
    difficult = gt[:, 5] != 0
    pair_det, pair_gt = pairs(det_key, gt_key)
    iou, crowd_iou = overlaps(det[pair_det, :4], gt[pair_gt, :4])
    voc_flags = _voc_matches(det_key, pair_det, pair_gt, iou, difficult, voc_matching)
    positives = np.bincount(gt[~difficult, 4].astype(np.int64), minlength=num_classes)
    bounds = np.searchsorted(det[class_order, 5], np.arange(num_classes + 1), side="left")
    class_rows = [class_order[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    known = det_areas is not None and gt_areas is not None
    coco = coco_evaluate(
        (det_key, pair_det, pair_gt, coco_rank),
        (iou, crowd_iou),
        (difficult, gt_areas[gt_order] if known else np.zeros(len(gt)), gt[:, 4].astype(int)),
        det_areas[det_order] if known else np.zeros(len(det)),
        class_rows,
        areas_known=known and bool(np.isfinite(gt_areas[ground_truths[:, 5] == 0]).all()),
    )
    per_class, curves = _per_class(voc_flags, coco["precision"][..., 0], class_rows, positives)
    return {
        **{f"map_{k}": _mean(per_class[k]) for k in ("voc07", "voc12", "coco")},
        **{k: _mean(per_class[k]) for k in ("ap50_coco", "ap75_coco")},
        "coco_stats": coco["stats"],
        "per_class": per_class,
        "curves": curves,
        "num_images": int(num_images),
        "num_detections": len(det),
        "num_ground_truths": int(positives.sum()),
        "num_ground_truths_per_class": [int(n) for n in positives],
    }


def _plain(value):
    """Numbers, arrays and containers -> JSON-ready lists and floats, NaN -> None."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_json(res: dict, *, max_curve_points: int | None = 1000) -> dict:
    """``compute()``'s result as plain JSON data (NaN -> null).

    Each curve becomes ``{"precision": [...], "recall": [...]}``, thinned to at most
    ``max_curve_points`` evenly spaced points (the last one kept); None keeps every point.
    """
    curves = []
    for precision, recall in res.get("curves", []):
        keep = np.arange(len(recall))
        if max_curve_points is not None and len(keep) > max_curve_points:
            keep = np.unique(np.linspace(0, len(recall) - 1, max_curve_points).round().astype(int))
        curves.append({"precision": precision[keep], "recall": recall[keep]})
    return _plain({**res, "curves": curves})
