"""Detection AP as the VOC devkit and pycocotools compute it, streamed per batch and vectorised.

Inputs per image (DESIGN.md): detections ``[K, 6]`` = (x1, y1, x2, y2, score, class) and ground
truths ``[G, 6]`` = (x1, y1, x2, y2, class, difficult), normalised xyxy, torch tensors on any
device or numpy arrays. IoU is continuous (``utils.boxes``): in the VOC pixel frame (a VOC box
(xmin, ymin, xmax, ymax) is ((xmin-1)/W, (ymin-1)/H, xmax/W, ymax/H)) that is the devkit's +1
IoU, so the numbers are the devkit's. Only floating point separates them: where the devkit's
integer arithmetic gives an IoU of exactly 0.5, or two equal IoUs, normalised coordinates of a
side that is not a power of two can land an ulp either way; continuous detections never do.

VOC (IoU 0.5; VOC07 = 11-point at recall ``numpy.arange(0, 1.1, 0.1)``, the devkit's ``0:0.1:1``
in floating point, VOC12 = area under the monotone envelope): per class, detections of the whole
set by descending score, ties in the order given (image, then row), as the devkit's stable
Matlab ``sort`` reads them from the files ``write_voc_results`` writes. ``voc_matching="devkit"``
(default) is VOCevaldet.m: a detection goes to the ground truth of highest IoU among *all* of its
class in its image (first on ties); at IoU >= 0.5 it is ignored if that one is difficult, a true
positive if it is not yet detected, else a false positive (duplicate), even when another
undetected one overlaps it by >= 0.5. ``voc_matching="unmatched"`` takes the best among the not
yet detected instead (difficult ones are never detected); the two differ only where a detection
overlaps two objects of its class by >= 0.5. Difficult ground truths are not positives.

COCO: pycocotools' COCOeval (bbox, area "all", maxDets 100) detail for detail: per image and
class the 100 best scores (stable), greedy matching per IoU threshold in .50:.05:.95 to the free
ground truth of highest IoU (last on ties) before any ignored one, monotone precision read at 101
recall points. Difficult ground truths are what pycocotools can ignore, ``iscrowd=1``: IoU with
them is intersection / detection area and they absorb any number of detections, which then count
neither way.

A class without (non-difficult) ground truth gets NaN and is left out of every mean.
"""

import itertools
import math

import numpy as np
import torch

from utils.boxes import box_iou_elementwise_np

__all__ = ["DetectionEvaluator", "evaluate_detections", "to_json"]

VOC_IOU_THRESHOLD = 0.5
COCO_MAX_DETECTIONS = 100
VOC_MATCHING_RULES = ("devkit", "unmatched")


def _coco_iou_thresholds() -> np.ndarray:
    """``[10]`` IoU thresholds built exactly as pycocotools' Params does."""
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


def _voc07_recall_points() -> np.ndarray:
    """``[11]`` thresholds as the devkit's ``0:0.1:1`` (0.30000000000000004, not 0.3, etc.)."""
    return np.arange(0, 1.1, 0.1)


def _coco_recall_points() -> np.ndarray:
    """``[101]`` recall points built exactly as pycocotools' Params does."""
    return np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _stack_rows(items, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-image ``[K_i, 6]`` tensors/arrays -> (rows ``[sum K_i, 6]`` float64, counts ``[N]``)."""
    shapes = [tuple(item.shape) for item in items]
    for i, shape in enumerate(shapes):
        if not (len(shape) == 2 and shape[1] == 6) and math.prod(shape) != 0:
            raise ValueError(
                f"DetectionEvaluator.update: {kind}[{i}] has shape {list(shape)}; expected "
                f"[K, 6] rows (see DESIGN.md 'Conventions'), or an empty tensor for none"
            )
    counts = np.array([0 if math.prod(s) == 0 else s[0] for s in shapes], dtype=np.int64)
    if len(items) == 0 or counts.sum() == 0:
        return np.zeros((0, 6)), counts
    tensors = [torch.as_tensor(item).detach().reshape(-1, 6) for item in items]  # [K_i, 6]
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    # One copy to the host per batch; float64 holds float32 and float64 inputs exactly.
    return torch.cat(tensors).to("cpu", torch.float64).numpy(), counts  # [sum K_i, 6]


def _check_rows(rows: np.ndarray, class_column: int, num_classes: int, kind: str) -> None:
    """Fail loudly on non-finite values or class indices outside ``[0, num_classes)``."""
    if not np.isfinite(rows).all():
        raise ValueError(f"DetectionEvaluator.update: {kind} contain NaN or inf; drop those rows")
    inverted = (rows[:, 2] < rows[:, 0]) | (rows[:, 3] < rows[:, 1])
    if inverted.any():
        raise ValueError(
            f"DetectionEvaluator.update: {kind} box {rows[inverted][0, :4].tolist()} has x2 < x1 "
            f"or y2 < y1; boxes are (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2"
        )
    labels = rows[:, class_column]
    bad = (labels < 0) | (labels >= num_classes) | (labels != np.round(labels))
    if bad.any():
        raise ValueError(
            f"DetectionEvaluator.update: {kind} class {float(labels[bad][0])} is not an integer in "
            f"[0, {num_classes}); pass 0-based class indices below num_classes={num_classes}"
        )


class DetectionEvaluator:
    """Accumulates detections and ground truths over batches; ``compute`` returns every AP.

    Memory is the rows given (float64), nothing per class or per threshold until ``compute``.
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
        self._detections: list[np.ndarray] = []
        self._det_images: list[np.ndarray] = []
        self._ground_truths: list[np.ndarray] = []
        self._gt_images: list[np.ndarray] = []
        self._num_images = 0

    def update(self, detections, ground_truths) -> None:
        """Add one batch: two lists over the same images of ``[K, 6]`` and ``[G, 6]`` rows."""
        if len(detections) != len(ground_truths):
            raise ValueError(
                f"DetectionEvaluator.update: {len(detections)} detection entries but "
                f"{len(ground_truths)} ground-truth entries; pass one of each per image"
            )
        det_rows, det_counts = _stack_rows(list(detections), "detections")
        gt_rows, gt_counts = _stack_rows(list(ground_truths), "ground_truths")
        _check_rows(det_rows, 5, self.num_classes, "detections")
        _check_rows(gt_rows, 4, self.num_classes, "ground_truths")
        image_ids = self._num_images + np.arange(len(detections))
        self._detections.append(det_rows)
        self._det_images.append(np.repeat(image_ids, det_counts))
        self._ground_truths.append(gt_rows)
        self._gt_images.append(np.repeat(image_ids, gt_counts))
        self._num_images += len(detections)

    def compute(self) -> dict:
        """Every metric over the images seen so far; see ``evaluate_detections``."""
        res = evaluate_detections(
            np.concatenate([np.zeros((0, 6)), *self._detections]),
            np.concatenate([np.zeros(0, np.int64), *self._det_images]),
            np.concatenate([np.zeros((0, 6)), *self._ground_truths]),
            np.concatenate([np.zeros(0, np.int64), *self._gt_images]),
            num_classes=self.num_classes,
            num_images=self._num_images,
            voc_matching=self.voc_matching,
        )
        res["class_names"] = self.class_names or [str(c) for c in range(self.num_classes)]
        return res


def _stable_argsort(values: np.ndarray, upper: int) -> np.ndarray:
    """Stable argsort of integers in ``[0, upper)`` (numpy radix-sorts 16-bit integers)."""
    return np.argsort(values.astype(np.uint16 if upper <= 2**16 else np.int64), kind="stable")


def _group_order(rows: np.ndarray, image: np.ndarray, class_column: int, num_images: int):
    """Stable order by (class, image) -> (order ``[M]``, group key ``[M]`` sorted, int64)."""
    order = _stable_argsort(image, num_images)
    labels = rows[order, class_column].astype(np.int64)
    order = order[_stable_argsort(labels, labels.max(initial=0) + 1)]
    key = rows[order, class_column].astype(np.int64) * max(num_images, 1) + image[order]  # [M]
    return order, key


def _pairs(det_key: np.ndarray, gt_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, ground truth) pair sharing a key -> (det index ``[P]``, gt index ``[P]``).

    ``gt_key`` must be sorted; pairs come out by detection, then ground-truth index.
    """
    start = np.searchsorted(gt_key, det_key, side="left")  # [D]
    count = np.searchsorted(gt_key, det_key, side="right") - start  # [D]
    pair_det = np.repeat(np.arange(len(det_key)), count)  # [P]
    offset = np.arange(len(pair_det)) - np.repeat(np.cumsum(count) - count, count)  # [P]
    return pair_det, np.repeat(start, count) + offset


def _overlaps(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _first_per_detection(sorted_ids: np.ndarray) -> np.ndarray:
    """Start index ``[m]`` of each run of equal values in sorted non-negative ids ``[P]``."""
    return np.flatnonzero(np.diff(sorted_ids, prepend=-1))


def _greedy_match(pair_det, pair_gt, pair_value, reusable, det_key, thresholds, num_gts):
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
    candidates = pair_det[_first_per_detection(pair_det)]  # [m]
    step = np.arange(len(candidates)) - np.searchsorted(det_key[candidates], det_key[candidates])
    pair_step = np.repeat(step, np.diff(np.r_[_first_per_detection(pair_det), len(pair_det)]))
    order = np.argsort(pair_step, kind="stable")  # keeps detection and preference order
    pair_det, pair_gt, pair_value = pair_det[order], pair_gt[order], pair_value[order]
    reusable, bounds = reusable[order], np.searchsorted(pair_step[order], np.arange(step.max() + 2))
    taken = np.zeros((len(thresholds), num_gts), dtype=bool)
    for lo, hi in itertools.pairwise(bounds):
        gts, firsts = pair_gt[lo:hi], _first_per_detection(pair_det[lo:hi])
        free = reusable[lo:hi] | ~taken[:, gts]  # [T, n]
        ok = free & (pair_value[lo:hi][None, :] >= thresholds[:, None])  # [T, n]
        pick = np.minimum.reduceat(np.where(ok, np.arange(hi - lo), hi - lo), firsts, axis=1)
        hit = pick < hi - lo  # [T, m]
        pick = np.minimum(pick, hi - lo - 1)
        det_gt[:, pair_det[lo:hi][firsts]] = np.where(hit, gts[pick], -1)
        rows, cols = np.nonzero(hit & ~reusable[lo:hi][pick])
        taken[rows, gts[pick[rows, cols]]] = True
    return det_gt


def _preference_order(keep, pair_det, *keys) -> np.ndarray:
    """Indices of the kept pairs ``[P]`` by detection, then by ``keys`` (most significant first)."""
    kept = np.flatnonzero(keep)
    return kept[np.lexsort([key[kept] for key in reversed((pair_det, *keys))])]


def _coco_matches(det_key, pair_det, pair_gt, rank, iou, crowd_iou, difficult):
    """pycocotools' evaluateImg for all images and classes -> (matched, ignored) ``[T, D]``.

    Preference: regular before ignored ground truths, then highest IoU, then the later one.
    """
    gt_difficult = difficult[pair_gt]  # [P]
    value = np.where(gt_difficult, crowd_iou, iou)
    keep = (value >= VOC_IOU_THRESHOLD) & (rank[pair_det] < COCO_MAX_DETECTIONS)
    order = _preference_order(keep, pair_det, gt_difficult, -value, -pair_gt)
    thresholds = np.minimum(_coco_iou_thresholds(), 1 - 1e-10)
    sorted_pairs = (a[order] for a in (pair_det, pair_gt, value, gt_difficult))
    det_gt = _greedy_match(*sorted_pairs, det_key, thresholds, len(difficult))
    return det_gt >= 0, np.append(difficult, False)[det_gt]  # -1 (no match) reads False


def _voc_matches(det_key, pair_det, pair_gt, iou, difficult, rule):
    """VOC matching at IoU 0.5 (see the module docstring) -> (true pos, false pos) ``[D]`` bool."""
    order = _preference_order(iou >= VOC_IOU_THRESHOLD, pair_det, -iou, pair_gt)
    pair_det, pair_gt, iou = pair_det[order], pair_gt[order], iou[order]
    if rule == "unmatched":
        thresholds = np.array([VOC_IOU_THRESHOLD])
        reusable = difficult[pair_gt]  # difficult objects never become detected
        det_gt = _greedy_match(
            pair_det, pair_gt, iou, reusable, det_key, thresholds, len(difficult)
        )
        det_gt = det_gt[0]
    else:
        det_gt = np.full(len(det_key), -1, dtype=np.int64)
        firsts = _first_per_detection(pair_det)
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


def _coco_ap(matched, ignored, num_positives) -> np.ndarray:
    """pycocotools' accumulate for one class: ``[T, n]`` flags in score order -> AP ``[T]``."""
    tp = np.cumsum(matched & ~ignored, axis=1, dtype=np.float64)  # [T, n]
    fp = np.cumsum(~matched & ~ignored, axis=1, dtype=np.float64)  # [T, n]
    num = tp.shape[1]
    if num == 0:
        return np.zeros(len(tp))
    recall = tp / num_positives
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    points = _coco_recall_points()
    ap = np.zeros(len(tp))
    for t in range(len(tp)):
        index = np.searchsorted(recall[t], points, side="left")  # [R]
        ap[t] = np.where(index < num, precision[t, np.minimum(index, num - 1)], 0.0).mean()
    return ap


def _sorted_detections(det: np.ndarray, det_image: np.ndarray, num_images: int):
    """Group order (class, image, score desc, given order) and each class's score order.

    Returns (order ``[D]``, group key ``[D]``, rank in group ``[D]``, class order ``[D]``); the
    class order indexes the group-ordered rows.
    """
    by_score = np.argsort(-det[:, 4], kind="stable")  # ties keep the given order
    order, det_key = _group_order(det[by_score], det_image[by_score], 5, num_images)
    order = by_score[order]
    starts = _first_per_detection(det_key)  # [groups]
    rank = np.arange(len(det_key)) - np.repeat(starts, np.diff(np.r_[starts, len(det_key)]))
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    labels = det[by_score, 5].astype(np.int64)
    class_order = position[by_score[_stable_argsort(labels, labels.max(initial=0) + 1)]]
    return order, det_key, rank, class_order


def _mean(values: list[float]) -> float:
    """Mean over the finite entries; NaN when there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def _per_class(voc_flags, coco_flags, rank, class_rows, positives) -> tuple[dict, list]:
    """Per-class AP lists (NaN without positives) and VOC (precision, recall) curves.

    ``voc_flags`` = (true pos, false pos) ``[D]``, ``coco_flags`` = (matched, ignored) ``[T, D]``,
    ``class_rows`` the detection indices of each class in score order, ``positives`` ``[C]``.
    """
    per_class = {k: [] for k in ("voc07", "voc12", "coco", "ap50_coco", "ap75_coco")}
    curves = []
    for rows, num_positives in zip(class_rows, positives, strict=True):
        precision, recall = _voc_curve(*(flags[rows] for flags in voc_flags), max(num_positives, 1))
        curves.append((precision, recall))
        kept = rows[rank[rows] < COCO_MAX_DETECTIONS]
        coco = _coco_ap(*(flags[:, kept] for flags in coco_flags), max(num_positives, 1))
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
) -> dict:
    """All VOC and COCO metrics of a whole set.

    ``detections`` ``[D, 6]`` (x1, y1, x2, y2, score, class) and ``ground_truths`` ``[G, 6]``
    (x1, y1, x2, y2, class, difficult), float64 normalised xyxy, with the image index ``[D]`` /
    ``[G]`` (int64, in ``[0, num_images)``) of each row; rows in image order. Returns floats,
    per-class lists (NaN without ground truth), the VOC (precision, recall) curves and counts.
    """
    det_order, det_key, rank, class_order = _sorted_detections(detections, det_image, num_images)
    det = detections[det_order]
    gt_order, gt_key = _group_order(ground_truths, gt_image, 4, num_images)
    gt = ground_truths[gt_order]
    difficult = gt[:, 5] != 0
    pair_det, pair_gt = _pairs(det_key, gt_key)
    iou, crowd_iou = _overlaps(det[pair_det, :4], gt[pair_gt, :4])
    pairs = (det_key, pair_det, pair_gt)
    voc_flags = _voc_matches(*pairs, iou, difficult, voc_matching)
    coco_flags = _coco_matches(*pairs, rank, iou, crowd_iou, difficult)
    positives = np.bincount(gt[~difficult, 4].astype(np.int64), minlength=num_classes)
    bounds = np.searchsorted(det[class_order, 5], np.arange(num_classes + 1), side="left")
    class_rows = [class_order[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    per_class, curves = _per_class(voc_flags, coco_flags, rank, class_rows, positives)
    return {
        **{f"map_{k}": _mean(per_class[k]) for k in ("voc07", "voc12", "coco")},
        **{k: _mean(per_class[k]) for k in ("ap50_coco", "ap75_coco")},
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
